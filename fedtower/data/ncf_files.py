"""The NCF paper's published split files, turned into fedtower's given-split layout.

He et al. (2017) ship `<name>.train.rating` (`user<TAB>item<TAB>rating<TAB>timestamp`, no header) and
`<name>.test.negative` (`(user,item)<TAB>neg<TAB>neg...`, one line per user, 99 negatives). This writes
`train.csv` (user, item, timestamp) and `test.csv` (user, item, negatives) for `--train` / `--test`.
A line that does not parse is reported with its file and line and left out; nothing else is changed.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from fedtower.data.schema import atomic_write_text
from fedtower.data.validation import ValidationIssue, ValidationReport

_PAIR = re.compile(r"^\(\s*(\S+?)\s*,\s*(\S+?)\s*\)$")


def convert_ncf(train_rating: str | Path, test_negative: str | Path, out_dir: str | Path) -> ValidationReport:
    """Write out_dir/train.csv and out_dir/test.csv; returns what was read, kept and why lines were left out."""
    train_rating, test_negative, out = Path(train_rating), Path(test_negative), Path(out_dir)
    report = ValidationReport(sources=[str(train_rating), str(test_negative)])
    train_rows = []
    for line_no, fields in _lines(train_rating, report):
        if len(fields) < 2 or (len(fields) >= 4 and not fields[3].lstrip("-").isdigit()):
            _bad(report, train_rating, line_no, "expected user<TAB>item<TAB>rating<TAB>timestamp")
            continue
        train_rows.append([fields[0], fields[1], fields[3] if len(fields) >= 4 else ""])
    test_rows = []
    for line_no, fields in _lines(test_negative, report):
        pair = _PAIR.match(fields[0]) if fields else None
        if pair is None or len(fields) < 2:
            _bad(report, test_negative, line_no, "expected (user,item)<TAB>negative<TAB>negative...")
            continue
        test_rows.append([pair.group(1), pair.group(2), " ".join(fields[1:])])
    report.rows_kept = len(train_rows) + len(test_rows)
    out.mkdir(parents=True, exist_ok=True)
    has_time = all(row[2] for row in train_rows)
    atomic_write_text(out / "train.csv", _csv(["user", "item", "timestamp"] if has_time else ["user", "item"],
                                              [row if has_time else row[:2] for row in train_rows]))  # fmt: skip
    atomic_write_text(out / "test.csv", _csv(["user", "item", "negatives"], test_rows))
    return report


def _lines(path: Path, report: ValidationReport):
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            report.rows_read += 1
            yield line_no, line.rstrip("\n").split("\t")


def _bad(report: ValidationReport, path: Path, line: int, message: str) -> None:
    report.issues.append(ValidationIssue(str(path), line, "", message, "malformed_row"))
    report.reason_counts["malformed_row"] = report.reason_counts.get("malformed_row", 0) + 1


def _csv(header: list[str], rows: list[list[str]]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
