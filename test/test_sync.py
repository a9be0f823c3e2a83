"""SensorSync: latest-value buffers, staleness mask, loop resets, rejections, thread safety."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from lmm_fusion.cycle.sync import SensorSync, SyncConfig


def make() -> SensorSync:
    return SensorSync(SyncConfig(timeouts={"camera": 0.2, "lidar": 0.3, "gnss": 1.0}, loop_reset=2.0,
                                 future_tolerance=0.1))


def test_latest_frame_ages_and_mask() -> None:
    s = make()
    assert s.update("camera", 10.0, "c0") and s.update("camera", 10.1, "c1")
    assert s.update("lidar", 10.05, "l0")
    snap = s.snapshot(10.15)
    assert snap.frames == {"camera": "c1", "lidar": "l0", "gnss": None}
    assert math.isclose(snap.ages["camera"], 0.05) and math.isclose(snap.ages["lidar"], 0.1)
    assert snap.ages["gnss"] == math.inf and snap.stamps["gnss"] is None
    assert snap.mask.tolist() == [True, True, False] and snap.mask.dtype == np.bool_


def test_one_late_sensor_is_masked_not_waited_for() -> None:
    s = make()
    s.update("camera", 10.0, "c")
    s.update("lidar", 10.0, "l")
    s.update("gnss", 10.0, "g")
    snap = s.snapshot(10.25)  # camera timeout 0.2 s passed; lidar 0.3 s and gnss 1 s not
    assert snap.mask.tolist() == [False, True, True]
    assert snap.frames["camera"] is None and snap.frames["lidar"] == "l"
    assert math.isclose(snap.ages["camera"], 0.25)  # the age is still reported


def test_out_of_order_and_duplicate_dropped_and_counted() -> None:
    s = make()
    assert s.update("lidar", 5.0, "a")
    assert not s.update("lidar", 4.9, "old")
    assert not s.update("lidar", 5.0, "dup")
    assert s.snapshot(5.0).frames["lidar"] == "a"
    c = s.counters()["lidar"]
    assert (c.received, c.accepted, c.rejected["out_of_order"], c.rejected_total) == (3, 1, 2, 2)


def test_bag_loop_resets_all_buffers() -> None:
    s = make()
    s.update("camera", 100.0, "c")
    s.update("lidar", 100.0, "l")
    s.snapshot(100.0)
    assert s.update("lidar", 1.0, "l-new")  # jump back 99 s > loop_reset
    assert s.resets == 1
    snap = s.snapshot(1.05)
    assert snap.frames["camera"] is None and snap.frames["lidar"] == "l-new"
    assert s.diagnostics()["resets"] == "1"


def test_clock_jumping_back_in_snapshot_resets() -> None:
    s = make()
    s.update("camera", 50.0, "c")
    s.snapshot(50.0)
    snap = s.snapshot(3.0)
    assert s.resets == 1 and snap.frames["camera"] is None and not snap.mask.any()


def test_future_stamps_rejected_against_now_or_last_snapshot() -> None:
    s = make()
    assert s.update("gnss", 1e9, "far future")  # no reference time yet: accepted
    s.reset()
    assert not s.update("gnss", 10.5, "g", now=10.0)
    assert s.update("gnss", 10.05, "g", now=10.0)  # within tolerance
    s.snapshot(20.0)
    assert not s.update("camera", 20.2, "c")  # reference = latest snapshot time
    assert s.update("camera", 20.1, "c")
    counters = s.counters()
    assert counters["gnss"].rejected["future"] == 1 and counters["camera"].rejected["future"] == 1
    assert s.diagnostics()["camera.rejected.future"] == "1"


def test_future_frame_masked_in_snapshot() -> None:
    s = make()
    s.update("lidar", 10.5, "l")
    snap = s.snapshot(10.0)
    assert not snap.mask[1] and snap.frames["lidar"] is None


def test_unknown_sensor_and_invalid_stamp() -> None:
    s = make()
    assert not s.update("radar", 1.0, "r")
    assert not s.update("camera", float("nan"), "c")
    assert not s.update("camera", "soon", "c")  # type: ignore[arg-type]
    c = s.counters()
    assert c["unknown"].rejected["unknown_sensor"] == 1 and c["camera"].rejected["invalid_stamp"] == 2


@pytest.mark.parametrize("bad", [{"timeouts": {"camera": 0.1}}, {"loop_reset": -1.0},
                                 {"timeouts": {"camera": 0.1, "lidar": float("nan"), "gnss": 1.0}}])
def test_config_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        SyncConfig(**bad)


def test_concurrent_updates_keep_counts_and_latest() -> None:
    # Snapshot times from several threads are not monotonic: disable loop resets and future checks.
    s = SensorSync(SyncConfig(loop_reset=1e6, future_tolerance=1e6))
    n = 2000

    def feed(sensor: str) -> None:
        for i in range(n):
            s.update(sensor, i * 1e-3, i)
            if i % 100 == 0:
                s.snapshot(i * 1e-3)

    threads = [threading.Thread(target=feed, args=(name,)) for name in ("camera", "lidar", "gnss")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    counters = s.counters()
    for name in ("camera", "lidar", "gnss"):
        assert counters[name].received == n
        assert counters[name].accepted == n and counters[name].rejected_total == 0
    snap = s.snapshot((n - 1) * 1e-3)
    assert snap.mask.all() and snap.frames["camera"] == n - 1


def test_frame_id_travels_with_the_frame() -> None:
    s = SensorSync()
    s.update("lidar", 1.0, "points", frame_id="os_lidar")
    s.update("camera", 1.0, "image")  # given without one
    snap = s.snapshot(1.1)
    assert snap.frame_ids == {"camera": None, "lidar": "os_lidar", "gnss": None}
    s.update("lidar", 1.05, "newer", frame_id="base_link")
    assert s.snapshot(1.1).frame_ids["lidar"] == "base_link"
