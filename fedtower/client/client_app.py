"""fedtower's Flower ClientApp: routes messages to fedtower.client.handlers.

Kept thin on purpose: Flower starts a fresh process per message, and this module
imports no torch. The handlers are imported by the message that needs them, in
this process or, with node config `site-worker = true`, in the site's
long-lived worker (fedtower.client.site_worker).
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtower.client.mods import optional_fixed_clipping
from fedtower.client.site_worker import run_message
from fedtower.logs import use_flower_logging

app = ClientApp()


@app.train(mods=[optional_fixed_clipping])
def train(message: Message, context: Context) -> Message:
    """Train the item tower and this node's private user embeddings on local data."""
    use_flower_logging()
    return run_message("train", message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the global item tower on this node's held-out interactions."""
    use_flower_logging()
    return run_message("evaluate", message, context)
