"""fal's scheduler names -> diffusers schedulers, built from the loaded model's own config.

Each scheduler is `Class.from_config(model_default.config, **kwargs)`, so the model's training
schedule (betas, timestep count, offsets) carries over and only the sampling algorithm changes.
Instances are cheap but stateful (step index, solver history), so every pipeline call gets a new one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "DPM++ 2M": (DPMSolverMultistepScheduler, {}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler A": (EulerAncestralDiscreteScheduler, {}),
    "Euler (trailing timesteps)": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "LCM": (LCMScheduler, {}),
    "LCM (trailing timesteps)": (LCMScheduler, {"timestep_spacing": "trailing"}),
    "DDIM": (DDIMScheduler, {}),
    "TCD": (TCDScheduler, {}),
}


@dataclass(frozen=True)
class SchedulerChoice:
    name: str | None  # None: the model's own default
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False


def _accepts(scheduler_cls: type, argument: str) -> bool:
    return argument in inspect.signature(scheduler_cls.set_timesteps).parameters


def build_scheduler(default: SchedulerMixin, choice: SchedulerChoice) -> SchedulerMixin:
    """A fresh scheduler for one pipeline call."""
    cls, kwargs = (type(default), {}) if choice.name is None else SCHEDULERS[choice.name]
    overrides: dict[str, Any] = dict(kwargs, prediction_type=choice.prediction_type)
    if choice.rescale_betas_zero_snr:
        # Zero terminal SNR needs trailing timesteps to reach the final noise level.
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return cls.from_config(default.config, **overrides)


def unsupported_schedule_argument(
    default: SchedulerMixin, choice: SchedulerChoice, timesteps: bool, sigmas: bool
) -> str | None:
    """Which custom schedule ("timesteps"/"sigmas") the chosen scheduler cannot take, if any."""
    cls = type(default) if choice.name is None else SCHEDULERS[choice.name][0]
    for wanted, argument in ((timesteps, "timesteps"), (sigmas, "sigmas")):
        if wanted and not _accepts(cls, argument):
            return argument
    return None


def scheduler_label(default: SchedulerMixin, choice: SchedulerChoice) -> str:
    return choice.name or f"model default ({type(default).__name__})"
