"""`fedtower local-superlink`: the SuperLink `flwr run` leaves running for local simulations."""

from __future__ import annotations

import typer

local_app = typer.Typer(help="The SuperLink `flwr run` starts for local simulations (and leaves running).",
                        no_args_is_help=True)


@local_app.command("status")
def local_superlink_status() -> None:
    """Show whether `flwr run`'s local SuperLink (for this FLWR_HOME) is running, and its pid."""
    from fedtower.local_superlink import local_log_file, local_superlinks

    pids = local_superlinks()
    if not pids:
        typer.echo(f"No local SuperLink is running for {local_log_file().parents[1]}.")
        return
    typer.echo(f"Local SuperLink running: pid {', '.join(map(str, pids))} (log {local_log_file()}).")


@local_app.command("stop")
def local_superlink_stop() -> None:
    """Stop only `flwr run`'s local SuperLink for this FLWR_HOME and what it started; any other SuperLink
    on the machine (a deployment's) is left alone."""
    from fedtower.local_superlink import local_log_file, stop_local_superlinks

    stopped = stop_local_superlinks()
    if not stopped:
        typer.echo(f"No local SuperLink is running for {local_log_file().parents[1]}.")
        return
    typer.echo(f"Stopped the local SuperLink and {len(stopped) - 1} process(es) it started: pids "
               f"{', '.join(map(str, stopped))}.")  # fmt: skip
