"""Running a ClientApp handler in this process, without a SuperLink or SuperNode."""

from __future__ import annotations

import contextlib

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
