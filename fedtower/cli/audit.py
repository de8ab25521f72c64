"""`fedtower audit`: verify a run's privacy ledger and recompute every epsilon independently."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedtower.cli.common import fail

# dp-accounting, torch and the client are imported inside the command: `fedtower --help` stays fast.




def audit(
    ledger: Annotated[Path, typer.Argument(help="A run directory (its privacy_ledger.jsonl) or a ledger .jsonl file.")],
    keys: Annotated[
        Path | None, typer.Option("--keys", help="Folder of the sites' registered ledger public keys (*.pub, PEM; "
                                  "<site>.pub, <site>.2.pub after a rotation).")
    ] = None,
    node: Annotated[str | None, typer.Option("--node", help="Only this node (pseudonym, or a site name).")] = None,
    site_ledger: Annotated[
        list[Path] | None, typer.Option("--site-ledger", help="A site's state dir: check the server's ledger "
                                        "against the site's own (repeatable).")
    ] = None,
    state_key_file: Annotated[
        Path | None, typer.Option("--state-key-file", help="Key of the --site-ledger state dir, if encrypted.")
    ] = None,
    tolerance: Annotated[
        float, typer.Option(help="Largest relative gap between the ledger's epsilon and dp-accounting's RDP.")
    ] = 0.01,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write audit.md, audit.json and epsilon.png to this folder.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the audit as JSON.")] = False,
) -> None:
    """Verify a privacy ledger: signatures, chains, monotone epsilon, what was released, and every epsilon
    recomputed with fedtower's RDP code and Google's dp-accounting (RDP and PLD). Exits 1 on any finding."""
    from fedtower.client.state import ClientStateStore, StateError
    from fedtower.privacy.audit import KeyRegistry, audit_records, read_ledger_file, render_json, write_report

    try:
        file, records = read_ledger_file(ledger)
        registry = KeyRegistry.from_dir(keys) if keys is not None else None
        sites = {}
        for state_dir in site_ledger or []:
            node_config = {"state-key-file": str(state_key_file)} if state_key_file else None
            sites[str(state_dir)] = ClientStateStore.for_node(state_dir, node_config).read_ledger()
    except (ValueError, OSError, StateError) as err:
        raise fail(str(err)) from None
    result = audit_records(records, source=str(file), registry=registry, node=node, site_ledgers=sites,
                           tolerance=tolerance)  # fmt: skip
    typer.echo(render_json(result) if json_out else result.summary())
    if report is not None:
        path = write_report(result, report)
        if not json_out:
            typer.echo(f"\nReport: {path} (with {path.parent / 'epsilon.png'}).")
    if not result.ok:
        raise typer.Exit(code=1)
