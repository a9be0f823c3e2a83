"""Node parameters: table, YAML, validation and the `lmm-fusion node` argv (no DDS, no rclpy.init)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmm_fusion.base import topics
from lmm_fusion.cycle.safety import SafetyConfig
from lmm_fusion.ros.node import add_arguments, ros_argv
from lmm_fusion.ros.params import (
    DEFAULT_REMAPS,
    INPUTS,
    LIVE_PARAMS,
    PARAMS,
    choice_problem,
    defaults,
    descriptor,
    safety_config,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_yaml_holds_exactly_the_declared_parameters_with_defaults() -> None:
    doc = yaml.safe_load((ROOT / "config" / "fusion.yaml").read_text())
    (key,) = doc
    assert key.endswith("fusion_node")
    values = flatten(doc[key]["ros__parameters"])
    assert set(values) == {p.name for p in PARAMS}
    for p in PARAMS:
        assert values[p.name] == p.default and type(values[p.name]) is type(p.default), p.name
    assert validate(values) == []


def test_defaults_match_topics_and_safety_config() -> None:
    d = defaults()
    # Inputs are relative names remapped to the /sensors/... topics, not parameters.
    assert not [k for k in d if k.startswith("topics.")] and "build_only" not in d
    assert all(name.startswith("~/input/") for name in INPUTS.values())
    expected = {INPUTS["camera_image"]: topics.CAMERA_IMAGE, INPUTS["camera_compressed"]: topics.CAMERA_COMPRESSED,
                INPUTS["camera_info"]: topics.CAMERA_INFO, INPUTS["lidar_points"]: topics.LIDAR_POINTS,
                INPUTS["gnss_fix"]: topics.GNSS_FIX, INPUTS["odometry"]: topics.ODOMETRY}
    assert expected == DEFAULT_REMAPS
    assert safety_config(d) == SafetyConfig()
    assert d["rate_hz"] == 10.0 and d["autostart"] is True and d["backend"] == "auto"


def test_live_parameters_are_settable_and_the_rest_read_only() -> None:
    live = {p.name for p in PARAMS if not descriptor(p).read_only}
    assert live == set(LIVE_PARAMS)
    assert live == {p.name for p in PARAMS if p.name.split(".")[0] in ("sync", "safety", "diagnostics")}
    assert {"safety.max_speed", "sync.lidar_timeout", "diagnostics.period"} <= live
    assert not {"rate_hz", "backend", "model_dir", "autostart", "camera_transport"} & live
    assert defaults()["diagnostics.period"] == 1.0  # diagnostic_updater's default period


def test_every_parameter_has_a_description_and_numbers_a_range() -> None:
    for p in PARAMS:
        d = descriptor(p)
        assert len(d.description) > 10, p.name
        if isinstance(p.default, float):
            assert d.floating_point_range, p.name
            r = d.floating_point_range[0]
            assert r.from_value <= p.default <= r.to_value
        if isinstance(p.default, int) and not isinstance(p.default, bool):
            assert d.integer_range, p.name


@pytest.mark.parametrize(("name", "value", "expect"), [
    ("rate_hz", 0.0, "rate_hz=0.0"),
    ("backend", "cuda9", "backend='cuda9'"),
    ("camera_transport", "theora", "camera_transport='theora'"),
    ("threads", -1, "threads=-1"),
    ("safety.decel", "fast", "safety.decel='fast'"),
    ("model_dir", "/nonexistent/model", "model_dir='/nonexistent/model'"),
])
def test_validation_names_parameter_and_value(name: str, value: Any, expect: str) -> None:
    v = defaults()
    v[name] = value
    problems = validate(v)
    assert problems and expect in problems[0]


def test_choice_problem_names_value_and_choices() -> None:
    """The reason a run-time set of a string parameter is refused (the node's set-parameters callback)."""
    assert choice_problem("backend", "cuda9") == "backend='cuda9': must be one of auto, torch, onnxruntime, tensorrt"
    assert choice_problem("camera_transport", "theora") == "camera_transport='theora': must be one of raw, compressed"
    assert choice_problem("backend", "torch") is None
    assert choice_problem("rate_hz", 500.0) is None  # ranges are rclpy's to enforce
    assert choice_problem("use_sim_time", True) is None  # not a parameter of this node


def test_cross_field_validation() -> None:
    v = defaults()
    v["safety.ttc_stop"], v["safety.ttc_slow"] = 4.0, 2.0
    assert any("ttc_stop" in p for p in validate(v))
    v = defaults()
    v["diagnostics.warn_age"], v["diagnostics.error_age"] = 2.0, 1.0
    assert any("diagnostics.error_age" in p for p in validate(v))


def test_cli_builds_ros_args() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["-p", "rate_hz:=20.0", "--use-sim-time", "--namespace", "car1", "--build-only",
                              "-r", "~/input/lidar/points:=/velodyne_points", "--", "--log-level", "debug"])
    assert args.build_only  # a CLI flag (run_node(build_only=True)), not a parameter
    argv = ros_argv(args)
    assert argv[1] == "--ros-args"
    assert argv[argv.index("--params-file") + 1].endswith("config/fusion.yaml")
    joined = " ".join(argv)
    for part in ("-p rate_hz:=20.0", "-p use_sim_time:=true", "-r __ns:=/car1",
                 "-r ~/input/lidar/points:=/velodyne_points", "-r ~/input/gnss/fix:=/sensors/gnss/fix",
                 "-r ~/input/camera/image:=/sensors/camera/image_raw", "--log-level debug"):
        assert part in joined
    # A remap given replaces the default one for that input (rcl would apply the first rule only).
    assert "~/input/lidar/points:=/sensors/lidar/points" not in joined and "build_only" not in joined


def test_ros_free_modules_import_no_rclpy() -> None:
    """The parameter schema, the cycle worker and the package itself load without rclpy (launch checks,
    tools that only need the parameters); only ``lmm_fusion.ros.node`` is the rclpy node."""
    code = ("import sys, lmm_fusion.ros, lmm_fusion.ros.params, lmm_fusion.ros.worker; "
            "print(sorted(m for m in sys.modules if m == 'rclpy' or m.startswith('rclpy.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
