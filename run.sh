#!/usr/bin/env bash
# One entry point for the venv path (no system ROS 2 needed).
#   bash run.sh demo   set up, then drive the real node with a synthetic drive and summarise
#   bash run.sh test   set up, then run ruff, the type checker (mypy) and the test suite
#   bash run.sh setup  set up only;  bash run.sh <lmm-fusion args...>  run the CLI in the venv
# Set-up is idempotent: each step is skipped when its inputs have not changed.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
PY=${PYTHON:-python3}
STAMPS=$VENV/.lmm_fusion_stamps

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

ensure_apt() {
  # Build tools for the package's interfaces. Installed only when missing.
  local missing=()
  command -v cmake >/dev/null || missing+=(cmake)
  command -v g++ >/dev/null || missing+=(g++)
  command -v ninja >/dev/null || missing+=(ninja-build)
  "$PY" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  if ((${#missing[@]})); then
    log "installing apt packages: ${missing[*]}"
    local sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}"
  fi
}

hash_of() { cat "$@" | sha256sum | cut -c1-16; }

setup() {
  ensure_apt
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  mkdir -p "$STAMPS"
  local req; req=$(hash_of requirements.txt)
  if [ "$(cat "$STAMPS/requirements" 2>/dev/null)" != "$req" ]; then
    log "installing pinned dependencies (requirements.txt)"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v 'is ignored: it is neither' || true
    "$VENV/bin/python" -c 'import rclpy, torch, rosbags' || { log "dependency install failed"; exit 1; }
    echo "$req" > "$STAMPS/requirements"
  fi
  local msgs; msgs=$(hash_of CMakeLists.txt package.xml msg/*.msg tools/fix_wheel_includes.cmake)
  if [ "$(cat "$STAMPS/msgs" 2>/dev/null)" != "$msgs" ]; then
    log "building the lmm_fusion interfaces into the venv"
    rm -rf build/interfaces && mkdir -p build
    # The root CMakeLists.txt, the one colcon builds, with the Python package left to pip below.
    # CMAKE_PROJECT_INCLUDE works around the wheels' exported include folders (see the file).
    cmake -S . -B build/interfaces -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$VENV" -DCMAKE_INSTALL_PREFIX="$VENV" \
      -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF -DLMM_FUSION_INSTALL_PYTHON=OFF \
      -DCMAKE_PROJECT_INCLUDE="$ROOT/tools/fix_wheel_includes.cmake" >build/interfaces.log 2>&1 \
      && cmake --build build/interfaces >>build/interfaces.log 2>&1 \
      && cmake --install build/interfaces >>build/interfaces.log 2>&1 \
      || { tail -30 build/interfaces.log; log "interface build failed (log: build/interfaces.log)"; exit 1; }
    # The generated modules land in site-packages/lmm_fusion/ with an empty __init__.py and an
    # egg-info of their own. Without those two that folder is a plain portion that the source
    # package's extend_path joins (lmm_fusion/__init__.py), and pip keeps one record of the package.
    local site; site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    rm -rf "$site/lmm_fusion/__init__.py" "$site/lmm_fusion/__pycache__" "$site"/lmm_fusion-*.egg-info
    echo "$msgs" > "$STAMPS/msgs"
    rm -f "$STAMPS/package"  # re-check the package import below
  fi
  local pkg; pkg=$(hash_of setup.py setup.cfg)
  if [ "$(cat "$STAMPS/package" 2>/dev/null)" != "$pkg" ]; then
    log "installing lmm_fusion (editable)"
    # compat mode puts the repository on sys.path, so the source package is found as a regular
    # package ahead of the generated portion (setuptools' default import hook would come after it).
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation \
      --config-settings editable_mode=compat -e . 2>&1 | grep -v 'is ignored: it is neither' || true
    "$VENV/bin/python" -c 'from lmm_fusion.msg import SceneAssessment; import lmm_fusion.cli' \
      || { log "lmm_fusion or its interfaces do not import"; exit 1; }
    echo "$pkg" > "$STAMPS/package"
  fi
}

cmd=${1:-demo}
case "$cmd" in
  setup) setup ;;
  demo) shift || true; setup; exec "$VENV/bin/lmm-fusion" demo "$@" ;;
  test)
    shift || true; setup
    "$VENV/bin/ruff" check lmm_fusion test launch
    "$VENV/bin/mypy"  # configured in pyproject.toml: the whole lmm_fusion package
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *) setup; exec "$VENV/bin/lmm-fusion" "$@" ;;
esac
