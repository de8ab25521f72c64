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


def test_a_users_mistake_is_one_line_and_exit_code_2(tmp_path, capsys):
    # Prepare
    from fedtower.cli import main

    # Execute: a missing folder, and a misspelt run-config key.
    missing = main(["data", "check", str(tmp_path / "nope")])
    missing_err = capsys.readouterr().err
    typo = main(["simulate", "--run-config", "num-sever-rounds=3"])
    typo_err = capsys.readouterr().err

    # Assert: one error line (plus the hint), no traceback; the typo gets the closest key.
    assert missing == 2 and typo == 2
    assert missing_err.splitlines()[0].startswith("Error: ") and "nope" in missing_err
    assert "Traceback" not in missing_err and len(missing_err.splitlines()) <= 2
    assert "did you mean 'num-server-rounds'" in typo_err and "Traceback" not in typo_err


def test_an_unexpected_failure_is_one_line_and_verbose_shows_its_traceback(tmp_path, monkeypatch, capsys):
    # Prepare: the dataset loader fails in a way no command handles itself.
    import pytest

    import fedtower.data.sources
    from fedtower.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("disk\nfull")

    monkeypatch.setattr(fedtower.data.sources, "resolve_dataset", broken)

    # Execute
    code = main(["data", "check", str(tmp_path)])
    err = capsys.readouterr().err

    # Assert: one line with the message joined, exit 2; with --verbose the exception itself escapes.
    assert code == 2 and err.splitlines()[0] == "Error: disk full" and "Traceback" not in err
    with pytest.raises(RuntimeError, match="disk"):
        main(["--verbose", "data", "check", str(tmp_path)])


def test_version_flag_and_unknown_command(capsys):
    from fedtower import __version__
    from fedtower.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == __version__
    assert main(["no-such-command"]) == 2
    assert "No such command" in capsys.readouterr().err


def test_the_public_catalogue_is_readable_and_the_events_stay_private(tmp_path):
    import os
    import stat

    runner.invoke(app, ["data", "synth", str(tmp_path), "--users", "20", "--items", "40"])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "catalogue.csv").stat().st_mode) == 0o644 & ~umask
    assert stat.S_IMODE((tmp_path / "events.csv").stat().st_mode) == 0o600


def test_check_takes_a_sites_event_file_against_the_runs_catalogue(tmp_path):
    # Prepare: a dataset folder, and a site's copy of its event log with one unknown item on line 3.
    runner.invoke(app, ["data", "synth", str(tmp_path / "data"), "--users", "20", "--items", "40"])
    lines = (tmp_path / "data" / "events.csv").read_text().splitlines()
    fields = lines[2].split(",")
    fields[1] = "no-such-item"
    lines[2] = ",".join(fields)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "events.csv").write_text("\n".join(lines) + "\n")

    # Execute
    beside = runner.invoke(app, ["data", "check", str(tmp_path / "data" / "events.csv")])
    against = runner.invoke(app, ["data", "check", str(tmp_path / "site" / "events.csv"),
                                  "--catalogue", str(tmp_path / "data")])  # fmt: skip
    alone = runner.invoke(app, ["data", "check", str(tmp_path / "site" / "events.csv")])

    # Assert: the file is checked, the bad row named by file and line; without a catalogue, one clear error.
    assert beside.exit_code == 0 and "skipped 0" in beside.output
    assert against.exit_code == 1 and "events.csv:3" in against.output and "skipped 1" in against.output
    assert alone.exit_code == 2 and "--catalogue" in alone.output


def test_train_central_takes_a_split_by_name_or_as_files(tmp_path):
    # Prepare: an NCF-layout toy split converted by `fedtower data ncf`, one bad line in it.
    (tmp_path / "t.train.rating").write_text("0\t1\t5\t978300760\n0\t2\t3\t978300761\n1\t2\t4\t978300762\n"
                                             "1\t3\t5\t978300763\nnot a line\n")  # fmt: skip
    (tmp_path / "t.test.negative").write_text("(0,3)\t4\t5\n(1,1)\t4\t5\n")
    converted = runner.invoke(app, ["data", "ncf", str(tmp_path / "t.train.rating"), str(tmp_path / "t.test.negative"),
                                    "--out", str(tmp_path / "split")])  # fmt: skip
    # Execute
    given = runner.invoke(app, ["train-central", "--train", str(tmp_path / "split" / "train.csv"), "--test",
                                str(tmp_path / "split" / "test.csv"), "--epochs", "1", "--dim", "8",
                                "--out", str(tmp_path / "given")])  # fmt: skip
    loo = runner.invoke(app, ["train-central", "--split", "leave-one-out", "--negatives", "20", "--epochs", "1",
                              "--dim", "8", "--data", "synthetic:users=40,items=60", "--out", str(tmp_path / "loo")])
    half = runner.invoke(app, ["train-central", "--train", str(tmp_path / "split" / "train.csv"), "--epochs", "1"])
    # Assert
    assert converted.exit_code == 1 and "t.train.rating:5" in converted.output
    assert given.exit_code == 0, given.output
    assert "Protocol: given" in given.output and "sampled-hr@10" in given.output
    assert loo.exit_code == 0, loo.output
    assert "NCF protocol" in loo.output and "40 held-out items" in loo.output
    assert half.exit_code == 2 and "give both or neither" in half.output
