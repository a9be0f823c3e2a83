"""read_image / create_image / create_compressed_image against pixels computed in the test."""

from __future__ import annotations

from types import SimpleNamespace as NS
from typing import Any

import cv2
import numpy as np
import pytest

from lmm_fusion.io import (
    MessageError,
    create_compressed_image,
    create_image,
    make_header,
    read_image,
    rosbags_types,
)
from lmm_fusion.io.image import MAX_SIDE

H, W = 4, 6
RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)


def raw(encoding: str, pixels: np.ndarray, pad: int = 0, big: bool = False, **over: Any) -> NS:
    """An Image-like message from an (H, W, C) or (H, W) array, rows padded with ``pad`` junk bytes."""
    px = pixels if pixels.ndim == 3 else pixels[:, :, None]
    dtype = px.dtype.newbyteorder(">" if big else "<") if px.dtype.itemsize > 1 else px.dtype
    rows = [px[r].astype(dtype).tobytes() + b"\x5a" * pad for r in range(px.shape[0])]
    msg = NS(height=px.shape[0], width=px.shape[1], encoding=encoding, is_bigendian=big,
             step=len(rows[0]), data=b"".join(rows))
    for k, v in over.items():
        setattr(msg, k, v)
    return msg


def gray3(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[:, :, None], 3, axis=2)


def uyvy_to_rgb601(y: int, u: int, v: int) -> list[int]:
    """BT.601 limited-range YUV -> RGB, written out independently of OpenCV."""
    c, d, e = y - 16, u - 128, v - 128
    vals = (1.164 * c + 1.596 * e, 1.164 * c - 0.392 * d - 0.813 * e, 1.164 * c + 2.017 * d)
    return [int(np.clip(round(x), 0, 255)) for x in vals]


GRAY8 = RNG.integers(0, 256, (H, W), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
RGBA = np.concatenate([RGB, RNG.integers(0, 256, (H, W, 1), dtype=np.uint8)], axis=2)
RGB16 = RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)

ENCODING_CASES: list[tuple[str, np.ndarray, np.ndarray]] = [
    ("rgb8", RGB, RGB),
    ("bgr8", RGB[:, :, ::-1], RGB),
    ("8UC3", RGB[:, :, ::-1], RGB),
    ("rgba8", RGBA, RGB),
    ("bgra8", RGBA[:, :, [2, 1, 0, 3]], RGB),
    ("8UC4", RGBA[:, :, [2, 1, 0, 3]], RGB),
    ("mono8", GRAY8, gray3(GRAY8)),
    ("8UC1", GRAY8, gray3(GRAY8)),
    ("mono16", GRAY16, gray3((GRAY16 // 256).astype(np.uint8))),
    ("16UC1", GRAY16, gray3((GRAY16 // 256).astype(np.uint8))),
    ("rgb16", RGB16, (RGB16 // 256).astype(np.uint8)),
    ("bgr16", RGB16[:, :, ::-1], (RGB16 // 256).astype(np.uint8)),
]


@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize(("encoding", "pixels", "want"), ENCODING_CASES, ids=[c[0] for c in ENCODING_CASES])
def test_raw_encodings(encoding: str, pixels: np.ndarray, want: np.ndarray, pad: int, big: bool) -> None:
    got = read_image(raw(encoding, pixels, pad=pad, big=big))
    assert got.dtype == np.uint8 and got.shape == (H, W, 3)
    np.testing.assert_array_equal(got, want)


def test_float_depth_scaled_min_max_with_non_finite_zero() -> None:
    depth = np.array([[1.0, 2.0, np.nan], [3.0, np.inf, 5.0]], np.float32)
    got = read_image(raw("32FC1", depth))
    want = np.array([[0, 64, 0], [128, 0, 255]], np.uint8)  # (d - 1) / 4 * 255, rounded
    np.testing.assert_array_equal(got[:, :, 0], want)
    assert (read_image(raw("32FC1", np.full((2, 2), 7.0, np.float32))) == 0).all()
    assert (read_image(raw("32FC1", np.full((2, 2), np.nan, np.float32))) == 0).all()


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_patterns(pattern: str) -> None:
    colour = {"r": 200, "g": 90, "b": 30}
    mosaic = np.zeros((8, 8), np.uint8)
    for dy in range(2):
        for dx in range(2):
            mosaic[dy::2, dx::2] = colour[pattern[2 * dy + dx]]
    got = read_image(raw(f"bayer_{pattern}8", mosaic))
    np.testing.assert_array_equal(got[2:6, 2:6].reshape(-1, 3), np.tile([200, 90, 30], (16, 1)))


@pytest.mark.parametrize("yuv", [(81, 90, 240), (145, 54, 34), (41, 240, 110), (128, 128, 128), (200, 100, 150)])
def test_yuv422_uyvy_and_yuy2(yuv: tuple[int, int, int]) -> None:
    y, u, v = yuv
    uyvy = np.array([[[u, y], [v, y]] * 2], np.uint8)  # (1, 4, 2): U Y0 V Y1 per pixel pair
    yuy2 = np.array([[[y, u], [y, v]] * 2], np.uint8)  # Y0 U Y1 V
    want = uyvy_to_rgb601(y, u, v)
    for enc, px in (("yuv422", uyvy), ("yuv422_yuy2", yuy2)):
        got = read_image(raw(enc, px, pad=3))
        assert got.shape == (1, 4, 3)
        assert np.abs(got.astype(int) - want).max() <= 2, (enc, got[0, 0], want)


def test_rgb8_without_padding_is_a_view() -> None:
    msg = raw("rgb8", RGB)
    buf = np.frombuffer(bytearray(msg.data), np.uint8)
    msg.data = buf
    assert np.shares_memory(read_image(msg), buf)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_compressed_round_trip(fmt: str) -> None:
    types = rosbags_types()
    img = np.zeros((32, 48, 3), np.uint8)
    img[:, :16] = (255, 0, 0)
    img[:, 16:32] = (0, 255, 0)
    img[:, 32:] = (0, 0, 255)
    msg = create_compressed_image(types, make_header(types, 1.0, "cam"), img, fmt, quality=95)
    assert fmt in msg.format
    got = read_image(msg)
    assert got.shape == img.shape
    tol = 0 if fmt == "png" else 12
    assert np.abs(got[4:-4, [4, 24, 40]].astype(int) - img[4:-4, [4, 24, 40]]).max() <= tol


def test_compressed_gray_and_16bit_png() -> None:
    g16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    ok, enc = cv2.imencode(".png", g16)
    assert ok
    got = read_image(NS(format="png", data=enc.tobytes()))
    np.testing.assert_array_equal(got, gray3((g16 // 256).astype(np.uint8)))


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_create_image_round_trip(encoding: str) -> None:
    types = rosbags_types()
    msg = create_image(types, make_header(types, 0.5, "cam"), RGB, encoding)
    assert msg.encoding == encoding and msg.step == W * (4 if "a" in encoding[:4] else 3)
    np.testing.assert_array_equal(read_image(msg), RGB)


def _jpeg() -> bytes:
    ok, enc = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    assert ok
    return enc.tobytes()


def _png_header(width: int, height: int) -> bytes:
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + ihdr + b"\0\0\0\0"


def _jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(_jpeg())
    i = 2
    while data[i + 1] not in (0xC0, 0xC2):
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    data[i + 5 : i + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


RAW_MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("short data", {"data": raw("rgb8", RGB).data[:-1]}, "data"),
    ("empty data", {"data": b""}, "data"),
    ("step too small", {"step": W * 3 - 1}, "step"),
    ("unknown encoding", {"encoding": "rgb9"}, "encoding"),
    ("encoding not a string", {"encoding": None}, "encoding"),
    ("zero width", {"width": 0}, "width"),
    ("negative height", {"height": -4}, "height"),
    ("too large", {"width": MAX_SIDE + 1, "height": 1, "step": (MAX_SIDE + 1) * 3}, "width"),
    ("huge product", {"width": 1 << 20, "height": 1 << 20, "step": 3 << 20}, "width"),
    ("absurd step", {"step": 1 << 40}, "data"),
    ("float step", {"step": 18.0}, "step"),
    ("data of wrong type", {"data": object()}, "data"),
]


@pytest.mark.parametrize(("case", "override", "needle"), RAW_MALFORMED, ids=[m[0] for m in RAW_MALFORMED])
def test_raw_malformed(case: str, override: dict[str, Any], needle: str) -> None:
    msg = raw("rgb8", RGB)
    for k, v in override.items():
        setattr(msg, k, v)
    with pytest.raises(MessageError, match=needle):
        read_image(msg)


def test_odd_width_yuv_and_tiny_bayer_raise() -> None:
    with pytest.raises(MessageError, match="odd"):
        read_image(raw("yuv422", np.zeros((2, 3, 2), np.uint8)))
    with pytest.raises(MessageError, match="bayer"):
        read_image(raw("bayer_rggb8", np.zeros((1, 4), np.uint8)))


COMPRESSED_MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "empty"),
    ("garbage", b"not an image at all", "JPEG"),
    ("truncated jpeg", _jpeg()[: len(_jpeg()) // 2], "JPEG"),
    ("jpeg header only", _jpeg()[:20], "JPEG"),
    ("jpeg body garbage", _jpeg()[:2] + b"\x00" * 200, "JPEG"),
    ("jpeg huge size", _jpeg_with_size(60000, 60000), "width"),
    ("jpeg zero size", _jpeg_with_size(0, 16), "width"),
    ("png huge size", _png_header(100000, 100000), "width"),
    ("png truncated", _png_header(16, 16), "corrupt"),
    ("png without ihdr", b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "IHDR"),
]


@pytest.mark.parametrize(("case", "data", "needle"), COMPRESSED_MALFORMED, ids=[m[0] for m in COMPRESSED_MALFORMED])
def test_compressed_malformed(case: str, data: bytes, needle: str) -> None:
    with pytest.raises(MessageError, match=needle):
        read_image(NS(format="jpeg", data=data))


def test_compressed_depth_refused() -> None:
    with pytest.raises(MessageError, match="compressedDepth"):
        read_image(NS(format="16UC1; compressedDepth png", data=_jpeg()))
