"""rosbag2 input/output shared by the synthetic world, replay, training and the demo.

Writing and reading go through rosbags (pure Python) with the project typestore
(:func:`lmm_fusion.io.msgtypes.typestore`, Jazzy + ``lmm_fusion_msgs``), so no ROS install is needed.
Both storage plugins are supported: MCAP (default) and SQLite3. Times are float seconds on the
way in and out; the bag's receive timestamp of each message is the ``stamp_sec`` given to
:meth:`BagWriter.write` (the synthetic world passes the header stamp, so bags replay in sensor
time order).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from lmm_fusion.io.msgtypes import ros_type_name, typestore

log = logging.getLogger(__name__)

STORAGES: tuple[str, ...] = ("mcap", "sqlite3")


def _qos(transient_local: bool, reliable: bool, depth: int) -> Any:
    """One rosbags ``Qos`` profile (used in ``offered_qos_profiles`` of the bag metadata)."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    zero = QosTime(sec=0, nsec=0)
    return Qos(
        history=QosHistory.KEEP_LAST,
        depth=depth,
        reliability=QosReliability.RELIABLE if reliable else QosReliability.BEST_EFFORT,
        durability=QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE,
        deadline=zero,
        lifespan=zero,
        liveliness=QosLiveliness.AUTOMATIC,
        liveliness_lease_duration=zero,
        avoid_ros_namespace_conventions=False,
    )


def offered_qos(topic: str) -> list[Any]:
    """QoS recorded for ``topic``: transient-local + reliable for ``/tf_static`` (late joiners
    must still get the extrinsics on replay), sensor-data-like best effort for ``/sensors/...``,
    reliable volatile otherwise."""
    if topic == "/tf_static":
        return [_qos(transient_local=True, reliable=True, depth=1)]
    if topic.startswith("/sensors/"):
        return [_qos(transient_local=False, reliable=False, depth=5)]
    return [_qos(transient_local=False, reliable=True, depth=10)]


def _sec_to_ns(stamp_sec: float) -> int:
    if not stamp_sec >= 0.0:  # also rejects NaN
        from lmm_fusion.io.errors import MessageError

        raise MessageError(f"stamp_sec must be a finite time >= 0, got {stamp_sec!r}")
    return round(stamp_sec * 1e9)


class BagWriter:
    """Write a rosbag2 folder (``storage`` ``"mcap"`` or ``"sqlite3"``); use as a context manager.

    ``write(topic, stamp_sec, msg)`` registers the topic on first use with the message's type
    (``__msgtype__`` of a rosbags message) and serialises it to CDR. The output is a pure function
    of what is written (no wall-clock time enters the file), so equal input gives equal bytes.
    """

    def __init__(self, path: Path | str, storage: str = "mcap") -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self.path = Path(path)
        self.storage = storage
        self._store = typestore()
        self._writer = Writer(self.path, version=9, storage_plugin=plugin)
        self._connections: dict[str, Any] = {}
        self._types: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    def __enter__(self) -> BagWriter:
        self._writer.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Finish the bag (writes the MCAP summary / metadata.yaml). Safe to call twice."""
        if self._writer.storage is not None:
            self._writer.close()

    def write(self, topic: str, stamp_sec: float, msg: Any) -> None:
        """Serialise ``msg`` (a rosbags message) and append it to ``topic`` at ``stamp_sec`` [s]."""
        msgtype = ros_type_name(msg)
        conn = self._connections.get(topic)
        if conn is None:
            conn = self._writer.add_connection(topic, msgtype, typestore=self._store,
                                               offered_qos_profiles=offered_qos(topic))
            self._connections[topic] = conn
            self._types[topic] = msgtype
            self.counts[topic] = 0
        elif self._types[topic] != msgtype:
            from lmm_fusion.io.errors import MessageError

            raise MessageError(f"topic {topic} has type {self._types[topic]}, got a {msgtype} message")
        data = self._store.serialize_cdr(msg, msgtype)
        self._writer.write(conn, _sec_to_ns(stamp_sec), data)
        self.counts[topic] += 1


@dataclass(frozen=True)
class BagMessage:
    """One message read from a bag: topic, ROS type name, bag timestamp [s], deserialised message."""

    topic: str
    msgtype: str
    stamp_sec: float
    msg: Any


def _paths(paths: Path | str | Sequence[Path | str]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def read_bag(paths: Path | str | Sequence[Path | str], topics: Iterable[str] | None = None
             ) -> Iterator[BagMessage]:
    """Messages of one or more bags (MCAP or SQLite3 folders), merged in recorded-time order.

    ``topics`` restricts to those topic names (None = all). Messages of types the project
    typestore does not know are deserialised with the type definitions stored in the bag.
    """
    from rosbags.highlevel import AnyReader

    wanted = None if topics is None else set(topics)
    with AnyReader(_paths(paths), default_typestore=typestore()) as reader:
        conns = [c for c in reader.connections if wanted is None or c.topic in wanted]
        if not conns:
            return
        for conn, t_ns, raw in reader.messages(connections=conns):
            yield BagMessage(conn.topic, conn.msgtype, t_ns * 1e-9, reader.deserialize(raw, conn.msgtype))


def bag_topics(path: Path | str | Sequence[Path | str]) -> dict[str, str]:
    """``{topic: ROS type name}`` of a bag (or several)."""
    from rosbags.highlevel import AnyReader

    with AnyReader(_paths(path), default_typestore=typestore()) as reader:
        return {c.topic: c.msgtype for c in reader.connections}


def bag_counts(path: Path | str | Sequence[Path | str]) -> dict[str, int]:
    """``{topic: message count}`` of a bag (or several), from the bag index (no deserialisation)."""
    from rosbags.highlevel import AnyReader

    counts: dict[str, int] = {}
    with AnyReader(_paths(path), default_typestore=typestore()) as reader:
        for c in reader.connections:
            counts[c.topic] = counts.get(c.topic, 0) + c.msgcount
    return counts
