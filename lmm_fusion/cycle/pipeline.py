"""FusionPipeline: one synchronised snapshot in, one guarded :class:`Assessment` out.

The single pipeline every front end uses (ROS node, offline replay, CARLA bridge, benchmark):
preprocess -> backend inference -> decode -> LiDAR free distance -> safety guard, with the latency of
each stage recorded in ``Assessment.latency_ms``. ROS-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmm_fusion.base import topics
from lmm_fusion.base.paths import cache_dir, default_model_dir
from lmm_fusion.base.rig import SensorRig
from lmm_fusion.base.vocabulary import MODALITIES
from lmm_fusion.cycle.assessment import Assessment, decode, invalid
from lmm_fusion.cycle.extrinsics import Extrinsics, ExtrinsicsError
from lmm_fusion.cycle.ingest import prefer_odometry_speed
from lmm_fusion.cycle.preprocess import Preprocessor
from lmm_fusion.cycle.safety import RangeRate, SafetyConfig, apply_guard, lane_evidence, lane_free_distance
from lmm_fusion.cycle.sync import Snapshot
from lmm_fusion.model import FusionModel, ModelConfig, save_model
from lmm_fusion.model.checkpoint import load_config
from lmm_fusion.runtime.backends import make_backend

log = logging.getLogger(__name__)

#: Seed of the randomly initialised model used when no trained model is shipped yet.
RANDOM_MODEL_SEED = 0


def resolve_model_dir(model_dir: str | Path | None) -> tuple[Path, bool]:
    """``(directory, is_random)``: the given or shipped model directory, or — when it has no trained
    weights — a randomly initialised model saved once under the cache dir (loudly warned about)."""
    if model_dir not in (None, ""):
        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"model_dir: {str(model_dir)!r} holds no config.json (not a model directory)")
        return Path(model_dir), False
    try:
        shipped = default_model_dir()
    except FileNotFoundError:
        shipped = None
    if shipped is not None and (shipped / "config.json").is_file():
        return shipped, False
    return _random_model_dir(cache_dir()), True


def _architecture_tag(model: FusionModel) -> str:
    """Short hash of the model's config and parameter names/shapes: a cached random model is reused only
    by code that builds exactly the same network."""
    spec = [(k, list(v.shape)) for k, v in sorted(model.state_dict().items())]
    blob = json.dumps([model.cfg.to_dict(), spec], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _random_model_dir(cache: Path) -> Path:
    """The folder of the seeded random model under ``cache``, saved there on first use."""
    torch.manual_seed(RANDOM_MODEL_SEED)
    model = FusionModel(ModelConfig())
    directory = cache / f"random_model_seed{RANDOM_MODEL_SEED}_{_architecture_tag(model)}"
    log.warning("!!! NO TRAINED MODEL FOUND: using a RANDOMLY INITIALISED FusionModel (seed %d). "
                "Its suggestions are meaningless; only the safety guard's rules are real. "
                "Train one with `lmm-fusion train` and ship it as models/fusion_small. !!!", RANDOM_MODEL_SEED)
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return directory
    tmp = directory.with_name(directory.name + f".tmp{id(model)}")
    save_model(model, tmp, metadata={"random_init": True, "seed": RANDOM_MODEL_SEED})
    try:
        tmp.rename(directory)
    except OSError:  # another process created it first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


class FusionPipeline:
    """Run the fusion model and the safety guard on synchronised sensor snapshots.

    ``model_dir``: trained model folder (``config.json`` + ``model.safetensors``); None = the shipped
    ``models/fusion_small`` or, when absent, a random model (warned). ``backend``: ``auto`` | ``torch`` |
    ``onnxruntime`` | ``tensorrt`` (see :func:`lmm_fusion.runtime.backends.make_backend`, which also takes
    TensorRT's ``dla_core`` and ``engine_cache_dir``).

    ``extrinsics``: the transforms that take each cloud from its own ``header.frame_id`` to ``base_link``
    (feed it ``/tf_static``, e.g. through ``SensorIngest(..., extrinsics=pipeline.extrinsics)``); None = only
    ``base_link`` and the rig's own frames (``lidar``), as the synthetic drives and the default topics use.
    A cloud in a frame it cannot resolve masks the LiDAR for that cycle: :attr:`lidar_reason` says why
    (``""`` when the last cycle's cloud resolved) and :attr:`frame_errors` counts each reason.
    """

    def __init__(self, model_dir: str | Path | None = None, backend: str = "auto", rig: SensorRig | None = None,
                 safety_cfg: SafetyConfig | None = None, *, device: str | None = None, precision: str = "fp32",
                 threads: int | None = None, dla_core: int | None = None,
                 engine_cache_dir: str | Path | None = None, extrinsics: Extrinsics | None = None) -> None:
        self.rig = rig or SensorRig()
        self.rig.vehicle.validate()  # the guard measures from its bumper
        self.extrinsics = extrinsics or Extrinsics(self.rig, rig_fallback=True)
        self.lidar_reason = ""
        self.frame_errors: Counter[str] = Counter()
        self.safety_cfg = safety_cfg or SafetyConfig()
        self.range_rate = RangeRate()  # closing speed on the LiDAR's ego-lane obstacle, across cycles
        self.safety_cfg.validate()
        self.model_dir, self.random_model = resolve_model_dir(model_dir)
        self.model_cfg = load_config(self.model_dir)
        self.backend = make_backend(backend, self.model_dir, device=device, precision=precision, threads=threads,
                                    dla_core=dla_core, engine_cache_dir=engine_cache_dir)
        self.preprocessor = Preprocessor(self.model_cfg, self.rig, self.extrinsics)
        log.info("fusion pipeline: model %s%s, backend %s", self.model_dir,
                 " (RANDOM)" if self.random_model else "", self.backend.describe())

    @property
    def backend_fallback_reason(self) -> str | None:
        """Why ``backend="auto"`` did not run the backends it prefers (None: its first choice runs)."""
        return self.backend.fallback_reason

    def describe(self) -> str:
        return f"{self.backend.describe()}, model {self.model_dir}" + (" (random init)" if self.random_model else "")

    def warmup(self, iterations: int = 3) -> float:
        """Run the backend on all-masked zero inputs; returns the last pass time [s]."""
        nan_ages = dict.fromkeys(MODALITIES, math.inf)
        snap = Snapshot(now=0.0, frames=dict.fromkeys(MODALITIES), ages=nan_ages,
                        mask=np.zeros(len(MODALITIES), bool), stamps=dict.fromkeys(MODALITIES))
        return self.backend.warmup(self.preprocessor.inputs(snap), iterations)

    def lidar_in_base(self, points_lidar: Any, frame_id: str | None = None) -> np.ndarray | None:
        """``(N, 3)`` base_link xyz of an (N, >=3) cloud in ``frame_id`` (None = the rig's ``lidar`` frame);
        None when absent or empty. Raises :class:`~lmm_fusion.cycle.extrinsics.ExtrinsicsError` for a frame
        with no known transform."""
        if points_lidar is None:
            return None
        pts = np.asarray(points_lidar, np.float32)
        if pts.ndim != 2 or pts.shape[0] == 0 or pts.shape[1] < 3:
            return None
        return self.extrinsics.to_base(pts, frame_id or topics.LIDAR_FRAME)

    def lidar_free_distance(self, points_lidar: np.ndarray, frame_id: str | None = None) -> float:
        """Free ego-lane distance [m from the bumper] of an (N, >=3) cloud in ``frame_id`` (None = ``lidar``)."""
        base = self.lidar_in_base(points_lidar, frame_id)
        return math.inf if base is None else lane_free_distance(base, self.safety_cfg, self.rig.vehicle)

    def cycle(self, snapshot: Any) -> Assessment:
        """One fusion cycle on a :class:`lmm_fusion.cycle.sync.Snapshot`; never raises for missing sensors.

        No usable modality gives ``valid=False`` ("no assessment") without running the model. Every
        modality not used has its reason in ``Assessment.modalities[i].reason``. A fresh odometry speed
        (``snapshot.frames["odometry"]``, :class:`~lmm_fusion.io.odometry.OdometrySpeed`) is the ego speed of
        the guard and of the model's GNSS features instead of the GNSS estimate's (``ego_speed_source``).
        """
        t0 = time.perf_counter()
        mask = np.asarray(snapshot.mask, dtype=bool)
        ages = dict(snapshot.ages)
        reasons = {m: r for m, r in (getattr(snapshot, "reasons", None) or {}).items() if r}
        if not mask.any():
            return invalid(snapshot.now, mask, ages, reasons).with_latency(total=(time.perf_counter() - t0) * 1e3)
        lidar_i, gnss_i = MODALITIES.index("lidar"), MODALITIES.index("gnss")
        # One transform to base_link per cycle, by the cloud's own frame id, shared by the BEV gridding and
        # the guard's free distance. A frame without a transform masks the LiDAR (never a guessed mount).
        base = None
        self.lidar_reason = ""
        if mask[lidar_i]:
            frame_id = (getattr(snapshot, "frame_ids", None) or {}).get("lidar")
            try:
                base = self.lidar_in_base(snapshot.frames.get("lidar"), frame_id)
            except ExtrinsicsError as exc:
                self.lidar_reason = f"lidar: {exc}"
                self.frame_errors[self.lidar_reason] += 1
                reasons["lidar"] = str(exc)
                log.debug("lidar masked: %s", exc)
                mask = mask.copy()
                mask[lidar_i] = False
                snapshot = replace(snapshot, mask=mask, frames={**snapshot.frames, "lidar": None})
                if not mask.any():
                    return invalid(snapshot.now, mask, ages, reasons).with_latency(
                        total=(time.perf_counter() - t0) * 1e3)
        # The vehicle's own speed (wheel odometry, a localisation twist) beats the GNSS estimate's while fresh.
        odometry = snapshot.frames.get("odometry")
        snapshot = prefer_odometry_speed(snapshot)
        inputs = self.preprocessor.inputs(snapshot, lidar_base=base)
        # Report and decide with the mask the model ran with, not the sync's: the preprocessor also
        # drops a GNSS state without a motion estimate yet (a drive's first fixes) and a frame that
        # does not decode, and the risk rule, confidence and degraded flag must say so, as in eval.
        used = inputs["modality_mask"].reshape(-1) > 0.5
        for i, name in enumerate(MODALITIES):
            if mask[i] and not used[i]:
                if name == "gnss":
                    why = getattr(snapshot.frames.get("gnss"), "reason", "") or "no valid state"
                    reasons[name] = f"no motion estimate yet: {why}"
                else:
                    reasons[name] = "the frame could not be preprocessed"
        if not used.any():
            return invalid(snapshot.now, used, ages, reasons).with_latency(total=(time.perf_counter() - t0) * 1e3)
        t1 = time.perf_counter()
        outputs = self.backend.infer(inputs)
        t2 = time.perf_counter()
        a = decode(outputs, snapshot.now, used, ages, self.model_cfg.ttc_max, self.model_cfg.distance_max, reasons)
        t3 = time.perf_counter()
        free, lanes, closing = None, None, None
        if used[lidar_i]:  # the guard's LiDAR evidence: ego-lane free distance, its closing speed, the lanes beside
            lanes = None if base is None else lane_evidence(base, self.safety_cfg, self.rig.vehicle)
            free = math.inf if lanes is None else lanes.free_distance
            closing = self.range_rate.update((getattr(snapshot, "stamps", None) or {}).get("lidar"), free,
                                             self.safety_cfg)
        else:
            self.range_rate.reset()
        # GNSS counts as used only with a valid motion estimate (the preprocessor's rule), so its speed is one.
        ego = snapshot.frames.get("gnss") if used[gnss_i] else None
        speed, source = None, ""
        if odometry is not None:
            speed, source = float(odometry.speed), "odometry"
        elif ego is not None:
            speed, source = float(ego.speed), "gnss"
        a = replace(apply_guard(a, free, speed, self.safety_cfg, lanes, self.rig.vehicle, closing),
                    ego_speed_source=source)
        t4 = time.perf_counter()
        return a.with_latency(preprocess=(t1 - t0) * 1e3, inference=(t2 - t1) * 1e3, decode=(t3 - t2) * 1e3,
                              safety=(t4 - t3) * 1e3, total=(t4 - t0) * 1e3)
