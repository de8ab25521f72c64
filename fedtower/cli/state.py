"""`fedtower state ...`: create keys, encrypt, rotate and verify a node's private state dir."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedtower.cli.common import fail
from fedtower.client.state_crypto import StateKey, StateKeyError, read_key_file, write_new_key_file

# fedtower.client.state (torch) is imported inside the commands: `fedtower --help` stays fast.

state_app = typer.Typer(
    help="The node's private state dir: keys, encryption at rest, key rotation, verification.",
    no_args_is_help=True,
)

StateDirOption = Annotated[Path, typer.Option("--state-dir", help="The node's state dir (node config state-dir).")]




def _key(path: Path) -> StateKey:
    try:
        return StateKey(read_key_file(path), f"key file {path}")
    except StateKeyError as err:
        raise fail(str(err)) from None


def _open(state_dir: Path, key):
    from fedtower.client.state import ClientStateStore, StateError

    try:
        return ClientStateStore(state_dir, create=False, key=key)
    except StateError as err:
        raise fail(str(err)) from None


def _already_under(state_dir: Path, key: StateKey) -> bool:
    """True when the whole state already verifies under `key` (e.g. a rotation that completed)."""
    from fedtower.client.state import ClientStateStore, StateError

    try:
        store = ClientStateStore(state_dir, create=False, key=key)
        return store.encrypted and store.verify() > 0
    except StateError:
        return False


@state_app.command("keygen")
def keygen(
    key_file: Annotated[Path, typer.Argument(help="Where to write the new key (mode 600; never overwritten).")],
) -> None:
    """Create a new random 32-byte state key (base64) in KEY_FILE."""
    try:
        key = write_new_key_file(key_file)
    except StateKeyError as err:
        raise fail(str(err)) from None
    typer.echo(f"Wrote a new state key to {key_file} (key id {key.key_id}). Keep a copy somewhere safe: "
               "without it the encrypted state cannot be read.")  # fmt: skip


@state_app.command("encrypt")
def encrypt(
    state_dir: StateDirOption,
    key_file: Annotated[Path, typer.Option("--key-file", help="The site's state key file.")],
) -> None:
    """Encrypt a plaintext state dir in place under KEY_FILE (one atomic step)."""
    key = _key(key_file)
    if _already_under(state_dir, key):
        typer.echo(f"{state_dir} is already encrypted with key id {key.key_id}; nothing to do.")
        return
    _rekey(_open(state_dir, None), key)


@state_app.command("rotate-key")
def rotate_key(
    state_dir: StateDirOption,
    old_key_file: Annotated[Path, typer.Option("--old-key-file", help="The key the state is encrypted with now.")],
    new_key_file: Annotated[Path, typer.Option("--new-key-file", help="The key to re-encrypt it with.")],
) -> None:
    """Re-encrypt every component and log under a new key, atomically: all old or all new.

    Stop the node's SuperNode and serving first, and point its configuration at
    the new key afterwards. Running it again after it completed does nothing.
    """
    old, new = _key(old_key_file), _key(new_key_file)
    if old.key_id == new.key_id:
        raise fail(f"{old_key_file} and {new_key_file} hold the same key (id {old.key_id}).")
    if _already_under(state_dir, new):
        typer.echo(f"{state_dir} is already encrypted with the new key (id {new.key_id}); nothing to do.")
        return
    _rekey(_open(state_dir, old), new)


def _rekey(store, key: StateKey) -> None:
    from fedtower.client.state import ClientStateStore, StateError

    try:
        store.verify()  # every component and log reads under the current key before anything is written
        version = store.rekey(key)
        ClientStateStore(store.state_dir, create=False, key=key).verify()
    except StateError as err:
        raise fail(str(err)) from None
    typer.echo(f"{store.state_dir}: state version {version} is encrypted with key id {key.key_id}.")


@state_app.command("verify")
def verify(
    state_dir: StateDirOption,
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="The state key (default: $FEDTOWER_STATE_KEY(_FILE)).")
    ] = None,
) -> None:
    """Check every component and log of a state dir (checksums, and authentication when encrypted)."""
    from fedtower.client.state import KEY_FROM_ENVIRONMENT, LOG_NAMES, StateError

    store = _open(state_dir, _key(key_file) if key_file is not None else KEY_FROM_ENVIRONMENT)
    try:
        version = store.verify()
        meta = store.meta()
        counts = {name: len(store.read_log(name)) for name in LOG_NAMES}
        encrypted = store.encrypted
    except StateError as err:
        raise fail(str(err)) from None
    how = f"encrypted (key id {store.key_id})" if encrypted else "plaintext"
    typer.echo(f"{state_dir}: version {version}, {how}, rounds trained {meta.get('rounds_trained', 0)}, "
               + ", ".join(f"{n} {name} entries" for name, n in counts.items()) + ". All checks passed.")  # fmt: skip


@state_app.command("adopt-counter")
def adopt_counter(
    state_dir: StateDirOption,
    counter: Annotated[Path, typer.Option("--counter", help="The rollback counter file (node config "
                                          "rollback-counter; default: beside state-key-file, + .rollback).")],
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="The state key (default: $FEDTOWER_STATE_KEY(_FILE)).")
    ] = None,
) -> None:
    """Start a rollback counter from the state as it is now (once, when a site sets one up).

    The node then refuses any state older than this one. Run it only on the newest state: a
    counter adopted from a restored backup would make that backup the reference.
    """
    from fedtower.client.rollback import adopt
    from fedtower.client.state import KEY_FROM_ENVIRONMENT, StateError

    store = _open(state_dir, _key(key_file) if key_file is not None else KEY_FROM_ENVIRONMENT)
    try:
        store.verify()
        body = adopt(store, counter)
    except StateError as err:
        raise fail(str(err)) from None
    typer.echo(f"Rollback counter {counter} adopted state {state_dir} at accountant change {body['sequence']}.")
