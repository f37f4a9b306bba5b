"""Small helpers the GUI tests share: a grid of square cells, waiting on a job, napari's notifications."""

import numpy as np


def grid_cells(rows=4, cols=6, side=40, gap=10, id_step=1):
    """A label image of rows x cols square cells (ids id_step, 2 * id_step, ...) and their centres."""
    labels = np.zeros((rows * (side + gap) + gap, cols * (side + gap) + gap), np.int32)
    centres = {}
    k = 0
    for i in range(rows):
        for j in range(cols):
            k += 1
            y0, x0 = gap + i * (side + gap), gap + j * (side + gap)
            labels[y0 : y0 + side, x0 : x0 + side] = k * id_step
            centres[k * id_step] = (y0 + side / 2, x0 + side / 2)
    return labels, centres


def wait_done(qtbot, running, timeout=60000):
    assert running is not None
    qtbot.waitUntil(lambda: running.done, timeout=timeout)


def n_notes():
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


def notes_since(n):
    from napari.utils.notifications import notification_manager

    return [str(r.message) for r in notification_manager.records[n:]]
