"""``lmm-fusion carla``: drive the fusion pipeline in a CARLA 0.9.16 server.

The bridge connects (bounded by ``--timeout``; an unreachable server is a clear error naming
host:port), gives the world a fixed step of ``1/--fps`` (in synchronous mode with ``--sync``,
asynchronous otherwise; full LiDAR sweeps need it), spawns the ego vehicle with the rig's camera,
LiDAR and GNSS (mounts, resolution, FOV, beams and rates from :class:`lmm_fusion.base.rig.SensorRig`,
converted with :mod:`lmm_fusion.carla.convert`), spawns traffic through the Traffic Manager, plans
the ego's route (:mod:`lmm_fusion.carla.route`, the one the Traffic Manager is given) and then,
every tick:

* converts the sensor frames to project arrays and messages (frames matched by frame number with
  :class:`~lmm_fusion.carla.record.TickAssembler`; incomplete ticks are dropped and counted);
* ``--publish``: publishes them on the node's default topics with ``/clock`` from the simulation,
  so ``lmm-fusion node`` (``use_sim_time``) runs unchanged next to it;
* ``--pipeline`` / ``--closed-loop``: feeds them in-process through
  :class:`~lmm_fusion.cycle.ingest.SensorIngest` into :class:`~lmm_fusion.cycle.pipeline.FusionPipeline`;
* ``--closed-loop``: drives the ego with :class:`~lmm_fusion.carla.control.ClosedLoopController`
  (Traffic Manager autopilot when there is no valid assessment);
* ``--record BAG``: writes the drive with ground truth (:mod:`lmm_fusion.carla.record`).

On exit (end of ``--duration``, Ctrl-C, SIGTERM or an error) every spawned actor is destroyed with
one ``DestroyActor`` batch whose responses are checked, and what setup changed on the world and the
Traffic Manager (only that) is restored.

``carla`` is imported only inside :func:`run`'s path; the rest of the package never needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import queue
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from types import FrameType, ModuleType
from typing import Any

import numpy as np

from lmm_fusion.base import topics
from lmm_fusion.base.rig import SensorRig
from lmm_fusion.base.vocabulary import Light
from lmm_fusion.carla import convert as cc
from lmm_fusion.carla.control import ClosedLoopController, ControlConfig, LateralConfig, lateral_from_physics
from lmm_fusion.carla.record import Actor, CarlaRecorder, EgoTruth, TickAssembler, actor_kind, ground_truth
from lmm_fusion.carla.route import Route
from lmm_fusion.cycle.ingest import SensorIngest
from lmm_fusion.cycle.pipeline import FusionPipeline
from lmm_fusion.cycle.sync import SensorSync
from lmm_fusion.io import (
    create_cloud,
    create_compressed_image,
    create_fix,
    create_image,
    make_header,
    make_time,
    rclpy_types,
    rosbags_types,
)
from lmm_fusion.io.errors import MessageError

log = logging.getLogger(__name__)

#: Blueprint ids of the rig's sensors.
SENSOR_BLUEPRINTS: dict[str, str] = {
    "camera": "sensor.camera.rgb",
    "lidar": "sensor.lidar.ray_cast",
    "gnss": "sensor.other.gnss",
}
DEFAULT_VEHICLE = "vehicle.lincoln.mkz_2020"
#: JPEG quality of --compressed camera frames (the synthetic world's).
JPEG_QUALITY = 90
#: Actors farther than this from the ego are left out of the ground truth [m].
GT_RADIUS = 90.0


class BridgeError(RuntimeError):
    """A setup problem the user can fix (server unreachable, unknown town or blueprint, ...)."""


#: A LiDAR measurement is a full sweep when its tick lasted 1/--fps within this fraction.
SWEEP_TOLERANCE = 1e-3
#: Traffic is not spawned at points closer than this to the ego's spawn point [m].
SPAWN_CLEARANCE = 8.0


def same_step(step: float | None, want: float) -> bool:
    """Whether a ``WorldSettings.fixed_delta_seconds`` (None or 0: variable step) is ``want`` [s]
    (within float32 rounding)."""
    return step is not None and step > 0 and abs(float(step) - want) <= 1e-5 * want


def _geo_tuple(geo: Any) -> tuple[float, float, float]:
    return float(geo.latitude), float(geo.longitude), float(geo.altitude)


def traffic_spawn_points(spawn_points: list[Any], order: list[int], ego_index: int,
                         clearance: float = SPAWN_CLEARANCE) -> list[Any]:
    """Spawn points for traffic in the shuffled ``order``: every one but the ego's (``ego_index``) and
    those within ``clearance`` [m] of it."""
    if not 0 <= ego_index < len(spawn_points):
        raise ValueError(f"ego_index: {ego_index} is not a spawn point index (0..{len(spawn_points) - 1})")
    e = spawn_points[ego_index].location
    out = []
    for j in order:
        loc = spawn_points[j].location
        if j != ego_index and math.dist((loc.x, loc.y, loc.z), (e.x, e.y, e.z)) >= clearance:
            out.append(spawn_points[j])
    return out


# ------------------------------------------------------------------------------------------------- CLI
def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return v
    return parse


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1..65535, got {text!r}") from None
    if not 0 < v < 65536:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1..65535, got {text!r}")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="CARLA server host")
    parser.add_argument("--port", type=_port, default=2000, help="CARLA server RPC port")
    parser.add_argument("--tm-port", type=_port, default=8000, help="Traffic Manager port")
    parser.add_argument("--timeout", type=_positive(float), default=5.0,
                        help="seconds to wait for the server on connect and for each tick")
    parser.add_argument("--town", default=None, help="load this map first (e.g. Town04); default: keep the current")
    parser.add_argument("--sync", action="store_true",
                        help="synchronous mode (the bridge ticks the world; restored on exit)")
    parser.add_argument("--fps", type=_positive(float), default=20.0,
                        help="simulation ticks per second, a fixed step of 1/--fps in both modes (a multiple of "
                             "every sensor rate)")
    parser.add_argument("--closed-loop", action="store_true",
                        help="drive the ego from the pipeline's suggestions (implies --pipeline)")
    parser.add_argument("--pipeline", action="store_true", help="run the fusion pipeline in-process")
    parser.add_argument("--model", default=None, help="model folder for the in-process pipeline")
    parser.add_argument("--backend", default="auto", help="pipeline backend: auto|torch|onnxruntime|tensorrt")
    parser.add_argument("--record", metavar="BAG", default=None,
                        help="write the drive with ground truth as a rosbag2 folder (needs --sync)")
    parser.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="bag storage for --record")
    parser.add_argument("--compressed", action="store_true",
                        help="camera as JPEG CompressedImage on the compressed topic (published and recorded)")
    parser.add_argument("--duration", type=_positive(float), default=60.0, help="simulated seconds to drive")
    parser.add_argument("--traffic", type=_count, default=20, help="number of Traffic Manager vehicles to spawn")
    parser.add_argument("--publish", action="store_true",
                        help="publish the sensor topics and /clock over ROS 2 (rclpy)")
    parser.add_argument("--vehicle", default=DEFAULT_VEHICLE, help="ego vehicle blueprint id")
    parser.add_argument("--spawn-point", type=_count, default=None, help="index of the map spawn point for the ego")
    parser.add_argument("--seed", type=int, default=0, help="seed for spawn choices, sensor noise and the TM")


def validate(args: argparse.Namespace, rig: SensorRig) -> None:
    """Cross-argument checks; raises :class:`BridgeError` naming the option."""
    if args.record and not args.sync:
        raise BridgeError("--record needs --sync: ground truth is matched to sensor frames by frame number")
    # Both modes tick with a fixed step of 1/--fps (full LiDAR sweeps), and frames are kept at the rig
    # rates, so --fps must be a multiple of every sensor rate in asynchronous mode too.
    try:
        cc.sensor_periods(rig, args.fps)
    except ValueError as exc:
        raise BridgeError(f"--fps: {exc}") from None


def check_reachable(host: str, port: int, timeout: float) -> None:
    """Open (and close) a TCP connection to the server's RPC port, bounded by ``timeout`` [s].

    A refused connection fails at once instead of after CARLA's own RPC timeout. Raises
    :class:`BridgeError` naming ``host:port``.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise BridgeError(f"no CARLA server reachable at {host}:{port} ({exc.strerror or exc}); "
                          f"start one (CarlaUE4.sh -carla-rpc-port={port}) or pass --host/--port") from None


def connect(carla: ModuleType, host: str, port: int, timeout: float) -> Any:
    """A ``carla.Client`` whose server answered within ``timeout`` [s]; :class:`BridgeError` otherwise."""
    check_reachable(host, port, timeout)
    client = carla.Client(host, port)
    client.set_timeout(timeout)
    try:
        server = client.get_server_version()
    except RuntimeError as exc:
        raise BridgeError(f"CARLA server at {host}:{port} did not answer within {timeout:g} s: {exc}") from None
    client_version = client.get_client_version()
    if server != client_version:
        log.warning("CARLA server %s differs from client %s; this bridge is written for 0.9.16", server,
                    client_version)
    log.info("connected to CARLA %s at %s:%d", server, host, port)
    return client


# -------------------------------------------------------------------------------------------- carla API
def make_transform(carla: ModuleType, pose: cc.CarlaPose) -> Any:
    """``carla.Transform`` of a :class:`~lmm_fusion.carla.convert.CarlaPose`."""
    return carla.Transform(carla.Location(x=pose.x, y=pose.y, z=pose.z),
                           carla.Rotation(pitch=pose.pitch, yaw=pose.yaw, roll=pose.roll))


def configure_blueprint(bp: Any, attributes: dict[str, str], role_name: str | None = None) -> list[str]:
    """Set ``attributes`` on a blueprint (only those it has); returns the names it lacked (logged)."""
    missing = []
    for key, value in attributes.items():
        if bp.has_attribute(key):
            bp.set_attribute(key, value)
        else:
            missing.append(key)
    if role_name is not None and bp.has_attribute("role_name"):
        bp.set_attribute("role_name", role_name)
    if missing:
        log.warning("blueprint %s has no attribute(s) %s; left at defaults", bp.id, ", ".join(missing))
    return missing


def sensor_transforms(carla: ModuleType, rig: SensorRig, base_in_actor: tuple[float, float, float]
                      ) -> dict[str, Any]:
    """``carla.Transform`` of each sensor relative to the ego actor, from the rig's mounts."""
    mounts = {"camera": rig.camera_mount, "lidar": rig.lidar_mount, "gnss": rig.gnss_mount}
    return {name: make_transform(carla, cc.mount_to_carla(m, base_in_actor)) for name, m in mounts.items()}


def vehicle_control(carla: ModuleType, cmd: Any) -> Any:
    """``carla.VehicleControl`` of a :class:`~lmm_fusion.carla.control.ControlCommand`."""
    return carla.VehicleControl(throttle=float(cmd.throttle), steer=float(cmd.steer), brake=float(cmd.brake),
                                hand_brake=bool(cmd.hand_brake), reverse=False)


def enu_pose(transform: Any) -> tuple[float, float, float, float]:
    """CARLA actor transform -> (x, y, z [m], yaw [rad]) in the ENU ``map`` frame."""
    loc, rot = transform.location, transform.rotation
    return loc.x, -loc.y, loc.z, -math.radians(rot.yaw)


@dataclass
class SensorItem:
    """One converted sensor frame from a CARLA callback: name, frame number, sim stamp [s], payload."""

    sensor: str
    frame: int
    stamp: float
    data: Any


class CarlaLanes:
    """:class:`~lmm_fusion.carla.control.LaneMap` on CARLA's map waypoints (REP-103 ``base_link``).

    The ego lane's path is the :class:`~lmm_fusion.carla.route.Route`'s plan, the one the Traffic
    Manager is given too, so ground truth, pure pursuit and the Traffic Manager take the same branch at
    every junction; the neighbouring lanes' paths take the same exits (:meth:`Route.follow`).
    """

    def __init__(self, carla: ModuleType, world_map: Any, base_in_actor: tuple[float, float, float],
                 horizon: float = 50.0, step: float = 2.0, route: Route | None = None) -> None:
        self.carla = carla
        self.map = world_map
        self.base_in_actor = base_in_actor
        self.horizon = horizon
        self.step = step
        self.route = route if route is not None else Route(step=step)
        self._pose = (0.0, 0.0, 0.0, 0.0)  # base_link x, y, z, yaw in map
        self._location: Any = None
        self._yaw = 0.0  # CARLA yaw of the actor [deg]
        self._routed = True  # the route follows the current pose

    def update(self, actor_transform: Any) -> tuple[float, float, float, float]:
        """Set the ego pose of this tick; returns ``base_link``'s (x, y, z, yaw) in ``map``."""
        ax, ay, az, yaw = enu_pose(actor_transform)
        bx, by, bz = self.base_in_actor
        c, s = math.cos(yaw), math.sin(yaw)
        self._pose = (ax + c * bx - s * by, ay + s * bx + c * by, az + bz, yaw)
        self._location = actor_transform.location
        self._yaw = float(actor_transform.rotation.yaw)
        self._routed = False
        return self._pose

    def advance_route(self) -> bool:
        """Bring the route to this tick's pose (once per :meth:`update`); True when a choice ahead changed."""
        if self._routed:
            return False
        self._routed = True
        return self.route.update(self._location.x, self._location.y, self._yaw, self.waypoint)

    def waypoint(self) -> Any:
        """The ego's waypoint: its location projected onto the nearest driving lane."""
        return self.map.get_waypoint(self._location, project_to_road=True, lane_type=self.carla.LaneType.Driving)

    def current_key(self) -> tuple[int, int, int]:
        wp = self.waypoint()
        return (wp.road_id, wp.section_id, wp.lane_id)

    def lane_width(self) -> float:
        return float(self.waypoint().lane_width)

    def neighbour(self, side: int) -> Any | None:
        """Waypoint of the same-direction driving lane on ``side`` (+1 left, -1 right) that the lane
        markings allow changing into, or None."""
        wp = self.waypoint()
        lc = self.carla.LaneChange
        allowed = (lc.Left, lc.Both) if side > 0 else (lc.Right, lc.Both)
        if wp.lane_change not in allowed:
            return None
        nb = wp.get_left_lane() if side > 0 else wp.get_right_lane()
        if nb is None or nb.lane_type != self.carla.LaneType.Driving or nb.lane_id * wp.lane_id <= 0:
            return None
        return nb

    def path(self, side: int) -> np.ndarray | None:
        """Centre line (N, 2) in ``base_link`` of the ego lane (``side`` 0: the route's plan) or of the
        neighbouring lane on ``side``, from one step behind to :attr:`horizon` ahead; None without one."""
        self.advance_route()
        if side == 0:
            wps = [n.wp for n in self.route.ahead(self.horizon)]
            if not wps:
                return None
        else:
            nb = self.neighbour(side)
            if nb is None:
                return None
            wps = self.route.follow(nb, self.horizon)
        back = wps[0].previous(self.step)
        locations = ([back[0].transform.location] if back else []) + [w.transform.location for w in wps]
        return self.to_base(np.array([(p.x, -p.y) for p in locations], np.float64))

    def to_base(self, xy_map: np.ndarray) -> np.ndarray:
        """(N, 2) ENU map points -> ``base_link``."""
        x0, y0, _, yaw = self._pose
        c, s = math.cos(yaw), math.sin(yaw)
        d = np.asarray(xy_map, np.float64).reshape(-1, 2) - (x0, y0)
        return np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], axis=1)


# ------------------------------------------------------------------------------------------------ bridge
class CarlaBridge:
    """Everything between connect and teardown; see the module doc. ``carla`` is the imported module."""

    def __init__(self, carla: ModuleType, client: Any, args: argparse.Namespace, rig: SensorRig) -> None:
        self.carla = carla
        self.client = client
        self.args = args
        self.rig = rig
        self.stop_event = threading.Event()
        self.queue: queue.Queue[SensorItem] = queue.Queue(maxsize=256)
        self.errors: Counter[str] = Counter()
        self.spawned: list[int] = []  # actor ids: ego, traffic, sensors (destroyed in reverse)
        self.sensors: dict[str, Any] = {}
        self.world: Any = None
        self.tm: Any = None
        self.ego: Any = None
        self.original_settings: Any = None
        self.lanes: CarlaLanes | None = None
        self.base_in_actor = (0.0, 0.0, 0.0)
        self.geo: cc.CarlaGeoReference | None = None
        self.lateral = LateralConfig()
        self._lateral_read = False
        self.ticks = 0
        self.assessments = 0
        self.partial_sweeps = 0
        self.traffic: dict[str, Any] = {"requested": 0, "spawned": 0, "failed": {}}
        self.tm_paths = 0  # Traffic Manager paths set
        self.teardown_report: dict[str, Any] = {}
        self._next_keep: dict[str, float] = {}
        self.skipped: Counter[str] = Counter()  # asynchronous mode: frames above the rig rate
        # What setup changed on the server, so that teardown restores exactly that.
        self._settings_changed = False
        self._tm_sync_set = False
        # Traffic Manager route state: revision of the route last sent, tick it was sent / TM took over.
        self._tm_revision: int | None = None
        self._tm_path_tick = 0
        self._last_lidar: tuple[int, float] | None = None  # frame, stamp [s] of the previous sweep
        self._lidar_lock = threading.Lock()

    # -------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        carla, a = self.carla, self.args
        world = self.client.get_world()
        if a.town and not world.get_map().name.endswith(a.town):
            log.info("loading %s", a.town)
            try:
                world = self.client.load_world(a.town)
            except RuntimeError as exc:
                raise BridgeError(f"--town: cannot load {a.town!r}: {exc}") from None
        self.world = world
        self.original_settings = world.get_settings()
        self._configure_step(world)
        self.tm = self.client.get_trafficmanager(a.tm_port)
        if a.sync:
            # Right after the world: the client that ticks a synchronous world must drive its TM too.
            self.tm.set_synchronous_mode(True)
            self._tm_sync_set = True
        self.tm.set_random_device_seed(a.seed)
        world_map = world.get_map()
        try:
            self.geo = cc.detect_geo_reference(
                lambda x, y, z: _geo_tuple(world_map.transform_to_geolocation(carla.Location(x=x, y=y, z=z))))
        except ValueError as exc:
            raise BridgeError(f"GNSS of map {world_map.name}: {exc}") from None
        log.info("geo-reference %.7f, %.7f, %.1f m (CARLA projection %s)", self.geo.latitude, self.geo.longitude,
                 self.geo.altitude, self.geo.projection)
        library = world.get_blueprint_library()
        spawn_points = world_map.get_spawn_points()
        if not spawn_points:
            raise BridgeError(f"map {world_map.name} has no spawn points")
        rng = np.random.default_rng(a.seed)
        order = [int(i) for i in rng.permutation(len(spawn_points))]
        if a.spawn_point is not None:
            if a.spawn_point >= len(spawn_points):
                raise BridgeError(f"--spawn-point: {a.spawn_point} >= the map's {len(spawn_points)} spawn points")
            order.remove(a.spawn_point)
            order.insert(0, a.spawn_point)
        try:
            ego_bp = library.find(a.vehicle)
        except IndexError:
            raise BridgeError(f"--vehicle: no blueprint {a.vehicle!r}") from None
        configure_blueprint(ego_bp, {}, role_name="hero")
        ego_index = -1
        for i in order[:10]:
            self.ego = world.try_spawn_actor(ego_bp, spawn_points[i])
            if self.ego is not None:
                ego_index = i
                break
        if self.ego is None:
            raise BridgeError("could not spawn the ego vehicle at any of 10 spawn points (occupied?)")
        self.spawned.append(self.ego.id)
        log.info("ego %s at spawn point %d", a.vehicle, ego_index)
        bbox = self.ego.bounding_box
        self.base_in_actor = cc.base_link_in_actor((bbox.location.x, bbox.location.y, bbox.location.z),
                                                   (bbox.extent.x, bbox.extent.y, bbox.extent.z),
                                                   self.rig.vehicle.front_offset)
        if a.closed_loop:
            got = self._steering_geometry(final=False)
            self.lateral, self._lateral_read = got or LateralConfig(), got is not None
        self.lanes = CarlaLanes(carla, world_map, self.base_in_actor, route=Route(seed=a.seed))
        # Traffic before the sensors, so a batch's tick (synchronous mode) queues no sensor frames.
        self._spawn_traffic(library, traffic_spawn_points(spawn_points, order, ego_index))
        self._spawn_sensors(library)
        if not a.closed_loop:
            self.ego.set_autopilot(True, a.tm_port)
            self.tm_take_over()

    def _configure_step(self, world: Any) -> None:
        """Give every tick the fixed step ``1/--fps``, in both modes.

        The LiDAR turns ``--fps`` times a second (:func:`~lmm_fusion.carla.convert.sensor_attributes`),
        so a sweep is a full 360 degrees only when a tick lasts exactly ``1/--fps``: with CARLA's
        variable step a sweep is partial or overlaps itself. ``--sync`` sets synchronous mode with that
        step; without it the world stays asynchronous (the server ticks on its own) but with the fixed
        step. A world another client runs synchronously is not ours to change: it is used only when
        its step already is ``1/--fps``; anything else is refused with :class:`BridgeError`.
        """
        a, orig = self.args, self.original_settings
        dt = 1.0 / a.fps
        if not a.sync and orig.synchronous_mode:
            theirs = orig.fixed_delta_seconds
            if not theirs:
                raise BridgeError("the world is in synchronous mode (another client ticks it) with a variable step "
                                  "(fixed_delta_seconds unset): LiDAR sweeps cannot be full; give it a fixed step "
                                  "or stop that client and use --sync")
            if not same_step(theirs, dt):
                raise BridgeError(f"the world is in synchronous mode (another client ticks it) with "
                                  f"fixed_delta_seconds={theirs:g}; LiDAR sweeps are full only with a tick of "
                                  f"1/--fps = {dt:g} s: pass --fps {1.0 / theirs:g} if that is a multiple of every "
                                  "sensor rate, or stop that client and use --sync")
            log.info("world already synchronous with a step of %.4f s (ticked by another client)", dt)
            return
        want_sync = bool(a.sync)
        if bool(orig.synchronous_mode) == want_sync and same_step(orig.fixed_delta_seconds, dt):
            log.info("world already %s with a step of %.4f s", "synchronous" if want_sync else "asynchronous", dt)
            return
        settings = world.get_settings()
        settings.synchronous_mode = want_sync
        settings.fixed_delta_seconds = dt
        world.apply_settings(settings)
        self._settings_changed = True
        now = world.get_settings()
        if bool(now.synchronous_mode) != want_sync or not same_step(now.fixed_delta_seconds, dt):
            raise BridgeError(f"the server did not take synchronous_mode={want_sync}, fixed_delta_seconds={dt:g} "
                              f"(it reports {now.synchronous_mode}, {now.fixed_delta_seconds})")
        log.info("%s mode, fixed step %.4f s", "synchronous" if want_sync else "asynchronous", dt)

    def _steering_geometry(self, final: bool) -> LateralConfig | None:
        """Pure pursuit's wheelbase, steer angle and steering curve from the ego's physics control, or
        None when it gives none that is plausible. The server fills the wheel positions in once the
        vehicle has been simulated, so a read right after spawning may find them all at one point: the
        loop reads again after the first tick (``final``: then the defaults are used, with a warning)."""
        try:
            cfg = lateral_from_physics(self.ego.get_physics_control())
        except (ValueError, RuntimeError) as exc:
            if final:
                d = LateralConfig()
                log.warning("steering geometry of %s: %s; using a %.1f m wheelbase and %.0f deg", self.args.vehicle,
                            exc, d.wheelbase, math.degrees(d.max_steer_rad))
            else:
                log.info("steering geometry of %s not readable yet (%s); reading it after the first tick",
                         self.args.vehicle, exc)
            return None
        log.info("steering geometry of %s: wheelbase %.3f m, %.1f deg at steer 1, steering curve %s",
                 self.args.vehicle, cfg.wheelbase, math.degrees(cfg.max_steer_rad), cfg.steering_curve)
        return cfg

    def _after_first_tick(self, out: Outputs) -> None:
        """Once the world has ticked: read the steering geometry again if setup could not."""
        if self.args.closed_loop and not self._lateral_read:
            self._lateral_read = True
            got = self._steering_geometry(final=True)
            if got is not None:
                self.lateral = got
                out.use_lateral(got)

    def _spawn_sensors(self, library: Any) -> None:
        attrs = cc.sensor_attributes(self.rig, self.args.fps, self.geo.latitude if self.geo else 0.0,
                                     self.args.seed)
        transforms = sensor_transforms(self.carla, self.rig, self.base_in_actor)
        for name, bp_id in SENSOR_BLUEPRINTS.items():
            bp = library.find(bp_id)
            configure_blueprint(bp, attrs[name])
            actor = self.world.spawn_actor(bp, transforms[name], attach_to=self.ego)
            self.spawned.append(actor.id)
            self.sensors[name] = actor
            actor.listen(self._callback(name))
            log.info("spawned %s at %s", bp_id, transforms[name])

    def _callback(self, name: str) -> Any:
        rig, geo = self.rig, self.geo

        def on_data(data: Any) -> None:
            # Runs on CARLA's client thread: convert (copies out of CARLA's buffer) and hand over.
            try:
                if name == "camera":
                    payload: Any = cc.bgra_to_rgb(data.raw_data, data.width, data.height)
                elif name == "lidar":
                    # A partial sweep is handed over without points, so its tick does not wait for it.
                    full = self._full_sweep(int(data.frame), float(data.timestamp))
                    payload = cc.lidar_to_points(data.raw_data) if full else None
                else:
                    payload = cc.gnss_to_fix(data.latitude, data.longitude, data.altitude, rig, geo)
            except MessageError as exc:
                self.errors[f"{name}: {exc}"[:120]] += 1
                log.warning("dropped %s frame %d: %s", name, data.frame, exc)
                return
            try:
                self.queue.put_nowait(SensorItem(name, int(data.frame), float(data.timestamp), payload))
            except queue.Full:
                self.errors[f"{name}: queue full"] += 1
        return on_data

    def _full_sweep(self, frame: int, stamp: float) -> bool:
        """Whether the LiDAR measurement of ``frame`` (sim time ``stamp`` [s]) is one full turn.

        The sensor turns ``--fps`` times a second, so a measurement covers 360 degrees when its tick
        lasted ``1/--fps``. A tick's length is the stamp difference to the previous frame's
        measurement (the LiDAR reports every tick); a measurement without its predecessor is taken as
        full (the world's step was set and checked at setup). Others are counted in
        :attr:`partial_sweeps`; the loop drops them (:func:`usable`).
        """
        with self._lidar_lock:  # callbacks run on CARLA's threads
            previous, self._last_lidar = self._last_lidar, (frame, stamp)
            if previous is None or frame != previous[0] + 1:
                return True
            dt, want = stamp - previous[1], 1.0 / self.args.fps
            if abs(dt - want) <= SWEEP_TOLERANCE * want:
                return True
            self.partial_sweeps += 1
        log.warning("dropping LiDAR frame %d: its tick lasted %.4f s, not %.4f s (%.0f deg sweep, not 360)", frame,
                    dt, want, 360.0 * dt / want)
        return False

    def _spawn_traffic(self, library: Any, spawn_points: list[Any]) -> None:
        """Spawn ``--traffic`` Traffic Manager vehicles at ``spawn_points`` (the ego's excluded).

        Each batch is applied with ``apply_batch_sync`` and every response is read: a spawn CARLA
        refuses (a collision at the spawn point, ...) is counted and the next free point is tried, until
        enough vehicles run or the points are used up."""
        wanted = self.args.traffic
        self.traffic = {"requested": wanted, "spawned": 0, "failed": {}}
        if wanted == 0:
            return
        if len(spawn_points) < wanted:
            log.warning("--traffic: only %d free spawn points for %d vehicles", len(spawn_points), wanted)
        cmd = self.carla.command
        rng = np.random.default_rng(self.args.seed + 1)
        bps = [bp for bp in library.filter("vehicle.*")
               if not bp.has_attribute("number_of_wheels") or int(bp.get_attribute("number_of_wheels")) == 4]
        if not bps:
            log.warning("--traffic: no 4-wheeled vehicle blueprints; no traffic spawned")
            return
        failed: Counter[str] = Counter()
        spawned, pos = 0, 0
        while spawned < wanted and pos < len(spawn_points):
            chunk = spawn_points[pos:pos + wanted - spawned]
            pos += len(chunk)
            batch = []
            for sp in chunk:
                bp = bps[int(rng.integers(len(bps)))]
                configure_blueprint(bp, {}, role_name="autopilot")
                batch.append(cmd.SpawnActor(bp, sp).then(cmd.SetAutopilot(cmd.FutureActor, True, self.args.tm_port)))
            for response in self.client.apply_batch_sync(batch, bool(self.args.sync)):
                if response.actor_id:  # spawned, even if a later command of the chain failed: destroy it too
                    self.spawned.append(response.actor_id)
                if response.error:
                    failed[str(response.error)] += 1
                    log.debug("traffic spawn failed: %s", response.error)
                else:
                    spawned += 1
        self.traffic = {"requested": wanted, "spawned": spawned, "failed": dict(failed)}
        if failed:
            log.warning("--traffic: %d of %d spawns failed (%s)", sum(failed.values()), spawned + sum(failed.values()),
                        "; ".join(f"{n}x {e}" for e, n in failed.items()))
        log.info("spawned %d of %d traffic vehicles", spawned, wanted)

    # -------------------------------------------------------------------------- Traffic Manager
    def tm_take_over(self) -> None:
        """The Traffic Manager drives the ego from now on (after ``set_autopilot(True)``).

        Its own lane changes are switched off for the ego: a path set with ``set_path`` lies in one
        lane and would pull it back. The route is sent at the next tick (:meth:`route_tick`)."""
        try:
            self.tm.auto_lane_change(self.ego, False)
        except RuntimeError as exc:
            log.warning("Traffic Manager: cannot switch off lane changes for the ego: %s", exc)
        self._tm_revision = None

    def route_tick(self, tm_drives: bool) -> None:
        """Once per tick, after the ego's pose was set: advance the route and, while the Traffic Manager
        drives, keep its path and the route the same.

        * In synchronous mode the Traffic Manager's next actions (``get_all_actions``) are compared with
          the route one tick after its path was set (the Traffic Manager runs inside ``world.tick``);
          where it heads for another exit the route follows it (:meth:`Route.follow_actions`). In
          asynchronous mode it runs on its own thread and its action buffer is not read.
        * Whenever a choice ahead changed, the route's path is set again (``set_path``).
        """
        lanes = self.lanes
        assert lanes is not None  # made by setup()
        lanes.advance_route()
        if not tm_drives:
            return
        route = lanes.route
        if self.args.sync and self._tm_revision is not None and self.ticks > self._tm_path_tick:
            try:
                actions = self.tm.get_all_actions(self.ego)
            except (RuntimeError, IndexError) as exc:  # not registered with the TM yet
                log.debug("Traffic Manager actions unavailable: %s", exc)
                actions = []
            route.follow_actions(actions or [], lanes.waypoint)
        if route.revision != self._tm_revision:
            path = [self.carla.Location(x=x, y=y, z=z) for x, y, z in route.tm_path()]
            if path:
                try:
                    self.tm.set_path(self.ego, path)
                    self.tm_paths += 1
                except RuntimeError as exc:
                    log.warning("Traffic Manager: set_path failed: %s", exc)
            self._tm_revision = route.revision
            self._tm_path_tick = self.ticks

    # ----------------------------------------------------------------------------- teardown
    def teardown(self) -> dict[str, Any]:
        """Stop sensors, destroy every spawned actor (one batch), restore what setup changed.

        Each step runs even when an earlier one fails, so a broken server never leaves the world in
        synchronous mode with nobody ticking it (which freezes every other client). Only what setup
        changed is restored: the world's ``synchronous_mode`` and ``fixed_delta_seconds`` (other
        settings, which another client may have changed since, are left alone) when setup changed
        them, and the Traffic Manager's synchronous mode when setup set it (back to the world's
        original mode; a Traffic Manager shared with a client in asynchronous mode is not touched).
        Returns (and keeps in :attr:`teardown_report`) what happened: actors destroyed, the ones CARLA
        could not destroy with its reason, and what was restored.
        """
        report: dict[str, Any] = {}
        for name, sensor in self.sensors.items():
            with contextlib.suppress(RuntimeError):
                sensor.stop()
                log.debug("stopped %s", name)
        if self.spawned:
            ids = list(reversed(self.spawned))  # sensors before the vehicle they are attached to
            failed: dict[str, str] = {}
            try:
                responses = list(self.client.apply_batch_sync([self.carla.command.DestroyActor(i) for i in ids], False))
                for i, response in zip(ids, responses, strict=False):
                    if response.error:
                        failed[str(i)] = str(response.error)
                for i in ids[len(responses):]:
                    failed[str(i)] = "no response from the server"
            except RuntimeError as exc:
                failed = {str(i): str(exc) for i in ids}
            report["destroyed"] = len(ids) - len(failed)
            if failed:
                report["destroy_failed"] = failed
                log.error("could not destroy %d of %d actors: %s", len(failed), len(ids),
                          "; ".join(f"{i}: {e}" for i, e in failed.items()))
            else:
                log.info("destroyed %d actors", len(ids))
            self.spawned.clear()
        # Setup switched the TM to synchronous mode; it goes back to the mode of the world it serves.
        # For a world that was synchronous already (another client ticks it) that is what setup set.
        restore_tm = self.original_settings is not None and bool(self.original_settings.synchronous_mode)
        if self._tm_sync_set and self.tm is not None and not restore_tm:
            try:
                self.tm.set_synchronous_mode(False)
                report["tm_synchronous_mode"] = False
            except RuntimeError as exc:
                report["tm_synchronous_mode"] = f"failed: {exc}"
                log.error("restoring the Traffic Manager's asynchronous mode failed: %s", exc)
        self._tm_sync_set = False
        if self._settings_changed and self.world is not None and self.original_settings is not None:
            orig = self.original_settings
            try:
                settings = self.world.get_settings()
                settings.synchronous_mode = orig.synchronous_mode
                settings.fixed_delta_seconds = orig.fixed_delta_seconds
                self.world.apply_settings(settings)
                report["world_settings"] = {"synchronous_mode": bool(orig.synchronous_mode),
                                            "fixed_delta_seconds": orig.fixed_delta_seconds}
                log.info("world settings restored (synchronous_mode=%s, fixed_delta_seconds=%s)",
                         orig.synchronous_mode, orig.fixed_delta_seconds)
            except RuntimeError as exc:
                report["world_settings"] = f"failed: {exc}"
                log.error("restoring world settings failed: %s", exc)
            self._settings_changed = False
        self.teardown_report.update(report)
        return report

    # --------------------------------------------------------------------------------- loop
    def loop(self) -> dict[str, Any]:
        """Run until ``--duration`` simulated seconds pass or a stop is requested; returns a summary."""
        a = self.args
        out = Outputs(self, self.rig)
        try:
            if a.sync:
                periods = cc.sensor_periods(self.rig, a.fps)
                start = self.world.tick(a.timeout)
                self._after_first_tick(out)
                assembler = TickAssembler(periods, start_frame=start + 1)
                t0 = None
                while not self.stop_event.is_set():
                    frame = self.world.tick(a.timeout)
                    snapshot = self.world.get_snapshot()
                    now = snapshot.timestamp.elapsed_seconds
                    t0 = now if t0 is None else t0
                    self.ticks += 1
                    tick = self._collect(assembler, frame)
                    out.on_tick(now, frame, usable(tick.data) if tick else {}, 1.0 / a.fps)
                    if now - t0 >= a.duration:
                        break
                summary_ticks = assembler.counters.as_dict()
            else:
                t0 = None
                while not self.stop_event.is_set():
                    snapshot = self.world.wait_for_tick(a.timeout)
                    now = snapshot.timestamp.elapsed_seconds
                    if t0 is None:
                        t0 = now
                        self._after_first_tick(out)
                    self.ticks += 1
                    latest: dict[str, Any] = {}
                    while True:
                        try:
                            item = self.queue.get_nowait()
                        except queue.Empty:
                            break
                        if item.data is not None and self._due_async(item):
                            latest[item.sensor] = item
                    out.on_tick(now, snapshot.frame, latest, snapshot.timestamp.delta_seconds)
                    if now - t0 >= a.duration:
                        break
                summary_ticks = {"skipped": dict(self.skipped)}
        finally:
            out.close()
        route = self.lanes.route if self.lanes is not None else None
        return {"ticks": self.ticks, "assembly": summary_ticks, "conversion_errors": dict(self.errors),
                "partial_sweeps": self.partial_sweeps, "traffic": self.traffic,
                "route": {"replans": route.replans if route else 0,
                          "tm_divergences": route.tm_divergences if route else 0, "tm_paths": self.tm_paths},
                **out.summary()}

    def _due_async(self, item: SensorItem) -> bool:
        """Asynchronous mode: keep a sensor's frame when its rig period has passed since the last kept
        one (less half a nominal tick, so stamp jitter does not skip frames); counts the others."""
        rate = {"camera": self.rig.camera.rate_hz, "lidar": self.rig.lidar.rate_hz, "gnss": self.rig.gnss.rate_hz}
        if item.stamp < self._next_keep.get(item.sensor, -math.inf):
            self.skipped[item.sensor] += 1
            return False
        self._next_keep[item.sensor] = item.stamp + 1.0 / rate[item.sensor] - 0.5 / self.args.fps
        return True

    def _collect(self, assembler: Any, frame: int) -> Any:
        """Wait (bounded by ``--timeout``) until the tick of ``frame`` is complete; None if it is not."""
        deadline = time.monotonic() + self.args.timeout
        if not assembler.due(frame):
            return None
        while True:
            tick = assembler.complete(frame)
            if tick is not None:
                assembler.expire(frame)
                return tick
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stop_event.is_set():
                log.warning("tick %d incomplete after %.1f s: have %s, due %s", frame, self.args.timeout,
                            assembler.received(frame), list(assembler.due(frame)))
                assembler.expire(frame + 1)
                return None
            try:
                item = self.queue.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                continue
            assembler.add(item.sensor, item.frame, item)


def usable(items: dict[str, SensorItem]) -> dict[str, SensorItem]:
    """The frames of a tick that carry data (a partial LiDAR sweep arrives without points)."""
    return {name: item for name, item in items.items() if item.data is not None}


class Outputs:
    """Per-tick consumers of the sensor frames: ROS publishing, in-process pipeline, control, recording."""

    def __init__(self, bridge: CarlaBridge, rig: SensorRig) -> None:
        self.bridge = bridge
        self.rig = rig
        a = bridge.args
        self.bag_types = rosbags_types()
        self.ros: RosPublisher | None = RosPublisher(rig) if a.publish else None
        self.ingest: Any = None
        self.pipeline: Any = None
        self.controller: Any = None
        self.recorder: Any = None
        self.assessment: Any = None
        self.actions: Counter[str] = Counter()
        if a.pipeline or a.closed_loop:
            self.pipeline = FusionPipeline(a.model, a.backend, rig)
            self.ingest = SensorIngest(SensorSync(), rig, preprocessor=self.pipeline.preprocessor)
        if a.closed_loop:
            self.controller = ClosedLoopController(ControlConfig(lateral=bridge.lateral))
        if a.record:
            self.recorder = CarlaRecorder(a.record, rig, a.storage).__enter__()

    def use_lateral(self, lateral: LateralConfig) -> None:
        """Steer with this vehicle geometry from now on."""
        if self.controller is not None:
            self.controller.cfg = replace(self.controller.cfg, lateral=lateral)

    def messages(self, types: Any, item: SensorItem) -> list[tuple[str, Any]]:
        """(topic, message) pairs of one sensor frame built with ``types`` (rosbags or rclpy)."""
        if item.sensor == "camera":
            header = make_header(types, item.stamp, topics.CAMERA_FRAME)
            h, w = item.data.shape[:2]
            info = (topics.CAMERA_INFO, camera_info(types, header, w, h, self.rig.camera.hfov_deg))
            if self.bridge.args.compressed:
                return [(topics.CAMERA_COMPRESSED, create_compressed_image(types, header, item.data, "jpeg",
                                                                           JPEG_QUALITY)), info]
            return [(topics.CAMERA_IMAGE, create_image(types, header, item.data)), info]
        if item.sensor == "lidar":
            header = make_header(types, item.stamp, topics.LIDAR_FRAME)
            return [(topics.LIDAR_POINTS, create_cloud(types, header, item.data, ("x", "y", "z", "intensity")))]
        f = item.data
        header = make_header(types, item.stamp, topics.GNSS_FRAME)
        return [(topics.GNSS_FIX, create_fix(types, header, f.lat, f.lon, f.alt, f.status, f.covariance,
                                             f.covariance_type))]

    def on_tick(self, now: float, frame: int, items: dict[str, SensorItem], dt: float) -> None:
        b = self.bridge
        if self.ros is not None:
            self.ros.clock(now)
        bag_msgs: list[tuple[str, float, Any]] = []
        for name in ("gnss", "lidar", "camera"):
            item = items.get(name)
            if item is None:
                continue
            if self.ros is not None:
                for topic, msg in self.messages(self.ros.types, item):
                    self.ros.publish(topic, msg)
            if self.ingest is not None or self.recorder is not None:
                for topic, msg in self.messages(self.bag_types, item):
                    if self.ingest is not None and topic != topics.CAMERA_INFO:
                        self.ingest.on_message(name, msg, now=now)
                    bag_msgs.append((topic, item.stamp, msg))
        if self.pipeline is not None and "lidar" in items:
            self.assessment = self.pipeline.cycle(self.ingest.sync.snapshot(now))
            b.assessments += 1
            self.actions[self.assessment.action.name if self.assessment.valid else "INVALID"] += 1
        assert b.lanes is not None  # made by setup(), before the first tick
        pose = b.lanes.update(b.ego.get_transform())
        if self.controller is not None:
            self._control(now, dt)
        b.route_tick(tm_drives=self.controller is None or self.controller.mode == "autopilot")
        if self.recorder is not None:
            self.recorder.write_static(now)
            for topic, stamp, msg in bag_msgs:
                self.recorder.write_message(topic, stamp, msg)
            if "lidar" in items:
                self._truth(items["lidar"].stamp, pose)

    def _control(self, now: float, dt: float) -> None:
        b = self.bridge
        v = b.ego.get_velocity()
        speed = math.hypot(v.x, v.y)
        previous = self.controller.mode
        cmd = self.controller.step(self.assessment, now, speed, dt, b.lanes)
        if cmd.mode == "autopilot":
            if previous != "autopilot":
                b.ego.set_autopilot(True, b.args.tm_port)
                b.tm_take_over()
            return
        if previous == "autopilot":
            b.ego.set_autopilot(False, b.args.tm_port)
        b.ego.apply_control(vehicle_control(b.carla, cmd))

    def _truth(self, stamp: float, pose: tuple[float, float, float, float]) -> None:
        b = self.bridge
        lanes = b.lanes
        assert lanes is not None
        v = b.ego.get_velocity()
        ego_path = lanes.path(0)
        light = None
        state = cc.light_from_carla(b.ego.get_traffic_light_state())
        tl = b.ego.get_traffic_light()
        if tl is not None and state != Light.NONE:
            stops = [w.transform.location for w in tl.get_stop_waypoints()]
            if stops:
                xy = lanes.to_base(np.array([(p.x, -p.y) for p in stops]))
                ahead = xy[xy[:, 0] > -2.0]
                if len(ahead):
                    light = (max(float(ahead[:, 0].min()) - b.rig.vehicle.front_offset, 0.0), state)
        w = b.ego.get_angular_velocity()  # deg/s about CARLA's z (left-handed: + turns right)
        ego = EgoTruth(x=pose[0], y=pose[1], z=pose[2], yaw=pose[3], vx=v.x, vy=-v.y, yaw_rate=-math.radians(w.z),
                       lane_path=ego_path if ego_path is not None else np.zeros((0, 2)),
                       lane_width=lanes.lane_width(), lanes_left=int(lanes.neighbour(1) is not None),
                       lanes_right=int(lanes.neighbour(-1) is not None), light=light)
        actors = world_actors(b.world, b.ego.id, (pose[0], pose[1]))
        gt = ground_truth(ego, actors, vehicle=b.rig.vehicle)
        self.recorder.write_truth(stamp, gt, ego, actors)

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
        if self.ros is not None:
            self.ros.close()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"assessments": self.bridge.assessments, "actions": dict(self.actions)}
        if self.controller is not None:
            out["interventions"] = Counter(e.kind for e in self.controller.events)
        if self.recorder is not None:
            out["bag"] = {"path": str(self.bridge.args.record), "messages": self.recorder.counts}
        if self.ingest is not None:
            out["rejected"] = dict(self.ingest.stats.rejected)
        return out


def world_actors(world: Any, ego_id: int, centre_xy: tuple[float, float]) -> list[Any]:
    """Vehicles and walkers other than the ego within :data:`GT_RADIUS` of ``centre_xy`` (ENU), as
    :class:`~lmm_fusion.carla.record.Actor` (box centre, heading and size from the bounding box)."""
    out = []
    for actor in world.get_actors():
        type_id = actor.type_id
        if actor.id == ego_id or not (type_id.startswith("vehicle.") or type_id.startswith("walker.")):
            continue
        tf = actor.get_transform()
        box = actor.bounding_box
        # Box centre in the world (CARLA axes). Computed here rather than with Transform.transform(),
        # which overwrites the Location it is given.
        loc, rot = tf.location, tf.rotation
        pose = cc.CarlaPose(loc.x, loc.y, loc.z, rot.roll, rot.pitch, rot.yaw)
        centre = pose.matrix() @ np.array([box.location.x, box.location.y, box.location.z, 1.0])
        x, y = float(centre[0]), -float(centre[1])
        if math.hypot(x - centre_xy[0], y - centre_xy[1]) > GT_RADIUS:
            continue
        v = actor.get_velocity()
        ext = box.extent
        yaw = -math.radians(rot.yaw + box.rotation.yaw)
        out.append(Actor(id=actor.id, kind=actor_kind(type_id), x=x, y=y, yaw=yaw, length=2 * ext.x,
                         width=2 * ext.y, vx=v.x, vy=-v.y, height=2 * ext.z))
    return out


def camera_info(types: Any, header: Any, width: int, height: int, fov_deg: float) -> Any:
    """sensor_msgs/CameraInfo of the CARLA camera (rosbags or rclpy ``types``)."""
    f = cc.camera_info_fields(width, height, fov_deg)
    seq = (lambda a: [float(x) for x in a]) if types.kind == "rclpy" else (lambda a: np.asarray(a, np.float64))
    roi = types.RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return types.CameraInfo(header=header, height=f["height"], width=f["width"],
                            distortion_model=f["distortion_model"], d=seq(f["d"]), k=np.asarray(f["k"]),
                            r=np.asarray(f["r"]), p=np.asarray(f["p"]), binning_x=0, binning_y=0, roi=roi)


class RosPublisher:
    """rclpy publishers on the node's default topics plus ``/clock`` (sensor-data QoS for sensors)."""

    def __init__(self, rig: SensorRig) -> None:
        try:
            import rclpy
            from rclpy.qos import qos_profile_sensor_data
        except ImportError as exc:
            raise BridgeError(f"--publish needs rclpy (ROS 2 Jazzy): {exc}") from None
        self.types = rclpy_types()
        self._rclpy = rclpy
        self._owns_context = not rclpy.ok()
        if self._owns_context:
            rclpy.init()
        self.node = rclpy.create_node("carla_bridge")
        t = self.types
        sensor_topics = {topics.CAMERA_IMAGE: t.Image, topics.CAMERA_COMPRESSED: t.CompressedImage,
                         topics.CAMERA_INFO: t.CameraInfo,
                         topics.LIDAR_POINTS: t.PointCloud2, topics.GNSS_FIX: t.NavSatFix}
        self.pubs = {name: self.node.create_publisher(cls, name, qos_profile_sensor_data)
                     for name, cls in sensor_topics.items()}
        self.pubs[topics.CLOCK] = self.node.create_publisher(t.Clock, topics.CLOCK, 10)

    def clock(self, now: float) -> None:
        self.pubs[topics.CLOCK].publish(self.types.Clock(clock=make_time(self.types, now)))

    def publish(self, topic: str, msg: Any) -> None:
        self.pubs[topic].publish(msg)

    def close(self) -> None:
        self.node.destroy_node()
        if self._owns_context and self._rclpy.ok():
            self._rclpy.shutdown()


# -------------------------------------------------------------------------------------------------- run
@contextlib.contextmanager
def _stop_on_signals(event: threading.Event) -> Any:
    """SIGINT/SIGTERM set ``event`` (the loop ends after the current tick and teardown runs); the
    previous handlers come back afterwards. A second SIGINT raises KeyboardInterrupt as usual."""
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        if event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.info("signal %d: stopping after this tick", signum)
        event.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def run(args: argparse.Namespace) -> int:
    rig = SensorRig()
    try:
        validate(args, rig)
    except BridgeError as exc:
        log.error("%s", exc)
        return 2
    try:
        import carla
    except ImportError:
        log.error("the carla client is not installed: pip install 'lmm_fusion[carla]' (carla==0.9.16)")
        return 2
    try:
        client = connect(carla, args.host, args.port, args.timeout)
    except BridgeError as exc:
        log.error("%s", exc)
        return 1
    bridge = CarlaBridge(carla, client, args, rig)
    with _stop_on_signals(bridge.stop_event):
        try:
            bridge.setup()
            summary = bridge.loop()
        except BridgeError as exc:
            log.error("%s", exc)
            return 1
        except RuntimeError as exc:  # what libcarla raises for server-side failures and time-outs
            log.error("CARLA server at %s:%d: %s", args.host, args.port, exc)
            return 1
        except KeyboardInterrupt:
            log.warning("interrupted")
            return 130
        finally:
            bridge.teardown()
    summary["teardown"] = bridge.teardown_report
    print(json.dumps(summary, indent=2, default=str))
    return 0
