"""`fedtower keys ...`: the CA and server certificate (coordinator) and node key pairs (sites)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedtower.cli.common import fail
from fedtower.deployment import keys

keys_app = typer.Typer(
    help="TLS certificates for the SuperLink and key pairs for SuperNode authentication.",
    no_args_is_help=True,
)

OutOption = Annotated[Path, typer.Option("--out", help="Folder to write to (created with mode 700 if missing).")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace existing files (the old keys are lost).")]




def _wrote(*lines: str) -> None:
    typer.echo("\n".join(lines))


@keys_app.command("ca")
def ca(
    out: OutOption,
    name: Annotated[str, typer.Option(help="The CA's common name.")] = "fedtower CA",
    days: Annotated[int, typer.Option(help="Days the CA certificate is valid.")] = 3650,
    force: ForceOption = False,
) -> None:
    """Coordinator: create the certificate authority (ca.crt, ca.key) that signs the SuperLink's certificate."""
    try:
        cert, key = keys.create_ca(out, name=name, days=days, overwrite=force)
    except (ValueError, OSError) as err:
        raise fail(str(err)) from None
    _wrote(f"Wrote {cert} (public) and {key} (private, mode 600).",
           "Next:",
           f"  fedtower keys server --ca-dir {out} --host <address sites dial> --out <server dir>",
           f"  Send only {cert} to every site. Keep {key} offline or locked away: "
           "it can sign certificates the sites will trust.")  # fmt: skip


@keys_app.command("server")
def server(
    ca_dir: Annotated[Path, typer.Option("--ca-dir", help="Folder holding ca.crt and ca.key.")],
    host: Annotated[
        list[str], typer.Option("--host", help="IP address or DNS name sites dial (repeat for several).")
    ],
    out: OutOption,
    days: Annotated[int, typer.Option(help="Days the server certificate is valid.")] = 825,
    force: ForceOption = False,
) -> None:
    """Coordinator: create the SuperLink's TLS certificate (server.crt, server.key), signed by the CA."""
    try:
        cert, key = keys.create_server_certificate(out, ca_dir=ca_dir, hosts=host, days=days, overwrite=force)
    except (ValueError, OSError) as err:
        raise fail(str(err)) from None
    ca_cert = ca_dir / keys.CA_CERT
    _wrote(f"Wrote {cert} (valid for {', '.join(host)}) and {key} (private, mode 600).",
           "Next: start the SuperLink with",
           f"  flower-superlink --ssl-ca-certfile {ca_cert} --ssl-certfile {cert} --ssl-keyfile {key} "
           "--enable-supernode-auth",
           "Sites must dial it by one of the hosts above. Nothing in this folder is sent to anyone.")  # fmt: skip


@keys_app.command("node")
def node(
    site: Annotated[str, typer.Option("--site", help="This site's name (letters, digits, '.', '_', '-').")],
    out: OutOption,
    force: ForceOption = False,
) -> None:
    """Site: create this SuperNode's authentication key pair (<site>.key, <site>.pub) and its privacy-ledger
    signing pair (<site>.ledger.key, <site>.ledger.pub)."""
    try:
        key, pub = keys.create_node_keys(out, site=site, overwrite=force)
        ledger_key, ledger_pub = keys.create_ledger_keys(out, site=site, overwrite=force)
    except (ValueError, OSError) as err:
        raise fail(str(err)) from None
    _wrote(f"Wrote {key} and {ledger_key} (private, mode 600: never leave this machine), {pub} and {ledger_pub} "
           "(public).",
           "Next:",
           f"  Send {pub} and {ledger_pub} to the coordinator, who runs: flwr supernode register {pub.name} "
           "<connection>, and keeps the .ledger.pub for audits (fedtower audit --keys DIR)",
           f"  Start the SuperNode with --auth-supernode-private-key {key} --root-certificates <ca.crt> "
           f"--node-config \"... ledger-key='{ledger_key}'\"")  # fmt: skip
