"""``lmm-fusion quantize``: INT8 by explicit quantization (a Q/DQ ONNX graph).

TensorRT 10 deprecated its implicit INT8 calibrators; the supported path is an ONNX graph whose
QuantizeLinear/DequantizeLinear nodes carry the scales. We calibrate with ONNX Runtime's static QDQ
quantizer on frames preprocessed from a bag through the project's own pipeline (bag -> SensorIngest ->
SensorSync -> Preprocessor), with symmetric int8 activations and weights (zero point 0, as TensorRT
requires) and per-channel weight scales. The result runs on ONNX Runtime's CPU provider here, so its
accuracy against fp32 is measured, not assumed (``lmm-fusion eval --backend onnxruntime --precision int8``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from lmm_fusion.runtime.backends import INPUT_NAMES

log = logging.getLogger(__name__)


def calibration_inputs(
    bags: Sequence[Path | str], model_dir: Path, max_frames: int = 200, rate_hz: float = 10.0
) -> Iterator[dict[str, np.ndarray]]:
    """Model inputs (batch 1) from bag cycles with every modality present, up to ``max_frames``."""
    from lmm_fusion.bagfeed import iter_cycles
    from lmm_fusion.ingest import SensorIngest
    from lmm_fusion.model import ModelConfig
    from lmm_fusion.preprocess import Preprocessor
    from lmm_fusion.rig import SensorRig
    from lmm_fusion.sync import SensorSync

    cfg = ModelConfig.load(model_dir / "config.json")
    rig = SensorRig()
    pre = Preprocessor(cfg, rig)
    ingest = SensorIngest(SensorSync(), rig)
    n = 0
    for cycle in iter_cycles(bags, ingest, rate_hz, with_ground_truth=False):
        if not cycle.snapshot.mask.all():
            continue
        inputs = pre.inputs(cycle.snapshot)
        if not inputs["modality_mask"].all():  # e.g. GNSS before the motion estimate is valid
            continue
        yield inputs
        n += 1
        if n >= max_frames:
            return


def quantize(model_dir: Path, calib_bags: Sequence[Path | str], out: Path, max_frames: int = 200) -> Path:
    """Write a symmetric-int8 Q/DQ ONNX of the model in ``model_dir`` calibrated on ``calib_bags``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from lmm_fusion.runtime.backends import ensure_onnx

    fp32 = ensure_onnx(model_dir, "fp32")
    frames = list(calibration_inputs(calib_bags, model_dir, max_frames))
    if not frames:
        raise ValueError(f"calib: no cycle with all three sensors present in {list(map(str, calib_bags))}")
    log.info("calibrating on %d frames", len(frames))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(frames)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    try:
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            # Only the compute-heavy ops: TensorRT fuses Q/DQ around these; leaving softmax, norms and
            # the heads' small layers in float keeps the attention shares and regressions accurate.
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    finally:
        pre.unlink(missing_ok=True)
    log.info("wrote %s (inputs %s)", out, INPUT_NAMES)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--calib", nargs="+", required=True, help="bag(s) to calibrate on")
    p.add_argument("--out", default=None, help="output (default: MODEL/model.int8.onnx)")
    p.add_argument("--frames", type=int, default=200, help="calibration frames [count]")


def run(args: argparse.Namespace) -> int:
    from lmm_fusion.paths import default_model_dir

    model_dir = Path(args.model) if args.model else default_model_dir()
    out = Path(args.out) if args.out else model_dir / "model.int8.onnx"
    print(quantize(model_dir, args.calib, out, args.frames))
    return 0
