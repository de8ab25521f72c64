"""`fedtower config`: every run-config and node-config key."""

from __future__ import annotations

import typer

config_app = typer.Typer(help="Every run-config and node-config key, with its default.", no_args_is_help=True)


@config_app.command("keys")
def config_keys() -> None:
    """List every run-config and node-config key: key = default  (meaning)."""
    from fedtower.client.node_settings import NodeSettings
    from fedtower.config import RunSettings
    from fedtower.config_reference import _rows

    for title, cls in (("run config", RunSettings), ("node config (each SuperNode's own)", NodeSettings)):
        typer.echo(f"# {title}")
        for _, key, _, default, text in _rows(cls):
            typer.echo(f"{key} = {default}" + (f"  ({text})" if text else ""))


@config_app.command("reference")
def config_reference() -> None:
    """Print docs/configuration.md (generated from the settings classes)."""
    from fedtower.config_reference import reference_markdown

    typer.echo(reference_markdown(), nl=False)
