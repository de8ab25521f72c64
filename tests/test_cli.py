"""The `fedtower` command line, run in-process through typer's runner."""

import json

from typer.testing import CliRunner

from fedtower.cli import app
from fedtower.data.sources import resolve_dataset, synthetic_config

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train-central", "data", "version"):
        assert command in result.output


def test_train_central_on_synthetic_beats_popularity(tmp_path):
    # Prepare: a small synthetic set so the run takes a few seconds.
    out = tmp_path / "run"
    # Execute
    result = runner.invoke(
        app,
        ["train-central", "--data", "synthetic:users=300,items=400,seed=3", "--epochs", "6",
         "--dim", "32", "--out", str(out)],
    )
    # Assert: progress per epoch, a summary table, results on disk.
    assert result.exit_code == 0, result.output
    assert "epoch   6/6" in result.output
    assert "popularity" in result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"]["ndcg@20"] > saved["popularity"]["ndcg@20"]
    assert (out / "model.pt").exists() and (out / "item_index.json").exists()


def test_synth_then_check_round_trips_with_features(tmp_path):
    # Prepare / Execute: write a synthetic dataset, then validate the folder.
    written = runner.invoke(app, ["data", "synth", str(tmp_path), "--users", "50", "--items", "80"])
    checked = runner.invoke(app, ["data", "check", str(tmp_path)])
    # Assert: nothing skipped, and the latent content features came back.
    assert written.exit_code == 0, written.output
    assert checked.exit_code == 0, checked.output
    assert "skipped 0" in checked.output
    dataset, _ = resolve_dataset(str(tmp_path))
    original, _ = resolve_dataset("synthetic:users=50,items=80")
    assert len(dataset.events) == len(original.events)
    assert dataset.catalogue.num_features >= original.catalogue.num_features


def test_check_reports_bad_rows_and_exits_1(tmp_path):
    # Prepare: a catalogue of two items and an event log with one unknown item on line 3.
    (tmp_path / "catalogue.csv").write_text("item,title,categories\na,A,x\nb,B,y\n")
    (tmp_path / "events.csv").write_text(
        "user,item,behaviour,timestamp,value\n"
        "u1,a,click,1700000000,\n"
        "u1,zzz,click,1700000001,\n"
        "u2,b,view,1700000002,\n"
    )
    # Execute
    result = runner.invoke(app, ["data", "check", str(tmp_path)])
    # Assert: the bad row is named by file, line and field, and counted.
    assert result.exit_code == 1
    assert "events.csv:3" in result.output and "'item'" in result.output
    assert "kept 2" in result.output and "skipped 1" in result.output


def test_missing_data_folder_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["train-central", "--data", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_synthetic_spec_parsing():
    config = synthetic_config("synthetic:users=12,items=34,seed=5")
    assert (config.num_users, config.num_items, config.seed) == (12, 34, 5)
    try:
        synthetic_config("synthetic:colour=red")
    except ValueError as err:
        assert "colour" in str(err)
    else:
        raise AssertionError("an unknown synthetic setting must be rejected")
