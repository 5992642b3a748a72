"""The one progress bar of the package: tqdm on a terminal, plain log lines elsewhere.

With stderr redirected to a file (SLURM logs, ``2> train.log``), tqdm's carriage-return redraws pile up as
one huge line; there ``progress_bar`` writes a plain line (the same text, no ``\\r``) at most every
``LOG_INTERVAL`` seconds, and a last one when the bar closes.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

ProgressBar = tqdm
LOG_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal


class PlainLines:
    """A stream for tqdm that turns each redraw (``\\r`` + text + padding) into one line of text."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()  # \x1b[A: tqdm's cursor-up for nested bars
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(*args, **kwargs)``, except that off a terminal it writes plain progress lines (see the module)."""
    stream = kwargs.get("file") or sys.stderr
    if not _terminal(stream) and not kwargs.get("disable"):
        kwargs.update(file=PlainLines(stream), mininterval=max(kwargs.get("mininterval", 0.1), LOG_INTERVAL),
                      dynamic_ncols=False, ncols=100, ascii=True)
    return tqdm(*args, **kwargs)
