"""Event validation: every kind of bad row, in fail-fast and skip-and-report modes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtower.data import validation
from fedtower.data.schema import ItemIndex
from fedtower.data.validation import (
    DataValidationError,
    RowOrigins,
    ValidationIssue,
    validate_events,
    validate_located_events,
)

NOW = 1_700_000_000  # 2023-11-14T22:13:20Z
CATALOGUE = ItemIndex(["a", "b", "c"])
GOOD_FIRST = ("g1", "a", "view", "50", "")
GOOD_LAST = ("g2", "b", "rating", "60", "4.5")


def events(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=["user", "item", "behaviour", "timestamp", "value"])


def validate(raw: pd.DataFrame, on_error: str = "skip"):
    return validate_events(
        raw, source="events.csv", catalogue=CATALOGUE, on_error=on_error, now=NOW
    )


BAD_ROWS = [
    *[
        pytest.param(row, field, "missing_value", "missing value", id=f"no-{field}")
        for row, field in [
            (("", "a", "view", "100", ""), "user"),
            (("u", None, "view", "100", ""), "item"),
            (("u", "a", " ", "100", ""), "behaviour"),
            (("u", "a", "view", "", ""), "timestamp"),
        ]
    ],
    pytest.param(
        ("u", "a", "view", "abc", ""), "timestamp", "bad_timestamp",
        "not an integer or an ISO-8601 datetime ('abc')", id="text-time",
    ),
    pytest.param(
        ("u", "a", "view", "12.5", ""), "timestamp", "bad_timestamp",
        "not an integer or an ISO-8601 datetime ('12.5')", id="fractional-time",
    ),
    pytest.param(
        ("u", "a", "view", "-5", ""), "timestamp", "impossible_timestamp",
        "impossible timestamp -5 (before 1970)", id="negative-time",
    ),
    pytest.param(
        ("u", "a", "view", str(NOW + 86_401), ""), "timestamp", "impossible_timestamp",
        "more than a day in the future", id="future-time",
    ),
    pytest.param(
        ("u", "a", "like", "100", ""), "behaviour", "unknown_behaviour",
        "unknown behaviour 'like'; allowed: view, click, cart, purchase, rating, dwell",
        id="unknown-behaviour",
    ),
    pytest.param(
        ("u", "a", "rating", "100", ""), "value", "missing_value",
        "missing value (behaviour 'rating' needs one)", id="rating-without-value",
    ),
    pytest.param(
        ("u", "a", "dwell", "100", ""), "value", "missing_value",
        "missing value (behaviour 'dwell' needs one)", id="dwell-without-value",
    ),
    pytest.param(
        ("u", "a", "rating", "100", "5.5"), "value", "value_out_of_range",
        "rating 5.5 is outside 0.5-5", id="rating-too-high",
    ),
    pytest.param(
        ("u", "a", "rating", "100", "0"), "value", "value_out_of_range",
        "rating 0 is outside 0.5-5", id="rating-too-low",
    ),
    pytest.param(
        ("u", "a", "dwell", "100", "-1"), "value", "value_out_of_range",
        "dwell -1 is negative", id="negative-dwell",
    ),
    pytest.param(
        ("u", "a", "rating", "100", "NaN"), "value", "bad_value",
        "not a finite number ('NaN')", id="nan-rating",
    ),
    pytest.param(
        ("u", "a", "view", "100", "inf"), "value", "bad_value",
        "not a finite number ('inf')", id="infinite-value",
    ),
    pytest.param(
        ("u", "a", "click", "100", "four"), "value", "bad_value",
        "not a finite number ('four')", id="text-value",
    ),
    pytest.param(
        ("u", "zz", "view", "100", ""), "item", "unknown_item",
        "item 'zz' is not in the catalogue", id="unknown-item",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("bad_row", "field", "reason", "message"), BAD_ROWS)
def test_fail_fast_names_file_line_and_field(bad_row, field, reason, message):
    # Prepare: the bad row is the second data row, i.e. line 3 under a header.
    raw = events(GOOD_FIRST, bad_row, GOOD_LAST)

    # Execute
    with pytest.raises(DataValidationError) as caught:
        validate(raw, on_error="raise")

    # Assert
    assert str(caught.value).startswith(f"events.csv:3: field '{field}': ")
    assert message in str(caught.value)
    assert (caught.value.issue.line, caught.value.issue.field) == (3, field)
    assert caught.value.issue.reason == reason


@pytest.mark.parametrize(("bad_row", "field", "reason", "message"), BAD_ROWS)
def test_skip_mode_drops_the_bad_row_and_keeps_the_good_ones(bad_row, field, reason, message):
    # Prepare
    raw = events(GOOD_FIRST, bad_row, GOOD_LAST)

    # Execute
    clean, report = validate(raw)

    # Assert
    assert clean["user"].tolist() == ["g1", "g2"]
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (3, 2, 1)
    assert report.counts_by_reason() == {reason: 1}
    assert [(i.line, i.field) for i in report.issues] == [(3, field)]
    assert message in report.issues[0].message


def test_clean_rows_come_back_in_canonical_types_and_values():
    # Prepare: ISO-8601 times (zulu, offset, naive = UTC), padded and float-written
    # integers, mixed-case behaviour, an explicit NaN where no value is needed.
    raw = events(
        ("u1", "a", "view", "2020-01-01T00:00:00Z", ""),
        ("u1", "b", "view", "2020-01-01T01:00:00+01:00", ""),
        ("u1", "c", "view", "2020-01-01 00:00:30", "NaN"),
        (" u2 ", "a", "Purchase", "  42 ", ""),
        ("u2", "b", "rating", "964982703.0", "0.5"),
        ("u2", "c", "rating", "964982704", "5"),
        ("u3", "a", "dwell", str(NOW + 86_400), "0"),
    )

    # Execute
    clean, report = validate(raw, on_error="raise")

    # Assert
    assert clean["user"].tolist() == ["u1", "u1", "u1", "u2", "u2", "u2", "u3"]
    assert clean["behaviour"].tolist() == ["view"] * 3 + ["purchase", "rating", "rating", "dwell"]
    assert clean["timestamp"].tolist() == [
        1_577_836_800, 1_577_836_800, 1_577_836_830, 42, 964_982_703, 964_982_704, NOW + 86_400,
    ]  # fmt: skip
    assert clean["value"].tolist()[4:] == [0.5, 5.0, 0.0]
    assert clean["value"].iloc[:4].isna().all()
    assert clean["timestamp"].dtype == np.int64 and clean["value"].dtype == np.float64
    assert all(pd.api.types.is_string_dtype(clean[c]) for c in ("user", "item", "behaviour"))
    assert (report.rows_read, report.rows_kept, report.issues) == (7, 7, [])


def test_millisecond_timestamps_get_a_hint():
    # Prepare
    raw = events(("u", "a", "view", "1600000000000", ""))

    # Execute
    _, report = validate(raw)

    # Assert
    assert "milliseconds instead of seconds?" in report.issues[0].message


def test_later_copy_of_an_event_is_the_duplicate():
    # Prepare: line 4 is line 2 again with the time written as ISO-8601;
    # line 5 differs in behaviour, so it is a different event.
    raw = events(
        ("u", "a", "view", "100", ""),
        ("u", "a", "view", "100", ""),
        ("u", "a", "view", "1970-01-01T00:01:40Z", ""),
        ("u", "a", "click", "100", ""),
    )

    # Execute
    clean, report = validate(raw)
    with pytest.raises(DataValidationError) as caught:
        validate(raw, on_error="raise")

    # Assert
    assert clean["behaviour"].tolist() == ["view", "click"]
    assert [i.line for i in report.issues] == [3, 4]
    assert report.counts_by_reason() == {"duplicate_event": 2}
    assert "duplicate of the event at line 2" in report.issues[1].message
    assert str(caught.value).startswith(
        "events.csv:3: field 'event': duplicate of the event at line 2"
    )


def test_copy_of_a_rejected_row_is_kept():
    # Prepare: same key; the first has an impossible rating, the second is fine.
    raw = events(("u", "a", "rating", "100", "9"), ("u", "a", "rating", "100", "4"))

    # Execute
    clean, report = validate(raw)

    # Assert
    assert clean["value"].tolist() == [4.0]
    assert report.counts_by_reason() == {"value_out_of_range": 1}


def test_row_with_several_issues_is_skipped_once():
    # Prepare: no user, bad time, unknown behaviour, unknown item on one row.
    raw = events(GOOD_FIRST, ("", "zz", "like", "abc", ""))

    # Execute
    clean, report = validate(raw)
    with pytest.raises(DataValidationError) as caught:
        validate(raw, on_error="raise")

    # Assert
    assert clean["user"].tolist() == ["g1"]
    assert report.rows_skipped == 1 and report.rows_kept == 1
    assert [i.field for i in report.issues] == ["user", "timestamp", "behaviour", "item"]
    assert sum(report.counts_by_reason().values()) == 4
    assert len(caught.value.issues) == 4
    assert str(caught.value).endswith("; and 1 more issue.")


def test_fail_fast_reports_the_earliest_line_whatever_the_check():
    # Prepare: line 3 fails a late check (catalogue), line 4 an early one (timestamp).
    raw = events(GOOD_FIRST, ("u", "zz", "view", "100", ""), ("u", "a", "view", "abc", ""))

    # Execute
    with pytest.raises(DataValidationError) as caught:
        validate(raw, on_error="raise")

    # Assert
    assert [(i.line, i.field) for i in caught.value.issues] == [(3, "item")]


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_missing_required_column_is_a_file_level_error(on_error):
    # Prepare
    raw = events(GOOD_FIRST).drop(columns=["timestamp"])

    # Execute
    with pytest.raises(DataValidationError) as caught:
        validate(raw, on_error=on_error)

    # Assert
    assert str(caught.value).startswith(
        "events.csv:1: field 'timestamp': required column is missing"
    )
    assert caught.value.issue.reason == "missing_column"


def test_value_column_is_optional_until_a_row_needs_it():
    # Prepare
    raw = events(GOOD_FIRST, ("u", "b", "rating", "70", "")).drop(columns=["value"])

    # Execute
    clean, report = validate(raw)

    # Assert
    assert clean["user"].tolist() == ["g1"] and np.isnan(clean["value"].iloc[0])
    assert [(i.line, i.field, i.reason) for i in report.issues] == [(3, "value", "missing_value")]


def test_without_catalogue_any_item_is_accepted():
    # Prepare
    raw = events(("u", "anything", "view", "100", ""))

    # Execute
    clean, report = validate_events(raw, source="e.csv", catalogue=None, on_error="raise", now=NOW)

    # Assert
    assert clean["item"].tolist() == ["anything"] and report.rows_kept == 1


def test_report_summary_and_json():
    # Prepare
    raw = events(GOOD_FIRST, ("u", "zz", "view", "100", ""), GOOD_LAST)

    # Execute
    _, report = validate(raw)
    as_json = json.loads(json.dumps(report.to_dict()))

    # Assert
    assert report.summary().splitlines() == [
        "Read 3 rows from events.csv: kept 2, skipped 1.",
        "  unknown_item: 1",
        "First issues:",
        "  events.csv:3: field 'item': item 'zz' is not in the catalogue",
    ]
    assert as_json["rows_skipped"] == 1
    assert as_json["issues"] == [
        {
            "file": "events.csv",
            "line": 3,
            "field": "item",
            "reason": "unknown_item",
            "message": "item 'zz' is not in the catalogue",
        }
    ]


def test_report_keeps_a_bounded_issue_list_with_exact_counts(monkeypatch):
    # Prepare
    monkeypatch.setattr(validation, "MAX_REPORTED_ISSUES", 2)
    raw = events(*[("u", "zz", "view", str(100 + i), "") for i in range(5)])

    # Execute
    _, report = validate(raw)

    # Assert
    assert [i.line for i in report.issues] == [2, 3]
    assert report.issues_omitted == 3
    assert report.counts_by_reason() == {"unknown_item": 5}
    assert report.summary().endswith("... and 3 more.")


def test_parquet_issues_say_row():
    # Prepare
    issue = ValidationIssue("events.parquet", 4, "user", "missing value", "missing_value")

    # Execute
    text, as_dict = str(issue), issue.to_dict()

    # Assert
    assert text == "events.parquet: row 4: field 'user': missing value"
    assert as_dict["row"] == 4 and "line" not in as_dict


def test_rows_from_several_files_keep_their_own_lines():
    # Prepare: the second file's row 1 repeats the first file's row.
    origins = RowOrigins.concat(
        [RowOrigins.consecutive("a.csv", 1, 2), RowOrigins.consecutive("b.csv", 1, 2)]
    )
    raw = events(GOOD_FIRST, GOOD_FIRST)

    # Execute
    _, report = validate_located_events(raw, origins, on_error="skip", now=NOW)

    # Assert
    assert str(report.issues[0]) == (
        "b.csv:2: field 'event': duplicate of the event at a.csv:2 "
        "(same user, item, behaviour and timestamp)"
    )


def test_unknown_on_error_mode_is_refused():
    # Prepare
    raw = events(GOOD_FIRST)

    # Execute / Assert
    with pytest.raises(ValueError, match="on_error must be one of"):
        validate(raw, on_error="ignore")


def test_empty_input_gives_an_empty_clean_frame():
    # Prepare
    raw = events()

    # Execute
    clean, report = validate(raw, on_error="raise")

    # Assert
    assert len(clean) == 0 and list(clean.columns) == [
        "user",
        "item",
        "behaviour",
        "timestamp",
        "value",
    ]
    assert (report.rows_read, report.rows_skipped) == (0, 0)


DEFECTS = {
    "good": lambda i: (f"u{i}", "a", "view", str(1000 + i), ""),
    "no_user": lambda i: ("", "a", "view", str(1000 + i), ""),
    "bad_time": lambda i: (f"u{i}", "a", "view", "soon", ""),
    "bad_rating": lambda i: (f"u{i}", "a", "rating", str(1000 + i), "11"),
    "unknown_item": lambda i: (f"u{i}", "nope", "view", str(1000 + i), ""),
}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(sorted(DEFECTS)), max_size=30))
def test_skip_mode_keeps_exactly_the_good_rows(kinds):
    # Prepare
    raw = events(*[DEFECTS[kind](i) for i, kind in enumerate(kinds)])

    # Execute
    clean, report = validate(raw)

    # Assert
    good = [f"u{i}" for i, kind in enumerate(kinds) if kind == "good"]
    bad_lines = [i + 2 for i, kind in enumerate(kinds) if kind != "good"]
    assert clean["user"].tolist() == good
    assert report.rows_skipped == len(bad_lines)
    assert report.rows_kept + report.rows_skipped == report.rows_read == len(kinds)
    assert [i.line for i in report.issues] == bad_lines
