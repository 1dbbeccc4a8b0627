"""The search-cost benchmark (studies/scale/search_cost.py, figures in docs/benchmarks.md) keeps
running against the search it measures: its synthetic adapter and evaluator stand in for a model,
so a new demand of the search on either broke it unseen once (a plan checking the model type)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "studies" / "scale" / "search_cost.py"


def test_the_search_cost_benchmark_runs_a_small_search():
    run = subprocess.run([sys.executable, str(SCRIPT), "--one", "--groups", "64", "--trials", "12",
                          "--round-size", "5", "--seed", "0"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert row["groups"] == 64 and row["trials"] == 12
    # 12 trials: the baselines first, then rounds of 5 proposals
    assert row["rounds"] >= 1 and 0 < row["overhead_s_per_trial"] < 60 and 0 < row["peak_rss_gb"] < 4
