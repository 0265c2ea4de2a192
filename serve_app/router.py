"""The ingress deployment: fal's HTTP routes -> endpoint services.

Every response carries `x-fal-request-id`; every error is in one of fal's two shapes (see
errors.py), including errors nobody anticipated. OpenAPI docs are at /docs and /openapi.json.

(No `from __future__ import annotations` here: Serve's class-based ingress needs FastAPI to see
real annotations on the route methods.)
"""


import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.auth import Authenticator
from serve_app.autoscaling import CPU_METRIC, CpuGauge
from serve_app.config import AppConfig
from serve_app.errors import FalError, InputError, fal_error_response, install_error_handlers
from serve_app.files import InputFiles, LocalFileStore, make_output_store
from serve_app.metrics import outcome_of, record_request
from serve_app.queue import open_store
from serve_app.queue.dispatcher import Dispatcher, Endpoint, app_of
from serve_app.queue.service import QueueService
from serve_app.queue.sync_admission import SyncRunLimit
from serve_app.queue.webhooks import Deliverer, SigningKeys
from serve_app.rate_limits import SharedRateLimiter
from serve_app.realtime import BadFrame, RealtimeSession, max_buffering_of
from serve_app.schemas.auth import TokenRequest
from serve_app.schemas.flux import FluxImageToImageInput, FluxInpaintInput, FluxOutput, FluxTextToImageInput
from serve_app.schemas.lcm import LcmInput, LcmOutput
from serve_app.schemas.lora import LoraImageToImageInput, LoraInpaintInput, LoraOutput, LoraTextToImageInput
from serve_app.services.dispatch import Run
from serve_app.services.flux import FluxService
from serve_app.services.lcm import LcmService
from serve_app.services.lora import LoraService

logger = logging.getLogger("diffusion_serve.router")

REQUEST_ID_HEADER = "x-fal-request-id"
BATCH_SIZE_HEADER = "x-diffusion-serve-batch-size"
INFERENCE_TIME_HEADER = "x-diffusion-serve-inference-ms"
REPLICA_HEADER = "x-diffusion-serve-replica"

VALIDATION_RESPONSE = {422: {"description": "Validation error: `{detail: [{loc, msg, type}]}`"}}

api = FastAPI(
    title="diffusion-serve",
    description="A self-hosted image-generation cluster that speaks fal.ai's API.",
    version="0.1.0",
)
install_error_handlers(api)


class RequestIdMiddleware:
    """Give every request an id (echoed in `x-fal-request-id`), even when it fails unexpectedly.

    Plain ASGI rather than `@app.middleware("http")`: it sits on every request's path, and
    Starlette's BaseHTTPMiddleware costs a task and a stream copy per request.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - the last line of defence: never a bare 500
            logger.exception("unhandled error on %s (request %s)", scope.get("path"), request_id)
            if started:
                raise
            response = fal_error_response(FalError(500, f"internal server error (request id {request_id})", "internal_error"))
            await response(scope, receive, send_with_id)


def app_path(scope) -> str:
    """The request's path within the app: an app under a route prefix sees the prefix in it."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


class AuthMiddleware:
    """Every HTTP route but the public ones needs a key (or runs in open mode), within its rate;
    synchronous runs also within the key's running limit (the queue's, see sync_admission.py).

    The replica's `Authenticator` and `SyncRunLimit` sit on the app's state (set by
    `Router.__init__`); the caller lands on the request's state. Realtime sockets authenticate in
    their route, where an error frame can say why."""

    PUBLIC = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
    PUBLIC_PREFIXES = ("/files/", "/.well-known/")
    SYNC_RUN_PREFIX = "/fal-ai/"  # POSTs here run a model while the client waits

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        path = app_path(scope)
        if scope["type"] != "http" or path in self.PUBLIC or path.startswith(self.PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        authenticator: Authenticator = scope["app"].state.authenticator
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            caller = authenticator.caller_from_header(headers.get("authorization"))
            await authenticator.admit(caller)
        except FalError as exc:
            await fal_error_response(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["caller"] = caller
        if not (scope.get("method") == "POST" and path.startswith(self.SYNC_RUN_PREFIX)):
            await self.app(scope, receive, send)
            return
        sync_runs: SyncRunLimit = scope["app"].state.sync_runs
        try:
            await sync_runs.enter(caller)
        except FalError as exc:
            await fal_error_response(exc)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            await sync_runs.leave(caller)


class RequestMetricsMiddleware:
    """Sync runs (`POST /fal-ai/...`) and refused queue submits, by endpoint and outcome, with
    their latency (a stream's until its last event). Accepted queued jobs are counted when they
    end, by the dispatcher."""

    SYNC_ENDPOINTS = frozenset({  # the routes below: a bounded label set
        "fal-ai/lora", "fal-ai/lora/image-to-image", "fal-ai/lora/inpaint", "fal-ai/lcm",
        "fal-ai/flux-lora", "fal-ai/flux-lora/image-to-image", "fal-ai/flux-lora/inpainting", "fal-ai/flux-lora/stream",
    })

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        path = app_path(scope)
        if scope["type"] != "http" or scope.get("method") != "POST" or not path.startswith(("/fal-ai/", "/queue/")):
            await self.app(scope, receive, send)
            return
        mode = "queue" if path.startswith("/queue/") else "sync"
        endpoint = path.split("/", 2)[2] if mode == "queue" else path[1:]
        endpoint = endpoint if endpoint in self.SYNC_ENDPOINTS else "unknown"
        status = 500
        started = time.perf_counter()

        async def send_recording(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            if mode == "sync":
                record_request(endpoint, mode, outcome_of(status), time.perf_counter() - started)
            elif status != 200:  # a refused submit: never a job
                record_request(endpoint, mode, outcome_of(status))


api.add_middleware(AuthMiddleware)
api.add_middleware(RequestMetricsMiddleware)  # outside auth: refusals are counted too
api.add_middleware(RequestIdMiddleware)  # outermost: refusals carry a request id too


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _respond(published: Run) -> JSONResponse:
    """The output as JSON, already validated by construction (no second pass through FastAPI)."""
    headers = {
        BATCH_SIZE_HEADER: str(published.result.batch_size),
        INFERENCE_TIME_HEADER: f"{published.result.inference_time_s * 1000:.1f}",
        REPLICA_HEADER: published.result.replica,
        "Server-Timing": ", ".join(f"{name};dur={ms:.1f}" for name, ms in published.phases_ms.items()),
    }
    return JSONResponse(published.output.model_dump(mode="json"), headers=headers)


@serve.deployment(name="Router", max_ongoing_requests=256)
@serve.ingress(api)
class Router:
    def __init__(
        self, stable_diffusion: DeploymentHandle, lcm: DeploymentHandle, flux: DeploymentHandle, config: dict[str, Any] | None = None
    ) -> None:
        self.config = AppConfig.from_args(config)
        password = self.config.queue.store_password
        self.jobs = open_store(self.config.queue.store_url, password.get_secret_value() if password else None)
        # Rate limits in the job store: one bucket per key for every router replica.
        self.authenticator = Authenticator(self.config.auth, SharedRateLimiter(self.jobs))
        api.state.authenticator = self.authenticator
        self.store = make_output_store(self.config.files)
        self.inputs = InputFiles(self.config, self.store)
        self.lora = LoraService(stable_diffusion, self.config, self.inputs, self.store)
        self.lcm = LcmService(lcm, self.config, self.inputs, self.store)
        self.flux = FluxService(flux, self.config, self.inputs, self.store)
        # fal's queue: jobs wait in the durable store; this replica's dispatcher runs some of them.
        endpoints = self._queued_endpoints()
        worker = serve.get_replica_context().replica_id.unique_id
        api.state.sync_runs = SyncRunLimit(self.jobs, self.config.queue.max_running_per_key, holder=worker)
        self.signing_keys = SigningKeys(self.config.webhooks, self.jobs)
        self.deliverer = Deliverer(self.jobs, self.config.webhooks, self.config.network, self.signing_keys, worker)
        self.dispatcher = Dispatcher(self.jobs, endpoints, self.config.queue, worker, on_webhook_due=self.deliverer.wake)
        # A job queued here wakes this replica's dispatcher: it starts without waiting for a poll.
        self.queue = QueueService(self.jobs, endpoints, self.config.queue, self.config.network, on_queued=self.dispatcher.wake)
        self.dispatcher.start()
        self.deliverer.start()
        self.cpu = CpuGauge()
        logger.info("router up, profile %s", self.config.profile)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What `RouterCpuPolicy` scales the router by (Serve calls this on every replica)."""
        return {CPU_METRIC: self.cpu.utilization()}

    def _queued_endpoints(self) -> dict[str, Endpoint]:
        """Every endpoint id the queue accepts: its schema and the same code its sync route runs."""

        def lora(mode):
            return lambda body, base_url, request_id, progress: self.lora.run(mode, body, base_url, request_id, progress)

        def flux(mode):
            return lambda body, base_url, request_id, progress: self.flux.run(mode, body, base_url, request_id, progress)

        sd, lcm, fx = (service.model.deployment_name for service in (self.lora, self.lcm, self.flux))
        return {
            "fal-ai/lora": Endpoint(LoraTextToImageInput, lora("text-to-image"), sd),
            "fal-ai/lora/image-to-image": Endpoint(LoraImageToImageInput, lora("image-to-image"), sd),
            "fal-ai/lora/inpaint": Endpoint(LoraInpaintInput, lora("inpaint"), sd),
            "fal-ai/lcm": Endpoint(
                LcmInput, lambda body, base_url, request_id, progress: self.lcm.run(body, base_url, request_id, progress=progress), lcm
            ),
            "fal-ai/flux-lora": Endpoint(FluxTextToImageInput, flux("text-to-image"), fx),
            "fal-ai/flux-lora/image-to-image": Endpoint(FluxImageToImageInput, flux("image-to-image"), fx),
            "fal-ai/flux-lora/inpainting": Endpoint(FluxInpaintInput, flux("inpaint"), fx),
        }

    @api.post("/fal-ai/lora", response_model=LoraOutput, responses=VALIDATION_RESPONSE, tags=["fal-ai/lora"])
    async def lora_text_to_image(self, body: LoraTextToImageInput, request: Request) -> JSONResponse:
        """Text to image with SD1.5 or SDXL."""
        return _respond(await self.lora.run("text-to-image", body, _base_url(request), request.state.request_id))

    @api.post("/fal-ai/lora/image-to-image", response_model=LoraOutput, responses=VALIDATION_RESPONSE, tags=["fal-ai/lora"])
    async def lora_image_to_image(self, body: LoraImageToImageInput, request: Request) -> JSONResponse:
        """Image to image: `noise_strength` of noise over `image_url`, then denoised."""
        return _respond(await self.lora.run("image-to-image", body, _base_url(request), request.state.request_id))

    @api.post("/fal-ai/lora/inpaint", response_model=LoraOutput, responses=VALIDATION_RESPONSE, tags=["fal-ai/lora"])
    async def lora_inpaint(self, body: LoraInpaintInput, request: Request) -> JSONResponse:
        """Inpainting: white pixels of `mask_url` are repainted."""
        return _respond(await self.lora.run("inpaint", body, _base_url(request), request.state.request_id))

    @api.post("/fal-ai/lcm", response_model=LcmOutput, responses=VALIDATION_RESPONSE, tags=["fal-ai/lcm"])
    async def lcm(self, body: LcmInput, request: Request) -> JSONResponse:
        """Latent consistency in 4 steps: text to image, image to image (`image_url`), inpainting (+ `mask_url`)."""
        return _respond(await self.lcm.run(body, _base_url(request), request.state.request_id))

    @api.websocket("/fal-ai/lcm/realtime")
    async def lcm_realtime(self, websocket: WebSocket) -> None:
        """fal's realtime protocol: msgpack (or JSON) inputs in, msgpack outputs and timings out."""
        await websocket.accept()
        try:
            caller = self.authenticator.caller_of_socket(websocket.headers, websocket.query_params, "fal-ai/lcm")
            await self.authenticator.admit(caller)
        except FalError as exc:
            await websocket.send_text(json.dumps({"type": "x-fal-error", "error": exc.error_type.upper(), "reason": exc.detail}))
            await websocket.close(code=1008)
            return
        try:
            max_buffering = max_buffering_of(websocket, self.config.realtime.default_max_buffering)
        except BadFrame as exc:
            await websocket.send_text(json.dumps({"type": "x-fal-error", "error": exc.error, "reason": exc.reason}))
            await websocket.close(code=1008)
            return
        base_url = str(websocket.base_url).replace("ws", "http", 1).rstrip("/")

        async def serve_frame(body: LcmInput, request_id: str) -> tuple[dict[str, Any], float]:
            started, outcome = time.perf_counter(), "error"
            try:
                run = await self.lcm.run(body, base_url, request_id, sync_mode=True)
                outcome = "ok"
            except InputError:
                outcome = "invalid"
                raise
            except FalError as exc:
                outcome = outcome_of(exc.status_code)
                raise
            finally:
                record_request("fal-ai/lcm/realtime", "realtime", outcome, time.perf_counter() - started)
            return run.output.model_dump(mode="json"), run.result.inference_time_s

        await RealtimeSession(websocket, LcmInput, serve_frame, max_buffering, self.config.realtime.idle_timeout_s).run()

    @api.post("/fal-ai/flux-lora", response_model=FluxOutput, responses=VALIDATION_RESPONSE, tags=["fal-ai/flux-lora"])
    async def flux_text_to_image(self, body: FluxTextToImageInput, request: Request) -> JSONResponse:
        """FLUX.1-dev text to image, with any number of LoRAs."""
        return _respond(await self.flux.run("text-to-image", body, _base_url(request), request.state.request_id))

    @api.post("/fal-ai/flux-lora/image-to-image", response_model=FluxOutput, responses=VALIDATION_RESPONSE, tags=["fal-ai/flux-lora"])
    async def flux_image_to_image(self, body: FluxImageToImageInput, request: Request) -> JSONResponse:
        """FLUX.1-dev image to image: `strength` of noise over `image_url`, then denoised."""
        return _respond(await self.flux.run("image-to-image", body, _base_url(request), request.state.request_id))

    @api.post("/fal-ai/flux-lora/inpainting", response_model=FluxOutput, responses=VALIDATION_RESPONSE, tags=["fal-ai/flux-lora"])
    async def flux_inpainting(self, body: FluxInpaintInput, request: Request) -> JSONResponse:
        """FLUX.1-dev inpainting: white pixels of `mask_url` are repainted."""
        return _respond(await self.flux.run("inpaint", body, _base_url(request), request.state.request_id))

    @api.post("/fal-ai/flux-lora/stream", responses=VALIDATION_RESPONSE, tags=["fal-ai/flux-lora"])
    async def flux_stream(self, body: FluxTextToImageInput, request: Request) -> StreamingResponse:
        """Server-sent events: `{"type": "progress", "step", "total", "message"}` per denoising
        step, then the output (as `POST /fal-ai/flux-lora` returns it)."""
        events = self.flux.stream(body, _base_url(request), request.state.request_id)
        first = await events.__anext__()  # errors before the first event are plain HTTP errors

        async def sse():
            yield f"data: {json.dumps(first)}\n\n"
            try:
                async for event in events:
                    yield f"data: {json.dumps(event)}\n\n"
            except InputError as exc:
                yield f"data: {json.dumps({'type': 'error', 'detail': exc.detail()})}\n\n"
            except FalError as exc:
                yield f"data: {json.dumps({'type': 'error', **exc.body()})}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @api.post("/tokens/", response_model=str, tags=["auth"])
    async def tokens(self, body: TokenRequest, request: Request) -> JSONResponse:
        """A short-lived token for the realtime socket (`?fal_jwt_token=`), so a browser needs no
        key: a bare JSON string, as fal's token endpoint answers."""
        ttl = body.token_expiration or self.config.auth.token_ttl_s
        return JSONResponse(self.authenticator.issue_token(request.state.caller, body.allowed_apps, ttl))

    # --- fal's queue (status, result and cancel also accept the long form owner/alias/path) ---

    @api.post("/queue/{endpoint_id:path}", tags=["queue"])
    async def queue_submit(self, endpoint_id: str, request: Request):
        """Queue a request for any endpoint id; with `?fal_webhook=URL`, its outcome is POSTed
        there when it completes (signed; keys at /.well-known/jwks.json)."""
        body = await request.body()
        return await self.queue.submit(endpoint_id, body, request.headers, request.query_params, request.state.caller, _base_url(request))

    @api.get("/queue/{app:path}/requests/{request_id}/status/stream", tags=["queue"])
    async def queue_status_stream(self, app: str, request_id: str, request: Request, logs: str | None = None) -> StreamingResponse:
        """Server-sent status events until COMPLETED, with `: ping` comments in between."""
        events = await self.queue.status_stream(app_of(app), request_id, logs, request.state.caller, _base_url(request))
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @api.get("/queue/{app:path}/requests/{request_id}/status", tags=["queue"])
    async def queue_status(self, app: str, request_id: str, request: Request, logs: str | None = None):
        """202 while IN_QUEUE (with `queue_position`) or IN_PROGRESS, 200 once COMPLETED."""
        return await self.queue.status(app_of(app), request_id, logs, request.state.caller, _base_url(request))

    @api.put("/queue/{app:path}/requests/{request_id}/cancel", tags=["queue"])
    async def queue_cancel(self, app: str, request_id: str, request: Request):
        return await self.queue.cancel(app_of(app), request_id, request.state.caller)

    @api.get("/queue/{app:path}/requests/{request_id}", tags=["queue"])
    async def queue_result(self, app: str, request_id: str, request: Request):
        """The model's own status code and body; 400 while the request is not done."""
        return await self.queue.result(app_of(app), request_id, request.state.caller)

    @api.get("/.well-known/jwks.json", tags=["queue"])
    async def jwks(self) -> JSONResponse:
        """The public ED25519 keys webhook deliveries are signed with (a JWKS document)."""
        signer = await self.signing_keys.signer()
        return JSONResponse(signer.jwks(), headers={"Cache-Control": "public, max-age=300"})

    @api.get("/files/{name}", tags=["files"])
    async def file(self, name: str):
        """Generated files of the local store, by their unguessable names."""
        if isinstance(self.store, LocalFileStore):
            path = self.store.path(name)
            if path is not None:
                return FileResponse(path)
        return JSONResponse(status_code=404, content={"detail": "file not found"})

    @api.get("/health", tags=["operations"])
    async def health(self) -> dict[str, str]:
        return {"status": "ok", "profile": self.config.profile}
