"""Application settings: one pydantic object, built from the Serve config's `args` and the environment.

Everything an operator can tune lives here as data: the profile (demo or production), model
aliases, limits on inputs, batching budgets, where output files go, which networks URL fetches may
reach. `serve run cluster/demo.yaml` passes the YAML `args` to `AppConfig.from_args`; environment
variables prefixed `DIFFUSION_SERVE_` (nested with `__`, e.g. `DIFFUSION_SERVE_LIMITS__MAX_PIXELS=1048576`)
fill in what the args leave unset, in each replica's own process: the args win, and an unset
setting may differ per node (`DIFFUSION_SERVE_WEIGHTS__CACHE_DIR`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serve_app.url_guard import NetworkPolicy

Architecture = Literal["sd", "sdxl"]
Profile = Literal["demo", "production"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelAlias(_Frozen):
    """An operator-defined name for a base model: `model_name: "my-model"` loads `source`."""

    source: str = Field(description="HF repo id, URL of a single-file .safetensors checkpoint, or local path")
    architecture: Architecture | None = None
    variant: str | None = None


class LcmModel(_Frozen):
    """What `fal-ai/lcm`'s `model` names: an LCM-distilled model, or a base model plus an LCM-LoRA."""

    source: str = Field(description="HF repo id, URL, local path or alias of the model")
    architecture: Architecture
    lcm_lora: str | None = Field(None, description="LCM-LoRA (HF repo id or URL) applied to a base model")


def _default_lcm_models() -> dict[str, LcmModel]:
    return {
        "sdv1-5": LcmModel(source="SimianLuo/LCM_Dreamshaper_v7", architecture="sd"),
        "sdxl": LcmModel(source="stabilityai/stable-diffusion-xl-base-1.0", architecture="sdxl", lcm_lora="latent-consistency/lcm-lora-sdxl"),
    }


class RealtimeSettings(_Frozen):
    """The realtime WebSocket (`/fal-ai/lcm/realtime`)."""

    idle_timeout_s: float = Field(60.0, description="a socket with no frame for this long is closed with TIMEOUT")
    default_max_buffering: int = Field(2, ge=1, le=60, description="frames kept while one is being served (newest win)")


STORE_PASSWORD_ENV = "DIFFUSION_SERVE_QUEUE__STORE_PASSWORD"


class QueueSettings(_Frozen):
    """fal's queue: where jobs are kept, how long a dispatcher's lease lasts, what may wait."""

    store_url: str = Field(
        "sqlite:///~/.cache/diffusion-serve/jobs.sqlite3",
        description="sqlite:///path (one node) or redis://host:6379/0 (a cluster; #prefix to share a server)",
    )
    store_password: SecretStr | None = Field(
        None, description=f"the Redis job store's password: from a Secret as ${STORE_PASSWORD_ENV}, not in the URL (the Serve config is not secret)"
    )
    lease_s: float = Field(30.0, gt=0, description="a job whose router stops renewing for this long is run again elsewhere")
    retention_s: float = Field(3600.0, gt=0, description="how long results are kept after completion (fal: 1 hour)")
    max_queued: int | None = Field(10_000, ge=1, description="jobs waiting, all keys together; past it submits get 429")
    max_queued_per_key: int | None = Field(1_000, ge=1, description="jobs one key may have waiting")
    max_running_per_key: int | None = Field(None, ge=1, description="jobs one key may have running at once")
    dispatch_slots: int = Field(
        64, ge=1, description="queued jobs each router replica runs at once: cover the model replicas' max_ongoing_requests x max_replicas"
    )
    max_attempts: int = Field(3, ge=1, description="runs a job gets when its router or model replica dies under it")
    poll_interval_s: float = Field(0.05, gt=0, description="how often an idle dispatcher looks for work")

    @field_serializer("store_password", when_used="json")
    def _reveal(self, secret: SecretStr | None) -> str | None:
        """The replicas get it through their init args, as they get the other secrets."""
        return secret.get_secret_value() if secret else None


class WebhookSettings(_Frozen):
    """`?fal_webhook=` deliveries: retried with growing delays, signed with ED25519."""

    max_attempts: int = Field(10, ge=1, le=100, description="tries per delivery (fal: 10)")
    retry_window_s: float = Field(7200.0, gt=0, description="the tries spread over this long, delays doubling (fal: 2 hours)")
    timeout_s: float = Field(15.0, gt=0, le=300, description="a receiver that takes longer fails that try")
    concurrency: int = Field(8, ge=1, description="deliveries each router replica makes at once")
    poll_interval_s: float = Field(0.2, gt=0, description="how often an idle deliverer looks for due deliveries")
    max_payload_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="larger results are announced with payload null and payload_error (fetch them instead)"
    )
    signing_keys: list[SecretStr] = Field(
        default_factory=list,
        description="base64 ED25519 private keys (`python -m serve_app.queue.webhooks new-key`): the first signs, all are "
        "published at /.well-known/jwks.json (rotation); default: one made once and kept in the job store",
    )

    @field_serializer("signing_keys", when_used="json")
    def _reveal(self, keys: list[SecretStr]) -> list[str]:
        """The deployments get the config as JSON: the keys must survive that trip (their repr stays masked)."""
        return [key.get_secret_value() for key in keys]


class ApiKey(_Frozen):
    """A client's key, known by its id; the key itself is never configured, only its sha256
    (`python -m serve_app.auth new ID` makes a key and this entry)."""

    id: str = Field(min_length=1, description="the key's name in logs and limits")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="hex sha256 of the key exactly as clients send it")
    requests_per_minute: float | None = Field(None, gt=0, description="this key's rate limit; default auth.default_requests_per_minute")


class AuthSettings(_Frozen):
    """Who may call. No keys and not open: every request is refused (401) until keys are set."""

    open: bool = Field(False, description="let every request in without a key (the demo profile's choice; never on a public address)")
    keys: list[ApiKey] = Field(default_factory=list)
    default_requests_per_minute: float | None = Field(None, gt=0, description="rate limit of keys without their own (one bucket per key, shared by the routers on the job store)")
    token_secret: SecretStr | None = Field(None, description="signs POST /tokens/ tokens; default derived from the key hashes")
    token_ttl_s: float = Field(120.0, gt=0, le=3600, description="lifetime of tokens when the request names none")

    @field_serializer("token_secret", when_used="json")
    def _reveal(self, secret: SecretStr | None) -> str | None:
        """The deployments get the config as JSON: the secret must survive that trip (its repr stays masked)."""
        return secret.get_secret_value() if secret else None


class Limits(_Frozen):
    """Bounds checked before any work reaches a GPU."""

    max_pixels: int = Field(2048 * 2048, description="largest width*height of an output image")
    max_input_image_bytes: int = 25 * 1024 * 1024
    max_input_image_pixels: int = 4096 * 4096
    max_images_per_request: int = 8
    max_loras: int = Field(16, description="LoRAs one request may combine")
    max_controlnets: int = Field(4, description="ControlNets one request may combine")
    max_ip_adapters: int = Field(4, description="IP-Adapters one request may combine")
    max_ip_adapter_images: int = Field(8, description="images one IP-Adapter entry may carry")
    max_config_bytes: int = Field(1024 * 1024, description="largest config.json a request may point at")
    request_timeout_s: float = Field(600.0, description="longest a sync request may wait for its images")


class Batching(_Frozen):
    """How compatible jobs are grouped into one pipeline call.

    A batch is closed when the next job would push its cost (pixels x steps, summed over images)
    past `max_cost`, when it holds `max_images` images, when it holds as many jobs as the previous
    batch of its kind (so an idle replica never waits), or `max_wait_ms` after its first job.
    """

    enabled: bool = True
    max_cost: float = Field(8 * 1024 * 1024 * 30, description="pixels x steps budget of one batch")
    max_images: int = 8
    max_wait_ms: float = 50.0


class FileStoreSettings(_Frozen):
    """Where generated images go. `local` serves them at GET /files/<name>; `s3` at its own URLs."""

    kind: Literal["local", "s3"] = "local"
    directory: Path = Path("~/.cache/diffusion-serve/files").expanduser()
    public_base_url: str | None = Field(
        None, description="base URL clients reach us at (behind a proxy); default: the request's own"
    )
    s3_bucket: str | None = None
    s3_prefix: str = "outputs/"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_public_base_url: str | None = Field(None, description="CDN/public URL of the bucket; else presigned URLs")
    s3_presign_ttl_s: int = 24 * 3600

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> FileStoreSettings:
        if self.kind == "s3" and not self.s3_bucket:
            raise ValueError("files.kind is 's3' but files.s3_bucket is not set")
        return self


class WeightsSettings(_Frozen):
    """Weights downloaded by URL (single-file checkpoints, adapters): node-local, validated cache."""

    cache_dir: Path = Path("~/.cache/diffusion-serve/weights").expanduser()
    max_cache_bytes: int = Field(200 * 1024**3, description="LRU budget of the cache on each node")
    max_file_bytes: int = Field(16 * 1024**3, description="largest single weights file accepted")
    download_timeout_s: float = 3600.0
    allow_pickle: bool = Field(False, description="load pickled .ckpt/.bin/.pt files (runs their code!)")


class DeviceSettings(_Frozen):
    """Precision on CUDA (CPU always runs float32), and CPU threads."""

    cuda_dtype: Literal["float16", "bfloat16"] = "float16"
    cpu_threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica on CPU; default Ray's")


class AppConfig(BaseSettings):
    """The whole application's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="DIFFUSION_SERVE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    profile: Profile = "demo"
    models: dict[str, ModelAlias] = Field(default_factory=dict, description="operator aliases")
    max_models_per_replica: int = Field(2, description="base models a replica keeps loaded (LRU)")
    max_loras_per_model: int = Field(32, description="LoRAs a loaded model keeps injected (LRU)")
    max_controlnets_per_model: int = Field(4, ge=1, description="ControlNets a loaded model keeps on its device (LRU)")
    max_routing_keys_per_replica: int = Field(
        64, description="base model + LoRA set combinations a replica advertises for affinity (LRU)"
    )
    safety_checker: str | None = Field(
        None, description="safety checker model; default: tiny stand-in (demo) or CompVis's (production)"
    )
    limits: Limits = Limits()
    batching: Batching = Batching()
    files: FileStoreSettings = FileStoreSettings()
    network: NetworkPolicy = Field(
        default_factory=NetworkPolicy, description="which addresses user URLs may reach: public ones only, unless listed"
    )
    device: DeviceSettings = DeviceSettings()
    weights: WeightsSettings = WeightsSettings()
    lcm_models: dict[str, LcmModel] = Field(default_factory=_default_lcm_models, description="fal-ai/lcm's `model` values")
    flux_model: str = Field("black-forest-labs/FLUX.1-dev", description="what fal-ai/flux-lora runs: HF id, local path or alias")
    realtime: RealtimeSettings = RealtimeSettings()
    auth: AuthSettings = AuthSettings()
    queue: QueueSettings = QueueSettings()
    webhooks: WebhookSettings = WebhookSettings()

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> AppConfig:
        """Build from a Serve config's `args` (init kwargs win over the environment)."""
        return cls(**(args or {}))

    @property
    def is_demo(self) -> bool:
        return self.profile == "demo"

    def safety_checker_source(self) -> str:
        if self.safety_checker:
            return self.safety_checker
        return "tiny:safety-checker" if self.is_demo else "CompVis/stable-diffusion-safety-checker"
