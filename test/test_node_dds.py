"""The fusion node as a real process over loopback DDS (random ROS_DOMAIN_ID, localhost discovery).

This process publishes small sensor messages and subscribes to the node's outputs. Every wait is a
bounded poll; every subprocess is stopped in teardown. Large messages drop over DDS, so nothing here
needs every frame.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmm_fusion.base import topics
from lmm_fusion.base.vocabulary import MODALITIES, Action, Light, Risk
from lmm_fusion.io import create_cloud, create_fix, create_image, make_header, rclpy_types
from lmm_fusion.tools.demo import OutputCollector, Processes, loopback_env, node_command, wait_until

pytestmark = [pytest.mark.dds, pytest.mark.slow]

RATE_HZ = 10.0
PERIOD = 1.0 / RATE_HZ
LIDAR_TIMEOUT = 0.2
START_TIMEOUT = 90.0  # node start-up incl. torch import and model load on a busy 2-core machine

BASE_PARAMS = (f"rate_hz:={RATE_HZ}", "backend:=torch", "threads:=1", "use_camera_info:=false",
               f"sync.lidar_timeout:={LIDAR_TIMEOUT}", "sync.camera_timeout:=0.3", "sync.gnss_timeout:=0.5")


class SensorFeeder:
    """Publishes a small camera image, LiDAR cloud and GNSS fix at ``hz`` from a thread, stamped with
    wall time or, with ``sim_start``, with a simulated clock that it also publishes on /clock."""

    def __init__(self, node: Any, hz: float = 20.0, sim_start: float | None = None) -> None:
        from rclpy.qos import QoSProfile, qos_profile_sensor_data

        t = rclpy_types()
        self.types = t
        self.hz = hz
        self.pub = {
            "camera": node.create_publisher(t.Image, topics.CAMERA_IMAGE, qos_profile_sensor_data),
            "lidar": node.create_publisher(t.PointCloud2, topics.LIDAR_POINTS, qos_profile_sensor_data),
            "gnss": node.create_publisher(t.NavSatFix, topics.GNSS_FIX, qos_profile_sensor_data),
        }
        self.clock_pub = node.create_publisher(t.Clock, "/clock", QoSProfile(depth=1)) if sim_start else None
        self.sim_start = sim_start
        self.enabled = dict.fromkeys(MODALITIES, True)
        self.last_stamp: dict[str, float] = {}
        self.malformed_lidar = 0
        rng = np.random.default_rng(0)
        self.rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        pts = rng.uniform([5, -8, -1.5, 0], [40, 8, 1.0, 1], (300, 4)).astype(np.float32)
        self.points = pts
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def now(self) -> float:
        if self.sim_start is not None:
            return self.sim_start + (time.monotonic() - self._t0)
        return time.time()

    def _loop(self) -> None:
        next_t = time.monotonic()
        k = 0
        while not self._stop.is_set():
            stamp = self.now()
            try:
                if self.clock_pub is not None:
                    self._publish_clock(stamp)
                if k % max(1, round(100 / self.hz)) == 0:
                    self._publish_sensors(stamp)
            except Exception:  # the context is shutting down at teardown
                return
            k += 1
            next_t += 0.01
            self._stop.wait(max(next_t - time.monotonic(), 0.0))

    def _publish_clock(self, stamp: float) -> None:
        ns = round(stamp * 1e9)
        t = self.types
        self.clock_pub.publish(t.Clock(clock=t.Time(sec=ns // 10**9, nanosec=ns % 10**9)))

    def _publish_sensors(self, stamp: float) -> None:
        t = self.types
        with self._lock:
            enabled = dict(self.enabled)
            malformed = self.malformed_lidar
            self.malformed_lidar = 0
        if enabled["camera"]:
            self.pub["camera"].publish(create_image(t, make_header(t, stamp, topics.CAMERA_FRAME), self.rgb))
            self.last_stamp["camera"] = stamp
        if enabled["lidar"]:
            self.pub["lidar"].publish(create_cloud(t, make_header(t, stamp, topics.LIDAR_FRAME), self.points,
                                                   ("x", "y", "z", "intensity")))
            self.last_stamp["lidar"] = stamp
        for _ in range(malformed):
            bad = create_cloud(t, make_header(t, stamp, topics.LIDAR_FRAME), self.points, ("x", "y", "z", "intensity"))
            bad.row_step = bad.row_step + 16  # claims more bytes per row than data holds
            self.pub["lidar"].publish(bad)
        if enabled["gnss"]:
            lat = 48.137154 + 1e-6 * (stamp % 100)
            self.pub["gnss"].publish(create_fix(t, make_header(t, stamp, topics.GNSS_FRAME), lat, 11.576124, 520.0,
                                                covariance=0.05))
            self.last_stamp["gnss"] = stamp

    def set_enabled(self, sensor: str, on: bool) -> float:
        """Switch a sensor; returns the stamp of its last published message when switching off."""
        with self._lock:
            self.enabled[sensor] = on
        time.sleep(2.0 / self.hz)  # let the loop observe it before reading the last stamp
        return self.last_stamp.get(sensor, math.nan)

    def send_malformed_lidar(self, n: int = 1) -> None:
        with self._lock:
            self.malformed_lidar += n

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


class Rig:
    """A node process + collector (+ feeder) on a private DDS domain."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, params: tuple[str, ...]) -> None:
        env = loopback_env()
        for key in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE"):
            monkeypatch.setenv(key, env[key])
        monkeypatch.delenv("ROS_LOCALHOST_ONLY", raising=False)
        self.domain = int(env["ROS_DOMAIN_ID"])
        self.procs = Processes(tmp)
        self.collector = OutputCollector(self.domain, ground_truth=False)
        self.node = self.procs.start("node", node_command(*params), env)
        self.feeder: SensorFeeder | None = None

    def wait_subscribed(self) -> None:
        ok = wait_until(lambda: self.collector.node.count_subscribers(topics.LIDAR_POINTS) > 0
                        or self.node.poll() is not None, START_TIMEOUT)
        assert ok and self.node.poll() is None, f"node did not subscribe:\n{self.procs.log_text('node')[-3000:]}"

    def close(self) -> None:
        if self.feeder is not None:
            self.feeder.close()
        self.procs.stop_all(timeout=10.0)
        self.collector.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    mp = pytest.MonkeyPatch()
    rig = Rig(tmp_path_factory.mktemp("node"), mp, BASE_PARAMS)
    try:
        rig.wait_subscribed()
        yield rig
    finally:
        rig.close()
        mp.undo()


def scenes_since(rig: Rig, t0: float) -> list[dict[str, Any]]:
    return [r for r in rig.collector.get("scene") if r["recv"] >= t0]


def test_publishes_no_assessment_without_sensors(running: Rig) -> None:
    t0 = time.monotonic()
    assert wait_until(lambda: len(scenes_since(running, t0)) >= 3, 10.0), running.procs.log_text("node")[-2000:]
    r = scenes_since(running, t0)[-1]
    assert not r["valid"] and r["degraded"]
    assert [m["used"] for m in r["modalities"]] == [False, False, False]
    actions = [a for a in running.collector.get("action") if a["recv"] >= t0]
    assert actions and actions[-1]["rationale"].startswith("no assessment")


def test_outputs_at_rate_with_valid_headers_and_enums(running: Rig) -> None:
    running.feeder = SensorFeeder(running.collector.node, hz=20.0)
    assert wait_until(lambda: any(r["valid"] and not r["degraded"] for r in running.collector.get("scene")[-5:]),
                      15.0), "no fully fused assessment"
    t0 = time.monotonic()
    time.sleep(3.0)  # measuring window for the rate
    scenes = scenes_since(running, t0)
    assert RATE_HZ * 3.0 * 0.5 <= len(scenes) <= RATE_HZ * 3.0 * 1.5, len(scenes)
    stamps = [r["stamp"] for r in scenes]
    assert all(b > a for a, b in itertools.pairwise(stamps))
    assert abs(stamps[-1] - time.time()) < 2.0  # node clock = wall clock here
    for r in scenes:
        assert r["frame_id"] == "base_link"
        assert r["risk"] in {int(x) for x in Risk} and r["light"] in {int(x) for x in Light}
        assert [m["name"] for m in r["modalities"]] == list(MODALITIES)
        assert sum(r["risk_probabilities"]) == pytest.approx(1.0, abs=1e-3)
        if r["valid"] and not r["degraded"]:
            assert sum(m["attention"] for m in r["modalities"]) == pytest.approx(1.0, abs=1e-3)
    actions = [a for a in running.collector.get("action") if a["recv"] >= t0]
    assert actions and all(a["action"] in {int(x) for x in Action} and a["target_speed"] >= 0 for a in actions)
    assert all(a["frame_id"] == "base_link" and a["rationale"] for a in actions)
    occ = [o for o in running.collector.get("occupancy") if o["recv"] >= t0]
    assert occ and occ[-1]["frame_id"] == "base_link" and occ[-1]["n"] == occ[-1]["width"] * occ[-1]["height"]
    markers = [m for m in running.collector.get("markers") if m["recv"] >= t0]
    assert markers and {"risk", "action", "path", "modality_attention"} <= set(markers[-1]["ns"])
    diags = [d for d in running.collector.get("diagnostics") if d["recv"] >= t0]
    assert diags
    cycle = diags[-1]["status"]["fusion_node: cycle"]["values"]
    assert float(cycle["rate_hz"]) > RATE_HZ * 0.5
    assert float(cycle["latency_p50_ms"]) > 0


def test_lidar_loss_masks_and_recovers(running: Rig) -> None:
    feeder = running.feeder
    assert feeder is not None, "runs after the rate test, which starts the sensors"
    last_lidar = feeder.set_enabled("lidar", False)
    bound = last_lidar + LIDAR_TIMEOUT + 2 * PERIOD + 0.1  # 0.1 s: timer jitter on a loaded machine

    def masked() -> list[dict[str, Any]]:
        return [r for r in running.collector.get("scene") if r["stamp"] > last_lidar and r["valid"]
                and not r["modalities"][1]["used"]]

    assert wait_until(lambda: bool(masked()), 5.0), "LiDAR was never masked"
    first = masked()[0]
    assert first["degraded"] and first["stamp"] <= bound, (first["stamp"] - last_lidar)
    assert first["modalities"][1]["attention"] == 0.0
    assert first["modalities"][0]["used"] and first["modalities"][2]["used"]
    # Every output after the bound has LiDAR masked: degraded, never silent.
    def later() -> list[dict[str, Any]]:
        return [r for r in running.collector.get("scene") if r["stamp"] > bound]

    assert wait_until(lambda: len(later()) >= 3, 5.0)
    assert all(not r["modalities"][1]["used"] for r in later())

    t_on = feeder.now()
    feeder.set_enabled("lidar", True)

    def recovered() -> list[dict[str, Any]]:
        return [r for r in running.collector.get("scene") if r["stamp"] > t_on and r["modalities"][1]["used"]]

    assert wait_until(lambda: bool(recovered()), 5.0), "LiDAR did not come back"
    assert recovered()[0]["stamp"] <= t_on + 2 * (1 / feeder.hz) + 2 * PERIOD + 0.3


def test_malformed_message_is_counted_and_node_keeps_publishing(running: Rig) -> None:
    feeder = running.feeder
    assert feeder is not None

    def rejected() -> int:
        diags = running.collector.get("diagnostics")
        if not diags:
            return 0
        return int(diags[-1]["status"]["fusion_node: lidar"]["values"]["rejected"])

    before = rejected()
    t0 = time.monotonic()
    for _ in range(5):  # best effort: some may drop, one is enough
        feeder.send_malformed_lidar()
        time.sleep(0.1)
    assert wait_until(lambda: rejected() > before, 5.0), "malformed cloud not counted"
    diag = running.collector.get("diagnostics")[-1]["status"]["fusion_node: lidar"]
    assert diag["level"] >= 1  # WARN while rejections are recent
    assert wait_until(lambda: len(scenes_since(running, t0)) >= 10, 5.0)
    assert running.node.poll() is None
    assert any(r["valid"] and r["modalities"][1]["used"] for r in scenes_since(running, t0)[-5:])


def _change_state(node: Any, service: str, transition_id: int, timeout: float = 30.0) -> bool:
    from lifecycle_msgs.srv import ChangeState

    client = node.create_client(ChangeState, service)
    assert client.wait_for_service(timeout_sec=timeout), f"{service} not available"
    req = ChangeState.Request()
    req.transition.id = transition_id
    fut = client.call_async(req)
    assert wait_until(fut.done, timeout), f"{service}: no answer"
    return bool(fut.result().success)


def _get_state(node: Any, timeout: float = 10.0) -> str:
    from lifecycle_msgs.srv import GetState

    client = node.create_client(GetState, "/fusion_node/get_state")
    assert client.wait_for_service(timeout_sec=timeout)
    fut = client.call_async(GetState.Request())
    assert wait_until(fut.done, timeout)
    return fut.result().current_state.label


def test_lifecycle_transitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lifecycle_msgs.msg import Transition

    rig = Rig(tmp_path, monkeypatch, (*BASE_PARAMS, "autostart:=false"))
    try:
        node = rig.collector.node
        srv = "/fusion_node/change_state"
        assert _get_state(node, START_TIMEOUT) == "unconfigured"
        assert rig.collector.count("scene") == 0
        assert _change_state(node, srv, Transition.TRANSITION_CONFIGURE)
        assert _get_state(node) == "inactive"
        assert _change_state(node, srv, Transition.TRANSITION_ACTIVATE, timeout=START_TIMEOUT)
        assert _get_state(node) == "active"
        assert wait_until(lambda: rig.collector.count("scene") >= 3, 10.0)
        assert wait_until(lambda: node.count_subscribers(topics.LIDAR_POINTS) == 1, 5.0)
        assert _change_state(node, srv, Transition.TRANSITION_DEACTIVATE)
        # The transition waits for an in-flight cycle, so every later cycle would carry a later stamp.
        # Judge by stamps, not arrival counts: a loaded machine may deliver earlier scenes late.
        t_off = time.time()
        assert _get_state(node) == "inactive"
        assert wait_until(lambda: node.count_subscribers(topics.LIDAR_POINTS) == 0, 5.0)
        time.sleep(0.3 + 5 * PERIOD)
        late = [r["stamp"] for r in rig.collector.get("scene") if r["stamp"] > t_off]
        assert not late, f"inactive node kept publishing: stamps {late} after {t_off}"
        n = rig.collector.count("scene")
        assert _change_state(node, srv, Transition.TRANSITION_CLEANUP)
        assert _get_state(node) == "unconfigured"
        assert _change_state(node, srv, Transition.TRANSITION_CONFIGURE)
        assert _change_state(node, srv, Transition.TRANSITION_ACTIVATE, timeout=START_TIMEOUT)
        assert wait_until(lambda: rig.collector.count("scene") > n + 2, 10.0)
        assert rig.node.poll() is None
    finally:
        rig.close()


def test_use_sim_time_follows_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(tmp_path, monkeypatch, (*BASE_PARAMS, "use_sim_time:=true"))
    try:
        rig.wait_subscribed()
        rig.feeder = feeder = SensorFeeder(rig.collector.node, hz=20.0, sim_start=5000.0)
        def fused() -> list[dict[str, Any]]:
            return [r for r in rig.collector.get("scene") if r["valid"] and not r["degraded"]]

        assert wait_until(lambda: len(fused()) >= 5, 20.0), rig.procs.log_text("node")[-2000:]
        now_sim = feeder.now()
        for r in rig.collector.get("scene"):  # every output is stamped in sim time, none in wall time
            assert 5000.0 <= r["stamp"] <= now_sim + 0.5
        for r in fused():
            assert all(0.0 <= m["age"] < 0.5 for m in r["modalities"])  # ages measured on the sim clock
        # Sim time paused: no cycles (the timer runs on the node clock). A timer on the wall clock
        # would keep cycling, each cycle stamped with the frozen sim time; count those by stamp, so
        # late delivery on a loaded machine cannot be mistaken for a running timer.
        t_pause = feeder.now()  # the last /clock published is at most 10 ms older
        feeder.close()
        time.sleep(1.1)
        frozen = [r for r in rig.collector.get("scene") if r["stamp"] > t_pause - PERIOD]
        assert len(frozen) <= 3, [r["stamp"] for r in frozen]
    finally:
        rig.close()


def test_bad_parameter_fails_naming_it() -> None:
    import subprocess

    env = loopback_env()
    out = subprocess.run(node_command("rate_hz:=500.0", "backend:=gpu9000", "threads:=1"), env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "rate_hz=500.0" in text and "backend='gpu9000'" in text


def test_cli_build_only_builds_and_exits(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lmm_fusion.cli", "node", "--build-only", "-p", "backend:=torch",
                          "-p", "threads:=1"], env=loopback_env(), capture_output=True, text=True, timeout=180,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "build-only: engine ready: torch" in out.stdout + out.stderr
