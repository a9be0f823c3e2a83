"""``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` <-> ``(H, W, 3)`` uint8 RGB numpy arrays.

Scaling of non-8-bit encodings to 8 bits (so the camera encoder always sees the same range):

- 16-bit encodings (``mono16``, ``16UC1``, ``rgb16``, ...): linear over the full 16-bit range,
  ``out = value >> 8`` (the upper byte). A depth image in millimetres thus maps 0..65.5 m to 0..255.
- ``32FC1`` (float depth or intensity): per-image min-max of the finite values to 0..255;
  non-finite pixels become 0, a constant image becomes all 0.
- ``8UC3`` / ``8UC4`` carry no colour order; they are read as BGR / BGRA (OpenCV's convention,
  which is what ``cv_bridge`` publishes for a passthrough OpenCV image).
"""

from __future__ import annotations

import array
from typing import Any, Literal

import cv2
import numpy as np

from lmm_fusion.io.common import MAX_DATA_BYTES, as_bool, as_int, byte_buffer
from lmm_fusion.io.errors import MessageError
from lmm_fusion.io.msgtypes import MsgTypes

#: Largest image side accepted [px], raw or compressed: 8192x8192 is allowed, anything larger raises.
MAX_SIDE = 8192

#: encoding -> (channels, element dtype, colour conversion to RGB or None). ``"gray"`` = replicate.
_ENCODINGS: dict[str, tuple[int, str, int | Literal["gray"] | None]] = {
    "rgb8": (3, "u1", None),
    "bgr8": (3, "u1", cv2.COLOR_BGR2RGB),
    "rgba8": (4, "u1", cv2.COLOR_RGBA2RGB),
    "bgra8": (4, "u1", cv2.COLOR_BGRA2RGB),
    "mono8": (1, "u1", "gray"),
    "8UC1": (1, "u1", "gray"),
    "8UC3": (3, "u1", cv2.COLOR_BGR2RGB),
    "8UC4": (4, "u1", cv2.COLOR_BGRA2RGB),
    "mono16": (1, "u2", "gray"),
    "16UC1": (1, "u2", "gray"),
    "rgb16": (3, "u2", None),
    "bgr16": (3, "u2", cv2.COLOR_BGR2RGB),
    "rgba16": (4, "u2", cv2.COLOR_RGBA2RGB),
    "bgra16": (4, "u2", cv2.COLOR_BGRA2RGB),
    "32FC1": (1, "f4", "gray"),
    # ROS names the 2x2 pattern from the top-left pixel; OpenCV from the second row's second pixel.
    "bayer_rggb8": (1, "u1", cv2.COLOR_BayerBG2RGB),
    "bayer_bggr8": (1, "u1", cv2.COLOR_BayerRG2RGB),
    "bayer_gbrg8": (1, "u1", cv2.COLOR_BayerGR2RGB),
    "bayer_grbg8": (1, "u1", cv2.COLOR_BayerGB2RGB),
    "yuv422": (2, "u1", cv2.COLOR_YUV2RGB_UYVY),  # UYVY byte order
    "uyvy": (2, "u1", cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": (2, "u1", cv2.COLOR_YUV2RGB_YUY2),  # YUYV byte order
    "yuyv": (2, "u1", cv2.COLOR_YUV2RGB_YUY2),
}
ENCODINGS: tuple[str, ...] = tuple(_ENCODINGS)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_image(msg: Any) -> np.ndarray:
    """Image or CompressedImage -> ``(H, W, 3)`` uint8 RGB.

    A message with a ``format`` field and no ``encoding`` is a CompressedImage (JPEG or PNG, decided
    by the stream's magic bytes). For a raw ``rgb8`` image without row padding the result is a view of
    ``msg.data`` (read-only if ``data`` is ``bytes``); every other case returns a new array.

    Raises :class:`MessageError` for unknown encodings, data shorter than ``step * height``, ``step``
    smaller than a row, sides beyond :data:`MAX_SIDE`, empty or corrupt compressed data.
    """
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return _read_compressed(msg)
    try:
        height = as_int("height", msg.height)
        width = as_int("width", msg.width)
        step = as_int("step", msg.step)
        encoding = msg.encoding
        bigendian = as_bool("is_bigendian", msg.is_bigendian)
        raw = msg.data
    except AttributeError as exc:
        raise MessageError(f"Image: missing field {exc.name!r}") from None
    if not isinstance(encoding, str) or encoding not in _ENCODINGS:
        raise MessageError(f"encoding: unsupported {encoding!r} (supported: {', '.join(ENCODINGS)})")
    _check_size(width, height)
    channels, kind, conversion = _ENCODINGS[encoding]
    dtype = np.dtype(kind).newbyteorder(">" if bigendian else "<")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise MessageError(f"step: {step} < width*channels*bytes = {width}*{channels}*{dtype.itemsize} ({encoding})")
    if channels == 2 and width % 2:
        raise MessageError(f"width: {width} is odd; {encoding} packs pixel pairs")
    if conversion in (cv2.COLOR_BayerBG2RGB, cv2.COLOR_BayerRG2RGB, cv2.COLOR_BayerGR2RGB,
                      cv2.COLOR_BayerGB2RGB) and (width < 2 or height < 2):
        raise MessageError(f"width/height: {width}x{height} too small for {encoding} (needs 2x2)")
    data = byte_buffer("data", raw)
    needed = step * height
    if data.size < needed:
        raise MessageError(f"data: {data.size} bytes, fewer than step*height = {step}*{height} = {needed}")
    img = np.ndarray((height, width, channels), dtype=dtype, buffer=data,
                     strides=(step, channels * dtype.itemsize, dtype.itemsize))
    img8 = _to_uint8(img, kind)
    if conversion is None:
        return img8 if img8 is not img or step == row_bytes else np.ascontiguousarray(img8)
    try:
        if conversion == "gray":
            return cv2.cvtColor(np.ascontiguousarray(img8[:, :, 0]), cv2.COLOR_GRAY2RGB)
        src = np.ascontiguousarray(img8[:, :, 0] if channels == 1 else img8)
        return cv2.cvtColor(src, conversion)
    except cv2.error as exc:  # should not happen after the checks above; never let it escape
        raise MessageError(f"encoding: {encoding} conversion failed for {width}x{height}: {exc}") from None


def _check_size(width: int, height: int) -> None:
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise MessageError(f"width/height: {width}x{height} outside 1..{MAX_SIDE} per side")


def _to_uint8(img: np.ndarray, kind: str) -> np.ndarray:
    """Scale to uint8 as documented in the module docstring (no copy for uint8)."""
    if kind == "u1":
        return img
    if kind == "u2":
        return (img >> 8).astype(np.uint8)
    vals = img.astype(np.float32)
    finite = np.isfinite(vals)
    if not finite.any():
        return np.zeros(img.shape, np.uint8)
    lo = float(vals[finite].min())
    hi = float(vals[finite].max())
    out = np.zeros(img.shape, np.float32)
    if hi > lo:
        np.subtract(vals, lo, out=out, where=finite)
        out *= 255.0 / (hi - lo)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _read_compressed(msg: Any) -> np.ndarray:
    fmt = msg.format
    if not isinstance(fmt, str):
        raise MessageError(f"format: expected a string, got {fmt!r}")
    if "compresseddepth" in fmt.lower().replace(" ", ""):
        raise MessageError(f"format: {fmt!r} (compressedDepth) is not supported")
    data = byte_buffer("data", msg.data)
    if data.size == 0:
        raise MessageError(f"data: empty compressed image (format={fmt!r})")
    if data.size > MAX_DATA_BYTES:
        raise MessageError(f"data: {data.size} bytes exceed {MAX_DATA_BYTES}")
    head = data[:32].tobytes()
    if head.startswith(_JPEG_MAGIC):
        width, height = _jpeg_size(data, fmt)
    elif head.startswith(_PNG_MAGIC):
        width, height = _png_size(head, fmt)
    else:
        raise MessageError(f"data: neither a JPEG nor a PNG stream (format={fmt!r}, starts {head[:8]!r})")
    _check_size(width, height)
    try:
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise MessageError(f"data: corrupt compressed image (format={fmt!r}): {exc}") from None
    if img is None or img.size == 0:
        raise MessageError(f"data: corrupt compressed image (format={fmt!r}, {data.size} bytes)")
    if img.shape[:2] != (height, width):
        raise MessageError(f"data: decoded {img.shape[1]}x{img.shape[0]} but header says {width}x{height}")
    if img.dtype == np.uint16:
        img = np.right_shift(img, 8).astype(np.uint8)  # the high byte of each 16-bit sample
    elif img.dtype != np.uint8:
        raise MessageError(f"data: decoded pixel type {img.dtype} is not supported (format={fmt!r})")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    raise MessageError(f"data: decoded image has {img.shape[2]} channels (format={fmt!r})")


def _png_size(head: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from the PNG IHDR chunk, which must come first."""
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise MessageError(f"data: corrupt PNG, no IHDR chunk (format={fmt!r})")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


#: JPEG start-of-frame markers (carry the image size); C4, C8 and CC are other segments.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: np.ndarray, fmt: str) -> tuple[int, int]:
    """(width, height) from the JPEG frame header; also checks the stream has scan data and an end.

    Walks the marker segments before the first scan (each costs O(1)), so a corrupt or truncated
    stream is refused before OpenCV decodes it into a partial image.
    """
    buf = data.tobytes() if data.size < 1 << 16 else None
    n = data.size

    def byte(i: int) -> int:
        return buf[i] if buf is not None else int(data[i])

    i = 2
    size: tuple[int, int] | None = None
    while True:
        if i + 4 > n:
            raise MessageError(f"data: corrupt JPEG, truncated header at byte {i} of {n} (format={fmt!r})")
        if byte(i) != 0xFF:
            raise MessageError(f"data: corrupt JPEG, expected a marker at byte {i} (format={fmt!r})")
        marker = byte(i + 1)
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker == 0xD9:
            raise MessageError(f"data: corrupt JPEG, end of image before any scan (format={fmt!r})")
        length = (byte(i + 2) << 8) | byte(i + 3)
        if length < 2:
            raise MessageError(f"data: corrupt JPEG, segment length {length} at byte {i} (format={fmt!r})")
        if marker in _SOF:
            if i + 9 > n:
                raise MessageError(f"data: corrupt JPEG, truncated frame header (format={fmt!r})")
            height = (byte(i + 5) << 8) | byte(i + 6)
            width = (byte(i + 7) << 8) | byte(i + 8)
            size = (width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if size is None:
                raise MessageError(f"data: corrupt JPEG, scan before frame header (format={fmt!r})")
            tail = data[max(i + 2 + length, n - 64):].tobytes()
            if b"\xff\xd9" not in tail:
                raise MessageError(f"data: corrupt or truncated JPEG, no end-of-image marker (format={fmt!r})")
            return size
        i += 2 + length


def create_image(types: MsgTypes, header: Any, rgb: np.ndarray, encoding: str = "rgb8") -> Any:
    """``(H, W, 3)`` uint8 RGB -> Image of ``types`` in ``encoding`` (rgb8, bgr8, rgba8, bgra8, mono8).

    ``data`` is a numpy uint8 array for rosbags and ``array.array('B')`` for rclpy.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb: expected (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
    conversions = {
        "rgb8": None,
        "bgr8": cv2.COLOR_RGB2BGR,
        "rgba8": cv2.COLOR_RGB2RGBA,
        "bgra8": cv2.COLOR_RGB2BGRA,
        "mono8": cv2.COLOR_RGB2GRAY,
    }
    if encoding not in conversions:
        raise ValueError(f"encoding: {encoding!r} not one of {sorted(conversions)}")
    conv = conversions[encoding]
    out = np.ascontiguousarray(rgb) if conv is None else cv2.cvtColor(np.ascontiguousarray(rgb), conv)
    h, w = rgb.shape[:2]
    channels = 1 if out.ndim == 2 else out.shape[2]
    return types.Image(
        header=header,
        height=int(h),
        width=int(w),
        encoding=encoding,
        is_bigendian=False,
        step=int(w * channels),
        data=_data_for(types, out),
    )


def create_compressed_image(
    types: MsgTypes, header: Any, rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90
) -> Any:
    """``(H, W, 3)`` uint8 RGB -> CompressedImage of ``types`` (``fmt`` ``"jpeg"`` or ``"png"``).

    ``format`` is written as image_transport does (``"rgb8; jpeg compressed bgr8"``); ``quality``
    (0..100) applies to JPEG only.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb: expected (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    if fmt in ("jpeg", "jpg"):
        ok, enc = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        fmt = "jpeg"
    elif fmt == "png":
        ok, enc = cv2.imencode(".png", bgr)
    else:
        raise ValueError(f"fmt: {fmt!r} not 'jpeg' or 'png'")
    if not ok:
        raise ValueError(f"rgb: OpenCV could not encode {rgb.shape} as {fmt}")
    return types.CompressedImage(header=header, format=f"rgb8; {fmt} compressed bgr8", data=_data_for(types, enc))


def _data_for(types: MsgTypes, arr: np.ndarray) -> Any:
    """A contiguous array's bytes as the ``data`` value each message kind takes fastest."""
    raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    if types.kind == "rclpy":
        out = array.array("B")
        out.frombytes(raw.data)
        return out
    return raw.copy()
