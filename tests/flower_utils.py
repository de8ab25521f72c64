"""Build Flower messages and contexts in a test process, without a SuperLink."""

from __future__ import annotations

import contextlib

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 1):
    """Flower stamps messages with the current task's identity; a test process has none."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, node_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def server_message(arrays: ArrayRecord, *, node_id: int, message_type: str = "train",
                   server_round: int = 1, run_name: str = "test") -> Message:  # fmt: skip
    config = ConfigRecord({"server-round": server_round, "run-name": run_name})
    return Message(
        content=RecordDict({"arrays": arrays, "config": config}),
        dst_node_id=node_id,
        message_type=message_type,
    )


def node_context(node_config: dict, run_config: dict, node_id: int = 1) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config=run_config)  # fmt: skip
