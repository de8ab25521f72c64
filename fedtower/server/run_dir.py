"""A run's directory on the server: config snapshot, per-round metrics, checkpoints.

Layout::

    config.json                  snapshot of the run config
    metrics.json, metrics.csv    one row per (round, phase); both always parse
    checkpoints/round-0007.npz   model arrays and strategy state arrays
    checkpoints/round-0007.json  manifest: shapes, dtypes, SHA-256 of the npz, scalar state, extra
    checkpoints/latest.json      the commit point: names the newest complete checkpoint
    plots/*.png, summary.txt     the run report

Every file is replaced atomically, so a crash leaves each one old or new, never half written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedtower.data.schema import atomic_write_bytes, atomic_write_text

PHASES: tuple[str, ...] = ("train", "evaluate", "server")
DEFAULT_KEEP = 3

_RESERVED_COLUMNS = ("round", "phase")
# npz member prefixes; they keep model arrays and strategy state apart, and no key
# can clash with np.savez's own keyword arguments.
_ARRAY_PREFIX = "array:"
_STATE_PREFIX = "state:"
_CHECKPOINT_FILE = re.compile(r"^round-(\d+)\.(npz|json)$")
_MANIFEST_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint on disk is unreadable, corrupt, or disagrees with its manifest."""


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class RunDirectory:
    """The files of one server run. Reopening an existing directory resumes its history."""

    def __init__(self, path: str | Path, *, create: bool = True, keep: int = DEFAULT_KEEP):
        self._path = Path(path)
        if create:
            self._path.mkdir(parents=True, exist_ok=True)
        elif not self._path.is_dir():
            raise FileNotFoundError(f"The run directory {self._path} does not exist.")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive number of checkpoints; got {keep!r}.")
        self.keep = keep
        self._history = self._read_history()

    # ------------------------------------------------------------ paths

    @property
    def path(self) -> Path:
        return self._path

    @property
    def checkpoint_dir(self) -> Path:
        return self._path / "checkpoints"

    @property
    def plots_dir(self) -> Path:
        return self._path / "plots"

    def plot_path(self, name: str) -> Path:
        """plots/<name>.png; the plots folder is created."""
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"A plot name must be a plain file name; got {name!r}.")
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        return self.plots_dir / (name if name.endswith(".png") else f"{name}.png")

    # ------------------------------------------------------------ config and summary

    def write_config(self, config: Mapping[str, Any]) -> None:
        try:
            text = json.dumps(dict(config), sort_keys=True, indent=2)
        except TypeError as err:
            raise ValueError(f"The run config cannot be written as JSON ({err}).") from None
        atomic_write_text(self._path / "config.json", text + "\n")

    def read_config(self) -> dict[str, Any]:
        path = self._path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; this run's config was never written.")
        return _read_json(path, ValueError)

    def write_summary(self, text: str) -> None:
        atomic_write_text(self._path / "summary.txt", text if text.endswith("\n") else text + "\n")

    # ------------------------------------------------------------ metrics

    def record_round(self, server_round: int, phase: str, metrics: Mapping[str, float | int]) -> None:
        """Add one row to metrics.json and metrics.csv.

        Recording a (round, phase) again replaces its row: a resumed run re-does
        the round it crashed in. Rows are kept in round order, then PHASES order.
        """
        server_round = _check_round(server_round)
        if phase not in PHASES:
            raise ValueError(f"Unknown phase {phase!r}; expected one of {', '.join(PHASES)}.")
        row: dict[str, Any] = {"round": server_round, "phase": phase, **_clean_metrics(metrics)}
        rows = [old for old in self._history if (old["round"], old["phase"]) != (server_round, phase)]
        rows.append(row)
        rows.sort(key=lambda r: (r["round"], PHASES.index(r["phase"])))

        encoded = [{name: _encode_metric(value) for name, value in r.items()} for r in rows]
        atomic_write_text(self._path / "metrics.json", json.dumps(encoded, indent=1, allow_nan=False) + "\n")
        atomic_write_text(self._path / "metrics.csv", _history_csv(rows))
        self._history = rows

    def history(self) -> list[dict[str, Any]]:
        """Rows {round, phase, **metrics}, in round order; copies, safe to modify."""
        return [dict(row) for row in self._history]

    def _read_history(self) -> list[dict[str, Any]]:
        path = self._path / "metrics.json"
        if not path.exists():
            return []
        rows = _read_json(path, ValueError)
        if not isinstance(rows, list) or not all(
            isinstance(r, dict) and isinstance(r.get("round"), int) and r.get("phase") in PHASES for r in rows
        ):
            raise ValueError(f"{path} is not a list of {{round, phase, ...metrics}} rows.")
        return [{name: _decode_metric(name, value) for name, value in r.items()} for r in rows]

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self,
        server_round: int,
        arrays: Mapping[str, np.ndarray],
        strategy_state: Mapping[str, np.ndarray | float | int | str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write checkpoints/round-NNNN.{npz,json}, then point latest.json at it, then prune.

        Returns the manifest's path. Array order is preserved on load.
        """
        server_round = _check_round(server_round)
        model_arrays = _checked_arrays(arrays, "model array")
        state_arrays, state_scalars = _split_strategy_state(strategy_state or {})
        payload = {f"{_ARRAY_PREFIX}{name}": array for name, array in model_arrays.items()}
        payload |= {f"{_STATE_PREFIX}{name}": array for name, array in state_arrays.items()}
        buffer = io.BytesIO()
        np.savez(buffer, **payload)
        data = buffer.getvalue()

        stem = f"round-{server_round:04d}"
        manifest = {
            "format": _MANIFEST_FORMAT,
            "round": server_round,
            "npz": f"{stem}.npz",
            "sha256": hashlib.sha256(data).hexdigest(),
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "arrays": _describe(model_arrays),
            "strategy_arrays": _describe(state_arrays),
            "strategy_scalars": state_scalars,
            "extra": dict(extra or {}),
        }
        try:  # before anything is written, so a bad `extra` leaves no orphan files
            manifest_text = json.dumps(manifest, indent=2)
        except (TypeError, ValueError) as err:
            raise ValueError(f"The checkpoint's extra data must be JSON-serialisable ({err}).") from None

        directory = self.checkpoint_dir
        atomic_write_bytes(directory / f"{stem}.npz", data)
        atomic_write_text(directory / f"{stem}.json", manifest_text + "\n")
        # latest.json is the commit point: until it is replaced, readers load the previous checkpoint.
        pointer = {"round": server_round, "manifest": f"{stem}.json"}
        atomic_write_text(directory / "latest.json", json.dumps(pointer) + "\n")
        self._prune(server_round)
        return directory / f"{stem}.json"

    def load_latest_checkpoint(self) -> Checkpoint | None:
        """The checkpoint latest.json names, hash-checked; None when none was committed."""
        pointer_path = self.checkpoint_dir / "latest.json"
        if not pointer_path.exists():
            return None
        pointer = _read_json(pointer_path, CheckpointError)
        name = pointer.get("manifest") if isinstance(pointer, dict) else None
        if not isinstance(name, str) or not _CHECKPOINT_FILE.match(name):
            raise CheckpointError(f"{pointer_path} does not name a checkpoint manifest.")
        return self._load(self.checkpoint_dir / name)

    def load_checkpoint(self, server_round: int) -> Checkpoint:
        """The checkpoint of one round, hash-checked."""
        server_round = _check_round(server_round)
        return self._load(self.checkpoint_dir / f"round-{server_round:04d}.json")

    def _load(self, manifest_path: Path) -> Checkpoint:
        if not manifest_path.exists():
            raise CheckpointError(f"The checkpoint manifest {manifest_path} does not exist.")
        manifest = _read_json(manifest_path, CheckpointError)
        try:
            npz_path = self.checkpoint_dir / Path(manifest["npz"]).name
            expected_digest = manifest["sha256"]
            array_specs, state_specs = manifest["arrays"], manifest["strategy_arrays"]
            scalars, extra, server_round = manifest["strategy_scalars"], manifest["extra"], manifest["round"]
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"The checkpoint manifest {manifest_path} lacks {err}.") from None

        try:
            data = npz_path.read_bytes()
        except OSError as err:
            raise CheckpointError(f"The checkpoint file {npz_path} cannot be read ({err}).") from None
        if hashlib.sha256(data).hexdigest() != expected_digest:
            raise CheckpointError(
                f"The checkpoint file {npz_path} is corrupt: its SHA-256 does not match the one "
                f"recorded in {manifest_path}."
            )
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                stored = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"The checkpoint file {npz_path} is not a readable npz ({err}).") from None

        arrays = _take_arrays(stored, _ARRAY_PREFIX, array_specs, npz_path)
        state_arrays = _take_arrays(stored, _STATE_PREFIX, state_specs, npz_path)
        if stored:
            raise CheckpointError(
                f"The checkpoint file {npz_path} holds arrays its manifest does not list: "
                f"{', '.join(sorted(stored))}."
            )
        return Checkpoint(
            round=server_round, arrays=arrays, strategy_state={**state_arrays, **scalars}, extra=extra
        )

    def _prune(self, saved_round: int) -> None:
        """Keep the checkpoint just committed and the newest `keep - 1` before it.

        Rounds above the saved one belong to an abandoned run that this one
        restarted from an earlier round, so they go too.
        """
        files_by_round: dict[int, list[Path]] = {}
        for path in self.checkpoint_dir.iterdir():
            match = _CHECKPOINT_FILE.match(path.name)
            if match:
                files_by_round.setdefault(int(match[1]), []).append(path)
        earlier = sorted((r for r in files_by_round if r < saved_round), reverse=True)
        kept = {saved_round, *earlier[: self.keep - 1]}
        for server_round, paths in files_by_round.items():
            if server_round not in kept:
                for path in paths:
                    path.unlink(missing_ok=True)


# ---------------------------------------------------------------- helpers


def _check_round(server_round: int) -> int:
    if isinstance(server_round, bool) or not isinstance(server_round, (int, np.integer)) or server_round < 0:
        raise ValueError(f"The server round must be a non-negative integer; got {server_round!r}.")
    return int(server_round)


def _read_json(path: Path, error: type[Exception]) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise error(f"{path} is not readable JSON ({err}).") from None


def _clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    clean: dict[str, float | int] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name or name in _RESERVED_COLUMNS:
            raise ValueError(f"{name!r} cannot be a metric name (empty, not a string, or reserved).")
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)
        ):
            raise TypeError(
                f"Metric {name!r} must be a single int or float per round; got {type(value).__name__}."
            )
        clean[name] = int(value) if isinstance(value, (int, np.integer)) else float(value)
    return clean


def _encode_metric(value: Any) -> Any:
    """Strict JSON has no NaN or infinity: NaN becomes null, ±inf the strings ±Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _decode_metric(name: str, value: Any) -> Any:
    if name in _RESERVED_COLUMNS:
        return value
    if value is None:
        return math.nan
    if value in ("Infinity", "-Infinity"):
        return float(value)
    return value


def _history_csv(rows: list[dict[str, Any]]) -> str:
    names = sorted({name for row in rows for name in row} - set(_RESERVED_COLUMNS))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*_RESERVED_COLUMNS, *names])
    for row in rows:
        # repr keeps floats exact and writes nan/inf, which pandas and float() read back.
        cells = ["" if name not in row else repr(row[name]) for name in names]
        writer.writerow([row["round"], row["phase"], *cells])
    return buffer.getvalue()


def _checked_arrays(arrays: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    checked: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Every {what} needs a non-empty string name; got {name!r}.")
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(
                f"The {what} {name!r} has dtype {array.dtype}, which cannot be saved without pickle."
            )
        checked[name] = array
    return checked


def _split_strategy_state(state: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays go into the npz; scalars (numbers, strings, None) into the JSON manifest."""
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            arrays[name] = value
        elif isinstance(value, np.generic):
            scalars[name] = value.item()
        elif value is None or isinstance(value, (bool, int, float, str)):
            scalars[name] = value
        else:
            raise TypeError(
                f"Strategy state {name!r} must be an array, number or string; got {type(value).__name__}."
            )
    return _checked_arrays(arrays, "strategy state array"), scalars


def _describe(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {name: {"shape": list(a.shape), "dtype": a.dtype.str} for name, a in arrays.items()}


def _take_arrays(
    stored: dict[str, np.ndarray], prefix: str, specs: Mapping[str, Any], npz_path: Path
) -> dict[str, np.ndarray]:
    """Pop the arrays the manifest lists (in its order) and check their shapes and dtypes."""
    taken: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        array = stored.pop(prefix + name, None)
        if array is None:
            raise CheckpointError(f"The checkpoint file {npz_path} lacks the array {name!r}.")
        if list(array.shape) != spec["shape"] or array.dtype.str != spec["dtype"]:
            raise CheckpointError(
                f"The array {name!r} in {npz_path} is {array.dtype.str}{list(array.shape)}, but "
                f"its manifest says {spec['dtype']}{spec['shape']}."
            )
        taken[name] = array
    return taken
