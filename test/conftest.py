"""Fixtures shared by the test modules: a random model, a pipeline on it, a synthetic drive, a tiny config."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lmm_fusion.synth.drive import synthesize

if TYPE_CHECKING:
    from lmm_fusion.cycle.pipeline import FusionPipeline

#: A tiny model on small grids that trains and evaluates in seconds on a CPU: ``ModelConfig(**TINY_MODEL)``.
TINY_MODEL: dict[str, Any] = dict(
    image_height=32, image_width=64, image_roi_rows=8, camera_channels=(8, 8, 16, 16), lidar_stages=(8, 8, 16, 16),
    d_model=32, n_heads=2, n_layers=1, head_hidden=32,
    input_grid=dict(x_min=-8.0, x_max=56.0, y_min=-16.0, y_max=16.0, cell=1.0),
    occupancy_grid=dict(x_min=-8.0, x_max=56.0, y_min=-16.0, y_max=16.0, cell=2.0))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded (0), randomly initialised model of the current architecture (``ModelConfig()``), saved once
    per session. Shared by every module: copy it before changing a file in it."""
    # torch and what needs it are imported in the fixtures that use them: this file is loaded by every test
    # session, most of which never need a model, and importing torch costs seconds.
    import torch

    from lmm_fusion.model import FusionModel, ModelConfig, save_model

    torch.manual_seed(0)
    return save_model(FusionModel(ModelConfig()), tmp_path_factory.mktemp("model") / "random")


@pytest.fixture(scope="module")
def pipeline(model_dir: Path) -> Iterator[FusionPipeline]:
    """A torch, single-thread :class:`FusionPipeline` on :func:`model_dir`; one per module, since a pipeline
    keeps state between cycles (the LiDAR history)."""
    import torch

    from lmm_fusion.cycle.pipeline import FusionPipeline

    threads = torch.get_num_threads()
    yield FusionPipeline(model_dir, backend="torch", threads=1)
    torch.set_num_threads(threads)  # the torch backend set the process-wide count; give other modules theirs


@pytest.fixture(scope="module")
def drive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic drive (rosbag2 with ground truth) as the requesting module's ``DRIVE`` dict describes it:
    keyword arguments of :func:`lmm_fusion.synth.drive.synthesize` (``seconds`` and ``seed`` at least), and
    ``name``, the bag folder's name (default ``bag``). The bag is the only entry of its parent folder."""
    kw = dict(request.module.DRIVE)
    name, seconds = kw.pop("name", "bag"), kw.pop("seconds")
    return synthesize(tmp_path_factory.mktemp("drive") / name, seconds, progress=False, **kw)


@pytest.fixture
def tiny_model_config() -> dict[str, Any]:
    """A copy of :data:`TINY_MODEL` (``ModelConfig`` keyword arguments)."""
    return copy.deepcopy(TINY_MODEL)
