"""The serving benchmarks run end to end at toy sizes and print the keys the issue asks for."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_serving_latency_reports_p50_p99_and_the_bare_baseline():
    result = run("serving_latency.py", "--items", "3000", "--repeats", "20", "--users", "20")
    assert {"p50_ms", "p99_ms", "recall@10", "exact_int8_p99_ms", "baseline_p99_ms", "best"} <= set(result)
    size = result["sizes"]["3000"]
    assert size["int8"]["recall@10"] >= 0.8 and size["fp32"]["recall@10"] == 1.0
    # Every index configuration is measured against exact fp32; the best one clears the recall floor.
    assert {"ivf-fp32-p8", "ivf-int8-p64"} <= set(size["index"])
    assert all(0 <= c["recall@10"] <= 1 and c["build_seconds"] > 0 for c in size["index"].values())
    assert result["recall@10"] >= 0.99
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert size["record"]["update_p50_ms"] > 0


def test_reranking_quality_on_toy_synthetic_data():
    result = run("reranking_quality.py", "--data", "synthetic:users=120,items=200,seed=5", "--epochs", "2",
                 "--dim", "16")  # fmt: skip
    assert result["plain_matches_evaluate"]
    assert set(result["reranking"]) >= {"plain", "mmr-0.3", "cap-3", "novelty-1"}
    assert set(result["cold_start"]) == {"1", "3", "5"}
    assert result["quantization"]["int8"]["size_ratio"] < 0.4  # dim 16: (16 + 4 + 4) / (64 + 4) bytes a row
