"""Inference runtimes behind one interface: torch (CPU/CUDA), ONNX Runtime, TensorRT.

Module arrows point one way: ``base`` (interface, errors, backend names) <- ``export`` (ONNX) <-
``tensorrt`` <- ``backends`` (torch, ONNX Runtime, :func:`make_backend`).
"""

from lmm_fusion.runtime.backends import make_backend
from lmm_fusion.runtime.base import BACKENDS, Backend, BackendUnavailable

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "make_backend"]
