"""``lmm-fusion eval``: a model's metrics on given drives, or (``--fresh N``) on N new drives nobody chose.

Without ``--fresh`` this is :mod:`lmm_fusion.training.evaluate` (``--data BAG...``). With ``--fresh N`` it
checks generalisation in one command:

1. draws a seed (or takes ``--seed``), prints and records it, and synthesises N drives of ``--seconds``
   each (:func:`lmm_fusion.synth.drive.synthesize`; drive *i* uses ``SeedSequence([seed, i])`` and starts
   its family cycle at family ``floor(i · 7 / N)``, so a few short drives still cover every family; a
   640x360 JPEG camera and the 64-beam LiDAR by default, warm sensors at the first label);
2. evaluates the **model** on them through the dataset path (:func:`lmm_fusion.training.evaluate.evaluate`:
   accuracy, per family, the modality ablation, the fusion gain);
3. replays each drive through the node's pipeline (:func:`lmm_fusion.offline.replay.replay`, the safety
   guard included) and pools the per-drive tables: agreement, unsafe and over-cautious rates of what is
   **published** next to the network's own action before the guard, overall and per family;
4. prints per-family tables and the targets (:data:`TARGETS`) marked PASS/FAIL, and writes the JSON report
   (``--out``, default ``DIR/report.json``) with the seed and the command that reproduces the run.

The drives stay in ``--fresh-dir`` (default ``out/eval_fresh/seed_<seed>``); a drive already there
complete is reused, so an interrupted run continues. Scores come from :mod:`lmm_fusion.groundtruth.scoring`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmm_fusion.base.paths import default_model_dir
from lmm_fusion.base.vocabulary import Scenario
from lmm_fusion.model import load_model
from lmm_fusion.offline.replay import ReplayOptions, replay
from lmm_fusion.runtime.base import BACKENDS
from lmm_fusion.synth.drive import parse_size, rig_from_args, synthesize
from lmm_fusion.training import evaluate as ev
from lmm_fusion.training.dataset import FusionDataset

log = logging.getLogger(__name__)

#: Keys of the pooled replay tables (rates and accuracies pooled as sample-weighted means).
POOLED_KEYS: tuple[str, ...] = (
    "action_accuracy", "action_unsafe_rate", "action_over_cautious_rate", "model_action_accuracy",
    "model_action_unsafe_rate", "model_action_over_cautious_rate", "risk_accuracy", "light_accuracy",
)


@dataclass(frozen=True)
class Target:
    """One target: ``key`` of the report's ``headline`` compared with ``threshold`` (``at_least`` or at most)."""

    name: str
    key: str
    threshold: float
    at_least: bool = True

    def passed(self, value: float | None) -> bool | None:
        """True/False, None when the value is undefined (no sample)."""
        if value is None or not math.isfinite(value):
            return None
        return value >= self.threshold if self.at_least else value <= self.threshold


#: What a model and guard must reach on fresh drives.
TARGETS: tuple[Target, ...] = (
    Target("published action agreement", "published_action_accuracy", 0.95),
    Target("published action agreement, weakest family", "published_action_accuracy_min_family", 0.90),
    Target("risk accuracy (published)", "published_risk_accuracy", 0.95),
    Target("unsafe suggestions (published)", "published_unsafe_rate", 0.01, at_least=False),
    Target("fused minus best single modality (model)", "fusion_gain_action_accuracy", 0.10),
    Target("any one sensor masked (model)", "min_action_accuracy_one_sensor_masked", 0.80),
)
#: Per-family agreement target of the published action.
FAMILY_TARGET = 0.90


def drive_seeds(seed: int, n: int) -> list[int]:
    """The seeds of the ``n`` drives of run ``seed``: ``SeedSequence([seed, i])`` reduced to 31 bits."""
    return [int(np.random.SeedSequence([seed, i]).generate_state(1)[0] & 0x7FFFFFFF) for i in range(n)]


def family_order(i: int, n: int) -> list[Scenario]:
    """Families of drive ``i`` of ``n``, rotated to start at ``floor(i · 7 / n)``."""
    fams = list(Scenario)
    k = (i * len(fams)) // max(n, 1)
    return fams[k:] + fams[:k]


def synthesise_fresh(out: Path, n: int, seconds: float, seed: int, camera: tuple[int, int], lidar_beams: int,
                     lidar_columns: int) -> list[Path]:
    """Write (or reuse, when complete) the ``n`` drives of run ``seed`` under ``out``; returns their folders."""
    rig = rig_from_args(camera=camera, lidar_beams=lidar_beams, lidar_columns=lidar_columns)
    bags = []
    for i, s in enumerate(drive_seeds(seed, n)):
        bag = out / f"drive_{i:02d}_seed_{s}"
        if (bag / "metadata.yaml").is_file():
            log.info("fresh drive %d: reusing %s", i, bag)
        else:
            if bag.exists():  # an interrupted write: start that drive again
                shutil.rmtree(bag)
            log.info("fresh drive %d of %d: seed %d, %g s -> %s", i + 1, n, s, seconds, bag)
            # start=1: the world runs a second first, so GNSS and the LiDAR history are warm at the first label.
            synthesize(bag, seconds, s, scenarios=family_order(i, n), rig=rig, compressed=True, progress=False,
                       start=1.0)
        bags.append(bag)
    return bags


def pool_tables(tables: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sample-weighted mean of :data:`POOLED_KEYS` over per-drive tables (a None entry is skipped)."""
    out: dict[str, Any] = {"n": int(sum(t.get("n") or 0 for t in tables))}
    for k in POOLED_KEYS:
        pairs = [(t[k], t["n"]) for t in tables if t.get(k) is not None and t.get("n")]
        w = sum(n for _, n in pairs)
        out[k] = sum(v * n for v, n in pairs) / w if w else None
    return out


def pool_replays(metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall and per-family tables pooled over the replays' ``accuracy`` sections."""
    acc = [m["accuracy"] for m in metrics if "accuracy" in m]
    families = sorted({f for a in acc for f in a["per_scenario"]}, key=_family_rank)
    return {"overall": pool_tables([a["overall"] for a in acc]),
            "per_scenario": {f: pool_tables([a["per_scenario"][f] for a in acc if f in a["per_scenario"]])
                             for f in families}}


def _family_rank(name: str) -> int:
    return Scenario[name].value if name in Scenario.__members__ else len(Scenario)


def headline(model: dict[str, Any], published: dict[str, Any]) -> dict[str, float | None]:
    """The values :data:`TARGETS` are checked on."""
    o = published["overall"]
    fams = [t["action_accuracy"] for t in published["per_scenario"].values() if t["action_accuracy"] is not None]

    def num(x: Any) -> float | None:
        return None if x is None or not math.isfinite(float(x)) else float(x)

    return {
        "published_action_accuracy": num(o["action_accuracy"]),
        "published_action_accuracy_min_family": min(fams) if fams else None,
        "published_risk_accuracy": num(o["risk_accuracy"]),
        "published_unsafe_rate": num(o["action_unsafe_rate"]),
        "published_over_cautious_rate": num(o["action_over_cautious_rate"]),
        "model_action_accuracy": num(o["model_action_accuracy"]),
        "model_unsafe_rate": num(o["model_action_unsafe_rate"]),
        "model_over_cautious_rate": num(o["model_action_over_cautious_rate"]),
        "fusion_gain_action_accuracy": num(model.get("fusion_gain_action_accuracy")),
        "min_action_accuracy_one_sensor_masked": num(model.get("min_action_accuracy_one_sensor_masked")),
    }


def check_targets(values: dict[str, float | None]) -> list[dict[str, Any]]:
    """Each target with its value and ``passed`` (True / False / None = undefined)."""
    return [{"target": t.name, "key": t.key, "threshold": t.threshold, "at_least": t.at_least,
             "value": values.get(t.key), "passed": t.passed(values.get(t.key))} for t in TARGETS]


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("PASS" if passed else "FAIL")


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{100 * x:5.1f}%"


def format_report(r: dict[str, Any]) -> str:
    """Per-family table (published vs model) and the targets, as text."""
    lines = [f"fresh drives: {len(r['drives'])} x {r['seconds']:g} s, seed {r['seed']} "
             f"(reproduce: {r['reproduce']})",
             f"{'family':28s} {'n':>5s} {'published':>9s} {'model':>7s} {'unsafe pub/model':>17s} "
             f"{'over-cautious pub/model':>24s} {'risk':>7s}  target >= {FAMILY_TARGET:.2f}"]
    rows = [*r["published"]["per_scenario"].items(), ("overall", r["published"]["overall"])]
    for name, t in rows:
        ok = None if t["action_accuracy"] is None else t["action_accuracy"] >= FAMILY_TARGET
        lines.append(f"{name:28s} {t['n']:5d} {_pct(t['action_accuracy']):>9s} {_pct(t['model_action_accuracy']):>7s} "
                     f"{_pct(t['action_unsafe_rate']):>8s}/{_pct(t['model_action_unsafe_rate']):<8s} "
                     f"{_pct(t['action_over_cautious_rate']):>15s}/{_pct(t['model_action_over_cautious_rate']):<8s} "
                     f"{_pct(t['risk_accuracy']):>7s}  {_verdict(ok) if name != 'overall' else ''}")
    m = r["model"]
    lines.append(f"model (dataset path): action {_pct(m['action_accuracy'])}, risk {_pct(m['risk_accuracy'])}; "
                 f"fusion gain {100 * m['fusion_gain_action_accuracy']:+.1f} points over {m['best_single_modality']} "
                 f"alone; weakest with one sensor masked {_pct(m['min_action_accuracy_one_sensor_masked'])}")
    lines.append("targets:")
    for t in r["targets"]:
        op = ">=" if t["at_least"] else "<="
        v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"  {_verdict(t['passed']):4s} {t['target']}: {v} (target {op} {t['threshold']:g})")
    return "\n".join(lines)


def fresh_eval(n: int, seconds: float, seed: int, out: Path, model_dir: Path | None = None, backend: str = "auto",
               camera: tuple[int, int] = (640, 360), lidar_beams: int = 64, lidar_columns: int = 2048,
               threads: int = 1, batch_size: int = 64) -> dict[str, Any]:
    """Synthesise, evaluate the model, replay the drives, pool and check the targets (see the module docstring)."""
    if n < 1:
        raise ValueError(f"--fresh: need at least one drive, got {n}")
    if not seconds > 0:
        raise ValueError(f"--seconds: must be > 0, got {seconds}")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    bags = synthesise_fresh(out, n, seconds, seed, camera, lidar_beams, lidar_columns)
    t_synth = time.perf_counter() - t0
    mdir = model_dir if model_dir is not None else default_model_dir()
    model = load_model(mdir)
    ds = FusionDataset(bags, model.cfg)
    if len(ds) == 0:
        raise ValueError(f"the fresh drives under {out} hold no labelled samples")
    model_report = ev.evaluate(model, ds, batch_size=batch_size)
    t_model = time.perf_counter() - t0 - t_synth
    metrics = []
    for bag in bags:
        opts = ReplayOptions(model_dir=mdir, backend=backend, threads=threads, progress=False, copy_sensors=False)
        metrics.append(replay([bag], out / "replay" / bag.name, opts))
    published = pool_replays(metrics)
    values = headline(model_report, published)
    cmd = (f"lmm-fusion eval --fresh {n} --seed {seed} --seconds {seconds:g} --camera {camera[0]}x{camera[1]} "
           f"--lidar-beams {lidar_beams} --lidar-columns {lidar_columns}"
           + (f" --model {shlex.quote(str(model_dir))}" if model_dir is not None else ""))
    return {
        "seed": seed, "seconds": seconds, "reproduce": cmd, "model_dir": str(mdir),
        "drives": [{"bag": str(b), "seed": s, "first_family": family_order(i, n)[0].name}
                   for i, (b, s) in enumerate(zip(bags, drive_seeds(seed, n)))],
        "backend": metrics[0]["backend"] if metrics else None,
        "published": published, "headline": values, "targets": check_targets(values),
        "model": {k: model_report[k] for k in (
            "n", "action_accuracy", "risk_accuracy", "risk_under_rate", "risk_over_rate", "best_single_modality",
            "fusion_gain_action_accuracy", "min_action_accuracy_one_sensor_masked", "per_scenario")}
        | {"ablation_action_accuracy": {k: v["action_accuracy"] for k, v in model_report["ablation"].items()}},
        "wall_s": {"synthesis": round(t_synth, 1), "model_eval": round(t_model, 1),
                   "replay": round(time.perf_counter() - t0 - t_synth - t_model, 1)},
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    ev.add_arguments(p)
    for action in p._actions:  # --data is not needed with --fresh
        if action.dest == "data":
            action.required = False
    g = p.add_argument_group("fresh drives (--fresh N)")
    g.add_argument("--fresh", type=int, metavar="N", help="synthesise N drives from random seeds and evaluate the "
                   "model and the published (guarded) suggestions on them")
    g.add_argument("--seed", type=int, default=None, help="seed of the fresh drives (default: random, printed)")
    g.add_argument("--seconds", type=float, default=60.0, help="length of each fresh drive [s] (default 60)")
    g.add_argument("--camera", type=parse_size, default=(640, 360), help="camera WxH, JPEG (default 640x360)")
    g.add_argument("--lidar-beams", type=int, default=64, help="LiDAR beams (default 64)")
    g.add_argument("--lidar-columns", type=int, default=2048, help="LiDAR columns (default 2048)")
    g.add_argument("--fresh-dir", type=Path, default=None, help="folder of the drives and replays "
                   "(default out/eval_fresh/seed_<seed>)")
    g.add_argument("--backend", default="auto", choices=BACKENDS, help="replay backend (default auto)")


def run(args: argparse.Namespace) -> int:
    if args.fresh is None:
        if not args.data:
            raise SystemExit("lmm-fusion eval: give --data BAG... or --fresh N")
        return ev.run(args)
    if args.data:
        raise SystemExit("lmm-fusion eval: --data and --fresh exclude each other")
    torch.set_num_threads(max(1, args.threads))
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    print(f"[eval] fresh drives: seed {seed} (rerun with --seed {seed})", flush=True)
    out = args.fresh_dir or Path("out/eval_fresh") / f"seed_{seed}"
    try:
        report = fresh_eval(args.fresh, args.seconds, seed, out, args.model, args.backend, args.camera,
                            args.lidar_beams, args.lidar_columns, threads=args.threads, batch_size=args.batch_size)
    except ValueError as exc:
        raise SystemExit(f"lmm-fusion eval: {exc}") from None
    path = args.out or out / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = _finite(report)
    path.write_text(json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")
    if args.json:
        print(json.dumps(report, sort_keys=True, allow_nan=False))
    else:
        print(format_report(report))
        print(f"[eval] report: {path}", flush=True)
    return 0


def _finite(x: Any) -> Any:
    """``x`` with every non-finite float (NaN: undefined, inf) replaced by None, for strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(prog="lmm-fusion eval")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
