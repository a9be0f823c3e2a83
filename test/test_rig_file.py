"""Rig files (config/rigs/*.yaml, docs/rig_file.md): parsing and its errors, and `lmm-fusion synth|replay --rig`."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from lmm_fusion.base import topics as T
from lmm_fusion.base.rig import RigFileError, SensorRig, VehicleGeometry, load_rig, rig_from_dict
from lmm_fusion.cli import main
from lmm_fusion.cycle.extrinsics import Extrinsics
from lmm_fusion.io import read_points
from lmm_fusion.io.bags import read_bag

ROOT = Path(__file__).resolve().parents[1]
RIGS = sorted((ROOT / "config" / "rigs").glob("*.yaml"))


def test_shipped_rigs_load_and_default_is_the_built_in_rig() -> None:
    assert {p.stem for p in RIGS} >= {"default", "ouster_roof", "velodyne_side"}
    rigs = {p.stem: load_rig(p) for p in RIGS}
    assert rigs["default"] == SensorRig()
    ouster = rigs["ouster_roof"]
    assert ouster.lidar.layout == "ouster" and ouster.lidar.intensity_scale == 1000.0
    assert ouster.lidar_mount.yaw == pytest.approx(math.pi) and ouster.vehicle == VehicleGeometry(5.4, 2.0, 4.3)
    assert ouster.camera == SensorRig().camera  # sections left out keep the defaults


@pytest.mark.parametrize(("spec", "message"), [
    ({"lidr": {}}, "unknown section(s) ['lidr']"),
    ({"lidar": {"beams": 0}}, "lidar.beams=0: must be in [1, 512]"),
    ({"lidar": {"beams": 16.5}}, "lidar.beams=16.5: expected an integer"),
    ({"lidar": {"layout": "hesai"}}, "lidar.layout='hesai': must be one of default, velodyne, ouster"),
    ({"lidar": {"mount": {"yaw": 1.0, "yaw_deg": 57.0}}}, "lidar.mount: give yaw or yaw_deg, not both"),
    ({"lidar": {"mount": {"heading": 1.0}}}, "lidar.mount.heading: unknown key"),
    ({"lidar": {"mount": {"x": float("nan")}}}, "lidar.mount.x=nan: must be finite"),
    ({"lidar": {"vfov_min_deg": 10.0, "vfov_max_deg": 5.0}}, "lidar.vfov_min_deg=10.0 must be <"),
    ({"camera": {"focal": 3}}, "camera.focal: unknown key"),
    ({"vehicle": {"front_offset": 9.0}}, "vehicle.front_offset=9.0: must be <= vehicle.length=4.6"),
    ({"gnss": {"rate_hz": "fast"}}, "gnss.rate_hz='fast': expected a number"),
    ([1, 2], "expected a mapping"),
])
def test_a_bad_rig_file_names_key_and_value(spec: object, message: str) -> None:
    with pytest.raises(RigFileError, match=re.escape(message)):
        rig_from_dict(spec, "my_rig.yaml")


def test_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(RigFileError, match="cannot read the rig file"):
        load_rig(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lidar: {mount: [1, 2\n")
    with pytest.raises(RigFileError, match="not valid YAML"):
        load_rig(bad)


def test_synth_cli_writes_the_rig(tmp_path: Path) -> None:
    """`synth --rig` with the shipped Velodyne rig (and smaller sensors from the flags): /tf_static has its
    mounts, the clouds its driver layout and intensity unit."""
    rig_file = ROOT / "config" / "rigs" / "velodyne_side.yaml"
    out = tmp_path / "drive"
    assert main(["synth", str(out), "--rig", str(rig_file), "--seconds", "1", "--camera", "320x180",
                 "--lidar-beams", "16", "--lidar-columns", "512", "--no-progress"]) == 0
    rig = load_rig(rig_file)
    msgs = list(read_bag(out))
    ex = Extrinsics()
    ex.update_tf(next(m.msg for m in msgs if m.topic == T.TF_STATIC))
    np.testing.assert_allclose(ex.lookup(T.LIDAR_FRAME), rig.lidar_mount.matrix(), atol=1e-9)
    cloud = next(m.msg for m in msgs if m.topic == T.LIDAR_POINTS)
    assert [f.name for f in cloud.fields] == ["x", "y", "z", "intensity", "ring", "time"] and cloud.point_step == 22
    vals = read_points(cloud, ("intensity", "ring", "time"))
    assert 50.0 < vals[:, 0].max() <= 255.0 and vals[:, 1].max() == 15 and vals[:, 2].min() >= 0.0
    assert vals[:, 2].max() < 1.0 / rig.lidar.rate_hz
    camera = next(m.msg for m in msgs if m.topic == T.CAMERA_IMAGE)
    assert (camera.width, camera.height) == (320, 180)
    assert main(["synth", str(tmp_path / "x"), "--rig", str(tmp_path / "none.yaml"), "--seconds", "1"]) == 2
    assert main(["replay", str(out), "--out", str(tmp_path / "r"), "--rig", str(tmp_path / "none.yaml")]) == 2
