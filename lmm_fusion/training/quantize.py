"""``lmm-fusion quantize``: INT8 by explicit quantization (a Q/DQ ONNX graph).

TensorRT 10 deprecated its implicit INT8 calibrators; the supported path is an ONNX graph whose
QuantizeLinear/DequantizeLinear nodes carry the scales. We calibrate with ONNX Runtime's static QDQ
quantizer on frames preprocessed from a bag through the project's own pipeline (bag -> SensorIngest ->
SensorSync -> Preprocessor), with symmetric int8 activations and weights (zero point 0, as TensorRT
requires) and per-channel weight scales.

The Q/DQ placement is the one TensorRT's explicit quantization recommends: Q/DQ on the inputs (activation
and weight) of the weighted layers (Conv, MatMul, Gemm), float biases (TensorRT's ONNX parser dequantizes
int8 only and rejects ONNX Runtime's default int32 bias DequantizeLinear; it folds the bias into the int8
kernel itself), and no Q/DQ on a weighted layer's output, so no head's logits or regressions are rounded
to int8 on their way out. :func:`lmm_fusion.runtime.export.qdq_problems` checks all of it on every graph
written. The result runs on ONNX Runtime's CPU provider here, so its accuracy against fp32 is measured,
not assumed (``lmm-fusion quantize ... --eval HELDOUT_BAG``, :func:`precision_deltas`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from lmm_fusion.base.paths import default_model_dir
from lmm_fusion.base.rig import SensorRig
from lmm_fusion.cycle.bagfeed import iter_cycles
from lmm_fusion.cycle.ingest import SensorIngest
from lmm_fusion.cycle.preprocess import Preprocessor
from lmm_fusion.cycle.sync import SensorSync
from lmm_fusion.model import INPUT_NAMES, ModelConfig, load_model
from lmm_fusion.runtime.backends import Backend, OnnxRuntimeBackend
from lmm_fusion.runtime.export import ExportError, ensure_onnx, qdq_problems, unsupported_ops
from lmm_fusion.training.dataset import FusionDataset, expand_bags
from lmm_fusion.training.evaluate import compute_metrics, predict

log = logging.getLogger(__name__)

#: The layers whose inputs are quantized (activations and weights, int8, symmetric).
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


def calibration_inputs(
    bags: Sequence[Path | str], model_dir: Path, max_frames: int = 200, rate_hz: float = 10.0
) -> Iterator[dict[str, np.ndarray]]:
    """Model inputs (batch 1) from bag cycles with every modality present, up to ``max_frames``."""
    cfg = ModelConfig.load(model_dir / "config.json")
    rig = SensorRig()
    pre = Preprocessor(cfg, rig)
    n = 0
    # One bag at a time with fresh buffers: drives recorded separately share time bases, and merging
    # them into one stream would look like time jumping back and forth.
    for bag in bags:
        ingest = SensorIngest(SensorSync(), rig, preprocessor=pre)
        for cycle in iter_cycles(bag, ingest, rate_hz, with_ground_truth=False):
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
    """Write a symmetric-int8 Q/DQ ONNX of the model in ``model_dir`` calibrated on ``calib_bags``.

    The graph is checked (:func:`check_qdq_graph`) before it replaces ``out``; a graph TensorRT would
    reject raises :class:`~lmm_fusion.runtime.export.ExportError` and leaves ``out`` as it was."""
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
    tmp = out.with_suffix(".tmp.onnx")  # checked before it replaces ``out``: no half-right graph is left
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(tmp),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            # Only the compute-heavy ops: TensorRT fuses Q/DQ around these; leaving softmax, norms and
            # the heads' small layers in float keeps the attention shares and regressions accurate.
            op_types_to_quantize=list(QUANTIZED_OPS),
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                # Float biases: an int32 bias behind a DequantizeLinear does not parse in TensorRT 10.
                "QuantizeBias": False,
                # Q/DQ on the inputs of weighted layers only, not on their outputs: TensorRT fuses the
                # following activation and the next layer's Q itself, and the last layer of each head
                # hands float logits/regressions to the graph output.
                "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
            },
        )
        drop_unused_opsets(tmp)
        check_qdq_graph(tmp)
        tmp.replace(out)
    finally:
        pre.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (inputs %s)", out, INPUT_NAMES)
    return out


def drop_unused_opsets(path: Path) -> None:
    """Remove the operator-set imports of domains no node uses (ONNX Runtime's optimizer adds its own
    ``com.microsoft*`` and training domains), so a parser sees only the default domain it needs."""
    proto = onnx.load(str(path))
    used = {n.domain or "" for n in proto.graph.node} | {""}
    keep = [o for o in proto.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    if len(keep) != len(proto.opset_import):
        del proto.opset_import[:]
        proto.opset_import.extend(keep)
        onnx.save(proto, str(path))


def check_qdq_graph(path: Path) -> None:
    """Raise :class:`~lmm_fusion.runtime.export.ExportError` naming ``path`` unless the graph passes the
    ONNX checker, uses only operators TensorRT 10 parses and has the Q/DQ form its explicit
    quantization expects (:func:`~lmm_fusion.runtime.export.qdq_problems`)."""
    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: ONNX checker: {exc}") from exc
    bad_ops = unsupported_ops(proto)
    problems = [f"operators TensorRT 10 does not parse: {sorted(bad_ops)}"] if bad_ops else []
    problems += qdq_problems(proto)
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} in all)" if len(problems) > 10 else "")
        raise ExportError(f"{path}: not a TensorRT explicit-quantization graph: {shown}")


class BackendModule:
    """Make a batch-1 :class:`~lmm_fusion.runtime.base.Backend` callable like ``FusionModel`` on a
    batch of torch tensors, so :func:`lmm_fusion.training.evaluate.predict` scores it with the same code."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def eval(self) -> BackendModule:
        """No training mode to leave; there for the same call sequence as a torch module."""
        return self

    def __call__(
        self, image: torch.Tensor, bev: torch.Tensor, ego: torch.Tensor, modality_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One backend call per sample of the batch ``(N, ...)``; outputs concatenated back to ``(N, ...)``."""
        batch = {"image": image, "bev": bev, "ego": ego, "modality_mask": modality_mask}
        outs = [
            self.backend.infer({k: v[i : i + 1].cpu().numpy() for k, v in batch.items()}) for i in range(image.shape[0])
        ]
        return {k: torch.from_numpy(np.concatenate([o[k] for o in outs])) for k in outs[0]}


#: Metrics compared between precisions (accuracies: higher is better; errors: lower is better).
COMPARED = (
    "action_accuracy",
    "risk_accuracy",
    "light_accuracy",
    "occupancy_iou",
    "target_speed_mae",
    "ttc_mae",
    "distance_mae",
)


def precision_deltas(
    model_dir: Path, int8_path: Path, bags: Sequence[Path | str], cache: Path | None = None
) -> dict[str, Any]:
    """Metrics per head of the torch fp32 model and of the int8 Q/DQ graph (ONNX Runtime, CPU) on the
    same held-out samples, and their differences (int8 - fp32)."""
    model = load_model(model_dir)
    ds = FusionDataset(expand_bags(bags), model.cfg, cache_dir=cache)
    if len(ds) == 0:
        raise ValueError(f"eval: no labelled samples in {list(map(str, bags))}")
    fp32 = compute_metrics(predict(model, ds), ds.arrays)
    int8 = compute_metrics(predict(BackendModule(OnnxRuntimeBackend(int8_path, prefer_gpu=False)), ds), ds.arrays)
    return {
        "n": len(ds),
        "fp32": {k: fp32[k] for k in COMPARED if k in fp32},
        "int8": {k: int8[k] for k in COMPARED if k in int8},
        "delta": {k: round(int8[k] - fp32[k], 4) for k in COMPARED if k in fp32 and k in int8},
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--calib", nargs="+", required=True, help="bag(s) to calibrate on")
    p.add_argument("--out", default=None, help="output (default: MODEL/model.int8.onnx)")
    p.add_argument("--frames", type=int, default=200, help="calibration frames [count]")
    p.add_argument(
        "--eval",
        nargs="+",
        default=None,
        metavar="BAG",
        help="held-out bags: print fp32 vs int8 metrics per head (JSON)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(".cache/lmm_fusion_samples"),
        help="preprocessed-sample cache shared with train/eval",
    )


def run(args: argparse.Namespace) -> int:
    model_dir = Path(args.model) if args.model else default_model_dir()
    out = Path(args.out) if args.out else model_dir / "model.int8.onnx"
    print(quantize(model_dir, args.calib, out, args.frames))
    if args.eval:
        report = precision_deltas(model_dir, out, args.eval, args.cache)
        out.with_name(out.stem + ".deltas.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    return 0
