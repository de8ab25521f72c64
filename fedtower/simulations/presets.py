"""Run-config presets, and Flower's `--run-config` override syntax.

A preset is a TOML file of flat kebab-case run-config keys with text, whole
number, float or boolean values, which is all Flower's run config holds.
The presets shipped with fedtower live in the `presets/` folder next to
this module.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

RunConfig = dict[str, str | int | float | bool]

PRESETS_DIR = Path(__file__).with_name("presets")
_SCALARS = (str, int, float, bool)  # bool is an int, listed for the reader
# key=value, the value single-quoted, double-quoted or a run of non-space characters.
_OVERRIDE = re.compile(
    r"""(?P<key>[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)=(?P<value>'[^']*'|"(?:[^"\\]|\\.)*"|[^\s'"]+)(?=\s|$)"""
)


def list_presets() -> list[str]:
    """Names of the shipped presets (file names without `.toml`), sorted."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.toml"))


def describe_preset(name: str) -> str:
    """The first sentence of a shipped preset's leading comment (what `--list-presets` shows)."""
    comment = []
    for line in (PRESETS_DIR / f"{name}.toml").read_text().splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    text = " ".join(comment)
    end = re.search(r"\.(\s|$)", text)
    return text[: end.start() + 1] if end else text


def load_preset(name_or_path: str | Path) -> RunConfig:
    """A shipped preset by name, or any preset file by path (one with a `/` or ending in `.toml`)."""
    text = str(name_or_path)
    if text in list_presets():
        return _load_flat_toml(PRESETS_DIR / f"{text}.toml")
    if isinstance(name_or_path, Path) or "/" in text or text.endswith(".toml"):
        return _load_flat_toml(Path(text).expanduser())
    raise ValueError(
        f"There is no preset named {text!r}; the available presets are {list_presets()}, "
        "or give the path of a .toml file."
    )


def parse_overrides(text: str) -> RunConfig:
    """Parse a `--run-config` value: `key1=1 key2='text' key3=true key4=0.5`, or a .toml path.

    Values are TOML values, so text needs quotes; arrays, tables and dates
    are refused because the run config cannot hold them.
    """
    text = text.strip()
    if text.endswith(".toml") and "=" not in text:
        return _load_flat_toml(Path(text).expanduser())
    overrides: RunConfig = {}
    position = 0
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        match = _OVERRIDE.match(text, position)
        if match is None:
            token = text[position:].split(maxsplit=1)[0]
            raise ValueError(
                f"Run-config override {token!r} is not of the form key=value "
                "(e.g. num-server-rounds=5 data='synthetic' secure=true)."
            )
        key, raw = match["key"], match["value"]
        if key in overrides:
            raise ValueError(f"Run-config override {key!r} is given more than once.")
        overrides[key] = _toml_scalar(key, raw)
        position = match.end()
    return overrides


def _toml_scalar(key: str, raw: str) -> str | int | float | bool:
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        raise ValueError(
            f"Run-config override '{key}={raw}' has a value that is not a TOML value; "
            f"write text in quotes ({key}='{raw}'), booleans as true or false."
        ) from None
    if not isinstance(value, _SCALARS):
        raise ValueError(
            f"Run-config override '{key}={raw}' is a {type(value).__name__}, but run-config "
            "values must be text, whole numbers, floats or booleans."
        )
    return value


def _load_flat_toml(path: Path) -> RunConfig:
    try:
        with path.open("rb") as handle:
            table = tomllib.load(handle)
    except OSError as err:
        raise ValueError(f"Cannot read the preset file '{path}' ({err.strerror}).") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"The preset file '{path}' is not valid TOML ({err}).") from None
    for key, value in table.items():
        if not isinstance(value, _SCALARS):
            raise ValueError(
                f"In the preset file '{path}', key {key!r} holds a {type(value).__name__}, but "
                "run-config values must be text, whole numbers, floats or booleans (no tables)."
            )
    return table
