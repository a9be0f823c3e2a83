"""``lmm-fusion carla``: argument parsing, failing fast without a server, signal handling, and the
setup/teardown path against the real ``carla`` API objects (no server; the world is a stand-in)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from lmm_fusion.base import topics
from lmm_fusion.base.rig import CameraModel, SensorRig
from lmm_fusion.base.vocabulary import Scenario
from lmm_fusion.carla import bridge as cb
from lmm_fusion.carla import convert as cc
from lmm_fusion.carla.control import ControlCommand
from lmm_fusion.cli import main
from lmm_fusion.io import read_image
from lmm_fusion.io.bags import bag_counts, read_bag

HAVE_CARLA = importlib.util.find_spec("carla") is not None
needs_carla = pytest.mark.skipif(not HAVE_CARLA, reason="carla client (carla==0.9.16) not installed")
REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmm-fusion carla")
    cb.add_arguments(p)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- arguments
def test_defaults() -> None:
    a = parse([])
    assert (a.host, a.port, a.tm_port, a.fps, a.sync, a.closed_loop, a.publish) == (
        "127.0.0.1", 2000, 8000, 20.0, False, False, False)
    assert a.record is None and a.town is None and a.duration == 60.0 and a.traffic == 20
    assert a.timeout == 5.0


def test_full_command_line() -> None:
    a = parse(["--host", "10.0.0.5", "--port", "3000", "--town", "Town04", "--sync", "--fps", "40",
               "--closed-loop", "--record", "out/drive", "--duration", "12.5", "--traffic", "0", "--publish"])
    assert (a.host, a.port, a.town, a.sync, a.fps, a.closed_loop, a.record, a.duration, a.traffic, a.publish) == (
        "10.0.0.5", 3000, "Town04", True, 40.0, True, "out/drive", 12.5, 0, True)


@pytest.mark.parametrize("argv", [
    ["--port", "0"], ["--port", "70000"], ["--port", "x"], ["--fps", "0"], ["--fps", "-20"], ["--fps", "nan"],
    ["--duration", "0"], ["--traffic", "-1"], ["--timeout", "0"], ["--storage", "bag"],
])
def test_bad_arguments_rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_cross_checks() -> None:
    rig = SensorRig()
    with pytest.raises(cb.BridgeError, match="--record needs --sync"):
        cb.validate(parse(["--record", "x"]), rig)
    with pytest.raises(cb.BridgeError, match="--fps"):
        cb.validate(parse(["--sync", "--fps", "15"]), rig)  # 15 is no multiple of the 10 Hz LiDAR
    cb.validate(parse(["--sync", "--fps", "20", "--record", "x"]), rig)


def test_cli_dispatch_reaches_module() -> None:
    # --record without --sync is refused before any import of carla or network access
    assert main(["carla", "--record", "somewhere"]) == 2


# ------------------------------------------------------------------------------------ no server
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_reachable_fails_fast_on_closed_port() -> None:
    port = closed_port()
    t0 = time.monotonic()
    with pytest.raises(cb.BridgeError, match=f"127.0.0.1:{port}"):
        cb.check_reachable("127.0.0.1", port, 5.0)
    assert time.monotonic() - t0 < 1.0


@needs_carla
def test_cli_fails_fast_without_server() -> None:
    port = closed_port()
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "lmm_fusion.cli", "carla", "--host", "127.0.0.1", "--port",
                          str(port)], capture_output=True, text=True, timeout=60, cwd=REPO)
    elapsed = time.monotonic() - t0
    assert out.returncode == 1, out.stderr
    assert f"no CARLA server reachable at 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr
    assert elapsed < 20.0  # interpreter start + imports; the refused connection itself is immediate


@needs_carla
def test_connect_times_out_on_silent_server() -> None:
    import carla

    # A socket that accepts TCP but never speaks CARLA's RPC: the client's timeout must end the wait.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        port = srv.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(cb.BridgeError, match=f"127.0.0.1:{port} did not answer within 0.5 s"):
            cb.connect(carla, "127.0.0.1", port, 0.5)
        assert time.monotonic() - t0 < 5.0


def test_signals_set_the_stop_event() -> None:
    event = threading.Event()
    before = signal.getsignal(signal.SIGTERM)
    with cb._stop_on_signals(event):
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        while not event.is_set() and time.monotonic() < deadline:  # delivery is asynchronous
            time.sleep(0.01)
        assert event.is_set()
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------- carla API objects, stand-in world
class FakeBlueprint:
    """Stands in for ``carla.ActorBlueprint`` (which only a server can create)."""

    ATTRS: ClassVar[dict[str, list[str]]] = {
        "sensor.camera.rgb": ["image_size_x", "image_size_y", "fov", "sensor_tick", "role_name"],
        "sensor.lidar.ray_cast": ["channels", "range", "points_per_second", "rotation_frequency", "upper_fov",
                                  "lower_fov", "horizontal_fov", "noise_stddev", "dropoff_general_rate",
                                  "dropoff_intensity_limit", "dropoff_zero_intensity", "noise_seed",
                                  "sensor_tick", "role_name", "atmosphere_attenuation_rate"],
        "sensor.other.gnss": ["noise_lat_stddev", "noise_lon_stddev", "noise_alt_stddev", "noise_seed",
                              "sensor_tick", "role_name", "noise_lat_bias"],
    }

    def __init__(self, bp_id: str) -> None:
        self.id = bp_id
        self.values: dict[str, str] = {}
        self.names = self.ATTRS.get(bp_id, ["role_name", "number_of_wheels"])

    def has_attribute(self, key: str) -> bool:
        return key in self.names

    def set_attribute(self, key: str, value: str) -> None:
        assert isinstance(value, str)
        self.values[key] = value


class FakeActor:
    def __init__(self, actor_id: int, type_id: str, transform: Any, parent: Any = None) -> None:
        import carla

        self.id = actor_id
        self.type_id = type_id
        self.transform = transform
        self.parent = parent
        self.bounding_box = carla.BoundingBox(carla.Location(x=0.1, y=0.0, z=0.7), carla.Vector3D(x=2.4, y=0.9, z=0.75))
        self.listening = False
        self.autopilot: list[bool] = []

    def listen(self, cb_: Any) -> None:
        self.listening = True

    def stop(self) -> None:
        self.listening = False

    def set_autopilot(self, on: bool, port: int) -> None:
        self.autopilot.append(on)

    def get_transform(self) -> Any:
        return self.transform


class FakeMap:
    name = "Carla/Maps/Town04"

    def transform_to_geolocation(self, loc: Any) -> Any:
        import carla

        return carla.GeoLocation(latitude=49.0, longitude=8.0, altitude=0.0)

    def get_spawn_points(self) -> list[Any]:
        import carla

        return [carla.Transform(carla.Location(x=10.0 * i, y=5.0, z=0.3), carla.Rotation(yaw=90.0)) for i in range(5)]


class FakeWorld:
    def __init__(self, fail_at_tick: int) -> None:
        import carla

        self.settings = carla.WorldSettings()
        self.applied: list[tuple[bool, float]] = []
        self.actors: dict[int, FakeActor] = {}
        self.ticks = 0
        self.fail_at_tick = fail_at_tick

    def get_settings(self) -> Any:
        import carla

        s = carla.WorldSettings()
        s.synchronous_mode = self.settings.synchronous_mode
        s.fixed_delta_seconds = self.settings.fixed_delta_seconds
        return s

    def apply_settings(self, s: Any) -> None:
        self.applied.append((s.synchronous_mode, s.fixed_delta_seconds))
        self.settings = s

    def get_map(self) -> FakeMap:
        return FakeMap()

    def get_blueprint_library(self) -> Any:
        class Library:
            def find(self, bp_id: str) -> FakeBlueprint:
                return FakeBlueprint(bp_id)

            def filter(self, pattern: str) -> list[FakeBlueprint]:
                return [FakeBlueprint("vehicle.audi.a2")]
        return Library()

    def _spawn(self, bp: FakeBlueprint, transform: Any, parent: Any = None) -> FakeActor:
        import carla

        assert isinstance(transform, carla.Transform)
        actor = FakeActor(100 + len(self.actors), bp.id, transform, parent)
        actor.blueprint = bp  # type: ignore[attr-defined]
        self.actors[actor.id] = actor
        return actor

    def try_spawn_actor(self, bp: FakeBlueprint, transform: Any) -> FakeActor:
        return self._spawn(bp, transform)

    def spawn_actor(self, bp: FakeBlueprint, transform: Any, attach_to: Any = None) -> FakeActor:
        assert attach_to is not None
        return self._spawn(bp, transform, attach_to)

    def tick(self, timeout: float) -> int:
        self.ticks += 1
        if self.ticks >= self.fail_at_tick:
            raise RuntimeError("time-out of 5000ms while waiting for the simulator")
        return 1000 + self.ticks


class FakeTM:
    def __init__(self) -> None:
        self.sync: list[bool] = []

    def set_synchronous_mode(self, on: bool) -> None:
        self.sync.append(on)

    def set_random_device_seed(self, seed: int) -> None:
        pass


class FakeClient:
    def __init__(self, world: FakeWorld) -> None:
        self.world = world
        self.tm = FakeTM()
        self.batches: list[list[Any]] = []

    def get_world(self) -> FakeWorld:
        return self.world

    def get_trafficmanager(self, port: int) -> FakeTM:
        return self.tm

    def apply_batch(self, commands: list[Any]) -> None:
        self.batches.append(commands)


@needs_carla
def test_setup_uses_carla_objects_and_teardown_restores_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import carla

    world = FakeWorld(fail_at_tick=2)  # the server "dies" on the first tick of the drive
    client = FakeClient(world)
    monkeypatch.setattr(cb, "connect", lambda *a: client)
    args = parse(["--sync", "--fps", "20", "--traffic", "0", "--duration", "5", "--closed-loop"])
    monkeypatch.setattr(cb.Outputs, "__init__", _outputs_without_pipeline)
    rc = cb.run(args)
    assert rc == 1
    # synchronous mode with the fixed step, then the original settings back
    assert world.applied[0] == (True, pytest.approx(0.05))
    assert world.applied[-1][0] is False and world.applied[-1][1] in (None, 0.0)  # variable step again
    assert not world.settings.synchronous_mode
    assert client.tm.sync == [True, False]
    # every spawned actor destroyed in one batch of real DestroyActor commands, sensors first
    (batch,) = client.batches
    assert all(isinstance(c, carla.command.DestroyActor) for c in batch)
    ego = next(a for a in world.actors.values() if a.parent is None)
    assert [c.actor_id for c in batch][-1] == ego.id
    assert sorted(c.actor_id for c in batch) == sorted(world.actors)
    sensors = {a.type_id: a for a in world.actors.values() if a.parent is ego}
    assert set(sensors) == set(cb.SENSOR_BLUEPRINTS.values())
    assert not any(s.listening for s in sensors.values())
    # blueprint attributes from the rig
    lidar_bp = sensors["sensor.lidar.ray_cast"].blueprint  # type: ignore[attr-defined]
    assert lidar_bp.values["channels"] == "64" and lidar_bp.values["rotation_frequency"] == "20"
    assert sensors["sensor.camera.rgb"].blueprint.values["fov"] == "90"  # type: ignore[attr-defined]
    assert ego.blueprint.values["role_name"] == "hero"  # type: ignore[attr-defined]
    # mounts: base_link from the bounding box, rig mount on top, y and pitch negated
    rig = SensorRig()
    base = cc.base_link_in_actor((0.1, 0.0, 0.7), (2.4, 0.9, 0.75))
    cam = sensors["sensor.camera.rgb"].transform
    assert cam.location.x == pytest.approx(rig.camera_mount.x + base[0], abs=1e-5)
    assert cam.location.y == pytest.approx(-rig.camera_mount.y, abs=1e-6)
    assert cam.location.z == pytest.approx(rig.camera_mount.z + base[2], abs=1e-5)
    assert cam.rotation.pitch == pytest.approx(-math.degrees(rig.camera_mount.pitch), abs=1e-4)


def _outputs_without_pipeline(self: Any, bridge: Any, rig: SensorRig) -> None:
    # The closed-loop flag would load a model; this test is about the CARLA side only.
    self.bridge, self.rig, self.ros, self.ingest, self.pipeline = bridge, rig, None, None, None
    self.controller = self.recorder = self.assessment = None
    self.actions = Counter()


@needs_carla
def test_vehicle_control_and_lanes_with_carla_types() -> None:
    import carla

    vc = cb.vehicle_control(carla, ControlCommand("pipeline", throttle=0.4, steer=-0.2, brake=0.0))
    assert isinstance(vc, carla.VehicleControl)
    assert (vc.throttle, vc.steer, vc.brake, vc.hand_brake) == pytest.approx((0.4, -0.2, 0.0, False))
    lanes = cb.CarlaLanes(carla, None, base_in_actor=(-1.0, 0.0, 0.0))
    # actor at CARLA (10, -5) heading CARLA yaw -90 deg = ENU north; base_link 1 m behind it
    x, y, _, yaw = lanes.update(carla.Transform(carla.Location(x=10.0, y=-5.0, z=0.0), carla.Rotation(yaw=-90.0)))
    assert (x, y, yaw) == pytest.approx((10.0, 4.0, math.pi / 2))
    # a map point 10 m further north is 10 m ahead of base_link; one 3 m east is to its right
    np.testing.assert_allclose(lanes.to_base(np.array([[10.0, 14.0], [13.0, 4.0]])), [[10.0, 0.0], [0.0, -3.0]],
                               atol=1e-9)


# ------------------------------------------------------------------- whole loop on a stand-in world
LANE_W = 3.5


class FakeWaypoint:
    """Straight road along CARLA +x; lanes -1 (y = 0) and -2 (y = -3.5, to the driver's left)."""

    def __init__(self, x: float, lane_id: int) -> None:
        import carla

        self.x, self.lane_id = x, lane_id
        self.road_id, self.section_id, self.lane_width = 7, 0, LANE_W
        self.lane_type = carla.LaneType.Driving
        self.lane_change = carla.LaneChange.Both
        self.transform = carla.Transform(carla.Location(x=x, y=(-1 - lane_id) * LANE_W, z=0.0), carla.Rotation())

    def next(self, d: float) -> list[FakeWaypoint]:
        return [FakeWaypoint(self.x + d, self.lane_id)]

    def previous(self, d: float) -> list[FakeWaypoint]:
        return [FakeWaypoint(self.x - d, self.lane_id)]

    def get_left_lane(self) -> FakeWaypoint | None:
        return FakeWaypoint(self.x, -2) if self.lane_id == -1 else None

    def get_right_lane(self) -> FakeWaypoint | None:
        return FakeWaypoint(self.x, -1) if self.lane_id == -2 else None


class RoadMap(FakeMap):
    def get_waypoint(self, loc: Any, project_to_road: bool = True, lane_type: Any = None) -> FakeWaypoint:
        return FakeWaypoint(loc.x, -2 if loc.y < -LANE_W / 2 else -1)

    def get_spawn_points(self) -> list[Any]:
        import carla

        return [carla.Transform(carla.Location(x=40.0 * i, y=0.0, z=0.3), carla.Rotation()) for i in range(5)]


class Data:
    """A sensor measurement as CARLA hands it to ``listen`` callbacks."""

    def __init__(self, frame: int, timestamp: float, **fields: Any) -> None:
        self.frame, self.timestamp = frame, timestamp
        self.__dict__.update(fields)


class MovingActor(FakeActor):
    """Actor driving along CARLA +x at ``speed``; sensors report through the stored callback."""

    def __init__(self, *a: Any, speed: float = 0.0, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.speed = speed
        self.callback: Any = None
        self.controls: list[Any] = []

    def listen(self, cb_: Any) -> None:
        self.callback = cb_
        self.listening = True

    def get_velocity(self) -> Any:
        import carla

        return carla.Vector3D(x=self.speed, y=0.0, z=0.0)

    def apply_control(self, control: Any) -> None:
        self.controls.append(control)

    def get_traffic_light_state(self) -> Any:
        import carla

        return carla.TrafficLightState.Green

    def get_traffic_light(self) -> None:
        return None

    def get_angular_velocity(self) -> Any:
        import carla

        return carla.Vector3D(x=0.0, y=0.0, z=0.0)


class RoadWorld(FakeWorld):
    """Ticks move every actor and call the sensors' callbacks with frames stamped by frame number;
    the LiDAR frame of ``drop_lidar_frame`` is lost."""

    def __init__(self, rig: SensorRig, drop_lidar_frame: int) -> None:
        super().__init__(fail_at_tick=10**9)
        self.rig = rig
        self.drop_lidar_frame = drop_lidar_frame
        self.frame = 500
        self.dt = 0.05
        self.lead: MovingActor | None = None

    def get_map(self) -> RoadMap:
        return RoadMap()

    def _spawn(self, bp: FakeBlueprint, transform: Any, parent: Any = None) -> FakeActor:
        import carla

        speed = 10.0 if parent is None else 0.0
        actor = MovingActor(100 + len(self.actors), bp.id, transform, parent, speed=speed)
        actor.blueprint = bp  # type: ignore[attr-defined]
        self.actors[actor.id] = actor
        if parent is None and self.lead is None:  # a slower car 30 m ahead in the ego lane
            self.lead = MovingActor(99, "vehicle.audi.a2", carla.Transform(
                carla.Location(x=transform.location.x + 30.0, y=transform.location.y, z=0.0), transform.rotation),
                speed=6.0)
        return actor

    def get_actors(self) -> list[Any]:
        return [*self.actors.values(), self.lead]

    def get_snapshot(self) -> Any:
        snap = Data(self.frame, 0.0)
        snap.timestamp = Data(self.frame, 0.0, elapsed_seconds=self.frame * self.dt, delta_seconds=self.dt)
        return snap

    def tick(self, timeout: float) -> int:
        import carla

        self.frame += 1
        stamp = self.frame * self.dt
        for actor in [*self.actors.values(), self.lead]:
            if actor.parent is None and actor.speed:
                loc = actor.transform.location
                actor.transform = carla.Transform(carla.Location(x=loc.x + actor.speed * self.dt, y=loc.y, z=loc.z),
                                                  actor.transform.rotation)
        cam = self.rig.camera
        for actor in list(self.actors.values()):
            if actor.callback is None:
                continue
            if actor.type_id == "sensor.camera.rgb":
                raw = np.full((cam.height, cam.width, 4), (30, 20, 10, 255), np.uint8).tobytes()
                actor.callback(Data(self.frame, stamp, raw_data=raw, width=cam.width, height=cam.height))
            elif actor.type_id == "sensor.lidar.ray_cast":
                if self.frame == self.drop_lidar_frame:
                    continue
                pts = np.array([[20.0, 0.0, -1.0, 0.5], [25.0, 2.0, 0.0, 0.3]], np.float32)
                actor.callback(Data(self.frame, stamp, raw_data=pts.tobytes()))
            else:
                actor.callback(Data(self.frame, stamp, latitude=49.0, longitude=8.0 + 1e-6 * self.frame, altitude=0.0))
        return self.frame


@needs_carla
@pytest.mark.parametrize("compressed", [False, True])
def test_sync_loop_records_bag_and_drives(tmp_path: Path, compressed: bool) -> None:
    import carla

    rig = SensorRig(camera=CameraModel(width=64, height=32))
    world = RoadWorld(rig, drop_lidar_frame=506)  # a frame on which the 10 Hz LiDAR is due
    client = FakeClient(world)
    bag = tmp_path / "drive"
    # the closed loop (which loads a model) in one variant only, to keep the test fast
    extra = ["--compressed"] if compressed else ["--closed-loop", "--backend", "torch"]
    args = parse(["--sync", "--fps", "20", "--duration", "1.0", "--traffic", "0", "--record", str(bag),
                  "--timeout", "0.5", *extra])
    bridge = cb.CarlaBridge(carla, client, args, rig)
    try:
        bridge.setup()
        summary = bridge.loop()
    finally:
        bridge.teardown()
    # 1 start tick + 21 driven ticks (frames 502..522); the assembler starts at frame 502
    asm = summary["assembly"]
    assert asm["incomplete"] == 1 and asm["missing"] == {"camera": 0, "lidar": 1, "gnss": 0}
    assert asm["complete"] == 20 and summary["ticks"] == 21
    counts = bag_counts(bag)
    n_complete = asm["complete"]
    camera_topic = topics.CAMERA_COMPRESSED if compressed else topics.CAMERA_IMAGE
    assert counts[camera_topic] == n_complete == counts[topics.CAMERA_INFO]
    assert (topics.CAMERA_IMAGE if compressed else topics.CAMERA_COMPRESSED) not in counts
    assert counts[topics.LIDAR_POINTS] == counts[topics.GT_SCENE] == counts[topics.GT_EGO] == counts[topics.GNSS_FIX]
    assert counts[topics.TF_STATIC] == 1
    # the lead car 30 m ahead (box centre to actor origin), 4 m/s slower: FOLLOW or SLOW_DOWN, LEAD_VEHICLE
    scen = [m.msg.data for m in read_bag(bag, [topics.GT_SCENARIO])]
    assert set(scen) == {Scenario.LEAD_VEHICLE.name}
    scene = next(m.msg for m in read_bag(bag, [topics.GT_SCENE]))
    assert 20.0 < scene.nearest_obstacle_distance < 30.0
    assert scene.time_to_collision == pytest.approx(scene.nearest_obstacle_distance / 4.0, rel=0.02)
    img = read_image(next(m.msg for m in read_bag(bag, [camera_topic])))
    assert img.shape == (32, 64, 3)
    assert np.abs(img.astype(int) - [10, 20, 30]).max() <= (3 if compressed else 0)  # BGRA (30, 20, 10) -> RGB
    cloud = next(m.msg for m in read_bag(bag, [topics.LIDAR_POINTS]))
    assert cloud.width * cloud.height == 2
    if compressed:
        return
    # closed loop: the pipeline ran on every LiDAR tick and each tick produced a control decision
    assert summary["assessments"] == counts[topics.LIDAR_POINTS]
    assert sum(summary["interventions"].values()) >= 1
    # teardown destroyed everything
    assert sorted(c.actor_id for c in client.batches[-1]) == sorted(world.actors)


@needs_carla
def test_async_loop_feeds_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    import carla

    rig = SensorRig(camera=CameraModel(width=64, height=32))
    world = RoadWorld(rig, drop_lidar_frame=-1)
    # asynchronous mode: the server ticks on its own; the client waits for each tick
    monkeypatch.setattr(world, "wait_for_tick", lambda timeout: (world.tick(timeout), world.get_snapshot())[1],
                        raising=False)
    client = FakeClient(world)
    args = parse(["--duration", "0.3", "--traffic", "0", "--pipeline", "--backend", "torch"])
    bridge = cb.CarlaBridge(carla, client, args, rig)
    try:
        bridge.setup()
        summary = bridge.loop()
    finally:
        bridge.teardown()
    assert world.applied == [(False, None)] or world.applied[-1][0] is False  # never switched to sync
    assert client.tm.sync[0] is False
    # 7 ticks at 20 Hz; the sensors fire on every tick, the bridge keeps LiDAR and GNSS at 10 Hz
    assert summary["ticks"] == 7 and summary["assessments"] == 4
    assert summary["assembly"]["skipped"] == {"lidar": 3, "gnss": 3}
    assert sum(summary["actions"].values()) == 4
    ego = next(a for a in world.actors.values() if a.parent is None)
    assert ego.autopilot == [True]  # open loop: the Traffic Manager drives
