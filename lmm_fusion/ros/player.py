"""``lmm-fusion play BAG``: publish a rosbag2 over DDS at its recorded pace, optionally with /clock.

A stand-in for ``ros2 bag play`` (not installable from PyPI). Messages are read with
:func:`lmm_fusion.io.bags.read_bag` (rosbags), serialised to CDR with the project typestore and
published as raw bytes on rclpy publishers of the matching type, so no per-type conversion is
needed. QoS: sensor data (best effort) for ``/sensors/...``, transient local + reliable for
``/tf_static``, reliable otherwise. ``--clock`` publishes ``rosgraph_msgs/Clock`` with the bag time
at ``--clock-hz`` so nodes with ``use_sim_time`` follow the bag.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rclpy
from builtin_interfaces.msg import Time
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rosgraph_msgs.msg import Clock

from lmm_fusion.base.topics import CLOCK, TF_STATIC
from lmm_fusion.cycle.ingest import SENSOR_OF_MSGTYPE
from lmm_fusion.io.bags import bag_topics, read_bag
from lmm_fusion.io.msgtypes import typestore

log = logging.getLogger(__name__)

#: Message types a fusion node consumes besides the sensors' (``cycle.ingest.SENSOR_OF_MSGTYPE``).
_INPUT_TYPES = frozenset({*SENSOR_OF_MSGTYPE, "sensor_msgs/msg/CameraInfo", "tf2_msgs/msg/TFMessage"})

# How long every publisher must have stayed matched before playback starts [s]: discovery of one
# subscriber process's endpoints arrives in a burst, so a short quiet window covers its stragglers.
_DISCOVERY_SETTLE_S = 0.3


def msg_class(ros_type: str) -> Any | None:
    """The rclpy class of ``pkg/msg/Type``, or None when that package is not installed."""
    pkg, _, name = ros_type.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.msg"), name)
    except (ImportError, AttributeError):
        return None


def qos_for(topic: str) -> QoSProfile:
    """QoS of the publisher for ``topic``: latched for /tf_static, sensor data for /sensors/..., else reliable."""
    if topic == TF_STATIC:
        return QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    if topic.startswith("/sensors/"):
        return qos_profile_sensor_data
    return QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


class BagPlayer:
    """Publishes one bag through an rclpy node (created on a given or the default context)."""

    def __init__(self, node: Node, bag: Path, rate: float = 1.0, clock: bool = False, clock_hz: float = 100.0,
                 topics: list[str] | None = None) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        if not clock_hz > 0:
            raise ValueError(f"clock_hz must be > 0, got {clock_hz!r}")
        self.node = node
        self.bag = Path(bag)
        self.rate = rate
        self.clock_period = 1.0 / clock_hz
        self.types = bag_topics(self.bag)
        wanted = set(topics) if topics else None
        self.pubs: dict[str, Any] = {}
        for topic, ros_type in sorted(self.types.items()):
            if wanted is not None and topic not in wanted:
                continue
            cls = msg_class(ros_type)
            if cls is None:
                log.warning("skipping %s: message type %s is not installed", topic, ros_type)
                continue
            self.pubs[topic] = node.create_publisher(cls, topic, qos_for(topic))
        self.clock_pub = None
        if clock:
            self.clock_pub = node.create_publisher(Clock, CLOCK, QoSProfile(depth=1,
                                                   reliability=ReliabilityPolicy.RELIABLE))
        self.published = dict.fromkeys(self.pubs, 0)

    def input_topics(self) -> list[str]:
        """The played topics a fusion node takes as input: sensor messages (camera, CameraInfo, LiDAR, GNSS,
        odometry) and ``/tf_static``; never ground truth (``/ground_truth/...``), which nothing needs to hear."""
        return sorted(t for t in self.pubs if self.types.get(t) in _INPUT_TYPES and not t.startswith("/ground_truth/"))

    def wait_for_subscribers(self, timeout: float, topics: list[str] | None = None) -> list[str]:
        """Wait up to ``timeout`` [s] for a subscriber on each of ``topics`` (default :meth:`input_topics`: every
        input topic played), then for every other known subscriber to match. Returns the topics still
        without a subscriber at the deadline ([] when all matched; a topic not played counts as unmatched).

        Discovery matches each endpoint on its own: a subscriber process can be matched on the LiDAR
        topic while its subscription to the camera or a reliable topic is still being discovered, and the
        first messages there would then be lost. So every played input topic must match, and after that
        (within the same deadline) each publisher must have matched every subscriber the ROS graph already
        reports for its topic, and that state must have held for a short settle window.
        """
        missing = [t for t in topics or () if t not in self.pubs]
        if missing:
            return missing
        need = self.input_topics() if topics is None else list(topics)
        deadline = time.monotonic() + timeout
        while True:
            unmatched = [t for t in need if self.pubs[t].get_subscription_count() == 0]
            if not unmatched:
                break
            if time.monotonic() >= deadline:
                return unmatched
            time.sleep(0.05)
        settled_since: float | None = None
        while time.monotonic() < deadline:
            matched = all(p.get_subscription_count() >= self.node.count_subscribers(t) for t, p in self.pubs.items())
            if not matched:
                settled_since = None
            elif settled_since is None:
                settled_since = time.monotonic()
            elif time.monotonic() - settled_since >= _DISCOVERY_SETTLE_S:
                break
            time.sleep(0.05)
        return []

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait up to ``timeout`` [s] until reliable subscribers acknowledged everything published.

        Called before the node is destroyed so the last reliable messages of a bag are not dropped
        by a process that exits right after publishing them; best-effort topics return at once.
        """
        deadline = time.monotonic() + timeout
        ok = True
        for pub in [*self.pubs.values(), *([self.clock_pub] if self.clock_pub is not None else [])]:
            left = max(deadline - time.monotonic(), 0.0)
            ok = pub.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9))) and ok
        return ok

    def _publish_clock(self, bag_time: float) -> None:
        ns = max(round(bag_time * 1e9), 0)
        assert self.clock_pub is not None
        self.clock_pub.publish(Clock(clock=Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)))

    def play_once(self, ok: Callable[[], bool] = lambda: True) -> int:
        """Play the bag once at the recorded pace (until ``ok()`` is false); returns the number of messages
        published."""
        store = typestore()
        n = 0
        t_wall0: float | None = None
        t_bag0 = 0.0
        next_clock = 0.0
        for m in read_bag(self.bag, topics=list(self.pubs)):
            if not ok():
                break
            if t_wall0 is None:
                t_wall0, t_bag0 = time.monotonic(), m.stamp_sec
            due = t_wall0 + (m.stamp_sec - t_bag0) / self.rate
            while True:  # wait for the message's time, publishing /clock meanwhile
                now = time.monotonic()
                if self.clock_pub is not None and now >= next_clock:
                    self._publish_clock(t_bag0 + (now - t_wall0) * self.rate)
                    next_clock = now + self.clock_period
                if now >= due or not ok():
                    break
                time.sleep(min(due - now, self.clock_period if self.clock_pub else due - now, 0.05))
            self.pubs[m.topic].publish(bytes(store.serialize_cdr(m.msg, m.msgtype)))
            self.published[m.topic] += 1
            n += 1
        return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lmm-fusion play``."""
    parser.add_argument("bag", type=Path, help="rosbag2 folder (MCAP or SQLite3)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("--loop", action="store_true", help="play again from the start when done")
    parser.add_argument("--clock", action="store_true", help="publish /clock with the bag time")
    parser.add_argument("--clock-hz", type=float, default=100.0, help="/clock publish rate [Hz] (default 100)")
    parser.add_argument("--topics", nargs="+", default=None, help="only these topics")
    parser.add_argument("--wait-for-subscriber", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for a subscriber on every sensor topic played (camera, camera "
                             "info, LiDAR, GNSS, odometry, /tf_static; not ground truth) before starting")


def run(args: argparse.Namespace) -> int:
    """``lmm-fusion play``: exit status 0, or 2 when the bag does not exist."""
    if not args.bag.exists():
        log.error("bag %s does not exist", args.bag)
        return 2
    rclpy.init()
    node = rclpy.create_node("lmm_fusion_player")
    try:
        player = BagPlayer(node, args.bag, rate=args.rate, clock=args.clock, clock_hz=args.clock_hz,
                           topics=args.topics)
        if args.wait_for_subscriber > 0:
            log.info("waiting up to %.1f s for subscribers on %s", args.wait_for_subscriber,
                     ", ".join(player.input_topics()))
            unmatched = player.wait_for_subscribers(args.wait_for_subscriber)
            if unmatched:
                log.warning("no subscriber on %s after %.1f s; playing anyway (their first messages may be lost)",
                            ", ".join(unmatched), args.wait_for_subscriber)
        log.info("playing %s (%d topics) at %gx%s", args.bag, len(player.pubs), args.rate,
                 " with /clock" if args.clock else "")
        while rclpy.ok():
            n = player.play_once(ok=rclpy.ok)
            log.info("played %d messages", n)
            if not args.loop or n == 0:
                break
        if not player.flush():
            log.warning("some reliable subscribers did not acknowledge the last messages")
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
