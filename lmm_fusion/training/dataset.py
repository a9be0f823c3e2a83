"""Training/evaluation samples from rosbag2 drives, through the node's own decode and preprocess path.

One sample per ground-truth stamp (the stamp of the LiDAR frame it labels). Sensor messages go in
recorded order through :class:`~lmm_fusion.cycle.ingest.SensorIngest` into a :class:`~lmm_fusion.cycle.sync.SensorSync`
(GNSS through its ``EgoMotionEstimator``), and the sample's inputs are the sync snapshot at the
ground-truth stamp fed through :class:`~lmm_fusion.cycle.preprocess.Preprocessor` — exactly what the node
would have seen at that instant, masks and staleness included.

Preprocessed samples are cached per bag as ``.npz`` under a cache directory, keyed by a fingerprint
of the bag files and of every setting that changes the arrays, so later epochs and runs never decode a
bag again. Images are cached resized as uint8 and BEV grids as float16 to keep memory small.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lmm_fusion.base import topics as T
from lmm_fusion.base.grid import OCCUPANCY_GRID
from lmm_fusion.base.rig import SensorRig
from lmm_fusion.base.vocabulary import Scenario
from lmm_fusion.cycle.bagfeed import detect_sensor_topics
from lmm_fusion.cycle.extrinsics import Extrinsics
from lmm_fusion.cycle.ingest import SensorIngest, prefer_odometry_speed
from lmm_fusion.cycle.preprocess import Preprocessor
from lmm_fusion.cycle.sync import SensorSync, SyncConfig
from lmm_fusion.groundtruth.messages import ground_truth_from_messages
from lmm_fusion.io.bags import bag_topics, read_bag
from lmm_fusion.io.errors import MessageError
from lmm_fusion.model.config import ModelConfig

log = logging.getLogger(__name__)

#: Bumped when the cached arrays change meaning.
CACHE_VERSION = 2  # 2: clouds placed by the bag's /tf_static; odometry speed preferred
#: Ground-truth topics a sample needs (the scenario is optional: -1 when absent).
_REQUIRED_GT = (T.GT_SCENE, T.GT_ACTION, T.GT_OCCUPANCY)
#: Per-sample arrays of a cached bag (name -> dtype).
ARRAYS: dict[str, Any] = {
    "image": np.uint8, "bev": np.float16, "ego": np.float32, "mask": np.bool_,
    "risk": np.int64, "action": np.int64, "light": np.int64,
    "target_speed": np.float32, "ttc": np.float32, "distance": np.float32,
    "occupancy": np.uint8, "scenario": np.int64, "stamp": np.float64,
}


def bag_fingerprint(path: Path | str) -> str:
    """Cheap content hash of a bag folder: names, sizes and the first/last MiB of every file."""
    h = hashlib.sha256()
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(root) if root.is_dir() else p.name}:{size}".encode())
        with p.open("rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), 2)
                h.update(f.read())
    return h.hexdigest()[:16]


def preprocess_fingerprint(cfg: ModelConfig, rig: SensorRig, sync_cfg: SyncConfig) -> str:
    """Hash of everything that changes the cached arrays."""
    keys = ("image_height", "image_width", "image_roi_rows", "image_roi", "image_resize", "input_grid", "bev_channels",
            "bev_z_min", "bev_z_max", "bev_height_scale", "bev_density_scale", "bev_intensity_scale",
            "bev_history_frames", "bev_history_lag", "ego_features", "speed_scale", "accel_scale", "yaw_rate_scale",
            "occupancy_grid")
    d = {k: getattr(cfg, k) for k in keys}
    d["rig"] = asdict(rig)
    d["sync"] = asdict(sync_cfg)
    d["version"] = CACHE_VERSION
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _finite_or(v: float, cap: float) -> float:
    v = float(v)
    return cap if not math.isfinite(v) else min(max(v, 0.0), cap)


def _labels(msgs: dict[str, Any], stamp: float, cfg: ModelConfig) -> dict[str, Any]:
    """One sample's label row from its ground-truth messages (``{topic: msg}``), decoded by
    :func:`~lmm_fusion.groundtruth.messages.ground_truth_from_messages`: class codes, TTC / distance /
    target speed capped to ``[0, cap]`` at the model's caps ("none"/"free" = the cap), occupancy as
    ``(ny, nx)`` uint8 (1 = occupied), scenario code (-1 = none or unknown)."""
    gt = ground_truth_from_messages({topic: (stamp, m) for topic, m in msgs.items()})
    if (gt is None or gt.risk is None or gt.light is None or gt.ttc is None or gt.distance is None
            or gt.action is None or gt.target_speed is None or gt.occupied is None):
        raise MessageError(f"ground truth at {stamp:.6f} s: needs every one of {list(_REQUIRED_GT)}")
    return {
        "risk": int(gt.risk), "light": int(gt.light), "ttc": _finite_or(gt.ttc, cfg.ttc_max),
        "distance": _finite_or(gt.distance, cfg.distance_max), "action": int(gt.action),
        "target_speed": _finite_or(gt.target_speed, cfg.speed_max), "occupancy": gt.occupied.astype(np.uint8),
        "scenario": Scenario[gt.scenario].value if gt.scenario is not None and gt.scenario in Scenario.__members__
        else -1,
    }


def extract_samples(path: Path | str, cfg: ModelConfig, rig: SensorRig | None = None,
                    sync_cfg: SyncConfig | None = None) -> dict[str, np.ndarray]:
    """Decode one bag into per-sample arrays (see :data:`ARRAYS`; leading axis = sample).

    A sample is emitted once every sensor message stamped at or before its ground-truth stamp has
    been fed (i.e. when the first later message arrives, or at the end of the bag).
    """
    if cfg.occupancy_bev_grid != OCCUPANCY_GRID:
        raise ValueError(f"occupancy_grid={cfg.occupancy_grid}: ground truth comes on {OCCUPANCY_GRID.as_dict()}")
    rig = rig or SensorRig()
    sync_cfg = sync_cfg or SyncConfig()
    # Clouds placed by the bag's own /tf_static (the rig's mounts only for its own frames without one),
    # one store for ingest and preprocessing, as replay does.
    extrinsics = Extrinsics(rig, rig_fallback=True)
    pre = Preprocessor(cfg, rig, extrinsics)
    ingest = SensorIngest(SensorSync(sync_cfg), rig, extrinsics=extrinsics, preprocessor=pre)
    topic_types = bag_topics(path)
    sensor_of = detect_sensor_topics(topic_types)
    tf_topics = {T.TF_STATIC} & set(topic_types)
    gt_topics = (*_REQUIRED_GT, T.GT_SCENARIO)
    pending: dict[float, dict[str, Any]] = {}
    rows: dict[str, list[Any]] = {k: [] for k in ARRAYS}

    def emit(stamp: float, gt: dict[str, Any]) -> None:
        snap = prefer_odometry_speed(ingest.sync.snapshot(stamp))  # the pipeline's ego-speed rule
        x = pre.inputs(snap)
        mask = x["modality_mask"][0] > 0.5
        cam = snap.frames.get("camera")
        rows["image"].append(pre.resize_image(cam) if mask[0] and cam is not None else
                             np.zeros((cfg.image_height, cfg.image_width, 3), np.uint8))
        rows["bev"].append(x["bev"][0].astype(np.float16))
        rows["ego"].append(x["ego"][0])
        rows["mask"].append(mask)
        for k, v in _labels({t: m for t, m in gt.items() if t != "_stamp"}, stamp, cfg).items():
            rows[k].append(v)
        rows["stamp"].append(stamp)

    def flush(before: float) -> None:
        # Stamps within 0.1 ms count as the same instant (float seconds near 1.7e9 keep ~0.2 us).
        due = sorted({k for k, gt in pending.items() if gt["_stamp"] < before - 1e-4}
                     | {k for k, stamp in lidar_frames.items() if stamp < before - 1e-4})
        for key in due:
            gt = pending.pop(key, None)
            stamp = lidar_frames.pop(key, None)
            if gt is not None and all(t in gt for t in _REQUIRED_GT):
                emit(gt["_stamp"], gt)
            elif stamp is not None:
                # An unlabelled LiDAR frame (a drive's warm-up) still goes through the preprocessor:
                # the BEV history then holds what the node's, which preprocesses every cycle, would.
                pre.inputs(prefer_odometry_speed(ingest.sync.snapshot(stamp)))

    lidar_frames: dict[float, float] = {}  # LiDAR frames ingested and not yet processed: key -> stamp
    for m in read_bag(path, set(sensor_of) | set(gt_topics) | tf_topics):
        if m.topic in tf_topics:
            ingest.on_tf(m.msg)
            continue
        flush(m.stamp_sec)
        sensor = sensor_of.get(m.topic)
        if sensor is not None:
            ingest.on_message(sensor, m.msg, now=m.stamp_sec)
            if sensor == "lidar":
                lidar_frames[round(m.stamp_sec, 4)] = m.stamp_sec
            continue
        # Ground truth is recorded at the stamp of the frame it labels (the scenario String has no
        # header); the key is rounded to 0.1 ms because float seconds near 1.7e9 keep only ~0.2 us.
        pending.setdefault(round(m.stamp_sec, 4), {"_stamp": m.stamp_sec})[m.topic] = m.msg
    flush(math.inf)
    n = len(rows["stamp"])
    if n == 0:
        log.warning("bag %s has no complete ground-truth samples", path)
    ny, nx = cfg.input_bev_grid.shape
    empty_shapes = {"image": (0, cfg.image_height, cfg.image_width, 3), "bev": (0, cfg.bev_input_channels, ny, nx),
                    "ego": (0, cfg.ego_features), "mask": (0, 3), "occupancy": (0, *OCCUPANCY_GRID.shape)}
    return {k: (np.stack(v).astype(ARRAYS[k]) if n else np.zeros(empty_shapes.get(k, (0,)), ARRAYS[k]))
            for k, v in rows.items()}


def sample_source(path: Path | str, cfg: ModelConfig, cache_dir: Path | str | None,
                  rig: SensorRig | None = None, sync_cfg: SyncConfig | None = None) -> Path | dict[str, np.ndarray]:
    """Where a bag's samples are: the checked ``.npz`` sample file when they are on disk (a sample file
    given directly, or the bag's cache file, written now if missing), else the extracted arrays
    (``cache_dir`` None)."""
    rig = rig or SensorRig()
    sync_cfg = sync_cfg or SyncConfig()
    fingerprint = preprocess_fingerprint(cfg, rig, sync_cfg)
    if _is_sample_file(Path(path)):
        return check_sample_file(path, fingerprint)
    if cache_dir is None:
        return extract_samples(path, cfg, rig, sync_cfg)
    file = Path(cache_dir) / f"{Path(path).name}-{bag_fingerprint(path)}-{fingerprint}.npz"
    if not file.is_file():
        # Any: numpy's stub would check **arrays against savez's allow_pickle flag.
        arrays: dict[str, Any] = extract_samples(path, cfg, rig, sync_cfg)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(file)
    return file


def load_bag_samples(path: Path | str, cfg: ModelConfig, cache_dir: Path | str | None,
                     rig: SensorRig | None = None, sync_cfg: SyncConfig | None = None) -> dict[str, np.ndarray]:
    """:func:`extract_samples` with an on-disk cache (``cache_dir`` None = no cache)."""
    src = sample_source(path, cfg, cache_dir, rig, sync_cfg)
    return src if isinstance(src, dict) else _read_sample_file(src)


def load_sample_file(path: Path | str, fingerprint: str) -> dict[str, np.ndarray]:
    """Arrays of one cached bag (a ``.npz`` file of a cache directory, usable without its bag),
    checked by :func:`check_sample_file`."""
    return _read_sample_file(check_sample_file(path, fingerprint))


def check_sample_file(path: Path | str, fingerprint: str) -> Path:
    """``path`` if it is a sample file made with preprocessing ``fingerprint`` and holding every array.

    The file name ends with the preprocessing fingerprint it was made with; a file made with other
    settings (resolution, BEV grid, history, rig, ...) is refused rather than trained on silently.
    """
    p = Path(path)
    made_with = p.stem.rpartition("-")[2]
    if made_with != fingerprint:
        raise ValueError(f"{p}: samples preprocessed with settings {made_with!r}, this model config needs "
                         f"{fingerprint!r}; give the bag itself to re-extract them")
    with np.load(p, allow_pickle=False) as z:
        missing = sorted(set(ARRAYS) - set(z.files))
    if missing:
        raise ValueError(f"{p}: not a sample file (missing arrays {missing})")
    return p


def _read_sample_file(path: Path) -> dict[str, np.ndarray]:
    """Every array of a checked sample file, read in one opening."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k].astype(ARRAYS[k], copy=False) for k in ARRAYS}


def _read_array(src: Path | dict[str, np.ndarray], key: str) -> np.ndarray:
    """One array of a sample source; an in-memory source gives it up (so it is freed once copied)."""
    if isinstance(src, dict):
        return src.pop(key)
    with np.load(src, allow_pickle=False) as z:
        return z[key].astype(ARRAYS[key], copy=False)


def merge_sources(sources: Sequence[Path | dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Concatenate the samples of ``sources`` (see :func:`sample_source`) into one array per key;
    also returns each source's number of samples.

    Each key is allocated once at its final size and filled source by source, reading sample files
    one array at a time. Why: the peak is the merged data plus one bag's array, not twice the data
    (tens of GB for a large training set on a machine of 24 GB).
    """
    stamps = [_read_array(s, "stamp") for s in sources]  # read once: they give the sizes
    sizes = [len(t) for t in stamps]
    total = sum(sizes)
    out: dict[str, np.ndarray] = {}
    for key in ARRAYS:
        off = 0
        for src, n, stamp in zip(sources, sizes, stamps, strict=True):
            part = stamp if key == "stamp" else _read_array(src, key)
            if len(part) != n:
                raise ValueError(f"{src if not isinstance(src, dict) else 'samples'}: array {key!r} has "
                                 f"{len(part)} rows, 'stamp' has {n}")
            if key not in out:
                out[key] = np.empty((total, *part.shape[1:]), ARRAYS[key])
            out[key][off:off + n] = part
            off += n
    return out, sizes


class FusionDataset(Dataset):
    """Samples of several bags, concatenated. ``item(i)`` -> dict of tensors (model inputs + targets).

    Inputs: ``image (3,Hi,Wi)`` float32 normalised, ``bev (C,ny,nx)`` float32 (C =
    ``cfg.bev_input_channels``), ``ego (F,)``, ``modality_mask (3,)`` float32. Targets:
    ``risk``/``action``/``light``/``scenario`` int64, ``target_speed`` [m/s], ``ttc`` [s], ``distance`` [m]
    float32 (capped), ``occupancy (32,64)`` float32.
    """

    def __init__(self, bags: Sequence[Path | str], cfg: ModelConfig, cache_dir: Path | str | None = None,
                 rig: SensorRig | None = None, sync_cfg: SyncConfig | None = None) -> None:
        self.cfg = cfg
        self.pre = Preprocessor(cfg, rig)
        sources = [sample_source(b, cfg, cache_dir, rig, sync_cfg) for b in bags]
        self.arrays, sizes = merge_sources(sources)
        self.bag_index = np.repeat(np.arange(len(sizes)), sizes)
        self.bags = [str(b) for b in bags]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], cfg: ModelConfig,
                    rig: SensorRig | None = None) -> FusionDataset:
        """A dataset over already extracted arrays (keys of :data:`ARRAYS`)."""
        ds = cls([], cfg, rig=rig)
        missing = sorted(set(ARRAYS) - set(arrays))
        if missing:
            raise ValueError(f"arrays: missing {missing}")
        ds.arrays = {k: np.asarray(arrays[k], ARRAYS[k]) for k in ARRAYS}
        ds.bag_index = np.zeros(len(ds.arrays["stamp"]), np.int64)
        return ds

    def __len__(self) -> int:
        return len(self.arrays.get("stamp", ()))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch(np.array([i])).items()}

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """A whole batch at once (vectorised; faster than collating ``__getitem__`` results)."""
        a = self.arrays
        return {
            "image": torch.from_numpy(self.pre.normalize_image(a["image"][idx])),
            "bev": torch.from_numpy(a["bev"][idx].astype(np.float32)),
            "ego": torch.from_numpy(a["ego"][idx]),
            "modality_mask": torch.from_numpy(a["mask"][idx].astype(np.float32)),
            "risk": torch.from_numpy(a["risk"][idx]),
            "action": torch.from_numpy(a["action"][idx]),
            "light": torch.from_numpy(a["light"][idx]),
            "scenario": torch.from_numpy(a["scenario"][idx]),
            "target_speed": torch.from_numpy(a["target_speed"][idx]),
            "ttc": torch.from_numpy(a["ttc"][idx]),
            "distance": torch.from_numpy(a["distance"][idx]),
            "occupancy": torch.from_numpy(a["occupancy"][idx].astype(np.float32)),
        }


#: Arrays a batch is built from (:meth:`FusionDataset.batch`), the ones :class:`ResidentSamples` holds.
BATCH_ARRAYS = ("image", "bev", "ego", "mask", "risk", "action", "light", "scenario", "target_speed", "ttc",
                "distance", "occupancy")


class ResidentSamples:
    """The batch arrays of a :class:`FusionDataset` held on a torch device (the training GPU), so a batch
    is gathered by index there instead of on the CPU and copied over every step.

    The arrays keep their cached dtypes on the device (images uint8, BEV float16, occupancy uint8: about
    a third of float32); :meth:`batch` converts and normalises the gathered rows there, with the same
    float32 operations in the same order as :meth:`FusionDataset.batch` (bitwise the same batch on CPU).
    On the CPU the tensors share the dataset's numpy memory (no copy).
    """

    def __init__(self, ds: FusionDataset, device: torch.device) -> None:
        self.device = device
        self.t = {k: torch.from_numpy(np.ascontiguousarray(ds.arrays[k])).to(device) for k in BATCH_ARRAYS}
        # The Preprocessor's constants (Preprocessor.normalize_image), as float32 (3, 1, 1) on the device.
        self.mean = torch.from_numpy(np.asarray(ds.cfg.image_mean, np.float32).reshape(3, 1, 1)).to(device)
        self.inv_std = torch.from_numpy((1.0 / np.asarray(ds.cfg.image_std, np.float32)).reshape(3, 1, 1)).to(device)

    @staticmethod
    def nbytes(ds: FusionDataset) -> int:
        """Device memory [bytes] the arrays of ``ds`` take when resident."""
        return int(sum(ds.arrays[k].nbytes for k in BATCH_ARRAYS))

    def index(self, idx: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``idx`` as an int64 index tensor on the device."""
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(np.ascontiguousarray(idx, np.int64))
        return idx.to(self.device, torch.int64)

    def batch(self, idx: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`FusionDataset.batch` of the samples ``idx`` (numpy or a tensor), built on the device."""
        t, i = self.t, self.index(idx)
        # Transposed as uint8 first (a quarter of the bytes), then converted: (B, 3, Hi, Wi) float32, contiguous.
        img = t["image"].index_select(0, i).permute(0, 3, 1, 2).contiguous().float()
        img = img.mul_(1.0 / 255.0).sub_(self.mean).mul_(self.inv_std)
        out = {"image": img, "bev": t["bev"].index_select(0, i).float(), "ego": t["ego"].index_select(0, i),
               "modality_mask": t["mask"].index_select(0, i).float(),
               "occupancy": t["occupancy"].index_select(0, i).float()}
        for k in ("risk", "action", "light", "scenario", "target_speed", "ttc", "distance"):
            out[k] = t[k].index_select(0, i)
        return out


def _is_bag(p: Path) -> bool:
    return p.is_dir() and ((p / "metadata.yaml").is_file() or any(p.glob("*.mcap")) or any(p.glob("*.db3")))


def _is_sample_file(p: Path) -> bool:
    return p.suffix == ".npz" and p.is_file()


def expand_bags(paths: Sequence[Path | str]) -> list[Path]:
    """Bag folders named by ``paths``: a bag folder itself, or every bag folder below a directory
    (sorted, so the order and thus the training run are reproducible). A cached sample file
    (``.npz``, see :func:`load_sample_file`) stands for its bag; a directory without bags yields the
    sample files in it (a cache directory whose bags were deleted to free disk)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if _is_bag(p) or _is_sample_file(p):
            out.append(p)
        elif p.is_dir():
            found = sorted(q for q in p.rglob("*") if _is_bag(q)) or sorted(
                q for q in p.glob("*.npz") if not q.name.endswith(".tmp.npz"))
            if not found:
                raise FileNotFoundError(f"--data {p}: no rosbag2 folders or sample files below it")
            out.extend(found)
        else:
            raise FileNotFoundError(f"--data {p}: not a rosbag2 folder, a sample file or a directory of them")
    return out
