"""The privacy ledger: what each client spent in each round, signed by the client, kept by the server.

One `LedgerEntry` per client and round holds everything with privacy meaning
that left the client: ε before and after, δ, noise multiplier, sampling rate,
steps, clipping norm, accountant, and the accountant's whole history after the
round, so that ε can be recomputed from any single entry.

A client signs an entry with its Ed25519 key (`sign_entry`); the signed form is

    {"entry": {...}, "signature": "<base64>", "key_id": "<fingerprint>", "algorithm": "ed25519"}

and the signature covers b"fedtower-privacy-ledger/1\\n" followed by the entry's
canonical JSON (sorted keys, no spaces), so changing any field breaks it.

The server appends entries to `privacy_ledger.jsonl` in the run directory
(`ServerLedger`); an auditor verifies the signatures and recomputes every ε
with the independent accountant (`ServerLedger.verify_all`).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import io
import json
import logging
import math
import numbers
import os
import re
import stat
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ConfigRecord

from fedtower.data.schema import atomic_write_bytes, fsync_dir
from fedtower.privacy.accounting import (
    HistoryEntry,
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
    checked_history,
    entry_parameters,
    entry_steps,
    history_without,
    independent_epsilon,
    is_skellam_entry,
)
from fedtower.tables import render_table

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy_ledger.jsonl"
ENTRY_FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1 entries (before `added`, `randomness`, ...) still read and audit
UNITS: tuple[str, ...] = ("user", "interaction", "client")
# trained: DP-SGD ran and the item tower was released; budget-exhausted: nothing trained or released;
# evaluated: DP evaluation sums released; raw-evaluation: exact sums released (the site opted in).
STATUSES: tuple[str, ...] = ("trained", "budget-exhausted", "evaluated", "raw-evaluation")
# skellam: the distributed Skellam mechanism under secure aggregation (its trust assumptions in `trust`).
MECHANISMS: tuple[str, ...] = ("dp-sgd", "gaussian", "skellam", "none")
# item-statistics: one of the spectral DP tower's sums (fedtower.privacy.spectral), released instead of a tower.
# item-tower-delta-<codec>: the DP tower's delta from the received one, compressed after the noise
# (update-compression; post-processing, so the same guarantee as item-tower).
RELEASES: tuple[str, ...] = ("item-tower", "item-tower-delta-fp16", "item-tower-delta-int8", "item-statistics",
                             "evaluation-sums", "raw-evaluation", "nothing")  # fmt: skip
WEIGHTS: tuple[str, ...] = ("constant", "examples")
ACCOUNTANTS: tuple[str, ...] = ("rdp",)
ADJACENCY = {"user": "add-or-remove-one-user", "interaction": "add-or-remove-one-event",
             "client": "add-or-remove-one-client"}  # fmt: skip
# federation-declared: the public federation-wide population of a secure-aggregation run (dp-federation-users).
POPULATION_SOURCES: tuple[str, ...] = ("declared", "dp-count", "federation-declared", "unrecorded")
VERSIONED_LIBRARIES: tuple[str, ...] = ("fedtower", "opacus", "torch", "flwr")

SIGNATURE_ALGORITHM = "ed25519"
SIGNED_KEYS = frozenset({"entry", "signature", "key_id", "algorithm"})
_SIGNING_CONTEXT = b"fedtower-privacy-ledger/1\n"
_DEFAULT_PSEUDONYM_KEY = b"fedtower-node-pseudonym"

# An ε in the ledger and the one recomputed from its history may differ by this much, relatively.
RELATIVE_TOLERANCE = 1e-6
_JSON_FIELDS = ("history", "versions", "added", "hooks")  # sent inside a ConfigRecord as JSON strings
_FORMAT_2_FIELDS = ("added", "mechanism", "release", "adjacency", "population", "population_source",
                    "randomness", "raw_evaluation", "hooks", "sequence", "previous", "previous_in_run",
                    "signer")  # fmt: skip
_OPTIONAL_FIELDS = ("trust",)  # fields added within format 2: an entry written before them has none
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


class LedgerSignatureError(ValueError):
    """A signed ledger entry does not verify: it was changed after signing, or signed by another key."""


# ---------------------------------------------------------------- the entry


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose behaviour the ledger's numbers depend on."""
    versions = {}
    for name in VERSIONED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def pseudonymous_node_id(node_id: int, run: str, secret: bytes | None = None) -> str:
    """A stable pseudonym for a node within one run: "node-" and 16 hex digits of HMAC-SHA256.

    The ledger names nodes by this, not by Flower's node id. The run is part of
    the message, so one node has unrelated pseudonyms in different runs. Without
    a secret the key is a public constant: anyone who knows the run id can test
    guessed node ids (Flower's deployment ids are random 64-bit numbers, but
    simulation ids are small and easy to guess). With a secret, kept by whoever
    assigns the pseudonyms, they cannot be linked back to node ids.
    """
    if isinstance(node_id, bool) or not isinstance(node_id, int) or node_id < 0:
        raise ValueError(f"node_id must be a non-negative integer (Flower's node id); got {node_id!r}.")
    if not isinstance(run, str) or not run:
        raise ValueError(f"run must be a non-empty string (the run id); got {run!r}.")
    if secret is not None and (not isinstance(secret, bytes) or not secret):
        raise ValueError("secret must be non-empty bytes, or None for the public default key.")
    digest = hmac.new(secret or _DEFAULT_PSEUDONYM_KEY, f"{run}\n{node_id}".encode(), hashlib.sha256)
    return f"node-{digest.hexdigest()[:16]}"


def _field_name(name: str) -> str:
    return f"Ledger entry field {name!r}"


def _check_text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{_field_name(name)} must be a non-empty string; got {value!r}.")
    return value


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices or not isinstance(value, str):
        raise ValueError(f"{_field_name(name)} must be one of {', '.join(choices)}; got {value!r}.")
    return value


def _check_non_negative(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{_field_name(name)} must be a finite number of at least 0; got {value!r}.")
    return float(value)


def _check_versions(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{_field_name('versions')} must map library names to version strings; got {value!r}.")
    missing = [name for name in VERSIONED_LIBRARIES if name not in value]
    if missing:
        raise ValueError(f"{_field_name('versions')} has no version for {', '.join(missing)}.")
    return dict(value)


def _check_created_at(value: object) -> str:
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.utcoffset() is None or moment.utcoffset().total_seconds() != 0:
        raise ValueError(
            f"{_field_name('created_at')} must be an ISO 8601 time in UTC, e.g. 2025-01-31T12:00:00+00:00; "
            f"got {value!r}."
        )
    return value


@dataclass(frozen=True, eq=False)
class LedgerEntry:
    """What one client spent in one round. Every field is checked on construction."""

    run: str
    round: int
    node: str  # pseudonymous_node_id(...), never Flower's raw node id
    unit: str  # privacy unit: "user", "interaction" or "client"
    noise_multiplier: float
    sample_rate: float
    steps: int  # DP-SGD steps in this round; 0 when the round was refused
    max_grad_norm: float
    delta: float
    accountant: str  # "rdp"
    epsilon_before: float
    epsilon_after: float
    status: str  # "trained" or "budget-exhausted"
    weights: str  # aggregation weight the client reported: "constant" or "examples" (leaks its size)
    history: tuple[HistoryEntry, ...]  # the accountant's whole history after this round
    versions: dict[str, str] = field(default_factory=library_versions, hash=False)
    created_at: str = field(default_factory=utc_now)
    # What this entry charged to the accountant, oldest first: history = previous history + added.
    # None: the round's own (noise_multiplier, sample_rate, steps), or nothing when steps = 0.
    # Entries are Gaussian triples or ["skellam", noise_multiplier, sample_rate, steps, l2, l1].
    added: tuple[HistoryEntry, ...] | None = None
    # "dp-sgd", "gaussian" (a DP evaluation or count), "skellam" (secure aggregation) or "none"
    mechanism: str = "dp-sgd"
    release: str = ""  # what left the node: item-tower, evaluation-sums, raw-evaluation, nothing ("" -> by status)
    adjacency: str = ""  # neighbouring datasets differ by one ... ("" -> by unit)
    population: int = 0  # the public number of privacy units q and delta were planned from (0: unrecorded)
    population_source: str = "unrecorded"  # declared by the site, or a DP count (charged in `added`)
    randomness: str = "unrecorded"  # where the DP randomness came from (a TEST-ONLY seed says so)
    raw_evaluation: bool = False  # the site opted in to releasing exact evaluation sums
    hooks: tuple[str, ...] = ()  # test-only hooks that were active (each voids the guarantee)
    # The chain: this node's entry count, and the digest of its previous signed record, overall and in
    # this run (record_digest; "" for the first). A deleted, reordered or replayed entry breaks it.
    sequence: int = 0  # 0: unrecorded (format 1, or an unsigned entry)
    previous: str = ""
    previous_in_run: str = ""
    signer: str = ""  # the node's Ed25519 public key (base64 of its 32 raw bytes) that signs this entry
    # The trust assumptions the release relies on, e.g. "secure-aggregation; >= 6 of 10 sites in every sum;
    # honest-but-curious coordinator" ("" for none). None: the entry was written before this field existed;
    # it then stays out of to_dict, so the entry's signed bytes do not change.
    trust: str | None = ""

    def __post_init__(self) -> None:
        checked = {
            "run": _check_text(self.run, "run"),
            "round": check_steps(self.round, name=_field_name("round")),
            "node": _check_text(self.node, "node"),
            "unit": _check_choice(self.unit, "unit", UNITS),
            "noise_multiplier": check_noise_multiplier(self.noise_multiplier, name=_field_name("noise_multiplier")),
            "sample_rate": check_sample_rate(self.sample_rate, name=_field_name("sample_rate")),
            "steps": check_steps(self.steps, name=_field_name("steps"), minimum=0),
            "max_grad_norm": check_noise_multiplier(self.max_grad_norm, name=_field_name("max_grad_norm")),
            "delta": check_delta(self.delta, name=_field_name("delta")),
            "accountant": _check_choice(self.accountant, "accountant", ACCOUNTANTS),
            "epsilon_before": _check_non_negative(self.epsilon_before, "epsilon_before"),
            "epsilon_after": _check_non_negative(self.epsilon_after, "epsilon_after"),
            "status": _check_choice(self.status, "status", STATUSES),
            "weights": _check_choice(self.weights, "weights", WEIGHTS),
            "history": tuple(checked_history(self.history, name=_field_name("history"))),
            "versions": _check_versions(self.versions),
            "created_at": _check_created_at(self.created_at),
            "mechanism": _check_choice(self.mechanism, "mechanism", MECHANISMS),
            "adjacency": _check_text(self.adjacency or ADJACENCY[self.unit], "adjacency")
            if self.unit in ADJACENCY else self.adjacency,
            "population": int(check_steps(self.population, name=_field_name("population"), minimum=0)),
            "population_source": _check_choice(self.population_source, "population_source", POPULATION_SOURCES),
            "randomness": _check_text(self.randomness, "randomness"),
        }
        if isinstance(self.hooks, (str, bytes)) or not all(isinstance(h, str) and h for h in self.hooks):
            raise ValueError(f"{_field_name('hooks')} must be a list of hook names; got {self.hooks!r}.")
        checked["hooks"] = tuple(self.hooks)
        checked["sequence"] = int(check_steps(self.sequence, name=_field_name("sequence"), minimum=0))
        for name in ("previous", "previous_in_run"):
            value = getattr(self, name)
            if not isinstance(value, str) or (value and not _HEX_DIGEST.fullmatch(value)):
                raise ValueError(f"{_field_name(name)} must be a SHA-256 hex digest or empty; got {value!r}.")
        if not isinstance(self.signer, str):
            raise ValueError(f"{_field_name('signer')} must be a base64 public key or empty; got {self.signer!r}.")
        if self.trust is not None and not isinstance(self.trust, str):
            raise ValueError(f"{_field_name('trust')} must be a string (the trust assumptions); got {self.trust!r}.")
        if not isinstance(self.raw_evaluation, bool):
            raise ValueError(f"{_field_name('raw_evaluation')} must be true or false; got {self.raw_evaluation!r}.")
        if self.release:
            checked["release"] = _check_choice(self.release, "release", RELEASES)
        if self.added is not None:
            checked["added"] = tuple(checked_history(self.added, name=_field_name("added")))
        status, steps = checked["status"], checked["steps"]
        if status == "trained" and steps == 0:
            raise ValueError("A ledger entry with status 'trained' must record at least one step.")
        if status != "trained" and steps != 0:
            raise ValueError(f"A ledger entry with status {status!r} must record 0 steps; got {steps}.")
        if status == "raw-evaluation" and not self.raw_evaluation:
            raise ValueError("A 'raw-evaluation' ledger entry needs raw_evaluation = true (the site's opt-in).")
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if status == "evaluated" and not self.charged:
            raise ValueError("An 'evaluated' ledger entry must record the DP evaluation it charged in 'added'.")
        if status == "raw-evaluation" and self.charged:
            raise ValueError("A 'raw-evaluation' ledger entry charges nothing ('added' must be empty).")
        if self.mechanism == "skellam":
            if status == "trained" and not any(is_skellam_entry(entry) for entry in self.charged):
                raise ValueError("A trained 'skellam' ledger entry must record its Skellam release in 'added' "
                                 '(["skellam", noise_multiplier, sample_rate, steps, l2_sensitivity, '
                                 "l1_sensitivity]).")  # fmt: skip
            if not self.trust:
                raise ValueError("A 'skellam' ledger entry must state the trust assumptions its guarantee relies "
                                 "on in 'trust' (secure aggregation, the threshold of sites in every sum, ...).")

    # ------------------------------------------------------------ derived
    @property
    def charged(self) -> tuple[HistoryEntry, ...]:
        """What this entry charged to the accountant (history = previous history + charged)."""
        if self.added is not None:
            return self.added
        return ((self.noise_multiplier, self.sample_rate, self.steps),) if self.steps else ()

    @property
    def released(self) -> str:
        return self.release or {"trained": "item-tower", "budget-exhausted": "nothing",
                                "evaluated": "evaluation-sums", "raw-evaluation": "raw-evaluation"}[self.status]

    @property
    def is_test_only(self) -> bool:
        """A test-only hook was active (a seeded noise, less noise, no clipping): the release is not private."""
        return self.randomness.startswith("TEST-ONLY") or bool(self.hooks)

    # ------------------------------------------------------------ dicts

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: every field, "history" as lists, and "format"."""
        body: dict[str, Any] = {"format": ENTRY_FORMAT}
        for item in fields(self):
            body[item.name] = getattr(self, item.name)
        body["history"] = [list(entry) for entry in self.history]
        body["added"] = [list(entry) for entry in self.charged]
        body["release"] = self.released
        body["hooks"] = list(self.hooks)
        body["versions"] = dict(self.versions)
        if self.trust is None:  # written before the field existed: its signed bytes have no "trust"
            del body["trust"]
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEntry:
        """The entry of a to_dict() dict; a missing, unknown or ill-typed field raises ValueError naming it."""
        if not isinstance(data, Mapping):
            raise ValueError(f"A ledger entry must be a dict; got {type(data).__name__}.")
        if "format" not in data:
            raise ValueError("The ledger entry has no 'format' field.")
        if data["format"] not in READABLE_FORMATS or isinstance(data["format"], bool):
            raise ValueError(f"The ledger entry's 'format' is {data['format']!r}; this version reads "
                             f"{', '.join(map(str, READABLE_FORMATS))}.")  # fmt: skip
        names = [item.name for item in fields(cls)]
        optional = (*_FORMAT_2_FIELDS, *_OPTIONAL_FIELDS) if data["format"] == 1 else _OPTIONAL_FIELDS
        missing = [name for name in names if name not in data and name not in optional]
        if missing:
            raise ValueError(f"The ledger entry has no {', '.join(repr(m) for m in missing)} field.")
        unknown = sorted(set(data) - set(names) - {"format"})
        if unknown:
            raise ValueError(f"The ledger entry has unknown fields {unknown}.")
        if "trust" in data and data["trust"] is None:
            raise ValueError(f"{_field_name('trust')} must be a string (the trust assumptions); got None.")
        absent = {name: None for name in _OPTIONAL_FIELDS if name not in data}
        return cls(**{name: data[name] for name in names if name in data}, **absent)

    # ------------------------------------------------------------ Flower records

    def to_config_record(self) -> ConfigRecord:
        """The entry as a flat ConfigRecord for a Flower reply; history and versions travel as JSON strings."""
        return ConfigRecord(_flat_record(self.to_dict()))

    @classmethod
    def from_config_record(cls, record: Mapping[str, Any]) -> LedgerEntry:
        """The entry of a reply's ledger record, plain or signed (the signature is not checked here)."""
        data = {k: v for k, v in dict(record).items() if k not in SIGNED_KEYS}
        return cls.from_dict(_unflat_record(data))

    def canonical_json(self) -> bytes:
        return canonical_json(self.to_dict())

    def __eq__(self, other: object) -> bool:  # by content: derived fields given or not are the same entry
        return isinstance(other, LedgerEntry) and self.to_dict() == other.to_dict()

    __hash__ = None


def canonical_json(data: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, strict JSON (no NaN): the bytes that get signed."""
    try:
        return json.dumps(dict(data), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise ValueError(f"The ledger entry is not strict JSON ({err}).") from None


def _flat_record(entry_dict: Mapping[str, Any]) -> dict[str, Any]:
    flat = dict(entry_dict)
    for name in _JSON_FIELDS:
        flat[name] = json.dumps(flat[name], sort_keys=True, separators=(",", ":"))
    return flat


def _unflat_record(record: Mapping[str, Any]) -> dict[str, Any]:
    data = dict(record)
    for name in _JSON_FIELDS:
        if name not in data:
            if name in _FORMAT_2_FIELDS and data.get("format") == 1:
                continue
            raise ValueError(f"The ledger record has no {name!r} field.")
        if not isinstance(data[name], str):
            raise ValueError(
                f"The ledger record's {name!r} field must be a JSON string; got {type(data[name]).__name__}."
            )
        try:
            data[name] = json.loads(data[name])
        except ValueError:
            raise ValueError(f"The ledger record's {name!r} field is not valid JSON.") from None
    return data


# ---------------------------------------------------------------- signing


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """16 hex digits of SHA-256 over the raw public key; names the key in signed entries."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_text(public_key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key in base64: how an entry names its signer."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_key_from_text(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, TypeError, ValueError):
        raise LedgerSignatureError(f"{text!r} is not a base64 Ed25519 public key.") from None


def record_digest(record: Mapping[str, Any] | LedgerEntry) -> str:
    """SHA-256 over a ledger line's canonical JSON (the signed record as written): what the chain links."""
    if isinstance(record, LedgerEntry):
        return hashlib.sha256(record.canonical_json()).hexdigest()
    return hashlib.sha256(canonical_json(record)).hexdigest()


def entry_of(record: Mapping[str, Any] | LedgerEntry) -> LedgerEntry:
    """The entry of a ledger line (a signed record or a plain entry dict)."""
    return _parse_record(record)[0]


def entry_dicts(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The entry dicts of ledger lines, signed or not (what a report or a benchmark reads)."""
    return [entry_of(record).to_dict() for record in records]


def save_signing_key(private_key: Ed25519PrivateKey, path: str | Path) -> None:
    """Write the private key as unencrypted PKCS#8 PEM, readable by its owner only (0600)."""
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = Path(path)
    atomic_write_bytes(path, pem)  # mkstemp creates the file 0600 before a byte is written
    os.chmod(path, 0o600)


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Read a key save_signing_key wrote; refuses a key file that others can read, as ssh does."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"The signing key {path} can be read by other users (mode {mode:04o}); run `chmod 600 {path}`."
        )
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key.")
    return key


def save_public_key(public_key: Ed25519PublicKey, path: str | Path) -> None:
    """Write the public key as SubjectPublicKeyInfo PEM (0644: it is public)."""
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = Path(path)
    atomic_write_bytes(path, pem)
    os.chmod(path, 0o644)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    path = Path(path)
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key.")
    return key


def sign_entry(entry: LedgerEntry, private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The signed form of `entry`: {"entry", "signature", "key_id", "algorithm"}."""
    body = entry.to_dict()
    signature = private_key.sign(_SIGNING_CONTEXT + canonical_json(body))
    return {
        "entry": body,
        "signature": base64.b64encode(signature).decode(),
        "key_id": public_key_fingerprint(private_key.public_key()),
        "algorithm": SIGNATURE_ALGORITHM,
    }


def _check_signed_shape(signed: object) -> Mapping[str, Any]:
    if not isinstance(signed, Mapping) or set(signed) != SIGNED_KEYS:
        keys = sorted(signed) if isinstance(signed, Mapping) else type(signed).__name__
        raise ValueError(f"A signed ledger entry has exactly the fields {sorted(SIGNED_KEYS)}; got {keys}.")
    if signed["algorithm"] != SIGNATURE_ALGORITHM:
        raise ValueError(f"Signed ledger entries use {SIGNATURE_ALGORITHM}; got {signed['algorithm']!r}.")
    if not isinstance(signed["entry"], Mapping):
        raise ValueError("The 'entry' of a signed ledger entry must be a dict.")
    return signed


def verify_entry(signed: Mapping[str, Any], public_key: Ed25519PublicKey | None = None) -> LedgerEntry:
    """The entry of a signed dict, once its signature verifies with `public_key`.

    Without `public_key`, the key the entry names as its `signer` (that only shows the entry
    was not changed since its signer signed it; who the signer is needs a registered key).
    Raises LedgerSignatureError when any signed byte changed or another key signed it.
    """
    signed = _check_signed_shape(signed)
    body = signed["entry"]
    where = f"The ledger entry for node {body.get('node')!r}, round {body.get('round')!r}"
    if public_key is None:
        if not body.get("signer"):
            raise LedgerSignatureError(f"{where} names no signer key, so its signature cannot be checked.")
        public_key = public_key_from_text(body["signer"])
    expected_id = public_key_fingerprint(public_key)
    if signed["key_id"] != expected_id:
        raise LedgerSignatureError(f"{where} was signed by key {signed['key_id']!r}, not by key {expected_id!r}.")
    try:
        signature = base64.b64decode(signed["signature"], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise LedgerSignatureError(f"{where} has a signature that is not base64.") from None
    try:
        public_key.verify(signature, _SIGNING_CONTEXT + canonical_json(body))
    except InvalidSignature:
        raise LedgerSignatureError(
            f"{where} does not match its signature: it was changed after it was signed, or signed by another key."
        ) from None
    return LedgerEntry.from_dict(body)


def signed_to_config_record(signed: Mapping[str, Any]) -> ConfigRecord:
    """A signed entry as one flat ConfigRecord: the entry's fields plus signature, key_id and algorithm."""
    signed = _check_signed_shape(signed)
    LedgerEntry.from_dict(signed["entry"])  # send nothing the server would refuse
    flat = _flat_record(signed["entry"])
    flat |= {"signature": signed["signature"], "key_id": signed["key_id"], "algorithm": signed["algorithm"]}
    return ConfigRecord(flat)


def signed_from_config_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The signed dict of signed_to_config_record's record (its signature is not checked here)."""
    data = dict(record)
    missing = sorted((SIGNED_KEYS - {"entry"}) - set(data))
    if missing:
        raise ValueError(f"The ledger record is not signed: it has no {', '.join(repr(m) for m in missing)} field.")
    signature = {name: data.pop(name) for name in ("signature", "key_id", "algorithm")}
    return {"entry": LedgerEntry.from_dict(_unflat_record(data)).to_dict(), **signature}


def ledger_line_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The ledger line of a reply's "ledger" ConfigRecord: the signed dict, or a plain entry dict."""
    if "signature" in record:
        return signed_from_config_record(record)
    return LedgerEntry.from_config_record(record).to_dict()


def _parse_record(record: object) -> tuple[LedgerEntry, bool]:
    """(entry, is_signed) of a ledger line: a signed dict, a plain entry dict, or a LedgerEntry."""
    if isinstance(record, LedgerEntry):
        return record, False
    if isinstance(record, Mapping) and "signature" in record:
        signed = _check_signed_shape(record)
        return LedgerEntry.from_dict(signed["entry"]), True
    return LedgerEntry.from_dict(record), False


# ---------------------------------------------------------------- the server's ledger


@dataclass(frozen=True)
class LedgerFinding:
    line: int
    node: str | None
    round: int | None
    problem: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (node {self.node}, round {self.round})" if self.node else "")
        return f"{where}: {self.problem}"


@dataclass
class LedgerAudit:
    """The result of ServerLedger.verify_all."""

    path: Path
    entries: int
    signatures_checked: bool
    findings: list[LedgerFinding]
    epsilon_by_node: dict[str, float]  # recomputed by the independent accountant, last entry of each node

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        signatures = "signatures verified" if self.signatures_checked else "signatures NOT checked (no keys given)"
        head = (
            f"Privacy ledger {self.path}: {self.entries} entries from {len(self.epsilon_by_node)} nodes; "
            f"{signatures}; every ε recomputed with the independent RDP accountant."
        )
        if self.ok:
            return f"{head}\nNo problems found."
        return "\n".join([head, f"{len(self.findings)} problem(s):", *(f"  {finding}" for finding in self.findings)])


class ServerLedger:
    """The run's privacy ledger: append-only JSON lines, each fsynced before append() returns.

    `path` is the run directory (the ledger is its privacy_ledger.jsonl) or a .jsonl file.
    A round a resumed server re-does is appended again: the client spent its budget twice.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path if path.suffix == ".jsonl" else path / LEDGER_FILE
        self._lock = threading.Lock()

    def append(self, record: Mapping[str, Any] | LedgerEntry) -> None:
        """Append a signed dict, a plain entry dict or a LedgerEntry; anything malformed raises ValueError.

        Signatures are not checked here (the server may not hold the keys); verify_all checks them.
        """
        entry, signed = _parse_record(record)
        if signed:
            line = canonical_json({name: record[name] for name in SIGNED_KEYS})
        else:
            line = entry.canonical_json()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                _cut_unfinished_line(fd, self.path)
                view = memoryview(line + b"\n")
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.path.parent)

    def entries(self) -> list[dict[str, Any]]:
        """Every complete line as written (signed or plain dicts), in order; [] before the first append."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        *lines, unfinished = data.split(b"\n")
        if unfinished:
            log.warning("Ledger %s ends with an unfinished line from an interrupted append; skipping it.", self.path)
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise ValueError(f"Ledger {self.path} is corrupt: line {number} is not a JSON object.")
            records.append(record)
        return records

    def latest_epsilon_by_node(self) -> dict[str, float]:
        """ε after each node's last entry, as the node reported it."""
        latest: dict[str, float] = {}
        for record in self.entries():
            entry, _ = _parse_record(record)
            latest[entry.node] = entry.epsilon_after
        return latest

    def verify_all(self, public_keys: Mapping[str, Ed25519PublicKey] | None = None) -> LedgerAudit:
        """Check every entry: signature (when keys are given, by node), ε after and before, history chain.

        ε after is recomputed from the entry's history, and ε before from that
        history less this round's steps, with `independent_epsilon`; a relative
        difference above 1e-6 is a finding. Each entry's history must extend the
        same node's previous entry by exactly this round's steps; otherwise the
        accountant was reset or a round is missing from the ledger.
        """
        findings: list[LedgerFinding] = []
        previous: dict[tuple[str, str], tuple[int, LedgerEntry]] = {}
        epsilon_by_node: dict[str, float] = {}
        records = self.entries()
        for line, record in enumerate(records, start=1):
            try:
                entry, signed = _parse_record(record)
            except ValueError as err:
                findings.append(LedgerFinding(line, None, None, f"unreadable entry: {err}"))
                continue
            problems = _signature_problems(record, entry, signed, public_keys)
            problems += _epsilon_problems(entry, previous.get((entry.run, entry.node)))
            findings.extend(LedgerFinding(line, entry.node, entry.round, problem) for problem in problems)
            previous[(entry.run, entry.node)] = (line, entry)
            epsilon_by_node[entry.node] = independent_epsilon(history=entry.history, delta=entry.delta)
        return LedgerAudit(
            path=self.path,
            entries=len(records),
            signatures_checked=public_keys is not None,
            findings=findings,
            epsilon_by_node=epsilon_by_node,
        )


class LedgerMonitor:
    """What the server remembers of each node's privacy history in a run, to refuse a node that went back.

    A node's accountant only grows: every entry's history must extend the history of the node's
    previous accepted entry (other runs on the same node may add releases in between). A history
    that is shorter or lower than what the node reported before means its state was reset or
    rolled back; a node that changes its pseudonym within a run is dodging exactly this check.
    The server then refuses the reply (nothing of it is aggregated) and logs why; the entry still
    goes into the ledger, since the node did release it.
    """

    def __init__(self, state: Mapping[str, Any] | None = None):
        self.nodes: dict[str, dict[str, Any]] = {}  # Flower node id (as text) -> {"node", "round", "history"}
        if state:
            self.load_state_dict(state)

    def problem(self, node_id: int, entry: LedgerEntry) -> str | None:
        """Why this entry must be refused, or None when it extends what the node reported before."""
        known = self.nodes.get(str(node_id))
        if known is None:
            return None
        if entry.node != known["node"]:
            return (f"node {node_id} names itself {entry.node} in round {entry.round} but {known['node']} in round "
                    f"{known['round']}: a new pseudonym within a run means its private state was replaced.")
        previous = [tuple(h) for h in known["history"]]
        before = history_without(entry.history, entry.charged)  # what the node says it had spent before
        if before is None or not history_extends(previous, before):
            return (f"node {entry.node} reports a privacy history in round {entry.round} that does not extend the "
                    f"one it reported in round {known['round']} ({_steps(entry.history)} steps now, "
                    f"{_steps(previous)} then): its accountant was reset or rolled back, so the epsilon it reports "
                    "undercounts what it spent.")
        return None

    def accept(self, node_id: int, entry: LedgerEntry) -> None:
        self.nodes[str(node_id)] = {"node": entry.node, "round": entry.round,
                                    "history": [list(h) for h in entry.history]}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"nodes": {k: dict(v) for k, v in self.nodes.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        nodes = state.get("nodes")
        if not isinstance(nodes, Mapping):
            raise ValueError("The ledger monitor's state has no 'nodes' mapping.")
        self.nodes = {str(k): {"node": v["node"], "round": int(v["round"]),
                               "history": checked_history(v["history"])} for k, v in nodes.items()}  # fmt: skip


def history_extends(old: list, new: list) -> bool:
    """Whether `new` is `old` with more releases composed onto it (the last entry may have grown)."""
    old, new = [tuple(h) for h in old], [tuple(h) for h in new]
    if not old:
        return True
    if len(new) < len(old) or new[: len(old) - 1] != old[:-1]:
        return False
    last, same = old[-1], new[len(old) - 1]
    return entry_parameters(same) == entry_parameters(last) and entry_steps(same) >= entry_steps(last)


def _steps(history) -> int:
    return sum(int(entry_steps(h)) for h in history)


def _signature_problems(
    record: object, entry: LedgerEntry, signed: bool, public_keys: Mapping[str, Ed25519PublicKey] | None
) -> list[str]:
    if public_keys is None:
        return []
    if not signed:
        return ["the entry is not signed."]
    key = public_keys.get(entry.node)
    if key is None:
        return ["no public key is known for this node, so its signature cannot be checked."]
    try:
        verify_entry(record, key)
    except ValueError as err:
        return [str(err)]
    return []


def _epsilon_problems(entry: LedgerEntry, previous: tuple[int, LedgerEntry] | None) -> list[str]:
    """ε after and before recomputed independently, and the history chained to the node's previous entry."""
    problems = []
    recomputed = independent_epsilon(history=entry.history, delta=entry.delta)
    if not _close(entry.epsilon_after, recomputed):
        problems.append(
            f"epsilon_after is {entry.epsilon_after!r} but its history gives {recomputed!r} "
            "(independent RDP accountant)."
        )
    before = _history_before(entry)
    if before is None:
        charged = [list(a) for a in entry.charged]
        problems.append(f"its history does not end with what this entry charged ({charged}): "
                        f"{entry.steps} steps at noise multiplier {entry.noise_multiplier} and sample rate "
                        f"{entry.sample_rate} for a trained round.")  # fmt: skip
        return problems
    recomputed_before = independent_epsilon(history=before, delta=entry.delta)
    if not _close(entry.epsilon_before, recomputed_before):
        problems.append(
            f"epsilon_before is {entry.epsilon_before!r} but the history before this round gives "
            f"{recomputed_before!r} (independent RDP accountant)."
        )
    if previous is not None and list(previous[1].history) != before:
        problems.append(
            f"its history does not continue this node's previous entry (line {previous[0]}): "
            "the accountant was reset or changed, or a round is missing from the ledger."
        )
    if entry.is_test_only:
        hooks = ", ".join([*entry.hooks, *([entry.randomness] if entry.randomness.startswith("TEST-ONLY") else [])])
        problems.append(f"a test-only hook was active ({hooks}): this release is not private.")
    return problems


def _close(reported: float, recomputed: float) -> bool:
    return math.isclose(reported, recomputed, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-12)


def _history_before(entry: LedgerEntry) -> list[HistoryEntry] | None:
    """The history without what this entry charged; None when the history does not end with it."""
    return history_without(entry.history, entry.charged)


def _cut_unfinished_line(fd: int, path: Path) -> None:
    """Drop a final line without its newline: an append that never returned. Call under the lock."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    data = os.pread(fd, size, 0)
    end = data.rfind(b"\n") + 1
    log.warning("Ledger %s ended with an unfinished line (%d bytes); cutting it off.", path, size - end)
    os.ftruncate(fd, end)


# ---------------------------------------------------------------- report


def _latest_per_round(entries: Iterable[Mapping[str, Any] | LedgerEntry]) -> dict[str, dict[int, LedgerEntry]]:
    """node -> round -> entry; a later entry of the same node and round replaces an earlier one."""
    by_node: dict[str, dict[int, LedgerEntry]] = {}
    for record in entries:
        entry, _ = _parse_record(record)
        by_node.setdefault(entry.node, {})[entry.round] = entry
    return by_node


def plot_epsilon(entries: Iterable[Mapping[str, Any] | LedgerEntry], out_path: str | Path) -> Path:
    """A PNG of ε after each round, one line per node; rounds a node refused are marked with an x."""
    by_node = _latest_per_round(entries)
    if not by_node:
        raise ValueError("The privacy ledger has no entries, so there is no ε to plot.")
    # matplotlib is imported here, not at module load: every ClientApp process imports this module.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for node in sorted(by_node):
        rounds = sorted(by_node[node])
        epsilons = [by_node[node][r].epsilon_after for r in rounds]
        (line,) = axes.plot(rounds, epsilons, marker="o", markersize=3, label=node)
        refused = [r for r in rounds if by_node[node][r].status == "budget-exhausted"]
        if refused:
            axes.plot(refused, [by_node[node][r].epsilon_after for r in refused], "x", color=line.get_color())
    axes.set_title(f"Privacy spent per node ({len(by_node)} nodes)")
    axes.set_xlabel("server round")
    axes.set_ylabel("ε after the round (cumulative)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if len(by_node) <= 12:  # beyond that a legend hides the lines
        axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    out_path = Path(out_path)
    atomic_write_bytes(out_path, buffer.getvalue())
    return out_path


def epsilon_table(entries: Iterable[Mapping[str, Any] | LedgerEntry]) -> str:
    """Final ε per node: node, unit, rounds trained, ε, δ and status of its last round."""
    entries = list(entries)
    by_node = _latest_per_round(entries)
    if not by_node:
        return "The privacy ledger has no entries, so there is nothing to list."
    headers = ["node", "unit", "rounds trained", "epsilon", "delta", "status"]
    trained_rounds: dict[str, set[int]] = {}
    for record in entries:  # every line: a round's evaluation entry must not hide its training one
        entry = _parse_record(record)[0]
        if entry.status == "trained":
            trained_rounds.setdefault(entry.node, set()).add(entry.round)
    rows = []
    for node in sorted(by_node):
        rounds = by_node[node]
        last = rounds[max(rounds)]
        trained = len(trained_rounds.get(node, ()))
        rows.append([node, last.unit, str(trained), f"{last.epsilon_after:.4f}", f"{last.delta:.3g}", last.status])
    return render_table(headers, rows, "Privacy spent per node (ε after its last round, at its δ)")
