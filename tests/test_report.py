"""The run report: PNG plots per metric group and the fixed-width summary tables."""

from __future__ import annotations

import math

import matplotlib.image
import pytest

from fedtower.server.report import plot_metrics, plot_privacy_curve, rounds_table, summary_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

HISTORY = [
    {"round": 1, "phase": "train", "loss": 2.0, "epsilon": 0.5},
    {"round": 1, "phase": "evaluate", "ndcg@10": 0.10, "recall@10": 0.20, "loss": 1.5, "users": 30},
    {"round": 2, "phase": "train", "loss": 1.6, "epsilon": 0.8},
    {"round": 2, "phase": "evaluate", "ndcg@10": 0.30, "recall@10": math.nan, "loss": 1.2, "users": 30},
    {"round": 3, "phase": "train", "loss": 1.4, "epsilon": 1.1},
    {"round": 3, "phase": "evaluate", "ndcg@10": 0.25, "recall@10": 0.15, "loss": 1.3, "users": 28},
]


def _assert_png(path, *, width=700, height=450):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"
    assert matplotlib.image.imread(path).shape[:2] == (height, width)


# ---------------------------------------------------------------- plots


def test_every_metric_group_with_data_gets_a_valid_png(tmp_path):
    # Execute
    written = plot_metrics(HISTORY, tmp_path / "plots", phases=("train", "evaluate"))

    # Assert
    assert [path.name for path in written] == ["ranking.png", "loss.png", "epsilon.png"]
    for path in written:
        _assert_png(path)
    assert not list((tmp_path / "plots").glob("*.tmp"))  # atomic writes leave no temporaries


def test_the_default_plots_only_evaluated_metrics(tmp_path):
    # Execute
    written = plot_metrics(HISTORY, tmp_path)

    # Assert: epsilon is only reported by the train phase
    assert sorted(path.name for path in written) == ["loss.png", "ranking.png"]


def test_the_privacy_curve_is_a_png_against_epsilon_spent(tmp_path):
    # Prepare: points out of order, as a benchmark may list its targets
    curve = [{"epsilon_spent": 3.9, "ndcg@20": 0.12, "recall@20": 0.2},
             {"epsilon_spent": 0.98, "ndcg@20": 0.08, "recall@20": 0.15}]  # fmt: skip

    # Execute
    path = plot_privacy_curve(curve, tmp_path / "curve.png", references={"popularity": {"ndcg@20": 0.07}})

    # Assert
    _assert_png(path)
    assert not list(tmp_path.glob("*.tmp"))


def test_an_empty_privacy_curve_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one point"):
        plot_privacy_curve([], tmp_path / "curve.png")


def test_absent_and_all_nan_metrics_are_not_plotted(tmp_path):
    # Prepare
    history = [
        {"round": r, "phase": "evaluate", "coverage@10": math.nan, "loss": math.nan} for r in (1, 2, 3)
    ]

    # Execute
    written = plot_metrics(history, tmp_path)

    # Assert
    assert written == [] and list(tmp_path.iterdir()) == []


def test_a_metric_with_some_nan_rounds_is_still_plotted(tmp_path):
    # Prepare
    history = [
        {"round": 1, "phase": "evaluate", "coverage@10": math.nan},
        {"round": 2, "phase": "evaluate", "coverage@10": 0.4},
    ]

    # Execute
    written = plot_metrics(history, tmp_path)

    # Assert
    assert [path.name for path in written] == ["catalogue.png"]
    _assert_png(written[0])


# ---------------------------------------------------------------- tables


def test_summary_table_shows_the_last_round_and_each_metrics_best_round():
    # Execute
    table = summary_table(HISTORY)

    # Assert: by hand, ndcg peaks in round 2, recall (NaN in round 2) in round 1, loss lowest in round 2
    assert table == "\n".join(
        [
            "Evaluate metrics at the last round (3) and the best round of each",
            "metric     round 3    best  best round",
            "---------  -------  ------  ----------",
            "loss        1.3000  1.2000           2",
            "ndcg@10     0.2500  0.3000           2",
            "recall@10   0.1500  0.2000           1",
            "users           28       -           -",
        ]
    )


def test_summary_table_of_chosen_keys_handles_nan_and_absent_metrics():
    # Prepare
    history = [
        {"round": 1, "phase": "evaluate", "auc": math.nan, "ndcg@10": 0.5},
        {"round": 2, "phase": "evaluate", "auc": math.nan},
    ]

    # Execute
    table = summary_table(history, keys=["ndcg@10", "auc", "mrr"])

    # Assert: ndcg@10 is absent from the last round, auc was never finite, mrr never reported
    lines = table.splitlines()
    assert lines[3].split() == ["ndcg@10", "-", "0.5000", "1"]
    assert lines[4].split() == ["auc", "n/a", "n/a", "-"]
    assert lines[5].split() == ["mrr", "-", "n/a", "-"]


def test_summary_of_a_train_phase_uses_the_lowest_loss():
    # Execute
    table = summary_table(HISTORY, keys=["loss", "epsilon"], phase="train")

    # Assert
    assert table.splitlines()[3].split() == ["loss", "1.4000", "1.4000", "3"]
    assert table.splitlines()[4].split() == ["epsilon", "1.1000", "-", "-"]


def test_rounds_table_lists_each_round():
    # Execute
    table = rounds_table(HISTORY, ["ndcg@10", "recall@10", "mrr"])

    # Assert
    assert table == "\n".join(
        [
            "Evaluate metrics per round",
            "round  ndcg@10  recall@10  mrr",
            "-----  -------  ---------  ---",
            "1       0.1000     0.2000    -",
            "2       0.3000        n/a    -",
            "3       0.2500     0.1500    -",
        ]
    )


@pytest.mark.parametrize("make_table", [summary_table, lambda h: rounds_table(h, ["ndcg@10"])])
def test_tables_without_evaluated_rounds_say_so(make_table):
    # Execute
    text = make_table([{"round": 1, "phase": "train", "loss": 1.0}])

    # Assert
    assert text.startswith("No evaluate rounds were recorded")
