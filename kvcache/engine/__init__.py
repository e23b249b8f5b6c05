"""The batched engine (see :mod:`kvcache.engine.engine`): sequences, scheduler, runner, sampling.

The names below load on first use, so that importing the scheduler alone (the replay's simulated
workers run it) does not import torch and the model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvcache.engine.aio import AsyncEngine
    from kvcache.engine.engine import (
        Engine,
        EngineConfig,
        Generation,
        GenerationStep,
        PrefillTimings,
        RequestOutput,
        StepRecord,
    )
    from kvcache.engine.prefetch import PrefetchStats
    from kvcache.engine.sampling import SamplingParams
    from kvcache.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

_MODULES = {
    "AsyncEngine": "aio",
    "Engine": "engine",
    "EngineConfig": "engine",
    "Generation": "engine",
    "GenerationStep": "engine",
    "PrefillTimings": "engine",
    "RequestOutput": "engine",
    "StepRecord": "engine",
    "PrefetchStats": "prefetch",
    "SamplingParams": "sampling",
    "Scheduler": "scheduler",
    "SchedulerConfig": "scheduler",
    "SchedulerOutput": "scheduler",
}

__all__ = [
    "AsyncEngine",
    "Engine",
    "EngineConfig",
    "Generation",
    "GenerationStep",
    "PrefetchStats",
    "PrefillTimings",
    "RequestOutput",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "StepRecord",
]


def __getattr__(name: str) -> object:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcache.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kvcache.engine.{module}"), name)
