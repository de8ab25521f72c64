"""The server's run directory: config snapshot, metrics files, checkpoints and their safety."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from fedtower.server import run_dir as run_dir_module
from fedtower.server.run_dir import CheckpointError, RunDirectory


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds the non-standard JSON constant {constant}.")

    return json.loads(path.read_text(), parse_constant=refuse)


def _csv_rows(path):
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def _model_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((5, 3)).astype(np.float32)
    embedding[0, 0], embedding[0, 1] = np.nan, -0.0  # bit patterns a lossy format would change
    return {
        "item_tower.id_embedding.weight": embedding,
        "item_tower.mlp.0.weight": np.asfortranarray(rng.standard_normal((4, 2))),
        "item_tower.mlp.0.bias": np.array(1.5, dtype=np.float64),
        "item_tower.counts": np.arange(6, dtype=np.int64).reshape(2, 3),
        "empty": np.zeros((0, 4), dtype=np.float16),
    }


def _assert_bit_identical(loaded: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(loaded) == list(expected)
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        assert loaded[name].tobytes() == array.tobytes(), name


def _checkpoint_files(run: RunDirectory) -> list[str]:
    return sorted(path.name for path in run.checkpoint_dir.iterdir() if path.name.startswith("round-"))


# ---------------------------------------------------------------- config and summary


def test_config_snapshot_is_sorted_json_that_reads_back(tmp_path):
    # Prepare
    run = RunDirectory(tmp_path / "run")
    config = {"num-server-rounds": 5, "dp.noise-multiplier": 1.1, "dataset": "synthetic", "secagg": False}

    # Execute
    run.write_config(config)

    # Assert
    text = (tmp_path / "run" / "config.json").read_text()
    assert list(json.loads(text)) == sorted(config)
    assert run.read_config() == config


def test_config_that_is_not_json_is_refused(tmp_path):
    # Prepare
    run = RunDirectory(tmp_path)

    # Execute / Assert
    with pytest.raises(ValueError, match="cannot be written as JSON"):
        run.write_config({"when": object()})
    assert not (tmp_path / "config.json").exists()


def test_opening_a_missing_directory_without_create_fails(tmp_path):
    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RunDirectory(tmp_path / "absent", create=False)


def test_summary_and_plot_paths(tmp_path):
    # Prepare
    run = RunDirectory(tmp_path)

    # Execute
    run.write_summary("final ndcg@10 0.25")
    plot = run.plot_path("ranking")

    # Assert
    assert (tmp_path / "summary.txt").read_text() == "final ndcg@10 0.25\n"
    assert plot == tmp_path / "plots" / "ranking.png" and plot.parent.is_dir()
    with pytest.raises(ValueError, match="plain file name"):
        run.plot_path("../escape")


# ---------------------------------------------------------------- metrics


def test_metrics_are_written_to_json_and_csv(tmp_path):
    # Prepare
    run = RunDirectory(tmp_path)

    # Execute: rounds arrive out of order; rows end up in round, then phase, order
    run.record_round(2, "evaluate", {"ndcg@10": 0.3, "users": 40})
    run.record_round(1, "evaluate", {"ndcg@10": 0.25, "recall@10": 0.5})
    run.record_round(1, "train", {"loss": 1.25, "epsilon": 0.75})

    # Assert
    expected = [
        {"round": 1, "phase": "train", "loss": 1.25, "epsilon": 0.75},
        {"round": 1, "phase": "evaluate", "ndcg@10": 0.25, "recall@10": 0.5},
        {"round": 2, "phase": "evaluate", "ndcg@10": 0.3, "users": 40},
    ]
    assert run.history() == expected
    assert _strict_json(tmp_path / "metrics.json") == expected
    assert _csv_rows(tmp_path / "metrics.csv") == [
        ["round", "phase", "epsilon", "loss", "ndcg@10", "recall@10", "users"],
        ["1", "train", "0.75", "1.25", "", "", ""],
        ["1", "evaluate", "", "", "0.25", "0.5", ""],
        ["2", "evaluate", "", "", "0.3", "", "40"],
    ]


def test_recording_a_round_again_replaces_its_row(tmp_path):
    # Prepare
    run = RunDirectory(tmp_path)
    run.record_round(1, "evaluate", {"ndcg@10": 0.2})
    run.record_round(2, "evaluate", {"ndcg@10": 0.1, "stale": 7})

    # Execute: a resumed run re-does round 2
    run.record_round(2, "evaluate", {"ndcg@10": 0.4})

    # Assert
    assert run.history() == [
        {"round": 1, "phase": "evaluate", "ndcg@10": 0.2},
        {"round": 2, "phase": "evaluate", "ndcg@10": 0.4},
    ]
    assert _csv_rows(tmp_path / "metrics.csv") == [
        ["round", "phase", "ndcg@10"],
        ["1", "evaluate", "0.2"],
        ["2", "evaluate", "0.4"],
    ]


def test_non_finite_metrics_stay_strict_json_and_survive_a_reopen(tmp_path):
    # Prepare
    run = RunDirectory(tmp_path)
    run.record_round(0, "server", {"auc": math.nan, "epsilon": math.inf, "rounds_left": np.int64(3)})

    # Execute: a restarted server reopens the directory
    reopened = RunDirectory(tmp_path)

    # Assert
    assert _strict_json(tmp_path / "metrics.json")[0]["auc"] is None
    row = reopened.history()[0]
    assert math.isnan(row["auc"]) and row["epsilon"] == math.inf
    assert row["rounds_left"] == 3 and type(row["rounds_left"]) is int
    assert _csv_rows(tmp_path / "metrics.csv")[1] == ["0", "server", "nan", "inf", "3"]


@pytest.mark.parametrize(
    ("server_round", "phase", "metrics", "error", "message"),
    [
        (1, "fit", {"loss": 1.0}, ValueError, "Unknown phase"),
        (-1, "train", {"loss": 1.0}, ValueError, "non-negative integer"),
        (1, "train", {"recommended_rows": [1, 2]}, TypeError, "single int or float"),
        (1, "train", {"round": 3}, ValueError, "cannot be a metric name"),
    ],
)
def test_invalid_rounds_are_refused_and_nothing_is_written(
    tmp_path, server_round, phase, metrics, error, message
):
    # Prepare
    run = RunDirectory(tmp_path)

    # Execute / Assert
    with pytest.raises(error, match=message):
        run.record_round(server_round, phase, metrics)
    assert run.history() == [] and not (tmp_path / "metrics.json").exists()


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    # Prepare
    run = RunDirectory(tmp_path)
    arrays = _model_arrays()
    strategy_state = {
        "adam.m.item_tower.id_embedding.weight": np.full((5, 3), 0.125, dtype=np.float32),
        "learning_rate": 0.01,
        "step": np.int64(12),
        "name": "fedadam",
    }

    # Execute
    run.save_checkpoint(7, arrays, strategy_state, extra={"num_clients": 4, "item_index": "ab12"})
    checkpoint = run.load_latest_checkpoint()

    # Assert
    assert (tmp_path / "checkpoints" / "round-0007.npz").exists()
    assert checkpoint.round == 7
    _assert_bit_identical(checkpoint.arrays, arrays)
    moment = checkpoint.strategy_state.pop("adam.m.item_tower.id_embedding.weight")
    assert moment.tobytes() == strategy_state["adam.m.item_tower.id_embedding.weight"].tobytes()
    assert checkpoint.strategy_state == {"learning_rate": 0.01, "step": 12, "name": "fedadam"}
    assert checkpoint.extra == {"num_clients": 4, "item_index": "ab12"}


def test_no_checkpoint_yet_loads_as_none(tmp_path):
    # Execute / Assert
    assert RunDirectory(tmp_path).load_latest_checkpoint() is None


def test_latest_points_at_the_newest_checkpoint(tmp_path):
    # Prepare
    run = RunDirectory(tmp_path)
    run.save_checkpoint(1, _model_arrays(seed=1), None, None)

    # Execute
    run.save_checkpoint(2, _model_arrays(seed=2), None, None)

    # Assert
    pointer = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert pointer == {"round": 2, "manifest": "round-0002.json"}
    _assert_bit_identical(run.load_latest_checkpoint().arrays, _model_arrays(seed=2))
    _assert_bit_identical(run.load_checkpoint(1).arrays, _model_arrays(seed=1))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    # Prepare
    run = RunDirectory(tmp_path, keep=3)

    # Execute
    for server_round in range(1, 6):
        run.save_checkpoint(server_round, _model_arrays(seed=server_round), None, None)

    # Assert
    assert _checkpoint_files(run) == [f"round-000{r}.{ext}" for r in (3, 4, 5) for ext in ("json", "npz")]
    assert run.load_latest_checkpoint().round == 5
    with pytest.raises(CheckpointError, match="round-0002.json does not exist"):
        run.load_checkpoint(2)


def test_restarting_from_an_earlier_round_drops_the_abandoned_later_checkpoints(tmp_path):
    # Prepare
    run = RunDirectory(tmp_path, keep=2)
    for server_round in (1, 2, 3):
        run.save_checkpoint(server_round, _model_arrays(seed=server_round), None, None)

    # Execute: a fresh run re-does round 1 in the same directory
    run.save_checkpoint(1, _model_arrays(seed=10), None, None)

    # Assert
    assert _checkpoint_files(run) == ["round-0001.json", "round-0001.npz"]
    checkpoint = run.load_latest_checkpoint()
    assert checkpoint.round == 1
    _assert_bit_identical(checkpoint.arrays, _model_arrays(seed=10))


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_flip_one_byte, "round-0001.npz is corrupt"),
        (lambda path: path.write_bytes(path.read_bytes()[:100]), "round-0001.npz is corrupt"),
        (lambda path: path.unlink(), "round-0001.npz cannot be read"),
    ],
    ids=["flipped byte", "truncated", "missing"],
)
def test_a_damaged_npz_raises_a_checkpoint_error_naming_the_file(tmp_path, damage, message):
    # Prepare
    run = RunDirectory(tmp_path)
    run.save_checkpoint(1, _model_arrays(), None, None)
    damage(tmp_path / "checkpoints" / "round-0001.npz")

    # Execute / Assert
    with pytest.raises(CheckpointError, match=message):
        run.load_latest_checkpoint()


def test_a_garbled_latest_pointer_raises_a_checkpoint_error(tmp_path):
    # Prepare
    run = RunDirectory(tmp_path)
    run.save_checkpoint(1, _model_arrays(), None, None)
    (tmp_path / "checkpoints" / "latest.json").write_text('{"round": 1, "manif')

    # Execute / Assert
    with pytest.raises(CheckpointError, match="latest.json is not readable JSON"):
        run.load_latest_checkpoint()


def test_a_crash_before_latest_is_updated_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    # Prepare
    run = RunDirectory(tmp_path, keep=2)
    run.save_checkpoint(1, _model_arrays(seed=1), None, None)
    run.save_checkpoint(2, _model_arrays(seed=2), {"step": 2}, None)
    real_write = run_dir_module.atomic_write_text

    def crash_on_latest(path, text):
        if path.name == "latest.json":
            raise OSError("disk went away")
        real_write(path, text)

    monkeypatch.setattr(run_dir_module, "atomic_write_text", crash_on_latest)

    # Execute
    with pytest.raises(OSError, match="disk went away"):
        run.save_checkpoint(3, _model_arrays(seed=3), {"step": 3}, None)

    # Assert: round 3's files exist, but round 2 is still the committed one and nothing was pruned
    assert (tmp_path / "checkpoints" / "round-0003.npz").exists()
    assert (tmp_path / "checkpoints" / "round-0001.npz").exists()
    checkpoint = RunDirectory(tmp_path).load_latest_checkpoint()
    assert checkpoint.round == 2 and checkpoint.strategy_state == {"step": 2}
    _assert_bit_identical(checkpoint.arrays, _model_arrays(seed=2))


def test_arrays_that_need_pickle_are_refused(tmp_path):
    # Prepare
    run = RunDirectory(tmp_path)

    # Execute / Assert
    with pytest.raises(TypeError, match="cannot be saved without pickle"):
        run.save_checkpoint(1, {"ids": np.array(["a", None], dtype=object)}, None, None)
    assert run.load_latest_checkpoint() is None
