"""Training: modality dropout, loss terms, a tiny run that learns, resume, determinism, DDP (gloo)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmm_fusion.model import FusionModel, ModelConfig, load_model
from lmm_fusion.model.losses import FusionLoss, LossWeights, info_nce
from lmm_fusion.training.dataset import ARRAYS, FusionDataset, ResidentSamples
from lmm_fusion.training.train import (
    _parse_overrides,
    add_arguments,
    augment,
    lr_at,
    modality_dropout,
    resident_samples,
    run,
    train,
)

TINY = dict(image_height=32, image_width=64, image_roi_rows=8, camera_channels=(8, 8, 16, 16),
            lidar_stages=(8, 8, 16, 16),
            d_model=32, n_heads=2, n_layers=1, head_hidden=32,
            input_grid=dict(x_min=-8.0, x_max=56.0, y_min=-16.0, y_max=16.0, cell=1.0),
            occupancy_grid=dict(x_min=-8.0, x_max=56.0, y_min=-16.0, y_max=16.0, cell=2.0))


def toy_arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A learnable toy task: the action is set by the ego speed (GNSS) and a bright BEV blob (LiDAR)."""
    rng = np.random.default_rng(seed)
    cfg = ModelConfig(**TINY)
    ny, nx = cfg.input_bev_grid.shape
    speed = rng.uniform(0, 2, n).astype(np.float32)
    blob = rng.random(n) < 0.5
    bev = np.zeros((n, cfg.bev_input_channels, ny, nx), np.float16)
    bev[blob, :, 14:18, 20:24] = 1.0
    ego = np.zeros((n, cfg.ego_features), np.float32)
    ego[:, 0] = speed
    ego[:, 7] = 1.0
    action = np.where(blob, np.where(speed > 1, 3, 2), 0).astype(np.int64)
    occ = np.zeros((n, *cfg.occupancy_bev_grid.shape), np.uint8)
    occ[blob, 7:9, 10:12] = 1
    return {
        "image": rng.integers(0, 255, (n, cfg.image_height, cfg.image_width, 3), dtype=np.uint8),
        "bev": bev, "ego": ego, "mask": np.ones((n, 3), bool),
        "risk": np.where(blob, 2, 0).astype(np.int64), "action": action,
        "light": np.zeros(n, np.int64), "target_speed": np.where(blob, 0.0, 15.0).astype(np.float32),
        "ttc": np.where(blob, 2.0, cfg.ttc_max).astype(np.float32),
        "distance": np.where(blob, 12.0, cfg.distance_max).astype(np.float32),
        "occupancy": occ, "scenario": np.where(blob, 2, 0).astype(np.int64), "stamp": np.arange(n, dtype=np.float64),
    }


def test_toy_arrays_cover_every_cached_array() -> None:
    assert set(toy_arrays(2)) == set(ARRAYS)


def test_modality_dropout_only_removes_present_sensors() -> None:
    rng = np.random.default_rng(0)
    data = np.ones((2000, 3), bool)
    data[:500, 1] = False
    used = modality_dropout(data, rng, 0.5)
    assert used.dtype == np.float32
    assert not (used[:500, 1]).any()  # an absent sensor never comes back
    assert (used.sum(1) >= 1).all()  # something is always left
    dropped = (used.sum(1) < data.sum(1)).mean()
    assert 0.4 < dropped < 0.6
    assert (modality_dropout(data, rng, 0.0) == data).all()


def test_augment_keeps_shapes_and_leaves_missing_gnss_at_zero() -> None:
    cfg = ModelConfig(**TINY)
    ds = FusionDataset.from_arrays(toy_arrays(8), cfg)
    b = ds.batch(np.arange(8))
    b["ego"][:2] = 0.0  # no GNSS state
    ref = {k: v.clone() for k, v in b.items()}
    augment(b, np.random.default_rng(0))
    assert b["image"].shape == ref["image"].shape and not torch.equal(b["image"], ref["image"])
    assert (b["ego"][:2] == 0).all()
    assert torch.equal(b["bev"], ref["bev"])  # geometry untouched
    c = {k: v.clone() for k, v in ref.items()}
    augment(c, np.random.default_rng(0))
    assert torch.equal(b["image"], c["image"])  # deterministic for a given generator


def test_lr_schedule_warms_up_and_decays() -> None:
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.05)


def test_info_nce_prefers_aligned_embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(8, 1, 16, generator=g), dim=-1)
    aligned = torch.cat([e, e, e], 1)
    shuffled = torch.cat([e, e[torch.randperm(8, generator=g)], e], 1)
    present = torch.ones(8, 3, dtype=torch.bool)
    assert info_nce(aligned, present, 0.1) < info_nce(shuffled, present, 0.1)
    assert info_nce(aligned, torch.zeros(8, 3, dtype=torch.bool), 0.1) == 0


def test_cautious_term_penalises_underestimated_risk() -> None:
    cfg = ModelConfig(**TINY)
    loss = FusionLoss(cfg)
    ds = FusionDataset.from_arrays(toy_arrays(4), cfg)
    b = ds.batch(np.arange(4))
    b["risk"] = torch.full((4,), 1)

    def out(risk_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"risk_logits": risk_logits, "action_logits": torch.zeros(4, 6), "light_logits": torch.zeros(4, 4),
                "target_speed": torch.zeros(4), "ttc": torch.zeros(4), "obstacle_distance": torch.zeros(4),
                "occupancy_logits": torch.zeros(4, *cfg.occupancy_bev_grid.shape)}

    low = torch.tensor([[5.0, 0.0, 0.0]]).repeat(4, 1)
    high = torch.tensor([[0.0, 0.0, 5.0]]).repeat(4, 1)
    _, p_low = loss(out(low), b)
    _, p_high = loss(out(high), b)
    assert p_low["cautious"] > 0.9 and p_high["cautious"] < 0.01
    # Samples missing a sensor weigh it 1 + cautious_degraded times; full-sensor samples once.
    half_blind = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    for extra in (1.0, 3.0):
        _, parts = FusionLoss(cfg, LossWeights(cautious_degraded=extra))(out(low), b, used_mask=half_blind)
        assert parts["cautious"] == pytest.approx(p_low["cautious"] * (1 + extra / 2), rel=1e-5)


def test_loss_weight_overrides_are_checked() -> None:
    assert _parse_overrides(["cautious_degraded=3"], LossWeights, "--loss-weights") == {"cautious_degraded": 3}
    with pytest.raises(SystemExit, match="cautious_degradd"):
        _parse_overrides(["cautious_degradd=3"], LossWeights, "--loss-weights")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for bad in ("cautious_degraded=lots", "cautious=-1"):  # refused before any data is read
        args = parser.parse_args(["--data", "no-such-bag", "--out", "unused", "--loss-weights", bad])
        with pytest.raises(SystemExit, match=bad.split("=")[0]):
            run(args)


def test_tiny_training_run_lowers_the_loss_and_saves_a_model(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = ModelConfig(**TINY)
    ds = FusionDataset.from_arrays(toy_arrays(64), cfg)
    torch.manual_seed(0)
    before = FusionLoss(cfg)(FusionModel(cfg).eval()(**{k: ds.batch(np.arange(64))[k] for k in
                                                       ("image", "bev", "ego", "modality_mask")}),
                             ds.batch(np.arange(64)))[0].item()
    train(cfg, ds, tmp_path / "m", epochs=6, batch_size=16, lr=3e-3, seed=0, p_drop=0.0, progress=False,
          device="cpu")
    lines = [json.loads(x) for x in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    assert lines[-1]["train"]["loss"] < 0.6 * lines[0]["train"]["loss"]
    model = load_model(tmp_path / "m")
    b = ds.batch(np.arange(64))
    with torch.no_grad():
        o = model(b["image"], b["bev"], b["ego"], b["modality_mask"])
    after = FusionLoss(cfg)(o, b)[0].item()
    assert after < 0.6 * before


def _short_runs() -> tuple[ModelConfig, FusionDataset, dict]:
    """Tiny config, 32 toy samples and the train() keywords the short-run tests share."""
    torch.set_num_threads(1)
    cfg = ModelConfig(**TINY)
    ds = FusionDataset.from_arrays(toy_arrays(32), cfg)
    return cfg, ds, dict(batch_size=16, lr=3e-3, seed=3, progress=False, device="cpu")


def test_training_is_deterministic_and_resumes_exactly(tmp_path: Path) -> None:
    cfg, ds, kw = _short_runs()
    train(cfg, ds, tmp_path / "a", epochs=3, **kw)
    train(cfg, ds, tmp_path / "b", epochs=3, **kw)
    train(cfg, ds, tmp_path / "c", epochs=3, max_steps=4, **kw)  # interrupted after 2 of 3 epochs
    train(cfg, ds, tmp_path / "c", epochs=3, resume=True, **kw)
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    for k in a:
        assert torch.equal(a[k], b[k]), k
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=1e-6, msg=k)
    log_c = (tmp_path / "c" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in log_c] == [0, 1, 2]


def test_init_from_fine_tunes_from_the_given_weights(tmp_path: Path) -> None:
    cfg, ds, kw = _short_runs()
    train(cfg, ds, tmp_path / "base", epochs=2, **kw)
    base = load_model(tmp_path / "base").state_dict()
    # no optimiser step: the saved model is the starting point (BatchNorm statistics aside)
    train(cfg, ds, tmp_path / "ft0", epochs=1, max_steps=0, init_from=tmp_path / "base", **kw)
    ft0 = load_model(tmp_path / "ft0").state_dict()
    for k, v in base.items():
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(v, ft0[k]), k
    scratch = FusionModel(cfg).state_dict()
    assert any(not torch.equal(scratch[k], base[k]) for k in base if "weight" in k)
    # and training from there moves the weights
    train(cfg, ds, tmp_path / "ft", epochs=1, init_from=tmp_path / "base", **kw)
    ft = load_model(tmp_path / "ft")
    assert any(not torch.equal(ft.state_dict()[k], base[k]) for k in base if "weight" in k)
    with pytest.raises(ValueError, match=r"d_model=.*this run"):
        train(ModelConfig(**{**TINY, "d_model": 2 * cfg.d_model}), ds, tmp_path / "bad", epochs=1,
              init_from=tmp_path / "base", **kw)


def test_resident_batches_are_those_of_the_cpu_path() -> None:
    cfg = ModelConfig(**TINY)
    arrays = toy_arrays(16)
    arrays["mask"][:5, 2] = False
    ds = FusionDataset.from_arrays(arrays, cfg)
    res = ResidentSamples(ds, torch.device("cpu"))
    assert res.t["image"].dtype == torch.uint8  # kept as cached, normalised per batch
    idx = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    ref, got = ds.batch(idx), res.batch(torch.from_numpy(idx))
    assert set(ref) == set(got)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].is_contiguous() and torch.equal(got[k], ref[k]), k
    # augmentation on the gathered batch, from the same generator, is the one of the CPU batch
    augment(ref, np.random.default_rng(4))
    augment(got, np.random.default_rng(4))
    assert torch.equal(ref["image"], got["image"]) and torch.equal(ref["ego"], got["ego"])
    assert resident_samples(ds, torch.device("cpu"), "auto") is None  # auto: CUDA only
    assert resident_samples(ds, torch.device("cpu"), "off") is None
    with pytest.raises(ValueError, match="resident='yes'"):
        resident_samples(ds, torch.device("cpu"), "yes")


def test_resident_run_is_bitwise_the_cpu_run(tmp_path: Path) -> None:
    """Batches gathered from the resident arrays, with dropout and augmentation on their device, train
    the same weights as batches built from numpy (same draws, same float32 operations)."""
    cfg, ds, kw = _short_runs()
    kw = {**kw, "batch_size": 8, "p_drop": 0.5}
    for mode in ("off", "on"):
        train(cfg, ds, tmp_path / mode, epochs=2, resident=mode, **kw)
    a, b = (load_file(str(tmp_path / m / "model.safetensors")) for m in ("off", "on"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = [[json.loads(x)["train"] for x in (tmp_path / m / "train_log.jsonl").read_text().splitlines()]
              for m in ("off", "on")]
    assert losses[0] == losses[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resident_set_on_cuda_builds_the_cpu_batches(tmp_path: Path) -> None:
    cfg, ds, kw = _short_runs()
    dev = torch.device("cuda")
    res = resident_samples(ds, dev, "auto")  # a few MB: fits
    assert res is not None and res.t["image"].device.type == "cuda" and res.t["image"].dtype == torch.uint8
    idx = np.arange(0, 32, 3)
    ref, got = ds.batch(idx), res.batch(idx)
    for k in ref:
        assert got[k].device.type == "cuda" and got[k].dtype == ref[k].dtype, k
        torch.testing.assert_close(got[k].cpu(), ref[k], rtol=0, atol=1e-6, msg=k)
    augment(got, np.random.default_rng(0))  # pixel noise from a CUDA generator, on the device
    assert got["image"].device.type == "cuda" and torch.isfinite(got["image"]).all()
    rec = train(cfg, ds, tmp_path / "m", epochs=2, **{**kw, "device": "cuda"})
    assert rec["step"] == 4 and math.isfinite(rec["train"]["loss"])


# DDP under torchrun (global batch, loss curve of 1 vs 2 processes): test_train_ddp.py
