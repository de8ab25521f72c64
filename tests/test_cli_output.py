"""What a user sees from `fedtower simulate`: a screenful (a line per round, the summary), Flower's
detail in the run directory's flower.log, and all of it on the console with --verbose."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.simulation

ROOT = Path(__file__).resolve().parents[1]
TINY = "num-server-rounds=4 eval-every=2 local-epochs=1 dim=8 num-sites=3 data='synthetic:users=60,items=80,seed=1'"


def simulate(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "fedtower", "simulate", "--out", str(out), "--run-config", TINY,
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip


def test_a_simulation_prints_a_line_per_round_and_keeps_flowers_detail_in_its_run_dir(tmp_path):
    # Execute
    done = simulate(tmp_path / "run")
    # Assert: every round has its progress line, Flower's round banners are only in flower.log.
    assert done.returncode == 0, done.stderr[-3000:]
    shown = done.stdout + done.stderr
    for round_ in range(1, 5):
        assert f"Round {round_}/4 trained" in shown
    assert "[ROUND" not in shown and "DEPRECATED" not in shown
    assert len(shown.splitlines()) < 45, shown
    assert "[ROUND 4/4]" in (tmp_path / "run" / "flower.log").read_text()


def test_verbose_shows_flowers_detail_on_the_console(tmp_path):
    done = simulate(tmp_path / "run", "--verbose")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[ROUND 4/4]" in done.stdout + done.stderr
