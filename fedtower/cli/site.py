"""`fedtower site ...`: a partner site's pre-flight check and its own privacy ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedtower.cli.common import fail

# Heavy modules (torch, the client) are imported inside the commands: `fedtower --help` stays fast.

site_app = typer.Typer(help="A partner site's readiness check and privacy ledger.", no_args_is_help=True)

StateDirOption = Annotated[Path, typer.Option("--state-dir", help="The node's state dir (node config state-dir).")]
KeyFileOption = Annotated[
    Path | None,
    typer.Option("--state-key-file", help="Node config state-key-file (default: $FEDTOWER_STATE_KEY(_FILE))."),
]




@site_app.command("check")
def check(
    data_path: Annotated[Path, typer.Option("--data-path", help="The node's events (node config data-path).")],
    state_dir: StateDirOption,
    max_epsilon: Annotated[
        float | None, typer.Option("--max-epsilon", help="The node's own budget cap (node config max-epsilon).")
    ] = None,
    state_key_file: KeyFileOption = None,
    run_config: Annotated[
        str,
        typer.Option("--run-config", help="The coordinator's run config, e.g. \"data='/srv/catalogue' dim=64\" "
                     "(default: the one recorded by the node's last round)."),
    ] = "",
    node_config: Annotated[
        str,
        typer.Option("--node-config", help="The rest of the SuperNode's --node-config, e.g. "
                     "\"dp-population-users=2000 max-delta=1e-6\" (checked as the node parses it)."),
    ] = "",
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check that this site is ready to join, and show exactly what it will share.

    Validates the data as the node loads it (every bad row with file and line),
    the state dir (permissions, writable, key, integrity), the site's privacy
    settings (limits, declared population, opt-ins, rollback counter), the
    privacy budget (max-epsilon and epsilon spent so far) and lists every
    record the node's replies carry. Exits 0 when ready, 1 with every problem listed otherwise.
    """
    from fedtower.deployment.site_check import check_site, render
    from fedtower.simulations.presets import parse_overrides

    try:
        overrides = parse_overrides(run_config) if run_config.strip() else {}
        node = parse_overrides(node_config) if node_config.strip() else {}
    except ValueError as err:
        raise fail(str(err)) from None
    report = check_site(data_path, state_dir, max_epsilon=max_epsilon, state_key_file=state_key_file,
                        run_config=overrides, node_config=node)  # fmt: skip
    typer.echo(json.dumps(report.to_dict(), indent=2) if json_out else render(report))
    if not report.ready:
        raise typer.Exit(code=1)


@site_app.command("ledger")
def ledger(
    state_dir: StateDirOption,
    state_key_file: KeyFileOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print every entry as JSON.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Audit the whole ledger (signatures, the node's "
                                          "complete chain, every epsilon by dp-accounting); exit 1 if any "
                                          "finding.")] = False,  # fmt: skip
    public_key: Annotated[bool, typer.Option("--public-key", help="Print the public key this node signs its "
                                              "ledger with (to register it with the coordinator).")] = False,
) -> None:
    """Print this node's own privacy ledger: epsilon before and after every round, as it was sent."""
    from fedtower.client.state import ClientStateStore, StateError
    from fedtower.privacy.ledger import entry_of

    node_config = {"state-key-file": str(state_key_file)} if state_key_file else None
    try:
        store = ClientStateStore.for_node(state_dir, node_config)
        entries = store.read_ledger()
        if public_key:
            from fedtower.client.ledger_signing import public_key_of_state

            typer.echo(public_key_of_state(store))
            return
    except (StateError, ValueError, OSError) as err:
        raise fail(str(err)) from None
    if verify:
        from fedtower.privacy.audit import audit_records

        result = audit_records(entries, source=f"{state_dir} (the node's own ledger)", whole_chain=True)
        typer.echo(result.summary())
        if not result.ok:
            raise typer.Exit(code=1)
        return
    if json_out:
        typer.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        typer.echo(f"The ledger in {state_dir} has no entries yet: this node has not run a private round.")
        return
    typer.echo(f"{'run':<16} {'round':>5} {'status':<16} {'steps':>6} {'noise':>7} {'epsilon before':>15} "
               f"{'epsilon after':>14} {'delta':>9}")  # fmt: skip
    for raw in entries:
        e = entry_of(raw)
        typer.echo(f"{e.run:<16} {e.round:>5} {e.status:<16} {e.steps:>6} {e.noise_multiplier:>7.3f} "
                   f"{e.epsilon_before:>15.4f} {e.epsilon_after:>14.4f} {e.delta:>9.2g}")  # fmt: skip
