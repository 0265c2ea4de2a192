"""Calling a model deployment and translating what can go wrong into fal's errors.

Shared by every endpoint family: a `JobInputError` from a replica becomes a 422 on its field; a
replica that died is 503 `runner_disconnected`; back-pressure is 429 so fal's clients retry; a
job past the sync time limit is 504; anything else is a 500 that names the request id, never a
stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from deployments.common.jobs import ImageJob, JobInputError, JobResult
from serve_app.config import AppConfig
from serve_app.errors import FalError, InputError
from serve_app.files import InputFiles, OutputStore

logger = logging.getLogger("diffusion_serve.dispatch")

Output = TypeVar("Output")


@contextlib.contextmanager
def _model_errors(request_id: str, timeout_s: float):
    """fal's errors for what can go wrong in a model deployment (see the module doc)."""
    try:
        yield
    except JobInputError as exc:
        raise InputError.from_job_error(exc) from None
    except asyncio.TimeoutError:
        raise FalError(504, f"the request did not finish within {timeout_s:.0f} s", "request_timeout") from None
    except BackPressureError:
        raise FalError(429, "the model deployment is at capacity; retry shortly", "runner_scheduling_failure") from None
    except (ActorDiedError, ActorUnavailableError, RayActorError):
        logger.exception("request %s: model replica unavailable", request_id)
        raise FalError(503, "the model replica running this request went away; retry", "runner_disconnected") from None
    except (FalError, InputError):
        raise
    except Exception:
        logger.exception("request %s failed in the model deployment", request_id)
        raise FalError(500, f"the model failed on this request (request id {request_id})", "runner_server_error") from None


@dataclass
class EndpointService:
    """What every endpoint family's service holds: its model deployment, the settings, the input
    files and the output store."""

    model: serve.handle.DeploymentHandle
    config: AppConfig
    inputs: InputFiles
    store: OutputStore


@dataclass
class Run(Generic[Output]):
    """A served request: its output, the model's result, and where the router's time went (for
    the Server-Timing header)."""

    output: Output
    result: JobResult
    phases_ms: dict[str, float]


Progress = Callable[[int, int], Awaitable[None]]  # (denoising steps done, total)


async def run_job(
    handle: serve.handle.DeploymentHandle,
    job: Awaitable[ImageJob],
    publish: Callable[[ImageJob, JobResult], Output],
    timeout_s: float,
    request_id: str,
    progress: Progress | None = None,
) -> Run[Output]:
    """Every endpoint's path to a result: build the job (validation, input files), run it on the
    model deployment (streaming its steps to `progress`, when given), publish its images off the
    event loop; each phase timed."""
    t0 = time.perf_counter()
    built = await job
    t1 = time.perf_counter()
    if progress is None:
        result: JobResult = await call_model(handle, "generate", built, built.routing_key(), timeout_s, request_id)
    else:
        async for event in stream_model(handle, "generate_stream", built, built.routing_key(), timeout_s, request_id):
            if isinstance(event, JobResult):
                result = event
            else:
                await progress(*event)
    t2 = time.perf_counter()
    output = await asyncio.to_thread(publish, built, result)
    t3 = time.perf_counter()
    phases = {"input": t1 - t0, "model": t2 - t1, "inference": result.inference_time_s, "publish": t3 - t2}
    return Run(output, result, {name: 1000 * seconds for name, seconds in phases.items()})


async def call_model(
    handle: serve.handle.DeploymentHandle, method: str, job: Any, model_id: str, timeout_s: float, request_id: str
) -> Any:
    response = getattr(handle.options(multiplexed_model_id=model_id), method).remote(job)
    with _model_errors(request_id, timeout_s):
        try:
            return await asyncio.wait_for(response, timeout=timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise


async def stream_model(
    handle: serve.handle.DeploymentHandle, method: str, job: Any, model_id: str, timeout_s: float, request_id: str
) -> AsyncIterator[Any]:
    """The items a streaming model method yields, with the same errors as `call_model`; the whole
    stream must end within `timeout_s`."""
    stream = getattr(handle.options(multiplexed_model_id=model_id, stream=True), method).remote(job)
    deadline = asyncio.get_running_loop().time() + timeout_s
    with _model_errors(request_id, timeout_s):
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                try:
                    item = await asyncio.wait_for(stream.__anext__(), timeout=max(0.001, left))
                except StopAsyncIteration:
                    return
                yield item
        except BaseException:
            stream.cancel()
            raise
