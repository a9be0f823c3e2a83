"""A planar motion filter for position fixes: constant acceleration, cruising or manoeuvring.

:class:`ManoeuvreFilter` is an interacting-multiple-model (IMM) Kalman filter of two constant-
acceleration models of the state ``[e, n, ve, vn, ae, an]`` (ENU position [m], velocity [m/s],
acceleration [m/s^2]) that differ only in the power spectral density of their white jerk [m^2/s^5]:
a small one while the vehicle cruises (long memory: the noise of many fixes averages out) and a large
one while it manoeuvres (short memory: it follows a step of acceleration, braking to a standstill).
The fixes' own innovations decide, fix by fix, which model explains them (Blom & Bar-Shalom's IMM:
mix, predict, update, weigh by likelihood), so no single tuning has to trade the two.

Each fix is weighted by its stated position covariance: a fix with a 1 m covariance among 5 cm RTK
fixes barely moves the state. Everything is in one local frame; :meth:`ManoeuvreFilter.move_frame`
carries the state into another (a re-anchored ENU frame, turned by the convergence angle).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def transition(dt: float) -> tuple[np.ndarray, np.ndarray]:
    """Constant-acceleration transition over ``dt`` [s] for ``[e, n, ve, vn, ae, an]``: the (6, 6)
    matrix and the (6, 6) process noise of a white jerk of unit power spectral density."""
    f = np.kron(np.array([[1.0, dt, 0.5 * dt * dt], [0.0, 1.0, dt], [0.0, 0.0, 1.0]]), np.eye(2))
    q = np.array([[dt ** 5 / 20, dt ** 4 / 8, dt ** 3 / 6], [dt ** 4 / 8, dt ** 3 / 3, dt ** 2 / 2],
                  [dt ** 3 / 6, dt ** 2 / 2, dt]])
    return f, np.kron(q, np.eye(2))


class ManoeuvreFilter:
    """IMM of constant-acceleration models, started at a fix.

    ``position`` (2,) [m] with covariance ``r`` (2, 2) [m^2] at ``stamp`` [s]; velocity and
    acceleration start at 0 with std ``speed_std`` [m/s] and ``accel_std`` [m/s^2]. ``jerk_psd``: one
    white-jerk power spectral density per model [m^2/s^5], smallest first; ``switch_rate`` [1/s]: how
    often the vehicle is expected to change between them (the models' Markov switching rate).
    """

    def __init__(self, position: np.ndarray, r: np.ndarray, stamp: float, jerk_psd: Sequence[float],
                 switch_rate: float, speed_std: float, accel_std: float) -> None:
        self.jerk_psd = np.asarray(jerk_psd, dtype=np.float64)
        self.switch_rate = float(switch_rate)
        m = len(self.jerk_psd)
        p0 = np.zeros((6, 6))
        p0[:2, :2] = r
        p0[2:4, 2:4] = np.eye(2) * speed_std ** 2
        p0[4:6, 4:6] = np.eye(2) * accel_std ** 2
        x0 = np.array([position[0], position[1], 0.0, 0.0, 0.0, 0.0])
        self.xs = np.repeat(x0[None], m, axis=0)  # (M, 6)
        self.ps = np.repeat(p0[None], m, axis=0)  # (M, 6, 6)
        self.mu = np.full(m, 1.0 / m)  # model probabilities
        self.stamp = float(stamp)

    # ------------------------------------------------------------------ combined estimate
    @property
    def x(self) -> np.ndarray:
        """Combined state (6,)."""
        return self.mu @ self.xs

    @property
    def p(self) -> np.ndarray:
        """Combined covariance (6, 6): the models' covariances and their spread."""
        x = self.x
        d = self.xs - x
        return np.einsum("m,mij->ij", self.mu, self.ps) + np.einsum("m,mi,mj->ij", self.mu, d, d)

    def predicted(self, stamp: float) -> tuple[np.ndarray, np.ndarray]:
        """Combined state and covariance carried to ``stamp`` [s] without process noise (the caller's
        gate adds its own manoeuvre allowance)."""
        f, _ = transition(stamp - self.stamp)
        return f @ self.x, f @ self.p @ f.T

    # ------------------------------------------------------------------ update
    def update(self, stamp: float, position: np.ndarray, r: np.ndarray) -> None:
        """One IMM step with the fix ``position`` (2,) [m] of covariance ``r`` (2, 2) [m^2] at ``stamp`` [s]
        (> the last stamp)."""
        dt = stamp - self.stamp
        m = len(self.mu)
        stay = math.exp(-self.switch_rate * dt)
        pi = np.full((m, m), (1.0 - stay) / max(m - 1, 1))
        np.fill_diagonal(pi, stay)
        c = self.mu @ pi  # predicted model probabilities (M,)
        w = pi * self.mu[:, None] / np.maximum(c[None, :], 1e-300)  # w[i, j] = P(model i before | j now)
        f, q = transition(dt)
        like = np.zeros(m)
        xs, ps = np.empty_like(self.xs), np.empty_like(self.ps)
        for j in range(m):
            x0 = w[:, j] @ self.xs
            d = self.xs - x0
            p0 = np.einsum("i,iab->ab", w[:, j], self.ps) + np.einsum("i,ia,ib->ab", w[:, j], d, d)
            x = f @ x0
            p = f @ p0 @ f.T + self.jerk_psd[j] * q
            s = p[:2, :2] + r
            s_inv = np.linalg.inv(s)
            y = position - x[:2]
            gain = p[:, :2] @ s_inv
            ikh = np.eye(6)
            ikh[:, :2] -= gain
            p = ikh @ p @ ikh.T + gain @ r @ gain.T  # Joseph form: stays symmetric and positive
            xs[j], ps[j] = x + gain @ y, 0.5 * (p + p.T)
            # Log-likelihood relative to the best model, so a far-off fix does not underflow to 0 / 0.
            like[j] = -0.5 * float(y @ s_inv @ y) - 0.5 * math.log(max(float(np.linalg.det(s)), 1e-300))
        like = np.exp(like - like.max()) * c
        self.mu = like / like.sum()
        self.xs, self.ps, self.stamp = xs, ps, float(stamp)

    def move_frame(self, position: np.ndarray, turn: float) -> None:
        """Express the state in another frame: the combined position becomes ``position`` (2,) [m] (each
        model keeps its offset from it) and vectors turn by ``turn`` [rad, counter-clockwise]."""
        c, s = math.cos(turn), math.sin(turn)
        rot = np.kron(np.eye(3), np.array([[c, -s], [s, c]]))
        centre = self.x[:2]
        xs = self.xs.copy()
        xs[:, :2] -= centre
        self.xs = xs @ rot.T
        self.xs[:, :2] += position
        self.ps = np.einsum("ab,mbc,dc->mad", rot, self.ps, rot)
