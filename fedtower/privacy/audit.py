"""The auditor's check of a privacy ledger: signatures, chains, and every epsilon recomputed independently.

`audit_records` reads the lines of a ledger (the server's `privacy_ledger.jsonl`,
or a site's own) and reports, per finding, the line, node and round:

- **signatures**: every line must be signed (Ed25519); it must verify with the
  key it names as `signer`, whose fingerprint is its `key_id`; with a key
  registry (`--keys DIR` of the sites' registered `.pub` files) that key must be
  registered, and every line of a node must be signed by keys of one site
  (a site's rotated keys are `site.pub`, `site.2.pub`, ...). Without a registry
  a node's key must not change.
- **chains**: each line names the digest of the node's previous line in the run
  (`previous_in_run`); a deleted, reordered or replayed line, or a node's first
  line of the run that names a predecessor the ledger lacks, breaks it. A
  site's own ledger is checked whole (`sequence` 1, 2, ... and `previous`).
- **epsilon**: recomputed from each line's history by fedtower's own RDP code
  (Opacus's orders), by Google's `dp-accounting` (RDP at the same orders, and
  PLD for a tighter value), side by side. A ledger epsilon that differs from
  dp-accounting's RDP by more than the tolerance (1% relative by default; the
  two implementations differ by up to 0.35% at fractional orders) is a finding.
  dp-accounting has no Skellam mechanism: for a history with a Skellam entry
  (secure aggregation) its columns are "n/a", and the epsilon is recomputed by
  fedtower's Skellam accountant alone (`fedtower.privacy.skellam`).
- **monotone**: a node's history must only grow, within and across its lines.
- **what was released**: exact evaluation sums (`raw-evaluation`) and any
  active test-only hook are findings: neither is covered by the guarantee.
- **server against site**: with a site's own ledger, every line the server kept
  for that site must be in it byte for byte, and every line the site released
  in the run must be in the server's.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtower.privacy.accounting import (
    DEFAULT_ORDERS,
    checked_history,
    has_skellam,
    history_without,
    independent_epsilon,
)
from fedtower.privacy.ledger import (
    LEDGER_FILE,
    LedgerEntry,
    LedgerFinding,
    _epsilon_problems,
    _parse_record,
    entry_of,
    history_extends,
    load_public_key,
    public_key_fingerprint,
    record_digest,
    verify_entry,
)

TOLERANCE = 0.01  # relative, ledger epsilon against dp-accounting's RDP at the same orders
PLD_DISCRETIZATION = 1e-3


# ---------------------------------------------------------------- dp-accounting


@functools.lru_cache(maxsize=4096)
def _dp_accounting_epsilons(history: tuple[tuple[float, float, int], ...], delta: float) -> tuple[float, float]:
    import dp_accounting
    from dp_accounting import pld, rdp

    logging.getLogger("absl").setLevel(logging.ERROR)  # it warns about orders it drops, which is expected
    events = []
    for noise_multiplier, sample_rate, steps in history:
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
        one = gaussian if sample_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)
        events.append(dp_accounting.SelfComposedDpEvent(one, steps))
    event = dp_accounting.ComposedDpEvent(events)
    rdp_accountant = rdp.RdpAccountant(orders=list(DEFAULT_ORDERS))
    rdp_accountant.compose(event)
    pld_accountant = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    pld_accountant.compose(event)
    return float(rdp_accountant.get_epsilon(delta)), float(pld_accountant.get_epsilon(delta))


def dp_accounting_epsilons(history: Iterable[Sequence[Any]], delta: float) -> tuple[float, float]:
    """(RDP, PLD) epsilon of a (noise_multiplier, sample_rate, steps) history at `delta`, by dp-accounting.

    (NaN, NaN) for a history with a Skellam entry: dp-accounting has no Skellam event (not applicable).
    """
    checked = tuple(checked_history(list(history)))
    if not checked:
        return 0.0, 0.0
    if has_skellam(checked):
        return math.nan, math.nan
    return _dp_accounting_epsilons(checked, float(delta))


def _epsilon_text(value: float) -> str:
    """An epsilon for a table: 4 decimals, or "n/a" where dp-accounting does not apply (NaN)."""
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


# ---------------------------------------------------------------- registered keys


@dataclass
class KeyRegistry:
    """The sites' registered ledger public keys: fingerprint -> (site name, key)."""

    keys: dict[str, tuple[str, Ed25519PublicKey]] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, path: str | Path) -> KeyRegistry:
        """Every `*.pub` PEM file in `path`; the site is the file name before its first dot."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"The key directory {path} does not exist.")
        registry = cls()
        for file in sorted(path.glob("*.pub")):
            try:
                key = load_public_key(file)
            except ValueError:
                continue  # e.g. an OpenSSH SuperNode key beside the ledger keys: not a ledger key
            registry.keys[public_key_fingerprint(key)] = (file.name.split(".")[0], key)
        if not registry.keys:
            raise ValueError(f"{path} holds no Ed25519 public key (*.pub, PEM).")
        return registry

    def site_of(self, key_id: str) -> str | None:
        found = self.keys.get(key_id)
        return found[0] if found else None


# ---------------------------------------------------------------- the audit


@dataclass
class AuditRow:
    line: int
    node: str
    round: int
    status: str
    delta: float
    epsilon_ledger: float
    epsilon_fedtower: float
    epsilon_rdp: float  # dp-accounting RDP (NaN: not applicable, a Skellam history)
    epsilon_pld: float  # dp-accounting PLD (NaN: not applicable)
    site: str | None = None


@dataclass
class AuditReport:
    source: str
    entries: int
    registry: bool
    findings: list[LedgerFinding]
    rows: list[AuditRow]
    tolerance: float
    parsed: list[LedgerEntry] = field(default_factory=list, repr=False)  # the entries the rows are of

    @property
    def ok(self) -> bool:
        return not self.findings

    def final_by_node(self) -> dict[str, AuditRow]:
        return {row.node: row for row in self.rows}

    @property
    def has_skellam(self) -> bool:
        """Some row's history has a Skellam entry, which dp-accounting cannot recompute."""
        return any(math.isnan(row.epsilon_rdp) for row in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (strict: a dp-accounting epsilon that does not apply is null, not NaN)."""
        def row(r: AuditRow) -> dict[str, Any]:
            return {k: _json_number(v) for k, v in vars(r).items()}

        return {"source": self.source, "entries": self.entries, "ok": self.ok,
                "signatures": "registered keys" if self.registry else "keys named by the entries (not registered)",
                "tolerance": self.tolerance,
                "findings": [vars(f) for f in self.findings], "rows": [row(r) for r in self.rows],
                "final": {node: row(r) for node, r in self.final_by_node().items()}}  # fmt: skip

    def summary(self) -> str:
        keys = "against registered keys" if self.registry else "against the keys the entries name (pass --keys)"
        head = (f"Privacy ledger {self.source}: {self.entries} entries from {len(self.final_by_node())} nodes; "
                f"signatures checked {keys}; epsilon recomputed by fedtower's RDP and by dp-accounting "
                f"(RDP, PLD); tolerance {self.tolerance:.1%}.")  # fmt: skip
        if self.has_skellam:
            head += f"\n{_SKELLAM_NOTE}"
        table = epsilon_table_text(self.rows)
        if self.ok:
            return f"{head}\n\n{table}\n\nNo problems found."
        problems = "\n".join(f"  {finding}" for finding in self.findings)
        return f"{head}\n\n{table}\n\n{len(self.findings)} problem(s):\n{problems}"


_SKELLAM_NOTE = ("dp-accounting has no Skellam mechanism: for histories with Skellam entries (secure "
                 "aggregation) its columns are n/a, and fedtower's Skellam accountant alone recomputes epsilon.")


def epsilon_table_text(rows: Sequence[AuditRow]) -> str:
    from fedtower.tables import render_table

    body = [[row.node, str(row.round), row.status, f"{row.delta:.3g}", f"{row.epsilon_ledger:.4f}",
             f"{row.epsilon_fedtower:.4f}", _epsilon_text(row.epsilon_rdp), _epsilon_text(row.epsilon_pld)]
            for row in rows]  # fmt: skip
    headers = ["node", "round", "status", "delta", "ledger", "fedtower RDP", "dp-acc RDP", "dp-acc PLD"]
    return render_table(headers, body, "Epsilon per node and round (cumulative)")


def read_ledger_file(path: str | Path) -> tuple[Path, list[dict]]:
    """The lines of a run directory's ledger, or of a .jsonl ledger file."""
    path = Path(path)
    file = path / LEDGER_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"No privacy ledger at {file}.")
    records = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"__unreadable__": f"line {number} is not JSON"})
    return file, records


def audit_records(
    records: Sequence[Mapping[str, Any]],
    *,
    source: str = "ledger",
    registry: KeyRegistry | None = None,
    node: str | None = None,
    site_ledgers: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    whole_chain: bool = False,
    tolerance: float = TOLERANCE,
) -> AuditReport:
    """Check every line (see the module docstring). `node`: only that node's lines (pseudonym, or a
    registered site name); `whole_chain`: the records are one node's complete own ledger."""
    findings: list[LedgerFinding] = []
    rows: list[AuditRow] = []
    last: dict[tuple[str, str], tuple[int, dict, LedgerEntry]] = {}  # (run, node) -> previous line
    seen_digests: dict[str, int] = {}
    node_keys: dict[str, tuple[str, str | None]] = {}  # node -> (key id, site)
    node_history: dict[str, list] = {}
    previous_record: tuple[int, dict] | None = None
    parsed: list[LedgerEntry] = []
    for line, record in enumerate(records, start=1):
        def add(problem: str, entry: LedgerEntry | None = None) -> None:
            findings.append(LedgerFinding(line, entry.node if entry else None, entry.round if entry else None,
                                          problem))  # fmt: skip

        if "__unreadable__" in record:
            add(f"unreadable entry: {record['__unreadable__']}")
            continue
        try:
            entry, signed = _parse_record(record)
        except ValueError as err:
            add(f"unreadable entry: {err}")
            continue
        site = _check_signature(record, entry, signed, registry, node_keys, add)
        if node is not None and node not in (entry.node, site):
            continue
        digest = record_digest(record)
        if digest in seen_digests:
            add(f"is a replay of line {seen_digests[digest]} (the same signed record twice).", entry)
        seen_digests[digest] = line
        # The chain within the run.
        key = (entry.run, entry.node)
        before = last.get(key)
        expected = record_digest(before[1]) if before else ""
        if signed and entry.previous_in_run != expected:
            if before is None:
                add("names a previous entry in this run that the ledger does not hold: an entry was deleted, "
                    "or the ledger is not the run's whole ledger.", entry)  # fmt: skip
            else:
                add(f"does not follow this node's previous entry in the run (line {before[0]}): an entry was "
                    "deleted, reordered or inserted.", entry)  # fmt: skip
        if before is not None and signed and entry.sequence <= before[2].sequence:
            add(f"its sequence number {entry.sequence} does not grow (line {before[0]} has "
                f"{before[2].sequence}): replayed or reordered.", entry)  # fmt: skip
        if whole_chain:
            _check_whole_chain(entry, record, previous_record, add)
            previous_record = (line, record)
        # Epsilon, recomputed three ways, and the history only growing.
        for problem in _epsilon_problems(entry, (before[0], before[2]) if before else None):
            if "does not continue" in problem or "test-only hook" in problem:
                continue  # said below, once
            add(problem, entry)
        previous_history = node_history.get(entry.node)
        if previous_history is not None and not history_extends(previous_history, list(entry.history)):
            add("its privacy history is shorter than, or differs from, what this node reported before: its "
                "accountant was reset or rolled back.", entry)  # fmt: skip
        elif before is not None and list(before[2].history) != _before(entry):
            add("releases that are not in this ledger happened between it and the node's previous entry "
                f"(line {before[0]}): another run on the node, or an entry missing here.", entry)  # fmt: skip
        node_history[entry.node] = list(entry.history)
        rdp_eps, pld_eps = dp_accounting_epsilons(entry.history, entry.delta)
        if rdp_eps and not math.isnan(rdp_eps) and not math.isclose(entry.epsilon_after, rdp_eps, rel_tol=tolerance):
            add(f"epsilon_after {entry.epsilon_after:.6g} differs from dp-accounting's RDP {rdp_eps:.6g} by "
                f"more than {tolerance:.1%}.", entry)  # fmt: skip
        if entry.status == "raw-evaluation" or (entry.raw_evaluation and entry.status == "evaluated"):
            add("exact evaluation sums were released (the site allowed raw evaluation): not covered by DP.", entry)
        if entry.is_test_only:
            hooks = [*entry.hooks, *([entry.randomness] if entry.randomness.startswith("TEST-ONLY") else [])]
            add(f"a test-only hook was active ({', '.join(hooks)}): this release is not private.", entry)
        parsed.append(entry)
        rows.append(AuditRow(line, entry.node, entry.round, entry.status, entry.delta, entry.epsilon_after,
                             independent_epsilon(history=entry.history, delta=entry.delta) if entry.history else 0.0,
                             rdp_eps, pld_eps, site))  # fmt: skip
        last[key] = (line, record, entry)
    for site_name, site_records in (site_ledgers or {}).items():
        findings += _compare_with_site(records, site_name, site_records)
    return AuditReport(source, len(records), registry is not None, findings, rows, tolerance, parsed)


def _before(entry: LedgerEntry) -> list | None:
    return history_without(entry.history, entry.charged)


def _check_signature(record, entry, signed, registry, node_keys, add) -> str | None:
    if not signed:
        add("the entry is not signed.", entry)
        return None
    try:
        verify_entry(record)  # against the key it names
    except ValueError as err:
        add(str(err), entry)
        return None
    key_id = record["key_id"]  # verify_entry checked it is the fingerprint of the key the entry names
    site = registry.site_of(key_id) if registry is not None else None
    if registry is not None and site is None:
        add(f"it is signed by key {key_id}, which is not registered.", entry)
    known = node_keys.get(entry.node)
    if known is None:
        node_keys[entry.node] = (key_id, site)
    elif known[0] != key_id:
        if registry is None:
            add(f"its signing key changed from {known[0]} to {key_id} (a rotation? pass --keys with the site's "
                "registered keys).", entry)  # fmt: skip
        elif site != known[1]:
            add(f"it is signed by {site or 'an unregistered key'}'s key, but the node's earlier entries by "
                f"{known[1]}'s: a swapped key.", entry)  # fmt: skip
        node_keys[entry.node] = (key_id, site or known[1])
    return site


def _check_whole_chain(entry, record, previous, add) -> None:
    """A site's own ledger: sequence 1, 2, 3, ... each naming the line before it."""
    expected_sequence = 1 if previous is None else entry_of(previous[1]).sequence + 1
    expected_previous = "" if previous is None else record_digest(previous[1])
    if entry.sequence != expected_sequence or entry.previous != expected_previous:
        where = "the first line" if previous is None else f"line {previous[0]}"
        add(f"breaks the node's own chain after {where} (sequence {entry.sequence}, expected "
            f"{expected_sequence}): a line was deleted, reordered, inserted or replayed.", entry)  # fmt: skip


def _compare_with_site(records, site_name: str, site_records) -> list[LedgerFinding]:
    """Every server line of the site's nodes must be in the site's own ledger, and the other way round
    for the runs the server ledger covers."""
    findings = []
    site_digests = {record_digest(r) for r in site_records}
    site_nodes = {(entry_of(r).run, entry_of(r).node) for r in site_records}
    runs = {entry_of(r).run for r in records if "__unreadable__" not in r}
    server_digests = set()
    for line, record in enumerate(records, start=1):
        if "__unreadable__" in record:
            continue
        entry = entry_of(record)
        server_digests.add(record_digest(record))
        if (entry.run, entry.node) in site_nodes and record_digest(record) not in site_digests:
            findings.append(LedgerFinding(line, entry.node, entry.round,
                                          f"is not in site {site_name}'s own ledger as the server holds it."))
    for record in site_records:
        entry = entry_of(record)
        if entry.run in runs and record_digest(record) not in server_digests:
            findings.append(LedgerFinding(0, entry.node, entry.round,
                                          f"site {site_name} released this entry but the server's ledger lacks it."))
    return findings


# ---------------------------------------------------------------- the report


def write_report(report: AuditReport, out_dir: str | Path) -> Path:
    """`audit.md` (findings, the epsilon table) and `epsilon.png` (epsilon over rounds per node) in out_dir."""
    from fedtower.privacy.ledger import plot_epsilon

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = report.rows
    lines = [f"# Privacy audit of {report.source}", "",
             f"{report.entries} ledger entries from {len(report.final_by_node())} nodes. Signatures checked "
             + ("against the registered keys." if report.registry else
                "against the keys the entries name: pass `--keys` to check them against the sites' registered "
                "keys."),
             f"Every epsilon is recomputed by fedtower's RDP code and by Google's dp-accounting (RDP at Opacus's "
             f"orders, and PLD); tolerance {report.tolerance:.1%} against dp-accounting's RDP.",
             *([_SKELLAM_NOTE] if report.has_skellam else []), ""]  # fmt: skip
    if report.ok:
        lines += ["**No problems found.**", ""]
    else:
        lines += [f"## {len(report.findings)} finding(s)", ""]
        lines += [f"- {finding}" for finding in report.findings] + [""]
    if rows:
        plot_epsilon(report.parsed, out / "epsilon.png")
        lines += ["## Epsilon over rounds", "", "![epsilon per node](epsilon.png)", "",
                  "| node | round | status | delta | ledger | fedtower RDP | dp-accounting RDP | dp-accounting PLD |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r.node} | {r.round} | {r.status} | {r.delta:.3g} | {r.epsilon_ledger:.4f} | "
                  f"{r.epsilon_fedtower:.4f} | {_epsilon_text(r.epsilon_rdp)} | {_epsilon_text(r.epsilon_pld)} |"
                  for r in rows]  # fmt: skip
    path = out / "audit.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "audit.json").write_text(json.dumps(report.to_dict(), indent=2))
    return path


def render_json(report: AuditReport) -> str:
    return json.dumps(report.to_dict(), indent=2)
