"""TensorRT engines: build from ONNX, cache on disk under an exact key, validate before use.

A serialized engine is only valid for the TensorRT version, GPU (compute capability) and precision
it was built with, and for the exact ONNX graph. Loading a stale engine is the most reported failure
of TensorRT nodes, so the cache file name encodes all four (and the DLA core)::

    <onnx stem>.<onnx sha256[:16]>.trt<version>.<gpu slug>-sm<major><minor>.<precision>[.dla<N>].engine

and a JSON sidecar (``.engine.json``) records the same key, the engine's sha256 and its I/O tensors.
On load the sidecar is checked against the wanted key, the bytes against the sha256 (a truncated or
corrupt file is an :class:`EngineError` naming it), and the deserialized engine's I/O names, shapes and
types against the ONNX graph. Anything stale or mismatched is rebuilt, never loaded blindly. The
engine is deserialized once per start: the object that passed the checks is the one that runs.

Where engines live: beside the ONNX file when its folder is writable, otherwise (an installed,
read-only share dir) in ``<cache>/engines`` (``~/.cache/lmm_fusion/engines``), or always in an explicit
``engine_cache_dir``. Engines, their sidecars and the builder's timing cache
(``<onnx stem>.trt<version>.<gpu slug>-sm<cc>.timing.cache``) are written atomically (temporary file
+ ``os.replace``), so a reader never sees half a file.

Precision: ``fp16`` builds the fp32 ONNX graph with ``BuilderFlag.FP16`` (weak typing, the only way
to get fp16 out of an fp32 graph on TensorRT 10); ``int8`` is explicit quantization: the Q/DQ graph
from ``lmm-fusion quantize`` built as a strongly typed network (``STRONGLY_TYPED``, TensorRT 10.x),
so the graph's own types decide what runs in int8 and the rest stays fp32. On the DLA, which runs
only fp16 and int8, the Q/DQ graph is built weakly typed with ``INT8`` + ``FP16`` so the layers
between Q/DQ pairs can stay on the DLA in fp16; fp32 with a DLA core is refused. Written against the
TensorRT 10 Python API, 10.3 (JetPack 6) through 10.13 (:data:`TRT_TESTED`).

The TensorRT and CUDA calls themselves (:class:`TensorRTApi`, :class:`CudaDevice`) need an NVIDIA GPU
and ``tensorrt``; they have not been run on the CPU-only machines this repository is tested on.
Everything around them (cache, keys, folders, atomic writes, which builder flags are set, DLA core,
timing-cache checks, one deserialization, fallback of ``auto``) is tested everywhere through stand-ins
of the same interfaces (``test/test_tensorrt_engine.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import torch

from lmm_fusion.base.paths import cache_dir, default_model_dir
from lmm_fusion.model import INPUT_NAMES
from lmm_fusion.runtime.base import Backend, BackendUnavailable, EngineError
from lmm_fusion.runtime.export import ensure_onnx, sha256_file

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
#: What the DLA computes in; fp32 layers cannot run there.
DLA_PRECISIONS = ("fp16", "int8")
#: TensorRT releases this module is written for (major, first minor, last minor): JetPack 6.1/6.2 ship
#: 10.3, the ``[gpu]`` extra pins 10.13. Other versions are warned about, not refused.
TRT_TESTED = (10, 3, 13)


@dataclass(frozen=True)
class TensorSpec:
    """One engine/graph I/O tensor: name, static shape, direction and numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    is_input: bool
    dtype: str = "float32"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Any change gives another file name."""

    onnx_sha256: str
    trt_version: str
    gpu_name: str
    compute_capability: str  # e.g. "8.7" (Orin), "9.0" (H100/H200)
    precision: str
    dla_core: int | None = None

    def gpu_slug(self) -> str:
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-") or "gpu"
        return f"{gpu}-sm{self.compute_capability.replace('.', '')}"

    def file_name(self, onnx_stem: str) -> str:
        dla = f".dla{self.dla_core}" if self.dla_core is not None else ""
        sha = self.onnx_sha256[:16]
        return f"{onnx_stem}.{sha}.trt{self.trt_version}.{self.gpu_slug()}.{self.precision}{dla}.engine"

    def timing_cache_name(self, onnx_stem: str) -> str:
        """Kernel timings are per TensorRT version and GPU, not per graph: reused after a model change."""
        return f"{onnx_stem}.trt{self.trt_version}.{self.gpu_slug()}.timing.cache"


@dataclass(frozen=True)
class BuildResult:
    """A serialized engine and the builder's timing cache after the build (None: none to keep)."""

    engine: bytes
    timing_cache: bytes | None = None


@dataclass
class LoadedEngine:
    """A deserialized engine ready to run: where it is cached, the engine object, its I/O."""

    path: Path
    engine: Any
    io: list[TensorSpec]
    built: bool = False  # True when it was built by this call, False when loaded from the cache
    cached: bool = True  # False when it could not be written (kept in memory only)


class EngineApi(Protocol):
    """What the cache needs from TensorRT: version/GPU facts, build, deserialize, I/O inspection."""

    def version(self) -> str: ...
    def gpu(self) -> tuple[str, str]: ...  # (name, compute capability "M.m")
    def build(
        self, onnx_path: Path, precision: str, workspace_mib: int, dla_core: int | None, timing_cache: bytes
    ) -> BuildResult: ...
    def deserialize(self, engine_bytes: bytes, dla_core: int | None) -> Any: ...
    def io(self, engine: Any) -> list[TensorSpec]: ...


def trt_version_tested(version: str) -> bool:
    """Whether a TensorRT version string (``"10.3.0.30"``) is in :data:`TRT_TESTED`."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]]
    if len(parts) < 2:
        return False
    major, first, last = TRT_TESTED
    return parts[0] == major and first <= parts[1] <= last


def check_dla(precision: str, dla_core: int | None) -> None:
    """Refuse combinations the DLA cannot run, with the reason (:class:`BackendUnavailable`)."""
    if dla_core is None:
        return
    if int(dla_core) < 0:
        raise ValueError(f"dla_core: expected a core index >= 0 or None, got {dla_core}")
    if precision not in DLA_PRECISIONS:
        # Built anyway, TensorRT would quietly put every layer on the GPU: refuse instead.
        raise BackendUnavailable(
            f"tensorrt: the DLA runs {' and '.join(DLA_PRECISIONS)} only; precision {precision} with "
            f"dla_core={dla_core} refused (choose fp16 or int8, or no DLA core)"
        )


def onnx_io(onnx_path: Path) -> list[TensorSpec]:
    """Input and output tensors (static shapes, numpy dtype names) of an ONNX file."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}

    def spec(vi: Any, is_input: bool) -> TensorSpec:
        t = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        return TensorSpec(vi.name, tuple(int(d.dim_value) for d in t.shape.dim), is_input, dtype)

    specs = [spec(i, True) for i in model.graph.input if i.name not in init]
    specs += [spec(o, False) for o in model.graph.output]
    return specs


def has_qdq(onnx_path: Path) -> bool:
    """Whether the graph carries QuantizeLinear nodes (an explicit-quantization graph)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def folder_writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, not guessed from permission bits)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def default_engine_dir() -> Path:
    """``<cache>/engines``: where engines of a read-only model folder go (``~/.cache/lmm_fusion/engines``)."""
    return cache_dir() / "engines"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class EngineCache:
    """Build-or-load of engines (see module docstring for the key and where files go).

    ``cache_dir``: explicit folder for engines and timing caches; None = beside the ONNX file when
    that folder is writable, else :func:`default_engine_dir`.
    """

    def __init__(self, api: EngineApi, cache_dir: str | Path | None = None) -> None:
        self.api = api
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir not in (None, "") else None

    def folder(self, onnx_path: Path) -> Path:
        """Where engines of ``onnx_path`` are written."""
        if self.cache_dir is not None:
            return self.cache_dir
        if folder_writable(onnx_path.parent):
            return onnx_path.parent
        folder = default_engine_dir()
        log.info("model folder %s is not writable: engines go to %s", onnx_path.parent, folder)
        return folder

    def key(self, onnx_path: Path, precision: str, dla_core: int | None = None) -> EngineKey:
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        name, cc = self.api.gpu()
        return EngineKey(sha256_file(onnx_path), self.api.version(), name, cc, precision, dla_core)

    def path_for(self, onnx_path: Path, key: EngineKey) -> Path:
        return self.folder(onnx_path) / key.file_name(onnx_path.stem)

    def load(self, engine_path: Path, key: EngineKey, onnx_path: Path) -> LoadedEngine:
        """Deserialize a cached engine after checking key, bytes and I/O; :class:`EngineError` naming
        the file when any check fails."""
        meta_path = engine_path.with_suffix(".engine.json")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise EngineError(f"{meta_path}: engine metadata unreadable ({exc})") from exc
        if meta.get("key") != asdict(key):
            raise EngineError(f"{engine_path}: built for {meta.get('key')}, wanted {asdict(key)}")
        try:
            data = engine_path.read_bytes()
        except OSError as exc:
            raise EngineError(f"{engine_path}: unreadable ({exc})") from exc
        if hashlib.sha256(data).hexdigest() != meta.get("engine_sha256"):
            raise EngineError(f"{engine_path}: corrupt or truncated (sha256 does not match its metadata)")
        return LoadedEngine(engine_path, *self._deserialize_checked(data, key, onnx_path, engine_path))

    def _deserialize_checked(
        self, data: bytes, key: EngineKey, onnx_path: Path, engine_path: Path
    ) -> tuple[Any, list[TensorSpec]]:
        try:
            engine = self.api.deserialize(data, key.dla_core)
        except BackendUnavailable:
            raise
        except Exception as exc:
            raise EngineError(f"{engine_path}: TensorRT could not deserialize it ({exc})") from exc
        got = self.api.io(engine)
        want = onnx_io(onnx_path)
        if sorted(got, key=lambda s: s.name) != sorted(want, key=lambda s: s.name):
            raise EngineError(f"{engine_path}: I/O {got} does not match the ONNX graph {want}")
        return engine, got

    def get(
        self,
        onnx_path: str | Path,
        precision: str = "fp16",
        workspace_mib: int = 1024,
        dla_core: int | None = None,
        rebuild: bool = False,
    ) -> LoadedEngine:
        """A deserialized, checked engine for ``onnx_path``: loaded from the cache when valid, otherwise
        (re)built and stored atomically with its metadata and the timing cache."""
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"onnx: {onnx_path} does not exist")
        check_dla(precision, dla_core)
        key = self.key(onnx_path, precision, dla_core)
        folder = self.folder(onnx_path)
        path = folder / key.file_name(onnx_path.stem)
        # An engine prepared beside a now read-only model (e.g. built before installing) is used too.
        for candidate in dict.fromkeys([path, onnx_path.parent / path.name]):
            if candidate.exists() and not rebuild:
                try:
                    return self.load(candidate, key, onnx_path)
                except EngineError as exc:
                    log.warning("rebuilding engine: %s", exc)
        if precision == "int8" and not has_qdq(onnx_path):
            raise EngineError(f"{onnx_path}: int8 needs a Q/DQ graph (`lmm-fusion quantize`); this one has none")
        if folder.is_dir():
            stale = sorted(p.name for p in folder.glob(f"{onnx_path.stem}.*.engine") if p != path)
            if stale:
                log.info("engines for other ONNX/TensorRT/GPU/precision left in place: %s", stale)
        log.info("building TensorRT engine %s (precision %s) — this takes a while on a Jetson", path.name, precision)
        timing_path = folder / key.timing_cache_name(onnx_path.stem)
        try:
            timing = timing_path.read_bytes() if timing_path.is_file() else b""
        except OSError as exc:
            log.warning("timing cache %s unreadable (%s): starting an empty one", timing_path, exc)
            timing = b""
        result = self.api.build(onnx_path, precision, workspace_mib, dla_core, timing)
        engine, specs = self._deserialize_checked(result.engine, key, onnx_path, path)
        meta = {
            "key": asdict(key),
            "engine_sha256": hashlib.sha256(result.engine).hexdigest(),
            "io": [asdict(s) for s in specs],
            "onnx": onnx_path.name,
        }
        cached = True
        try:
            atomic_write(path, result.engine)
            # The sidecar last: until it matches, a reader treats the engine as not there (and rebuilds).
            atomic_write(path.with_suffix(".engine.json"), (json.dumps(meta, indent=2) + "\n").encode())
            if result.timing_cache:
                atomic_write(timing_path, result.timing_cache)
        except OSError as exc:
            cached = False
            log.warning(
                "engine %s built but not cached (%s): it is rebuilt on every start; set engine_cache_dir "
                "to a writable folder",
                path,
                exc,
            )
        return LoadedEngine(path, engine, specs, built=True, cached=cached)


class TensorRTApi:
    """The real TensorRT 10 Python API. Requires an NVIDIA GPU, its driver and ``tensorrt``.

    Written against TensorRT 10.3-10.13; not run on the CPU-only machines this repository is tested
    on (its calls are checked there against a stand-in module with the same names). Parity and speed
    are measured on a GPU machine (docs/benchmarks.md) and on Jetson (docs/jetson.md).
    """

    def __init__(self) -> None:
        try:
            import tensorrt as trt
        except (ImportError, OSError) as exc:  # OSError: the wheel is there, libnvinfer is not
            raise BackendUnavailable(
                f"tensorrt: not importable ({exc}); on x86 pip install '.[gpu]', on a Jetson use JetPack's "
                "TensorRT (docs/jetson.md)"
            ) from exc
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self._runtimes: dict[int | None, Any] = {}  # a runtime must outlive the engines it deserialized
        if not trt_version_tested(str(trt.__version__)):
            major, first, last = TRT_TESTED
            log.warning(
                "TensorRT %s: this module is written for %d.%d-%d.%d (docs/jetson.md)",
                trt.__version__, major, first, major, last,
            )

    def version(self) -> str:
        return str(self.trt.__version__)

    def gpu(self) -> tuple[str, str]:
        if not torch.cuda.is_available():
            raise BackendUnavailable("tensorrt: no CUDA device visible")
        major, minor = torch.cuda.get_device_capability(0)
        return torch.cuda.get_device_name(0), f"{major}.{minor}"

    def strongly_typed(self, precision: str, dla_core: int | None) -> bool:
        """Whether to build a strongly typed network: for Q/DQ graphs on the GPU, where TensorRT has it."""
        has_flag = hasattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        return precision == "int8" and dla_core is None and has_flag

    def _check_dla_core(self, available: int, dla_core: int) -> None:
        if dla_core >= available:
            raise BackendUnavailable(f"tensorrt: DLA core {dla_core} requested, this device has {available}")

    def build(
        self, onnx_path: Path, precision: str, workspace_mib: int, dla_core: int | None, timing_cache: bytes
    ) -> BuildResult:
        trt = self.trt
        builder = trt.Builder(self.logger)
        if dla_core is not None:
            self._check_dla_core(int(builder.num_DLA_cores), dla_core)
        strong = self.strongly_typed(precision, dla_core)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
        network = builder.create_network(flags)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"{onnx_path}: TensorRT ONNX parser failed: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
        if not strong:
            # Weak typing (deprecated since 10.12, the only way to fp16 from an fp32 graph in 10.x):
            # the builder may pick fp16 (and int8 where Q/DQ say so) per layer.
            wanted = {"fp16": ["FP16"], "int8": ["INT8", "FP16"]}.get(precision, [])
            for name in wanted:
                flag = getattr(trt.BuilderFlag, name, None)
                if flag is None:  # TensorRT 11 removed the weak-typing flags
                    raise EngineError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}: build an fp16 ONNX")
                config.set_flag(flag)
        if dla_core is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = int(dla_core)
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU
        self._set_timing_cache(config, timing_cache)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
        cache = config.get_timing_cache()
        timing = bytes(memoryview(cache.serialize())) if cache is not None else None
        return BuildResult(bytes(memoryview(serialized)), timing)

    def _set_timing_cache(self, config: Any, data: bytes) -> None:
        """Use ``data`` as the build's timing cache; an empty one when TensorRT refuses it."""
        try:
            cache = config.create_timing_cache(data)
            accepted = cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))
        except Exception as exc:  # a damaged file may raise instead of returning False
            log.warning("timing cache unusable (%s): starting an empty one", exc)
            accepted = False
        if accepted:
            return
        if data:
            log.warning("timing cache refused (other TensorRT version or GPU): starting an empty one")
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise EngineError("TensorRT refused an empty timing cache")

    def deserialize(self, engine_bytes: bytes, dla_core: int | None) -> Any:
        runtime = self._runtimes.get(dla_core)
        if runtime is None:
            runtime = self.trt.Runtime(self.logger)
            if dla_core is not None:
                self._check_dla_core(int(runtime.num_DLA_cores), dla_core)
                runtime.DLA_core = int(dla_core)  # DLA engines run on the core the runtime names
            self._runtimes[dla_core] = runtime
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise EngineError("deserialize_cuda_engine returned None (version mismatch or corrupt data)")
        return engine

    def io(self, engine: Any) -> list[TensorSpec]:
        trt = self.trt
        specs = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            specs.append(
                TensorSpec(
                    name,
                    tuple(int(d) for d in engine.get_tensor_shape(name)),
                    engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                    np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name,
                )
            )
        return specs


class CudaDevice:
    """Where an engine's I/O lives: torch CUDA tensors (TensorRT takes their addresses) on one stream.

    Needs a CUDA GPU; not run on the CPU-only test machines (the tests use a CPU stand-in with the
    same methods).
    """

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise BackendUnavailable("tensorrt: no CUDA device visible")
        self.stream = torch.cuda.Stream()

    @property
    def handle(self) -> int:
        """The stream handle ``execute_async_v3`` takes."""
        return int(self.stream.cuda_stream)

    def empty(self, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        return torch.empty(shape, dtype=getattr(torch, dtype), device="cuda")

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        with torch.cuda.stream(self.stream):
            yield

    def synchronize(self) -> None:
        self.stream.synchronize()

    def capture(self, launch: Callable[[], None]) -> Callable[[], None]:
        """Record ``launch`` into a CUDA graph on the stream; returns its replay."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            launch()
        return graph.replay


class TensorRTBackend(Backend):
    """Run a cached engine with I/O bound to device tensors on one stream; optional CUDA graph.

    ``dla_core``: run on that DLA core (engine built for it, runtime set to it; fp16/int8 only).
    CUDA-graph replay is used on the GPU only: DLA work cannot be captured into a CUDA graph.
    ``engine_cache_dir``: where engines go (see :class:`EngineCache`). ``api`` and ``device`` are
    the TensorRT and CUDA layers (defaults: :class:`TensorRTApi`, :class:`CudaDevice`).
    """

    name = "tensorrt"
    device = "cuda"

    def __init__(
        self,
        onnx_path: str | Path,
        precision: str = "fp16",
        workspace_mib: int = 1024,
        dla_core: int | None = None,
        cuda_graph: bool = True,
        engine_cache_dir: str | Path | None = None,
        *,
        api: EngineApi | None = None,
        device: CudaDevice | None = None,
    ) -> None:
        check_dla(precision, dla_core)  # before anything is imported or built
        self.api = api if api is not None else TensorRTApi()
        self.cuda = device if device is not None else CudaDevice()
        self.precision = precision
        self.dla_core = dla_core
        loaded = EngineCache(self.api, engine_cache_dir).get(onnx_path, precision, workspace_mib, dla_core)
        self.engine_path = loaded.path
        self.engine = loaded.engine
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{self.engine_path}: create_execution_context failed (out of device memory?)")
        self.buffers: dict[str, Any] = {}
        for spec in loaded.io:
            # I/O stays at the ONNX graph's types (float32) at the boundary; TensorRT casts inside.
            self.buffers[spec.name] = self.cuda.empty(spec.shape, spec.dtype)
            if self.context.set_tensor_address(spec.name, self.buffers[spec.name].data_ptr()) is False:
                raise EngineError(f"{self.engine_path}: set_tensor_address({spec.name}) refused")
        missing = [n for n in INPUT_NAMES if n not in self.buffers]
        if missing:
            raise EngineError(f"{self.engine_path}: engine lacks inputs {missing}")
        self.outputs = [s.name for s in loaded.io if not s.is_input]
        self.use_graph = cuda_graph and dla_core is None
        self._replay: Callable[[], None] | None = None

    def describe(self) -> str:
        dla = f", DLA core {self.dla_core}" if self.dla_core is not None else ""
        return f"{self.name} ({self.device}{dla}, {self.precision})"

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.cuda.handle):
            raise EngineError(f"{self.engine_path}: execute_async_v3 failed")

    def _capture(self) -> None:
        self._enqueue()  # TensorRT needs one ordinary run before capture
        try:
            self._replay = self.cuda.capture(self._enqueue)
        except RuntimeError as exc:
            log.warning("%s: CUDA-graph capture failed (%s); enqueueing every cycle", self.engine_path.name, exc)
            self.use_graph = False

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.cuda.scope():
            for n in INPUT_NAMES:
                self.buffers[n].copy_(torch.from_numpy(np.ascontiguousarray(inputs[n], np.float32)), non_blocking=True)
            if self.use_graph and self._replay is None:
                self._capture()
            if self._replay is not None:
                self._replay()
            else:
                self._enqueue()
            out = {n: self.buffers[n].cpu() for n in self.outputs}
        self.cuda.synchronize()
        return {n: t.numpy() for n, t in out.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", default=None, help="ONNX file (default: the shipped model's model[.int8].onnx)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--workspace", type=int, default=1024, help="builder workspace [MiB]")
    p.add_argument("--dla-core", type=int, default=None, help="build for this DLA core (Jetson Orin; fp16/int8)")
    p.add_argument(
        "--engine-cache-dir",
        default=None,
        help="folder for engines and timing caches (default: beside the ONNX file, or ~/.cache/lmm_fusion/engines "
        "when that folder is read-only)",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild even when a valid engine is cached")


def run(args: argparse.Namespace) -> int:
    onnx_path = Path(args.onnx) if args.onnx else ensure_onnx(default_model_dir(), args.precision)
    loaded = EngineCache(TensorRTApi(), args.engine_cache_dir).get(
        onnx_path, args.precision, args.workspace, args.dla_core, rebuild=args.rebuild
    )
    print(loaded.path)
    return 0 if loaded.cached else 1
