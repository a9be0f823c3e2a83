"""``lmm-fusion demo``: synthesise a drive, run the real node on it over DDS, summarise.

Steps: (1) :func:`lmm_fusion.synth.drive.synthesize` writes a ~60 s drive covering the scenario
families as a rosbag2 with ground truth; (2) the fusion node (``python -m lmm_fusion.ros.node``) and the
bag player (``lmm-fusion play --clock``) start as real subprocesses on loopback DDS (a random
``ROS_DOMAIN_ID``, ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``), the node on sim time; (3) this
process subscribes to the node's outputs, ``/diagnostics`` and ``/ground_truth/*``; (4) it prints a
summary — per-scenario action and risk accuracy against ground truth matched by stamp, achieved rate,
latency p50/p99; first, at a glance, the model's and the published (guarded) agreement with the expert,
the unsafe rate (published actions less cautious than the expert's) and the families below target — and
leaves everything in one folder (default ``out/demo``): the bag, ``outputs.jsonl``,
``summary.json`` and the process logs. Exit status 1 when the node produced nothing.

The node, its output collector and the loopback domain are :class:`lmm_fusion.tools.harness.NodeHarness`,
the same harness the load test and the integration tests use.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmm_fusion.base import topics
from lmm_fusion.base.paths import find_shared
from lmm_fusion.groundtruth.scoring import NO_LABEL, Columns, group_indices, score_arrays
from lmm_fusion.io.bags import bag_counts, read_bag
from lmm_fusion.offline.fresh import FAMILY_TARGET, TARGETS
from lmm_fusion.runtime.base import BACKENDS
from lmm_fusion.synth.drive import rig_from_args, synthesize
from lmm_fusion.tools.harness import NodeHarness, wait_until

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- summary
def _match(stamps: np.ndarray, t: float, tol: float) -> int | None:
    """Index of the latest ground-truth stamp <= t (within ``tol`` s), else None."""
    i = int(np.searchsorted(stamps, t + 1e-6, side="right")) - 1
    if i < 0 or t - stamps[i] > tol:
        return None
    return i


#: Published agreement and unsafe-rate targets of the summary (those of ``lmm-fusion eval --fresh``).
OVERALL_TARGET = next(t.threshold for t in TARGETS if t.key == "published_action_accuracy")
UNSAFE_TARGET = next(t.threshold for t in TARGETS if t.key == "published_unsafe_rate")


def _model_action(r: dict[str, Any]) -> int:
    """The network's own action of an ``ActionSuggestion`` record: the arg-max of its probabilities, which
    the guard leaves as the model gave them (NO_LABEL when the record has none)."""
    probs = r.get("action_probabilities")
    return int(np.argmax(probs)) if probs is not None and len(probs) else NO_LABEL


def summarise(outputs: dict[str, list[dict[str, Any]]], scenario_at: dict[float, str],
              tol: float = 0.25) -> dict[str, Any]:
    """Accuracy per scenario (node output vs the ground truth label with the latest stamp <= the
    output stamp, within ``tol`` s; scored by :mod:`lmm_fusion.groundtruth.scoring`), rates and latencies.

    Each matched action is one scored sample (its published action, and the model's own before the guard
    when the records carry the probabilities), each matched valid scene another (its risk); ``cycles``
    counts the matched actions. ``overall`` and each family also hold the unsafe and over-cautious rates
    (:func:`~lmm_fusion.groundtruth.scoring.caution_rates`); ``below_target`` lists the families whose
    published agreement is below :data:`~lmm_fusion.offline.fresh.FAMILY_TARGET`.
    """
    scenes = sorted(outputs.get("scene", []), key=lambda r: r["stamp"])
    actions = sorted(outputs.get("action", []), key=lambda r: r["stamp"])
    gt_scene = sorted(outputs.get("gt_scene", []), key=lambda r: r["stamp"])
    gt_action = sorted(outputs.get("gt_action", []), key=lambda r: r["stamp"])
    gs = np.array([r["stamp"] for r in gt_scene])
    ga = np.array([r["stamp"] for r in gt_action])
    sc_stamps = np.array(sorted(scenario_at))
    sc_names = [scenario_at[s] for s in sc_stamps]

    def scenario_of(t: float) -> str:
        j = _match(sc_stamps, t, tol) if sc_stamps.size else None
        return sc_names[j] if j is not None else "UNLABELLED"

    # One scored row per matched output: a valid scene scores its risk, an action its action; the other
    # field of the row has no label. Per row: family, (predicted, true) codes, is an action, override, degraded.
    family: list[str] = []
    codes: dict[str, list[tuple[int, int]]] = {"action": [], "risk": []}
    model_codes: list[int] = []
    flags: list[tuple[bool, bool, bool]] = []
    for r in scenes:
        i = _match(gs, r["stamp"], tol) if gs.size and r["valid"] else None
        if i is not None:
            family.append(scenario_of(r["stamp"]))
            codes["risk"].append((r["risk"], gt_scene[i]["risk"]))
            codes["action"].append((NO_LABEL, NO_LABEL))
            model_codes.append(NO_LABEL)
            flags.append((False, False, bool(r["degraded"])))
    for r in actions:
        i = _match(ga, r["stamp"], tol) if ga.size else None
        if i is not None:
            family.append(scenario_of(r["stamp"]))
            codes["action"].append((r["action"], gt_action[i]["action"]))
            codes["risk"].append((NO_LABEL, NO_LABEL))
            model_codes.append(_model_action(r))
            flags.append((True, bool(r["safety_override"]), False))
    pt = {f: np.array(c, np.int64).reshape(-1, 2) for f, c in codes.items()}
    pred = {f: c[:, 0] for f, c in pt.items()}
    is_action, override, degraded = np.array(flags, bool).reshape(-1, 3).T
    model = np.array(model_codes, np.int64)
    if is_action.any() and (model[is_action] != NO_LABEL).all():  # the model's action is known for every row
        pred["model_action"] = model
    cols = Columns(pred=pred, true={f: c[:, 1] for f, c in pt.items()})

    def rates(t: dict[str, Any]) -> dict[str, Any]:
        return {k: t[k] for k in ("action_accuracy", "model_action_accuracy", "action_unsafe_rate",
                                  "model_action_unsafe_rate", "action_over_cautious_rate", "risk_accuracy")}

    table = {}
    for name, idx in group_indices(family).items():
        t = score_arrays(cols.take(idx))
        table[name] = {"cycles": int(is_action[idx].sum()), **rates(t),
                       "safety_overrides": int(override[idx].sum()), "degraded_cycles": int(degraded[idx].sum())}
    t = score_arrays(cols)
    overall = {**rates(t), "matched_cycles": int(is_action.sum())}
    below = {name: r["action_accuracy"] for name, r in table.items()
             if r["action_accuracy"] is not None and r["action_accuracy"] < FAMILY_TARGET}
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
            "per_scenario": table, "below_target": below}


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}%"


def headline(s: dict[str, Any]) -> list[str]:
    """The truth at a glance: model vs published agreement, the unsafe rate, the families below target."""
    o = s["overall"]
    acc, unsafe = o["action_accuracy"], o["action_unsafe_rate"]
    verdict = ("n/a" if acc is None or unsafe is None else
               "PASS" if acc >= OVERALL_TARGET and unsafe <= UNSAFE_TARGET and not s["below_target"] else "FAIL")
    model = _pct(o["model_action_accuracy"]).strip()
    lines = [f"agreement with the expert: published {_pct(acc).strip()}, model alone {model}"
             f" (target: published >= {100 * OVERALL_TARGET:.0f}%, every family >= {100 * FAMILY_TARGET:.0f}%)",
             f"unsafe (less cautious than the expert): published {_pct(unsafe).strip()}, model alone "
             f"{_pct(o['model_action_unsafe_rate']).strip()} (target <= {100 * UNSAFE_TARGET:g}%); over-cautious "
             f"published {_pct(o['action_over_cautious_rate']).strip()}"]
    below = s["below_target"]
    lines.append("families below target: " + (", ".join(f"{k} {_pct(v).strip()}" for k, v in below.items())
                                              if below else "none") + f"  [{verdict}]")
    return lines


def format_summary(s: dict[str, Any]) -> str:
    pct = _pct
    lines = [*headline(s), f"assessments: {s['assessments']} ({s['valid']} valid, {s['degraded']} degraded), "
             f"actions: {s['actions']}, diagnostics: {s['diagnostics']}"]
    if s["rate_hz_wall"] is not None:
        lines.append(f"achieved rate: {s['rate_hz_wall']:.2f} Hz wall, {s['rate_hz_sim']:.2f} Hz sim time")
    lat = s["latency"]
    if lat:
        lines.append("latency: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in lat.items()))
    lines.append(f"{'scenario':32s} {'cycles':>6s} {'action':>7s} {'model':>7s} {'unsafe':>7s} {'risk':>7s} "
                 f"{'override':>8s}")
    for name, r in s["per_scenario"].items():
        lines.append(f"{name:32s} {r['cycles']:6d} {pct(r['action_accuracy']):>7s} "
                     f"{pct(r['model_action_accuracy']):>7s} {pct(r['action_unsafe_rate']):>7s} "
                     f"{pct(r['risk_accuracy']):>7s} {r['safety_overrides']:8d}")
    o = s["overall"]
    lines.append(f"{'overall':32s} {o['matched_cycles']:6d} {pct(o['action_accuracy']):>7s} "
                 f"{pct(o['model_action_accuracy']):>7s} {pct(o['action_unsafe_rate']):>7s} "
                 f"{pct(o['risk_accuracy']):>7s}")
    return "\n".join(lines)


def scenario_labels(bag: Path) -> dict[float, str]:
    """Bag time [s] -> scenario name of every ``/ground_truth/scenario`` message (String has no header;
    the bag time equals the LiDAR stamp it labels)."""
    return {m.stamp_sec: m.msg.data for m in read_bag(bag, topics=[topics.GT_SCENARIO])}


# ---------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    parser.add_argument("--duration", type=float, default=60.0, help="drive length [s] (default 60)")
    parser.add_argument("--seed", type=int, default=7, help="random seed of the synthetic drive")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("--bag", type=Path, default=None, help="use this bag instead of synthesising one")
    parser.add_argument("--model-dir", default="", help="model folder (default: the shipped model)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="inference backend (default auto)")
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
    bag = out / "drive"
    if bag.exists():
        shutil.rmtree(bag)
    rig = rig_from_args(camera=camera, lidar_beams=lidar_beams, lidar_columns=lidar_columns)
    return Path(synthesize(bag, duration, seed, rig=rig, compressed=True, progress=False))


def run(args: argparse.Namespace) -> int:
    """``lmm-fusion demo``: exit status 0, or 1 when the node did not come up or produced nothing."""
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
    params = [f"rate_hz:={args.rate_hz}", "use_sim_time:=true", f"backend:={args.backend}",
              "threads:=1", f"camera_transport:={transport}"]
    if args.model_dir:  # an empty override cannot be written on the command line
        params.append(f"model_dir:={args.model_dir}")
    harness = NodeHarness(out, params, params_file=find_shared("config/fusion.yaml"), ground_truth=True)
    procs = harness.procs
    try:
        print(f"[demo] node started (ROS_DOMAIN_ID={harness.domain}, loopback); waiting for its subscriptions ...",
              flush=True)
        if not harness.wait_subscribed(timeout=120.0):
            print("[demo] the node did not come up; its log:\n" + harness.log(), flush=True)
            return 1
        player = procs.start("player", [sys.executable, "-m", "lmm_fusion.cli", "play", str(bag), "--clock",
                                        "--rate", str(args.rate), "--wait-for-subscriber", "10"], harness.env)
        print("[demo] playing the drive at its recorded pace ...", flush=True)
        bag_len = max(args.duration, 1.0) / args.rate
        try:
            player.wait(timeout=bag_len + 120.0)
        except subprocess.TimeoutExpired:
            print("[demo] the player did not finish in time; stopping it", flush=True)
        wait_until(lambda: False, 1.0)  # let the last outputs arrive
    finally:
        procs.stop_all()
        records = harness.outputs.all()
        harness.close()
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


__all__ = ["add_arguments", "format_summary", "headline", "run", "scenario_labels", "summarise", "synthesise"]
