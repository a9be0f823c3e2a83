"""Ego speed under the synthetic receiver's noise (RTK fixes with episodes of 20x noise and a
covariance that says so): degraded fixes must not bend the estimate, a standing car must read ~0,
and ``speed_std`` must be the error's actual 1-sigma on real driving."""

from __future__ import annotations

import math

import numpy as np

from lmm_fusion.base.rig import SensorRig
from lmm_fusion.io import EgoMotionEstimator, MessageError
from lmm_fusion.io.gnss import STATUS_FIX
from lmm_fusion.io.motion_filter import ManoeuvreFilter
from lmm_fusion.synth.gnss import GnssSimulator
from lmm_fusion.synth.world import World


def _drive(seed: int, seconds: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """(error [m/s], stated speed std [m/s]) of every valid estimate after 3 s on a synthetic drive."""
    world_ss, gnss_ss = np.random.SeedSequence(seed).spawn(2)
    world = World(np.random.default_rng(world_ss), None, t0=0.0)
    sim = GnssSimulator(SensorRig(), np.random.default_rng(gnss_ss))
    est = EgoMotionEstimator()
    err, std = [], []
    for k in range(int(seconds * 10)):
        t = 0.037 + 0.1 * k
        world.advance(t)
        try:
            s = est.update(sim.fix(t, (world.map_x, world.map_y, world.map_yaw)))
        except MessageError:
            continue
        if s.valid and t > 3.0:
            err.append(s.speed - world.v)
            std.append(s.speed_std)
    return np.array(err), np.array(std)


def test_speed_error_percentiles_on_synthetic_drives() -> None:
    err, std = zip(*(_drive(seed) for seed in (11, 12, 13)), strict=True)
    e, s = np.concatenate(err), np.concatenate(std)
    a = np.abs(e)
    # Median / p90 [m/s]: the 1.5 s window fit 0.52 / 2.46 here, the filter 0.22 / 1.51.
    assert np.median(a) < 0.35 and np.percentile(a, 90) < 1.9, (np.median(a), np.percentile(a, 90))
    # Calibrated: about 68 % within 1 sigma, 95 % within 2 (the filter 71 % / 91 %; the fit's std
    # covered 47 % / 73 % on such drives).
    z = np.abs(e) / s
    assert 0.6 < float(np.mean(z <= 1.0)) < 0.85 and float(np.mean(z <= 2.0)) > 0.88


def test_standing_car_reads_zero_through_degraded_episodes() -> None:
    sim = GnssSimulator(SensorRig(), np.random.default_rng(5))
    est = EgoMotionEstimator()
    speeds, statuses = [], []
    for k in range(400):  # 40 s standing, ~1/3 of it with 1 m noise
        s = est.update(sim.fix(0.1 * k, (3.0, -2.0, 0.7)))
        if s.valid and k >= 30:
            speeds.append(s.speed)
            statuses.append(s.status)
    assert sum(st != 2 for st in statuses) > 40  # the drive did have degraded fixes
    v = np.array(speeds)
    # The window fit read 1.3 m/s at the median and 3.5 m/s at p90 for this standing car; the filter 0 / 0.
    assert np.median(v) < 0.05 and np.percentile(v, 90) < 0.5, (np.median(v), np.percentile(v, 90))


def test_degraded_fixes_do_not_bend_a_constant_speed() -> None:
    """12 m/s east with 5 cm fixes, then 3 s of fixes with 1 m noise (stated): the estimate holds."""
    rng = np.random.default_rng(3)
    sim = GnssSimulator(SensorRig(), rng)
    sim.model = type(sim.model)(degraded_probability=0.0)
    est = EgoMotionEstimator()
    errs = []
    for k in range(100):
        t = 0.1 * k
        if k == 50:
            sim.degraded_until = t + 3.0  # a degraded episode from 5 s to 8 s
        s = est.update(sim.fix(t, (12.0 * t, 0.0, 0.0)))
        if 50 <= k < 80:
            assert s.status == STATUS_FIX
            errs.append(abs(s.speed - 12.0))
    # The window fit: 1.4 m/s at the median, 6.1 m/s at worst; the filter 0.8 / 2.1 (it must still follow
    # real manoeuvres, so it cannot hold a constant speed exactly through 3 s of 1 m noise).
    assert np.median(errs) < 1.1 and max(errs) < 3.0, (np.median(errs), max(errs))
    assert est.state is not None and math.isfinite(est.state.speed_std)


def test_filter_frame_move_turns_vectors_and_keeps_the_model_spread() -> None:
    f = ManoeuvreFilter(np.zeros(2), np.eye(2) * 0.0025, 0.0, (0.01, 30.0), 0.3, 30.0, 5.0)
    for k in range(1, 30):
        t = 0.1 * k
        f.update(t, np.array([10.0 * t + 0.5 * t * t, 0.0]), np.eye(2) * 0.0025)
    x, p = f.x.copy(), f.p.copy()
    f.move_frame(np.array([100.0, -50.0]), math.pi / 2)  # vectors turn 90 deg counter-clockwise
    assert np.allclose(f.x[:2], [100.0, -50.0]) and np.allclose(f.x[2:4], [-x[3], x[2]], atol=1e-9)
    assert np.allclose(f.x[4:6], [-x[5], x[4]], atol=1e-9)
    assert np.isclose(np.trace(f.p), np.trace(p))  # a rotation keeps the uncertainty
    assert abs(float(np.hypot(*x[2:4])) - 12.9) < 0.05 and abs(x[4] - 1.0) < 0.1
