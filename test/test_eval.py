"""Dataset extraction from a synthesised drive, the sample cache, and the evaluation report / CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmm_fusion.base.vocabulary import Action, Scenario
from lmm_fusion.groundtruth.scoring import (
    CAUTION,
    RECORD_KEYS,
    Columns,
    Sample,
    accuracy_table,
    caution_rates,
    ece,
    macro_f1,
    score_arrays,
)
from lmm_fusion.model import FusionModel, ModelConfig, save_model
from lmm_fusion.offline.fresh import FAMILY_TARGET, check_targets, drive_seeds, family_order, headline, pool_tables
from lmm_fusion.synth.drive import rig_from_args
from lmm_fusion.training.dataset import FusionDataset, expand_bags, extract_samples, load_bag_samples, merge_sources
from lmm_fusion.training.evaluate import (
    ABLATION_MASKS,
    by_sensors_in_data,
    compute_metrics,
    evaluate,
    format_markdown,
    fusion_gain_by_light,
    per_scenario,
)

SECONDS = 1.0
#: The module's synthetic drive (the ``drive`` fixture of conftest): 1 s with a small camera and a sparse
#: LiDAR (fast to make and read).
DRIVE = dict(seconds=SECONDS, seed=11, scenarios=[Scenario.PEDESTRIAN_CROSSING], compressed=True, name="drive_ped",
             rig=rig_from_args(camera=(160, 90), lidar_beams=16, lidar_columns=256))


@pytest.fixture
def small(tiny_model_config: dict[str, Any]) -> dict[str, Any]:
    """Tiny networks on the contract grids (ground-truth occupancy comes on OCCUPANCY_GRID)."""
    return {k: v for k, v in tiny_model_config.items() if k not in ("input_grid", "occupancy_grid")}


def test_one_sample_per_ground_truth_stamp(drive: Path, small: dict[str, Any]) -> None:
    cfg = ModelConfig(**small)
    a = extract_samples(drive, cfg)
    n = len(a["stamp"])
    assert n == pytest.approx(SECONDS * 10, abs=1)  # ground truth at the LiDAR rate (10 Hz)
    assert np.all(np.diff(a["stamp"]) > 0)
    assert a["image"].shape == (n, cfg.image_height, cfg.image_width, 3)
    assert a["bev"].shape == (n, cfg.bev_input_channels, *cfg.input_bev_grid.shape)
    assert a["occupancy"].shape == (n, *OCC_SHAPE)
    assert a["mask"][:, 1].all()  # the LiDAR frame labelled is always there
    assert a["bev"][:, 2].max() > 0  # points landed in the grid
    assert (a["scenario"] == Scenario.PEDESTRIAN_CROSSING).all()
    assert ((a["ttc"] >= 0) & (a["ttc"] <= cfg.ttc_max)).all()
    assert ((a["distance"] >= 0) & (a["distance"] <= cfg.distance_max)).all()


OCC_SHAPE = (32, 64)


def test_cache_is_reused_and_keyed_by_config(drive: Path, tmp_path: Path, small: dict[str, Any]) -> None:
    cfg = ModelConfig(**small)
    a = load_bag_samples(drive, cfg, tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = load_bag_samples(drive, cfg, tmp_path)
    assert files[0].stat().st_mtime_ns == mtime
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    load_bag_samples(drive, ModelConfig.from_dict({**cfg.to_dict(), "bev_z_max": 3.0}), tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_expand_bags(drive: Path, tmp_path: Path) -> None:
    assert expand_bags([drive]) == [drive]
    assert expand_bags([drive.parent]) == [drive]
    with pytest.raises(FileNotFoundError, match="--data"):
        expand_bags([tmp_path / "nope"])


def test_cached_sample_files_stand_for_their_bags(drive: Path, tmp_path: Path, small: dict[str, Any]) -> None:
    """A cache directory whose bags are gone still trains: its files load as the bag did, and a file
    made with other preprocessing settings is refused by name."""
    cfg = ModelConfig(**small)
    from_bag = load_bag_samples(drive, cfg, tmp_path)
    (tmp_path / "junk.tmp.npz").write_bytes(b"")  # an interrupted write is not a sample file
    (file,) = expand_bags([tmp_path])
    assert expand_bags([file]) == [file]
    again = load_bag_samples(file, cfg, cache_dir=None)
    for k in from_bag:
        assert np.array_equal(from_bag[k], again[k]), k
    assert len(FusionDataset([file], cfg)) == len(from_bag["stamp"])
    other = ModelConfig.from_dict({**cfg.to_dict(), "bev_z_max": 3.0})
    with pytest.raises(ValueError, match=f"{file.name}.*preprocessed with settings"):
        load_bag_samples(file, other, cache_dir=None)


def test_merge_fills_each_array_from_files_and_memory(drive: Path, tmp_path: Path,
                                                      small: dict[str, Any]) -> None:
    """Sample files and in-memory samples merge into the plain concatenation, in order, with each
    sample's bag recorded; a source whose arrays disagree in length is refused by name."""
    cfg = ModelConfig(**small)
    arrays = load_bag_samples(drive, cfg, tmp_path)
    (file,) = expand_bags([tmp_path])
    head = {k: v[:3].copy() for k, v in arrays.items()}
    merged, sizes = merge_sources([file, head, file])
    n = len(arrays["stamp"])
    assert sizes == [n, 3, n]
    for k, v in arrays.items():
        assert np.array_equal(merged[k], np.concatenate([v, v[:3], v])), k
        assert merged[k].dtype == v.dtype, k
    ds = FusionDataset([file, file], cfg)
    assert ds.bag_index.tolist() == [0] * n + [1] * n
    bad = {k: v[:3].copy() for k, v in arrays.items()}
    bad["action"] = bad["action"][:2]
    with pytest.raises(ValueError, match="'action' has 2 rows, 'stamp' has 3"):
        merge_sources([bad])


def test_warm_up_frames_fill_the_lidar_history(tmp_path: Path, small: dict[str, Any]) -> None:
    """A drive labelled from mid-world: the unlabelled warm-up frames reach the preprocessor, so the
    first sample already has GNSS and a LiDAR history; without warm-up its history is the frame itself."""
    from lmm_fusion.synth.drive import START_TIME, rig_from_args, synthesize

    rig = rig_from_args(camera=(160, 90), lidar_beams=16, lidar_columns=256)
    cfg = ModelConfig(**small)
    c = cfg.bev_channels
    firsts = {}
    for warmup in (0.0, 1.0):
        bag = synthesize(tmp_path / f"w{warmup:g}", 0.3, seed=5, scenarios=[Scenario.LEAD_VEHICLE], rig=rig,
                         progress=False, start=3.0, warmup=warmup)
        a = extract_samples(bag, cfg)
        assert len(a["stamp"]) == 3
        assert a["stamp"][0] == pytest.approx(START_TIME + 3.0, abs=1e-3)
        firsts[warmup] = a
    cold, warm = firsts[0.0], firsts[1.0]
    assert not cold["mask"][0, 2] and warm["mask"][:, 2].all()  # GNSS: no motion estimate yet vs warm
    assert np.array_equal(cold["bev"][0, :c], cold["bev"][0, c:])
    assert not np.array_equal(warm["bev"][0, :c], warm["bev"][0, c:])


def test_metric_helpers() -> None:
    t = np.array([0, 0, 1, 2])
    assert macro_f1(t, t, 3) == 1.0
    assert macro_f1(t, np.array([0, 0, 1, 1]), 3) == pytest.approx((1 + 2 / 3 + 0) / 3)
    sure = np.eye(3)[t]
    assert ece(sure, t) == pytest.approx(0.0)
    assert ece(np.full((4, 3), 1 / 3), t) == pytest.approx(0.5 - 1 / 3)


def test_evaluate_report_keys_and_ablation(drive: Path, small: dict[str, Any]) -> None:
    cfg = ModelConfig(**small)
    torch.manual_seed(0)
    model = FusionModel(cfg).eval()
    ds = FusionDataset([drive], cfg)
    r = evaluate(model, ds)
    for k in ("action_accuracy", "risk_accuracy", "risk_macro_f1", "light_accuracy", "target_speed_mae", "ttc_mae",
              "distance_mae", "occupancy_iou", "action_ece", "risk_ece", "per_scenario", "ablation",
              "confusion_action", "fusion_gain_action_accuracy", "min_action_accuracy_one_sensor_masked"):
        assert k in r, k
    assert set(r["ablation"]) == set(ABLATION_MASKS) == {"camera", "lidar", "gnss", "camera+lidar",
                                                         "camera+gnss", "lidar+gnss", "all"}
    assert set(r["per_scenario"]) == {"PEDESTRIAN_CROSSING"}
    assert r["ablation"]["all"]["action_accuracy"] == r["action_accuracy"]
    assert np.asarray(r["confusion_action"]).sum() == r["n"] == len(ds)
    # GNSS-only: the camera's and LiDAR's attention shares are zero.
    att = r["ablation"]["gnss"]["mean_attention"]
    assert att["camera"] == 0 and att["lidar"] == 0
    split = r["fusion_gain_by_light"]
    assert sum(m["contribution"] for m in split.values()) == pytest.approx(r["fusion_gain_action_accuracy"])
    assert "| no light |" in format_markdown(r)
    assert sum(m["n"] for m in r["by_sensors_in_data"].values()) == r["n"]
    assert "| sensors in the data |" in format_markdown(r)


def test_fusion_gain_by_light_splits_the_gain() -> None:
    # 4 samples under a light (RED, GREEN) and 6 without; the single modality misses 3 of the 4 lit ones.
    light = np.array([1, 3, 1, 3, 0, 0, 0, 0, 0, 0])
    action = np.array([3, 0, 3, 0, 0, 1, 2, 0, 0, 0])
    fused = action.copy()
    fused[9] = 3  # one error where no light governs
    single = action.copy()
    single[[0, 1, 2]] = [0, 3, 0]  # blind to the lamp colour
    split = fusion_gain_by_light(fused, single, {"light": light, "action": action})
    lit, dark = split["light_governs"], split["no_light"]
    assert (lit["n"], dark["n"]) == (4, 6)
    assert lit["share"] == pytest.approx(0.4) and lit["fused"] == 1.0 and lit["single"] == 0.25
    assert lit["gain"] == pytest.approx(0.75) and lit["contribution"] == pytest.approx(0.3)
    assert dark["gain"] == pytest.approx(-1 / 6) and dark["contribution"] == pytest.approx(-0.1)
    overall = (fused == action).mean() - (single == action).mean()
    assert lit["contribution"] + dark["contribution"] == pytest.approx(overall)


def test_by_sensors_in_data_splits_by_what_the_data_held() -> None:
    # 6 samples: 3 with every sensor, 2 before the GNSS estimate exists, 1 with LiDAR alone.
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0], [0, 1, 0]], bool)
    action = np.array([0, 1, 2, 3, 4, 5])
    predicted = np.array([0, 1, 2, 3, 0, 0])  # right with every sensor, half right without GNSS, wrong alone
    risk = np.array([0, 1, 2, 2, 2, 1])
    n = len(action)
    arrays = {"mask": mask, "action": action, "risk": risk, "light": np.zeros(n, int),
              "target_speed": np.zeros(n), "ttc": np.zeros(n), "distance": np.zeros(n)}
    pred = {"action_prob": np.eye(6)[predicted], "risk_prob": np.eye(3)[[0, 1, 2, 2, 1, 2]],
            "light_prob": np.eye(4)[np.zeros(n, int)], "target_speed": np.zeros(n), "ttc": np.zeros(n),
            "distance": np.zeros(n), "occ_inter": np.ones(n), "occ_union": np.ones(n),
            "attention": np.ones((n, 3)) / 3, "used": mask}
    split = by_sensors_in_data(pred, arrays)
    assert next(iter(split)) == "all" and set(split) == {"all", "camera+lidar", "lidar"}
    assert [split[k]["n"] for k in ("all", "camera+lidar", "lidar")] == [3, 2, 1]
    assert split["all"]["share"] == pytest.approx(0.5) and split["all"]["action_accuracy"] == 1.0
    assert split["camera+lidar"]["action_accuracy"] == 0.5 and split["lidar"]["action_accuracy"] == 0.0
    assert split["camera+lidar"]["risk_under_rate"] == 0.5  # HIGH called MEDIUM without GNSS
    assert split["lidar"]["risk_over_rate"] == 1.0


def test_compute_metrics_perfect_prediction() -> None:
    n = 5
    arrays = {"risk": np.arange(n) % 3, "action": np.arange(n) % 6, "light": np.arange(n) % 4,
              "target_speed": np.ones(n), "ttc": np.ones(n), "distance": np.ones(n)}
    pred = {"risk_prob": np.eye(3)[arrays["risk"]], "action_prob": np.eye(6)[arrays["action"]],
            "light_prob": np.eye(4)[arrays["light"]], "target_speed": np.ones(n), "ttc": np.ones(n),
            "distance": np.ones(n), "occ_inter": np.ones(n), "occ_union": np.ones(n), "attention": np.ones((n, 3)) / 3,
            "used": np.ones((n, 3), bool)}
    m = compute_metrics(pred, arrays)
    assert m["action_accuracy"] == m["risk_accuracy"] == m["occupancy_iou"] == 1.0
    assert m["ttc_mae"] == 0.0 and m["risk_under_rate"] == 0.0


@pytest.mark.slow
def test_eval_cli_prints_one_json_object_and_writes_plots(drive: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          small: dict[str, Any]) -> None:
    from lmm_fusion.cli import main

    cfg = ModelConfig(**small)
    torch.manual_seed(0)
    save_model(FusionModel(cfg), tmp_path / "model")
    rc = main(["eval", "--data", str(drive), "--model", str(tmp_path / "model"), "--json", "--plots",
               str(tmp_path / "plots"), "--cache", str(tmp_path / "cache")])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    report = json.loads(out[0])
    assert report["n"] > 0 and "ablation" in report
    for name in ("confusion.png", "ablation.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _prediction_set(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Random float32 predictions and labels of ``n`` samples in three families and one unlabelled."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {"risk": rng.integers(0, 3, n), "action": rng.integers(0, 6, n),
              "light": rng.integers(0, 4, n),
              "target_speed": rng.uniform(0, 30, n).astype(np.float32), "ttc": rng.uniform(0, 10, n).astype(np.float32),
              "distance": rng.uniform(0, 50, n).astype(np.float32), "scenario": rng.choice([-1, 0, 2, 5], n)}
    pred: dict[str, np.ndarray] = {"risk_prob": rng.dirichlet(np.ones(3), n),
            "action_prob": rng.dirichlet(np.ones(6), n),
            "light_prob": rng.dirichlet(np.ones(4), n), "target_speed": rng.uniform(0, 30, n).astype(np.float32),
            "ttc": rng.uniform(0, 10, n).astype(np.float32), "distance": rng.uniform(0, 50, n).astype(np.float32),
            "occ_inter": rng.integers(0, 5, n), "occ_union": rng.integers(5, 10, n),
            "attention": np.full((n, 3), 1 / 3), "used": rng.random((n, 3)) > 0.2}
    return pred, arrays


def test_per_scenario_is_the_headline_table_of_each_family() -> None:
    pred, arrays = _prediction_set(200)
    table = per_scenario(pred, arrays)
    assert list(table) == ["UNKNOWN", Scenario(0).name, Scenario(2).name, Scenario(5).name]  # code order
    for code, name in ((-1, "UNKNOWN"), (2, Scenario(2).name)):
        sel = arrays["scenario"] == code
        whole = compute_metrics({k: v[sel] for k, v in pred.items()}, {k: v[sel] for k, v in arrays.items()})
        assert table[name] == {k: whole[k] for k in table[name]}
        assert table[name]["n"] == int(sel.sum())
    # The errors are float32 means of the arrays as they are: no cap applies to eval's (already capped) values.
    m = compute_metrics(pred, arrays)
    assert m["distance_mae"] == float(np.abs(pred["distance"] - arrays["distance"]).mean())
    assert m["risk_under_rate"] + m["risk_over_rate"] + m["risk_accuracy"] == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_compute_metrics_of_no_samples_is_nan() -> None:
    pred, arrays = _prediction_set(0)
    m = compute_metrics(pred, arrays)
    assert m["n"] == 0
    assert all(np.isnan(m[k]) for k in ("action_accuracy", "risk_macro_f1", "ttc_mae", "occupancy_iou", "action_ece"))


# ------------------------------------------------------------- caution scale and `lmm-fusion eval --fresh`
def test_caution_rates_order_keep_and_change_lane_below_follow_slow_and_stop() -> None:
    k, f, s, st, left, right = (int(a) for a in (Action.KEEP_LANE, Action.FOLLOW, Action.SLOW_DOWN, Action.STOP,
                                                  Action.CHANGE_LANE_LEFT, Action.CHANGE_LANE_RIGHT))
    assert CAUTION[Action.KEEP_LANE] == CAUTION[Action.CHANGE_LANE_LEFT] < CAUTION[Action.FOLLOW] \
        < CAUTION[Action.SLOW_DOWN] < CAUTION[Action.STOP]
    true = np.array([st, s, left, k, f, k, -1])
    pred = np.array([s, st, k, right, f, st, st])  # unsafe, over, same level, same level, equal, over, unlabelled
    unsafe, over = caution_rates(pred, true)
    assert unsafe == pytest.approx(1 / 6) and over == pytest.approx(2 / 6)
    assert caution_rates(None, true) == (None, None) and caution_rates(pred[-1:], true[-1:]) == (None, None)
    with pytest.raises(ValueError, match="action code"):
        caution_rates(np.array([9]), np.array([0]))
    t = score_arrays(Columns(pred={"action": pred, "model_action": true}, true={"action": true}))
    assert t["action_unsafe_rate"] == pytest.approx(1 / 6) and t["model_action_unsafe_rate"] == 0.0
    assert t["model_action_over_cautious_rate"] == 0.0 and t["model_action_accuracy"] == 1.0


def test_replay_tables_carry_the_unsafe_and_over_cautious_rates() -> None:
    assert {"action_unsafe_rate", "action_over_cautious_rate", "model_action_unsafe_rate",
            "model_action_over_cautious_rate"} <= set(RECORD_KEYS)
    samples = [Sample(0.0, "CUT_IN", {"action": 3, "model_action": 0}, {"action": 2}),
               Sample(0.1, "CUT_IN", {"action": 2, "model_action": 2}, {"action": 2})]
    t = accuracy_table(samples)
    assert t["action_over_cautious_rate"] == 0.5 and t["model_action_unsafe_rate"] == 0.5
    assert t["action_unsafe_rate"] == 0.0 and t["model_action_accuracy"] == 0.5


def test_fresh_drives_cover_every_family_and_pool_by_samples() -> None:
    assert drive_seeds(5, 3) == drive_seeds(5, 3) and len(set(drive_seeds(5, 4))) == 4
    assert drive_seeds(5, 2) != drive_seeds(6, 2)
    firsts = {family_order(i, 4)[j] for i in range(4) for j in range(4)}  # 4 drives of ~4 episodes
    assert firsts == set(Scenario)
    assert family_order(0, 1) == list(Scenario)
    pooled = pool_tables([{"n": 10, "action_accuracy": 1.0, "action_unsafe_rate": 0.0},
                          {"n": 30, "action_accuracy": 0.5, "action_unsafe_rate": None}, {"n": 0}])
    assert pooled["n"] == 40 and pooled["action_accuracy"] == pytest.approx(0.625)
    assert pooled["action_unsafe_rate"] == 0.0 and pooled["risk_accuracy"] is None


def test_fresh_targets_are_marked_pass_or_fail() -> None:
    fam = {"n": 10, "action_accuracy": 0.97, "risk_accuracy": 0.96, "action_unsafe_rate": 0.0,
           "model_action_accuracy": 0.9, "model_action_unsafe_rate": 0.02}
    weak = {**fam, "action_accuracy": FAMILY_TARGET - 0.01}
    published = {"overall": pool_tables([fam, fam]), "per_scenario": {"FREE_ROAD": pool_tables([fam]),
                                                                      "CUT_IN": pool_tables([weak])}}
    model = {"fusion_gain_action_accuracy": 0.12, "min_action_accuracy_one_sensor_masked": float("nan")}
    values = headline(model, published)
    assert values["published_action_accuracy_min_family"] == pytest.approx(FAMILY_TARGET - 0.01)
    verdict = {t["key"]: t["passed"] for t in check_targets(values)}
    assert verdict == {"published_action_accuracy": True, "published_action_accuracy_min_family": False,
                       "published_risk_accuracy": True, "published_unsafe_rate": True,
                       "fusion_gain_action_accuracy": True, "min_action_accuracy_one_sensor_masked": None}


@pytest.mark.slow
def test_eval_fresh_cli_records_the_seed_and_reproduces(tmp_path: Path, model_dir: Path) -> None:
    """One fresh drive of 1.5 s with small sensors: the seed is printed and recorded with the drives' seeds
    (the synthesis is deterministic per seed, tested in test_sim_synth), the report has the model's and the
    published tables and the targets."""
    def run(out: str) -> tuple[str, dict[str, Any]]:
        cmd = [sys.executable, "-m", "lmm_fusion.cli", "eval", "--fresh", "1", "--seed", "123", "--seconds", "1.5",
               "--camera", "160x90", "--lidar-beams", "16", "--lidar-columns", "256", "--threads", "1",
               "--backend", "torch", "--model", str(model_dir), "--fresh-dir", str(tmp_path / out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout, json.loads((tmp_path / out / "report.json").read_text())

    text, report = run("a")
    assert "seed 123" in text and "targets:" in text and ("PASS" in text or "FAIL" in text)
    assert report["seed"] == 123 and "--seed 123" in report["reproduce"]
    assert report["published"]["overall"]["n"] >= 10 and report["model"]["n"] >= 10
    assert {t["key"] for t in report["targets"]} >= {"published_unsafe_rate", "fusion_gain_action_accuracy"}
    assert report["published"]["per_scenario"]  # tables per family
    assert [d["seed"] for d in report["drives"]] == drive_seeds(123, 1)
