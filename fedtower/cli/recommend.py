"""`fedtower recommend`: recommendations for one user, from a client's state dir, on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedtower.cli.common import fail


def recommend(
    state_dir: Annotated[Path, typer.Option("--state-dir", help="The client's state directory.")],
    user: Annotated[str | None, typer.Option("--user", help="User id (as in the node's own events).")] = None,
    list_users: Annotated[bool, typer.Option("--list-users", help="Print the users this node serves and exit.")
                          ] = False,
    k: Annotated[int, typer.Option("-k", help="How many items.")] = 10,
    explain: Annotated[bool, typer.Option("--explain", help="Show the history items behind each item.")] = False,
    diversity: Annotated[float, typer.Option(help="MMR weight in [0, 1]; 0 = plain ranking.")] = 0.0,
    category_cap: Annotated[int | None, typer.Option(help="At most this many items per category.")] = None,
    novelty: Annotated[float, typer.Option(help="Popularity penalty (x the released item bias).")] = 0.0,
    precision: Annotated[str, typer.Option(help="Item table: fp32 | fp16 | int8.")] = "fp32",
    run_config: Annotated[
        str, typer.Option("--run-config", help="Overrides of the run config the node saved: \"data='...'\".")
    ] = "",
    node_config: Annotated[
        str, typer.Option("--node-config", help="Overrides of the saved node config: \"data-path='...'\".")
    ] = "",
    json_out: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """Recommend k items for one user from a client's own state (nothing is sent anywhere).

    Reads the latest global item tower, the user's private embedding and the
    node's own events from the state dir (and the run and node config the node
    saved at its last round). Seen items are never recommended.
    """
    from fedtower.client.state import StateError
    from fedtower.serving import Recommender
    from fedtower.simulations.presets import parse_overrides

    try:
        recommender = Recommender.from_state_dir(
            state_dir,
            run_config=parse_overrides(run_config) if run_config else None,
            node_config=parse_overrides(node_config) if node_config else None,
            precision=precision,
        )
        if list_users:
            for known in recommender.users:
                typer.echo(known)
            return
        if user is None:
            raise fail("Give --user USER, one of the node's users "
                        "(`fedtower recommend --state-dir DIR --list-users`).")
        recs = recommender.recommend(user, k, explain=explain, diversity=diversity,
                                     category_cap=category_cap, novelty=novelty)  # fmt: skip
    except (StateError, ValueError, FileNotFoundError) as err:
        hint = " List them with --list-users." if "Unknown user" in str(err) else ""
        raise fail(f"{err}{hint}") from None
    if json_out:
        typer.echo(json.dumps([r.to_dict() for r in recs], indent=2))
        return
    for rank, rec in enumerate(recs, start=1):
        categories = "|".join(rec.categories)
        typer.echo(f"{rank:>3}. {rec.item:<12} {rec.score:8.4f}  {rec.title}  [{categories}]")
        for part in rec.explanation:
            typer.echo(f"       because of {part.item} {part.title!r} ({part.contribution:+.4f})")
