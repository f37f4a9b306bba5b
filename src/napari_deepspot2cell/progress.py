"""Progress events shared by the command line, the widgets and the tests.

Long operations are generators: they ``yield Progress(...)`` and ``return`` their
result. The CLI drives them with a tqdm bar, the widgets in a napari
``thread_worker``, tests with :func:`run`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    stage: str  # e.g. "cells", "embedding cells", "prediction", "training"
    done: int
    total: int | None = None
    info: dict[str, Any] = field(default_factory=dict)  # e.g. epoch losses, device


Job = Generator[Progress, None, T]


def run(job: Job[T], on_event: Callable[[Progress], None] | None = None) -> T:
    """Drive a job generator to the end and return its result."""
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value
        if on_event is not None:
            on_event(event)


def delegate(job: Job[T], stage_prefix: str = "") -> Job[T]:
    """``result = yield from delegate(sub_job, "prefix ")``: re-yield a sub-job's events."""
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value
        if stage_prefix:
            event = Progress(stage_prefix + event.stage, event.done, event.total, event.info)
        yield event
