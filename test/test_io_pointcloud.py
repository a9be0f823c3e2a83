"""read_points / create_cloud against byte layouts built by hand with struct."""

from __future__ import annotations

import struct
from types import SimpleNamespace as NS
from typing import Any

import numpy as np
import pytest

from lmm_fusion.io import MessageError, create_cloud, make_header, read_points, rosbags_types
from lmm_fusion.io.pointcloud import MAX_POINTS

# PointField datatype -> struct format character.
STRUCT = {1: "b", 2: "B", 3: "h", 4: "H", 5: "i", 6: "I", 7: "f", 8: "d"}
SIZE = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 8: 8}


def field(name: str, offset: int, datatype: int, count: int = 1) -> NS:
    return NS(name=name, offset=offset, datatype=datatype, count=count)


def cloud(
    fields: list[NS],
    rows: list[list[tuple[float, ...]]],
    point_step: int,
    row_pad: int = 0,
    big: bool = False,
    data: Any = None,
    **over: Any,
) -> NS:
    """A PointCloud2-like message; ``rows`` is height lists of width tuples (one value per field)."""
    order = ">" if big else "<"
    out = bytearray()
    for row in rows:
        for values in row:
            pt = bytearray(b"\xee" * point_step)  # padding is garbage, never zeros by accident
            for f, v in zip(fields, values, strict=True):
                struct.pack_into(order + STRUCT[f.datatype], pt, f.offset, v)
            out += pt
        out += b"\xab" * row_pad
    height = len(rows)
    width = len(rows[0]) if rows else 0
    msg = NS(
        height=height,
        width=width,
        fields=fields,
        is_bigendian=big,
        point_step=point_step,
        row_step=width * point_step + row_pad,
        data=bytes(out) if data is None else data,
        is_dense=True,
    )
    for k, v in over.items():
        setattr(msg, k, v)
    return msg


XYZI_PACKED = [field("x", 0, 7), field("y", 4, 7), field("z", 8, 7), field("intensity", 12, 7)]
OUSTER = [
    field("x", 0, 7), field("y", 4, 7), field("z", 8, 7), field("intensity", 16, 7), field("t", 20, 6),
    field("reflectivity", 24, 4), field("ring", 26, 4), field("ambient", 28, 4), field("range", 32, 6),
]
VELODYNE = [field("x", 0, 7), field("y", 4, 7), field("z", 8, 7), field("intensity", 12, 7),
            field("ring", 16, 4), field("time", 18, 7)]

P1 = (1.5, -2.25, 0.5, 7.0)
P2 = (-3.0, 4.0, -1.0, 100.0)


@pytest.mark.parametrize("datatype", list(STRUCT))
@pytest.mark.parametrize("big", [False, True])
def test_every_datatype_and_byte_order(datatype: int, big: bool) -> None:
    size = SIZE[datatype]
    fields = [field("x", 0, datatype), field("y", size, datatype), field("z", 2 * size, datatype),
              field("intensity", 3 * size, datatype)]
    values = [(1, 2, 3, 4), (5, 6, 7, 127)] if datatype != 1 else [(1, -2, 3, -4), (-128, 6, 7, 127)]
    msg = cloud(fields, [values], point_step=4 * size + 3, big=big)
    got = read_points(msg)
    assert got.dtype == np.float32 and got.shape == (2, 4)
    np.testing.assert_array_equal(got, np.array(values, np.float32))


@pytest.mark.parametrize(
    ("name", "fields", "point_step", "values", "extra"),
    [
        ("packed", XYZI_PACKED, 16, [P1, P2], None),
        ("ouster48", OUSTER, 48, [(*P1, 9, 10, 11, 12, 13), (*P2, 1, 2, 3, 4, 5)], None),
        ("velodyne22", VELODYNE, 22, [(*P1, 3, 0.25), (*P2, 15, 0.5)], None),
        ("reordered", [field("intensity", 0, 7), field("z", 4, 8), field("y", 12, 3), field("x", 14, 5)], 20,
         [(7.0, 0.5, -2, 1), (100.0, -1.0, 4, -3)], None),
    ],
)
def test_layouts(name: str, fields: list[NS], point_step: int, values: list[tuple[float, ...]], extra: Any) -> None:
    by_name = [dict(zip([f.name for f in fields], v, strict=True)) for v in values]
    msg = cloud(fields, [values], point_step)
    got = read_points(msg)
    want = np.array([[d["x"], d["y"], d["z"], d["intensity"]] for d in by_name], np.float32)
    np.testing.assert_array_equal(got, want)
    if name == "ouster48":
        np.testing.assert_array_equal(read_points(msg, ("ring", "range")), [[11, 13], [3, 5]])


def test_organised_cloud_with_row_padding() -> None:
    rows = [[P1, P2, P1], [P2, P2, P1]]
    msg = cloud(XYZI_PACKED, rows, 16, row_pad=8)
    assert msg.row_step == 3 * 16 + 8
    got = read_points(msg)
    np.testing.assert_array_equal(got, np.array([p for r in rows for p in r], np.float32))


def test_non_finite_xyz_dropped_and_others_zeroed() -> None:
    nan, inf = float("nan"), float("inf")
    pts = [P1, (nan, 0, 0, 1), (0, inf, 0, 1), (0, 0, -inf, 1), (1, 2, 3, nan), P2]
    msg = cloud(XYZI_PACKED, [pts], 16, is_dense=False)
    got = read_points(msg)
    np.testing.assert_array_equal(got, np.array([P1, (1, 2, 3, 0), P2], np.float32))
    # Rows match whichever fields are asked for: x/y/z filter applies even when not requested.
    np.testing.assert_array_equal(read_points(msg, ("intensity",)), [[7.0], [0.0], [100.0]])
    # A copy (a field subset, another byte order) is filtered whatever is_dense claims.
    for dense in (True, False):
        np.testing.assert_array_equal(read_points(cloud(XYZI_PACKED, [pts], 16, is_dense=dense), ("x", "intensity")),
                                      [[1.5, 7.0], [1.0, 0.0], [-3.0, 100.0]])
        big = cloud(XYZI_PACKED, [pts], 16, big=True, is_dense=dense)
        np.testing.assert_array_equal(read_points(big), np.array([P1, (1, 2, 3, 0), P2], np.float32))


def test_dense_claim_trusted_for_a_zero_copy_view() -> None:
    """is_dense=True on a view is taken at its word (as sensor_msgs_py does): no pass over the data."""
    pts = [P1, (float("nan"), 0, 0, 1), P2]
    msg = cloud(XYZI_PACKED, [pts], 16, is_dense=True)
    msg.data = np.frombuffer(bytearray(msg.data), np.uint8)
    got = read_points(msg)
    assert got.shape == (3, 4) and np.shares_memory(got, msg.data) and np.isnan(got[1, 0])
    msg.is_dense = 1  # not the boolean True: not a claim
    assert read_points(msg).shape == (2, 4)


def test_zero_copy_view_for_matching_layout() -> None:
    msg = cloud(XYZI_PACKED, [[P1, P2]], 16)
    buf = np.frombuffer(bytearray(msg.data), np.uint8)
    msg.data = buf
    got = read_points(msg)
    assert np.shares_memory(got, buf)
    msg_nan = cloud(XYZI_PACKED, [[P1, (float("nan"), 0, 0, 0)]], 16, is_dense=False)
    assert read_points(msg_nan).shape == (1, 4)  # filtering copies only when needed


def test_missing_field_filled_with_zeros_but_missing_xyz_raises() -> None:
    fields = XYZI_PACKED[:3]
    msg = cloud(fields, [[P1[:3], P2[:3]]], 12)
    np.testing.assert_array_equal(read_points(msg), [[*P1[:3], 0], [*P2[:3], 0]])
    with pytest.raises(MessageError, match="'z'"):
        read_points(cloud(fields[:2], [[P1[:2]]], 12))


def test_empty_cloud_gives_zero_rows() -> None:
    msg = cloud(XYZI_PACKED, [[]], 16, data=b"")
    assert read_points(msg).shape == (0, 4)


def _good() -> NS:
    return cloud(XYZI_PACKED, [[P1, P2]], 16)


MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("short data", {"data": _good().data[:-1]}, "data"),
    ("empty data", {"data": b""}, "data"),
    ("point_step smaller than fields", {"point_step": 12, "row_step": 24}, "point_step"),
    ("point_step zero", {"point_step": 0}, "point_step"),
    ("point_step absurd", {"point_step": 1 << 31}, "point_step"),
    ("offset past point_step", {"fields": [*XYZI_PACKED[:3], field("intensity", 14, 7)]}, "intensity"),
    ("unknown datatype", {"fields": [*XYZI_PACKED[:3], field("intensity", 12, 9)]}, "datatype"),
    ("datatype zero", {"fields": [field("x", 0, 0), *XYZI_PACKED[1:]]}, "datatype"),
    ("count 2 requested", {"fields": [*XYZI_PACKED[:3], field("intensity", 12, 7, 2)], "point_step": 20,
                           "row_step": 40}, "count"),
    ("count 0 requested", {"fields": [*XYZI_PACKED[:3], field("intensity", 12, 7, 0)]}, "count"),
    ("negative offset", {"fields": [field("x", -4, 7), *XYZI_PACKED[1:]]}, "offset"),
    ("negative width", {"width": -2}, "width"),
    ("too many points", {"width": MAX_POINTS, "height": 2}, "height"),
    ("row_step too small", {"row_step": 31}, "row_step"),
    ("row_step absurd", {"row_step": 1 << 40}, "data"),
    ("float width", {"width": 2.0}, "width"),
    ("duplicate field", {"fields": [*XYZI_PACKED, field("x", 0, 7)]}, "duplicate"),
    ("missing field", {"fields": XYZI_PACKED[1:]}, "'x'"),
    ("data not bytes", {"data": 12345}, "data"),
    ("data list out of range", {"data": [300] * 32}, "data"),
    ("field not a PointField", {"fields": [1, 2, 3]}, "fields"),
]


@pytest.mark.parametrize(("case", "override", "needle"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_raises_message_error(case: str, override: dict[str, Any], needle: str) -> None:
    msg = _good()
    for k, v in override.items():
        setattr(msg, k, v)
    with pytest.raises(MessageError, match=needle):
        read_points(msg)


def test_missing_attribute_raises_message_error() -> None:
    msg = _good()
    del msg.point_step
    with pytest.raises(MessageError, match="point_step"):
        read_points(msg)


def test_create_cloud_round_trip_structured_and_plain() -> None:
    types = rosbags_types()
    header = make_header(types, 3.25, "lidar")
    dt = np.dtype({"names": ["x", "y", "z", "intensity", "ring"], "formats": [">f4", ">f4", ">f4", "<f8", "<u2"],
                   "offsets": [0, 4, 8, 16, 24], "itemsize": 32})
    rec = np.zeros((2, 3), dt)  # organised 2x3
    rec["x"] = np.arange(6).reshape(2, 3)
    rec["intensity"] = 0.5
    rec["ring"] = [[1, 2, 3], [4, 5, 6]]
    msg = create_cloud(types, header, rec)
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (2, 3, 32, 96)
    assert [(f.name, f.offset, f.datatype) for f in msg.fields] == [
        ("x", 0, 7), ("y", 4, 7), ("z", 8, 7), ("intensity", 16, 8), ("ring", 24, 4)]
    assert msg.is_bigendian is False and msg.is_dense is True
    # Independent check of the wire bytes: little-endian float32 x of point (1, 2) at offset 5*32.
    assert struct.unpack_from("<f", bytes(msg.data), 5 * 32)[0] == 5.0
    np.testing.assert_array_equal(read_points(msg, ("x", "intensity", "ring"))[:, 0], np.arange(6))
    np.testing.assert_array_equal(read_points(msg, ("ring",))[:, 0], np.arange(1, 7))

    plain = np.array([P1, (np.nan, 0, 0, 0)], np.float32)
    msg2 = create_cloud(types, header, plain, ("x", "y", "z", "intensity"))
    assert msg2.is_dense is False and msg2.point_step == 16
    np.testing.assert_array_equal(read_points(msg2), [P1])


def test_create_cloud_rejects_bad_input() -> None:
    types = rosbags_types()
    header = make_header(types, 0.0, "lidar")
    with pytest.raises(ValueError, match="fields"):
        create_cloud(types, header, np.zeros((3, 4), np.float32), ("x", "y"))
    with pytest.raises(ValueError, match="points"):
        create_cloud(types, header, np.zeros(3, np.float32))


def test_gathered_organised_cloud_with_nan_cells() -> None:
    """A padded organised layout (an Ouster-like 20-byte point, row padding) with no-return NaN cells: the
    valid points in row order, their columns each one block of memory, any field subset."""
    nan = float("nan")
    padded = [field("x", 0, 7), field("y", 4, 7), field("z", 8, 7), field("intensity", 16, 7)]
    rows = [[P1, (nan, nan, nan, 0), P2], [(nan, nan, nan, 5), P2, (1, 2, 3, nan)]]
    vals = [[(*p, 0.0) for p in r] for r in rows]
    msg = cloud([*padded, field("pad", 12, 7)], vals, 20, row_pad=4, is_dense=False)
    want = np.array([P1, P2, P2, (1, 2, 3, 0)], np.float32)
    got = read_points(msg)
    np.testing.assert_array_equal(got, want)
    assert all(got[:, k].flags.c_contiguous for k in range(4))
    np.testing.assert_array_equal(read_points(msg, ("intensity",)), want[:, 3:])
    np.testing.assert_array_equal(read_points(msg, ("z", "x")), want[:, [2, 0]])
