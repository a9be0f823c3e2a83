"""``lmm-fusion train``: train the fusion model on rosbag2 drives.

Single process (CPU or CUDA with AMP) or DistributedDataParallel under ``torchrun``::

    lmm-fusion train --data data/train --out models/fusion_small --epochs 12
    torchrun --nproc-per-node 2 -m lmm_fusion.training.train --data data/train --out runs/ddp  # gloo (CPU), nccl (CUDA)

``--batch-size`` is the *global* batch: under ``torchrun`` each of the N processes takes ``batch / N`` of
every batch (it must divide), the shuffle, modality dropout and augmentation are drawn for the whole batch on
every rank, and DDP averages the gradients, so N processes follow the single-process run (same steps, same
learning-rate schedule; only BatchNorm statistics and the alignment loss's in-batch negatives are per rank).
Rank 0 alone logs, validates, checkpoints and writes the model, and fills the sample cache before the other
ranks read it.

Deterministic for a given seed: shuffling and modality dropout draw from ``numpy`` generators keyed
by ``(seed, epoch)``, so a run resumed from its last epoch checkpoint continues exactly. Checkpoints
(``<out>/checkpoint/``: weights + optimiser moments as safetensors, progress as JSON) are written after
every epoch; ``--resume`` picks them up. Metrics go to ``<out>/train_log.jsonl`` (one JSON per epoch).
``--resident auto|on|off``: the training set held on the training device (images stay uint8 there), batches
gathered, normalised, augmented and modality-dropped there from the same numpy draws (auto: on CUDA when it fits
in half the free device memory); on the CPU the same run bit for bit.
``--init-from MODEL_DIR`` fine-tunes instead: the weights (and configuration) of a trained model, a
fresh optimiser and a fresh warm-up + cosine schedule over ``--epochs`` (e.g. on new drives).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from lmm_fusion.model import FusionModel, ModelConfig, save_model
from lmm_fusion.model.checkpoint import load_config, load_model, model_metadata
from lmm_fusion.model.losses import FusionLoss, LossWeights
from lmm_fusion.training.dataset import FusionDataset, ResidentSamples, bag_fingerprint, expand_bags
from lmm_fusion.training.evaluate import quick_metrics
from lmm_fusion.training.recipe import RecipeStopped, run_recipe

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "train_log.jsonl"
#: ``--resident auto`` holds the training set on a CUDA device when its arrays take at most this fraction of
#: the device's free memory (the rest is for the model, activations and the allocator's cache).
RESIDENT_FRACTION = 0.5
TARGET_KEYS = ("risk", "action", "light", "target_speed", "ttc", "distance", "occupancy")


# ---------------------------------------------------------------- modality dropout
def modality_dropout(data_mask: np.ndarray, rng: np.random.Generator, p_drop: float) -> np.ndarray:
    """Mask ``(B, 3)`` the model sees: with probability ``p_drop`` a sample loses one present modality
    (two thirds of those) or keeps only one (the other third). A modality absent in the data stays
    absent. Returns float32."""
    b = int(data_mask.shape[0])
    used = data_mask.astype(bool).copy()
    drop = rng.random(b) < p_drop
    keep_one = rng.random(b) < (1.0 / 3.0)
    pick = rng.integers(0, 3, size=b)
    for i in np.flatnonzero(drop):  # loop over a batch (<= a few hundred), not over points
        present = np.flatnonzero(used[i])
        if len(present) < 2:
            continue
        j = present[pick[i] % len(present)]
        if keep_one[i]:
            used[i] = False
            used[i, j] = True
        else:
            used[i, j] = False
    return used.astype(np.float32)


# ---------------------------------------------------------------- augmentation
def augment(b: dict[str, torch.Tensor], rng: np.random.Generator, rows: slice | None = None,
            total: int | None = None) -> None:
    """Photometric camera jitter (global gain/offset, small per-channel gain, pixel noise) and GNSS
    feature noise, in place on a batch of normalised inputs. Geometry is left alone: every label
    (distances, lanes, which side is free) depends on it. Deterministic given ``rng``.

    ``b`` may be the rows ``rows`` of a batch of ``total`` samples (one rank's share under DDP): the random
    numbers are drawn for all ``total`` and the rows' own applied, so the samples are augmented exactly as
    when one process takes the whole batch."""
    img = b["image"]
    n = img.shape[0] if total is None else total
    part = slice(0, n) if rows is None else rows
    dev = img.device
    gain = (rng.uniform(0.75, 1.25, (n, 1, 1, 1)) * rng.uniform(0.97, 1.03, (n, 3, 1, 1)))[part]
    offset = rng.normal(0.0, 0.15, (n, 1, 1, 1))[part]
    # The pixel noise is drawn where the batch is (a CUDA generator on the GPU: the same seed, other
    # numbers than on the CPU, but as reproducible); the CPU path is the CPU generator, unchanged.
    g = torch.Generator(device=dev).manual_seed(int(rng.integers(2**31)))
    noise = torch.randn((n, *img.shape[1:]), generator=g, device=dev)[part] * float(rng.uniform(0.0, 0.08))
    b["image"] = img * torch.from_numpy(gain.astype(np.float32)).to(dev) \
        + torch.from_numpy(offset.astype(np.float32)).to(dev) + noise
    ego = b["ego"]
    jitter = torch.from_numpy(rng.normal(0.0, 0.02, (n, 3)).astype(np.float32)[part]).to(ego.device)
    ego = ego.clone()
    ego[:, :3] += jitter * (ego[:, 7:8] > 0)  # only where a GNSS state exists
    ego[:, 3] = ego[:, 0] * ego[:, 0] * (ego[:, 7] > 0)
    b["ego"] = ego


# ---------------------------------------------------------------- resident training set
def resident_samples(ds: FusionDataset, device: torch.device, mode: str = "auto") -> ResidentSamples | None:
    """``ds`` held on ``device`` (:class:`ResidentSamples`), or None to build batches on the CPU.

    ``mode``: ``on`` always; ``off`` never; ``auto`` on a CUDA device when the arrays take at most
    :data:`RESIDENT_FRACTION` of its free memory (never on the CPU, where batches are built in place)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"resident={mode!r}: expected 'auto', 'on' or 'off'")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    need = ResidentSamples.nbytes(ds)
    if mode == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        if need > RESIDENT_FRACTION * free:
            log.info("training set of %.2f GB not resident on %s: over %.0f %% of its %.2f GB free; batches are "
                     "built on the CPU", need / 1e9, device, 100 * RESIDENT_FRACTION, free / 1e9)
            return None
    res = ResidentSamples(ds, device)
    log.info("training set resident on %s (%.2f GB)", device, need / 1e9)
    return res


# ---------------------------------------------------------------- BatchNorm statistics
@torch.no_grad()
def recalibrate_batchnorm(model: FusionModel, ds: FusionDataset, batch_size: int, max_batches: int, seed: int,
                          device: torch.device, resident: ResidentSamples | None = None) -> None:
    """Recompute every BatchNorm's running mean/var as a plain average over ``max_batches`` training
    batches with the final weights. The exponential running averages lag behind weights that moved
    fast (high learning rate, short runs), which shows as a gap between train- and eval-mode outputs.
    ``resident``: ``ds`` held on the device, batches gathered there (the same batches)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    idx = np.random.default_rng([seed, 1_000_003]).permutation(len(ds))
    for i in range(min(max_batches, max(1, len(ds) // batch_size))):
        b = (resident or ds).batch(idx[i * batch_size:(i + 1) * batch_size])
        model(b["image"].to(device), b["bev"].to(device), b["ego"].to(device), b["modality_mask"].to(device))
    for m, (mom, _) in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)


# ---------------------------------------------------------------- checkpoints
def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            out[f"{i}.{k}"] = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).detach().cpu().contiguous()
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
    """Weights, optimiser moments (safetensors) and progress (JSON) under ``out/checkpoint``; atomic."""
    d = out / CHECKPOINT_DIR
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "model.safetensors.tmp"))
    save_file(_optimizer_tensors(opt), str(d / "optimizer.safetensors.tmp"))
    (d / "progress.json.tmp").write_text(json.dumps(progress, indent=2, sort_keys=True))
    for name in ("model.safetensors", "optimizer.safetensors", "progress.json"):
        (d / f"{name}.tmp").replace(d / name)


def load_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    d = out / CHECKPOINT_DIR
    if not (d / "progress.json").is_file():
        return None
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    _load_optimizer_tensors(opt, load_file(str(d / "optimizer.safetensors")))
    return json.loads((d / "progress.json").read_text())


def initial_weights(model_dir: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """State dict of the trained model in ``model_dir`` to fine-tune from. Raises ``ValueError`` naming
    the fields where its configuration differs from ``cfg`` (the weights would not mean the same)."""
    theirs, ours = load_config(model_dir).to_dict(), cfg.to_dict()
    differ = sorted(k for k in ours if theirs.get(k) != ours[k])
    if differ:
        raise ValueError(f"--init-from {model_dir}: its configuration differs in "
                         + ", ".join(f"{k}={theirs.get(k)!r} (this run: {ours[k]!r})" for k in differ))
    return load_model(model_dir).state_dict()


# ---------------------------------------------------------------- distributed
def _dist_setup(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device(device_arg)
    if world > 1 and not dist.is_initialized():  # run() may have joined already (sample cache, below)
        # Generous timeout: rank 0 may extract the sample cache for a long while before the first barrier.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return rank, world, device


def _all_reduce_mean(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


# ---------------------------------------------------------------- training
def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5 % of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac)))


@dataclass(frozen=True)
class Schedule:
    """Steps of a run: every optimiser step takes a *global* batch of ``batch`` samples, ``rank_batch`` on
    each of the ``world`` ranks (so N processes train as one process with the same batch size), and each
    rank takes ``per_rank`` samples an epoch in ``steps_per_epoch`` steps; the learning rate warms up over
    ``warmup`` of the ``total`` steps, then decays (:func:`lr_at`)."""

    per_rank: int
    steps_per_epoch: int
    total: int
    warmup: int
    base_lr: float
    batch: int = 0
    rank_batch: int = 0

    @classmethod
    def plan(cls, n: int, world: int, batch_size: int, epochs: int, base_lr: float) -> Schedule:
        """The schedule of ``epochs`` over ``n`` samples with global batch ``batch_size`` split across
        ``world`` ranks (a multiple of ``world``; a set smaller than one batch is one shorter batch)."""
        if batch_size < 1 or batch_size % world:
            raise ValueError(f"batch_size {batch_size} is the global batch: it must be a positive multiple of "
                             f"the {world} processes")
        batch = min(batch_size, (n // world) * world)
        if batch < world:
            raise ValueError(f"{n} training samples cannot be split across {world} processes")
        steps_per_epoch = n // batch
        total = steps_per_epoch * epochs
        return cls(steps_per_epoch * (batch // world), steps_per_epoch, total, min(200, max(1, total // 20)),
                   base_lr, batch, batch // world)

    def lr(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (counted over the whole run)."""
        return lr_at(step, self.total, self.base_lr, self.warmup)


@dataclass
class Trainer:
    """What every optimiser step of one run uses: the model, its optimiser, loss and precision."""

    model: FusionModel  # the weights: saved, validated, BatchNorm-recalibrated
    net: nn.Module  # what the forward pass runs: ``model`` or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    loss_fn: FusionLoss
    scaler: torch.amp.GradScaler
    use_amp: bool
    device: torch.device

    def step(self, b: dict[str, torch.Tensor], used: torch.Tensor, lr: float) -> dict[str, float]:
        """One optimiser step on batch ``b`` (on ``device``) with the modalities ``used (B, 3)`` the model
        sees; returns the loss parts and the total as ``loss``."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            o = self.net(b["image"], b["bev"], b["ego"], used, with_embeddings=True)
        loss, parts = self.loss_fn(o, b, data_mask=b["modality_mask"], used_mask=used)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        parts["loss"] = float(loss.detach())
        return parts


def _initial_model(cfg: ModelConfig, seed: int, init_from: Path | None, device: torch.device) -> FusionModel:
    """A model seeded with ``seed`` (or with the weights of ``init_from``), on ``device``."""
    torch.manual_seed(seed)
    model = FusionModel(cfg)
    if init_from is not None:
        model.load_state_dict(initial_weights(init_from, cfg))
    return model.to(device)


def _resume_point(out: Path, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(first epoch, optimiser steps done) after loading the checkpoint of ``out``; (0, 0) without one."""
    prog = load_checkpoint(out, model, opt)
    if prog is None:
        return 0, 0
    log.info("resumed from %s at epoch %d", out / CHECKPOINT_DIR, int(prog["epoch"]) + 1)
    return int(prog["epoch"]) + 1, int(prog["step"])


def _epoch_order(seed: int, epoch: int, n: int, sched: Schedule) -> tuple[np.random.Generator, np.ndarray]:
    """The generator of epoch ``epoch`` (modality dropout and augmentation draw from it after the
    shuffle) and the epoch's sample indices ``(steps_per_epoch * batch,)`` in training order, the same on
    every rank: global batch ``i`` is ``order[i * batch:(i + 1) * batch]``, of which rank ``r`` takes the
    ``r``-th ``rank_batch`` (:func:`_train_epoch`)."""
    rng = np.random.default_rng([seed, epoch])
    return rng, rng.permutation(n)[: sched.steps_per_epoch * sched.batch]


def _train_epoch(trainer: Trainer, sched: Schedule, train_set: FusionDataset, order: np.ndarray,
                 rng: np.random.Generator, step: int, *, p_drop: float, augmentation: bool,
                 max_steps: int | None, bar_desc: str | None, rank: int = 0,
                 resident: ResidentSamples | None = None) -> tuple[dict[str, float], int]:
    """One pass over ``order`` (:func:`_epoch_order`) taking this rank's share of every global batch,
    stopping early at ``max_steps``; returns (mean loss parts over the steps taken, optimiser steps done so
    far). ``bar_desc``: label of a progress bar, None for none. ``resident``: ``train_set`` held on the
    device: batches are gathered, augmented and modality-dropped there, with the same random draws.

    Modality dropout and augmentation draw their random numbers for the whole global batch on every rank
    and apply this rank's rows: the samples are treated as by one process taking the whole batch. DDP
    averages the ranks' gradients, so with equal shares the step is the one of the whole batch; what still
    differs is what depends on the batch composition: BatchNorm statistics (per rank, as in any DDP run)
    and the in-batch negatives of the alignment loss."""
    steps: Iterable[int] = range(sched.steps_per_epoch)
    bar = None
    if bar_desc is not None:
        bar = tqdm(steps, desc=bar_desc, leave=False, file=sys.stderr)
        steps = bar
    sums: dict[str, float] = {}
    done = 0
    order_dev = resident.index(order) if resident is not None else None  # one copy per epoch
    for i in steps:
        if max_steps is not None and step >= max_steps:
            break
        batch = order[i * sched.batch:(i + 1) * sched.batch]
        rows = slice(rank * sched.rank_batch, (rank + 1) * sched.rank_batch)
        # The (B, 3) dropout mask is drawn on the CPU either way (tiny; the same draws), then moved.
        used = torch.from_numpy(
            modality_dropout(train_set.arrays["mask"][batch].astype(np.float32), rng, p_drop)[rows])
        if resident is not None and order_dev is not None:
            b = resident.batch(order_dev[i * sched.batch:(i + 1) * sched.batch][rows])
        else:
            b = train_set.batch(batch[rows])
        if augmentation:  # on the device the batch is on
            augment(b, rng, rows, len(batch))
        b = {k: v.to(trainer.device, non_blocking=True) for k, v in b.items()}  # no-op when resident
        parts = trainer.step(b, used.to(trainer.device), sched.lr(step))
        step += 1
        done += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        if bar is not None:
            bar.set_postfix(loss=f"{parts['loss']:.3f}")
    return {k: v / max(done, 1) for k, v in sums.items()}, step


def _validate(model: FusionModel, train_set: FusionDataset, val_set: FusionDataset, batch_size: int,
              bn_batches: int, seed: int, device: torch.device,
              resident: ResidentSamples | None = None) -> dict[str, float]:
    """Quick validation metrics with BatchNorm statistics recomputed for the current weights."""
    recalibrate_batchnorm(model, train_set, batch_size, bn_batches, seed, device, resident)
    model.eval()
    return quick_metrics(model, val_set, device=device)


def _write_epoch(out: Path, record: dict[str, Any], epochs: int, trainer: Trainer, seed: int) -> None:
    """Append the epoch's record to the training log and checkpoint the run (rank 0 only)."""
    with (out / LOG_FILE).open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    log.info("epoch %d/%d loss %.4f %s", record["epoch"] + 1, epochs, record["train"].get("loss", float("nan")),
             json.dumps(record.get("val", {})))
    save_checkpoint(out, trainer.model, trainer.opt, {"epoch": record["epoch"], "step": record["step"], "seed": seed})


def train(
    cfg: ModelConfig,
    train_set: FusionDataset,
    out: Path,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 0.02,
    seed: int = 0,
    p_drop: float = 0.5,
    weights: LossWeights | None = None,
    resume: bool = False,
    init_from: Path | None = None,
    val_set: FusionDataset | None = None,
    device: str = "auto",
    amp: bool = True,
    progress: bool = True,
    max_steps: int | None = None,
    metadata: dict[str, Any] | None = None,
    bn_batches: int = 50,
    augmentation: bool = True,
    resident: str = "auto",
) -> dict[str, Any]:
    """Train and save the model to ``out`` (``config.json`` + ``model.safetensors``); returns the
    last epoch's log record. Under ``torchrun`` every rank trains on its shard, rank 0 writes.

    ``init_from``: a model directory whose weights the run starts from (its configuration must equal
    ``cfg``); ignored when ``resume`` finds a checkpoint, which already holds the fine-tuned weights.
    ``resident``: ``auto``/``on``/``off``, hold the training set on the device (:func:`resident_samples`);
    the same batches, dropout and augmentation draws either way (bitwise the same run on the CPU)."""
    rank, world, dev = _dist_setup(device)
    model = _initial_model(cfg, seed, init_from, dev)
    # Fused on CUDA: one kernel for all parameters instead of a few per tensor (a step of this small model is
    # bound by kernel launches), and GradScaler then skips its host-side inf check. The CPU keeps foreach.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=dev.type == "cuda")
    out = Path(out)
    start_epoch, step = _resume_point(out, model, opt) if resume else (0, 0)
    net: nn.Module = model
    if world > 1:
        # Unused parameters are normal here: a rank's share may hold too few samples with two modalities for
        # the alignment loss, or modality dropout may blank an encoder for all of them.
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                  find_unused_parameters=True)
    use_amp = amp and dev.type == "cuda"
    trainer = Trainer(model, net, opt, FusionLoss(cfg, weights), torch.amp.GradScaler("cuda", enabled=use_amp),
                      use_amp, dev)
    n = len(train_set)
    if n == 0:
        raise ValueError("training set is empty")
    sched = Schedule.plan(n, world, batch_size, epochs, lr)
    res = resident_samples(train_set, dev, resident)
    record: dict[str, Any] = {}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    for epoch in range(start_epoch, epochs):
        rng, order = _epoch_order(seed, epoch, n, sched)
        net.train()
        t0 = time.perf_counter()
        means, step = _train_epoch(
            trainer, sched, train_set, order, rng, step, p_drop=p_drop,
            augmentation=augmentation, max_steps=max_steps,
            bar_desc=f"epoch {epoch + 1}/{epochs}" if progress and rank == 0 else None, rank=rank,
            resident=res,
        )
        record = {"epoch": epoch, "step": step, "lr": sched.lr(step), "seconds": round(time.perf_counter() - t0, 2),
                  "train": _all_reduce_mean(means, world, dev)}
        if val_set is not None and len(val_set) and rank == 0:
            record["val"] = _validate(model, train_set, val_set, batch_size, bn_batches, seed, dev, res)
        if rank == 0:
            _write_epoch(out, record, epochs, trainer, seed)
        if max_steps is not None and step >= max_steps:
            break
    if rank == 0:
        recalibrate_batchnorm(model, train_set, batch_size, bn_batches, seed, dev, res)
        meta = {**(metadata or {}), "epochs": epochs, "steps": step, "seed": seed, "samples": n,
                "world_size": world, "last": record}
        save_model(model.cpu().eval(), out, metadata=meta)
    del res  # the device copy of the training set goes with the run
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return record


# ---------------------------------------------------------------- CLI
def _parse_overrides(items: list[str], cls: type = ModelConfig, flag: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` (VALUE parsed as JSON when possible) for the fields of dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise SystemExit(f"{flag} {item!r}: expected FIELD=VALUE with FIELD one of {cls.__name__}'s fields "
                             f"({', '.join(sorted(names))})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", type=Path, metavar="YAML",
                   help="run a whole recipe (config/train/*.yaml): synthesise, extract, train, evaluate, write the "
                        "model and its card under --out (default runs/<name>); rerun to continue after an "
                        "interruption. With it only --out, --device, --threads, --workers, --stop-after and "
                        "--no-progress apply")
    p.add_argument("--workers", type=int, default=2, help="--recipe: processes for synthesis and extraction")
    p.add_argument("--stop-after", metavar="STAGE", help="--recipe: stop after this stage (or epoch-K)")
    p.add_argument("--data", nargs="+",
                   help="rosbag2 folders, or directories holding them; also cached sample files (.npz) or a "
                        "cache directory without bags (samples made with this config's preprocessing)")
    p.add_argument("--val-data", nargs="*", default=[], help="bags evaluated after every epoch")
    p.add_argument("--out", type=Path, help="model directory to write (required without --recipe)")
    p.add_argument("--config", type=Path, help="config.json to start from (default: ModelConfig defaults)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="ModelConfig overrides")
    p.add_argument("--loss-weights", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="LossWeights overrides, e.g. cautious_degraded=3")
    p.add_argument("--cache", type=Path, default=Path(".cache/lmm_fusion_samples"),
                   help="preprocessed-sample cache directory")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.02)
    p.add_argument("--modality-dropout", type=float, default=0.5, help="probability a sample loses sensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke tests)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    p.add_argument("--init-from", type=Path, metavar="MODEL_DIR",
                   help="fine-tune: start from this trained model's weights and configuration (fresh "
                        "optimiser and schedule)")
    p.add_argument("--no-augment", action="store_true", help="no photometric / GNSS-noise augmentation")
    p.add_argument("--resident", default="auto", choices=("auto", "on", "off"),
                   help="hold the training set on the device and build batches there (auto: on CUDA when it "
                        f"takes at most {100 * RESIDENT_FRACTION:.0f} %% of the free device memory; --recipe: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.recipe is not None:
        try:
            summary = run_recipe(args.recipe, args.out, train, workers=args.workers, device=args.device,
                                 threads=args.threads, progress=not args.no_progress, stop_after=args.stop_after,
                                 command="lmm-fusion train " + " ".join(sys.argv[2:]))
        except RecipeStopped as stopped:
            log.info("%s; rerun the same command to continue", stopped)
            return 0
        print(json.dumps(summary, sort_keys=True))
        return 0
    if not args.data or args.out is None:
        raise SystemExit("lmm-fusion train: --data and --out are required (or give --recipe)")
    torch.set_num_threads(max(1, args.threads))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 speaks for the run
        logging.getLogger().setLevel(logging.WARNING)
    if args.config:
        cfg = ModelConfig.load(args.config)
    else:
        cfg = load_config(args.init_from) if args.init_from else ModelConfig()
    if args.set:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **_parse_overrides(args.set)})
    cfg.validate()
    weight_overrides = _parse_overrides(args.loss_weights, LossWeights, "--loss-weights")
    for key, value in weight_overrides.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise SystemExit(f"--loss-weights {key}={value!r}: expected a number >= 0")
    weights = LossWeights(**weight_overrides)
    bags = expand_bags(args.data)
    t0 = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun rank 0 fills the sample cache alone, the others then read it
        rank, _, _ = _dist_setup(args.device)
        if rank != 0:
            dist.barrier()
    train_set = FusionDataset(bags, cfg, cache_dir=args.cache)
    val_set = FusionDataset(expand_bags(args.val_data), cfg, cache_dir=args.cache) if args.val_data else None
    if world > 1 and rank == 0:
        dist.barrier()
    log.info("%d training samples from %d bags (%.1f s to load)", len(train_set), len(bags),
             time.perf_counter() - t0)
    meta = {"train_bags": [b.name for b in bags], "train_bag_fingerprints": [bag_fingerprint(b) for b in bags],
            "command": "lmm-fusion train " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "",
            "loss_weights": asdict(weights)}
    if args.init_from:
        # provenance: a fine-tuned model is reproducible only with the command of the one it started from
        meta["init_from"] = {"model": str(args.init_from),
                             "command": model_metadata(args.init_from).get("command", "")}
    t1 = time.perf_counter()
    rec = train(cfg, train_set, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                weight_decay=args.weight_decay, seed=args.seed, p_drop=args.modality_dropout, weights=weights,
                resume=args.resume,
                init_from=args.init_from, val_set=val_set, device=args.device, amp=not args.no_amp,
                progress=not args.no_progress, max_steps=args.max_steps, metadata=meta,
                augmentation=not args.no_augment, resident=args.resident)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"out": str(args.out), "samples": len(train_set),
                          "train_seconds": round(time.perf_counter() - t1, 1), **rec}, sort_keys=True))
    return 0


def main() -> int:
    """Entry point for ``python -m lmm_fusion.training.train`` (torchrun)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="lmm-fusion train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
