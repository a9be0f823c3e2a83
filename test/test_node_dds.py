"""The fusion node process: lifecycle over DDS, a bad parameter, ``lmm-fusion node --build-only``, two
nodes in namespaces.

Each of these needs a node of its own (unconfigured at start, failing, building only, namespaced), unlike
the outputs and faults of ``test_reliability_dds.py``, which share running nodes. The two short-lived
runs start with the module, so they overlap the lifecycle test. Every wait is a bounded poll; every
subprocess is stopped in teardown.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters

from lmm_fusion.base import topics
from lmm_fusion.ros.outputs import ERROR, OK, WARN
from lmm_fusion.tools.harness import NodeHarness, loopback_env, node_command, run_parallel, wait_until

pytestmark = [pytest.mark.dds, pytest.mark.slow]

RATE_HZ = 10.0
PERIOD = 1.0 / RATE_HZ
START_TIMEOUT = 120.0  # node start-up incl. torch import and model load on a busy 2-core machine
PARAMS = (f"rate_hz:={RATE_HZ}", "backend:=torch", "threads:=1", "use_camera_info:=false")

Runs = dict[str, subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module", autouse=True)
def one_shot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Future[Runs]]:
    """The short-lived runs, started with the module and run in the background: a node with bad
    parameters (must exit naming them) and ``lmm-fusion node --build-only`` (must build and exit)."""
    cwd = tmp_path_factory.mktemp("one_shot")
    cmds = {
        "bad_parameter": node_command("rate_hz:=500.0", "backend:=gpu9000", "threads:=1"),
        "build_only": [sys.executable, "-m", "lmm_fusion.cli", "node", "--build-only", "-p", "backend:=torch",
                       "-p", "threads:=1"],
    }
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(run_parallel, cmds, loopback_env(), cwd, 180.0)


def _change_state(node: Any, service: str, transition_id: int, timeout: float = 30.0) -> bool:
    client = node.create_client(ChangeState, service)
    assert client.wait_for_service(timeout_sec=timeout), f"{service} not available"
    req = ChangeState.Request()
    req.transition.id = transition_id
    fut = client.call_async(req)
    assert wait_until(fut.done, timeout), f"{service}: no answer"
    return bool(fut.result().success)


def _lifecycle(rig: NodeHarness, after: float = -float("inf")) -> list[tuple[str, int]]:
    """(state, level) of each ``fusion_node: lifecycle`` status on /diagnostics stamped after ``after``."""
    out = []
    for d in rig.diagnostics(after):
        st = d["status"].get(f"{topics.NODE_NAME}: lifecycle")
        if st is not None:
            out.append((st["values"]["state"], st["level"]))
    return out


def _set_double(node: Any, name: str, value: float, timeout: float = 10.0) -> bool:
    """Set one double parameter of the node through its SetParameters service; whether it was accepted."""
    client = node.create_client(SetParameters, f"/{topics.NODE_NAME}/set_parameters")
    assert client.wait_for_service(timeout_sec=timeout)
    req = SetParameters.Request(parameters=[Parameter(
        name=name, value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value))])
    fut = client.call_async(req)
    assert wait_until(fut.done, timeout)
    return bool(fut.result().results[0].successful)


def _get_state(node: Any, timeout: float = 10.0) -> str:
    client = node.create_client(GetState, f"/{topics.NODE_NAME}/get_state")
    assert client.wait_for_service(timeout_sec=timeout)
    fut = client.call_async(GetState.Request())
    assert wait_until(fut.done, timeout)
    return str(fut.result().current_state.label)


def test_lifecycle_transitions(tmp_path: Path) -> None:
    rig = NodeHarness(tmp_path, (*PARAMS, "autostart:=false"))
    try:
        node, outputs = rig.outputs.node, rig.outputs
        srv = f"/{topics.NODE_NAME}/change_state"
        assert _get_state(node, START_TIMEOUT) == "unconfigured"
        # /diagnostics reports before configure, at diagnostic_updater's 1 Hz (the default period).
        assert wait_until(lambda: len(_lifecycle(rig)) >= 2, 5.0), rig.log()
        assert set(_lifecycle(rig)) == {("unconfigured", WARN)}
        stamps = [d["stamp"] for d in rig.diagnostics()]
        assert 0.7 <= stamps[1] - stamps[0] <= 1.5, stamps
        # A live parameter, taken in any state: 4 Hz from now on.
        assert _set_double(node, "diagnostics.period", 0.25)
        t_fast = time.time()
        assert wait_until(lambda: len(rig.diagnostics(t_fast)) >= 5, 5.0), rig.diagnostics(t_fast)
        fast = [d["stamp"] for d in rig.diagnostics(t_fast)][1:]
        assert max(b - a for a, b in itertools.pairwise(fast)) < 0.5, fast
        assert outputs.count("scene") == 0
        assert _change_state(node, srv, Transition.TRANSITION_CONFIGURE, timeout=START_TIMEOUT)
        assert _get_state(node) == "inactive"
        # The model is loaded (and warmed up) by configure, not by activate.
        assert "pipeline: torch" in rig.log(20000) and "activated" not in rig.log(20000)
        t_conf = time.time()
        assert wait_until(lambda: ("inactive", WARN) in _lifecycle(rig, t_conf), 5.0), rig.log()
        assert outputs.count("scene") == 0
        t0 = time.monotonic()
        assert _change_state(node, srv, Transition.TRANSITION_ACTIVATE)
        activate_s = time.monotonic() - t0
        assert activate_s < 2.0, f"activation took {activate_s:.2f} s"
        assert _get_state(node) == "active"
        assert wait_until(lambda: outputs.count("scene") >= 3, 10.0)
        assert wait_until(lambda: node.count_subscribers(topics.LIDAR_POINTS) == 1, 5.0)
        assert _change_state(node, srv, Transition.TRANSITION_DEACTIVATE)
        # The transition waits for an in-flight cycle, so every later cycle would carry a later stamp.
        # Judge by stamps, not arrival counts: a loaded machine may deliver earlier scenes late.
        t_off = time.time()
        assert _get_state(node) == "inactive"
        assert wait_until(lambda: node.count_subscribers(topics.LIDAR_POINTS) == 0, 5.0)
        # Still reporting while inactive: the state, not the sensors or the cycle.
        assert wait_until(lambda: ("inactive", WARN) in _lifecycle(rig, t_off), 5.0), rig.log()
        assert all(len(d["status"]) == 1 for d in rig.diagnostics(t_off + 0.1))
        time.sleep(0.3 + 5 * PERIOD)
        late = [r["stamp"] for r in rig.scenes(t_off)]
        assert not late, f"inactive node kept publishing: stamps {late} after {t_off}"
        n = outputs.count("scene")
        assert _change_state(node, srv, Transition.TRANSITION_CLEANUP)
        assert _get_state(node) == "unconfigured"
        assert _change_state(node, srv, Transition.TRANSITION_CONFIGURE, timeout=START_TIMEOUT)
        assert _change_state(node, srv, Transition.TRANSITION_ACTIVATE)
        assert wait_until(lambda: outputs.count("scene") > n + 2, 10.0)
        t_on = time.time()
        assert wait_until(lambda: ("active", OK) in _lifecycle(rig, t_on), 5.0), rig.log()
        active = next(d for d in rig.diagnostics(t_on) if f"{topics.NODE_NAME}: cycle" in d["status"])
        assert {f"{topics.NODE_NAME}: {k}" for k in ("lidar", "cycle", "assessment")} <= set(active["status"])
        assert rig.alive()
    finally:
        rig.close()


def test_bad_parameter_fails_naming_it(one_shot: Future[Runs]) -> None:
    out = one_shot.result()["bad_parameter"]
    assert out.returncode != 0
    assert "rate_hz=500.0" in out.stdout and "backend='gpu9000'" in out.stdout


def test_cli_build_only_builds_and_exits(one_shot: Future[Runs]) -> None:
    out = one_shot.result()["build_only"]
    assert out.returncode == 0, out.stdout[-4000:]
    assert "build-only: engine ready: torch" in out.stdout


_rng = np.random.default_rng(1)
RGB = _rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
POINTS = _rng.uniform([5, -8, -1.5, 0], [40, 8, 1.0, 1], (300, 4)).astype(np.float32)


def test_two_namespaced_nodes_on_one_domain_do_not_cross(tmp_path: Path) -> None:
    """``car1`` and ``car2`` on one domain, each fed on its own ``/carN/sensors/...`` (remapped from
    ``~/input/...``): car1 with every sensor, car2 without LiDAR but with wheel odometry (4 m/s against the
    fixes' 10 m/s). Neither sees the other's data, outputs are under ``/carN/fusion_node``, and their
    statuses on the shared /diagnostics stay apart. car2 takes its ego speed from odometry and says so in
    its SceneAssessment and /diagnostics, and gives the LiDAR's masking reason; car1 uses GNSS."""
    cars: dict[str, NodeHarness] = {}
    try:
        cars["car1"] = NodeHarness(tmp_path / "car1", PARAMS, namespace="car1")
        cars["car2"] = NodeHarness(tmp_path / "car2", PARAMS, namespace="car2", env=cars["car1"].env)
        for name, rig in cars.items():
            assert rig.wait_subscribed(START_TIMEOUT), f"{name} did not subscribe:\n{rig.log()}"
        probe = cars["car1"].outputs.node
        assert probe.count_publishers(f"/car1/{topics.NODE_NAME}/scene_assessment") == 1
        assert probe.count_publishers(f"/{topics.NODE_NAME}/scene_assessment") == 0
        assert probe.count_subscribers(topics.LIDAR_POINTS) == 0  # nobody listens on the root namespace
        cars["car1"].start_sensors(RGB, POINTS)
        cars["car2"].start_sensors(RGB, POINTS, modes={"lidar": "off"}, odometry_speed=4.0)
        fused = {"car1": [True, True, True], "car2": [True, False, True]}

        def used(name: str) -> list[list[bool]]:
            return [[m["used"] for m in r["modalities"]] for r in cars[name].scenes() if r["valid"]]

        for name, expect in fused.items():
            assert wait_until(lambda n=name, e=expect: used(n).count(e) >= 5, 30.0), (name, cars[name].log())
        assert not [u for u in used("car2") if u[1]], "car2 used LiDAR: it received car1's clouds"
        assert [True, True, True] in used("car1")
        speeds = {name: [(r["ego_speed_source"], r["ego_speed"]) for r in cars[name].scenes() if r["valid"]][-3:]
                  for name in cars}
        assert all(src == "odometry" and v == pytest.approx(4.0) for src, v in speeds["car2"]), speeds
        assert all(src == "gnss" and v == pytest.approx(10.0, rel=0.1) for src, v in speeds["car1"]), speeds
        lidar2 = [r["modalities"][1]["reason"] for r in cars["car2"].scenes() if r["valid"]]
        assert lidar2[-1] == "no message yet", lidar2[-3:]
        # Both publish on the one /diagnostics; each status name carries the namespace.
        wanted = {"car1/fusion_node: lifecycle", "car2/fusion_node: lifecycle", "car2/fusion_node: lidar",
                  "car2/fusion_node: ego_speed"}

        def status_names() -> set[str]:
            return set().union(*(d["status"] for d in cars["car1"].diagnostics()))

        # /diagnostics comes at 1 Hz: wait for both nodes' reports rather than for a fixed time.
        assert wait_until(lambda: wanted <= status_names(), 15.0), status_names()
        diags = cars["car1"].diagnostics()
        car2_lidar = [d["status"]["car2/fusion_node: lidar"] for d in diags if "car2/fusion_node: lidar" in d["status"]]
        assert car2_lidar[-1]["level"] == ERROR and car2_lidar[-1]["values"]["rate_hz"] == "0.00"
        assert car2_lidar[-1]["values"]["masked_reason"] == "no message yet"
        ego_name = "car2/fusion_node: ego_speed"
        ego2 = [d["status"][ego_name] for d in diags if ego_name in d["status"]]
        assert ego2[-1]["level"] == OK and ego2[-1]["message"].startswith("odometry"), ego2[-1]
        assert all(r["frame_id"] == "base_link" for r in cars["car2"].scenes())
        assert all(rig.alive() for rig in cars.values())
    finally:
        for rig in reversed(cars.values()):
            rig.close()
