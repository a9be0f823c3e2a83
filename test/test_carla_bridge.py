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
import types
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
    with pytest.raises(cb.BridgeError, match="--fps"):
        cb.validate(parse(["--fps", "15"]), rig)  # asynchronous mode ticks with the fixed step 1/--fps too
    cb.validate(parse(["--sync", "--fps", "20", "--record", "x"]), rig)
    cb.validate(parse(["--fps", "40"]), rig)


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

    def get_attribute(self, key: str) -> str:
        assert key in self.names
        return self.values.get(key, "4" if key == "number_of_wheels" else "")


def physics_control() -> Any:
    """The ego's ``carla.VehiclePhysicsControl`` as a server returns it: wheel positions in cm, world
    frame (the car stands at x = 30 m, y = 5 m), front wheels steer 50 deg, 2.8 m wheelbase."""
    import carla

    wheels = [carla.WheelPhysicsControl(max_steer_angle=a, position=carla.Vector3D(x=3000.0 + x, y=500.0 + y, z=35.0))
              for a, x, y in ((50.0, 150.0, -80.0), (50.0, 150.0, 80.0), (0.0, -130.0, -80.0), (0.0, -130.0, 80.0))]
    curve = [carla.Vector2D(0.0, 1.0), carla.Vector2D(120.0, 0.6)]
    return carla.VehiclePhysicsControl(wheels=wheels, steering_curve=curve)


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

    def get_physics_control(self) -> Any:
        return physics_control()


_GEO_MAPS: dict[tuple[float, float], Any] = {}


def geo_map(lat: float = 49.0, lon: float = 8.0) -> Any:
    """A real ``carla.Map`` geo-referenced at (lat, lon): the client computes its geolocations."""
    import carla
    from carla_xodr import straight_xodr

    if (lat, lon) not in _GEO_MAPS:
        _GEO_MAPS[(lat, lon)] = carla.Map("geo", straight_xodr(lat, lon))
    return _GEO_MAPS[(lat, lon)]


class FakeMap:
    name = "Carla/Maps/Town04"

    def transform_to_geolocation(self, loc: Any) -> Any:
        return geo_map().transform_to_geolocation(loc)

    def get_spawn_points(self) -> list[Any]:
        import carla

        return [carla.Transform(carla.Location(x=10.0 * i, y=5.0, z=0.3), carla.Rotation(yaw=90.0)) for i in range(5)]


def _settings(synchronous_mode: bool = False, fixed_delta_seconds: float | None = None) -> Any:
    import carla

    s = carla.WorldSettings()
    s.synchronous_mode = synchronous_mode
    s.fixed_delta_seconds = fixed_delta_seconds
    return s


class FakeWorld:
    def __init__(self, fail_at_tick: int, settings: Any = None, occupied: tuple[int, ...] = ()) -> None:
        """``occupied``: spawn point indices where something stands already (spawns there fail)."""
        self.settings = settings if settings is not None else _settings()
        self.applied: list[tuple[bool, float]] = []
        self.actors: dict[int, FakeActor] = {}
        self.ticks = 0
        self.fail_at_tick = fail_at_tick
        self.occupied = occupied
        self.ignore_step = False  # a server that does not take fixed_delta_seconds

    def get_settings(self) -> Any:
        return _settings(self.settings.synchronous_mode, self.settings.fixed_delta_seconds)

    def apply_settings(self, s: Any) -> None:
        self.applied.append((s.synchronous_mode, s.fixed_delta_seconds))
        self.settings = _settings(s.synchronous_mode, None if self.ignore_step else s.fixed_delta_seconds)

    def get_map(self) -> FakeMap:
        return FakeMap()

    def get_blueprint_library(self) -> Any:
        class Library:
            def find(self, bp_id: str) -> FakeBlueprint:
                return FakeBlueprint(bp_id)

            def filter(self, pattern: str) -> list[FakeBlueprint]:
                return [FakeBlueprint("vehicle.audi.a2")]
        return Library()

    def blocked(self, transform: Any) -> bool:
        """Whether a spawn at ``transform`` collides with what stands at an occupied spawn point or an actor."""
        loc = transform.location
        taken = [self.get_map().get_spawn_points()[i].location for i in self.occupied]
        taken += [a.transform.location for a in self.actors.values() if a.parent is None]
        return any(math.dist((loc.x, loc.y), (t.x, t.y)) < 2.0 for t in taken)

    def _spawn(self, bp: FakeBlueprint, transform: Any, parent: Any = None) -> FakeActor:
        import carla

        assert isinstance(transform, carla.Transform)
        actor = FakeActor(100 + len(self.actors), bp.id, transform, parent)
        actor.blueprint = bp  # type: ignore[attr-defined]
        self.actors[actor.id] = actor
        return actor

    def try_spawn_actor(self, bp: FakeBlueprint, transform: Any) -> FakeActor | None:
        return None if self.blocked(transform) else self._spawn(bp, transform)

    def spawn_actor(self, bp: FakeBlueprint, transform: Any, attach_to: Any = None) -> FakeActor:
        assert attach_to is not None
        return self._spawn(bp, transform, attach_to)

    def tick(self, timeout: float) -> int:
        self.ticks += 1
        if self.ticks >= self.fail_at_tick:
            raise RuntimeError("time-out of 5000ms while waiting for the simulator")
        return 1000 + self.ticks


class FakeTM:
    """Stands in for ``carla.TrafficManager`` (a server-side service); records what the bridge asks.
    ``actions(ego)`` gives its next actions (``get_all_actions``)."""

    def __init__(self) -> None:
        self.sync: list[bool] = []
        self.lane_changes: list[tuple[int, bool]] = []
        self.paths: list[list[Any]] = []
        self.actions: Any = lambda ego: []

    def set_synchronous_mode(self, on: bool) -> None:
        self.sync.append(on)

    def set_random_device_seed(self, seed: int) -> None:
        pass

    def auto_lane_change(self, actor: Any, on: bool) -> None:
        self.lane_changes.append((actor.id, on))

    def set_path(self, actor: Any, path: list[Any]) -> None:
        import carla

        assert all(isinstance(p, carla.Location) for p in path)
        self.paths.append(path)

    def get_all_actions(self, actor: Any) -> list[Any]:
        return self.actions(actor)


class Response:
    """Stands in for ``carla.command.Response`` (which Python cannot construct)."""

    def __init__(self, actor_id: int, error: str = "") -> None:
        self.actor_id, self.error = actor_id, error

    def has_error(self) -> bool:
        return bool(self.error)


class SpawnActor:
    """Stands in for ``carla.command.SpawnActor``, which needs a server-made ``carla.ActorBlueprint``."""

    def __init__(self, bp: FakeBlueprint, transform: Any) -> None:
        self.bp, self.transform = bp, transform
        self.chain: list[Any] = []

    def then(self, command: Any) -> SpawnActor:
        import carla

        assert isinstance(command, carla.command.SetAutopilot)
        self.chain.append(command)
        return self


class CarlaWithFakeSpawn:
    """The real ``carla`` module, except ``command.SpawnActor``."""

    def __init__(self) -> None:
        import carla

        self._carla = carla
        self.command = types.SimpleNamespace(SpawnActor=SpawnActor, SetAutopilot=carla.command.SetAutopilot,
                                             FutureActor=carla.command.FutureActor,
                                             DestroyActor=carla.command.DestroyActor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._carla, name)


class FakeClient:
    def __init__(self, world: FakeWorld, destroy_errors: dict[int, str] | None = None) -> None:
        self.world = world
        self.tm = FakeTM()
        self.batches: list[list[Any]] = []  # DestroyActor batches
        self.spawn_batches: list[list[Any]] = []
        self.destroy_errors = destroy_errors or {}

    def get_world(self) -> FakeWorld:
        return self.world

    def get_trafficmanager(self, port: int) -> FakeTM:
        return self.tm

    def apply_batch(self, commands: list[Any]) -> None:
        raise AssertionError("fire-and-forget batch: its failures would go unnoticed")

    def apply_batch_sync(self, commands: list[Any], do_tick: bool = False) -> list[Response]:
        import carla

        if all(isinstance(c, carla.command.DestroyActor) for c in commands):
            self.batches.append(commands)
            out = []
            for c in commands:
                error = self.destroy_errors.get(c.actor_id, "")
                if not error and c.actor_id not in self.world.actors:
                    error = f"destroy: actor {c.actor_id} not found"
                out.append(Response(c.actor_id if not error else 0, error))
            return out
        self.spawn_batches.append(commands)
        out = []
        for c in commands:
            assert isinstance(c, SpawnActor) and len(c.chain) == 1
            if self.world.blocked(c.transform):
                out.append(Response(0, "Spawn failed because of collision at spawn position"))
            else:
                out.append(Response(self.world._spawn(c.bp, c.transform).id))
        return out


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
        self.is_junction, self.junction_id = False, -1
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

    def get_physics_control(self) -> Any:
        import carla

        world = getattr(self, "world", None)
        if world is not None and world.wheels_unset_before_tick and world.frame == 500:
            # as a server may answer before the vehicle was simulated: every wheel at the origin
            return carla.VehiclePhysicsControl(wheels=[carla.WheelPhysicsControl(max_steer_angle=a)
                                                       for a in (70.0, 70.0, 0.0, 0.0)])
        return physics_control()


class RoadWorld(FakeWorld):
    """Ticks move every actor and call the sensors' callbacks with frames stamped by frame number;
    the LiDAR frame of ``drop_lidar_frame`` is lost."""

    def __init__(self, rig: SensorRig, drop_lidar_frame: int, long_ticks: dict[int, float] | None = None) -> None:
        super().__init__(fail_at_tick=10**9)
        self.rig = rig
        self.drop_lidar_frame = drop_lidar_frame
        self.frame = 500
        self.dt = 0.05
        self.elapsed = self.frame * self.dt
        self.long_ticks = long_ticks or {}  # frame -> its step [s], other than dt
        self.wheels_unset_before_tick = False
        self.lead: MovingActor | None = None

    def get_map(self) -> RoadMap:
        return RoadMap()

    def _spawn(self, bp: FakeBlueprint, transform: Any, parent: Any = None) -> FakeActor:
        import carla

        speed = 10.0 if parent is None else 0.0
        actor = MovingActor(100 + len(self.actors), bp.id, transform, parent, speed=speed)
        actor.blueprint = bp  # type: ignore[attr-defined]
        actor.world = self  # type: ignore[attr-defined]
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
        snap.timestamp = Data(self.frame, 0.0, elapsed_seconds=self.elapsed,
                              delta_seconds=self.long_ticks.get(self.frame, self.dt))
        return snap

    def tick(self, timeout: float) -> int:
        import carla

        self.frame += 1
        dt = self.long_ticks.get(self.frame, self.dt)
        self.elapsed += dt
        stamp = self.elapsed
        for actor in [*self.actors.values(), self.lead]:
            if actor.parent is None and actor.speed:
                loc = actor.transform.location
                actor.transform = carla.Transform(carla.Location(x=loc.x + actor.speed * dt, y=loc.y, z=loc.z),
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
    world.wheels_unset_before_tick = True  # the steering geometry is read again after the first tick
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
    # pure pursuit steers with the ego's own geometry (physics control: 2.8 m, 50 deg, steering curve)
    assert bridge.lateral.wheelbase == pytest.approx(2.8, abs=1e-6)
    assert bridge.lateral.max_steer_rad == pytest.approx(math.radians(50.0))
    np.testing.assert_allclose(bridge.lateral.steering_curve, [(0.0, 1.0), (120.0, 0.6)], rtol=1e-6)
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
    # never switched to sync, but ticking with the fixed step 1/--fps (full LiDAR sweeps), restored after
    assert world.applied == [(False, pytest.approx(0.05)), (False, None)]
    assert client.tm.sync == []  # the Traffic Manager's mode is left alone
    assert client.tm.paths and client.tm.lane_changes == [(next(iter(world.actors)), False)]
    # 7 ticks at 20 Hz; the sensors fire on every tick, the bridge keeps LiDAR and GNSS at 10 Hz
    assert summary["ticks"] == 7 and summary["assessments"] == 4
    assert summary["assembly"]["skipped"] == {"lidar": 3, "gnss": 3}
    assert sum(summary["actions"].values()) == 4
    ego = next(a for a in world.actors.values() if a.parent is None)
    assert ego.autopilot == [True]  # open loop: the Traffic Manager drives


# ------------------------------------------------------------- what setup changes, and teardown restores
def _bridge(world: FakeWorld, argv: list[str], client: FakeClient | None = None, carla: Any = None) -> cb.CarlaBridge:
    import carla as carla_module

    client = client or FakeClient(world)
    return cb.CarlaBridge(carla or carla_module, client, parse(["--traffic", "0", *argv]), SensorRig())


@needs_carla
def test_async_mode_ticks_with_a_fixed_step_and_restores_only_it() -> None:
    world = FakeWorld(fail_at_tick=10**9)  # asynchronous, variable step: CARLA's default
    bridge = _bridge(world, ["--fps", "20"])
    bridge.setup()
    assert world.applied == [(False, pytest.approx(0.05))]  # stays asynchronous, fixed step 1/--fps
    report = bridge.teardown()
    assert world.applied[-1] == (False, None) and report["world_settings"]["fixed_delta_seconds"] is None
    assert bridge.client.tm.sync == [] and "tm_synchronous_mode" not in report
    # a world already asynchronous at 1/--fps is left as it is: nothing applied, nothing restored
    world = FakeWorld(fail_at_tick=10**9, settings=_settings(False, 0.05))
    bridge = _bridge(world, ["--fps", "20"])
    bridge.setup()
    report = bridge.teardown()
    assert world.applied == [] and "world_settings" not in report and report["destroyed"] == 4


@needs_carla
def test_world_ticked_by_another_client_is_not_changed() -> None:
    # another client runs the world synchronously at 10 Hz: a 20 Hz LiDAR turn would sweep 720 deg per tick
    world = FakeWorld(fail_at_tick=10**9, settings=_settings(True, 0.1))
    with pytest.raises(cb.BridgeError, match=r"fixed_delta_seconds=0.1; .* pass --fps 10"):
        _bridge(world, ["--fps", "20"]).setup()
    with pytest.raises(cb.BridgeError, match="variable step"):
        _bridge(FakeWorld(fail_at_tick=10**9, settings=_settings(True, None)), ["--fps", "20"]).setup()
    # at 1/--fps it is used as it is, and teardown touches neither the world nor the shared TM
    world = FakeWorld(fail_at_tick=10**9, settings=_settings(True, 0.05))
    bridge = _bridge(world, ["--fps", "20"])
    bridge.setup()
    bridge.teardown()
    assert world.applied == [] and bridge.client.tm.sync == []
    # --sync on a world that already is synchronous at 1/--fps: the TM is set synchronous (this client
    # ticks) and stays so afterwards, like the world
    world = FakeWorld(fail_at_tick=10**9, settings=_settings(True, 0.05))
    bridge = _bridge(world, ["--sync", "--fps", "20"])
    bridge.setup()
    bridge.teardown()
    assert world.applied == [] and bridge.client.tm.sync == [True]


@needs_carla
def test_server_refusing_the_step_is_an_error() -> None:
    world = FakeWorld(fail_at_tick=10**9)
    world.ignore_step = True
    bridge = _bridge(world, ["--sync", "--fps", "20"])
    with pytest.raises(cb.BridgeError, match=r"did not take .*fixed_delta_seconds=0\.05"):
        bridge.setup()
    bridge.teardown()
    assert world.applied[-1] == (False, None)  # what was changed goes back all the same


@needs_carla
def test_teardown_reports_failed_destroys(caplog: pytest.LogCaptureFixture) -> None:
    world = FakeWorld(fail_at_tick=10**9)
    client = FakeClient(world)
    bridge = _bridge(world, ["--sync", "--fps", "20"], client)
    bridge.setup()
    ego = bridge.ego.id
    client.destroy_errors = {ego: "actor is being destroyed already"}
    with caplog.at_level("ERROR", logger="lmm_fusion.carla.bridge"):
        report = bridge.teardown()
    assert report["destroyed"] == 3 and report["destroy_failed"] == {str(ego): "actor is being destroyed already"}
    assert f"could not destroy 1 of 4 actors: {ego}: actor is being destroyed already" in caplog.text
    # every other step still ran: the TM back to asynchronous mode, the world's settings restored
    assert client.tm.sync == [True, False] and world.applied[-1] == (False, None)
    assert report["tm_synchronous_mode"] is False
    # a server that fails the whole batch: every actor is reported
    world = FakeWorld(fail_at_tick=10**9)
    client = FakeClient(world)
    bridge = _bridge(world, ["--sync", "--fps", "20"], client)
    bridge.setup()

    def broken(commands: list[Any], do_tick: bool = False) -> list[Any]:
        raise RuntimeError("time-out of 5000ms while waiting for the simulator")

    client.apply_batch_sync = broken  # type: ignore[method-assign]
    report = bridge.teardown()
    assert report["destroyed"] == 0 and len(report["destroy_failed"]) == 4
    assert world.applied[-1] == (False, None)


def test_traffic_spawn_points_exclude_the_ego() -> None:
    pts = [types.SimpleNamespace(location=types.SimpleNamespace(x=x, y=0.0, z=0.0)) for x in (0.0, 5.0, 20.0, 40.0)]
    assert cb.traffic_spawn_points(pts, [3, 1, 0, 2], ego_index=0) == [pts[3], pts[2]]  # 1 is 5 m from the ego
    assert cb.traffic_spawn_points(pts, [3, 1, 0, 2], ego_index=0, clearance=1.0) == [pts[3], pts[1], pts[2]]
    with pytest.raises(ValueError, match="ego_index"):
        cb.traffic_spawn_points(pts, [0, 1], ego_index=-1)


@needs_carla
def test_traffic_avoids_the_ego_and_retries_collisions() -> None:
    order = [int(i) for i in np.random.default_rng(0).permutation(5)]
    # something stands at the first spawn point tried: the ego takes the second one
    world = FakeWorld(fail_at_tick=10**9, occupied=(order[0],))
    client = FakeClient(world)
    bridge = _bridge(world, ["--traffic", "3"], client, carla=CarlaWithFakeSpawn())
    bridge.setup()
    spawn_points = FakeMap().get_spawn_points()
    ego_xy = (bridge.ego.transform.location.x, bridge.ego.transform.location.y)
    assert ego_xy == (spawn_points[order[1]].location.x, spawn_points[order[1]].location.y)
    tried = [(c.transform.location.x, c.transform.location.y) for batch in client.spawn_batches for c in batch]
    assert ego_xy not in tried  # never on the ego
    # the occupied point failed (collision response) and the next free one was tried in a second batch
    assert [len(b) for b in client.spawn_batches] == [3, 1]
    assert bridge.traffic == {"requested": 3, "spawned": 3,
                              "failed": {"Spawn failed because of collision at spawn position": 1}}
    traffic = [a.id for a in world.actors.values() if a.type_id == "vehicle.audi.a2" and a.id != bridge.ego.id]
    assert len(traffic) == 3
    report = bridge.teardown()
    destroyed = {c.actor_id for c in client.batches[-1]}
    assert set(traffic) <= destroyed and report["destroyed"] == 1 + 3 + 3  # ego, traffic, sensors


@needs_carla
def test_partial_lidar_sweep_is_dropped(tmp_path: Path) -> None:
    import carla

    rig = SensorRig(camera=CameraModel(width=64, height=32))
    # frame 506 (a LiDAR frame) lasts 0.08 s instead of 0.05 s: a 576 deg turn of a 20 Hz LiDAR
    world = RoadWorld(rig, drop_lidar_frame=-1, long_ticks={506: 0.08})
    client = FakeClient(world)
    bag = tmp_path / "drive"
    args = parse(["--sync", "--fps", "20", "--duration", "0.5", "--traffic", "0", "--record", str(bag),
                  "--timeout", "5"])
    bridge = cb.CarlaBridge(carla, client, args, rig)
    t0 = time.monotonic()
    try:
        bridge.setup()
        summary = bridge.loop()
    finally:
        bridge.teardown()
    assert time.monotonic() - t0 < 4.0  # the tick did not wait --timeout for the dropped sweep
    assert summary["partial_sweeps"] == 1
    asm = summary["assembly"]
    assert asm["incomplete"] == 0 and asm["complete"] == summary["ticks"]
    stamps = [m.stamp_sec for m in read_bag(bag, [topics.LIDAR_POINTS])]
    lidar_ticks = (summary["ticks"] + 1) // 2
    assert len(stamps) == lidar_ticks - 1 == bag_counts(bag)[topics.GT_SCENE]
    assert not any(abs(s - (506 * 0.05 + 0.03)) < 1e-6 for s in stamps)


class ForkMap(FakeMap):
    """The real client map of ``carla_xodr.fork_xodr`` (waypoints, junction, geolocations) with one spawn
    point 40 m before the fork, in lane -1."""

    name = "fork"

    def __init__(self, m: Any) -> None:
        self.m = m

    def transform_to_geolocation(self, loc: Any) -> Any:
        return self.m.transform_to_geolocation(loc)

    def get_waypoint(self, loc: Any, project_to_road: bool = True, lane_type: Any = None) -> Any:
        return self.m.get_waypoint(loc, project_to_road=project_to_road, lane_type=lane_type)

    def get_spawn_points(self) -> list[Any]:
        import carla

        return [carla.Transform(carla.Location(x=10.0, y=1.75, z=0.3), carla.Rotation())]


class ForkWorld(RoadWorld):
    def __init__(self, rig: SensorRig, m: Any) -> None:
        super().__init__(rig, drop_lidar_frame=-1)
        self.fork = ForkMap(m)

    def get_map(self) -> ForkMap:  # type: ignore[override]
        return self.fork


@needs_carla
@pytest.mark.parametrize("sync", [True, False])
def test_route_is_the_traffic_managers(sync: bool) -> None:
    import carla
    from carla_xodr import JUNCTION, ROAD_LEFT, ROAD_STRAIGHT, fork_xodr

    from lmm_fusion.carla.route import Route, exit_of

    m = carla.Map("fork", fork_xodr(lanes=2))
    start = m.get_waypoint(carla.Location(x=10.0, y=1.75))
    seed = next(s for s in range(50) if _planned_road(Route(seed=s), start) == ROAD_STRAIGHT)
    rig = SensorRig(camera=CameraModel(width=64, height=32))
    world = ForkWorld(rig, m)
    client = FakeClient(world)
    # the Traffic Manager turns left at the fork, whatever the bridge planned
    turn = next(b for b in m.get_waypoint(carla.Location(x=49.0, y=1.75)).next(2.0) if exit_of(b)[0] == ROAD_LEFT)
    calls: list[int] = []

    def actions(ego: Any) -> list[Any]:
        calls.append(ego.id)
        return [["LaneFollow", m.get_waypoint(ego.get_transform().location)], ["Left", turn]]

    client.tm.actions = actions
    argv = ["--fps", "20", "--duration", "0.5", "--traffic", "0", "--seed", str(seed), "--timeout", "0.5"]
    if sync:
        argv.insert(0, "--sync")
    if not sync:
        world.wait_for_tick = lambda timeout: (world.tick(timeout), world.get_snapshot())[1]  # type: ignore[attr-defined]
    bridge = cb.CarlaBridge(carla, client, parse(argv), rig)
    try:
        bridge.setup()
        summary = bridge.loop()
    finally:
        bridge.teardown()
    ego = bridge.ego
    tm = client.tm
    assert ego.autopilot == [True] and tm.lane_changes == [(ego.id, False)]  # the TM drives, in one lane
    # the first path sent: the bridge's own choice, straight on
    assert {m.get_waypoint(p).road_id for p in tm.paths[0]} == {ROAD_STRAIGHT}
    route = bridge.lanes.route
    if sync:
        # the TM's actions are read each tick once its path is set: its left turn is followed ...
        assert calls and summary["route"]["tm_divergences"] == 1
        assert route.planned_exit(JUNCTION)[0] == ROAD_LEFT
        # ... the TM gets the path it drives, and ground truth and pure pursuit get it too
        assert {m.get_waypoint(p).road_id for p in tm.paths[-1]} == {ROAD_LEFT}
        assert summary["route"]["tm_paths"] == len(tm.paths) == 2
        far = bridge.lanes.path(0)[-1]
        assert far[1] > 4.0  # 50 m ahead of base_link the lane has turned left
    else:
        # asynchronous: the TM runs on its own thread; its action buffer is not read
        assert calls == [] and route.planned_exit(JUNCTION)[0] == ROAD_STRAIGHT and len(tm.paths) == 1
        assert abs(bridge.lanes.path(0)[-1][1]) < 0.5


def _planned_road(route: Any, wp: Any) -> int:
    loc = wp.transform.location
    route.update(loc.x, loc.y, wp.transform.rotation.yaw, lambda: wp)
    return route.planned_exit(100)[0]
