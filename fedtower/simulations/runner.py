"""Run a fedtower simulation on Flower's simulation engine (Ray) from Python.

`flwr run .` is the Flower-native way; this is what `fedtower simulate` and the
benchmarks use, because it needs no SuperLink and takes the run config
directly. It runs the same ServerApp/ClientApp code: the apps here only bind
the run config that `flwr run` would have put in `context.run_config`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtower.client.handlers import evaluate_on_node, train_on_node
from fedtower.client.local import partition_config, run_dataset
from fedtower.client.mods import optional_fixed_clipping
from fedtower.client.node_settings import NodeSettings
from fedtower.config import RunSettings
from fedtower.data.partition import partition_users
from fedtower.server.federation import run_federation

log = logging.getLogger("fedtower")


def make_client_app(run_config: dict, site_config: Mapping[str, object] | None = None,
                    per_site: Mapping[int, Mapping[str, object]] | None = None) -> ClientApp:  # fmt: skip
    """The ClientApp with `run_config` bound (simulation only).

    `site_config`: node config every simulated site adds to the `partition-id` / `num-partitions`
    Flower gives it (a declared population, an opt-in): in a simulation, whoever runs it plays
    every site too. `per_site` adds node config to some partitions only ({partition-id: config}).
    Both are checked like a SuperNode's --node-config.
    """
    site_config = dict(site_config or {})
    per_site = {int(p): dict(c) for p, c in (per_site or {}).items()}
    for extra in [{}, *per_site.values()]:
        NodeSettings.from_node_config({**site_config, **extra})  # a bad key fails here, before Ray starts
    app = ClientApp()

    def as_site(context: Context) -> Context:
        extra = per_site.get(int(context.node_config.get("partition-id", -1)), {})
        if site_config or extra:
            context.node_config = {**context.node_config, **site_config, **extra}
        return context

    @app.train(mods=[optional_fixed_clipping])
    def train(message: Message, context: Context) -> Message:
        return train_on_node(message, as_site(context), run_config)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return evaluate_on_node(message, as_site(context), run_config)

    return app


def make_server_app(settings: RunSettings, results: list, wait_for: int | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        results.append(run_federation(grid, settings, wait_for=wait_for))

    return app


def num_partitions(settings: RunSettings) -> int:
    """Sites: num-sites. One user per client: the number of users in the data."""
    if settings.partitioning == "sites":
        return settings.num_sites
    return int(run_dataset(settings).events["user"].nunique())


def simulate(settings: RunSettings, *, verbose: bool = False, client_app: ClientApp | None = None,
             site_config: Mapping[str, object] | None = None,
             per_site: Mapping[int, Mapping[str, object]] | None = None) -> dict:  # fmt: skip
    """Run the whole federation in this process; returns the server's result.

    `client_app` replaces fedtower's ClientApp (tests use it to inject faults); `site_config` is
    node config for every simulated site, `per_site` for some (see make_client_app).
    """
    partitions = num_partitions(settings)
    supernodes = settings.num_supernodes or partitions
    if supernodes != partitions:
        raise ValueError(
            f"num-supernodes ({supernodes}) must equal the number of partitions ({partitions}); "
            "leave it at 0 to use one node per partition."
        )
    if settings.partitioning == "sites":
        # Fail early, in this process, if the partitioning cannot be made.
        sizes = [len(users) for users in partition_users(
            run_dataset(settings), partition_config(settings, partitions)).values()]  # fmt: skip
        log.info("Partitioned users into %d sites (sizes %d..%d).", partitions, min(sizes), max(sizes))
    # Flower's simulation starts the ServerApp while its virtual nodes are still registering (1,255 of 20,000
    # at the first round): the server waits for every one, so the first round samples from the whole
    # population and client-level DP counts it right.
    run_config = settings.to_run_config()
    results: list = []
    backend_config = {
        "client_resources": {"num_cpus": settings.client_num_cpus, "num_gpus": settings.client_num_gpus},
        "init_args": {"logging_level": logging.WARNING, "log_to_driver": verbose},
    }
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=make_server_app(settings, results, wait_for=partitions),
            client_app=client_app or make_client_app(run_config, site_config, per_site),
            num_supernodes=supernodes,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    if not results:
        raise RuntimeError("The simulation ended without a result; see the log above for the error.")
    return results[0]
