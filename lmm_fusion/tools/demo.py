"""``lmm-fusion demo``: synthesise a drive, run the real node on it over DDS, summarise.

Steps: (1) :func:`lmm_fusion.synth.drive.synthesize` writes a ~60 s drive covering the scenario
families as a rosbag2 with ground truth; (2) the fusion node (``python -m lmm_fusion.ros.node``) and the
bag player (``lmm-fusion play --clock``) start as real subprocesses on loopback DDS (a random
``ROS_DOMAIN_ID``, ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``), the node on sim time; (3) this
process subscribes to the node's outputs, ``/diagnostics`` and ``/ground_truth/*``; (4) it prints a
summary — per-scenario action and risk accuracy against ground truth matched by stamp, achieved rate,
latency p50/p99 — and leaves everything in one folder (default ``out/demo``): the bag, ``outputs.jsonl``,
``summary.json`` and the process logs. Exit status 1 when the node produced nothing.

The process and DDS helpers here (:func:`loopback_env`, :class:`Processes`, :class:`OutputCollector`)
are also what the integration tests use.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmm_fusion.base import topics
from lmm_fusion.ros.dds import PROFILE_VARS, use_large_data_profile

log = logging.getLogger(__name__)

NODE_NS = "/fusion_node"


# ---------------------------------------------------------------- processes on loopback DDS
def loopback_env(domain_id: int | None = None) -> dict[str, str]:
    """Environment for processes that must only talk to each other: a random domain id (1..101,
    valid on every OS) and discovery limited to this host."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(domain_id if domain_id is not None else random.randint(1, 101))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_STATIC_PEERS", None)
    env.pop("ROS_LOCALHOST_ONLY", None)  # deprecated in Jazzy; conflicts with the range above
    env["PYTHONUNBUFFERED"] = "1"
    # Shared memory sized for whole full-size samples (config/fastdds_large_data.xml): with Fast DDS's
    # default UDP fragments most multi-MB clouds and images are lost under the sensor-data QoS.
    use_large_data_profile(env)
    return env


def use_env_here(env: dict[str, str]) -> int:
    """Apply the DDS variables of ``env`` to this process (before ``rclpy.init``); returns the domain id."""
    for key in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", *PROFILE_VARS):
        if key in env:
            os.environ[key] = env[key]
    os.environ.pop("ROS_LOCALHOST_ONLY", None)
    return int(env["ROS_DOMAIN_ID"])


def node_command(*ros_params: str, params_file: Path | None = None) -> list[str]:
    """argv that starts the fusion node with ``-p NAME:=VALUE`` parameters."""
    cmd = [sys.executable, "-m", "lmm_fusion.ros.node", "--ros-args"]
    if params_file is not None:
        cmd += ["--params-file", str(params_file)]
    for p in ros_params:
        cmd += ["-p", p]
    return cmd


class Processes:
    """Subprocesses started by this process, each in its own session; :meth:`stop_all` ends exactly
    those (SIGINT, then SIGTERM, then SIGKILL of their process groups) with bounded waits."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[Any] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        f = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
        self._files.append(f)
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log_text(self, name: str) -> str:
        p = self.log_dir / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self, name: str, timeout: float = 10.0) -> int | None:
        proc = self.procs.get(name)
        if proc is None:
            return None
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        return proc.poll()

    def stop_all(self, timeout: float = 10.0) -> None:
        for name in list(self.procs):
            self.stop(name, timeout)
        for f in self._files:
            f.close()
        self._files = []


def wait_until(pred: Callable[[], bool], timeout: float, period: float = 0.05) -> bool:
    """Poll ``pred`` until true or ``timeout`` [s]; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(period)
    return pred()


def _stamp(msg: Any) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def scene_record(msg: Any) -> dict[str, Any]:
    def num(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    return {"stamp": _stamp(msg), "frame_id": msg.header.frame_id, "valid": bool(msg.valid),
            "degraded": bool(msg.degraded), "risk": int(msg.risk_level),
            "risk_probabilities": [float(p) for p in msg.risk_probabilities], "ttc": num(msg.time_to_collision),
            "distance": num(msg.nearest_obstacle_distance), "light": int(msg.traffic_light_state),
            "modalities": [{"name": m.name, "used": bool(m.used), "age": num(m.age),
                            "attention": float(m.attention_share)} for m in msg.modalities]}


def action_record(msg: Any) -> dict[str, Any]:
    return {"stamp": _stamp(msg), "frame_id": msg.header.frame_id, "action": int(msg.action),
            "target_speed": float(msg.target_speed), "confidence": float(msg.confidence),
            "safety_override": bool(msg.safety_override), "rationale": msg.rationale}


def diagnostics_record(msg: Any) -> dict[str, Any]:
    from lmm_fusion.ros.outputs import level_of

    return {"stamp": _stamp(msg), "status": {s.name: {"level": level_of(s), "message": s.message,
                                                       "values": {kv.key: kv.value for kv in s.values}}
                                             for s in msg.status}}


class OutputCollector:
    """Subscribes (in this process, on its own rclpy context and domain) to the node's outputs,
    ``/diagnostics`` and the ground truth; records each message as a dict with ``recv`` (monotonic
    arrival time [s]). Spins in a background thread; :meth:`close` stops it."""

    def __init__(self, domain_id: int, node_ns: str = NODE_NS, ground_truth: bool = True,
                 extra: Callable[[Any], None] | None = None) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        from lmm_fusion.io.msgtypes import rclpy_types

        self.ctx = Context()
        rclpy.init(context=self.ctx, domain_id=domain_id)
        self.node = rclpy.create_node(f"lmm_fusion_collector_{os.getpid()}", context=self.ctx)
        self.records: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._lock = threading.Lock()
        t = rclpy_types()
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        subs: list[tuple[Any, str, str, Callable[[Any], dict[str, Any]]]] = [
            (t.SceneAssessment, f"{node_ns}/scene_assessment", "scene", scene_record),
            (t.ActionSuggestion, f"{node_ns}/action_suggestion", "action", action_record),
            (t.DiagnosticArray, "/diagnostics", "diagnostics", diagnostics_record),
            (t.OccupancyGrid, f"{node_ns}/occupancy", "occupancy",
             lambda m: {"stamp": _stamp(m), "frame_id": m.header.frame_id, "width": m.info.width,
                        "height": m.info.height, "n": len(m.data)}),
            (t.MarkerArray, f"{node_ns}/markers", "markers",
             lambda m: {"n": len(m.markers), "ns": sorted({mk.ns for mk in m.markers}),
                        "frame_id": m.markers[0].header.frame_id if m.markers else ""}),
        ]
        if ground_truth:
            subs += [
                (t.SceneAssessment, topics.GT_SCENE, "gt_scene", scene_record),
                (t.ActionSuggestion, topics.GT_ACTION, "gt_action", action_record),
                (t.String, topics.GT_SCENARIO, "gt_scenario", lambda m: {"scenario": m.data}),
            ]
        self._subs = [self.node.create_subscription(cls, topic, self._cb(key, conv), qos)
                      for cls, topic, key, conv in subs]
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _cb(self, key: str, conv: Callable[[Any], dict[str, Any]]) -> Callable[[Any], None]:
        def cb(msg: Any) -> None:
            rec = conv(msg)
            rec["recv"] = time.monotonic()
            with self._lock:
                self.records[key].append(rec)
        return cb

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            while self.ctx.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except (ExternalShutdownException, Exception):  # the context was shut down while spinning
            pass

    def get(self, key: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.records[key])

    def count(self, key: str) -> int:
        with self._lock:
            return len(self.records[key])

    def clear(self) -> None:
        with self._lock:
            self.records.clear()

    def close(self) -> None:
        import rclpy

        rclpy.try_shutdown(context=self.ctx)
        self._thread.join(timeout=5.0)
        try:
            self.executor.shutdown(timeout_sec=1.0)
            self.node.destroy_node()
        except Exception:  # already torn down with the context
            pass


# ---------------------------------------------------------------- summary
def _match(stamps: np.ndarray, t: float, tol: float) -> int | None:
    """Index of the latest ground-truth stamp <= t (within ``tol`` s), else None."""
    i = int(np.searchsorted(stamps, t + 1e-6, side="right")) - 1
    if i < 0 or t - stamps[i] > tol:
        return None
    return i


def summarise(outputs: dict[str, list[dict[str, Any]]], scenario_at: dict[float, str],
              tol: float = 0.25) -> dict[str, Any]:
    """Accuracy per scenario (node output vs the ground truth label with the latest stamp <= the
    output stamp, within ``tol`` s), rates and latencies."""
    scenes = sorted(outputs.get("scene", []), key=lambda r: r["stamp"])
    actions = sorted(outputs.get("action", []), key=lambda r: r["stamp"])
    gt_scene = sorted(outputs.get("gt_scene", []), key=lambda r: r["stamp"])
    gt_action = sorted(outputs.get("gt_action", []), key=lambda r: r["stamp"])
    gs = np.array([r["stamp"] for r in gt_scene])
    ga = np.array([r["stamp"] for r in gt_action])
    sc_stamps = np.array(sorted(scenario_at))
    sc_names = [scenario_at[s] for s in sc_stamps]
    per: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def scenario_of(t: float) -> str:
        j = _match(sc_stamps, t, tol) if sc_stamps.size else None
        return sc_names[j] if j is not None else "UNLABELLED"

    for r in scenes:
        if not r["valid"]:
            continue
        i = _match(gs, r["stamp"], tol) if gs.size else None
        if i is None:
            continue
        p = per[scenario_of(r["stamp"])]
        p["risk_n"] += 1
        p["risk_ok"] += int(r["risk"] == gt_scene[i]["risk"])
        p["degraded"] += int(r["degraded"])
    for r in actions:
        i = _match(ga, r["stamp"], tol) if ga.size else None
        if i is None:
            continue
        p = per[scenario_of(r["stamp"])]
        p["action_n"] += 1
        p["action_ok"] += int(r["action"] == gt_action[i]["action"])
        p["override"] += int(r["safety_override"])
    table = {}
    for name in sorted(per):
        p = per[name]
        table[name] = {"cycles": p["action_n"],
                       "action_accuracy": p["action_ok"] / p["action_n"] if p["action_n"] else None,
                       "risk_accuracy": p["risk_ok"] / p["risk_n"] if p["risk_n"] else None,
                       "safety_overrides": p["override"], "degraded_cycles": p["degraded"]}
    tot_a = sum(per[n]["action_n"] for n in per)
    tot_r = sum(per[n]["risk_n"] for n in per)
    overall = {"action_accuracy": sum(per[n]["action_ok"] for n in per) / tot_a if tot_a else None,
               "risk_accuracy": sum(per[n]["risk_ok"] for n in per) / tot_r if tot_r else None,
               "matched_cycles": tot_a}
    rate_wall = rate_sim = None
    if len(scenes) > 1:
        recv = [r["recv"] for r in scenes]
        rate_wall = (len(scenes) - 1) / max(max(recv) - min(recv), 1e-9)
        rate_sim = (len(scenes) - 1) / max(scenes[-1]["stamp"] - scenes[0]["stamp"], 1e-9)
    totals, node_p = [], {}
    for d in outputs.get("diagnostics", []):
        for name, st in d["status"].items():
            if name.endswith(": assessment") and "total_ms" in st["values"]:
                totals.append(float(st["values"]["total_ms"]))
            if name.endswith(": cycle"):
                node_p = st["values"]
    lat = {}
    if totals:
        lat = {"pipeline_p50_ms": float(np.percentile(totals, 50)), "pipeline_p99_ms": float(np.percentile(totals, 99))}
    if node_p:
        lat.update({"cycle_p50_ms": float(node_p.get("latency_p50_ms", "nan")),
                    "cycle_p99_ms": float(node_p.get("latency_p99_ms", "nan")),
                    "deadline_misses": int(node_p.get("deadline_misses", "0"))})
    valid = sum(r["valid"] for r in scenes)
    return {"assessments": len(scenes), "valid": valid, "degraded": sum(r["degraded"] for r in scenes),
            "actions": len(actions), "diagnostics": len(outputs.get("diagnostics", [])),
            "ground_truth": {"scene": len(gt_scene), "action": len(gt_action)},
            "rate_hz_wall": rate_wall, "rate_hz_sim": rate_sim, "latency": lat, "overall": overall,
            "per_scenario": table}


def format_summary(s: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "  n/a" if x is None else f"{100 * x:5.1f}%"

    lines = [f"assessments: {s['assessments']} ({s['valid']} valid, {s['degraded']} degraded), "
             f"actions: {s['actions']}, diagnostics: {s['diagnostics']}"]
    if s["rate_hz_wall"] is not None:
        lines.append(f"achieved rate: {s['rate_hz_wall']:.2f} Hz wall, {s['rate_hz_sim']:.2f} Hz sim time")
    lat = s["latency"]
    if lat:
        lines.append("latency: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in lat.items()))
    lines.append(f"{'scenario':32s} {'cycles':>6s} {'action':>7s} {'risk':>7s} {'override':>8s}")
    for name, r in s["per_scenario"].items():
        lines.append(f"{name:32s} {r['cycles']:6d} {pct(r['action_accuracy']):>7s} {pct(r['risk_accuracy']):>7s} "
                     f"{r['safety_overrides']:8d}")
    o = s["overall"]
    lines.append(f"{'overall':32s} {o['matched_cycles']:6d} {pct(o['action_accuracy']):>7s} "
                 f"{pct(o['risk_accuracy']):>7s}")
    return "\n".join(lines)


def scenario_labels(bag: Path) -> dict[float, str]:
    """Bag time [s] -> scenario name of every ``/ground_truth/scenario`` message (String has no header;
    the bag time equals the LiDAR stamp it labels)."""
    from lmm_fusion.io.bags import read_bag

    return {m.stamp_sec: m.msg.data for m in read_bag(bag, topics=[topics.GT_SCENARIO])}


# ---------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    parser.add_argument("--duration", type=float, default=60.0, help="drive length [s] (default 60)")
    parser.add_argument("--seed", type=int, default=7, help="random seed of the synthetic drive")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("--bag", type=Path, default=None, help="use this bag instead of synthesising one")
    parser.add_argument("--model-dir", default="", help="model folder (default: the shipped model)")
    parser.add_argument("--backend", default="auto", help="auto | torch | onnxruntime | tensorrt")
    parser.add_argument("--rate-hz", type=float, default=10.0, help="node cycle rate [Hz]")
    # Defaults match the shipped model's training data (640x360 JPEG camera, 64x2048 LiDAR): a sparser LiDAR
    # changes the BEV density channel the model learned, and its accuracy with it.
    parser.add_argument("--camera", default="640x360", help="synthetic camera size WxH (JPEG; default 640x360)")
    parser.add_argument("--lidar-beams", type=int, default=64, help="synthetic LiDAR beams (default 64)")
    parser.add_argument("--lidar-columns", type=int, default=2048, help="synthetic LiDAR columns (default 2048)")


def synthesise(out: Path, duration: float, seed: int, camera: tuple[int, int], lidar_beams: int,
               lidar_columns: int) -> Path:
    """Write the demo drive to ``out/drive`` with :func:`lmm_fusion.synth.drive.synthesize`: every scenario
    family, a JPEG camera and the LiDAR of the shipped model's training data."""
    from lmm_fusion.synth.drive import rig_from_args, synthesize

    bag = out / "drive"
    if bag.exists():
        import shutil

        shutil.rmtree(bag)
    rig = rig_from_args(camera=camera, lidar_beams=lidar_beams, lidar_columns=lidar_columns)
    return Path(synthesize(bag, duration, seed, rig=rig, compressed=True, progress=False))


def run(args: argparse.Namespace) -> int:
    from lmm_fusion.base.paths import find_shared
    from lmm_fusion.io.bags import bag_counts

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    if args.bag is None:
        print(f"[demo] synthesising a {args.duration:g} s drive (seed {args.seed}) ...", flush=True)
        w, h = (int(v) for v in args.camera.lower().split("x"))
        bag = synthesise(out, args.duration, args.seed, (w, h), args.lidar_beams, args.lidar_columns)
    else:
        bag = args.bag
    counts = bag_counts(bag)
    transport = "compressed" if topics.CAMERA_COMPRESSED in counts else "raw"
    print(f"[demo] bag {bag}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
    env = loopback_env()
    domain = use_env_here(env)
    procs = Processes(out)
    collector: OutputCollector | None = None
    try:
        params = [f"rate_hz:={args.rate_hz}", "use_sim_time:=true", f"backend:={args.backend}",
                  "threads:=1", f"camera_transport:={transport}"]
        if args.model_dir:  # an empty override cannot be written on the command line
            params.append(f"model_dir:={args.model_dir}")
        procs.start("node", node_command(*params, params_file=find_shared("config/fusion.yaml")), env)
        collector = OutputCollector(domain)
        print(f"[demo] node started (ROS_DOMAIN_ID={domain}, loopback); waiting for its subscriptions ...",
              flush=True)
        ready = wait_until(lambda: collector.node.count_subscribers(topics.LIDAR_POINTS) > 0
                           or procs.procs["node"].poll() is not None, timeout=120.0)
        if not ready or procs.procs["node"].poll() is not None:
            print("[demo] the node did not come up; its log:\n" + procs.log_text("node")[-3000:], flush=True)
            return 1
        player = procs.start("player", [sys.executable, "-m", "lmm_fusion.cli", "play", str(bag), "--clock",
                                        "--rate", str(args.rate), "--wait-for-subscriber", "10"], env)
        print("[demo] playing the drive at its recorded pace ...", flush=True)
        bag_len = max(args.duration, 1.0) / args.rate
        try:
            player.wait(timeout=bag_len + 120.0)
        except subprocess.TimeoutExpired:
            print("[demo] the player did not finish in time; stopping it", flush=True)
        wait_until(lambda: False, 1.0)  # let the last outputs arrive
    finally:
        procs.stop_all()
        records = {k: collector.get(k) for k in list(collector.records)} if collector is not None else {}
        if collector is not None:
            collector.close()
    scenarios = scenario_labels(bag) if topics.GT_SCENARIO in counts else {}
    with open(out / "outputs.jsonl", "w") as f:
        for key in ("scene", "action", "diagnostics", "gt_scene", "gt_action"):
            for r in records.get(key, []):
                f.write(json.dumps({"topic": key, **r}) + "\n")
    summary = summarise(records, scenarios)
    summary["bag"] = str(bag)
    summary["wall_time_s"] = time.monotonic() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"[demo] outputs in {out}/ (bag, outputs.jsonl, summary.json, node.log, player.log); "
          f"{summary['wall_time_s']:.0f} s", flush=True)
    if summary["assessments"] == 0:
        print("[demo] the node produced no assessments; node log tail:\n" + procs.log_text("node")[-3000:])
        return 1
    return 0


__all__ = ["OutputCollector", "Processes", "loopback_env", "node_command", "run", "summarise",
           "use_env_here", "wait_until"]
