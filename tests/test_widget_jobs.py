"""The widgets' job runner: real threads, progress bars, cancel, errors, one job at a time."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from napari_deepspot2cell.errors import InputError
from napari_deepspot2cell.progress import Progress

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("no_job_left_running")]


def _records_since(n):
    from napari.utils.notifications import notification_manager

    return notification_manager.records[n:]


def _n_records():
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


class Probe:
    """A job generator that records where and how it ran and was closed."""

    def __init__(self, steps=5, delay=0.0, fail=None, gate=None):
        self.steps, self.delay, self.fail, self.gate = steps, delay, fail, gate
        self.threads: set[str] = set()
        self.closed_in: str | None = None
        self.exited = False
        self.reached = 0

    def job(self):
        try:
            for i in range(self.steps):
                self.threads.add(threading.current_thread().name)
                if self.gate is not None:
                    self.gate.wait(10)
                if self.delay:
                    time.sleep(self.delay)
                if self.fail is not None and i == 2:
                    raise self.fail
                self.reached = i + 1
                yield Progress("embedding cells", i + 1, self.steps, {"tiles_per_s": 12.5})
            return "the result"
        except GeneratorExit:
            self.exited = True
            raise
        finally:
            self.closed_in = threading.current_thread().name


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def _wait_done(qtbot, running, timeout=10000):
    qtbot.waitUntil(lambda: running.done, timeout=timeout)


def test_real_thread_runs_reports_progress_and_returns(viewer, qtbot):
    from napari.utils import progress

    from napari_deepspot2cell.widgets import jobs

    hold = threading.Event()

    def job():
        for i in range(4):
            if i == 2:
                hold.wait(10)  # the job waits here until the bar was seen
            yield Progress("embedding cells", i + 1, 4, {"tiles_per_s": 12.5})
        yield Progress("prediction", 1, 1)
        return threading.current_thread().name

    events, results = [], []
    running = jobs.start_job(job(), name="test job", on_event=events.append, on_result=results.append)
    assert running is not None and running.worker is not None

    def bar():
        return [b for b in progress._all_instances if b.desc.startswith("test job: embedding cells")]

    # one bar for the stage, with counts and the rate, drawn while the job runs
    qtbot.waitUntil(lambda: bool(bar()) and "2/4" in bar()[0].desc, timeout=10000)
    b = bar()[0]
    assert b.n == 2 and b.total == 4 and "12.5 tiles/s" in b.desc
    with qtbot.waitSignal(running.worker.finished, timeout=10000):
        hold.set()
    qtbot.waitUntil(lambda: running.done, timeout=5000)
    assert running.status == "ok"
    assert [(e.stage, e.done) for e in events] == [("embedding cells", i) for i in (1, 2, 3, 4)] + [("prediction", 1)]
    assert results and results[0] != threading.main_thread().name  # the job ran in the worker thread
    assert not [b for b in progress._all_instances if "test job" in b.desc]  # bars closed at the end
    assert jobs.current_job() is None


def test_cancel_closes_the_generator_in_the_worker_thread(viewer, qtbot):
    from napari_deepspot2cell.widgets import jobs

    probe = Probe(steps=1000, delay=0.01)
    results, cancelled = [], []
    running = jobs.start_job(probe.job(), on_result=results.append, on_cancelled=lambda: cancelled.append(True))
    qtbot.waitUntil(lambda: probe.reached >= 2, timeout=10000)
    with qtbot.waitSignal(running.worker.finished, timeout=10000):
        running.cancel()
    qtbot.waitUntil(lambda: running.done, timeout=5000)
    assert running.status == "cancelled" and cancelled == [True] and results == []
    assert probe.exited and probe.reached < 1000
    assert probe.closed_in is not None and probe.closed_in != threading.main_thread().name
    assert jobs.current_job() is None


def test_bare_quit_still_closes_the_job(viewer, qtbot):
    """napari's status-bar cancel calls worker.quit(): the job is closed all the same."""
    from napari_deepspot2cell.widgets import jobs

    probe = Probe(steps=1000, delay=0.01)
    running = jobs.start_job(probe.job())
    qtbot.waitUntil(lambda: probe.reached >= 1, timeout=10000)
    running.worker.quit()
    _wait_done(qtbot, running)
    assert running.status == "cancelled" and probe.exited
    assert jobs.current_job() is None


def test_second_job_is_refused_while_one_runs(viewer, qtbot):
    from napari_deepspot2cell.widgets import jobs

    gate = threading.Event()
    first = Probe(steps=3, gate=gate)
    second = Probe(steps=3)
    n = _n_records()
    running = jobs.start_job(first.job())
    refused = jobs.start_job(second.job())
    assert refused is None and second.threads == set()  # the second never ran a step
    msgs = [str(r.message) for r in _records_since(n)]
    assert jobs.BUSY_MESSAGE in msgs
    gate.set()
    _wait_done(qtbot, running)
    # once the first is done, a new job runs
    again = jobs.start_job(Probe(steps=2).job())
    assert again is not None
    _wait_done(qtbot, again)
    assert again.status == "ok"


def test_input_error_is_one_notification_line(viewer, qtbot):
    from napari.utils.notifications import NotificationSeverity

    from napari_deepspot2cell.widgets import jobs

    n = _n_records()
    errors = []
    probe = Probe(steps=5, fail=InputError("/data/model.ckpt", "not a DeepSpot2Cell\n checkpoint"))
    running = jobs.start_job(probe.job(), on_error=errors.append)
    _wait_done(qtbot, running)
    new = _records_since(n)
    assert running.status == "error" and len(errors) == 1
    assert [str(r.message) for r in new] == ["/data/model.ckpt: not a DeepSpot2Cell checkpoint"]
    assert new[0].severity == NotificationSeverity.ERROR
    assert jobs.current_job() is None


def test_other_errors_notify_and_log_the_traceback(viewer, qtbot, caplog):
    from napari_deepspot2cell.widgets import jobs

    n = _n_records()
    probe = Probe(steps=5, fail=ZeroDivisionError("boom"))
    with caplog.at_level(logging.ERROR, logger="napari_deepspot2cell.widgets.jobs"):
        running = jobs.start_job(probe.job(), name="test job")
        _wait_done(qtbot, running)
    msgs = [str(r.message) for r in _records_since(n)]
    assert len(msgs) == 1 and "ZeroDivisionError: boom" in msgs[0] and "test job" in msgs[0]
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and logged[-1].exc_info[0] is ZeroDivisionError


def test_synchronous_mode_runs_on_the_calling_thread(qtbot, monkeypatch):
    from napari_deepspot2cell.widgets import jobs

    monkeypatch.setattr(jobs, "SYNCHRONOUS", True)
    probe = Probe(steps=3)
    results = []
    running = jobs.start_job(probe.job(), on_result=results.append)
    assert running.done and running.worker is None and results == ["the result"]
    assert probe.threads == {threading.current_thread().name}

    # a cancel from an event handler stops the job at its next yield
    probe = Probe(steps=100)

    def on_event(e):
        if e.done == 3:
            jobs.current_job().cancel()

    running = jobs.start_job(probe.job(), on_event=on_event)
    assert running.status == "cancelled" and probe.reached == 3 and probe.exited
    assert jobs.current_job() is None
