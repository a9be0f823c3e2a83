"""Fleet replay and dataset synthesis on a real local Ray (2 CPUs): pooled numbers equal the bags replayed
one by one, a bad bag is reported without sinking the run, a task whose worker dies is retried, and drives
made by Ray tasks are byte-identical to the local ones."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from lmm_fusion.base.rig import CameraModel, LidarModel, SensorRig
from lmm_fusion.groundtruth.scoring import RECORD_KEYS, accuracy_table
from lmm_fusion.offline import fleet
from lmm_fusion.offline.replay import ReplayOptions, replay
from lmm_fusion.synth.dataset import make_dataset
from lmm_fusion.synth.drive import synthesize

RIG = SensorRig(camera=CameraModel(160, 90), lidar=LidarModel(beams=16, columns=128))
SECONDS = 1.5


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """One Ray of 2 CPUs for the module (fleet functions use a Ray that is already up and leave it so). This
    module's functions travel by value: its workers cannot import the test folder."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny drives and a folder that is not a bag."""
    root = tmp_path_factory.mktemp("fleet_bags")
    good = [synthesize(root / f"drive{i}", SECONDS, seed, rig=RIG, progress=False) for i, seed in enumerate((1, 4))]
    broken = root / "broken"
    broken.mkdir()
    (broken / "metadata.yaml").write_text("not: a rosbag2 folder\n")
    return [*good, broken]


def _opts(model_dir: Path, **kw: Any) -> ReplayOptions:
    return ReplayOptions(model_dir=model_dir, backend="torch", progress=False, rig=RIG, threads=1, **kw)


def test_fleet_pools_like_one_by_one_and_reports_the_bad_bag(local_ray: Any, bags: list[Path], model_dir: Path,
                                                             tmp_path: Path) -> None:
    report, outcomes = fleet.replay_fleet(bags, tmp_path / "fleet", _opts(model_dir), ray_address=fleet.LOCAL)
    # The same bags, one by one in this process, with the cycles kept.
    tables, samples = [], []
    for b in bags[:2]:
        collector = fleet.CycleCollector()
        m = replay(b, tmp_path / "one" / b.name, _opts(model_dir, on_cycle=collector))
        tables.append(collector.table())
        samples += [s for s, ok in zip(collector.samples, collector.scored) if ok]
        entry = next(e for e in report["bags"] if e["bag"] == str(b.resolve()))
        assert {k: entry["accuracy"][k] for k in RECORD_KEYS} == m["accuracy"]["overall"]
        # one output folder per bag, the same output bag as a replay of that bag alone
        fleet_out = tmp_path / "fleet" / b.name
        assert (fleet_out / "outputs.mcap").read_bytes() == (tmp_path / "one" / b.name / "outputs.mcap").read_bytes()
        assert json.loads((fleet_out / "metrics.json").read_text())["cycles"] == m["cycles"]
    pooled = report["pooled"]
    one_by_one = fleet.concat_tables(tables)
    assert pooled["cycles"] == len(one_by_one) == sum(len(t) for t in tables) > 0
    assert pooled["accuracy"] == fleet.score_table(one_by_one.scored_columns)
    assert {k: pooled["accuracy"][k] for k in RECORD_KEYS} == accuracy_table(samples)
    # latencies are wall-clock: pooled from the fleet's own cycles, every cycle of every bag
    fleet_cycles = fleet.concat_tables([o.cycles for o in outcomes[:2] if isinstance(o, fleet.BagOutcome) and o.cycles])
    assert pooled["latency_ms"]["total"] == fleet.percentiles(fleet_cycles.latency_ms["total"])
    assert len(fleet_cycles.latency_ms["total"]) == pooled["cycles"]
    assert 0.0 <= pooled["accuracy"]["action_unsafe_rate"] <= 1.0
    # the broken bag is listed with its error; the others are not affected
    assert pooled["bags_ok"] == 2 and pooled["bags_failed"] == 1
    (failed,) = report["failed"]
    assert failed["bag"] == str(bags[2].resolve()) and "BagError" in failed["error"]
    assert [isinstance(o, fleet.BagOutcome) and o.ok for o in outcomes] == [True, True, False]
    written = json.loads((tmp_path / "fleet" / "fleet.json").read_text())
    assert written["pooled"] == json.loads(json.dumps(pooled))
    md = (tmp_path / "fleet" / "fleet.md").read_text()
    assert "broken" in md and "BagError" in md and "## Per scenario family" in md
    assert report["throughput"]["slots"] == 2 and report["throughput"]["x_realtime"] > 0


def crash_once_then_replay(bag: str, out: str, options: ReplayOptions) -> fleet.BagOutcome:
    """The per-bag unit of a flaky worker: its process dies on the first try of ``drive0`` (a marker file
    remembers the try) and on every try of ``drive1``; otherwise it is :func:`fleet.replay_bag`."""
    marker = Path(out).parent / f"{Path(bag).name}.tried"
    if Path(bag).name == "drive1" or not marker.exists():
        marker.touch()
        os._exit(1)  # the worker process dies: no exception reaches Ray, the task is lost
    return fleet.replay_bag(bag, out, options)


def test_a_task_lost_with_its_worker_is_retried(local_ray: Any, bags: list[Path], model_dir: Path,
                                                tmp_path: Path) -> None:
    report, (outcome,) = fleet.replay_fleet(bags[:1], tmp_path / "flaky", _opts(model_dir), ray_address=fleet.LOCAL,
                                            max_retries=1, unit=crash_once_then_replay)
    assert (tmp_path / "flaky" / "drive0.tried").is_file()  # the first try did die
    assert isinstance(outcome, fleet.BagOutcome) and outcome.ok  # retried on a new worker, replayed
    assert report["failed"] == [] and (tmp_path / "flaky" / "drive0" / "outputs.mcap").is_file()
    # a worker that dies on every try: the bag is reported with Ray's error once the retries are spent
    report, (lost,) = fleet.replay_fleet(bags[1:2], tmp_path / "dead", _opts(model_dir), ray_address=fleet.LOCAL,
                                         max_retries=0, unit=crash_once_then_replay)
    assert isinstance(lost, fleet.TaskFailure)
    assert report["pooled"]["bags_failed"] == 1 and report["failed"][0]["bag"] == str(bags[1].resolve())
    assert "Worker" in report["failed"][0]["error"] or "died" in report["failed"][0]["error"]


def test_cli_replay_with_ray(local_ray: Any, bags: list[Path], model_dir: Path, tmp_path: Path) -> None:
    from lmm_fusion.cli import main

    code = main(["replay", str(bags[0]), "--out", str(tmp_path / "cli"), "--ray", "--model", str(model_dir),
                 "--backend", "torch", "--threads", "1", "--no-progress", "--no-sensors"])
    assert code == 0
    report = json.loads((tmp_path / "cli" / "fleet.json").read_text())
    assert report["pooled"]["bags_ok"] == 1 and (tmp_path / "cli" / "drive0" / "metrics.json").is_file()
    assert main(["replay", str(bags[2]), "--out", str(tmp_path / "bad"), "--ray", "--no-progress",
                 "--model", str(model_dir), "--backend", "torch"]) == 1  # a failed bag: exit status 1
    # a bag right after --ray would be its address: refused before anything runs
    assert main(["replay", "--ray", str(bags[0]), str(bags[1]), "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


def test_scaling_projection_and_plot(tmp_path: Path) -> None:
    """The cluster projection's ceilings follow from the measured figures (docs/scale.md)."""
    from lmm_fusion.offline.scaling import plot, project

    runs = [{"workers": 1, "x_realtime": 1.0, "task_s": {"p50": 3.9}, "overhead_s_per_task": 0.1},
            {"workers": 2, "x_realtime": 1.9, "task_s": {"p50": 4.0}, "overhead_s_per_task": 0.2}]
    pr = project(runs, {"dispatch_per_s": 1000.0}, bag_s=4.0, bag_bytes=80e6, storage_gb_s=2.0, fleet_bags=500)
    assert pr["x_realtime_per_worker"] == 1.0  # 4 s of bag per 3.9 + 0.1 s of a worker
    # storage: 2 GB/s over 80 MB per 4 s and worker = 100 workers; dispatch: 1000 tasks/s x 4 s = 4000
    assert pr["ceilings_workers"] == {"dispatch": 4000, "storage": 100, "bags": 500}
    assert pr["stops_scaling_at"] == 100
    png = plot({"runs": runs, "projection": pr}, tmp_path / "scale.png")
    assert png.stat().st_size > 10_000


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_on_ray_is_byte_identical(local_ray: Any, tmp_path: Path) -> None:
    kw = dict(drives=3, seconds=0.6, seed=7, rig=RIG, progress=False, start_max=2.0)
    make_dataset(tmp_path / "local", **kw)
    make_dataset(tmp_path / "ray", ray_address="local", **kw)
    local, remote = _digests(tmp_path / "local"), _digests(tmp_path / "ray")
    assert len(local) >= 3 * 2 + 1  # every drive's bag + metadata, and the manifest
    assert local == remote


def test_ray_is_loaded_only_by_a_ray_run() -> None:
    """The commands' modules import without Ray; only ``--ray`` loads it (the node and core never need it)."""
    import subprocess

    code = ("import sys; import lmm_fusion.offline.fleet, lmm_fusion.offline.compare, lmm_fusion.offline.scaling, "
            "lmm_fusion.synth.dataset, lmm_fusion.training.train, lmm_fusion.cli; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_an_unreachable_head_is_named_at_once() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConnectionError, match=f"no Ray head answers at {address}"):
            fleet.check_reachable(address, timeout_s=2.0)
    fleet.check_reachable("auto")  # left to Ray
