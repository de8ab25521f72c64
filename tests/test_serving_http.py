"""The local HTTP API, against a real `fedtower serve` process on loopback with a real HTTP client."""

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time

import httpx
import pytest

from fedtower.cli.serve import load_recommender
from fedtower.client.handlers import train_on_node
from fedtower.client.state import ClientStateStore
from fedtower.client.state_crypto import StateKey, read_key_file, write_new_key_file
from fedtower.config import RunSettings
from fedtower.server.federation import initial_item_tower
from tests.flower_utils import node_context, server_message, task_identity

DATA = "synthetic:users=60,items=150,seed=4"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtower.cli", "serve", *args]


def quiet_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDTOWER_STATE_KEY", "FEDTOWER_SERVE"))}
    return {**env, "FLWR_TELEMETRY_ENABLED": "0"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A node that trained one round into an encrypted state dir: (state dir, key file, token file)."""
    root = tmp_path_factory.mktemp("site")
    settings = RunSettings(data=DATA, num_sites=2, dim=16, local_epochs=1, output_dir=str(root), run_name="http",
                           history_len=30)  # fmt: skip
    state_dir, key_file, token_file = root / "state", root / "state.key", root / "token"
    state_dir.mkdir(mode=0o700)
    write_new_key_file(key_file)
    token_file.write_text(secrets.token_urlsafe(32) + "\n")
    token_file.chmod(0o600)
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(state_dir), "state-key-file": str(key_file)}
    with task_identity():
        train_on_node(server_message(initial_item_tower(settings), node_id=3),
                      node_context(node, settings.to_run_config()))  # fmt: skip
    return state_dir, key_file, token_file


@pytest.fixture(scope="module")
def server(site):
    """`fedtower serve` in its own process; yields (base url, token, process); stopped by its pid."""
    state_dir, key_file, token_file = site
    port = free_port()
    log = open(state_dir.parent / "serve.log", "w+")
    process = subprocess.Popen(
        serve_command("--state-dir", str(state_dir), "--port", str(port), "--token-file", str(token_file),
                      "--state-key-file", str(key_file)),  # fmt: skip
        stdout=log, stderr=subprocess.STDOUT, env=quiet_env(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"fedtower serve exited with {process.returncode}:\n{log.read()}")
            with contextlib.suppress(httpx.TransportError):  # not listening yet
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail("fedtower serve did not answer /health within 90 s")
            time.sleep(0.2)
        yield url, token_file.read_text().strip(), process
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
        assert "Traceback" not in output, output  # no request ever crashed the server


@pytest.fixture(scope="module")
def client(server):
    url, token, _ = server
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def a_user(site):
    state_dir, key_file, _ = site
    store = ClientStateStore(state_dir, key=StateKey(read_key_file(key_file)))
    return store.load("users")["users"][0]


def test_health_and_the_openapi_schema_need_no_token(server):
    # Prepare
    url, _, _ = server
    # Execute
    health = httpx.get(f"{url}/health")
    schema = httpx.get(f"{url}/openapi.json")
    # Assert
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["items"] == 150
    assert health.json()["snapshot"]["round"] == 1 and health.json()["reload_error"] is None
    paths = {"/recommend", "/explain", "/bundle", "/events", "/items", "/reload", "/health"}
    assert paths <= set(schema.json()["paths"])
    assert schema.json()["components"]["schemas"]["RecommendBody"]["properties"]["k"]["maximum"] == 1000
    assert schema.json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-wrong-token", "Basic abc", "Bearer"])
def test_a_missing_or_wrong_token_is_401_before_the_body_is_looked_at(server, header):
    # Prepare
    url, _, _ = server
    headers = {"Authorization": header} if header else {}
    # Execute: a malformed body too, so that a 422 would reveal validation to strangers.
    response = httpx.post(f"{url}/recommend", json={"user": "x", "k": 0}, headers=headers)
    # Assert
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in response.json()["detail"]


def test_recommend_explain_and_bundle_answer_for_a_known_user(client, a_user):
    # Execute
    recs = client.post("/recommend", json={"user": a_user, "k": 5, "explain": True})
    diverse = client.post("/recommend", json={"user": a_user, "k": 5, "diversity": 0.5, "category_cap": 2})
    item = recs.json()["items"][0]["item"]
    why = client.post("/explain", json={"user": a_user, "item": item, "top": 2})
    bundle = client.post("/bundle", json={"user": a_user, "basket": [item], "k": 3})
    cold = client.post("/recommend", json={"history": [item], "k": 4})
    # Assert
    assert [r.status_code for r in (recs, diverse, why, bundle, cold)] == [200] * 5
    items = recs.json()["items"]
    assert len(items) == 5 and all(i["explanation"] for i in items)
    assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)
    assert len(why.json()["contributions"]) == 2
    assert len(bundle.json()["items"]) == 3 and item not in {i["item"] for i in bundle.json()["items"]}
    assert len(cold.json()["items"]) == 4


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/recommend", {"user": "nobody", "k": 5}, 404, "Unknown user 'nobody'"),
        ("/explain", {"user": "nobody", "item": "i00001"}, 404, "Unknown user"),
        ("/explain", {"user": "USER", "item": "no-such-item"}, 404, "'no-such-item' is not in the catalogue"),
        ("/bundle", {"user": "USER", "basket": ["i00001", "nope"]}, 404, "basket[1]"),
        ("/recommend", {"user": "USER", "k": 0}, 422, "'field': 'k'"),
        ("/recommend", {"user": "USER", "k": 100000}, 422, "'field': 'k'"),
        ("/recommend", {"user": "USER", "k": "ten"}, 422, "'field': 'k'"),
        ("/recommend", {"user": "USER", "kk": 3}, 422, "'field': 'kk'"),
        ("/recommend", {"user": "USER", "diversity": 2}, 422, "'field': 'diversity'"),
        ("/recommend", {"user": "USER", "history": ["i00001"]}, 422, "exactly one of 'user'"),
        ("/recommend", {"user": "USER", "filters": {"min_price": 9, "max_price": 1}}, 422, "min_price"),
        ("/recommend", [1, 2], 422, "must be a JSON object"),
        ("/bundle", {"user": "USER", "basket": []}, 422, "'field': 'basket'"),
        ("/events", {"user": "USER", "item": "i00001", "behaviour": "buy"}, 422, "'field': 'behaviour'"),
        ("/events", {"user": "USER", "item": "i00001", "behaviour": "rating"}, 422, "needs one"),
        ("/events", {"user": "USER", "item": "i00001", "behaviour": "view", "timestamp": -5}, 422, "timestamp"),
        ("/events", {"user": "USER", "behaviour": "view"}, 422, "'field': 'item'"),
        ("/items", {"items": [{"item": "i00001", "features": [0.0]}]}, 409, "already in the served catalogue"),
        ("/items", {"items": [{"item": "fresh", "features": [0.0]}]}, 422, "list of"),
        ("/items", {"items": []}, 422, "'field': 'items'"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_never_a_crash(client, a_user, server, path, body, status, needle):
    # Prepare
    if isinstance(body, dict):
        body = {k: (a_user if v == "USER" else v) for k, v in body.items()}
    # Execute
    response = client.post(path, json=body)
    # Assert
    assert response.status_code == status, response.text
    assert needle in str(response.json())  # the readable detail and the {field, problem} list
    assert server[2].poll() is None  # still serving


def test_invalid_json_is_422_and_a_huge_body_413(client):
    # Execute
    invalid = client.post("/recommend", content=b"{not json", headers={"Content-Type": "application/json"})
    huge = client.post("/recommend", content=b" " * (2 << 20), headers={"Content-Type": "application/json"})
    # Assert
    assert invalid.status_code == 422 and "not valid JSON" in str(invalid.json()["detail"])
    assert huge.status_code == 413


def test_a_recorded_event_lands_sealed_in_the_state_and_moves_the_user(client, a_user, site):
    # Prepare
    state_dir, key_file, _ = site
    before = client.post("/recommend", json={"user": a_user, "k": 1}).json()["items"][0]["item"]
    # Execute: the user buys what was recommended.
    response = client.post("/events", json={"user": a_user, "item": before, "behaviour": "purchase"})
    after = client.post("/recommend", json={"user": a_user, "k": 3}).json()["items"]
    # Assert: logged (encrypted, readable with the key), counted, and no longer recommended (now seen).
    assert response.status_code == 201 and response.json()["counted"] is True
    store = ClientStateStore(state_dir, key=StateKey(read_key_file(key_file)))
    assert store.read_log("events")[-1]["item"] == before
    assert before not in {i["item"] for i in after}
    assert not (state_dir / "events.jsonl").exists()  # nothing in plaintext
    # A restarted server loads the sealed event log with the same key file.
    restarted = load_recommender(state_dir, key_file, "fp32")
    assert before in restarted.history(a_user)


def test_serve_refuses_to_start_without_a_token_or_with_the_wrong_state_key(site, tmp_path):
    # Prepare
    state_dir, _, token_file = site
    other_key = tmp_path / "other.key"
    write_new_key_file(other_key)
    run = dict(capture_output=True, text=True, env=quiet_env(), timeout=120)
    # Execute
    no_token = subprocess.run(serve_command("--state-dir", str(state_dir)), **run)
    open_wide = subprocess.run(serve_command("--state-dir", str(state_dir), "--insecure-no-auth",
                                             "--host", "0.0.0.0"), **run)  # fmt: skip
    wrong_key = subprocess.run(serve_command("--state-dir", str(state_dir), "--token-file", str(token_file),
                                             "--state-key-file", str(other_key)), **run)  # fmt: skip
    # Assert: each exits at once with a message, before binding anything.
    assert no_token.returncode == 2 and "No bearer token" in no_token.stderr
    assert open_wide.returncode == 2 and "non-loopback" in open_wide.stderr
    assert wrong_key.returncode == 2 and "wrong key" in wrong_key.stderr


def test_features_names_the_order_items_take_and_needs_the_token(client, server):
    # Prepare
    url, _, _ = server
    # Execute
    listed = client.get("/features")
    anonymous = httpx.get(f"{url}/features")
    wrong_length = client.post("/items", json={"items": [{"item": "fresh-1", "features": [0.0]}]})
    # Assert: the names and their count, the one that /items checks against.
    assert anonymous.status_code == 401
    assert listed.status_code == 200
    body = listed.json()
    assert body["count"] == len(body["features"]) > 1 and len(set(body["features"])) == body["count"]
    assert wrong_length.status_code == 422 and f"list of {body['count']} numbers" in wrong_length.text


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("post", "/recommend", {"user": "u" * 257}, 422),  # the loaders' id limit (fedtower.data.ids)
        ("post", "/recommend", {"user": "nobody-here"}, 404),
        ("post", "/recommend", {"user": "x", "k": 0}, 422),
        ("get", "/no-such-path", None, 404),
        ("get", "/recommend", None, 405),
    ],
)
def test_every_error_has_one_shape(client, method, path, body, status):
    # Execute
    response = client.request(method.upper(), path, json=body)
    # Assert: a readable line, and one entry per problem with its field (or null).
    assert response.status_code == status
    problem = response.json()
    assert set(problem) == {"detail", "problems"} and isinstance(problem["detail"], str) and problem["detail"]
    assert problem["problems"] and all(set(p) == {"field", "problem"} for p in problem["problems"])


def test_a_field_problem_names_its_field_in_both_parts(client):
    response = client.post("/recommend", json={"user": "u" * 257})
    assert response.json()["problems"][0]["field"] == "user"
    assert response.json()["detail"].startswith("user: ") and "256" in response.json()["detail"]
