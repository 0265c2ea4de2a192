"""fal's queue protocol over HTTP: submit (with an optional webhook), status (and its SSE
stream), result, cancel.

Bodies, codes and headers as `shared/spec/fal-protocol.md` says and `fal_client` depends on:
three states only, `queue_position` while queued, the `logs` key once started, absolute URLs
that point back at us. Every read is a store read: clients poll every 0.1 s. A caller sees only
its own key's requests (others are 404, so ids do not leak).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from serve_app.auth import ANONYMOUS, Caller
from serve_app.config import QueueSettings
from serve_app.errors import FalError, InputError, validation_details, validation_response
from serve_app.queue.dispatcher import Endpoint, app_of, record_outcome
from serve_app.queue.store import CANCELLED, AdmissionLimits, JobRecord, JobState, JobStore, NewJob, QueueFull
from serve_app.queue.webhooks import check_webhook_url
from serve_app.url_guard import NetworkPolicy

STREAM_PING_S = 5.0  # fal's JS client gives up after 15 s of silence
STREAM_POLL_S = 0.1
TRUE = ("1", "true", "yes")


def _urls(base_url: str, app: str, request_id: str) -> dict[str, str]:
    base = f"{base_url}/queue/{app}/requests/{request_id}"
    return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}


class QueueService:
    def __init__(
        self, store: JobStore, endpoints: dict[str, Endpoint], settings: QueueSettings, network: NetworkPolicy, on_queued: Callable[[], None] | None = None
    ) -> None:
        self.store = store
        self.on_queued = on_queued
        self.endpoints = endpoints
        self.settings = settings
        self.network = network  # where webhook URLs may point
        self.limits = AdmissionLimits(settings.max_queued, settings.max_queued_per_key)

    async def submit(self, endpoint_id: str, raw: bytes, headers: Mapping[str, str], query: Mapping[str, str], caller: Caller, base_url: str) -> JSONResponse:
        endpoint = self.endpoints.get(endpoint_id)
        if endpoint is None:
            raise FalError(404, f"this server has no endpoint {endpoint_id!r}; it serves {', '.join(sorted(self.endpoints))}", "bad_request")
        try:
            body = endpoint.schema.model_validate_json(raw or b"null")
        except ValidationError as exc:
            return validation_response(validation_details(exc))
        webhook_url = query.get("fal_webhook")
        if webhook_url is not None:
            webhook_url = await check_webhook_url(webhook_url, self.network)
        priority = (headers.get("x-fal-queue-priority") or "normal").lower()
        if priority not in ("normal", "low"):
            raise InputError(["header", "x-fal-queue-priority"], "must be 'normal' or 'low'", "value_error")
        timeout = headers.get("x-fal-request-start-timeout") or headers.get("x-fal-request-timeout")
        try:
            start_timeout = float(timeout) if timeout else None
            if start_timeout is not None and not 0 < start_timeout <= 86_400:
                raise ValueError
        except ValueError:
            raise InputError(["header", "x-fal-request-timeout"], "must be a number of seconds between 0 and 86400", "value_error") from None
        job = NewJob(
            app=app_of(endpoint_id),
            endpoint=endpoint_id,
            payload=body.model_dump_json().encode(),
            key_id=caller.key_id,
            base_url=base_url,
            priority=priority,  # type: ignore[arg-type]
            webhook_url=webhook_url,
            no_retry=(headers.get("x-fal-no-retry") or "").lower() in TRUE,
            start_timeout_s=start_timeout,
            runner_hint=headers.get("x-fal-runner-hint"),
        )
        try:
            record = await self.store.submit(job, self.limits)
        except QueueFull as exc:
            raise FalError(429, f"{exc.reason}; retry shortly", "runner_scheduling_failure", headers={"Retry-After": "5"}) from None
        position = await self.store.position(record.request_id)
        if self.on_queued is not None:
            self.on_queued()
        return JSONResponse(
            {
                "status": "IN_QUEUE",
                "request_id": record.request_id,
                "gateway_request_id": record.gateway_request_id,
                "queue_position": position or 0,
                **_urls(base_url, record.app, record.request_id),
            }
        )

    async def _own(self, app: str, request_id: str, caller: Caller, bodies: bool = True, logs: bool = True) -> JobRecord:
        record = await self.store.get(request_id, app, bodies=bodies, logs=logs)
        if record is None or (caller.key_id != ANONYMOUS and record.key_id != caller.key_id):
            raise FalError(404, f"request {request_id!r} not found", "not_found")
        return record

    async def _status_body(self, record: JobRecord, logs: bool, base_url: str) -> dict[str, Any]:
        body: dict[str, Any] = {"status": record.state.value, "request_id": record.request_id, **_urls(base_url, record.app, record.request_id)}
        if record.state is JobState.IN_QUEUE:
            body["queue_position"] = await self.store.position(record.request_id) or 0
        body["logs"] = record.logs if logs else None
        if record.state is JobState.COMPLETED:
            body["metrics"] = record.metrics
            if record.status_code and record.status_code >= 400:
                if record.result is None:  # read without bodies: an error's is small, fetch it
                    record = await self.store.get(record.request_id, logs=False) or record
                error = json.loads(record.result or b"{}")
                detail = error.get("detail")
                body["error"] = detail if isinstance(detail, str) else f"Invalid status code: {record.status_code}"
                body["error_type"] = error.get("error_type", "validation_error" if record.status_code == 422 else "internal_error")
        return body

    async def status(self, app: str, request_id: str, logs: str | None, caller: Caller, base_url: str) -> JSONResponse:
        with_logs = (logs or "").lower() in TRUE
        record = await self._own(app, request_id, caller, bodies=False, logs=with_logs)
        body = await self._status_body(record, with_logs, base_url)
        return JSONResponse(body, status_code=200 if record.state is JobState.COMPLETED else 202)

    async def status_stream(self, app: str, request_id: str, logs: str | None, caller: Caller, base_url: str) -> AsyncIterator[str]:
        """`data: <status>` whenever it changes, `: ping` in silences, closed after COMPLETED."""
        with_logs = (logs or "").lower() in TRUE
        await self._own(app, request_id, caller, bodies=False, logs=False)  # 404 before the stream starts

        async def events() -> AsyncIterator[str]:
            last, quiet = None, 0.0
            while True:
                record = await self.store.get(request_id, app, bodies=False, logs=with_logs)
                if record is None:
                    return
                body = json.dumps(await self._status_body(record, with_logs, base_url))
                if body != last:
                    yield f"data: {body}\n\n"
                    last, quiet = body, 0.0
                if record.state is JobState.COMPLETED:
                    return
                await asyncio.sleep(STREAM_POLL_S)
                quiet += STREAM_POLL_S
                if quiet >= STREAM_PING_S:
                    yield ": ping\n\n"
                    quiet = 0.0

        return events()

    async def result(self, app: str, request_id: str, caller: Caller) -> Response:
        record = await self._own(app, request_id, caller)
        if record.state is not JobState.COMPLETED:
            return JSONResponse({"detail": "Request is still in progress"}, status_code=400)
        headers = {}
        if record.status_code and record.status_code >= 400:
            error_type = json.loads(record.result or b"{}").get("error_type")
            if error_type:
                headers["X-Fal-Error-Type"] = error_type
            if error_type == "request_timeout":
                headers["X-Fal-Request-Timeout-Type"] = "user"
        return Response(record.result or b"null", status_code=record.status_code or 500, media_type="application/json", headers=headers)

    async def cancel(self, app: str, request_id: str, caller: Caller) -> JSONResponse:
        try:
            record = await self._own(app, request_id, caller, bodies=False, logs=False)
        except FalError:
            return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
        outcome = await self.store.cancel(request_id, app)
        if outcome == "cancelled":  # a queued job, ended here (a running one ends in its dispatcher)
            record_outcome(record, CANCELLED)
        if outcome in ("cancelled", "requested"):
            return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)
        if outcome == "already_completed":
            return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
        return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
