"""scripts/bench.py runs each subcommand at tiny sizes and prints the JSON its users read (no timing asserted)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def bench(capsys, *argv: str) -> dict:
    module = runpy.run_path(str(BENCH), run_name="bench")
    module["main"](list(argv))
    return json.loads(capsys.readouterr().out)


@pytest.mark.golden
def test_coop_reports_every_setting_and_the_goals(capsys):
    result = bench(capsys, "coop", "--classes", "3", "--batch", "2", "--n-ctx", "2", "--steps", "1", "--warmup", "0")
    settings = {"lambda0", "lambda1_also_minimize", "lambda1_label_only"}
    assert set(result["ms_per_step"]) == settings and set(result["peak_memory_mib"]) == settings
    assert all(ms > 0 for ms in result["ms_per_step"].values())
    assert result["ratios"]["lambda1_also_minimize/lambda0"] == pytest.approx(
        result["ms_per_step"]["lambda1_also_minimize"] / result["ms_per_step"]["lambda0"], abs=0.01)
    assert set(result["goals"]) == {"lambda1_also_minimize <= 3x lambda0", "lambda1_label_only <= 1.5x lambda0"}


@pytest.mark.parametrize("task, extra", [("spatial", ["--override", "task.cutouts.n=2",
                                                     "--override", "task.phrases=[{text: a, box: [0, 0, 16, 16]}]"]),
                                         ("generate", ["--override", "task.cutouts.n=2"]), ("edit", [])])
def test_guidance_benchmarks_time_both_lambdas(capsys, task, extra):
    result = bench(capsys, task, "--steps", "1", "--repeats", "1", "--warmup", "0", "--lam", "0.5",
                   "--override", "model=toy_random", "--override", "generator.size=32", *extra)
    assert set(result["ms_per_step"]) == {"lambda0", "lambda0.5"}
    assert all(ms > 0 for ms in result["ms_per_step"].values())
    assert result["ratio"] == pytest.approx(result["ms_per_step"]["lambda0.5"] / result["ms_per_step"]["lambda0"],
                                            abs=0.01)
    assert "model=toy_random" in result["overrides"]
