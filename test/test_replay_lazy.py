"""Bag-time cycles decode only the frames a cycle uses, and reading ahead in a thread changes nothing:
``iter_cycles`` against a plain reference that decodes every message as it comes (the node's path)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmm_fusion.base import topics as T
from lmm_fusion.cycle.bagfeed import detect_sensor_topics, iter_cycles
from lmm_fusion.cycle.ingest import SensorIngest
from lmm_fusion.cycle.sync import SensorSync, Snapshot
from lmm_fusion.io import create_cloud, create_compressed_image, create_fix, create_image, rosbags_types
from lmm_fusion.io.bags import BagWriter, read_bag
from lmm_fusion.io.common import make_header

T0 = 1000.0
RATE = 10.0
COV = [0.0025, 0, 0, 0, 0.0025, 0, 0, 0, 0.01]
XYZI = ("x", "y", "z", "intensity")


def _bag(path: Path, compressed: bool, bad: dict[int, str]) -> Path:
    """2 s: camera at 20 Hz (raw or JPEG), LiDAR and GNSS at 10 Hz, each camera frame with its own
    content. ``bad``: camera frame index -> how it is broken ("corrupt": does not decode, "old": stamped
    before the frame before it)."""
    types, rng = rosbags_types(), np.random.default_rng(0)
    topic = T.CAMERA_COMPRESSED if compressed else T.CAMERA_IMAGE
    with BagWriter(path) as w:
        # A first fix starts the cycle clock at T0: cycles at T0 + 0.1 j, camera frames 0.03 s clear of them.
        w.write(T.GNSS_FIX, T0, create_fix(types, make_header(types, T0, T.GNSS_FRAME), 48.1, 11.5, 520.0, 0, COV))
        for k in range(40):
            t = T0 + 0.05 * k + 0.02
            stamp = t - 0.08 if bad.get(k) == "old" else t
            rgb = np.full((24, 32, 3), k * 5, np.uint8)
            hdr = make_header(types, stamp, T.CAMERA_FRAME)
            msg = create_compressed_image(types, hdr, rgb, "jpeg", 90) if compressed else create_image(types, hdr, rgb)
            if bad.get(k) == "corrupt":
                if compressed:
                    msg.format = "16UC1; compressedDepth"
                else:
                    msg.step = 10  # shorter than a row: refused by read_image
            w.write(topic, t, msg)
            if k % 2 == 0:
                pts = rng.uniform(-20, 20, (500, 4)).astype(np.float32)
                pts[:, 3] = rng.uniform(0, 1, 500)
                cloud = create_cloud(types, make_header(types, t + 0.002, T.LIDAR_FRAME), pts, XYZI)
                w.write(T.LIDAR_POINTS, t + 0.002, cloud)
                fix = create_fix(types, make_header(types, t + 0.004, T.GNSS_FRAME), 48.1 + 1e-5 * k, 11.5, 520.0,
                                 0, COV)
                w.write(T.GNSS_FIX, t + 0.004, fix)
    return path


def _reference(bag: Path) -> tuple[list[Snapshot], SensorIngest]:
    """Every message decoded as it comes (``SensorIngest.on_message``), a snapshot every period in bag time."""
    ingest = SensorIngest(SensorSync())
    sensor_of = detect_sensor_topics({m.topic: m.msgtype for m in read_bag(bag)})
    snaps: list[Snapshot] = []
    next_t = None
    for m in read_bag(bag):
        if next_t is None:
            next_t = m.stamp_sec + 1.0 / RATE
        while m.stamp_sec >= next_t:
            snaps.append(ingest.sync.snapshot(next_t))
            next_t += 1.0 / RATE
        ingest.on_message(sensor_of[m.topic], m.msg, now=m.stamp_sec)
    snaps.append(ingest.sync.snapshot(next_t))  # type: ignore[arg-type]
    return snaps, ingest


def _same(a: Snapshot, b: Snapshot) -> None:
    assert a.now == b.now and a.mask.tolist() == b.mask.tolist()
    assert a.stamps == b.stamps and a.ages == b.ages and a.frame_ids == b.frame_ids and a.reasons == b.reasons
    for s in ("camera", "lidar"):
        fa, fb = a.frames[s], b.frames[s]
        assert (fa is None) == (fb is None), s
        if fa is not None:
            np.testing.assert_array_equal(fa, fb)
    assert a.frames["gnss"] == b.frames["gnss"]


#: Broken camera frames. Odd frames are a cycle's newest (frame 5: 0.27 s, before the cycle at 0.3 s). Frame 5
#: does not decode: its cycle must get frame 4, which no cycle had decoded; 8 is out of order (refused by
#: the sync). Then 4 and 5 broken (the fallback is frame 3), and 0 to 5 (no frame at all until frame 6).
BROKEN = ({5: "corrupt", 8: "old", 21: "corrupt"}, {4: "corrupt", 5: "corrupt"}, dict.fromkeys(range(6), "corrupt"))


@pytest.mark.parametrize("broken", BROKEN)
@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("prefetch", [0, 3])
def test_cycles_equal_decoding_every_frame(tmp_path: Path, compressed: bool, prefetch: int, broken: dict[int, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bag = _bag(tmp_path / "bag", compressed, broken)
    want, ref = _reference(bag)
    decoded: list[str] = []
    real = SensorIngest.decode

    def counting(self: SensorIngest, sensor: str, msg: Any) -> Any:
        decoded.append(sensor)
        return real(self, sensor, msg)

    monkeypatch.setattr(SensorIngest, "decode", counting)
    ingest = SensorIngest(SensorSync())
    got = [c.snapshot for c in iter_cycles(bag, ingest, RATE, with_ground_truth=False, prefetch=prefetch)]
    assert len(got) == len(want) >= 19
    for a, b in zip(got, want, strict=True):
        _same(a, b)
    for s in ("camera", "lidar", "gnss"):
        assert (ingest.stats.accepted[s], ingest.stats.rejected[s]) == (ref.stats.accepted[s], ref.stats.rejected[s]), s
    assert ingest.stats.rejected["camera"] == len(broken)
    # Only what the cycles used (and the fallbacks, and the out-of-order frame) was decoded: not 40 frames.
    assert decoded.count("camera") <= len(got) + len(broken) < 40
    assert decoded.count("gnss") == 21


def test_a_corrupt_frame_no_cycle_uses_is_never_decoded(tmp_path: Path) -> None:
    """The documented difference: frame 4 is replaced by frame 5 before a cycle, so its broken data are
    never looked at: counted as accepted (by its header), where decoding every frame rejects it."""
    bag = _bag(tmp_path / "bag", True, {4: "corrupt"})
    want, ref = _reference(bag)
    ingest = SensorIngest(SensorSync())
    got = [c.snapshot for c in iter_cycles(bag, ingest, RATE, with_ground_truth=False)]
    for a, b in zip(got, want, strict=True):
        _same(a, b)
    assert ref.stats.rejected["camera"] == 1 and ingest.stats.rejected["camera"] == 0
    assert ingest.stats.accepted["camera"] == ref.stats.accepted["camera"] + 1 == 40


def test_closing_early_stops_the_reader_thread(tmp_path: Path) -> None:
    bag = _bag(tmp_path / "bag", False, {})
    it = iter_cycles(bag, SensorIngest(SensorSync()), RATE, with_ground_truth=False, prefetch=2)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "bagfeed-reader"]
    with pytest.raises(ValueError, match="prefetch"):
        next(iter_cycles(bag, SensorIngest(SensorSync()), RATE, prefetch=-1))
