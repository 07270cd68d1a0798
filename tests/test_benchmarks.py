"""The benchmarks run: the intervention benchmark over every method the app offers (the moves with their source
mask and correction), and the fitting and readout benchmarks in their smoke settings."""
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


def test_the_fitting_and_readout_benchmarks_run_their_smoke_settings():
    """Their imports follow the package (a moved function broke bench_fitting once, unnoticed)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    root = BENCH.parents[1]
    fitting = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_fitting.py"), "--quick"],
                             capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert fitting.returncode == 0, fitting.stderr[-2000:]
    assert re.search(r"fitting cost / generation at 4N: .* \(goal <= 0.2\)", fitting.stdout)
    readout = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_readout.py"), "--no-sd", "--quick",
                              "--threads", "1", "--repeats", "1"], capture_output=True, text=True, env=env, cwd=root,
                             timeout=600)
    assert readout.returncode == 0, readout.stderr[-2000:]
    assert re.search(r"^\| \S+ \(CPU, 15 steps\) \|", readout.stdout, flags=re.M)
