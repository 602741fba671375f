"""SIGINT / SIGTERM as an exception that cleanup code cannot lose.

The CLI runs every command under :func:`raise_on_signals`: Ctrl-C and ``kill`` (SIGTERM) raise
:class:`Interrupted` in the main thread, so ``finally`` blocks and :func:`pi05_export.artifacts.staging_dir`
remove partial outputs, and the CLI exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM)
with one line. The signal is also recorded: an interrupt raised inside a ``__del__`` or a library's
cleanup callback is printed-and-ignored by Python, so :func:`check_interrupted` raises it again
before an output is committed. :func:`deferred_signals` holds signals back for the few renames that
commit an output, and delivers them afterwards.

Signal dispositions belong to the process, so the record does too (one per process, main thread only).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was stopped by ``signum``. A ``BaseException`` (like ``KeyboardInterrupt``), so
    ``except Exception`` in library code does not swallow it; the CLI exits with :attr:`exit_code`."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Record:
    """Signals received while :func:`raise_on_signals` is active, and whether delivery is deferred."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferring = 0

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if not self.deferring:
            raise Interrupted(signum)


_RECORD = _Record()


def _installed() -> bool:  # bound methods compare equal, never identical
    return any(signal.getsignal(s) == _RECORD.handler for s in SIGNALS)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (main thread; elsewhere a no-op)."""
    if not _main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    previous_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:  # an interrupt raised inside __del__: recorded, not printed as a traceback
        if not isinstance(unraisable.exc_value, Interrupted):
            previous_hook(unraisable)

    _RECORD.received = None
    sys.unraisablehook = hook
    for s in SIGNALS:
        if previous[s] is not signal.SIG_IGN:  # `nohup`, background jobs: an ignored signal stays ignored
            signal.signal(s, _RECORD.handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        sys.unraisablehook = previous_hook


def received() -> int | None:
    """The first signal received under :func:`raise_on_signals`, even if its exception was swallowed."""
    return _RECORD.received


def check_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal arrived, even one whose exception some cleanup code swallowed."""
    if _RECORD.received is not None and _installed():
        raise Interrupted(_RECORD.received)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT / SIGTERM back inside the block (a commit that must not stop half way); a signal that
    arrived meanwhile is delivered on exit: raised as :class:`Interrupted` under :func:`raise_on_signals`,
    else passed to the handler that was installed (Python's ``KeyboardInterrupt``, or the default action)."""
    if not _main_thread():
        yield
        return
    if _installed():
        _RECORD.deferring += 1
        try:
            yield
        finally:
            _RECORD.deferring -= 1
        check_interrupted()
        return
    held: list[int] = []
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        if previous[s] is not signal.SIG_IGN:
            signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
    if held:
        signal.raise_signal(held[0])  # the previous disposition acts now (KeyboardInterrupt, or terminate)
