"""``lmm-fusion scale BAG... --out DIR``: fleet-replay throughput on Ray with 1..N workers, measured, and its
projection for a cluster.

For each worker count ``N`` (``--workers 1 2``) a local Ray of ``N`` CPUs starts, ``N`` bags are replayed once
to start and warm the workers (their cold start is reported separately: a worker process imports torch and
the project once; loading the model and warming the pipeline is part of every bag's cost), then all bags
are replayed as a fleet (:func:`~lmm_fusion.offline.fleet.replay_fleet`, one task per bag, one backend
thread per task) and timed.
Ray's own cost is measured with empty tasks: the round trip of one task, and how many tasks a second the
driver dispatches when many are queued.

The projection (``DIR/scale.json`` ``projection``, and the plot) models a cluster of ``N`` workers with one
free CPU core each: throughput ``X(N) = N · d / (c + o)`` bag seconds per wall second, ``d`` the mean bag
duration [s], ``c`` the per-bag cost [s] (a warm task's wall time with one worker), ``o`` the overhead per
task with one worker (slot time outside tasks: dispatch, result transfer; with more workers than free
cores the measured overhead also holds the wait for a core). It stops scaling at the first ceiling:

* **dispatch**: one driver submits and collects at most ``R`` tasks/s (measured with empty tasks), so
  ``N ≤ R · (c + o)``;
* **storage**: every worker reads ``S / (c + o)`` bytes/s (``S`` the mean bag size), so a shared store of
  ``--storage-gb-s`` GB/s feeds ``N ≤ BW · (c + o) / S`` workers;
* **bags** (``--fleet-bags``): a bag is one task, so a fleet of ``B`` bags never keeps more than ``B``
  workers busy (and its last bags leave workers idle: split long logs into more bags).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from lmm_fusion.offline import fleet
from lmm_fusion.offline import replay as rp
from lmm_fusion.runtime.base import BACKENDS

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt

log = logging.getLogger(__name__)


def _null() -> int:
    return 0


def ray_overhead(ray: Any, n: int = 300) -> dict[str, float]:
    """Ray's cost of an empty task: ``round_trip_ms`` (submit one, wait for it; median of ``n // 3``) and
    ``dispatch_per_s`` (``n`` tasks submitted at once, completed per second)."""
    null = ray.remote(num_cpus=1)(_null)
    ray.get([null.remote() for _ in range(8)])  # workers up and the function exported
    trips = []
    for _ in range(max(1, n // 3)):
        t0 = time.perf_counter()
        ray.get(null.remote())
        trips.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ray.get([null.remote() for _ in range(n)])
    bulk = time.perf_counter() - t0
    return {"round_trip_ms": round(1e3 * float(np.median(trips)), 3), "dispatch_per_s": round(n / bulk, 1)}


def _bag_bytes(bag: Path) -> int:
    return sum(p.stat().st_size for p in Path(bag).rglob("*") if p.is_file())


def measure(bags: list[Path], out: Path, opts: rp.ReplayOptions, workers: list[int],
            storage_gb_s: float = 2.0, fleet_bags: int | None = None) -> dict[str, Any]:
    """The measurements and projection of the module docstring (also written to ``out/scale.json``)."""
    import ray

    runs: list[dict[str, Any]] = []
    overhead: dict[str, float] = {}
    for n in workers:
        with fleet.ray_session(fleet.LOCAL, n):
            t0 = time.perf_counter()
            fleet.replay_fleet(bags[:n], out / f"warm{n}", opts, ray_address=fleet.LOCAL)  # start + warm workers
            cold = time.perf_counter() - t0
            report, _ = fleet.replay_fleet(bags, out / f"workers{n}", opts, ray_address=fleet.LOCAL)
            if n == max(workers):
                overhead = ray_overhead(ray)
        if report["failed"]:  # a throughput over failed replays means nothing
            first_fail = report["failed"][0]
            raise RuntimeError(f"scale: {len(report['failed'])} bags failed with {n} workers; first: "
                               f"{first_fail['bag']}: {first_fail['error']}")
        th = report["throughput"]
        runs.append({"workers": n, "wall_s": th["wall_s"], "x_realtime": th["x_realtime"],
                     "bags_per_min": th["bags_per_min"], "task_s": th["task_s"],
                     "overhead_s_per_task": th["overhead_s_per_task"], "warmup_s": round(cold, 3),
                     "bags_failed": report["pooled"]["bags_failed"]})
        log.info("scale: %d workers: %.2fx real time (%.1f s)", n, th["x_realtime"] or 0.0, th["wall_s"])
    first, last = runs[0], runs[-1]
    d = float(np.mean([_duration(b) for b in bags]))
    size = float(np.mean([_bag_bytes(b) for b in bags]))
    result = {"bags": [str(b) for b in bags], "backend": opts.backend, "runs": runs, "ray": overhead,
              "speedup": round(float(last["x_realtime"]) / float(first["x_realtime"]), 3)
              if first["x_realtime"] else None,
              "projection": project(runs, overhead, d, size, storage_gb_s, fleet_bags)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def project(runs: list[dict[str, Any]], overhead: dict[str, float], bag_s: float, bag_bytes: float,
            storage_gb_s: float, fleet_bags: int | None = None) -> dict[str, Any]:
    """The cluster projection of the module docstring from the runs (the first: one worker), Ray's
    overhead (:func:`ray_overhead`), the mean bag duration [s] and size [bytes]."""
    c = float(runs[0]["task_s"]["p50"])
    o = float(runs[0]["overhead_s_per_task"])
    ceilings = {
        "dispatch": int(overhead.get("dispatch_per_s", 0.0) * (c + o)),
        "storage": int(storage_gb_s * 1e9 * (c + o) / bag_bytes) if bag_bytes > 0 else None,
        "bags": fleet_bags,
    }
    return {"bag_s": round(bag_s, 3), "per_bag_s": round(c, 4), "overhead_s_per_task": round(o, 4),
            "bag_bytes": int(bag_bytes), "storage_gb_s": storage_gb_s,
            "x_realtime_per_worker": round(bag_s / (c + o), 3), "ceilings_workers": ceilings,
            "stops_scaling_at": min(v for v in ceilings.values() if v)}


def _duration(bag: Path) -> float:
    start, end = rp.bag_time_range([Path(bag)])
    return max(end - start, 0.0)


def plot(result: dict[str, Any], path: Path, earlier: list[list[dict[str, Any]]] | None = None) -> Path:
    """Measured throughput (points; ``earlier``: the ``runs`` of other measurements, hollow) and the
    projection (line, with the ceilings) -> small PNG."""
    pr = result["projection"]
    per_worker = pr["x_realtime_per_worker"]
    stop = int(pr["stops_scaling_at"])
    top = max([8 * stop, 16] + [2 * v for v in pr["ceilings_workers"].values() if v])
    n = np.unique(np.round(np.logspace(0, np.log10(top), 200)).astype(int))
    proj = per_worker * np.minimum(n, stop)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.loglog(n, proj, color="tab:blue", label=f"projection: {per_worker:.2f}× real time per worker")
    ws = [r["workers"] for r in result["runs"]]
    ax.loglog(ws, [r["x_realtime"] for r in result["runs"]], "o", color="tab:red", ms=7,
              label="measured (this machine)")
    for i, runs in enumerate(earlier or []):
        ax.loglog([r["workers"] for r in runs], [r["x_realtime"] for r in runs], "o", mfc="none", color="tab:red",
                  ms=7, label="measured, earlier runs (slower replay)" if i == 0 else None)
    styles = {"bags": ":", "dispatch": "--", "storage": "-."}
    for name, v in pr["ceilings_workers"].items():
        if v:
            ax.axvline(v, color="0.4", ls=styles[name], lw=1, label=f"{name} ceiling: {v} workers")
    ax.set_xlabel("Ray workers (1 CPU each)")
    ax.set_ylabel("fleet throughput [× real time]")
    ax.set_title(f"fleet replay: {pr['per_bag_s']:.2f} s per {pr['bag_s']:.0f} s bag of "
                 f"{pr['bag_bytes'] / 1e6:.0f} MB, {1e3 * pr['overhead_s_per_task']:.0f} ms overhead per task; "
                 f"plateau {per_worker * stop:.0f}× real time", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bags", nargs="+", type=Path, metavar="BAG", help="rosbag2 folders to replay as a fleet")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (scale.json, replays)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], metavar="N",
                   help="worker counts to measure (default 1 2)")
    p.add_argument("--model", type=Path, default=None, metavar="DIR", help="model folder (default: shipped)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="inference backend (default auto)")
    p.add_argument("--storage-gb-s", type=float, default=2.0,
                   help="read bandwidth of the cluster's shared bag store for the projection [GB/s] (default 2)")
    p.add_argument("--fleet-bags", type=int, default=None, metavar="B",
                   help="bags in the fleet to project for (a ceiling on useful workers; default: none)")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="plot file (default DIR/scale.png)")


def run(args: argparse.Namespace) -> int:
    opts = rp.ReplayOptions(model_dir=args.model, backend=args.backend, threads=1, progress=False)
    try:
        result = measure(args.bags, args.out, opts, sorted(set(args.workers)), args.storage_gb_s, args.fleet_bags)
    except (RuntimeError, FileNotFoundError, ValueError, ConnectionError) as exc:
        log.error("%s", exc)
        return 1
    png = plot(result, args.plot or args.out / "scale.png")
    print(json.dumps({**result, "plot": str(png)}, indent=2))
    return 0


__all__ = ["add_arguments", "measure", "plot", "project", "ray_overhead", "run"]
