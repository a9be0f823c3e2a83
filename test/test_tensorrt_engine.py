"""The TensorRT path without TensorRT: the real TensorRTApi/TensorRTBackend code run against stand-ins.

``FakeTrt`` is a module with the names of the TensorRT 10 Python API that ``lmm_fusion.runtime.tensorrt``
calls, behaving like them where it matters here: the ONNX parser rejects a DequantizeLinear of a
non-int8 initializer (as TensorRT 10's does), builder precision flags are refused on a strongly typed
network, a timing cache from another GPU/version is refused by ``set_timing_cache(ignore_mismatch=False)``,
corrupt bytes deserialize to None, and ``execute_async_v3`` writes the outputs at the addresses bound
to it. ``CpuDevice`` stands in for the CUDA buffers and stream. What this cannot show is that real
TensorRT and CUDA behave like these stand-ins; that needs a GPU (docs/jetson.md).
"""

from __future__ import annotations

import ctypes
import enum
import json
import logging
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lmm_fusion.cycle.pipeline import FusionPipeline
from lmm_fusion.model import INPUT_NAMES, OUTPUT_NAMES, FusionModel, ModelConfig, save_model
from lmm_fusion.ros.diagnostics import FusionDiagnostics
from lmm_fusion.ros.outputs import OK, WARN
from lmm_fusion.ros.params import defaults, validate
from lmm_fusion.runtime import tensorrt as trt_mod
from lmm_fusion.runtime.backends import OnnxRuntimeBackend, make_backend
from lmm_fusion.runtime.base import BackendUnavailable, EngineError
from lmm_fusion.runtime.export import example_inputs, export_onnx
from lmm_fusion.runtime.tensorrt import (
    EngineCache,
    TensorRTApi,
    TensorRTBackend,
    atomic_write,
    folder_writable,
    trt_version_tested,
)

MAGIC = b"FAKETRT"


# ----------------------------------------------------------------------------- the stand-ins
class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 5


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    GPU_FALLBACK = 3


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class DeviceType(enum.IntEnum):
    GPU = 0
    DLA = 1


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2


NPTYPE = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8}


class FakeTrt(types.ModuleType):
    """A fresh ``tensorrt`` stand-in per test; ``fail`` names the stages that fail, the rest records."""

    def __init__(self, version: str = "10.3.0", strongly_typed: bool = True, dla_cores: int = 2) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.fail: set[str] = set()
        self.origin = f"{version}/Orin"  # what a timing cache written here is tied to
        self.dla_cores = dla_cores
        self.networks: list[Any] = []
        self.configs: list[Any] = []
        self.runtimes: list[Any] = []
        self.timing_inputs: list[bytes] = []
        self.deserializations = 0
        self.executions = 0
        flags = {k: v for k, v in NetworkDefinitionCreationFlag.__members__.items()}
        if not strongly_typed:
            flags.pop("STRONGLY_TYPED")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
        self.BuilderFlag = BuilderFlag
        self.MemoryPoolType = MemoryPoolType
        self.DeviceType = DeviceType
        self.TensorIOMode = TensorIOMode
        self.DataType = DataType
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, severity: int) -> None:
                self.severity = severity

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags = flags
                self.io: list[tuple[str, list[int], bool]] = []

            @property
            def strongly_typed(self) -> bool:
                return bool(self.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                self.network = network
                self.errors: list[str] = []

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, i: int) -> str:
                return self.errors[i]

            def parse(self, model: bytes, path: str | None = None) -> bool:
                proto = onnx.load_from_string(model)
                inits = {i.name: i for i in proto.graph.initializer}
                for node in proto.graph.node:
                    x = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
                    if x is not None and x.data_type != TensorProto.INT8:
                        # TensorRT 10: DequantizeLinear takes INT8/FP8/INT4 input only.
                        self.errors.append(f"In node {node.name} (parseGraph): INVALID_NODE: DequantizeLinear "
                                           f"input {x.name} is {TensorProto.DataType.Name(x.data_type)}")
                if self.errors or "parse" in fake.fail:
                    self.errors = self.errors or ["In node 0 (parseGraph): UNSUPPORTED_NODE"]
                    return False
                dims = lambda vi: [d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
                self.network.io = [(i.name, dims(i), True) for i in proto.graph.input if i.name not in inits]
                self.network.io += [(o.name, dims(o), False) for o in proto.graph.output]
                return True

        class TimingCache:
            def __init__(self, data: bytes) -> None:
                origin, _, count = data.decode().rpartition("#") if data else (fake.origin, "#", "0")
                self.origin, self.entries = origin, int(count)

            def serialize(self) -> bytes:
                return f"{self.origin}#{self.entries}".encode()

        class BuilderConfig:
            def __init__(self) -> None:
                self.flags: set[BuilderFlag] = set()
                self.pools: dict[MemoryPoolType, int] = {}
                self.default_device_type = DeviceType.GPU
                self.DLA_core = -1
                self.timing_cache: TimingCache | None = None

            def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
                self.pools[pool] = size

            def set_flag(self, flag: BuilderFlag) -> None:
                self.flags.add(flag)

            def create_timing_cache(self, data: bytes) -> TimingCache:
                fake.timing_inputs.append(bytes(data))
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                if cache.origin != fake.origin and not ignore_mismatch:
                    return False
                self.timing_cache = cache
                return True

            def get_timing_cache(self) -> TimingCache | None:
                return self.timing_cache

        class Builder:
            def __init__(self, logger: Logger) -> None:
                self.num_DLA_cores = fake.dla_cores

            def create_network(self, flags: int) -> Network:
                fake.networks.append(Network(flags))
                return fake.networks[-1]

            def create_builder_config(self) -> BuilderConfig:
                fake.configs.append(BuilderConfig())
                return fake.configs[-1]

            def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
                if "build" in fake.fail:
                    return None
                if network.strongly_typed and config.flags & {BuilderFlag.FP16, BuilderFlag.INT8}:
                    return None  # TensorRT: precision flags are not allowed on a strongly typed network
                if config.timing_cache is not None:
                    config.timing_cache.entries += 1
                dla = config.DLA_core if config.default_device_type == DeviceType.DLA else None
                return MAGIC + json.dumps({"io": network.io, "dla": dla}).encode()

        class Context:
            def __init__(self, engine: Engine) -> None:
                self.engine = engine
                self.addresses: dict[str, int] = {}

            def set_tensor_address(self, name: str, ptr: int) -> bool:
                self.addresses[name] = ptr
                return True

            def _view(self, name: str) -> np.ndarray:
                n = int(np.prod(self.engine.shapes[name]))
                return np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses[name]))

            def execute_async_v3(self, stream_handle: int) -> bool:
                fake.executions += 1
                if "execute" in fake.fail:
                    return False
                ego = float(self._view("ego").sum())
                for k, name in enumerate(n for n, _, is_in in self.engine.io if not is_in):
                    self._view(name)[:] = np.nan if "nan" in fake.fail else k + ego
                return True

        class Engine:
            def __init__(self, payload: dict[str, Any]) -> None:
                self.io = [tuple(t) for t in payload["io"]]
                self.shapes = {n: tuple(s) for n, s, _ in self.io}
                self.dla = payload["dla"]

            @property
            def num_io_tensors(self) -> int:
                return len(self.io)

            def get_tensor_name(self, i: int) -> str:
                return str(self.io[i][0])

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return self.shapes[name]

            def get_tensor_mode(self, name: str) -> TensorIOMode:
                return next(TensorIOMode.INPUT if i else TensorIOMode.OUTPUT for n, _, i in self.io if n == name)

            def get_tensor_dtype(self, name: str) -> DataType:
                return DataType.FLOAT

            def create_execution_context(self) -> Context:
                return Context(self)

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                self.num_DLA_cores = fake.dla_cores
                self.DLA_core = -1
                self.loaded_on: list[int] = []
                fake.runtimes.append(self)

            def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
                fake.deserializations += 1
                if "deserialize" in fake.fail or not bytes(data).startswith(MAGIC):
                    return None
                self.loaded_on.append(self.DLA_core)
                return Engine(json.loads(bytes(data)[len(MAGIC):]))

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime

    @staticmethod
    def nptype(dtype: DataType) -> type:
        return NPTYPE[dtype]


class CpuDevice:
    """Stands in for :class:`~lmm_fusion.runtime.tensorrt.CudaDevice`: host tensors, no stream."""

    handle = 7

    def __init__(self) -> None:
        self.captures = 0

    def empty(self, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        return torch.empty(shape, dtype=getattr(torch, dtype))

    @contextmanager
    def scope(self) -> Iterator[None]:
        yield

    def synchronize(self) -> None:
        pass

    def capture(self, launch: Callable[[], None]) -> Callable[[], None]:
        self.captures += 1
        return launch


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("trt_model")
    save_model(FusionModel(ModelConfig()), d)
    export_onnx(d, check_parity=False)
    return d


def qdq_copy(src: Path, dst: Path, int32_bias: bool = False) -> Path:
    """``src`` with a symmetric int8 Q/DQ pair on the image input (a minimal explicit-quantization
    graph); with ``int32_bias`` also an int32 initializer behind a DequantizeLinear (ONNX Runtime's
    default bias form, which TensorRT 10 rejects)."""
    proto = onnx.load(str(src))
    g = proto.graph
    for node in g.node:
        node.input[:] = ["image_dq" if i == "image" else i for i in node.input]
    g.initializer.extend([
        numpy_helper.from_array(np.array(1 / 64, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
    ])
    nodes = [helper.make_node("QuantizeLinear", ["image", "s", "zp"], ["image_q"], name="q_image"),
             helper.make_node("DequantizeLinear", ["image_q", "s", "zp"], ["image_dq"], name="dq_image")]
    if int32_bias:
        g.initializer.extend([numpy_helper.from_array(np.zeros(1, np.int32), "b_q"),
                              numpy_helper.from_array(np.array(0, np.int32), "b_zp")])
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "s", "b_zp"], ["b"], name="dq_bias"))
    for n in reversed(nodes):
        g.node.insert(0, n)
    onnx.save(proto, str(dst))
    return dst


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeTrt:
    module = FakeTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(TensorRTApi, "gpu", lambda self: ("Orin", "8.7"))
    monkeypatch.setattr(trt_mod, "CudaDevice", CpuDevice)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return module


# ----------------------------------------------------------------------------- tests
def test_backend_runs_the_engine_and_reads_outputs_back(fake: FakeTrt, model_dir: Path, tmp_path: Path) -> None:
    backend = TensorRTBackend(model_dir / "model.onnx", precision="fp16", engine_cache_dir=tmp_path)
    inputs = example_inputs(ModelConfig(), seed=1)
    out = backend.infer(inputs)
    ego = float(inputs["ego"].sum())
    assert list(out) == list(OUTPUT_NAMES)
    for k, name in enumerate(OUTPUT_NAMES):  # what the stand-in wrote at the bound addresses
        np.testing.assert_allclose(out[name], np.full_like(out[name], k + ego), rtol=1e-5, err_msg=name)
    cfg = fake.configs[-1]
    assert BuilderFlag.FP16 in cfg.flags and fake.networks[-1].flags == 0  # fp32 graph, fp16 by builder flag
    assert cfg.pools[MemoryPoolType.WORKSPACE] == 1024 << 20
    assert backend.use_graph and backend.cuda.captures == 1
    backend.infer(inputs)
    assert backend.cuda.captures == 1  # replayed, not captured again


def test_engine_is_deserialized_once_per_start(fake: FakeTrt, model_dir: Path, tmp_path: Path) -> None:
    TensorRTBackend(model_dir / "model.onnx", engine_cache_dir=tmp_path)
    assert fake.deserializations == 1 and len(fake.configs) == 1  # built, then deserialized once
    TensorRTBackend(model_dir / "model.onnx", engine_cache_dir=tmp_path)
    assert fake.deserializations == 2 and len(fake.configs) == 1  # loaded from the cache, once


def test_qdq_graph_builds_strongly_typed_without_precision_flags(
    fake: FakeTrt, model_dir: Path, tmp_path: Path
) -> None:
    onnx_path = qdq_copy(model_dir / "model.onnx", tmp_path / "model.int8.onnx")
    backend = TensorRTBackend(onnx_path, precision="int8", engine_cache_dir=tmp_path)
    assert fake.networks[-1].flags == 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert not fake.configs[-1].flags & {BuilderFlag.FP16, BuilderFlag.INT8}
    assert np.all(np.isfinite(backend.infer(example_inputs(ModelConfig()))["risk_logits"]))


def test_qdq_graph_without_strong_typing_uses_int8_and_fp16_flags(
    monkeypatch: pytest.MonkeyPatch, fake: FakeTrt, model_dir: Path, tmp_path: Path
) -> None:
    older = FakeTrt(strongly_typed=False)
    monkeypatch.setitem(sys.modules, "tensorrt", older)
    onnx_path = qdq_copy(model_dir / "model.onnx", tmp_path / "model.int8.onnx")
    TensorRTBackend(onnx_path, precision="int8", engine_cache_dir=tmp_path)
    assert older.networks[-1].flags == 0 and {BuilderFlag.INT8, BuilderFlag.FP16} <= older.configs[-1].flags


def test_int8_needs_a_qdq_graph(fake: FakeTrt, model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="Q/DQ graph"):
        TensorRTBackend(model_dir / "model.onnx", precision="int8", engine_cache_dir=tmp_path)


def test_int32_bias_dequantize_fails_the_parse_with_the_parser_message(
    fake: FakeTrt, model_dir: Path, tmp_path: Path
) -> None:
    onnx_path = qdq_copy(model_dir / "model.onnx", tmp_path / "model.int8.onnx", int32_bias=True)
    with pytest.raises(EngineError, match=r"ONNX parser failed: .*dq_bias.*INT32"):
        TensorRTBackend(onnx_path, precision="int8", engine_cache_dir=tmp_path)


def test_shipped_int8_graph_parses(fake: FakeTrt, tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parents[1] / "models" / "fusion_small" / "model.int8.onnx"
    result = TensorRTApi().build(shipped, "int8", 256, None, b"")
    assert result.engine.startswith(MAGIC)
    assert {name for name, _, is_in in json.loads(result.engine[len(MAGIC):])["io"] if not is_in} == set(OUTPUT_NAMES)


@pytest.mark.parametrize(
    ("stage", "reason"),
    [
        ("import", "not importable"),
        ("parse", "ONNX parser failed"),
        ("build", "engine build failed"),
        ("deserialize", "could not deserialize"),
        ("execute", "execute_async_v3 failed"),
        ("nan", "non-finite values"),
    ],
)
def test_auto_falls_back_on_each_tensorrt_failure(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fake: FakeTrt,
    model_dir: Path,
    tmp_path: Path,
    stage: str,
    reason: str,
) -> None:
    if stage == "import":
        monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    fake.fail.add(stage)
    with caplog.at_level(logging.INFO, logger="lmm_fusion.runtime"):
        backend = make_backend("auto", model_dir, engine_cache_dir=tmp_path)
    assert isinstance(backend, OnnxRuntimeBackend) and backend.device == "cpu"
    assert backend.fallback_reason is not None
    assert backend.fallback_reason.startswith("tensorrt/gpu: ") and reason in backend.fallback_reason
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "falling back" in r.getMessage()]
    # A missing package is expected on such a machine: logged in the summary, not warned about.
    assert len(warned) == (0 if stage == "import" else 1)
    assert reason in caplog.text and "backend auto: chose onnxruntime" in caplog.text


def test_auto_chooses_a_working_engine_with_no_fallback_reason(fake: FakeTrt, model_dir: Path, tmp_path: Path) -> None:
    backend = make_backend("auto", model_dir, engine_cache_dir=tmp_path)
    assert isinstance(backend, TensorRTBackend) and backend.precision == "fp16"
    assert backend.fallback_reason is None
    assert fake.executions >= 1  # chosen only after one inference ran


def test_dla_engine_is_built_found_and_loaded_on_its_core(fake: FakeTrt, model_dir: Path, tmp_path: Path) -> None:
    backend = make_backend("tensorrt", model_dir, precision="fp16", dla_core=1, engine_cache_dir=tmp_path)
    assert isinstance(backend, TensorRTBackend)
    cfg = fake.configs[-1]
    assert cfg.default_device_type == DeviceType.DLA and cfg.DLA_core == 1 and BuilderFlag.GPU_FALLBACK in cfg.flags
    assert fake.runtimes[-1].loaded_on == [1]  # runtime.DLA_core set before deserializing
    assert backend.engine_path.name.endswith(".fp16.dla1.engine")
    assert not backend.use_graph and "DLA core 1" in backend.describe()
    backend.infer(example_inputs(ModelConfig()))
    assert backend.cuda.captures == 0  # no CUDA graph on the DLA
    again = make_backend("tensorrt", model_dir, precision="fp16", dla_core=1, engine_cache_dir=tmp_path)
    assert again.engine_path == backend.engine_path and len(fake.configs) == 1  # found, not rebuilt
    assert fake.runtimes[-1].loaded_on == [1]


def test_int8_on_dla_keeps_weak_typing_so_layers_stay_on_the_dla(
    fake: FakeTrt, model_dir: Path, tmp_path: Path
) -> None:
    onnx_path = qdq_copy(model_dir / "model.onnx", tmp_path / "model.int8.onnx")
    TensorRTBackend(onnx_path, precision="int8", dla_core=0, engine_cache_dir=tmp_path)
    assert fake.networks[-1].flags == 0 and {BuilderFlag.INT8, BuilderFlag.FP16} <= fake.configs[-1].flags


def test_fp32_on_dla_is_refused_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, fake: FakeTrt, model_dir: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # refused before TensorRT is even imported
    with pytest.raises(BackendUnavailable, match="DLA runs fp16 and int8 only; precision fp32"):
        make_backend("tensorrt", model_dir, precision="fp32", dla_core=0)
    with pytest.raises(BackendUnavailable, match="DLA runs"):
        TensorRTBackend(model_dir / "model.onnx", precision="fp32", dla_core=0, engine_cache_dir=tmp_path)
    trt_mod.check_dla("fp32", None)  # fp32 on the GPU and fp16/int8 on the DLA pass
    trt_mod.check_dla("int8", 1)
    with pytest.raises(ValueError, match="dla_core"):
        trt_mod.check_dla("fp16", -1)


def test_auto_with_dla_asks_tensorrt_for_fp16(fake: FakeTrt, model_dir: Path, tmp_path: Path) -> None:
    backend = make_backend("auto", model_dir, precision="fp32", dla_core=0, engine_cache_dir=tmp_path)
    assert isinstance(backend, TensorRTBackend) and backend.precision == "fp16" and backend.dla_core == 0


def test_missing_dla_core_is_refused(fake: FakeTrt, model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="DLA core 2 requested, this device has 2"):
        TensorRTBackend(model_dir / "model.onnx", dla_core=2, engine_cache_dir=tmp_path)


def test_timing_cache_is_kept_per_gpu_reused_and_a_foreign_one_refused(
    caplog: pytest.LogCaptureFixture, fake: FakeTrt, model_dir: Path, tmp_path: Path
) -> None:
    onnx_path = model_dir / "model.onnx"
    cache = EngineCache(TensorRTApi(), tmp_path)
    first = cache.get(onnx_path, "fp16")
    timing = tmp_path / "model.trt10.3.0.orin-sm87.timing.cache"
    assert timing.read_bytes() == b"10.3.0/Orin#1" and fake.timing_inputs == [b""]
    cache.get(onnx_path, "fp16", rebuild=True)
    assert fake.timing_inputs[-1] == b"10.3.0/Orin#1" and timing.read_bytes() == b"10.3.0/Orin#2"
    timing.write_bytes(b"10.2.0/Xavier#40")  # e.g. copied from another board
    with caplog.at_level(logging.WARNING, logger="lmm_fusion.runtime.tensorrt"):
        again = cache.get(onnx_path, "fp16", rebuild=True)
    assert "timing cache refused" in caplog.text
    assert fake.timing_inputs[-2:] == [b"10.2.0/Xavier#40", b""]  # refused, then a fresh one
    assert timing.read_bytes() == b"10.3.0/Orin#1" and again.path == first.path


def test_read_only_model_folder_puts_engines_in_the_user_cache(
    monkeypatch: pytest.MonkeyPatch, fake: FakeTrt, model_dir: Path, tmp_path: Path
) -> None:
    monkeypatch.setattr(trt_mod, "folder_writable", lambda folder: Path(folder) != model_dir)
    backend = TensorRTBackend(model_dir / "model.onnx")
    engines = tmp_path / "xdg" / "lmm_fusion" / "engines"
    assert backend.engine_path.parent == engines and backend.engine_path.is_file()
    assert (engines / "model.trt10.3.0.orin-sm87.timing.cache").is_file()
    assert not list(model_dir.glob("*.engine")) and not list(model_dir.glob("*.timing.cache"))
    again = TensorRTBackend(model_dir / "model.onnx")
    assert again.engine_path == backend.engine_path and len(fake.configs) == 1  # found there next start


def test_engine_that_cannot_be_written_still_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fake: FakeTrt, model_dir: Path,
    tmp_path: Path
) -> None:
    def refuse(path: Path, data: bytes) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(trt_mod, "atomic_write", refuse)
    with caplog.at_level(logging.WARNING, logger="lmm_fusion.runtime.tensorrt"):
        loaded = EngineCache(TensorRTApi(), tmp_path).get(model_dir / "model.onnx", "fp16")
    assert loaded.built and not loaded.cached and loaded.engine is not None
    assert "built but not cached" in caplog.text and "engine_cache_dir" in caplog.text


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / "sub" / "x.engine"
    atomic_write(target, b"first")
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second" and [p.name for p in target.parent.iterdir()] == ["x.engine"]

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(trt_mod.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"third")
    assert target.read_bytes() == b"second" and [p.name for p in target.parent.iterdir()] == ["x.engine"]


def test_folder_writable_is_tried_not_guessed(tmp_path: Path) -> None:
    assert folder_writable(tmp_path)
    assert not folder_writable(tmp_path / "missing")


def test_tested_tensorrt_versions(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    assert trt_version_tested("10.3.0.30") and trt_version_tested("10.13.3.9")
    assert not trt_version_tested("8.6.1") and not trt_version_tested("10.2.0") and not trt_version_tested("11.0")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt(version="10.14.1"))
    with caplog.at_level(logging.WARNING, logger="lmm_fusion.runtime.tensorrt"):
        TensorRTApi()
    assert "written for 10.3-10.13" in caplog.text


def test_weak_typing_flag_missing_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, fake: FakeTrt, model_dir: Path
) -> None:
    monkeypatch.setattr(fake, "BuilderFlag", types.SimpleNamespace(GPU_FALLBACK=BuilderFlag.GPU_FALLBACK))
    with pytest.raises(EngineError, match=r"no BuilderFlag\.FP16"):
        TensorRTApi().build(model_dir / "model.onnx", "fp16", 256, None, b"")


def test_engine_io_names_are_the_model_inputs_and_outputs(fake: FakeTrt, model_dir: Path, tmp_path: Path) -> None:
    loaded = EngineCache(TensorRTApi(), tmp_path).get(model_dir / "model.onnx", "fp16")
    assert [s.name for s in loaded.io if s.is_input] == list(INPUT_NAMES)
    assert [s.name for s in loaded.io if not s.is_input] == list(OUTPUT_NAMES)
    assert {s.dtype for s in loaded.io} == {"float32"}


def test_fallback_reason_reaches_the_pipeline_and_diagnostics(fake: FakeTrt, model_dir: Path, tmp_path: Path) -> None:
    fake.fail.add("build")
    pipeline = FusionPipeline(model_dir, "auto", engine_cache_dir=tmp_path)
    reason = pipeline.backend_fallback_reason
    assert reason is not None and "engine build failed" in reason and pipeline.backend.fallback_failed
    diag = FusionDiagnostics(node_name="fusion_node")
    diag.set_backend(pipeline.backend.describe(), reason, pipeline.backend.fallback_failed)
    by_name = {s.name: s for s in diag.statuses(0.0, {})}
    status = by_name["fusion_node: backend"]
    assert status.level == WARN and status.values["fallback_reason"] == reason
    assert status.message.startswith("onnxruntime (cpu, fp32); fell back: tensorrt/gpu:")


def test_backend_not_installed_is_reported_but_not_a_warning(
    monkeypatch: pytest.MonkeyPatch, fake: FakeTrt, model_dir: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    pipeline = FusionPipeline(model_dir, "auto")
    assert pipeline.backend_fallback_reason is not None and not pipeline.backend.fallback_failed
    diag = FusionDiagnostics(node_name="n")
    diag.set_backend(pipeline.backend.describe(), pipeline.backend_fallback_reason, False)
    status = {s.name: s for s in diag.statuses(0.0, {})}["n: backend"]
    assert status.level == OK and "not importable" in status.values["fallback_reason"]
    explicit = FusionDiagnostics(node_name="n")
    explicit.set_backend("torch (cpu, fp32)")
    status = {s.name: s for s in explicit.statuses(0.0, {})}["n: backend"]
    assert (status.level, status.message, status.values["fallback_reason"]) == (OK, "torch (cpu, fp32)", "")


def test_node_parameters_for_the_dla_and_the_engine_cache() -> None:
    values = defaults()
    assert values["dla_core"] == -1 and values["engine_cache_dir"] == ""
    assert validate({**values, "dla_core": 1, "engine_cache_dir": "/var/cache/engines"}) == []
    assert any(p.startswith("dla_core=8") for p in validate({**values, "dla_core": 8}))
    assert any(p.startswith("dla_core=-2") for p in validate({**values, "dla_core": -2}))
