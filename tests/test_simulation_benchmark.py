"""benchmarks/simulation_overhead.py at toy size: both loops run the rounds asked for, and the ratio is
the steady rounds' medians (after the warm-up rounds, before the evaluating last one)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.simulation
def test_the_overhead_ratio_is_over_the_steady_rounds_of_one_run():
    # Execute: 10 sites of a small synthetic dataset, 5 rounds (2 warm-up, 2 steady, 1 evaluating).
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "simulation_overhead.py"), "--data",
                           "synthetic:users=60,items=80,seed=3", "--rounds", "5", "--local-epochs", "1",
                           "--dim", "8", "--skip-users"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    # Assert
    sites = result["sites_10"]
    assert len(sites["plain_round_seconds"]) == len(sites["flower_round_seconds"]) == 5
    plain = statistics.median(sites["plain_round_seconds"][2:4])
    flower = statistics.median(sites["flower_round_seconds"][2:4])
    assert sites["overhead_ratio"] == pytest.approx(flower / plain)
    assert sites["overhead_ratio_with_warm_up"] > 0 and result["torch_threads"] >= 1
    # fedtower's share: the same rounds through its handlers in this process, less the plain loop.
    assert len(sites["in_process_round_seconds"]) == 5
    in_process = statistics.median(sites["in_process_round_seconds"][2:4])
    assert sites["fedtower_share_seconds_per_round"] == pytest.approx(in_process - plain)
    assert "users" not in result


def test_too_few_rounds_for_a_steady_one_are_refused():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "simulation_overhead.py"), "--rounds", "3",
                           "--skip-users"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0
    assert "--rounds must be at least 4" in done.stderr
