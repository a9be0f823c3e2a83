"""CycleWorker: the node's cycle thread is latest-only and stops cleanly (no rclpy needed)."""

from __future__ import annotations

import threading
import time

from lmm_fusion.ros.worker import CycleWorker


def test_requests_during_a_running_cycle_are_dropped_not_queued() -> None:
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_cycle() -> None:
        calls.append(time.monotonic())
        started.set()
        release.wait(5.0)

    w = CycleWorker(slow_cycle)
    w.request()
    assert started.wait(5.0)
    for _ in range(5):  # ticks while the cycle runs
        w.request()
    release.set()
    deadline = time.monotonic() + 5.0
    while w.runs < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    w.stop()
    assert len(calls) == 1 and w.skipped == 5


def test_errors_are_reported_and_the_worker_keeps_running() -> None:
    errors: list[Exception] = []
    done = threading.Event()
    n = {"calls": 0}

    def cycle() -> None:
        n["calls"] += 1
        if n["calls"] == 1:
            raise RuntimeError("bad cycle")
        done.set()

    w = CycleWorker(cycle, on_error=errors.append)
    w.request()
    deadline = time.monotonic() + 5.0
    while w.runs < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    w.request()
    assert done.wait(5.0)
    w.stop()
    assert [str(e) for e in errors] == ["bad cycle"] and n["calls"] == 2


def test_stop_waits_for_the_cycle_in_flight() -> None:
    started, finished = threading.Event(), threading.Event()

    def cycle() -> None:
        started.set()
        time.sleep(0.2)
        finished.set()

    w = CycleWorker(cycle)
    w.request()
    assert started.wait(5.0)
    w.stop()
    assert finished.is_set()
