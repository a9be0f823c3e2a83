"""``lmm-fusion eval``: metrics of a model on drives, per scenario family and per modality mask.

``lmm-fusion eval --data BAG... --model DIR --json`` prints one JSON object with action accuracy, risk
accuracy and macro-F1, light accuracy, target-speed / TTC / distance MAE, occupancy IoU, calibration
(ECE), the unsafe and over-cautious action rates (the model's action less / more cautious than the
expert's, :data:`~lmm_fusion.groundtruth.scoring.CAUTION`), a per-scenario-family breakdown, the headline
split by which sensors the data held at each sample (a drive's cold start lacks GNSS), and an ablation of
the same model under every modality mask; it also writes a confusion-matrix and an ablation plot (PNG).
The model alone, without the safety guard: ``lmm-fusion eval --fresh N`` (:mod:`lmm_fusion.offline.fresh`)
adds what is published, through the replay path.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

from lmm_fusion.base.paths import default_model_dir
from lmm_fusion.base.vocabulary import MODALITIES, Action, Light, Risk, Scenario
from lmm_fusion.cycle.assessment import decide_risk
from lmm_fusion.groundtruth.scoring import (
    UNCAPPED,
    Columns,
    accuracy,
    confusion,
    ece,
    occupancy_overlap,
    score_arrays,
    score_groups,
)
from lmm_fusion.model import FusionForward, FusionModel, load_model
from lmm_fusion.training.dataset import FusionDataset, expand_bags

# Plots go to files only (no display in CI or on a training server); the backend is chosen before pyplot loads.
matplotlib.use("Agg")
import matplotlib.pyplot as plt

log = logging.getLogger(__name__)

#: Modality subsets of the ablation, named by the modalities kept.
ABLATION_MASKS: dict[str, tuple[int, int, int]] = {
    "+".join(m for m, k in zip(MODALITIES, keep) if k): keep
    for n in (1, 2, 3) for keep in itertools.product((1, 0), (1, 0), (1, 0)) if sum(keep) == n
}
ABLATION_MASKS["all"] = ABLATION_MASKS.pop("camera+lidar+gnss")
#: The dataset's label arrays that the scorer compares with the predictions.
LABEL_KEYS: tuple[str, ...] = ("action", "risk", "light", "target_speed", "ttc", "distance")
#: Keys of each scenario family's entry in the report.
PER_SCENARIO_KEYS: tuple[str, ...] = ("n", "action_accuracy", "action_unsafe_rate", "action_over_cautious_rate",
                                      "risk_accuracy", "light_accuracy", "risk_under_rate", "risk_over_rate",
                                      "distance_mae")


@torch.no_grad()
def predict(model: FusionForward, ds: FusionDataset, keep: tuple[int, int, int] | None = None,
            batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Run ``model`` over ``ds`` with the data's modality mask times ``keep`` (1 = keep).

    Returns per-sample arrays: ``risk_prob (N,3)``, ``action_prob (N,6)``, ``light_prob (N,4)``,
    ``target_speed``, ``ttc``, ``distance (N,)`` and per-sample occupancy ``occ_inter``/``occ_union``
    (cell counts at probability 0.5), ``attention (N,3)``, ``used (N,3)`` (bool: the modalities the model saw).
    """
    model.eval()
    n = len(ds)
    keys = ("risk_prob", "action_prob", "light_prob", "target_speed", "ttc", "distance", "occ_inter",
            "occ_union", "attention", "used")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    keep_t = torch.tensor(keep if keep is not None else (1, 1, 1), dtype=torch.float32, device=device)
    for s in range(0, n, batch_size):
        b = ds.batch(np.arange(s, min(n, s + batch_size)))
        b = {k: v.to(device) for k, v in b.items()}
        mask = b["modality_mask"] * keep_t
        o = model(b["image"], b["bev"], b["ego"], mask)
        # A cell is predicted occupied at probability > 0.5 (logit > 0); the labels are stored as 0 / 1.
        occ_inter, occ_union = occupancy_overlap((o["occupancy_logits"] > 0).cpu().numpy(),
                                                 (b["occupancy"] > 0.5).cpu().numpy())
        parts["risk_prob"].append(torch.softmax(o["risk_logits"], -1).cpu().numpy())
        parts["action_prob"].append(torch.softmax(o["action_logits"], -1).cpu().numpy())
        parts["light_prob"].append(torch.softmax(o["light_logits"], -1).cpu().numpy())
        parts["target_speed"].append(o["target_speed"].cpu().numpy())
        parts["ttc"].append(o["ttc"].cpu().numpy())
        parts["distance"].append(o["obstacle_distance"].cpu().numpy())
        parts["occ_inter"].append(occ_inter)
        parts["occ_union"].append(occ_union)
        parts["attention"].append(o["modality_attention"].cpu().numpy())
        parts["used"].append((mask > 0.5).cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}


def _nan(x: float | None) -> float:
    """The report's "undefined" (NaN) for the scorer's None (e.g. no samples)."""
    return float("nan") if x is None else x


def columns(pred: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> Columns:
    """The scorer's input (:class:`~lmm_fusion.groundtruth.scoring.Columns`) for one prediction set: the
    arg-max classes, the risk as the node decides it, the regressions and the occupancy cell counts
    against the dataset's labels (:data:`LABEL_KEYS`)."""
    return Columns(
        pred={"action": pred["action_prob"].argmax(1), "risk": risk_decisions(pred),
              "light": pred["light_prob"].argmax(1), "target_speed": pred["target_speed"], "ttc": pred["ttc"],
              "distance": pred["distance"]},
        true={k: arrays[k] for k in LABEL_KEYS},
        occ_inter=pred["occ_inter"], occ_union=pred["occ_union"],
    )


def _table(pred: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    # The labels were capped when the samples were extracted (the model's ttc_max / distance_max /
    # speed_max) and the heads cannot exceed those caps, so the values are compared as they are.
    return score_arrays(columns(pred, arrays), UNCAPPED)


def compute_metrics(pred: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Headline metrics of one prediction set against the dataset's labels
    (:func:`lmm_fusion.groundtruth.scoring.score_arrays`, NaN where undefined), plus calibration and attention."""
    t = _table(pred, arrays)
    return {
        **{k: t[k] if k == "n" else _nan(t[k]) for k in (
            "n", "action_accuracy", "action_unsafe_rate", "action_over_cautious_rate", "risk_accuracy",
            "risk_macro_f1", "risk_under_rate", "risk_over_rate", "light_accuracy", "target_speed_mae", "ttc_mae",
            "distance_mae", "occupancy_iou")},
        "action_ece": _nan(ece(pred["action_prob"], arrays["action"])),
        "risk_ece": _nan(ece(pred["risk_prob"], arrays["risk"])),
        "mean_attention": {m: float(v) for m, v in zip(MODALITIES, pred["attention"].mean(0))},
    }


def risk_decisions(pred: dict[str, np.ndarray]) -> np.ndarray:
    """Risk levels ``(N,)`` as the node reports them (:func:`~lmm_fusion.cycle.assessment.decide_risk`)."""
    return decide_risk(pred["risk_prob"], pred["used"])


def _subset(pred: dict[str, np.ndarray], arrays: dict[str, np.ndarray], sel: np.ndarray
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return {k: v[sel] for k, v in pred.items()}, {k: v[sel] for k, v in arrays.items()}


def per_scenario(pred: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """The scorer's table per scenario family (:data:`PER_SCENARIO_KEYS`; families in code order,
    samples without a family as ``UNKNOWN``)."""
    tables = score_groups(columns(pred, arrays), arrays["scenario"], UNCAPPED)  # UNCAPPED: see _table
    return {(Scenario(code).name if code in Scenario._value2member_map_ else "UNKNOWN"):
            {k: t[k] if k == "n" else _nan(t[k]) for k in PER_SCENARIO_KEYS} for code, t in tables.items()}


def fusion_gain_by_light(fused_action: np.ndarray, single_action: np.ndarray, arrays: dict[str, np.ndarray]
                         ) -> dict[str, dict[str, float]]:
    """Split the fusion gain (action accuracy, fused minus one single-modality mask) by whether a
    traffic light governs the ego lane (true light state not NONE).

    The lamp colour is the one decision input only the camera sees, so the split shows where the
    gain comes from. ``fused_action``/``single_action``: predicted action codes ``(N,)``. Per subset:
    ``share`` of the samples, ``fused`` and ``single`` accuracy, their difference ``gain`` and its
    ``contribution`` (share x gain) to the overall gain; the contributions sum to the overall gain.
    """
    lit = arrays["light"] != Light.NONE
    out: dict[str, dict[str, float]] = {}
    for name, sel in (("light_governs", lit), ("no_light", ~lit)):
        truth = arrays["action"][sel]
        fused, single = _nan(accuracy(fused_action[sel], truth)), _nan(accuracy(single_action[sel], truth))
        share = float(sel.mean()) if len(sel) else float("nan")
        gain = fused - single if sel.any() else 0.0
        out[name] = {"n": int(sel.sum()), "share": share, "fused": fused, "single": single, "gain": gain,
                     "contribution": share * gain}
    return out


def by_sensors_in_data(fused: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Split the all-sensors result by which sensors the *data* held at each sample.

    A drive's first fraction of a second lacks sensors no mask removed: no GNSS motion estimate
    until the filter has enough fixes, sometimes no camera frame yet. Those samples are fused from
    fewer sensors, so the split separates what three-sensor fusion achieves from what the cold start
    costs. Keys name the sensors present, as in :data:`ABLATION_MASKS` (``all`` = every sensor);
    per key: ``n``, ``share`` of the samples, action/risk accuracy and the risk under/over rates.
    """
    present = arrays["mask"].astype(bool)
    out: dict[str, dict[str, Any]] = {}
    kept = {"all": ABLATION_MASKS["all"], **ABLATION_MASKS, "none": (0, 0, 0)}  # every sensor first
    for name, keep in kept.items():
        sel = np.all(present == np.asarray(keep, bool), axis=1)
        if not sel.any():
            continue
        m = compute_metrics(*_subset(fused, arrays, sel))
        out[name] = {"n": m["n"], "share": float(sel.mean()),
                     **{k: m[k] for k in ("action_accuracy", "risk_accuracy", "risk_under_rate", "risk_over_rate")}}
    return out


def evaluate(model: FusionModel, ds: FusionDataset, device: torch.device | str = "cpu",
             batch_size: int = 64) -> dict[str, Any]:
    """Full report: headline metrics (all sensors), confusion matrices, per-family breakdown, ablation."""
    a = ds.arrays
    report: dict[str, Any] = {}
    preds: dict[str, dict[str, np.ndarray]] = {}
    for name, keep in ABLATION_MASKS.items():
        preds[name] = predict(model, ds, keep, batch_size, device)
    full = preds["all"]
    report.update(compute_metrics(full, a))
    report["data_modality_presence"] = {m: float(v) for m, v in zip(MODALITIES, a["mask"].mean(0))}
    report["confusion_action"] = confusion(a["action"], full["action_prob"].argmax(1), len(Action)).tolist()
    report["confusion_risk"] = confusion(a["risk"], risk_decisions(full), len(Risk)).tolist()
    report["confusion_light"] = confusion(a["light"], full["light_prob"].argmax(1), len(Light)).tolist()
    report["per_scenario"] = per_scenario(full, a)
    report["by_sensors_in_data"] = by_sensors_in_data(full, a)
    ablation: dict[str, Any] = {}
    for name in ABLATION_MASKS:
        m = compute_metrics(preds[name], a)
        m["per_scenario_action_accuracy"] = {k: v["action_accuracy"]
                                             for k, v in per_scenario(preds[name], a).items()}
        m["risk_errs_cautious"] = bool(m["risk_over_rate"] >= m["risk_under_rate"])
        ablation[name] = m
    report["ablation"] = ablation
    singles = [n for n in ABLATION_MASKS if "+" not in n and n != "all"]
    best = max(singles, key=lambda n: ablation[n]["action_accuracy"])
    report["best_single_modality"] = best
    report["fusion_gain_action_accuracy"] = report["action_accuracy"] - ablation[best]["action_accuracy"]
    report["fusion_gain_by_light"] = fusion_gain_by_light(full["action_prob"].argmax(1),
                                                          preds[best]["action_prob"].argmax(1), a)
    pairs = [n for n in ABLATION_MASKS if n.count("+") == 1]
    report["min_action_accuracy_one_sensor_masked"] = min(ablation[n]["action_accuracy"] for n in pairs)
    return report


@torch.no_grad()
def quick_metrics(model: FusionModel, ds: FusionDataset, device: torch.device | str = "cpu"
                  ) -> dict[str, float]:
    """Action/risk accuracy with all sensors and with each single one masked (for training logs)."""
    out: dict[str, float] = {}
    for name in ("all", "lidar+gnss", "camera+gnss", "camera+lidar"):
        p = predict(model, ds, ABLATION_MASKS[name], device=device)
        t = _table(p, ds.arrays)
        out[f"{name}/action_acc"] = round(_nan(t["action_accuracy"]), 4)
        out[f"{name}/risk_acc"] = round(_nan(t["risk_accuracy"]), 4)
    return out


# ---------------------------------------------------------------- plots
def plot_confusion(report: dict[str, Any], path: Path) -> Path:
    specs = [("action", [a.name for a in Action]), ("risk", [r.name for r in Risk]),
             ("light", [x.name for x in Light])]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), gridspec_kw={"width_ratios": [6, 3, 4]})
    for ax, (key, names) in zip(axes, specs):
        cm = np.asarray(report[f"confusion_{key}"], dtype=np.float64)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i, j in itertools.product(range(len(names)), repeat=2):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{key} (acc {report[key + '_accuracy']:.3f})")
    fig.suptitle(f"Confusion matrices, all sensors (n={report['n']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ablation(report: dict[str, Any], path: Path) -> Path:
    names = list(report["ablation"])
    keys = [("action_accuracy", "action acc"), ("risk_accuracy", "risk acc"), ("light_accuracy", "light acc"),
            ("risk_under_rate", "risk under-estimated")]
    x = np.arange(len(names))
    w = 0.2
    fig, ax = plt.subplots(figsize=(13.5, 5))
    for i, (k, label) in enumerate(keys):
        vals = [report["ablation"][n][k] for n in names]
        bars = ax.bar(x + (i - 1.5) * w, vals, w, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("fraction")
    ax.set_title(f"Modality ablation (n={report['n']}): same model, sensors kept as named")
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- markdown
def format_markdown(report: dict[str, Any]) -> str:
    """Headline, ablation and per-family tables of a report, as Markdown (for model cards)."""
    r = report
    lines = [
        f"Samples: {r['n']}.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k in ("action_accuracy", "action_unsafe_rate", "action_over_cautious_rate", "risk_accuracy",
              "risk_macro_f1", "light_accuracy", "target_speed_mae",
              "ttc_mae", "distance_mae", "occupancy_iou", "action_ece", "risk_ece", "risk_under_rate",
              "risk_over_rate", "fusion_gain_action_accuracy", "min_action_accuracy_one_sensor_masked"):
        lines.append(f"| {k} | {r[k]:.3f} |")
    lines += ["", "| sensors kept | action acc | risk acc | risk macro-F1 | light acc | risk under | risk over "
              "| attention cam/lidar/gnss |", "|---|---|---|---|---|---|---|---|"]
    for name, m in r["ablation"].items():
        att = "/".join(f"{m['mean_attention'][k]:.2f}" for k in MODALITIES)
        lines.append(f"| {name} | {m['action_accuracy']:.3f} | {m['risk_accuracy']:.3f} | {m['risk_macro_f1']:.3f} "
                     f"| {m['light_accuracy']:.3f} | {m['risk_under_rate']:.3f} | {m['risk_over_rate']:.3f} | {att} |")
    lines += ["", "| family | n | action acc | unsafe | over-cautious | risk acc | light acc | risk under "
              "| risk over |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in r["per_scenario"].items():
        lines.append(f"| {name} | {m['n']} | {m['action_accuracy']:.3f} | {m['action_unsafe_rate']:.3f} "
                     f"| {m['action_over_cautious_rate']:.3f} | {m['risk_accuracy']:.3f} "
                     f"| {m['light_accuracy']:.3f} | {m['risk_under_rate']:.3f} | {m['risk_over_rate']:.3f} |")
    if "by_sensors_in_data" in r:
        lines += ["", "| sensors in the data | n | share | action acc | risk acc | risk under | risk over |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in r["by_sensors_in_data"].items():
            lines.append(f"| {name} | {m['n']} | {m['share']:.3f} | {m['action_accuracy']:.3f} "
                         f"| {m['risk_accuracy']:.3f} | {m['risk_under_rate']:.3f} | {m['risk_over_rate']:.3f} |")
    if "fusion_gain_by_light" in r:
        lines += ["", f"| samples | share | fused action acc | {r['best_single_modality']} alone | gain "
                  "| contribution to the fusion gain |", "|---|---|---|---|---|---|"]
        for name, m in r["fusion_gain_by_light"].items():
            lines.append(f"| {name.replace('_', ' ')} | {m['share']:.3f} | {m['fused']:.3f} | {m['single']:.3f} "
                         f"| {100 * m['gain']:+.1f} | {100 * m['contribution']:+.1f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, help="rosbag2 folders, or directories holding them")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped model)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--out", type=Path, help="also write the JSON report to this file")
    p.add_argument("--plots", type=Path, default=Path("eval_plots"), help="directory for the PNG plots")
    p.add_argument("--cache", type=Path, default=Path(".cache/lmm_fusion_samples"),
                   help="preprocessed-sample cache directory")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--markdown", type=Path, help="also write Markdown tables of the report to this file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    model_dir = args.model
    if model_dir is None:
        model_dir = default_model_dir()
    model = load_model(model_dir)
    bags = expand_bags(args.data)
    t0 = time.perf_counter()
    ds = FusionDataset(bags, model.cfg, cache_dir=None if args.no_cache else args.cache)
    if len(ds) == 0:
        raise SystemExit(f"--data: no labelled samples in {[str(b) for b in bags]}")
    report = evaluate(model, ds, batch_size=args.batch_size)
    report["model"] = str(model_dir)
    report["bags"] = [b.name for b in bags]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["plots"] = {"confusion": str(plot_confusion(report, args.plots / "confusion.png")),
                       "ablation": str(plot_ablation(report, args.plots / "ablation.png"))}
    text = json.dumps(report, sort_keys=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_markdown(report))
    if args.json:
        print(text)
    else:
        print(f"action acc {report['action_accuracy']:.3f}  risk acc {report['risk_accuracy']:.3f}  "
              f"light acc {report['light_accuracy']:.3f}  occ IoU {report['occupancy_iou']:.3f}  (n={report['n']})")
        for name, m in report["ablation"].items():
            print(f"  {name:>14}: action {m['action_accuracy']:.3f} risk {m['risk_accuracy']:.3f} "
                  f"under {m['risk_under_rate']:.3f} over {m['risk_over_rate']:.3f}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(prog="lmm-fusion eval")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
