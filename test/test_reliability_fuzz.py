"""Fuzzing the node's real input path: malformed sensor messages never raise, are counted per sensor,
show up on /diagnostics, and the other sensors keep flowing.

Two ways in:

* the node itself: the rclpy ``FusionNode`` is constructed in this process (private context, random
  domain id), configured and activated, and its subscription callbacks ``_on_sensor`` /
  ``_on_camera_info`` are called with rclpy messages; one ``_cycle`` afterwards publishes the
  DiagnosticArray that is checked;
* the replay path: a bag written with :class:`~lmm_fusion.io.bags.BagWriter` holding malformed messages
  between good ones, read through :class:`~lmm_fusion.cycle.ingest.SensorIngest` and
  :func:`~lmm_fusion.cycle.bagfeed.iter_cycles`.

Strategies reuse the reader-level ones of ``test_io_fuzz.py`` (garbage messages) and add mutants of
valid messages (one to three fields changed: sizes, steps, offsets, datatypes, encodings, endianness,
NaN/Inf payloads, truncated or extended data, huge dimensions). Every message spec renders to either
message kind (rclpy or rosbags). Quick profile by default; ``LMM_FUZZ_LONG=1`` runs 10,000 cases per
message type (see docs/reliability.md for the last long run).
"""

from __future__ import annotations

import array
import json
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rclpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rclpy.context import Context
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from test_io_fuzz import clouds, compressed_images, fixes, raw_images, sizes

from lmm_fusion.base import topics
from lmm_fusion.base.vocabulary import MODALITIES, Action
from lmm_fusion.cycle.bagfeed import iter_cycles
from lmm_fusion.cycle.ingest import SensorIngest
from lmm_fusion.cycle.sync import SensorSync
from lmm_fusion.io import rclpy_types, rosbags_types
from lmm_fusion.io.bags import BagWriter
from lmm_fusion.io.gnss import EgoMotionConfig
from lmm_fusion.io.image import ENCODINGS
from lmm_fusion.ros.node import FusionNode
from lmm_fusion.ros.outputs import WARN, level_of

LONG = os.environ.get("LMM_FUZZ_LONG") == "1"
settings.register_profile("reliability-quick", max_examples=150, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("reliability-long", max_examples=10_000, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
PROFILE = settings.get_profile("reliability-long" if LONG else "reliability-quick")
FIXTURES = Path(__file__).parent / "fixtures" / "reliability"

Spec = dict[str, Any]
# ---------------------------------------------------------------- value coercion into the wire types
U32, U8 = 2**32, 2**8


def _u(v: Any, mod: int, fallback: int = 0) -> int:
    """An unsigned wire value: ints wrap (a negative size becomes a huge one), anything else -> fallback."""
    return int(v) % mod if isinstance(v, int) else fallback


def _i8(v: Any) -> int:
    return (int(v) + 128) % 256 - 128 if isinstance(v, int) else 0


def _f64(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else math.nan


def _blob(v: Any) -> bytes:
    if isinstance(v, bytes | bytearray):
        return bytes(v)
    if isinstance(v, list) and all(isinstance(x, int) for x in v):
        return bytes(x % 256 for x in v)
    return b""


def _text(v: Any) -> str:
    return v if isinstance(v, str) else ""


# ---------------------------------------------------------------- stamps
# ("rel", dt): ``now + dt`` at render time; ("abs", sec, nanosec): a raw wire stamp (int32, uint32).
stamps = st.one_of(
    st.just(("rel", 0.0)), st.just(("rel", 0.0)), st.just(("rel", 0.0)),
    st.floats(-3.0, 3.0).map(lambda d: ("rel", d)),
    st.tuples(st.just("abs"), st.integers(-(2**31), 2**31 - 1), st.integers(0, U32 - 1)),
)


# ---------------------------------------------------------------- specs from the reader-level strategies
def _from_raw_image(ns: Any) -> Spec:
    return {"kind": "Image", "height": _u(ns.height, U32), "width": _u(ns.width, U32), "encoding": _text(ns.encoding),
            "is_bigendian": _u(ns.is_bigendian, U8), "step": _u(ns.step, U32), "data": _blob(ns.data)}


def _from_compressed(ns: Any) -> Spec:
    return {"kind": "CompressedImage", "format": _text(ns.format), "data": _blob(ns.data)}


def _from_cloud(ns: Any) -> Spec:
    fields = [(_text(f.name), _u(f.offset, U32), _u(f.datatype, U8), _u(f.count, U32))
              for f in ns.fields if hasattr(f, "name")]
    return {"kind": "PointCloud2", "height": _u(ns.height, U32), "width": _u(ns.width, U32), "fields": fields,
            "is_bigendian": bool(ns.is_bigendian) if isinstance(ns.is_bigendian, bool | int) else False,
            "point_step": _u(ns.point_step, U32), "row_step": _u(ns.row_step, U32), "data": _blob(ns.data),
            "is_dense": bool(ns.is_dense)}


def _from_fix(ns: Any) -> Spec:
    cov = ns.position_covariance if isinstance(ns.position_covariance, list) else []
    cov = ([_f64(c) for c in cov] + [math.nan] * 9)[:9]
    s = ns.header.stamp
    sec = (s.sec + 2**31) % U32 - 2**31 if isinstance(s.sec, int) else 0  # int32 on the wire
    return {"kind": "NavSatFix", "stamp": ("abs", sec, _u(s.nanosec, U32)),
            "status": _i8(ns.status.status), "latitude": _f64(ns.latitude), "longitude": _f64(ns.longitude),
            "altitude": _f64(ns.altitude), "covariance": cov, "covariance_type": _u(ns.position_covariance_type, U8)}


# ---------------------------------------------------------------- mutants of valid messages
BYTES_PER_PIXEL = {"rgb8": 3, "bgr8": 3, "mono8": 1, "mono16": 2, "rgb16": 6, "bgra8": 4, "32FC1": 4,
                   "bayer_rggb8": 1, "yuyv": 2}
SPECIALS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 0.0, -0.0, 5e-324]
special_floats = st.one_of(st.sampled_from(SPECIALS), st.floats(allow_nan=True, allow_infinity=True))
garbage = st.binary(max_size=256)


def _f32(values: Any, dtype: str) -> bytes:
    """float32 bytes of ``values`` (out-of-range values become +-inf, as a sensor driver would write)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values, np.float64).reshape(-1).astype(dtype).tobytes()


def _mutate_data(draw: st.DrawFn, data: bytes) -> bytes:
    op = draw(st.sampled_from(["truncate", "extend", "garbage", "flip", "empty"]))
    if op == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if op == "extend":
        return data + draw(garbage)
    if op == "flip" and data:
        b = bytearray(data)
        b[draw(st.integers(0, len(b) - 1))] ^= draw(st.integers(1, 255))
        return bytes(b)
    return b"" if op == "empty" else draw(garbage)


@st.composite
def image_mutants(draw: st.DrawFn) -> Spec:
    enc = draw(st.sampled_from(sorted(BYTES_PER_PIXEL)))
    h, w = draw(st.integers(1, 6)) * 2, draw(st.integers(1, 6)) * 2
    step = w * BYTES_PER_PIXEL[enc]
    data = draw(st.binary(min_size=h * step, max_size=h * step))
    if enc == "32FC1" and draw(st.booleans()):  # NaN/Inf pixels
        data = _f32([draw(special_floats) for _ in range(h * w)], "<f4")
    spec: Spec = {"kind": "Image", "height": h, "width": w, "encoding": enc, "is_bigendian": 0, "step": step,
                  "data": data}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["height", "width", "step", "encoding", "is_bigendian", "data"]))
        if key in ("height", "width", "step"):
            spec[key] = _u(draw(st.one_of(sizes, st.integers(0, 4 * step))), U32)
        elif key == "encoding":
            spec[key] = draw(st.one_of(st.sampled_from(ENCODINGS), st.text(max_size=12)))
        elif key == "is_bigendian":
            spec[key] = draw(st.integers(0, 255))
        else:
            spec[key] = _mutate_data(draw, spec["data"])
    return spec


CLOUD_FIELDS = [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("intensity", 12, 7, 1)]


@st.composite
def cloud_mutants(draw: st.DrawFn) -> Spec:
    n = draw(st.integers(0, 12))
    big = draw(st.booleans())
    pts = draw(st.lists(st.tuples(*[special_floats if draw(st.booleans()) else st.floats(-50, 50)] * 4),
                        min_size=n, max_size=n))
    data = _f32(pts, ">f4" if big else "<f4")
    spec: Spec = {"kind": "PointCloud2", "height": 1, "width": n, "fields": list(CLOUD_FIELDS), "is_bigendian": big,
                  "point_step": 16, "row_step": 16 * n, "data": data, "is_dense": False}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["height", "width", "point_step", "row_step", "field", "is_bigendian", "data",
                                    "fields"]))
        if key in ("height", "width", "point_step", "row_step"):
            spec[key] = _u(draw(st.one_of(sizes, st.integers(0, 64))), U32)
        elif key == "field" and spec["fields"]:
            i = draw(st.integers(0, len(spec["fields"]) - 1))
            name, off, dt, cnt = spec["fields"][i]
            what = draw(st.sampled_from(["offset", "datatype", "count", "name"]))
            if what == "offset":
                off = _u(draw(st.one_of(st.integers(0, 40), sizes)), U32)
            elif what == "datatype":
                dt = draw(st.integers(0, 255))
            elif what == "count":
                cnt = _u(draw(st.one_of(st.integers(0, 5), sizes)), U32)
            else:
                name = draw(st.sampled_from(["x", "y", "z", "intensity", "", "X"]))
            spec["fields"] = [*spec["fields"][:i], (name, off, dt, cnt), *spec["fields"][i + 1:]]
        elif key == "fields":
            spec["fields"] = draw(st.permutations(CLOUD_FIELDS))[: draw(st.integers(0, 4))]
        elif key == "is_bigendian":
            spec[key] = not spec[key]
        else:
            spec[key] = _mutate_data(draw, spec["data"])
    return spec


@st.composite
def fix_mutants(draw: st.DrawFn) -> Spec:
    spec: Spec = {"kind": "NavSatFix", "status": 0, "latitude": 48.137 + draw(st.floats(-1e-3, 1e-3)),
                  "longitude": 11.576, "altitude": 520.0, "covariance": [0.05, 0, 0, 0, 0.05, 0, 0, 0, 0.1],
                  "covariance_type": 2}
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(["latitude", "longitude", "altitude", "status", "covariance",
                                    "covariance_type"]))
        if key in ("latitude", "longitude", "altitude"):
            spec[key] = draw(st.one_of(special_floats, st.floats(-400, 400)))
        elif key == "status":
            spec[key] = draw(st.integers(-128, 127))
        elif key == "covariance":
            cov = list(spec["covariance"])
            cov[draw(st.integers(0, 8))] = draw(special_floats)
            spec[key] = cov
        else:
            spec[key] = draw(st.integers(0, 255))
    return spec


@st.composite
def camera_infos(draw: st.DrawFn) -> Spec:
    def arr(n: int) -> list[float]:
        return draw(st.lists(special_floats, min_size=n, max_size=n))

    return {"kind": "CameraInfo", "height": _u(draw(st.one_of(sizes, st.integers(0, 4000))), U32),
            "width": _u(draw(st.one_of(sizes, st.integers(0, 4000))), U32),
            "distortion_model": draw(st.one_of(st.sampled_from(["plumb_bob", "rational_polynomial", ""]),
                                               st.text(max_size=10))),
            "d": draw(st.lists(special_floats, max_size=20)), "k": arr(9), "r": arr(9), "p": arr(12),
            "binning_x": _u(draw(sizes), U32), "binning_y": _u(draw(sizes), U32)}


def _with_stamp(spec_st: st.SearchStrategy[Spec]) -> st.SearchStrategy[Spec]:
    return st.tuples(spec_st, stamps).map(lambda t: t[0] if "stamp" in t[0] else {**t[0], "stamp": t[1]})


#: Message type -> strategy of specs (garbage from the reader-level strategies, or valid-message mutants).
SPECS: dict[str, st.SearchStrategy[Spec]] = {
    "Image": _with_stamp(st.one_of(raw_images().map(_from_raw_image), image_mutants())),
    "CompressedImage": _with_stamp(compressed_images().map(_from_compressed)),
    "PointCloud2": _with_stamp(st.one_of(clouds().map(_from_cloud), cloud_mutants())),
    "NavSatFix": st.one_of(fixes().map(_from_fix), _with_stamp(fix_mutants())),
    "CameraInfo": _with_stamp(camera_infos()),
}
SENSOR = {"Image": "camera", "CompressedImage": "camera", "PointCloud2": "lidar", "NavSatFix": "gnss"}


# ---------------------------------------------------------------- rendering a spec as a message
#: Each kind's frame, as its driver would name it: a cloud is placed by its own frame_id (an unknown
#: frame is masked, which is not what these tests fuzz).
FRAME = {"Image": topics.CAMERA_FRAME, "CompressedImage": topics.CAMERA_FRAME, "PointCloud2": topics.LIDAR_FRAME,
         "NavSatFix": topics.GNSS_FRAME, "CameraInfo": topics.CAMERA_FRAME}


def _header(t: Any, stamp: Any, now: float, frame_id: str) -> Any:
    if stamp[0] == "rel":
        sec = max(now + stamp[1], 0.0)
        s, ns = int(sec), round((sec % 1.0) * 1e9) % 10**9
    else:
        s, ns = stamp[1], stamp[2]
    return t.Header(stamp=t.Time(sec=s, nanosec=ns), frame_id=frame_id)


def _bytes_for(t: Any, data: bytes) -> Any:
    if t.kind == "rclpy":
        out = array.array("B")
        out.frombytes(data)
        return out
    return np.frombuffer(data, np.uint8).copy()


def _floats_for(t: Any, values: list[float]) -> Any:
    return [float(v) for v in values] if t.kind == "rclpy" else np.asarray(values, np.float64)


def render(t: Any, spec: Spec, now: float) -> Any:
    """The message ``spec`` describes, as a message of ``t`` (rclpy or rosbags types)."""
    k = spec["kind"]
    hdr = _header(t, spec["stamp"], now, FRAME.get(k, topics.BASE_FRAME))
    if k == "Image":
        return t.Image(header=hdr, height=spec["height"], width=spec["width"], encoding=spec["encoding"],
                       is_bigendian=spec["is_bigendian"], step=spec["step"], data=_bytes_for(t, spec["data"]))
    if k == "CompressedImage":
        return t.CompressedImage(header=hdr, format=spec["format"], data=_bytes_for(t, spec["data"]))
    if k == "PointCloud2":
        fields = [t.PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in spec["fields"]]
        return t.PointCloud2(header=hdr, height=spec["height"], width=spec["width"], fields=fields,
                             is_bigendian=spec["is_bigendian"], point_step=spec["point_step"],
                             row_step=spec["row_step"], data=_bytes_for(t, spec["data"]), is_dense=spec["is_dense"])
    if k == "NavSatFix":
        return t.NavSatFix(header=hdr, status=t.NavSatStatus(status=spec["status"], service=1),
                           latitude=spec["latitude"], longitude=spec["longitude"], altitude=spec["altitude"],
                           position_covariance=_floats_for(t, spec["covariance"]),
                           position_covariance_type=spec["covariance_type"])
    if k == "CameraInfo":
        roi = t.RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
        return t.CameraInfo(header=hdr, height=spec["height"], width=spec["width"],
                            distortion_model=spec["distortion_model"], d=_floats_for(t, spec["d"]),
                            k=_floats_for(t, spec["k"]), r=_floats_for(t, spec["r"]), p=_floats_for(t, spec["p"]),
                            binning_x=spec["binning_x"], binning_y=spec["binning_y"], roi=roi)
    raise AssertionError(k)


def good_spec(sensor: str, rng: np.random.Generator) -> Spec:
    """A valid small message of ``sensor`` stamped now."""
    if sensor == "camera":
        return {"kind": "Image", "stamp": ("rel", 0.0), "height": 12, "width": 16, "encoding": "rgb8",
                "is_bigendian": 0, "step": 48, "data": rng.integers(0, 256, 12 * 48, dtype=np.uint8).tobytes()}
    if sensor == "lidar":
        pts = rng.uniform([5, -8, -1.5, 0], [40, 8, 1.0, 1], (64, 4)).astype("<f4")
        return {"kind": "PointCloud2", "stamp": ("rel", 0.0), "height": 1, "width": 64, "fields": CLOUD_FIELDS,
                "is_bigendian": False, "point_step": 16, "row_step": 16 * 64, "data": pts.tobytes(), "is_dense": True}
    return {"kind": "NavSatFix", "stamp": ("rel", 0.0), "status": 0, "latitude": 48.137154, "longitude": 11.576124,
            "altitude": 520.0, "covariance": [0.05, 0, 0, 0, 0.05, 0, 0, 0, 0.1], "covariance_type": 2}


#: One message per sensor that must be rejected (the reader's own contract): checked every run.
BAD: dict[str, Spec] = {
    "camera": {"kind": "Image", "stamp": ("rel", 0.0), "height": 4, "width": 4, "encoding": "rgb8",
               "is_bigendian": 0, "step": 3, "data": b"\0" * 12},
    "lidar": {"kind": "PointCloud2", "stamp": ("rel", 0.0), "height": 1, "width": 4, "fields": CLOUD_FIELDS,
              "is_bigendian": False, "point_step": 16, "row_step": 80, "data": b"\0" * 64, "is_dense": True},
    "gnss": {"kind": "NavSatFix", "stamp": ("rel", 0.0), "status": 0, "latitude": math.nan, "longitude": 11.5,
             "altitude": 0.0, "covariance": [0.0] * 9, "covariance_type": 0},
}


# ---------------------------------------------------------------- saved failing cases
def _decode_fixture(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"hex"}:
            return bytes.fromhex(obj["hex"])
        if set(obj) == {"float"}:
            return float(obj["float"])
        return {k: _decode_fixture(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_fixture(v) for v in obj]
    return obj


def saved_cases() -> list[Spec]:
    """Every spec saved under ``test/fixtures/reliability/*.json`` (bytes as {"hex"}, NaN/Inf as {"float"})."""
    out = []
    for path in sorted(FIXTURES.glob("*.json")):
        for spec in json.loads(path.read_text())["cases"]:
            spec = _decode_fixture(spec)
            spec["stamp"] = tuple(spec["stamp"])
            if "fields" in spec:
                spec["fields"] = [tuple(f) for f in spec["fields"]]
            for key in ("latitude", "longitude", "altitude"):
                if key in spec:
                    spec[key] = float(spec[key])
            for key in ("covariance", "d", "k", "r", "p"):
                if key in spec:
                    spec[key] = [float(v) for v in spec[key]]
            out.append(spec)
    return out


# ---------------------------------------------------------------- the node in this process
class InProcessNode:
    """A configured and activated ``FusionNode`` on its own rclpy context (never spun: the tests call its
    callbacks and one cycle directly; the published DiagnosticArray is recorded)."""

    def __init__(self) -> None:
        self.ctx = Context()
        rclpy.init(context=self.ctx, domain_id=random.randint(1, 101))
        overrides = [Parameter("backend", value="torch"), Parameter("threads", value=1),
                     Parameter("diagnostics.window", value=60.0), Parameter("use_camera_info", value=True)]
        self.node = FusionNode(context=self.ctx, parameter_overrides=overrides)
        assert self.node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert self.node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        self.types = rclpy_types()
        self.diagnostics: list[Any] = []
        pub = self.node.diag_pub
        node = self

        class Recorder:
            def publish(self, msg: Any) -> None:
                node.diagnostics.append(msg)
                pub.publish(msg)

        self.node.diag_pub = Recorder()  # type: ignore[assignment]
        self.rng = np.random.default_rng(0)

    def feed(self, spec: Spec) -> None:
        msg = render(self.types, spec, time.time())
        if spec["kind"] == "CameraInfo":
            self.node._on_camera_info(msg)
        else:
            self.node._on_sensor(SENSOR[spec["kind"]], msg)

    def counts(self, sensor: str) -> tuple[int, int, int]:
        st_ = self.node.ingest.stats
        return st_.accepted[sensor], st_.rejected[sensor], self.node.callback_errors[sensor]

    def cycle(self) -> tuple[Any, dict[str, Any]]:
        """Feed valid messages, one per sensor and for GNSS enough fixes for a motion estimate (the
        model uses GNSS only then), run one cycle; (assessment, {status name: status})."""
        for s in MODALITIES:
            for _ in range(EgoMotionConfig().min_fixes if s == "gnss" else 1):
                self.feed(good_spec(s, self.rng))
        self.node._cycle()
        self.node._publish_diagnostics()  # the node's diagnostics timer, called directly
        msg = self.diagnostics[-1]
        return self.node.last_assessment, {s.name: s for s in msg.status}

    def close(self) -> None:
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.ctx)


@pytest.fixture(scope="module")
def inproc() -> Iterator[InProcessNode]:
    mp = pytest.MonkeyPatch()
    mp.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    n = InProcessNode()
    try:
        yield n
    finally:
        n.close()
        mp.undo()


def _check_one(n: InProcessNode, spec: Spec) -> None:
    """Feed ``spec``: no error escapes, exactly one of accepted/rejected is counted, nothing unexpected."""
    if spec["kind"] == "CameraInfo":
        n.feed(spec)
        return
    sensor = SENSOR[spec["kind"]]
    acc, rej, err = n.counts(sensor)
    n.feed(spec)
    acc2, rej2, err2 = n.counts(sensor)
    assert err2 == err, f"{sensor}: unexpected exception in the decoder: {n.node.ingest.stats.last_error}"
    assert (acc2 - acc) + (rej2 - rej) == 1


def _check_diagnostics_and_flow(n: InProcessNode, kind: str) -> None:
    """After fuzzing ``kind``: a known-bad message is rejected and counted, /diagnostics shows the total
    and WARN for that sensor, and the other sensors are used by the next cycle."""
    if kind == "CameraInfo":
        a, _ = n.cycle()
        assert a.valid and a.mask.all(), "camera info fuzz disturbed the sensors"
        return
    sensor = SENSOR[kind]
    _, rej, _ = n.counts(sensor)
    n.feed(BAD[sensor])
    assert n.counts(sensor)[1] == rej + 1, "known-bad message not rejected"
    a, status = n.cycle()
    st_ = status[f"fusion_node: {sensor}"]
    values = {kv.key: kv.value for kv in st_.values}
    assert int(values["rejected"]) == n.counts(sensor)[1] + n.counts(sensor)[2]
    assert level_of(st_) >= WARN and "rejected" in st_.message
    assert a.valid
    for i, s in enumerate(MODALITIES):
        if s != sensor:
            assert a.mask[i], f"{s} stopped flowing while {sensor} was fuzzed"


@settings(PROFILE)
@given(spec=SPECS["PointCloud2"])
def test_fuzz_node_pointcloud(inproc: InProcessNode, spec: Spec) -> None:
    _check_one(inproc, spec)


@settings(PROFILE)
@given(spec=SPECS["Image"])
def test_fuzz_node_image(inproc: InProcessNode, spec: Spec) -> None:
    _check_one(inproc, spec)


@settings(PROFILE)
@given(spec=SPECS["CompressedImage"])
def test_fuzz_node_compressed_image(inproc: InProcessNode, spec: Spec) -> None:
    _check_one(inproc, spec)


@settings(PROFILE)
@given(spec=SPECS["NavSatFix"])
def test_fuzz_node_navsatfix(inproc: InProcessNode, spec: Spec) -> None:
    _check_one(inproc, spec)


@settings(PROFILE)
@given(spec=SPECS["CameraInfo"])
def test_fuzz_node_camera_info(inproc: InProcessNode, spec: Spec) -> None:
    _check_one(inproc, spec)


@pytest.mark.parametrize("kind", ["Image", "CompressedImage", "PointCloud2", "NavSatFix", "CameraInfo"])
@settings(max_examples=1, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_rejections_on_diagnostics_and_others_keep_flowing(inproc: InProcessNode, kind: str, data: Any) -> None:
    for _ in range(20):  # some fuzz cases of this type first, so the totals include them
        _check_one(inproc, data.draw(SPECS[kind]))
    _check_diagnostics_and_flow(inproc, kind)


@pytest.mark.parametrize("spec", saved_cases(), ids=lambda s: s["kind"])
def test_saved_failing_cases(inproc: InProcessNode, spec: Spec) -> None:
    _check_one(inproc, spec)


# ---------------------------------------------------------------- the replay path
REPLAY_PROFILE = settings(PROFILE, max_examples=200 if LONG else 4)
TOPIC = {"Image": topics.CAMERA_IMAGE, "PointCloud2": topics.LIDAR_POINTS, "NavSatFix": topics.GNSS_FIX,
         "CameraInfo": topics.CAMERA_INFO}


@REPLAY_PROFILE
@given(bad=st.lists(st.one_of(*(SPECS[k] for k in TOPIC)), min_size=1, max_size=30))
def test_fuzz_replay_path(tmp_path_factory: pytest.TempPathFactory, pipeline: Any, bad: list[Spec]) -> None:
    """Malformed messages between good ones in a bag: replay never raises, counts every message, and
    once the bad ones are over every sensor is used again; the pipeline runs on every cycle."""
    t, rng, t0 = rosbags_types(), np.random.default_rng(1), 100.0
    events: list[tuple[float, str, Spec]] = []
    for k in range(80):  # 4 s of good messages: camera 20 Hz, LiDAR and GNSS 10 Hz
        tk = t0 + 0.05 * k
        for s in MODALITIES:
            if s == "camera" or k % 2 == 0:
                events.append((tk, SENSOR_TOPIC[s], good_spec(s, rng)))
    for i, spec in enumerate(bad):  # bad ones between 0.5 s and 2.0 s
        events.append((t0 + 0.5 + 1.5 * i / len(bad) + 0.001, TOPIC[spec["kind"]], spec))
    events.sort(key=lambda e: e[0])
    fed = {s: 0 for s in MODALITIES}
    bag = tmp_path_factory.mktemp("fuzzbag") / "bag"
    with BagWriter(bag) as w:
        for tk, topic, spec in events:
            w.write(topic, tk, render(t, spec, tk))
            if spec["kind"] in SENSOR:
                fed[SENSOR[spec["kind"]]] += 1
    ingest = SensorIngest(SensorSync())
    late = []
    for c in iter_cycles(bag, ingest, rate_hz=10.0):
        a = pipeline.cycle(c.snapshot)
        assert math.isfinite(a.target_speed) and a.target_speed >= 0 and a.action in set(Action)
        if c.t > t0 + 3.0:
            late.append(c.snapshot.mask)
    for s in MODALITIES:
        assert ingest.stats.accepted[s] + ingest.stats.rejected[s] == fed[s], s
    assert late and all(m.all() for m in late), "a sensor stayed masked after the malformed messages"


SENSOR_TOPIC = {"camera": TOPIC["Image"], "lidar": TOPIC["PointCloud2"], "gnss": TOPIC["NavSatFix"]}
