"""`fedtower state keygen | encrypt | rotate-key | verify`, run in-process through typer's runner."""

import pytest
import torch
from typer.testing import CliRunner

from fedtower.cli import app
from fedtower.client.state import ClientStateStore, StateError
from fedtower.client.state_crypto import StateKey, read_key_file

runner = CliRunner()


def key_of(path) -> StateKey:
    return StateKey(read_key_file(path), str(path))


def plaintext_state(path) -> None:
    store = ClientStateStore(path, key=None)
    store.save({"users": {"users": ["a"], "embeddings": torch.ones(1, 4)}, "accountant": {"history": [[1.0, 0.1, 5]]},
                "meta": {"rounds_trained": 1}})  # fmt: skip
    store.append_ledger({"round": 1})


def test_keygen_encrypt_rotate_and_verify_from_the_command_line(tmp_path):
    # Prepare
    state, old, new = tmp_path / "state", tmp_path / "old.key", tmp_path / "new.key"
    plaintext_state(state)
    # Execute
    made = [runner.invoke(app, ["state", "keygen", str(path)]) for path in (old, new)]
    encrypted = runner.invoke(app, ["state", "encrypt", "--state-dir", str(state), "--key-file", str(old)])
    rotate = ["state", "rotate-key", "--state-dir", str(state), "--old-key-file", str(old),
              "--new-key-file", str(new)]  # fmt: skip
    rotated = runner.invoke(app, rotate)
    again = runner.invoke(app, rotate)  # e.g. re-run after a crash right after the commit
    verified = runner.invoke(app, ["state", "verify", "--state-dir", str(state), "--key-file", str(new)])
    refused = runner.invoke(app, ["state", "verify", "--state-dir", str(state), "--key-file", str(old)])
    # Assert
    assert all(r.exit_code == 0 for r in made) and "key id" in made[0].output
    assert (old.stat().st_mode & 0o777) == 0o600
    assert encrypted.exit_code == 0 and key_of(old).key_id in encrypted.output
    assert rotated.exit_code == 0 and key_of(new).key_id in rotated.output
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert verified.exit_code == 0 and "1 ledger entries" in verified.output and "All checks passed" in verified.output
    assert refused.exit_code == 2 and "wrong key" in refused.output
    store = ClientStateStore(state, key=key_of(new))
    assert store.read_ledger() == [{"round": 1}] and store.load("accountant")["history"] == [[1.0, 0.1, 5]]


def test_rotation_with_the_wrong_old_key_changes_nothing(tmp_path):
    # Prepare
    state = tmp_path / "state"
    keys = [tmp_path / f"{n}.key" for n in ("current", "stranger", "new")]
    for path in keys:
        runner.invoke(app, ["state", "keygen", str(path)])
    plaintext_state(state)
    runner.invoke(app, ["state", "encrypt", "--state-dir", str(state), "--key-file", str(keys[0])])
    before = sorted(p.name for p in state.iterdir())
    # Execute
    result = runner.invoke(app, ["state", "rotate-key", "--state-dir", str(state), "--old-key-file", str(keys[1]),
                                 "--new-key-file", str(keys[2])])  # fmt: skip
    # Assert
    assert result.exit_code == 2 and "wrong key" in result.output
    assert sorted(p.name for p in state.iterdir()) == before
    assert ClientStateStore(state, key=key_of(keys[0])).meta() == {"rounds_trained": 1}
    with pytest.raises(StateError, match="wrong key"):
        ClientStateStore(state, key=key_of(keys[2])).meta()


def test_a_command_on_an_encrypted_state_without_its_key_names_its_own_flag(tmp_path, monkeypatch):
    # Prepare: an encrypted state, and no key in the environment.
    import os

    state = ClientStateStore(tmp_path / "state", key=StateKey(os.urandom(32)))
    state.append_ledger({"round": 1})
    monkeypatch.delenv("FEDTOWER_STATE_KEY", raising=False)
    monkeypatch.delenv("FEDTOWER_STATE_KEY_FILE", raising=False)
    # Execute
    result = runner.invoke(app, ["site", "ledger", "--state-dir", str(tmp_path / "state")])
    # Assert
    assert result.exit_code == 2
    assert "--state-key-file" in result.output and "FEDTOWER_STATE_KEY_FILE" in result.output
