"""``lmm-fusion train --recipe RECIPE.yaml``: one command from nothing to a trained, evaluated model.

A recipe (``config/train/*.yaml``) names everything a model is made from: the synthetic drives of
the training and validation sets (count, seconds, seed, start-max, camera size, lamp cues), the
``ModelConfig`` overrides, the optimiser and epochs, and the validation metric that picks the epoch.
:func:`run_recipe` runs its stages in order under one run directory::

    data_train  data_validation  train  select  data_test  evaluate  card

* ``data_*``: the split's drives, planned by :func:`lmm_fusion.synth.dataset.plan` (family ``i % 7``, seed
  ``drive_seed(seed, i)``, first-label time) and written by :func:`lmm_fusion.synth.drive.synthesize`
  (``data/<split>/<set>/``, with the set's ``manifest.json`` as ``lmm-fusion dataset`` writes it), each drive
  then through the node's own ingest/preprocess path (:func:`lmm_fusion.training.dataset.sample_source`)
  into the sample cache (``cache/``); one worker process does both for a drive, ``workers`` of them in
  parallel. With ``keep_bags: false`` a drive's recorded data is deleted once its samples are cached (its
  ``metadata.yaml`` stays as the mark of a finished drive): a large recipe needs the disk of its samples,
  not of its bags (a 2 s drive is ~60 MB as a bag, ~7 MB as samples).
* ``train``: the recipe's epochs, one call of the training function per epoch (each resumes the
  previous epoch's checkpoint), each epoch's weights kept under ``epochs/<k>/`` with its validation
  metrics; ``select`` keeps the epoch with the best validation ``select`` metric. Every choice is
  made on the validation set.
* ``data_test``: the test drives, from seeds drawn at random when the stage first starts (recorded in
  the manifest before any drive is written, so a rerun makes the same drives), synthesised once,
  after the model is chosen; ``evaluate`` scores the chosen model on them (and on validation).
* ``card``: ``model/`` holds ``config.json``, ``model.safetensors``, ``train_log.jsonl``, ``eval/`` and a
  ``MODEL_CARD.md`` with the recipe, the seeds, the wall time of every stage and the machine it ran on.

Interrupted (killed, or stopped with ``stop_after``), a rerun with the same recipe and run directory
continues: ``manifest.json`` records every finished stage (not redone), complete drives and cached
samples are kept, and training resumes from its last epoch checkpoint. Because every epoch starts
from a checkpoint and a freshly seeded process state, an interrupted run ends with the same weights as
an uninterrupted one on the CPU (on CUDA up to the GPU's non-deterministic kernels).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import cv2
import torch
import yaml
from safetensors.torch import load_file
from tqdm import tqdm

from lmm_fusion.base.rig import SensorRig
from lmm_fusion.model import FusionModel, ModelConfig, save_model
from lmm_fusion.model.checkpoint import load_model
from lmm_fusion.model.losses import LossWeights
from lmm_fusion.synth.dataset import DriveSpec, make_drive, plan, write_manifest
from lmm_fusion.synth.drive import rig_from_args
from lmm_fusion.training.dataset import FusionDataset, sample_source
from lmm_fusion.training.evaluate import evaluate, format_markdown

log = logging.getLogger(__name__)

#: The stages of a recipe run, in order.
STAGES: tuple[str, ...] = ("data_train", "data_validation", "train", "select", "data_test", "evaluate", "card")
MANIFEST = "manifest.json"
#: The training function (:func:`lmm_fusion.training.train.train`); passed in, not imported, because
#: ``train``'s command line hands ``--recipe`` to this module.
TrainFn = Callable[..., dict[str, Any]]


class RecipeError(ValueError):
    """A recipe file or run directory that cannot be used; the message names the file and field."""


class RecipeStopped(Exception):
    """Raised by :func:`run_recipe` after the stage named by ``stop_after`` (an interruption on purpose)."""


# ---------------------------------------------------------------- the recipe
@dataclass(frozen=True)
class DriveSet:
    """``drives`` synthetic drives of ``seconds`` each (labels from a world time drawn in
    ``[0, start_max]`` s); ``seed`` None only in the test split, where it is drawn at random."""

    name: str
    drives: int
    seconds: float
    seed: int | None = None
    start_max: float = 0.0


@dataclass(frozen=True)
class DataSpec:
    """The sensors of every drive and the three splits."""

    train: tuple[DriveSet, ...]
    validation: tuple[DriveSet, ...]
    test: tuple[DriveSet, ...]
    camera: tuple[int, int] = (640, 360)  # [px] width, height
    compressed: bool = True  # JPEG CompressedImage
    lamp_cues: bool = True
    lidar_beams: int | None = None  # None: the rig's default
    lidar_columns: int | None = None
    keep_bags: bool = True  # false: delete a drive's recorded data once its samples are cached

    def rig(self) -> SensorRig:
        return rig_from_args(self.camera, self.lidar_beams, self.lidar_columns)


@dataclass(frozen=True)
class TrainSpec:
    """Arguments of the training function (see :func:`lmm_fusion.training.train.train`)."""

    epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.02
    modality_dropout: float = 0.5
    seed: int = 0
    augmentation: bool = True
    bn_batches: int = 50
    loss_weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A whole training run: data, model overrides, optimisation and the validation metric that picks
    the epoch (a key of :func:`lmm_fusion.training.evaluate.quick_metrics`, higher is better)."""

    name: str
    data: DataSpec
    model: dict[str, Any]
    train: TrainSpec
    select: str = "all/action_acc"
    source: str = ""  # the YAML text it was read from (kept for the card)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({**ModelConfig().to_dict(), **self.model})

    def loss_weights(self) -> LossWeights:
        return LossWeights(**self.train.loss_weights)

    def fingerprint(self) -> str:
        """Hash of everything that changes the run (not the YAML's comments or layout)."""
        d = asdict(self)
        d.pop("source")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


_SELECT_KEYS = {f"{m}/{k}" for m in ("all", "lidar+gnss", "camera+gnss", "camera+lidar")
                for k in ("action_acc", "risk_acc")}


def _build(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` with every key checked: unknown keys and wrong types name ``where.key``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known) - {"source"})
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return data


def _number(value: Any, where: str, *, integer: bool = False, minimum: float | None = None) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        raise RecipeError(f"{where}={value!r}: expected {'an integer' if integer else 'a number'}")
    if minimum is not None and value < minimum:
        raise RecipeError(f"{where}={value!r}: must be >= {minimum}")
    return value


def _drive_sets(items: Any, where: str, *, seeded: bool) -> tuple[DriveSet, ...]:
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{where}: expected a non-empty list of drive sets")
    out = []
    for i, raw in enumerate(items):
        w = f"{where}[{i}]"
        d = _build(DriveSet, raw, w)
        for key in ("name", "drives", "seconds"):
            if key not in d:
                raise RecipeError(f"{w}: missing {key!r}")
        name = d["name"]
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise RecipeError(f"{w}.name={name!r}: expected letters, digits, '_' or '-'")
        seed = d.get("seed")
        if seeded:
            if seed is None:
                raise RecipeError(f"{w}.seed: required (only test drives draw their seeds at random)")
            _number(seed, f"{w}.seed", integer=True, minimum=0)
        elif seed is not None:
            raise RecipeError(f"{w}.seed={seed!r}: test seeds are drawn at random when the test set is made")
        out.append(DriveSet(name, _number(d["drives"], f"{w}.drives", integer=True, minimum=1),
                            float(_number(d["seconds"], f"{w}.seconds", minimum=0.1)), seed,
                            float(_number(d.get("start_max", 0.0), f"{w}.start_max", minimum=0.0))))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}: drive set names repeat ({names})")
    return tuple(out)


def parse_recipe(data: Any, source: str = "", where: str = "recipe") -> Recipe:
    """A :class:`Recipe` from its YAML mapping; :class:`RecipeError` names the field of any bad value."""
    top = _build(Recipe, data, where)
    for key in ("name", "data", "train"):
        if key not in top:
            raise RecipeError(f"{where}: missing {key!r}")
    d = _build(DataSpec, top["data"], f"{where}.data")
    cam = d.get("camera", [640, 360])
    if not (isinstance(cam, list) and len(cam) == 2 and all(isinstance(v, int) and 16 <= v <= 8192 for v in cam)):
        raise RecipeError(f"{where}.data.camera={cam!r}: expected [width, height] in pixels (16..8192)")
    for key in ("compressed", "lamp_cues", "keep_bags"):
        if not isinstance(d.get(key, True), bool):
            raise RecipeError(f"{where}.data.{key}={d[key]!r}: expected true or false")
    for key in ("lidar_beams", "lidar_columns"):
        if d.get(key) is not None:
            _number(d[key], f"{where}.data.{key}", integer=True, minimum=1)
    seeds = [s.seed for split in ("train", "validation") for s in _drive_sets(d.get(split), f"{where}.data.{split}",
                                                                               seeded=True)]
    if len(set(seeds)) != len(seeds):
        raise RecipeError(f"{where}.data: a dataset seed is used twice ({seeds}): the sets would share drives")
    data_spec = DataSpec(
        train=_drive_sets(d.get("train"), f"{where}.data.train", seeded=True),
        validation=_drive_sets(d.get("validation"), f"{where}.data.validation", seeded=True),
        test=_drive_sets(d.get("test"), f"{where}.data.test", seeded=False),
        camera=(cam[0], cam[1]), compressed=d.get("compressed", True), lamp_cues=d.get("lamp_cues", True),
        lidar_beams=d.get("lidar_beams"), lidar_columns=d.get("lidar_columns"), keep_bags=d.get("keep_bags", True))
    t = _build(TrainSpec, top["train"], f"{where}.train")
    for key in ("epochs", "batch_size", "seed", "bn_batches"):
        if key in t:
            _number(t[key], f"{where}.train.{key}", integer=True, minimum=0 if key == "seed" else 1)
    for key in ("lr", "weight_decay", "modality_dropout"):
        if key in t:
            _number(t[key], f"{where}.train.{key}", minimum=0.0)
    lw = t.get("loss_weights", {}) or {}
    _build(LossWeights, lw, f"{where}.train.loss_weights")
    for k, v in lw.items():
        _number(v, f"{where}.train.loss_weights.{k}", minimum=0.0)
    train_spec = TrainSpec(**{**t, "loss_weights": dict(lw)})
    model = top.get("model", {}) or {}
    if not isinstance(model, dict):
        raise RecipeError(f"{where}.model: expected a mapping of ModelConfig fields")
    select = top.get("select", "all/action_acc")
    if select not in _SELECT_KEYS:
        raise RecipeError(f"{where}.select={select!r}: expected one of {sorted(_SELECT_KEYS)}")
    name = top["name"]
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{where}.name={name!r}: expected a non-empty string")
    recipe = Recipe(name, data_spec, dict(model), train_spec, select, source)
    try:
        recipe.model_config()
    except ValueError as exc:
        raise RecipeError(f"{where}.model: {exc}") from exc
    return recipe


def load_recipe(path: Path | str) -> Recipe:
    """Read and check a recipe YAML file; :class:`RecipeError` names the file and the field."""
    p = Path(path)
    try:
        text = p.read_text()
        return parse_recipe(yaml.safe_load(text), text, str(p))
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{p}: cannot read the recipe: {exc}") from exc


# ---------------------------------------------------------------- machine and manifest
def machine_description() -> str:
    """Where a stage ran: host, CPU model and cores, torch and the GPU (if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {os.cpu_count()} x {cpu}, {gpu}, torch {torch.__version__}"


class Manifest:
    """``manifest.json`` of a run directory: the recipe's fingerprint and one entry per finished stage
    (seconds, machine, outputs). Written atomically after every change."""

    def __init__(self, run_dir: Path, recipe: Recipe) -> None:
        self.path = run_dir / MANIFEST
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
            if self.data.get("recipe_fingerprint") != recipe.fingerprint():
                raise RecipeError(f"{run_dir}: made by another recipe (fingerprint "
                                  f"{self.data.get('recipe_fingerprint')!r}, this one {recipe.fingerprint()!r}); "
                                  "use another run directory")
        else:
            self.data = {"recipe": recipe.name, "recipe_fingerprint": recipe.fingerprint(), "stages": {}, "state": {}}
            self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def finish(self, stage: str, seconds: float, **info: Any) -> None:
        """Mark ``stage`` done: its wall time [s], the machine, and ``info`` (e.g. workers, device)."""
        self.data["stages"][stage] = {"seconds": round(seconds, 2), "machine": machine_description(), **info}
        self.save()

    def stage(self, stage: str) -> dict[str, Any]:
        return dict(self.data["stages"][stage])

    def state(self, key: str) -> Any:
        """Progress kept inside a stage (e.g. the test seeds, drawn before the stage writes anything)."""
        return self.data["state"].get(key)

    def set_state(self, key: str, value: Any) -> None:
        self.data["state"][key] = value
        self.save()


# ---------------------------------------------------------------- stages
#: One drive's job: its plan, the rig, JPEG or raw, lamp cues, the model config, the cache, keep the bag.
DriveJob = tuple[DriveSpec, SensorRig, bool, bool, ModelConfig, str, bool]


def _bag_complete(bag: Path) -> bool:
    """A bag whose writer closed (``metadata.yaml`` is written last) and whose data is still there."""
    return (bag / "metadata.yaml").is_file() and any(bag.glob("*.mcap"))


def drive_samples(job: DriveJob) -> tuple[str, str]:
    """Worker: synthesise one drive unless complete (a drive cut off mid-write is made again from
    scratch: the same seed gives the same drive), cache its samples, delete its data unless kept.
    Returns (bag path, sample file). Single-threaded: the pool is the parallelism."""
    spec, rig, compressed, lamp_cues, cfg, cache, keep_bag = job
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    bag = Path(spec.path)
    if not _bag_complete(bag):
        if bag.exists():
            shutil.rmtree(bag)
        make_drive(spec, rig, compressed, lamp_cues=lamp_cues)
    src = sample_source(bag, cfg, cache, rig)
    if not keep_bag:
        for f in bag.glob("*.mcap"):
            f.unlink()
    return str(bag), str(src)


def run_jobs(jobs: Sequence[DriveJob], workers: int, progress: bool, desc: str) -> Iterator[tuple[str, str]]:
    """:func:`drive_samples` of every job, in ``workers`` processes (results in completion order)."""
    bar = tqdm(total=len(jobs), unit="drive", desc=desc, file=sys.stderr, disable=not progress)
    try:
        if workers > 1 and len(jobs) > 1:
            with get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for result in pool.imap_unordered(drive_samples, jobs):
                    bar.update(1)
                    yield result
        else:
            for job in jobs:
                result = drive_samples(job)
                bar.update(1)
                yield result
    finally:
        bar.close()


@contextmanager
def _timed() -> Iterator[list[float]]:
    box = [0.0]
    t0 = time.perf_counter()
    yield box
    box[0] = time.perf_counter() - t0


@dataclass
class RecipeRun:
    """One run of a recipe in ``run_dir`` (see the module doc)."""

    recipe: Recipe
    run_dir: Path
    train_fn: TrainFn
    workers: int = 1
    device: str = "auto"
    threads: int = 2
    progress: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.run_dir, self.recipe)
        self.cfg = self.recipe.model_config()
        self.rig = self.recipe.data.rig()
        self.cache = self.run_dir / "cache"
        self._sets: dict[str, FusionDataset] = {}

    # ------------------------------------------------------------ data
    def split_dir(self, split: str, ds: DriveSet) -> Path:
        return self.run_dir / "data" / split / ds.name

    def _test_sets(self) -> tuple[DriveSet, ...]:
        """The test drive sets with their seeds: drawn at random once, recorded before any is made."""
        seeds = self.manifest.state("test_seeds")
        if seeds is None:
            seeds = {s.name: secrets.randbelow(2**31) for s in self.recipe.data.test}
            self.manifest.set_state("test_seeds", seeds)
        return tuple(DriveSet(s.name, s.drives, s.seconds, int(seeds[s.name]), s.start_max)
                     for s in self.recipe.data.test)

    def drive_sets(self, split: str) -> tuple[DriveSet, ...]:
        return self._test_sets() if split == "test" else getattr(self.recipe.data, split)

    def make_split(self, split: str) -> dict[str, Any]:
        """Every drive of ``split`` synthesised and its samples cached; the sample file of each drive is
        recorded in the manifest as it is done, so an interrupted split continues where it stopped."""
        d = self.recipe.data
        # A sample file recorded but gone (a run directory moved to another machine without its cache)
        # is made again from its seed, here.
        recorded: dict[str, str] = dict(self.manifest.state(f"samples/{split}") or {})
        done = {k: v for k, v in recorded.items() if (self.run_dir / v).is_file()}
        if len(done) < len(recorded):
            log.info("%s: %d of %d sample files missing, making them again", split, len(recorded) - len(done),
                     len(recorded))
            self.manifest.set_state(f"remade/{split}", {"drives": len(recorded) - len(done),
                                                        "machine": machine_description()})
        jobs: list[DriveJob] = []
        for ds in self.drive_sets(split):
            assert ds.seed is not None
            out = self.split_dir(split, ds)
            out.mkdir(parents=True, exist_ok=True)
            specs = plan(out, ds.drives, ds.seconds, ds.seed, ds.start_max)
            # The set's manifest as `lmm-fusion dataset` writes it (the drives it will hold).
            write_manifest(out, specs, ds.seed, ds.seconds, ds.start_max, d.lamp_cues, d.compressed, "mcap", self.rig)
            jobs += [(sp, self.rig, d.compressed, d.lamp_cues, self.cfg, str(self.cache), d.keep_bags)
                     for sp in specs if self._rel(Path(sp.path)) not in done]
        for bag, src in run_jobs(jobs, self.workers, self.progress, f"drives {split}"):
            done[self._rel(Path(bag))] = self._rel(Path(src))
            self.manifest.set_state(f"samples/{split}", done)
        sets = [{**asdict(ds), "path": self._rel(self.split_dir(split, ds))} for ds in self.drive_sets(split)]
        return {"sets": sets, "drive_seconds": sum(s.drives * s.seconds for s in self.drive_sets(split)),
                "samples": len(self.dataset(split))}

    def _rel(self, p: Path) -> str:
        return str(Path(os.path.relpath(p, self.run_dir)))

    def sample_files(self, split: str) -> list[Path]:
        """The cached sample file of every drive of ``split``, in drive order."""
        done = self.manifest.state(f"samples/{split}") or {}
        files = []
        for ds in self.drive_sets(split):
            for sp in plan(self.split_dir(split, ds), ds.drives, ds.seconds, ds.seed or 0, ds.start_max):
                key = self._rel(Path(sp.path))
                if key not in done:
                    raise RecipeError(f"{self.run_dir}: drive {key} of {split} has no cached samples")
                files.append(self.run_dir / done[key])
        return files

    def dataset(self, split: str) -> FusionDataset:
        """The samples of ``split``, from the sample files (checked against this config's preprocessing)."""
        if split not in self._sets:
            files = self.sample_files(split)
            if not all(f.is_file() for f in files):
                self.make_split(split)  # loads the split once its files are there
            if split not in self._sets:
                self._sets[split] = FusionDataset(files, self.cfg, rig=self.rig)
        return self._sets[split]

    # ------------------------------------------------------------ training
    @property
    def train_dir(self) -> Path:
        return self.run_dir / "train"

    def epoch_dir(self, k: int) -> Path:
        return self.run_dir / "epochs" / f"{k:03d}"

    def _checkpoint_epoch(self) -> int:
        """Last epoch of the training checkpoint (-1 without one)."""
        p = self.train_dir / "checkpoint" / "progress.json"
        return int(json.loads(p.read_text())["epoch"]) if p.is_file() else -1

    def _log_record(self, k: int) -> dict[str, Any]:
        """The training log's record of epoch ``k`` (the last one, should a kill have doubled it)."""
        rec: dict[str, Any] = {}
        for line in (self.train_dir / "train_log.jsonl").read_text().splitlines():
            r = json.loads(line)
            if int(r["epoch"]) == k:
                rec = r
        if not rec:
            raise RecipeError(f"{self.train_dir}: no training-log record of epoch {k}")
        return rec

    def train_epoch(self, k: int, train_set: FusionDataset, val_set: FusionDataset) -> dict[str, Any]:
        """Epoch ``k`` (0-based): train it unless the checkpoint already holds it, then keep its weights
        (the checkpoint's, BatchNorm statistics recomputed at validation) under ``epochs/<k>/``."""
        t = self.recipe.train
        steps_per_epoch = max(1, len(train_set) // t.batch_size)
        done = self._checkpoint_epoch()
        if done > k:
            raise RecipeError(f"{self.train_dir}: checkpoint at epoch {done}, but epoch {k} was never kept")
        t0 = time.perf_counter()
        if done < k:
            meta = {"recipe": self.recipe.name, "recipe_fingerprint": self.recipe.fingerprint(),
                    "command": self.command, "loss_weights": asdict(self.recipe.loss_weights())}
            self.train_fn(self.cfg, train_set, self.train_dir, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                          weight_decay=t.weight_decay, seed=t.seed, p_drop=t.modality_dropout,
                          weights=self.recipe.loss_weights(), resume=True, val_set=val_set, device=self.device,
                          progress=self.progress, max_steps=(k + 1) * steps_per_epoch, metadata=meta,
                          bn_batches=t.bn_batches, augmentation=t.augmentation)
        rec = {**self._log_record(k), "wall_seconds": round(time.perf_counter() - t0, 2)}
        if int(rec["step"]) != (k + 1) * steps_per_epoch:
            raise RecipeError(f"epoch {k} ended at step {rec['step']}, expected {(k + 1) * steps_per_epoch}")
        model = FusionModel(self.cfg)
        model.load_state_dict(load_file(str(self.train_dir / "checkpoint" / "model.safetensors")), strict=True)
        save_model(model.eval(), self.epoch_dir(k), metadata={
            "recipe": self.recipe.name, "recipe_fingerprint": self.recipe.fingerprint(), "command": self.command,
            "epoch": k, "epochs": t.epochs, "steps": rec["step"], "seed": t.seed, "samples": len(train_set),
            "train_sample_files": [p.name for p in self.sample_files("train")], "val": rec.get("val", {})})
        (self.epoch_dir(k) / "record.json").write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        return rec

    # ------------------------------------------------------------ the run
    def run(self, stop_after: str | None = None) -> dict[str, Any]:
        """Every stage not yet finished, in order; raises :class:`RecipeStopped` after ``stop_after``
        (a stage name, or ``epoch-K`` after training epoch K, 0-based)."""
        valid = set(STAGES) | {f"epoch-{k}" for k in range(self.recipe.train.epochs)}
        if stop_after is not None and stop_after not in valid:
            raise RecipeError(f"stop_after={stop_after!r}: expected a stage ({', '.join(STAGES)}) or epoch-K")
        m = self.manifest
        t_run = time.perf_counter()

        def stop(name: str) -> None:
            if name == stop_after:
                raise RecipeStopped(f"stopped after {name} as asked ({self.run_dir})")

        for split in ("train", "validation"):
            stage = f"data_{split}"
            if not m.done(stage):
                with _timed() as dt:
                    info = self.make_split(split)
                m.finish(stage, dt[0], **info, **self._how())
            stop(stage)
        epochs = self.recipe.train.epochs
        if not m.done("train"):
            with _timed() as dt:
                train_set, val_set = self.dataset("train"), self.dataset("validation")
                for k in range(epochs):
                    if not (self.epoch_dir(k) / "record.json").is_file():
                        self.train_epoch(k, train_set, val_set)
                    stop(f"epoch-{k}")
            # Each epoch's wall time (training, validation, checkpoint) was kept when it ran, so the
            # stage's time is right over interrupted runs too; dt adds the sample loading of this call.
            walls = [float(json.loads((self.epoch_dir(k) / "record.json").read_text())["wall_seconds"])
                     for k in range(epochs)]
            m.finish("train", sum(walls), epoch_wall_seconds=walls, this_call_seconds=round(dt[0], 2),
                     samples=len(self.dataset("train")), **self._how())
        else:
            for k in range(epochs):
                stop(f"epoch-{k}")
        stop("train")
        if not m.done("select"):
            with _timed() as dt:
                vals = [json.loads((self.epoch_dir(k) / "record.json").read_text()).get("val", {})
                        for k in range(epochs)]
                scores = [float(v.get(self.recipe.select, float("-inf"))) for v in vals]
                best = max(range(epochs), key=lambda k: (scores[k], k))  # ties: the later epoch
                model_dir = self.run_dir / "model"
                model_dir.mkdir(exist_ok=True)
                for name in ("config.json", "model.safetensors"):
                    shutil.copy2(self.epoch_dir(best) / name, model_dir / name)
                shutil.copy2(self.train_dir / "train_log.jsonl", model_dir / "train_log.jsonl")
            m.finish("select", dt[0], epoch=best, metric=self.recipe.select, scores=scores, **self._how())
        stop("select")
        if not m.done("data_test"):
            with _timed() as dt:
                info = self.make_split("test")
            m.finish("data_test", dt[0], **info, **self._how())
        stop("data_test")
        if not m.done("evaluate"):
            with _timed() as dt:
                self.evaluate()
            m.finish("evaluate", dt[0], **self._how())
        stop("evaluate")
        if not m.done("card"):
            with _timed() as dt:
                self.write_card()
            m.finish("card", dt[0])
        log.info("recipe %s done in %s (%.1f s this call)", self.recipe.name, self.run_dir,
                 time.perf_counter() - t_run)
        return self.summary()

    def _how(self) -> dict[str, Any]:
        return {"workers": self.workers, "device": self.device}

    def evaluate(self) -> None:
        """Full reports of the chosen model on the validation and the test set (``model/eval/``)."""
        model_dir = self.run_dir / "model"
        dev = torch.device("cuda" if self.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        model = load_model(model_dir).to(dev)
        out = model_dir / "eval"
        out.mkdir(exist_ok=True)
        for split in ("validation", "test"):
            if (out / f"{split}.json").is_file() and (out / f"{split}.md").is_file():
                continue  # scored before an interruption
            report = evaluate(model, self.dataset(split), device=dev)
            report["sample_files"] = [p.name for p in self.sample_files(split)]
            (out / f"{split}.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
            (out / f"{split}.md").write_text(format_markdown(report))

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        test = json.loads((self.run_dir / "model" / "eval" / "test.json").read_text())
        return {"run_dir": str(self.run_dir), "model": str(self.run_dir / "model"),
                "epoch": m.stage("select")["epoch"], "test_seeds": m.state("test_seeds"),
                "test_action_accuracy": test["action_accuracy"], "test_risk_accuracy": test["risk_accuracy"],
                "stage_seconds": {s: m.stage(s)["seconds"] for s in STAGES if m.done(s)}}

    def write_card(self) -> None:
        """``model/MODEL_CARD.md``: how the model was made (recipe, seeds, wall times, machine) and its metrics."""
        m, r = self.manifest, self.recipe
        model_dir = self.run_dir / "model"
        sel = m.stage("select")
        test = json.loads((model_dir / "eval" / "test.json").read_text())
        val = json.loads((model_dir / "eval" / "validation.json").read_text())
        n_params = sum(p.numel() for p in load_model(model_dir).parameters())
        lines = [f"# {r.name} — trained by `lmm-fusion train --recipe`", "",
                 f"{n_params / 1e6:.2f} M parameters. Made by one command from nothing but this repository:", "",
                 "```bash", self.command or f"lmm-fusion train --recipe <recipe> --out {self.run_dir}", "```", "",
                 f"Recipe fingerprint `{r.fingerprint()}`; the recipe:", "", "```yaml", r.source.strip(), "```", "",
                 "## Data", "",
                 "Synthetic drives (`lmm_fusion.synth.drive.synthesize`, planned as `lmm-fusion dataset` plans "
                 f"them), camera {r.data.camera[0]}x"
                 f"{r.data.camera[1]} {'JPEG' if r.data.compressed else 'raw'}, lamp cues "
                 f"{'on' if r.data.lamp_cues else 'off'}, LiDAR {self.rig.lidar.beams} x {self.rig.lidar.columns}. "
                 "Drive i of a set has family i % 7 and seed `drive_seed(seed, i)`.", "",
                 "| split | set | drives | seconds | start-max | seed |", "|---|---|---|---|---|---|"]
        for split in ("train", "validation", "test"):
            for ds in self.drive_sets(split):
                seed = f"{ds.seed} (drawn at random)" if split == "test" else str(ds.seed)
                lines.append(f"| {split} | {ds.name} | {ds.drives} | {ds.seconds:g} | {ds.start_max:g} | {seed} |")
        n = {split: m.stage(f"data_{split}")["samples"] for split in ("train", "validation")}
        lines += ["", f"Samples: {n['train']} train, {n['validation']} validation, {test['n']} test. The test "
                  "drives were synthesised once, after the epoch was chosen, from seeds drawn at random then.", "",
                  "## Training", "",
                  f"{r.train.epochs} epochs, batch {r.train.batch_size}, AdamW lr {r.train.lr:g} (warm-up + cosine), "
                  f"weight decay {r.train.weight_decay:g}, modality dropout {r.train.modality_dropout:g}, seed "
                  f"{r.train.seed}, loss weights {r.train.loss_weights or 'default'}. Validation after every "
                  f"epoch; the epoch with the best validation `{r.select}` is kept: epoch {sel['epoch'] + 1}.", "",
                  "| epoch | seconds | train loss | " + " | ".join(f"val {k}" for k in sorted(_SELECT_KEYS)) + " |",
                  "|---" * (3 + len(_SELECT_KEYS)) + "|"]
        for k in range(r.train.epochs):
            rec = json.loads((self.epoch_dir(k) / "record.json").read_text())
            v = rec.get("val", {})
            lines.append(f"| {k + 1} | {rec['seconds']:.0f} | {rec['train'].get('loss', float('nan')):.3f} | "
                         + " | ".join(f"{v.get(key, float('nan')):.3f}" for key in sorted(_SELECT_KEYS)) + " |")
        lines += ["", "## Wall time", "", "| stage | seconds | machine | worker processes | device |",
                  "|---|---|---|---|---|"]
        for s in STAGES[:-1]:
            info = m.stage(s)
            lines.append(f"| {s} | {info['seconds']:.0f} | {info['machine']} | {info.get('workers', '?')} "
                         f"| {info.get('device', '?')} |")
        lines += ["", "A stage resumed after an interruption shows the time of the call that finished it, except "
                  "train, the sum of its epochs (each timed when it ran)."]
        for split in ("train", "validation", "test"):
            remade = m.state(f"remade/{split}")
            if remade:
                lines.append(f"The {split} split's sample files were missing where the run continued, so "
                             f"{remade['drives']} of its drives were made again from their recorded seeds on "
                             f"{remade['machine']}.")
        lines += ["",
                  "## Test (fresh random seeds)", "", format_markdown(test), "## Validation", "",
                  format_markdown(val)]
        (model_dir / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


def run_recipe(path: Path | str, run_dir: Path | str | None, train_fn: TrainFn, *, workers: int = 1,
               device: str = "auto", threads: int = 2, progress: bool = True, stop_after: str | None = None,
               command: str = "") -> dict[str, Any]:
    """Load the recipe at ``path`` and run (or continue) it in ``run_dir`` (default ``runs/<name>``)."""
    recipe = load_recipe(path)
    torch.set_num_threads(max(1, threads))
    run = RecipeRun(recipe, Path(run_dir) if run_dir is not None else Path("runs") / recipe.name, train_fn,
                    workers=max(1, workers), device=device, threads=threads, progress=progress,
                    command=command)
    return run.run(stop_after)
