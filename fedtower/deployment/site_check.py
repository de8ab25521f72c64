"""`fedtower site check`: is this partner site ready to join, and what will it share?

Everything is checked through the code the client itself runs: the data with
the loaders and validation the node uses (`load_event_log`, the state's event
log, `prepare_split`), the state dir with `ClientStateStore.for_node`, the
budget with the persisted accountant (`load_accountant`), and what leaves the
node with the handlers' own reply builders (`train_content`,
`private_train_content`, `evaluate_content`). Nothing here saves state: only
the store's lock file may appear, and a probe file, removed at once, tests
that the directory is writable.
"""

from __future__ import annotations

import math
import os
import stat
import tempfile
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

OK, WARNING, PROBLEM = "ok", "warning", "problem"


@dataclass
class Check:
    name: str
    status: str  # ok | warning | problem
    detail: str


@dataclass
class SiteReport:
    data_path: str
    state_dir: str
    checks: list[Check] = field(default_factory=list)
    data_reports: list[dict] = field(default_factory=list)  # ValidationReport.to_dict() per source
    issue_lines: list[str] = field(default_factory=list)  # every reported bad row: "file:line: field ..."
    issues_omitted: int = 0  # bad rows beyond those the validation report keeps
    privacy: dict[str, Any] = field(default_factory=dict)
    settings_source: str = ""
    dp_known: bool = False  # whether the run's DP settings came from the node's last round or --run-config
    catalogue_known: bool = False  # whether the run's `data` spec (the public catalogue) is known
    shared: dict[str, list[dict]] = field(default_factory=dict)  # message -> records it carries

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status == PROBLEM]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == WARNING]

    @property
    def ready(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "data_path": self.data_path,
            "state_dir": self.state_dir,
            "checks": [vars(c) for c in self.checks],
            "problems": [f"{c.name}: {c.detail}" for c in self.problems],
            "warnings": [f"{c.name}: {c.detail}" for c in self.warnings],
            "data": self.data_reports,
            "privacy": self.privacy,
            "settings_source": self.settings_source,
            "shared": self.shared,
        }


def check_site(
    data_path: Path,
    state_dir: Path,
    *,
    max_epsilon: float | None = None,
    state_key_file: Path | None = None,
    run_config: Mapping[str, object] | None = None,
    node_config: Mapping[str, object] | None = None,
) -> SiteReport:
    """Check a site as its SuperNode would see it with node config `data-path`, `state-dir`,
    `max-epsilon` and `state-key-file`, plus any other keys of `node_config` (its whole --node-config)."""
    report = SiteReport(str(data_path), str(state_dir))
    node_config = {**dict(node_config or {}), "data-path": str(data_path), "state-dir": str(state_dir)}
    if max_epsilon is not None:
        node_config["max-epsilon"] = max_epsilon
    if state_key_file is not None:
        node_config["state-key-file"] = str(state_key_file)
    node = _check_node_config(report, node_config)
    if node is None:
        return report
    if max_epsilon is None and node.max_epsilon is not None:
        max_epsilon = node.max_epsilon
    store = _check_state(report, Path(state_dir).expanduser(), node_config)
    if store is not None:
        _check_privacy_settings(report, node, store)
    settings = _settings(report, store, run_config)
    _check_budget(report, store, max_epsilon, settings)
    if settings is not None and not report.catalogue_known:
        # Checking the site's items against a default catalogue would report every row as unknown.
        report.add("catalogue", PROBLEM, "The run's catalogue is not known yet (the node has not trained): pass "
                   "the coordinator's data spec, e.g. --run-config \"data='/srv/fedtower/catalogue'\".")
        return report
    data = _check_data(report, Path(data_path).expanduser(), store, settings, node) if settings else None
    if settings is not None:
        _describe_shared(report, settings, data)
    return report


# ---------------------------------------------------------------- node config


def _check_node_config(report: SiteReport, node_config: Mapping[str, object]):
    """The node's settings as the SuperNode parses them; None (and a problem) when it would refuse them."""
    from fedtower.client.node_settings import NodeSettings

    try:
        return NodeSettings.from_node_config(node_config)
    except ValueError as err:
        report.add("node config", PROBLEM, str(err))
        return None


def _check_privacy_settings(report: SiteReport, node, store) -> None:
    """The site-owned privacy settings: what the node will refuse, release or fail closed on."""
    from fedtower.client.rollback import RollbackCounter
    from fedtower.client.state import StateError

    if store.key_id is None and not node.allow_plaintext_state:
        report.add("state key", PROBLEM, "No state key: a deployed node refuses to keep its accountant in a "
                   "plaintext state (anyone who can write it could reset epsilon). Set state-key-file, or accept "
                   "it explicitly with allow-plaintext-state = true." + _KEY_HINT)  # fmt: skip
    if node.test_only_insecure_dp_seed is not None:
        report.add("DP randomness", PROBLEM, "test-only-insecure-dp-seed is set: this node's DP noise could be "
                   "regenerated by anyone who knows the seed. Remove it outside tests.")  # fmt: skip
    limits = [f"max-delta {node.max_delta:g}" if node.max_delta else "max-delta 1/(10 N) (default)",
              f"noise floor {node.min_noise_multiplier:g}"]  # fmt: skip
    declared = [f"{key} {value}" for key, value in (("dp-population-users", node.dp_population_users),
                                                    ("dp-population-events", node.dp_population_events)) if value]
    if declared:
        report.add("population", OK, f"Declared public population: {', '.join(declared)}; {', '.join(limits)}.")
    else:
        report.add("population", WARNING, "No public population declared (dp-population-users / -events): each "
                   f"run releases a DP count of this site's units (std {node.dp_count_noise:g}, charged to its "
                   f"budget). {', '.join(limits)}.")  # fmt: skip
    if node.allow_raw_evaluation:
        report.add("evaluation", WARNING, "allow-raw-evaluation is on: in DP runs this node sends exact "
                   "evaluation sums, outside its DP guarantee (the ledger records it).")  # fmt: skip
    if node.counter_path is None:
        report.add("rollback counter", WARNING, "No rollback counter (no state-key-file or rollback-counter): a "
                   "restored older backup of the state would only be caught by the coordinator.")  # fmt: skip
        return
    try:
        RollbackCounter(node.counter_path, store.state_dir).check(store)
    except StateError as err:
        report.add("rollback counter", PROBLEM, str(err))
        return
    what = "up to date" if node.counter_path.exists() else "created at this node's first DP release"
    report.add("rollback counter", OK, f"{node.counter_path}: {what}.")


# ---------------------------------------------------------------- state dir


def _check_state(report: SiteReport, state_dir: Path, node_config: dict):
    """Directory, permissions, writability, key and integrity; the opened store when usable."""
    from fedtower.client.state import ClientStateStore, StateError

    if not state_dir.is_dir():
        what = "is not a directory" if state_dir.exists() else "does not exist"
        report.add("state dir", PROBLEM, f"{state_dir} {what}. Create it once with `mkdir -m 700 {state_dir}`.")
        return None
    mode = stat.S_IMODE(state_dir.stat().st_mode)
    exposed = [p.name for p in state_dir.iterdir() if p.is_file() and p.stat().st_mode & 0o077]
    if mode & 0o077:
        report.add("state dir", PROBLEM,
                   f"{state_dir} has mode {mode:o}: group or others can reach it. Run `chmod 700 {state_dir}`.")
    elif exposed:
        names = ", ".join(sorted(exposed)[:5])
        report.add("state dir", PROBLEM,
                   f"{len(exposed)} file(s) in {state_dir} are open to group or others ({names}). Run `chmod 600`.")
    elif not _writable(state_dir):
        report.add("state dir", PROBLEM, f"{state_dir} is not writable by this user (uid {os.getuid()}); the "
                   "node must be able to save its state after every round.")
    else:
        report.add("state dir", OK, f"{state_dir}: mode {mode:o}, writable.")
    owner = state_dir.stat().st_uid
    if owner != os.getuid():
        report.add("state owner", WARNING, f"{state_dir} belongs to uid {owner}, not to this user (uid "
                   f"{os.getuid()}); run the check as the SuperNode's user.")
    try:
        store = ClientStateStore.for_node(state_dir, node_config, create=False)
        version = store.verify()  # every component and log line, authenticated when encrypted
        store.assert_consistent(expect_trained=False)
        encrypted = store.encrypted
    except StateError as err:
        report.add("state", PROBLEM, f"{err} The node would refuse to start from this state.")
        return None
    if version == 0:
        how = (f"A new state: it will be encrypted with key id {store.key_id}." if store.key_id else
               "A new state, and no state key is configured: it would be written in plaintext.")  # fmt: skip
        report.add("state", OK if store.key_id else WARNING, how + _KEY_HINT * (not store.key_id))
    elif encrypted:
        report.add("state", OK, f"Encrypted with key id {store.key_id}; version {version}: every component and "
                                    "log line authenticates.")  # fmt: skip
    else:
        report.add("state", WARNING, f"The state (version {version}) is plaintext: it is not encrypted at rest."
                                         + _KEY_HINT)  # fmt: skip
    return store


_KEY_HINT = (
    " Create a key with `fedtower state keygen KEYFILE`, encrypt an existing state with `fedtower state "
    "encrypt --state-dir DIR --key-file KEYFILE`, and pass it as node config state-key-file."
)


def _writable(path: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".site-check-", suffix=".tmp"):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- settings


def _settings(report: SiteReport, store, run_config: Mapping[str, object] | None):
    """The run settings: those recorded by the node's last round, overridden by --run-config."""
    from fedtower.config import RunSettings

    recorded: dict = {}
    if store is not None:
        recorded = dict(((store.meta().get("serving") or {}).get("run_config")) or {})
    overrides = dict(run_config or {})
    base = ("the run config recorded by the node's last round" if recorded else
            "fedtower's defaults (the coordinator's run config decides)")  # fmt: skip
    report.settings_source = f"--run-config over {base}" if overrides else base
    report.dp_known = bool(recorded) or bool({"noise-multiplier", "target-epsilon"} & set(overrides))
    report.catalogue_known = "data" in recorded or "data" in overrides
    try:
        return RunSettings.from_run_config({**recorded, **overrides})
    except ValueError as err:
        report.add("run config", PROBLEM, str(err))
        return None


# ---------------------------------------------------------------- budget


def _check_budget(report: SiteReport, store, max_epsilon: float | None, settings) -> None:
    from fedtower.client.private_round import load_accountant
    from fedtower.client.state import StateError
    from fedtower.privacy.ledger import entry_of

    privacy: dict[str, Any] = {"max_epsilon": max_epsilon}
    report.privacy = privacy
    if max_epsilon is not None and not (math.isfinite(max_epsilon) and max_epsilon > 0):
        report.add("max-epsilon", PROBLEM, f"max-epsilon must be a positive number, not {max_epsilon!r}.")
        return
    if store is None:
        report.add("epsilon spent", PROBLEM, "Unknown: the state dir cannot be read (see above).")
        return
    meta = store.meta()
    ledger = store.read_ledger()
    privacy.update(rounds_trained=int(meta.get("rounds_trained", 0)), ledger_entries=len(ledger))
    try:
        accountant = load_accountant(store)
    except StateError as err:
        report.add("epsilon spent", PROBLEM if max_epsilon is not None else WARNING, str(err))
        return
    if not accountant.history:
        privacy.update(epsilon_spent=0.0, delta=None)
        spent = "0 (no rounds yet)"
    else:
        calibration = store.load("calibration", default=None) or {}
        delta = calibration.get("delta") or (entry_of(ledger[-1]).delta if ledger else None)
        if delta is None:
            report.add("epsilon spent", PROBLEM, f"The accountant in {store.state_dir} has history but no delta "
                                                 "was recorded (no calibration, empty ledger).")  # fmt: skip
            return
        epsilon = accountant.epsilon(delta=float(delta))
        privacy.update(epsilon_spent=epsilon, delta=float(delta), steps=accountant.total_steps)
        spent = f"{epsilon:.4f} at delta {float(delta):.3g}"
    rounds = f"{privacy['rounds_trained']} round(s) trained, {len(ledger)} ledger entries"
    if max_epsilon is None:
        report.add("privacy budget", WARNING, f"No max-epsilon in the node config: this site sets no cap of its own "
                                              f"(only the run's target applies). Spent {spent}; {rounds}.")  # fmt: skip
        return
    left = max_epsilon - privacy.get("epsilon_spent", 0.0)
    privacy["epsilon_left"] = max(left, 0.0)
    if left <= 0:
        report.add("privacy budget", WARNING, f"Exhausted: spent {spent} of max-epsilon {max_epsilon:g}; the "
                   f"node will not train again (it still evaluates and serves). {rounds}.")
    else:
        report.add("privacy budget", OK, f"max-epsilon {max_epsilon:g}; spent {spent}; {rounds}.")
    if settings is not None and report.dp_known and not settings.dp_enabled:
        # The node refuses such a run (handlers.refuse_unbounded_training): say so before it starts.
        report.add("privacy budget", PROBLEM, "The run config known here has DP off (noise-multiplier and "
                   "target-epsilon are 0): with max-epsilon set, this node will refuse to train in it.")


# ---------------------------------------------------------------- data


@dataclass
class _Data:
    events: int
    users: int
    users_evaluated: int
    catalogue: Any


def _check_data(report: SiteReport, data_path: Path, store, settings, node=None) -> _Data | None:
    """Load the data as `load_node_data` does, but report every skipped row instead of logging it."""
    from fedtower.client.events import EventLog, merge_events
    from fedtower.client.local import cached_dataset, node_split
    from fedtower.client.state import StateError
    from fedtower.data.given import load_given_split
    from fedtower.data.loaders import load_event_log
    from fedtower.data.prepared import prepare_split
    from fedtower.data.schema import Dataset
    from fedtower.data.validation import DataValidationError

    try:
        catalogue = cached_dataset(settings.data).catalogue
    except (DataValidationError, FileNotFoundError, ValueError) as err:
        report.add("catalogue", PROBLEM, f"The run's catalogue ({settings.data!r}) cannot be loaded: {err}")
        return None
    from fedtower.client.node_settings import NodeSettings

    node = node if node is not None else NodeSettings()
    given = None
    try:
        if node.test_path is not None:  # the site's own held-out events: data-path is all train
            given = load_given_split(data_path, node.test_path, catalogue=catalogue, order=settings.event_order)
            events, loaded = given.train_events, given.report
        else:
            events, loaded = load_event_log(data_path, catalogue=catalogue, on_error="skip",
                                            order=settings.event_order)  # fmt: skip
    except (DataValidationError, FileNotFoundError, ValueError, OSError) as err:
        report.add("data", PROBLEM, str(err))
        return None
    reports = [loaded]
    if store is not None and EventLog(store).exists():
        try:
            recorded, recorded_report = EventLog(store).load(catalogue)
        except StateError as err:
            report.add("event log", PROBLEM, str(err))
        else:
            events = merge_events(events, recorded)
            reports.append(recorded_report)
    report.data_reports = [r.to_dict() for r in reports]
    report.issue_lines = [str(issue) for r in reports for issue in r.issues]
    report.issues_omitted = sum(r.issues_omitted for r in reports)
    skipped = [r for r in reports if r.rows_skipped]
    for r in skipped:
        report.add("data rows", PROBLEM, f"{r.rows_skipped:,} of {r.rows_read:,} rows in {', '.join(r.sources)} "
                                         "would be skipped by the node (listed below).")  # fmt: skip
    if events.empty:
        report.add("data", PROBLEM, f"{data_path} holds no valid events: the node has nothing to train on.")
        return None
    if given is not None:
        given.train_events = events
        split = given.prepare()
    else:
        split = prepare_split(Dataset(catalogue, events, name=str(data_path)), spec=node_split(settings, node))
    report.add("evaluation", OK if node.evaluate else WARNING,
               f"split {split.protocol}" + ("" if node.evaluate else "; the node refuses every evaluation "
                                            "(node config evaluate = false)"))  # fmt: skip
    data = _Data(len(events), len(split.users), int((split.test.lengths() > 0).sum()), catalogue)
    read = sum(r.rows_read for r in reports)
    report.add("data", OK if not skipped else WARNING,
               f"{data.events:,} valid events of {read:,} rows, {data.users:,} users ({data.users_evaluated:,} "
               f"with held-out interactions); catalogue of {len(catalogue):,} items from {settings.data!r}.")
    return data


# ---------------------------------------------------------------- what is shared


def _describe_shared(report: SiteReport, settings, data: _Data | None) -> None:
    """Every record of every reply, built by the handlers' own reply builders."""
    from flwr.app import ArrayRecord

    from fedtower.client.handlers import (
        client_dp_train_content,
        dp_evaluate_content,
        evaluate_content,
        ledger_record_placeholder,
        private_train_content,
        train_content,
        withheld_evaluate_content,
    )
    from fedtower.client.local import build_model, run_dataset
    from fedtower.metrics import RankingSums
    from fedtower.privacy.dp_evaluation import NoisyEvaluation

    catalogue = data.catalogue if data else run_dataset(settings).catalogue
    model = build_model(settings, catalogue, num_users=max(data.users if data else 1, 1))
    arrays = ArrayRecord(model.item_tower_state())
    # Placeholder values: only the records' names, keys and shapes are shown.
    entry = ledger_record_placeholder(replace(settings, run_name=settings.run_name or "run"))
    replies = {
        "train (DP on)": private_train_content(arrays, entry, exhausted=False),
        "train (DP off)": train_content(arrays, num_examples=0, train_loss=0.0, seconds=0.0),
        "train (client-level DP)": client_dp_train_content(arrays),
        "evaluate (DP off)": evaluate_content(RankingSums()),
        "evaluate (DP on)": dp_evaluate_content(NoisyEvaluation(k=settings.k), entry),
        "evaluate (withheld)": withheld_evaluate_content("placeholder"),
    }
    report.shared = {name: _records(content) for name, content in replies.items()}


def _records(content) -> list[dict]:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    records = []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            items = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in record.items()]
            records.append({"record": name, "kind": "arrays", "items": items})
        elif isinstance(record, (MetricRecord, ConfigRecord)):
            kind = "metrics" if isinstance(record, MetricRecord) else "config"
            records.append({"record": name, "kind": kind, "keys": list(record.keys())})
        else:  # a record kind this check does not know: show it rather than hide it
            records.append({"record": name, "kind": type(record).__name__, "keys": list(record.keys())})
    return records


# ---------------------------------------------------------------- text


def _table(headers: list[str], rows: list[list[str]], width: int = 110) -> str:
    """Left-aligned columns; the last one wraps under itself."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)][:-1]
    indent = sum(widths) + 2 * len(widths)
    wrap = max(width - indent, 30)

    def line(cells: list[str]) -> str:
        head = "".join(f"{cell:<{w}}  " for cell, w in zip(cells, widths))
        body = textwrap.wrap(cells[-1], wrap, break_on_hyphens=False) or [""]
        return "\n".join([head + body[0], *(" " * indent + more for more in body[1:])]).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths] + ["-" * len(headers[-1])]),
                      *(line(r) for r in rows)])  # fmt: skip


def render(report: SiteReport, max_issues: int = 20) -> str:
    lines = [f"Site check: data {report.data_path}, state {report.state_dir}", ""]
    lines.append(_table(["check", "status", "detail"], [[c.name, c.status.upper(), c.detail] for c in report.checks]))
    if report.issue_lines:
        shown = report.issue_lines[:max_issues]
        lines += ["", f"Rows the node would skip (first {len(shown)}):", *(f"  {line}" for line in shown)]
        omitted = report.issues_omitted + len(report.issue_lines) - len(shown)
        if omitted:
            lines.append(f"  ... and {omitted:,} more.")
    if report.shared:
        lines += ["", f"What this site sends to the coordinator (array shapes from {report.settings_source}):"]
        rows = []
        for message, records in report.shared.items():
            for rec in records:
                label = rec["record"] if rec["record"] == rec["kind"] else f"{rec['record']} ({rec['kind']})"
                if rec["kind"] == "arrays":
                    cells = [f"{i['name']}  {' x '.join(map(str, i['shape']))}" for i in rec["items"]]
                else:
                    cells = [", ".join(rec["keys"])]
                for cell in cells:
                    rows.append([message, label, cell])
                    message = label = ""  # name each reply and record once
        lines.append(_table(["reply", "record", "names and shapes / keys"], rows))
        lines.append("Nothing else from fedtower leaves the node: events, user ids, user embeddings and per-user "
                     "counts stay in the state dir.")  # fmt: skip
    lines.append("")
    if report.ready:
        lines.append(f"READY ({len(report.warnings)} warning(s)).")
    else:
        lines.append(f"NOT READY: {len(report.problems)} problem(s):")
        lines += [f"  - {c.name}: {c.detail}" for c in report.problems]
    return "\n".join(lines)
