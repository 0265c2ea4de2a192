"""Errors in fal's two shapes, and the handlers that render them.

- Validation: 422 `{"detail": [{"loc": ["body", ...], "msg": ..., "type": ...}]}` (FastAPI's shape).
- Infrastructure: `{"detail": ..., "error_type": ...}` with the `X-Fal-Error-Type` header.

Model deployments raise `JobInputError` (a field path, no HTTP); the router turns it into a 422
here, so a bad input found late (a model that will not load) still reads like a validation error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from deployments.common.jobs import JobInputError


class InputError(Exception):
    """A 422 for one field of the request body, raised anywhere in the router."""

    def __init__(self, loc: Sequence[str | int], msg: str, type: str = "value_error") -> None:
        super().__init__(loc, msg, type)
        self.loc = list(loc)
        self.msg = msg
        self.type = type

    def detail(self) -> list[dict[str, Any]]:
        return [{"loc": self.loc, "msg": self.msg, "type": self.type}]

    @classmethod
    def from_job_error(cls, err: JobInputError) -> InputError:
        return cls(["body", *err.field], err.msg, err.type)


class FalError(Exception):
    """An infrastructure error: a status code, a message and one of fal's error types."""

    def __init__(self, status_code: int, detail: str, error_type: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code, detail, error_type)
        self.status_code = status_code
        self.detail = detail
        self.error_type = error_type
        self.headers = headers or {}  # e.g. Retry-After on a 429

    def body(self) -> dict[str, str]:
        return {"detail": self.detail, "error_type": self.error_type}


def validation_response(detail: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(detail)})


def fal_error_response(err: FalError) -> JSONResponse:
    return JSONResponse(
        status_code=err.status_code, content=err.body(), headers={"X-Fal-Error-Type": err.error_type, **err.headers}
    )


def _clean_pydantic_errors(errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep fal's keys (loc, msg, type) plus `ctx` when it is plain data; drop echoed inputs."""
    cleaned = []
    for e in errors:
        item = {"loc": list(e.get("loc", [])), "msg": e.get("msg", ""), "type": e.get("type", "value_error")}
        if e.get("ctx"):
            item["ctx"] = {k: v if isinstance(v, (str, int, float, bool)) else str(v) for k, v in e["ctx"].items()}
        cleaned.append(item)
    return cleaned


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """A body's validation errors, located under `body` as FastAPI would put them."""
    return _clean_pydantic_errors([{**e, "loc": ["body", *e["loc"]]} for e in exc.errors(include_url=False)])


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(_clean_pydantic_errors(exc.errors()))

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONResponse:
        return validation_response(exc.detail())

    @app.exception_handler(FalError)
    async def _fal(request: Request, exc: FalError) -> JSONResponse:
        return fal_error_response(exc)

    # Anything else is caught by the router's RequestIdMiddleware, which answers a fal-style 500
    # that still carries the request id.
