"""Serving from a real client state dir: loading, record(), the event log and the next round."""

import json
import shutil

import numpy as np
import pytest
import torch

from fedtower.client.events import EventLog
from fedtower.client.handlers import train_on_node
from fedtower.client.local import load_node_data
from fedtower.client.state import ClientStateStore, StateError
from fedtower.config import RunSettings
from fedtower.server.federation import initial_item_tower
from fedtower.serving import Recommender, UnknownItemError
from tests.flower_utils import node_context, server_message, task_identity

DATA = "synthetic:users=90,items=120,seed=4"
NODE = {"partition-id": 0, "num-partitions": 3}


def settings_in(folder) -> RunSettings:
    return RunSettings(data=DATA, num_sites=3, dim=16, local_epochs=1, output_dir=str(folder), run_name="t",
                       history_len=50)  # fmt: skip


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A client that trained one round on partition 0 of 3 (trained once per module)."""
    settings = settings_in(tmp_path_factory.mktemp("pristine"))
    with task_identity():
        train_on_node(server_message(initial_item_tower(settings), node_id=3),
                      node_context(NODE, settings.to_run_config()))  # fmt: skip
    return settings.run_dir


@pytest.fixture()
def trained(pristine, tmp_path):
    """A fresh copy of that client's run dir for each test: (run settings, state dir)."""
    settings = settings_in(tmp_path)
    shutil.copytree(pristine, settings.run_dir)
    return settings, settings.node_state_dir(0)


def unseen_item(recommender: Recommender, user: str) -> str:
    seen = set(recommender.history(user))
    return next(i for i in recommender.catalogue.index.ids if i not in seen)


def test_from_state_dir_serves_what_the_node_trained(trained):
    # Prepare
    settings, state_dir = trained
    store = ClientStateStore(state_dir)
    saved_users = store.load("users")
    # Execute: everything comes from the state dir and the meta the node saved.
    recommender = Recommender.from_state_dir(state_dir)
    explicit = Recommender.from_state_dir(state_dir, run_config=settings.to_run_config(), node_config=NODE)
    # Assert: the node's users, its saved embeddings, the global tower's items, seen items excluded.
    assert recommender.users == saved_users["users"]
    np.testing.assert_array_equal(recommender.free, saved_users["embeddings"].numpy())
    user = recommender.users[0]
    recs = recommender.recommend(user, k=10)
    assert len(recs) == 10 and not {r.item for r in recs} & set(recommender.history(user))
    assert [r.item for r in recs] == [r.item for r in explicit.recommend(user, k=10)]
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True)


def test_a_state_without_a_snapshot_cannot_serve(tmp_path):
    state_dir = tmp_path / "empty"
    ClientStateStore(state_dir).save({"meta": {"rounds_trained": 0}})
    with pytest.raises(StateError, match="no item-tower snapshot"):
        Recommender.from_state_dir(state_dir, node_config=NODE)


def test_record_updates_the_user_now_and_leaves_the_item_tower_alone(trained):
    # Prepare
    settings, state_dir = trained
    store = ClientStateStore(state_dir)
    tower_before = {k: v.clone() for k, v in store.load("item_tower").items()}
    version_before = store.version
    recommender = Recommender.from_state_dir(state_dir)
    user = recommender.users[1]
    item = unseen_item(recommender, user)
    vector_before = recommender.user_vector(user)
    table_before = recommender.table.vectors.copy()
    # Execute: an event happening now (no timestamp given).
    result = recommender.record({"user": user, "item": item, "behaviour": "purchase"})
    # Assert: the user's vector moved, the item is now seen, the table did not change.
    assert result.counted and result.weight == 1.0
    assert not np.allclose(recommender.user_vector(user), vector_before)
    assert item in recommender.history(user)
    assert item not in [r.item for r in recommender.recommend(user, k=50)]
    np.testing.assert_array_equal(recommender.table.vectors, table_before)
    # The event log holds exactly that event, one JSON line.
    lines = (state_dir / "events.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"user": user, "item": item, "behaviour": "purchase", "timestamp": result.timestamp, "value": None}
    ]
    # The state has a new generation with the new embedding; the item tower is byte-for-byte the same.
    assert store.version == version_before + 1
    saved = store.load("users")
    row = saved["users"].index(user)
    np.testing.assert_array_equal(saved["embeddings"][row].numpy(), recommender.free[recommender.users.index(user)])
    for key, tensor in store.load("item_tower").items():
        assert torch.equal(tensor, tower_before[key])
    # A fresh load (another process) sees the event and the new embedding.
    reloaded = Recommender.from_state_dir(state_dir)
    assert item in reloaded.history(user)
    np.testing.assert_allclose(reloaded.user_vector(user), recommender.user_vector(user), rtol=1e-6, atol=1e-7)


def test_record_lowers_the_users_own_loss(trained):
    # The refit is a few gradient steps on the user's loss: it must go down, not just change.
    from fedtower.serving.pooling import softmax_loss

    _, state_dir = trained
    recommender = Recommender.from_state_dir(state_dir)
    user = recommender.users[2]
    row = recommender.users.index(user)
    item = unseen_item(recommender, user)
    recommender._add_interaction(row, recommender.catalogue.index.row(item), 1.0)
    history, weights = recommender._history[row], recommender._weights[row]

    def loss() -> float:
        vector = recommender.user_vector(user)
        return softmax_loss(vector, recommender.table.vectors, recommender.table.bias, history, weights)

    before = loss()
    recommender._refit(row)
    assert loss() < before


def test_malformed_events_are_refused_naming_the_field(trained):
    _, state_dir = trained
    recommender = Recommender.from_state_dir(state_dir)
    user = recommender.users[0]
    item = recommender.catalogue.index.ids[0]
    cases = [
        ({"user": user, "item": "ghost-item", "behaviour": "click"}, UnknownItemError, "Field 'item'"),
        ({"user": user, "item": item, "behaviour": "like"}, ValueError, "field 'behaviour'"),
        ({"user": user, "item": item, "behaviour": "rating", "value": 9}, ValueError, "field 'value'"),
        ({"user": user, "item": item, "behaviour": "click", "timestamp": "soon"}, ValueError, "field 'timestamp'"),
        ({"user": user, "item": item, "behaviour": "click", "colour": "red"}, ValueError, "'colour'"),
        ({"item": item, "behaviour": "click"}, ValueError, "field 'user'"),
        ("not an event", ValueError, "must be a mapping"),
    ]
    for event, error, message in cases:
        with pytest.raises(error, match=message):
            recommender.record(event)
    # Nothing was logged.
    assert not (state_dir / "events.jsonl").exists()


def test_the_next_round_trains_on_recorded_events(trained, caplog):
    # Prepare: record an event, and append a line naming an item the catalogue lacks.
    settings, state_dir = trained
    recommender = Recommender.from_state_dir(state_dir)
    user = recommender.users[0]
    item = unseen_item(recommender, user)
    recommender.record({"user": user, "item": item, "behaviour": "cart", "timestamp": 1_700_000_000})
    gone = {"user": user, "item": "gone", "behaviour": "click", "timestamp": 1_700_000_001}
    EventLog(ClientStateStore(state_dir)).append(gone)
    # Execute: how the client app loads its data for the next round.
    with caplog.at_level("WARNING", logger="fedtower.client"):
        data = load_node_data(settings, NODE)
    # Assert: the recorded event is in the user's local data; the bad line is reported, not trained on.
    row = data.users.index(user)
    items = np.concatenate([data.split.train.items_of(row), data.split.test.items_of(row)])
    assert recommender.catalogue.index.row(item) in items
    assert "events.jsonl:2" in caplog.text and "'item'" in caplog.text
    # And a real round runs on it.
    with task_identity():
        train_on_node(server_message(initial_item_tower(settings), node_id=3, server_round=2),
                      node_context(NODE, settings.to_run_config()))  # fmt: skip
    assert ClientStateStore(state_dir).meta()["rounds_trained"] == 2


def test_cli_recommend_prints_the_same_list_as_the_api(trained):
    from typer.testing import CliRunner

    from fedtower.cli import app

    # Prepare
    _, state_dir = trained
    recommender = Recommender.from_state_dir(state_dir)
    user = recommender.users[0]
    expected = [r.item for r in recommender.recommend(user, k=5, diversity=0.3)]
    runner = CliRunner()
    # Execute
    as_json = runner.invoke(app, ["recommend", "--state-dir", str(state_dir), "--user", user, "-k", "5",
                                  "--diversity", "0.3", "--explain", "--json"])  # fmt: skip
    as_text = runner.invoke(app, ["recommend", "--state-dir", str(state_dir), "--user", user, "-k", "5",
                                  "--explain"])  # fmt: skip
    unknown = runner.invoke(app, ["recommend", "--state-dir", str(state_dir), "--user", "nobody"])
    # Assert
    assert as_json.exit_code == 0, as_json.output
    listed = json.loads(as_json.output)
    assert [r["item"] for r in listed] == expected
    assert all(len(r["explanation"]) == 3 for r in listed)
    assert as_text.exit_code == 0 and "because of" in as_text.output and "  1. " in as_text.output
    assert unknown.exit_code == 2 and "Unknown user 'nobody'" in unknown.output


def test_an_encrypted_state_serves_records_and_trains_with_the_sites_key(tmp_path):
    # Prepare: a node whose state is encrypted with a key file named in its node config.
    from fedtower.client.state_crypto import write_new_key_file

    write_new_key_file(tmp_path / "state.key")
    node = {**NODE, "state-key-file": str(tmp_path / "state.key")}
    settings = RunSettings(data=DATA, num_sites=3, dim=16, local_epochs=1, output_dir=str(tmp_path),
                           run_name="enc", history_len=50)  # fmt: skip
    with task_identity():
        train_on_node(server_message(initial_item_tower(settings), node_id=3),
                      node_context(node, settings.to_run_config()))  # fmt: skip
    state_dir = settings.node_state_dir(0)
    # Execute: serve and record with the key; the event log is sealed like the rest of the state.
    recommender = Recommender.from_state_dir(state_dir, node_config={"state-key-file": node["state-key-file"]})
    user = recommender.users[0]
    item = unseen_item(recommender, user)
    recommender.record({"user": user, "item": item, "behaviour": "purchase"})
    # Assert: no plaintext event log, no user id in clear on disk; the next round's data has the event.
    assert not (state_dir / "events.jsonl").exists()
    assert all(user.encode() not in f.read_bytes() for f in state_dir.iterdir() if f.is_file())
    data = load_node_data(settings, node)
    row = data.users.index(user)
    items = np.concatenate([data.split.train.items_of(row), data.split.test.items_of(row)])
    assert recommender.catalogue.index.row(item) in items
    # Without the key, serving fails closed.
    with pytest.raises(StateError):
        Recommender.from_state_dir(state_dir)


def test_evaluation_refreshes_the_served_item_tower(trained):
    # Prepare: a newer global tower than the one the node trained from (as after the last round).
    from fedtower.client.handlers import evaluate_on_node

    settings, state_dir = trained
    newer = initial_item_tower(RunSettings.from_run_config({**settings.to_run_config(), "seed": 7}))
    # Execute
    with task_identity():
        evaluate_on_node(server_message(newer, node_id=3, message_type="evaluate"),
                         node_context(NODE, settings.to_run_config()))  # fmt: skip
    # Assert: the snapshot serving reads is now exactly that tower.
    saved = ClientStateStore(state_dir).load("item_tower")
    for key, array in newer.to_torch_state_dict().items():
        assert torch.equal(saved[key], array)
