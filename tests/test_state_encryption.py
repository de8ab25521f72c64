"""The client's state encrypted at rest: round trip, wrong or missing key, tampering, swaps, rotation."""

import base64
import hashlib
import json
import os

import pytest
import torch

from fedtower.client.private_round import load_accountant
from fedtower.client.state import ClientStateStore, StateError
from fedtower.client.state_crypto import (
    StateKey,
    StateKeyError,
    read_key_file,
    resolve_state_key,
    write_new_key_file,
)


def new_key(source: str = "test key") -> StateKey:
    return StateKey(os.urandom(32), source)


def trained_store(path, key) -> ClientStateStore:
    """An encrypted store as a client leaves it after a DP round: components, ledger, event log."""
    store = ClientStateStore(path, key=key)
    store.save(
        {
            "users": {"embeddings": torch.arange(12.0).reshape(3, 4), "user_ids": ["u1", "u2", "u3"]},
            "optimizer": {"state": {}, "param_groups": []},
            "accountant": {"history": [[1.1, 0.01, 100]], "mechanism": "rdp"},
            "calibration": {"noise_multiplier": 1.1},
            "meta": {"rounds_trained": 1},
        }
    )
    store.append_ledger({"round": 1, "epsilon_after": 0.5})
    store.append_log("events", {"user": "u1", "item": "i9", "behaviour": "click", "timestamp": 7})
    return store


def manifest_of(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def forge_manifest(path, body: dict) -> None:
    """Write `body` as the manifest with a valid plain checksum, as someone without the key could."""
    body = {k: v for k, v in body.items() if k != "checksum"}
    unsigned = {k: v for k, v in body.items() if k != "mac"}
    body["checksum"] = hashlib.sha256(json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(body))


def test_encrypted_state_round_trips_and_holds_no_plaintext(tmp_path):
    # Prepare
    key = new_key()
    trained_store(tmp_path, key)
    # Execute: reopen as a new process would, with the same key.
    store = ClientStateStore(tmp_path, create=False, key=key)
    # Assert: everything reads back; no file holds a user id, and the manifest records the key id.
    assert store.load("users")["user_ids"] == ["u1", "u2", "u3"]
    assert torch.equal(store.load("users")["embeddings"], torch.arange(12.0).reshape(3, 4))
    assert store.load("accountant")["history"] == [[1.1, 0.01, 100]]
    assert store.read_ledger() == [{"round": 1, "epsilon_after": 0.5}]
    assert store.read_log("events")[0]["item"] == "i9"
    assert store.encrypted and store.verify() == 1
    for path in tmp_path.iterdir():
        if path.name != "manifest.json":
            # "u1" as plaintext would hold it (a JSON string, or the string in torch.save's pickle): a bare b"u1"
            # turns up in random ciphertext of this length now and then.
            data = path.read_bytes()
            plain = (b'"u1"', b"X\x02\x00\x00\x00u1", b"rounds_trained")
            assert not any(marker in data for marker in plain), path.name
    assert manifest_of(tmp_path)["encryption"]["key_id"] == key.key_id


@pytest.mark.parametrize("key", [None, "other"])
def test_a_missing_or_wrong_key_is_a_clear_error(tmp_path, key):
    # Prepare
    trained_store(tmp_path, new_key())
    reader = ClientStateStore(tmp_path, key=new_key() if key == "other" else None)
    # Execute / Assert: every way in fails, naming the state dir; nothing is read as plaintext.
    expected = "wrong key" if key else "no state key is configured"
    for read in (reader.meta, lambda: reader.load("users"), reader.read_ledger, lambda: reader.read_log("events")):
        with pytest.raises(StateError, match=expected) as error:
            read()
        assert str(tmp_path) in str(error.value)
    with pytest.raises(StateError, match=expected):
        reader.append_ledger({"round": 2})  # and no plaintext line is written beside the sealed log
    assert not (tmp_path / "ledger.jsonl").exists()


def test_a_tampered_component_ledger_line_or_manifest_is_refused(tmp_path):
    # Prepare
    key = new_key()
    trained_store(tmp_path, key)
    users_file = tmp_path / manifest_of(tmp_path)["components"]["users"]["file"]
    original = users_file.read_bytes()
    # Execute / Assert: a flipped ciphertext byte, with or without a matching manifest checksum.
    flipped = bytearray(original)
    flipped[-20] ^= 0x01
    users_file.write_bytes(bytes(flipped))
    with pytest.raises(StateError, match=f"corrupt: checksum mismatch in {users_file.name}"):
        ClientStateStore(tmp_path, key=key).load("users")
    users_file.write_bytes(original)
    manifest = (tmp_path / "manifest.json").read_bytes()
    # The manifest edited (checksum recomputed) to accept another file: its MAC no longer verifies.
    body = manifest_of(tmp_path)
    body["components"]["users"]["sha256"] = "0" * 64
    forge_manifest(tmp_path, body)
    with pytest.raises(StateError, match="manifest.json failed authentication with the right key"):
        ClientStateStore(tmp_path, key=key).load("users")
    (tmp_path / "manifest.json").write_bytes(manifest)
    # A modified ledger line.
    ledger = tmp_path / "ledger.e1.jsonl"
    line = base64.b64decode(ledger.read_bytes().strip())
    ledger.write_bytes(base64.b64encode(line[:-1] + bytes([line[-1] ^ 1])) + b"\n")
    with pytest.raises(StateError, match="ledger.e1.jsonl.*failed authentication at line 1"):
        ClientStateStore(tmp_path, key=key).read_ledger()


def test_a_downgraded_manifest_is_refused(tmp_path):
    # Prepare: an attacker strips the encryption block and recomputes the plain checksum.
    key = new_key()
    trained_store(tmp_path, key)
    body = manifest_of(tmp_path)
    del body["encryption"], body["mac"]
    forge_manifest(tmp_path, body)
    # Execute / Assert: the keyed client will not treat it as a plaintext store.
    with pytest.raises(StateError, match="not encrypted.*Refusing to read or write it in plaintext"):
        ClientStateStore(tmp_path, key=key).meta()


def test_swapped_component_files_fail_authentication(tmp_path):
    # Prepare: two components of one generation, swapped, with the manifest re-signed by the key
    # holder's own code (as if the checksums matched): only the associated data can tell.
    key = new_key()
    store = trained_store(tmp_path, key)
    body = manifest_of(tmp_path)
    users, accountant = body["components"]["users"], body["components"]["accountant"]
    users_bytes = (tmp_path / users["file"]).read_bytes()
    accountant_bytes = (tmp_path / accountant["file"]).read_bytes()
    (tmp_path / users["file"]).write_bytes(accountant_bytes)
    (tmp_path / accountant["file"]).write_bytes(users_bytes)
    users["sha256"], accountant["sha256"] = accountant["sha256"], users["sha256"]
    components = body["components"]
    store._replace_manifest(body["version"], components, body["encryption"])
    # Execute / Assert
    with pytest.raises(StateError, match=f"'accountant'.*failed authentication in {accountant['file']}"):
        ClientStateStore(tmp_path, key=key).load("accountant")
    with pytest.raises(StateError, match="'users'.*failed authentication"):
        ClientStateStore(tmp_path, key=key).load("users")


def test_reordered_or_dropped_log_lines_fail_authentication(tmp_path):
    # Prepare
    key = new_key()
    store = ClientStateStore(tmp_path, key=key)
    for n in range(3):
        store.append_ledger({"round": n})
    ledger = store.ledger_path
    lines = ledger.read_bytes().splitlines(keepends=True)
    # Execute / Assert: dropping the first line breaks the chain at the (new) first line.
    ledger.write_bytes(b"".join(lines[1:]))
    with pytest.raises(StateError, match="failed authentication at line 1"):
        store.read_ledger()
    ledger.write_bytes(lines[0] + lines[2] + lines[1])
    with pytest.raises(StateError, match="failed authentication at line 2"):
        store.read_ledger()


def test_a_plaintext_store_keeps_working_and_a_keyed_client_refuses_it(tmp_path):
    # Prepare
    ClientStateStore(tmp_path, key=None).save({"meta": {"rounds_trained": 1}})
    # Execute / Assert
    assert ClientStateStore(tmp_path, key=None).meta() == {"rounds_trained": 1}
    with pytest.raises(StateError, match="fedtower state encrypt"):
        ClientStateStore(tmp_path, key=new_key()).meta()


def test_the_accountant_fails_closed_under_encryption(tmp_path):
    # Prepare: a trained encrypted client whose accountant component is gone from the manifest.
    key = new_key()
    trained_store(tmp_path, key)
    store = ClientStateStore(tmp_path, key=key)
    body = manifest_of(tmp_path)
    components = {k: v for k, v in body["components"].items() if k != "accountant"}
    store._replace_manifest(body["version"], components, body["encryption"])
    # Execute / Assert: no fresh epsilon, with the right key, with none, or with a wrong one.
    with pytest.raises(StateError, match="has no privacy accountant"):
        load_accountant(ClientStateStore(tmp_path, key=key))
    with pytest.raises(StateError, match="no state key is configured"):
        load_accountant(ClientStateStore(tmp_path, key=None))
    with pytest.raises(StateError, match="wrong key"):
        load_accountant(ClientStateStore(tmp_path, key=new_key()))


def test_rotation_re_encrypts_everything_and_retires_the_old_key(tmp_path):
    # Prepare
    old, new = new_key("old"), new_key("new")
    trained_store(tmp_path, old)
    # Execute
    version = ClientStateStore(tmp_path, key=old).rekey(new)
    # Assert: all state under the new key, the old key refused, no old-epoch files left.
    store = ClientStateStore(tmp_path, key=new)
    assert version == 2 and store.verify() == 2
    assert store.load("accountant")["history"] == [[1.1, 0.01, 100]]
    assert store.read_ledger() == [{"round": 1, "epsilon_after": 0.5}]
    assert store.read_log("events")[0]["user"] == "u1"
    store.append_ledger({"round": 2})
    assert [e["round"] for e in store.read_ledger()] == [1, 2]
    with pytest.raises(StateError, match="wrong key"):
        ClientStateStore(tmp_path, key=old).meta()
    names = {p.name for p in tmp_path.iterdir()}
    assert not {n for n in names if ".1." in n or ".e1." in n}


@pytest.mark.parametrize("crash_at", ["before-commit", "after-commit"])
def test_a_crash_mid_rotation_leaves_a_readable_store(tmp_path, monkeypatch, crash_at):
    # Prepare: rotation dies just before, or just after, the manifest replace (its commit point).
    old, new = new_key("old"), new_key("new")
    trained_store(tmp_path, old)

    def power_loss(*args, **kwargs):
        raise OSError("simulated power loss")

    target = "_replace_manifest" if crash_at == "before-commit" else "_collect_garbage"
    monkeypatch.setattr(ClientStateStore, target, power_loss)
    # Execute
    with pytest.raises(OSError, match="power loss"):
        ClientStateStore(tmp_path, key=old).rekey(new)
    monkeypatch.undo()
    # Assert: exactly one key opens the whole state, with nothing lost.
    current, retired = (old, new) if crash_at == "before-commit" else (new, old)
    store = ClientStateStore(tmp_path, key=current)
    assert store.load("users")["user_ids"] == ["u1", "u2", "u3"]
    assert store.read_ledger() == [{"round": 1, "epsilon_after": 0.5}]
    assert len(store.read_log("events")) == 1
    with pytest.raises(StateError, match="wrong key"):
        ClientStateStore(tmp_path, key=retired).meta()
    # The next write tidies up what the crash left and the state stays whole.
    store.save({"meta": {"rounds_trained": 2}})
    assert ClientStateStore(tmp_path, key=current).verify() == (2 if crash_at == "before-commit" else 3)
    epoch = "e1" if crash_at == "before-commit" else "e2"
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == [f"events.{epoch}.jsonl", f"ledger.{epoch}.jsonl"]


def test_encrypting_a_plaintext_store_keeps_everything(tmp_path):
    # Prepare
    plain = ClientStateStore(tmp_path, key=None)
    plain.save({"accountant": {"history": [[2.0, 0.1, 10]]}, "meta": {"rounds_trained": 3}})
    plain.append_ledger({"round": 3})
    key = new_key()
    # Execute
    plain.rekey(key)
    # Assert: the plaintext files are gone and the keyed store reads everything.
    store = ClientStateStore(tmp_path, key=key)
    assert store.encrypted and store.meta() == {"rounds_trained": 3}
    assert store.read_ledger() == [{"round": 3}]
    assert not (tmp_path / "ledger.jsonl").exists()
    with pytest.raises(StateError, match="no state key is configured"):
        ClientStateStore(tmp_path, key=None).meta()


def test_keys_come_from_node_config_then_the_environment(tmp_path):
    # Prepare
    key_file = tmp_path / "site.key"
    written = write_new_key_file(key_file)
    env_key = new_key()
    environ = {"FEDTOWER_STATE_KEY": env_key.key.hex()}
    # Execute
    from_node = resolve_state_key({"state-key-file": str(key_file)}, environ)
    from_env = resolve_state_key({}, environ)
    from_b64 = resolve_state_key({}, {"FEDTOWER_STATE_KEY": base64.b64encode(env_key.key).decode()})
    # Assert
    assert from_node.key == written.key and (key_file.stat().st_mode & 0o777) == 0o600
    assert from_env.key == env_key.key == from_b64.key
    assert resolve_state_key({}, {}) is None
    assert written.key_id not in repr(written.key) and "key=" not in repr(written)


def test_bad_key_files_are_refused(tmp_path, monkeypatch):
    # Prepare
    short = tmp_path / "short.key"
    short.write_text(base64.b64encode(b"x" * 16).decode())
    short.chmod(0o600)
    loose = tmp_path / "loose.key"
    write_new_key_file(loose)
    loose.chmod(0o644)
    # Execute / Assert
    with pytest.raises(StateKeyError, match="short.key is not 32 bytes"):
        read_key_file(short)
    with pytest.raises(StateKeyError, match="chmod 600"):
        read_key_file(loose)
    with pytest.raises(StateKeyError, match="already exists"):
        write_new_key_file(short)
    monkeypatch.setenv("FEDTOWER_STATE_KEY", "not-a-key")
    with pytest.raises(StateError, match=r"\$FEDTOWER_STATE_KEY is not 32 bytes"):
        ClientStateStore(tmp_path / "s")


def test_a_dp_client_with_a_key_file_trains_encrypted_and_fails_closed_with_another(tmp_path):
    # Prepare: a deployment-style node (own state dir, key file in node config), one DP round.
    from fedtower.client.handlers import train_on_node
    from fedtower.config import RunSettings
    from fedtower.server.federation import initial_item_tower
    from tests.flower_utils import node_context, server_message, task_identity

    settings = RunSettings(data="synthetic:users=60,items=80,seed=4", num_sites=2, dim=8, local_epochs=1,
                           output_dir=str(tmp_path), run_name="enc", history_len=20, dp_batch_size=8,
                           num_negatives=8, noise_multiplier=1.5)  # fmt: skip
    config = settings.to_run_config()
    tower = initial_item_tower(settings)
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    key_file, other_file = tmp_path / "site.key", tmp_path / "other.key"
    write_new_key_file(key_file), write_new_key_file(other_file)
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(state_dir)}

    def train(key_path, server_round):
        context = node_context({**node, "state-key-file": str(key_path)}, config)
        with task_identity():
            return train_on_node(server_message(tower, node_id=3, server_round=server_round), context)

    # Execute
    train(key_file, 1)
    # Assert: the state is sealed under the site's key; the other key is refused before any training.
    store = ClientStateStore(state_dir, key=read_key_file_key(key_file))
    assert store.encrypted and store.meta()["rounds_trained"] == 1
    assert len(store.read_ledger()) == 1 and store.load("accountant")["history"]
    with pytest.raises(StateError, match="wrong key"):
        train(other_file, 2)
    assert ClientStateStore(state_dir, key=read_key_file_key(key_file)).meta()["rounds_trained"] == 1


def read_key_file_key(path) -> StateKey:
    return StateKey(read_key_file(path), str(path))
