"""Output message builders and diagnostics, for both rosbags and rclpy message classes (no rclpy.init)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message

from lmm_fusion.base.grid import OCCUPANCY_GRID
from lmm_fusion.base.vocabulary import Action
from lmm_fusion.cycle.assessment import Assessment, decode, invalid
from lmm_fusion.cycle.safety import apply_guard
from lmm_fusion.io.msgtypes import MsgTypes, rclpy_types, rosbags_types, typestore
from lmm_fusion.ros import outputs as ro
from lmm_fusion.ros.diagnostics import DiagnosticsConfig, FusionDiagnostics, age_check

KINDS = ["rosbags", "rclpy"]


def types_of(kind: str) -> MsgTypes:
    return rosbags_types() if kind == "rosbags" else rclpy_types()


def roundtrip(kind: str, msg: Any) -> Any:
    """Serialise to CDR and back, so a builder that leaves a field wrongly typed fails here."""
    if kind == "rosbags":
        store = typestore()
        return store.deserialize_cdr(store.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__)
    return deserialize_message(serialize_message(msg), type(msg))


def sample(mask: tuple[bool, bool, bool] = (True, True, True)) -> Assessment:
    occ = np.full((1, 32, 64), -20.0, np.float32)
    occ[0, 16, 20] = 20.0  # one occupied cell
    out = {"risk_logits": np.array([[0.0, 1.0, 3.0]]), "action_logits": np.array([[3.0, 1, 0, 0, 0, 0]]),
           "light_logits": np.array([[0.0, 4.0, 0, 0]]), "target_speed": np.array([14.0]),
           "ttc": np.array([3.0]), "obstacle_distance": np.array([20.0]), "occupancy_logits": occ,
           "modality_attention": np.array([[0.2, 0.5, 0.3]])}
    a = decode(out, 1234.5, np.array(mask), {"camera": 0.02, "lidar": 0.04, "gnss": math.inf}, 10.0, 50.0)
    return apply_guard(a, 18.0, 10.0)


def _sec(t: Any) -> float:
    return t.sec + t.nanosec * 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_carry_the_stamps_of_the_data_they_used(kind: str) -> None:
    """header.stamp = the newest frame used, on every output; ModalityStatus.stamp = each used frame's
    stamp (cycle time - age), zero when unused; with no frame used, the cycle time."""
    t = types_of(kind)
    a = sample(mask=(True, False, True))  # camera 0.02 s old, LiDAR masked (0.04 s), GNSS never received
    a = replace(a, modalities=[replace(a.modalities[0], age=0.05), a.modalities[1],
                               replace(a.modalities[2], used=True, age=0.11)])
    scene = roundtrip(kind, ro.scene_assessment(t, a))
    assert [_sec(m.stamp) for m in scene.modalities] == pytest.approx([1234.45, 0.0, 1234.39], abs=1e-6)
    assert (scene.modalities[1].stamp.sec, scene.modalities[1].stamp.nanosec) == (0, 0)
    headers = [scene.header, roundtrip(kind, ro.action_suggestion(t, a)).header,
               roundtrip(kind, ro.occupancy_grid(t, a)).header,
               *(mk.header for mk in roundtrip(kind, ro.markers(t, a)).markers)]
    assert all(_sec(h.stamp) == pytest.approx(1234.45, abs=1e-6) for h in headers)
    # The cycle time is recoverable from a used modality: stamp + age.
    assert _sec(scene.modalities[0].stamp) + scene.modalities[0].age == pytest.approx(1234.5, abs=1e-5)
    none_used = invalid(99.25, np.zeros(3, bool), {"camera": 2.0, "lidar": math.inf, "gnss": 1.0})
    scene = roundtrip(kind, ro.scene_assessment(t, none_used))
    assert _sec(scene.header.stamp) == pytest.approx(99.25)
    assert all((m.stamp.sec, m.stamp.nanosec) == (0, 0) for m in scene.modalities)
    assert _sec(roundtrip(kind, ro.action_suggestion(t, none_used)).header.stamp) == pytest.approx(99.25)


@pytest.mark.parametrize("kind", KINDS)
def test_scene_assessment_fields(kind: str) -> None:
    a = sample(mask=(True, True, False))
    m = roundtrip(kind, ro.scene_assessment(types_of(kind), a))
    assert m.header.frame_id == "base_link"
    # The newest frame used: LiDAR, 0.02 s before the cycle at 1234.5 s (the unused GNSS does not count).
    assert m.header.stamp.sec == 1234 and m.header.stamp.nanosec == 480_000_000
    assert m.risk_level == 2 and m.traffic_light_state == 1
    assert float(np.sum(m.risk_probabilities)) == pytest.approx(1.0, abs=1e-5)
    assert [s.name for s in m.modalities] == ["camera", "lidar", "gnss"]
    assert [s.used for s in m.modalities] == [True, True, False]
    assert math.isinf(m.modalities[2].age) and m.modalities[2].attention_share == 0.0
    assert m.degraded and m.valid
    assert m.nearest_obstacle_distance == pytest.approx(18.0)


@pytest.mark.parametrize("kind", KINDS)
def test_action_suggestion_fields(kind: str) -> None:
    a = sample()
    m = roundtrip(kind, ro.action_suggestion(types_of(kind), a))
    assert m.action == int(a.action)
    assert m.safety_override == a.safety_override
    assert m.target_speed == pytest.approx(a.target_speed, rel=1e-6)
    assert 0.0 <= m.confidence <= 1.0
    assert m.rationale == a.rationale and m.rationale


@pytest.mark.parametrize("kind", KINDS)
def test_occupancy_grid_layout(kind: str) -> None:
    m = roundtrip(kind, ro.occupancy_grid(types_of(kind), sample()))
    g = OCCUPANCY_GRID
    assert (m.info.width, m.info.height) == (g.nx, g.ny)
    assert m.info.resolution == pytest.approx(g.cell)
    assert (m.info.origin.position.x, m.info.origin.position.y) == (g.x_min, g.y_min)
    data = np.asarray(m.data, np.int8).reshape(g.ny, g.nx)
    assert data[16, 20] == 100 and data[0, 0] == 0
    assert m.header.frame_id == "base_link"
    empty = roundtrip(kind, ro.occupancy_grid(types_of(kind), invalid(1.0, np.zeros(3, bool), {})))
    assert set(np.asarray(empty.data).tolist()) == {-1}


@pytest.mark.parametrize("kind", KINDS)
def test_markers(kind: str) -> None:
    a = sample()
    m = roundtrip(kind, ro.markers(types_of(kind), a))
    by_ns: dict[str, list[Any]] = {}
    for mk in m.markers:
        by_ns.setdefault(mk.ns, []).append(mk)
        assert mk.header.frame_id == "base_link"
    assert set(by_ns) == {"risk", "action", "ego", "path", "nearest_obstacle", "modality_attention", "modality_label"}
    assert "risk high" in by_ns["risk"][0].text
    assert a.action.name.lower() in by_ns["action"][0].text
    arrow = by_ns["path"][0]
    assert arrow.type == ro.ARROW and len(arrow.points) == 2 and arrow.points[1].x > arrow.points[0].x
    assert by_ns["nearest_obstacle"][0].action == ro.MARKER_ADD
    bars = by_ns["modality_attention"]
    assert [b.id for b in bars] == [0, 1, 2]
    assert bars[1].scale.z > bars[0].scale.z  # lidar has the larger attention share
    free = roundtrip(kind, ro.markers(types_of(kind), invalid(1.0, np.zeros(3, bool), {})))
    obstacle = next(mk for mk in free.markers if mk.ns == "nearest_obstacle")
    assert obstacle.action == ro.MARKER_DELETE
    assert "no assessment" in next(mk for mk in free.markers if mk.ns == "risk").text


def test_lane_change_arrow_goes_sideways() -> None:
    a = replace(sample(), action=Action.CHANGE_LANE_LEFT)
    m = ro.markers(rosbags_types(), a)
    arrow = next(mk for mk in m.markers if mk.ns == "path")
    assert arrow.points[1].y > 3.0


@pytest.mark.parametrize("kind", KINDS)
def test_diagnostic_array(kind: str) -> None:
    d = FusionDiagnostics(DiagnosticsConfig(rate_hz=10.0), node_name="fusion_node")
    for i in range(20):  # 2 s of lidar at 10 Hz, camera silent, gnss at 2 Hz
        t = 100.0 + i * 0.1
        d.on_message("lidar", t)
        if i % 5 == 0:
            d.on_message("gnss", t)
        d.on_cycle(t, 150.0 if i == 19 else 10.0)
    d.set_rejected("lidar", 3, 101.9)
    now = 101.95
    statuses = d.statuses(now, {"camera": math.inf, "lidar": 0.05, "gnss": 0.1}, sample())
    m = roundtrip(kind, ro.diagnostic_array(types_of(kind), now, statuses))
    by_name = {s.name: s for s in m.status}
    cam, lidar, gnss = (by_name[f"fusion_node: {s}"] for s in ("camera", "lidar", "gnss"))
    assert ro.level_of(cam) == ro.ERROR
    assert ro.level_of(lidar) == ro.WARN and "rejected" in lidar.message
    assert {kv.key: kv.value for kv in lidar.values}["rejected"] == "3"
    assert ro.level_of(gnss) == ro.WARN and "rate too low" in gnss.message
    cycle = by_name["fusion_node: cycle"]
    vals = {kv.key: kv.value for kv in cycle.values}
    assert vals["deadline_misses"] == "1" and ro.level_of(cycle) == ro.WARN
    assert float(vals["latency_p50_ms"]) == pytest.approx(10.0)
    assert float(vals["rate_hz"]) == pytest.approx(10.0, abs=0.6)
    assert "fusion_node: assessment" in by_name


def test_age_check_levels() -> None:
    assert age_check(0.05, 0.3, 1.0)[0] == ro.OK
    assert age_check(0.5, 0.3, 1.0)[0] == ro.WARN
    assert age_check(2.0, 0.3, 1.0)[0] == ro.ERROR
    assert age_check(math.inf, 0.3, 1.0)[0] == ro.ERROR
    assert age_check(-3.0, 0.3, 1.0)[0] == ro.ERROR
