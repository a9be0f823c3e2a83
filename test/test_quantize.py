"""INT8 by explicit quantization: a Q/DQ ONNX calibrated on a bag through the project's own pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lmm_fusion.base.rig import CameraModel, LidarModel, SensorRig
from lmm_fusion.model import OUTPUT_NAMES, FusionModel, ModelConfig, save_model
from lmm_fusion.runtime.backends import OnnxRuntimeBackend, make_backend
from lmm_fusion.runtime.export import ExportError, example_inputs, qdq_problems, unsupported_ops
from lmm_fusion.training import quantize as quantize_mod
from lmm_fusion.training.quantize import calibration_inputs, precision_deltas, quantize

RIG = SensorRig(camera=CameraModel(320, 180), lidar=LidarModel(beams=16, columns=256))
SHIPPED_INT8 = Path(__file__).resolve().parents[1] / "models" / "fusion_small" / "model.int8.onnx"
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
QDQ = {"QuantizeLinear", "DequantizeLinear"}


def tensorrt_form_violations(proto: onnx.ModelProto) -> list[str]:
    """An independent walk of a Q/DQ graph for what TensorRT 10's explicit quantization needs: every
    DequantizeLinear reads int8 (an int8 weight, or a QuantizeLinear with an int8 zero point), every
    bias of a weighted layer is a float initializer, and between each output and the last weighted
    layer before it there is no Q/DQ."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    found = []
    for n in g.node:
        if n.op_type == "DequantizeLinear":
            x = n.input[0]
            if x in inits:
                ok = inits[x].data_type == onnx.TensorProto.INT8
            else:
                q = producer[x]
                ok = q.op_type == "QuantizeLinear" and inits[q.input[2]].data_type == onnx.TensorProto.INT8
            if not ok:
                found.append(f"DQ of non-int8 {x}")
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2]:
            bias = inits.get(n.input[2])
            if bias is None or bias.data_type != onnx.TensorProto.FLOAT:
                found.append(f"bias of {n.name} is not a float initializer")
    for out in g.output:
        todo, seen = [out.name], set()
        while todo:
            t = todo.pop()
            n = producer.get(t)
            if n is None or t in seen:
                continue
            seen.add(t)
            if n.op_type in QDQ:
                found.append(f"{n.op_type} before output {out.name}")
            elif n.op_type not in WEIGHTED:
                todo.extend(n.input)
    return found


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from lmm_fusion.synth.drive import synthesize

    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("model")
    save_model(FusionModel(ModelConfig()), model_dir)
    bag = synthesize(tmp_path_factory.mktemp("drive") / "bag", 3.0, seed=11, rig=RIG, progress=False)
    return model_dir, bag


def test_calibration_frames_come_from_the_pipeline(setup: tuple[Path, Path]) -> None:
    model_dir, bag = setup
    frames = list(calibration_inputs([bag], model_dir, max_frames=5))
    assert 1 <= len(frames) <= 5
    cfg = ModelConfig()
    for f in frames:
        assert f["image"].shape == (1, 3, cfg.image_height, cfg.image_width)
        assert f["modality_mask"].tolist() == [[1.0, 1.0, 1.0]]  # only cycles with every sensor present
        assert np.abs(f["bev"]).sum() > 0  # real LiDAR content, not zeros


def test_calibration_reads_each_bag_on_its_own(setup: tuple[Path, Path]) -> None:
    model_dir, bag = setup
    once = len(list(calibration_inputs([bag], model_dir, max_frames=1000)))
    # Drives share time bases: merged into one stream they would interleave and lose frames.
    twice = len(list(calibration_inputs([bag, bag], model_dir, max_frames=1000)))
    assert once > 0 and twice == 2 * once


def test_quantized_graph_is_qdq_symmetric_and_close_to_fp32(setup: tuple[Path, Path]) -> None:
    model_dir, bag = setup
    out = quantize(model_dir, [bag], model_dir / "model.int8.onnx", max_frames=8)
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 5 and ops.count("DequantizeLinear") > 5
    assert unsupported_ops(proto) == set()
    assert tensorrt_form_violations(proto) == [] and qdq_problems(proto) == []
    # Weights and activations are quantized: every weighted layer reads both inputs through a DQ.
    producer = {o: n for n in proto.graph.node for o in n.output}
    for n in proto.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            assert [producer[i].op_type for i in n.input[:2]] == ["DequantizeLinear"] * 2, n.name
    assert [o.domain for o in proto.opset_import] == [""]  # no unused optimizer domains left
    # TensorRT needs symmetric int8: every zero point is 0.
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    zps = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)

    frame = next(iter(calibration_inputs([bag], model_dir, max_frames=1)))
    ref = make_backend("onnxruntime", model_dir, device="cpu").infer(frame)
    int8 = OnnxRuntimeBackend(out, prefer_gpu=False)
    assert int8.precision == "int8"
    got = int8.infer(frame)
    for name in OUTPUT_NAMES:
        assert got[name].shape == ref[name].shape and np.all(np.isfinite(got[name])), name
    # Quantization changes values a little, not the decision on the calibration-like frame.
    assert np.argmax(got["action_logits"]) == np.argmax(ref["action_logits"])
    np.testing.assert_allclose(got["modality_attention"], ref["modality_attention"], atol=0.1)


def test_precision_deltas_compare_the_same_samples(setup: tuple[Path, Path]) -> None:
    model_dir, bag = setup
    out = model_dir / "model.int8.onnx"
    if not out.exists():
        quantize(model_dir, [bag], out, max_frames=8)
    report = precision_deltas(model_dir, out, [bag])
    assert report["n"] > 10
    for k, d in report["delta"].items():
        assert d == pytest.approx(report["int8"][k] - report["fp32"][k], abs=1e-3), k
        assert abs(d) <= 1.0 or k.endswith("_mae"), k


def test_shipped_int8_graph_is_in_tensorrt_form_and_runs() -> None:
    proto = onnx.load(str(SHIPPED_INT8))
    onnx.checker.check_model(proto, full_check=True)
    assert tensorrt_form_violations(proto) == [] and qdq_problems(proto) == []
    cfg = ModelConfig.load(SHIPPED_INT8.parent / "config.json")
    out = OnnxRuntimeBackend(SHIPPED_INT8, prefer_gpu=False).infer(example_inputs(cfg))
    assert set(out) == set(OUTPUT_NAMES) and all(np.all(np.isfinite(v)) for v in out.values())


def test_graph_check_names_each_problem() -> None:
    """ONNX Runtime's default form: an int32 bias behind a DequantizeLinear, and the logits through
    Q->DQ on their way out; both reported."""
    h, nh = onnx.helper, onnx.numpy_helper
    inits = [
        nh.from_array(np.ones((4, 8), np.int8), "w_q"), nh.from_array(np.array(0.1, np.float32), "s"),
        nh.from_array(np.array(0, np.int8), "zp"), nh.from_array(np.zeros(4, np.int32), "b_q"),
        nh.from_array(np.array(0, np.int32), "b_zp"),
    ]
    nodes = [
        h.make_node("QuantizeLinear", ["x", "s", "zp"], ["x_q"], name="qx"),
        h.make_node("DequantizeLinear", ["x_q", "s", "zp"], ["x_dq"], name="dqx"),
        h.make_node("DequantizeLinear", ["w_q", "s", "zp"], ["w"], name="dqw"),
        h.make_node("DequantizeLinear", ["b_q", "s", "b_zp"], ["b"], name="dqb"),
        h.make_node("Gemm", ["x_dq", "w", "b"], ["y"], name="head", transB=1),
        h.make_node("QuantizeLinear", ["y", "s", "zp"], ["y_q"], name="qy"),
        h.make_node("DequantizeLinear", ["y_q", "s", "zp"], ["logits"], name="dqy"),
    ]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
                         [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 4])], inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    problems = qdq_problems(proto)
    assert any("dqb" in p and "INT32" in p for p in problems)
    assert any(p.startswith("logits: DequantizeLinear dqy after") for p in problems)
    assert len(problems) == 2
    assert len(tensorrt_form_violations(proto)) == 3  # and the bias is not a float initializer


def test_a_rejected_graph_leaves_the_previous_one_in_place(
    setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model_dir, bag = setup
    out = tmp_path / "model.int8.onnx"
    out.write_bytes(b"previous")

    def reject(path: Path) -> None:
        raise ExportError(f"{path}: not a TensorRT explicit-quantization graph")

    monkeypatch.setattr(quantize_mod, "check_qdq_graph", reject)
    with pytest.raises(ExportError, match="explicit-quantization"):
        quantize(model_dir, [bag], out, max_frames=2)
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx"]
