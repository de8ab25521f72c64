"""What a user or item id may be: one rule for the loaders, the event log and the HTTP API.

Any text of 1 to MAX_ID_LENGTH characters (a CSV field may even hold a quoted line break); MovieLens
files, whose ids are numbers, must hold positive whole numbers."""

from __future__ import annotations

import re

MAX_ID_LENGTH = 256  # characters
# MovieLens ids are positive whole numbers (userId, movieId) of at most 10 digits.
MOVIELENS_ID = re.compile(r"[1-9][0-9]{0,9}")


def id_problem(value: str, kind: str, *, movielens: bool = False) -> str | None:
    """Why `value` is not a valid `kind` ("user" or "item") id, or None when it is."""
    if len(value) > MAX_ID_LENGTH:
        return f"{kind} id is {len(value)} characters long; ids have at most {MAX_ID_LENGTH}"
    if movielens and not MOVIELENS_ID.fullmatch(value):
        return f"MovieLens {kind} ids are positive whole numbers of at most 10 digits, not {value[:40]!r}"
    return None
