"""TensorRT engines: build from ONNX, cache on disk under an exact key, validate before use.

A serialized engine is only valid for the TensorRT version, GPU (compute capability) and precision
it was built with, and for the exact ONNX graph. Loading a stale engine is the most reported failure
of TensorRT nodes, so the cache file name encodes all four::

    <onnx stem>.<onnx sha256[:16]>.trt<version>.<gpu slug>-sm<major><minor>.<precision>[.dla<N>].engine

and a JSON sidecar (``.engine.json``) records the same key, the engine's sha256 and its I/O tensors.
On load the sidecar is checked against the wanted key, the bytes against the sha256 (a truncated or
corrupt file is an :class:`EngineError` naming it), and the deserialized engine's I/O names and shapes
against the ONNX graph. Anything stale or mismatched is rebuilt, never loaded blindly.

The TensorRT calls themselves (:class:`TensorRTApi`) need an NVIDIA GPU and the ``tensorrt`` wheel
(the ``[gpu]`` extra); they are exercised on such machines only. The cache logic around them is
tested everywhere through the same :class:`EngineApi` interface.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import torch

from lmm_fusion.base.paths import default_model_dir
from lmm_fusion.model import INPUT_NAMES
from lmm_fusion.runtime.base import Backend, BackendUnavailable, EngineError
from lmm_fusion.runtime.export import ensure_onnx, sha256_file

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    is_input: bool


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Any change gives another file name."""

    onnx_sha256: str
    trt_version: str
    gpu_name: str
    compute_capability: str  # e.g. "8.7" (Orin), "9.0" (H100/H200)
    precision: str
    dla_core: int | None = None

    def file_name(self, onnx_stem: str) -> str:
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-") or "gpu"
        cc = self.compute_capability.replace(".", "")
        dla = f".dla{self.dla_core}" if self.dla_core is not None else ""
        return f"{onnx_stem}.{self.onnx_sha256[:16]}.trt{self.trt_version}.{gpu}-sm{cc}.{self.precision}{dla}.engine"


class EngineApi(Protocol):
    """What the cache needs from TensorRT: version/GPU facts, build, and I/O inspection."""

    def version(self) -> str: ...
    def gpu(self) -> tuple[str, str]: ...  # (name, compute capability "M.m")
    def build(
        self, onnx_path: Path, precision: str, workspace_mib: int, dla_core: int | None, timing_cache: Path | None
    ) -> bytes: ...
    def inspect(self, engine_bytes: bytes) -> list[TensorSpec]: ...


def onnx_io(onnx_path: Path) -> list[TensorSpec]:
    """Input and output tensors (static shapes) of an ONNX file."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}

    def dims(vi: Any) -> tuple[int, ...]:
        return tuple(int(d.dim_value) for d in vi.type.tensor_type.shape.dim)

    specs = [TensorSpec(i.name, dims(i), True) for i in model.graph.input if i.name not in init]
    specs += [TensorSpec(o.name, dims(o), False) for o in model.graph.output]
    return specs


class EngineCache:
    """Build-or-load of engines next to their ONNX file (see module docstring)."""

    def __init__(self, api: EngineApi, cache_dir: Path | None = None) -> None:
        self.api = api
        self.cache_dir = cache_dir

    def key(self, onnx_path: Path, precision: str, dla_core: int | None = None) -> EngineKey:
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        name, cc = self.api.gpu()
        return EngineKey(sha256_file(onnx_path), self.api.version(), name, cc, precision, dla_core)

    def path_for(self, onnx_path: Path, key: EngineKey) -> Path:
        folder = self.cache_dir or onnx_path.parent
        return folder / key.file_name(onnx_path.stem)

    def validate(self, engine_path: Path, key: EngineKey, onnx_path: Path) -> bytes:
        """Bytes of a usable cached engine; raises :class:`EngineError` naming the file otherwise."""
        meta_path = engine_path.with_suffix(".engine.json")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise EngineError(f"{meta_path}: engine metadata unreadable ({exc})") from exc
        if meta.get("key") != asdict(key):
            raise EngineError(f"{engine_path}: built for {meta.get('key')}, wanted {asdict(key)}")
        data = engine_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("engine_sha256"):
            raise EngineError(f"{engine_path}: corrupt or truncated (sha256 does not match its metadata)")
        try:
            got = self.api.inspect(data)
        except Exception as exc:
            raise EngineError(f"{engine_path}: TensorRT could not deserialize it ({exc})") from exc
        want = onnx_io(onnx_path)
        if sorted(got, key=lambda s: s.name) != sorted(want, key=lambda s: s.name):
            raise EngineError(f"{engine_path}: I/O {got} does not match the ONNX graph {want}")
        return data

    def get(
        self,
        onnx_path: str | Path,
        precision: str = "fp16",
        workspace_mib: int = 1024,
        dla_core: int | None = None,
        rebuild: bool = False,
    ) -> tuple[Path, bytes]:
        """Path and bytes of a valid engine for ``onnx_path``: loaded from the cache when valid,
        otherwise (re)built and stored atomically with its metadata."""
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"onnx: {onnx_path} does not exist")
        key = self.key(onnx_path, precision, dla_core)
        path = self.path_for(onnx_path, key)
        if path.exists() and not rebuild:
            try:
                return path, self.validate(path, key, onnx_path)
            except EngineError as exc:
                log.warning("rebuilding engine: %s", exc)
        stale = sorted(p.name for p in path.parent.glob(f"{onnx_path.stem}.*.engine") if p != path)
        if stale:
            log.info("engines for other ONNX/TensorRT/GPU/precision left in place: %s", stale)
        log.info("building TensorRT engine %s (precision %s) — this takes a while on a Jetson", path.name, precision)
        timing_cache = path.parent / f"{onnx_path.stem}.trt{key.trt_version}.{key.compute_capability}.timing.cache"
        data = self.api.build(onnx_path, precision, workspace_mib, dla_core, timing_cache)
        specs = self.api.inspect(data)
        meta = {
            "key": asdict(key),
            "engine_sha256": hashlib.sha256(data).hexdigest(),
            "io": [asdict(s) for s in specs],
            "onnx": onnx_path.name,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".engine.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        path.with_suffix(".engine.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path, data


class TensorRTApi:
    """The real TensorRT 10 Python API. Requires an NVIDIA GPU, its driver and ``tensorrt``.

    Not runnable on CPU-only machines; parity and speed are measured on a GPU machine
    (docs/benchmarks.md) and on Jetson (docs/jetson.md).
    """

    def __init__(self) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendUnavailable(
                f"tensorrt: not installed ({exc}); pip install 'lmm_fusion[gpu]' or use JetPack's TensorRT"
            ) from exc
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)

    def version(self) -> str:
        return str(self.trt.__version__)

    def gpu(self) -> tuple[str, str]:
        if not torch.cuda.is_available():
            raise BackendUnavailable("tensorrt: no CUDA device visible")
        major, minor = torch.cuda.get_device_capability(0)
        return torch.cuda.get_device_name(0), f"{major}.{minor}"

    def build(
        self, onnx_path: Path, precision: str, workspace_mib: int, dla_core: int | None, timing_cache: Path | None
    ) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"{onnx_path}: TensorRT ONNX parser failed: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "int8":
            # Explicit quantization: scales come from the Q/DQ nodes of the ONNX graph (no calibrator).
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)  # layers left unquantized may still run in fp16
        if dla_core is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = int(dla_core)
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU
        cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
        if timing_cache is not None:
            timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
        return bytes(memoryview(serialized))

    def deserialize(self, engine_bytes: bytes) -> Any:
        runtime = self.trt.Runtime(self.logger)
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise EngineError("deserialize_cuda_engine returned None (version mismatch or corrupt data)")
        return engine

    def inspect(self, engine_bytes: bytes) -> list[TensorSpec]:
        engine = self.deserialize(engine_bytes)
        trt = self.trt
        specs = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            specs.append(
                TensorSpec(
                    name,
                    tuple(int(d) for d in engine.get_tensor_shape(name)),
                    engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                )
            )
        return specs


class TensorRTBackend(Backend):
    """Run a cached engine with I/O bound to torch CUDA tensors on one stream; optional CUDA graph."""

    name = "tensorrt"
    device = "cuda"

    def __init__(
        self,
        onnx_path: str | Path,
        precision: str = "fp16",
        workspace_mib: int = 1024,
        dla_core: int | None = None,
        cuda_graph: bool = True,
    ) -> None:
        self.api = TensorRTApi()
        self.precision = precision
        path, data = EngineCache(self.api).get(onnx_path, precision, workspace_mib, dla_core)
        self.engine_path = path
        self.engine = self.api.deserialize(data)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.buffers: dict[str, Any] = {}
        for spec in self.api.inspect(data):
            dtype = torch.float32  # I/O stays fp32 at the boundary; TensorRT casts inside
            self.buffers[spec.name] = torch.empty(spec.shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(spec.name, self.buffers[spec.name].data_ptr())
        self.outputs = [s.name for s in self.api.inspect(data) if not s.is_input]
        self.use_graph = cuda_graph
        self._graph: Any = None

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError(f"{self.engine_path}: execute_async_v3 failed")

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.cuda.stream(self.stream):
            for n in INPUT_NAMES:
                self.buffers[n].copy_(torch.from_numpy(np.ascontiguousarray(inputs[n], np.float32)), non_blocking=True)
            if self.use_graph and self._graph is None:
                self._enqueue()  # TensorRT needs one ordinary run before capture
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph, stream=self.stream):
                    self._enqueue()
            if self._graph is not None:
                self._graph.replay()
            else:
                self._enqueue()
            out = {n: self.buffers[n].cpu() for n in self.outputs}
        self.stream.synchronize()
        return {n: t.numpy() for n, t in out.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", default=None, help="ONNX file (default: the shipped model's model.onnx)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--workspace", type=int, default=1024, help="builder workspace [MiB]")
    p.add_argument("--dla-core", type=int, default=None, help="build for this DLA core (Jetson Xavier/Orin)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even when a valid engine is cached")


def run(args: argparse.Namespace) -> int:
    onnx_path = Path(args.onnx) if args.onnx else ensure_onnx(default_model_dir(), args.precision)
    path, _ = EngineCache(TensorRTApi()).get(
        onnx_path, args.precision, args.workspace, args.dla_core, rebuild=args.rebuild
    )
    print(path)
    return 0
