"""`fedtower serve` while the node trains: a real server process, training rounds in this process."""

import contextlib
import shutil
import subprocess
import time

import httpx
import numpy as np
import pytest
import torch

from fedtower.client.handlers import train_on_node
from fedtower.client.local import cached_dataset
from fedtower.client.state import ClientStateStore
from fedtower.client.state_crypto import StateKey, read_key_file
from fedtower.config import RunSettings
from fedtower.server.federation import initial_item_tower
from fedtower.serving import Recommender
from fedtower.serving.recommender import ID_EMBEDDING_KEY
from tests.flower_utils import node_context, server_message, task_identity
from tests.test_serving_http import free_port, quiet_env, serve_command
from tests.test_serving_http import site as site_of_test_serving_http

site = site_of_test_serving_http  # an encrypted node state after one round: (state dir, key file, token file)


def settings_for(state_dir) -> RunSettings:
    return RunSettings(data="synthetic:users=60,items=150,seed=4", num_sites=2, dim=16, local_epochs=1,
                       output_dir=str(state_dir.parent), run_name="http", history_len=30)  # fmt: skip


def node_of(site) -> dict:
    state_dir, key_file, _ = site
    return {"partition-id": 0, "num-partitions": 2, "state-dir": str(state_dir), "state-key-file": str(key_file)}


def store_of(site) -> ClientStateStore:
    return ClientStateStore(site[0], key=StateKey(read_key_file(site[1])))


@pytest.fixture(scope="module")
def server(site):
    """`fedtower serve` checking its state dir every 0.2 s; yields (client, process); stopped by its pid."""
    state_dir, key_file, token_file = site
    port = free_port()
    log = open(state_dir.parent / "serve-reload.log", "w+")
    process = subprocess.Popen(
        serve_command("--state-dir", str(state_dir), "--port", str(port), "--token-file", str(token_file),
                      "--state-key-file", str(key_file), "--reload-interval", "0.2"),  # fmt: skip
        stdout=log, stderr=subprocess.STDOUT, env=quiet_env(),
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    try:
        wait_for(lambda: process.poll() is None and health(url) is not None, "the server to answer /health", log)
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            yield client, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.seek(0)
        output = log.read()
        log.close()
        assert "Traceback" not in output, output  # a broken snapshot is reported, never a crash


def health(url: str) -> dict | None:
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(f"{url}/health", timeout=2).json()
    return None


def wait_for(condition, what: str, log=None, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            output = (log.seek(0), log.read())[1] if log else ""
            pytest.fail(f"Timed out after {seconds:g} s waiting for {what}.\n{output}")
        time.sleep(0.1)


def train_round(site, server_round: int) -> None:
    settings = settings_for(site[0])
    with task_identity():
        train_on_node(server_message(initial_item_tower(settings), node_id=3, server_round=server_round),
                      node_context(node_of(site), settings.to_run_config()))  # fmt: skip


def test_a_round_trained_while_serving_is_picked_up_and_recording_keeps_its_rows(server, site, tmp_path):
    # Prepare: the server serves round 1; a training round (this process) saves new rows and a snapshot.
    client, _ = server
    generation = client.get("/health").json()["snapshot"]["generation"]
    train_round(site, server_round=2)
    trained = store_of(site).load("users")
    user = trained["users"][0]
    item = next(i for i in (f"i{n:05d}" for n in range(150)) if i not in
                Recommender.from_state_dir(site[0], node_config={"state-key-file": str(site[1])}).history(user))
    # The row expected after the event: the update fitted on top of round 2's row (a copy of the state).
    shutil.copytree(site[0], tmp_path / "copy")
    reference = Recommender.from_state_dir(tmp_path / "copy", node_config={"state-key-file": str(site[1])})
    reference.record({"user": user, "item": item, "behaviour": "purchase", "timestamp": 1_700_000_000})
    # Execute
    wait_for(lambda: client.get("/health").json()["snapshot"]["generation"] > generation, "the new snapshot")
    status = client.get("/health").json()
    recorded = client.post("/events", json={"user": user, "item": item, "behaviour": "purchase",
                                            "timestamp": 1_700_000_000})  # fmt: skip
    # Assert: the snapshot of round 2 is served without a restart; after the event, every other user's row
    # on disk is round 2's, and the recorded user's row is the update on top of round 2's row.
    assert status["status"] == "ok" and status["snapshot"]["round"] == 2
    assert recorded.status_code == 201 and recorded.json()["new_user"] is False
    saved = store_of(site).load("users")
    assert saved["users"] == trained["users"]
    assert torch.equal(saved["embeddings"][1:], trained["embeddings"][1:])
    np.testing.assert_allclose(saved["embeddings"][0].numpy(), reference.free[reference.row_of_user(user)],
                               rtol=1e-6, atol=1e-7)  # fmt: skip


def test_a_broken_snapshot_degrades_health_but_serving_goes_on(server, site):
    # Prepare
    client, process = server
    user = store_of(site).load("users")["users"][1]
    before = client.post("/recommend", json={"user": user, "k": 5}).json()
    served = client.get("/health").json()["snapshot"]["generation"]
    store = store_of(site)
    good = store.load("item_tower")
    bad = {**good, ID_EMBEDDING_KEY: good[ID_EMBEDDING_KEY][:-1]}  # a snapshot of another catalogue size
    # Execute
    store.save({"item_tower": bad})
    wait_for(lambda: client.get("/health").json()["status"] == "degraded", "/health to report the bad snapshot")
    degraded = client.get("/health").json()
    during = client.post("/recommend", json={"user": user, "k": 5}).json()
    forced = client.post("/reload")
    store.save({"item_tower": good})
    recovered = client.post("/reload")
    # Assert: the old table keeps serving, the error is named, a good snapshot clears it.
    assert degraded["snapshot"]["generation"] == served and "has shape" in degraded["reload_error"]
    assert during == before and process.poll() is None
    assert forced.status_code == 503 and "has shape" in forced.json()["detail"]
    assert recovered.status_code == 200 and recovered.json()["reload_error"] is None
    assert recovered.json()["snapshot"]["generation"] == store.version
    assert httpx.post(f"{client.base_url}/reload").status_code == 401  # the reload needs the token


def test_items_and_new_users_are_added_over_http_and_kept_sealed(server, site):
    # Prepare
    client, _ = server
    width = cached_dataset(settings_for(site[0]).data).catalogue.num_features
    features = [0.0] * (width - 1) + [0.5]
    item = {"item": "fresh-item-1", "features": features, "title": "Fresh", "categories": ["novelties"],
            "price": 2.0}  # fmt: skip
    # Execute
    added = client.post("/items", json={"items": [item]})
    again = client.post("/items", json={"items": [item]})
    unknown = client.post("/recommend", json={"user": "walk-in-1", "k": 3})
    event = client.post("/events", json={"user": "walk-in-1", "item": "fresh-item-1", "behaviour": "purchase"})
    for_new_user = client.post("/recommend", json={"user": "walk-in-1", "k": 3, "explain": True})
    novelties = client.post("/recommend", json={"history": ["i00001"], "k": 3,
                                                "filters": {"categories": ["novelties"]}})  # fmt: skip
    # Assert
    assert added.status_code == 201 and added.json()["added"] == ["fresh-item-1"]
    assert added.json()["items"] == 151 and client.get("/health").json()["local_items"] == 1
    assert again.status_code == 409 and "already in the served catalogue" in again.json()["detail"]
    assert unknown.status_code == 404
    assert event.status_code == 201 and event.json()["new_user"] is True
    assert for_new_user.status_code == 200 and len(for_new_user.json()["items"]) == 3
    assert "fresh-item-1" not in {i["item"] for i in for_new_user.json()["items"]}
    assert for_new_user.json()["items"][0]["explanation"][0]["item"] == "fresh-item-1"
    assert [i["item"] for i in novelties.json()["items"]] == ["fresh-item-1"]
    # Kept in the state dir, sealed: readable with the key, never in clear on disk.
    assert [e["item"] for e in store_of(site).load("local_items")["items"]] == ["fresh-item-1"]
    assert all(b"fresh-item-1" not in f.read_bytes() for f in site[0].iterdir() if f.is_file())
    assert all(b"walk-in-1" not in f.read_bytes() for f in site[0].iterdir() if f.is_file())
