"""Safe loading: weights only from safetensors/ONNX (never pickle), model paths from parameters checked,
corrupt model files give a clear error naming the file, never a raw traceback from the node.

TensorRT engine files are validated before use (metadata, I/O, corruption): see ``test_runtime.py``
(``test_engine_with_mismatched_metadata_is_rebuilt_not_loaded``, ``test_corrupt_engine_is_an_error_naming_the_file``).
The node opens no TCP listener: see ``test_reliability_dds.py::test_node_opens_no_listening_socket``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lmm_fusion.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_model
from lmm_fusion.ros.params import defaults, validate
from lmm_fusion.runtime.backends import ensure_onnx, make_backend
from lmm_fusion.tools.harness import loopback_env, node_command, run_parallel

ROOT = Path(__file__).resolve().parents[1]
# Anything that can execute code while loading a file.
UNSAFE = re.compile(r"\btorch\.load\(|\bimport pickle\b|\bfrom pickle\b|\bpickle\.loads?\(|\bcloudpickle\b|\bjoblib\b"
                    r"|\bdill\b|allow_pickle\s*=\s*True|weights_only\s*=\s*False|\bmarshal\.loads?\(")


def test_no_pickle_anywhere_in_the_package() -> None:
    files = sorted((ROOT / "lmm_fusion").rglob("*.py"))
    assert len(files) > 20
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if UNSAFE.search(line)]
    assert not hits, hits


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / CONFIG_FILE).read_text())
        cfg.update(changes)
        (d / CONFIG_FILE).write_text(json.dumps(cfg))
    return edit


def _truncate(keep: int) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = (d / WEIGHTS_FILE).read_bytes()
        (d / WEIGHTS_FILE).write_bytes(data[:keep])
    return edit


# name -> (edit of a copied model dir, file the error must name, field it must name or "")
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "weights-truncated-header": (_truncate(100), WEIGHTS_FILE, ""),
    "weights-truncated-tail": (_truncate(-1000), WEIGHTS_FILE, ""),
    "weights-empty": (_truncate(0), WEIGHTS_FILE, ""),
    "weights-garbage": (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x80\x04garbage" * 50), WEIGHTS_FILE, ""),
    "config-not-json": (lambda d: (d / CONFIG_FILE).write_text("{d_model: 64"), CONFIG_FILE, ""),
    "config-not-an-object": (lambda d: (d / CONFIG_FILE).write_text("[1, 2]"), CONFIG_FILE, ""),
    "config-string-for-int": (_edit_config(d_model="64"), CONFIG_FILE, "d_model"),
    "config-int-for-list": (_edit_config(lidar_stages=5), CONFIG_FILE, "lidar_stages"),
    "config-null": (_edit_config(n_heads=None), CONFIG_FILE, "n_heads"),
    "config-bool-for-int": (_edit_config(n_layers=True), CONFIG_FILE, "n_layers"),
    "config-grid-wrong": (_edit_config(input_grid={"cell": "0.5"}), CONFIG_FILE, "input_grid"),
    "config-unknown-field": (_edit_config(d_modle=64), CONFIG_FILE, "d_modle"),
    "config-shape-mismatch": (_edit_config(d_model=96), WEIGHTS_FILE, "shape"),
}


def _corrupt(model_dir: Path, tmp: Path, name: str) -> Path:
    d = tmp / name
    shutil.copytree(model_dir, d)
    CORRUPTIONS[name][0](d)
    return d


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_model_is_a_value_error_naming_file_and_field(model_dir: Path, tmp_path: Path, name: str) -> None:
    d = _corrupt(model_dir, tmp_path, name)
    _, file, field = CORRUPTIONS[name]
    with pytest.raises(ValueError) as err:
        load_model(d)
    assert str(d / file) in str(err.value)
    assert field in str(err.value)


def test_corrupt_onnx_is_an_error_naming_the_file(model_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    ensure_onnx(d)  # a current export (its report records these weights' hash) ...
    (d / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf")  # ... then damaged on disk: used as is
    with pytest.raises(Exception, match=re.escape(str(d / "model.onnx"))):
        make_backend("onnxruntime", d)


@pytest.mark.parametrize("kind", ["missing", "file", "no-config"])
def test_model_dir_parameter_is_checked(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model"
    if kind == "file":
        path.write_text("not a directory")
    elif kind == "no-config":
        path.mkdir()
        (path / WEIGHTS_FILE).write_bytes(b"")
    values = defaults() | {"model_dir": str(path)}
    problems = validate(values)
    assert len(problems) == 1 and problems[0].startswith(f"model_dir={str(path)!r}"), problems


@pytest.mark.dds
@pytest.mark.slow
def test_node_refuses_bad_model_dir_and_corrupt_models_without_traceback(model_dir: Path, tmp_path: Path) -> None:
    """The real node process: a wrong ``model_dir`` fails configure naming the parameter; a corrupt model
    fails configure naming the file; both exit 1 with no Python traceback."""
    missing = tmp_path / "does-not-exist"
    truncated = _corrupt(model_dir, tmp_path, "weights-truncated-tail")
    bad_config = _corrupt(model_dir, tmp_path, "config-string-for-int")
    base = ("backend:=torch", "threads:=1")
    # One node per case, all at once (two cores: parallel start-ups halve the wall time).
    results = run_parallel({
        "missing": node_command(*base, f"model_dir:={missing}"),
        "truncated": node_command(*base, f"model_dir:={truncated}"),
        "bad-config": node_command(*base, f"model_dir:={bad_config}"),
    }, loopback_env(), cwd=tmp_path)
    expect = {"missing": f"model_dir={str(missing)!r}", "truncated": str(truncated / WEIGHTS_FILE),
              "bad-config": f"{bad_config / CONFIG_FILE}: invalid model config: d_model='64'"}
    for name, r in results.items():
        assert r.returncode == 1, (name, r.returncode, r.stdout[-2000:])
        assert expect[name] in r.stdout, (name, r.stdout[-2000:])
        assert "Traceback" not in r.stdout, (name, r.stdout[-3000:])
