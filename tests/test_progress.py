"""Tests for aot_model.progress: bars that do not flood log files."""

import io
import itertools

from aot_model.progress import LOG_INTERVAL_S, TERMINAL_INTERVAL_S, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_interval_follows_the_stream():
    with progress_bar(total=1, file=io.StringIO()) as log_bar:
        assert (log_bar.mininterval, log_bar.maxinterval) == (LOG_INTERVAL_S, LOG_INTERVAL_S)
    with progress_bar(total=1, file=Terminal()) as tty_bar:
        assert tty_bar.mininterval == TERMINAL_INTERVAL_S
    with progress_bar(total=1, file=io.StringIO(), mininterval=0.5) as explicit:
        assert explicit.mininterval == 0.5


def _refreshes(stream, seconds: int) -> int:
    """Redraws of a bar updated once per simulated second for ``seconds`` seconds."""
    clock = itertools.count()
    with progress_bar(total=seconds, file=stream, unit="img", unit_scale=True) as bar:
        bar._time = lambda: float(next(clock))  # tqdm's clock, per instance
        bar.start_t = bar.last_print_t = bar._time()
        for _ in range(seconds):
            bar.update(1)
    return stream.getvalue().count("\r")


def test_a_log_gets_one_line_per_interval_not_per_update():
    log = io.StringIO()
    assert _refreshes(log, 300) <= 300 / LOG_INTERVAL_S + 2  # plus the first and last redraw
    assert "300/300" in log.getvalue()
    assert _refreshes(Terminal(), 300) >= 300 / TERMINAL_INTERVAL_S / 2
