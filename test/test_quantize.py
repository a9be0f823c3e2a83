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
from lmm_fusion.runtime.export import unsupported_ops
from lmm_fusion.training.quantize import calibration_inputs, precision_deltas, quantize

RIG = SensorRig(camera=CameraModel(320, 180), lidar=LidarModel(beams=16, columns=256))


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
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 5 and ops.count("DequantizeLinear") > 5
    assert unsupported_ops(proto) == set()
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
