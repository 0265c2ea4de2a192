"""Wire schema of `POST /tokens/`, as fal's JS client sends it (`allowed_apps`: app aliases)."""

from __future__ import annotations

from pydantic import Field

from serve_app.schemas.common import InputModel


class TokenRequest(InputModel):
    allowed_apps: list[str] = Field(min_length=1, max_length=16, description="apps the token opens: `lcm` or `fal-ai/lcm`")
    token_expiration: float | None = Field(None, gt=0, le=3600, description="seconds; default auth.token_ttl_s")
