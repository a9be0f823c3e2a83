"""``lmm-fusion dataset``: many short synthetic drives for training, one scenario family per drive.

Drive ``i`` uses family ``Scenario(i % 7)`` (so every family is equally represented) and the seed
``SeedSequence([seed, i])`` -> one 32-bit integer, so any drive can be regenerated alone and the
set does not depend on the number of workers. With ``--start-max S`` drive ``i`` begins its labels at a
world time drawn uniformly in ``[0, S]`` s from ``SeedSequence([seed, i, 1])`` (sensors warm for a
second before), so the labels cover every moment of an episode — a car that has already braked to a
stop behind an obstacle or at a red light, not only the first seconds of each scene. Drives go to
``OUT/drive_<i>_<family>/`` and a ``manifest.json`` lists them (no timestamps: same arguments, same files).

``--workers 2`` synthesises in a local process pool; ``--ray [ADDRESS]`` as one Ray task per drive, on a
Ray started here (no address) or on a cluster (``auto``, ``ray://HOST:10001``; ``OUT`` on storage every
worker sees). Every drive depends only on its seed, so all three write the same bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmm_fusion.base.rig import SensorRig
from lmm_fusion.base.vocabulary import Scenario
from lmm_fusion.synth.drive import add_sensor_arguments, add_world_arguments, rig_from_args, rig_from_cli, synthesize

log = logging.getLogger(__name__)

#: Default camera for training drives (raw 1280x720 would be ~3 GB per minute).
DATASET_CAMERA = (640, 360)


@dataclass(frozen=True)
class DriveSpec:
    index: int
    path: str
    seed: int
    scenario: str
    seconds: float
    start: float = 0.0  # world time of the first label [s]


def drive_seed(seed: int, index: int) -> int:
    """Seed of drive ``index`` of a dataset with ``seed`` (independent of worker count)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def drive_start(seed: int, index: int, start_max: float) -> float:
    """World time [s, ms resolution] of drive ``index``'s first label, uniform in ``[0, start_max]``."""
    if start_max <= 0:
        return 0.0
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 1]))
    return round(float(rng.uniform(0.0, start_max)), 3)


def plan(out: Path, drives: int, seconds: float, seed: int, start_max: float = 0.0) -> list[DriveSpec]:
    fams = list(Scenario)
    specs = []
    for i in range(drives):
        fam = fams[i % len(fams)]
        specs.append(DriveSpec(i, str(out / f"drive_{i:05d}_{fam.name.lower()}"), drive_seed(seed, i), fam.name,
                               seconds, drive_start(seed, i, start_max)))
    return specs


def make_drive(spec: DriveSpec, rig: SensorRig, compressed: bool, storage: str = "mcap",
               lamp_cues: bool = True) -> str:
    """Synthesise the drive ``spec`` plans (its family, seed, length and start) into ``spec.path``."""
    synthesize(Path(spec.path), spec.seconds, spec.seed, [Scenario[spec.scenario]], rig, compressed, storage,
               progress=False, start=spec.start, lamp_cues=lamp_cues)
    return spec.path


def _make(job: tuple[DriveSpec, SensorRig, bool, str, bool]) -> str:
    return make_drive(*job)


def write_manifest(out: Path, specs: list[DriveSpec], seed: int, seconds: float, start_max: float, lamp_cues: bool,
                   compressed: bool, storage: str, rig: SensorRig) -> None:
    """``out/manifest.json``: how the drive set ``specs`` was made (seeds, length, sensors, every drive)."""
    manifest = {"seed": seed, "seconds": seconds, "start_max": start_max, "lamp_cues": lamp_cues,
                "compressed": compressed, "storage": storage,
                "camera": [rig.camera.width, rig.camera.height], "lidar": [rig.lidar.beams, rig.lidar.columns],
                "drives": [dict(asdict(s), path=Path(s.path).name) for s in specs]}
    (Path(out) / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def _make_with_ray(jobs: list[tuple[DriveSpec, SensorRig, bool, str, bool]], address: str, num_cpus: int | None,
                   max_retries: int, bar: tqdm | None) -> None:
    """:func:`_make` of every job as one Ray task each (on ``address``, or on a Ray of ``num_cpus`` CPUs started
    here for ``"local"``); a task whose worker died runs again (``max_retries``); drives that raised are
    reported together after the others finished (the drives written are kept, ``resume`` completes them)."""
    import ray  # only for --ray: the rest of the project never needs it

    started = not ray.is_initialized()
    if started:
        where: dict[str, Any] = {"num_cpus": num_cpus} if address == "local" else {"address": address}
        ray.init(**where, include_dashboard=False, configure_logging=False)
    try:
        make = ray.remote(num_cpus=1, max_retries=max_retries)(_make)
        pending = [make.remote(job) for job in jobs]
        errors: list[str] = []
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                errors.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            if bar is not None:
                bar.update(1)
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(jobs)} drives failed; first: {errors[0]}")
    finally:
        if started:
            ray.shutdown()


def make_dataset(out: Path, drives: int, seconds: float, seed: int, rig: SensorRig | None = None,
                 compressed: bool = False, storage: str = "mcap", workers: int = 1,
                 progress: bool = True, start_max: float = 0.0, lamp_cues: bool = True,
                 resume: bool = False, ray_address: str | None = None, ray_cpus: int | None = None,
                 max_retries: int = 2) -> list[DriveSpec]:
    """Write ``drives`` drives of ``seconds`` each under ``out`` (created; existing drives are an error);
    ``start_max`` [s]: draw each drive's first-label time in ``[0, start_max]`` (see the module doc);
    ``lamp_cues``: the world's turn signals and lamp rules (recorded in the manifest); ``resume``: keep
    the drives already complete (their bag closed, ``metadata.yaml`` written) and make the rest, a drive
    cut off mid-write again from scratch (the same seed gives the same drive). ``ray_address``: one Ray
    task per drive instead of ``workers`` (``"local"``: a Ray of ``ray_cpus`` CPUs started here)."""
    if drives < 1:
        raise ValueError(f"drives must be >= 1, got {drives}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if not (start_max >= 0 and np.isfinite(start_max)):
        raise ValueError(f"start_max must be a finite number >= 0 [s], got {start_max}")
    rig = rig or rig_from_args(camera=DATASET_CAMERA)
    out = Path(out).resolve() if ray_address is not None else Path(out)  # a Ray worker's cwd is not ours
    out.mkdir(parents=True, exist_ok=True)
    specs = plan(out, drives, seconds, seed, start_max)
    jobs = [(s, rig, compressed, storage, lamp_cues) for s in specs]
    if resume:
        jobs = [j for j in jobs if not (Path(j[0].path) / "metadata.yaml").is_file()]
        for spec, *_ in jobs:
            if Path(spec.path).exists():
                shutil.rmtree(spec.path)
    bar = None
    if progress:
        bar = tqdm(total=len(specs), initial=len(specs) - len(jobs), unit="drive", desc=f"dataset {out.name}")
    if ray_address is not None:
        _make_with_ray(jobs, ray_address, ray_cpus, max_retries, bar)
    elif workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap(_make, jobs):
                if bar is not None:
                    bar.update(1)
    else:
        for job in jobs:
            _make(job)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    write_manifest(out, specs, seed, seconds, start_max, lamp_cues, compressed, storage, rig)
    log.info("wrote %d drives under %s", len(specs), out)
    return specs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder (one rosbag2 folder per drive + manifest.json)")
    parser.add_argument("--drives", type=int, default=70, help="number of drives (default 70)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per drive (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--start-max", type=float, default=0.0, metavar="S",
                        help="draw each drive's first-label world time uniformly in [0, S] s (default 0: "
                             "every drive starts with its episode, sensors cold)")
    add_world_arguments(parser)
    add_sensor_arguments(parser)
    parser.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="rosbag2 storage plugin")
    parser.add_argument("--workers", type=int, choices=(1, 2), default=1, help="worker processes (default 1)")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="one Ray task per drive: on a Ray started here (no ADDRESS) or on a cluster "
                             "(auto, ray://HOST:10001, HOST:6379); OUT must be on storage every worker sees")
    parser.add_argument("--ray-cpus", type=int, default=None, metavar="N",
                        help="CPUs of the Ray started here (default: all of this machine's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    rig = rig_from_cli(args, DATASET_CAMERA)  # --rig FILE, then --camera/--lidar-*/--origin
    specs = make_dataset(args.out, args.drives, args.seconds, args.seed, rig, args.compressed, args.storage,
                         args.workers, progress=not args.no_progress, start_max=args.start_max,
                         lamp_cues=args.lamp_cues, ray_address=args.ray, ray_cpus=args.ray_cpus)
    print(f"wrote {len(specs)} drives of {args.seconds:g} s under {args.out} "
          f"(camera {rig.camera.width}x{rig.camera.height}, LiDAR {rig.lidar.beams}x{rig.lidar.columns})")
    return 0
