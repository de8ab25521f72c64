"""Loaders: MovieLens folders, CSV/Parquet catalogues and event logs.

Every file is read as text, so that a bad value becomes a validation issue
naming file, line and field (see validation.py) instead of a parse crash, and
every unreadable, empty or mismatched file is reported by name.
"""

from __future__ import annotations

import csv
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fedtower.data.protocols import EVENT_ORDERS
from fedtower.data.schema import (
    BEHAVIOURS,
    CATALOGUE_COLUMNS,
    EVENT_COLUMNS,
    Catalogue,
    Dataset,
)
from fedtower.data.validation import (
    DataValidationError,
    OnError,
    RowOrigins,
    ValidationIssue,
    ValidationReport,
    validate_located_events,
)

EVENT_FILE_SUFFIXES: tuple[str, ...] = (".csv", ".parquet")
MAX_BRAND_COLUMNS = 50
# MovieLens marks a film without genres with a placeholder, not a genre.
NO_GENRE_MARKERS: frozenset[str] = frozenset({"(no genres listed)", "unknown"})
ML100K_GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_YEAR_IN_TITLE = r"\((\d{4})\)\s*$"
_FIELD_SEPARATOR = "\x1f"  # stands in for MovieLens' two-character "::"
_ENCODING_NAMES = {"utf-8-sig": "UTF-8", "latin-1": "Latin-1"}

# ---------------------------------------------------------------- text tables


@dataclass
class _TextTable:
    """A file's rows as text (source column names) and where each row came from."""

    source: str
    frame: pd.DataFrame
    origins: RowOrigins
    header_line: int  # 1 when the file has a header row, else 0


def _check_readable_file(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"The {what} '{path}' does not exist.")
    if not path.is_file():
        raise DataValidationError(_file_issue(path, f"the {what} must be a file, not a folder"))


def _file_issue(path: Path | str, message: str, reason: str = "unreadable_file") -> ValidationIssue:
    return ValidationIssue(str(path), 0, "", message, reason)


def _decode(path: Path, encoding: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataValidationError(_file_issue(path, f"cannot be read ({err.strerror})")) from None
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        message = (
            f"byte {data[err.start]:#04x} cannot be decoded as "
            f"{_ENCODING_NAMES.get(encoding, encoding)} text; "
            "the file may be binary or in another encoding"
        )
        issue = ValidationIssue(str(path), line, "", message, "undecodable_file")
        raise DataValidationError(issue) from None
    if "\x00" in text:
        raise DataValidationError(_file_issue(path, "holds NUL bytes; it looks binary, not text"))
    if not text.strip():
        raise DataValidationError(_file_issue(path, "is empty", "empty_file"))
    return text


def _read_delimited(
    path: Path,
    *,
    sep: str = ",",
    encoding: str = "utf-8-sig",
    names: list[str] | None = None,
    quoting: int = csv.QUOTE_MINIMAL,
) -> _TextTable:
    """Read a delimited text file (header row unless `names` is given) as text."""
    text = _decode(path, encoding)
    if len(sep) > 1:
        text, sep = text.replace(sep, _FIELD_SEPARATOR), _FIELD_SEPARATOR
    header_line = 0 if names else 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        try:
            frame = pd.read_csv(
                io.StringIO(text),
                sep=sep,
                header=None if names else 0,
                names=names,
                dtype=str,
                na_filter=False,
                skip_blank_lines=False,
                quoting=quoting,
                on_bad_lines="warn",
                engine="c",
            )
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
            message = f"is not a readable delimited text file ({err})"
            raise DataValidationError(_file_issue(path, message)) from None
    bad_lines = _skipped_lines(caught)
    lines = _row_lines(text, header_line, len(frame), bad_lines)
    if lines is None:  # quoted fields span lines: recount with the csv module
        lines, bad_lines = _row_lines_by_records(text, sep, quoting, header_line, frame.shape[1])
    return _assemble_table(str(path), frame, lines, bad_lines, header_line)


def _skipped_lines(caught: list[warnings.WarningMessage]) -> dict[int, str]:
    """Lines pandas skipped for having too many fields, from its warnings."""
    skipped = {}
    for warning in caught:
        for line, detail in re.findall(r"Skipping line (\d+): (.+)", str(warning.message)):
            skipped[int(line)] = detail.strip()
    return skipped


def _physical_lines(text: str) -> int:
    breaks = text.count("\n") + text.count("\r") - text.count("\r\n")
    return breaks + (0 if text.endswith(("\n", "\r")) else 1)


def _row_lines(
    text: str, header_line: int, n_rows: int, bad_lines: dict[int, str]
) -> np.ndarray | None:
    """Line of each parsed row when every record is one line, else None."""
    first = header_line + 1
    if _physical_lines(text) != header_line + n_rows + len(bad_lines):
        return None
    all_lines = np.arange(first, first + n_rows + len(bad_lines), dtype=np.int64)
    return np.setdiff1d(all_lines, np.fromiter(bad_lines, dtype=np.int64), assume_unique=True)


def _row_lines_by_records(
    text: str, sep: str, quoting: int, header_line: int, n_fields: int
) -> tuple[np.ndarray, dict[int, str]]:
    """Start line of each record, for files whose quoted fields hold line breaks."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, quoting=quoting)
    lines, bad_lines, previous_end = [], {}, 0
    for number, record in enumerate(reader):
        start, previous_end = previous_end + 1, reader.line_num
        if number < header_line:
            continue
        if len(record) > n_fields:
            bad_lines[start] = f"expected {n_fields} fields, saw {len(record)}"
        else:
            lines.append(start)
    return np.array(lines, dtype=np.int64), bad_lines


def _assemble_table(
    source: str, frame: pd.DataFrame, lines: np.ndarray, bad_lines: dict[int, str], header_line: int
) -> _TextTable:
    """Drop blank rows and put a placeholder row where each malformed line was."""
    frame.columns = [str(c).strip() for c in frame.columns]
    blank = np.ones(len(frame), dtype=bool)
    for column in frame.columns:
        blank &= (frame[column].str.strip() == "").to_numpy(bool)
    frame, lines = frame[~blank].reset_index(drop=True), lines[~blank]
    malformed: dict[int, str] = {}
    if bad_lines:
        placeholders = pd.DataFrame(np.nan, index=range(len(bad_lines)), columns=frame.columns)
        frame = pd.concat([frame, placeholders.astype("str")], ignore_index=True)
        lines = np.concatenate([lines, np.fromiter(bad_lines, dtype=np.int64)])
        order = np.argsort(lines, kind="stable")
        frame, lines = frame.iloc[order].reset_index(drop=True), lines[order]
        malformed = {int(np.searchsorted(lines, line)): text for line, text in bad_lines.items()}
    origins = RowOrigins(
        files=(source,),
        file_codes=np.zeros(len(lines), dtype=np.int32),
        lines=lines,
        malformed=malformed,
    )
    return _TextTable(source, frame, origins, header_line)


def _read_parquet(path: Path) -> _TextTable:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        message = f"is not a readable Parquet file ({err})"
        raise DataValidationError(_file_issue(path, message)) from None
    text_columns = {name: _arrow_text(table.column(name)) for name in table.column_names}
    frame = pa.table(text_columns).to_pandas() if text_columns else pd.DataFrame()
    frame = frame.astype("str") if len(frame.columns) else frame
    return _assemble_table(
        str(path), frame, np.arange(1, len(frame) + 1, dtype=np.int64), {}, header_line=0
    )


def _arrow_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A Parquet column as text, with timestamps as epoch seconds and NaN as absent."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_date(kind):
        column, kind = column.cast(pa.timestamp("s")), pa.timestamp("s")
    if pa.types.is_timestamp(kind):
        column = column.cast(pa.timestamp("s"), safe=False).cast(pa.int64())
    elif pa.types.is_floating(kind):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, kind), column)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        column = pc.binary_join(column.cast(pa.list_(pa.string())), "|")
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.chunked_array([pa.array([str(v) for v in column.to_pylist()], pa.string())])


def _read_table(path: Path, what: str) -> _TextTable:
    _check_readable_file(path, what)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_delimited(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    message = f"has an unsupported extension ('{path.suffix}'); expected .csv or .parquet"
    raise DataValidationError(_file_issue(path, message))


def _column_map(
    columns: dict[str, str] | None, canonical: tuple[str, ...], what: str
) -> dict[str, str]:
    """Canonical name -> source column, defaulting every name to itself."""
    unknown = sorted(set(columns or {}) - set(canonical))
    if unknown:
        raise ValueError(
            f"Column mapping for a {what} names unknown fields {unknown}; "
            f"the fields are {list(canonical)}."
        )
    return {name: (columns or {}).get(name, name) for name in canonical}


def _missing_column_error(table: _TextTable, source_column: str, field: str) -> DataValidationError:
    found = list(table.frame.columns)
    hint = ""
    if found and all(re.fullmatch(r"[-+.\d]+", str(c)) for c in found):
        hint = "; the first line looks like data: does the file lack a header row?"
    label = f"'{source_column}'" + ("" if source_column == field else f" (for '{field}')")
    message = f"required column {label} is missing; the file has columns {found}{hint}"
    return DataValidationError(
        ValidationIssue(table.source, table.header_line, source_column, message, "missing_column")
    )


# ---------------------------------------------------------------- event logs


def load_event_log(
    path: str | Path,
    *,
    catalogue: Catalogue,
    columns: dict[str, str] | None = None,
    default_behaviour: str | None = None,
    on_error: OnError = "raise",
    order: str = "timestamp",
    first_position: int = 0,
) -> tuple[pd.DataFrame, ValidationReport]:
    """Load and validate an event log: a .csv or .parquet file, or a folder of them.

    `columns` maps canonical names (user, item, behaviour, timestamp, value) to
    the file's column names; `default_behaviour` is used when the log has no
    behaviour column. A folder's files are read in name order and concatenated,
    each keeping its own line numbers. `order = "file"` orders events by their
    place in the files instead of a timestamp column (published splits often
    have none): event i gets timestamp `first_position + i`.
    """
    tables, mapping = _event_tables(path, columns, default_behaviour, order)
    return _validated_events(tables, mapping, default_behaviour, catalogue, on_error, order=order,
                             first_position=first_position)  # fmt: skip


def _event_tables(
    path: str | Path, columns: dict[str, str] | None, default_behaviour: str | None, order: str
) -> tuple[list[_TextTable], dict[str, str]]:
    if default_behaviour is not None and default_behaviour not in BEHAVIOURS:
        raise ValueError(
            f"default_behaviour {default_behaviour!r} is not a behaviour; "
            f"use one of {list(BEHAVIOURS)}."
        )
    if order not in EVENT_ORDERS:
        raise ValueError(f"The event order must be one of {list(EVENT_ORDERS)}, got {order!r}.")
    mapping = _column_map(columns, EVENT_COLUMNS, "event log")
    return [_read_table(file, "event log") for file in _event_files(Path(path))], mapping


def _event_files(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"The event log '{path}' does not exist.")
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.iterdir()
        if p.is_file() and p.suffix.lower() in EVENT_FILE_SUFFIXES and not p.name.startswith(".")
    )  # fmt: skip
    if not files:
        raise FileNotFoundError(f"The event log folder '{path}' holds no .csv or .parquet files.")
    return files


def _validated_events(
    tables: list[_TextTable],
    mapping: dict[str, str],
    default_behaviour: str | None,
    catalogue: Catalogue,
    on_error: OnError,
    movielens_ids: bool = False,
    *,
    order: str = "timestamp",
    first_position: int = 0,
    extra_checks=(),
    keep_columns: tuple[str, ...] = (),
) -> tuple[pd.DataFrame, ValidationReport]:
    frames = [_canonical_events(table, mapping, default_behaviour, order, keep_columns) for table in tables]
    raw = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if order == "file":  # the place in the files is the order; a timestamp column, if any, is not read
        raw["timestamp"] = np.arange(first_position, first_position + len(raw)).astype(str)
    origins = RowOrigins.concat([table.origins for table in tables])
    return validate_located_events(
        raw,
        origins,
        catalogue=catalogue.index,
        on_error=on_error,
        field_names=mapping,
        header_line=tables[0].header_line,
        movielens_ids=movielens_ids,
        extra_checks=extra_checks(raw, origins) if callable(extra_checks) else extra_checks,
        keep_columns=keep_columns,
    )


def _canonical_events(
    table: _TextTable,
    mapping: dict[str, str],
    default_behaviour: str | None,
    order: str = "timestamp",
    keep_columns: tuple[str, ...] = (),
) -> pd.DataFrame:
    frame = table.frame
    events = {}
    for field in EVENT_COLUMNS:
        source_column = mapping[field]
        if source_column in frame.columns:
            events[field] = frame[source_column]
        elif field == "behaviour" and default_behaviour is not None:
            events[field] = pd.Series(default_behaviour, index=frame.index, dtype="str")
        elif field == "timestamp" and order == "file":
            continue
        elif field != "value":
            error = _missing_column_error(table, source_column, field)
            if field == "timestamp":  # a published split without times: the file's order is the order
                issue = error.issue
                error = DataValidationError(ValidationIssue(
                    issue.file, issue.line, issue.field,
                    issue.message + "; if the file's order is the events' order, use order \"file\" "
                    "(--order file, run config event-order = \"file\")", issue.reason))  # fmt: skip
            raise error
    for column in keep_columns:
        events[column] = frame[column] if column in frame.columns else pd.Series(np.nan, index=frame.index)
    return pd.DataFrame(events, index=frame.index)


# ---------------------------------------------------------------- catalogues


def load_catalogue(
    path: str | Path,
    *,
    columns: dict[str, str] | None = None,
    feature_columns: list[str] | None = None,
) -> Catalogue:
    """Load an item catalogue from a .csv or .parquet file.

    `columns` maps canonical names (item, title, categories, price, brand) to
    the file's columns; only `item` is required. Categories are one
    `|`-separated string per item. `feature_columns` names numeric columns
    appended as dense content features after the ones built from the catalogue.
    """
    mapping = _column_map(columns, CATALOGUE_COLUMNS, "catalogue")
    table = _read_table(Path(path), "catalogue")
    return _catalogue_from_table(table, mapping, feature_columns=list(feature_columns or []))


def _catalogue_from_table(
    table: _TextTable,
    mapping: dict[str, str],
    *,
    feature_columns: list[str] | None = None,
    no_category_markers: frozenset[str] = frozenset(),
) -> Catalogue:
    frame = table.frame
    feature_columns = list(feature_columns or [])
    for field, source_column in [("item", mapping["item"])] + [(c, c) for c in feature_columns]:
        if source_column not in frame.columns:
            raise _missing_column_error(table, source_column, field)
    if len(frame) == 0:
        raise DataValidationError(_file_issue(table.source, "holds no items", "empty_file"))

    def text(field: str) -> pd.Series:
        source_column = mapping[field]
        if source_column not in frame.columns:
            return pd.Series("", index=frame.index, dtype="str")
        return frame[source_column].fillna("").str.strip()

    lines = table.origins.lines
    usable = np.ones(len(frame), dtype=bool)
    usable[list(table.origins.malformed)] = False
    issues = [
        ValidationIssue(table.source, int(lines[row]), "", problem, "malformed_row")
        for row, problem in table.origins.malformed.items()
    ]
    items = text("item")
    issues += _catalogue_id_issues(table, items, mapping["item"], usable)
    price, price_issues = _numbers(table, text("price"), mapping["price"], usable, minimum=0.0)
    dense = []
    for column in feature_columns:
        values, column_issues = _numbers(
            table, frame[column].fillna("").str.strip(), column, usable, required=True
        )
        dense.append(values)
        issues += column_issues
    issues += price_issues
    if issues:
        raise DataValidationError(sorted(issues, key=lambda issue: issue.line))

    catalogue_items = pd.DataFrame(
        {
            "item": items.astype("str"),
            "title": text("title").astype("str"),
            "categories": _category_tuples(text("categories"), no_category_markers),
            "price": price,
            "brand": text("brand").astype("str"),
        }
    )
    features, names = build_content_features(catalogue_items)
    if dense:
        features = np.hstack([features, np.column_stack(dense).astype(np.float32)])
        names = names + list(feature_columns)
    return Catalogue(catalogue_items, features if features.shape[1] else None, names)


def _catalogue_id_issues(
    table: _TextTable, items: pd.Series, column: str, usable: np.ndarray
) -> list[ValidationIssue]:
    lines = table.origins.lines
    issues = [
        ValidationIssue(table.source, int(lines[row]), column, "missing item id", "missing_value")
        for row in np.flatnonzero(usable & (items == "").to_numpy(bool))
    ]
    named = items[usable & (items != "").to_numpy(bool)]
    repeated = named[named.duplicated(keep="first")]
    firsts = named[named.isin(set(repeated))].drop_duplicates()
    first_line = {item: int(lines[row]) for row, item in firsts.items()}
    unit = "row" if table.header_line == 0 and table.source.lower().endswith(".parquet") else "line"
    issues += [
        ValidationIssue(
            table.source,
            int(lines[row]),
            column,
            f"duplicate item id {item!r} (first listed at {unit} {first_line[item]})",
            "duplicate_item",
        )
        for row, item in repeated.items()
    ]
    return issues


def _numbers(
    table: _TextTable,
    text: pd.Series,
    column: str,
    usable: np.ndarray,
    *,
    minimum: float | None = None,
    required: bool = False,
) -> tuple[np.ndarray, list[ValidationIssue]]:
    """Parse a numeric catalogue column of usable rows; blanks are NaN unless `required`."""
    values = pd.to_numeric(text.mask(text == ""), errors="coerce").to_numpy(np.float64)
    blank = (text == "").to_numpy(bool)
    with np.errstate(invalid="ignore"):
        bad = (~blank & ~np.isfinite(values)) | (blank & required)
        if minimum is not None:
            bad |= values < minimum
    bad &= usable
    issues = []
    for row in np.flatnonzero(bad):
        shown = text.iloc[row]
        problem = (
            "missing value" if blank[row]
            else f"not a finite number ({shown!r})" if not np.isfinite(values[row])
            else f"{shown} is below the minimum {minimum:g}"
        )  # fmt: skip
        issues.append(
            ValidationIssue(
                table.source, int(table.origins.lines[row]), column, problem, "bad_value"
            )
        )
    return values, issues


def _category_tuples(text: pd.Series, no_category_markers: frozenset[str]) -> list[tuple[str, ...]]:
    return [
        tuple(
            c
            for c in (part.strip() for part in cell.split("|"))
            if c and c not in no_category_markers
        )
        for cell in text.tolist()
    ]


# ---------------------------------------------------------------- content features


def build_content_features(
    items: pd.DataFrame, *, release_year: bool | None = None, max_brands: int = MAX_BRAND_COLUMNS
) -> tuple[np.ndarray, list[str]]:
    """Dense content features for the item tower, one float32 row per item.

    Columns, in order: multi-hot categories (sorted vocabulary); release year
    from a "(1995)" title suffix, standardised, with a missing indicator;
    standardised log1p(price) (with a missing indicator) when any price is
    known; one-hot brand for the `max_brands` most common brands. Release year
    is used when `release_year` is True, or when None and most titles carry
    one (as MovieLens titles do).
    """
    n = len(items)
    blocks: list[np.ndarray] = []
    names: list[str] = []

    def add(block: np.ndarray, block_names: list[str]) -> None:
        blocks.append(block)
        names.extend(block_names)

    add(*_category_features(items.get("categories", pd.Series([()] * n)).tolist()))
    titles = items.get("title", pd.Series([""] * n)).fillna("").astype(str)
    years = pd.to_numeric(titles.str.extract(_YEAR_IN_TITLE)[0], errors="coerce").to_numpy(float)
    titled = int((titles.str.strip() != "").sum())
    if release_year or (release_year is None and np.isfinite(years).sum() * 2 > max(titled, 1)):
        add(*_standardised_with_indicator(years, "release_year"))
    prices = pd.to_numeric(items.get("price", pd.Series([np.nan] * n)), errors="coerce")
    if prices.notna().any():
        add(*_standardised_with_indicator(np.log1p(prices.to_numpy(float)), "log_price"))
    brands = items.get("brand", pd.Series([""] * n)).fillna("").astype(str).str.strip()
    add(*_brand_features(brands, max_brands))
    return np.hstack(blocks).astype(np.float32), names


def _category_features(categories: list) -> tuple[np.ndarray, list[str]]:
    as_tuples = [_as_categories(cell) for cell in categories]
    vocabulary = sorted({c for cell in as_tuples for c in cell})
    column = {category: j for j, category in enumerate(vocabulary)}
    multi_hot = np.zeros((len(as_tuples), len(vocabulary)), dtype=np.float32)
    rows = [i for i, cell in enumerate(as_tuples) for _ in cell]
    cols = [column[c] for cell in as_tuples for c in cell]
    multi_hot[rows, cols] = 1.0
    return multi_hot, [f"category:{c}" for c in vocabulary]


def _as_categories(cell: object) -> tuple[str, ...]:
    if isinstance(cell, str):
        return tuple(part.strip() for part in cell.split("|") if part.strip())
    if isinstance(cell, (tuple, list, np.ndarray)):
        return tuple(str(c) for c in cell)
    return ()


def _standardised_with_indicator(values: np.ndarray, name: str) -> tuple[np.ndarray, list[str]]:
    """z-scores over known values; unknown -> 0 plus a 1 in the indicator column."""
    known = np.isfinite(values)
    scaled = np.zeros(len(values))
    if known.any():
        mean, std = values[known].mean(), values[known].std()
        scaled[known] = (values[known] - mean) / (std if std > 0 else 1.0)
    if known.all():
        return scaled[:, None], [name]
    return np.column_stack([scaled, ~known]), [name, f"{name}_missing"]


def _brand_features(brands: pd.Series, max_brands: int) -> tuple[np.ndarray, list[str]]:
    counts = brands[brands != ""].value_counts()
    # Most common first, ties by name, so the columns never depend on row order.
    ranked = sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))[:max_brands]
    kept = [brand for brand, _ in ranked]
    codes = pd.Index(kept, dtype=object).get_indexer(brands.to_numpy(object))  # -1: not kept
    one_hot = np.zeros((len(brands), len(kept)), dtype=np.float32)
    listed = np.flatnonzero(codes >= 0)
    one_hot[listed, codes[listed]] = 1.0
    return one_hot, [f"brand:{b}" for b in kept]


# ---------------------------------------------------------------- MovieLens


MOVIELENS_LAYOUTS: dict[str, tuple[str, str]] = {
    "ml-latest": ("ratings.csv", "movies.csv"),
    "ml-1m": ("ratings.dat", "movies.dat"),
    "ml-100k": ("u.data", "u.item"),
}
_RATING_FIELDS = ["user", "item", "value", "timestamp"]


def movielens_layout(folder: str | Path) -> str | None:
    """Which MovieLens layout a folder holds ("ml-latest", "ml-1m", "ml-100k"), if any."""
    folder = Path(folder)
    for layout, files in MOVIELENS_LAYOUTS.items():
        if all((folder / name).is_file() for name in files):
            return layout
    return None


def load_movielens(
    folder: str | Path, *, on_error: OnError = "raise"
) -> tuple[Dataset, ValidationReport]:
    """Load a MovieLens folder (ml-100k, ml-1m, ml-latest[-small]): one event per rating."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"The MovieLens folder '{folder}' does not exist or is not a folder."
        )
    layout = movielens_layout(folder)
    if layout is None:
        raise FileNotFoundError(_no_layout_message(folder))
    ratings_name, movies_name = MOVIELENS_LAYOUTS[layout]
    if layout == "ml-latest":
        movies = _read_delimited(folder / movies_name)
        ratings = _read_delimited(folder / ratings_name)
        columns = {"item": "movieId", "title": "title", "categories": "genres"}
        event_columns = {"user": "userId", "item": "movieId", "value": "rating"}
    else:
        movies = _read_ml1m_movies(folder) if layout == "ml-1m" else _read_ml100k_items(folder)
        sep = "::" if layout == "ml-1m" else "\t"
        ratings = _read_delimited(
            folder / ratings_name, sep=sep, encoding="latin-1", names=_RATING_FIELDS,
            quoting=csv.QUOTE_NONE,
        )  # fmt: skip
        columns, event_columns = {}, {}
    catalogue = _catalogue_from_table(
        movies,
        _column_map(columns, CATALOGUE_COLUMNS, "catalogue"),
        no_category_markers=NO_GENRE_MARKERS,
    )
    events, report = _validated_events(
        [ratings],
        _column_map(event_columns, EVENT_COLUMNS, "event log"),
        "rating",
        catalogue,
        on_error,
        movielens_ids=True,
    )
    return Dataset(catalogue=catalogue, events=events, name=folder.name), report


def _no_layout_message(folder: Path) -> str:
    looked_for = "; ".join(
        f"{' + '.join(files)} ({layout})" for layout, files in MOVIELENS_LAYOUTS.items()
    )
    partial = [
        f"found {name} but not {other}"
        for files in MOVIELENS_LAYOUTS.values()
        for name, other in (files, files[::-1])
        if (folder / name).is_file() and not (folder / other).is_file()
    ]
    found = f" It {', '.join(partial)}." if partial else ""
    return f"'{folder}' is not a MovieLens folder: looked for {looked_for}.{found}"


def _read_ml1m_movies(folder: Path) -> _TextTable:
    return _read_delimited(
        folder / "movies.dat", sep="::", encoding="latin-1",
        names=["item", "title", "categories"], quoting=csv.QUOTE_NONE,
    )  # fmt: skip


def _read_ml100k_items(folder: Path) -> _TextTable:
    """u.item has 19 genre flags; turn them into the `|`-separated genre string."""
    genres = _ml100k_genres(folder)
    fields = ["item", "title", "release_date", "video_release_date", "url", *genres]
    table = _read_delimited(
        folder / "u.item", sep="|", encoding="latin-1", names=fields, quoting=csv.QUOTE_NONE
    )
    flags = (table.frame[list(genres)] == "1").to_numpy()
    names = np.array(genres, dtype=object)
    table.frame["categories"] = ["|".join(names[row]) for row in flags]
    return table


def _ml100k_genres(folder: Path) -> tuple[str, ...]:
    """Genre names in flag order, from u.genre when present."""
    genre_file = folder / "u.genre"
    if not genre_file.is_file():
        return ML100K_GENRES
    table = _read_delimited(
        genre_file, sep="|", encoding="latin-1", names=["genre", "flag"], quoting=csv.QUOTE_NONE
    )
    order = pd.to_numeric(table.frame["flag"], errors="coerce")
    if order.isna().any() or len(order) != len(ML100K_GENRES):
        raise DataValidationError(
            _file_issue(genre_file, f"should list {len(ML100K_GENRES)} 'genre|index' lines")
        )
    return tuple(table.frame["genre"].iloc[np.argsort(order.to_numpy())].str.strip())


# ---------------------------------------------------------------- datasets


def load_dataset(
    path: str | Path, *, on_error: OnError = "raise", order: str = "timestamp"
) -> tuple[Dataset, ValidationReport]:
    """Load a MovieLens folder, or a folder with a catalogue and an event log.

    The second kind holds `catalogue.csv` or `catalogue.parquet` and
    `events.csv`, `events.parquet` or an `events/` folder, all with canonical
    column names.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"The dataset folder '{folder}' does not exist or is not a folder.")
    if movielens_layout(folder) is not None:
        return load_movielens(folder, on_error=on_error)
    catalogue_path = _one_of(folder, ["catalogue.csv", "catalogue.parquet"])
    events_path = _one_of(folder, ["events.csv", "events.parquet", "events"])
    if catalogue_path is None or events_path is None:
        raise FileNotFoundError(
            f"'{folder}' is neither a MovieLens folder nor a catalogue + events folder. "
            + _no_layout_message(folder).split(": ", 1)[1].rstrip(".")
            + "; or catalogue.csv|parquet with events.csv|parquet or an events/ folder."
        )
    catalogue = load_catalogue(catalogue_path, feature_columns=_prefixed_columns(catalogue_path, "f_"))
    events, report = load_event_log(events_path, catalogue=catalogue, on_error=on_error, order=order)
    return Dataset(catalogue=catalogue, events=events, name=folder.name), report


def _prefixed_columns(path: Path, prefix: str) -> list[str]:
    """Header columns starting with `prefix` (dense feature columns, as `to_folder` writes them)."""
    try:
        if path.suffix == ".parquet":
            names = pq.read_schema(path).names
        else:
            names = pd.read_csv(path, nrows=0).columns.tolist()
    except (OSError, ValueError, pa.ArrowException):
        return []  # load_catalogue reports the unreadable file properly
    return [name for name in names if str(name).startswith(prefix)]


def _one_of(folder: Path, names: list[str]) -> Path | None:
    present = [folder / name for name in names if (folder / name).exists()]
    if len(present) > 1:
        raise DataValidationError(
            _file_issue(folder, f"holds {[p.name for p in present]}; keep only one of them")
        )
    return present[0] if present else None
