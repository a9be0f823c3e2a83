"""Real-sensor conformance: one synthetic drive re-encoded as real drivers and recorders write it, replayed.

Each case rebuilds the drive's bag in one layout (``layouts.py``: LiDAR point layouts read from the
drivers' own sources, camera encodings and sizes, NavSatFix oddities, clock faults, storage and
damage) and runs it through ``lmm-fusion replay`` (:func:`~lmm_fusion.offline.replay.replay`, or the CLI
where the exit status matters). A case passes when the sensor is used and the published actions agree
with the drive's own replay (at least :data:`AGREEMENT` of the cycles), or, for bad input, when the
error names the field and value while the other sensors stay in use.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from layouts import (
    LIDAR_LAYOUTS,
    camera_edit,
    encode_cloud,
    encode_image,
    gnss_edit,
    keep,
    lidar_edit,
    replace_fields,
    restamp,
    rewrite,
    truncate_mcap,
)

from lmm_fusion import cli
from lmm_fusion.base import topics as T
from lmm_fusion.base.paths import default_model_dir
from lmm_fusion.base.rig import CameraModel, LidarModel, SensorRig
from lmm_fusion.base.vocabulary import MODALITIES
from lmm_fusion.io import read_image, read_points, rosbags_types
from lmm_fusion.io.bags import BagError, BagMessage, BagWriter, read_bag
from lmm_fusion.io.common import make_header, stamp_to_sec
from lmm_fusion.io.pointcloud import COUNT_TARGET, detect_intensity_scale, field_dtype
from lmm_fusion.offline.replay import OUTPUT_TOPICS, ReplayOptions, replay

BEAMS, COLUMNS = 16, 256
RIG = SensorRig(camera=CameraModel(320, 180), lidar=LidarModel(beams=BEAMS, columns=COLUMNS))
#: The drive every case is made from (the ``drive`` fixture of conftest): 20 cycles at 10 Hz.
DRIVE = dict(seconds=2.0, seed=5, rig=RIG)
#: Share of cycles whose published action must equal the drive's own replay (one of 20 may differ).
AGREEMENT = 0.95
#: The same for a count-valued sensor whose scale is detected rather than set: counts have no fixed range,
#: so the divisor comes from the cloud's own brightness (within 10 % of the true one here), and the model
#: is sensitive enough to intensity that 4 of the 20 cycles may differ. Set ``lidar.intensity_scale`` for
#: such a sensor to get the drive's own decisions (the ``*_scale_set`` case).
DETECTED_COUNTS_AGREEMENT = 0.75


@dataclass
class Run:
    """What one replay published: metrics.json, action per cycle time, share of cycles each modality was used."""

    metrics: dict[str, Any]
    actions: dict[int, int]  # cycle time [ms] -> action
    used: dict[str, float]

    def frames(self, sensor: str) -> dict[str, Any]:
        return dict(self.metrics["frames"][sensor])


def _outputs(out: Path, metrics: dict[str, Any]) -> Run:
    actions: dict[int, int] = {}
    used = dict.fromkeys(MODALITIES, 0)
    scenes = 0
    for m in read_bag(out):
        if m.topic == OUTPUT_TOPICS["action"]:
            actions[round(m.stamp_sec * 1e3)] = int(m.msg.action)
        elif m.topic == OUTPUT_TOPICS["scene"]:
            scenes += 1
            for s in m.msg.modalities:
                used[s.name] += bool(s.used)
    return Run(metrics, actions, {k: v / max(scenes, 1) for k, v in used.items()})


def _replay(bag: Path, out: Path, rig: SensorRig = RIG) -> Run:
    opts = ReplayOptions(model_dir=default_model_dir(), backend="torch", progress=False, rig=rig, threads=1,
                         copy_sensors=False)
    return _outputs(out, replay(bag, out, opts))


def agreement(a: Run, b: Run) -> float:
    """Share of ``b``'s cycles whose action equals ``a``'s at the same cycle time (0 for a missing one)."""
    assert b.actions, "no cycles published"
    return float(np.mean([a.actions.get(t) == act for t, act in b.actions.items()]))


@pytest.fixture(scope="module")
def original(drive: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The drive's own replay (the shipped, trained model: its decisions depend on every modality)."""
    run = _replay(drive, tmp_path_factory.mktemp("original"))
    assert len(run.actions) >= 20 and min(run.used.values()) > 0.8
    return run


def _sorted_rows(pts: np.ndarray) -> np.ndarray:
    """``(N, K)`` rows in lexicographic order (a cloud's points whatever order its layout stores them in)."""
    return pts[np.lexsort(pts.T[::-1])]


def _first(bag: Path, topic: str) -> Any:
    return next(m.msg for m in read_bag(bag, [topic]))


# ---------------------------------------------------------------- LiDAR layouts
@pytest.mark.parametrize("case", list(LIDAR_LAYOUTS))
def test_lidar_layout_replays_like_the_drive(case: str, drive: Path, original: Run, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    layout = LIDAR_LAYOUTS[case]
    bag = rewrite(drive, tmp_path / "bag", lidar_edit(layout, BEAMS, COLUMNS))
    # The layout decodes to the drive's own points (organised NaN cells dropped, any order).
    src, enc = _first(drive, T.LIDAR_POINTS), _first(bag, T.LIDAR_POINTS)
    assert enc.point_step == layout.dtype.itemsize and bool(enc.is_bigendian) == layout.bigendian
    shape = ((COLUMNS, BEAMS) if layout.firing_rows else (BEAMS, COLUMNS)) if layout.organised else (1, src.width)
    assert (enc.height, enc.width) == shape
    np.testing.assert_array_equal(_sorted_rows(read_points(enc, ("x", "y", "z"))),
                                  _sorted_rows(read_points(src, ("x", "y", "z"))))
    rig = replace(RIG, lidar=replace(RIG.lidar, intensity_scale=layout.rig_scale))
    with caplog.at_level(logging.INFO, logger="lmm_fusion.cycle.preprocess"):
        run = _replay(bag, tmp_path / "out", rig)
    frames = run.frames("lidar")
    assert frames["rejected"] == 0 and frames["accepted"] == original.frames("lidar")["accepted"], frames
    assert run.used["lidar"] >= original.used["lidar"]
    if layout.rig_scale is None:  # the unit was detected, and said so once
        assert sum("LiDAR intensity: dividing by" in r.getMessage() for r in caplog.records) == 1
    unit = float(layout.intensity(np.ones(1, np.float32))[0])  # what the driver writes for a 1.0 return
    counts = layout.rig_scale is None and unit > 255.0
    if counts:
        (line,) = [r.getMessage() for r in caplog.records if "LiDAR intensity: dividing by" in r.getMessage()]
        assert abs(float(line.split("dividing by ")[1].split()[0]) / unit - 1.0) <= 0.1, line
    assert agreement(original, run) >= (DETECTED_COUNTS_AGREEMENT if counts else AGREEMENT)


def test_intensity_scale_from_field_datatype() -> None:
    """The rule for each driver's unit, given the field's datatype (``field_dtype``) and the values."""

    types = rosbags_types()
    rng = np.random.default_rng(1)
    pts = np.column_stack([rng.uniform(2, 40, 500), rng.uniform(-5, 5, 500), rng.uniform(-1, 1, 500),
                           rng.uniform(0, 1, 500), rng.integers(0, BEAMS, 500)]).astype(np.float32)
    header = make_header(types, 1.0, T.LIDAR_FRAME)
    want = {"velodyne_vlp16_organised": 255.0, "livox_mid360": 255.0, "hesai_float32": 255.0, "hesai_uint8": 255.0}
    for case, scale in want.items():
        msg = encode_cloud(types, header, pts, LIDAR_LAYOUTS[case], BEAMS, COLUMNS, 1.0)
        inten = read_points(msg, ("intensity",))[:, 0]
        found = detect_intensity_scale(inten, field_dtype(msg))
        assert found is not None and found.scale == scale, (case, found)
    ouster = encode_cloud(types, header, pts, LIDAR_LAYOUTS["ouster_os1_counts"], BEAMS, COLUMNS, 1.0)
    counts = read_points(ouster, ("intensity",))[:, 0]
    found = detect_intensity_scale(counts, field_dtype(ouster))  # float32 counts: a count scale, not 65535
    assert found is not None and "count" in found.reason  # the 99th percentile goes where training has it
    assert found.scale == pytest.approx(np.percentile(counts[counts > 0], 99.0) / COUNT_TARGET)
    u16 = detect_intensity_scale(counts, np.dtype("<u2"))  # the same values in a uint16 field: 16-bit
    assert u16 is not None and u16.scale == 65535.0


# ---------------------------------------------------------------- camera encodings and sizes
#: Mean absolute error [0..255] allowed between a decoded frame and the frame it was encoded from.
_DECODE_ERROR = {"bgr8": 0.0, "rgb8": 0.0, "png": 0.0, "mono8": None, "jpeg": 4.0, "yuv422_yuy2": 4.0,
                 "bayer_rggb8": 12.0}


def _decode_error(kind: str, rgb: np.ndarray, size: tuple[int, int]) -> float:
    types = rosbags_types()
    ref = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR) if (rgb.shape[1], rgb.shape[0]) != size else rgb
    got = read_image(encode_image(types, make_header(types, 1.0, T.CAMERA_FRAME), ref, kind, None))
    assert got.shape == (size[1], size[0], 3) and got.dtype == np.uint8
    if kind == "mono8":
        ref = cv2.cvtColor(cv2.cvtColor(ref, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return float(np.mean(np.abs(got.astype(np.int16) - ref.astype(np.int16))))


@pytest.mark.parametrize("size", [(640, 480), (1280, 720), (1920, 1080)])
def test_every_encoding_decodes_at_every_size(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(size[0])
    # A smooth picture with edges (as a camera sees), not noise: compression and demosaicing errors stay small.
    small = rng.integers(0, 256, (size[1] // 40, size[0] // 40, 3), dtype=np.uint8)
    rgb = cv2.resize(small, size, interpolation=cv2.INTER_CUBIC)
    for kind, bound in _DECODE_ERROR.items():
        err = _decode_error(kind, rgb, size)
        assert err <= (bound if bound is not None else 0.0), (kind, size, err)


@pytest.mark.parametrize("kind, size", [
    ("bgr8", None), ("png", None), ("mono8", None), ("bayer_rggb8", None),
    ("jpeg", (1920, 1080)), ("rgb8", (640, 480)), ("yuv422_yuy2", (1280, 720))])
def test_camera_encoding_replays(kind: str, size: tuple[int, int] | None, drive: Path, original: Run,
                                 tmp_path: Path) -> None:
    bag = rewrite(drive, tmp_path / "bag", camera_edit(kind, size))
    run = _replay(bag, tmp_path / "out")
    frames = run.frames("camera")
    assert frames["rejected"] == 0 and frames["accepted"] == original.frames("camera")["accepted"], frames
    assert run.used["camera"] >= original.used["camera"]
    assert "camera" not in run.metrics.get("warnings", {})  # camera info rewritten to the image size
    assert run.metrics["sensor_topics"]["camera"] == (T.CAMERA_COMPRESSED if kind in ("jpeg", "png")
                                                       else T.CAMERA_IMAGE)
    if size is None and _DECODE_ERROR[kind] == 0.0:  # lossless at the drive's size: the same decisions
        assert agreement(original, run) >= AGREEMENT
    else:
        assert len(run.actions) == len(original.actions)


# ---------------------------------------------------------------- GNSS
def test_gnss_unknown_covariance_is_used(drive: Path, original: Run, tmp_path: Path) -> None:
    """COVARIANCE_TYPE_UNKNOWN with a zero covariance (many receivers): accepted, same ego motion."""
    unknown = gnss_edit(lambda k, fix: replace_fields(fix, position_covariance=np.zeros(9),
                                                      position_covariance_type=0))
    run = _replay(rewrite(drive, tmp_path / "bag", unknown), tmp_path / "out")
    assert run.frames("gnss")["rejected"] == 0 and run.used["gnss"] >= original.used["gnss"]
    assert agreement(original, run) >= AGREEMENT


def test_bad_fixes_rejected_naming_the_field_others_used(drive: Path, original: Run, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """No fix (status -1), NaN latitude/longitude and a 1 km jump: each fix refused with its reason, counted;
    camera and LiDAR used as before, and the ego motion still follows the good fixes."""
    types = rosbags_types()

    def bad(k: int, fix: Any) -> Any | None:
        if k in (5, 6, 7):
            return replace_fields(fix, status=types.NavSatStatus(status=-1, service=1))
        if k in (10, 11):
            return replace_fields(fix, latitude=float("nan"), longitude=float("nan"))
        if k == 15:
            return replace_fields(fix, latitude=fix.latitude + 1000.0 / 111_320.0)  # 1 km north
        return None

    bag = rewrite(drive, tmp_path / "bag", gnss_edit(bad))
    with caplog.at_level(logging.DEBUG, logger="lmm_fusion.cycle.ingest"):
        run = _replay(bag, tmp_path / "out")
    gnss = run.frames("gnss")
    assert gnss["rejected"] == 6 and gnss["accepted"] == original.frames("gnss")["accepted"] - 6, gnss
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected gnss")]
    assert sum("status.status: -1 (NO_FIX)" in m for m in logged) == 3, logged
    assert sum("latitude: nan is not finite" in m for m in logged) == 2, logged
    assert sum("implausible jump" in m for m in logged) == 1, logged
    assert "last_error" in gnss and "gnss" not in run.metrics.get("frame_errors", {})
    for sensor in ("camera", "lidar"):
        assert run.used[sensor] >= original.used[sensor]
    assert run.used["gnss"] > 0.5
    assert agreement(original, run) >= 0.8  # a second of GNSS missing changes a few speed-dependent cycles


# ---------------------------------------------------------------- clocks, missing sensors, storage, damage
def test_lidar_stamps_going_backwards(drive: Path, original: Run, tmp_path: Path) -> None:
    """The LiDAR clock steps back 0.35 s mid-drive: the clouds stamped before the newest one are refused as
    out of order (counted, said), the LiDAR comes back once its stamps pass it, the others never stop."""
    count = [0]

    def back(m: BagMessage) -> list[tuple[str, float, Any]]:
        if m.topic != T.LIDAR_POINTS:
            return keep(m)
        count[0] += 1
        if count[0] <= 8:
            return keep(m)
        return [(m.topic, m.stamp_sec, restamp(m.msg, stamp_to_sec(m.msg.header.stamp) - 0.35))]

    run = _replay(rewrite(drive, tmp_path / "bag", back), tmp_path / "out")
    lidar = run.frames("lidar")
    assert 1 <= lidar["rejected"] <= 5 and "out of order" in lidar.get("last_error", ""), lidar
    assert run.used["camera"] >= original.used["camera"] and run.used["gnss"] >= original.used["gnss"]
    assert run.used["lidar"] >= 0.6 and len(run.actions) == len(original.actions)


def test_duplicated_stamps_are_dropped(drive: Path, original: Run, tmp_path: Path) -> None:
    """Every camera and LiDAR message recorded twice (same stamp): the copies are refused, decisions unchanged."""
    def twice(m: BagMessage) -> list[tuple[str, float, Any]]:
        rows = keep(m)
        return rows * 2 if m.topic in (T.CAMERA_IMAGE, T.LIDAR_POINTS) else rows

    run = _replay(rewrite(drive, tmp_path / "bag", twice), tmp_path / "out")
    for sensor in ("camera", "lidar"):
        f = run.frames(sensor)
        assert f["received"] == 2 * f["accepted"] == 2 * original.frames(sensor)["accepted"], (sensor, f)
    assert agreement(original, run) >= AGREEMENT


def test_missing_modality(drive: Path, original: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bag without GNSS: replayed with GNSS masked (and said), camera and LiDAR used in every cycle."""
    bag = rewrite(drive, tmp_path / "bag", lambda m: [] if m.topic == T.GNSS_FIX else keep(m))
    with caplog.at_level(logging.WARNING, logger="lmm_fusion.offline.replay"):
        run = _replay(bag, tmp_path / "out")
    assert any("no topic for gnss" in r.getMessage() for r in caplog.records)
    assert "gnss" not in run.metrics["sensor_topics"] and run.used["gnss"] == 0.0
    assert run.used["camera"] >= original.used["camera"] and run.used["lidar"] >= original.used["lidar"]
    assert len(run.actions) == len(original.actions)


def test_sqlite3_storage(drive: Path, original: Run, tmp_path: Path) -> None:
    run = _replay(rewrite(drive, tmp_path / "bag", keep, storage="sqlite3"), tmp_path / "out")
    assert list((tmp_path / "bag").glob("*.db3")) and agreement(original, run) == 1.0
    assert run.metrics["frames"] == original.metrics["frames"]


def _cli_replay(bag: Path, out: Path) -> int:
    return cli.main(["replay", str(bag), "--out", str(out), "--backend", "torch", "--threads", "1",
                     "--no-sensors", "--no-progress"])


def test_truncated_mcap_keeps_the_cycles_before_the_cut(drive: Path, original: Run, tmp_path: Path) -> None:
    bag = truncate_mcap(drive, tmp_path / "bag", 0.6)  # mid-chunk: the summary and the tail are gone
    out = tmp_path / "out"
    assert _cli_replay(bag, out) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert "truncated" in metrics["ended_early"]["reason"] or "ends in the middle" in metrics["ended_early"]["reason"]
    run = _outputs(out, metrics)
    assert 5 <= len(run.actions) < len(original.actions)
    assert agreement(original, run) >= AGREEMENT  # the cycles before the cut are those of the whole drive
    with pytest.raises(BagError, match="bag"):
        replay(bag, tmp_path / "again", ReplayOptions(model_dir=default_model_dir(), backend="torch",
                                                      progress=False, rig=RIG, threads=1, copy_sensors=False))


def test_empty_bag_is_an_error(tmp_path: Path) -> None:
    with BagWriter(tmp_path / "bag"):
        pass
    out = tmp_path / "out"
    assert _cli_replay(tmp_path / "bag", out) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert "no messages" in metrics["ended_early"]["reason"] and metrics["cycles"]["total"] == 0

