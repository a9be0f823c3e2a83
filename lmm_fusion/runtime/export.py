"""``lmm-fusion export``: the fusion model as a static-shape ONNX graph for TensorRT and ONNX Runtime.

Batch 1, named inputs (``image``, ``bev``, ``ego``, ``modality_mask``) and outputs
(``lmm_fusion.model.OUTPUT_NAMES``), opset 17 (supported by TensorRT 8.6 and 10.x), checked with the
ONNX checker, audited against the operators TensorRT 10 parses, and compared with torch through ONNX
Runtime (max abs error per output written to ``export_report.json`` beside the ONNX file).

:func:`ensure_onnx` is what the ONNX Runtime and TensorRT backends call: the ONNX file of a model
directory, re-exported only when the weights it came from (their sha256, in the report) changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from lmm_fusion.base.paths import cache_dir, default_model_dir
from lmm_fusion.model import INPUT_NAMES, OUTPUT_NAMES, load_model
from lmm_fusion.runtime.base import BackendUnavailable

log = logging.getLogger(__name__)

OPSET = 17

#: ONNX operators the TensorRT 10 ONNX parser supports that a model of this kind may use. An op outside
#: this set fails the export, because it would fail later on the vehicle where it is harder to fix.
TENSORRT_OPS: frozenset[str] = frozenset(
    [
        "Abs",
        "Add",
        "And",
        "ArgMax",
        "ArgMin",
        "AveragePool",
        "BatchNormalization",
        "Cast",
        "Ceil",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "ConvTranspose",
        "Cos",
        "CumSum",
        "DequantizeLinear",
        "Div",
        "Einsum",
        "Elu",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "GatherND",
        "Gelu",
        "Gemm",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Greater",
        "GreaterOrEqual",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "InstanceNormalization",
        "LayerNormalization",
        "LeakyRelu",
        "Less",
        "LessOrEqual",
        "Log",
        "LogSoftmax",
        "MatMul",
        "Max",
        "MaxPool",
        "Mean",
        "Min",
        "Mod",
        "Mul",
        "Neg",
        "Not",
        "Or",
        "Pad",
        "Pow",
        "PRelu",
        "QuantizeLinear",
        "Range",
        "Reciprocal",
        "ReduceL2",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "Relu",
        "Reshape",
        "Resize",
        "Round",
        "ScatterElements",
        "ScatterND",
        "Selu",
        "Shape",
        "Sigmoid",
        "Sign",
        "Sin",
        "Size",
        "Slice",
        "Softmax",
        "Softplus",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tanh",
        "Tile",
        "TopK",
        "Transpose",
        "Unsqueeze",
        "Where",
        "Xor",
    ]
)


class ExportError(RuntimeError):
    """The exported graph is not acceptable (checker, unsupported op, parity)."""


def input_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Static input shapes (batch 1) of a model with config ``cfg``."""
    g = cfg.input_bev_grid
    return {
        "image": (1, 3, cfg.image_height, cfg.image_width),
        "bev": (1, cfg.bev_input_channels, g.ny, g.nx),
        "ego": (1, cfg.ego_features),
        "modality_mask": (1, 3),
    }


def example_inputs(cfg: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random inputs with the model's static shapes (batch 1, float32)."""
    rng = np.random.default_rng(seed)
    shapes = input_shapes(cfg)
    out = {n: rng.standard_normal(shapes[n]).astype(np.float32) for n in INPUT_NAMES if n != "modality_mask"}
    out["modality_mask"] = np.ones(shapes["modality_mask"], dtype=np.float32)
    return out


def unsupported_ops(model_proto: Any) -> set[str]:
    """Operators of the default domain in the graph (and its subgraphs) that TensorRT 10 lacks."""
    ops: set[str] = set()
    stack = [model_proto.graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            if node.domain in ("", "ai.onnx"):
                ops.add(node.op_type)
            else:
                ops.add(f"{node.domain}::{node.op_type}")
            stack.extend(a.g for a in node.attribute if a.g is not None and len(a.g.node))
    return ops - TENSORRT_OPS


#: Layers with weights: the ones explicit quantization puts Q/DQ in front of (TensorRT fuses the
#: DequantizeLinear of their inputs and weights into an int8 kernel).
WEIGHTED_OPS: frozenset[str] = frozenset(["Conv", "ConvTranspose", "Gemm", "MatMul"])
QDQ_OPS: frozenset[str] = frozenset(["QuantizeLinear", "DequantizeLinear"])


def qdq_problems(model_proto: Any) -> list[str]:
    """Why a Q/DQ graph is not what TensorRT 10's explicit quantization expects; empty when it is.

    Checked, in the main graph:

    - every ``DequantizeLinear`` dequantizes an int8 tensor: an int8 initializer (a weight) or the
      output of a ``QuantizeLinear`` with an int8 zero point. TensorRT's ONNX parser dequantizes
      only INT8/FP8/INT4; an int32 bias behind a DequantizeLinear fails the parse. Biases stay float;
    - scales are positive finite initializers and zero points int8 zeros (symmetric: TensorRT
      supports no other zero point);
    - no Q/DQ between the last weighted layer (:data:`WEIGHTED_OPS`) of any output and the output
      itself: logits and regressions leave the graph in float, not rounded to 256 levels.
    """
    g = model_proto.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    int8 = onnx.TensorProto.INT8
    problems: list[str] = []

    def int8_source(name: str) -> bool:
        if name in inits:
            return inits[name].data_type == int8
        src = producer.get(name)
        if src is None or src.op_type != "QuantizeLinear":
            return False
        return len(src.input) > 2 and src.input[2] in inits and inits[src.input[2]].data_type == int8

    for node in g.node:
        if node.op_type not in QDQ_OPS:
            continue
        label = f"{node.op_type} {node.name or node.output[0]}"
        scale = inits.get(node.input[1])
        if scale is None:
            problems.append(f"{label}: scale {node.input[1]!r} is not an initializer")
        else:
            s = onnx.numpy_helper.to_array(scale)
            if not (np.all(np.isfinite(s)) and np.all(s > 0)):
                problems.append(f"{label}: scale {node.input[1]!r} not positive and finite")
        if node.op_type == "DequantizeLinear" and not int8_source(node.input[0]):
            x = node.input[0]
            kind = onnx.TensorProto.DataType.Name(inits[x].data_type) if x in inits else "not int8"
            problems.append(f"{label}: dequantizes {x!r} ({kind}); TensorRT dequantizes int8 only")
            continue  # its zero point has the same (wrong) type: one report per node
        zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is None:
            # Without a zero point ONNX quantizes to uint8.
            problems.append(f"{label}: no int8 zero point (uint8 by default)")
        elif zp.data_type != int8 or onnx.numpy_helper.to_array(zp).any():
            problems.append(f"{label}: zero point {node.input[2]!r} is not an int8 zero")

    for out in g.output:
        stack, seen = [out.name], set()
        while stack:
            name = stack.pop()
            node = producer.get(name)
            if node is None or name in seen:
                continue
            seen.add(name)
            if node.op_type in QDQ_OPS:
                problems.append(f"{out.name}: {node.op_type} {node.name or name} after its last weighted layer")
            elif node.op_type not in WEIGHTED_OPS:
                stack.extend(i for i in node.input if i)
    return problems


def export_model(model: Any, cfg: Any, out: Path) -> Path:
    """Write ``model`` (eval mode, CPU, fp32) to ``out`` as static-shape ONNX; returns ``out``."""
    model = model.cpu().eval()
    args = tuple(torch.from_numpy(a) for a in example_inputs(cfg).values())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # unique: processes may export at once
    with warnings.catch_warnings():
        # The TorchScript-based exporter gives one self-contained file with fully static shapes,
        # which is what TensorRT engines want; its deprecation notice is not actionable here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(tmp),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto, full_check=True)
    bad = unsupported_ops(proto)
    if bad:
        tmp.unlink()
        raise ExportError(f"ONNX graph uses operators TensorRT 10 does not support: {sorted(bad)}")
    tmp.replace(out)  # atomic: a reader never sees a half-written model
    return out


def parity(model: Any, cfg: Any, onnx_path: Path, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, float]:
    """Max abs difference per output between torch fp32 and ONNX Runtime (CPU) over a few inputs,
    with each modality mask pattern of a full and a one-missing input."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst: dict[str, float] = {}
    masks = ([1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0])
    for seed in seeds:
        for mask in masks:
            inp = example_inputs(cfg, seed)
            inp["modality_mask"] = np.asarray([mask], dtype=np.float32)
            with torch.inference_mode():
                ref = model(*(torch.from_numpy(inp[n]) for n in INPUT_NAMES))
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inp)))
            for name, t in ref.items():
                err = float(np.max(np.abs(t.numpy() - got[name]))) if t.numel() else 0.0
                worst[name] = max(worst.get(name, 0.0), err)
    return worst


def export_onnx(model_dir: str | Path, out: str | Path | None = None, check_parity: bool = True) -> Path:
    """Export the model stored in ``model_dir``; report (ops, parity) beside the ONNX file."""
    model_dir = Path(model_dir)
    out = Path(out) if out else model_dir / "model.onnx"
    model = load_model(model_dir)
    export_model(model, model.cfg, out)
    report: dict[str, Any] = {
        "onnx": out.name,
        "opset": OPSET,
        "inputs": list(INPUT_NAMES),
        "weights_sha256": sha256_file(model_dir / "model.safetensors"),
    }
    if check_parity:
        report["parity_max_abs_error"] = parity(model, model.cfg, out)
        log.info("ONNX parity vs torch fp32 (max abs error): %s", report["parity_max_abs_error"])
    report_path(out).write_text(json.dumps(report, indent=2) + "\n")
    return out


def report_path(onnx_path: Path) -> Path:
    """The export report written beside an ONNX file."""
    return onnx_path.with_name(onnx_path.stem + ".export_report.json")


def exported_from(onnx_path: Path) -> str | None:
    """sha256 of the weights ``onnx_path`` was exported from (None when unknown)."""
    try:
        return json.loads(report_path(onnx_path).read_text()).get("weights_sha256")
    except (OSError, ValueError):
        return None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_onnx_path(model_dir: str | Path, precision: str = "fp32") -> Path:
    """Where ``lmm-fusion export`` / ``quantize`` put the ONNX files of a model directory."""
    return Path(model_dir) / ("model.int8.onnx" if precision == "int8" else "model.onnx")


def ensure_onnx(model_dir: Path, precision: str = "fp32") -> Path:
    """The ONNX file of ``model_dir``, exported from the weights when missing or stale.

    Staleness is decided by content, not file times (a git checkout sets arbitrary times): the export
    report beside the ONNX file records the sha256 of the weights it was exported from.
    """
    path = default_onnx_path(model_dir, precision)
    if precision == "int8":
        if not path.is_file():
            raise BackendUnavailable(f"int8: {path} missing; create it with `lmm-fusion quantize`")
        return path
    weights = sha256_file(model_dir / "model.safetensors")
    if path.is_file() and exported_from(path) == weights:
        return path
    if not os.access(model_dir, os.W_OK):
        # A model installed read-only (ROS share dir): export into the user cache, keyed by the weights.
        path = cache_dir() / f"{model_dir.name}-{weights[:16]}" / path.name
        if path.is_file() and exported_from(path) == weights:
            return path
    export_onnx(model_dir, path)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--out", default=None, help="ONNX file to write (default: MODEL/model.onnx)")
    p.add_argument("--no-parity", action="store_true", help="skip the ONNX Runtime vs torch comparison")


def run(args: argparse.Namespace) -> int:
    model_dir = Path(args.model) if args.model else default_model_dir()
    out = export_onnx(model_dir, args.out, check_parity=not args.no_parity)
    report = json.loads(report_path(out).read_text())
    print(json.dumps(report, indent=2))
    return 0
