"""One DP train round in its own process, for the concurrency test of tests/test_privacy_findings.py.

    python -m tests.privacy_worker OUT_DIR STATE_DIR RUN_NAME

Prints the ledger entry of the reply as one JSON line.
"""

import json
import sys

from fedtower.client.handlers import train_on_node
from fedtower.config import RunSettings
from fedtower.server.federation import initial_item_tower
from tests.flower_utils import node_context, server_message, task_identity

DATA = "synthetic:users=90,items=120,seed=4"


def main(out_dir: str, state_dir: str, run: str) -> None:
    config = RunSettings(data=DATA, num_sites=3, dim=16, local_epochs=1, output_dir=out_dir, run_name=run,
                         history_len=30, dp_batch_size=8, num_negatives=16, noise_multiplier=1.0).to_run_config()
    node = {"partition-id": 0, "num-partitions": 3, "state-dir": state_dir, "allow-plaintext-state": True,
            "dp-population-users": 30}  # fmt: skip
    tower = initial_item_tower(RunSettings.from_run_config(config))
    with task_identity():
        reply = train_on_node(server_message(tower, node_id=3, run_name=run), node_context(node, config))
    print(json.dumps(dict(reply.content["ledger"])))


if __name__ == "__main__":
    main(*sys.argv[1:4])
