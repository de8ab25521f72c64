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


class _DropKnownNotices(logging.Filter):
    """Flower's notice that `run_simulation` is deprecated: fedtower knows (README, "Tested versions")."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("DEPRECATED FEATURE" in text or "deprecated feature" in text.lower())


@contextlib.contextmanager
def flower_detail_to_file(log_file, *, verbose: bool = False) -> Iterator[None]:
    """While a simulation runs: Flower's INFO lines go to `log_file` only, its warnings still show.

    With `verbose`, nothing changes (Flower's and Ray's detail stays on the console)."""
    if verbose:
        yield
        return
    from flwr.common.logger import FLOWER_LOGGER, console_handler

    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file)
    to_file.setLevel(logging.DEBUG)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    notices = _DropKnownNotices()
    old_level = console_handler.level
    console_handler.setLevel(logging.WARNING)
    console_handler.addFilter(notices)
    FLOWER_LOGGER.addHandler(to_file)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\..*")
            yield
    finally:
        FLOWER_LOGGER.removeHandler(to_file)
        to_file.close()
        console_handler.removeFilter(notices)
        console_handler.setLevel(old_level)
