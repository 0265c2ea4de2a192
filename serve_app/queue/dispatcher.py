"""Dispatchers: inside every router replica, they claim queued jobs and run them to an outcome.

Up to `dispatch_slots` jobs per router replica run at once: a claimer takes the oldest job it may
run while a slot is free, and each job runs through the same endpoint code as a synchronous call
(with progress streamed into the job's logs), renews its lease while it runs, stops it when a
cancel is asked for, and writes the outcome, the only write that ends a job. A job whose model
replica died is given back to the queue (up to `max_attempts` runs). A housekeeping loop requeues
jobs whose router died (their leases ran out), ends jobs that waited past their start timeout
(504), and purges old results.

Slots must cover what the model replicas can take at once (their `max_ongoing_requests` times
their `max_replicas`, over the router replicas): a job waiting for a slot is invisible to Serve's
routing, and a replica that gets no requests does not help the backlog.

The store may go away for a while (a Redis restart): claims and renewals are tried again on the
next round, a job's final write is retried for `STORE_WRITE_PATIENCE_S`, and a progress line that
cannot be written is skipped; no slot ever dies of it. A job whose final write never lands is not
lost: its lease runs out and it runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from serve_app.config import QueueSettings
from serve_app.errors import FalError, InputError, validation_details
from serve_app.metrics import metrics, outcome_of, record_request
from serve_app.queue.claiming import Claimer
from serve_app.queue.store import CANCELLED, JobRecord, JobStore, Outcome
from serve_app.services.dispatch import Progress, Run

logger = logging.getLogger("diffusion_serve.queue")

HOUSEKEEPING_INTERVAL_S = 1.0
PURGE_INTERVAL_S = 60.0
STORE_WRITE_PATIENCE_S = 120.0


@dataclass(frozen=True)
class Endpoint:
    """An endpoint the queue serves: its body schema, and how to run a validated body
    (`run(body, base_url, request_id, progress)`)."""

    schema: type[BaseModel]
    run: Callable[[Any, str, str, Progress | None], Awaitable[Run]]
    deployment: str = ""  # the model deployment that serves it (metrics and autoscaling)


def app_of(endpoint_id: str) -> str:
    """`owner/alias` of `owner/alias[/path]`: status, result and cancel are addressed by it."""
    return "/".join(endpoint_id.split("/")[:2])


def log_entry(message: str, level: str = "INFO") -> dict[str, Any]:
    return {"message": message, "level": level, "source": "USER", "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def error_outcome(exc: BaseException, request_id: str) -> Outcome:
    """A failed job's result, in the shape its synchronous call would have answered."""
    if isinstance(exc, InputError):
        return Outcome(422, json.dumps({"detail": exc.detail()}).encode())
    if isinstance(exc, ValidationError):
        return Outcome(422, json.dumps({"detail": validation_details(exc)}).encode())
    if isinstance(exc, FalError):
        return Outcome(exc.status_code, json.dumps(exc.body()).encode())
    logger.error("queued request %s failed", request_id, exc_info=exc)
    return Outcome(500, json.dumps({"detail": f"internal error (request id {request_id})", "error_type": "internal_error"}).encode())


def record_outcome(job: JobRecord, outcome: Outcome) -> None:
    """A queued job's end, in the request metrics (latency from its submit)."""
    seconds = max(0.0, time.time() - job.created_at) if job.created_at else None
    record_request(job.endpoint, "queue", outcome_of(outcome.status_code), seconds)


class Dispatcher:
    def __init__(
        self, store: JobStore, endpoints: dict[str, Endpoint], settings: QueueSettings, worker: str, on_webhook_due: Callable[[], None] | None = None
    ) -> None:
        self.store = store
        self.on_webhook_due = on_webhook_due  # a job with a webhook ended here: its delivery is due now
        self.endpoints = endpoints
        self.settings = settings
        self.worker = worker
        self.apps = {app_of(endpoint_id) for endpoint_id in endpoints}
        self.claimer = Claimer(
            f"dispatcher {worker}", self._claim, self._run_job, settings.dispatch_slots, settings.poll_interval_s
        )
        self._housekeeper: asyncio.Task | None = None

    def start(self) -> None:
        self.claimer.start()
        self._housekeeper = asyncio.get_running_loop().create_task(self._housekeeping())

    def wake(self) -> None:
        """A job was just queued through this replica: claim it now rather than at the next poll."""
        self.claimer.wake()

    async def stop(self) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            await asyncio.gather(self._housekeeper, return_exceptions=True)
        await self.claimer.stop()

    # --- running jobs -----------------------------------------------------------------------

    async def _claim(self) -> JobRecord | None:
        return await self.store.claim(self.worker, self.settings.lease_s, self.apps, self.settings.max_running_per_key)

    async def _run_job(self, job: JobRecord) -> None:
        try:
            await self._execute(job)
        except Exception:  # noqa: BLE001 - the job's lease runs out and it runs again
            logger.exception("dispatcher %s: request %s could not be ended", self.worker, job.request_id)

    async def _execute(self, job: JobRecord) -> None:
        """Run one claimed job to its outcome, keeping its lease and watching for a cancel."""
        if job.started_at and job.attempts == 1:
            metrics().queue_wait_seconds.observe(max(0.0, job.started_at - job.created_at), tags={"endpoint": job.endpoint})
        running = asyncio.ensure_future(self._outcome(job))
        cancelled = False
        while not running.done():
            await asyncio.wait({running}, timeout=min(1.0, self.settings.lease_s / 3))
            if running.done():
                break
            try:
                if await self.store.cancel_requested(job.request_id):
                    cancelled = True
                    running.cancel()  # the model call is cancelled; the replica stops between steps
                    break
                if not await self.store.renew(job.request_id, self.worker, self.settings.lease_s):
                    logger.warning("request %s: lease lost; another router runs it now", job.request_id)
                    running.cancel()
                    return
            except Exception:  # noqa: BLE001 - keep running; the lease has slack for a store hiccup
                logger.exception("request %s: lease renewal failed", job.request_id)
        if cancelled:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running
            outcome = CANCELLED
        else:
            outcome = running.result()
        if self._retry(job, outcome):
            logger.warning("request %s: its model replica went away; queued again (attempt %d next)", job.request_id, job.attempts + 1)
            await self._patiently(f"giving request {job.request_id} back", lambda: self.store.release(job.request_id, self.worker))
            return
        if await self._patiently(f"writing the outcome of request {job.request_id}", lambda: self.store.finish(job.request_id, self.worker, outcome)):
            record_outcome(job, outcome)  # once: a router that lost the lease does not count it
            if job.webhook_url and self.on_webhook_due is not None:
                self.on_webhook_due()

    @staticmethod
    async def _patiently(what: str, write: Callable[[], Awaitable[Any]]) -> Any:
        """A job's final write, tried again with growing waits while the store is away; its result."""
        loop = asyncio.get_running_loop()
        deadline, wait = loop.time() + STORE_WRITE_PATIENCE_S, 0.1
        while True:
            try:
                return await write()
            except Exception:  # noqa: BLE001
                if loop.time() + wait > deadline:
                    raise
                logger.warning("%s failed; the job store may be restarting, trying again in %.1f s", what, wait, exc_info=True)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 2.0)

    def _retry(self, job: JobRecord, outcome: Outcome) -> bool:
        """A model replica that died under a job is the cluster's fault, not the request's: run it
        again, unless it asked not to be retried or has had its attempts."""
        if outcome.status_code != 503 or job.no_retry or job.attempts >= self.settings.max_attempts:
            return False
        return json.loads(outcome.body).get("error_type") == "runner_disconnected"

    async def _outcome(self, job: JobRecord) -> Outcome:
        endpoint = self.endpoints[job.endpoint]

        async def progress(step: int, total: int) -> None:
            try:
                await self.store.append_log(job.request_id, log_entry(f"step {step}/{total}"))
            except Exception:  # noqa: BLE001 - a lost progress line must not fail the job
                logger.warning("request %s: progress line %d/%d not written (job store away)", job.request_id, step, total)

        try:
            body = endpoint.schema.model_validate_json(job.payload)
            run = await endpoint.run(body, job.base_url, job.request_id, progress)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's result
            return error_outcome(exc, job.request_id)
        return Outcome(200, run.output.model_dump_json().encode(), {"inference_time": run.result.inference_time_s})

    # --- housekeeping -----------------------------------------------------------------------

    async def _record_depths(self) -> None:
        served_by = {app_of(endpoint_id): endpoint.deployment for endpoint_id, endpoint in self.endpoints.items()}
        for app, deployment in served_by.items():
            metrics().queue_depth.set(await self.store.depth(app), tags={"queue_app": app, "serving_deployment": deployment})

    async def _housekeeping(self) -> None:
        since_purge = PURGE_INTERVAL_S
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            try:
                requeued, handed_back = await self.store.requeue_expired(self.settings.max_attempts)
                for request_id in requeued:
                    logger.warning("request %s: its router went away; queued again", request_id)
                for record in handed_back:  # it may not run again
                    why = "it asked not to be retried" if record.no_retry else f"it already ran {record.attempts} times"
                    body = {"detail": f"the router running this request went away, and {why}", "error_type": "runner_disconnected"}
                    await self.store.finish(record.request_id, None, Outcome(503, json.dumps(body).encode()))
                    record_outcome(record, Outcome(503, b""))
                for record in await self.store.expired_unstarted():
                    body = {"detail": "the request did not start within its start timeout", "error_type": "request_timeout"}
                    await self.store.finish(record.request_id, None, Outcome(504, json.dumps(body).encode()))
                    record_outcome(record, Outcome(504, b""))
                since_purge += HOUSEKEEPING_INTERVAL_S
                if since_purge >= PURGE_INTERVAL_S:
                    since_purge = 0.0
                    await self.store.purge(self.settings.retention_s)
                await self._record_depths()
            except Exception:  # noqa: BLE001 - try again next round
                logger.exception("queue housekeeping failed")
