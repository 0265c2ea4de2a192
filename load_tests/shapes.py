"""Load shapes for the locustfile: a step load and a spike, each read from the environment.

Locust runs the first `LoadTestShape` it finds in a locustfile's namespace and offers no
headless option to pick another, so these live here, out of that namespace; the locustfile
binds the one `LOAD_SHAPE` names. Times are seconds since the shape started.

  step   LOAD_STEP_USERS (2) more users every LOAD_STEP_S (30) up to LOAD_STEP_MAX_USERS (10),
         held for LOAD_STEP_HOLD_S (60), then stop
  spike  LOAD_SPIKE_BASE_USERS (2) for LOAD_SPIKE_AT_S (30), LOAD_SPIKE_USERS (20) at once for
         LOAD_SPIKE_S (30), the baseline again for LOAD_SPIKE_RECOVER_S (60), then stop
"""

from __future__ import annotations

import math
import os

from locust import LoadTestShape


def env_number(name: str, default: float, *, positive: bool = False) -> float:
    """`name` from the environment as a number >= 0 (> 0 if `positive`); a typo ends the run."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected a number") from None
    if value < 0 or (positive and value == 0):
        raise SystemExit(f"{name}={raw!r}: expected a number {'>' if positive else '>='} 0")
    return value


class StepLoad(LoadTestShape):
    """Adds users in equal steps, so each plateau shows what that many users get."""

    def __init__(self) -> None:
        super().__init__()
        self.step_users = int(env_number("LOAD_STEP_USERS", 2, positive=True))
        self.step_s = env_number("LOAD_STEP_S", 30, positive=True)
        self.max_users = int(env_number("LOAD_STEP_MAX_USERS", 10, positive=True))
        self.hold_s = env_number("LOAD_STEP_HOLD_S", 60)
        self.full_at_s = (math.ceil(self.max_users / self.step_users) - 1) * self.step_s

    def tick(self) -> tuple[int, float] | None:
        run_time = self.get_run_time()
        if run_time >= self.full_at_s + self.hold_s:
            return None
        users = min(self.max_users, self.step_users * (int(run_time // self.step_s) + 1))
        return users, self.step_users  # a step's users start within a second


class SpikeLoad(LoadTestShape):
    """A steady baseline, a sudden burst, then the baseline again: does the cluster recover?"""

    def __init__(self) -> None:
        super().__init__()
        self.base_users = int(env_number("LOAD_SPIKE_BASE_USERS", 2))
        self.spike_users = int(env_number("LOAD_SPIKE_USERS", 20, positive=True))
        self.spike_at_s = env_number("LOAD_SPIKE_AT_S", 30)
        self.spike_end_s = self.spike_at_s + env_number("LOAD_SPIKE_S", 30)
        self.end_s = self.spike_end_s + env_number("LOAD_SPIKE_RECOVER_S", 60)

    def tick(self) -> tuple[int, float] | None:
        run_time = self.get_run_time()
        if run_time >= self.end_s:
            return None
        users = self.spike_users if self.spike_at_s <= run_time < self.spike_end_s else self.base_users
        return users, self.spike_users  # the whole spike arrives (and leaves) within a second


SHAPES: dict[str, type[LoadTestShape]] = {"step": StepLoad, "spike": SpikeLoad}
