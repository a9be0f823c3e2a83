"""What every inference runtime shares: the :class:`Backend` interface, its errors, the backend names.

The bottom of ``lmm_fusion.runtime``: ``export`` (ONNX) builds on it, ``tensorrt`` on both, and
``backends`` (torch, ONNX Runtime, :func:`~lmm_fusion.runtime.backends.make_backend`) on all three.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import numpy as np

#: The backend names a user may choose (``--backend``, the ROS ``backend`` parameter); ``auto`` lets
#: :func:`~lmm_fusion.runtime.backends.make_backend` pick the fastest one that runs here.
BACKENDS: tuple[str, ...] = ("auto", "torch", "onnxruntime", "tensorrt")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (package, GPU or model file missing)."""


class EngineError(RuntimeError):
    """An engine file cannot be used (corrupt, truncated, wrong I/O)."""


class Backend(ABC):
    """One way to run the fusion model. ``infer`` takes and returns float32 numpy arrays.

    Inputs (batch 1): ``image (1,3,Hi,Wi)``, ``bev (1,C,ny,nx)``, ``ego (1,F)``, ``modality_mask (1,3)``,
    keyed by :data:`lmm_fusion.model.INPUT_NAMES`; outputs keyed by :data:`lmm_fusion.model.OUTPUT_NAMES`.
    """

    name: str = "backend"
    device: str = "cpu"
    precision: str = "fp32"
    #: Set by ``make_backend("auto")``: why the backends it prefers were not used (``"; "``-joined, one
    #: ``kind/device: reason`` each), None when its first choice runs. For logs and ``/diagnostics``.
    fallback_reason: str | None = None
    #: True when one of those backends failed (an engine that did not parse, build, load or run) rather
    #: than being unavailable here (not installed, no GPU): worth a warning on a vehicle.
    fallback_failed: bool = False

    @abstractmethod
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one forward pass; ``inputs`` keyed by :data:`lmm_fusion.model.INPUT_NAMES`."""

    def warmup(self, inputs: dict[str, np.ndarray], iterations: int = 3) -> float:
        """Run a few passes (first-call allocations, autotuning); returns the last pass time [s]."""
        elapsed = 0.0
        for _ in range(iterations):
            t0 = time.perf_counter()
            self.infer(inputs)
            elapsed = time.perf_counter() - t0
        return elapsed

    def describe(self) -> str:
        """``name (device, precision)``, for logs and reports."""
        return f"{self.name} ({self.device}, {self.precision})"
