"""fal's realtime protocol over a WebSocket (`/fal-ai/lcm/realtime`), as `fal_client.realtime` speaks it.

Client -> server: one input object per frame, msgpack (binary) or JSON (text). Server -> client:
the output as msgpack, then a JSON control frame `{"type": "x-fal-message", "action": "timings",
"timing": seconds}`. Failures are JSON `{"type": "x-fal-error", "error": ..., "reason": ...}`
frames and the socket stays usable; a socket idle past the timeout gets a `TIMEOUT` error and is
closed.

Frames that arrive while one is being served wait in a buffer of `max_buffering` (query
parameter, 1-60); when it is full the oldest waiting frame is dropped, so a client drawing
faster than we paint always sees its latest input served next.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from pydantic import BaseModel, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from serve_app.errors import FalError, InputError, validation_details

logger = logging.getLogger("diffusion_serve.realtime")

Handler = Callable[[BaseModel, str], Awaitable[tuple[dict[str, Any], float]]]


class BadFrame(Exception):
    def __init__(self, error: str, reason: str) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason


def decode_frame(message: dict[str, Any]) -> dict[str, Any]:
    """An input object from a WebSocket message (msgpack bytes or JSON text)."""
    try:
        if message.get("bytes") is not None:
            payload = msgpack.unpackb(message["bytes"], raw=False)
        else:
            payload = json.loads(message.get("text") or "")
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise BadFrame("BAD_REQUEST", f"the frame is neither msgpack nor JSON ({type(exc).__name__})") from None
    if not isinstance(payload, dict):
        raise BadFrame("BAD_REQUEST", "a frame must hold one input object (a map)")
    return payload


def _error_frame(error: str, reason: str) -> str:
    return json.dumps({"type": "x-fal-error", "error": error, "reason": reason})


class RealtimeSession:
    """One client's socket: a reader that buffers frames, a worker that serves them in turn."""

    def __init__(self, websocket: WebSocket, schema: type[BaseModel], handler: Handler, max_buffering: int, idle_timeout_s: float) -> None:
        self.ws = websocket
        self.schema = schema
        self.handler = handler
        self.pending: deque[dict[str, Any]] = deque(maxlen=max_buffering)
        self.arrived = asyncio.Event()
        self.idle_timeout_s = idle_timeout_s
        self.last_activity = time.monotonic()
        self.dropped = 0
        self.send_lock = asyncio.Lock()

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        worker = asyncio.create_task(self._work())
        done, _ = await asyncio.wait({reader, worker}, return_when=asyncio.FIRST_COMPLETED)
        for task in (reader, worker):
            task.cancel()
        await asyncio.gather(reader, worker, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() and not isinstance(task.exception(), WebSocketDisconnect):
                logger.warning("realtime session ended with %r", task.exception())

    async def _send_text(self, text: str) -> None:
        async with self.send_lock:
            await self.ws.send_text(text)

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            self.last_activity = time.monotonic()
            try:
                frame = decode_frame(message)
            except BadFrame as exc:
                await self._send_text(_error_frame(exc.error, exc.reason))
                continue
            if len(self.pending) == self.pending.maxlen:
                self.dropped += 1  # the oldest waiting frame gives way to this one
            self.pending.append(frame)
            self.arrived.set()

    async def _work(self) -> None:
        while True:
            if not self.pending:
                self.arrived.clear()
                idle_left = self.idle_timeout_s - (time.monotonic() - self.last_activity)
                try:
                    await asyncio.wait_for(self.arrived.wait(), timeout=max(0.0, idle_left))
                except asyncio.TimeoutError:
                    if time.monotonic() - self.last_activity >= self.idle_timeout_s:
                        await self._send_text(_error_frame("TIMEOUT", f"no input for {self.idle_timeout_s:g} s; closing"))
                        await self.ws.close(code=1000)
                        return
                    continue
            frame = self.pending.popleft()
            await self._serve(frame)
            self.last_activity = time.monotonic()

    async def _serve(self, frame: dict[str, Any]) -> None:
        request_id = str(uuid.uuid4())
        try:
            body = self.schema.model_validate(frame)
        except ValidationError as exc:
            await self._send_text(_error_frame("VALIDATION_ERROR", json.dumps(validation_details(exc))))
            return
        started = time.perf_counter()
        try:
            output, _ = await self.handler(body, request_id)
        except InputError as exc:
            await self._send_text(_error_frame("VALIDATION_ERROR", json.dumps(exc.detail())))
            return
        except FalError as exc:
            await self._send_text(_error_frame(exc.error_type.upper(), exc.detail))
            return
        except Exception:  # noqa: BLE001 - one bad frame must not end the session
            logger.exception("realtime frame failed (request %s)", request_id)
            await self._send_text(_error_frame("INTERNAL_ERROR", f"the frame failed (request id {request_id})"))
            return
        elapsed = time.perf_counter() - started
        async with self.send_lock:
            await self.ws.send_bytes(msgpack.packb(output, use_bin_type=True))
            await self.ws.send_text(json.dumps({"type": "x-fal-message", "action": "timings", "timing": elapsed}))


def max_buffering_of(websocket: WebSocket, default: int) -> int:
    raw = websocket.query_params.get("max_buffering")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 60:
        raise BadFrame("BAD_REQUEST", "max_buffering must be an integer from 1 to 60")
    return value
