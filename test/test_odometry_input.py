"""Optional ego-speed input (nav_msgs/Odometry, TwistWithCovarianceStamped): decoding and its checks, the
preference over GNSS while fresh, the source in the assessment and its messages, and replay's topic choice."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pymap3d
import pytest

from lmm_fusion.base import topics as T
from lmm_fusion.base.rig import SensorRig
from lmm_fusion.cycle.bagfeed import detect_sensor_topics
from lmm_fusion.cycle.ingest import SensorIngest
from lmm_fusion.cycle.pipeline import FusionPipeline
from lmm_fusion.cycle.sync import SensorSync
from lmm_fusion.io import create_fix, make_header, rosbags_types
from lmm_fusion.io.bags import BagWriter, read_bag
from lmm_fusion.io.errors import MessageError
from lmm_fusion.io.odometry import MAX_SPEED, create_odometry, read_odometry
from lmm_fusion.offline.replay import OUTPUT_TOPICS, ReplayOptions, replay
from lmm_fusion.ros import outputs as ro
from lmm_fusion.ros.diagnostics import FusionDiagnostics
from lmm_fusion.synth.drive import synthesize

TYPES = rosbags_types()
RIG = SensorRig()


def odo(stamp: float, vx: float, vy: float = 0.0, var: float = 0.01) -> Any:
    return create_odometry(TYPES, make_header(TYPES, stamp, "odom"), "base_link", vx, vy, 0.05, var)


def twist(stamp: float, vx: float, cov: np.ndarray | None = None) -> Any:
    c = np.zeros(36) if cov is None else cov
    return TYPES.TwistWithCovarianceStamped(
        header=make_header(TYPES, stamp, "base_link"),
        twist=TYPES.TwistWithCovariance(twist=TYPES.Twist(linear=TYPES.Vector3(x=vx, y=0.0, z=0.0),
                                                          angular=TYPES.Vector3(x=0.0, y=0.0, z=0.0)),
                                        covariance=c))


def test_reads_both_types() -> None:
    o = read_odometry(odo(3.0, 6.0, 8.0))
    assert (o.stamp, o.speed, o.forward, o.yaw_rate, o.frame_id) == (3.0, pytest.approx(10.0), 6.0, 0.05, "base_link")
    assert o.speed_std == pytest.approx(math.sqrt(0.02))
    t = read_odometry(twist(4.0, -2.0))
    assert (t.speed, t.forward, t.frame_id) == (2.0, -2.0, "base_link") and math.isnan(t.speed_std)  # reversing


@pytest.mark.parametrize(("msg", "match"), [
    (odo(1.0, math.nan), r"linear\.x=nan is not finite"),
    (odo(1.0, 5.0, math.inf), r"linear\.y=inf is not finite"),
    (odo(1.0, MAX_SPEED + 10.0), "implausible"),
    (odo(1.0, 5.0, var=-0.5), r"covariance\[0\]=-0.5: a variance cannot be negative"),
    (twist(1.0, 5.0, np.r_[np.zeros(35), -1.0]), r"covariance\[35\]"),
    (TYPES.Header(stamp=TYPES.Time(sec=1, nanosec=0), frame_id="x"), "no header.stamp|no twist"),
])
def test_bad_odometry_is_rejected_naming_the_field(msg: Any, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        read_odometry(msg)


def test_ingest_counts_bad_odometry_and_the_reason_reaches_the_snapshot() -> None:
    sync = SensorSync()
    ingest = SensorIngest(sync, RIG)
    assert ingest.on_message("odometry", odo(1.0, 5.0))
    assert not ingest.on_message("odometry", odo(1.1, math.nan))
    assert ingest.stats.rejected["odometry"] == 1 and "not finite" in ingest.stats.last_error["odometry"]
    snap = sync.snapshot(1.05)
    fresh = snap.frames["odometry"]
    assert fresh is not None and fresh.speed == pytest.approx(5.0) and not snap.mask.any()
    late = sync.snapshot(2.0)  # 1 s old > 0.5 s: stale, and the newer message was refused
    assert late.frames["odometry"] is None
    assert late.reasons["odometry"].startswith("stale (1.00 s old > 0.5 s); last message rejected: odometry:")
    assert "odometry" not in SensorSync().snapshot(1.0).frames  # never received: not in the snapshot


def _fixes(ingest: SensorIngest, t0: float, t1: float, speed: float) -> None:
    g = RIG.gnss
    for t in np.arange(t0, t1, 0.1):
        lat, lon, alt = pymap3d.enu2geodetic(speed * t, 0.0, 0.0, g.origin_lat, g.origin_lon, g.origin_alt)
        ingest.on_message("gnss", create_fix(TYPES, make_header(TYPES, float(t), "gnss"), lat, lon, alt, 0, 0.02))


def test_odometry_is_preferred_while_fresh_then_gnss(pipeline: FusionPipeline) -> None:
    """GNSS says 10 m/s, odometry 4 m/s: the guard and the message use odometry while it is fresh, GNSS
    after it goes stale, and odometry alone (GNSS without a motion estimate yet) still gives a speed."""
    sync = SensorSync()
    ingest = SensorIngest(sync, RIG)
    _fixes(ingest, 0.0, 2.0, 10.0)
    pipeline.preprocessor.reset()
    a = pipeline.cycle(sync.snapshot(1.95))
    assert (a.ego_speed_source, a.ego_speed) == ("gnss", pytest.approx(10.0, rel=0.02))
    ingest.on_message("odometry", odo(1.94, 4.0))
    a = pipeline.cycle(sync.snapshot(1.95))
    assert (a.ego_speed_source, a.ego_speed) == ("odometry", pytest.approx(4.0))
    msg = ro.scene_assessment(TYPES, a)
    assert (msg.ego_speed_source, msg.ego_speed) == ("odometry", pytest.approx(4.0))
    assert a.to_dict()["ego_speed_source"] == "odometry"
    _fixes(ingest, 2.0, 3.0, 10.0)
    a = pipeline.cycle(sync.snapshot(2.95))  # odometry 1 s old: stale
    assert a.ego_speed_source == "gnss" and a.ego_speed == pytest.approx(10.0, rel=0.02)
    # A cold GNSS (one fix, no estimate yet) with fresh odometry: the guard still knows the speed, and the
    # assessment says why GNSS is masked.
    cold_sync = SensorSync()
    cold = SensorIngest(cold_sync, RIG)
    _fixes(cold, 0.0, 0.05, 10.0)
    cold.on_message("odometry", odo(0.04, 4.0))
    cold_sync.update("camera", 0.04, np.zeros((90, 160, 3), np.uint8))
    pipeline.preprocessor.reset()
    a = pipeline.cycle(cold_sync.snapshot(0.05))
    assert a.valid and a.masked_names() == ["lidar", "gnss"]
    assert (a.ego_speed_source, a.ego_speed) == ("odometry", pytest.approx(4.0))
    reasons = a.masked_reasons()
    assert reasons["gnss"].startswith("no motion estimate yet: waiting for fixes")
    assert reasons["lidar"] == "no message yet"
    assert [m.reason for m in ro.scene_assessment(TYPES, a).modalities] == ["", "no message yet", reasons["gnss"]]


def test_diagnostics_say_where_the_speed_came_from(pipeline: FusionPipeline) -> None:
    sync = SensorSync()
    ingest = SensorIngest(sync, RIG)
    _fixes(ingest, 0.0, 2.0, 10.0)
    ingest.on_message("odometry", odo(1.94, 4.0))
    a = pipeline.cycle(sync.snapshot(1.95))
    d = FusionDiagnostics()
    d.set_ego(0.01, ingest.ego_reason, "")
    status = {s.name: s for s in d.statuses(2.0, sync.snapshot(1.95).ages, a)}["fusion_node: ego_speed"]
    assert status.level == ro.OK and status.message.startswith("odometry") and status.values["source"] == "odometry"
    d.set_ego(math.inf, "", "odometry: twist.twist.linear.x=nan is not finite")
    a_gnss = pipeline.cycle(SensorSync().snapshot(1.95))  # nothing: no speed at all
    status = {s.name: s for s in d.statuses(2.0, {}, a_gnss)}["fusion_node: ego_speed"]
    assert status.level == ro.WARN and "rejected: odometry: twist.twist.linear.x=nan" in status.message


def test_topic_detection_takes_odometry_but_never_ground_truth() -> None:
    types = {T.LIDAR_POINTS: "sensor_msgs/msg/PointCloud2", T.GT_EGO: "nav_msgs/msg/Odometry"}
    assert detect_sensor_topics(types) == {T.LIDAR_POINTS: "lidar"}
    types["/vehicle/odom"] = "nav_msgs/msg/Odometry"
    assert detect_sensor_topics(types)["/vehicle/odom"] == "odometry"
    types["/vehicle/twist"] = "geometry_msgs/msg/TwistWithCovarianceStamped"
    with pytest.raises(ValueError, match="odometry: 2 candidate topics"):
        detect_sensor_topics(types)
    assert detect_sensor_topics(types, {"odometry": "/vehicle/twist"})["/vehicle/twist"] == "odometry"


def test_replay_reports_the_odometry_source(tmp_path: Path) -> None:
    """A synthetic drive with the vehicle's speed added as wheel odometry (the true speed, 0.8x so it
    differs from GNSS): replay's SceneAssessments say "odometry" once the odometry arrives."""
    src = synthesize(tmp_path / "drive", 3.0, seed=11, progress=False, start=1.0)
    dst = tmp_path / "with_odometry"
    with BagWriter(dst) as w:
        for m in read_bag(src):
            w.write(m.topic, m.stamp_sec, m.msg)
            if m.topic == T.GT_EGO:
                w.write("/vehicle/odom", m.stamp_sec, odo(m.stamp_sec, 0.8 * float(m.msg.twist.twist.linear.x)))
    replay(dst, tmp_path / "out", ReplayOptions(backend="torch", progress=False, threads=1))
    scenes = [m.msg for m in read_bag(tmp_path / "out" / "outputs.mcap") if m.topic == OUTPUT_TOPICS["scene"]]
    sources = [s.ego_speed_source for s in scenes if s.valid]
    first = sources.index("odometry")  # the odometry starts with the labelled part, 1 s in
    assert len(sources) - first >= 15 and set(sources[first:]) == {"odometry"}, sources
    assert set(sources[:first]) <= {"gnss", ""}
