"""read_fix / create_fix and the ego-motion filter on synthetic trajectories."""

from __future__ import annotations

import math
from types import SimpleNamespace as NS
from typing import Any

import numpy as np
import pymap3d
import pytest

from lmm_fusion.io import (
    EgoMotionEstimator,
    GnssFix,
    MessageError,
    create_fix,
    make_header,
    read_fix,
    rosbags_types,
)

LAT0, LON0, ALT0 = 48.137, 11.575, 520.0


def fix_msg(lat: float = LAT0, lon: float = LON0, alt: float = ALT0, t: float = 10.0, status: int = 0,
            cov: Any = None, cov_type: int = 2) -> NS:
    sec = math.floor(t)
    return NS(
        header=NS(stamp=NS(sec=sec, nanosec=round((t - sec) * 1e9)), frame_id="gnss"),
        status=NS(status=status, service=1),
        latitude=lat, longitude=lon, altitude=alt,
        position_covariance=[0.04, 0, 0, 0, 0.04, 0, 0, 0, 0.09] if cov is None else cov,
        position_covariance_type=cov_type,
    )


def test_read_fix_fields() -> None:
    f = read_fix(fix_msg(t=12.25, status=2))
    assert (f.stamp, f.lat, f.lon, f.alt, f.status, f.covariance_type) == (12.25, LAT0, LON0, ALT0, 2, 2)
    assert f.covariance.shape == (9,) and math.isclose(f.horizontal_std, 0.2)
    assert math.isnan(read_fix(fix_msg(cov_type=0)).horizontal_std)


def test_create_fix_round_trip() -> None:
    types = rosbags_types()
    msg = create_fix(types, make_header(types, 5.5, "gnss"), LAT0, LON0, ALT0, 0, 0.05)
    f = read_fix(msg)
    assert (f.lat, f.lon, f.alt, f.stamp, f.covariance_type) == (LAT0, LON0, ALT0, 5.5, 2)
    np.testing.assert_allclose(f.covariance, np.diag([0.0025] * 3).reshape(-1))
    assert read_fix(create_fix(types, make_header(types, 0, "gnss"), 1, 2, 3)).covariance_type == 0


MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("no fix", {"status": -1}, "NO_FIX"),
    ("status absurd", {"status": 7}, "status"),
    ("nan latitude", {"lat": float("nan")}, "latitude"),
    ("inf longitude", {"lon": float("inf")}, "longitude"),
    ("nan altitude", {"alt": float("nan")}, "altitude"),
    ("latitude out of range", {"lat": 91.0}, "latitude"),
    ("longitude out of range", {"lon": -181.0}, "longitude"),
    ("altitude absurd", {"alt": 1e9}, "altitude"),
    ("latitude not a number", {"lat": "48"}, "latitude"),
    ("covariance short", {"cov": [0.0] * 8}, "covariance"),
    ("covariance nan", {"cov": [float("nan")] * 9}, "covariance"),
    ("covariance type absurd", {"cov_type": 9}, "covariance_type"),
]


@pytest.mark.parametrize(("case", "kw", "needle"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_fix(case: str, kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(MessageError, match=needle):
        read_fix(fix_msg(**kw))


def test_bad_stamp_and_missing_fields() -> None:
    m = fix_msg()
    m.header.stamp.nanosec = 2_000_000_000
    with pytest.raises(MessageError, match="nanosec"):
        read_fix(m)
    m = fix_msg()
    del m.status
    with pytest.raises(MessageError, match="status"):
        read_fix(m)


def drive(est: EgoMotionEstimator, e_n: Any, times: np.ndarray, noise: float, seed: int = 0) -> list[Any]:
    """Feed fixes along ENU positions ``e_n(t) -> (e, n)`` with Gaussian horizontal noise [m]."""
    rng = np.random.default_rng(seed)
    states = []
    for t in times:
        e, n = e_n(t)
        e += rng.normal(0, noise)
        n += rng.normal(0, noise)
        lat, lon, alt = pymap3d.enu2geodetic(e, n, 0.0, LAT0, LON0, ALT0)
        states.append(est.update(read_fix(fix_msg(float(lat), float(lon), float(alt), t=float(t)))))
    return states


def test_constant_velocity_with_5cm_noise_gives_usable_speed_and_heading() -> None:
    speed, heading = 12.0, math.radians(30)
    times = np.arange(0, 20, 0.1)
    states = drive(EgoMotionEstimator(LAT0, LON0, ALT0),
                   lambda t: (speed * t * math.cos(heading), speed * t * math.sin(heading)), times, 0.05)
    assert not states[0].valid and states[-1].valid
    settled = states[20:]
    err = np.array([s.speed for s in settled]) - speed
    assert np.sqrt(np.mean(err**2)) < 0.3
    assert abs(np.median([s.accel for s in settled])) < 0.3
    assert np.std([s.accel for s in settled]) < 1.5
    assert max(abs(s.heading - heading) for s in settled) < math.radians(3)
    assert abs(np.median([s.yaw_rate for s in settled])) < 0.02
    last = states[-1]
    assert math.isclose(last.east, speed * times[-1] * math.cos(heading), abs_tol=0.3)


def test_braking_is_followed() -> None:
    # 20 m/s braking at 3 m/s^2 towards north.
    v0, a = 20.0, -3.0
    times = np.arange(0, 5, 0.1)
    states = drive(EgoMotionEstimator(LAT0, LON0, ALT0), lambda t: (0.0, v0 * t + 0.5 * a * t * t), times, 0.02)
    s = states[-1]
    assert math.isclose(s.speed, v0 + a * times[-1], abs_tol=0.3)
    assert math.isclose(s.accel, a, abs_tol=0.8)
    assert math.isclose(s.heading, math.pi / 2, abs_tol=0.05)


def test_turning_gives_yaw_rate() -> None:
    radius, speed = 50.0, 10.0
    omega = speed / radius
    times = np.arange(0, 6, 0.1)
    states = drive(EgoMotionEstimator(LAT0, LON0, ALT0),
                   lambda t: (radius * math.sin(omega * t), radius * (1 - math.cos(omega * t))), times, 0.01)
    assert math.isclose(states[-1].yaw_rate, omega, rel_tol=0.15)


def test_time_backwards_resets_and_repeated_stamp_is_idempotent() -> None:
    est = EgoMotionEstimator(LAT0, LON0, ALT0)
    states = drive(est, lambda t: (5.0 * t, 0.0), np.arange(0, 2, 0.1), 0.0)
    assert states[-1].valid and est.resets == 0
    again = est.update(read_fix(fix_msg(t=1.9, lat=states[-1].east)))  # same stamp: unchanged
    assert again is states[-1]
    back = est.update(read_fix(fix_msg(t=0.5)))
    assert est.resets == 1 and not back.valid and back.speed == 0.0


def test_origin_defaults_to_first_fix() -> None:
    est = EgoMotionEstimator()
    s = est.update(read_fix(fix_msg(lat=10.0, lon=20.0, alt=5.0)))
    assert (s.east, s.north, s.up) == (0.0, 0.0, 0.0)


def test_update_refuses_unusable_hand_built_fixes() -> None:
    est = EgoMotionEstimator(LAT0, LON0, ALT0)
    good = read_fix(fix_msg())
    with pytest.raises(MessageError, match="NO_FIX"):
        est.update(GnssFix(good.stamp, good.lat, good.lon, good.alt, -1, good.covariance, 2))
    with pytest.raises(MessageError, match="non-finite"):
        est.update(GnssFix(good.stamp, float("nan"), good.lon, good.alt, 0, good.covariance, 2))
