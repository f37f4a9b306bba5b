"""Run a core job (a generator of :class:`~napari_deepspot2cell.progress.Progress`) from a widget.

:func:`start_job` runs the generator in a napari ``thread_worker`` (a
``GeneratorWorker``) and, on the main thread:

- shows one napari ``progress`` bar per stage (counts, and tiles/s where the
  event gives ``info["tiles_per_s"]``), all closed when the job ends;
- calls ``on_result(value)`` with the job's return value, ``on_event(event)``
  per event;
- turns an :class:`~napari_deepspot2cell.errors.InputError` into one error
  notification with its one-line message, any other exception into an error
  notification too, logged with its traceback;
- refuses a second job while one runs (Predict and Train share one module-level
  slot): two jobs never interleave.

Cancel (:meth:`RunningJob.cancel`) stops the job at its next yield, which the
core jobs reach within one batch. The job generator is closed *in the worker
thread*, so its ``finally`` / ``GeneratorExit`` handlers run there (training
saves the best model so far). Note that superqt's ``GeneratorWorker.quit()``
alone would not do this: it leaves its loop without resuming or closing the
generator. So cancel asks the generator to stop itself at the next resume; a
bare ``quit()`` (napari's status-bar cancel) is still handled: the generator is
then closed on the main thread once the worker has let go of it.

For tests, ``SYNCHRONOUS = True`` (or ``start_job(..., synchronous=True)``)
drives the job on the calling thread with the same callbacks, as
stardist-napari does.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from ..errors import Cancelled, InputError
from ..progress import Progress

__all__ = [
    "BUSY_MESSAGE",
    "SYNCHRONOUS",
    "RunningJob",
    "current_job",
    "start_job",
]

log = logging.getLogger(__name__)

BUSY_MESSAGE = "another DeepSpot2Cell job is running; wait or cancel it"

#: run jobs on the calling thread (tests); the real thread otherwise
SYNCHRONOUS = False
#: how often the progress bars are redrawn while a job runs in its thread
BAR_INTERVAL_MS = 150

_slot_lock = threading.Lock()  # guards _current
_current: RunningJob | None = None


def current_job() -> RunningJob | None:
    """The job now running (from any widget), or None."""
    return _current


@dataclass
class _Outcome:
    kind: str  # "ok" | "cancelled" | "error"
    value: Any = None


class RunningJob:
    """One job started by :func:`start_job`: its worker, its progress bars, cancel."""

    def __init__(self, job: Generator, name: str, on_result, on_event, on_error, on_cancelled, on_finished):
        self.job = job
        self.name = name
        self._on_result = on_result
        self._on_event = on_event
        self._on_error = on_error
        self._on_cancelled = on_cancelled
        self._on_finished = on_finished
        self._cancel = threading.Event()
        self._bars: dict[str, Any] = {}
        self._queue: deque = deque()  # events not yet given to on_event
        self._latest: dict[str, Progress] = {}  # per stage, the event not yet drawn
        self._busy = False
        self._finish_requested = False
        self._timer = None
        self._outcome: _Outcome | None = None
        self._driver = self._drive()
        self.worker = None  # the GeneratorWorker (None when run synchronously)
        self.done = False
        self.status: str | None = None  # "ok" | "cancelled" | "error" once done
        self.result: Any = None
        self.error: BaseException | None = None

    # ---------------------------------------------------------------- worker side

    def _drive(self) -> Generator[Progress, None, _Outcome]:
        """Re-yield the job's events; stop at a cancel request; return the outcome (never raise)."""
        try:
            while True:
                if self._cancel.is_set():
                    self.job.close()  # GeneratorExit at the job's current yield, in this thread
                    return _Outcome("cancelled")
                try:
                    event = next(self.job)
                except StopIteration as stop:
                    return _Outcome("ok", stop.value)
                yield event
        except Cancelled:
            return _Outcome("cancelled")
        except Exception as exc:  # noqa: BLE001 - reported on the main thread
            return _Outcome("error", exc)
        finally:
            self.job.close()

    # ---------------------------------------------------------------- main thread side

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop at the job's next yield; nothing of its result is used."""
        self._cancel.set()

    def _event(self, event: Progress) -> None:
        self._queue.append(event)
        self._latest[str(event.stage)] = event
        self._pump()
        if self.worker is None:  # synchronous: nothing else would draw the bars
            self._flush_bars()

    def _pump(self) -> None:
        """Hand queued events to ``on_event`` in order; finish once nothing else is running.

        napari's progress bars process Qt events whenever they change (setValue,
        setDescription, a new bar), which delivers queued worker signals
        re-entrantly. So bars are drawn from a timer, never from here, and a
        ``finished`` that arrives during a bar update waits until it is over.
        """
        if self._busy:
            return
        self._busy = True
        try:
            while self._queue:
                e = self._queue.popleft()
                if not self.done and self._on_event is not None:
                    self._on_event(e)
        finally:
            self._busy = False
        if self._finish_requested and not self.done:
            self._finish()

    def _flush_bars(self) -> None:
        """Draw the latest count of every stage (a timer tick, or each event when synchronous)."""
        if self._busy or self.done or not self._latest:
            return
        self._busy = True
        try:
            latest, self._latest = self._latest, {}
            for event in latest.values():
                self._update_bar(event)
        except Exception:
            log.debug("progress bar update failed", exc_info=True)
        finally:
            self._busy = False
        self._pump()  # what arrived meanwhile, and a finish that waited

    def _update_bar(self, event: Progress) -> None:
        from napari.utils import progress

        stage = str(event.stage)
        total = None if event.total is None else int(event.total)
        done = int(event.done)
        rate = (event.info or {}).get("tiles_per_s")
        desc = f"{self.name}: {stage}"
        desc += f" {done}/{total}" if total else f" {done}"
        if rate:
            desc += f" ({float(rate):.1f} tiles/s)"
        bar = self._bars.get(stage)
        if bar is None:
            bar = progress(total=total or 0, desc=desc)
            self._bars[stage] = bar
        elif total is not None and bar.total != total:
            bar.total = total
        if done != bar.n:
            bar.update(done - bar.n)
        bar.set_description(desc)

    def _returned(self, outcome) -> None:
        self._outcome = outcome if isinstance(outcome, _Outcome) else _Outcome("ok", outcome)

    def _errored(self, exc: BaseException) -> None:  # only for what _drive could not catch
        self._outcome = _Outcome("error", exc)

    def _finished(self) -> None:
        """The worker has let go of the job (main thread)."""
        self._finish_requested = True
        self._pump()

    def _finish(self) -> None:
        """Close the job, report, free the slot."""
        global _current
        if self.done:
            return
        self.done = True
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        try:
            self._driver.close()  # closes the job too, where a bare quit() left it open
        except Exception:
            log.warning("the %s job failed while closing", self.name, exc_info=True)
        for bar in self._bars.values():
            try:
                bar.close()
            except Exception:
                log.debug("closing a progress bar failed", exc_info=True)
        self._bars.clear()
        outcome = self._outcome or _Outcome("cancelled")
        if outcome.kind == "ok" and self._cancel.is_set():
            outcome = _Outcome("cancelled")  # the job ended on its own after the press: still cancelled
        self.status = outcome.kind
        with _slot_lock:
            if _current is self:
                _current = None
        try:
            if outcome.kind == "ok":
                self.result = outcome.value
                if self._on_result is not None:
                    self._on_result(outcome.value)
            elif outcome.kind == "cancelled":
                if self._on_cancelled is not None:
                    self._on_cancelled()
            else:
                self.error = outcome.value
                _report(self.name, outcome.value)
                if self._on_error is not None:
                    self._on_error(outcome.value)
        except Exception as exc:  # noqa: BLE001 - adding the results failed: say so, keep the trace
            self.status, self.error = "error", exc
            _report(self.name, exc)
        finally:
            if self._on_finished is not None:
                self._on_finished(self)

    # ---------------------------------------------------------------- starting

    def _start_thread(self) -> None:
        from napari.qt.threading import create_worker

        def drive():
            return (yield from self._driver)

        from qtpy.QtCore import QTimer

        worker = create_worker(drive, _start_thread=False, _ignore_errors=True)
        self._timer = QTimer()
        self._timer.setInterval(BAR_INTERVAL_MS)
        self._timer.timeout.connect(self._flush_bars)
        self._timer.start()
        worker.yielded.connect(self._event)
        worker.returned.connect(self._returned)
        worker.errored.connect(self._errored)
        worker.finished.connect(self._finished)
        self.worker = worker
        worker.start()

    def _run_here(self) -> None:
        while True:
            try:
                event = next(self._driver)
            except StopIteration as stop:
                self._returned(stop.value)
                break
            self._event(event)
        self._finished()


def _report(name: str, exc: BaseException) -> None:
    from napari.utils.notifications import show_error

    if isinstance(exc, InputError):
        log.info("%s: %s", name, exc)
        show_error(str(exc))
        return
    log.error("the %s job failed", name, exc_info=(type(exc), exc, exc.__traceback__))
    show_error(f"{name} failed: {type(exc).__name__}: {' '.join(str(exc).split())} (the traceback is in the log)")


def start_job(
    job: Generator,
    *,
    name: str = "DeepSpot2Cell",
    on_result: Callable[[Any], None] | None = None,
    on_event: Callable[[Progress], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_cancelled: Callable[[], None] | None = None,
    on_finished: Callable[[RunningJob], None] | None = None,
    synchronous: bool | None = None,
) -> RunningJob | None:
    """Start ``job`` (a generator, not yet started) unless another job runs.

    Returns the :class:`RunningJob`, or None when refused (an error
    notification says why and ``job`` is closed unstarted). Callbacks run on
    the main thread; ``on_finished`` always runs last.
    """
    global _current
    from napari.utils.notifications import show_error

    with _slot_lock:
        busy = _current is not None
        if not busy:
            running = RunningJob(job, name, on_result, on_event, on_error, on_cancelled, on_finished)
            _current = running
    if busy:
        job.close()
        show_error(BUSY_MESSAGE)
        return None
    sync = SYNCHRONOUS if synchronous is None else synchronous
    try:
        if sync:
            running._run_here()
        else:
            running._start_thread()
    except BaseException:
        with _slot_lock:
            if _current is running:
                _current = None
        raise
    return running
