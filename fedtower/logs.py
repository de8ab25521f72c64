"""fedtower's log output next to Flower's.

Flower's apps log through the `flwr` logger; fedtower's modules log under
`fedtower`. Inside a ServerApp/ClientApp process (e.g. under `flwr run`) we
send fedtower's records to Flower's handlers so they show in `flwr run --stream`
and `flwr log`. Opacus resets the `flwr` logger level when imported; calling
this again after importing Opacus restores it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path


def use_flower_logging(level: int = logging.INFO) -> None:
    flower = logging.getLogger("flwr")
    flower.setLevel(min(flower.level or level, level))
    ours = logging.getLogger("fedtower")
    if flower.handlers:
        ours.handlers[:] = list(flower.handlers)
        ours.propagate = False
    ours.setLevel(level)


class _OursAndWarnings(logging.Filter):
    """What a Flower handler still shows: fedtower's own lines and anyone's warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("fedtower"):
            return True
        text = record.getMessage()
        # Flower's notice that run_simulation is deprecated: known (README, "Tested versions").
        return record.levelno >= logging.WARNING and "deprecated feature" not in text.lower()


@contextlib.contextmanager
def flower_detail_to_file(log_file, *, verbose: bool = False) -> Iterator[None]:
    """While a run goes on: Flower's INFO lines go to `log_file` only; fedtower's lines and every warning
    still show wherever Flower's handlers write (the console, `flwr run --stream`).

    With `verbose`, nothing changes (Flower's and Ray's detail stays where Flower sends it)."""
    if verbose:
        yield
        return
    from flwr.common.logger import FLOWER_LOGGER

    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file)
    to_file.setLevel(logging.DEBUG)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    shown = _OursAndWarnings()
    handlers = list(FLOWER_LOGGER.handlers)
    ours = logging.getLogger("fedtower")
    for handler in handlers:
        handler.addFilter(shown)
    FLOWER_LOGGER.addHandler(to_file)
    added_to_ours = not ours.propagate
    if added_to_ours:  # fedtower's records go to Flower's handlers directly (use_flower_logging): log them too
        ours.addHandler(to_file)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\..*")
            yield
    finally:
        FLOWER_LOGGER.removeHandler(to_file)
        if added_to_ours:
            ours.removeHandler(to_file)
        to_file.close()
        for handler in handlers:
            handler.removeFilter(shown)
