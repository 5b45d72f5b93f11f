"""tasks/phases.py: a process's phases add up to its total and reach the stage figures."""

from __future__ import annotations

import subprocess
import sys
import time

from tasks import layout, phases


def test_phases_add_up_to_the_total_with_what_no_phase_claimed_as_other():
    p = phases.Phases()
    p.add("startup", 0.1)
    p.add("import", 2.0)
    p.add("checks", 0.5)
    p.add("checks", 0.5)
    p.add("nvml", None)  # a phase that could not be measured is not invented
    with p.timed("compile"):
        time.sleep(0.05)
    rec = p.record(4.0)
    assert rec["startup"] == 0.1 and rec["import"] == 2.0 and rec["checks"] == 1.0 and "nvml" not in rec
    assert 0.05 <= rec["compile"] < 1.0
    assert abs(rec["other"] - (4.0 - 3.0 - rec["compile"])) < 0.002
    assert rec["total"] == 4.1  # the interpreter's start-up came before the total began counting
    line = p.line(rec)
    assert line.startswith("phases: interpreter start 0.10 s, imports (torch) 2.00 s, checks 1.00 s, compile check ")
    assert line.endswith("(total 4.1 s)")


def test_phases_become_flat_stage_figures():
    assert phases.figures({"import": 2.3456, "compile": 9.5, "total": 12.0, "bad": "x"}) == {
        "phase_import_s": 2.35,
        "phase_compile_s": 9.5,
        "phase_total_s": 12.0,
    }
    assert phases.figures(None) == {}


def test_process_age_is_the_seconds_since_the_process_started():
    code = "import time; time.sleep(0.6); from tasks import phases; print(phases.process_age_s())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(layout.ROOT)}, check=True
    )
    age = float(out.stdout)
    assert 0.5 <= age < 60
