"""The intervention benchmark runs every method the app offers (the moves with their source mask and correction)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_intervention.py"


def test_the_intervention_benchmark_times_every_method_beside_a_plain_generation(capsys):
    from ldm_scene.intervention import METHODS

    spec = importlib.util.spec_from_file_location("bench_intervention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    ratios = dict(re.findall(r"^\| (\S+) \| [0-9.]+ \| ([0-9.]+)x \|$", out, flags=re.M))
    assert set(ratios) == {"plain", *METHODS} and float(ratios["plain"]) == 1.0
    assert all(float(r) > 0 for r in ratios.values())
