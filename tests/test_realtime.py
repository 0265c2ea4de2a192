"""The realtime WebSocket (`/fal-ai/lcm/realtime`): fal's frames, errors, buffering and timeouts.

The stock `fal_client.realtime` runs against it in a fresh interpreter (as users run it); the
protocol details are checked with a plain `websockets` client.
"""

from __future__ import annotations

import asyncio
import json
import ssl

import msgpack
import pytest
import websockets

from tests.conftest import AUTH_HEADERS
from tests.test_fal_client import run_client

pytestmark = pytest.mark.slow

FRAME = {"prompt": "a black cat with glowing eyes", "image_size": {"width": 64, "height": 64}, "seed": 1}


def test_the_stock_fal_client_realtime_gets_images(stack, test_ca):
    out = run_client(
        stack,
        test_ca,
        """
        import json, fal_client
        with fal_client.realtime("fal-ai/lcm", use_jwt=False) as connection:
            results = []
            for seed in (1, 2):
                connection.send({"prompt": "a black cat with glowing eyes", "image_size": {"width": 64, "height": 64}, "seed": seed, "request_id": f"r{seed}"})
                results.append(connection.recv())
        print(json.dumps([{"seed": r["seed"], "request_id": r["request_id"], "url": r["images"][0]["url"][:22], "width": r["images"][0]["width"]} for r in results]))
        """,
    )
    assert out == [
        {"seed": 1, "request_id": "r1", "url": "data:image/jpeg;base64", "width": 64},
        {"seed": 2, "request_id": "r2", "url": "data:image/jpeg;base64", "width": 64},
    ]


def ws_url(stack: str, query: str = "") -> str:
    return stack.replace("https://", "wss://") + "/fal-ai/lcm/realtime" + (f"?{query}" if query else "")


async def receive_result(ws) -> tuple[dict, dict]:
    """An output frame (msgpack) and the timings control frame after it."""
    output = msgpack.unpackb(await ws.recv(), raw=False)
    control = json.loads(await ws.recv())
    return output, control


def session(stack, test_ca, query: str = ""):
    context = ssl.create_default_context(cafile=str(test_ca.ca_file))
    return websockets.connect(ws_url(stack, query), ssl=context, additional_headers=AUTH_HEADERS, max_size=2**24)


def test_outputs_come_with_a_timings_frame_and_json_input_works(stack, test_ca):
    async def scenario():
        async with session(stack, test_ca) as ws:
            await ws.send(msgpack.packb(FRAME))
            output, control = await receive_result(ws)
            assert output["seed"] == 1 and output["num_inference_steps"] == 4 and output["images"][0]["url"].startswith("data:image/jpeg")
            assert control["type"] == "x-fal-message" and control["action"] == "timings" and control["timing"] > 0
            await ws.send(json.dumps({**FRAME, "seed": 2}))  # JSON text frames are accepted too
            output, _ = await receive_result(ws)
            assert output["seed"] == 2

    asyncio.run(scenario())


def test_a_malformed_frame_gets_an_error_frame_and_the_socket_stays_usable(stack, test_ca):
    async def scenario():
        async with session(stack, test_ca) as ws:
            await ws.send(b"\xc1 not msgpack")
            error = json.loads(await ws.recv())
            assert error["type"] == "x-fal-error" and error["error"] == "BAD_REQUEST"
            await ws.send(msgpack.packb({**FRAME, "num_inference_steps": 0}))
            error = json.loads(await ws.recv())
            assert error["error"] == "VALIDATION_ERROR" and "num_inference_steps" in error["reason"]
            await ws.send(msgpack.packb({**FRAME, "image_url": "http://169.254.169.254/x.png"}))
            error = json.loads(await ws.recv())
            assert error["error"] == "VALIDATION_ERROR" and "image_url" in error["reason"]
            await ws.send(msgpack.packb(FRAME))
            output, _ = await receive_result(ws)
            assert output["images"]

    asyncio.run(scenario())


def test_a_burst_keeps_the_newest_frames_and_drops_the_stale(stack, test_ca):
    async def scenario():
        async with session(stack, test_ca, "max_buffering=1") as ws:
            for seed in range(10):
                await ws.send(msgpack.packb({**FRAME, "seed": seed}))
            served = []
            while not served or served[-1] != 9:
                output, _ = await asyncio.wait_for(receive_result(ws), timeout=60)
                served.append(output["seed"])
            return served

    served = asyncio.run(scenario())
    assert served[-1] == 9 and len(served) < 10, served  # stale frames were dropped, the newest served
    assert served == sorted(served)


def test_an_idle_socket_is_closed_with_timeout(stack, test_ca):
    async def scenario():
        async with session(stack, test_ca) as ws:
            error = json.loads(await asyncio.wait_for(ws.recv(), timeout=30))
            assert error["type"] == "x-fal-error" and error["error"] == "TIMEOUT"
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), timeout=10)

    asyncio.run(scenario())


def test_max_buffering_out_of_range_is_refused(stack, test_ca):
    async def scenario():
        async with session(stack, test_ca, "max_buffering=99") as ws:
            error = json.loads(await ws.recv())
            assert error["error"] == "BAD_REQUEST" and "max_buffering" in error["reason"]

    asyncio.run(scenario())
