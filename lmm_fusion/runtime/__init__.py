"""Inference runtimes behind one interface: torch (CPU/CUDA), ONNX Runtime, TensorRT."""

from lmm_fusion.runtime.backends import Backend, BackendUnavailable, make_backend

__all__ = ["Backend", "BackendUnavailable", "make_backend"]
