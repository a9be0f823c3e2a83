"""Small helpers shared by the message readers and builders: time stamps, headers, raw buffers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lmm_fusion.io.errors import MessageError
from lmm_fusion.io.msgtypes import MsgTypes

#: Largest message payload the readers accept [bytes] (1 GiB); larger claims are rejected before use.
MAX_DATA_BYTES = 1 << 30


def stamp_to_sec(stamp: Any) -> float:
    """``builtin_interfaces/Time`` (``sec``, ``nanosec``) -> seconds as float.

    Raises :class:`MessageError` when a field is missing, not an integer, or ``nanosec`` is out of
    ``[0, 1e9)``.
    """
    try:
        sec = stamp.sec
        nsec = stamp.nanosec
    except AttributeError as exc:
        raise MessageError(f"header.stamp: not a Time (missing {exc.name!r}): {stamp!r}") from None
    sec = as_int("header.stamp.sec", sec)
    nsec = as_int("header.stamp.nanosec", nsec)
    if not 0 <= nsec < 1_000_000_000:
        raise MessageError(f"header.stamp.nanosec: {nsec} outside [0, 1e9)")
    return sec + nsec * 1e-9


def make_time(types: MsgTypes, sec: float) -> Any:
    """Seconds -> ``builtin_interfaces/Time`` of ``types`` (nanoseconds rounded, never 1e9)."""
    if not math.isfinite(sec):
        raise ValueError(f"sec: {sec} is not finite")
    total_ns = round(sec * 1e9)
    s, ns = divmod(total_ns, 1_000_000_000)
    return types.Time(sec=int(s), nanosec=int(ns))


def make_header(types: MsgTypes, sec: float, frame_id: str) -> Any:
    """``std_msgs/Header`` of ``types`` stamped ``sec`` [s] in ``frame_id``."""
    return types.Header(stamp=make_time(types, sec), frame_id=frame_id)


def as_int(field: str, value: Any) -> int:
    """``value`` as a Python int, or :class:`MessageError` naming ``field`` (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise MessageError(f"{field}: expected an integer, got {value!r}")
    return int(value)


def as_bool(field: str, value: Any) -> bool:
    """``value`` as a bool (``bool``, numpy bool or int 0/1), else :class:`MessageError`."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer) and int(value) in (0, 1):
        return bool(value)
    raise MessageError(f"{field}: expected a bool, got {value!r}")


def byte_buffer(field: str, data: Any) -> np.ndarray:
    """A message's ``data`` as a 1-D uint8 array, without copying where the buffer protocol allows.

    Accepts ``bytes``, ``bytearray``, ``memoryview``, ``array.array`` (rclpy) and numpy arrays
    (rosbags); a list or tuple of ints 0..255 is converted (a copy). Anything else raises
    :class:`MessageError`.
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            if data.dtype.kind not in "biuf" or data.dtype.itemsize != 1:
                raise MessageError(f"{field}: expected uint8 bytes, got array of {data.dtype} {data.shape}")
            data = data.reshape(-1).view(np.uint8)
        return data if data.flags.c_contiguous else np.ascontiguousarray(data)
    if isinstance(data, bytes | bytearray | memoryview) or hasattr(data, "__buffer__") or _has_buffer(data):
        try:
            mv = memoryview(data)
            if not mv.c_contiguous:
                raise MessageError(f"{field}: buffer is not contiguous")
            return np.frombuffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv, dtype=np.uint8)
        except (TypeError, ValueError) as exc:
            raise MessageError(f"{field}: unusable buffer of type {type(data).__name__}: {exc}") from None
    if isinstance(data, list | tuple):
        if len(data) > MAX_DATA_BYTES:
            raise MessageError(f"{field}: {len(data)} elements exceed the bound {MAX_DATA_BYTES}")
        try:
            arr = np.asarray(data)
        except (TypeError, ValueError) as exc:
            raise MessageError(f"{field}: not a sequence of bytes: {exc}") from None
        if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255):
            raise MessageError(f"{field}: list elements must be integers 0..255 (dtype {arr.dtype})")
        return arr.astype(np.uint8).reshape(-1)
    raise MessageError(f"{field}: expected bytes, got {type(data).__name__}")


def _has_buffer(obj: Any) -> bool:
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True
