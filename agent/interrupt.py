"""SIGTERM (`talosctl service ... restart`, `systemctl restart`) and SIGINT (Ctrl-C): stop
at the next safe point, release the Lease, exit 128 + the signal's number."""

from __future__ import annotations

import _thread
import signal
import threading
from types import FrameType

requested = threading.Event()  # set once a stop was asked for: no new requests from here
_asked = False  # the same, set by the signal handler itself
_signum = signal.SIGTERM
_sleepers: set[threading.Event] = set()  # sleeps that also end on something else


class Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    def __init__(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum  # the shell's convention: 143 SIGTERM, 130 SIGINT
        super().__init__(f"stopped by {self.signal_name}; re-run to finish")


def _stop(signum: int, _frame: FrameType | None) -> None:
    # The first signal stops the run; later ones must not break the clean-up it does. No
    # exception is raised here: raised between any two bytecodes it can leave a lock
    # half-released ("cannot release un-acquired lock"). Nor is a lock taken: the main
    # thread may hold it (an Event's, in the middle of a wait), and it would wait for itself.
    # So the sleeps are woken from a thread of its own; every request and wait attempt
    # checks `_asked` first.
    for other in (signal.SIGTERM, signal.SIGINT):
        signal.signal(other, signal.SIG_IGN)
    global _signum, _asked
    _signum = signal.Signals(signum)
    _asked = True
    _thread.start_new_thread(_wake_sleepers, ())


def _wake_sleepers() -> None:
    requested.set()
    for woken in list(_sleepers):
        woken.set()


def install() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)


def check() -> None:
    """Stop before the next request or attempt, once a stop was asked for."""
    if _asked:
        raise Interrupted(_signum) from None


def sleep(seconds: float, woken: threading.Event | None = None) -> None:
    """A retry's sleep that ends early when a stop is asked for, or when `woken` is set."""
    if woken is None:
        requested.wait(seconds)
    else:
        _sleepers.add(woken)  # before looking at `requested`: _wake_sleepers sets it first
        try:
            if not requested.is_set():
                woken.wait(seconds)
        finally:
            _sleepers.discard(woken)
    check()
