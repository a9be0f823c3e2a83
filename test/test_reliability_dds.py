"""Sensor faults and time faults against the real node process over loopback DDS.

One node process (wall clock) goes through every sensor fault in turn — stop, flood (3x rate), stale
stamps, stamps jumped forward — and must keep publishing at its rate with the right modality mask and
diagnostic levels, and use the sensor again within two periods once it is back. A second node process
(``use_sim_time``) is fed a simulated /clock that jumps back (a bag loop), pauses and resumes, and
future-stamped messages. Sensors are small (64x48 image, 300 points); every wait is a bounded poll.
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
from lmm_fusion.base.vocabulary import MODALITIES
from lmm_fusion.io import create_cloud, create_fix, create_image, make_header, rclpy_types
from lmm_fusion.ros.outputs import ERROR, OK, WARN
from lmm_fusion.tools.demo import OutputCollector, Processes, loopback_env, node_command, wait_until

pytestmark = [pytest.mark.dds, pytest.mark.slow]

RATE_HZ = 10.0
PERIOD = 1.0 / RATE_HZ
TIMEOUT = {"camera": 0.3, "lidar": 0.3, "gnss": 0.5}
SENSOR_HZ = {"camera": 20.0, "lidar": 10.0, "gnss": 10.0}
START_TIMEOUT = 120.0  # torch import and model load on a busy 2-core machine
SLACK = 0.3  # transport and timer jitter on a loaded 2-core machine [s]
STALE = 0.8  # stale stamps: older than every timeout, newer than loop_reset (1 s) [s]
JUMP = 5.0  # stamps jumped forward: beyond future_tolerance (0.5 s) [s]
PARAMS = (f"rate_hz:={RATE_HZ}", "backend:=torch", "threads:=1", "use_camera_info:=false",
          *(f"sync.{s}_timeout:={TIMEOUT[s]}" for s in MODALITIES), "diagnostics.window:=1.0",
          *(f"diagnostics.{s}_hz:={SENSOR_HZ[s]}" for s in MODALITIES))


class FaultFeeder:
    """Publishes small camera/LiDAR/GNSS messages at :data:`SENSOR_HZ` from a thread (10 ms ticks), each
    sensor in a mode: ``normal``, ``off``, ``flood`` (3x its rate), ``stale`` (stamps ``STALE`` s old) or
    ``future`` (stamps ``JUMP`` s ahead). With ``sim_start`` it runs a simulated clock published on
    /clock, which :meth:`jump` moves and :meth:`pause` stops."""

    def __init__(self, node: Any, sim_start: float | None = None) -> None:
        from rclpy.qos import QoSProfile, qos_profile_sensor_data

        t = self.types = rclpy_types()
        self.pub = {
            "camera": node.create_publisher(t.Image, topics.CAMERA_IMAGE, qos_profile_sensor_data),
            "lidar": node.create_publisher(t.PointCloud2, topics.LIDAR_POINTS, qos_profile_sensor_data),
            "gnss": node.create_publisher(t.NavSatFix, topics.GNSS_FIX, qos_profile_sensor_data),
        }
        self.clock_pub = node.create_publisher(t.Clock, "/clock", QoSProfile(depth=1)) if sim_start else None
        self.mode = dict.fromkeys(MODALITIES, "normal")
        self.sent = dict.fromkeys(MODALITIES, 0)
        rng = np.random.default_rng(0)
        self.rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        self.points = rng.uniform([5, -8, -1.5, 0], [40, 8, 1.0, 1], (300, 4)).astype(np.float32)
        self._sim = sim_start
        self._running = True
        self._t_ref = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ clock
    def now(self) -> float:
        """Stamp time [s]: wall time, or the simulated clock."""
        with self._lock:
            if self._sim is None:
                return time.time()
            return self._sim + ((time.monotonic() - self._t_ref) if self._running else 0.0)

    def jump(self, dt: float) -> float:
        """Move the simulated clock by ``dt`` [s] (negative = back, like a bag loop); returns the new time."""
        with self._lock:
            assert self._sim is not None
            self._sim += dt
        return self.now()

    def pause(self, paused: bool) -> None:
        """Freeze (no /clock, no sensors) or resume the simulated clock where it stopped."""
        now = self.now()
        with self._lock:
            self._sim, self._t_ref, self._running = now, time.monotonic(), not paused

    def set_mode(self, sensor: str, mode: str) -> float:
        with self._lock:
            self.mode[sensor] = mode
        return self.now()

    # ------------------------------------------------------------ publishing
    def _loop(self) -> None:
        next_t, k = time.monotonic(), 0
        while not self._stop.is_set():
            try:
                with self._lock:
                    running, modes = self._running, dict(self.mode)
                if running:
                    stamp = self.now()
                    if self.clock_pub is not None:
                        ns = round(stamp * 1e9)
                        self.clock_pub.publish(self.types.Clock(clock=self.types.Time(sec=ns // 10**9,
                                                                                      nanosec=ns % 10**9)))
                    for s in MODALITIES:
                        hz = SENSOR_HZ[s] * (3 if modes[s] == "flood" else 1)
                        if modes[s] != "off" and k % max(1, round(100 / hz)) == 0:
                            self._publish(s, stamp + {"stale": -STALE, "future": JUMP}.get(modes[s], 0.0))
            except Exception:  # the context is shutting down at teardown
                return
            k += 1
            next_t += 0.01
            self._stop.wait(max(next_t - time.monotonic(), 0.0))

    def _publish(self, sensor: str, stamp: float) -> None:
        t = self.types
        if sensor == "camera":
            msg = create_image(t, make_header(t, stamp, topics.CAMERA_FRAME), self.rgb)
        elif sensor == "lidar":
            msg = create_cloud(t, make_header(t, stamp, topics.LIDAR_FRAME), self.points, ("x", "y", "z", "intensity"))
        else:
            lat = 48.137154 + 1e-6 * (stamp % 100)
            msg = create_fix(t, make_header(t, stamp, topics.GNSS_FRAME), lat, 11.576124, 520.0, covariance=0.05)
        self.pub[sensor].publish(msg)
        self.sent[sensor] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


class NodeRig:
    """One node process + output collector + feeder on a private DDS domain."""

    def __init__(self, tmp: Path, params: tuple[str, ...], sim_start: float | None = None) -> None:
        env = loopback_env()
        self.mp = pytest.MonkeyPatch()
        for key in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE"):
            self.mp.setenv(key, env[key])
        self.mp.delenv("ROS_LOCALHOST_ONLY", raising=False)
        self.env = env
        self.procs = Processes(tmp)
        self.collector = OutputCollector(int(env["ROS_DOMAIN_ID"]), ground_truth=False)
        self.node = self.procs.start("node", node_command(*params), env)
        self.feeder: FaultFeeder | None = None
        try:
            ok = wait_until(lambda: self.collector.node.count_subscribers(topics.LIDAR_POINTS) > 0
                            or self.node.poll() is not None, START_TIMEOUT)
            assert ok and self.node.poll() is None, f"node did not subscribe:\n{self.log()}"
            self.feeder = FaultFeeder(self.collector.node, sim_start)
        except BaseException:
            self.close()
            raise

    def log(self) -> str:
        return self.procs.log_text("node")[-3000:]

    def scenes(self, after: float = -math.inf) -> list[dict[str, Any]]:
        """Scene assessments stamped after ``after`` [node-clock s]."""
        return [r for r in self.collector.get("scene") if r["stamp"] > after]

    def diagnostics(self, after: float = -math.inf) -> list[dict[str, Any]]:
        return [d for d in self.collector.get("diagnostics") if d["stamp"] > after]

    def close(self) -> None:
        if self.feeder is not None:
            self.feeder.close()
        self.procs.stop_all(timeout=10.0)
        self.collector.close()
        self.mp.undo()


@pytest.fixture(scope="module")
def wall(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeRig]:
    rig = NodeRig(tmp_path_factory.mktemp("wall"), PARAMS)
    try:
        assert wait_until(lambda: any(r["valid"] and not r["degraded"] for r in rig.scenes()[-3:]), 30.0), rig.log()
        yield rig
    finally:
        rig.close()


def used(r: dict[str, Any]) -> list[bool]:
    return [bool(m["used"]) for m in r["modalities"]]


FAULTS = ("flood", "off", "stale", "future")


def _fault_phase(wall: NodeRig, sensor: str, fault: str) -> None:
    """One fault of one sensor for ``window`` seconds of outputs, then its return."""
    feeder = wall.feeder
    assert feeder is not None
    i = MODALITIES.index(sensor)
    t_fault = feeder.set_mode(sensor, fault)
    # The mask reflects the fault once the last good frame is older than the timeout.
    settled = t_fault + TIMEOUT[sensor] + 2 * PERIOD + SLACK
    window = 1.0  # [s] of outputs checked under the fault
    assert wait_until(lambda: bool(wall.scenes(settled + window)), window + 5.0), (sensor, fault, wall.log())
    t_back = feeder.set_mode(sensor, "normal")
    scenes = [r for r in wall.scenes(settled) if r["stamp"] <= settled + window]
    # Keeps publishing at its rate (at least 60 % of the cycles on a loaded machine).
    assert len(scenes) >= 0.6 * window * RATE_HZ, (sensor, fault, len(scenes))
    for r in scenes:
        expect = [s != sensor or fault == "flood" for s in MODALITIES]
        assert used(r) == expect and r["valid"], (sensor, fault, r)
        assert r["degraded"] == (fault != "flood")
    diag = [d for d in wall.diagnostics(settled) if d["stamp"] <= settled + window][-1]["status"]
    level = diag[f"fusion_node: {sensor}"]["level"]
    assessment = diag["fusion_node: assessment"]["level"]
    if fault == "flood":
        assert level == OK and assessment == OK, (sensor, fault, diag)
    else:
        assert level >= WARN and assessment == WARN, (sensor, fault, diag)
    if fault == "off":
        assert level == ERROR, diag  # no messages in the window, latest frame older than error_age
    if fault in ("stale", "future"):
        assert int(diag[f"fusion_node: {sensor}"]["values"]["rejected"]) > 0  # counted
    # Back within two periods of the sensor's first message after its return.
    bound = t_back + 1.0 / SENSOR_HZ[sensor] + 2 * PERIOD + SLACK
    assert wait_until(lambda: any(used(r)[i] for r in wall.scenes(t_back)), 5.0), (sensor, fault)
    first = next(r for r in wall.scenes(t_back) if used(r)[i])
    assert first["stamp"] <= bound, (sensor, fault, first["stamp"] - t_back)
    assert wait_until(lambda: len([r for r in wall.scenes(bound) if all(used(r))]) >= 2, 5.0), (sensor, fault)
    assert all(all(used(r)) for r in wall.scenes(bound)), (sensor, fault)


@pytest.mark.parametrize("sensor", MODALITIES)
def test_sensor_faults_keep_rate_mask_diagnostics_and_recover(wall: NodeRig, sensor: str) -> None:
    for fault in FAULTS:
        _fault_phase(wall, sensor, fault)
    assert wall.node.poll() is None


def test_node_opens_no_listening_socket(wall: NodeRig) -> None:
    """Only DDS traffic: UDP sockets (and shared memory); no TCP socket at all, hence no TCP listener."""
    import socket

    import psutil

    conns = psutil.Process(wall.node.pid).net_connections(kind="inet")
    assert conns, "no sockets: is the node talking DDS at all?"
    assert all(c.type == socket.SOCK_DGRAM for c in conns), [c for c in conns if c.type != socket.SOCK_DGRAM]
    assert not [c for c in conns if c.status == psutil.CONN_LISTEN]
    assert not psutil.Process(wall.node.pid).children(recursive=True)


# ---------------------------------------------------------------- time faults (use_sim_time)
@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeRig]:
    rig = NodeRig(tmp_path_factory.mktemp("sim"), (*PARAMS, "use_sim_time:=true"), sim_start=1000.0)
    try:
        assert wait_until(lambda: any(r["valid"] and not r["degraded"] for r in rig.scenes()[-3:]), 30.0), rig.log()
        yield rig
    finally:
        rig.close()


def test_clock_pause_stops_cycles_and_resume_recovers(sim: NodeRig) -> None:
    feeder = sim.feeder
    assert feeder is not None
    feeder.pause(True)
    t_pause, recv_pause = feeder.now(), time.monotonic()
    time.sleep(1.5)  # a paused clock: the node's timer must not run
    # A timer that kept running would stamp its cycles with the frozen sim time; judged by stamps,
    # late delivery of earlier scenes on a loaded machine cannot look like a running timer.
    frozen = [r for r in sim.collector.get("scene") if r["stamp"] > t_pause - PERIOD]
    assert len(frozen) <= 3, [r["stamp"] for r in frozen]
    assert all(r["stamp"] <= t_pause + SLACK for r in sim.collector.get("scene") if r["recv"] > recv_pause)
    recv_resume = time.monotonic()
    feeder.pause(False)

    def resumed() -> list[dict[str, Any]]:
        return [r for r in sim.collector.get("scene") if r["recv"] > recv_resume and all(used(r))]

    assert wait_until(lambda: bool(resumed()), 10.0), sim.log()
    first = resumed()[0]
    assert first["stamp"] <= t_pause + 1.0 / min(SENSOR_HZ.values()) + 2 * PERIOD + SLACK
    assert sim.node.poll() is None


def test_future_stamps_rejected_under_sim_time(sim: NodeRig) -> None:
    feeder = sim.feeder
    assert feeder is not None

    def rejected() -> int:
        d = sim.diagnostics()
        return int(d[-1]["status"]["fusion_node: lidar"]["values"]["rejected"]) if d else 0

    before = rejected()
    t_fault = feeder.set_mode("lidar", "future")
    settled = t_fault + TIMEOUT["lidar"] + 2 * PERIOD + SLACK
    assert wait_until(lambda: len(sim.scenes(settled)) >= 5, 10.0), sim.log()
    assert all(used(r) == [True, False, True] for r in sim.scenes(settled))
    assert rejected() > before
    t_back = feeder.set_mode("lidar", "normal")
    assert wait_until(lambda: any(all(used(r)) for r in sim.scenes(t_back)), 5.0)
    first = next(r for r in sim.scenes(t_back) if all(used(r)))
    assert first["stamp"] <= t_back + 1.0 / SENSOR_HZ["lidar"] + 2 * PERIOD + SLACK


def _jump_back(sim: NodeRig, feeder: FaultFeeder, dt: float) -> None:
    before = feeder.now()
    t_new = feeder.jump(-dt)

    def after_jump() -> list[dict[str, Any]]:
        return [r for r in sim.scenes(t_new) if r["stamp"] < before - dt / 2]

    assert wait_until(lambda: any(r["valid"] and all(used(r)) for r in after_jump()), 10.0), sim.log()
    fused = [r for r in after_jump() if all(used(r))]
    assert fused[0]["stamp"] <= t_new + 1.0 / min(SENSOR_HZ.values()) + 2 * PERIOD + SLACK
    assert wait_until(lambda: len(after_jump()) >= 10, 10.0)


def test_loop_jump_back_resets_and_keeps_publishing(sim: NodeRig) -> None:
    """A bag loop: /clock and every stamp jump 10 s back. Outputs follow the new time (no stall), fused
    again within a few periods; jumping back again works the same. Runs last: the earlier time tests
    assume a clock that never went back."""
    feeder = sim.feeder
    assert feeder is not None
    for _ in range(2):
        _jump_back(sim, feeder, 10.0)
    assert sim.node.poll() is None


def _write_small_bag(path: Path, t0: float, seconds: float) -> None:
    """A rosbag2 of the feeder's small sensors, header stamps = record times from ``t0`` [s]."""
    from lmm_fusion.io import rosbags_types
    from lmm_fusion.io.bags import BagWriter

    t = rosbags_types()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    pts = rng.uniform([5, -8, -1.5, 0], [40, 8, 1.0, 1], (300, 4)).astype(np.float32)
    with BagWriter(path) as w:
        for k in range(int(seconds * 20)):
            st = t0 + 0.05 * k
            w.write(topics.CAMERA_IMAGE, st, create_image(t, make_header(t, st, topics.CAMERA_FRAME), rgb))
            if k % 2 == 0:
                w.write(topics.LIDAR_POINTS, st, create_cloud(t, make_header(t, st, topics.LIDAR_FRAME), pts,
                                                              ("x", "y", "z", "intensity")))
                w.write(topics.GNSS_FIX, st, create_fix(t, make_header(t, st, topics.GNSS_FRAME), 48.137154 + 1e-7 * k,
                                                        11.576124, 520.0, covariance=0.05))


def test_bag_played_in_a_loop_with_clock(sim: NodeRig, tmp_path: Path) -> None:
    """``lmm-fusion play --loop --clock``: every loop sends /clock and all stamps back to the bag start.
    The node follows each loop (outputs stamped in bag time again, fused within a few periods) and
    never stalls. Runs after the simulated-clock tests (it replaces their feeder)."""
    import sys

    assert sim.feeder is not None
    sim.feeder.close()
    sim.feeder = None
    bag, t0, seconds = tmp_path / "loop", 500.0, 2.5
    _write_small_bag(bag, t0, seconds)
    recv0 = time.monotonic()
    sim.procs.start("player", [sys.executable, "-m", "lmm_fusion.cli", "play", str(bag), "--loop", "--clock",
                                       "--wait-for-subscriber", "20"],
                    sim.env)

    def bag_scenes() -> list[dict[str, Any]]:
        return [r for r in sim.collector.get("scene") if r["recv"] > recv0 and t0 <= r["stamp"] <= t0 + seconds + 1]

    def loops() -> list[int]:
        """Indices where the output stamps went back (a new loop began)."""
        sc = bag_scenes()
        return [j for j in range(1, len(sc)) if sc[j]["stamp"] < sc[j - 1]["stamp"] - 1.0]

    assert wait_until(lambda: len(loops()) >= 2, 30.0), (len(bag_scenes()), sim.procs.log_text("player")[-2000:])
    sc, starts = bag_scenes(), [0, *loops()]
    for a, b in itertools.pairwise(starts):  # complete plays of the bag
        fused = [r for r in sc[a:b] if all(used(r))]
        assert fused, f"a loop without a fused output ({b - a} outputs)"
        if a > 0:  # after a loop (the first play also waits for DDS discovery of the player)
            assert fused[0]["stamp"] <= t0 + 1.0 / min(SENSOR_HZ.values()) + 2 * PERIOD + 2 * SLACK
        # Outputs keep coming at the node's rate through the loop (no stall at the jump).
        assert b - a >= 0.6 * seconds * RATE_HZ, (a, b)
    j = starts[-1]
    assert wait_until(lambda: any(all(used(r)) for r in bag_scenes()[j:]), 10.0), "no fused output after the loop"
    assert sim.node.poll() is None
