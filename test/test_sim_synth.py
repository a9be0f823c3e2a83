"""Synthesised drives: topics, types, rates, frames, stamps, ground truth, determinism, readers, CLIs."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from lmm_fusion.base import topics
from lmm_fusion.base.grid import OCCUPANCY_GRID
from lmm_fusion.base.rig import CameraModel, LidarModel, SensorRig
from lmm_fusion.base.vocabulary import MODALITIES, Scenario
from lmm_fusion.io.bags import bag_topics, read_bag
from lmm_fusion.io.common import stamp_to_sec
from lmm_fusion.io.gnss import read_fix
from lmm_fusion.io.image import read_image
from lmm_fusion.io.pointcloud import read_points
from lmm_fusion.synth.drive import START_TIME, synthesize

SECONDS = 2.0
RIG = SensorRig(camera=CameraModel(width=320, height=180), lidar=LidarModel(beams=16, columns=256))
#: The module's synthetic drive (the ``drive`` fixture of conftest).
DRIVE = dict(seconds=SECONDS, seed=7, rig=RIG, name="drive")

EXPECTED_TYPES = {
    topics.CAMERA_IMAGE: "sensor_msgs/msg/Image",
    topics.CAMERA_INFO: "sensor_msgs/msg/CameraInfo",
    topics.LIDAR_POINTS: "sensor_msgs/msg/PointCloud2",
    topics.GNSS_FIX: "sensor_msgs/msg/NavSatFix",
    topics.TF_STATIC: "tf2_msgs/msg/TFMessage",
    topics.GT_SCENE: "lmm_fusion/msg/SceneAssessment",
    topics.GT_ACTION: "lmm_fusion/msg/ActionSuggestion",
    topics.GT_OCCUPANCY: "nav_msgs/msg/OccupancyGrid",
    topics.GT_SCENARIO: "std_msgs/msg/String",
    topics.GT_EGO: "nav_msgs/msg/Odometry",
}


@pytest.fixture(scope="module")
def messages(drive: Path) -> dict[str, list]:
    by_topic: dict[str, list] = defaultdict(list)
    for m in read_bag(drive):
        by_topic[m.topic].append(m)
    return by_topic


def test_topics_and_types(drive: Path) -> None:
    assert bag_topics(drive) == EXPECTED_TYPES


def test_rates_frames_and_stamps(messages: dict[str, list]) -> None:
    n = {t: len(v) for t, v in messages.items()}
    assert n[topics.CAMERA_IMAGE] == n[topics.CAMERA_INFO] == round(SECONDS * 20)
    assert n[topics.LIDAR_POINTS] == n[topics.GNSS_FIX] == round(SECONDS * 10)
    assert n[topics.TF_STATIC] == 1
    for t in (topics.GT_SCENE, topics.GT_ACTION, topics.GT_OCCUPANCY, topics.GT_SCENARIO, topics.GT_EGO):
        assert n[t] == n[topics.LIDAR_POINTS]
    frames = {topics.CAMERA_IMAGE: "camera_optical", topics.CAMERA_INFO: "camera_optical",
              topics.LIDAR_POINTS: "lidar", topics.GNSS_FIX: "gnss", topics.GT_SCENE: "base_link",
              topics.GT_ACTION: "base_link", topics.GT_OCCUPANCY: "base_link", topics.GT_EGO: "map"}
    for t, frame in frames.items():
        assert {m.msg.header.frame_id for m in messages[t]} == {frame}, t
        for m in messages[t]:  # bag time = header stamp
            assert stamp_to_sec(m.msg.header.stamp) == pytest.approx(m.stamp_sec, abs=1e-6)
    cam = np.array([m.stamp_sec for m in messages[topics.CAMERA_IMAGE]]) - START_TIME
    lid = np.array([m.stamp_sec for m in messages[topics.LIDAR_POINTS]]) - START_TIME
    gps = np.array([m.stamp_sec for m in messages[topics.GNSS_FIX]]) - START_TIME
    assert np.allclose(np.diff(cam), 0.05, atol=0.003) and np.allclose(np.diff(lid), 0.1, atol=0.002)
    assert np.allclose(np.diff(gps), 0.1, atol=1e-6)
    # own stamps per sensor, not one shared clock tick
    assert not set(np.round(cam, 6)) & set(np.round(lid, 6)) and not set(np.round(gps, 6)) & set(np.round(lid, 6))
    for t in (topics.GT_SCENE, topics.GT_ACTION, topics.GT_OCCUPANCY, topics.GT_EGO):
        assert [m.stamp_sec for m in messages[t]] == [m.stamp_sec for m in messages[topics.LIDAR_POINTS]]


def test_sensor_payloads(messages: dict[str, list]) -> None:
    img = read_image(messages[topics.CAMERA_IMAGE][0].msg)
    assert img.shape == (180, 320, 3)
    info = messages[topics.CAMERA_INFO][0].msg
    assert info.distortion_model == "plumb_bob" and (info.width, info.height) == (320, 180)
    np.testing.assert_allclose(np.asarray(info.k).reshape(3, 3), RIG.camera.k())
    pts = read_points(messages[topics.LIDAR_POINTS][0].msg)
    assert pts.shape[1] == 4 and 1000 < len(pts) <= 16 * 256
    names = [f.name for f in messages[topics.LIDAR_POINTS][0].msg.fields]
    assert names == ["x", "y", "z", "intensity", "ring"]
    fix = read_fix(messages[topics.GNSS_FIX][0].msg)
    assert abs(fix.lat - RIG.gnss.origin_lat) < 0.01 and abs(fix.lon - RIG.gnss.origin_lon) < 0.01
    assert fix.horizontal_std > 0
    tf = messages[topics.TF_STATIC][0].msg
    got = {t.child_frame_id: t for t in tf.transforms}
    assert set(got) == {"camera_optical", "lidar", "gnss"}
    assert {t.header.frame_id for t in tf.transforms} == {"base_link"}
    cam = got["camera_optical"].transform
    t = RIG.camera_optical_to_base()
    assert (cam.translation.x, cam.translation.y, cam.translation.z) == pytest.approx(tuple(t[:3, 3]))
    q = cam.rotation  # optical z axis (forward) maps to base_link +x
    rot_z = np.array([2 * (q.x * q.z + q.w * q.y), 2 * (q.y * q.z - q.w * q.x), 1 - 2 * (q.x ** 2 + q.y ** 2)])
    np.testing.assert_allclose(rot_z, t[:3, 2], atol=1e-9)


def test_ground_truth_fields(messages: dict[str, list]) -> None:
    for m in messages[topics.GT_SCENE]:
        sa = m.msg
        assert [s.name for s in sa.modalities] == list(MODALITIES)
        assert all(s.used and s.attention_share == pytest.approx(1 / 3) for s in sa.modalities)
        assert sa.valid and not sa.degraded
        assert np.asarray(sa.risk_probabilities).sum() == pytest.approx(1.0)
        assert np.argmax(sa.risk_probabilities) == sa.risk_level
        assert np.argmax(sa.traffic_light_probabilities) == sa.traffic_light_state
        assert sa.time_to_collision > 0 and sa.nearest_obstacle_distance >= 0
    for m in messages[topics.GT_ACTION]:
        a = m.msg
        assert np.argmax(a.action_probabilities) == a.action and a.target_speed >= 0 and a.rationale
    grid = messages[topics.GT_OCCUPANCY][0].msg
    g = OCCUPANCY_GRID
    assert (grid.info.width, grid.info.height, grid.info.resolution) == (g.nx, g.ny, g.cell)
    assert (grid.info.origin.position.x, grid.info.origin.position.y) == (g.x_min, g.y_min)
    assert set(np.unique(grid.data)) <= {0, 100}
    assert {m.msg.data for m in messages[topics.GT_SCENARIO]} <= {s.name for s in Scenario}
    odo = [m.msg for m in messages[topics.GT_EGO]]
    assert odo[0].child_frame_id == "base_link" and all(o.twist.twist.linear.x >= 0 for o in odo)


def test_same_seed_same_bytes(tmp_path: Path, drive: Path) -> None:
    # same folder name (the bag name is recorded inside the files), different parents
    again = synthesize(tmp_path / "a" / "drive", SECONDS, seed=7, rig=RIG, progress=False)
    other = synthesize(tmp_path / "b" / "drive", SECONDS, seed=8, rig=RIG, progress=False)
    files = sorted(p.name for p in drive.iterdir())
    assert files == sorted(p.name for p in again.iterdir()) == ["drive.mcap", "metadata.yaml"]
    for name in files:
        assert (drive / name).read_bytes() == (again / name).read_bytes(), name
    assert (drive / "drive.mcap").read_bytes() != (other / "drive.mcap").read_bytes()


def test_mcap_reader_and_sqlite_and_compressed(tmp_path: Path, drive: Path) -> None:
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    (mcap_file,) = drive.glob("*.mcap")
    with open(mcap_file, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        kinds = {}
        for schema, channel, _, decoded in reader.iter_decoded_messages(
                topics=[topics.GT_ACTION, topics.LIDAR_POINTS, topics.GT_SCENE]):
            kinds[channel.topic] = schema.name
            if channel.topic == topics.GT_SCENE:
                assert len(decoded.modalities) == 3
    assert kinds == {t: EXPECTED_TYPES[t] for t in (topics.GT_ACTION, topics.LIDAR_POINTS, topics.GT_SCENE)}

    sq = synthesize(tmp_path / "sq", 0.5, seed=1, rig=RIG, storage="sqlite3", compressed=True, progress=False)
    assert list(sq.glob("*.db3"))
    types = bag_topics(sq)
    assert types[topics.CAMERA_COMPRESSED] == "sensor_msgs/msg/CompressedImage"
    assert topics.CAMERA_IMAGE not in types
    img = read_image(next(read_bag(sq, [topics.CAMERA_COMPRESSED])).msg)
    assert img.shape == (180, 320, 3)


def test_scenario_cycle_and_cli(tmp_path: Path) -> None:
    from lmm_fusion.cli import main

    out = tmp_path / "cli"
    rc = main(["synth", str(out), "--seconds", "14", "--seed", "3", "--camera", "64x36", "--lidar-beams", "4",
               "--lidar-columns", "64", "--scenario", "traffic_light", "--scenario", "cut_in", "--no-progress"])
    assert rc == 0
    names = [m.msg.data for m in read_bag(out, [topics.GT_SCENARIO])]
    assert names[0] == "TRAFFIC_LIGHT" and "CUT_IN" in names and set(names) == {"TRAFFIC_LIGHT", "CUT_IN"}
    lights = [m.msg.traffic_light_state for m in read_bag(out, [topics.GT_SCENE])][:10]
    assert all(s != 0 for s in lights[:3])  # a light governs the first frames of a light episode
    assert not math.isnan(sum(m.msg.target_speed for m in read_bag(out, [topics.GT_ACTION])))


def test_dataset_one_family_per_drive_and_worker_independent(tmp_path: Path) -> None:
    import json

    from lmm_fusion.synth.dataset import drive_seed, make_dataset

    tiny = SensorRig(camera=CameraModel(width=64, height=36), lidar=LidarModel(beams=4, columns=64))
    one = make_dataset(tmp_path / "one", 3, 0.5, seed=4, rig=tiny, workers=1, progress=False)
    two = make_dataset(tmp_path / "two", 3, 0.5, seed=4, rig=tiny, workers=2, progress=False)
    assert [s.scenario for s in one] == ["FREE_ROAD", "LEAD_VEHICLE", "STOPPED_OBSTACLE_FREE_LEFT"]
    assert [s.seed for s in one] == [drive_seed(4, i) for i in range(3)] == [s.seed for s in two]
    for a, b in zip(one, two):
        assert {m.msg.data for m in read_bag(a.path, [topics.GT_SCENARIO])} == {a.scenario}
        (fa,), (fb,) = Path(a.path).glob("*.mcap"), Path(b.path).glob("*.mcap")
        assert fa.read_bytes() == fb.read_bytes()
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert [d["path"] for d in manifest["drives"]] == [Path(s.path).name for s in one]
    assert manifest["lamp_cues"] is True  # the default world


def test_lamp_cues_from_the_cli_reach_the_labels(tmp_path: Path) -> None:
    """Lamp cues (the default): the same cut-in drive as ``--no-lamp-cues``, but labels that react to
    the turn signal."""
    from lmm_fusion.cli import main

    rationales = {}
    for name, extra in (("plain", ["--no-lamp-cues"]), ("cued", [])):
        rc = main(["synth", str(tmp_path / name), "--seconds", "4", "--seed", "7", "--camera", "64x36",
                   "--lidar-beams", "4", "--lidar-columns", "64", "--scenario", "cut_in", "--no-progress", *extra])
        assert rc == 0
        rationales[name] = [m.msg.rationale for m in read_bag(tmp_path / name, [topics.GT_ACTION])]
    assert len(rationales["plain"]) == len(rationales["cued"])
    assert not any("signalling" in r for r in rationales["plain"])
    assert any("signalling" in r for r in rationales["cued"])


def test_a_drive_labelled_from_mid_world(tmp_path: Path) -> None:
    """``start``: the world runs unrecorded, sensors are recorded ``warmup`` s before the first label,
    and the labels are those of the same world (same seed) driven from the beginning."""
    tiny = SensorRig(camera=CameraModel(width=64, height=36), lidar=LidarModel(beams=4, columns=64))
    whole = synthesize(tmp_path / "whole", 3.5, seed=9, rig=tiny, progress=False)
    late = synthesize(tmp_path / "late", 0.5, seed=9, rig=tiny, progress=False, start=3.0, warmup=0.5)
    stamps = defaultdict(list)
    for m in read_bag(late):
        stamps[m.topic].append(m.stamp_sec - START_TIME)
    gt, lidar = stamps[topics.GT_ACTION], stamps[topics.LIDAR_POINTS]
    assert len(gt) == 5 and gt[0] == pytest.approx(3.0, abs=1e-3) and gt[-1] == pytest.approx(3.4, abs=1e-3)
    assert len(lidar) == 10 and lidar[0] == pytest.approx(2.5, abs=1e-3)
    assert min(stamps[topics.GNSS_FIX]) > 2.5 and min(stamps[topics.CAMERA_IMAGE]) > 2.5

    def labels(bag: Path) -> dict[float, tuple[int, int]]:
        scene = {round(m.stamp_sec, 2): m.msg.risk_level for m in read_bag(bag, [topics.GT_SCENE])}
        return {k: (scene[k], m.msg.action) for m in read_bag(bag, [topics.GT_ACTION])
                if (k := round(m.stamp_sec, 2)) in scene}

    late_labels, whole_labels = labels(late), labels(whole)
    assert len(late_labels) == 5 and late_labels == {k: whole_labels[k] for k in late_labels}
    with pytest.raises(ValueError, match="start"):
        synthesize(tmp_path / "bad", 1.0, seed=1, rig=tiny, progress=False, start=-1.0)


def test_dataset_start_times_are_seeded_and_bounded() -> None:
    from lmm_fusion.synth.dataset import plan

    a = plan(Path("d"), 20, 2.0, seed=3, start_max=9.0)
    assert [s.start for s in a] == [s.start for s in plan(Path("d"), 30, 2.0, seed=3, start_max=9.0)[:20]]
    assert all(0.0 <= s.start <= 9.0 for s in a) and len({s.start for s in a}) == 20
    assert [s.seed for s in a] == [s.seed for s in plan(Path("d"), 20, 2.0, seed=3)]  # same worlds
    assert all(s.start == 0.0 for s in plan(Path("d"), 5, 2.0, seed=3))


def test_contact_sheet_and_existing_output(tmp_path: Path, drive: Path) -> None:
    import cv2

    from lmm_fusion.synth.contact_sheet import contact_sheet

    tiny = SensorRig(camera=CameraModel(width=96, height=54), lidar=LidarModel(beams=8, columns=128))
    png = contact_sheet(tmp_path / "sheet.png", seed=1, rig=tiny, per_family=1)
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] >= 7 * 54 and img.shape[1] > 96
    with pytest.raises(FileExistsError, match="exists"):
        synthesize(drive, 0.2, seed=1, rig=RIG, progress=False)


def test_gnss_agrees_with_true_ego_pose(messages: dict[str, list]) -> None:
    import pymap3d

    odo = [(m.stamp_sec, m.msg) for m in messages[topics.GT_EGO]]
    g = RIG.gnss
    for m in messages[topics.GNSS_FIX]:
        fix = read_fix(m.msg)
        e, n, _ = pymap3d.geodetic2enu(fix.lat, fix.lon, fix.alt, g.origin_lat, g.origin_lon, g.origin_alt)
        t, o = min(odo, key=lambda x: abs(x[0] - m.stamp_sec))
        p, yaw = o.pose.pose.position, 2 * math.atan2(o.pose.pose.orientation.z, o.pose.pose.orientation.w)
        ant = (p.x + math.cos(yaw) * RIG.gnss_mount.x, p.y + math.sin(yaw) * RIG.gnss_mount.x)
        moved = o.twist.twist.linear.x * abs(t - m.stamp_sec) + 0.1
        assert math.hypot(e - ant[0], n - ant[1]) < moved + 6 * fix.horizontal_std
