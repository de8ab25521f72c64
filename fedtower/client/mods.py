"""Client mods that switch on per run.

Flower's `fixedclipping_mod` (client-side clipping for client-level DP) must
sit on the train handler, but only a run with `client-dp = "client-side"`
sends a clipping norm; other runs pass straight through.
"""

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

CLIPPING_NORM_KEY = "clipping_norm"  # the key Flower's DP wrapper puts in the train config


def optional_fixed_clipping(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    config = message.content.get("config")
    if config is not None and CLIPPING_NORM_KEY in config:
        return fixedclipping_mod(message, context, call_next)
    return call_next(message, context)
