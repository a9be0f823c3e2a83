"""The repository as a ROS 2 workspace package: found by catkin_pkg (rosdep's parser) and colcon,
built with colcon (interfaces included, no symlink install), and run from the install space.

The build uses the ament and rosidl packages of the venv (the PyPI wheels), as a system ROS 2
install's would be used after sourcing its setup file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from catkin_pkg.packages import find_packages

ROOT = Path(__file__).resolve().parents[1]
VENV_PREFIX = Path(sys.prefix)
COLCON = shutil.which("colcon", path=str(VENV_PREFIX / "bin"))


def test_catkin_pkg_finds_one_interface_package_at_the_root() -> None:
    # rosdep and colcon both stop descending at a folder with a package.xml: a package nested inside
    # the root one would never be built, so the root package itself must hold the interfaces.
    packages = find_packages(str(ROOT), exclude_paths=[str(ROOT / ".venv"), str(ROOT / "build")])
    assert list(packages) == ["."], packages
    pkg = packages["."]
    assert pkg.name == "lmm_fusion"
    assert pkg.get_build_type() == "ament_cmake"
    assert "rosidl_interface_packages" in [g.name for g in pkg.member_of_groups]
    assert {"ament_cmake", "ament_cmake_python", "rosidl_default_generators"} <= {d.name for d in pkg.buildtool_depends}
    assert sorted(p.name for p in (ROOT / "msg").glob("*.msg")) == [
        "ActionSuggestion.msg", "ModalityStatus.msg", "SceneAssessment.msg"]


@pytest.mark.skipif(COLCON is None, reason="colcon is a pinned requirement of the venv")
def test_colcon_lists_the_package() -> None:
    out = subprocess.run([COLCON, "list", "--base-paths", str(ROOT)], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out[0] == "lmm_fusion" and out[-1] == "(ros.ament_cmake)", out


def _install_env(install: Path) -> dict[str, str]:
    """What sourcing ``install/setup.bash`` on top of the venv's ROS packages would set."""
    env = dict(os.environ)
    site = install / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    env["PYTHONPATH"] = str(site)
    env["AMENT_PREFIX_PATH"] = f"{install}{os.pathsep}{VENV_PREFIX}"
    env["LD_LIBRARY_PATH"] = f"{install / 'lib'}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
    return env


@pytest.mark.slow
@pytest.mark.skipif(COLCON is None, reason="colcon is a pinned requirement of the venv")
def test_colcon_build_installs_interfaces_and_the_node_loads_the_shipped_model(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / "src" / "lmm_fusion").symlink_to(ROOT, target_is_directory=True)
    env = dict(os.environ, AMENT_PREFIX_PATH=str(VENV_PREFIX), CMAKE_PREFIX_PATH=str(VENV_PREFIX),
               PATH=f"{VENV_PREFIX / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    build = subprocess.run(
        [COLCON, "build", "--event-handlers", "console_direct-", "--cmake-args", "-G", "Ninja",
         f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF",
         # The wheels' exported include folders name their build machine (see the file).
         f"-DCMAKE_PROJECT_INCLUDE={ROOT / 'tools' / 'fix_wheel_includes.cmake'}"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    install = ws / "install" / "lmm_fusion"
    assert (install / "share" / "lmm_fusion" / "msg" / "SceneAssessment.msg").is_file()
    assert (install / "share" / "lmm_fusion" / "models" / "fusion_small" / "model.safetensors").is_file()
    assert (install / "share" / "lmm_fusion" / "launch" / "fusion.launch.py").is_file()
    # Not a symlink install: the Python package is a copy, holding the generated interfaces beside it.
    site = install / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert not (site / "lmm_fusion" / "cli.py").is_symlink() and (site / "lmm_fusion" / "msg").is_dir()

    # From another folder, with only the install space (and the ROS packages under it) on the paths.
    probe = ("import lmm_fusion, lmm_fusion.msg; from lmm_fusion.base.paths import default_model_dir; "
             "print(lmm_fusion.__file__); print(lmm_fusion.msg.SceneAssessment.__module__); print(default_model_dir())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=_install_env(install),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    module_file, msg_module, model_dir = out.stdout.split()
    assert Path(module_file).is_relative_to(site)
    assert msg_module == "lmm_fusion.msg._scene_assessment"
    assert Path(model_dir) == install / "share" / "lmm_fusion" / "models" / "fusion_small"

    node = subprocess.run([sys.executable, str(install / "lib" / "lmm_fusion" / "lmm-fusion"), "node", "--build-only",
                           "-p", "backend:=torch"], cwd=tmp_path, env=_install_env(install),
                          capture_output=True, text=True, timeout=180)
    log = node.stdout + node.stderr
    assert node.returncode == 0, log[-3000:]
    assert f"model {install / 'share' / 'lmm_fusion' / 'models' / 'fusion_small'}" in log, log[-3000:]
    assert "random" not in log.lower(), log[-3000:]
