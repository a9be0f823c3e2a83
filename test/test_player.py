"""`lmm-fusion play` as a real process over loopback DDS: pace, /clock, QoS, every topic type."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, PointCloud2
from std_msgs.msg import String

from lmm_fusion.base import topics
from lmm_fusion.io import create_cloud, create_image, make_header, rosbags_types
from lmm_fusion.io.bags import BagWriter
from lmm_fusion.tools.harness import Processes, loopback_env, wait_until

pytestmark = [pytest.mark.dds]

T0 = 1_700_000_000.0
DURATION = 1.5


@pytest.fixture(scope="module")
def small_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    t = rosbags_types()
    path = tmp_path_factory.mktemp("bag") / "drive"
    rgb = np.zeros((24, 32, 3), np.uint8)
    pts = np.zeros((10, 4), np.float32)
    with BagWriter(path) as bag:
        for i in range(16):  # 10 Hz over 1.5 s
            s = T0 + i * 0.1
            bag.write(topics.LIDAR_POINTS, s, create_cloud(t, make_header(t, s, "lidar"), pts,
                                                             ("x", "y", "z", "intensity")))
            bag.write(topics.CAMERA_IMAGE, s, create_image(t, make_header(t, s, "camera_optical"), rgb))
            bag.write(topics.GT_SCENARIO, s, t.String(data="FREE_ROAD"))
    return path


def test_plays_at_recorded_pace_with_clock(small_bag: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = loopback_env()
    for key in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE"):
        monkeypatch.setenv(key, env[key])
    ctx = Context()
    rclpy.init(context=ctx, domain_id=int(env["ROS_DOMAIN_ID"]))
    node = rclpy.create_node("player_probe", context=ctx)
    got: dict[str, list[tuple[float, Any]]] = {"lidar": [], "image": [], "clock": [], "scenario": []}

    def rec(key: str) -> Any:
        return lambda m: got[key].append((time.monotonic(), m))

    node.create_subscription(PointCloud2, topics.LIDAR_POINTS, rec("lidar"), qos_profile_sensor_data)
    node.create_subscription(Image, topics.CAMERA_IMAGE, rec("image"), qos_profile_sensor_data)
    node.create_subscription(Clock, "/clock", rec("clock"), QoSProfile(depth=10))
    node.create_subscription(String, topics.GT_SCENARIO, rec("scenario"), QoSProfile(depth=50))
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    procs = Processes(tmp_path)
    try:
        player = procs.start("player", [sys.executable, "-m", "lmm_fusion.cli", "play", str(small_bag), "--clock",
                                        "--wait-for-subscriber", "20"], env)
        deadline = time.monotonic() + 60.0
        while player.poll() is None and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)
        assert player.poll() == 0, procs.log_text("player")
    finally:
        procs.stop_all()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)

    assert len(got["lidar"]) >= 8 and len(got["image"]) >= 8  # best effort: some may drop
    assert len(got["scenario"]) == 16  # reliable
    stamps = [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for _, m in got["lidar"]]
    assert all(T0 - 1e-6 <= s <= T0 + DURATION + 1e-6 for s in stamps)
    recv = [r for r, _ in got["scenario"]]
    assert DURATION * 0.7 <= recv[-1] - recv[0] <= DURATION * 2.0 + 0.5  # recorded pace, not a burst
    clocks = [m.clock.sec + m.clock.nanosec * 1e-9 for _, m in got["clock"]]
    assert len(clocks) >= 20
    assert all(b >= a for a, b in itertools.pairwise(clocks))
    assert clocks[0] >= T0 - 0.01 and clocks[-1] <= T0 + DURATION + 0.2


def test_missing_bag_is_an_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "lmm_fusion.cli", "play", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60, env=loopback_env())
    assert out.returncode != 0 and "does not exist" in out.stdout + out.stderr


def test_wait_until_is_bounded() -> None:
    t = time.monotonic()
    assert not wait_until(lambda: False, 0.2)
    assert time.monotonic() - t < 1.0


def test_waits_for_every_sensor_topic_it_plays(small_bag: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--wait-for-subscriber waits for the camera as well as the LiDAR (not only the LiDAR topic), never for
    ground truth, and names what is still unmatched."""
    from lmm_fusion.ros.player import BagPlayer

    env = loopback_env()
    for key in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE"):
        monkeypatch.setenv(key, env[key])
    ctx = Context()
    rclpy.init(context=ctx, domain_id=int(env["ROS_DOMAIN_ID"]))
    try:
        node = rclpy.create_node("player_wait", context=ctx)
        player = BagPlayer(node, small_bag)
        assert player.input_topics() == [topics.CAMERA_IMAGE, topics.LIDAR_POINTS]  # not /ground_truth/scenario
        probe = rclpy.create_node("player_wait_probe", context=ctx)
        probe.create_subscription(PointCloud2, topics.LIDAR_POINTS, lambda m: None, qos_profile_sensor_data)
        t0 = time.monotonic()
        assert player.wait_for_subscribers(1.5) == [topics.CAMERA_IMAGE]  # the LiDAR alone is not enough
        assert time.monotonic() - t0 >= 1.4
        probe.create_subscription(Image, topics.CAMERA_IMAGE, lambda m: None, qos_profile_sensor_data)
        assert player.wait_for_subscribers(20.0) == []
        assert player.wait_for_subscribers(0.1, ["/not/played"]) == ["/not/played"]
        probe.destroy_node()
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=ctx)
