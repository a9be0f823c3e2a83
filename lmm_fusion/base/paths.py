"""Where shipped files live: the source tree, a pip/venv install, or a ROS 2 install's share dir."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = "lmm_fusion"
#: Name of the shipped model folder under ``models/``.
DEFAULT_MODEL = "fusion_small"


def share_dirs() -> list[Path]:
    """Candidate roots holding ``config/``, ``launch/`` and ``models/``, most specific first."""
    roots = [Path(__file__).resolve().parents[2]]  # source tree / editable install
    try:
        from ament_index_python.packages import get_package_share_directory

        roots.append(Path(get_package_share_directory(PACKAGE)))
    except Exception:
        pass
    roots.append(Path(sys.prefix) / "share" / PACKAGE)
    return roots


def find_shared(relative: str) -> Path:
    """First existing ``root/relative`` among :func:`share_dirs`; FileNotFoundError naming all tried."""
    tried = [root / relative for root in share_dirs()]
    for p in tried:
        if p.exists():
            return p
    raise FileNotFoundError(f"{relative} not found; looked in {[str(p) for p in tried]}")


def default_model_dir() -> Path:
    """The shipped model directory (``models/fusion_small``)."""
    return find_shared(f"models/{DEFAULT_MODEL}")


def cache_dir() -> Path:
    """Writable cache for derived artefacts (exported ONNX of a read-only model dir, engines)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    d = base / PACKAGE
    d.mkdir(parents=True, exist_ok=True)
    return d
