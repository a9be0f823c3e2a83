"""Nothing masked silently: each reason a modality is left out reaches the assessment, its message and
/diagnostics (stale, another clock, no transform, no motion estimate yet, a rejected jump)."""

from __future__ import annotations

import math

import numpy as np
import pymap3d
import pytest

from lmm_fusion.base.rig import SensorRig
from lmm_fusion.cycle.ingest import SensorIngest
from lmm_fusion.cycle.pipeline import FusionPipeline
from lmm_fusion.cycle.sync import SensorSync, SyncConfig
from lmm_fusion.io import create_cloud, create_fix, make_header, rosbags_types
from lmm_fusion.ros import outputs as ro
from lmm_fusion.ros.diagnostics import FusionDiagnostics, age_check

TYPES = rosbags_types()
RIG = SensorRig()
IMAGE = np.zeros((90, 160, 3), np.uint8)


def test_sync_says_why_each_sensor_is_masked() -> None:
    s = SensorSync(SyncConfig(future_tolerance=0.5))
    s.update("camera", 9.0, IMAGE)  # 1.05 s old at 10.05
    s.update("gnss", 10.0, "fix")
    assert not s.update("lidar", 20.0, "points", now=10.0)  # 10 s ahead: refused
    r = s.snapshot(10.05).reasons
    assert r["camera"] == "stale (1.05 s old > 0.5 s)"
    assert r["gnss"] == ""
    assert r["lidar"] == ("no usable message (stamp 10.00 s ahead of the node clock (> 0.5 s): sensor clock not "
                          "synchronised?)")
    assert SensorSync().snapshot(1.0).reasons == dict.fromkeys(("camera", "lidar", "gnss"), "no message yet")


def test_a_bag_without_use_sim_time_gets_a_hint() -> None:
    """Bag stamps years behind the wall clock: not "stale (83869165 s old)" alone, but what to do."""
    s = SensorSync()
    s.update("lidar", 1.7e9 - 83_869_165.0, "points")
    reason = s.snapshot(1.7e9).reasons["lidar"]
    assert reason == ("stale: stamps are 83869165 s behind the node clock: replaying a bag? set use_sim_time "
                      "(else the sensor clock is not synchronised)")
    level, message = age_check(83_869_165.0, 0.3, 1.0)
    assert level == ro.ERROR and "set use_sim_time" in message
    assert age_check(2.0, 0.3, 1.0) == (ro.ERROR, "stale (2.00 s old)")  # late, not another clock


def _fix(t: float, east: float) -> object:
    g = RIG.gnss
    lat, lon, alt = pymap3d.enu2geodetic(east, 0.0, 0.0, g.origin_lat, g.origin_lon, g.origin_alt)
    return create_fix(TYPES, make_header(TYPES, t, "gnss"), lat, lon, alt, 0, 0.02)


def test_reasons_reach_assessment_message_and_diagnostics(pipeline: FusionPipeline) -> None:
    sync = SensorSync()
    ingest = SensorIngest(sync, RIG, extrinsics=pipeline.extrinsics)
    for k in range(12):  # 10 m/s east, 10 Hz
        ingest.on_message("gnss", _fix(k * 0.1, k * 1.0))
    assert not ingest.on_message("gnss", _fix(1.2, 1000.0))  # a 1 km jump: rejected
    pts = np.array([[10.0, 0.0, 1.0, 0.5]], np.float32)
    ingest.on_message("lidar", create_cloud(TYPES, make_header(TYPES, 2.25, "velodyne_top"), pts,
                                            ("x", "y", "z", "intensity")))
    sync.update("camera", 2.25, IMAGE)
    a = pipeline.cycle(sync.snapshot(2.3))
    assert a.valid and a.masked_names() == ["lidar", "gnss"]
    why = a.masked_reasons()
    assert why["lidar"] == "no transform from 'velodyne_top' to base_link"
    assert why["gnss"].startswith("stale (1.20 s old > 1 s); last message rejected: ") and "implausible" in why["gnss"]
    msg = ro.scene_assessment(TYPES, a)
    assert [m.reason for m in msg.modalities] == ["", why["lidar"], why["gnss"]]
    d = FusionDiagnostics()
    statuses = {s.name: s for s in d.statuses(2.3, dict(sync.snapshot(2.3).ages), a)}
    lidar = statuses["fusion_node: lidar"]
    assert "masked: no transform from 'velodyne_top' to base_link" in lidar.message
    assert lidar.values["masked_reason"] == why["lidar"]
    assessment = statuses["fusion_node: assessment"]
    assert assessment.level == ro.WARN and "lidar masked (no transform" in assessment.message
    assert "gnss masked (stale" in assessment.message


def test_no_motion_estimate_yet_is_a_reason(pipeline: FusionPipeline) -> None:
    sync = SensorSync()
    ingest = SensorIngest(sync, RIG)
    ingest.on_message("gnss", _fix(1.0, 0.0))
    sync.update("camera", 1.0, IMAGE)
    a = pipeline.cycle(sync.snapshot(1.05))
    assert a.masked_reasons()["gnss"] == "no motion estimate yet: waiting for fixes (1 of 4)"
    invalid = pipeline.cycle(SensorSync().snapshot(1.0))
    assert not invalid.valid and set(invalid.masked_reasons().values()) == {"no message yet"}
    assert all(math.isinf(m.age) for m in invalid.modalities)


@pytest.mark.parametrize("used", [True, False])
def test_a_used_modality_has_no_reason(used: bool) -> None:
    from lmm_fusion.cycle.assessment import modality_states

    states = modality_states(np.array([used, True, True]), {}, reasons={"camera": "stale (1 s)"})
    assert states[0].reason == ("" if used else "stale (1 s)")
