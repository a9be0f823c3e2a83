"""Per-record scoring (lmm_fusion.groundtruth.scoring): ground truth from messages, errors, aggregation, windows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmm_fusion.base import topics as T
from lmm_fusion.base.grid import OCCUPANCY_GRID
from lmm_fusion.base.vocabulary import Action, Light, Risk
from lmm_fusion.cycle.assessment import Assessment, modality_states
from lmm_fusion.groundtruth.messages import GroundTruth, ground_truth_from_messages, occupancy_from_msg
from lmm_fusion.groundtruth.scoring import (
    DISTANCE_CAP,
    TTC_CAP,
    accuracy_table,
    grouped_tables,
    sample_of,
    window_key,
)
from lmm_fusion.io import make_header, rosbags_types
from lmm_fusion.io.errors import MessageError

ALL = np.ones(3, bool)


def assessment(
    action: Action = Action.FOLLOW,
    risk: Risk = Risk.MEDIUM,
    light: Light = Light.NONE,
    speed: float = 8.0,
    ttc: float = 4.0,
    distance: float = 20.0,
    occ: np.ndarray | None = None,
    valid: bool = True,
    t: float = 100.0,
) -> Assessment:
    return Assessment(
        stamp=t,
        valid=valid,
        modalities=modality_states(ALL, dict.fromkeys(("camera", "lidar", "gnss"), 0.0)),
        risk=risk,
        light=light,
        action=action,
        model_action=action,
        target_speed=speed,
        ttc=ttc,
        distance=distance,
        occupancy=occ,
    )


def truth_messages(t: float = 100.0, occ: np.ndarray | None = None) -> dict[str, tuple[float, object]]:
    ty = rosbags_types()
    h = make_header(ty, t, T.BASE_FRAME)
    scene = ty.SceneAssessment(
        header=h,
        risk_level=1,
        risk_probabilities=np.zeros(3, np.float32),
        time_to_collision=math.inf,
        nearest_obstacle_distance=25.0,
        traffic_light_state=1,
        traffic_light_probabilities=np.zeros(4, np.float32),
        modalities=[],
        ego_speed=8.0,
        ego_speed_source="ground_truth",
        degraded=False,
        valid=True,
    )
    action = ty.ActionSuggestion(
        header=h,
        action=2,
        action_probabilities=np.zeros(6, np.float32),
        target_speed=5.0,
        confidence=1.0,
        safety_override=False,
        rationale="",
    )
    grid = np.zeros(OCCUPANCY_GRID.shape, np.int8) if occ is None else occ
    info = ty.MapMetaData(
        map_load_time=h.stamp,
        resolution=1.0,
        width=OCCUPANCY_GRID.nx,
        height=OCCUPANCY_GRID.ny,
        origin=ty.Pose(
            position=ty.Point(x=-8.0, y=-16.0, z=0.0), orientation=ty.Quaternion(x=0.0, y=0.0, z=0.0, w=1.0)
        ),
    )
    occ_msg = ty.OccupancyGrid(header=h, info=info, data=grid.reshape(-1))
    return {
        T.GT_SCENE: (t, scene),
        T.GT_ACTION: (t, action),
        T.GT_OCCUPANCY: (t, occ_msg),
        T.GT_SCENARIO: (t, ty.String(data="LEAD_VEHICLE")),
    }


def test_ground_truth_from_messages() -> None:
    occ = np.zeros(OCCUPANCY_GRID.shape, np.int8)
    occ[3, 4] = 100
    gt = ground_truth_from_messages(truth_messages(occ=occ))
    assert gt is not None
    assert (gt.risk, gt.light, gt.action) == (Risk.MEDIUM, Light.RED, Action.SLOW_DOWN)
    assert gt.target_speed == 5.0 and math.isinf(gt.ttc) and gt.distance == 25.0
    assert gt.scenario == "LEAD_VEHICLE" and gt.ego_speed is None and gt.stamp == pytest.approx(100.0)
    assert gt.occupancy is not None and gt.occupancy[3, 4] == 1.0 and gt.occupancy.sum() == 1.0
    assert ground_truth_from_messages({}) is None


def test_occupancy_size_mismatch_is_a_message_error() -> None:
    msg = truth_messages()[T.GT_OCCUPANCY][1]
    msg.info.width = 10
    with pytest.raises(MessageError, match="width x height"):
        occupancy_from_msg(msg)
    msg = truth_messages()[T.GT_OCCUPANCY][1]
    msg.data = msg.data[:-1]
    with pytest.raises(MessageError, match=r"occupancy\.data"):
        occupancy_from_msg(msg)


def test_score_errors_with_caps_and_iou() -> None:
    true = np.zeros(OCCUPANCY_GRID.shape, np.float32)
    true[0, 0:4] = 1.0  # four occupied cells
    pred = np.zeros(OCCUPANCY_GRID.shape, np.float32)
    pred[0, 2:6] = 0.9  # two right, two wrong
    gt = GroundTruth(
        stamp=1.0,
        risk=Risk.MEDIUM,
        light=Light.RED,
        action=Action.SLOW_DOWN,
        target_speed=5.0,
        ttc=math.inf,
        distance=25.0,
        occupancy=true,
        scenario="CUT_IN",
    )
    s = sample_of(assessment(ttc=4.0, distance=math.inf, speed=8.0, occ=pred), gt)
    assert s.occupancy == (2, 6) and s.t == 100.0 and s.scenario == "CUT_IN"
    t = accuracy_table([s])
    assert (t["action_accuracy"], t["risk_accuracy"], t["light_accuracy"]) == (0.0, 1.0, 0.0)
    assert t["target_speed_mae"] == pytest.approx(3.0)
    assert t["ttc_mae"] == pytest.approx(TTC_CAP - 4.0)  # "none" truth counts at the cap
    assert t["distance_mae"] == pytest.approx(DISTANCE_CAP - 25.0)  # a missed obstacle is penalised
    assert t["occupancy_iou"] == round(2 / 6, 4)
    # An invalid assessment has no occupancy: the union is the truth alone.
    s2 = sample_of(assessment(valid=False, occ=pred), gt)
    assert s2.occupancy == (0, 4) and accuracy_table([s2])["occupancy_iou"] == 0.0


def test_missing_labels_are_none_not_zero() -> None:
    s = sample_of(assessment(), GroundTruth(stamp=0.0, action=Action.FOLLOW))
    assert set(s.true) == {"action"} and s.occupancy is None
    table = accuracy_table([s])
    assert (
        table["action_accuracy"] == 1.0 and table["risk_accuracy"] is None and table["occupancy_iou"] is None
    )
    assert table["target_speed_mae"] is None and table["model_action_accuracy"] == 1.0 and table["n"] == 1
    # A sample without a label does not dilute the others' mean.
    both = accuracy_table([s, sample_of(assessment(speed=8.0), GroundTruth(stamp=1.0, target_speed=6.0))])
    assert both["n"] == 2 and both["target_speed_mae"] == 2.0 and both["action_accuracy"] == 1.0


def test_accuracy_table_groups_and_windows() -> None:
    samples = []
    for i in range(30):
        gt = GroundTruth(
            stamp=float(i),
            action=Action.FOLLOW if i % 3 else Action.STOP,
            target_speed=10.0,
            scenario="A" if i < 20 else "B",
        )
        samples.append(sample_of(assessment(action=Action.FOLLOW, speed=9.0, t=100.0 + i), gt, t=100.0 + i))
    table = accuracy_table(samples)
    assert table["n"] == 30 and table["action_accuracy"] == pytest.approx(20 / 30, abs=1e-4)
    assert table["target_speed_mae"] == pytest.approx(1.0)
    by_scenario = grouped_tables(samples, lambda x: x.scenario)
    assert list(by_scenario) == ["A", "B"] and by_scenario["A"]["n"] == 20
    windows = grouped_tables(samples, window_key(100.0, 10.0))
    assert list(windows) == ["0000.0-0010.0", "0010.0-0020.0", "0020.0-0030.0"]
    assert all(w["n"] == 10 for w in windows.values())
    with pytest.raises(ValueError, match="window_s"):
        window_key(0.0, 0.0)
