"""A split given as files: a train event log and a test file, as a published benchmark ships them.

The test file is an event log in the generic layout (user, item, and optionally behaviour, timestamp,
value) whose every valid row is one held-out positive, whatever its behaviour; a train file without a
behaviour column holds implicit positives of full weight. An optional `negatives`
column lists item ids that row is ranked against (sampled HR@K / NDCG@K, e.g. the NCF protocol's 99),
separated by spaces, commas, `|` or `;` (a Parquet list column works too). Both files are validated as
every loader validates: a bad row is skipped and reported with its file, line and field, never dropped
silently.

Without a catalogue (a bare published split has none) the catalogue is the item ids that occur in the
two files, negatives included: public research data only; a deployment always names its catalogue.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedtower.data.ids import id_problem
from fedtower.data.loaders import _event_tables, _validated_events
from fedtower.data.prepared import PreparedSplit, SampledCandidates, UserHistories
from fedtower.data.schema import Catalogue, Dataset
from fedtower.data.validation import OnError, RowCheck, RowOrigins, ValidationReport
from fedtower.data.weights import BehaviourWeights

NEGATIVES_COLUMN = "negatives"
_NEGATIVE_SEPARATORS = re.compile(r"[\s,|;\[\]]+")
# A file without a behaviour column holds implicit positives: each row counts with full weight (1.0, as a
# purchase or a counted rating does). A given test row is a positive whatever behaviour it records.
IMPLICIT_BEHAVIOUR = "purchase"


@dataclass
class GivenSplit:
    """Train events and held-out test rows (item rows in the catalogue), with their negatives if given."""

    catalogue: Catalogue
    train_events: pd.DataFrame  # canonical events
    test: pd.DataFrame  # user (str), item (int64 row), timestamp (int64), one row per held-out positive
    negatives: np.ndarray | None  # int64 [test rows, M] item rows, or None
    report: ValidationReport  # both files
    name: str
    notes: list[str] = field(default_factory=list)  # what a reader of the figures should know

    @property
    def dataset(self) -> Dataset:
        return Dataset(self.catalogue, self.train_events, name=self.name)

    def prepare(self, weights: BehaviourWeights | None = None) -> PreparedSplit:
        """Histories of the train file's users; the test rows of those users are their held-out items."""
        weights = weights or BehaviourWeights()
        interactions = weights.to_interactions(self.train_events, self.catalogue.index)
        users = sorted(interactions["user"].astype(str).unique())
        test = self.test.assign(weight=np.float32(1.0))
        sampled = None
        if self.negatives is not None:
            rows = pd.Index(users).get_indexer(self.test["user"])
            kept = rows >= 0
            source = f"given in the test file ({self.negatives.shape[1]} per held-out item)"
            sampled = SampledCandidates(rows[kept].astype(np.int64), self.test["item"].to_numpy(np.int64)[kept],
                                        self.negatives[kept], source)  # fmt: skip
        protocol = "given: train and test files" + (", with sampled negatives per test row" if sampled else "")
        return PreparedSplit(
            num_items=len(self.catalogue),
            train=UserHistories.from_interactions(interactions, users),
            test=UserHistories.from_interactions(test, users),
            sampled=sampled,
            protocol=protocol,
            kind="given",
        )


def load_given_split(
    train_path: str | Path,
    test_path: str | Path,
    *,
    catalogue: Catalogue | None = None,
    order: str = "timestamp",
    weights: BehaviourWeights | None = None,
    on_error: OnError = "skip",
) -> GivenSplit:
    """Load and validate a train file and a test file (each a .csv or .parquet file, or a folder of them).

    `order = "file"` orders each file's events by their place in it (train before test); a test file without a
    timestamp column is ordered so in any case (held-out rows need no times). Test rows of
    users with no train events, and negatives that are unknown, repeated or the row's own item, are
    reported and skipped; so is a row whose number of negatives differs from the other rows'.
    """
    train_tables, mapping = _event_tables(train_path, None, IMPLICIT_BEHAVIOUR, order)
    test_tables, test_mapping = _event_tables(test_path, None, IMPLICIT_BEHAVIOUR, order)
    # Held-out rows need no times: a test file without a timestamp column comes after the train events.
    test_order = order if all("timestamp" in table.frame.columns for table in test_tables) else "file"
    has_negatives = any(NEGATIVES_COLUMN in table.frame.columns for table in test_tables)
    if catalogue is None:
        catalogue = _catalogue_of_ids(train_tables + test_tables, has_negatives)
    train_events, train_report = _validated_events(train_tables, mapping, IMPLICIT_BEHAVIOUR, catalogue, on_error,
                                                   order=order)
    train_users = set(train_events["user"].astype(str))
    counted = (weights or BehaviourWeights()).to_interactions(train_events, catalogue.index)
    trained_on = set(zip(counted["user"].astype(str), counted["item"].tolist()))

    def test_checks(raw: pd.DataFrame, origins: RowOrigins) -> list[RowCheck]:
        user = raw["user"].astype(str).str.strip()
        checks = [RowCheck("user_not_in_train", "user", ~user.isin(train_users).to_numpy(),
                           lambda r: ["a test row of a user with no train events cannot be evaluated"] * len(r))]
        if has_negatives:
            checks += _negative_checks(raw, catalogue)
        return checks

    keep = (NEGATIVES_COLUMN,) if has_negatives else ()
    first = int(train_events["timestamp"].max()) + 1 if test_order == "file" and len(train_events) else 0
    test_events, test_report = _validated_events(
        test_tables, test_mapping, IMPLICIT_BEHAVIOUR, catalogue, on_error, order=test_order, first_position=first,
        extra_checks=test_checks, keep_columns=keep)  # fmt: skip
    items = catalogue.index.rows(test_events["item"])
    test = pd.DataFrame({"user": test_events["user"].astype(str).to_numpy(), "item": items,
                         "timestamp": test_events["timestamp"].to_numpy(np.int64)})  # fmt: skip
    negatives = None
    if has_negatives:
        lists = [_negative_ids(text) for text in test_events[NEGATIVES_COLUMN]]
        width = len(lists[0]) if lists else 0  # every kept row has as many (negative_count)
        negatives = np.array([catalogue.index.rows(ids) for ids in lists], dtype=np.int64).reshape(len(lists), width)
    notes = [] if len(test) else ["No valid test row is left: there is nothing to evaluate on."]
    overlap = sum((u, int(i)) in trained_on for u, i in zip(test["user"], test["item"]))
    if overlap:
        notes.append(f"{overlap:,} test rows name an item their user also has in train: full ranking leaves train "
                     "items out, so those rows count as misses there.")  # fmt: skip
    if negatives is not None:
        seen = sum((u, int(n)) in trained_on for u, row in zip(test["user"], negatives) for n in row)
        if seen:
            notes.append(f"{seen:,} given negatives are items their user has in train (kept: the file's protocol).")
    name = f"{Path(train_path).name} + {Path(test_path).name}"
    return GivenSplit(catalogue, train_events, test, negatives, merge_reports(train_report, test_report), name, notes)


def merge_reports(*reports: ValidationReport) -> ValidationReport:
    """One report over several loads (each keeps its own file names and lines)."""
    merged = ValidationReport(sources=[source for report in reports for source in report.sources])
    for report in reports:
        merged.rows_read += report.rows_read
        merged.rows_kept += report.rows_kept
        merged.issues.extend(report.issues)
        merged.issues_omitted += report.issues_omitted
        for reason, count in report.reason_counts.items():
            merged.reason_counts[reason] = merged.reason_counts.get(reason, 0) + count
    return merged


def _negative_ids(cell: object) -> list[str]:
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return []
    return [part for part in _NEGATIVE_SEPARATORS.split(str(cell)) if part]


def _negative_checks(raw: pd.DataFrame, catalogue: Catalogue) -> list[RowCheck]:
    """Rows whose negatives cannot be scored as given: unknown, repeated, the row's own item, or a count unlike
    the other rows' (every row of a sampled protocol is ranked against as many negatives)."""
    lists = [_negative_ids(cell) for cell in raw[NEGATIVES_COLUMN]]
    items = raw["item"].astype(str).str.strip().tolist()
    unknown = [next((n for n in ids if n not in catalogue.index), None) for ids in lists]
    repeated = [next((n for n, c in Counter(ids).items() if c > 1), None) for ids in lists]
    own = [item in set(ids) for item, ids in zip(items, lists)]
    counts = np.array([len(ids) for ids in lists])
    usual = Counter(counts[counts > 0].tolist()).most_common(1)
    expected = usual[0][0] if usual else 0
    return [
        RowCheck("unknown_negative", NEGATIVES_COLUMN, np.array([u is not None for u in unknown], dtype=bool),
                 lambda r: [f"item {unknown[i]!r} is not in the catalogue" for i in r]),
        RowCheck("repeated_negative", NEGATIVES_COLUMN, np.array([x is not None for x in repeated], dtype=bool),
                 lambda r: [f"item {repeated[i]!r} is listed more than once" for i in r]),
        RowCheck("negative_is_positive", NEGATIVES_COLUMN, np.array(own, dtype=bool),
                 lambda r: [f"the row's own item {items[i]!r} is among its negatives" for i in r]),
        RowCheck("negative_count", NEGATIVES_COLUMN, counts != expected,
                 lambda r: [f"{counts[i]} negatives, where the other rows have {expected}" for i in r]),
    ]  # fmt: skip


def _catalogue_of_ids(tables, has_negatives: bool) -> Catalogue:
    """A bare catalogue of every valid item id in the files (numeric ids in numeric order)."""
    ids: set[str] = set()
    for table in tables:
        if "item" in table.frame.columns:
            ids.update(table.frame["item"].dropna().astype(str).str.strip())
        if has_negatives and NEGATIVES_COLUMN in table.frame.columns:
            for cell in table.frame[NEGATIVES_COLUMN]:
                ids.update(_negative_ids(cell))
    ids = {item for item in ids if item and item != "nan" and id_problem(item, "item") is None}
    ordered = sorted(ids, key=lambda item: (0, int(item), item) if item.isdigit() else (1, 0, item))
    return Catalogue(pd.DataFrame({"item": ordered, "title": ordered, "categories": [()] * len(ordered),
                                   "price": np.nan, "brand": ""}))  # fmt: skip
