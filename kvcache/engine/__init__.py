"""The batched engine (see :mod:`kvcache.engine.engine`): sequences, scheduler, runner, sampling."""

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
