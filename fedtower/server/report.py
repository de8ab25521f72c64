"""The run report: plots of metrics per round, and fixed-width summary tables.

`history` everywhere is a list of rows {round, phase, **metrics}, as
RunDirectory.history() returns. Plots are drawn on matplotlib's Agg canvas
(no display, no pyplot global state) and written atomically.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtower.data.schema import atomic_write_bytes
from fedtower.tables import render_table

_RESERVED_COLUMNS = ("round", "phase")
_ABSENT = "-"


@dataclass(frozen=True)
class MetricGroup:
    """Metrics drawn on one figure, written to <name>.png."""

    name: str
    title: str
    y_label: str
    pattern: re.Pattern[str]

    def matches(self, metric: str) -> bool:
        return self.pattern.search(metric) is not None


# Grouped by scale, so that no metric flattens another on a shared y axis.
METRIC_GROUPS: tuple[MetricGroup, ...] = (
    MetricGroup(
        "ranking",
        "Ranking quality",
        "score (higher is better)",
        re.compile(r"^(ndcg|recall|precision|hr|map)@\d+$|^(mrr|auc)$"),
    ),
    MetricGroup(
        "catalogue",
        "Catalogue coverage and diversity",
        "fraction / mean distance",
        re.compile(r"^(coverage|diversity)@\d+$"),
    ),
    MetricGroup("novelty", "Novelty", "mean self-information (bits)", re.compile(r"^novelty@\d+$")),
    MetricGroup("loss", "Loss", "loss", re.compile(r"loss")),
    MetricGroup("epsilon", "Privacy spent", "ε (cumulative)", re.compile(r"^epsilon")),
)

# Which direction is "best" for the summary; metrics matching neither (ε, counts) get no best round.
_HIGHER_IS_BETTER = re.compile(
    r"^(sampled-)?(ndcg|recall|precision|hr|map|coverage|diversity|novelty)@\d+$|^(mrr|auc|accuracy)$"
)
_LOWER_IS_BETTER = re.compile(r"loss")


# ---------------------------------------------------------------- plots


def plot_metrics(
    history: Sequence[dict[str, Any]], out_dir: str | Path, *, phases: Iterable[str] = ("evaluate",),
    references: dict[str, dict[str, float]] | None = None,
) -> list[Path]:
    """One PNG per metric group (METRIC_GROUPS) that has data in the given phases.

    Metrics that are absent or NaN in every round are skipped, and so is a group
    left with nothing to draw. `references` ({"popularity": {"ndcg@20": ...}})
    are drawn as dashed horizontal lines next to the metrics they name.
    Returns the paths written, in METRIC_GROUPS order.
    """
    phases = (phases,) if isinstance(phases, str) else tuple(phases)
    out_dir = Path(out_dir)
    written: list[Path] = []
    for group in METRIC_GROUPS:
        lines = []
        for phase in phases:
            rows = _rows_of_phase(history, phase)
            for name in _metric_names(rows):
                if not group.matches(name):
                    continue
                rounds, values = _series(rows, name)
                if np.isfinite(values).any():
                    label = name if len(phases) == 1 else f"{name} ({phase})"
                    lines.append((label, rounds, values))
                    for reference, metrics in (references or {}).items():
                        if phase == "evaluate" and np.isfinite(metrics.get(name, math.nan)):
                            flat = np.full(len(rounds), metrics[name])
                            lines.append((f"{name} ({reference}, same split)", rounds, flat, True))
        if lines:
            title = f"{group.title} per round" + (f" ({phases[0]})" if len(phases) == 1 else "")
            path = out_dir / f"{group.name}.png"
            atomic_write_bytes(path, _render_png(title, group.y_label, lines))
            written.append(path)
    return written


def plot_privacy_curve(
    curve: Sequence[dict[str, Any]], path: str | Path, *, metrics: Sequence[str] = ("ndcg@20", "recall@20"),
    references: dict[str, dict[str, float]] | None = None,
) -> Path:
    """Quality against the ε actually spent, one line per metric, with dashed references
    ({"popularity": {"ndcg@20": ...}, "non-private": {...}}) across the whole ε range.

    `curve` rows hold "epsilon_spent" and the metrics (quality_dp.py's JSON "curve").
    """
    if not curve:
        raise ValueError("The privacy curve needs at least one point; the curve given is empty.")
    rows = sorted(curve, key=lambda row: row["epsilon_spent"])
    epsilons = np.array([row["epsilon_spent"] for row in rows], dtype=float)
    lines = []
    for name in metrics:
        values = np.array([row.get(name, math.nan) for row in rows], dtype=float)
        if not np.isfinite(values).any():
            continue
        lines.append((f"{name} (DP)", epsilons, values))
        for reference, reference_metrics in (references or {}).items():
            if np.isfinite(reference_metrics.get(name, math.nan)):
                lines.append((f"{name} ({reference})", epsilons, np.full(len(rows), reference_metrics[name]), True))
    path = Path(path)
    png = _render_png("Quality against privacy spent", "score (higher is better)", lines, x_label="ε spent",
                      integer_x=False)  # fmt: skip
    atomic_write_bytes(path, png)
    return path


def _render_png(
    title: str, y_label: str, lines: list[tuple], *, x_label: str = "server round", integer_x: bool = True
) -> bytes:
    """Lines are (label, rounds, values) or (label, rounds, values, True) for a dashed reference."""
    # matplotlib is imported here, not at module load: every ClientApp process imports this module.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, rounds, values, *reference in lines:
        if reference and reference[0]:
            axes.plot(rounds, values, linestyle="--", linewidth=1.2, label=label)
        else:
            axes.plot(rounds, values, marker="o", markersize=3, label=label)  # NaN leaves a gap
    axes.set_title(title)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    if integer_x:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# ---------------------------------------------------------------- tables


def summary_table(
    history: Sequence[dict[str, Any]], *, keys: Sequence[str] | None = None, phase: str = "evaluate"
) -> str:
    """The last round of `phase` and, per metric, its best value and the round it was reached.

    Keys default to every metric of that phase, sorted. Higher is best for
    ranking and beyond-accuracy metrics, lower for losses; other metrics (ε,
    counts) show no best. NaN rounds are ignored; ties go to the earliest round.
    """
    rows = _rows_of_phase(history, phase)
    if not rows:
        return f"No {phase} rounds were recorded, so there is nothing to summarise."
    names = list(keys) if keys is not None else _metric_names(rows)
    last = rows[-1]
    table_rows = []
    for name in names:
        best_value, best_round = _best_round(rows, name)
        best_round_text = _ABSENT if best_round is None else str(best_round)
        table_rows.append([name, _format_value(last.get(name)), _format_value(best_value), best_round_text])
    title = f"{phase.capitalize()} metrics at the last round ({last['round']}) and the best round of each"
    return render_table(["metric", f"round {last['round']}", "best", "best round"], table_rows, title)


def reference_table(history: Sequence[dict[str, Any]], references: dict[str, dict[str, float]],
                    keys: Sequence[str]) -> str:
    """The model's last evaluation next to each reference on the same split, as a ratio; says so loudly when
    the model is below a reference on the first key."""
    rows = _rows_of_phase(history, "evaluate")
    if not rows or not references:
        return ""
    last = rows[-1]
    headers = ["metric", "model"] + [f"{name}" for name in references] + [f"model / {name}" for name in references]
    table_rows = []
    for key in keys:
        model = _as_float(last.get(key))
        values = [_as_float(metrics.get(key)) for metrics in references.values()]
        ratios = [model / v if v > 0 and math.isfinite(model) else math.nan for v in values]
        table_rows.append([key, _format_value(model)] + [_format_value(v) for v in values]
                          + [_format_value(r) if math.isfinite(r) else _ABSENT for r in ratios])  # fmt: skip
    text = render_table(headers, table_rows, f"The model (round {last['round']}) against references on the same split")
    first = keys[0]
    for name, metrics in references.items():
        if _as_float(last.get(first)) < _as_float(metrics.get(first)):
            text += (f"\nWARNING: the model's {first} is below {name} on the same split: it recommends worse than "
                     f"a non-personal {name} list. Under DP, see README 'DP quality' for the presets and the "
                     "spectral item tower.")  # fmt: skip
    return text


def rounds_table(history: Sequence[dict[str, Any]], keys: Sequence[str], *, phase: str = "evaluate") -> str:
    """One line per round of `phase`, one column per key. NaN prints n/a, absent -."""
    rows = _rows_of_phase(history, phase)
    if not rows:
        return f"No {phase} rounds were recorded, so there is nothing to list."
    body = [[str(row["round"]), *(_format_value(row.get(name)) for name in keys)] for row in rows]
    return render_table(["round", *keys], body, f"{phase.capitalize()} metrics per round")


def _format_value(value: Any) -> str:
    if value is None:
        return _ABSENT
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "n/a"
    return f"{value:.4f}" if math.isfinite(value) else ("inf" if value > 0 else "-inf")


# ---------------------------------------------------------------- history access


def _rows_of_phase(history: Sequence[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    """Rows of one phase in round order; a later row for the same round replaces an earlier one."""
    by_round = {row["round"]: row for row in history if row.get("phase") == phase}
    return [by_round[server_round] for server_round in sorted(by_round)]


def _metric_names(rows: Iterable[dict[str, Any]]) -> list[str]:
    return sorted({name for row in rows for name in row} - set(_RESERVED_COLUMNS))


def _as_float(value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return math.nan
    return float(value)


def _series(rows: list[dict[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
    present = [row for row in rows if name in row]
    rounds = np.array([row["round"] for row in present], dtype=np.int64)
    values = np.array([_as_float(row[name]) for row in present], dtype=np.float64)
    return rounds, values


def _best_round(rows: list[dict[str, Any]], name: str) -> tuple[float | None, int | None]:
    """(best value, its earliest round); (None, None) for a metric without a direction,
    (NaN, None) for one that never had a finite value."""
    if _HIGHER_IS_BETTER.search(name):
        sign = 1.0
    elif _LOWER_IS_BETTER.search(name):
        sign = -1.0
    else:
        return None, None
    rounds, values = _series(rows, name)
    finite = np.isfinite(values)
    if not finite.any():
        return math.nan, None
    best_index = int(np.argmax(np.where(finite, sign * values, -np.inf)))  # argmax takes the first tie
    return float(values[best_index]), int(rounds[best_index])
