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
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from deployments.common.jobs import JobInputError
from serve_app.errors import FalError, InputError

logger = logging.getLogger("diffusion_serve.dispatch")


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
