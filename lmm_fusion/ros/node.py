"""The ROS 2 fusion node: a managed (lifecycle) node that can also activate itself.

Lifecycle (``lifecycle_msgs/srv/ChangeState`` on ``~/change_state``):

- **configure**: read and validate every parameter (a wrong one fails the transition with an error
  naming it and its value), create the output publishers, the sync buffers and diagnostics.
- **activate**: load the model and backend (:class:`~lmm_fusion.cycle.pipeline.FusionPipeline`), subscribe
  to the sensors and start the cycle timer.
- **deactivate** / **cleanup**: release them again in reverse order.

With ``autostart`` (the default) ``fusion_node`` and ``lmm-fusion node`` configure and activate at
start-up. Sensor callbacks only decode and push the latest frame into
:class:`~lmm_fusion.cycle.sync.SensorSync`; the timer at ``rate_hz`` hands the cycle (snapshot -> pipeline ->
publish) to a dedicated :class:`CycleWorker` thread, so a slow cycle never blocks reception, and a tick
that arrives while a cycle still runs is dropped, not queued. The callbacks run on a
SingleThreadedExecutor: rclpy's MultiThreadedExecutor re-polls in a loop while callbacks are in flight
and, holding the GIL, starved the cycle (measured under full-size sensor load on 2 cores: 3.2 Hz
instead of 10 Hz, cycle p99 960 ms; with this design 10.0 Hz, p99 21 ms, a third of the CPU).
All times come from the node clock, so ``use_sim_time`` works.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from lmm_fusion.base import topics
from lmm_fusion.base.vocabulary import MODALITIES
from lmm_fusion.cycle.safety import SafetyConfig

log = logging.getLogger(__name__)

NODE_NAME = "fusion_node"
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class Param:
    """One node parameter: name (dots = YAML nesting), default, description and allowed values.

    ``range`` is (min, max) for numbers (inclusive, declared as Floating/IntegerRange); ``choices``
    restricts a string.
    """

    name: str
    default: Any
    description: str
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None


_S = SafetyConfig()
#: Every parameter of the node; config/fusion.yaml holds exactly these (a test keeps them in step).
PARAMS: tuple[Param, ...] = (
    Param("autostart", True, "Configure and activate at start-up (false: wait for lifecycle ChangeState)."),
    Param("build_only", False, "Build the inference engine for the model (ONNX export / TensorRT engine), "
          "then exit without subscribing."),
    Param("rate_hz", 10.0, "Fusion cycle rate [Hz]; outputs are published once per cycle.", (0.5, 100.0)),
    Param("model_dir", "", "Trained model folder (config.json + model.safetensors); empty = the shipped "
          "models/fusion_small (random weights with a warning when it is not there)."),
    Param("backend", "auto", "Inference backend.", choices=BACKENDS),
    Param("device", "", "Device for the backend: '' = automatic, 'cpu', 'cuda', 'cuda:N'."),
    Param("precision", "fp32", "Inference precision.", choices=("fp32", "fp16", "int8")),
    Param("threads", 0, "CPU threads for inference (0 = the library default).", (0, 64)),
    Param("frame_id", topics.BASE_FRAME, "Frame of the outputs (the vehicle frame)."),
    Param("camera_transport", "raw", "Camera input: raw sensor_msgs/Image or CompressedImage.",
          choices=("raw", "compressed")),
    Param("use_camera_info", True, "Also subscribe to CameraInfo (checked against the image size)."),
    Param("topics.camera_image", topics.CAMERA_IMAGE, "Camera image topic (camera_transport=raw)."),
    Param("topics.camera_compressed", topics.CAMERA_COMPRESSED,
          "Compressed image topic (camera_transport=compressed)."),
    Param("topics.camera_info", topics.CAMERA_INFO, "CameraInfo topic."),
    Param("topics.lidar_points", topics.LIDAR_POINTS, "LiDAR PointCloud2 topic."),
    Param("topics.gnss_fix", topics.GNSS_FIX, "GNSS NavSatFix topic."),
    Param("sync.camera_timeout", 0.5, "Camera frames older than this are masked out [s].", (0.01, 10.0)),
    Param("sync.lidar_timeout", 0.5, "LiDAR frames older than this are masked out [s].", (0.01, 10.0)),
    Param("sync.gnss_timeout", 1.0, "GNSS fixes older than this are masked out [s].", (0.01, 10.0)),
    Param("sync.future_tolerance", 0.5, "Stamps further ahead of the node clock are rejected [s].", (0.0, 10.0)),
    Param("sync.loop_reset", 1.0, "A backwards stamp jump larger than this resets the buffers [s] "
          "(bag loop, restarted simulation).", (0.0, 3600.0)),
    Param("safety.decel", _S.decel, "Braking deceleration for the stopping-distance cap [m/s^2].", (0.5, 12.0)),
    Param("safety.margin", _S.margin, "Gap kept to the obstacle at standstill [m].", (0.0, 20.0)),
    Param("safety.ttc_stop", _S.ttc_stop, "Force STOP when time to collision is below this [s].", (0.0, 10.0)),
    Param("safety.ttc_slow", _S.ttc_slow, "Force SLOW_DOWN when time to collision is below this [s].", (0.1, 20.0)),
    Param("safety.slow_factor", _S.slow_factor, "Speed cap as a fraction of ego speed when slowing for TTC.",
          (0.05, 1.0)),
    Param("safety.stop_speed", _S.stop_speed, "Speed caps below this mean stop [m/s].", (0.0, 5.0)),
    Param("safety.degraded_factor", _S.degraded_factor, "Speed cap multiplier per masked modality.", (0.05, 1.0)),
    Param("safety.no_lidar_speed", _S.no_lidar_speed, "Speed cap without LiDAR [m/s].", (0.0, 60.0)),
    Param("safety.max_speed", _S.max_speed, "Absolute speed cap [m/s].", (0.1, 60.0)),
    Param("safety.corridor_half_width", _S.corridor_half_width, "Half width of the ego corridor [m].", (0.3, 5.0)),
    Param("safety.ground_height", _S.ground_height, "LiDAR points at or below this height are ground [m].",
          (-1.0, 2.0)),
    Param("safety.max_height", _S.max_height, "LiDAR points above this height pass over the vehicle [m].",
          (0.5, 10.0)),
    Param("safety.max_range", _S.max_range, "Free distance beyond this counts as free [m].", (5.0, 200.0)),
    Param("diagnostics.rate_tolerance", 0.5, "A sensor below (1 - tolerance) x its expected rate is WARN.",
          (0.0, 1.0)),
    Param("diagnostics.window", 2.0, "Window for rates and recent rejections [s].", (0.2, 60.0)),
    Param("diagnostics.warn_age", 0.3, "A latest frame older than this is WARN [s].", (0.01, 60.0)),
    Param("diagnostics.error_age", 1.0, "A latest frame older than this is ERROR [s].", (0.01, 60.0)),
    Param("diagnostics.camera_hz", 20.0, "Expected camera rate [Hz].", (0.1, 1000.0)),
    Param("diagnostics.lidar_hz", 10.0, "Expected LiDAR rate [Hz].", (0.1, 1000.0)),
    Param("diagnostics.gnss_hz", 10.0, "Expected GNSS rate [Hz].", (0.1, 1000.0)),
)
PARAM_BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}


class ParameterError(ValueError):
    """One or more parameters are invalid; the message names each with its value."""


def _fmt(value: Any) -> str:
    return repr(value)


def validate(values: dict[str, Any]) -> list[str]:
    """Problems with a full set of parameter values (empty = valid). Each names parameter and value."""
    problems = []
    for p in PARAMS:
        v = values.get(p.name)
        if type(v) is not type(p.default) and not (isinstance(p.default, float) and type(v) is int):
            problems.append(f"{p.name}={_fmt(v)}: expected a {type(p.default).__name__}")
            continue
        if p.range is not None and not (p.range[0] <= v <= p.range[1]):
            problems.append(f"{p.name}={_fmt(v)}: must be in [{p.range[0]:g}, {p.range[1]:g}]")
        if p.choices is not None and v not in p.choices:
            problems.append(f"{p.name}={_fmt(v)}: must be one of {', '.join(p.choices)}")
    if problems:
        return problems
    if values["diagnostics.error_age"] < values["diagnostics.warn_age"]:
        problems.append(f"diagnostics.error_age={values['diagnostics.error_age']!r}: must be >= "
                        f"diagnostics.warn_age={values['diagnostics.warn_age']!r}")
    try:
        safety_config(values).validate()
    except ValueError as exc:
        problems.append(str(exc))
    for name in ("model_dir",):
        if values[name]:
            from pathlib import Path

            if not (Path(values[name]) / "config.json").is_file():
                problems.append(f"{name}={values[name]!r}: not a model directory (no config.json)")
    return problems


def safety_config(values: dict[str, Any]) -> SafetyConfig:
    kw = {k.split(".", 1)[1]: float(v) for k, v in values.items() if k.startswith("safety.")}
    return SafetyConfig(**kw)


def _descriptor(p: Param) -> Any:
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    desc = p.description
    if p.choices:
        desc += f" One of: {', '.join(p.choices)}."
    d = ParameterDescriptor(description=desc)
    if p.range is not None and isinstance(p.default, float):
        d.floating_point_range = [FloatingPointRange(from_value=float(p.range[0]), to_value=float(p.range[1]),
                                                     step=0.0)]
    elif p.range is not None and isinstance(p.default, int) and not isinstance(p.default, bool):
        d.integer_range = [IntegerRange(from_value=int(p.range[0]), to_value=int(p.range[1]), step=1)]
    return d


def _make_node_class() -> type:
    """Build the node class lazily, so importing this module (tests, CLI help) needs no rclpy."""
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

    from lmm_fusion.base.rig import SensorRig
    from lmm_fusion.cycle.ingest import SensorIngest
    from lmm_fusion.cycle.sync import SensorSync, SyncConfig
    from lmm_fusion.io.msgtypes import rclpy_types
    from lmm_fusion.ros import outputs as ros_outputs
    from lmm_fusion.ros.diagnostics import DiagnosticsConfig, FusionDiagnostics

    output_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)

    class FusionNode(LifecycleNode):
        """See the module docstring."""

        def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
            super().__init__(node_name, **kwargs)
            self.types = rclpy_types()
            self.rig = SensorRig()
            self.declare_errors: list[str] = []
            for p in PARAMS:
                self._declare(p)
            self.add_on_set_parameters_callback(self._check_set)
            self.values: dict[str, Any] = {}
            self.pipeline: Any = None
            self.sync: SensorSync | None = None
            self.ingest: SensorIngest | None = None
            self.diag: FusionDiagnostics | None = None
            self.pubs: dict[str, Any] = {}
            self.subs: list[Any] = []
            self.timer: Any = None
            self.callback_errors: Counter[str] = Counter()
            self.camera_info: Any = None
            self.last_assessment: Any = None
            self._cycle_lock = threading.Lock()
            self._active = False
            self.sensor_group = MutuallyExclusiveCallbackGroup()
            self.cycle_group = MutuallyExclusiveCallbackGroup()
            self.worker: CycleWorker | None = None

        # ------------------------------------------------------------ parameters
        def _declare(self, p: Param) -> None:
            from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException

            try:
                self.declare_parameter(p.name, p.default, _descriptor(p))
            except (InvalidParameterValueException, InvalidParameterTypeException) as exc:
                given = self._parameter_overrides.get(p.name)
                value = given.value if given is not None else "?"
                reason = f"must be in [{p.range[0]:g}, {p.range[1]:g}]" if p.range else str(exc)
                if isinstance(exc, InvalidParameterTypeException):
                    reason = f"expected a {type(p.default).__name__}"
                self.declare_errors.append(f"{p.name}={value!r}: {reason}")
                # Declared with its default so the node exists; configure then fails naming it.
                self.declare_parameter(p.name, p.default, _descriptor(p), ignore_override=True)

        def _check_set(self, params: list[Any]) -> Any:
            """Refuse run-time sets of a wrong value (ranges are enforced by rclpy itself); accepted
            values take effect at the next configure."""
            from rcl_interfaces.msg import SetParametersResult

            for prm in params:
                spec = PARAM_BY_NAME.get(prm.name)
                if spec is not None and spec.choices is not None and prm.value not in spec.choices:
                    return SetParametersResult(successful=False, reason=(
                        f"{prm.name}={prm.value!r}: must be one of {', '.join(spec.choices)}"))
            return SetParametersResult(successful=True)

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
            self.sync = SensorSync(SyncConfig(
                timeouts={s: float(v[f"sync.{s}_timeout"]) for s in MODALITIES},
                loop_reset=float(v["sync.loop_reset"]), future_tolerance=float(v["sync.future_tolerance"])))
            self.ingest = SensorIngest(self.sync, self.rig)
            self.diag = FusionDiagnostics(DiagnosticsConfig(
                expected_hz={s: float(v[f"diagnostics.{s}_hz"]) for s in MODALITIES},
                rate_tolerance=float(v["diagnostics.rate_tolerance"]), window_s=float(v["diagnostics.window"]),
                warn_age=float(v["diagnostics.warn_age"]), error_age=float(v["diagnostics.error_age"]),
                rate_hz=float(v["rate_hz"])), node_name=self.get_name())
            self.callback_errors.clear()
            t = self.types
            self.pubs = {
                "scene": self.create_lifecycle_publisher(t.SceneAssessment, "~/scene_assessment", output_qos),
                "action": self.create_lifecycle_publisher(t.ActionSuggestion, "~/action_suggestion", output_qos),
                "occupancy": self.create_lifecycle_publisher(t.OccupancyGrid, "~/occupancy", output_qos),
                "markers": self.create_lifecycle_publisher(t.MarkerArray, "~/markers", output_qos),
                "diagnostics": self.create_lifecycle_publisher(t.DiagnosticArray, "/diagnostics", output_qos),
            }
            self.get_logger().info(f"configured: {v['rate_hz']:g} Hz, backend {v['backend']}, "
                                   f"camera {v['camera_transport']}")
            return super().on_configure(state)

        def make_pipeline(self) -> Any:
            from lmm_fusion.cycle.pipeline import FusionPipeline

            v = self.values
            return FusionPipeline(v["model_dir"] or None, v["backend"], self.rig, safety_config(v),
                                  device=v["device"] or None, precision=v["precision"],
                                  threads=v["threads"] or None)

        def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
            v = self.values
            try:
                self.pipeline = self.make_pipeline()
                self.pipeline.warmup(2)
            except Exception as exc:  # any load failure fails the transition
                self.get_logger().error(f"activate: cannot load model/backend: {exc}")
                self.pipeline = None
                return TransitionCallbackReturn.FAILURE
            self.get_logger().info(f"pipeline: {self.pipeline.describe()}")
            t = self.types
            sensor_qos = qos_profile_sensor_data
            if v["camera_transport"] == "raw":
                self._subscribe(t.Image, v["topics.camera_image"], "camera", sensor_qos)
            else:
                self._subscribe(t.CompressedImage, v["topics.camera_compressed"], "camera", sensor_qos)
            if v["use_camera_info"]:
                self.subs.append(self.create_subscription(
                    t.CameraInfo, v["topics.camera_info"], self._on_camera_info, sensor_qos,
                    callback_group=self.sensor_group))
            self._subscribe(t.PointCloud2, v["topics.lidar_points"], "lidar", sensor_qos)
            self._subscribe(t.NavSatFix, v["topics.gnss_fix"], "gnss", sensor_qos)
            self._active = True
            self.worker = CycleWorker(self._cycle, on_error=lambda exc: self.get_logger().error(
                f"cycle failed: {exc!r}", throttle_duration_sec=2.0))
            self.timer = self.create_timer(1.0 / v["rate_hz"], self.worker.request, callback_group=self.cycle_group)
            self.get_logger().info("activated")
            return super().on_activate(state)

        def _subscribe(self, msg_type: Any, topic: str, sensor: str, qos: Any) -> None:
            self.subs.append(self.create_subscription(
                msg_type, topic, lambda msg, s=sensor: self._on_sensor(s, msg), qos,
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
                self.pipeline = None

        def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
            self._release_active()
            self.get_logger().info("deactivated")
            return super().on_deactivate(state)

        def _release_configured(self) -> None:
            for pub in self.pubs.values():
                self.destroy_lifecycle_publisher(pub)
            self.pubs = {}
            self.sync = self.ingest = self.diag = None

        def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
            self._release_configured()
            self.get_logger().info("cleaned up")
            return super().on_cleanup(state)

        def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
            self._release_active()
            self._release_configured()
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
                t0 = time.perf_counter()
                now = self.now()
                snapshot = self.sync.snapshot(now)
                try:
                    a = self.pipeline.cycle(snapshot)
                except Exception as exc:  # one bad cycle must not stop the node
                    from lmm_fusion.cycle.assessment import invalid

                    self.get_logger().error(f"cycle failed: {exc!r}", throttle_duration_sec=2.0)
                    a = invalid(now, snapshot.mask, dict(snapshot.ages))
                self.last_assessment = a
                t, frame = self.types, self.values["frame_id"]
                self.pubs["scene"].publish(ros_outputs.scene_assessment(t, a, frame))
                self.pubs["action"].publish(ros_outputs.action_suggestion(t, a, frame))
                self.pubs["occupancy"].publish(ros_outputs.occupancy_grid(t, a, frame_id=frame))
                self.pubs["markers"].publish(ros_outputs.markers(t, a, frame))
                assert self.ingest is not None
                for s in MODALITIES:
                    self.diag.set_rejected(s, self.ingest.stats.rejected[s] + self.callback_errors[s], now)
                latency_ms = (time.perf_counter() - t0) * 1e3
                self.diag.on_cycle(now, latency_ms)
                statuses = self.diag.statuses(now, snapshot.ages, a)
                self.pubs["diagnostics"].publish(ros_outputs.diagnostic_array(t, now, statuses))

    return FusionNode


class CycleWorker:
    """Runs ``fn`` on one dedicated thread whenever :meth:`request` is called (ROS-free).

    Latest-only: a request while a cycle is still running is dropped and counted in ``skipped``, so a
    slow cycle never piles up work. ``stop`` waits for the cycle in flight, then ends the thread.
    """

    def __init__(self, fn: Any, on_error: Any = None, name: str = "fusion-cycle") -> None:
        self._fn = fn
        self._on_error = on_error
        self._wake = threading.Event()
        self._stopping = False
        self._busy = False
        self.skipped = 0
        self.runs = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def request(self) -> None:
        if self._busy or self._wake.is_set():
            self.skipped += 1
            return
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            if self._stopping:
                return
            self._busy = True
            self._wake.clear()
            try:
                self._fn()
            except Exception as exc:  # one bad cycle must not end the thread
                if self._on_error is not None:
                    self._on_error(exc)
            finally:
                self.runs += 1
                self._busy = False

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)


_NODE_CLASS: type | None = None


def node_class() -> type:
    """The rclpy ``FusionNode`` class (built on first use)."""
    global _NODE_CLASS
    if _NODE_CLASS is None:
        _NODE_CLASS = _make_node_class()
    return _NODE_CLASS


def run_node(ros_args: list[str] | None = None) -> int:
    """Create, (auto-)start and spin the node until shutdown; returns the exit code.

    ``ros_args`` is a full argv with ``--ros-args ...`` (parameters, remaps, params files).
    Exit codes: 0 clean shutdown or build-only success, 1 a transition failed (e.g. bad parameter).
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn

    try:
        rclpy.init(args=ros_args)
    except Exception as exc:  # rcl rejects malformed --ros-args (RCLError); say so, not a traceback
        logging.getLogger(__name__).error("cannot start: %s", exc)
        return 2
    node = None
    executor = None
    try:
        node = node_class()()
        autostart = bool(node.get_parameter("autostart").value)
        build_only = bool(node.get_parameter("build_only").value)
        if (build_only or autostart) and node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            node.get_logger().error("configure failed; exiting")
            return 1
        if build_only:
            pipeline = node.make_pipeline()
            node.get_logger().info(f"build-only: engine ready: {pipeline.describe()}")
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
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_node(sys.argv if args is None else args)


# ---------------------------------------------------------------- `lmm-fusion node`
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params-file", default=None,
                        help="parameters YAML (default: the shipped config/fusion.yaml)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME:=VALUE",
                        help="set a parameter (repeatable), e.g. -p rate_hz:=20.0")
    parser.add_argument("-r", "--remap", action="append", default=[], metavar="FROM:=TO",
                        help="remap a topic (repeatable)")
    parser.add_argument("--use-sim-time", action="store_true", help="follow /clock")
    parser.add_argument("--namespace", default=None, help="node namespace")
    parser.add_argument("--no-autostart", action="store_true", help="stay unconfigured until ChangeState")
    parser.add_argument("--build-only", action="store_true", help="build the engine, then exit")
    parser.add_argument("ros_args", nargs=argparse.REMAINDER,
                        help="after '--': extra ROS arguments, e.g. -- --ros-args --log-level debug")


def ros_argv(args: argparse.Namespace) -> list[str]:
    """The ``--ros-args`` argv for the CLI options."""
    from lmm_fusion.base.paths import find_shared

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
    for r in args.remap:
        argv += ["-r", r]
    if args.use_sim_time:
        argv += ["-p", "use_sim_time:=true"]
    if args.namespace:
        argv += ["-r", f"__ns:={args.namespace}"]
    if args.no_autostart:
        argv += ["-p", "autostart:=false"]
    if args.build_only:
        argv += ["-p", "build_only:=true"]
    extra = [a for a in args.ros_args if a != "--"]
    if extra:
        argv += extra if extra[0] == "--ros-args" else ["--ros-args", *extra]
    return argv


def run(args: argparse.Namespace) -> int:
    return run_node(ros_argv(args))


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "BACKENDS",
    "NODE_NAME",
    "PARAMS",
    "CycleWorker",
    "Param",
    "ParameterError",
    "main",
    "node_class",
    "run",
    "run_node",
    "safety_config",
    "validate",
]
