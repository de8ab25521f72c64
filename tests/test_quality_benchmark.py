"""benchmarks/quality_federated.py: a preset is the start, flags and --run-config override it, and a toy
cross-device run's JSON holds the curve it reports."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def benchmark_module():
    spec = importlib.util.spec_from_file_location("quality_federated", ROOT / "benchmarks" / "quality_federated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_preset_is_the_start_and_flags_then_run_config_override_it():
    # Prepare
    module = benchmark_module()
    parser_args = ["--preset", "synthetic-cross-device", "--rounds", "7", "--run-config", "num-server-rounds=9 lr=0.5"]

    # Execute
    args = module.parse_args(parser_args)
    values = module.run_config_of(args)

    # Assert: the preset's partitioning stays; --run-config beats the flag, which beats the preset.
    assert values["partitioning"] == "users"
    assert values["num-server-rounds"] == 9 and values["lr"] == 0.5
    # Without a preset, the documented defaults.
    assert module.run_config_of(module.parse_args([]))["partitioning"] == "sites"


@pytest.mark.slow
@pytest.mark.simulation
def test_a_toy_cross_device_run_reports_its_curve(tmp_path):
    # Execute: 30 one-user clients, 4 rounds, evaluated every 2.
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality_federated.py"), "--data",
                           "synthetic:users=30,items=40,seed=1", "--clients", "users", "--rounds", "4",
                           "--eval-every", "2", "--local-epochs", "1", "--dim", "8", "--fraction", "0.5",
                           "--central-epochs", "2", "--out", str(tmp_path),
                           "--run-config", "strategy='fedadam' server-tau=1e-8 reconstruction-epochs=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    # Assert
    assert result["clients"] == "users" and result["strategy"] == "fedadam" and result["num_clients"] == 30
    assert sorted(result["curve"]) == ["2", "4"]
    assert result["curve"]["4"] == pytest.approx(result["ndcg@20"])
    assert result["ratio"] == pytest.approx(result["ndcg@20"] / result["central_ndcg@20"])


@pytest.mark.slow
@pytest.mark.simulation
@pytest.mark.parametrize("mode", ["server-side", "poisson"])
def test_the_client_dp_benchmark_spends_the_target_epsilon(tmp_path, mode):
    # Execute: 40 one-user clients, half of them a round (a fixed sample, or a Poisson one at rate 0.5),
    # 2 rounds, epsilon 8.
    preset = tmp_path / "toy.toml"
    preset.write_text('data = "synthetic:users=40,items=30,seed=1"\npartitioning = "users"\nfraction-train = 0.5\n'
                      'num-server-rounds = 2\nlocal-epochs = 1\ndim = 8\n')
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality_client_dp.py"), "--preset", str(preset),
                           "--epsilon", "8", "--mode", mode, "--out", str(tmp_path / "runs")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    # Assert: the accountant reports at most the target and within the calibration's tolerance of it; delta
    # is 1/(10 N). On a fixed sample the noise is twice the accounted multiplier (sensitivity 2 x clip); under
    # Poisson sampling it is the amplified calibration of fedtower's accountant.
    from fedtower.privacy.accounting import noise_multiplier_for
    from fedtower.strategies.client_dp import calibrated_noise_multiplier

    point = result["curve"][0]
    assert (result["clients"], result["sampled_per_round"], result["delta"]) == (40, 20, pytest.approx(1 / 400))
    assert 7.9 <= point["epsilon_spent"] <= 8.0
    if mode == "server-side":
        accounted = calibrated_noise_multiplier(target_epsilon=8.0, target_delta=1 / 400, rounds=2,
                                                population_size=40, num_sampled_clients=20)  # fmt: skip
        assert point["noise_multiplier"] == pytest.approx(2 * accounted)
    else:
        expected = noise_multiplier_for(target_epsilon=8.0, target_delta=1 / 400, sample_rate=0.5, steps=2)
        assert point["noise_multiplier"] == pytest.approx(expected)
    assert point["ratio"] == pytest.approx(point["ndcg@20"] / result["non_private"]["ndcg@20"])
    assert point["rounds_completed"] == 2
