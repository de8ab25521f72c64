"""`fedtower serve`: the local HTTP API (fedtower.serving.http) over a node's state dir, with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Annotated

import typer

ENV_TOKEN = "FEDTOWER_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16

log = logging.getLogger("fedtower.serving")


class TokenError(ValueError):
    """The bearer token is missing, too short, or stored insecurely."""


def read_token(token_file: Path | None, environ=None) -> str | None:
    """The bearer token from --token-file, else $FEDTOWER_SERVE_TOKEN; None when neither is set."""
    environ = os.environ if environ is None else environ
    if token_file is not None:
        try:
            mode = token_file.stat().st_mode
            token, source = token_file.read_text().strip(), f"token file {token_file}"
        except OSError as err:
            raise TokenError(f"The token file {token_file} cannot be read: {err.strerror or err}.") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenError(f"The token file {token_file} is accessible to group or others; run "
                             f"`chmod 600 {token_file}`.")  # fmt: skip
    elif environ.get(ENV_TOKEN):
        token, source = environ[ENV_TOKEN].strip(), f"${ENV_TOKEN}"
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise TokenError(f"The bearer token in {source} must be at least {MIN_TOKEN_CHARS} characters without "
                         "spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`).")  # fmt: skip
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    state_dir: Annotated[Path, typer.Option("--state-dir", help="The node's state dir (after one round).")],
    host: Annotated[str, typer.Option(help="Address to bind; loopback unless you mean otherwise.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8470,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help=f"File holding the bearer token (else ${ENV_TOKEN}).")
    ] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="Serve without authentication (loopback only).")
    ] = False,
    state_key_file: Annotated[
        Path | None,
        typer.Option("--state-key-file", help="Key of an encrypted state dir (else $FEDTOWER_STATE_KEY(_FILE))."),
    ] = None,
    precision: Annotated[str, typer.Option(help="Item table held as fp32 | fp16 | int8.")] = "fp32",
    index: Annotated[str, typer.Option(help="Top-k search: auto (exact below 200,000 items, else ivf) | exact | "
                                            "ivf (faiss inverted lists, candidates re-scored exactly).")] = "auto",
    index_probes: Annotated[int, typer.Option("--index-probes", min=1,
                                              help="Inverted lists searched per query (ivf).")] = 64,
    threads: Annotated[int, typer.Option(min=1, help="Compute threads for scoring (BLAS and torch).")] = 1,
    reload_interval: Annotated[
        float,
        typer.Option("--reload-interval", min=0.0,
                     help="Seconds between checks for a newer snapshot in the state dir (0: only POST /reload)."),
    ] = 1.0,
) -> None:
    """Serve recommendations from a node's state dir over a local HTTP API (FastAPI).

    Endpoints: POST /recommend, /explain, /bundle, /events, /items, /reload; GET
    /health and /openapi.json. Every POST needs 'Authorization: Bearer <token>';
    the server refuses to start without a token unless --insecure-no-auth is
    given. A newer item-tower snapshot that a round saves is picked up without a
    restart.
    """
    limit_threads(threads)  # before numpy and torch load: BLAS reads its thread count once
    from fedtower.client.state import StateError
    from fedtower.client.state_crypto import StateKeyError

    def fail(message: str) -> typer.Exit:
        typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
        return typer.Exit(code=2)

    try:
        token = read_token(token_file)
    except TokenError as err:
        raise fail(str(err)) from None
    if token is None and not insecure_no_auth:
        raise fail(f"No bearer token: give --token-file FILE or set ${ENV_TOKEN} (or, on loopback only, "
                   "--insecure-no-auth).")  # fmt: skip
    if token is not None and insecure_no_auth:
        raise fail("Both a token and --insecure-no-auth were given; choose one.")
    if insecure_no_auth and not is_loopback(host):
        raise fail(f"--insecure-no-auth is refused on a non-loopback address ({host}).")
    if not is_loopback(host):
        typer.secho(f"Warning: binding {host}, not loopback: anyone who can reach it and holds the token "
                    "can query this node's users. There is no TLS here; put a TLS proxy in front.",
                    fg=typer.colors.YELLOW, err=True)  # fmt: skip
    try:
        recommender = load_recommender(state_dir, state_key_file, precision, index, index_probes)
    except (StateError, StateKeyError, ValueError, FileNotFoundError) as err:
        raise fail(str(err)) from None
    run_server(recommender, token, host, port, reload_interval)


def limit_threads(threads: int) -> None:
    """Score with `threads` compute threads (default 1).

    Requests are scored one at a time, each a matrix-vector product of a few ms:
    more BLAS threads barely shorten it but contend with the HTTP loop (and the
    clients) for the cores, which on 2 cores multiplied p99 by 7 in our benchmark.
    """
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    if "numpy" in sys.modules:
        log.warning("numpy was loaded before --threads applied; BLAS may use more threads than %d.", threads)
    import torch

    torch.set_num_threads(threads)


def load_recommender(state_dir: Path, state_key_file: Path | None, precision: str, index: str = "auto",
                     index_probes: int = 64):
    """The node's Recommender; the key file goes in as node config, so the event log opens with it too."""
    from fedtower.serving.recommender import Recommender

    node_config = {"state-key-file": str(state_key_file)} if state_key_file else None
    return Recommender.from_state_dir(state_dir, precision=precision, index=index, index_probes=index_probes,
                                      node_config=node_config)


def run_server(recommender, token: str | None, host: str, port: int, reload_interval: float = 1.0) -> None:
    import uvicorn

    from fedtower.serving.http import create_app

    app = create_app(recommender, token, watch_interval=reload_interval)
    auth = "bearer token" if token else "NO AUTHENTICATION"
    typer.echo(f"Serving {len(recommender.catalogue):,} items on http://{host}:{port} ({auth}); "
               f"schema at /openapi.json. Ctrl-C stops.", err=True)  # fmt: skip
    # One process, one event loop: the Recommender is not shared across workers (record() mutates it).
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
