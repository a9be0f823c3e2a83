"""Fleet replay: every bag of a fleet through :func:`~lmm_fusion.offline.replay.replay`, one Ray task per bag.

``lmm-fusion replay BAG... --out DIR --ray [ADDRESS]`` replays each bag on its own (a task runs
:func:`replay_bag`: the same :func:`~lmm_fusion.offline.replay.replay` as a local run, into ``DIR/<bag name>/``)
and writes two reports over the fleet:

* ``DIR/fleet.json``: per bag and pooled over the bags that replayed to their end, the accuracy table of
  :mod:`lmm_fusion.groundtruth.scoring` (pooled from the per-cycle samples, so it equals scoring the
  concatenated cycles of the bags replayed one by one), the *unsafe rate* (cycles whose published action is
  less cautious than the expert's, on the :data:`~lmm_fusion.groundtruth.scoring.CAUTION` scale: keep or change
  lane < follow < slow down < stop) and the over-cautious rate, the risk under-estimation rate, per-cycle latency
  percentiles [ms] (pooled from every cycle), throughput (× real time per bag, and bag seconds per wall
  second over the fleet), the tasks' timing, and the bags that failed with their error;
* ``DIR/fleet.md``: the same as tables.

One bad bag never sinks the run: a replay that raises is caught inside its task and reported with its error
(and its partial ``metrics.json``). A task whose worker process dies (killed, out of memory, node lost) is
run again by Ray up to ``max_retries`` times; when none succeeds the bag is reported failed with Ray's error.

``ADDRESS`` is anything :func:`ray.init` takes: ``auto`` (the cluster this machine joined with ``ray start``),
``ray://HOST:10001`` (Ray Client, e.g. a KubeRay head service) or ``HOST:6379``; without one, a Ray of
``--ray-cpus`` CPUs starts on this machine and stops at the end. Bag paths and ``DIR`` must be visible to
every worker under the same names (shared storage); with Ray Client (``ray://``) they are the cluster's
absolute paths, not checked here, and the reports are written here while the bags' folders are written on
the cluster; see ``docs/scale.md``. Ray is imported only here, inside
the functions that need it: the node and the core never load it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmm_fusion.cycle.assessment import Assessment
from lmm_fusion.cycle.pipeline import FusionPipeline
from lmm_fusion.cycle.sync import Snapshot
from lmm_fusion.groundtruth.messages import GroundTruth
from lmm_fusion.groundtruth.scoring import (
    RECORD_KEYS,
    Columns,
    columns_of,
    group_indices,
    sample_of,
    score_arrays,
)
from lmm_fusion.offline import replay as rp

log = logging.getLogger(__name__)

#: ``--ray`` without an address: a Ray started on this machine for the run.
LOCAL = "local"
FLEET_JSON = "fleet.json"
FLEET_MD = "fleet.md"


# ------------------------------------------------------------------------------------------ per cycle
@dataclass
class CycleTable:
    """Every cycle of one replayed bag, compactly (numpy columns travel cheaply between Ray processes).

    ``columns``: predictions (and labels, :data:`~lmm_fusion.groundtruth.scoring.NO_LABEL` / NaN where the cycle
    had none) of the ``M`` cycles; ``scored (M,)`` bool: the cycle had ground truth (replay scores exactly
    these); ``t (M,)`` bag time [s]; ``scenario``: family of each cycle (None without ground truth);
    ``latency_ms``: stage -> ``(M,)`` pipeline latency [ms] (``total`` at least)."""

    t: np.ndarray
    columns: Columns
    scored: np.ndarray
    scenario: list[str | None]
    latency_ms: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.t)

    @property
    def scored_columns(self) -> Columns:
        """The columns of the scored cycles, in cycle order (what replay's accuracy tables score)."""
        return self.columns.take(np.flatnonzero(self.scored))

    @property
    def scored_scenarios(self) -> list[str | None]:
        return [s for s, ok in zip(self.scenario, self.scored) if ok]


class CycleCollector:
    """The ``on_cycle`` hook of :class:`~lmm_fusion.offline.replay.ReplayOptions` that keeps each cycle's
    prediction, label and latency (:meth:`table` turns them into a :class:`CycleTable`)."""

    def __init__(self) -> None:
        self.samples: list[Any] = []
        self.scored: list[bool] = []
        self.latency: dict[str, list[float]] = {}

    def __call__(self, t: float, snapshot: Snapshot, a: Assessment, gt: GroundTruth | None,
                 pipeline: FusionPipeline) -> None:
        # A cycle without ground truth keeps its prediction with no label: the same Sample fields as scored ones.
        self.samples.append(sample_of(a, gt if gt is not None else GroundTruth(stamp=t), t=t))
        self.scored.append(gt is not None)
        for stage, ms in a.latency_ms.items():
            self.latency.setdefault(stage, []).append(ms)

    def table(self) -> CycleTable:
        return CycleTable(
            t=np.asarray([s.t for s in self.samples], np.float64),
            columns=columns_of(self.samples),
            scored=np.asarray(self.scored, bool),
            scenario=[s.scenario for s in self.samples],
            latency_ms={k: np.asarray(v, np.float64) for k, v in self.latency.items()},
        )


def concat_tables(tables: Sequence[CycleTable]) -> CycleTable:
    """The cycles of several bags as one table (in the given order)."""
    if not tables:
        return CycleCollector().table()

    def cat(arrays: list[np.ndarray | None]) -> np.ndarray:
        return np.concatenate([np.asarray(a) for a in arrays if a is not None])

    first = tables[0].columns
    columns = Columns(
        pred={k: cat([x.columns.pred[k] for x in tables]) for k in first.pred},
        true={k: cat([x.columns.true[k] for x in tables]) for k in first.true},
        occ_inter=cat([x.columns.occ_inter for x in tables]),
        occ_union=cat([x.columns.occ_union for x in tables]),
    )
    stages = sorted(set().union(*(x.latency_ms for x in tables)))
    return CycleTable(
        t=cat([x.t for x in tables]), columns=columns, scored=cat([x.scored for x in tables]).astype(bool),
        scenario=[s for x in tables for s in x.scenario],
        latency_ms={k: cat([x.latency_ms.get(k) for x in tables]) for k in stages},
    )


# ---------------------------------------------------------------------------------------- scoring
def _round(x: Any) -> Any:
    return round(x, 4) if isinstance(x, float) else x


def score_table(cols: Columns) -> dict[str, Any]:
    """Replay's accuracy table (keys :data:`~lmm_fusion.groundtruth.scoring.RECORD_KEYS`, 4 decimals: with the
    unsafe and over-cautious rates of the published and of the model's action) plus ``risk_under_rate``
    (risk level below the truth)."""
    table = score_arrays(cols)
    out = {k: _round(table[k]) for k in RECORD_KEYS}
    out["risk_under_rate"] = _round(table["risk_under_rate"])
    return out


def scenario_tables(cols: Columns, scenarios: Sequence[str | None]) -> dict[str, dict[str, Any]]:
    """:func:`score_table` per scenario family."""
    return {k: score_table(cols.take(idx)) for k, idx in group_indices(list(scenarios)).items()}


def percentiles(values: np.ndarray) -> dict[str, float | None]:
    """p50, p99 and mean of ``values`` [ms] (None for none), 3 decimals (as replay's metrics)."""
    v = np.asarray(values, np.float64)
    if not len(v):
        return {"p50": None, "p99": None, "mean": None}
    return {"p50": round(float(np.percentile(v, 50)), 3), "p99": round(float(np.percentile(v, 99)), 3),
            "mean": round(float(v.mean()), 3)}


# ------------------------------------------------------------------------------------------ per bag
@dataclass
class BagOutcome:
    """What one bag's task returns: its replay's ``metrics`` (also when it failed part way, if any were
    written), its cycles, or the error that stopped it; ``task``: where and when it ran (``pid``, ``host``,
    ``start`` / ``end`` [s, epoch], ``wall_s``)."""

    bag: str
    out: str
    ok: bool
    error: str | None = None
    metrics: dict[str, Any] | None = None
    cycles: CycleTable | None = None
    task: dict[str, Any] = field(default_factory=dict)


def _task_info(start: float) -> dict[str, Any]:
    end = time.time()
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": start, "end": end,
            "wall_s": round(end - start, 4)}


def replay_bag(bag: str, out: str, options: rp.ReplayOptions) -> BagOutcome:
    """Replay one bag into ``out`` and keep its cycles (the unit of work of a fleet task). Never raises for
    a bad bag: the error is returned in the outcome."""
    start = time.time()
    collector = CycleCollector()
    opts = replace(options, on_cycle=collector, progress=False)
    try:
        metrics = rp.replay(bag, out, opts)
    except Exception as exc:  # one bad bag must not sink the fleet: reported with its error instead
        partial = Path(out) / "metrics.json"  # written by this run (not left from an earlier one)?
        m = json.loads(partial.read_text()) if partial.is_file() and partial.stat().st_mtime >= start else None
        log.warning("fleet: %s failed: %s: %s", bag, type(exc).__name__, exc)
        return BagOutcome(bag, out, False, f"{type(exc).__name__}: {exc}", m, collector.table(), _task_info(start))
    return BagOutcome(bag, out, True, None, metrics, collector.table(), _task_info(start))


# --------------------------------------------------------------------------------------- executor
def is_client(address: str | None) -> bool:
    """True for a Ray Client address (``ray://...``): the driver runs here, the tasks on the cluster."""
    return address is not None and address.startswith("ray://")


def cluster_path(path: Path | str, address: str | None, must_exist: bool = True) -> Path:
    """``path`` as the tasks must see it: absolute (a worker's current folder is not the driver's), checked
    to exist here unless the tasks run beyond this machine's files (Ray Client), where it is taken as given
    and must be absolute."""
    p = Path(path)
    if is_client(address):
        if not p.is_absolute():
            raise ValueError(f"{str(p)!r}: with a ray:// address give absolute paths on the cluster's storage")
        return p
    if must_exist and not p.exists():
        raise FileNotFoundError(f"bag {str(p)!r} does not exist")
    return p.resolve()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ConnectionError naming ``address`` when its ``HOST:PORT`` takes no TCP connection within ``timeout_s``
    (Ray itself keeps retrying an unreachable head for minutes). ``auto`` is left to Ray."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"no Ray head answers at {address} ({exc})") from exc


@contextmanager
def ray_session(address: str | None = LOCAL, num_cpus: int | None = None) -> Iterator[Any]:
    """The ``ray`` module, connected: to ``address`` (see the module docstring), or to a Ray of ``num_cpus``
    CPUs started here for the block (``address`` None or :data:`LOCAL`). An already connected Ray is used as
    it is and left running."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    kw: dict[str, Any] = {"include_dashboard": False, "configure_logging": False}
    if address in (None, LOCAL):
        ray.init(num_cpus=num_cpus, **kw)
    else:
        check_reachable(address)
        ray.init(address=address, **kw)
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class TaskFailure:
    """A task that Ray could not complete (its worker died on every try, its node was lost, ...)."""

    error: str


def map_tasks(fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], *, ray_address: str | None,
              num_cpus: int | None = None, task_cpus: float = 1.0, max_retries: int = 2, progress: bool = False,
              desc: str = "tasks") -> tuple[list[Any], dict[str, Any]]:
    """``fn(*job)`` for every job, as Ray tasks (``ray_address`` not None) or one after another here; returns
    the results in job order (a :class:`TaskFailure` where Ray gave up) and the run's timing: ``wall_s``
    from the first submission to the last result, ``connect_s`` (starting or joining Ray), ``submit`` /
    ``done`` [s, epoch] per job, ``slots`` (tasks that can run at once)."""
    submit: list[float] = []
    done: list[float] = [math.nan] * len(jobs)
    results: list[Any] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), unit="task", desc=desc, disable=not progress, file=sys.stderr)
    t0 = time.perf_counter()
    connect = 0.0
    if ray_address is None:
        for i, job in enumerate(jobs):
            submit.append(time.time())
            results[i] = fn(*job)
            done[i] = time.time()
            bar.update(1)
        slots = 1
    else:
        with ray_session(ray_address, num_cpus) as ray:
            connect = time.perf_counter() - t0
            t0 = time.perf_counter()
            remote = ray.remote(num_cpus=task_cpus, max_retries=max_retries)(fn)
            refs = []
            for job in jobs:
                submit.append(time.time())
                refs.append(remote.remote(*job))
            index = {r: i for i, r in enumerate(refs)}
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for r in ready:
                    i = index[r]
                    try:
                        results[i] = ray.get(r)
                    except ray.exceptions.RayError as exc:  # the worker died on every try, the node was lost...
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                        results[i] = TaskFailure(f"{type(exc).__name__}: {first}")
                        log.warning("task %d failed: %s", i, results[i].error)
                    done[i] = time.time()
                    bar.update(1)
            wall = time.perf_counter() - t0
            slots = max(1, int(ray.cluster_resources().get("CPU", 1) // task_cpus))
    if ray_address is None:
        wall = time.perf_counter() - t0
    bar.close()
    return results, {"wall_s": wall, "connect_s": round(connect, 3), "submit": submit, "done": done,
                     "slots": min(slots, max(1, len(jobs)))}


def output_names(bags: Sequence[Path]) -> list[str]:
    """One output folder name per bag: its folder name, made unique with ``-2``, ``-3``... on a clash."""
    seen: dict[str, int] = {}
    names = []
    for b in bags:
        name = Path(b).name or "bag"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


# ----------------------------------------------------------------------------------------- report
def _bag_entry(o: BagOutcome) -> dict[str, Any]:
    m = o.metrics or {}
    entry: dict[str, Any] = {"bag": o.bag, "out": o.out, "ok": o.ok}
    if o.error is not None:
        entry["error"] = o.error
    entry["bag_duration_s"] = m.get("bag_duration_s")
    entry["cycles"] = len(o.cycles) if o.cycles is not None else 0
    entry["scored_cycles"] = int(o.cycles.scored.sum()) if o.cycles is not None else 0
    if o.cycles is not None and o.ok:
        entry["accuracy"] = score_table(o.cycles.scored_columns)
        entry["latency_ms"] = percentiles(o.cycles.latency_ms.get("total", np.zeros(0)))
    timing = m.get("timing") or {}
    entry["throughput_x_realtime"] = timing.get("throughput_x_realtime")
    entry["task"] = o.task
    return entry


def fleet_report(outcomes: Sequence[BagOutcome | TaskFailure], bags: Sequence[str], outs: Sequence[str],
                 timing: dict[str, Any], info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``fleet.json`` (see the module docstring) from the tasks' outcomes."""
    entries: list[dict[str, Any]] = []
    ok: list[BagOutcome] = []
    failed: list[dict[str, Any]] = []
    for i, o in enumerate(outcomes):
        if isinstance(o, TaskFailure):
            e = {"bag": bags[i], "out": outs[i], "ok": False, "error": o.error, "cycles": 0}
        else:
            e = _bag_entry(o)
            if o.ok:
                ok.append(o)
        e["queue_s"] = _queue_s(o, timing, i)
        entries.append(e)
        if not e["ok"]:
            failed.append({"bag": e["bag"], "error": e["error"], "cycles_before_error": e["cycles"]})
    pooled_cycles = concat_tables([o.cycles for o in ok if o.cycles is not None])
    scored = pooled_cycles.scored_columns
    bag_s = sum(float((o.metrics or {}).get("bag_duration_s") or 0.0) for o in ok)
    wall = float(timing["wall_s"])
    task_s = [float(o.task.get("wall_s", 0.0)) for o in outcomes if isinstance(o, BagOutcome)]
    slots = int(timing.get("slots", 1))
    pooled: dict[str, Any] = {
        "bags": len(outcomes), "bags_ok": len(ok), "bags_failed": len(failed),
        "cycles": len(pooled_cycles), "scored_cycles": len(scored), "bag_seconds": round(bag_s, 3),
        "accuracy": score_table(scored),
        "per_scenario": scenario_tables(scored, pooled_cycles.scored_scenarios),
        "latency_ms": {k: percentiles(v) for k, v in sorted(pooled_cycles.latency_ms.items())},
    }
    report = {
        "pooled": pooled,
        "throughput": {
            "wall_s": round(wall, 3),
            "connect_s": timing.get("connect_s"),
            "x_realtime": round(bag_s / wall, 3) if wall > 0 else None,
            "bags_per_min": round(60.0 * len(outcomes) / wall, 2) if wall > 0 else None,
            "cycles_per_s": round(len(pooled_cycles) / wall, 2) if wall > 0 else None,
            "slots": slots,
            "task_s": percentiles(np.asarray(task_s)) if task_s else None,
            # Slot time not spent inside a task: dispatch, result transfer, worker start, idle tail.
            "overhead_s_per_task": round(max(0.0, wall * slots - sum(task_s)) / max(len(task_s), 1), 4),
        },
        "failed": failed,
        "bags": entries,
    }
    if info:
        report["run"] = info
    return report


def _queue_s(o: BagOutcome | TaskFailure, timing: dict[str, Any], i: int) -> float | None:
    """Seconds from submitting the bag's task to its start on a worker (None when it never ran)."""
    if isinstance(o, TaskFailure) or "start" not in o.task:
        return None
    return round(float(o.task["start"]) - float(timing["submit"][i]), 4)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def fleet_markdown(report: dict[str, Any]) -> str:
    """``fleet.md``: the pooled table, per family, per bag, failures."""
    p, th = report["pooled"], report["throughput"]
    acc = p["accuracy"]
    lines = [
        "# Fleet replay", "",
        f"{p['bags_ok']} of {p['bags']} bags replayed ({p['bags_failed']} failed): {p['cycles']} cycles, "
        f"{p['scored_cycles']} with ground truth, {p['bag_seconds']:.1f} s of bag in {th['wall_s']:.1f} s "
        f"= {_num(th['x_realtime'], '{:.2f}')}× real time on {th['slots']} task slots "
        f"({_num(th['bags_per_min'], '{:.1f}')} bags/min, overhead {th['overhead_s_per_task']:.3f} s per task).",
        "",
        "## Pooled", "",
        "| action acc. | unsafe (action less cautious than expert) | over-cautious | risk acc. | risk under | "
        "light acc. | speed MAE [m/s] | occupancy IoU | latency p50 / p99 [ms] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lat = p["latency_ms"].get("total", {})
    lines.append(f"| {_pct(acc['action_accuracy'])} | {_pct(acc['action_unsafe_rate'])} | "
                 f"{_pct(acc['action_over_cautious_rate'])} | {_pct(acc['risk_accuracy'])} | "
                 f"{_pct(acc['risk_under_rate'])} | {_pct(acc['light_accuracy'])} | "
                 f"{_num(acc['target_speed_mae'], '{:.2f}')} | {_num(acc['occupancy_iou'], '{:.3f}')} | "
                 f"{_num(lat.get('p50'), '{:.1f}')} / {_num(lat.get('p99'), '{:.1f}')} |")
    lines += ["", "## Per scenario family", "", "| family | cycles | action acc. | unsafe | risk acc. | risk under |",
              "|---|---|---|---|---|---|"]
    for fam, t in p["per_scenario"].items():
        lines.append(f"| {fam} | {t['n']} | {_pct(t['action_accuracy'])} | {_pct(t['action_unsafe_rate'])} | "
                     f"{_pct(t['risk_accuracy'])} | {_pct(t['risk_under_rate'])} |")
    lines += ["", "## Per bag", "",
              "| bag | ok | cycles | action acc. | unsafe | risk acc. | latency p50 / p99 [ms] | × real time |",
              "|---|---|---|---|---|---|---|---|"]
    for e in report["bags"]:
        a = e.get("accuracy") or {}
        el = e.get("latency_ms") or {}
        lines.append(f"| {Path(e['bag']).name} | {'yes' if e['ok'] else 'no'} | {e['cycles']} | "
                     f"{_pct(a.get('action_accuracy'))} | {_pct(a.get('action_unsafe_rate'))} | "
                     f"{_pct(a.get('risk_accuracy'))} | {_num(el.get('p50'), '{:.1f}')} / "
                     f"{_num(el.get('p99'), '{:.1f}')} | {_num(e.get('throughput_x_realtime'), '{:.2f}')} |")
    if report["failed"]:
        lines += ["", "## Failed bags", ""]
        lines += [f"- `{f['bag']}` ({f['cycles_before_error']} cycles before the error): {f['error']}"
                  for f in report["failed"]]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """``out/fleet.json`` and ``out/fleet.md``."""
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / FLEET_JSON, out / FLEET_MD
    js.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    md.write_text(fleet_markdown(report))
    return js, md


# ------------------------------------------------------------------------------------------- fleet
def replay_fleet(bags: Sequence[Path | str], out: Path | str, options: rp.ReplayOptions | None = None, *,
                 ray_address: str | None = LOCAL, num_cpus: int | None = None, task_cpus: int = 1,
                 max_retries: int = 2, progress: bool = False,
                 unit: Callable[[str, str, rp.ReplayOptions], BagOutcome] = replay_bag,
                 ) -> tuple[dict[str, Any], list[BagOutcome | TaskFailure]]:
    """Replay every bag into ``out/<bag name>/`` (one task each, ``task_cpus`` backend threads per task) and
    write ``out/fleet.json`` + ``out/fleet.md``; returns the report and the outcomes. ``ray_address`` None
    replays here one after another (same outputs). ``unit`` is the per-bag work (default :func:`replay_bag`)."""
    if not bags:
        raise ValueError("bags: need at least one rosbag2 folder")
    paths = [cluster_path(b, ray_address) for b in bags]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = options or rp.ReplayOptions()
    model = None if base.model_dir is None else cluster_path(base.model_dir, ray_address, must_exist=False)
    opts = replace(base, model_dir=model, threads=base.threads or task_cpus, progress=False)
    outs = [str(cluster_path(out, ray_address, must_exist=False) / name) for name in output_names(paths)]
    jobs = [(str(b), o, opts) for b, o in zip(paths, outs)]
    results, timing = map_tasks(unit, jobs, ray_address=ray_address, num_cpus=num_cpus, task_cpus=task_cpus,
                                max_retries=max_retries, progress=progress, desc="fleet replay")
    info = {"ray": ray_address, "task_cpus": task_cpus, "max_retries": max_retries,
            "model": str(opts.model_dir) if opts.model_dir is not None else None, "backend": opts.backend}
    report = fleet_report(results, [j[0] for j in jobs], outs, timing, info)
    write_report(out, report)
    return report, results


# --------------------------------------------------------------------------------------------- CLI
def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``, ``--ray-cpus``, ``--task-cpus``, ``--max-retries`` (shared by replay and compare)."""
    p.add_argument("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                   help="one Ray task per bag: on a Ray started here (no ADDRESS), or on a cluster "
                        "(auto, ray://HOST:10001, HOST:6379); writes DIR/fleet.json and DIR/fleet.md. Give it "
                        "after the bags or as --ray=ADDRESS: a bag right after it would be read as the address")
    p.add_argument("--ray-cpus", type=int, default=None, metavar="N",
                   help="CPUs of the Ray started here (default: all of this machine's)")
    p.add_argument("--task-cpus", type=int, default=1, metavar="N",
                   help="CPUs (backend threads) per bag task (default 1)")
    p.add_argument("--max-retries", type=int, default=2, metavar="N",
                   help="runs of a task again after its worker died (default 2)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    rp.add_arguments(p)
    add_ray_arguments(p)


def checked_address(address: str | None) -> str | None:
    """``--ray``'s value; ValueError when it names a folder (a bag given right after ``--ray`` is taken as
    its address by argparse)."""
    if address not in (None, LOCAL) and Path(str(address)).exists():
        raise ValueError(f"--ray {address!r} is a path, not a Ray address: put --ray after the bags, "
                         f"or write --ray=ADDRESS")
    return address


def _summary(report: dict[str, Any], out: Path) -> str:
    p, th = report["pooled"], report["throughput"]
    acc = p["accuracy"]
    lines = [f"fleet: {p['bags_ok']}/{p['bags']} bags, {p['cycles']} cycles, {p['bag_seconds']:.1f} s of bag in "
             f"{th['wall_s']:.1f} s = {th['x_realtime']}x real time ({th['slots']} slots)",
             f"pooled: action {_pct(acc['action_accuracy'])}, unsafe {_pct(acc['action_unsafe_rate'])}, "
             f"risk {_pct(acc['risk_accuracy'])}; latency p50 {p['latency_ms'].get('total', {}).get('p50')} ms",
             f"reports: {out / FLEET_JSON}, {out / FLEET_MD}"]
    lines += [f"FAILED {f['bag']}: {f['error']}" for f in report["failed"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``lmm-fusion replay``: without ``--ray`` exactly the single-process replay; with it the fleet."""
    if args.ray is None:
        return rp.run(args)
    try:
        opts = rp.options_from_args(args, progress=False)
        report, _ = replay_fleet(args.bags, args.out, opts, ray_address=checked_address(args.ray),
                                 num_cpus=args.ray_cpus,
                                 task_cpus=args.task_cpus, max_retries=args.max_retries,
                                 progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        log.error("replay: %s", exc)
        return 2
    except ConnectionError as exc:  # no Ray at --ray ADDRESS (or it refused us: token, version)
        log.error("replay: cannot use the Ray at %s: %s", args.ray, exc)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_summary(report, args.out))
    return 1 if report["failed"] else 0


__all__ = [
    "LOCAL",
    "BagOutcome",
    "CycleCollector",
    "CycleTable",
    "TaskFailure",
    "add_arguments",
    "add_ray_arguments",
    "check_reachable",
    "checked_address",
    "cluster_path",
    "concat_tables",
    "fleet_report",
    "is_client",
    "map_tasks",
    "output_names",
    "percentiles",
    "ray_session",
    "replay_bag",
    "replay_fleet",
    "run",
    "scenario_tables",
    "score_table",
]
