"""Validation of raw event rows, naming every problem by file, line and field.

Loaders read files as text and hand the rows here, so that a bad type becomes a
reported issue (`ratings.csv:17: field 'timestamp': not an integer ...`) rather
than a parse crash. Two modes: fail fast on the first bad row ("raise"), or
drop the bad rows and report them ("skip"). All checks are vectorised.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedtower.data.ids import MAX_ID_LENGTH, MOVIELENS_ID, id_problem
from fedtower.data.schema import BEHAVIOURS, EVENT_COLUMNS, ItemIndex

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")

REQUIRED_EVENT_COLUMNS: tuple[str, ...] = ("user", "item", "behaviour", "timestamp")
RATING_RANGE: tuple[float, float] = (0.5, 5.0)
# A timestamp more than a day ahead of the clock cannot be a recorded event.
FUTURE_TOLERANCE_S = 86_400
# The report keeps this many issues verbatim; its counts stay exact beyond it.
MAX_REPORTED_ISSUES = 10_000

_INTEGER_PATTERN = r"[+-]?\d+(?:\.0*)?"
_EPOCH = pd.Timestamp(0, tz="UTC")
_ALLOWED_BEHAVIOURS = ", ".join(BEHAVIOURS)


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    """One problem in one row (or, with line 0, in the file as a whole).

    `line` is the 1-based physical line in a text file, header included, so a
    user can open the file there; for Parquet files it is the 1-based row.
    """

    file: str
    line: int
    field: str
    message: str
    reason: str = "invalid"

    @property
    def unit(self) -> str:
        return "row" if self.file.lower().endswith(".parquet") else "line"

    def __str__(self) -> str:
        where = self.file
        if self.line > 0:
            where = (
                f"{self.file}: row {self.line}"
                if self.unit == "row"
                else f"{self.file}:{self.line}"
            )
        what = f"field '{self.field}': {self.message}" if self.field else self.message
        return f"{where}: {what}"

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            self.unit: self.line,
            "field": self.field,
            "reason": self.reason,
            "message": self.message,
        }


class DataValidationError(ValueError):
    """Input data is unusable; `issues` says where and why (file, line, field)."""

    def __init__(self, issues: ValidationIssue | list[ValidationIssue]):
        self.issues: list[ValidationIssue] = (
            [issues] if isinstance(issues, ValidationIssue) else list(issues)
        )
        if not self.issues:
            raise ValueError("DataValidationError needs at least one issue.")
        shown = "; ".join(str(issue) for issue in self.issues[:3])
        more = len(self.issues) - 3
        if more > 0:
            shown += f"; and {more} more issue{'s' if more > 1 else ''}"
        super().__init__(shown if shown.endswith((".", "?", "!")) else shown + ".")

    @property
    def issue(self) -> ValidationIssue:
        return self.issues[0]


@dataclass
class ValidationReport:
    """What validation read, kept and skipped, and why.

    `rows_skipped` counts each dropped row once, however many issues it has;
    `counts_by_reason()` counts issues. `issues` keeps at most
    MAX_REPORTED_ISSUES in line order; `issues_omitted` says how many more.
    """

    sources: list[str]
    rows_read: int = 0
    rows_kept: int = 0
    issues: list[ValidationIssue] = field(default_factory=list)
    issues_omitted: int = 0
    reason_counts: dict[str, int] = field(default_factory=dict)

    @property
    def rows_skipped(self) -> int:
        return self.rows_read - self.rows_kept

    def counts_by_reason(self) -> dict[str, int]:
        return dict(sorted(self.reason_counts.items()))

    def summary(self, max_issues: int = 10) -> str:
        names = ", ".join(self.sources) if self.sources else "(no files)"
        counts = f"kept {self.rows_kept:,}, skipped {self.rows_skipped:,}"
        lines = [f"Read {self.rows_read:,} rows from {names}: {counts}."]
        for reason, count in self.counts_by_reason().items():
            lines.append(f"  {reason}: {count:,}")
        if self.issues:
            lines.append("First issues:")
            lines.extend(f"  {issue}" for issue in self.issues[:max_issues])
            hidden = len(self.issues) + self.issues_omitted - min(max_issues, len(self.issues))
            if hidden > 0:
                lines.append(f"  ... and {hidden:,} more.")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "sources": list(self.sources),
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_skipped": self.rows_skipped,
            "counts_by_reason": self.counts_by_reason(),
            "issues": [issue.to_dict() for issue in self.issues],
            "issues_omitted": self.issues_omitted,
        }


@dataclass(frozen=True)
class RowOrigins:
    """Where each raw row came from: its file and its line (or Parquet row).

    `malformed` maps row positions to a structural problem found while reading
    (e.g. too many fields); such rows are placeholders and always skipped.
    """

    files: tuple[str, ...]
    file_codes: np.ndarray
    lines: np.ndarray
    malformed: Mapping[int, str] = field(default_factory=dict)

    @classmethod
    def consecutive(cls, source: str, n_rows: int, first_line: int) -> RowOrigins:
        return cls(
            files=(source,),
            file_codes=np.zeros(n_rows, dtype=np.int32),
            lines=np.arange(first_line, first_line + n_rows, dtype=np.int64),
        )

    @classmethod
    def concat(cls, parts: list[RowOrigins]) -> RowOrigins:
        files: list[str] = []
        codes, lines, malformed = [], [], {}
        offset = 0
        for part in parts:
            codes.append(part.file_codes + len(files))
            lines.append(part.lines)
            malformed.update({offset + row: text for row, text in part.malformed.items()})
            files.extend(part.files)
            offset += len(part.lines)
        return cls(
            files=tuple(files),
            file_codes=np.concatenate(codes) if codes else np.zeros(0, dtype=np.int32),
            lines=np.concatenate(lines) if lines else np.zeros(0, dtype=np.int64),
            malformed=malformed,
        )

    def where(self, row: int) -> tuple[str, int]:
        return self.files[int(self.file_codes[row])], int(self.lines[row])


def validate_events(
    raw: pd.DataFrame,
    *,
    source: str,
    first_line: int = 2,
    catalogue: ItemIndex | None = None,
    on_error: OnError = "raise",
    now: int | None = None,
) -> tuple[pd.DataFrame, ValidationReport]:
    """Check raw event rows (canonical column names, text values).

    Row i of `raw` is reported at line `first_line + i` of `source` (2 for a
    CSV file with a header). Returns the clean rows in canonical dtypes and a
    report; with on_error="raise" the first bad row raises DataValidationError.
    """
    origins = RowOrigins.consecutive(source, len(raw), first_line)
    header_line = first_line - 1 if first_line > 1 else 0
    return validate_located_events(
        raw, origins, catalogue=catalogue, on_error=on_error, now=now, header_line=header_line
    )


def validate_located_events(
    raw: pd.DataFrame,
    origins: RowOrigins,
    *,
    catalogue: ItemIndex | None = None,
    on_error: OnError = "raise",
    now: int | None = None,
    field_names: Mapping[str, str] | None = None,
    header_line: int = 1,
    movielens_ids: bool = False,
    extra_checks: Sequence[RowCheck] = (),
    keep_columns: Sequence[str] = (),
) -> tuple[pd.DataFrame, ValidationReport]:
    """validate_events for rows from several files or with gaps in line numbers.

    `field_names` maps canonical columns to the names used in the source files,
    so issues name the column the user sees. `movielens_ids`: ids must be MovieLens's positive integers.
    `extra_checks` are a caller's own row checks (e.g. a test file's negatives), reported like ours;
    `keep_columns` are raw columns carried into the clean frame, row for row.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, not {on_error!r}.")
    if len(origins.lines) != len(raw):
        raise ValueError(f"Got {len(raw)} rows but origins for {len(origins.lines)}.")
    names = dict(field_names or {})
    _require_columns(raw, origins, names, header_line)
    now = int(time.time()) if now is None else int(now)
    rows = _ParsedRows(raw.reset_index(drop=True))
    checks = _event_checks(rows, origins, catalogue, now, movielens_ids) + list(extra_checks)

    bad = np.zeros(len(raw), dtype=bool)
    for check in checks:
        bad |= check.mask
    if on_error == "raise" and bad.any():
        first_bad = int(np.argmax(bad))
        raise DataValidationError(_issues_at(checks, np.array([first_bad]), origins, names))

    report = ValidationReport(
        sources=list(origins.files),
        rows_read=len(raw),
        rows_kept=int((~bad).sum()),
        reason_counts=_reason_counts(checks),
    )
    report.issues, report.issues_omitted = _reported_issues(checks, origins, names)
    clean = rows.clean(~bad)
    for column in keep_columns:
        clean[column] = raw[column].to_numpy()[~bad]
    return clean, report


def _require_columns(
    raw: pd.DataFrame, origins: RowOrigins, names: Mapping[str, str], header_line: int
) -> None:
    missing = [column for column in REQUIRED_EVENT_COLUMNS if column not in raw.columns]
    if missing:
        source = origins.files[0] if origins.files else "events"
        raise DataValidationError(
            [
                ValidationIssue(
                    source,
                    header_line,
                    names.get(column, column),
                    f"required column is missing (expected one of {list(EVENT_COLUMNS)}; "
                    f"found {[str(c) for c in raw.columns]})",
                    "missing_column",
                )
                for column in missing
            ]
        )


def _as_text(column: pd.Series) -> pd.Series:
    """Stripped text with NaN for absent or empty values, whatever the input dtype."""
    text = column.astype("str").str.strip()
    return text.mask(text == "")


def _to_float(text: pd.Series) -> np.ndarray:
    """Numbers parsed from text, NaN where absent or not a number."""
    try:  # Arrow's cast is ~30x faster than to_numeric and fails on any bad value.
        return pc.cast(pa.array(text, from_pandas=True), pa.float64()).to_numpy(
            zero_copy_only=False
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return pd.to_numeric(text, errors="coerce").to_numpy(np.float64)


def _pick(text: pd.Series, rows: np.ndarray) -> list:
    return text.iloc[rows].tolist()


class _ParsedRows:
    """Raw event text plus the parsed timestamp and value of every row."""

    def __init__(self, raw: pd.DataFrame):
        n = len(raw)
        self.text = {c: _as_text(raw[c]) for c in EVENT_COLUMNS if c in raw.columns}
        if "value" not in self.text:
            self.text["value"] = pd.Series(np.nan, index=raw.index, dtype="str")
        self.absent = {c: t.isna().to_numpy() for c, t in self.text.items()}
        self.behaviour = self.text["behaviour"].str.lower()
        self.seconds = self._parse_timestamps(n)
        self.value = _to_float(self.text["value"])

    def _parse_timestamps(self, n: int) -> np.ndarray:
        text = self.text["timestamp"]
        present = ~self.absent["timestamp"]
        seconds = np.full(n, np.nan)
        integer_like = present & text.str.fullmatch(_INTEGER_PATTERN).fillna(False).to_numpy(bool)
        if integer_like.any():
            seconds[integer_like] = _to_float(text[integer_like])
        other = present & ~integer_like
        if other.any():
            parsed = pd.to_datetime(text[other], utc=True, errors="coerce", format="ISO8601")
            seconds[other] = ((parsed - _EPOCH) // pd.Timedelta(seconds=1)).to_numpy(np.float64)
        return seconds

    def clean(self, keep: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "user": self.text["user"][keep].astype("str"),
                "item": self.text["item"][keep].astype("str"),
                "behaviour": self.behaviour[keep].astype("str"),
                "timestamp": self.seconds[keep].astype(np.int64),
                "value": self.value[keep],
            }
        ).reset_index(drop=True)


@dataclass
class RowCheck:
    """One kind of bad row: `mask` marks them, `describe(rows)` says what is wrong with each."""

    reason: str
    field: str
    mask: np.ndarray
    describe: Callable[[np.ndarray], list[str]]


_Check = RowCheck


def _shown(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _event_checks(
    rows: _ParsedRows, origins: RowOrigins, catalogue: ItemIndex | None, now: int, movielens_ids: bool = False
) -> list[_Check]:
    n = len(rows.seconds)
    text = rows.text
    malformed = np.zeros(n, dtype=bool)
    malformed[list(origins.malformed)] = True
    usable = ~malformed
    checks = [_Check("malformed_row", "", malformed, lambda r: [origins.malformed[i] for i in r])]

    for column in REQUIRED_EVENT_COLUMNS:
        checks.append(
            _Check(
                "missing_value",
                column,
                usable & rows.absent[column],
                lambda r: ["missing value"] * len(r),
            )
        )

    has_ts = usable & ~rows.absent["timestamp"]
    unparsed = has_ts & np.isnan(rows.seconds)
    checks.append(
        _Check(
            "bad_timestamp",
            "timestamp",
            unparsed,
            lambda r: [
                f"not an integer or an ISO-8601 datetime ({_shown(v)})"
                for v in _pick(text["timestamp"], r)
            ],
        )
    )
    parsed = has_ts & ~unparsed
    with np.errstate(invalid="ignore"):
        impossible = parsed & ((rows.seconds < 0) | (rows.seconds > now + FUTURE_TOLERANCE_S))
    checks.append(
        _Check(
            "impossible_timestamp",
            "timestamp",
            impossible,
            lambda r: [_impossible_time_message(rows.seconds[i], now) for i in r],
        )
    )

    has_behaviour = usable & ~rows.absent["behaviour"]
    known = rows.behaviour.isin(BEHAVIOURS).to_numpy(bool)
    checks.append(
        _Check(
            "unknown_behaviour",
            "behaviour",
            has_behaviour & ~known,
            lambda r: [
                f"unknown behaviour {_shown(v)}; allowed: {_ALLOWED_BEHAVIOURS}"
                for v in _pick(text["behaviour"], r)
            ],
        )
    )
    checks.extend(_value_checks(rows, has_behaviour & known))
    for column in ("user", "item"):
        present = usable & ~rows.absent[column]
        problems = _id_problems(text[column], present, column, movielens=movielens_ids)
        checks.append(_Check("bad_id", column, problems.notna().to_numpy(bool),
                             lambda r, p=problems: [p.iloc[i] for i in r]))  # fmt: skip

    if catalogue is not None:
        unknown_item = (
            usable & ~rows.absent["item"] & ~text["item"].isin(catalogue.ids).to_numpy(bool)
        )
        checks.append(
            _Check(
                "unknown_item",
                "item",
                unknown_item,
                lambda r: [
                    f"item {_shown(v)} is not in the catalogue" for v in _pick(text["item"], r)
                ],
            )
        )

    # Duplicates are judged among otherwise valid rows: a later copy of a row
    # that was itself rejected is not a duplicate of anything kept.
    otherwise_valid = np.ones(n, dtype=bool)
    for check in checks:
        otherwise_valid &= ~check.mask
    checks.append(_duplicate_check(rows, origins, otherwise_valid))
    return checks


def _id_problems(values: pd.Series, present: np.ndarray, kind: str, *, movielens: bool) -> pd.Series:
    """Per row, why its id breaks fedtower.data.ids (None where it is fine or absent)."""
    suspect = present & (values.str.len() > MAX_ID_LENGTH).to_numpy(bool)
    if movielens:
        suspect |= present & ~values.str.fullmatch(MOVIELENS_ID.pattern).fillna(False).to_numpy(bool)
    problems = pd.Series([None] * len(values), dtype=object)
    for row in np.flatnonzero(suspect):
        problems.iloc[row] = id_problem(str(values.iloc[row]), kind, movielens=movielens)
    return problems


def _impossible_time_message(seconds: float, now: int) -> str:
    if seconds < 0:
        return f"impossible timestamp {int(seconds)} (before 1970)"
    hint = "; milliseconds instead of seconds?" if 0 <= seconds / 1000 <= now else ""
    return f"impossible timestamp {int(seconds)} (more than a day in the future{hint})"


def _value_checks(rows: _ParsedRows, known_behaviour: np.ndarray) -> list[_Check]:
    text = rows.text["value"]
    value = rows.value
    present = ~rows.absent["value"]
    nan_text = present & (text.str.lower() == "nan").to_numpy(bool)
    needs_value = known_behaviour & rows.behaviour.isin(["rating", "dwell"]).to_numpy(bool)

    # An explicit NaN means "no value", which is fine where none is needed.
    not_number = known_behaviour & present & np.isnan(value) & ~(nan_text & ~needs_value)
    infinite = known_behaviour & present & np.isinf(value)
    missing = needs_value & ~present
    usable = needs_value & np.isfinite(value)
    is_rating = (rows.behaviour == "rating").to_numpy(bool) & usable
    is_dwell = (rows.behaviour == "dwell").to_numpy(bool) & usable
    low, high = RATING_RANGE
    with np.errstate(invalid="ignore"):
        rating_out = is_rating & ((value < low) | (value > high))
        dwell_out = is_dwell & (value < 0)

    return [
        _Check(
            "bad_value",
            "value",
            not_number | infinite,
            lambda r: [f"not a finite number ({_shown(v)})" for v in _pick(text, r)],
        ),
        _Check(
            "missing_value",
            "value",
            missing,
            lambda r: [
                f"missing value (behaviour '{b}' needs one)" for b in _pick(rows.behaviour, r)
            ],
        ),
        _Check(
            "value_out_of_range",
            "value",
            rating_out | dwell_out,
            lambda r: [
                f"rating {value[i]:g} is outside {low:g}-{high:g}"
                if is_rating[i]
                else f"dwell {value[i]:g} is negative (seconds must be >= 0)"
                for i in r
            ],
        ),
    ]


def _duplicate_check(rows: _ParsedRows, origins: RowOrigins, candidates: np.ndarray) -> _Check:
    keys = ["user", "item", "behaviour", "timestamp"]
    frame = pd.DataFrame(
        {
            "user": rows.text["user"],
            "item": rows.text["item"],
            "behaviour": rows.behaviour,
            "timestamp": rows.seconds,
        }
    )[candidates]
    duplicate = np.zeros(len(candidates), dtype=bool)
    duplicate[frame.index[frame.duplicated(keep="first")].to_numpy()] = True
    first_row = np.full(len(candidates), -1, dtype=np.int64)
    if duplicate.any():
        involved = frame[frame.duplicated(keep=False)]
        positions = pd.Series(involved.index, index=involved.index)
        first = positions.groupby([involved[k] for k in keys], sort=False).transform("min")
        first_row[first.index.to_numpy()] = first.to_numpy()

    def describe(rows_: np.ndarray) -> list[str]:
        messages = []
        for i in rows_:
            file, line = origins.where(int(first_row[i]))
            where = f"line {line}" if file == origins.where(int(i))[0] else f"{file}:{line}"
            messages.append(
                f"duplicate of the event at {where} (same user, item, behaviour and timestamp)"
            )
        return messages

    return _Check("duplicate_event", "event", duplicate, describe)


def _reason_counts(checks: list[_Check]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for check in checks:
        hits = int(check.mask.sum())
        if hits:
            counts[check.reason] = counts.get(check.reason, 0) + hits
    return counts


def _issues_at(
    checks: list[_Check], rows: np.ndarray, origins: RowOrigins, names: Mapping[str, str]
) -> list[ValidationIssue]:
    """Issues of the given rows, in (row, check) order."""
    found_rows, found_checks = [], []
    for k, check in enumerate(checks):
        hit = rows[check.mask[rows]]
        found_rows.append(hit)
        found_checks.append(np.full(len(hit), k))
    flat_rows = np.concatenate(found_rows)
    flat_checks = np.concatenate(found_checks)
    order = np.lexsort((flat_checks, flat_rows))
    flat_rows, flat_checks = flat_rows[order], flat_checks[order]
    messages = np.empty(len(flat_rows), dtype=object)
    for k, check in enumerate(checks):
        selected = flat_checks == k
        if selected.any():
            messages[selected] = check.describe(flat_rows[selected])
    issues = []
    for row, k, message in zip(flat_rows, flat_checks, messages):
        file, line = origins.where(int(row))
        check = checks[int(k)]
        issues.append(
            ValidationIssue(file, line, names.get(check.field, check.field), message, check.reason)
        )
    return issues


def _reported_issues(
    checks: list[_Check], origins: RowOrigins, names: Mapping[str, str]
) -> tuple[list[ValidationIssue], int]:
    """The first MAX_REPORTED_ISSUES issues, and how many more there are."""
    total = sum(int(c.mask.sum()) for c in checks)
    if total == 0:
        return [], 0
    bad_rows = np.flatnonzero(np.any([c.mask for c in checks], axis=0))
    # Every bad row has at least one issue, so this many rows is enough.
    issues = _issues_at(checks, bad_rows[:MAX_REPORTED_ISSUES], origins, names)
    issues = issues[:MAX_REPORTED_ISSUES]
    return issues, total - len(issues)
