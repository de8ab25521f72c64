"""Serving while the node trains: snapshot reloads, merged user rows, new users, locally added items."""

import functools
import multiprocessing
import shutil

import numpy as np
import pytest
import torch

from fedtower.client.handlers import evaluate_on_node, train_on_node
from fedtower.client.local import build_model, load_node_data
from fedtower.client.state import ClientStateStore
from fedtower.config import RunSettings
from fedtower.server.federation import initial_item_tower
from fedtower.serving import Filters, ItemExistsError, Recommender
from fedtower.serving.recommender import ID_EMBEDDING_KEY
from fedtower.serving.sync import merge_user_rows
from tests import test_serving_state
from tests.flower_utils import node_context, server_message, task_identity
from tests.test_serving_state import NODE, unseen_item

# A node that trained one round, copied afresh for each test (the fixtures of test_serving_state).
pristine, trained = test_serving_state.pristine, test_serving_state.trained


def newer_tower(settings: RunSettings, seed: int = 7):
    """A global item tower other than the one the node trained from (as after aggregation)."""
    return initial_item_tower(RunSettings.from_run_config({**settings.to_run_config(), "seed": seed}))


def evaluate_round(settings: RunSettings, tower) -> None:
    """What the client app does at an evaluation: it keeps the newest global tower for serving."""
    with task_identity():
        evaluate_on_node(server_message(tower, node_id=3, message_type="evaluate"),
                         node_context(NODE, settings.to_run_config()))  # fmt: skip


def train_round(settings: RunSettings, server_round: int) -> None:
    with task_identity():
        train_on_node(server_message(initial_item_tower(settings), node_id=3, server_round=server_round),
                      node_context(NODE, settings.to_run_config()))  # fmt: skip


def model_with(settings: RunSettings, tower):
    model = build_model(settings, load_node_data(settings, NODE).catalogue, 0)
    model.load_item_tower(tower.to_torch_state_dict(), source="The test tower", hint="")
    return model


def row_of(saved: dict, user: str) -> np.ndarray:
    return saved["embeddings"][saved["users"].index(user)].numpy()


# ---------------------------------------------------------------- snapshot reloads


def test_a_newer_snapshot_is_built_off_to_the_side_then_swapped_in(trained):
    # Prepare: a server that loaded round 1; nothing newer yet, then an evaluation saves a newer tower.
    settings, state_dir = trained
    recommender = Recommender.from_state_dir(state_dir)
    user = recommender.users[0]
    before = [r.to_dict() for r in recommender.recommend(user, k=10)]
    generation = recommender.status()["snapshot"]["generation"]
    unchanged = recommender.refresh()
    tower = newer_tower(settings)
    evaluate_round(settings, tower)
    # Execute: build (as the server does in a worker thread), answer a request, then swap.
    prepared = recommender.prepare_refresh()
    during = [r.to_dict() for r in recommender.recommend(user, k=10)]
    recommender.apply_refresh(prepared)
    after = [r.to_dict() for r in recommender.recommend(user, k=10)]
    # Assert: nothing reloaded while nothing was newer; the request during the build saw the old table;
    # afterwards the table is exactly the new tower's, and the status names its generation.
    assert unchanged["snapshot"]["generation"] == generation
    assert during == before
    with torch.no_grad():
        expected = model_with(settings, tower).item_table()[0].numpy()
    np.testing.assert_allclose(recommender.table.vectors, expected, rtol=1e-6, atol=1e-7)
    assert [r["score"] for r in after] != [r["score"] for r in before]
    status = recommender.status()
    assert status["snapshot"]["generation"] == ClientStateStore(state_dir).generations()["item_tower"]
    assert status["snapshot"]["generation"] > generation
    assert status["snapshot"]["round"] == 1 and status["reload_error"] is None


@pytest.mark.parametrize(("damage", "reported"), [("wrong shape", "has shape"), ("not finite", "non-finite"),
                                                  ("cut short", "checksum mismatch")])  # fmt: skip
def test_a_broken_snapshot_keeps_the_served_one_and_is_reported(trained, damage, reported):
    # Prepare
    _, state_dir = trained
    recommender = Recommender.from_state_dir(state_dir)
    user = recommender.users[0]
    before = [r.to_dict() for r in recommender.recommend(user, k=5)]
    generation = recommender.status()["snapshot"]["generation"]
    store = ClientStateStore(state_dir)
    good = store.load("item_tower")
    bad = {key: tensor.clone() for key, tensor in good.items()}
    if damage == "wrong shape":
        bad[ID_EMBEDDING_KEY] = bad[ID_EMBEDDING_KEY][:-1]
    elif damage == "not finite":
        bad[ID_EMBEDDING_KEY][3, 0] = float("nan")
    store.save({"item_tower": bad})
    if damage == "cut short":  # a snapshot file that lost its end after the manifest named it
        path = state_dir / f"item_tower.{store.version}.pt"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    # Execute
    status = recommender.refresh()
    again = recommender.refresh()  # the same broken generation is not retried at every check
    # Assert: the old table still answers, the error is named; a good snapshot later clears it.
    assert reported in status["reload_error"] and status["snapshot"]["generation"] == generation
    assert again["reload_error"] == status["reload_error"]
    assert [r.to_dict() for r in recommender.recommend(user, k=5)] == before
    store.save({"item_tower": good})
    recovered = recommender.refresh()
    assert recovered["reload_error"] is None and recovered["snapshot"]["generation"] == store.version


# ---------------------------------------------------------------- serving and training on one state dir


def test_record_writes_its_row_over_a_round_saved_meanwhile(trained, tmp_path):
    # Prepare: the server loads round 1's rows; then round 2 saves new rows while it serves.
    settings, state_dir = trained
    recommender = Recommender.from_state_dir(state_dir)
    loaded = ClientStateStore(state_dir).load("users")
    train_round(settings, 2)
    round_two = ClientStateStore(state_dir).load("users")
    user = recommender.users[1]
    event = {"user": user, "item": unseen_item(recommender, user), "behaviour": "purchase",
             "timestamp": 1_700_000_000}  # fmt: skip
    # The same event recorded by a server that started after round 2 (on a copy): the expected row.
    shutil.copytree(state_dir, tmp_path / "copy")
    reference = Recommender.from_state_dir(tmp_path / "copy")
    reference.record(event)
    # Execute: the first server records with round 1's rows still in memory.
    recommender.record(event)
    # Assert: every other user's row is round 2's, and the recorded user's row is the update fitted on
    # top of round 2's row (not on the stale one).
    saved = ClientStateStore(state_dir).load("users")
    others = [u for u in round_two["users"] if u != user]
    assert saved["users"] == round_two["users"]
    assert not np.array_equal(row_of(round_two, others[0]), row_of(loaded, others[0]))  # round 2 moved them
    for other in others:
        np.testing.assert_array_equal(row_of(saved, other), row_of(round_two, other))
    np.testing.assert_array_equal(row_of(saved, user), reference.free[reference.row_of_user(user)])
    # The server then takes round 2's rows in, and keeps the row it wrote.
    recommender.refresh()
    for other in others:
        np.testing.assert_array_equal(recommender.free[recommender.row_of_user(other)], row_of(round_two, other))
    np.testing.assert_array_equal(recommender.free[recommender.row_of_user(user)], row_of(saved, user))


def test_a_round_saved_after_a_record_is_taken_in_and_the_event_fitted_again(trained, tmp_path):
    # Prepare: the server records first; round 2 then saves its rows (it read the users before the event).
    settings, state_dir = trained
    recommender = Recommender.from_state_dir(state_dir)
    user = recommender.users[2]
    event = {"user": user, "item": unseen_item(recommender, user), "behaviour": "cart"}  # now: the newest event
    recommender.record(event)
    train_round(settings, 2)
    round_two = ClientStateStore(state_dir).load("users")
    shutil.copytree(state_dir, tmp_path / "copy")
    reference = Recommender.from_state_dir(tmp_path / "copy")  # round 2's row, and the event in the history
    reference._refit(reference.row_of_user(user))  # the expected row: the update on top of the trained row
    # Execute
    recommender.refresh()
    # Assert: the round's rows are served, the recorded user's on top of its own trained row, and saved.
    served = recommender.free[recommender.row_of_user(user)]
    np.testing.assert_allclose(served, reference.free[reference.row_of_user(user)], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(row_of(ClientStateStore(state_dir).load("users"), user), served)
    other = recommender.users[0]
    np.testing.assert_array_equal(recommender.free[recommender.row_of_user(other)], row_of(round_two, other))


TRAINED_USERS = [f"t{n:04d}" for n in range(2000)]
SAVES = 20


def training_saves(state_dir) -> None:
    store = ClientStateStore(state_dir, key=None)
    for n in range(1, SAVES + 1):
        store.save({"users": {"users": TRAINED_USERS + ["s"], "embeddings": torch.full((2001, 16), float(n))},
                    "meta": {"round": n}})  # fmt: skip


def serving_saves(state_dir) -> None:
    store = ClientStateStore(state_dir, key=None)
    for n in range(1, SAVES + 1):
        store.update("users", functools.partial(merge_user_rows, rows={"s": np.full(16, -float(n), np.float32)}))


def test_two_processes_saving_users_at_once_lose_no_rows(tmp_path):
    # Prepare
    ClientStateStore(tmp_path, key=None).save({"users": {"users": ["s"], "embeddings": torch.zeros((1, 16))}})
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=f, args=(tmp_path,)) for f in (training_saves, serving_saves)]
    # Execute
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=60)
    # Assert: every save landed; the trained rows are the last training save's, never an older copy that a
    # serving save wrote back; the served user's row is one of the two last writes.
    store = ClientStateStore(tmp_path, key=None)
    saved = store.load("users")
    assert [p.exitcode for p in writers] == [0, 0]
    assert store.version == 1 + 2 * SAVES
    assert saved["users"] == TRAINED_USERS + ["s"]
    assert torch.equal(saved["embeddings"][:-1], torch.full((2000, 16), float(SAVES)))
    assert saved["embeddings"][-1, 0].item() in (float(SAVES), -float(SAVES))


# ---------------------------------------------------------------- new users


def test_record_creates_an_unknown_user_who_is_served_at_once_and_trained_next_round(trained):
    # Prepare
    settings, state_dir = trained
    recommender = Recommender.from_state_dir(state_dir)
    item = recommender.catalogue.index.ids[5]
    # Execute
    result = recommender.record({"user": "newcomer", "item": item, "behaviour": "purchase",
                                 "timestamp": 1_700_000_000})  # fmt: skip
    browsing = recommender.record({"user": "browser", "item": item, "behaviour": "dwell", "value": 5})
    # Assert: served by pooling the history, exactly like a cold start (no trained row, nothing saved)
    assert result.new_user and result.counted and browsing.new_user and not browsing.counted
    recs = recommender.recommend("newcomer", k=10, explain=True)
    cold = recommender.recommend_for_history([item], k=10, explain=True)
    assert [r.to_dict() for r in recs] == [r.to_dict() for r in cold]
    assert item not in {r.item for r in recs} and recs[0].explanation[0].item == item
    assert recommender.history("browser") == [] and len(recommender.recommend("browser", k=3)) == 3
    assert "newcomer" not in ClientStateStore(state_dir).load("users")["users"]
    # A restarted server knows both, with their histories.
    restarted = Recommender.from_state_dir(state_dir)
    assert restarted.history("newcomer") == [item] and restarted.history("browser") == []
    # The next round trains the newcomer (its events are the node's data now); the server takes the row in.
    assert "newcomer" in load_node_data(settings, NODE).users
    train_round(settings, 2)
    saved = ClientStateStore(state_dir).load("users")
    recommender.refresh()
    np.testing.assert_array_equal(recommender.free[recommender.row_of_user("newcomer")], row_of(saved, "newcomer"))
    np.testing.assert_allclose(recommender.user_vector("newcomer"),
                               Recommender.from_state_dir(state_dir).user_vector("newcomer"), rtol=1e-6)  # fmt: skip
    assert not np.allclose(recommender.user_vector("newcomer"), restarted.user_vector("newcomer"))


# ---------------------------------------------------------------- items added on the node


def test_added_items_are_served_persisted_and_re_embedded_by_a_newer_snapshot(trained, caplog):
    # Prepare
    settings, state_dir = trained
    recommender = Recommender.from_state_dir(state_dir)
    user = recommender.users[0]
    features = recommender.catalogue.features[3] + 0.5
    new = {"item": "new-1", "features": features.tolist(), "title": "A new thing", "categories": ["novelties"],
           "price": 4.5}  # fmt: skip
    base = len(recommender.catalogue)
    # Execute
    added = recommender.add_items([new])
    # Assert: embedded by the content tower alone, with the catalogue's median bias
    row = recommender.row_of_item("new-1")
    assert added == ["new-1"] and row == base and recommender.status()["local_items"] == 1
    np.testing.assert_allclose(recommender.table.vectors[row], recommender.embed_new_items(features[None])[0],
                               rtol=1e-6)  # fmt: skip
    assert recommender.table.bias[row] == pytest.approx(float(np.median(recommender.table.bias[:base])))
    # ... recommended, filtered by category, price and availability, explained exactly
    only = recommender.recommend(user, k=3, filters=Filters(categories=["novelties"]))
    assert [r.item for r in only] == ["new-1"] and only[0].title == "A new thing"
    assert [r.item for r in recommender.recommend(user, k=3, filters=Filters(available=["new-1"], max_price=5))] \
        == ["new-1"]  # fmt: skip
    assert recommender.recommend(user, k=3, filters=Filters(available=["new-1"], max_price=4)) == []
    shares = sum(c.contribution for c in recommender.explain(user, "new-1", top=1000))
    free = recommender.free[recommender.row_of_user(user)]
    vector = recommender.table.vectors[row]
    assert shares + free @ vector + recommender.table.bias[row] == pytest.approx(only[0].score, rel=1e-4)
    # ... recorded on, refused twice
    recommender.record({"user": user, "item": "new-1", "behaviour": "purchase"})
    assert recommender.history(user)[-1] == "new-1"
    for taken in ("new-1", recommender.catalogue.index.ids[0]):
        with pytest.raises(ItemExistsError, match="already in the served catalogue"):
            recommender.add_items([{**new, "item": taken}])
    # A restart serves it again, with the user's event on it; training leaves that event waiting, unreported.
    restarted = Recommender.from_state_dir(state_dir)
    np.testing.assert_array_equal(restarted.table.vectors[restarted.row_of_item("new-1")], vector)
    assert restarted.history(user)[-1] == "new-1"
    with caplog.at_level("INFO", logger="fedtower.client"):
        load_node_data(settings, NODE)
    assert "wait until the catalogue carries them" in caplog.text and "new-1" not in caplog.text
    # A newer snapshot keeps it, embedded by the new content tower.
    tower = newer_tower(settings)
    evaluate_round(settings, tower)
    recommender.refresh()
    with torch.no_grad():
        expected = model_with(settings, tower).item_tower.content_vectors(torch.as_tensor(features[None]))[0]
    np.testing.assert_allclose(recommender.table.vectors[recommender.row_of_item("new-1")], expected.numpy(),
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    assert recommender.history(user)[-1] == "new-1"


def test_bad_new_items_are_refused_naming_the_field(trained):
    _, state_dir = trained
    recommender = Recommender.from_state_dir(state_dir)
    width = recommender.catalogue.num_features
    cases = [
        ([], "non-empty list"),
        ([{"item": "x", "features": [0.0] * (width - 1)}], f"list of {width} numbers"),
        ([{"item": "x", "features": [float("nan")] * width}], "finite numbers"),
        ([{"item": "x", "features": [0.0] * width, "colour": "red"}], "'items[0].colour'"),
        ([{"item": "x", "features": [0.0] * width, "price": -1}], "'items[0].price'"),
        ([{"item": "x", "features": [0.0] * width}, {"item": "x", "features": [0.0] * width}], "items[1].item"),
    ]
    for items, message in cases:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            recommender.add_items(items)
    assert recommender.status()["local_items"] == 0 and not ClientStateStore(state_dir).has("local_items")
