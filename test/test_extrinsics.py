"""Sensor frames -> base_link: the transform store, and the same drive replayed with three LiDAR mountings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lmm_fusion.base import topics as T
from lmm_fusion.base.rig import SensorRig, transform_points
from lmm_fusion.cycle.bagfeed import iter_cycles
from lmm_fusion.cycle.extrinsics import Extrinsics, ExtrinsicsError
from lmm_fusion.cycle.ingest import SensorIngest
from lmm_fusion.cycle.safety import SafetyConfig, lane_free_distance
from lmm_fusion.cycle.sync import SensorSync
from lmm_fusion.io import create_cloud, read_points, rosbags_types
from lmm_fusion.io.bags import BagWriter, read_bag
from lmm_fusion.io.common import make_header
from lmm_fusion.io.tf import quaternion_from_matrix
from lmm_fusion.offline.replay import OUTPUT_TOPICS, ReplayOptions, replay
from lmm_fusion.synth.drive import synthesize

TYPES = rosbags_types()
RIG = SensorRig()
FIELDS = ("x", "y", "z", "intensity")


def _yaw(deg: float, t: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    a = math.radians(deg)
    m = np.eye(4)
    m[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    m[:3, 3] = t
    return m


def _tf(parent: str, child: str, m: np.ndarray, stamp: float = 0.0) -> object:
    qx, qy, qz, qw = quaternion_from_matrix(m[:3, :3])
    return TYPES.TransformStamped(
        header=make_header(TYPES, stamp, parent), child_frame_id=child,
        transform=TYPES.Transform(translation=TYPES.Vector3(x=float(m[0, 3]), y=float(m[1, 3]), z=float(m[2, 3])),
                                  rotation=TYPES.Quaternion(x=qx, y=qy, z=qz, w=qw)))


def test_chain_identity_and_unknown_frame() -> None:
    ex = Extrinsics()
    kit, lid = _yaw(10.0, (1.0, 0.0, 1.5)), _yaw(180.0, (0.2, 0.0, 0.3))
    assert ex.update_tf(TYPES.TFMessage(transforms=[_tf("base_link", "sensor_kit", kit),
                                                    _tf("sensor_kit", "os_lidar", lid)])) == 2
    np.testing.assert_allclose(ex.lookup("os_lidar"), kit @ lid, atol=1e-12)
    np.testing.assert_array_equal(ex.lookup("base_link"), np.eye(4))
    pts = np.array([[1.0, 2.0, 3.0, 9.0]], np.float32)
    np.testing.assert_array_equal(ex.to_base(pts, "base_link"), pts[:, :3])  # used as is
    with pytest.raises(ExtrinsicsError, match="no transform from 'velodyne' to base_link"):
        ex.lookup("velodyne")
    with pytest.raises(ExtrinsicsError, match=r"empty header\.frame_id"):
        ex.lookup("")
    # The rig's own frames only with the fallback allowed.
    with pytest.raises(ExtrinsicsError, match="'lidar'"):
        ex.lookup(T.LIDAR_FRAME)
    np.testing.assert_allclose(Extrinsics(RIG, rig_fallback=True).lookup(T.LIDAR_FRAME), RIG.lidar_mount.matrix())


def test_precedence_tf_then_params_then_rig() -> None:
    ex = Extrinsics(RIG, rig_fallback=True, params={T.LIDAR_FRAME: _yaw(90.0)})
    np.testing.assert_allclose(ex.lookup(T.LIDAR_FRAME), _yaw(90.0))  # params over the rig
    ex.update_tf(TYPES.TFMessage(transforms=[_tf("base_link", T.LIDAR_FRAME, _yaw(45.0, (1.0, 2.0, 3.0)))]))
    np.testing.assert_allclose(ex.lookup(T.LIDAR_FRAME), _yaw(45.0, (1.0, 2.0, 3.0)), atol=1e-12)  # tf first
    # A chain whose top is only known from parameters composes with them.
    ex.set("sensor_kit", _yaw(0.0, (1.0, 0.0, 0.0)))
    ex.update_tf(TYPES.TFMessage(transforms=[_tf("sensor_kit", "os_lidar", _yaw(180.0))]))
    np.testing.assert_allclose(ex.lookup("os_lidar"), _yaw(180.0, (1.0, 0.0, 0.0)), atol=1e-12)
    ex.update_tf(TYPES.TFMessage(transforms=[_tf("a", "b", np.eye(4)), _tf("b", "a", np.eye(4))]))
    with pytest.raises(ExtrinsicsError, match="loop"):
        ex.lookup("a")


# ---------------------------------------------------------------------- three mountings of one drive
OS_KIT = RIG.lidar_mount.matrix()  # base_link -> sensor_kit: where the rig's LiDAR is
OS_YAW = _yaw(180.0)  # sensor_kit -> os_lidar: an Ouster frame turned half a turn


def _remount(src: Path, dst: Path, mode: str) -> Path:
    """Rewrite the drive's clouds (and /tf_static): ``base_link`` (points pre-transformed), ``os_lidar``
    (yawed 180 deg, with the matching /tf_static chain) or ``unknown`` (a frame with no transform)."""
    to_base = RIG.lidar_mount.matrix()
    lidar_to_os = np.linalg.inv(OS_YAW)
    with BagWriter(dst) as w:
        for m in read_bag(src):
            msg = m.msg
            if m.topic == T.LIDAR_POINTS:
                pts = read_points(msg, FIELDS)
                frame = {"base_link": "base_link", "os_lidar": "os_lidar", "unknown": "velodyne_top"}[mode]
                xyz = {"base_link": lambda p: transform_points(to_base, p),
                       "os_lidar": lambda p: transform_points(lidar_to_os, p),
                       "unknown": lambda p: p[:, :3]}[mode](pts)
                msg = create_cloud(TYPES, make_header(TYPES, m.stamp_sec, frame),
                                   np.column_stack([xyz, pts[:, 3]]).astype(np.float32), FIELDS)
            elif m.topic == T.TF_STATIC and mode == "os_lidar":
                msg = TYPES.TFMessage(transforms=[*msg.transforms, _tf("base_link", "sensor_kit", OS_KIT, m.stamp_sec),
                                                  _tf("sensor_kit", "os_lidar", OS_YAW, m.stamp_sec)])
            w.write(m.topic, m.stamp_sec, msg)
    return dst


@pytest.fixture(scope="module")
def drives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("mountings")
    rig_bag = synthesize(base / "rig", 6.0, seed=5, progress=False, start=1.0)
    out = {"rig": rig_bag}
    for mode in ("base_link", "os_lidar", "unknown"):
        out[mode] = _remount(rig_bag, base / mode, mode)
    return out


def _free_distances(bag: Path) -> np.ndarray:
    """The guard's LiDAR free distance [m] per cycle, the cloud placed by its frame id and the bag's /tf_static."""
    ex = Extrinsics(RIG, rig_fallback=True)
    ingest = SensorIngest(SensorSync(), RIG, extrinsics=ex)
    out = []
    for c in iter_cycles(bag, ingest, with_ground_truth=False):
        pts = c.snapshot.frames.get("lidar")
        out.append(math.nan if pts is None else
                   lane_free_distance(ex.to_base(pts, c.snapshot.frame_ids.get("lidar")), SafetyConfig()))
    return np.array(out)


def test_three_mountings_see_the_same_lane(drives: dict[str, Path]) -> None:
    ref = _free_distances(drives["rig"])
    assert (~np.isnan(ref)).sum() > 30 and np.isfinite(ref).any()  # clouds, and something in the lane
    for mode in ("base_link", "os_lidar"):
        np.testing.assert_allclose(_free_distances(drives[mode]), ref, atol=1e-3, err_msg=mode)


def _actions(out: Path) -> list[int]:
    return [int(m.msg.action) for m in read_bag(out / "outputs.mcap") if m.topic == OUTPUT_TOPICS["action"]]


def test_replay_actions_agree_across_mountings_and_unknown_frame_masks(drives: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """The shipped model through replay: >= 98 % of published actions identical across the mountings
    (the BEV cells can differ only by float rounding at cell edges); a cloud in an unknown frame masks
    the LiDAR, with the reason in metrics.json."""
    opts = ReplayOptions(backend="torch", progress=False, threads=1)
    acts = {}
    for mode in ("rig", "base_link", "os_lidar", "unknown"):
        replay(drives[mode], tmp_path / mode, opts)
        acts[mode] = _actions(tmp_path / mode)
    metrics = {mode: json.loads((tmp_path / mode / "metrics.json").read_text()) for mode in acts}
    assert len(acts["rig"]) >= 50
    for mode in ("base_link", "os_lidar"):
        agree = np.mean(np.array(acts[mode]) == np.array(acts["rig"]))
        assert agree >= 0.98, (mode, agree)
        assert "frame_errors" not in metrics[mode]
    errors = metrics["unknown"]["frame_errors"]
    assert list(errors) == ["lidar: no transform from 'velodyne_top' to base_link"]
    assert errors[next(iter(errors))] >= len(acts["unknown"]) - 5  # every cycle after the first cloud
    assert metrics["unknown"]["cycles"]["degraded"] == metrics["unknown"]["cycles"]["total"]
    assert metrics["rig"]["cycles"]["degraded"] < metrics["rig"]["cycles"]["total"] // 2
