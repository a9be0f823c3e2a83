"""``lmm-fusion load``: drive the real node with full-size synthetic sensors and measure it as a process.

The node runs as its own process (``python -m lmm_fusion.ros.node``) on loopback DDS; a second process
(``python -m lmm_fusion.tools.loadtest ...``, :func:`publisher_main`) publishes a 1280x720 rgb8 camera at
20 Hz, a 120k-point 48-byte-layout PointCloud2 at 10 Hz and a moving NavSatFix at 10 Hz (configurable),
stamped with the wall clock, for a bounded time, while this process collects the node's outputs and
``/diagnostics`` and samples the node's CPU and RSS once a second (:class:`~lmm_fusion.tools.harness.NodeHarness`,
:class:`~lmm_fusion.tools.harness.SensorPublisher`).

The report (JSON) gives the achieved output rate, cycle latency p50/p99 (the node's own
measurement), deadline misses, per-sensor rates seen by the node against the published rates
(dropped frames: over DDS best-effort, large messages are dropped on purpose rather than queued),
and the node's RSS over time with its growth after warm-up. The same command with ``--seconds 600
--rate-hz 20`` is the soak test (docs/benchmarks.md keeps the last result).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from matplotlib.figure import Figure

from lmm_fusion.base.vocabulary import MODALITIES
from lmm_fusion.ros.dds import PROFILE_VARS
from lmm_fusion.tools.harness import NodeHarness, SensorPublisher, loopback_env, wait_until
from lmm_fusion.tools.payloads import padded_cloud_array, synthetic_image, synthetic_points

log = logging.getLogger(__name__)

#: GNSS rate of the load [Hz] (the receiver's rate in the default rig).
GNSS_HZ = 10.0


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p99 and max of ``values`` (rounded to 3 decimals), all None for no values."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    arr = np.asarray(values, float)
    return {
        "p50": round(float(np.percentile(arr, 50)), 3),
        "p99": round(float(np.percentile(arr, 99)), 3),
        "max": round(float(arr.max()), 3),
    }


def _transport_env(transport: str) -> dict[str, str]:
    """DDS environment of the node and publisher for ``transport`` (see :func:`run_load`)."""
    env = loopback_env()  # with the shipped shared-memory profile
    if transport != "shm":
        for var in PROFILE_VARS:
            env.pop(var, None)
    if transport == "large_data":
        env["FASTDDS_BUILTIN_TRANSPORTS"] = "LARGE_DATA"
    return env


@dataclass
class _Measured:
    """What one load run observed: outputs and diagnostics received, the node's RSS [MiB] over time
    [s] and CPU [%] once a second, the seconds measured and the publisher's own report."""

    scenes: list[dict[str, Any]]
    diags: list[dict[str, Any]]
    rss: list[tuple[float, float]]
    cpu: list[float]
    elapsed: float
    publisher: dict[str, Any]


def _measure(harness: NodeHarness, env: dict[str, str], seconds: float, warmup_s: float,
             payload: tuple[int, int, int, float, float], out_dir: Path) -> _Measured:
    """Start the publisher once the node publishes, then sample the node for ``seconds``.
    ``payload``: camera width, height [px], LiDAR points, camera and LiDAR rates [Hz]."""
    node, collector, procs = harness.node, harness.outputs, harness.procs
    if not wait_until(lambda: collector.count("scene") > 0 or node.poll() is not None, 120.0):
        raise RuntimeError("the node published nothing within 120 s; see " + str(out_dir / "logs/node.log"))
    if node.poll() is not None:
        raise RuntimeError(f"the node exited with {node.returncode}; see {out_dir / 'logs/node.log'}")
    # The publisher is its own process: sharing this one with the collector's executor (and its GIL)
    # made it the bottleneck, and a vehicle's drivers are separate processes too.
    procs.start("publisher", [sys.executable, "-m", "lmm_fusion.tools.loadtest", str(harness.domain),
                              *(str(v) for v in payload)], env)
    wait_until(lambda: False, min(5.0, warmup_s))  # let discovery settle before counting
    collector.clear()
    proc = psutil.Process(node.pid)
    proc.cpu_percent(None)
    rss: list[tuple[float, float]] = []
    cpu: list[float] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        if node.poll() is not None:
            raise RuntimeError(f"the node died under load (exit {node.returncode}); see logs/node.log")
        rss.append((round(time.monotonic() - t0, 1), proc.memory_info().rss / 2**20))
        cpu.append(proc.cpu_percent(None))
    elapsed = time.monotonic() - t0
    scenes, diags = collector.get("scene"), collector.get("diagnostics")
    procs.stop("publisher")
    publisher = json.loads(procs.log_text("publisher").strip().splitlines()[-1])
    return _Measured(scenes, diags, rss, cpu, elapsed, publisher)


def _from_diagnostics(diags: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, list[float]], list[float]]:
    """The node's last cycle status, each sensor's received rates [Hz] (after the first 3 s) and the
    pipeline's total latencies [ms], from the ``/diagnostics`` records."""
    cycle: dict[str, str] = {}
    sensor_rates: dict[str, list[float]] = {s: [] for s in MODALITIES}
    totals: list[float] = []
    for d in diags:
        for name, st in d["status"].items():
            key = name.rsplit(": ", 1)[-1]
            if key == "cycle":
                cycle = st["values"]
            elif key in sensor_rates and d["recv"] - diags[0]["recv"] > 3.0:
                sensor_rates[key].append(float(st["values"]["rate_hz"]))
            elif key == "assessment" and "total_ms" in st["values"]:
                totals.append(float(st["values"]["total_ms"]))
    return cycle, sensor_rates, totals


def _node_process(m: _Measured, warmup_s: float) -> dict[str, Any]:
    after = [mib for t, mib in m.rss if t >= warmup_s] or [mib for _, mib in m.rss]
    base = float(np.median(after[: max(1, len(after) // 10)]))
    end = float(np.median(after[-max(1, len(after) // 10) :]))
    return {
        "cpu_percent_mean": round(float(np.mean(m.cpu)), 1) if m.cpu else None,
        "rss_mib_start": round(m.rss[0][1], 1) if m.rss else None,
        "rss_mib_after_warmup": round(base, 1),
        "rss_mib_end": round(end, 1),
        "rss_growth_after_warmup_pct": round(100.0 * (end - base) / base, 2) if base else None,
        "rss_mib_series": [(t, round(mib, 1)) for t, mib in m.rss],
    }


def run_load(
    seconds: float,
    rate_hz: float,
    width: int,
    height: int,
    points: int,
    camera_hz: float,
    lidar_hz: float,
    backend: str,
    out_dir: Path,
    warmup_s: float = 20.0,
    transport: str = "shm",
) -> dict[str, Any]:
    """Run the node under load for ``seconds`` (after it starts publishing) and return the report.

    ``transport``: ``shm`` = the shipped Fast DDS profile (config/fastdds_large_data.xml: a shared-memory
    segment that holds whole multi-MB samples); ``large_data`` = Fast DDS's builtin LARGE_DATA mode;
    ``default`` = Fast DDS defaults (UDP fragments: multi-MB best-effort samples are mostly lost).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    env = _transport_env(transport)
    # The harness applies the same DDS variables to this process (the collector) while it runs.
    # /diagnostics once per cycle (default 1 s; at most 20 Hz), so every cycle's pipeline latency is sampled.
    harness = NodeHarness(out_dir / "logs", (f"rate_hz:={rate_hz}", f"backend:={backend}", "use_camera_info:=false",
                                             f"diagnostics.period:={max(1.0 / rate_hz, 0.05)}"), env=env)
    try:
        m = _measure(harness, env, seconds, warmup_s, (width, height, points, camera_hz, lidar_hz), out_dir)
    finally:
        harness.close()
    sent, publish_ms, pub_seconds = m.publisher["sent"], m.publisher["publish_ms"], m.publisher["seconds"]
    cycle, sensor_rates, totals = _from_diagnostics(m.diags)
    recv = [r["recv"] for r in m.scenes]
    achieved = (len(recv) - 1) / (recv[-1] - recv[0]) if len(recv) > 1 else 0.0
    gaps_ms = list(np.diff(recv) * 1e3) if len(recv) > 1 else []
    report = {
        "config": {
            "seconds": seconds,
            "rate_hz": rate_hz,
            "camera": f"{width}x{height} rgb8 @ {camera_hz:g} Hz",
            "lidar": f"{points} points x 48 B @ {lidar_hz:g} Hz",
            "gnss": f"NavSatFix @ {GNSS_HZ:g} Hz",
            "backend": backend,
            "warmup_s": warmup_s,
            "transport": transport,
        },
        "outputs": {
            "assessments": len(m.scenes),
            "achieved_hz": round(achieved, 3),
            "expected": int(m.elapsed * rate_hz),
            "interval_ms": _percentiles(gaps_ms),
            "valid": sum(r["valid"] for r in m.scenes),
            "degraded": sum(r["degraded"] for r in m.scenes),
        },
        "cycle_latency_ms": {
            "node_p50": float(cycle.get("latency_p50_ms", "nan")),
            "node_p99": float(cycle.get("latency_p99_ms", "nan")),
            "pipeline_samples": _percentiles(totals),
        },
        "deadline_misses": int(cycle.get("deadline_misses", "0")),
        "cycles": int(cycle.get("cycles", "0")),
        "sensors": {
            s: {
                "published": sent[s],
                "published_hz": round(sent[s] / pub_seconds, 2),
                "received_hz_median": round(float(np.median(v)), 2) if v else None,
                "received_hz_p10_p90": [round(float(np.percentile(v, q)), 2) for q in (10, 90)] if v else None,
                "publish_ms": publish_ms[s],
            }
            for s, v in sensor_rates.items()
        },
        "node_process": _node_process(m, warmup_s),
    }
    (out_dir / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def plot_rss(report: dict[str, Any], path: Path) -> None:
    """PNG of the node's RSS [MiB] over the time under load, with the end of the warm-up marked."""
    series = report["node_process"]["rss_mib_series"]
    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    ax.plot([t for t, _ in series], [m for _, m in series])
    ax.axvline(report["config"]["warmup_s"], color="grey", ls="--", label="end of warm-up")
    ax.set(
        xlabel="time under load [s]",
        ylabel="node RSS [MiB]",
        title=f"node at {report['config']['rate_hz']:g} Hz, {report['config']['seconds']:g} s",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``lmm-fusion load``."""
    p.add_argument("--seconds", type=float, default=60.0, help="time under load [s] (soak: 600)")
    p.add_argument("--rate-hz", type=float, default=10.0, help="node cycle rate [Hz]")
    p.add_argument("--image", default="1280x720", help="camera WxH (rgb8)")
    p.add_argument("--points", type=int, default=120_000, help="LiDAR points per scan")
    p.add_argument("--camera-hz", type=float, default=20.0)
    p.add_argument("--lidar-hz", type=float, default=10.0)
    p.add_argument("--backend", default="onnxruntime", help="node backend parameter")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds excluded from memory growth [s]")
    p.add_argument(
        "--transport",
        choices=("shm", "large_data", "default"),
        default="shm",
        help="Fast DDS transports for node and publisher (see run_load)",
    )
    p.add_argument("--out", default="out/load", help="folder for load.json, rss.png and logs")


def run(args: argparse.Namespace) -> int:
    """``lmm-fusion load``: run the load, write load.json and rss.png, print the report without the RSS series."""
    w, h = (int(v) for v in args.image.lower().split("x"))
    out = Path(args.out)
    report = run_load(
        args.seconds,
        args.rate_hz,
        w,
        h,
        args.points,
        args.camera_hz,
        args.lidar_hz,
        args.backend,
        out,
        min(args.warmup, args.seconds / 2),
        args.transport,
    )
    plot_rss(report, out / "rss.png")
    brief = {k: v for k, v in report.items() if k != "node_process"}
    brief["node_process"] = {k: v for k, v in report["node_process"].items() if k != "rss_mib_series"}
    print(json.dumps(brief, indent=2))
    return 0


def publisher_main(argv: list[str]) -> int:
    """``python -m lmm_fusion.tools.loadtest DOMAIN W H POINTS CAMERA_HZ LIDAR_HZ``: publish until SIGINT, then
    print one JSON line with the counts and publish times (read back by :func:`run_load`)."""
    domain, w, h, n = (int(v) for v in argv[:4])
    cam_hz, lidar_hz = float(argv[4]), float(argv[5])
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pub = SensorPublisher.on_domain(domain, synthetic_image(w, h), padded_cloud_array(synthetic_points(n)),
                                    {"camera": cam_hz, "lidar": lidar_hz, "gnss": GNSS_HZ},
                                    node_name="lmm_fusion_load_publisher")
    pub.start()
    t0 = time.monotonic()
    stop.wait()
    seconds = time.monotonic() - t0
    pub.close()
    print(
        json.dumps(
            {
                "sent": pub.sent,
                "seconds": seconds,
                "publish_ms": {k: _percentiles(v) for k, v in pub.publish_ms.items()},
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(publisher_main(sys.argv[1:]))
