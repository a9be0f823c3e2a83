"""The fusion node as a real process over loopback DDS: its outputs, sensor faults and time faults.

Two node processes, each shared by the tests of its section (a start-up costs seconds: torch import and
model load), both started with the module so their start-ups overlap; a sim-time node does not cycle
before its first /clock, so the second one idles until its section.

Wall clock: the node first runs without sensors (no assessment, never silence); then this process
publishes a 64x48 image, a 300-point cloud and a fix at :data:`SENSOR_HZ` on a random
``ROS_DOMAIN_ID`` with localhost discovery, and the outputs must come at the node's rate with valid
headers and enums; a lost LiDAR is masked and comes back; malformed clouds are counted; each sensor in
turn goes through every fault — flood (3x rate), stop, stale stamps, stamps jumped forward — with the
right mask and diagnostic levels, and is used again within two periods once back.

Sim time (``use_sim_time``): outputs follow the simulated /clock, which pauses and resumes; future
stamps are rejected; the clock jumps back (a bag loop); a bag is played in a loop with /clock.

The tests of a section run in file order (each leaves the node as the next expects). Every wait is a
bounded poll; every subprocess is stopped in teardown.
"""

from __future__ import annotations

import itertools
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters

from lmm_fusion.base import topics
from lmm_fusion.base.vocabulary import MODALITIES, Action, Light, Risk
from lmm_fusion.io import create_cloud, create_fix, create_image, make_header, rosbags_types
from lmm_fusion.io.bags import BagWriter
from lmm_fusion.ros.outputs import ERROR, OK, WARN
from lmm_fusion.synth.camera import CameraRenderer
from lmm_fusion.synth.lidar import LidarSimulator
from lmm_fusion.synth.world import static_scene
from lmm_fusion.tools.harness import SENSOR_HZ, NodeHarness, SensorPublisher, wait_until

pytestmark = [pytest.mark.dds, pytest.mark.slow]

RATE_HZ = 10.0
PERIOD = 1.0 / RATE_HZ
TIMEOUT = {"camera": 0.3, "lidar": 0.3, "gnss": 0.5}
START_TIMEOUT = 120.0  # torch import and model load on a busy 2-core machine
SLACK = 0.3  # transport and timer jitter on a loaded 2-core machine [s]
STALE = 0.8  # stale stamps: older than every timeout, newer than loop_reset (1 s) [s]
JUMP = 5.0  # stamps jumped forward: beyond future_tolerance (0.5 s) [s]
SIM_START = 1000.0  # the simulated clock's start [s]
# /diagnostics at 10 Hz (default 1 Hz), so each 1 s window of a fault phase holds several reports.
PARAMS = (f"rate_hz:={RATE_HZ}", "backend:=torch", "threads:=1", "use_camera_info:=false",
          *(f"sync.{s}_timeout:={TIMEOUT[s]}" for s in MODALITIES), "diagnostics.window:=1.0",
          "diagnostics.period:=0.1",
          *(f"diagnostics.{s}_hz:={SENSOR_HZ[s]}" for s in MODALITIES))
_rng = np.random.default_rng(0)
#: The small sensor payloads: a 64x48 RGB image and 300 LiDAR points (x, y, z, intensity).
RGB = _rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
POINTS = _rng.uniform([5, -8, -1.5, 0], [40, 8, 1.0, 1], (300, 4)).astype(np.float32)


def used(r: dict[str, Any]) -> list[bool]:
    return [bool(m["used"]) for m in r["modalities"]]


def fused(r: dict[str, Any]) -> bool:
    return bool(r["valid"]) and not r["degraded"]


def sensors(node: NodeHarness) -> SensorPublisher:
    assert node.sensors is not None, "the sensors are not running"
    return node.sensors


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeHarness]]:
    """Both node processes (``wall``, ``sim``), started at once; the tests wait for each."""
    started: dict[str, NodeHarness] = {}
    try:
        started["wall"] = NodeHarness(tmp_path_factory.mktemp("wall"), PARAMS)
        started["sim"] = NodeHarness(tmp_path_factory.mktemp("sim"), (*PARAMS, "use_sim_time:=true"))
        yield started
    finally:
        for h in reversed(started.values()):  # last first: each restores the DDS variables it found
            h.close()


def _subscribed(node: NodeHarness) -> NodeHarness:
    assert node.wait_subscribed(START_TIMEOUT), f"node did not subscribe:\n{node.log()}"
    return node


@pytest.fixture(scope="module")
def wall_node(nodes: dict[str, NodeHarness]) -> NodeHarness:
    """The wall-clock node, active, with no sensors yet."""
    return _subscribed(nodes["wall"])


@pytest.fixture(scope="module")
def wall(wall_node: NodeHarness) -> NodeHarness:
    """The wall-clock node with the sensors running, once it fuses all three."""
    if wall_node.sensors is None:
        wall_node.start_sensors(RGB, POINTS, stale_s=STALE, future_s=JUMP)
    assert wait_until(lambda: any(fused(r) for r in wall_node.scenes()[-3:]), 30.0), wall_node.log()
    return wall_node


@pytest.fixture(scope="module")
def sim(nodes: dict[str, NodeHarness]) -> NodeHarness:
    """The sim-time node fed sensors stamped on a simulated /clock from :data:`SIM_START`, once it fuses."""
    node = _subscribed(nodes["sim"])
    if node.sensors is None:
        node.start_sensors(RGB, POINTS, sim_start=SIM_START, stale_s=STALE, future_s=JUMP)
    assert wait_until(lambda: any(fused(r) for r in node.scenes()[-3:]), 30.0), node.log()
    return node


def received_since(node: NodeHarness, key: str, t0: float) -> list[dict[str, Any]]:
    """Records of ``key`` received (monotonic) at or after ``t0``."""
    return [r for r in node.outputs.get(key) if r["recv"] >= t0]


# ---------------------------------------------------------------- wall clock: outputs
def test_publishes_no_assessment_without_sensors(wall_node: NodeHarness) -> None:
    t0 = time.monotonic()
    assert wait_until(lambda: len(received_since(wall_node, "scene", t0)) >= 3, 10.0), wall_node.log(2000)
    r = received_since(wall_node, "scene", t0)[-1]
    assert not r["valid"] and r["degraded"]
    assert used(r) == [False, False, False]
    actions = received_since(wall_node, "action", t0)
    assert actions and actions[-1]["rationale"].startswith("no assessment")


def test_outputs_at_rate_with_valid_headers_and_enums(wall: NodeHarness) -> None:
    assert wait_until(lambda: any(fused(r) for r in wall.scenes()[-5:]), 15.0), "no fully fused assessment"
    t0 = time.monotonic()
    time.sleep(3.0)  # measuring window for the rate
    scenes = received_since(wall, "scene", t0)
    assert RATE_HZ * 3.0 * 0.5 <= len(scenes) <= RATE_HZ * 3.0 * 1.5, len(scenes)
    cycles = [r["cycle"] for r in scenes]
    assert all(b > a for a, b in itertools.pairwise(cycles))
    assert abs(cycles[-1] - time.time()) < 2.0  # node clock = wall clock here
    # header.stamp: the newest frame used (sensor stamps are wall time here), never after the cycle;
    # each used modality carries its frame's stamp, an unused one zero.
    stamps = [r["stamp"] for r in scenes]
    assert all(b >= a for a, b in itertools.pairwise(stamps))
    for r in scenes:
        src = [m["stamp"] for m in r["modalities"] if m["used"]]
        if src:
            assert r["stamp"] == pytest.approx(max(src), abs=1e-6)
            assert 0.0 <= r["cycle"] - r["stamp"] < 0.5, r
        assert all(m["stamp"] == 0.0 for m in r["modalities"] if not m["used"])
    for r in scenes:
        assert r["frame_id"] == "base_link"
        assert r["risk"] in {int(x) for x in Risk} and r["light"] in {int(x) for x in Light}
        assert [m["name"] for m in r["modalities"]] == list(MODALITIES)
        assert sum(r["risk_probabilities"]) == pytest.approx(1.0, abs=1e-3)
        if fused(r):
            assert sum(m["attention"] for m in r["modalities"]) == pytest.approx(1.0, abs=1e-3)
    actions = received_since(wall, "action", t0)
    assert actions and all(a["action"] in {int(x) for x in Action} and a["target_speed"] >= 0 for a in actions)
    assert all(a["frame_id"] == "base_link" and a["rationale"] for a in actions)
    occ = received_since(wall, "occupancy", t0)
    assert occ and occ[-1]["frame_id"] == "base_link" and occ[-1]["n"] == occ[-1]["width"] * occ[-1]["height"]
    markers = received_since(wall, "markers", t0)
    assert markers and {"risk", "action", "path", "modality_attention"} <= set(markers[-1]["ns"])
    diags = received_since(wall, "diagnostics", t0)
    assert diags
    cycle = diags[-1]["status"]["fusion_node: cycle"]["values"]
    assert float(cycle["rate_hz"]) > RATE_HZ * 0.5
    assert float(cycle["latency_p50_ms"]) > 0


def test_lidar_loss_masks_and_recovers(wall: NodeHarness) -> None:
    feeder = sensors(wall)
    feeder.set_mode("lidar", "off")
    last_lidar = feeder.last_stamp["lidar"]
    bound = last_lidar + TIMEOUT["lidar"] + 2 * PERIOD + 0.1  # 0.1 s: timer jitter on a loaded machine

    def masked() -> list[dict[str, Any]]:
        return [r for r in wall.scenes(last_lidar) if r["valid"] and not r["modalities"][1]["used"]]

    assert wait_until(lambda: bool(masked()), 5.0), "LiDAR was never masked"
    first = masked()[0]
    assert first["degraded"] and first["stamp"] <= bound, (first["stamp"] - last_lidar)
    assert first["modalities"][1]["attention"] == 0.0
    assert first["modalities"][0]["used"] and first["modalities"][2]["used"]
    # Every output after the bound has LiDAR masked: degraded, never silent.
    assert wait_until(lambda: len(wall.scenes(bound)) >= 3, 5.0)
    assert all(not r["modalities"][1]["used"] for r in wall.scenes(bound))

    t_on = feeder.set_mode("lidar", "normal")

    def recovered() -> list[dict[str, Any]]:
        return [r for r in wall.scenes(t_on) if r["modalities"][1]["used"]]

    assert wait_until(lambda: bool(recovered()), 5.0), "LiDAR did not come back"
    assert recovered()[0]["stamp"] <= t_on + 2 / SENSOR_HZ["lidar"] + 2 * PERIOD + 0.3


def test_malformed_message_is_counted_and_node_keeps_publishing(wall: NodeHarness) -> None:
    feeder = sensors(wall)

    def rejected() -> int:
        diags = wall.outputs.get("diagnostics")
        if not diags:
            return 0
        return int(diags[-1]["status"]["fusion_node: lidar"]["values"]["rejected"])

    before = rejected()
    t0 = time.monotonic()
    for _ in range(5):  # best effort: some may drop, one is enough
        feeder.send_malformed_lidar()
        time.sleep(0.1)
    assert wait_until(lambda: rejected() > before, 5.0), "malformed cloud not counted"
    diag = wall.outputs.get("diagnostics")[-1]["status"]["fusion_node: lidar"]
    assert diag["level"] >= WARN  # while rejections are recent
    assert wait_until(lambda: len(received_since(wall, "scene", t0)) >= 10, 5.0)
    assert wall.alive()
    assert any(r["valid"] and r["modalities"][1]["used"] for r in received_since(wall, "scene", t0)[-5:])


# ---------------------------------------------------------------- wall clock: sensor faults
FAULTS = ("flood", "off", "stale", "future")


def _fault_phase(wall: NodeHarness, sensor: str, fault: str) -> None:
    """One fault of one sensor for ``window`` seconds of outputs, then its return."""
    feeder = sensors(wall)
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
def test_sensor_faults_keep_rate_mask_diagnostics_and_recover(wall: NodeHarness, sensor: str) -> None:
    for fault in FAULTS:
        _fault_phase(wall, sensor, fault)
    assert wall.alive()


def _set(node: NodeHarness, values: dict[str, float]) -> list[Any]:
    """Set node parameters through its rcl_interfaces SetParameters service; one result per value."""
    client = node.outputs.node.create_client(SetParameters, f"/{topics.NODE_NAME}/set_parameters")
    assert client.wait_for_service(timeout_sec=10.0)
    req = SetParameters.Request(parameters=[
        Parameter(name=k, value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=float(v)))
        for k, v in values.items()])
    fut = client.call_async(req)
    assert wait_until(fut.done, 10.0), "set_parameters: no answer"
    return list(fut.result().results)


def test_live_speed_cap_and_read_only_refused(wall: NodeHarness) -> None:
    """``safety.max_speed`` set over the SetParameters service caps the very next ActionSuggestions'
    target_speed; a read-only parameter and a wrong value are refused with reasons naming them."""
    assert wait_until(lambda: any(fused(r) for r in wall.scenes()[-3:]), 10.0)
    # For the random payloads the model stops; on a rendered free road it drives, so the cap has a
    # speed to cap.
    feeder = sensors(wall)
    free = static_scene(ego_speed=10.0)
    feeder.set_payload(CameraRenderer(feeder.rig).render(free, rng=None),
                       LidarSimulator(feeder.rig).scan(free, np.random.default_rng(0)))
    t_free = time.time()
    assert wait_until(lambda: len([a for a in wall.outputs.get("action") if a["stamp"] > t_free + 0.5]) >= 10, 5.0)
    before = [a["target_speed"] for a in wall.outputs.get("action") if a["stamp"] > t_free + 0.5]
    cap = 1.5
    assert max(before) > cap, before  # the cap below must change something
    (res,) = _set(wall, {"safety.max_speed": cap})
    assert res.successful, res.reason
    t_set = time.time()  # outputs stamped (newest data used) after the answer come from later cycles
    assert wait_until(lambda: len([a for a in wall.outputs.get("action") if a["stamp"] > t_set]) >= 10, 5.0)
    after = [a for a in wall.outputs.get("action") if a["stamp"] > t_set]
    assert all(a["target_speed"] <= cap + 1e-6 for a in after), [a["target_speed"] for a in after]
    rate, wrong, cross = _set(wall, {"rate_hz": 5.0}), _set(wall, {"safety.max_speed": -1.0}), \
        _set(wall, {"diagnostics.error_age": 0.01})
    assert not rate[0].successful and "read-only" in rate[0].reason and "rate_hz" in rate[0].reason
    assert not wrong[0].successful and "safety.max_speed" in wrong[0].reason
    assert not cross[0].successful and "diagnostics.error_age" in cross[0].reason
    (res,) = _set(wall, {"safety.max_speed": 30.0})  # back to the default cap
    assert res.successful
    t_back = time.time()
    assert wait_until(lambda: any(a["target_speed"] > cap for a in wall.outputs.get("action")
                                  if a["stamp"] > t_back), 5.0)
    feeder.set_payload(RGB, POINTS)
    assert wall.alive()


def test_node_opens_no_listening_socket(wall: NodeHarness) -> None:
    """Only DDS traffic: UDP sockets (and shared memory); no TCP socket at all, hence no TCP listener."""
    conns = psutil.Process(wall.node.pid).net_connections(kind="inet")
    assert conns, "no sockets: is the node talking DDS at all?"
    assert all(c.type == socket.SOCK_DGRAM for c in conns), [c for c in conns if c.type != socket.SOCK_DGRAM]
    assert not [c for c in conns if c.status == psutil.CONN_LISTEN]
    assert not psutil.Process(wall.node.pid).children(recursive=True)


# ---------------------------------------------------------------- sim time
def test_use_sim_time_follows_clock(sim: NodeHarness) -> None:
    """Every output is stamped in sim time (none in wall time, none before the first /clock) and ages are
    measured on the sim clock. That the timer stops with the clock: the pause test below."""
    assert wait_until(lambda: len([r for r in sim.scenes() if fused(r)]) >= 5, 20.0), sim.log(2000)
    now_sim = sensors(sim).now()
    for r in sim.scenes():
        assert SIM_START <= r["stamp"] <= now_sim + 0.5
    for r in sim.scenes():
        if fused(r):
            assert all(0.0 <= m["age"] < 0.5 for m in r["modalities"])


def test_clock_pause_stops_cycles_and_resume_recovers(sim: NodeHarness) -> None:
    feeder = sensors(sim)
    feeder.pause(True)
    t_pause, recv_pause = feeder.now(), time.monotonic()
    time.sleep(1.5)  # a paused clock: the node's timer must not run
    # A timer that kept running would stamp its cycles with the frozen sim time; judged by stamps,
    # late delivery of earlier scenes on a loaded machine cannot look like a running timer.
    frozen = sim.scenes(t_pause - PERIOD)
    assert len(frozen) <= 3, [r["stamp"] for r in frozen]
    assert all(r["stamp"] <= t_pause + SLACK for r in received_since(sim, "scene", recv_pause))
    recv_resume = time.monotonic()
    feeder.pause(False)

    def resumed() -> list[dict[str, Any]]:
        return [r for r in received_since(sim, "scene", recv_resume) if all(used(r))]

    assert wait_until(lambda: bool(resumed()), 10.0), sim.log()
    first = resumed()[0]
    assert first["stamp"] <= t_pause + 1.0 / min(SENSOR_HZ.values()) + 2 * PERIOD + SLACK
    assert sim.alive()


def test_future_stamps_rejected_under_sim_time(sim: NodeHarness) -> None:
    feeder = sensors(sim)

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


def _jump_back(sim: NodeHarness, feeder: SensorPublisher, dt: float) -> None:
    before = feeder.now()
    t_new = feeder.jump(-dt)

    def after_jump() -> list[dict[str, Any]]:
        return [r for r in sim.scenes(t_new) if r["stamp"] < before - dt / 2]

    assert wait_until(lambda: any(r["valid"] and all(used(r)) for r in after_jump()), 10.0), sim.log()
    fused_after = [r for r in after_jump() if all(used(r))]
    assert fused_after[0]["stamp"] <= t_new + 1.0 / min(SENSOR_HZ.values()) + 2 * PERIOD + SLACK
    assert wait_until(lambda: len(after_jump()) >= 10, 10.0)


def test_loop_jump_back_resets_and_keeps_publishing(sim: NodeHarness) -> None:
    """A bag loop: /clock and every stamp jump 10 s back. Outputs follow the new time (no stall), fused
    again within a few periods; jumping back again works the same. Runs after the other clock tests: they
    assume a clock that never went back."""
    feeder = sensors(sim)
    for _ in range(2):
        _jump_back(sim, feeder, 10.0)
    assert sim.alive()


def _write_small_bag(path: Path, t0: float, seconds: float) -> None:
    """A rosbag2 of the small sensors, header stamps = record times from ``t0`` [s]."""
    t = rosbags_types()
    with BagWriter(path) as w:
        for k in range(int(seconds * 20)):
            st = t0 + 0.05 * k
            w.write(topics.CAMERA_IMAGE, st, create_image(t, make_header(t, st, topics.CAMERA_FRAME), RGB))
            if k % 2 == 0:
                w.write(topics.LIDAR_POINTS, st, create_cloud(t, make_header(t, st, topics.LIDAR_FRAME), POINTS,
                                                              ("x", "y", "z", "intensity")))
                w.write(topics.GNSS_FIX, st, create_fix(t, make_header(t, st, topics.GNSS_FRAME), 48.137154 + 1e-7 * k,
                                                        11.576124, 520.0, covariance=0.05))


def test_bag_played_in_a_loop_with_clock(sim: NodeHarness, tmp_path: Path) -> None:
    """``lmm-fusion play --loop --clock``: every loop sends /clock and all stamps back to the bag start.
    The node follows each loop (outputs stamped in bag time again, fused within a few periods) and
    never stalls. Runs last (it replaces the simulated clock and sensors with the player)."""
    sim.stop_sensors()
    bag, t0, seconds = tmp_path / "loop", 500.0, 2.5
    _write_small_bag(bag, t0, seconds)
    recv0 = time.monotonic()
    sim.procs.start("player", [sys.executable, "-m", "lmm_fusion.cli", "play", str(bag), "--loop", "--clock",
                               "--wait-for-subscriber", "20"], sim.env)

    def bag_scenes() -> list[dict[str, Any]]:
        return [r for r in received_since(sim, "scene", recv0) if t0 <= r["stamp"] <= t0 + seconds + 1]

    def loops() -> list[int]:
        """Indices where the output stamps went back (a new loop began)."""
        sc = bag_scenes()
        return [j for j in range(1, len(sc)) if sc[j]["stamp"] < sc[j - 1]["stamp"] - 1.0]

    assert wait_until(lambda: len(loops()) >= 2, 30.0), (len(bag_scenes()), sim.procs.log_text("player")[-2000:])
    sc, starts = bag_scenes(), [0, *loops()]
    for a, b in itertools.pairwise(starts):  # complete plays of the bag
        fused_loop = [r for r in sc[a:b] if all(used(r))]
        assert fused_loop, f"a loop without a fused output ({b - a} outputs)"
        if a > 0:  # after a loop (the first play also waits for DDS discovery of the player)
            assert fused_loop[0]["stamp"] <= t0 + 1.0 / min(SENSOR_HZ.values()) + 2 * PERIOD + 2 * SLACK
        # Outputs keep coming at the node's rate through the loop (no stall at the jump).
        assert b - a >= 0.6 * seconds * RATE_HZ, (a, b)
    j = starts[-1]
    assert wait_until(lambda: any(all(used(r)) for r in bag_scenes()[j:]), 10.0), "no fused output after the loop"
    assert sim.alive()
