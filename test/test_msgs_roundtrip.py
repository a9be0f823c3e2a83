"""Messages built with rclpy classes and with rosbags classes read back identically; CDR round trips;
lmm_fusion/msg/* over DDS in one process; the label enums equal the message constants."""

from __future__ import annotations

import os
import random
import time
from typing import Any

import numpy as np
import pytest

from lmm_fusion.base.vocabulary import Action, Light, Risk
from lmm_fusion.io import (
    create_cloud,
    create_compressed_image,
    create_fix,
    create_image,
    make_header,
    make_time,
    rclpy_types,
    read_fix,
    read_image,
    read_points,
    rosbags_types,
    typestore,
)
from lmm_fusion.io.msgtypes import MsgTypes, ros_type_name

OUSTER = np.dtype({
    "names": ["x", "y", "z", "intensity", "t", "ring"],
    "formats": ["<f4", "<f4", "<f4", "<f4", "<u4", "<u2"],
    "offsets": [0, 4, 8, 16, 20, 26],
    "itemsize": 48,
})


def _inputs() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    xyzi = rng.normal(size=(500, 4)).astype(np.float32)
    xyzi[7, 1] = np.nan
    ouster = np.zeros(300, OUSTER)
    for name in ("x", "y", "z", "intensity"):
        ouster[name] = rng.normal(size=300)
    ouster["ring"] = rng.integers(0, 128, 300)
    return {"xyzi": xyzi, "ouster": ouster, "rgb": rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)}


def _build(types: MsgTypes, x: dict[str, Any]) -> dict[str, Any]:
    h = make_header(types, 1234.5678, "sensor")
    return {
        "cloud": create_cloud(types, h, x["xyzi"], ("x", "y", "z", "intensity")),
        "ouster": create_cloud(types, h, x["ouster"]),
        "rgb8": create_image(types, h, x["rgb"], "rgb8"),
        "bgr8": create_image(types, h, x["rgb"], "bgr8"),
        "mono8": create_image(types, h, x["rgb"], "mono8"),
        "jpeg": create_compressed_image(types, h, x["rgb"], "jpeg", 80),
        "png": create_compressed_image(types, h, x["rgb"], "png"),
        "fix": create_fix(types, h, 48.1, 11.6, 512.25, 1, [0.1, 0, 0, 0, 0.2, 0, 0, 0, 0.3]),
    }


def _read(name: str, msg: Any) -> Any:
    if name == "cloud":
        return read_points(msg)
    if name == "ouster":
        return read_points(msg, ("x", "y", "z", "intensity", "ring", "t"))
    if name == "fix":
        f = read_fix(msg)
        return np.array([f.stamp, f.lat, f.lon, f.alt, f.status, f.covariance_type, *f.covariance])
    return read_image(msg)


NAMES = ["cloud", "ouster", "rgb8", "bgr8", "mono8", "jpeg", "png", "fix"]


@pytest.fixture(scope="module")
def built() -> dict[str, dict[str, Any]]:
    x = _inputs()
    return {"rosbags": _build(rosbags_types(), x), "rclpy": _build(rclpy_types(), x)}


@pytest.mark.parametrize("name", NAMES)
def test_rclpy_and_rosbags_messages_read_identically(built: dict[str, dict[str, Any]], name: str) -> None:
    a = _read(name, built["rosbags"][name])
    b = _read(name, built["rclpy"][name])
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
    if name == "cloud":
        assert a.shape == (499, 4)  # the NaN point is dropped by both


@pytest.mark.parametrize("name", NAMES)
def test_rosbags_cdr_round_trip(built: dict[str, dict[str, Any]], name: str) -> None:
    store = typestore()
    msg = built["rosbags"][name]
    msgtype = ros_type_name(msg)
    back = store.deserialize_cdr(store.serialize_cdr(msg, msgtype), msgtype)
    np.testing.assert_array_equal(_read(name, back), _read(name, msg))


@pytest.mark.parametrize("name", NAMES)
def test_rclpy_serialised_bytes_deserialise_with_rosbags(built: dict[str, dict[str, Any]], name: str) -> None:
    from rclpy.serialization import serialize_message

    msg = built["rclpy"][name]
    back = typestore().deserialize_cdr(serialize_message(msg), ros_type_name(msg))
    np.testing.assert_array_equal(_read(name, back), _read(name, msg))


def _scene(types: MsgTypes) -> Any:
    mods = [types.ModalityStatus(name=n, used=u, age=a, attention_share=s, stamp=make_time(types, t),
                                 reason="" if u else "stale (3.00 s old > 1 s)")
            for n, u, a, s, t in (("camera", True, 0.05, 0.5, 42.45), ("lidar", True, 0.02, 0.4, 42.5),
                                  ("gnss", False, 3.0, 0.0, 0.0))]
    return types.SceneAssessment(
        header=make_header(types, 42.5, "base_link"),
        risk_level=int(Risk.HIGH),
        risk_probabilities=np.array([0.1, 0.2, 0.7], np.float32),
        time_to_collision=np.float32(1.5),
        nearest_obstacle_distance=np.float32(12.25),
        traffic_light_state=int(Light.RED),
        traffic_light_probabilities=np.array([0.05, 0.9, 0.03, 0.02], np.float32),
        modalities=mods,
        ego_speed=np.float32(7.5),
        ego_speed_source="odometry",
        degraded=True,
        valid=True,
    )


def test_scene_assessment_cdr_round_trip() -> None:
    store = typestore()
    msg = _scene(rosbags_types())
    back = store.deserialize_cdr(store.serialize_cdr(msg, "lmm_fusion/msg/SceneAssessment"),
                                 "lmm_fusion/msg/SceneAssessment")
    assert back.risk_level == Risk.HIGH and [m.name for m in back.modalities] == ["camera", "lidar", "gnss"]
    # Each modality's source stamp survives (zero for the unused one).
    assert [(m.stamp.sec, m.stamp.nanosec) for m in back.modalities] == [(42, 450_000_000), (42, 500_000_000), (0, 0)]
    assert [m.reason for m in back.modalities] == ["", "", "stale (3.00 s old > 1 s)"]
    assert (back.ego_speed, back.ego_speed_source) == (7.5, "odometry")
    np.testing.assert_array_equal(back.risk_probabilities, msg.risk_probabilities)


@pytest.mark.parametrize(
    ("enum", "msg_name", "prefix"),
    [(Risk, "SceneAssessment", "RISK_"), (Light, "SceneAssessment", "LIGHT_"), (Action, "ActionSuggestion", "ACTION_")],
)
@pytest.mark.parametrize("kind", ["rclpy", "rosbags"])
def test_label_enums_equal_message_constants(enum: Any, msg_name: str, prefix: str, kind: str) -> None:
    cls = getattr(rclpy_types() if kind == "rclpy" else rosbags_types(), msg_name)
    constants = {k[len(prefix):]: getattr(cls, k) for k in dir(cls) if k.startswith(prefix) and k.isupper()}
    assert constants == {m.name: m.value for m in enum}


def test_scene_assessment_over_dds_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    domain = random.randint(100, 200)  # away from the default domain and other runs
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    monkeypatch.delenv("ROS_LOCALHOST_ONLY", raising=False)  # deprecated in Jazzy; would conflict
    import rclpy
    from lmm_fusion.msg import SceneAssessment
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor

    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain)
    received: list[Any] = []
    try:
        node = rclpy.create_node(f"io_roundtrip_{os.getpid()}", context=ctx)
        pub = node.create_publisher(SceneAssessment, "/test/scene_assessment", 10)
        node.create_subscription(SceneAssessment, "/test/scene_assessment", received.append, 10)
        executor = SingleThreadedExecutor(context=ctx)
        executor.add_node(node)
        msg = _scene(rclpy_types())
        deadline = time.monotonic() + 15.0
        while not received and time.monotonic() < deadline:  # bounded: discovery takes a moment
            pub.publish(msg)
            executor.spin_once(timeout_sec=0.1)
        executor.shutdown()
        node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
    assert received, f"no SceneAssessment received on domain {domain} within 15 s"
    got = received[0]
    assert got.risk_level == SceneAssessment.RISK_HIGH and got.traffic_light_state == SceneAssessment.LIGHT_RED
    assert [m.name for m in got.modalities] == ["camera", "lidar", "gnss"] and got.modalities[2].used is False
    np.testing.assert_allclose(got.risk_probabilities, [0.1, 0.2, 0.7], rtol=1e-6)
    assert got.header.stamp.sec == 42 and got.header.stamp.nanosec == 500_000_000
    assert (got.modalities[0].stamp.sec, got.modalities[0].stamp.nanosec) == (42, 450_000_000)
