"""The fusion node's parameters: schema, defaults, validation (ROS-free).

:data:`PARAMS` is the single list of every parameter the node declares; ``config/fusion.yaml`` holds
exactly these (a test keeps them in step). Everything here works without ``rclpy`` (tests, launch
checks, CLI help); only :func:`descriptor` needs the ROS message package ``rcl_interfaces``.

Live parameters (``Param.live``: ``sync.*``, ``safety.*``, ``diagnostics.*``) may be set while the node
runs (``ros2 param set``, the ``~/set_parameters`` service): a value is checked with :func:`validate` against
the others and, when accepted, used from the next cycle on. Every other parameter is declared
``read_only``: it is fixed for the life of the process (restart, or set it in the YAML / launch file).

The inputs are not parameters: the node subscribes to the relative names of :data:`INPUTS` (``~/input/...``),
which launch remappings (or ``--ros-args -r``) point at the sensor topics; :data:`DEFAULT_REMAPS` are those
of launch/fusion.launch.py, the ``/sensors/...`` topics of :mod:`lmm_fusion.base.topics`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmm_fusion.base import topics
from lmm_fusion.base.rig import SensorRig, VehicleGeometry
from lmm_fusion.cycle.safety import SafetyConfig
from lmm_fusion.runtime.base import BACKENDS


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
    #: Settable while the node runs (taken at the next cycle); False = declared read-only.
    live: bool = False


_S = SafetyConfig()
_V = VehicleGeometry()
#: Every parameter of the node; config/fusion.yaml holds exactly these (a test keeps them in step).
PARAMS: tuple[Param, ...] = (
    Param("autostart", True, "Configure and activate at start-up (false: wait for lifecycle ChangeState)."),
    Param("rate_hz", 10.0, "Fusion cycle rate [Hz]; outputs are published once per cycle.", (0.5, 100.0)),
    Param("model_dir", "", "Trained model folder (config.json + model.safetensors); empty = the shipped "
          "models/fusion_small (random weights with a warning when it is not there)."),
    Param("backend", "auto", "Inference backend.", choices=BACKENDS),
    Param("device", "", "Device for the backend: '' = automatic, 'cpu', 'cuda', 'cuda:N'."),
    Param("precision", "fp32", "Inference precision.", choices=("fp32", "fp16", "int8")),
    Param("threads", 0, "CPU threads for inference (0 = the library default).", (0, 64)),
    Param("dla_core", -1, "DLA core for the TensorRT backend (Jetson Orin; fp16/int8 only, fp32 is refused); "
          "-1 = the GPU.", (-1, 7)),
    Param("engine_cache_dir", "", "Folder for TensorRT engines and timing caches; empty = beside the model's "
          "ONNX file, or ~/.cache/lmm_fusion/engines when that folder is read-only."),
    Param("frame_id", topics.BASE_FRAME, "Frame of the outputs (the vehicle frame)."),
    Param("camera_transport", "raw", "Camera input: raw sensor_msgs/Image or CompressedImage.",
          choices=("raw", "compressed")),
    Param("use_camera_info", True, "Also subscribe to CameraInfo (checked against the image size)."),
    Param("odometry_type", "odometry", "Message type of the optional ego-speed input ~/input/odometry: "
          "nav_msgs/Odometry or geometry_msgs/TwistWithCovarianceStamped (twist in the vehicle frame, m/s); "
          "while fresh its speed is used instead of the GNSS estimate's.", choices=("odometry", "twist")),
    Param("lidar.intensity_scale", 0.0, "Divisor that brings the LiDAR's intensity to 0..1 (255 for a Velodyne or "
          "Livox, the count range for an Ouster); 0 = detect it from the first clouds (logged).", (0.0, 1.0e9)),
    Param("vehicle.length", _V.length, "Length of the ego vehicle, bumper to bumper [m].", (0.5, 30.0)),
    Param("vehicle.width", _V.width, "Width of the ego vehicle [m].", (0.3, 5.0)),
    Param("vehicle.front_offset", _V.front_offset, "Distance from base_link forward to the front bumper [m]; "
          "obstacle and free distances are measured from the bumper. At most vehicle.length.", (0.0, 30.0)),
    Param("sync.camera_timeout", 0.5, "Camera frames older than this are masked out [s].", (0.01, 10.0), live=True),
    Param("sync.lidar_timeout", 0.5, "LiDAR frames older than this are masked out [s].", (0.01, 10.0), live=True),
    Param("sync.gnss_timeout", 1.0, "GNSS fixes older than this are masked out [s].", (0.01, 10.0), live=True),
    Param("sync.odometry_timeout", 0.5, "Odometry older than this is not used for the ego speed [s] (GNSS "
          "is then).", (0.01, 10.0), live=True),
    Param("sync.future_tolerance", 0.5, "Stamps further ahead of the node clock are rejected [s].",
          (0.0, 10.0), live=True),
    Param("sync.loop_reset", 1.0, "A backwards stamp jump larger than this resets the buffers [s] "
          "(bag loop, restarted simulation).", (0.0, 3600.0), live=True),
    Param("safety.decel", _S.decel, "Braking deceleration for the stopping-distance cap [m/s^2].",
          (0.5, 12.0), live=True),
    Param("safety.margin", _S.margin, "Gap kept to the obstacle at standstill [m].", (0.0, 20.0), live=True),
    Param("safety.ttc_stop", _S.ttc_stop, "Force STOP when time to collision is below this [s].",
          (0.0, 10.0), live=True),
    Param("safety.ttc_slow", _S.ttc_slow, "Force SLOW_DOWN when time to collision is below this [s].",
          (0.1, 20.0), live=True),
    Param("safety.slow_factor", _S.slow_factor, "Speed cap as a fraction of ego speed when slowing for TTC.",
          (0.05, 1.0), live=True),
    Param("safety.stop_speed", _S.stop_speed, "Speed caps below this mean stop [m/s].", (0.0, 5.0), live=True),
    Param("safety.degraded_factor", _S.degraded_factor, "Speed cap multiplier per masked modality.",
          (0.05, 1.0), live=True),
    Param("safety.no_lidar_speed", _S.no_lidar_speed, "Speed cap without LiDAR [m/s].", (0.0, 60.0), live=True),
    Param("safety.max_speed", _S.max_speed, "Absolute speed cap [m/s].", (0.1, 60.0), live=True),
    Param("safety.corridor_half_width", _S.corridor_half_width, "Half width of the ego corridor [m].",
          (0.3, 5.0), live=True),
    Param("safety.ground_height", _S.ground_height, "LiDAR points at or below this height are ground [m].",
          (-1.0, 2.0), live=True),
    Param("safety.max_height", _S.max_height, "LiDAR points above this height pass over the vehicle [m].",
          (0.5, 10.0), live=True),
    Param("safety.max_range", _S.max_range, "Free distance beyond this counts as free [m].", (5.0, 200.0), live=True),
    Param("safety.lane_width", _S.lane_width, "Width of the lane a lane change goes to [m].", (2.0, 6.0), live=True),
    Param("safety.lane_intrusion", _S.lane_intrusion, "An object reaching further than this into the target lane "
          "blocks a lane change [m].", (0.0, 1.0), live=True),
    Param("safety.lane_free_behind", _S.lane_free_behind, "A lane change needs the target lane free from this far "
          "behind the ego's rear bumper [m].", (0.0, 50.0), live=True),
    Param("safety.lane_free_beyond", _S.lane_free_beyond, "... to this far beyond the ego-lane obstacle's far "
          "face [m].", (0.0, 50.0), live=True),
    Param("safety.lane_free_ahead", _S.lane_free_ahead, "... or this far ahead of the bumper when the ego lane is "
          "free [m].", (0.0, 100.0), live=True),
    Param("safety.obstacle_length", _S.obstacle_length, "Least length assumed for the ego-lane obstacle [m].",
          (0.0, 20.0), live=True),
    Param("safety.reaction_time", _S.reaction_time, "Reaction time of the comfortable stopping distance [s].",
          (0.0, 3.0), live=True),
    Param("safety.comfort_decel", _S.comfort_decel, "Deceleration of the comfortable stopping distance [m/s^2].",
          (0.5, 10.0), live=True),
    Param("safety.blocked_stop_margin", _S.blocked_stop_margin, "A refused lane change stops within the comfortable "
          "stopping distance + this of the obstacle, else slows down [m].", (0.0, 50.0), live=True),
    Param("safety.closing_window", _S.closing_window, "LiDAR free distances of this many seconds give the closing "
          "speed [s].", (0.15, 5.0), live=True),
    Param("safety.closing_jump", _S.closing_jump, "A free distance this far off the closing-speed line is another "
          "obstacle [m].", (0.1, 10.0), live=True),
    Param("diagnostics.rate_tolerance", 0.5, "A sensor below (1 - tolerance) x its expected rate is WARN.",
          (0.0, 1.0), live=True),
    Param("diagnostics.window", 2.0, "Window for rates and recent rejections [s].", (0.2, 60.0), live=True),
    Param("diagnostics.warn_age", 0.3, "A latest frame older than this is WARN [s].", (0.01, 60.0), live=True),
    Param("diagnostics.error_age", 1.0, "A latest frame older than this is ERROR [s].", (0.01, 60.0), live=True),
    Param("diagnostics.camera_hz", 20.0, "Expected camera rate [Hz].", (0.1, 1000.0), live=True),
    Param("diagnostics.lidar_hz", 10.0, "Expected LiDAR rate [Hz].", (0.1, 1000.0), live=True),
    Param("diagnostics.gnss_hz", 10.0, "Expected GNSS rate [Hz].", (0.1, 1000.0), live=True),
    Param("diagnostics.period", 1.0, "Period of /diagnostics [s] (diagnostic_updater's default), published "
          "in every lifecycle state.", (0.05, 60.0), live=True),
)
PARAM_BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
#: Names of the parameters that may change while the node runs.
LIVE_PARAMS: frozenset[str] = frozenset(p.name for p in PARAMS if p.live)

#: The node's inputs: sensor stream -> the relative topic name it subscribes to (``~`` = the node's name).
INPUTS: dict[str, str] = {
    "camera_image": "~/input/camera/image",
    "camera_compressed": "~/input/camera/compressed",
    "camera_info": "~/input/camera/camera_info",
    "lidar_points": "~/input/lidar/points",
    "gnss_fix": "~/input/gnss/fix",
    "odometry": "~/input/odometry",
}
#: Default remappings of :data:`INPUTS` (launch/fusion.launch.py's defaults, ``lmm-fusion node``'s and the
#: test harness's): the ``/sensors/...`` topics every recorder and bag of this project uses.
DEFAULT_REMAPS: dict[str, str] = {
    INPUTS["camera_image"]: topics.CAMERA_IMAGE,
    INPUTS["camera_compressed"]: topics.CAMERA_COMPRESSED,
    INPUTS["camera_info"]: topics.CAMERA_INFO,
    INPUTS["lidar_points"]: topics.LIDAR_POINTS,
    INPUTS["gnss_fix"]: topics.GNSS_FIX,
    INPUTS["odometry"]: topics.ODOMETRY,
}


def remap_args(remaps: dict[str, str] | None = None) -> list[str]:
    """``-r FROM:=TO`` arguments (after ``--ros-args``) for ``remaps`` (default :data:`DEFAULT_REMAPS`)."""
    out: list[str] = []
    for src, dst in (DEFAULT_REMAPS if remaps is None else remaps).items():
        out += ["-r", f"{src}:={dst}"]
    return out


class ParameterError(ValueError):
    """One or more parameters are invalid; the message names each with its value."""


def range_problem(p: Param) -> str:
    """The reason given for a value outside ``p.range``, e.g. ``must be in [0.5, 100]``."""
    assert p.range is not None
    return f"must be in [{p.range[0]:g}, {p.range[1]:g}]"


def type_problem(p: Param) -> str:
    """The reason given for a value of the wrong type, e.g. ``expected a float``."""
    return f"expected a {type(p.default).__name__}"


def choice_problem(name: str, value: Any) -> str | None:
    """``NAME=VALUE: must be one of ...`` when ``name`` restricts its values and ``value`` is not one of
    them; None otherwise (also for names that are not node parameters)."""
    spec = PARAM_BY_NAME.get(name)
    if spec is not None and spec.choices is not None and value not in spec.choices:
        return f"{name}={value!r}: must be one of {', '.join(spec.choices)}"
    return None


def validate(values: dict[str, Any]) -> list[str]:
    """Problems with a full set of parameter values (empty = valid). Each names parameter and value."""
    problems = []
    for p in PARAMS:
        v: Any = values.get(p.name)
        # An int is accepted for a float parameter (YAML and -p write 10 for 10.0); bool is not an int here.
        if type(v) is not type(p.default) and not (isinstance(p.default, float) and type(v) is int):
            problems.append(f"{p.name}={v!r}: {type_problem(p)}")
            continue
        if p.range is not None and not (p.range[0] <= v <= p.range[1]):
            problems.append(f"{p.name}={v!r}: {range_problem(p)}")
        choice = choice_problem(p.name, v)
        if choice is not None:
            problems.append(choice)
    if problems:
        return problems
    if values["diagnostics.error_age"] < values["diagnostics.warn_age"]:
        problems.append(f"diagnostics.error_age={values['diagnostics.error_age']!r}: must be >= "
                        f"diagnostics.warn_age={values['diagnostics.warn_age']!r}")
    try:
        safety_config(values).validate()
    except ValueError as exc:
        problems.append(str(exc))
    try:
        vehicle_geometry(values).validate()
    except ValueError as exc:
        problems.append(str(exc))
    model_dir = values["model_dir"]
    if model_dir and not (Path(model_dir) / "config.json").is_file():
        problems.append(f"model_dir={model_dir!r}: not a model directory (no config.json)")
    return problems


def safety_config(values: dict[str, Any]) -> SafetyConfig:
    """The :class:`SafetyConfig` of the ``safety.*`` parameters in ``values`` (others keep their defaults)."""
    kw = {k.split(".", 1)[1]: float(v) for k, v in values.items() if k.startswith("safety.")}
    return SafetyConfig(**kw)


def vehicle_geometry(values: dict[str, Any]) -> VehicleGeometry:
    """The :class:`VehicleGeometry` of the ``vehicle.*`` parameters in ``values`` (others keep their defaults)."""
    kw = {k.split(".", 1)[1]: float(v) for k, v in values.items() if k.startswith("vehicle.")}
    return VehicleGeometry(**kw)


def node_rig(values: dict[str, Any]) -> SensorRig:
    """The node's :class:`SensorRig`: the built-in mounts (the fallback behind ``/tf_static``) with the
    ``vehicle.*`` geometry and ``lidar.intensity_scale`` (0 = None: detected from the clouds)."""
    base = SensorRig()
    scale = float(values.get("lidar.intensity_scale", 0.0)) or None
    return replace(base, vehicle=vehicle_geometry(values), lidar=replace(base.lidar, intensity_scale=scale))


def defaults() -> dict[str, Any]:
    """Every parameter at its default value, keyed by name."""
    return {p.name: p.default for p in PARAMS}


def descriptor(p: Param) -> Any:
    """The ``rcl_interfaces/ParameterDescriptor`` of ``p``: description (with the choices) and, for numbers,
    the range that rclpy enforces on declare and on every set."""
    # Imported on use: the rest of this module must stay importable without ROS.
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    desc = p.description
    if p.choices:
        desc += f" One of: {', '.join(p.choices)}."
    # Fixed for the process unless live: `ros2 param set` is refused with rclpy's reason naming it.
    d = ParameterDescriptor(description=desc, read_only=not p.live)
    if p.range is not None and isinstance(p.default, float):
        d.floating_point_range = [FloatingPointRange(from_value=float(p.range[0]), to_value=float(p.range[1]),
                                                     step=0.0)]
    elif p.range is not None and isinstance(p.default, int) and not isinstance(p.default, bool):
        d.integer_range = [IntegerRange(from_value=int(p.range[0]), to_value=int(p.range[1]), step=1)]
    return d


__all__ = [
    "DEFAULT_REMAPS",
    "INPUTS",
    "LIVE_PARAMS",
    "PARAMS",
    "PARAM_BY_NAME",
    "Param",
    "ParameterError",
    "choice_problem",
    "defaults",
    "descriptor",
    "node_rig",
    "remap_args",
    "safety_config",
    "validate",
    "vehicle_geometry",
]
