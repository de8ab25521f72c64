"""fedtower's Flower ClientApp: routes messages to fedtower.client.handlers."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtower.client.handlers import evaluate_on_node, train_on_node
from fedtower.client.mods import optional_fixed_clipping
from fedtower.logs import use_flower_logging

app = ClientApp()


@app.train(mods=[optional_fixed_clipping])
def train(message: Message, context: Context) -> Message:
    """Train the item tower and this node's private user embeddings on local data."""
    use_flower_logging()
    return train_on_node(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the global item tower on this node's held-out interactions."""
    use_flower_logging()
    return evaluate_on_node(message, context)
