"""DDP under torchrun (gloo on CPU): 2 processes with the same global batch follow the 1-process loss curve,
every rank takes its own share of each batch, and rank 0 alone writes the log, checkpoint and model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lmm_fusion.base.rig import CameraModel, LidarModel, SensorRig
from lmm_fusion.training.train import Schedule, _epoch_order

#: The module's synthetic drive (the ``drive`` fixture of conftest): 30 samples for the CLI under torchrun.
DRIVE = dict(seconds=3.0, seed=1, rig=SensorRig(camera=CameraModel(160, 90), lidar=LidarModel(beams=16, columns=128)),
             name="drive")

#: |loss(2 processes) - loss(1 process)| / loss(1 process), per epoch. What differs is only what depends
#: on the batch composition: BatchNorm statistics over 4 instead of 8 samples and the alignment loss's
#: in-batch negatives; everything else (order, dropout, augmentation, gradient) is that of the whole batch.
REL_TOL = 0.05
EPOCHS = 4

SCRIPT = """
    import json, os, sys, torch
    sys.path.insert(0, {test_dir!r})
    from test_train import TINY, toy_arrays
    from lmm_fusion.model import ModelConfig
    from lmm_fusion.training.dataset import FusionDataset
    from lmm_fusion.training.train import train
    torch.set_num_threads(1)
    cfg = ModelConfig(**TINY)
    ds = FusionDataset.from_arrays(toy_arrays(32), cfg)
    # resident="on": each rank gathers, drops and augments its share from the whole set held as tensors
    # (the one-process reference builds its batches from numpy), so this also checks that path under DDP.
    rec = train(cfg, ds, {out!r}, epochs={epochs}, batch_size=8, lr=3e-3, seed=0, p_drop=0.5, progress=False,
                device="cpu", resident="on")
    # one file per rank: the ranks' stdout lines can interleave
    open({out!r} + ".steps." + os.environ.get("RANK", "0"), "w").write(str(rec["step"]))
"""


def _torchrun(tmp_path: Path, name: str, nproc: int) -> Path:
    out = tmp_path / name
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(SCRIPT.format(test_dir=str(Path(__file__).parent), out=str(out),
                                                    epochs=EPOCHS)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun --nproc_per_node {nproc} did not finish within 240 s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # every rank took the same number of global steps: 32 samples / global batch 8 = 4 per epoch
    steps = [Path(f"{out}.steps.{r}").read_text() for r in range(nproc)]
    assert steps == [str(4 * EPOCHS)] * nproc, (steps, proc.stdout)
    return out


def _losses(out: Path) -> np.ndarray:
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(EPOCHS))  # rank 0 alone wrote: one line per epoch
    return np.array([r["train"]["loss"] for r in lines])


def _one_process(tmp_path: Path) -> Path:
    """The same run as SCRIPT in this process (no process group: world size 1)."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import TINY, toy_arrays

    from lmm_fusion.model import ModelConfig
    from lmm_fusion.training.dataset import FusionDataset
    from lmm_fusion.training.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = ModelConfig(**TINY)
        rec = train(cfg, FusionDataset.from_arrays(toy_arrays(32), cfg), tmp_path / "one", epochs=EPOCHS,
                    batch_size=8, lr=3e-3, seed=0, p_drop=0.5, progress=False, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert rec["step"] == 4 * EPOCHS
    return tmp_path / "one"


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(tmp_path: Path) -> None:
    one = _losses(_one_process(tmp_path))
    two = _losses(_torchrun(tmp_path, "two", 2))
    rel = np.abs(two - one) / one
    assert rel.max() < REL_TOL, f"1 process {one}, 2 processes {two}, relative difference {rel}"
    assert two[-1] < two[0]  # and it learns
    for d in (tmp_path / "one", tmp_path / "two"):
        assert (d / "model.safetensors").is_file() and (d / "checkpoint" / "progress.json").is_file()
    assert json.loads((tmp_path / "two" / "config.json").read_text())  # the model rank 0 wrote


def test_global_batch_is_split_between_ranks() -> None:
    sched = Schedule.plan(n=37, world=2, batch_size=8, epochs=3, base_lr=1e-3)
    assert (sched.batch, sched.rank_batch, sched.steps_per_epoch, sched.total) == (8, 4, 4, 12)
    assert Schedule.plan(37, 1, 8, 3, 1e-3).total == sched.total  # same steps and schedule as one process
    _, order = _epoch_order(0, 1, 37, sched)
    shares = [order[i * 8:(i + 1) * 8][r * 4:(r + 1) * 4] for i in range(4) for r in range(2)]
    assert len(np.unique(np.concatenate(shares))) == 32  # the ranks' shares are disjoint and cover the epoch
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        Schedule.plan(37, 3, 8, 1, 1e-3)
    small = Schedule.plan(n=5, world=2, batch_size=8, epochs=1, base_lr=1e-3)  # fewer samples than one batch
    assert (small.batch, small.rank_batch, small.steps_per_epoch) == (4, 2, 1)


@pytest.mark.slow
def test_cli_train_under_torchrun_on_a_bag(drive: Path, tmp_path: Path) -> None:
    """``lmm-fusion train`` as torchrun launches it, on a recorded drive: rank 0 fills the sample cache while
    the other waits, and a step where a rank's share leaves a parameter without gradient does not stop DDP
    (without ``find_unused_parameters`` this drive fails in its first epoch)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lmm_fusion.training.train", "--data", str(drive), "--out", str(tmp_path / "m"),
           "--cache", str(tmp_path / "cache"), "--epochs", "1", "--batch-size", "4", "--threads", "1",
           "--device", "cpu", "--no-progress", "--resident", "on"]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # printed by rank 0 only
    assert summary["step"] == summary["samples"] // 4 and (tmp_path / "m" / "model.safetensors").is_file()
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
