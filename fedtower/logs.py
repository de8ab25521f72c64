"""fedtower's log output next to Flower's.

Flower's apps log through the `flwr` logger; fedtower's modules log under
`fedtower`. Inside a ServerApp/ClientApp process (e.g. under `flwr run`) we
send fedtower's records to Flower's handlers so they show in `flwr run --stream`
and `flwr log`. Opacus resets the `flwr` logger level when imported; calling
this again after importing Opacus restores it.
"""

from __future__ import annotations

import logging


def use_flower_logging(level: int = logging.INFO) -> None:
    flower = logging.getLogger("flwr")
    flower.setLevel(min(flower.level or level, level))
    ours = logging.getLogger("fedtower")
    if flower.handlers:
        ours.handlers[:] = list(flower.handlers)
        ours.propagate = False
    ours.setLevel(level)
