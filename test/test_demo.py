"""`lmm-fusion demo`: the summary arithmetic, and a short real run (synth -> node + player over DDS)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lmm_fusion.tools.demo import format_summary, summarise
from lmm_fusion.tools.harness import loopback_env

T0 = 1000.0


def rec(stamp: float, **kw: Any) -> dict[str, Any]:
    return {"stamp": stamp, "recv": stamp - T0, **kw}


def test_summarise_matches_latest_ground_truth_by_stamp() -> None:
    outputs = {
        "scene": [rec(T0 + 0.05, valid=True, degraded=False, risk=0),
                  rec(T0 + 0.15, valid=True, degraded=True, risk=2),
                  rec(T0 + 0.25, valid=False, degraded=True, risk=0),
                  rec(T0 + 5.0, valid=True, degraded=False, risk=0)],  # no ground truth within tolerance
        "action": [rec(T0 + 0.05, action=0, safety_override=False),
                   rec(T0 + 0.15, action=3, safety_override=True),
                   rec(T0 + 0.25, action=3, safety_override=False)],
        "gt_scene": [rec(T0, risk=0), rec(T0 + 0.1, risk=1), rec(T0 + 0.2, risk=2)],
        "gt_action": [rec(T0, action=0), rec(T0 + 0.1, action=3), rec(T0 + 0.2, action=3)],
        "diagnostics": [rec(T0 + 0.1, status={"n: assessment": {"level": 0, "message": "", "values": {"total_ms": "5"}},
                                              "n: cycle": {"level": 0, "message": "", "values": {
                                                  "latency_p50_ms": "6", "latency_p99_ms": "9",
                                                  "deadline_misses": "0"}}})],
    }
    scenarios = {T0: "FREE_ROAD", T0 + 0.1: "FREE_ROAD", T0 + 0.2: "LEAD_VEHICLE"}
    s = summarise(outputs, scenarios)
    free, lead = s["per_scenario"]["FREE_ROAD"], s["per_scenario"]["LEAD_VEHICLE"]
    assert free["cycles"] == 2 and free["action_accuracy"] == 1.0 and free["risk_accuracy"] == 0.5
    assert lead["cycles"] == 1 and lead["action_accuracy"] == 1.0 and lead["risk_accuracy"] is None
    assert free["safety_overrides"] == 1
    assert s["overall"]["matched_cycles"] == 3
    assert s["assessments"] == 4 and s["valid"] == 3
    assert s["latency"]["pipeline_p50_ms"] == 5.0 and s["latency"]["cycle_p99_ms"] == 9.0
    assert s["rate_hz_sim"] == pytest.approx(3 / 4.95)
    text = format_summary(s)
    assert "FREE_ROAD" in text and "100.0%" in text


def probs(code: int) -> list[float]:
    p = [0.02] * 6
    p[code] = 0.9
    return p


def test_summary_shows_model_vs_published_the_unsafe_rate_and_the_families_below_target() -> None:
    """Four cycles: KEEP_LANE=0, FOLLOW=1, SLOW_DOWN=2, STOP=3; the model's own action is the arg-max of
    the published probabilities (the guard changes the action, not the probabilities)."""
    outputs = {
        "scene": [],
        "action": [rec(T0 + 0.05, action=0, action_probabilities=probs(0), safety_override=False),
                   rec(T0 + 0.15, action=3, action_probabilities=probs(0), safety_override=True),  # guard: stop
                   rec(T0 + 0.25, action=1, action_probabilities=probs(1), safety_override=False),  # both unsafe
                   rec(T0 + 0.35, action=3, action_probabilities=probs(1), safety_override=True)],  # over-cautious
        "gt_scene": [],
        "gt_action": [rec(T0, action=0), rec(T0 + 0.1, action=3), rec(T0 + 0.2, action=2), rec(T0 + 0.3, action=1)],
        "diagnostics": [],
    }
    scenarios = {T0: "FREE_ROAD", T0 + 0.1: "FREE_ROAD", T0 + 0.2: "LEAD_VEHICLE", T0 + 0.3: "LEAD_VEHICLE"}
    s = summarise(outputs, scenarios)
    o = s["overall"]
    assert o["action_accuracy"] == 0.5 and o["model_action_accuracy"] == 0.5
    assert o["action_unsafe_rate"] == 0.25 and o["model_action_unsafe_rate"] == 0.5
    assert o["action_over_cautious_rate"] == 0.25
    free, lead = s["per_scenario"]["FREE_ROAD"], s["per_scenario"]["LEAD_VEHICLE"]
    assert free["action_accuracy"] == 1.0 and free["model_action_accuracy"] == 0.5 and free["action_unsafe_rate"] == 0.0
    assert lead["action_accuracy"] == 0.0 and lead["action_unsafe_rate"] == 0.5
    assert s["below_target"] == {"LEAD_VEHICLE": 0.0}
    head = format_summary(s).splitlines()[:3]
    assert head[0].startswith("agreement with the expert: published 50.0%, model alone 50.0%")
    assert "unsafe (less cautious than the expert): published 25.0%, model alone 50.0%" in head[1]
    assert head[2].startswith("families below target: LEAD_VEHICLE 0.0%") and head[2].endswith("[FAIL]")
    # Records without probabilities (an older node): the model's column is left out, not guessed.
    for r in outputs["action"]:
        del r["action_probabilities"]
    assert summarise(outputs, scenarios)["overall"]["model_action_accuracy"] is None


@pytest.mark.dds
@pytest.mark.slow
def test_short_demo_run(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "lmm_fusion.cli", "demo", "--out", str(out), "--duration", "8",
                           "--backend", "torch", "--camera", "320x180", "--lidar-beams", "16"],
                          capture_output=True, text=True, timeout=400, env=loopback_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "achieved rate" in proc.stdout and "overall" in proc.stdout
    assert "agreement with the expert: published" in proc.stdout and "families below target" in proc.stdout
    for name in ("drive", "outputs.jsonl", "summary.json", "node.log", "player.log"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["assessments"] >= 30  # ~8 s at 10 Hz, generous for a busy machine
    assert 5.0 <= summary["rate_hz_sim"] <= 12.0
    assert summary["ground_truth"]["scene"] >= 40
    assert summary["overall"]["matched_cycles"] >= 30
    assert summary["per_scenario"]
    lines = (out / "outputs.jsonl").read_text().splitlines()
    topics = {json.loads(line)["topic"] for line in lines}
    assert {"scene", "action", "diagnostics", "gt_scene", "gt_action"} <= topics
