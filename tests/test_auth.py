"""API keys, tokens and rate limits: who may call, and what a caller without a key is told.

The test stack requires keys (`TEST_KEY`, and a rate-limited `LIMITED_KEY`); the demo profile's
explicit open mode is checked on its own authenticator.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import websockets

from serve_app.auth import Authenticator, Caller, hash_key
from serve_app.config import AuthSettings
from serve_app.errors import FalError
from tests.conftest import LIMITED_KEY, TEST_KEY


def keyed(limiter=None, **extra) -> Authenticator:
    return Authenticator(AuthSettings(keys=[{"id": "alice", "sha256": hash_key("alice:s3cret")}], **extra), limiter)


def refusal(call) -> FalError:
    with pytest.raises(FalError) as info:
        call()
    return info.value


# --- keys ---------------------------------------------------------------------------------


def test_a_configured_key_is_accepted_with_either_scheme():
    auth = keyed()
    assert auth.caller_from_header("Key alice:s3cret").key_id == "alice"
    assert auth.caller_from_header("Bearer alice:s3cret").key_id == "alice"
    assert auth.caller_from_header("key   alice:s3cret ").key_id == "alice"


@pytest.mark.parametrize("header", [None, "", "Key", "Basic alice:s3cret", "Key alice:wrong", "Key " + hash_key("alice:s3cret")])
def test_missing_malformed_or_wrong_keys_are_401(header):
    error = refusal(lambda: keyed().caller_from_header(header))
    assert error.status_code == 401 and error.error_type == "unauthorized"


def test_a_server_without_keys_refuses_everyone_and_says_how_to_fix_it():
    error = refusal(lambda: Authenticator(AuthSettings()).caller_from_header("Key anything"))
    assert error.status_code == 401 and "auth.keys" in error.detail


def test_open_mode_lets_everyone_in_explicitly():
    auth = Authenticator(AuthSettings(open=True))
    assert auth.caller_from_header(None).key_id == "anonymous"


def test_the_key_generator_prints_a_key_whose_hash_it_configures(capsys):
    from serve_app.auth import main

    assert main(["new", "bob"]) == 0
    lines = capsys.readouterr().out.splitlines()
    key = lines[0].rsplit(" ", 1)[-1]
    assert key.startswith("bob:") and hash_key(key) in lines[1]


# --- rate limits --------------------------------------------------------------------------


def admit(auth: Authenticator, caller: Caller) -> None:
    asyncio.run(auth.admit(caller))


def test_a_key_over_its_rate_gets_429_with_retry_after():
    auth = keyed()
    caller = Caller("alice", requests_per_minute=2)
    admit(auth, caller)
    admit(auth, caller)
    error = refusal(lambda: admit(auth, caller))
    assert error.status_code == 429 and int(error.headers["Retry-After"]) >= 1
    admit(auth, Caller("bob", requests_per_minute=2))  # buckets are per key


def test_the_bucket_refills_at_the_configured_rate(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    auth = keyed()
    caller = Caller("alice", requests_per_minute=60)  # one a second, bursts of 60
    for _ in range(60):
        admit(auth, caller)
    refusal(lambda: admit(auth, caller))
    now[0] += 1.0
    admit(auth, caller)
    refusal(lambda: admit(auth, caller))


def test_router_replicas_on_one_store_share_a_keys_bucket(tmp_path):
    """Two authenticators (two router replicas) on one job store: the key's rate is the key's,
    not each replica's."""
    from serve_app.queue.sqlite_store import SqliteJobStore
    from serve_app.rate_limits import SharedRateLimiter

    async def scenario() -> list[int]:
        stores = [SqliteJobStore(tmp_path / "jobs.sqlite3") for _ in range(2)]
        replicas = [keyed(limiter=None) for _ in stores]
        for replica, store in zip(replicas, stores):
            replica.limiter = SharedRateLimiter(store)
        codes = []
        for i in range(6):
            try:
                await replicas[i % 2].admit(Caller("alice", requests_per_minute=3))
                codes.append(200)
            except FalError as exc:
                codes.append(exc.status_code)
        for store in stores:
            await store.close()
        return codes

    assert asyncio.run(scenario()) == [200, 200, 200, 429, 429, 429]


def test_a_store_that_cannot_be_reached_falls_back_to_the_replicas_own_buckets():
    from serve_app.rate_limits import SharedRateLimiter

    class DownStore:
        async def take_token(self, *args):
            raise ConnectionError("redis is down")

    auth = keyed(limiter=SharedRateLimiter(DownStore()))
    caller = Caller("alice", requests_per_minute=1)
    admit(auth, caller)  # admitted, not refused for the store's sake
    assert refusal(lambda: admit(auth, caller)).status_code == 429  # and still limited


# --- tokens -------------------------------------------------------------------------------


def test_a_token_opens_the_apps_it_names_until_it_expires(monkeypatch):
    auth = keyed()
    token = auth.issue_token(Caller("alice"), ["lcm"], ttl_s=60)
    assert auth.caller_from_token(token, "fal-ai/lcm").key_id == "alice"
    assert refusal(lambda: auth.caller_from_token(token, "fal-ai/flux-lora")).status_code == 401
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 61)
    assert "expired" in refusal(lambda: auth.caller_from_token(token, "fal-ai/lcm")).detail


def test_a_forged_or_tampered_token_is_refused():
    auth = keyed()
    token = auth.issue_token(Caller("alice"), ["lcm"], ttl_s=60)
    body, signature = token.split(".")
    assert refusal(lambda: auth.caller_from_token(body + "." + signature[::-1], "fal-ai/lcm")).status_code == 401
    other = Authenticator(AuthSettings(keys=[{"id": "alice", "sha256": hash_key("other:key")}]))
    assert refusal(lambda: other.caller_from_token(token, "fal-ai/lcm")).status_code == 401  # another server's secret
    assert refusal(lambda: auth.caller_from_token("garbage", "fal-ai/lcm")).status_code == 401


def test_replicas_with_the_same_config_accept_each_others_tokens():
    token = keyed(token_secret="shared").issue_token(Caller("alice"), ["lcm"], ttl_s=60)
    assert keyed(token_secret="shared").caller_from_token(token, "fal-ai/lcm").key_id == "alice"
    token = keyed().issue_token(Caller("alice"), ["lcm"], ttl_s=60)  # secret derived from the keys
    assert keyed().caller_from_token(token, "fal-ai/lcm").key_id == "alice"


def test_the_token_secret_survives_the_trip_to_the_replicas_but_not_into_repr():
    settings = AuthSettings(token_secret="hunter2")
    assert "hunter2" not in repr(settings)
    assert AuthSettings(**settings.model_dump(mode="json")).token_secret.get_secret_value() == "hunter2"


# --- over HTTP ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anonymous(stack, test_ca):
    with httpx.Client(base_url=stack, timeout=60, verify=test_ca.ssl_context()) as client:
        yield client


@pytest.mark.slow
def test_requests_without_a_key_get_fals_401_with_a_request_id(anonymous):
    response = anonymous.post("/fal-ai/lora", json={"prompt": "a cat"})
    assert response.status_code == 401
    assert response.json()["error_type"] == "unauthorized" and "Authorization" in response.json()["detail"]
    assert response.headers["x-fal-error-type"] == "unauthorized" and response.headers["x-fal-request-id"]
    assert anonymous.post("/fal-ai/lora", json={}, headers={"Authorization": "Key nope:nope"}).status_code == 401


@pytest.mark.slow
def test_health_docs_and_output_files_need_no_key(anonymous, http):
    for path in ("/health", "/docs", "/openapi.json"):
        assert anonymous.get(path).status_code == 200, path
    out = http.post("/fal-ai/lora", json={"model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a cat", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2})
    assert anonymous.get(out.json()["images"][0]["url"]).status_code == 200  # unguessable names, like fal's CDN


@pytest.mark.slow
def test_bearer_works_like_key(anonymous):
    response = anonymous.post("/fal-ai/lora", json={}, headers={"Authorization": f"Bearer {TEST_KEY}"})
    assert response.status_code == 422  # past the door, into validation


@pytest.mark.slow
def test_a_rate_limited_key_gets_429_with_retry_after(anonymous):
    headers = {"Authorization": f"Key {LIMITED_KEY}"}
    codes = [anonymous.post("/fal-ai/lora", json={}, headers=headers) for _ in range(4)]
    assert [r.status_code for r in codes[:2]] == [422, 422]
    assert codes[-1].status_code == 429 and int(codes[-1].headers["retry-after"]) >= 1
    assert codes[-1].json()["error_type"] == "rate_limited"


@pytest.mark.slow
def test_post_tokens_returns_a_bare_string_that_opens_the_realtime_socket(stack, anonymous, test_ca):
    issued = anonymous.post("/tokens/", json={"allowed_apps": ["lcm"], "token_expiration": 120}, headers={"Authorization": f"Key {TEST_KEY}"})
    assert issued.status_code == 200, issued.text
    token = issued.json()
    assert isinstance(token, str)
    assert anonymous.post("/tokens/", json={"allowed_apps": ["lcm"]}).status_code == 401

    async def scenario(query: str) -> dict:
        context = ssl.create_default_context(cafile=str(test_ca.ca_file))
        url = stack.replace("https://", "wss://") + "/fal-ai/lcm/realtime" + query
        async with websockets.connect(url, ssl=context, max_size=2**24) as ws:
            try:
                await ws.send(msgpack.packb({"prompt": "a cat", "image_size": {"width": 64, "height": 64}, "seed": 1}))
            except websockets.ConnectionClosed:
                pass  # refused at once: the error frame is still there to read
            first = await ws.recv()
            return json.loads(first) if isinstance(first, str) else msgpack.unpackb(first, raw=False)

    assert asyncio.run(scenario(f"?fal_jwt_token={token}"))["seed"] == 1
    refused = asyncio.run(scenario(""))
    assert refused["type"] == "x-fal-error" and refused["error"] == "UNAUTHORIZED"
    refused = asyncio.run(scenario("?fal_jwt_token=forged.token"))
    assert refused["error"] == "UNAUTHORIZED"


@pytest.mark.slow
def test_keys_never_reach_the_logs(http, anonymous):
    anonymous.post("/fal-ai/lora", json={}, headers={"Authorization": "Key leaked-id:leaked-secret"})
    http.post("/fal-ai/lora", json={"model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a cat", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2})
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    secret = TEST_KEY.split(":", 1)[1]
    for path in logs.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert b"leaked-secret" not in text and secret.encode() not in text, path


def test_keys_from_the_environment_join_the_configs_auth_settings(monkeypatch):
    import yaml

    from serve_app.config import AppConfig

    args = yaml.safe_load((Path(__file__).parent.parent / "cluster" / "production.yaml").read_text())["applications"][0]["args"]
    monkeypatch.setenv("DIFFUSION_SERVE_AUTH__KEYS", json.dumps([{"id": "my-app", "sha256": hash_key("my-app:s3cret")}]))
    auth = Authenticator(AppConfig.from_args(args).auth)
    assert auth.caller_from_header("Key my-app:s3cret") == Caller("my-app", 600.0)  # the YAML's default rate
