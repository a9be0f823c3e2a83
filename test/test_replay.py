"""Offline replay end to end on tiny synthetic drives: determinism, readable outputs, masking, storages."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from lmm_fusion.base import topics as T
from lmm_fusion.base.rig import CameraModel, LidarModel, SensorRig
from lmm_fusion.cycle.bagfeed import GROUND_TRUTH_TOPICS
from lmm_fusion.io import create_compressed_image, read_image, rosbags_types
from lmm_fusion.io.bags import BagWriter, read_bag
from lmm_fusion.io.common import stamp_to_sec
from lmm_fusion.offline.replay import OUTPUT_TOPICS, WALL_CLOCK_KEYS, ReplayOptions, replay

RIG = SensorRig(camera=CameraModel(320, 180), lidar=LidarModel(beams=16, columns=256))
SECONDS = 2.5
#: The module's synthetic drive (the ``drive`` fixture of conftest).
DRIVE = dict(seconds=SECONDS, seed=3, rig=RIG)


MODEL_DIR: Path | None = None  # set by the model fixture


def _opts(**kw: Any) -> ReplayOptions:
    # One thread: much faster than two on a shared, busy CPU (no spinning workers).
    return ReplayOptions(model_dir=MODEL_DIR, backend="torch", progress=False, rig=RIG, threads=1, **kw)


@pytest.fixture(autouse=True, scope="module")
def model(model_dir: Path) -> Path:
    """The shared seeded random model (conftest) as the model of every replay here (replay needs any model)."""
    global MODEL_DIR
    MODEL_DIR = model_dir
    return MODEL_DIR


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads() -> Any:
    """The torch backend sets the process-wide thread count; give other test modules theirs back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _derive(
    src: Path,
    dst: Path,
    storage: str,
    drop: set[str],
    rename: dict[str, str] | None = None,
    compress_camera: bool = False,
) -> Path:
    """Copy a bag, dropping topics, renaming others and optionally JPEG-compressing the camera
    (the shape of a real bag: other topic names, CompressedImage, no ground truth)."""
    rename = rename or {}
    types = rosbags_types()
    with BagWriter(dst, storage=storage) as w:
        for m in read_bag(src):
            if m.topic in drop:
                continue
            msg = m.msg
            if compress_camera and m.topic == T.CAMERA_IMAGE:
                msg = create_compressed_image(types, msg.header, read_image(msg), quality=80)
            w.write(rename.get(m.topic, m.topic), m.stamp_sec, msg)
    return dst


@pytest.fixture(scope="module")
def runs(drive: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same bag replayed twice: the first with rendering and the sensors copied into the output bag, read
    ahead in a thread (the default); the second with the default output bag, read in line. Neither may
    change any output."""
    base = tmp_path_factory.mktemp("replay")
    replay(drive, base / "a", _opts(render=True, keyframe_every_s=1.0, copy_sensors=True))
    replay(drive, base / "b", _opts(prefetch=0))
    return base / "a", base / "b"


def _mcap_messages(path: Path) -> list[tuple[str, int, bytes]]:
    from mcap.reader import make_reader

    with path.open("rb") as f:
        return [(ch.topic, msg.log_time, bytes(msg.data)) for _, ch, msg in make_reader(f).iter_messages()]


def _without_wall_clock(m: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in m.items() if k not in WALL_CLOCK_KEYS}
    out.pop("outputs", None)  # holds the output path
    out.pop("render", None)
    return out


def test_replay_is_deterministic(runs: tuple[Path, Path]) -> None:
    a, b = runs
    msgs_a, msgs_b = _mcap_messages(a / "outputs.mcap"), _mcap_messages(b / "outputs.mcap")
    outputs = [m for m in msgs_a if m[0] in OUTPUT_TOPICS.values()]
    assert len(outputs) >= 4 * 20
    sensors = {T.CAMERA_IMAGE, T.LIDAR_POINTS, T.GNSS_FIX}
    assert {m[0] for m in msgs_a} & sensors == sensors and not {m[0] for m in msgs_b} & sensors
    # Byte for byte the same messages in the same order, the copied sensors aside.
    assert [m for m in msgs_a if m[0] not in sensors] == msgs_b
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    assert _without_wall_clock(ma) == _without_wall_clock(mb)
    assert {k: v for k, v in ma["outputs"]["messages"].items() if k not in sensors} == mb["outputs"]["messages"]


def test_outputs_readable_by_mcap_with_types_and_stamps(runs: tuple[Path, Path]) -> None:
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    expected = {
        OUTPUT_TOPICS["scene"]: "lmm_fusion/msg/SceneAssessment",
        OUTPUT_TOPICS["action"]: "lmm_fusion/msg/ActionSuggestion",
        OUTPUT_TOPICS["occupancy"]: "nav_msgs/msg/OccupancyGrid",
        OUTPUT_TOPICS["markers"]: "visualization_msgs/msg/MarkerArray",
    }
    seen: dict[str, list[int]] = {t: [] for t in expected}
    with (runs[0] / "outputs.mcap").open("rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        for schema, channel, message, decoded in reader.iter_decoded_messages(topics=list(expected)):
            assert schema.name == expected[channel.topic]
            header = (
                decoded.markers[0].header if channel.topic == OUTPUT_TOPICS["markers"] else decoded.header
            )
            assert header.frame_id == T.BASE_FRAME
            stamp_ns = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
            # Logged at the cycle's bag time; stamped with the newest sensor frame the cycle used.
            assert message.log_time - 1_000_000_000 < stamp_ns <= message.log_time + 1
            seen[channel.topic].append(message.log_time)
    counts = {t: len(v) for t, v in seen.items()}
    assert len(set(counts.values())) == 1 and counts[OUTPUT_TOPICS["scene"]] >= 20
    times = np.diff(np.array(seen[OUTPUT_TOPICS["scene"]])) * 1e-9
    assert np.allclose(times, 0.1, atol=1e-6)  # 10 Hz in bag time


def test_outputs_readable_by_rosbags_with_inputs_to_view_them(runs: tuple[Path, Path], drive: Path) -> None:
    out = runs[0]
    msgs = list(read_bag(out))  # the output folder is itself a rosbag2 (metadata.yaml + outputs.mcap)
    types = {m.topic: m.msgtype for m in msgs}
    assert types[OUTPUT_TOPICS["scene"]] == "lmm_fusion/msg/SceneAssessment"
    for topic in (T.CAMERA_IMAGE, T.LIDAR_POINTS, T.TF_STATIC):
        assert topic in types
    scenes = [m for m in msgs if m.topic == OUTPUT_TOPICS["scene"]]
    assert all(-1e-6 < m.stamp_sec - stamp_to_sec(m.msg.header.stamp) < 1.0 for m in scenes)
    assert json.loads((out / "metrics.json").read_text())["outputs"]["sensors_copied"] is True
    assert all(m.msg.valid for m in scenes[5:])
    # Inputs are copied unchanged, at their recorded times (float seconds: sub-microsecond rounding).
    src = [m for m in read_bag(drive, [T.LIDAR_POINTS])]
    dst = [m for m in msgs if m.topic == T.LIDAR_POINTS]
    assert len(src) == len(dst) > 0
    assert np.allclose([m.stamp_sec for m in src], [m.stamp_sec for m in dst], rtol=0, atol=1e-6)
    assert all(bytes(x.msg.data) == bytes(y.msg.data) for x, y in zip(src, dst))


def test_metrics_with_ground_truth(runs: tuple[Path, Path]) -> None:
    m = json.loads((runs[0] / "metrics.json").read_text())
    assert m["cycles"]["total"] == pytest.approx(SECONDS * 10, abs=2)
    assert m["frames"]["lidar"]["accepted"] >= 20 and m["frames"]["camera"]["accepted"] >= 40
    lat = m["timing"]["latency_ms"]
    for stage in ("preprocess", "inference", "total", "write", "render"):
        assert 0 <= lat[stage]["p50"] <= lat[stage]["p99"]
    assert m["timing"]["throughput_x_realtime"] > 0
    acc = m["accuracy"]
    overall = acc["overall"]
    assert overall["n"] >= 20
    for k in ("action_accuracy", "risk_accuracy", "light_accuracy", "occupancy_iou"):
        assert 0.0 <= overall[k] <= 1.0
    for k in ("target_speed_mae", "ttc_mae", "distance_mae"):
        assert overall[k] >= 0.0
    assert sum(t["n"] for t in acc["per_scenario"].values()) == overall["n"]
    assert sum(t["n"] for t in acc["per_window"]["windows"].values()) == overall["n"]


def test_render_outputs(runs: tuple[Path, Path]) -> None:
    out = runs[0]
    m = json.loads((out / "metrics.json").read_text())
    video = out / "replay.mp4"
    assert video.stat().st_size > 0
    cap = cv2.VideoCapture(str(video))
    ok, frame = cap.read()
    n = 1 if ok else 0
    while ok:
        ok, _ = cap.read()
        n += ok
    cap.release()
    assert frame is not None and n == m["cycles"]["total"] == m["render"]["frames"]
    keys = sorted((out / "keyframes").glob("*.png"))
    assert len(keys) == math.floor(SECONDS - 0.1) + 1  # every 1 s of bag time from the first cycle
    assert cv2.imread(str(keys[0])).shape == frame.shape
    timeline = cv2.imread(str(out / "timeline.png"))
    assert timeline is not None and timeline.shape[:2] == (900, 1300)


def test_real_bag_shape_sqlite_compressed_renamed_no_ground_truth(drive: Path, tmp_path: Path) -> None:
    bag = _derive(
        drive,
        tmp_path / "real",
        "sqlite3",
        drop=set(GROUND_TRUTH_TOPICS),
        rename={
            T.CAMERA_IMAGE: "/front/image/compressed",
            T.LIDAR_POINTS: "/velodyne_points",
            T.GNSS_FIX: "/fix",
        },
        compress_camera=True,
    )
    m = replay(bag, tmp_path / "out", _opts(copy_sensors=True))  # copied from SQLite3: deserialised messages
    assert "accuracy" not in m
    assert m["sensor_topics"] == {
        "camera": "/front/image/compressed",
        "gnss": "/fix",
        "lidar": "/velodyne_points",
    }
    assert m["frames"]["camera"]["accepted"] >= 40 and m["frames"]["camera"]["rejected"] == 0
    assert m["cycles"]["degraded"] <= 3  # only while the GNSS motion estimate starts up
    out = list(read_bag(tmp_path / "out", [OUTPUT_TOPICS["scene"], "/front/image/compressed"]))
    assert {x.msgtype for x in out} == {
        "lmm_fusion/msg/SceneAssessment",
        "sensor_msgs/msg/CompressedImage",
    }


@pytest.mark.parametrize(("sensor", "topic"), [("lidar", T.LIDAR_POINTS), ("gnss", T.GNSS_FIX)])
def test_missing_sensor_replays_masked_and_degraded(
    drive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], sensor: str, topic: str
) -> None:
    from lmm_fusion.base.vocabulary import MODALITIES
    from lmm_fusion.cli import main

    bag = _derive(drive, tmp_path / f"no{sensor}", "mcap", drop={topic})
    assert (
        main(
            [
                "replay",
                str(bag),
                "--out",
                str(tmp_path / "out"),
                "--backend",
                "torch",
                "--json",
                "--threads",
                "1",
                "--no-progress",
                "--no-sensors",
                "--model",
                str(MODEL_DIR),
            ]
        )
        == 0
    )
    m = json.loads(capsys.readouterr().out)
    assert m["frames"][sensor]["received"] == 0 and m["ended_early"] is None
    others = [s for s in MODALITIES if s != sensor]
    assert all(m["frames"][s]["accepted"] > 0 for s in others)
    assert sensor not in m["sensor_topics"]
    assert m["cycles"]["degraded"] == m["cycles"]["total"] > 0
    assert "accuracy" in m  # ground truth is still there
    scenes = [x.msg for x in read_bag(tmp_path / "out", [OUTPUT_TOPICS["scene"]])]
    k = MODALITIES.index(sensor)
    assert scenes and all(s.degraded for s in scenes)
    assert all(not s.modalities[k].used and s.modalities[k].name == sensor for s in scenes)
    assert any(s.valid and all(s.modalities[MODALITIES.index(o)].used for o in others) for s in scenes)
    copied = set(m["outputs"]["messages"])  # --no-sensors: outputs, /tf_static and truth only
    assert T.CAMERA_IMAGE not in copied and T.LIDAR_POINTS not in copied and T.GNSS_FIX not in copied
    assert T.TF_STATIC in copied


def test_missing_bag_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        replay(tmp_path / "nope", tmp_path / "out", _opts())


def test_passthrough_does_not_move_the_cycle_clock(drive: Path) -> None:
    from lmm_fusion.cycle.bagfeed import iter_cycles
    from lmm_fusion.cycle.ingest import SensorIngest
    from lmm_fusion.cycle.sync import SensorSync

    plain = [c.t for c in iter_cycles(drive, SensorIngest(SensorSync(), RIG), 10.0)]
    seen: list[str] = []
    copied = iter_cycles(
        drive,
        SensorIngest(SensorSync(), RIG),
        10.0,
        passthrough=[T.TF_STATIC, T.CAMERA_INFO],
        on_passthrough=lambda m: seen.append(m.topic),
    )
    assert [c.t for c in copied] == plain
    assert seen.count(T.TF_STATIC) == 1 and seen.count(T.CAMERA_INFO) >= 40


def _damage(src: Path, dst: Path, how: str) -> Path:
    """A copy of the bag folder ``src`` damaged the way ``how`` says (files as a crash, a cut copy or a
    disk error leave them)."""
    shutil.copytree(src, dst)
    (storage,) = [p for p in dst.iterdir() if p.suffix in (".mcap", ".db3")]
    data = bytearray(storage.read_bytes())
    if how == "truncated":  # cut at 60 %
        storage.write_bytes(bytes(data[: int(len(data) * 0.6)]))
    elif how == "garbage_appended":
        storage.write_bytes(bytes(data) + b"\x00\xffgarbage" * 1000)
    elif how == "pages_overwritten":  # SQLite pages from 60 % on destroyed
        for frac in (0.6, 0.7, 0.8):
            at = int(len(data) * frac) // 4096 * 4096
            data[at : at + 4096] = b"\xff" * 4096
        storage.write_bytes(bytes(data))
    elif how == "record_size_corrupt":  # a message record in a middle chunk claims 2**64-1 bytes
        from mcap.reader import make_reader

        with storage.open("rb") as f:
            chunks = make_reader(f).get_summary().chunk_indexes
        first_record = chunks[len(chunks) // 2].chunk_start_offset + 49  # uncompressed chunk header
        data[first_record + 1 : first_record + 9] = b"\xff" * 8
        storage.write_bytes(bytes(data))
    elif how == "no_metadata":
        (dst / "metadata.yaml").unlink()
    elif how == "not_a_bag":
        shutil.rmtree(dst)
        dst.mkdir()
        (dst / "notes.txt").write_text("not a bag\n")
    return dst


@pytest.fixture(scope="module")
def drive_sqlite(drive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _derive(drive, tmp_path_factory.mktemp("sqlite") / "bag", "sqlite3", drop=set())


# storage, damage, file named by the error (None = no error), cycles kept: "none" | "some" | "all"
DAMAGE_CASES = [
    ("mcap", "truncated", ".mcap", "some"),
    ("mcap", "garbage_appended", ".mcap", "all"),  # read sequentially to the end, still reported
    ("mcap", "record_size_corrupt", ".mcap", "some"),  # index intact, a size field inside a chunk not
    ("mcap", "no_metadata", "metadata.yaml", "none"),
    ("mcap", "not_a_bag", "metadata.yaml", "none"),
    ("sqlite3", "truncated", ".db3", "none"),  # SQLite cannot open a cut database at all
    ("sqlite3", "pages_overwritten", ".db3", "some"),
    ("sqlite3", "garbage_appended", None, "all"),  # SQLite ignores bytes after its last page
]


@pytest.mark.parametrize(("storage", "how", "named", "kept"), DAMAGE_CASES)
def test_damaged_bag_keeps_what_was_read_and_fails_clearly(
    drive: Path,
    drive_sqlite: Path,
    runs: tuple[Path, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    storage: str,
    how: str,
    named: str | None,
    kept: str,
) -> None:
    from lmm_fusion.cli import main

    full = json.loads((runs[1] / "metrics.json").read_text())["cycles"]["total"]
    bag = _damage(drive if storage == "mcap" else drive_sqlite, tmp_path / "bag", how)
    out = tmp_path / "out"
    args = ["replay", str(bag), "--out", str(out), "--backend", "torch", "--threads", "1", "--no-progress",
            "--model", str(MODEL_DIR)]
    rc = main(args)
    m = json.loads((out / "metrics.json").read_text())
    ended = m["ended_early"]
    if named is None:
        assert rc == 0 and ended is None
    else:
        assert rc == 1 and ended is not None
        assert Path(ended["bag"]).name.endswith(named) and Path(ended["bag"]).parent == bag
        assert ended["reason"] and str(ended["bag"]) in ended["error"]
        assert any(str(bag) in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    # The output bag is closed and valid (MCAP summary, rosbag2 metadata) with one output per cycle.
    from mcap.reader import make_reader

    with (out / "outputs.mcap").open("rb") as f:
        summary = make_reader(f).get_summary()
    assert summary is not None
    scenes = [x.msg for x in read_bag(out, [OUTPUT_TOPICS["scene"]])]
    cycles = m["cycles"]["total"]
    assert len(scenes) == cycles
    # "all": every message was read (when the damage is reported at the very end, the closing cycle
    # after the last message is not run).
    all_read = cycles == full if named is None else cycles == full - 1
    assert {"none": cycles == 0, "some": 0 < cycles < full - 1, "all": all_read}[kept], (cycles, full)
    if kept == "some":
        assert ended["messages_read"] > 0 and ended["last_stamp_s"] >= stamp_to_sec(scenes[-1].header.stamp)
        assert 0 < m["bag_duration_s"] < SECONDS


def test_damaged_bag_raises_bag_error_after_writing_results(drive: Path, tmp_path: Path) -> None:
    from lmm_fusion.io.bags import BagError
    from lmm_fusion.io.errors import MessageError

    bag = _damage(drive, tmp_path / "bag", "truncated")
    with pytest.raises(BagError, match="truncated") as info:
        replay(bag, tmp_path / "out", _opts())
    assert isinstance(info.value, MessageError) and info.value.path.suffix == ".mcap"
    assert str(info.value.path) in str(info.value)
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["ended_early"]["messages_read"] == info.value.messages_read > 0
    assert m["cycles"]["total"] > 0


def test_mapped_mcap_reading_matches_rosbags(drive: Path) -> None:
    """The zero-copy reader of uncompressed MCAP chunks delivers what rosbags reads, in the same order."""
    from rosbags.highlevel import AnyReader

    from lmm_fusion.io.bags import BagReader

    with AnyReader([drive]) as ref:
        expected = [(c.topic, t, bytes(raw)) for c, t, raw in ref.messages()]
    with BagReader(drive) as reader:
        assert reader._bags[0].mapped is not None  # the path under test
        got = [(m.topic, round(m.stamp_sec * 1e9), bytes(m.raw)) for m in reader.messages()]
        only = [m.topic for m in reader.messages([T.GNSS_FIX])]
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert all(abs(g[1] - e[1]) <= 512 and g[2] == e[2] for g, e in zip(got, expected))  # float64 seconds
    assert only == [T.GNSS_FIX] * sum(e[0] == T.GNSS_FIX for e in expected)


def test_default_output_bag_refers_to_its_inputs(runs: tuple[Path, Path], drive: Path) -> None:
    """Without --copy-sensors the output bag holds the outputs and the small inputs to view them, and names
    the input bags (metadata.yaml custom_data and metrics.json) to be played or opened beside it."""
    import yaml

    out = runs[1]
    topics = {m.topic for m in read_bag(out)}
    assert set(OUTPUT_TOPICS.values()) | {T.TF_STATIC} <= topics
    assert not topics & {T.CAMERA_IMAGE, T.LIDAR_POINTS, T.GNSS_FIX}
    custom = yaml.safe_load((out / "metadata.yaml").read_text())["rosbag2_bagfile_information"]["custom_data"]
    assert json.loads(custom["lmm_fusion.input_bags"]) == [str(drive.resolve())]
    assert custom["lmm_fusion.sensors_copied"] == "false"
    m = json.loads((out / "metrics.json").read_text())
    assert m["outputs"]["input_bags"] == [str(drive.resolve())] and m["outputs"]["sensors_copied"] is False
    # Under a tenth of the input bag: only the node's outputs and the small inputs.
    size = lambda p: sum(f.stat().st_size for f in p.iterdir() if f.is_file())  # noqa: E731
    assert size(out) < 0.1 * size(drive)
