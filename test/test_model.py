"""FusionModel: shapes, modality masking, determinism, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmm_fusion.model import OUTPUT_NAMES, FusionModel, ModelConfig, load_model, save_model
from lmm_fusion.model.fusion import SelfAttention

SMALL = dict(image_height=32, image_width=64, image_roi_rows=8, camera_channels=(8, 8, 16, 16),
             lidar_stages=(8, 8, 16, 16),
             d_model=32, n_heads=2, head_hidden=32)


def _inputs(cfg: ModelConfig, b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ny, nx = cfg.input_bev_grid.shape
    return {
        "image": torch.randn(b, 3, cfg.image_height, cfg.image_width, generator=g),
        "bev": torch.rand(b, cfg.bev_input_channels, ny, nx, generator=g),
        "ego": torch.randn(b, cfg.ego_features, generator=g),
        "modality_mask": torch.ones(b, 3),
    }


@pytest.fixture(scope="module", params=[0, 2], ids=["no_camera_pool", "camera_pool"])
def model(request: pytest.FixtureRequest) -> FusionModel:
    """With and without the camera attention pool (a skip path to the heads that masking must gate)."""
    torch.manual_seed(0)
    return FusionModel(ModelConfig(**SMALL, camera_pool_heads=request.param)).eval()


def test_output_shapes_and_ranges(model: FusionModel) -> None:
    cfg = model.cfg
    with torch.no_grad():
        out = model(**_inputs(cfg))
    assert tuple(out) == OUTPUT_NAMES
    expect = {"risk_logits": (3, 3), "action_logits": (3, 6), "light_logits": (3, 4), "target_speed": (3,),
              "ttc": (3,), "obstacle_distance": (3,), "occupancy_logits": (3, 32, 64),
              "modality_attention": (3, 3)}
    assert {k: tuple(v.shape) for k, v in out.items()} == expect
    assert cfg.occupancy_bev_grid.shape == (32, 64)
    assert ((out["ttc"] >= 0) & (out["ttc"] <= cfg.ttc_max)).all()
    assert ((out["obstacle_distance"] >= 0) & (out["obstacle_distance"] <= cfg.distance_max)).all()
    torch.testing.assert_close(out["modality_attention"].sum(1), torch.ones(3))


@pytest.mark.parametrize("masked", [0, 1, 2])
def test_masked_modality_gets_no_attention_and_does_not_change_outputs(model: FusionModel, masked: int) -> None:
    x = _inputs(model.cfg)
    x["modality_mask"][:, masked] = 0.0
    y = {k: v.clone() for k, v in x.items()}
    name = ["image", "bev", "ego"][masked]
    y[name] = torch.randn_like(y[name]) * 5.0  # a very different input for the masked sensor
    with torch.no_grad():
        a, b = model(**x), model(**y)
    assert (a["modality_attention"][:, masked] == 0).all()
    torch.testing.assert_close(a["modality_attention"].sum(1), torch.ones(3))
    for k in OUTPUT_NAMES:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{k} depends on masked {name}")
    # The unmasked inputs do matter.
    other = (masked + 1) % 3
    z = {k: v.clone() for k, v in x.items()}
    oname = ["image", "bev", "ego"][other]
    z[oname] = torch.randn_like(z[oname]) * 5.0
    with torch.no_grad():
        c = model(**z)
    assert not torch.allclose(a["risk_logits"], c["risk_logits"])


def test_masked_tokens_receive_exactly_zero_attention() -> None:
    attn = SelfAttention(16, 2, 0.0).eval()
    x = torch.randn(1, 5, 16)
    bias = torch.tensor([0.0, 0.0, -1.0e4, -1.0e4, 0.0])[None, None, None, :]
    _, att = attn(x, bias)
    assert (att[..., 2:4] == 0).all()
    torch.testing.assert_close(att.sum(-1), torch.ones(1, 2, 5))


def test_all_modalities_masked_is_finite(model: FusionModel) -> None:
    x = _inputs(model.cfg)
    x["modality_mask"].zero_()
    with torch.no_grad():
        out = model(**x)
    for k, v in out.items():
        assert torch.isfinite(v).all(), k
    assert (out["modality_attention"] == 0).all()


def test_same_seed_same_model() -> None:
    cfg = ModelConfig(**SMALL)
    torch.manual_seed(7)
    a = FusionModel(cfg).eval()
    torch.manual_seed(7)
    b = FusionModel(cfg).eval()
    x = _inputs(cfg)
    with torch.no_grad():
        oa, ob = a(**x), b(**x)
    for k in OUTPUT_NAMES:
        assert torch.equal(oa[k], ob[k]), k


def test_save_load_round_trip(model: FusionModel, tmp_path: Path) -> None:
    save_model(model, tmp_path / "m", metadata={"note": "test"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg == model.cfg
    x = _inputs(model.cfg)
    with torch.no_grad():
        a, b = model(**x), loaded(**x)
    for k in OUTPUT_NAMES:
        assert torch.equal(a[k], b[k]), k


def test_load_rejects_mismatched_config(model: FusionModel, tmp_path: Path) -> None:
    save_model(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_model"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_model(tmp_path)
    cfg["not_a_field"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not_a_field"):
        load_model(tmp_path)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(d_model=30, n_heads=4).validate()
    with pytest.raises(ValueError, match="ttc_max"):
        ModelConfig(ttc_max=0.0).validate()
