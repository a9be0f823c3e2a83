"""Backends: the same named inputs in, the same named outputs out, whatever runs the model.

Inputs (batch 1, float32 numpy): ``image (1,3,Hi,Wi)``, ``bev (1,C,ny,nx)``, ``ego (1,F)``,
``modality_mask (1,3)``. Outputs: ``lmm_fusion.model.OUTPUT_NAMES`` as float32 numpy arrays.

``make_backend("auto", ...)`` prefers TensorRT, then ONNX Runtime on a GPU, then torch on CUDA, then
ONNX Runtime on the CPU, then torch on the CPU, runs one inference on a candidate before choosing it,
and logs what it chose and why the others were not (also kept as ``backend.fallback_reason``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from lmm_fusion.model import INPUT_NAMES, OUTPUT_NAMES, load_model
from lmm_fusion.model.checkpoint import load_config
from lmm_fusion.runtime.base import BACKENDS, Backend, BackendUnavailable, EngineError
from lmm_fusion.runtime.export import ensure_onnx, example_inputs
from lmm_fusion.runtime.tensorrt import PRECISIONS, TensorRTBackend, check_dla

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "INPUT_NAMES",
    "PRECISIONS",
    "Backend",
    "BackendUnavailable",
    "OnnxRuntimeBackend",
    "TorchBackend",
    "ensure_onnx",
    "make_backend",
    "ort_providers",
]


def _cuda_available() -> bool:
    """Whether torch sees a CUDA device (a broken driver counts as none)."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


class TorchBackend(Backend):
    """PyTorch eager on the CPU, or CUDA with optional fp16 autocast and CUDA-graph replay.

    With ``cuda_graph=True`` the forward pass is captured once into static buffers and replayed,
    which removes per-kernel launch overhead (the dominant cost of a small model at batch 1).
    """

    name = "torch"

    def __init__(
        self,
        model: Any,
        device: str = "cpu",
        precision: str = "fp32",
        cuda_graph: bool = False,
        threads: int | None = None,
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("torch: CUDA requested but torch.cuda.is_available() is False")
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision: expected fp32 or fp16, got {precision!r}")
        if precision == "fp16" and not device.startswith("cuda"):
            raise BackendUnavailable("torch: fp16 autocast is only used on CUDA")
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.precision = precision
        self.model = model.to(device).eval()
        self._graph: Any = None
        self._static_in: dict[str, Any] = {}
        self._static_out: dict[str, Any] = {}
        self.cuda_graph = cuda_graph and device.startswith("cuda")

    def _forward(self, tensors: dict[str, Any]) -> dict[str, Any]:
        with (
            torch.inference_mode(),
            torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.precision == "fp16"),
        ):
            return self.model(*(tensors[n] for n in INPUT_NAMES))

    def _capture(self, inputs: dict[str, np.ndarray]) -> None:
        self._static_in = {n: torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device) for n in INPUT_NAMES}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA-graph capture requires
            for _ in range(3):
                self._forward(self._static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_out = self._forward(self._static_in)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.cuda_graph:
            if self._graph is None:
                self._capture(inputs)
            for n in INPUT_NAMES:
                self._static_in[n].copy_(torch.from_numpy(np.ascontiguousarray(inputs[n])), non_blocking=True)
            self._graph.replay()
            out = self._static_out
        else:
            tensors = {n: torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device) for n in INPUT_NAMES}
            out = self._forward(tensors)
        return {k: v.float().cpu().numpy() for k, v in out.items()}


def _ort_has_gpu() -> bool:
    """Whether this ONNX Runtime build has a GPU execution provider (CUDA or TensorRT)."""
    return bool(set(ort.get_available_providers()) & {"CUDAExecutionProvider", "TensorrtExecutionProvider"})


def ort_providers(available: list[str], prefer_gpu: bool = True) -> list[str]:
    """ONNX Runtime providers in order of preference: TensorRT EP, CUDA EP, CPU."""
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if prefer_gpu else []
    chosen = [p for p in order if p in available]
    return [*chosen, "CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime session; IOBinding keeps inputs/outputs on the GPU when a GPU provider runs."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, threads: int | None = None, prefer_gpu: bool = True) -> None:
        path = Path(onnx_path)
        if not path.is_file():
            raise BackendUnavailable(f"onnxruntime: ONNX file {path} does not exist (run `lmm-fusion export`)")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle worker threads sleep instead of spinning: on a small vehicle computer the spin steals the
        # core that the sensor callbacks need between cycles.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if ".int8" in path.name:
            # Q/DQ pairs run as written (float arithmetic on exactly quantized values), not fused into
            # ONNX Runtime's int8 kernels: on x86-64 without VNNI those saturate their 16-bit
            # intermediates, so the same graph would give other values on another CPU. Emulated,
            # the values are the same everywhere and match what the graph specifies for TensorRT.
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        providers = ort_providers(ort.get_available_providers(), prefer_gpu)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        active = self.session.get_providers()
        self.device = "cuda" if active[0] != "CPUExecutionProvider" else "cpu"
        self.precision = "int8" if ".int8" in path.name else "fp32"
        self.providers = active
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._binding = self.session.io_binding() if self.device == "cuda" else None
        log.info("onnxruntime session on %s (threads=%d)", active, opts.intra_op_num_threads)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {n: np.ascontiguousarray(inputs[n], dtype=np.float32) for n in INPUT_NAMES}
        if self._binding is None:
            outs = self.session.run(self.output_names, feeds)
            return dict(zip(self.output_names, outs))
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for n, arr in feeds.items():
            b.bind_cpu_input(n, arr)
        for n in self.output_names:
            b.bind_output(n, "cuda")
        self.session.run_with_iobinding(b)
        return dict(zip(self.output_names, b.copy_outputs_to_cpu()))


def probe_inputs(model_dir: Path) -> dict[str, np.ndarray]:
    """Deterministic inputs with the model's static shapes, for the one inference ``auto`` runs on a
    candidate before choosing it."""
    return example_inputs(load_config(model_dir))


def probe(backend: Backend, inputs: dict[str, np.ndarray]) -> None:
    """Run one inference; raise :class:`EngineError` unless every output is there and finite.

    The first inference is where an engine that built fine can still fail (execution context,
    CUDA-graph capture, ``execute_async_v3``) or give NaN (an fp16 overflow): ``auto`` must see that
    before it commits to the backend, not in the first cycle on the road."""
    out = backend.infer(inputs)
    missing = [n for n in OUTPUT_NAMES if n not in out]
    if missing:
        raise EngineError(f"first inference: outputs {missing} missing")
    bad = [n for n in OUTPUT_NAMES if not np.all(np.isfinite(out[n]))]
    if bad:
        raise EngineError(f"first inference: non-finite values in {bad}")


def make_backend(
    kind: str,
    model_dir: str | Path,
    device: str | None = None,
    precision: str = "fp32",
    threads: int | None = None,
    cuda_graph: bool = False,
    dla_core: int | None = None,
    engine_cache_dir: str | Path | None = None,
) -> Backend:
    """Create a backend for the model in ``model_dir``.

    ``kind``: ``torch`` | ``onnxruntime`` | ``tensorrt`` | ``auto``. ``auto`` tries, in order, TensorRT,
    ONNX Runtime on a GPU, torch CUDA, ONNX Runtime CPU, torch CPU, runs one inference on each it could
    create (:func:`probe`) and takes the first that passes; it never fails on an engine error: each
    refusal or failure is logged with its reason and the reasons are kept on the chosen backend as
    :attr:`~lmm_fusion.runtime.base.Backend.fallback_reason`. ONNX files are exported on demand when
    missing (``model.onnx`` next to the weights, or the user cache for a read-only model folder).

    ``dla_core`` and ``engine_cache_dir`` are TensorRT's (a Jetson DLA core, fp16/int8 only; where
    engines and timing caches go); the other backends ignore them.
    """
    if kind not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {kind!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    model_dir = Path(model_dir)
    if kind == "torch":
        dev = device or ("cuda" if _cuda_available() else "cpu")
        return TorchBackend(
            load_model(model_dir), device=dev, precision=precision, cuda_graph=cuda_graph, threads=threads
        )
    if kind == "onnxruntime":
        onnx_path = ensure_onnx(model_dir, precision)
        return OnnxRuntimeBackend(onnx_path, threads=threads, prefer_gpu=device != "cpu")
    if kind == "tensorrt":
        check_dla(precision, dla_core)  # refused with its reason before an ONNX export or a build
        return TensorRTBackend(
            ensure_onnx(model_dir, precision),
            precision=precision,
            dla_core=dla_core,
            engine_cache_dir=engine_cache_dir,
        )
    return _auto(model_dir, precision, threads, dla_core, engine_cache_dir)


def _auto(
    model_dir: Path, precision: str, threads: int | None, dla_core: int | None, engine_cache_dir: str | Path | None
) -> Backend:
    """``make_backend("auto", ...)``: the first candidate that can be created and passes :func:`probe`."""
    reasons: list[str] = []
    trt_precision = "fp16" if precision == "fp32" else precision  # fp32 is what TensorRT is not for
    candidates: list[tuple[str, dict[str, Any]]] = [
        ("tensorrt", {"precision": trt_precision, "dla_core": dla_core, "engine_cache_dir": engine_cache_dir}),
        ("onnxruntime", {"device": "cuda"}),
        ("torch", {"device": "cuda", "precision": "fp16", "cuda_graph": True}),
        ("onnxruntime", {"device": "cpu"}),
        ("torch", {"device": "cpu"}),
    ]
    inputs: dict[str, np.ndarray] | None = None
    failed = False
    for cand, kw in candidates:
        label = f"{cand}/{kw.get('device', 'gpu')}"
        try:
            if cand == "onnxruntime" and kw["device"] == "cuda" and not _ort_has_gpu():
                raise BackendUnavailable("onnxruntime: no GPU execution provider installed")
            if cand == "torch" and kw["device"] == "cuda" and not _cuda_available():
                raise BackendUnavailable("torch: no CUDA device")
            backend = make_backend(cand, model_dir, threads=threads, **kw)
            if inputs is None:
                inputs = probe_inputs(model_dir)
            probe(backend, inputs)
        except (BackendUnavailable, ImportError) as exc:
            reasons.append(f"{label}: {exc}")  # not installed / no device here: expected, no warning
            continue
        except Exception as exc:
            # Anything else is a failure of a backend that should have run (a TensorRT parse, build,
            # deserialization or first inference; an API difference of another TensorRT release):
            # loud in the log, kept for /diagnostics, and the next candidate is tried.
            reason = f"{label}: {type(exc).__name__}: {exc}"
            log.warning("backend auto: %s failed, falling back: %s", cand, reason)
            reasons.append(reason)
            failed = True
            continue
        backend.fallback_reason = "; ".join(reasons) or None
        backend.fallback_failed = failed
        log.info("backend auto: chose %s; not chosen: %s", backend.describe(), backend.fallback_reason or "none")
        return backend
    raise BackendUnavailable("no backend could be created: " + "; ".join(reasons))
