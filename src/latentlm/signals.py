"""Stop signals of the training commands: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) all end a run with exit code 3.

A preemption can come at any moment, so the handlers are installed first thing (``latentlm.cli`` installs
them before it imports torch; ``train`` / ``train_tokenizer`` hold them for their whole body):

* Outside the step loop (start-up: data listing, normalization fitting, model building; and the end of a
  run) a signal raises ``StopRequested`` at once. Nothing written there needs finishing: the newest complete
  checkpoint (if any) is intact and a rerun with ``--resume auto`` redoes the rest.
* Inside the step loop (``StopSignals.deferred``) a signal only sets ``received``: the loop finishes the
  step in flight, writes a checkpoint and stops. A signal during a checkpoint write is acted on right after
  it. A second Ctrl-C raises ``KeyboardInterrupt`` at once: abort without saving (exit code 130).

Torch-free, so the command line can install it before the heavy imports.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

EXIT_INTERRUPTED = 3  # stopped by a signal; the newest complete checkpoint is consistent: rerun with --resume auto
EXIT_ABORTED = 130  # a second Ctrl-C: stopped at once, nothing saved after the newest complete checkpoint
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequested(BaseException):
    """A stop signal arrived outside the step loop. A ``BaseException`` (like ``KeyboardInterrupt``), so no
    ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal_name(signum)} before the first step or after the last one; "
                         "nothing needed saving: continue with --resume auto")


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a stop signal"


class StopSignals:
    """The handlers for the duration of a ``with`` block (main thread only; elsewhere inert)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferred = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if not self._deferred:
            raise StopRequested(signum)
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            if signum == signal.SIGINT:
                print("Ctrl-C: finishing this step and writing a checkpoint (Ctrl-C again aborts without saving)",
                      file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[StopSignals]:
        """Within: signals only set ``received`` (the step loop checks it at step boundaries)."""
        previous, self._deferred = self._deferred, True
        try:
            yield self
        finally:
            self._deferred = previous

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
