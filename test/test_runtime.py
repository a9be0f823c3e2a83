"""Runtimes: ONNX export, backend parity, backend choice, INT8 Q/DQ graph, TensorRT engine cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lmm_fusion.base.paths import default_model_dir
from lmm_fusion.model import INPUT_NAMES, OUTPUT_NAMES, FusionModel, ModelConfig, load_model, save_model
from lmm_fusion.model.checkpoint import load_config
from lmm_fusion.runtime.backends import OnnxRuntimeBackend, TorchBackend, make_backend, ort_providers
from lmm_fusion.runtime.base import BACKENDS, BackendUnavailable, EngineError
from lmm_fusion.runtime.export import (
    TENSORRT_OPS,
    ensure_onnx,
    example_inputs,
    export_onnx,
    input_shapes,
    unsupported_ops,
)
from lmm_fusion.runtime.tensorrt import BuildResult, EngineCache, EngineKey, TensorRTBackend, TensorSpec, onnx_io

#: Tolerances per precision against torch fp32 (max abs error on logits/regressions).
FP32_TOL = 1e-4
FP16_TOL = 5e-2
#: TensorRT int8 engine against ONNX Runtime's emulation of the same Q/DQ graph (logits, shares).
INT8_TOL = 0.5

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    save_model(FusionModel(ModelConfig()), d)
    export_onnx(d)
    return d


def test_export_is_static_named_checked_and_tensorrt_compatible(model_dir: Path) -> None:
    proto = onnx.load(str(model_dir / "model.onnx"))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    assert proto.opset_import[0].version == 17
    shapes = input_shapes(ModelConfig())
    for spec in onnx_io(model_dir / "model.onnx"):
        assert all(d > 0 for d in spec.shape), f"{spec.name} has a dynamic dimension: {spec.shape}"
        if spec.is_input:
            assert spec.shape == shapes[spec.name]
    assert unsupported_ops(proto) == set()
    report = json.loads((model_dir / "model.export_report.json").read_text())
    assert max(report["parity_max_abs_error"].values()) < FP32_TOL


def test_unsupported_op_is_detected() -> None:
    node = onnx.helper.make_node("NonMaxSuppression", ["a", "b"], ["c"])
    graph = onnx.helper.make_graph([node], "g", [], [])
    assert unsupported_ops(onnx.helper.make_model(graph)) == {"NonMaxSuppression"}
    assert "NonMaxSuppression" not in TENSORRT_OPS


@pytest.mark.parametrize("mask", [[1, 1, 1], [0, 1, 1], [1, 0, 0], [0, 0, 0]])
def test_onnxruntime_matches_torch(model_dir: Path, mask: list[int]) -> None:
    inputs = example_inputs(ModelConfig(), seed=7)
    inputs["modality_mask"] = np.asarray([mask], np.float32)
    ref = make_backend("torch", model_dir, device="cpu").infer(inputs)
    got = make_backend("onnxruntime", model_dir, device="cpu").infer(inputs)
    assert set(got) == set(OUTPUT_NAMES)
    for name in OUTPUT_NAMES:
        assert got[name].shape == ref[name].shape
        assert np.all(np.isfinite(got[name])), name
        np.testing.assert_allclose(got[name], ref[name], atol=FP32_TOL, err_msg=name)


def test_auto_backend_logs_its_choice_and_reasons(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lmm_fusion.runtime.backends"):
        backend = make_backend("auto", model_dir)
    text = caplog.text
    assert "backend auto: chose" in text
    if not HAS_CUDA:
        assert isinstance(backend, OnnxRuntimeBackend) and backend.device == "cpu"
        assert "tensorrt" in text and "no CUDA device" in text
        # Why the preferred backends were not used, for /diagnostics.
        assert backend.fallback_reason is not None and backend.fallback_reason.startswith("tensorrt/gpu: ")
        assert "torch/cuda: torch: no CUDA device" in backend.fallback_reason


def test_explicit_backends_have_no_fallback_reason_and_precision_is_checked(model_dir: Path) -> None:
    assert make_backend("onnxruntime", model_dir, device="cpu").fallback_reason is None
    with pytest.raises(ValueError, match="precision: expected one of"):
        make_backend("auto", model_dir, precision="int4")


def test_unknown_backend_and_missing_onnx_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backend: expected one of") as err:
        make_backend("tflite", tmp_path)
    assert all(repr(name) in str(err.value) for name in BACKENDS)
    # Every listed name is accepted: an empty model folder fails on the missing files, not on the name.
    for name in BACKENDS:
        with pytest.raises((BackendUnavailable, OSError)):
            make_backend(name, tmp_path)
    with pytest.raises(BackendUnavailable, match="does not exist"):
        OnnxRuntimeBackend(tmp_path / "missing.onnx")


def test_provider_preference_order() -> None:
    avail = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert ort_providers(avail) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert ort_providers(avail, prefer_gpu=False) == ["CPUExecutionProvider"]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize(("precision", "graph", "tol"), [("fp32", False, 1e-3), ("fp16", False, FP16_TOL),
                                                        ("fp16", True, FP16_TOL)])
def test_torch_cuda_matches_cpu(model_dir: Path, precision: str, graph: bool, tol: float) -> None:
    inputs = example_inputs(ModelConfig(), seed=3)
    ref = TorchBackend(load_model(model_dir)).infer(inputs)
    backend = TorchBackend(load_model(model_dir), device="cuda", precision=precision, cuda_graph=graph)
    for _ in range(2):  # the second call replays the captured graph
        got = backend.infer(inputs)
    for name in OUTPUT_NAMES:
        np.testing.assert_allclose(got[name], ref[name], atol=tol, err_msg=name)


def test_tensorrt_backend_matches_torch(model_dir: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU: pip install '.[gpu]')")
    if not HAS_CUDA:
        pytest.skip("TensorRT needs a CUDA GPU")
    inputs = example_inputs(ModelConfig(), seed=5)
    ref = make_backend("torch", model_dir, device="cpu").infer(inputs)
    got = TensorRTBackend(model_dir / "model.onnx", precision="fp16").infer(inputs)
    for name in OUTPUT_NAMES:
        np.testing.assert_allclose(got[name], ref[name], atol=FP16_TOL, err_msg=name)


def test_tensorrt_builds_the_shipped_int8_graph_close_to_onnxruntime(tmp_path: Path) -> None:
    """On a GPU: the shipped Q/DQ graph parses and builds (strongly typed), and its engine's outputs are
    near ONNX Runtime's emulation of the same graph (TensorRT's int8 kernels round differently)."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU: pip install '.[gpu]')")
    if not HAS_CUDA:
        pytest.skip("TensorRT needs a CUDA GPU")
    shipped = default_model_dir()
    inputs = example_inputs(load_config(shipped), seed=5)
    ref = OnnxRuntimeBackend(shipped / "model.int8.onnx", prefer_gpu=False).infer(inputs)
    got = TensorRTBackend(shipped / "model.int8.onnx", precision="int8", engine_cache_dir=tmp_path).infer(inputs)
    for name in ("risk_logits", "action_logits", "light_logits", "modality_attention"):
        assert np.all(np.isfinite(got[name])), name
        np.testing.assert_allclose(got[name], ref[name], atol=INT8_TOL, err_msg=name)


# ----------------------------------------------------------------------------- engine cache (no GPU)
class RecordingEngineApi:
    """Implements the EngineApi protocol without TensorRT: an "engine" is the ONNX name + precision,
    and its I/O is read back from the ONNX file, so cache decisions can be observed on any machine."""

    def __init__(self, onnx_path: Path) -> None:
        self.trt_version = "10.3.0"
        self.gpu_info = ("Orin", "8.7")
        self.builds = 0
        self.deserialized = 0
        self.io_specs = onnx_io(onnx_path)

    def version(self) -> str:
        return self.trt_version

    def gpu(self) -> tuple[str, str]:
        return self.gpu_info

    def build(self, onnx_path: Path, precision: str, workspace_mib: int, dla_core: int | None,
              timing_cache: bytes) -> BuildResult:
        self.builds += 1
        return BuildResult(f"ENGINE {onnx_path.name} {precision} {self.trt_version} {self.builds}".encode())

    def deserialize(self, engine_bytes: bytes, dla_core: int | None) -> bytes:
        self.deserialized += 1
        if not engine_bytes.startswith(b"ENGINE"):
            raise ValueError("not an engine")
        return engine_bytes

    def io(self, engine: bytes) -> list[TensorSpec]:
        return list(self.io_specs)


def test_engine_key_changes_with_each_part() -> None:
    base = EngineKey("a" * 64, "10.3.0", "Orin", "8.7", "fp16")
    variants = [
        EngineKey("b" * 64, "10.3.0", "Orin", "8.7", "fp16"),
        EngineKey("a" * 64, "10.4.0", "Orin", "8.7", "fp16"),
        EngineKey("a" * 64, "10.3.0", "NVIDIA H200", "8.7", "fp16"),
        EngineKey("a" * 64, "10.3.0", "Orin", "9.0", "fp16"),
        EngineKey("a" * 64, "10.3.0", "Orin", "8.7", "int8"),
        EngineKey("a" * 64, "10.3.0", "Orin", "8.7", "fp16", dla_core=0),
    ]
    names = {base.file_name("model")} | {v.file_name("model") for v in variants}
    assert len(names) == 1 + len(variants)
    assert base.file_name("model") == f"model.{'a' * 16}.trt10.3.0.orin-sm87.fp16.engine"


def test_engine_cache_builds_once_then_loads(model_dir: Path, tmp_path: Path) -> None:
    api = RecordingEngineApi(model_dir / "model.onnx")
    cache = EngineCache(api, cache_dir=tmp_path)
    first = cache.get(model_dir / "model.onnx", "fp16")
    second = cache.get(model_dir / "model.onnx", "fp16")
    assert api.builds == 1 and first.built and not second.built
    assert first.path == second.path and first.engine == second.engine
    assert api.deserialized == 2  # once per get(): the checked engine object is the one returned
    meta = json.loads(first.path.with_suffix(".engine.json").read_text())
    assert meta["key"]["precision"] == "fp16" and meta["key"]["trt_version"] == "10.3.0"


def test_engine_rebuilt_when_tensorrt_gpu_or_precision_change(model_dir: Path, tmp_path: Path) -> None:
    api = RecordingEngineApi(model_dir / "model.onnx")
    cache = EngineCache(api, cache_dir=tmp_path)
    first = cache.get(model_dir / "model.onnx", "fp16").path
    api.trt_version = "10.4.0"
    second = cache.get(model_dir / "model.onnx", "fp16").path
    api.gpu_info = ("NVIDIA H200", "9.0")
    third = cache.get(model_dir / "model.onnx", "fp16").path
    fourth = cache.get(model_dir / "model.onnx", "fp32").path
    assert api.builds == 4 and len({first, second, third, fourth}) == 4


def test_engine_with_mismatched_metadata_is_rebuilt_not_loaded(model_dir: Path, tmp_path: Path) -> None:
    api = RecordingEngineApi(model_dir / "model.onnx")
    cache = EngineCache(api, cache_dir=tmp_path)
    path = cache.get(model_dir / "model.onnx", "fp16").path
    meta_path = path.with_suffix(".engine.json")
    meta = json.loads(meta_path.read_text())
    meta["key"]["trt_version"] = "8.6.1"  # e.g. an engine copied over from another JetPack
    meta_path.write_text(json.dumps(meta))
    engine = cache.get(model_dir / "model.onnx", "fp16").engine
    assert api.builds == 2 and engine.endswith(b" 2")


def test_engine_with_wrong_io_is_rebuilt(model_dir: Path, tmp_path: Path) -> None:
    api = RecordingEngineApi(model_dir / "model.onnx")
    cache = EngineCache(api, cache_dir=tmp_path)
    path = cache.get(model_dir / "model.onnx", "fp16").path
    good = api.io_specs
    api.io_specs = [*good[:-1], TensorSpec("renamed_output", (1, 3), False)]
    # The cached engine is not loaded (rebuilt), and the rebuilt one, still wrong, is refused, not cached.
    with pytest.raises(EngineError, match="does not match the ONNX graph"):
        cache.get(model_dir / "model.onnx", "fp16")
    assert api.builds == 2
    assert json.loads(path.with_suffix(".engine.json").read_text())["engine_sha256"] == hashlib.sha256(
        path.read_bytes()).hexdigest() and path.read_bytes().endswith(b" 1")
    api.io_specs = good
    assert not cache.get(model_dir / "model.onnx", "fp16").built and api.builds == 2


def test_corrupt_engine_is_an_error_naming_the_file(model_dir: Path, tmp_path: Path) -> None:
    api = RecordingEngineApi(model_dir / "model.onnx")
    cache = EngineCache(api, cache_dir=tmp_path)
    path = cache.get(model_dir / "model.onnx", "fp16").path
    path.write_bytes(path.read_bytes()[:5])  # truncated copy
    key = cache.key(model_dir / "model.onnx", "fp16")
    with pytest.raises(EngineError, match=path.name):
        cache.load(path, key, model_dir / "model.onnx")
    # get() never loads it: it rebuilds and the file is whole again.
    engine = cache.get(model_dir / "model.onnx", "fp16").engine
    assert engine.startswith(b"ENGINE") and api.builds == 2


def test_engine_cache_rejects_unknown_precision_and_missing_onnx(model_dir: Path, tmp_path: Path) -> None:
    cache = EngineCache(RecordingEngineApi(model_dir / "model.onnx"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="precision"):
        cache.get(model_dir / "model.onnx", "int4")
    with pytest.raises(FileNotFoundError, match=r"nope\.onnx"):
        cache.get(tmp_path / "nope.onnx", "fp16")


def test_onnx_is_reexported_when_weights_change_not_when_times_do(tmp_path: Path) -> None:
    torch.manual_seed(1)
    d = tmp_path / "m"
    save_model(FusionModel(ModelConfig()), d)
    onnx_path = ensure_onnx(d)
    first = onnx_path.read_bytes()
    os.utime(d / "model.safetensors", (2e9, 2e9))  # weights "newer" after a checkout: same content
    os.utime(onnx_path, (1e9, 1e9))
    assert ensure_onnx(d) == onnx_path and os.stat(onnx_path).st_mtime == 1e9  # not re-exported
    torch.manual_seed(2)
    other = tmp_path / "other"
    save_model(FusionModel(ModelConfig()), other)
    shutil.copy(other / "model.safetensors", d / "model.safetensors")  # new weights
    assert ensure_onnx(d).read_bytes() != first
