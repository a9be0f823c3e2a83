"""Ground truth in and out (lmm_fusion.groundtruth.messages), the array scorer (lmm_fusion.groundtruth.scoring),
the rig's /tf_static (lmm_fusion.io.tf) and replay of a bag recorded without /tf_static."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmm_fusion.base import topics as T
from lmm_fusion.base.grid import OCCUPANCY_GRID
from lmm_fusion.base.rig import CameraModel, LidarModel, Mount, SensorRig
from lmm_fusion.base.vocabulary import Action, Light, Risk, Scenario
from lmm_fusion.groundtruth.expert import Label
from lmm_fusion.groundtruth.messages import OCCUPIED_FROM, ground_truth_from_messages, ground_truth_msgs
from lmm_fusion.groundtruth.scoring import (
    NO_LABEL,
    UNCAPPED,
    Caps,
    Columns,
    group_indices,
    occupancy_overlap,
    score_arrays,
    score_groups,
)
from lmm_fusion.io import rosbags_types
from lmm_fusion.io.bags import BagWriter, read_bag
from lmm_fusion.io.tf import quaternion_from_matrix, tf_static_msg
from lmm_fusion.model.config import ModelConfig
from lmm_fusion.offline.replay import ReplayOptions, replay
from lmm_fusion.training.dataset import _labels

RIG = SensorRig(camera=CameraModel(160, 90), lidar=LidarModel(beams=16, columns=256))
#: The module's synthetic drive (the ``drive`` fixture of conftest).
DRIVE = dict(seconds=1.0, seed=4, rig=RIG)


# ------------------------------------------------------------------------------- messages in and out
@dataclass(frozen=True)
class _Boxes:
    center: np.ndarray
    yaw: np.ndarray
    size: np.ndarray

    def __len__(self) -> int:
        return len(self.yaw)


@dataclass(frozen=True)
class _Scene:
    boxes: _Boxes
    ego_pose: tuple[float, float, float]
    ego_speed: float
    ego_yaw_rate: float
    scenario: Scenario


def test_written_ground_truth_decodes_to_its_label() -> None:
    # A car on the ground 10 m ahead and a box hanging above the road (a signal head): only the car occupies.
    boxes = _Boxes(center=np.array([[10.0, 0.0, 0.75], [10.0, 8.0, 5.0]]), yaw=np.zeros(2),
                   size=np.array([[4.0, 2.0, 1.5], [4.0, 2.0, 1.0]]))
    scene = _Scene(boxes, (5.0, -3.0, 0.3), 7.5, 0.1, Scenario.LEAD_VEHICLE)
    label = Label(risk=Risk.MEDIUM, action=Action.FOLLOW, target_speed=6.0, ttc=math.inf, distance=12.5,
                  light=Light.GREEN, rationale="follow")
    msgs = ground_truth_msgs(rosbags_types(), scene, label, 1000.25)
    assert set(msgs) == {T.GT_SCENE, T.GT_ACTION, T.GT_OCCUPANCY, T.GT_SCENARIO, T.GT_EGO}
    gt = ground_truth_from_messages({topic: (1000.25, m) for topic, m in msgs.items()})
    assert gt is not None and gt.stamp == pytest.approx(1000.25)
    assert (gt.risk, gt.action, gt.light, gt.scenario) == (Risk.MEDIUM, Action.FOLLOW, Light.GREEN, "LEAD_VEHICLE")
    assert gt.target_speed == 6.0 and math.isinf(gt.ttc) and gt.distance == 12.5 and gt.ego_speed == 7.5
    assert gt.occupied is not None and gt.occupied.any()
    ys, xs = np.nonzero(gt.occupied)
    xc, yc = OCCUPANCY_GRID.centers()
    assert np.all(np.abs(xc[ys, xs] - 10.0) <= 2.0 + OCCUPANCY_GRID.cell)  # the car's footprint only
    assert np.all(np.abs(yc[ys, xs]) <= 1.0 + OCCUPANCY_GRID.cell)


def test_one_occupancy_convention_for_scoring_and_training() -> None:
    """A cell is occupied from 50 in the message on: the decoder, and the training labels derived from it."""
    types = rosbags_types()
    scene = _Scene(_Boxes(np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3))), (0.0, 0.0, 0.0), 0.0, 0.0,
                   Scenario.FREE_ROAD)
    label = Label(risk=Risk.LOW, action=Action.KEEP_LANE, target_speed=math.nan, ttc=math.nan, distance=80.0,
                  light=Light.NONE, rationale="")
    msgs = ground_truth_msgs(types, scene, label, 5.0)
    grid = msgs[T.GT_OCCUPANCY]
    data = np.zeros(OCCUPANCY_GRID.shape, np.int8)
    data[0, :5] = (-1, 0, 49, 50, 100)
    grid.data = data.reshape(-1)
    gt = ground_truth_from_messages({T.GT_OCCUPANCY: (5.0, grid)})
    assert gt is not None and gt.occupied is not None and OCCUPIED_FROM == 0.5
    assert gt.occupied[0, :5].tolist() == [False, False, False, True, True] and gt.occupied.sum() == 2
    row = _labels(msgs, 5.0, ModelConfig())
    assert row["occupancy"].dtype == np.uint8 and np.array_equal(row["occupancy"], gt.occupied)
    # Labels as the model trains on them: "none"/"free" and non-finite values at the caps.
    cfg = ModelConfig()
    assert (row["ttc"], row["distance"], row["target_speed"]) == (cfg.ttc_max, cfg.distance_max, cfg.speed_max)
    assert (row["risk"], row["action"], row["scenario"]) == (int(Risk.LOW), int(Action.KEEP_LANE), Scenario.FREE_ROAD)


# ------------------------------------------------------------------------------------------- scorer
def test_score_arrays_skips_missing_labels_and_caps_errors() -> None:
    cols = Columns(
        pred={"action": np.array([0, 1, 2, 3]), "risk": np.array([0, 2, 1, 1]),
              "ttc": np.array([4.0, math.inf, 3.0, 2.0]), "distance": np.array([60.0, 10.0, 5.0, 1.0])},
        true={"action": np.array([0, 1, NO_LABEL, 0]), "risk": np.array([0, 1, 2, NO_LABEL]),
              "ttc": np.array([math.inf, 5.0, math.nan, 2.0]), "distance": np.array([math.inf, 12.0, 5.0, math.nan])},
        occ_inter=np.array([2, 0, -1, 1]), occ_union=np.array([4, 0, -1, 2]),
    )
    t = score_arrays(cols)
    assert t["n"] == 4 and t["action_accuracy"] == pytest.approx(2 / 3)
    assert t["risk_accuracy"] == pytest.approx(1 / 3)
    assert (t["risk_under_rate"], t["risk_over_rate"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert t["ttc_mae"] == pytest.approx((6.0 + 5.0 + 0.0) / 3)  # inf counts at the 10 s cap
    assert t["distance_mae"] == pytest.approx((0.0 + 2.0 + 0.0) / 3)  # 60 m predicted = free at the 50 m cap
    assert t["occupancy_iou"] == pytest.approx(3 / 6)
    assert t["light_accuracy"] is None and t["target_speed_mae"] is None  # not given
    uncapped = score_arrays(cols, UNCAPPED)
    assert uncapped["distance_mae"] == pytest.approx(math.inf)
    assert score_arrays(cols, Caps(ttc=4.5))["ttc_mae"] == pytest.approx((0.5 + 0.0 + 0.0) / 3)


def test_groups_are_sorted_and_skip_none() -> None:
    assert {k: v.tolist() for k, v in group_indices(["b", None, "a", "b"]).items()} == {"a": [2], "b": [0, 3]}
    assert list(group_indices(np.array([5, -1, 0, 5]))) == [-1, 0, 5]
    cols = Columns(pred={"action": np.array([1, 1, 2])}, true={"action": np.array([1, 2, 2])})
    tables = score_groups(cols, ["x", "y", "x"])
    assert tables["x"]["n"] == 2 and tables["x"]["action_accuracy"] == 1.0 and tables["y"]["action_accuracy"] == 0.0
    assert score_arrays(cols.take(np.array([], np.intp)))["action_accuracy"] is None
    with pytest.raises(ValueError, match="different lengths"):
        Columns(pred={"action": np.zeros(2)}, true={"action": np.zeros(3)})


def test_occupancy_overlap_counts_cells_per_sample() -> None:
    pred = np.zeros((2, 3, 4), bool)
    true = np.zeros((2, 3, 4), bool)
    pred[0, 0, :3] = True
    true[0, 0, 1:] = True
    true[1, 2, 2] = True
    inter, union = occupancy_overlap(pred, true)
    assert inter.tolist() == [2, 0] and union.tolist() == [4, 1]


# --------------------------------------------------------------------------------------- tf_static
def _matrix(q: tuple[float, float, float, float]) -> np.ndarray:
    x, y, z, w = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


@pytest.mark.parametrize("rpy", [(0.0, 0.0, 0.0), (math.pi, 0.0, 0.0), (0.0, math.pi, 0.0), (0.0, 0.0, math.pi),
                                 (0.3, -0.2, 2.5), (-1.2, 0.4, -3.0)])
def test_quaternion_from_matrix_round_trips(rpy: tuple[float, float, float]) -> None:
    rot = Mount(roll=rpy[0], pitch=rpy[1], yaw=rpy[2]).matrix()[:3, :3]
    q = quaternion_from_matrix(rot)
    assert math.isclose(sum(c * c for c in q), 1.0)
    np.testing.assert_allclose(_matrix(q), rot, atol=1e-12)


def test_tf_static_names_every_sensor_frame_in_base_link() -> None:
    msg = tf_static_msg(rosbags_types(), RIG, 12.0)
    frames = {tf.child_frame_id: tf for tf in msg.transforms}
    assert set(frames) == {T.CAMERA_FRAME, T.LIDAR_FRAME, T.GNSS_FRAME}
    assert all(tf.header.frame_id == T.BASE_FRAME and tf.header.stamp.sec == 12 for tf in msg.transforms)
    lidar = frames[T.LIDAR_FRAME].transform
    m = RIG.lidar_mount.matrix()
    assert (lidar.translation.x, lidar.translation.y, lidar.translation.z) == tuple(float(v) for v in m[:3, 3])
    q = frames[T.CAMERA_FRAME].transform.rotation
    np.testing.assert_allclose(_matrix((q.x, q.y, q.z, q.w)), RIG.camera_optical_to_base()[:3, :3], atol=1e-12)


# ------------------------------------------------------------------------------ replay without tf_static
@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads() -> Any:
    """The torch backend sets the process-wide thread count; give other test modules theirs back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _transforms(msg: Any) -> dict[str, tuple[float, ...]]:
    return {tf.child_frame_id: (tf.transform.translation.x, tf.transform.translation.y, tf.transform.translation.z,
                                tf.transform.rotation.x, tf.transform.rotation.y, tf.transform.rotation.z,
                                tf.transform.rotation.w) for tf in msg.transforms}


def test_replay_of_a_bag_without_tf_static_writes_the_rig_frames(drive: Path, model_dir: Path, tmp_path: Path) -> None:
    recorded = [m.msg for m in read_bag(drive, topics=[T.TF_STATIC])]
    assert len(recorded) == 1
    bag = tmp_path / "no_tf"
    with BagWriter(bag) as w:
        for m in read_bag(drive):
            if m.topic == T.TF_STATIC:
                continue
            if m.raw is not None:
                w.write_raw(m.topic, m.stamp_sec, m.msgtype, m.raw)
            else:
                w.write(m.topic, m.stamp_sec, m.msg)
    assert T.TF_STATIC not in {m.topic for m in read_bag(bag)}
    opts = ReplayOptions(model_dir=model_dir, backend="torch", progress=False, rig=RIG, threads=1, copy_sensors=False)
    metrics = replay(bag, tmp_path / "out", opts)
    assert metrics["cycles"]["total"] >= 10 and metrics["outputs"]["messages"][T.TF_STATIC] == 1
    ((stamp, written),) = [(m.stamp_sec, m.msg) for m in read_bag(tmp_path / "out", topics=[T.TF_STATIC])]
    # Stamped at the first cycle, with the frames the synthetic drive recorded.
    assert stamp == pytest.approx(min(m.stamp_sec for m in read_bag(bag, topics=[T.LIDAR_POINTS])), abs=0.2)
    assert _transforms(written) == _transforms(recorded[0])
