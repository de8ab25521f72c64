"""docs/configuration.md, generated from the settings classes themselves so that it cannot drift.

Each field of `RunSettings` (run config, kebab-case) and `NodeSettings` (a SuperNode's node config)
is listed with its type, its default and the comment beside it; a comment line above a group of
fields becomes that group's note. `fedtower config reference` prints the page; a test compares it
with the file in docs/.
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
from dataclasses import MISSING, fields

HEADER = """# Configuration reference

Generated from `fedtower/config.py` (run config) and `fedtower/client/node_settings.py` (node config)
by `fedtower config reference > docs/configuration.md`; a test fails when this file and the code differ.

Run-config keys are set in `pyproject.toml` (`[tool.flwr.app.config]`), in a preset TOML, with
`flwr run . --run-config "key=value"` or `fedtower simulate --run-config "key=value"`. Node-config keys
belong to each site's SuperNode (`flower-supernode --node-config "key=value"`): the coordinator's run
config cannot change them, which is why a site's privacy limits live there.
"""


def _comments(source: str) -> dict[int, str]:
    """Line number (1-based) -> the comment text on it."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string.lstrip("#").strip()
    return found


def _shown(default: object) -> str:
    """A default as the reader writes it in TOML: "" for empty text, true/false, none for unset."""
    if default == "":
        return '""'
    if default is None:
        return "none"
    return repr(default).lower() if isinstance(default, bool) else repr(default)


def _rows(cls) -> list[tuple[str, str, str, str, str]]:
    """(group note, key, type, default, description) for each public field, in source order."""
    source = inspect.getsource(cls)
    comments = _comments(source)
    lines = source.splitlines()
    defaults = {f.name: f.default for f in fields(cls)}
    tree = ast.parse(source)
    rows, note, last_line = [], "", 0
    for node in tree.body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        name = node.target.id
        if name == "raw" or name.startswith("_") or defaults.get(name, MISSING) is MISSING:
            continue
        # Comment lines right above the field (after the previous one) start a new group note.
        above = [comments[n] for n in range(last_line + 1, node.lineno) if n in comments
                 and lines[n - 1].strip().startswith("#")]  # fmt: skip
        if above:
            note = " ".join(above)
        last_line = node.end_lineno
        default = defaults[name]
        shown = _shown(default)
        rows.append((note, name.replace("_", "-"), ast.unparse(node.annotation), shown,
                     comments.get(node.lineno, "")))
    return rows


def _table(rows) -> list[str]:
    out, note = [], None
    for group, key, type_, default, text in rows:
        if group != note:
            note = group
            out += ["", f"*{group}*" if group else "", "", "| key | type | default | meaning |",
                    "|---|---|---|---|"]  # fmt: skip
        out.append(f"| `{key}` | {type_} | `{default}` | {text.replace('|', '/')} |")
    return out


def reference_markdown() -> str:
    from fedtower.client.node_settings import NodeSettings
    from fedtower.config import RunSettings

    lines = [HEADER, "## Run config (`RunSettings`)"]
    lines += _table(_rows(RunSettings))
    lines += ["", "## Node config (`NodeSettings`, one per SuperNode)"]
    lines += _table(_rows(NodeSettings))
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
