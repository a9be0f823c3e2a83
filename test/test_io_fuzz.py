"""Property-based fuzz: the readers either return a well-formed array or raise MessageError, nothing else.

Quick profile by default (200 examples per test); ``LMM_FUZZ_LONG=1`` selects the long profile
(10,000 examples per test).
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace as NS
from typing import Any

import cv2
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmm_fusion.io import MessageError, read_fix, read_image, read_points
from lmm_fusion.io.image import ENCODINGS

settings.register_profile(
    "io-quick", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "io-long", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile("io-long" if os.environ.get("LMM_FUZZ_LONG") == "1" else "io-quick")

NAMES = ("x", "y", "z", "intensity", "ring", "t")
sizes = st.one_of(st.integers(-3, 40), st.sampled_from([2**16, 2**31 - 1, 2**32, 2**62, -(2**31)]))
weird = st.one_of(st.none(), st.floats(allow_nan=True), st.text(max_size=3), st.booleans())


@st.composite
def point_fields(draw: st.DrawFn) -> list[Any]:
    n = draw(st.integers(0, 7))
    out = []
    for _ in range(n):
        out.append(NS(
            name=draw(st.one_of(st.sampled_from(NAMES), weird)),
            offset=draw(st.one_of(st.integers(-4, 64), weird)),
            datatype=draw(st.one_of(st.integers(-1, 10), weird)),
            count=draw(st.one_of(st.integers(0, 3), st.just(1), st.just(1), weird)),
        ))
    if draw(st.booleans()):
        out.append(1)  # not a PointField at all
    return out


@st.composite
def clouds(draw: st.DrawFn) -> NS:
    height = draw(st.one_of(st.integers(0, 4), sizes))
    width = draw(st.one_of(st.integers(0, 20), sizes))
    point_step = draw(st.one_of(st.integers(0, 64), sizes))
    row_step = draw(st.one_of(st.just(max(width, 0) * max(point_step, 0)), st.integers(0, 600), sizes))
    n_bytes = draw(st.one_of(
        st.just(max(row_step, 0) * max(height, 0)) if 0 <= row_step * height < 100_000 else st.just(0),
        st.integers(0, 2000),
    ))
    data = draw(st.one_of(st.binary(min_size=n_bytes, max_size=n_bytes), st.binary(max_size=64),
                          st.lists(st.integers(-5, 300), max_size=40), weird))
    return NS(height=height, width=width, fields=draw(point_fields()), is_bigendian=draw(st.one_of(st.booleans(),
              weird)), point_step=point_step, row_step=row_step, data=data, is_dense=draw(st.booleans()))


@settings(PROFILE)
@given(msg=clouds(), fields=st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
def test_read_points_fuzz(msg: NS, fields: list[str]) -> None:
    try:
        pts = read_points(msg, fields)
    except MessageError:
        return
    assert pts.dtype == np.float32 and pts.ndim == 2 and pts.shape[1] == len(fields)
    assert pts.shape[0] <= max(msg.width * msg.height, 0)
    if msg.is_dense is True:  # trusted on a zero-copy view: every point as it is, else the filtered ones
        ref = read_points(NS(**{**vars(msg), "is_dense": False}), fields)
        assert np.isfinite(ref).all()
        assert np.array_equal(pts, ref) or pts.shape[0] == msg.width * msg.height
    else:
        assert np.isfinite(pts).all()  # non-finite x/y/z rows dropped, other non-finite values zeroed


@st.composite
def raw_images(draw: st.DrawFn) -> NS:
    encoding = draw(st.one_of(st.sampled_from(ENCODINGS), st.text(max_size=8), weird))
    height = draw(st.one_of(st.integers(0, 6), sizes))
    width = draw(st.one_of(st.integers(0, 8), sizes))
    step = draw(st.one_of(st.integers(0, 70), sizes))
    n = max(step, 0) * max(height, 0)
    data = draw(st.one_of(st.binary(min_size=n, max_size=n) if n < 100_000 else st.just(b""),
                          st.binary(max_size=200), weird))
    return NS(height=height, width=width, encoding=encoding, is_bigendian=draw(st.booleans()), step=step, data=data)


def _encoded(kind: str, h: int, w: int, seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ok, enc = cv2.imencode(kind, img)
    assert ok
    return enc.tobytes()


SEEDS = [_encoded(".jpg", 8, 12, 0), _encoded(".png", 5, 7, 1), _encoded(".jpg", 16, 16, 2)]


@st.composite
def compressed_images(draw: st.DrawFn) -> NS:
    base = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert"]))
        if op == "flip" and base:
            base[draw(st.integers(0, len(base) - 1))] = draw(st.integers(0, 255))
        elif op == "truncate":
            base = base[: draw(st.integers(0, len(base)))]
        else:
            i = draw(st.integers(0, len(base)))
            base[i:i] = draw(st.binary(max_size=8))
    data: Any = bytes(base) if draw(st.integers(0, 9)) else draw(st.one_of(st.binary(max_size=40), weird))
    return NS(format=draw(st.sampled_from(["jpeg", "png", "", "rgb8; jpeg compressed bgr8"])), data=data)


@settings(PROFILE)
@given(msg=st.one_of(raw_images(), compressed_images()))
def test_read_image_fuzz(msg: NS) -> None:
    try:
        img = read_image(msg)
    except MessageError:
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert 0 < img.shape[0] <= 8192 and 0 < img.shape[1] <= 8192


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), weird)


@st.composite
def fixes(draw: st.DrawFn) -> NS:
    return NS(
        header=NS(stamp=NS(sec=draw(st.one_of(st.integers(-(2**40), 2**40), weird)),
                           nanosec=draw(st.one_of(st.integers(-5, 2 * 10**9), weird))), frame_id="gnss"),
        status=NS(status=draw(st.one_of(st.integers(-4, 4), weird)), service=1),
        latitude=draw(st.one_of(st.floats(-100, 100), numbers)),
        longitude=draw(st.one_of(st.floats(-200, 200), numbers)),
        altitude=draw(st.one_of(st.floats(-1e3, 1e4), numbers)),
        position_covariance=draw(st.one_of(st.lists(st.floats(allow_nan=True), min_size=9, max_size=9),
                                           st.lists(numbers, max_size=12), weird)),
        position_covariance_type=draw(st.one_of(st.integers(-2, 5), weird)),
    )


@settings(PROFILE)
@given(msg=fixes())
def test_read_fix_fuzz(msg: NS) -> None:
    try:
        fix = read_fix(msg)
    except MessageError:
        return
    assert math.isfinite(fix.lat) and math.isfinite(fix.lon) and math.isfinite(fix.alt)
    assert fix.status != -1 and fix.covariance.shape == (9,) and np.isfinite(fix.covariance).all()
