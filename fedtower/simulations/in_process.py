"""Running a ClientApp handler in this process, without a SuperLink or SuperNode."""

from __future__ import annotations

import contextlib

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 1):
    """Flower stamps messages with the running task's identity; an in-process caller has none."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, node_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


class InProcessGrid(Grid):
    """A Flower Grid whose nodes are fedtower's ClientApp handlers, called in this process.

    For benchmarks of many rounds (no Ray, no network, no per-message process): the server side is
    the real `run_federation` with its strategies, each node a real `Context` with its own node
    config and state dir. Tests of the engines themselves use Flower's simulation and deployment.
    A handler that raises becomes an error reply, as Flower turns a failing ClientApp into one.
    `sent_bytes[node]` counts the serialized size of every reply a node sent (Flower's protobuf).
    """

    def __init__(self, contexts: dict[int, Context], *, run_config: dict | None = None):
        self.contexts = contexts
        self.run_config = dict(run_config or {})
        self.sent_bytes: dict[int, int] = {node: 0 for node in contexts}
        self.received: list[Message] = []  # every reply, as the coordinator got it (tests inspect them)
        self.delivered: list[Message] = []  # every message the coordinator sent
        self._run = None
        self._pending: dict[str, Message] = {}

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for index, message in enumerate(messages):
            key = f"m{len(self._pending)}-{index}"
            self._pending[key] = self._deliver(message)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids):
        return [self._pending.pop(key) for key in list(message_ids) if key in self._pending]

    def send_and_receive(self, messages, *, timeout=None):
        return [self._deliver(message) for message in messages]

    def _deliver(self, message: Message) -> Message:
        from flwr.app import Error
        from flwr.common.serde import recorddict_to_proto

        from fedtower.client.handlers import evaluate_on_node, train_on_node

        node = message.metadata.dst_node_id
        self.delivered.append(message)
        handler = evaluate_on_node if message.metadata.message_type.startswith("evaluate") else train_on_node
        with task_identity(node_id=node):
            try:
                reply = handler(message, self.contexts[node], self.run_config)
            except Exception as err:  # noqa: BLE001 - a failing node is an error reply, as in Flower
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
        if not reply.has_error():
            self.sent_bytes[node] += recorddict_to_proto(reply.content).ByteSize()
        self.received.append(reply)
        return reply


def in_process_contexts(node_configs: dict[int, dict], run_config: dict) -> dict[int, Context]:
    """One Context per node id, with its node config (as a SuperNode would hold it)."""
    return {node: Context(run_id=1, node_id=node, node_config=dict(config), state=RecordDict(),
                          run_config=dict(run_config)) for node, config in node_configs.items()}  # fmt: skip


def simulate_in_process(settings, *, site_config: dict | None = None, node_ids: list[int] | None = None,
                        per_site: dict[int, dict] | None = None):
    """Run the federation (the real ServerApp logic and handlers) with one in-process node per partition.

    `per_site` adds node config to some partitions (by partition id). Returns (run_federation's
    result, the grid): the grid holds what every node was sent and sent back.
    """
    from fedtower.server.federation import run_federation
    from fedtower.simulations.runner import num_partitions

    partitions = num_partitions(settings)
    node_ids = node_ids or [(1 << 62) + 7919 * p for p in range(partitions)]  # large, like Flower's
    run_config = settings.to_run_config()
    configs = {node: {"partition-id": p, "num-partitions": partitions, **dict(site_config or {}),
                      **dict((per_site or {}).get(p, {}))} for p, node in enumerate(node_ids)}  # fmt: skip
    grid = InProcessGrid(in_process_contexts(configs, run_config))
    with task_identity(node_id=0):
        result = run_federation(grid, settings)
    return result, grid
