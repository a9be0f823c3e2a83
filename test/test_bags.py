"""lmm_fusion.io.bags: rosbag2 writing and reading in both storages, types, order, QoS, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mcap.reader import make_reader
from rosbags.highlevel import AnyReader
from rosbags.interfaces import QosDurability, QosReliability
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from lmm_fusion.io.bags import BagWriter, bag_counts, bag_topics, offered_qos, read_bag
from lmm_fusion.io.common import make_header
from lmm_fusion.io.errors import MessageError
from lmm_fusion.io.msgtypes import LEGACY_MSG_PACKAGE, rosbags_types, typestore
from lmm_fusion.io.pointcloud import create_cloud, read_points


@pytest.fixture(scope="module")
def types():
    return rosbags_types()


def _write_sample(path: Path, types, storage: str) -> np.ndarray:
    pts = np.arange(40, dtype=np.float32).reshape(10, 4)
    with BagWriter(path, storage=storage) as bag:
        # written out of time order on purpose: reading must come back in recorded-time order
        bag.write("/b", 2.0, types.String(data="second"))
        bag.write("/a", 1.0, types.String(data="first"))
        bag.write("/cloud", 1.5, create_cloud(types, make_header(types, 1.5, "lidar"), pts, ("x", "y", "z", "i")))
        bag.write("/tf_static", 0.5, types.TFMessage(transforms=[]))
    return pts


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_roundtrip_in_time_order(tmp_path: Path, types, storage: str) -> None:
    pts = _write_sample(tmp_path / "bag", types, storage)
    msgs = list(read_bag(tmp_path / "bag"))
    assert [m.topic for m in msgs] == ["/tf_static", "/a", "/cloud", "/b"]
    assert [m.stamp_sec for m in msgs] == [0.5, 1.0, 1.5, 2.0]
    assert msgs[1].msg.data == "first" and msgs[1].msgtype == "std_msgs/msg/String"
    np.testing.assert_array_equal(read_points(msgs[2].msg, ("x", "y", "z", "i")), pts)
    assert bag_topics(tmp_path / "bag") == {
        "/a": "std_msgs/msg/String", "/b": "std_msgs/msg/String",
        "/cloud": "sensor_msgs/msg/PointCloud2", "/tf_static": "tf2_msgs/msg/TFMessage"}
    assert bag_counts(tmp_path / "bag") == {"/a": 1, "/b": 1, "/cloud": 1, "/tf_static": 1}
    assert [m.msg.data for m in read_bag(tmp_path / "bag", topics=["/b"])] == ["second"]
    assert list(read_bag(tmp_path / "bag", topics=["/missing"])) == []


def test_tf_static_is_transient_local(tmp_path: Path, types) -> None:
    _write_sample(tmp_path / "bag", types, "mcap")
    with AnyReader([tmp_path / "bag"]) as reader:
        qos = {c.topic: c.ext.offered_qos_profiles for c in reader.connections}
    assert qos["/tf_static"][0].durability == QosDurability.TRANSIENT_LOCAL
    assert qos["/tf_static"][0].reliability == QosReliability.RELIABLE
    assert qos["/a"][0].durability == QosDurability.VOLATILE
    assert offered_qos("/sensors/lidar/points")[0].reliability == QosReliability.BEST_EFFORT


def test_custom_messages_roundtrip(tmp_path: Path, types) -> None:
    hdr = make_header(types, 3.0, "base_link")
    msg = types.ActionSuggestion(header=hdr, action=3, action_probabilities=np.eye(6, dtype=np.float32)[3],
                                 target_speed=0.0, confidence=1.0, safety_override=False, rationale="stop")
    with BagWriter(tmp_path / "bag") as bag:
        bag.write("/ground_truth/action_suggestion", 3.0, msg)
    (got,) = read_bag(tmp_path / "bag")
    assert got.msgtype == "lmm_fusion/msg/ActionSuggestion"
    assert got.msg.action == 3 and got.msg.rationale == "stop"


def test_bags_of_the_earlier_interface_package_name_still_read(tmp_path: Path, types) -> None:
    # Bags recorded before the interfaces moved into the lmm_fusion package name them lmm_fusion_msgs.
    store = typestore()
    legacy = f"{LEGACY_MSG_PACKAGE}/msg/SceneAssessment"
    hdr = make_header(types, 2.0, "base_link")
    # The earlier definition (no ego speed fields), as such a recorder wrote it.
    msg = store.types[legacy](header=hdr, valid=True, degraded=False, risk_level=2,
                              risk_probabilities=np.array([0.1, 0.2, 0.7], np.float32), time_to_collision=1.5,
                              nearest_obstacle_distance=9.0, traffic_light_state=0,
                              traffic_light_probabilities=np.array([1, 0, 0, 0], np.float32), modalities=[])
    raw = store.serialize_cdr(msg, legacy)
    with BagWriter(tmp_path / "bag") as bag:
        bag.write_raw("/ground_truth/scene_assessment", 2.0, legacy, raw)
    (got,) = read_bag(tmp_path / "bag")
    assert got.msgtype == legacy
    assert got.msg.risk_level == 2 and got.msg.nearest_obstacle_distance == 9.0


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bags_of_an_earlier_definition_under_the_current_name_read(tmp_path: Path, types, storage: str) -> None:
    # An output bag of an earlier release: lmm_fusion/msg/SceneAssessment and ModalityStatus as they were
    # then (modalities with a stamp but no reason, no ego speed). The bag's own definitions must be used;
    # the current ones would misread the bytes.
    old = get_typestore(Stores.ROS2_JAZZY)
    old.register({
        **get_types_from_msg("string name\nbool used\nfloat32 age\nfloat32 attention_share\n"
                             "builtin_interfaces/Time stamp\n", "lmm_fusion/msg/ModalityStatus"),
        **get_types_from_msg("std_msgs/Header header\nuint8 risk_level\nfloat32[3] risk_probabilities\n"
                             "float32 time_to_collision\nfloat32 nearest_obstacle_distance\n"
                             "uint8 traffic_light_state\nfloat32[4] traffic_light_probabilities\n"
                             "ModalityStatus[] modalities\nbool degraded\nbool valid\n",
                             "lmm_fusion/msg/SceneAssessment"),
    })
    name = "lmm_fusion/msg/SceneAssessment"
    stamp = old.types["builtin_interfaces/msg/Time"](sec=2, nanosec=0)
    hdr = old.types["std_msgs/msg/Header"](stamp=stamp, frame_id="base_link")
    mods = [old.types["lmm_fusion/msg/ModalityStatus"](name=n, used=True, age=0.05, attention_share=0.5, stamp=stamp)
            for n in ("camera", "lidar")]
    msg = old.types[name](header=hdr, risk_level=2, risk_probabilities=np.array([0.1, 0.2, 0.7], np.float32),
                          time_to_collision=1.5, nearest_obstacle_distance=9.0, traffic_light_state=1,
                          traffic_light_probabilities=np.array([0, 1, 0, 0], np.float32), modalities=mods,
                          degraded=False, valid=True)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(tmp_path / "bag", version=9, storage_plugin=plugin) as w:
        conn = w.add_connection("/fusion_node/scene_assessment", name, typestore=old)
        w.write(conn, 2_000_000_000, old.serialize_cdr(msg, name))
    (got,) = read_bag(tmp_path / "bag")
    assert got.msg.risk_level == 2 and got.msg.traffic_light_state == 1 and got.msg.valid
    assert [m.name for m in got.msg.modalities] == ["camera", "lidar"]
    assert got.msg.modalities[1].stamp.sec == 2


def test_readable_by_mcap_reader(tmp_path: Path, types) -> None:
    _write_sample(tmp_path / "bag", types, "mcap")
    (mcap_file,) = (tmp_path / "bag").glob("*.mcap")
    with open(mcap_file, "rb") as f:
        reader = make_reader(f)
        seen = {(ch.topic, sc.name) for sc, ch, _ in reader.iter_messages()}
    assert ("/cloud", "sensor_msgs/msg/PointCloud2") in seen
    assert ("/a", "std_msgs/msg/String") in seen


def test_errors(tmp_path: Path, types) -> None:
    with pytest.raises(ValueError, match="storage"):
        BagWriter(tmp_path / "x", storage="rosbag1")
    with BagWriter(tmp_path / "bag") as bag:
        bag.write("/a", 1.0, types.String(data="x"))
        with pytest.raises(MessageError, match="/a"):
            bag.write("/a", 1.1, types.TFMessage(transforms=[]))
        with pytest.raises(MessageError, match="stamp_sec"):
            bag.write("/a", float("nan"), types.String(data="x"))
        with pytest.raises(MessageError, match="stamp_sec"):
            bag.write("/a", -1.0, types.String(data="x"))
    with pytest.raises(Exception, match="exists"):
        BagWriter(tmp_path / "bag").__enter__()
