"""The fusion node process: lifecycle over DDS, a bad parameter, ``lmm-fusion node --build-only``.

Each of these needs a node of its own (unconfigured at start, failing, building only), unlike the
outputs and faults of ``test_reliability_dds.py``, which share running nodes. The two short-lived runs
start with the module, so they overlap the lifecycle test. Every wait is a bounded poll; every
subprocess is stopped in teardown.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState

from lmm_fusion.base import topics
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
        assert outputs.count("scene") == 0
        assert _change_state(node, srv, Transition.TRANSITION_CONFIGURE)
        assert _get_state(node) == "inactive"
        assert _change_state(node, srv, Transition.TRANSITION_ACTIVATE, timeout=START_TIMEOUT)
        assert _get_state(node) == "active"
        assert wait_until(lambda: outputs.count("scene") >= 3, 10.0)
        assert wait_until(lambda: node.count_subscribers(topics.LIDAR_POINTS) == 1, 5.0)
        assert _change_state(node, srv, Transition.TRANSITION_DEACTIVATE)
        # The transition waits for an in-flight cycle, so every later cycle would carry a later stamp.
        # Judge by stamps, not arrival counts: a loaded machine may deliver earlier scenes late.
        t_off = time.time()
        assert _get_state(node) == "inactive"
        assert wait_until(lambda: node.count_subscribers(topics.LIDAR_POINTS) == 0, 5.0)
        time.sleep(0.3 + 5 * PERIOD)
        late = [r["stamp"] for r in rig.scenes(t_off)]
        assert not late, f"inactive node kept publishing: stamps {late} after {t_off}"
        n = outputs.count("scene")
        assert _change_state(node, srv, Transition.TRANSITION_CLEANUP)
        assert _get_state(node) == "unconfigured"
        assert _change_state(node, srv, Transition.TRANSITION_CONFIGURE)
        assert _change_state(node, srv, Transition.TRANSITION_ACTIVATE, timeout=START_TIMEOUT)
        assert wait_until(lambda: outputs.count("scene") > n + 2, 10.0)
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
