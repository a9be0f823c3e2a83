"""The ROS 2 fusion node: a managed (lifecycle) node that can also activate itself.

Lifecycle (``lifecycle_msgs/srv/ChangeState`` on ``~/change_state``):

- **configure**: read and validate every parameter (a wrong one fails the transition with an error
  naming it and its value), load the model and build the backend's engine
  (:class:`~lmm_fusion.cycle.pipeline.FusionPipeline`, warmed up), create the output publishers, the sync
  buffers and diagnostics. Everything slow happens here, as in nav2.
- **activate**: only enables the output publishers, subscribes to the inputs and starts the cycle timer
  (milliseconds), so an inactive node neither takes sensor traffic nor publishes outputs.
- **deactivate** / **cleanup**: release them again in reverse order (cleanup also drops the model).

``/diagnostics`` is a plain publisher on its own timer (``diagnostics.period``, 1 s like
diagnostic_updater), created with the node: it reports the lifecycle state in every state, and the
sensor, cycle, backend and assessment statuses while active.

Inputs are the relative names of :data:`~lmm_fusion.ros.params.INPUTS` (``~/input/lidar/points``, ...),
remapped by the launch file (``lmm-fusion node`` and the test harness pass the default remaps to the
``/sensors/...`` topics). Outputs are ``~/scene_assessment``, ``~/action_suggestion``, ``~/occupancy``,
``~/markers``, so two nodes in namespaces ``car1`` and ``car2`` never share a topic except ``/diagnostics``,
where their status names carry the namespace. Each output's ``header.stamp`` is the stamp of the newest
sensor data the cycle used (:mod:`lmm_fusion.ros.outputs`).
``~/input/odometry`` (``nav_msgs/Odometry``, or ``TwistWithCovarianceStamped`` with ``odometry_type: twist``)
is optional: while fresh its speed is the ego speed instead of the GNSS estimate's, and the
SceneAssessment's ``ego_speed_source`` and the ``ego_speed`` status on ``/diagnostics`` say which was used.
Every modality left out of a cycle has its reason in ``ModalityStatus.reason`` and in its ``/diagnostics``
status; stamps far behind the node clock (a bag played without ``use_sim_time``) are named as such.
``vehicle.*`` (the footprint the guard and the markers measure from) and ``lidar.intensity_scale`` are
read-only parameters.

Live parameters (``sync.*``, ``safety.*``, ``diagnostics.*``) may be set while running: the set-parameters
callback validates the new values together with the others (a wrong one is refused with a reason naming
it) and the next cycle uses them; every other parameter is read-only.

With ``autostart`` (the default) ``fusion_node`` and ``lmm-fusion node`` configure and activate at
start-up. Sensor callbacks only decode and push the latest frame into
:class:`~lmm_fusion.cycle.sync.SensorSync`; the timer at ``rate_hz`` hands the cycle (snapshot -> pipeline ->
publish) to a dedicated :class:`~lmm_fusion.ros.worker.CycleWorker` thread, so a slow cycle never blocks
reception, and a tick that arrives while a cycle still runs is dropped, not queued. The callbacks run on a
SingleThreadedExecutor: rclpy's MultiThreadedExecutor re-polls in a loop while callbacks are in flight
and, holding the GIL, starved the cycle (measured under full-size sensor load on 2 cores: 3.2 Hz
instead of 10 Hz, cycle p99 960 ms; with this design 10.0 Hz, p99 21 ms, a third of the CPU).
All times come from the node clock, so ``use_sim_time`` works.

The parameters (names, defaults, ranges, validation) are :mod:`lmm_fusion.ros.params`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections import Counter
from typing import Any

import rclpy
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.subscription import Subscription
from rclpy.timer import Timer

from lmm_fusion.base.paths import find_shared
from lmm_fusion.base.rig import SensorRig
from lmm_fusion.base.topics import NODE_NAME, TF_STATIC
from lmm_fusion.base.vocabulary import MODALITIES
from lmm_fusion.cycle.assessment import Assessment, invalid
from lmm_fusion.cycle.ingest import SensorIngest
from lmm_fusion.cycle.pipeline import FusionPipeline
from lmm_fusion.cycle.sync import SensorSync, SyncConfig
from lmm_fusion.io.msgtypes import rclpy_types
from lmm_fusion.ros import outputs as ros_outputs
from lmm_fusion.ros.diagnostics import DiagnosticsConfig, FusionDiagnostics, lifecycle_status
from lmm_fusion.ros.params import (
    DEFAULT_REMAPS,
    INPUTS,
    LIVE_PARAMS,
    PARAMS,
    Param,
    ParameterError,
    descriptor,
    node_rig,
    range_problem,
    remap_args,
    safety_config,
    type_problem,
    validate,
)
from lmm_fusion.ros.worker import CycleWorker

log = logging.getLogger(__name__)

#: QoS of every output: reliable, so a subscriber that keeps up sees each cycle.
OUTPUT_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
#: /tf_static as tf2's static broadcaster offers it: latched, so transforms sent before this node
#: started still arrive.
TF_STATIC_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.TRANSIENT_LOCAL)


class FusionNode(LifecycleNode):
    """The fusion node (see the module docstring); ``kwargs`` go to rclpy's ``LifecycleNode`` (``context``,
    ``parameter_overrides``, ``namespace``, ...)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.types = rclpy_types()
        self.rig = SensorRig()
        self.declare_errors: list[str] = []
        for p in PARAMS:
            self._declare(p)
        self.add_on_set_parameters_callback(self._check_set)
        self.values: dict[str, Any] = {}
        # Live parameter values accepted by _check_set, taken by the next cycle (under _live_lock).
        self._pending: dict[str, Any] = {}
        self._live_lock = threading.Lock()
        self.pipeline: FusionPipeline | None = None
        self.sync: SensorSync | None = None
        self.ingest: SensorIngest | None = None
        self.diag: FusionDiagnostics | None = None
        self.pubs: dict[str, Any] = {}
        self.subs: list[Subscription] = []
        self.timer: Timer | None = None
        self.callback_errors: Counter[str] = Counter()
        self.camera_info: Any = None
        self.last_assessment: Assessment | None = None
        self._cycle_lock = threading.Lock()
        self._active = False
        self.sensor_group = MutuallyExclusiveCallbackGroup()
        self.cycle_group = MutuallyExclusiveCallbackGroup()
        self.worker: CycleWorker | None = None
        self.state_label = "unconfigured"
        # The cycle thread updates diagnostics, the executor thread reads them: one lock between the two.
        self._diag_lock = threading.Lock()
        self._last_ages: dict[str, float] = dict.fromkeys(MODALITIES, float("inf"))
        self._last_cycle_time: float | None = None
        # /diagnostics: a plain publisher and timer, so it reports in every lifecycle state.
        self.diag_name = self._diagnostics_name()
        self.diag_pub = self.create_publisher(self.types.DiagnosticArray, "/diagnostics", OUTPUT_QOS)
        self.diag_timer = self.create_timer(float(self.get_parameter("diagnostics.period").value),
                                            self._publish_diagnostics, callback_group=self.cycle_group)

    def _diagnostics_name(self) -> str:
        """Prefix of the status names: the node name, with its namespace when it has one (``car1/fusion_node``),
        so nodes in different namespaces stay apart on the shared ``/diagnostics``."""
        ns = self.get_namespace().strip("/")
        return f"{ns}/{self.get_name()}" if ns else self.get_name()

    # ------------------------------------------------------------ parameters
    def _declare(self, p: Param) -> None:
        """Declare ``p``; an override that rclpy refuses (out of range, wrong type) is recorded in
        ``declare_errors`` instead of raising, so the node still starts and configure names it."""
        try:
            self.declare_parameter(p.name, p.default, descriptor(p))
        except (InvalidParameterValueException, InvalidParameterTypeException) as exc:
            given = self._parameter_overrides.get(p.name)
            value = given.value if given is not None else "?"
            reason = range_problem(p) if p.range else str(exc)
            if isinstance(exc, InvalidParameterTypeException):
                reason = type_problem(p)
            self.declare_errors.append(f"{p.name}={value!r}: {reason}")
            # Declared with its default so the node exists; configure then fails naming it.
            self.declare_parameter(p.name, p.default, descriptor(p), ignore_override=True)

    def _check_set(self, params: list[Any]) -> SetParametersResult:
        """Validate a run-time set (rclpy has already refused read-only parameters and values out of range):
        the new values together with the current ones, so a cross-parameter rule (``ttc_stop <= ttc_slow``,
        ``warn_age <= error_age``) is kept too. Accepted live values are used from the next cycle."""
        ours = {prm.name: prm.value for prm in params if prm.name in LIVE_PARAMS}
        if not ours:
            return SetParametersResult(successful=True)  # use_sim_time and other rclpy parameters
        values = {p.name: self.get_parameter(p.name).value for p in PARAMS}
        values.update(ours)
        # Every other value was valid at configure (or makes configure fail, naming itself), so any problem
        # found is one the new values bring.
        problems = validate(values)
        if problems:
            return SetParametersResult(successful=False, reason="; ".join(problems))
        with self._live_lock:
            self._pending.update(ours)
        if "diagnostics.period" in ours:  # the timer is the executor's, like this callback: now, in any state
            self.diag_timer.timer_period_ns = int(float(ours["diagnostics.period"]) * 1e9)
        self.get_logger().info("live parameters set (from the next cycle): "
                               + ", ".join(f"{k}={v!r}" for k, v in ours.items()))
        return SetParametersResult(successful=True)

    def _apply_live(self) -> None:
        """Take the live values accepted since the last cycle (cycle thread, under ``_cycle_lock``)."""
        with self._live_lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        self.values.update(pending)
        v = self.values
        if self.pipeline is not None and any(k.startswith("safety.") for k in pending):
            self.pipeline.safety_cfg = safety_config(v)
        if self.sync is not None and any(k.startswith("sync.") for k in pending):
            self.sync.config = self._sync_config(v)
        if self.diag is not None and any(k.startswith("diagnostics.") for k in pending):
            with self._diag_lock:
                self.diag.reconfigure(self._diag_config(v))

    @staticmethod
    def _sync_config(v: dict[str, Any]) -> SyncConfig:
        return SyncConfig(timeouts={s: float(v[f"sync.{s}_timeout"]) for s in (*MODALITIES, "odometry")},
                          loop_reset=float(v["sync.loop_reset"]), future_tolerance=float(v["sync.future_tolerance"]))

    @staticmethod
    def _diag_config(v: dict[str, Any]) -> DiagnosticsConfig:
        return DiagnosticsConfig(
            expected_hz={s: float(v[f"diagnostics.{s}_hz"]) for s in MODALITIES},
            rate_tolerance=float(v["diagnostics.rate_tolerance"]), window_s=float(v["diagnostics.window"]),
            warn_age=float(v["diagnostics.warn_age"]), error_age=float(v["diagnostics.error_age"]),
            rate_hz=float(v["rate_hz"]))

    def read_parameters(self) -> dict[str, Any]:
        """Current values; raises :class:`ParameterError` naming every invalid one."""
        values = {p.name: self.get_parameter(p.name).value for p in PARAMS}
        problems = list(self.declare_errors) + validate(values)
        if problems:
            raise ParameterError("invalid parameter(s): " + "; ".join(problems))
        return values

    def now(self) -> float:
        """Node-clock time [s] (sim time under use_sim_time)."""
        return self.get_clock().now().nanoseconds * 1e-9

    # ------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.values = v = self.read_parameters()
        except ParameterError as exc:
            self.get_logger().error(str(exc))
            return TransitionCallbackReturn.FAILURE
        with self._live_lock:
            self._pending = {}  # read_parameters has every value set so far
        # The vehicle's footprint (the guard's free distance, the markers) and the LiDAR's intensity unit
        # (0 = detected from the clouds): read-only parameters.
        self.rig = node_rig(v)
        try:
            self.pipeline = self.make_pipeline()
            self.pipeline.warmup(2)
        except Exception as exc:  # any load or engine-build failure fails the transition
            self.get_logger().error(f"configure: cannot load model/backend: {exc}")
            self.pipeline = None
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f"pipeline: {self.pipeline.describe()}")
        backend = self.pipeline.backend
        if self.pipeline.backend_fallback_reason:
            # A failure (engine that did not build or run) is a warning; a backend not installed here is not.
            say = self.get_logger().warning if backend.fallback_failed else self.get_logger().info
            say(f"backend auto fell back: {self.pipeline.backend_fallback_reason}")
        self.sync = SensorSync(self._sync_config(v))
        # Clouds are placed by their own header.frame_id through the pipeline's transforms (/tf_static
        # first, the rig's mounts as the fallback for the project's own frames).
        self.ingest = SensorIngest(self.sync, self.rig, extrinsics=self.pipeline.extrinsics,
                                   preprocessor=self.pipeline.preprocessor)
        with self._diag_lock:
            self.diag = FusionDiagnostics(self._diag_config(v), node_name=self.diag_name)
            self.diag.set_backend(backend.describe(), self.pipeline.backend_fallback_reason, backend.fallback_failed)
            self._last_ages = dict.fromkeys(MODALITIES, float("inf"))
            self._last_cycle_time = None
        self.callback_errors.clear()
        t = self.types
        self.pubs = {
            "scene": self.create_lifecycle_publisher(t.SceneAssessment, "~/scene_assessment", OUTPUT_QOS),
            "action": self.create_lifecycle_publisher(t.ActionSuggestion, "~/action_suggestion", OUTPUT_QOS),
            "occupancy": self.create_lifecycle_publisher(t.OccupancyGrid, "~/occupancy", OUTPUT_QOS),
            "markers": self.create_lifecycle_publisher(t.MarkerArray, "~/markers", OUTPUT_QOS),
        }
        self.get_logger().info(f"configured: {v['rate_hz']:g} Hz, backend {v['backend']}, "
                               f"camera {v['camera_transport']}")
        self.state_label = "inactive"
        return super().on_configure(state)

    def make_pipeline(self) -> FusionPipeline:
        """Load the model and backend the (configured) parameters name."""
        v = self.values
        return FusionPipeline(v["model_dir"] or None, v["backend"], self.rig, safety_config(v),
                              device=v["device"] or None, precision=v["precision"],
                              threads=v["threads"] or None,
                              dla_core=v["dla_core"] if v["dla_core"] >= 0 else None,
                              engine_cache_dir=v["engine_cache_dir"] or None)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        v = self.values
        if self.pipeline is None:  # configure loads it; cannot happen through the state machine
            self.get_logger().error("activate: not configured")
            return TransitionCallbackReturn.FAILURE
        t = self.types
        sensor_qos = qos_profile_sensor_data
        if v["camera_transport"] == "raw":
            self._subscribe(t.Image, INPUTS["camera_image"], "camera", sensor_qos)
        else:
            self._subscribe(t.CompressedImage, INPUTS["camera_compressed"], "camera", sensor_qos)
        if v["use_camera_info"]:
            self.subs.append(self.create_subscription(
                t.CameraInfo, INPUTS["camera_info"], self._on_camera_info, sensor_qos,
                callback_group=self.sensor_group))
        self._subscribe(t.PointCloud2, INPUTS["lidar_points"], "lidar", sensor_qos)
        self._subscribe(t.NavSatFix, INPUTS["gnss_fix"], "gnss", sensor_qos)
        # Optional: nobody publishing it costs nothing, and GNSS gives the speed then.
        odometry_type = t.Odometry if v["odometry_type"] == "odometry" else t.TwistWithCovarianceStamped
        self._subscribe(odometry_type, INPUTS["odometry"], "odometry", sensor_qos)
        self._subscribe_tf_static()
        self._active = True
        self.worker = CycleWorker(self._cycle, on_error=lambda exc: self.get_logger().error(
            f"cycle failed: {exc!r}", throttle_duration_sec=2.0))
        self.timer = self.create_timer(1.0 / v["rate_hz"], self.worker.request, callback_group=self.cycle_group)
        self.get_logger().info("activated: inputs " + ", ".join(s.topic_name for s in self.subs))
        self.state_label = "active"
        return super().on_activate(state)

    def _subscribe_tf_static(self) -> None:
        """Feed /tf_static (an absolute name: one tree per ROS graph) into the sensor extrinsics."""
        try:
            tf_type = self.types.TFMessage
        except AttributeError:  # tf2_msgs is not installed (the PyPI wheels have none)
            self.get_logger().warning("tf2_msgs is not installed: /tf_static is not read; LiDAR frames other "
                                      "than base_link use the rig's mounts")
            return
        ingest = self.ingest
        assert ingest is not None

        def on_tf_static(msg: Any) -> None:
            ingest.on_tf(msg)

        self.subs.append(self.create_subscription(tf_type, TF_STATIC, on_tf_static, TF_STATIC_QOS,
                                                  callback_group=self.sensor_group))

    def _subscribe(self, msg_type: Any, topic: str, sensor: str, qos: Any) -> None:
        self.subs.append(self.create_subscription(
            msg_type, topic, lambda msg: self._on_sensor(sensor, msg), qos,
            callback_group=self.sensor_group))

    def _release_active(self) -> None:
        if self.worker is not None:
            self.worker.stop()  # waits for an in-flight cycle
            self.worker = None
        with self._cycle_lock:
            self._active = False
            if self.timer is not None:
                self.destroy_timer(self.timer)
                self.timer = None
            for s in self.subs:
                self.destroy_subscription(s)
            self.subs = []

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_active()
        self.get_logger().info("deactivated")
        self.state_label = "inactive"
        return super().on_deactivate(state)

    def _release_configured(self) -> None:
        for pub in self.pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self.pubs = {}
        self.pipeline = None
        self.sync = self.ingest = None
        with self._diag_lock:
            self.diag = None

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_configured()
        self.get_logger().info("cleaned up")
        self.state_label = "unconfigured"
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_active()
        self._release_configured()
        self.state_label = "finalized"
        return TransitionCallbackReturn.SUCCESS

    # ------------------------------------------------------------ callbacks
    def _on_sensor(self, sensor: str, msg: Any) -> None:
        """Decode + push one message; bad input is counted and logged (throttled), never raised."""
        ingest, diag = self.ingest, self.diag
        if ingest is None or diag is None:
            return
        now = self.now()
        diag.on_message(sensor, now)
        try:
            # Before the first /clock message sim time is 0: no "future stamp" check then.
            ok = ingest.on_message(sensor, msg, now=now if now > 0 else None)
        except Exception as exc:  # a decoder bug must not kill the others
            self.callback_errors[sensor] += 1
            self.get_logger().error(f"{sensor}: unexpected error on a message: {exc!r}",
                                    throttle_duration_sec=2.0)
            return
        if not ok:
            err = ingest.stats.last_error.get(sensor, "rejected")
            self.get_logger().warning(f"{sensor}: message rejected: {err}", throttle_duration_sec=2.0)
        elif sensor == "camera" and self.camera_info is not None and hasattr(msg, "width"):
            info = self.camera_info
            if (int(msg.width), int(msg.height)) != (int(info.width), int(info.height)):
                # The model only needs pixels, so the frame is used; the mismatch means the calibration
                # published for this camera is not the one producing the images.
                self.get_logger().warning(
                    f"camera: image {msg.width}x{msg.height} does not match camera_info "
                    f"{info.width}x{info.height}", throttle_duration_sec=5.0)

    def _on_camera_info(self, msg: Any) -> None:
        if not (0 < int(getattr(msg, "width", 0)) <= 16384 and 0 < int(getattr(msg, "height", 0)) <= 16384):
            self.get_logger().warning(
                f"camera_info: width={getattr(msg, 'width', None)!r} height={getattr(msg, 'height', None)!r} "
                "out of range (1..16384); ignored", throttle_duration_sec=5.0)
            return
        if self.camera_info is None:
            self.get_logger().info(f"camera_info: {msg.width}x{msg.height}, frame {msg.header.frame_id!r}")
        self.camera_info = msg

    def _cycle(self) -> None:
        with self._cycle_lock:
            if not self._active or self.pipeline is None or self.sync is None or self.diag is None:
                return
            self._apply_live()
            t0 = time.perf_counter()
            now = self.now()
            snapshot = self.sync.snapshot(now)
            try:
                a = self.pipeline.cycle(snapshot)
            except Exception as exc:  # one bad cycle must not stop the node
                self.get_logger().error(f"cycle failed: {exc!r}", throttle_duration_sec=2.0)
                a = invalid(now, snapshot.mask, dict(snapshot.ages))
            self.last_assessment = a
            clock_hint = next((f"{m}: {r}" for m, r in a.masked_reasons().items() if "use_sim_time" in r), None)
            if clock_hint is not None:  # the most common set-up mistake: say it on the console too
                self.get_logger().warning(clock_hint, throttle_duration_sec=10.0)
            t, frame = self.types, self.values["frame_id"]
            self.pubs["scene"].publish(ros_outputs.scene_assessment(t, a, frame))
            self.pubs["action"].publish(ros_outputs.action_suggestion(t, a, frame))
            self.pubs["occupancy"].publish(ros_outputs.occupancy_grid(t, a, frame_id=frame))
            self.pubs["markers"].publish(ros_outputs.markers(t, a, frame, self.rig.vehicle))
            assert self.ingest is not None
            latency_ms = (time.perf_counter() - t0) * 1e3
            with self._diag_lock:
                for s in (*MODALITIES, "odometry"):
                    self.diag.set_rejected(s, self.ingest.stats.rejected[s] + self.callback_errors[s], now)
                self.diag.on_cycle(now, latency_ms)
                self.diag.set_ego(snapshot.ages.get("odometry", float("inf")), self.ingest.ego_reason,
                                  self.ingest.stats.last_error.get("odometry", ""))
                self._last_ages, self._last_cycle_time = dict(snapshot.ages), now

    def _publish_diagnostics(self) -> None:
        """``/diagnostics`` (timer, every lifecycle state): the state, and while active the sensor, cycle,
        backend and assessment statuses, with frame ages carried forward from the last cycle to now."""
        now = self.now()
        statuses = [lifecycle_status(self.diag_name, self.state_label)]
        with self._diag_lock:
            if self.diag is not None and self._active:
                since = 0.0 if self._last_cycle_time is None else max(now - self._last_cycle_time, 0.0)
                ages = {s: age + since for s, age in self._last_ages.items()}
                statuses += self.diag.statuses(now, ages, self.last_assessment)
        self.diag_pub.publish(ros_outputs.diagnostic_array(self.types, now, statuses))


def run_node(ros_args: list[str] | None = None, build_only: bool = False) -> int:
    """Create, (auto-)start and spin the node until shutdown; returns the exit code.

    ``ros_args`` is a full argv with ``--ros-args ...`` (parameters, remaps, params files). ``build_only``:
    configure (which loads the model and builds the engine), then exit without activating.
    Exit codes: 0 clean shutdown or build-only success, 1 a transition failed (e.g. bad parameter).
    """
    try:
        rclpy.init(args=ros_args)
    except Exception as exc:  # rcl rejects malformed --ros-args (RCLError); say so, not a traceback
        log.error("cannot start: %s", exc)
        return 2
    node = None
    executor = None
    try:
        node = FusionNode()
        autostart = bool(node.get_parameter("autostart").value)
        if (build_only or autostart) and node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            node.get_logger().error("configure failed; exiting")
            return 1
        if build_only:
            assert node.pipeline is not None  # configure built it
            node.get_logger().info(f"build-only: engine ready: {node.pipeline.describe()}")
            return 0
        if autostart and node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            node.get_logger().error("activate failed; exiting")
            return 1
        # Callbacks on one thread; the cycle runs on the node's CycleWorker thread (see the module docstring).
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if executor is not None:
            executor.shutdown(timeout_sec=1.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def main(args: list[str] | None = None) -> int:
    """Console script ``fusion_node`` (``ros2 run lmm_fusion fusion_node --ros-args ...``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_node(sys.argv if args is None else args)


# ---------------------------------------------------------------- `lmm-fusion node`
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lmm-fusion node``; :func:`ros_argv` turns them into ``--ros-args``."""
    parser.add_argument("--params-file", default=None,
                        help="parameters YAML (default: the shipped config/fusion.yaml)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME:=VALUE",
                        help="set a parameter (repeatable), e.g. -p rate_hz:=20.0")
    parser.add_argument("-r", "--remap", action="append", default=[], metavar="FROM:=TO",
                        help="remap a topic (repeatable), e.g. -r '~/input/lidar/points:=/velodyne_points' (quoted); "
                             "the inputs ~/input/... are remapped to /sensors/... unless given here")
    parser.add_argument("--use-sim-time", action="store_true", help="follow /clock")
    parser.add_argument("--namespace", default=None, help="node namespace")
    parser.add_argument("--no-autostart", action="store_true", help="stay unconfigured until ChangeState")
    parser.add_argument("--build-only", action="store_true",
                        help="configure (load the model, build the engine), then exit")
    parser.add_argument("ros_args", nargs=argparse.REMAINDER,
                        help="after '--': extra ROS arguments, e.g. -- --ros-args --log-level debug")


def ros_argv(args: argparse.Namespace) -> list[str]:
    """The ``--ros-args`` argv for the CLI options."""
    argv = ["lmm-fusion-node", "--ros-args"]
    params_file = args.params_file
    if params_file is None:
        try:
            params_file = str(find_shared("config/fusion.yaml"))
        except FileNotFoundError:
            params_file = None
    if params_file:
        argv += ["--params-file", params_file]
    for p in args.param:
        argv += ["-p", p]
    given = {r.split(":=", 1)[0] for r in args.remap}
    # The default input remaps, except those given: rcl applies the first rule that matches a name.
    argv += remap_args({src: dst for src, dst in DEFAULT_REMAPS.items() if src not in given})
    for r in args.remap:
        argv += ["-r", r]
    if args.use_sim_time:
        argv += ["-p", "use_sim_time:=true"]
    if args.namespace:
        argv += ["-r", f"__ns:=/{args.namespace.strip('/')}"]  # rcl takes only a fully qualified namespace
    if args.no_autostart:
        argv += ["-p", "autostart:=false"]
    extra = [a for a in args.ros_args if a != "--"]
    if extra:
        argv += extra if extra[0] == "--ros-args" else ["--ros-args", *extra]
    return argv


def run(args: argparse.Namespace) -> int:
    """``lmm-fusion node``: run the node with the parsed CLI options; returns the exit code."""
    return run_node(ros_argv(args), build_only=args.build_only)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "OUTPUT_QOS",
    "FusionNode",
    "add_arguments",
    "main",
    "ros_argv",
    "run",
    "run_node",
]
