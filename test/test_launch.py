"""launch/fusion.launch.py: parses, passes only declared parameters, names only existing files.

``launch``/``launch_ros`` are not installable here, so the file is also executed against small stand-in
modules that record every action's arguments; with a real ROS 2 install the real modules are used too.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmm_fusion.cli import COMMANDS
from lmm_fusion.ros.params import DEFAULT_REMAPS, INPUTS, PARAMS

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "fusion.launch.py"
BUILTIN_PARAMS = {"use_sim_time"}  # declared by rclpy itself


class Recorded:
    """Stand-in for any launch action/substitution: remembers its arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs


def fake_launch_modules() -> dict[str, types.ModuleType]:
    names = {
        "launch": ["LaunchDescription"],
        "launch.actions": ["DeclareLaunchArgument", "ExecuteProcess", "IncludeLaunchDescription", "LogInfo",
                           "GroupAction", "TimerAction", "RegisterEventHandler", "EmitEvent",
                           "SetEnvironmentVariable"],
        "launch.conditions": ["IfCondition", "UnlessCondition"],
        "launch.substitutions": ["LaunchConfiguration", "PathJoinSubstitution", "PythonExpression",
                                 "FindExecutable", "TextSubstitution", "EnvironmentVariable"],
        "launch_ros": [],
        "launch_ros.actions": ["Node", "LifecycleNode", "PushRosNamespace"],
        "launch_ros.substitutions": ["FindPackageShare"],
    }
    mods = {}
    for mod_name, classes in names.items():
        m = types.ModuleType(mod_name)
        for c in classes:
            setattr(m, c, type(c, (Recorded,), {}))
        mods[mod_name] = m
    return mods


def load_launch(monkeypatch: pytest.MonkeyPatch, fake: bool) -> Any:
    if fake:
        for name, mod in fake_launch_modules().items():
            monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("fusion_launch", LAUNCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate_launch_description()


def test_launch_file_parses() -> None:
    tree = ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))
    funcs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert "generate_launch_description" in funcs


def _share_files(obj: Any) -> list[str]:
    """Relative paths of PathJoinSubstitution([FindPackageShare('lmm_fusion'), ...]) anywhere in obj."""
    out: list[str] = []
    if isinstance(obj, Recorded):
        if type(obj).__name__ == "PathJoinSubstitution":
            parts = obj.args[0]
            head = parts[0]
            if type(head).__name__ == "FindPackageShare" and head.args == ("lmm_fusion",):
                out.append("/".join(parts[1:]))
        for v in (*obj.args, *obj.kwargs.values()):
            out += _share_files(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += _share_files(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            out += _share_files(v)
    return out


def test_launch_description_with_stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    ld = load_launch(monkeypatch, fake=True)
    entities = ld.args[0]
    declared = {e.args[0] for e in entities if type(e).__name__ == "DeclareLaunchArgument"}
    assert {"params_file", "use_sim_time", "namespace", "rviz", "bag", "autostart"} <= declared
    used = set()
    for e in entities:
        for sub in _walk(e):
            if type(sub).__name__ == "LaunchConfiguration":
                used.add(sub.args[0])
    assert used <= declared, f"undeclared launch arguments: {used - declared}"

    nodes = [e for e in entities if type(e).__name__ in ("LifecycleNode", "Node")
             and e.kwargs.get("executable") == "fusion_node"]
    assert len(nodes) == 1
    node = nodes[0]
    assert node.kwargs["package"] == "lmm_fusion" and node.kwargs["name"] == "fusion_node"
    declared_params = {p.name for p in PARAMS} | BUILTIN_PARAMS
    passed = set()
    for item in node.kwargs["parameters"]:
        if isinstance(item, dict):
            passed |= set(item)
    assert passed and passed <= declared_params, f"not declared by the node: {passed - declared_params}"

    # Every input is remapped from a launch argument whose default is the topic lmm-fusion node uses.
    remaps = dict(node.kwargs["remappings"])
    assert set(remaps) == set(INPUTS.values())
    defaults = {e.args[0]: e.kwargs.get("default_value") for e in entities
                if type(e).__name__ == "DeclareLaunchArgument"}
    for source, sub in remaps.items():
        assert type(sub).__name__ == "LaunchConfiguration"
        assert defaults[sub.args[0]] == DEFAULT_REMAPS[source], source

    files = _share_files(entities)
    assert "config/fusion.yaml" in files and "config/lmm_fusion.rviz" in files
    for rel in files:
        assert (ROOT / rel).is_file(), rel

    rviz = next(e for e in entities if e.kwargs.get("executable") == "rviz2")
    assert type(rviz.kwargs["condition"]).__name__ == "IfCondition"
    # RViz runs in the node's namespace, where the config's relative topics resolve.
    assert type(rviz.kwargs["namespace"]).__name__ == "LaunchConfiguration"
    assert rviz.kwargs["namespace"].args == ("namespace",) and node.kwargs["namespace"].args == ("namespace",)
    player = next(e for e in entities if type(e).__name__ == "ExecuteProcess")
    cmd = [c for c in player.kwargs["cmd"] if isinstance(c, str)]
    assert cmd[:3] == ["-m", "lmm_fusion.cli", "play"] and "--clock" in cmd
    env = {e.args[0] for e in entities if type(e).__name__ == "SetEnvironmentVariable"}
    assert env == {"FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE"}
    assert "config/fastdds_large_data.xml" in files


def _walk(obj: Any) -> list[Any]:
    out = [obj]
    if isinstance(obj, Recorded):
        for v in (*obj.args, *obj.kwargs.values()):
            out += _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += _walk(v)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out += _walk(k) + _walk(v)
    return out


def test_named_executables_and_installed_files_exist() -> None:
    # The venv path (pip) and a ROS install (the root CMakeLists.txt) name the same executables.
    setup = (ROOT / "setup.py").read_text()
    assert re.search(r'"fusion_node = lmm_fusion\.ros\.node:main"', setup)
    assert "from lmm_fusion.ros.node import main" in (ROOT / "scripts" / "fusion_node").read_text()
    assert "from lmm_fusion.cli import main" in (ROOT / "scripts" / "lmm-fusion").read_text()
    assert COMMANDS["play"][0] == "lmm_fusion.ros.player" and COMMANDS["node"][0] == "lmm_fusion.ros.node"
    # Both install launch/*.launch.py, config/ and the shipped model into share/lmm_fusion.
    assert 'glob("launch/*.launch.py")' in setup and 'glob("config/*.rviz")' in setup
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "install(PROGRAMS scripts/fusion_node scripts/lmm-fusion DESTINATION lib/${PROJECT_NAME})" in cmake
    assert "install(DIRECTORY launch config DESTINATION share/${PROJECT_NAME})" in cmake
    assert "install(DIRECTORY models/ DESTINATION share/${PROJECT_NAME}/models)" in cmake


def test_rviz_config_displays() -> None:
    cfg = yaml.safe_load((ROOT / "config" / "lmm_fusion.rviz").read_text())
    vm = cfg["Visualization Manager"]
    assert vm["Global Options"]["Fixed Frame"] == "base_link"
    displays = {d["Class"]: d for d in vm["Displays"]}
    for cls in ("rviz_default_plugins/Image", "rviz_default_plugins/PointCloud2", "rviz_default_plugins/Map",
                "rviz_default_plugins/MarkerArray"):
        assert cls in displays, cls
    # Relative names: RViz resolves them in its namespace (the launch file's `namespace`), so the same
    # config shows /fusion_node/... at the root and /car1/fusion_node/... for namespace:=car1.
    assert displays["rviz_default_plugins/Map"]["Topic"]["Value"] == "fusion_node/occupancy"
    assert displays["rviz_default_plugins/MarkerArray"]["Topic"]["Value"] == "fusion_node/markers"
    topics_named = [d[key]["Value"] for d in vm["Displays"] for key in ("Topic", "Update Topic") if key in d]
    assert len(topics_named) >= 5 and not [t for t in topics_named if t.startswith("/")], topics_named
    # The sensor displays show what the default remaps feed the node (relative to the namespace).
    assert displays["rviz_default_plugins/PointCloud2"]["Topic"]["Value"] == DEFAULT_REMAPS[
        INPUTS["lidar_points"]].lstrip("/")
    assert displays["rviz_default_plugins/Image"]["Topic"]["Value"] == DEFAULT_REMAPS[
        INPUTS["camera_image"]].lstrip("/")


def test_launch_with_real_launch_ros() -> None:
    try:
        importlib.import_module("launch.actions")  # the ROS 2 package, not this repository's launch/ folder
        importlib.import_module("launch_ros")
    except ImportError:
        pytest.skip("launch/launch_ros are not installable from PyPI here (needs a ROS 2 Jazzy install)")
    spec = importlib.util.spec_from_file_location("fusion_launch_real", LAUNCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ld = module.generate_launch_description()
    assert len(ld.entities) >= 3
