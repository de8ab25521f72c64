"""Run settings: defaults, pyproject parity, validation."""

import tomllib
from pathlib import Path

import pytest

from fedtower.config import DEFAULT_RUN_CONFIG, RunSettings
from fedtower.simulations.presets import list_presets, load_preset

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_every_default_exactly():
    # Prepare
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # Execute
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    # Assert: same keys, same values, same types (flwr passes these to the apps).
    assert declared == DEFAULT_RUN_CONFIG
    assert {k: type(v) for k, v in declared.items()} == {k: type(v) for k, v in DEFAULT_RUN_CONFIG.items()}


def test_pyproject_names_both_app_components():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedtower.server.server_app:app",
        "clientapp": "fedtower.client.client_app:app",
    }


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_is_a_valid_run_config(name):
    settings = RunSettings.from_run_config(load_preset(name))
    assert settings.num_server_rounds >= 1


def test_round_trip_and_int_for_float():
    # Execute: an int where a float is expected is accepted (TOML writes 1 for 1.0).
    settings = RunSettings.from_run_config({"fraction-train": 1, "num-server-rounds": 3})
    # Assert
    assert settings.fraction_train == 1.0 and isinstance(settings.fraction_train, float)
    assert RunSettings.from_run_config(settings.to_run_config()) == settings


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num-server-round": 3}, "Unknown run-config keys: 'num-server-round' \\(did you mean 'num-server-rounds'"),
        ({"num-server-rounds": 2.5}, "'num-server-rounds' must be a int"),
        ({"resume": 1}, "'resume' must be a bool"),
        ({"strategy": "fedprox"}, "strategy must be one of"),
        ({"fraction-train": 1.5}, "fraction-train must be between 0 and 1"),
        ({"taste-skew": 2.0}, "taste-skew must be between 0 and 1"),
        ({"partitioning": "random"}, "partitioning must be one of"),
        ({"eval-every": 0}, "eval-every must be at least 1"),
        ({"server-tau": 0.0}, "server-tau must be positive"),
        ({"server-beta-2": 1.0}, "server-beta-2 must be in \\[0, 1\\)"),
        ({"reconstruction-lr": -0.1}, "reconstruction-lr must be 0 \\(use lr\\) or positive"),
    ],
)
def test_bad_settings_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        RunSettings.from_run_config(config)


def test_state_dirs_live_under_the_run_unless_a_root_is_given(tmp_path):
    settings = RunSettings(output_dir=str(tmp_path), run_name="r1")
    assert settings.run_dir == (tmp_path / "r1").resolve()
    assert settings.node_state_dir(3) == (tmp_path / "r1" / "clients" / "partition-00003").resolve()
    elsewhere = RunSettings(output_dir=str(tmp_path), run_name="r1", state_root=str(tmp_path / "s"))
    assert elsewhere.node_state_dir(0) == (tmp_path / "s" / "partition-00000").resolve()
