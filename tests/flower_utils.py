"""Build Flower messages and contexts in a test process, without a SuperLink."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedtower.simulations.in_process import task_identity  # noqa: F401 (the tests' import)


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
