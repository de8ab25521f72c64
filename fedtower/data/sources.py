"""Turn a data spec from the command line or run config into a Dataset.

A spec is either a folder (MovieLens in any of its layouts, or catalogue +
events in canonical columns) or `synthetic`, optionally with generator
settings: `synthetic:users=5000,items=3000,seed=1`. Synthetic is the default
everywhere, so every command runs on a fresh clone with no data.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from fedtower.data.loaders import load_dataset
from fedtower.data.schema import Dataset
from fedtower.data.synthetic import SyntheticConfig, generate
from fedtower.data.validation import OnError, ValidationReport

SYNTHETIC = "synthetic"
# Short spec keys for the synthetic generator's most used settings.
_ALIASES = {"users": "num_users", "items": "num_items", "categories": "num_categories",
            "events": "mean_events_per_user"}  # fmt: skip


def synthetic_config(spec: str) -> SyntheticConfig:
    """Parse `synthetic[:key=value,...]` into a SyntheticConfig."""
    _, _, settings = spec.partition(":")
    known = {f.name: f.type for f in fields(SyntheticConfig)}
    values: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in settings.split(","))):
        key, sep, raw = part.partition("=")
        name = _ALIASES.get(key.strip(), key.strip().replace("-", "_"))
        if not sep or name not in known:
            raise ValueError(
                f"Bad synthetic data setting {part!r}; use key=value with keys from "
                f"{sorted(set(_ALIASES) | set(known))}."
            )
        try:
            values[name] = float(raw) if "." in raw else int(raw)
        except ValueError:
            raise ValueError(
                f"Synthetic data setting {key!r} must be a number, got {raw!r}."
            ) from None
    return SyntheticConfig(**values)


def resolve_dataset(
    spec: str | None, *, on_error: OnError = "raise", order: str = "timestamp"
) -> tuple[Dataset, ValidationReport]:
    """Load a dataset from a folder path, or generate the synthetic default.

    `order = "file"` orders a catalogue + events folder's events by their place in the files (no timestamp
    column needed); MovieLens and synthetic data have timestamps and ignore it."""
    spec = (spec or SYNTHETIC).strip()
    if spec == SYNTHETIC or spec.startswith(SYNTHETIC + ":"):
        dataset = generate(synthetic_config(spec))
        rows = len(dataset.events)
        return dataset, ValidationReport(sources=[dataset.name], rows_read=rows, rows_kept=rows)
    return load_dataset(Path(spec).expanduser(), on_error=on_error, order=order)
