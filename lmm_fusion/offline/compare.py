"""``lmm-fusion compare OLD_MODEL NEW_MODEL BAG...``: the regression report to read before shipping a model.

Both models replay every bag (the fleet replay of :mod:`lmm_fusion.offline.fleet`: one task per bag and
model, on Ray with ``--ray [ADDRESS]``, else one after another here) into ``DIR/old/`` and ``DIR/new/``, each
with its own ``fleet.json`` / ``fleet.md``. The cycles of a bag happen at the same bag times for both models
(cycles follow bag time, not the machine), so they pair one to one, and ``DIR/compare.json`` +
``DIR/compare.md`` report:

* overall and per scenario family: cycles, how often the published action and the risk level differ, each
  model's agreement with the ground truth (action and risk accuracy) and unsafe rate (published action less
  cautious than the expert's, :func:`~lmm_fusion.offline.fleet.score_table`), and the cycles the new model
  *broke* (old right, new wrong) and *fixed* (old wrong, new right), *new unsafe* (new less cautious than the
  expert where the old one was not);
* the worst disagreements (:func:`worst_disagreements`): new unsafe first, then the largest step in action
  severity, in risk, in target speed; at most ``--keyframes`` of them, at least ``MIN_GAP_S`` apart within a
  bag, each rendered as a key frame ``DIR/keyframes/<bag>_<t>s.png``: the old model's frame
  (:func:`~lmm_fusion.offline.render.compose_frame`) above the new model's, at that cycle. Rendering replays
  only the bags that hold one, with both models, keeping the snapshot and assessments of those cycles.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lmm_fusion.base.vocabulary import Action, Risk
from lmm_fusion.cycle.assessment import Assessment
from lmm_fusion.cycle.pipeline import FusionPipeline
from lmm_fusion.cycle.sync import Snapshot
from lmm_fusion.groundtruth.messages import GroundTruth
from lmm_fusion.groundtruth.scoring import caution_levels, group_indices
from lmm_fusion.offline import fleet
from lmm_fusion.offline import replay as rp
from lmm_fusion.offline.render import compose_frame
from lmm_fusion.runtime.base import BACKENDS

log = logging.getLogger(__name__)

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
KEYFRAME_DIR = "keyframes"
#: Key frames of one bag are at least this far apart in bag time [s] (one event, one frame).
MIN_GAP_S = 1.0
DEFAULT_KEYFRAMES = 6


# ---------------------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class Disagreement:
    """One cycle where the models differ: bag, bag time ``t`` [s] (``rel_t`` since the bag's first cycle),
    family, both models' action / risk / target speed [m/s], the truth where known, and the ranking key."""

    bag: str
    t: float
    rel_t: float
    scenario: str | None
    old_action: int
    new_action: int
    old_risk: int
    new_risk: int
    old_speed: float
    new_speed: float
    true_action: int | None
    true_risk: int | None
    new_unsafe: bool
    key: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        def act(a: int | None) -> str | None:
            return None if a is None or a < 0 else Action(a).name

        def risk(r: int | None) -> str | None:
            return None if r is None or r < 0 else Risk(r).name

        return {"bag": self.bag, "t": round(self.t, 3), "rel_t": round(self.rel_t, 3), "scenario": self.scenario,
                "old": {"action": act(self.old_action), "risk": risk(self.old_risk),
                        "target_speed": round(self.old_speed, 2)},
                "new": {"action": act(self.new_action), "risk": risk(self.new_risk),
                        "target_speed": round(self.new_speed, 2)},
                "truth": {"action": act(self.true_action), "risk": risk(self.true_risk)},
                "new_unsafe": self.new_unsafe}


def _rate(mask: np.ndarray) -> float | None:
    return round(float(mask.mean()), 4) if len(mask) else None


def pair_table(old: fleet.CycleTable, new: fleet.CycleTable) -> dict[str, Any]:
    """Per-cycle comparison arrays of one bag: ``action_differs``, ``risk_differs``, ``broke`` / ``fixed``
    (action against the truth), ``new_unsafe``; raises ValueError when the cycles do not pair."""
    if len(old) != len(new) or not np.array_equal(old.t, new.t):
        raise ValueError(f"cycles do not pair: {len(old)} old, {len(new)} new cycles at different bag times")
    po, pn, true = old.columns.pred, new.columns.pred, old.columns.true
    labelled = true["action"] >= 0
    old_ok, new_ok = po["action"] == true["action"], pn["action"] == true["action"]
    sev_true = caution_levels(true["action"])
    new_unsafe = labelled & (caution_levels(pn["action"]) < sev_true)
    old_unsafe = labelled & (caution_levels(po["action"]) < sev_true)
    return {
        "action_differs": po["action"] != pn["action"],
        "risk_differs": po["risk"] != pn["risk"],
        "broke": labelled & old_ok & ~new_ok,
        "fixed": labelled & ~old_ok & new_ok,
        "new_unsafe": new_unsafe & ~old_unsafe,
    }


def _group_summary(old: fleet.CycleTable, new: fleet.CycleTable, pairs: dict[str, np.ndarray],
                   idx: np.ndarray) -> dict[str, Any]:
    """Disagreement and ground-truth agreement of the cycles ``idx`` (both models' tables over them)."""
    scored = idx[old.scored[idx]]
    return {
        "cycles": len(idx),
        "action_disagreement": _rate(pairs["action_differs"][idx]),
        "risk_disagreement": _rate(pairs["risk_differs"][idx]),
        "broke": int(pairs["broke"][idx].sum()), "fixed": int(pairs["fixed"][idx].sum()),
        "new_unsafe": int(pairs["new_unsafe"][idx].sum()),
        "old": fleet.score_table(old.columns.take(scored)),
        "new": fleet.score_table(new.columns.take(scored)),
    }


def worst_disagreements(bag: str, old: fleet.CycleTable, new: fleet.CycleTable, pairs: dict[str, np.ndarray],
                        limit: int, min_gap_s: float = MIN_GAP_S) -> list[Disagreement]:
    """Up to ``limit`` cycles of the bag where the action or risk differs, worst first: the new model unsafe
    where the old was not, then the largest action-severity step, risk step, target-speed change; cycles
    closer than ``min_gap_s`` to a worse one are skipped."""
    po, pn, true = old.columns.pred, new.columns.pred, old.columns.true
    differs = np.flatnonzero(pairs["action_differs"] | pairs["risk_differs"])
    sev_step = np.abs(caution_levels(pn["action"]) - caution_levels(po["action"]))
    risk_step = np.abs(pn["risk"] - po["risk"])
    speed_step = np.abs(pn["target_speed"] - po["target_speed"])
    t0 = float(old.t[0]) if len(old) else 0.0
    cands = []
    for i in differs:
        key = (float(pairs["new_unsafe"][i]), float(sev_step[i]), float(risk_step[i]), float(speed_step[i]))
        ta, tr = int(true["action"][i]), int(true["risk"][i])
        cands.append(Disagreement(
            bag, float(old.t[i]), float(old.t[i]) - t0, old.scenario[i], int(po["action"][i]), int(pn["action"][i]),
            int(po["risk"][i]), int(pn["risk"][i]), float(po["target_speed"][i]), float(pn["target_speed"][i]),
            ta if ta >= 0 else None, tr if tr >= 0 else None, bool(pairs["new_unsafe"][i]), key))
    cands.sort(key=lambda d: (tuple(-k for k in d.key), d.t))
    chosen: list[Disagreement] = []
    for d in cands:
        if len(chosen) >= limit:
            break
        if all(abs(d.t - c.t) >= min_gap_s for c in chosen):
            chosen.append(d)
    return chosen


# -------------------------------------------------------------------------------------- rendering
def _time_key(t: float) -> int:
    return round(t * 1e6)  # bag times of the same cycle are bit-identical between runs; microseconds for safety


class _Keep:
    """``on_cycle`` hook keeping the assessment (and for ``frames``, the camera image, base-frame LiDAR
    points and ground truth) of the cycles at ``times``."""

    def __init__(self, times: Sequence[float], frames: bool) -> None:
        self.wanted = {_time_key(t) for t in times}
        self.frames = frames
        self.kept: dict[int, tuple[Assessment, Any, np.ndarray | None, GroundTruth | None]] = {}

    def __call__(self, t: float, snapshot: Snapshot, a: Assessment, gt: GroundTruth | None,
                 pipeline: FusionPipeline) -> None:
        k = _time_key(t)
        if k not in self.wanted:
            return
        if self.frames:
            self.kept[k] = (a, snapshot.frames.get("camera"), rp._lidar_in_base(snapshot, pipeline), gt)
        else:
            self.kept[k] = (a, None, None, gt)


def render_disagreements(bag: str, picks: list[dict[str, Any]], old_opts: rp.ReplayOptions,
                         new_opts: rp.ReplayOptions) -> dict[str, bytes]:
    """Replay ``bag`` with both models (outputs to a scratch folder) and render one PNG per pick (``t``,
    ``rel_t``, ``name``): the old model's frame above the new model's. Returns name -> PNG bytes (written by
    the caller: a task may run on another machine)."""
    times = [float(p["t"]) for p in picks]
    old_keep, new_keep = _Keep(times, frames=False), _Keep(times, frames=True)
    with tempfile.TemporaryDirectory(prefix="lmm_fusion_compare_") as scratch:
        for opts, keep, sub in ((old_opts, old_keep, "old"), (new_opts, new_keep, "new")):
            rp.replay(bag, Path(scratch) / sub, replace(opts, on_cycle=keep, progress=False, render=False,
                                                        copy_sensors=False))
    written: dict[str, bytes] = {}
    for p in picks:
        k = _time_key(float(p["t"]))
        if k not in old_keep.kept or k not in new_keep.kept:
            log.warning("compare: no cycle at t=%.3f s of %s to render", p["t"], bag)
            continue
        a_old = old_keep.kept[k][0]
        a_new, rgb, pts, gt = new_keep.kept[k]
        kw = {"vehicle": new_opts.rig.vehicle} if new_opts.rig is not None else {}
        halves = []
        for label, a, opts in (("old", a_old, old_opts), ("new", a_new, new_opts)):
            half = compose_frame(rgb, pts, a, gt, p["rel_t"], **kw)
            # which model: bottom right of the BEV panel, where the panels draw nothing
            cv2.putText(half, f"{label}: {Path(str(opts.model_dir)).name}", (half.shape[1] - 230, half.shape[0] - 12),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
            halves.append(half)
        frame = np.concatenate(halves, axis=0)
        ok, png = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        if ok:
            written[p["name"]] = png.tobytes()
    return written


# ----------------------------------------------------------------------------------------- report
def _keyframe_name(bag_name: str, rel_t: float) -> str:
    return f"{bag_name}_{rel_t:07.2f}s.png"


def compare_models(old_model: Path | str, new_model: Path | str, bags: Sequence[Path | str], out: Path | str,
                   options: rp.ReplayOptions | None = None, *, ray_address: str | None = None,
                   num_cpus: int | None = None, task_cpus: int = 1, max_retries: int = 2,
                   keyframes: int = DEFAULT_KEYFRAMES, progress: bool = False) -> dict[str, Any]:
    """Replay ``bags`` with both models, compare them cycle by cycle and write ``out/compare.json``,
    ``out/compare.md`` and the key frames (see the module docstring); returns the report."""
    if not fleet.is_client(ray_address):
        for m in (old_model, new_model):
            if not Path(m).is_dir():
                raise FileNotFoundError(f"model folder {str(m)!r} does not exist")
    if not bags:
        raise ValueError("bags: need at least one rosbag2 folder")
    paths = [fleet.cluster_path(b, ray_address) for b in bags]
    out = Path(out).resolve()
    replays = fleet.cluster_path(out, ray_address, must_exist=False)  # where the tasks write the replays
    base = options or rp.ReplayOptions()
    base = replace(base, threads=base.threads or task_cpus, progress=False)
    opts = {"old": replace(base, model_dir=fleet.cluster_path(old_model, ray_address)),
            "new": replace(base, model_dir=fleet.cluster_path(new_model, ray_address))}
    names = fleet.output_names(paths)
    bag_ids = [str(b) for b in paths]
    jobs: list[tuple[str, str, rp.ReplayOptions]] = []
    outs: dict[str, list[str]] = {"old": [], "new": []}
    for side in ("old", "new"):
        for bag_id, name in zip(bag_ids, names):
            outs[side].append(str(replays / side / name))
            jobs.append((bag_id, outs[side][-1], opts[side]))
    # One Ray for both stages (replay, then rendering); map_tasks joins the one that is up.
    with fleet.ray_session(ray_address, num_cpus) if ray_address is not None else nullcontext():
        results, timing = fleet.map_tasks(fleet.replay_bag, jobs, ray_address=ray_address, num_cpus=num_cpus,
                                          task_cpus=task_cpus, max_retries=max_retries, progress=progress,
                                          desc="compare replay")
        n = len(paths)
        per_side = {"old": results[:n], "new": results[n:]}
        for side, res in per_side.items():
            side_timing = {**timing, "submit": timing["submit"][:n] if side == "old" else timing["submit"][n:]}
            fleet.write_report(out / side, fleet.fleet_report(res, bag_ids, outs[side], side_timing,
                                                              {"model": str(opts[side].model_dir)}))
        report = _compare_report(bag_ids, names, per_side, keyframes)
        picks = report.pop("_picks")
        by_bag: dict[str, list[dict[str, Any]]] = {}
        for p in picks:
            by_bag.setdefault(p["bag"], []).append(p)
        if by_bag and keyframes > 0:
            render_jobs = [(bag, ps, opts["old"], opts["new"]) for bag, ps in by_bag.items()]
            rendered, _ = fleet.map_tasks(render_disagreements, render_jobs, ray_address=ray_address,
                                          num_cpus=num_cpus, task_cpus=task_cpus, max_retries=max_retries,
                                          desc="compare render")
            (out / KEYFRAME_DIR).mkdir(parents=True, exist_ok=True)
            files = set()
            for r in rendered:
                for name, png in (r.items() if isinstance(r, dict) else ()):
                    (out / KEYFRAME_DIR / name).write_bytes(png)
                    files.add(name)
            for d in report["worst"]:
                d["keyframe"] = f"{KEYFRAME_DIR}/{d['keyframe']}" if d["keyframe"] in files else None
    report["models"] = {"old": str(opts["old"].model_dir), "new": str(opts["new"].model_dir)}
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPARE_JSON).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out / COMPARE_MD).write_text(compare_markdown(report))
    return report


def _compare_report(bag_ids: list[str], names: list[str], per_side: dict[str, list[Any]],
                    keyframes: int) -> dict[str, Any]:
    olds, news, scen, pairs_all, skipped, worst = [], [], [], [], [], []
    for bag, name, o, nw in zip(bag_ids, names, per_side["old"], per_side["new"]):
        if not (isinstance(o, fleet.BagOutcome) and isinstance(nw, fleet.BagOutcome) and o.ok and nw.ok
                and o.cycles is not None and nw.cycles is not None):
            err = next((x.error for x in (o, nw) if x.error), "not replayed")
            skipped.append({"bag": bag, "error": err})
            continue
        try:
            pairs = pair_table(o.cycles, nw.cycles)
        except ValueError as exc:
            skipped.append({"bag": bag, "error": str(exc)})
            continue
        olds.append(o.cycles)
        news.append(nw.cycles)
        pairs_all.append(pairs)
        scen += o.cycles.scenario
        for d in worst_disagreements(bag, o.cycles, nw.cycles, pairs, keyframes):
            worst.append((d, name))
    old_t, new_t = fleet.concat_tables(olds), fleet.concat_tables(news)
    pairs = {k: np.concatenate([p[k] for p in pairs_all]) if pairs_all else np.zeros(0, bool)
             for k in ("action_differs", "risk_differs", "broke", "fixed", "new_unsafe")}
    everything = np.arange(len(old_t))
    per_family = {str(k): _group_summary(old_t, new_t, pairs, idx) for k, idx in group_indices(scen).items()}
    worst.sort(key=lambda dn: (tuple(-k for k in dn[0].key), dn[0].bag, dn[0].t))
    picks, worst_out = [], []
    for d, name in worst[:keyframes]:
        entry = d.to_dict()
        entry["keyframe"] = _keyframe_name(name, d.rel_t)
        worst_out.append(entry)
        picks.append({"bag": d.bag, "t": d.t, "rel_t": d.rel_t, "name": entry["keyframe"]})
    return {"overall": _group_summary(old_t, new_t, pairs, everything), "per_family": per_family,
            "worst": worst_out, "skipped": skipped, "_picks": picks}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def compare_markdown(r: dict[str, Any]) -> str:
    """``compare.md``: overall and per-family tables, then the worst disagreements with their key frames."""
    head = ("| | cycles | action differs | risk differs | action acc. old → new | unsafe old → new | "
            "risk acc. old → new | broke | fixed | new unsafe |")
    sep = "|---|---|---|---|---|---|---|---|---|---|"

    def row(name: str, s: dict[str, Any]) -> str:
        o, n = s["old"], s["new"]
        return (f"| {name} | {s['cycles']} | {_pct(s['action_disagreement'])} | {_pct(s['risk_disagreement'])} | "
                f"{_pct(o['action_accuracy'])} → {_pct(n['action_accuracy'])} | "
                f"{_pct(o['action_unsafe_rate'])} → {_pct(n['action_unsafe_rate'])} | "
                f"{_pct(o['risk_accuracy'])} → {_pct(n['risk_accuracy'])} | {s['broke']} | {s['fixed']} | "
                f"{s['new_unsafe']} |")

    lines = ["# Model comparison", "", f"old: `{r['models']['old']}`  ", f"new: `{r['models']['new']}`", "",
             "Unsafe: the published action is less cautious than the expert's. Broke / fixed: cycles whose action "
             "the new model gets wrong / right where the old one got it right / wrong. New unsafe: unsafe for the "
             "new model, not for the old one.", "", head, sep, row("all", r["overall"])]
    lines += [row(fam, s) for fam, s in r["per_family"].items()]
    lines += ["", "## Worst disagreements", ""]
    if not r["worst"]:
        lines.append("The models agree on every cycle.")
    for d in r["worst"]:
        lines.append(f"- `{Path(d['bag']).name}` at {d['rel_t']:.2f} s ({d['scenario']}): old {d['old']['action']} "
                     f"/ {d['old']['risk']} / {d['old']['target_speed']} m/s, new {d['new']['action']} / "
                     f"{d['new']['risk']} / {d['new']['target_speed']} m/s, truth {d['truth']['action']} / "
                     f"{d['truth']['risk']}{' — **new unsafe**' if d['new_unsafe'] else ''}")
        if d.get("keyframe"):
            lines.append(f"  ![old above, new below]({d['keyframe']})")
    if r["skipped"]:
        lines += ["", "## Bags not compared", ""] + [f"- `{s['bag']}`: {s['error']}" for s in r["skipped"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("old_model", type=Path, metavar="OLD_MODEL", help="model folder of the model in service")
    p.add_argument("new_model", type=Path, metavar="NEW_MODEL", help="model folder of the candidate")
    p.add_argument("bags", nargs="+", type=Path, metavar="BAG", help="rosbag2 folders (with ground truth)")
    p.add_argument("--out", type=Path, default=Path("compare"), metavar="DIR",
                   help="output folder (default ./compare)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="inference backend (default auto)")
    p.add_argument("--rate-hz", type=float, default=10.0, help="cycle rate in bag time [Hz] (default 10)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the backend per task")
    p.add_argument("--keyframes", type=int, default=DEFAULT_KEYFRAMES, metavar="K",
                   help=f"render the K worst disagreements (default {DEFAULT_KEYFRAMES}; 0: none)")
    p.add_argument("--copy-sensors", action="store_true",
                   help="copy the camera, LiDAR and GNSS messages into both output bags (default: refer to the inputs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print compare.json")
    fleet.add_ray_arguments(p)


def run(args: argparse.Namespace) -> int:
    opts = rp.ReplayOptions(backend=args.backend, rate_hz=args.rate_hz, threads=args.threads,
                            copy_sensors=args.copy_sensors)
    try:
        report = compare_models(args.old_model, args.new_model, args.bags, args.out, opts,
                                ray_address=fleet.checked_address(args.ray),
                                num_cpus=args.ray_cpus, task_cpus=args.task_cpus, max_retries=args.max_retries,
                                keyframes=args.keyframes, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        log.error("compare: %s", exc)
        return 2
    except ConnectionError as exc:  # no Ray at --ray ADDRESS (or it refused us: token, version)
        log.error("compare: cannot use the Ray at %s: %s", args.ray, exc)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        o = report["overall"]
        print(f"compared {o['cycles']} cycles: action differs {_pct(o['action_disagreement'])}, broke {o['broke']}, "
              f"fixed {o['fixed']}, new unsafe {o['new_unsafe']}; report {Path(args.out) / COMPARE_MD}")
    return 0


__all__ = [
    "COMPARE_JSON",
    "COMPARE_MD",
    "Disagreement",
    "add_arguments",
    "compare_models",
    "pair_table",
    "render_disagreements",
    "run",
    "worst_disagreements",
]
