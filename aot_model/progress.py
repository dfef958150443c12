"""tqdm progress bars that stay readable in log files.

Off a terminal (CI logs, DVC, Prefect) every refresh of a tqdm bar becomes one more line of the log,
so a bar refreshed ten times a second buries everything else. :func:`progress_bar` refreshes at
most once a second on a terminal and once every 30 seconds elsewhere.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

TERMINAL_INTERVAL_S = 1.0
LOG_INTERVAL_S = 30.0


def progress_bar(**kwargs) -> tqdm:
    """A ``tqdm(**kwargs)`` bar whose refresh interval suits where it writes.

    ``mininterval`` (and ``maxinterval``, which tqdm's monitor thread would otherwise use to force
    a refresh every 10 s) default to :data:`TERMINAL_INTERVAL_S` when the bar's stream (``file``,
    else ``sys.stderr``) is a terminal and to :data:`LOG_INTERVAL_S` otherwise; ``dynamic_ncols``
    defaults to True. Explicit keyword arguments win.
    """
    stream = kwargs.get("file") or sys.stderr
    terminal = getattr(stream, "isatty", lambda: False)()
    interval = TERMINAL_INTERVAL_S if terminal else LOG_INTERVAL_S
    defaults = {"mininterval": interval, "maxinterval": max(interval, 10.0), "dynamic_ncols": True}
    return tqdm(**(defaults | kwargs))
