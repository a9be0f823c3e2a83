"""Inference runtimes behind one interface: torch (CPU/CUDA), ONNX Runtime, TensorRT.

Module arrows point one way: ``base`` (interface, errors, backend names) <- ``export`` (ONNX) <-
``tensorrt`` <- ``backends`` (torch, ONNX Runtime, :func:`~lmm_fusion.runtime.backends.make_backend`).
Nothing is imported here, so ``runtime.base`` (e.g. the parameter schema's ``BACKENDS``) loads
without torch or ONNX Runtime.
"""
