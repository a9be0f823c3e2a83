"""``lmm-fusion train --recipe``: one command synthesises, extracts, trains, evaluates and writes the
model with its card; interrupted, a rerun continues without redoing a finished stage and ends with the
weights of an uninterrupted run (config/train/smoke.yaml: a few 1 s drives, a tiny model, 2 epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmm_fusion.synth.dataset import make_dataset
from lmm_fusion.synth.drive import rig_from_args
from lmm_fusion.training.recipe import RecipeError, RecipeStopped, load_recipe, parse_recipe, run_recipe
from lmm_fusion.training.train import train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "config" / "train" / "smoke.yaml"


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def _run(run_dir: Path, stop_after: str | None = None) -> dict:
    return run_recipe(SMOKE, run_dir, train, workers=1, device="cpu", threads=1, progress=False,
                      stop_after=stop_after)


def test_interrupted_recipe_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    torch.use_deterministic_algorithms(True)
    a = tmp_path / "a"
    with pytest.raises(RecipeStopped):
        _run(a, stop_after="epoch-0")
    manifest = json.loads((a / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"data_train", "data_validation"}
    assert (a / "epochs" / "000" / "model.safetensors").is_file()
    assert not (a / "epochs" / "001").exists() and not (a / "data" / "test").exists()
    data_before, cache_before = _mtimes(a / "data"), _mtimes(a / "cache")
    epoch0_before = _mtimes(a / "epochs" / "000")

    summary = _run(a)  # the rerun continues: epoch 2, select, test drives, evaluation, card

    assert {k: v for k, v in _mtimes(a / "data").items() if k in data_before} == data_before
    assert not list((a / "data").rglob("*.mcap"))  # keep_bags: false, each bag went once cached
    assert len(list((a / "data").rglob("metadata.yaml"))) == 4 + 2 + 1
    assert {k: v for k, v in _mtimes(a / "cache").items() if k in cache_before} == cache_before
    assert _mtimes(a / "epochs" / "000") == epoch0_before  # epoch 1 was not trained again
    manifest = json.loads((a / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"data_train", "data_validation", "train", "select", "data_test",
                                       "evaluate", "card"}
    seeds = manifest["state"]["test_seeds"]
    assert set(seeds) == {"test"} and seeds["test"] not in (900, 901)
    card = (a / "model" / "MODEL_CARD.md").read_text()
    assert f"{seeds['test']} (drawn at random)" in card and "## Wall time" in card and "machine" in card
    test_report = json.loads((a / "model" / "eval" / "test.json").read_text())
    assert test_report["n"] == 10 and 0.0 <= summary["test_action_accuracy"] <= 1.0
    assert manifest["stages"]["select"]["epoch"] in (0, 1)

    # Continued elsewhere without the sample cache (as after a run on another machine): the missing test
    # drive is made again from its recorded seed and scored, nothing else is redone.
    (test_samples,) = manifest["state"]["samples/test"].values()
    (a / test_samples).unlink()
    (a / "model" / "eval" / "test.json").unlink()
    for stage in ("evaluate", "card"):
        manifest["stages"].pop(stage)
    (a / "manifest.json").write_text(json.dumps(manifest))
    again = _run(a)
    remade = json.loads((a / "manifest.json").read_text())["state"]["remade/test"]
    assert remade["drives"] == 1 and again["test_seeds"] == seeds
    assert json.loads((a / "model" / "eval" / "test.json").read_text())["n"] == 10
    assert "made again from their recorded seeds" in (a / "model" / "MODEL_CARD.md").read_text()

    # The same recipe from nothing, uninterrupted: the same drives, samples and weights.
    b = tmp_path / "b"
    _run(b)
    for k in ("000", "001"):
        wa, wb = load_file(str(a / "epochs" / k / "model.safetensors")), load_file(str(b / "epochs" / k /
                                                                                        "model.safetensors"))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[n], wb[n]) for n in wa), f"epoch {k} differs after the interruption"
    torch.use_deterministic_algorithms(False)


def test_a_rerun_with_another_recipe_is_refused(tmp_path: Path) -> None:
    recipe = yaml.safe_load(SMOKE.read_text())
    (tmp_path / "run").mkdir()
    run_recipe_other = parse_recipe({**recipe, "train": {**recipe["train"], "epochs": 3}})
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(
        {"recipe": "smoke", "recipe_fingerprint": run_recipe_other.fingerprint(), "stages": {}, "state": {}}))
    with pytest.raises(RecipeError, match="made by another recipe"):
        _run(tmp_path / "run")


def test_make_dataset_resume_remakes_only_the_drive_cut_off(tmp_path: Path) -> None:
    rig = rig_from_args((96, 54), 8, 128)
    out = tmp_path / "set"
    make_dataset(out, 2, 0.3, 5, rig, compressed=True, progress=False)
    (out / "drive_00001_lead_vehicle" / "metadata.yaml").unlink()  # as a kill mid-write leaves it
    kept = _mtimes(out / "drive_00000_free_road")
    make_dataset(out, 2, 0.3, 5, rig, compressed=True, progress=False, resume=True)
    assert _mtimes(out / "drive_00000_free_road") == kept
    assert (out / "drive_00001_lead_vehicle" / "metadata.yaml").is_file()
    with pytest.raises(FileExistsError):
        make_dataset(out, 2, 0.3, 5, rig, compressed=True, progress=False)  # without resume: an error


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["data"]["train"][0].pop("seed"), r"data.train\[0\].seed: required"),
    (lambda r: r["data"]["test"][0].update(seed=3), r"test seeds are drawn at random"),
    (lambda r: r["data"]["validation"][0].update(seed=900), r"seed is used twice"),
    (lambda r: r["train"].update(epochs=0), r"train.epochs=0: must be >= 1"),
    (lambda r: r["train"].update(lr="fast"), r"train.lr='fast': expected a number"),
    (lambda r: r["train"].update(loss_weights={"nope": 1}), r"loss_weights: unknown key"),
    (lambda r: r["model"].update(d_model=15), r"recipe.model: d_model=15 is not divisible"),
    (lambda r: r["model"].update(colour=1), r"unknown ModelConfig field"),
    (lambda r: r["data"].update(camera=[640]), r"data.camera=\[640\]"),
    (lambda r: r.update(select="loss"), r"select='loss'"),
    (lambda r: r.update(epochs=3), r"recipe: unknown key\(s\) epochs"),
])
def test_bad_recipes_name_the_field(edit, message) -> None:
    recipe = yaml.safe_load(SMOKE.read_text())
    edit(recipe)
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe)


def test_shipped_recipes_parse() -> None:
    for path in sorted((ROOT / "config" / "train").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.data.train and recipe.data.validation and recipe.data.test, path
