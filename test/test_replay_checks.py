"""Nothing silent in replay: ambiguous sensor topics, empty bags, CameraInfo size, unsynchronised clocks."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmm_fusion.base import topics as T
from lmm_fusion.base.rig import CameraModel, LidarModel, SensorRig
from lmm_fusion.cycle.bagfeed import detect_sensor_topics, first_message
from lmm_fusion.io import create_image, rosbags_types
from lmm_fusion.io.bags import BagError, BagReader, BagWriter, read_bag
from lmm_fusion.io.common import make_header, stamp_to_sec
from lmm_fusion.offline import replay as replay_mod
from lmm_fusion.offline.replay import ReplayOptions, replay

RIG = SensorRig(camera=CameraModel(320, 180), lidar=LidarModel(beams=16, columns=256))
DRIVE = dict(seconds=1.5, seed=7, rig=RIG)


def _image(types: Any, t: float, encoding: str) -> Any:
    """A 4x6 Image; ``16UC1`` as a depth camera writes it (2 bytes per pixel, one channel)."""
    header = make_header(types, t, "camera_optical")
    if encoding == "16UC1":
        depth = np.full((4, 6), 1500, np.uint16)
        return types.Image(header=header, height=4, width=6, encoding="16UC1",
                           is_bigendian=0, step=12, data=depth.view(np.uint8).reshape(-1).copy())
    return create_image(types, header, np.zeros((4, 6, 3), np.uint8), encoding=encoding)


def _bag(path: Path, topics: dict[str, str], n: int = 3) -> Path:
    """A bag with ``n`` images per topic (topic -> encoding)."""
    types = rosbags_types()
    with BagWriter(path) as w:
        for i in range(n):
            for topic, enc in topics.items():
                w.write(topic, 1.0 + 0.1 * i, _image(types, 1.0 + 0.1 * i, enc))
    return path


def _detect(path: Path) -> dict[str, str]:
    with BagReader(path) as r:
        return detect_sensor_topics(r.topics, None, lambda t: first_message(r, t))


def test_two_colour_cameras_are_refused_with_the_candidates(tmp_path: Path) -> None:
    bag = _bag(tmp_path / "bag", {"/left/image": "rgb8", "/right/image": "bgr8"})
    with pytest.raises(ValueError, match="camera: 2 candidate topics") as info:
        _detect(bag)
    assert "/left/image" in str(info.value) and "/right/image" in str(info.value)
    assert "--camera-topic" in str(info.value)
    # replay refuses before loading a model; the CLI exits with 2 and the message
    with pytest.raises(ValueError, match="/right/image"):
        replay(bag, tmp_path / "out", ReplayOptions(progress=False))
    # an explicit topic resolves it
    with BagReader(bag) as r:
        assert detect_sensor_topics(r.topics, {"camera": "/right/image"}) == {"/right/image": "camera"}


def test_depth_and_colour_take_the_colour_one_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A RealSense bag: 16-bit depth and colour Image topics; the depth one sorts first."""
    bag = _bag(tmp_path / "bag", {"/camera/aligned_depth/image_raw": "16UC1", "/camera/color/image_raw": "rgb8"})
    with caplog.at_level(logging.WARNING, logger="lmm_fusion.cycle.bagfeed"):
        assert _detect(bag) == {"/camera/color/image_raw": "camera"}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "/camera/color/image_raw" in warned[0] and "16UC1" in warned[0]


def test_an_empty_bag_is_an_error(tmp_path: Path, model_dir: Path) -> None:
    bag = tmp_path / "empty"
    with BagWriter(bag):
        pass
    opts = ReplayOptions(model_dir=model_dir, backend="torch", progress=False, threads=1)
    with pytest.raises(BagError, match="no messages"):
        replay(bag, tmp_path / "out", opts)
    parser = argparse.ArgumentParser()
    replay_mod.add_arguments(parser)
    args = parser.parse_args([str(bag), "--out", str(tmp_path / "out2"), "--no-progress", "--model",
                              str(model_dir), "--backend", "torch"])
    assert replay_mod.run(args) == 1


def _derive(src: Path, dst: Path, topic: str, change: Any) -> Path:
    """Copy a bag with every message of ``topic`` replaced by ``change(msg)``."""
    with BagWriter(dst) as w:
        for m in read_bag(src):
            w.write(m.topic, m.stamp_sec, change(m.msg) if m.topic == topic else m.msg)
    return dst


def _replay(bag: Path, out: Path, model_dir: Path) -> dict[str, Any]:
    return replay(bag, out, ReplayOptions(model_dir=model_dir, backend="torch", progress=False, rig=RIG, threads=1))


def test_a_synthetic_drive_has_no_warnings(drive: Path, model_dir: Path, tmp_path: Path) -> None:
    assert "warnings" not in _replay(drive, tmp_path / "out", model_dir)


def test_camera_info_size_mismatch_is_reported(drive: Path, model_dir: Path, tmp_path: Path) -> None:
    bag = _derive(drive, tmp_path / "bag", T.CAMERA_INFO, lambda m: dataclasses.replace(m, width=640, height=360))
    m = _replay(bag, tmp_path / "out", model_dir)
    (warning,) = m["warnings"]["camera"]
    assert "image 320x180" in warning and "camera_info 640x360" in warning
    assert m["frames"]["camera"]["accepted"] > 0  # still used, as the node does
    assert m["cycles"]["degraded"] < m["cycles"]["total"]


def test_unsynchronised_sensor_clock_is_reported(
    drive: Path, model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    types = rosbags_types()

    def behind(msg: Any) -> Any:
        return dataclasses.replace(msg, header=make_header(types, stamp_to_sec(msg.header.stamp) - 1e6,
                                                           msg.header.frame_id))

    bag = _derive(drive, tmp_path / "bag", T.LIDAR_POINTS, behind)
    with caplog.at_level(logging.WARNING):
        m = _replay(bag, tmp_path / "out", model_dir)
    assert list(m["warnings"]) == ["lidar"]
    (why,) = m["warnings"]["lidar"]
    assert why.startswith("clock mismatch: stamps 1e+06 s behind the bag time"), why
    assert m["cycles"]["degraded"] == m["cycles"]["total"]  # masked in every cycle: now with a reason
    assert any("lidar: clock mismatch" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("flags", "copied"), [([], False), (["--no-sensors"], False), (["--copy-sensors"], True)])
def test_sensor_copy_flags(flags: list[str], copied: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The output bag refers to the inputs by default; --copy-sensors copies them, --no-sensors is the default."""
    seen: list[ReplayOptions] = []
    monkeypatch.setattr(replay_mod, "replay", lambda bags, out, opts: seen.append(opts) or {})
    monkeypatch.setattr(replay_mod, "_summary", lambda m: "")
    parser = argparse.ArgumentParser()
    replay_mod.add_arguments(parser)
    assert replay_mod.run(parser.parse_args([str(tmp_path), "--out", str(tmp_path / "out"), *flags])) == 0
    assert seen[0].copy_sensors is copied and ReplayOptions().copy_sensors is False
