import fcntl
import json
import logging
import multiprocessing
import os
import stat

import pytest
import torch

from fedtower.client.state import ClientStateStore, StateError


def trained_optimizer_state() -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def component_file(store: ClientStateStore, name: str):
    manifest = json.loads(store.manifest_path.read_text())
    return store.state_dir / manifest["components"][name]["file"]


def test_components_round_trip_through_a_fresh_store(tmp_path):
    embeddings = torch.randn(5, 4)
    optimizer = trained_optimizer_state()
    ClientStateStore(tmp_path / "state").save(
        {
            "users": {"embeddings": embeddings, "user_ids": ["u1", "u2", "u3", "u4", "u5"]},
            "optimizer": optimizer,
            "meta": {"rounds_trained": 2, "last_round": 7, "run_id": "run-a"},
        }
    )

    reopened = ClientStateStore(tmp_path / "state", create=False)  # as a new process would
    users = reopened.load("users")
    loaded_optimizer = reopened.load("optimizer")

    assert torch.equal(users["embeddings"], embeddings)
    assert users["user_ids"] == ["u1", "u2", "u3", "u4", "u5"]
    assert torch.equal(loaded_optimizer["state"][0]["exp_avg"], optimizer["state"][0]["exp_avg"])
    assert loaded_optimizer["param_groups"][0]["lr"] == 0.01
    assert reopened.meta() == {"rounds_trained": 2, "last_round": 7, "run_id": "run-a"}
    assert reopened.exists_initialised()


def test_versions_increase_and_unsaved_components_are_kept(tmp_path):
    store = ClientStateStore(tmp_path)
    first = store.save({"users": {"embeddings": torch.zeros(2, 2), "user_ids": ["a", "b"]}})

    second = store.save({"accountant": {"history": [[1.1, 0.01, 100]]}})
    store.update_meta(rounds_trained=1)
    third = store.version

    assert (first, second, third) == (1, 2, 3)
    assert store.load("users")["user_ids"] == ["a", "b"]
    assert store.load("accountant") == {"history": [[1.1, 0.01, 100]]}


def test_update_meta_merges_fields(tmp_path):
    store = ClientStateStore(tmp_path)
    store.update_meta(run_id="run-a", rounds_trained=1)

    meta = store.update_meta(rounds_trained=2, last_round=4)

    assert meta == {"run_id": "run-a", "rounds_trained": 2, "last_round": 4}
    assert ClientStateStore(tmp_path).meta() == meta


def test_crash_before_the_manifest_leaves_the_previous_version_intact(tmp_path, monkeypatch):
    store = ClientStateStore(tmp_path)
    store.save({"users": {"embeddings": torch.ones(3, 2), "user_ids": ["a", "b", "c"]}, "meta": {"n": 1}})

    def crash(*args, **kwargs):
        raise OSError("simulated power loss before the manifest was replaced")

    monkeypatch.setattr(ClientStateStore, "_replace_manifest", crash)
    with pytest.raises(OSError, match="power loss"):
        store.save({"users": {"embeddings": torch.zeros(3, 2), "user_ids": ["x", "y", "z"]}, "meta": {}})
    monkeypatch.undo()
    reopened = ClientStateStore(tmp_path)

    assert (tmp_path / "users.2.pt").exists()  # the new file was written, but never committed
    assert reopened.version == 1
    assert torch.equal(reopened.load("users")["embeddings"], torch.ones(3, 2))
    assert reopened.meta() == {"n": 1}
    assert reopened.save({"meta": {"n": 3}}) == 2  # the next save simply reuses the version


def test_only_the_current_and_previous_generations_are_kept(tmp_path):
    store = ClientStateStore(tmp_path)
    for n in range(1, 5):
        store.save({"meta": {"n": n}})

    meta_files = sorted(p.name for p in tmp_path.glob("meta.*.json"))

    assert meta_files == ["meta.3.json", "meta.4.json"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_flipped_byte_is_a_checksum_error(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save({"users": {"embeddings": torch.randn(4, 4), "user_ids": list("abcd")}})
    path = component_file(store, "users")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(StateError, match="corrupt: checksum mismatch") as error:
        ClientStateStore(tmp_path).load("users")

    assert str(tmp_path) in str(error.value) and path.name in str(error.value)


def test_a_deleted_component_file_is_an_error_not_a_default(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save({"accountant": {"history": []}})
    component_file(store, "accountant").unlink()

    with pytest.raises(StateError, match="'accountant'.*missing or unreadable"):
        store.load("accountant", default={})


@pytest.mark.parametrize(
    "garbage",
    [b"{not json", b"[]", b'{"format": "fedtower-client-state/1", "version": 1, "components": {}}'],
)
def test_a_garbage_manifest_is_an_error(tmp_path, garbage):
    store = ClientStateStore(tmp_path)
    store.save({"meta": {"n": 1}})
    store.manifest_path.write_bytes(garbage)

    with pytest.raises(StateError, match="manifest.json of state dir .* is corrupt"):
        ClientStateStore(tmp_path).meta()


def test_an_edited_manifest_fails_its_own_checksum(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save({"meta": {"n": 1}})
    manifest = json.loads(store.manifest_path.read_text())
    manifest["version"] = 9
    store.manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(StateError, match="checksum mismatch over its own contents"):
        store.version


def test_a_lost_manifest_is_refused_rather_than_reset(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save({"accountant": {"history": [[1.0, 0.1, 10]]}})
    store.save({"accountant": {"history": [[1.0, 0.1, 20]]}})
    store.manifest_path.unlink()

    with pytest.raises(StateError, match="no manifest.json: the manifest was lost"):
        ClientStateStore(tmp_path).load("accountant", default=None)


def test_a_missing_component_is_an_error_unless_a_default_is_given(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save({"meta": {"n": 1}})

    assert store.load("optimizer", default=None) is None
    assert not store.has("optimizer") and store.has("meta")
    with pytest.raises(StateError, match="has no component 'optimizer'"):
        store.load("optimizer")


def test_trained_state_without_an_accountant_fails_closed(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save({"users": {"embeddings": torch.zeros(1, 2), "user_ids": ["a"]}, "meta": {"rounds_trained": 3}})

    with pytest.raises(StateError, match="trained 3 round.*no 'accountant' component"):
        store.assert_consistent(expect_trained=False)
    store.save({"accountant": {"history": [[1.0, 0.1, 30]]}})
    store.assert_consistent(expect_trained=True)  # complete now: no error


def test_a_client_expected_to_have_trained_refuses_empty_state(tmp_path):
    empty = ClientStateStore(tmp_path / "empty")
    untrained = ClientStateStore(tmp_path / "untrained")
    untrained.save({"meta": {"rounds_trained": 0}})

    empty.assert_consistent(expect_trained=False)  # a brand-new client is fine
    with pytest.raises(StateError, match="no manifest.json.*expected to have trained"):
        empty.assert_consistent(expect_trained=True)
    with pytest.raises(StateError, match="never trained"):
        untrained.assert_consistent(expect_trained=True)


def test_consistency_check_verifies_every_checksum(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save({"item_tower": {"w": torch.ones(3)}, "meta": {"rounds_trained": 0}})
    path = component_file(store, "item_tower")
    path.write_bytes(path.read_bytes()[:-1])

    with pytest.raises(StateError, match="'item_tower'.*checksum mismatch"):
        store.assert_consistent(expect_trained=False)


def saved_store(path) -> ClientStateStore:
    """A store after its first save: a client's first ledger line always follows a committed save."""
    store = ClientStateStore(path)
    store.save({"meta": {"rounds_trained": 1}})
    return store


def test_ledger_appends_survive_a_new_store(tmp_path):
    saved_store(tmp_path).append_ledger({"round": 1, "epsilon": 0.5})
    ClientStateStore(tmp_path).append_ledger({"round": 2, "epsilon": 0.8})

    entries = ClientStateStore(tmp_path).read_ledger()

    assert entries == [{"epsilon": 0.5, "round": 1}, {"epsilon": 0.8, "round": 2}]


def test_an_unfinished_last_ledger_line_is_reported_and_cut_before_the_next_append(tmp_path, caplog):
    store = saved_store(tmp_path)
    store.append_ledger({"round": 1})
    with open(store.ledger_path, "ab") as handle:
        handle.write(b'{"round": 2, "eps')  # an append interrupted mid-write

    with caplog.at_level(logging.WARNING, logger="fedtower.client.state"):
        before = store.read_ledger()
    store.append_ledger({"round": 3})

    assert before == [{"round": 1}]
    assert "unfinished line" in caplog.text
    assert store.read_ledger() == [{"round": 1}, {"round": 3}]


def test_a_lost_manifest_after_the_first_round_is_refused_not_a_fresh_start(tmp_path):
    # Prepare: one saved round and its ledger line (generation 1 only), then the manifest is deleted.
    store = saved_store(tmp_path)
    store.append_ledger({"round": 1})
    store.manifest_path.unlink()
    # Execute / Assert: the ledger line proves a save committed, so the state was not new.
    with pytest.raises(StateError, match="holds component files .*ledger.jsonl.* but no manifest.json"):
        ClientStateStore(tmp_path).load("accountant", default=None)


def test_a_corrupt_middle_ledger_line_is_an_error(tmp_path):
    store = saved_store(tmp_path)
    store.ledger_path.write_bytes(b'{"round": 1}\nnot json\n{"round": 3}\n')

    with pytest.raises(StateError, match="line 2 is not a JSON object"):
        store.read_ledger()


def test_ledger_entries_must_be_strict_json(tmp_path):
    store = ClientStateStore(tmp_path)

    with pytest.raises(ValueError, match="strict JSON"):
        store.append_ledger({"epsilon": float("inf")})


def test_state_dir_is_private_to_its_owner(tmp_path):
    store = ClientStateStore(tmp_path / "new" / "state")
    store.save({"users": {"embeddings": torch.zeros(1, 1), "user_ids": ["a"]}, "meta": {}})
    store.append_ledger({"round": 1})

    files = [component_file(store, "users"), component_file(store, "meta"), store.manifest_path]

    assert stat.S_IMODE(os.stat(store.state_dir).st_mode) == 0o700
    for path in [*files, store.ledger_path, store.state_dir / "state.lock"]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path.name


def test_a_missing_dir_without_create_and_a_file_are_errors(tmp_path):
    (tmp_path / "a-file").write_text("x")

    with pytest.raises(StateError, match="does not exist.*create=False"):
        ClientStateStore(tmp_path / "absent", create=False)
    with pytest.raises(StateError, match="a-file exists but is not a directory"):
        ClientStateStore(tmp_path / "a-file")
    assert not (tmp_path / "absent").exists()


def test_objects_that_need_full_pickle_are_refused_before_anything_is_written(tmp_path):
    store = ClientStateStore(tmp_path)

    with pytest.raises(ValueError, match="weights_only=True"):
        store.save({"optimizer": {"bad": object()}, "meta": {"n": 1}})

    assert not store.exists_initialised()


def test_unknown_components_must_be_declared(tmp_path):
    with pytest.raises(ValueError, match="Unknown state component 'budget'"):
        ClientStateStore(tmp_path).save({"budget": {"spent": 1.0}})

    declared = ClientStateStore(tmp_path, kinds={"budget": "json"})
    declared.save({"budget": {"spent": 1.0}})

    assert ClientStateStore(tmp_path).load("budget") == {"spent": 1.0}  # kind comes from the manifest


def test_a_held_lock_times_out_with_a_clear_error(tmp_path):
    store = ClientStateStore(tmp_path, lock_timeout=0.2)
    holder = os.open(tmp_path / "state.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(StateError, match="Timed out after 0.2 s waiting for the lock"):
            store.save({"meta": {"n": 1}})
    finally:
        os.close(holder)

    assert store.save({"meta": {"n": 1}}) == 1


SAVES_PER_WRITER = 8


def save_repeatedly(state_dir, writer: int) -> None:
    store = ClientStateStore(state_dir)
    for i in range(SAVES_PER_WRITER):
        store.save(
            {
                "users": {"embeddings": torch.full((64, 8), float(writer)), "user_ids": [str(writer)] * 64},
                "meta": {"writer": writer, "i": i},
            }
        )
        store.append_ledger({"writer": writer, "i": i})


def test_concurrent_saves_from_two_processes_end_consistent(tmp_path):
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=save_repeatedly, args=(tmp_path, w)) for w in (1, 2)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=30)

    store = ClientStateStore(tmp_path)
    snapshot = store.load_many(["users", "meta"])
    last_writer = snapshot["meta"]["writer"]

    assert [p.exitcode for p in writers] == [0, 0]
    assert store.verify() == store.version == 2 * SAVES_PER_WRITER
    assert torch.equal(snapshot["users"]["embeddings"], torch.full((64, 8), float(last_writer)))
    assert len(store.read_ledger()) == 2 * SAVES_PER_WRITER


def test_a_numpy_scalar_is_refused_although_it_looks_like_a_float(tmp_path):
    # Prepare: numpy.float64 subclasses float but pickles as a numpy object, which weights_only refuses.
    import numpy as np

    store = ClientStateStore(tmp_path)

    # Execute / Assert: the quick type check must not wave it through.
    with pytest.raises(ValueError, match="weights_only=True"):
        store.save({"optimizer": {"lr": np.float64(0.1)}})
    assert not store.exists_initialised()


def test_plain_tensor_components_skip_the_verifying_load_and_still_load_back(tmp_path, monkeypatch):
    # Prepare: count torch.load calls made while saving.
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    store = ClientStateStore(tmp_path)
    optimizer = trained_optimizer_state()

    # Execute
    store.save({"optimizer": optimizer, "users": {"users": ["u1"], "embeddings": torch.ones(1, 4)}})
    saved_loads = len(loads)
    back = ClientStateStore(tmp_path).load_many(["optimizer", "users"])

    # Assert: no load while saving; what was saved reads back equal.
    assert saved_loads == 0
    assert back["users"]["users"] == ["u1"] and torch.equal(back["users"]["embeddings"], torch.ones(1, 4))
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], optimizer["state"][0]["exp_avg"])


def _count_fsyncs(monkeypatch) -> list:
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real_fsync(fd))
    return calls


def test_a_durable_store_fsyncs_every_generation_and_a_simulation_store_only_its_ledger(tmp_path, monkeypatch):
    # Prepare
    calls = _count_fsyncs(monkeypatch)
    durable = ClientStateStore(tmp_path / "site")
    quick = ClientStateStore(tmp_path / "simulated", durable=False)

    # Execute
    durable.save({"meta": {"n": 1}, "users": {"users": [], "embeddings": torch.zeros(0, 2)}})
    durable_saves = len(calls)
    quick.save({"meta": {"n": 1}, "users": {"users": [], "embeddings": torch.zeros(0, 2)}})
    quick_saves = len(calls) - durable_saves
    quick.append_ledger({"round": 1})
    quick_ledger = len(calls) - durable_saves - quick_saves

    # Assert: files, manifest and directory fsynced on a site; nothing for a simulation's generation,
    # but its privacy ledger is as durable as a site's; both read back the same.
    assert durable_saves >= 5  # two components, the manifest, the directory twice
    assert quick_saves == 0
    assert quick_ledger >= 1
    assert ClientStateStore(tmp_path / "simulated").load("meta") == {"n": 1}
    assert ClientStateStore(tmp_path / "simulated").read_ledger() == [{"round": 1}]
