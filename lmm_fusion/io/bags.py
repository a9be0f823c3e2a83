"""rosbag2 input/output shared by the synthetic world, replay, training and the demo.

Writing and reading go through rosbags (pure Python) with the project typestore
(:func:`lmm_fusion.io.msgtypes.typestore`, Jazzy + the ``lmm_fusion`` messages), so no ROS install is needed.
Both storage plugins are supported: MCAP (default) and SQLite3. Times are float seconds on the
way in and out; the bag's receive timestamp of each message is the ``stamp_sec`` given to
:meth:`BagWriter.write` (the synthetic world passes the header stamp, so bags replay in sensor
time order).
"""

from __future__ import annotations

import heapq
import logging
import mmap
import sqlite3
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import apsw
from mcap.exceptions import EndOfFile, McapError
from mcap.reader import make_reader
from mcap.records import Channel, Footer, Message, Schema
from mcap.stream_reader import StreamReader
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import ReaderError, StoragePlugin, Writer
from rosbags.serde import SerdeError

from lmm_fusion.io.errors import MessageError
from lmm_fusion.io.msgtypes import ros_type_name, typestore

log = logging.getLogger(__name__)

STORAGES: tuple[str, ...] = ("mcap", "sqlite3")


def _qos(transient_local: bool, reliable: bool, depth: int) -> Any:
    """One rosbags ``Qos`` profile (used in ``offered_qos_profiles`` of the bag metadata)."""
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
        raise MessageError(f"stamp_sec must be a finite time >= 0, got {stamp_sec!r}")
    return round(stamp_sec * 1e9)


class BagWriter:
    """Write a rosbag2 folder (``storage`` ``"mcap"`` or ``"sqlite3"``); use as a context manager.

    ``write(topic, stamp_sec, msg)`` registers the topic on first use with the message's type
    (``__msgtype__`` of a rosbags message) and serialises it to CDR; ``write_raw`` appends CDR bytes as
    they were recorded (no serialising: replay copies hundreds of MB of camera and LiDAR data this way).
    The output is a pure function of what is written (no wall-clock time enters the file), so equal
    input gives equal bytes.
    """

    def __init__(self, path: Path | str, storage: str = "mcap") -> None:
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

    def _connection(self, topic: str, msgtype: str) -> Any:
        conn = self._connections.get(topic)
        if conn is None:
            conn = self._writer.add_connection(topic, msgtype, typestore=self._store,
                                               offered_qos_profiles=offered_qos(topic))
            self._connections[topic] = conn
            self._types[topic] = msgtype
            self.counts[topic] = 0
        elif self._types[topic] != msgtype:
            raise MessageError(f"topic {topic} has type {self._types[topic]}, got a {msgtype} message")
        return conn

    def write(self, topic: str, stamp_sec: float, msg: Any) -> None:
        """Serialise ``msg`` (a rosbags message) and append it to ``topic`` at ``stamp_sec`` [s]."""
        msgtype = ros_type_name(msg)
        conn = self._connection(topic, msgtype)
        self._writer.write(conn, _sec_to_ns(stamp_sec), self._store.serialize_cdr(msg, msgtype))
        self.counts[topic] += 1

    def write_raw(self, topic: str, stamp_sec: float, msgtype: str, data: bytes | memoryview) -> None:
        """Append already serialised CDR ``data`` of type ``msgtype`` (e.g. ``BagMessage.raw``) to
        ``topic`` at ``stamp_sec`` [s], without deserialising or serialising it."""
        conn = self._connection(topic, msgtype)
        self._writer.write(conn, _sec_to_ns(stamp_sec), data)
        self.counts[topic] += 1

    def set_custom_data(self, key: str, value: str) -> None:
        """One ``custom_data`` entry of the bag's ``metadata.yaml`` (rosbag2's free-form key/value strings)."""
        self._writer.set_custom_data(key, value)


class BagError(MessageError):
    """A bag that cannot be read (not a rosbag2 folder, missing ``metadata.yaml``, a corrupt or truncated
    storage file). The one error type for bag problems; its text names the file.

    ``path`` is the file (or folder) at fault, ``reason`` what is wrong with it, ``messages_read`` how many
    messages of that bag were delivered before the error and ``last_stamp`` the recorded time [s] of the
    last one (None if none was).
    """

    def __init__(self, path: Path | str, reason: str, messages_read: int = 0,
                 last_stamp: float | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.messages_read = messages_read
        self.last_stamp = last_stamp
        where = "" if last_stamp is None else f", last at t={last_stamp:.3f} s"
        super().__init__(f"bag {self.path}: {reason} ({messages_read} messages read{where})")


def _storage_file(folder: Path) -> Path:
    """The MCAP or SQLite3 file of a bag folder (the folder itself when there is none or several)."""
    files = sorted(folder.glob("*.mcap")) + sorted(folder.glob("*.db3")) if folder.is_dir() else []
    return files[0] if len(files) == 1 else folder


def bag_error(path: Path, exc: BaseException, messages_read: int = 0, last_stamp: float | None = None
              ) -> BagError:
    """The one place where what rosbags, mcap, sqlite3 and struct raise for a bad bag becomes a
    :class:`BagError` naming the file (``path`` is the bag folder; the storage file is named when known)."""
    if isinstance(exc, BagError):
        return exc
    # rosbags wraps the storage error (AnyReaderError <- ReaderError <- sqlite3/struct/...): report the root.
    root: BaseException = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    file = _storage_file(path)
    text = str(root) or str(exc) or type(root).__name__
    if not path.exists():
        return BagError(path, "does not exist", messages_read, last_stamp)
    if not (path / "metadata.yaml").is_file() and path.is_dir():
        storage = _storage_file(path)
        what = (f"metadata.yaml is missing next to {storage.name}" if storage != path
                else "not a rosbag2 folder (no metadata.yaml, no .mcap or .db3 file)")
        file = path / "metadata.yaml"
        return BagError(file, what, messages_read, last_stamp)
    if isinstance(root, EndOfFile):
        reason = "MCAP file ends in the middle of a record (truncated)"
    elif isinstance(root, McapError):
        reason = f"corrupt MCAP: {text}"
    elif isinstance(root, _SQLITE_ERRORS):
        reason = f"corrupt SQLite3 database: {text}"
    elif isinstance(root, (struct.error, EOFError)):
        reason = f"truncated or corrupt record: {text}"
    elif file.suffix == ".db3":
        reason = f"corrupt or truncated SQLite3 database: {text}"
    elif "magic" in text.lower():
        reason = f"corrupt or truncated MCAP (no valid footer/summary): {text}"
    else:
        reason = f"{type(root).__name__}: {text}"
    return BagError(file, reason, messages_read, last_stamp)


#: What a damaged SQLite3 database raises: rosbags' SQLite3 storage reads through apsw, others sqlite3.
_SQLITE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.DatabaseError, apsw.Error)

#: Exception types that mean "this bag is bad" (everything else is a bug and propagates).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    AnyReaderError, ReaderError, McapError, *_SQLITE_ERRORS, struct.error, EOFError, OSError, zlib.error,
    UnicodeDecodeError, SerdeError,
)


class BagMessage:
    """One message read from a bag: topic, ROS type name, bag timestamp [s] and the message.

    ``msg`` is deserialised on first access (copy-only topics never are); ``raw`` holds the CDR bytes
    as recorded, so :meth:`BagWriter.write_raw` can copy a message without serialising it again.
    """

    __slots__ = ("_deserialize", "_msg", "msgtype", "raw", "stamp_sec", "topic")

    def __init__(self, topic: str, msgtype: str, stamp_sec: float, msg: Any = None,
                 raw: bytes | memoryview | None = None,
                 deserialize: Callable[[bytes | memoryview, str], Any] | None = None) -> None:
        self.topic = topic
        self.msgtype = msgtype
        self.stamp_sec = stamp_sec
        self._msg = msg
        self.raw = raw
        self._deserialize = deserialize

    @property
    def msg(self) -> Any:
        if self._msg is None and self._deserialize is not None and self.raw is not None:
            self._msg = self._deserialize(self.raw, self.msgtype)
        return self._msg

    def __repr__(self) -> str:
        return f"BagMessage({self.topic!r}, {self.msgtype!r}, {self.stamp_sec!r})"


def _paths(paths: Path | str | Sequence[Path | str]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _definition_differs(bag_store: Any, store: Any, msgtype: str) -> bool:
    """Whether ``msgtype`` (with its nested types) is defined differently in the bag than in ``store``."""
    try:
        return bool(bag_store.generate_msgdef(msgtype)[1] != store.generate_msgdef(msgtype)[1])
    except Exception:  # a definition rosbags cannot render: trust the bag's own
        return True


class _IndexedBag:
    """A bag whose index opens: read through rosbags (MCAP summary or SQLite3 tables)."""

    def __init__(self, path: Path, store: Any) -> None:
        self.path = path
        self.store = store
        self.reader = AnyReader([path], default_typestore=store)
        self.reader.open()
        self.topics = {c.topic: c.msgtype for c in self.reader.connections}
        self.counts: dict[str, int] = {}
        for c in self.reader.connections:
            self.counts[c.topic] = self.counts.get(c.topic, 0) + c.msgcount
        empty = self.reader.message_count == 0
        self.time_range = None if empty else (self.reader.start_time * 1e-9, self.reader.end_time * 1e-9)
        file = _storage_file(path)
        self.mapped = _MappedMcap.open(file) if file.suffix == ".mcap" else None
        # Types the bag defines differently from the project typestore (a bag written by an older version
        # of a message, e.g. before a field was added) are read with the bag's own definitions.
        self.own_definition = {c.msgtype for c in self.reader.connections
                               if c.msgtype in store.fielddefs and _definition_differs(self.reader.typestore, store,
                                                                                       c.msgtype)}
        if self.own_definition:
            log.info("%s: reading %s with the definitions stored in the bag (they differ from this version's)",
                     path, ", ".join(sorted(self.own_definition)))

    def messages(self, wanted: set[str] | None) -> Iterator[BagMessage]:
        conns = [c for c in self.reader.connections if wanted is None or c.topic in wanted]
        if not conns:
            return
        known = {t for t in self.store.fielddefs if t not in self.own_definition}
        if self.mapped is not None and all(c.msgtype in known for c in conns):
            yield from self.mapped.messages(wanted, self.store)
            return
        # Types the project typestore knows are deserialised on first use (also after the reader is
        # closed); others with the definitions stored in the bag, which live only while it is open.
        lazy = self.store.deserialize_cdr
        for conn, t_ns, raw in self.reader.messages(connections=conns):
            if conn.msgtype in known:
                yield BagMessage(conn.topic, conn.msgtype, t_ns * 1e-9, raw=raw, deserialize=lazy)
            else:
                msg = self.reader.deserialize(raw, conn.msgtype)
                yield BagMessage(conn.topic, conn.msgtype, t_ns * 1e-9, msg=msg, raw=raw)

    def close(self) -> None:
        self.reader.close()
        self.mapped = None  # the mapping itself lives as long as messages still reference it


_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
_CHUNK_OP, _MESSAGE_OP = 0x06, 0x05


class _MappedMcap:
    """Zero-copy reading of an MCAP file whose chunks are uncompressed (what rosbags and the project
    write): the file is memory-mapped and every message's CDR bytes are a ``memoryview`` of the mapping,
    so neither reading nor deserialising (numpy arrays are views) nor copying into an output bag
    duplicates the hundreds of MB of camera and LiDAR data first. Chunks come from the MCAP summary;
    chunks holding none of the wanted topics are not touched. Messages are in log-time order (per chunk
    sorted, chunks merged), as rosbags delivers them. Every size field is checked against the chunk
    before it is used; a record that runs past its chunk raises ``EOFError`` (mapped to
    :class:`BagError`), a chunk CRC that does not match raises ``zlib.error``.
    """

    def __init__(self, mm: mmap.mmap, chunks: list[Any], channels: dict[int, tuple[str, str]]) -> None:
        self.view = memoryview(mm)
        self.chunks = chunks
        self.channels = channels

    @classmethod
    def open(cls, file: Path) -> _MappedMcap | None:
        """The mapped reader, or None when the file has compressed chunks or no usable summary (then
        rosbags reads it)."""
        with file.open("rb") as f:
            summary = make_reader(f).get_summary()
            if summary is None or not summary.chunk_indexes:
                return None
            if any(c.compression for c in summary.chunk_indexes):
                return None
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        schemas = {k: v.name for k, v in summary.schemas.items()}
        channels = {k: (c.topic, schemas.get(c.schema_id, "")) for k, c in summary.channels.items()}
        chunks = sorted(summary.chunk_indexes, key=lambda c: (c.message_start_time, c.chunk_start_offset))
        return cls(mm, chunks, channels)

    def _chunk(self, chunk: Any, ids: set[int], deser: Callable[..., Any]) -> Iterator[tuple[int, Any]]:
        yield chunk.message_start_time, None  # nothing of the chunk is read before the merge needs it
        v, o = self.view, chunk.chunk_start_offset
        head = o + 9 + 8 + 8 + 8  # opcode, record length, start/end time, uncompressed size
        if v[o] != _CHUNK_OP or head + 4 + 4 + 8 > len(v):
            raise EOFError(f"no chunk record at offset {o}")
        crc = _U32.unpack_from(v, head)[0]
        start = head + 4 + 4 + len(chunk.compression) + 8
        end = start + chunk.uncompressed_size
        if end > len(v) or _U64.unpack_from(v, start - 8)[0] != chunk.uncompressed_size:
            raise EOFError(f"chunk at offset {o} runs past the end of the file")
        if crc and zlib.crc32(v[start:end]) != crc:
            raise zlib.error(f"chunk at offset {o}: CRC mismatch")
        out: list[tuple[int, BagMessage]] = []
        pos = start
        while pos < end:
            if pos + 9 > end:
                raise EOFError(f"record header at offset {pos} runs past its chunk")
            op, size = v[pos], _U64.unpack_from(v, pos + 1)[0]
            body, pos = pos + 9, pos + 9 + size
            if pos > end:
                raise EOFError(f"record at offset {body - 9} ({size} bytes) runs past its chunk")
            if op == _MESSAGE_OP:
                if size < 22:
                    raise EOFError(f"message record at offset {body - 9} is {size} bytes, under 22")
                cid = _U16.unpack_from(v, body)[0]
                if cid in ids:
                    t_ns = _U64.unpack_from(v, body + 6)[0]
                    topic, msgtype = self.channels[cid]
                    out.append((t_ns, BagMessage(topic, msgtype, t_ns * 1e-9, raw=v[body + 22:pos],
                                                 deserialize=deser)))
        out.sort(key=lambda m: m[0])
        yield from out

    def messages(self, wanted: set[str] | None, store: Any) -> Iterator[BagMessage]:
        ids = {cid for cid, (topic, msgtype) in self.channels.items()
               if (wanted is None or topic in wanted) and msgtype in store.fielddefs}
        chunks = [self._chunk(c, ids, store.deserialize_cdr) for c in self.chunks
                  if not c.message_index_offsets or ids.intersection(c.message_index_offsets)]
        for _, m in heapq.merge(*chunks, key=lambda x: x[0]):
            if m is not None:
                yield m


class _SalvagedMcap:
    """An MCAP file whose summary or footer is unreadable (a recording cut short, a truncated copy):
    read record by record from the start, in file order, up to the first bad record, which raises
    :class:`BagError`. Only message types the project typestore knows are delivered."""

    def __init__(self, path: Path, file: Path, store: Any, cause: BaseException) -> None:
        self.path = path
        self.file = file
        self.store = store
        self.cause = cause
        self.topics: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self.time_range: tuple[float, float] | None = None
        log.warning("bag %s: %s; reading it sequentially up to the damage", file, bag_error(path, cause).reason)
        # One pass over the records for the topics (the metadata may be incomplete for a cut recording).
        try:
            for rec in self._records():
                if rec[0] == "message":
                    _, topic, msgtype, _, _ = rec
                    self.topics.setdefault(topic, msgtype)
                    self.counts[topic] = self.counts.get(topic, 0) + 1
        except _READ_ERRORS:
            pass  # reported by messages(), after what is readable

    def _records(self) -> Iterator[tuple[str, str, str, int, bytes]]:
        schemas: dict[int, str] = {}
        channels: dict[int, tuple[str, str]] = {}
        with self.file.open("rb") as f:
            for rec in StreamReader(f, skip_magic=False).records:
                if isinstance(rec, Schema):
                    schemas[rec.id] = rec.name
                elif isinstance(rec, Channel):
                    channels[rec.id] = (rec.topic, schemas.get(rec.schema_id, ""))
                elif isinstance(rec, Message):
                    topic, msgtype = channels.get(rec.channel_id, ("", ""))
                    if topic and msgtype in self.store.fielddefs:
                        yield "message", topic, msgtype, rec.log_time, rec.data
                elif isinstance(rec, Footer):
                    return

    def messages(self, wanted: set[str] | None) -> Iterator[BagMessage]:
        n, last = 0, None
        deser = self.store.deserialize_cdr
        try:
            for _, topic, msgtype, t_ns, data in self._records():
                if wanted is None or topic in wanted:
                    last = t_ns * 1e-9
                    n += 1
                    yield BagMessage(topic, msgtype, last, raw=data, deserialize=deser)
        except _READ_ERRORS as exc:
            raise bag_error(self.path, exc, n, last) from exc
        # The records end cleanly, yet the index could not be opened: the file is still damaged.
        raise bag_error(self.path, self.cause, n, last) from self.cause

    def close(self) -> None:
        pass


def _open_one(path: Path, store: Any) -> _IndexedBag | _SalvagedMcap:
    try:
        return _IndexedBag(path, store)
    except _READ_ERRORS as exc:
        file = _storage_file(path)
        if (path / "metadata.yaml").is_file() and file.suffix == ".mcap" and file.is_file():
            return _SalvagedMcap(path, file, store, exc)
        raise bag_error(path, exc) from exc


class BagReader:
    """One or more rosbag2 folders (MCAP or SQLite3), opened once; use as a context manager.

    ``topics`` (``{topic: ROS type}``), ``counts`` (``{topic: messages}``) and ``time_range``
    (first, last recorded time [s], None when empty) come from the bags' indexes. :meth:`messages`
    merges the bags in recorded-time order. Any problem with a bag raises :class:`BagError` naming the
    file, after the messages read before it were delivered. An MCAP file without a readable summary
    (truncated) is read sequentially up to the damage (its ``counts`` are then what is readable).
    """

    def __init__(self, paths: Path | str | Sequence[Path | str]) -> None:
        self.paths = _paths(paths)
        self._bags: list[_IndexedBag | _SalvagedMcap] = []

    def __enter__(self) -> BagReader:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> None:
        store = typestore()
        try:
            for p in self.paths:
                self._bags.append(_open_one(p, store))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for b in self._bags:
            b.close()
        self._bags = []

    @property
    def salvaged(self) -> list[Path]:
        """Bags being read sequentially because their index is unreadable."""
        return [b.path for b in self._bags if isinstance(b, _SalvagedMcap)]

    @property
    def topics(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for b in self._bags:
            out.update(b.topics)
        return out

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self._bags:
            for k, v in b.counts.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def time_range(self) -> tuple[float, float] | None:
        ranges = [b.time_range for b in self._bags if b.time_range is not None]
        if not ranges:
            return None
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def messages(self, topics: Iterable[str] | None = None) -> Iterator[BagMessage]:
        """Messages of ``topics`` (None = all) in recorded-time order (a salvaged MCAP: in file order)."""
        wanted = None if topics is None else set(topics)
        streams = [self._guarded(b, wanted) for b in self._bags]
        if len(streams) == 1:
            yield from streams[0]
        else:
            yield from heapq.merge(*streams, key=lambda m: m.stamp_sec)

    @staticmethod
    def _guarded(bag: _IndexedBag | _SalvagedMcap, wanted: set[str] | None) -> Iterator[BagMessage]:
        n, last = 0, None
        try:
            for m in bag.messages(wanted):
                n += 1
                last = m.stamp_sec
                yield m
        except _READ_ERRORS as exc:
            raise bag_error(bag.path, exc, n, last) from exc


def read_bag(paths: Path | str | Sequence[Path | str], topics: Iterable[str] | None = None
             ) -> Iterator[BagMessage]:
    """Messages of one or more bags (MCAP or SQLite3 folders), merged in recorded-time order.

    ``topics`` restricts to those topic names (None = all). Messages of types the project
    typestore does not know are deserialised with the type definitions stored in the bag.
    A bad bag raises :class:`BagError` (see :class:`BagReader`).
    """
    with BagReader(paths) as reader:
        yield from reader.messages(topics)


def bag_topics(path: Path | str | Sequence[Path | str]) -> dict[str, str]:
    """``{topic: ROS type name}`` of a bag (or several)."""
    with BagReader(path) as reader:
        return reader.topics


def bag_counts(path: Path | str | Sequence[Path | str]) -> dict[str, int]:
    """``{topic: message count}`` of a bag (or several), from the bag index (no deserialisation)."""
    with BagReader(path) as reader:
        return reader.counts
