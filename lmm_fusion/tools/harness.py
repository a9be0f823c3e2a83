"""Processes on a private loopback DDS domain: the fusion node, sensors fed to it, its outputs collected.

What ``lmm-fusion demo``, ``lmm-fusion load`` and the integration tests share:

- :func:`loopback_env` / :func:`use_env_here`: a random ``ROS_DOMAIN_ID`` (1..101) with discovery limited
  to this host and the shipped large-data Fast DDS profile, for subprocesses and for this process.
- :func:`node_command`, :class:`Processes`: subprocesses, each in its own session, stopped with bounded
  waits; :func:`run_parallel` for short-lived ones.
- :class:`OutputCollector`: the node's outputs, ``/diagnostics`` and the ground truth as plain dicts
  (:func:`scene_record`, :func:`action_record`, :func:`diagnostics_record`).
- :class:`SensorPublisher`: camera, LiDAR and GNSS messages at their rates from a thread, each sensor
  normal, off, flooding, stale or future-stamped, on the wall clock or a simulated ``/clock``.
- :class:`NodeHarness`: a node process + collector (+ sensors) together.

Every wait is a bounded poll (:func:`wait_until`).
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import pymap3d
import rclpy
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

from lmm_fusion.base import topics
from lmm_fusion.base.rig import SensorRig
from lmm_fusion.base.vocabulary import MODALITIES
from lmm_fusion.io import create_cloud, create_fix, create_image, make_header, make_time, rclpy_types
from lmm_fusion.io.common import stamp_to_sec
from lmm_fusion.io.odometry import create_odometry
from lmm_fusion.ros.dds import PROFILE_VARS, use_large_data_profile
from lmm_fusion.ros.outputs import level_of
from lmm_fusion.ros.params import DEFAULT_REMAPS, INPUTS, remap_args

#: Namespace of the node's ``~/...`` outputs.
NODE_NS = f"/{topics.NODE_NAME}"
#: Environment variables that decide which DDS peers a process talks to and how (see :func:`use_env_here`).
DDS_VARS = ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "FASTDDS_BUILTIN_TRANSPORTS", *PROFILE_VARS)
#: Sensor rates [Hz] of :class:`SensorPublisher` unless given: the node's expected rates (config/fusion.yaml).
SENSOR_HZ: dict[str, float] = {"camera": 20.0, "lidar": 10.0, "gnss": 10.0}
#: Modes of one sensor in :class:`SensorPublisher`.
SENSOR_MODES = ("normal", "off", "flood", "stale", "future")


# ---------------------------------------------------------------- environment and processes
def loopback_env(domain_id: int | None = None) -> dict[str, str]:
    """Environment for processes that must only talk to each other: a random domain id (1..101,
    valid on every OS) and discovery limited to this host."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(domain_id if domain_id is not None else random.randint(1, 101))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_STATIC_PEERS", None)
    env.pop("ROS_LOCALHOST_ONLY", None)  # deprecated in Jazzy; conflicts with the range above
    env["PYTHONUNBUFFERED"] = "1"
    # Shared memory sized for whole full-size samples (config/fastdds_large_data.xml): with Fast DDS's
    # default UDP fragments most multi-MB clouds and images are lost under the sensor-data QoS.
    use_large_data_profile(env)
    return env


def use_env_here(env: Mapping[str, str]) -> int:
    """Apply the DDS variables (:data:`DDS_VARS`) of ``env`` to this process (before ``rclpy.init``);
    returns the domain id."""
    for key in DDS_VARS:
        if key in env:
            os.environ[key] = env[key]
    os.environ.pop("ROS_LOCALHOST_ONLY", None)
    return int(env["ROS_DOMAIN_ID"])


def node_command(*ros_params: str, params_file: Path | None = None, namespace: str | None = None,
                 remaps: Mapping[str, str] | None = None) -> list[str]:
    """argv that starts the fusion node with ``-p NAME:=VALUE`` parameters, in ``namespace`` (e.g. ``car1``),
    its inputs remapped as ``remaps`` says (default: the launch file's, to the ``/sensors/...`` topics)."""
    cmd = [sys.executable, "-m", "lmm_fusion.ros.node", "--ros-args"]
    if params_file is not None:
        cmd += ["--params-file", str(params_file)]
    for p in ros_params:
        cmd += ["-p", p]
    if namespace:
        cmd += ["-r", f"__ns:=/{namespace.strip('/')}"]
    cmd += remap_args(dict(DEFAULT_REMAPS if remaps is None else remaps))
    return cmd


class Processes:
    """Subprocesses started by this process, each in its own session; :meth:`stop_all` ends exactly
    those (SIGINT, then SIGTERM, then SIGKILL of their process groups) with bounded waits."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []

    def start(self, name: str, cmd: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start ``cmd`` with its output in ``<log_dir>/<name>.log``."""
        f = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
        self._files.append(f)
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log_text(self, name: str) -> str:
        p = self.log_dir / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self, name: str, timeout: float = 10.0) -> int | None:
        """Stop process ``name`` (SIGINT, waiting ``timeout`` [s], then SIGTERM, then SIGKILL); its exit code."""
        proc = self.procs.get(name)
        if proc is None:
            return None
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        return proc.poll()

    def stop_all(self, timeout: float = 10.0) -> None:
        for name in list(self.procs):
            self.stop(name, timeout)
        for f in self._files:
            f.close()
        self._files = []


def run_parallel(cmds: Mapping[str, list[str]], env: Mapping[str, str], cwd: Path | None = None,
                 timeout: float = 180.0) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run short-lived commands at the same time (start-ups overlap: on two cores that about halves
    the wall time) and wait for each; stdout and stderr together in ``stdout``. A command still
    running after ``timeout`` [s] is killed (its exit code is then negative)."""
    procs = {name: subprocess.Popen(cmd, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
             for name, cmd in cmds.items()}
    out = {}
    for name, p in procs.items():
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, "")
    return out


def wait_until(pred: Callable[[], bool], timeout: float, period: float = 0.05) -> bool:
    """Poll ``pred`` until true or ``timeout`` [s]; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(period)
    return pred()


# ---------------------------------------------------------------- outputs as records
def stamp_of(msg: Any) -> float:
    """``header.stamp`` of ``msg`` [s]."""
    return stamp_to_sec(msg.header.stamp)


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def scene_record(msg: Any) -> dict[str, Any]:
    """A ``SceneAssessment`` as a JSON-able dict (non-finite numbers as None). ``stamp`` is the header
    stamp (the newest sensor frame used), each modality's ``stamp`` its frame's (0 when unused) and
    ``cycle`` the node-clock time of the cycle (a used modality's stamp + age; the header stamp when the
    cycle used none)."""
    mods = [{"name": m.name, "used": bool(m.used), "age": _finite_or_none(m.age),
             "attention": float(m.attention_share), "stamp": stamp_to_sec(m.stamp),
             "reason": str(getattr(m, "reason", ""))} for m in msg.modalities]
    cycle = next((m["stamp"] + m["age"] for m in mods if m["used"] and m["age"] is not None), stamp_of(msg))
    return {"stamp": stamp_of(msg), "cycle": cycle, "frame_id": msg.header.frame_id, "valid": bool(msg.valid),
            "degraded": bool(msg.degraded), "risk": int(msg.risk_level),
            "risk_probabilities": [float(p) for p in msg.risk_probabilities],
            "ttc": _finite_or_none(msg.time_to_collision), "distance": _finite_or_none(msg.nearest_obstacle_distance),
            "light": int(msg.traffic_light_state), "modalities": mods,
            "ego_speed": _finite_or_none(getattr(msg, "ego_speed", math.nan)),
            "ego_speed_source": str(getattr(msg, "ego_speed_source", ""))}


def action_record(msg: Any) -> dict[str, Any]:
    """An ``ActionSuggestion`` as a JSON-able dict (``action_probabilities``: the model's, before the guard)."""
    return {"stamp": stamp_of(msg), "frame_id": msg.header.frame_id, "action": int(msg.action),
            "action_probabilities": [float(x) for x in msg.action_probabilities],
            "target_speed": float(msg.target_speed), "confidence": float(msg.confidence),
            "safety_override": bool(msg.safety_override), "rationale": msg.rationale}


def diagnostics_record(msg: Any) -> dict[str, Any]:
    """A ``DiagnosticArray`` as ``{"stamp", "status": {name: {"level", "message", "values"}}}``."""
    return {"stamp": stamp_of(msg), "status": {s.name: {"level": level_of(s), "message": s.message,
                                                         "values": {kv.key: kv.value for kv in s.values}}
                                               for s in msg.status}}


def _occupancy_record(msg: Any) -> dict[str, Any]:
    return {"stamp": stamp_of(msg), "frame_id": msg.header.frame_id, "width": msg.info.width,
            "height": msg.info.height, "n": len(msg.data)}


def _markers_record(msg: Any) -> dict[str, Any]:
    return {"n": len(msg.markers), "ns": sorted({mk.ns for mk in msg.markers}),
            "frame_id": msg.markers[0].header.frame_id if msg.markers else ""}


class OutputCollector:
    """Subscribes (in this process, on its own rclpy context and domain) to the node's outputs,
    ``/diagnostics`` and the ground truth; records each message as a dict with ``recv`` (monotonic
    arrival time [s]). Spins in a background thread; :meth:`close` stops it."""

    def __init__(self, domain_id: int, node_ns: str = NODE_NS, ground_truth: bool = True) -> None:
        self.ctx = Context()
        rclpy.init(context=self.ctx, domain_id=domain_id)
        self.node: Node = rclpy.create_node(f"lmm_fusion_collector_{os.getpid()}", context=self.ctx)
        self.records: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._lock = threading.Lock()
        t = rclpy_types()
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        subs: list[tuple[Any, str, str, Callable[[Any], dict[str, Any]]]] = [
            (t.SceneAssessment, f"{node_ns}/scene_assessment", "scene", scene_record),
            (t.ActionSuggestion, f"{node_ns}/action_suggestion", "action", action_record),
            (t.DiagnosticArray, "/diagnostics", "diagnostics", diagnostics_record),
            (t.OccupancyGrid, f"{node_ns}/occupancy", "occupancy", _occupancy_record),
            (t.MarkerArray, f"{node_ns}/markers", "markers", _markers_record),
        ]
        if ground_truth:
            subs += [
                (t.SceneAssessment, topics.GT_SCENE, "gt_scene", scene_record),
                (t.ActionSuggestion, topics.GT_ACTION, "gt_action", action_record),
                (t.String, topics.GT_SCENARIO, "gt_scenario", lambda m: {"scenario": m.data}),
            ]
        self._subs = [self.node.create_subscription(cls, topic, self._cb(key, conv), qos)
                      for cls, topic, key, conv in subs]
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _cb(self, key: str, conv: Callable[[Any], dict[str, Any]]) -> Callable[[Any], None]:
        def cb(msg: Any) -> None:
            rec = conv(msg)
            rec["recv"] = time.monotonic()
            with self._lock:
                self.records[key].append(rec)
        return cb

    def _spin(self) -> None:
        try:
            while self.ctx.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except (ExternalShutdownException, Exception):  # the context was shut down while spinning
            pass

    def get(self, key: str) -> list[dict[str, Any]]:
        """A copy of the records of ``key`` (scene, action, diagnostics, occupancy, markers, gt_*)."""
        with self._lock:
            return list(self.records[key])

    def count(self, key: str) -> int:
        with self._lock:
            return len(self.records[key])

    def all(self) -> dict[str, list[dict[str, Any]]]:
        """A copy of every record list, keyed as :meth:`get`."""
        with self._lock:
            return {k: list(v) for k, v in self.records.items()}

    def clear(self) -> None:
        with self._lock:
            self.records.clear()

    def close(self) -> None:
        rclpy.try_shutdown(context=self.ctx)
        self._thread.join(timeout=5.0)
        try:
            self.executor.shutdown(timeout_sec=1.0)
            self.node.destroy_node()
        except Exception:  # already torn down with the context
            pass


# ---------------------------------------------------------------- sensors
class SensorPublisher:
    """Publishes a camera image, a LiDAR cloud and a GNSS fix at their rates from a background thread.

    ``image`` is (H, W, 3) uint8 RGB (sent as rgb8); ``cloud`` a structured point array (its fields as
    they are, e.g. :func:`~lmm_fusion.tools.payloads.padded_cloud_array`) or (N, 4) x, y, z, intensity.
    The messages are built once; each publish only restamps the header (building a 2.7 MB image per frame
    would measure this process, not the node). The fix moves east at ``speed`` [m/s] from the rig's GNSS
    origin as a function of its stamp. Each sensor is published on a fixed grid of its period; a late
    publish skips slots instead of bursting.

    ``topic_ns`` (e.g. ``car1``) prefixes the ``/sensors/...`` topics (``/car1/sensors/...``); ``modes``
    gives sensors a mode from the first publish on (e.g. ``{"lidar": "off"}``). ``odometry_speed`` [m/s]
    also publishes ``nav_msgs/Odometry`` on ``/sensors/odometry`` (``rates["odometry"]``, default 50 Hz) with
    that forward speed, which may differ from the fix track's ``speed`` so a test sees which one is used.

    Stamps come from the wall clock or, with ``sim_start`` [s], from a simulated clock that is also
    published on ``/clock`` at 100 Hz, moved by :meth:`jump` and stopped by :meth:`pause`. Each sensor
    has a mode (:meth:`set_mode`): ``normal``, ``off``, ``flood`` (3x its rate), ``stale`` (stamps
    ``stale_s`` old) or ``future`` (stamps ``future_s`` ahead). Mode changes wait for a publish in
    flight, so ``last_stamp`` is final once :meth:`set_mode` returns. ``sent`` counts messages and
    ``publish_ms`` holds each publish call's duration [ms] per sensor.
    """

    def __init__(self, node: Node, image: np.ndarray, cloud: np.ndarray, rates: Mapping[str, float] | None = None,
                 *, sim_start: float | None = None, speed: float = 10.0, stale_s: float = 0.8,
                 future_s: float = 5.0, rig: SensorRig | None = None, topic_ns: str = "",
                 modes: Mapping[str, str] | None = None, odometry_speed: float | None = None) -> None:
        self.node = node
        self.types = t = rclpy_types()
        self.rig = rig or SensorRig()
        self.rates = dict(SENSOR_HZ if rates is None else rates)
        self.speed = speed
        self.offsets = {"normal": 0.0, "flood": 0.0, "stale": -stale_s, "future": future_s}
        self._cloud_points = np.asarray(cloud)
        self.image = create_image(t, make_header(t, 0.0, topics.CAMERA_FRAME), image, "rgb8")
        self.cloud = self._make_cloud(0.0)
        self.fix_header = make_header(t, 0.0, topics.GNSS_FRAME)
        ns = f"/{topic_ns.strip('/')}" if topic_ns.strip("/") else ""
        self.pubs = {
            "camera": node.create_publisher(t.Image, ns + topics.CAMERA_IMAGE, qos_profile_sensor_data),
            "lidar": node.create_publisher(t.PointCloud2, ns + topics.LIDAR_POINTS, qos_profile_sensor_data),
            "gnss": node.create_publisher(t.NavSatFix, ns + topics.GNSS_FIX, qos_profile_sensor_data),
        }
        self.clock_pub = (node.create_publisher(t.Clock, topics.CLOCK, QoSProfile(depth=1))
                          if sim_start is not None else None)
        self.odometry_speed = odometry_speed
        self.sensors: tuple[str, ...] = MODALITIES
        if odometry_speed is not None:
            self.sensors = (*MODALITIES, "odometry")
            self.rates.setdefault("odometry", 50.0)
            self.pubs["odometry"] = node.create_publisher(t.Odometry, ns + topics.ODOMETRY, qos_profile_sensor_data)
        self.mode = dict.fromkeys(self.sensors, "normal")
        for sensor, mode in (modes or {}).items():
            if mode not in SENSOR_MODES:
                raise ValueError(f"mode: {mode!r} is not one of {', '.join(SENSOR_MODES)}")
            self.mode[sensor] = mode
        self.sent = dict.fromkeys(self.sensors, 0)
        self.last_stamp: dict[str, float] = {}
        self.publish_ms: dict[str, list[float]] = {s: [] for s in self.sensors}
        self._malformed_lidar = 0
        self._sim = sim_start
        self._running = True
        self._t_ref = time.monotonic()
        self._track_origin: float | None = None  # stamp of the first fix: the track starts at the GNSS origin
        self._context: Context | None = None
        # Re-entrant: a publish tick reads the clock (now) while holding it.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sensor-publisher", daemon=True)

    @classmethod
    def on_domain(cls, domain_id: int, image: np.ndarray, cloud: np.ndarray,
                  rates: Mapping[str, float] | None = None, node_name: str = "lmm_fusion_sensor_publisher",
                  **kwargs: Any) -> SensorPublisher:
        """A publisher with its own node ``node_name`` on its own rclpy context on ``domain_id`` (both
        ended by :meth:`close`); other arguments as for the constructor."""
        ctx = Context()
        rclpy.init(context=ctx, domain_id=domain_id)
        node = rclpy.create_node(node_name, context=ctx)
        pub = cls(node, image, cloud, rates, **kwargs)
        pub._context = ctx
        return pub

    # ------------------------------------------------------------ clock and modes
    def now(self) -> float:
        """Stamp time [s]: wall time, or the simulated clock."""
        with self._lock:
            if self._sim is None:
                return time.time()
            return self._sim + ((time.monotonic() - self._t_ref) if self._running else 0.0)

    def jump(self, dt: float) -> float:
        """Move the simulated clock by ``dt`` [s] (negative = back, like a bag loop); returns the new time."""
        with self._lock:
            if self._sim is None:
                raise RuntimeError("jump needs a simulated clock (sim_start)")
            self._sim += dt
            return self.now()

    def pause(self, paused: bool) -> None:
        """Freeze (no /clock, no sensors) or resume the clock where it stopped."""
        with self._lock:
            now = self.now()
            self._sim = now if self._sim is not None else None
            self._t_ref, self._running = time.monotonic(), not paused

    def set_mode(self, sensor: str, mode: str) -> float:
        """Switch ``sensor`` to ``mode`` (one of :data:`SENSOR_MODES`) after any publish in flight; returns
        the stamp time then."""
        if mode not in SENSOR_MODES:
            raise ValueError(f"mode: {mode!r} is not one of {', '.join(SENSOR_MODES)}")
        with self._lock:
            self.mode[sensor] = mode
            return self.now()

    def set_payload(self, image: np.ndarray | None = None, cloud: np.ndarray | None = None) -> None:
        """Publish ``image`` and/or ``cloud`` (as for the constructor) from the next slot of each on."""
        with self._lock:
            if image is not None:
                self.image = create_image(self.types, make_header(self.types, 0.0, topics.CAMERA_FRAME), image, "rgb8")
            if cloud is not None:
                self._cloud_points = np.asarray(cloud)
                self.cloud = self._make_cloud(0.0)

    def send_malformed_lidar(self, n: int = 1) -> None:
        """Publish ``n`` clouds whose ``row_step`` claims more bytes than they hold, with the next LiDAR slot."""
        with self._lock:
            self._malformed_lidar += n

    # ------------------------------------------------------------ publishing
    def _make_cloud(self, stamp: float) -> Any:
        t, pts = self.types, self._cloud_points
        fields = None if pts.dtype.names else ("x", "y", "z", "intensity")
        return create_cloud(t, make_header(t, stamp, topics.LIDAR_FRAME), pts, fields)

    def _fix(self, stamp: float) -> Any:
        g = self.rig.gnss
        if self._track_origin is None:
            self._track_origin = stamp
        lat, lon, alt = pymap3d.enu2geodetic(self.speed * (stamp - self._track_origin), 0.0, 0.0,
                                             g.origin_lat, g.origin_lon, g.origin_alt)
        self.fix_header.stamp = make_time(self.types, stamp)
        return create_fix(self.types, self.fix_header, float(lat), float(lon), float(alt), 0, g.horizontal_std)

    def _publish(self, sensor: str, stamp: float) -> None:
        t = self.types
        start = time.perf_counter()
        if sensor == "camera":
            self.image.header.stamp = make_time(t, stamp)
            self.pubs[sensor].publish(self.image)
        elif sensor == "lidar":
            self.cloud.header.stamp = make_time(t, stamp)
            self.pubs[sensor].publish(self.cloud)
        elif sensor == "odometry":
            self.pubs[sensor].publish(create_odometry(t, make_header(t, stamp, "odom"), topics.BASE_FRAME,
                                                      float(self.odometry_speed or 0.0), speed_var=0.01))
        else:
            self.pubs[sensor].publish(self._fix(stamp))
        self.publish_ms[sensor].append((time.perf_counter() - start) * 1e3)
        self.sent[sensor] += 1
        self.last_stamp[sensor] = stamp

    def _tick(self, key: str, stamp: float) -> None:
        """Publish what slot ``key`` (a sensor or ``clock``) is due to send at ``stamp``."""
        if key == "clock":
            assert self.clock_pub is not None
            self.clock_pub.publish(self.types.Clock(clock=make_time(self.types, stamp)))
            return
        mode = self.mode[key]
        if mode != "off":
            self._publish(key, stamp + self.offsets[mode])
        if key == "lidar":
            for _ in range(self._malformed_lidar):
                bad = self._make_cloud(stamp)
                bad.row_step = bad.row_step + 16  # claims more bytes per row than data holds
                self.pubs["lidar"].publish(bad)
            self._malformed_lidar = 0

    def _period(self, key: str) -> float:
        if key == "clock":
            return 0.01
        return 1.0 / (self.rates[key] * (3 if self.mode[key] == "flood" else 1))

    def _run(self) -> None:
        t0 = time.monotonic()
        due = {key: t0 for key in (*self.sensors, *(("clock",) if self.clock_pub is not None else ()))}
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                with self._lock:
                    running = self._running
                    if running:
                        stamp = self.now()
                        for key, when in due.items():
                            if now < when:
                                continue
                            self._tick(key, stamp)
                            # Next slot on the fixed grid; a late publish skips slots instead of bursting.
                            period = self._period(key)
                            due[key] = when + period * max(1, math.floor((now - when) / period) + 1)
            except Exception:  # the context is shutting down (close or teardown)
                return
            # Paused: nothing is due until the clock runs again (then every overdue slot sends once).
            self._stop.wait(max(0.0, min(due.values()) - time.monotonic()) if running else 0.01)

    def start(self) -> SensorPublisher:
        """Start publishing; returns ``self``."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop publishing; a publisher made by :meth:`on_domain` also ends its node and context."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        if self._context is not None:
            self.node.destroy_node()
            rclpy.try_shutdown(context=self._context)
            self._context = None


# ---------------------------------------------------------------- the node with its peers
class NodeHarness:
    """A fusion node process (``-p`` parameters ``params``) and an :class:`OutputCollector` on a private
    loopback domain (``env``, default :func:`loopback_env`), plus a :class:`SensorPublisher` in this
    process once :meth:`start_sensors` is called. This process's DDS variables are set while it runs
    and restored by :meth:`close`. The node's log is ``<log_dir>/node.log``.

    With ``namespace`` (e.g. ``car1``) the node runs in it, its inputs remapped to ``/car1/sensors/...``
    (where :meth:`start_sensors` publishes) and its outputs collected under ``/car1/fusion_node``; two
    harnesses share a domain when the second gets the first's ``env``."""

    def __init__(self, log_dir: Path, params: Sequence[str], *, env: dict[str, str] | None = None,
                 params_file: Path | None = None, ground_truth: bool = False, namespace: str = "") -> None:
        self.namespace = namespace.strip("/")
        ns = f"/{self.namespace}" if self.namespace else ""
        #: Input name -> the topic it is remapped to (the sensors' topics, under the namespace).
        self.remaps = {src: ns + dst for src, dst in DEFAULT_REMAPS.items()}
        self.lidar_topic = self.remaps[INPUTS["lidar_points"]]
        self.env = loopback_env() if env is None else env
        self._saved_env = {k: os.environ.get(k) for k in (*DDS_VARS, "ROS_LOCALHOST_ONLY")}
        self.domain = use_env_here(self.env)
        self.procs = Processes(log_dir)
        self.sensors: SensorPublisher | None = None
        self.collector: OutputCollector | None = None
        try:
            cmd = node_command(*params, params_file=params_file, namespace=self.namespace or None, remaps=self.remaps)
            self.node = self.procs.start("node", cmd, self.env)
            self.collector = OutputCollector(self.domain, node_ns=f"{ns}{NODE_NS}", ground_truth=ground_truth)
        except BaseException:
            self.close()
            raise

    @property
    def outputs(self) -> OutputCollector:
        """The collector (present until :meth:`close`)."""
        assert self.collector is not None, "closed"
        return self.collector

    def alive(self) -> bool:
        return self.node.poll() is None

    def log(self, tail: int = 3000) -> str:
        """The last ``tail`` characters of the node's log."""
        return self.procs.log_text("node")[-tail:]

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the node subscribes to the LiDAR (it is active) or exits; True when it is active."""
        wait_until(lambda: self.outputs.node.count_subscribers(self.lidar_topic) > 0 or not self.alive(), timeout)
        return self.alive() and self.outputs.node.count_subscribers(self.lidar_topic) > 0

    def start_sensors(self, image: np.ndarray, cloud: np.ndarray, rates: Mapping[str, float] | None = None,
                      **kwargs: Any) -> SensorPublisher:
        """Start a :class:`SensorPublisher` on the collector's node (arguments as there), on the node's
        namespace's sensor topics."""
        kwargs.setdefault("topic_ns", self.namespace)
        self.sensors = SensorPublisher(self.outputs.node, image, cloud, rates, **kwargs).start()
        return self.sensors

    def stop_sensors(self) -> None:
        if self.sensors is not None:
            self.sensors.close()
            self.sensors = None

    def scenes(self, after: float = -math.inf) -> list[dict[str, Any]]:
        """Scene assessments of cycles after ``after`` [node-clock s] (by ``cycle``, not the header stamp)."""
        return [r for r in self.outputs.get("scene") if r["cycle"] > after]

    def diagnostics(self, after: float = -math.inf) -> list[dict[str, Any]]:
        """Diagnostic arrays stamped after ``after`` [node-clock s]."""
        return [d for d in self.outputs.get("diagnostics") if d["stamp"] > after]

    def close(self, timeout: float = 10.0) -> None:
        """Stop the sensors and every process, close the collector, restore this process's DDS variables."""
        self.stop_sensors()
        self.procs.stop_all(timeout=timeout)
        if self.collector is not None:
            self.collector.close()
            self.collector = None
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


__all__ = [
    "DDS_VARS",
    "NODE_NS",
    "SENSOR_HZ",
    "SENSOR_MODES",
    "NodeHarness",
    "OutputCollector",
    "Processes",
    "SensorPublisher",
    "action_record",
    "diagnostics_record",
    "loopback_env",
    "node_command",
    "run_parallel",
    "scene_record",
    "stamp_of",
    "use_env_here",
    "wait_until",
]
