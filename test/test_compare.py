"""``lmm-fusion compare``: two models on the same bags, paired cycle by cycle; a model against itself agrees
everywhere, two different ones disagree where the report says, and the worst disagreements are rendered."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from lmm_fusion.base.rig import CameraModel, LidarModel, SensorRig
from lmm_fusion.offline import fleet
from lmm_fusion.offline.compare import compare_models, pair_table, worst_disagreements
from lmm_fusion.offline.render import PANEL_HEIGHT
from lmm_fusion.offline.replay import ReplayOptions

RIG = SensorRig(camera=CameraModel(160, 90), lidar=LidarModel(beams=16, columns=128))
#: The module's synthetic drive (the ``drive`` fixture of conftest).
DRIVE = dict(seconds=2.0, seed=5, rig=RIG, name="drive")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second random model (seed 1) of the same architecture as conftest's ``model_dir`` (seed 0)."""
    import torch

    from lmm_fusion.model import FusionModel, ModelConfig, save_model

    torch.manual_seed(1)
    return save_model(FusionModel(ModelConfig()), tmp_path_factory.mktemp("model") / "other")


def _opts() -> ReplayOptions:
    return ReplayOptions(backend="torch", progress=False, rig=RIG, threads=1, copy_sensors=False)


def test_a_model_agrees_with_itself(drive: Path, model_dir: Path, tmp_path: Path) -> None:
    r = compare_models(model_dir, model_dir, [drive], tmp_path, _opts(), keyframes=3)
    o = r["overall"]
    assert o["cycles"] > 0 and o["action_disagreement"] == 0.0 and o["risk_disagreement"] == 0.0
    assert o["broke"] == o["fixed"] == o["new_unsafe"] == 0 and o["old"] == o["new"]
    assert r["worst"] == [] and not (tmp_path / "keyframes").exists()
    assert "agree on every cycle" in (tmp_path / "compare.md").read_text()


def test_two_models_regression_report(drive: Path, model_dir: Path, other_model: Path, tmp_path: Path) -> None:
    r = compare_models(model_dir, other_model, [drive], tmp_path, _opts(), keyframes=2)
    written = json.loads((tmp_path / "compare.json").read_text())
    assert written["overall"] == r["overall"]
    # each side is a full fleet replay, and the comparison's ground-truth columns are those fleet numbers
    for side in ("old", "new"):
        pooled = json.loads((tmp_path / side / "fleet.json").read_text())["pooled"]
        assert r["overall"][side] == pooled["accuracy"]
        assert (tmp_path / side / "drive" / "outputs.mcap").is_file()
    o = r["overall"]
    assert o["cycles"] == json.loads((tmp_path / "old" / "fleet.json").read_text())["pooled"]["cycles"]
    assert sum(s["cycles"] for s in r["per_family"].values()) <= o["cycles"]
    assert o["action_disagreement"] > 0, "two random models should disagree somewhere"
    # worst first: none of the rendered cycles ranks below a later one, and each has its key frame
    assert 1 <= len(r["worst"]) <= 2
    for d in r["worst"]:
        assert d["old"]["action"] != d["new"]["action"] or d["old"]["risk"] != d["new"]["risk"]
        img = cv2.imread(str(tmp_path / d["keyframe"]))
        assert img is not None and img.shape[0] == 2 * PANEL_HEIGHT  # old frame above the new one
    md = (tmp_path / "compare.md").read_text()
    assert "## Worst disagreements" in md and r["worst"][0]["keyframe"] in md


def test_pairing_and_ranking_on_tables() -> None:
    """Disagreements are counted and ranked from the per-cycle columns alone."""
    from lmm_fusion.groundtruth.scoring import Columns

    def table(actions: list[int], risks: list[int]) -> fleet.CycleTable:
        n = len(actions)
        pred = {"action": np.array(actions), "risk": np.array(risks), "target_speed": np.zeros(n),
                "model_action": np.array(actions), "light": np.zeros(n, np.int64)}
        true = {"action": np.array([3, 3, 0, 0][:n]), "risk": np.array([2, 2, 0, 0][:n]),
                "light": np.zeros(n, np.int64)}
        return fleet.CycleTable(np.arange(n) * 0.1, Columns(pred, true, -np.ones(n, np.int64), -np.ones(n, np.int64)),
                                np.ones(n, bool), ["STOP_CASE"] * 2 + ["FREE_ROAD"] * 2, {"total": np.ones(n)})

    old = table([3, 3, 0, 0], [2, 2, 0, 0])  # right everywhere
    new = table([3, 0, 0, 1], [2, 2, 0, 1])  # keep lane where the expert stops (unsafe), follow on a free road
    pairs = pair_table(old, new)
    assert pairs["action_differs"].tolist() == [False, True, False, True]
    assert pairs["broke"].sum() == 2 and pairs["new_unsafe"].tolist() == [False, True, False, False]
    worst = worst_disagreements("bag", old, new, pairs, limit=5, min_gap_s=0.0)
    assert [d.t for d in worst] == pytest.approx([0.1, 0.3]) and worst[0].new_unsafe  # the unsafe one first
    with pytest.raises(ValueError, match="do not pair"):
        pair_table(old, table([3, 3, 0], [2, 2, 0]))
