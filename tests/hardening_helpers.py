"""A script for the subprocesses of ``test_hardening.py``: ``python tests/hardening_helpers.py MODE OUT DATA``.

It trains the tiny run of ``train_helpers.cli_args`` through ``latentlm.cli.main`` (so exit codes are the
command line's), pausing at one moment: it creates ``OUT/ready`` there and waits (up to 60 s) for
``OUT/go``, so a test can signal it or start a second writer at exactly that moment.

* ``import``: before the command's module (and ``train``) is even imported: only the command line's
  handlers are installed.
* ``startup``: while the latent normalization is being fitted (before the first step).
* ``step``: while drawing micro-batch 4 (inside step 3).
* ``save``: while writing the first checkpoint (step 2), after its optimizer file.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from train_helpers import cli_args


def pause(out: Path) -> None:
    (out / "ready").touch()
    deadline = time.monotonic() + 60
    while not (out / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _import(out: Path) -> None:
    from latentlm import cli

    command = cli.COMMANDS["train"]

    def run_after_pause(cfg):
        pause(out)
        return command.run(cfg)

    cli.COMMANDS["train"] = cli.Command(command.config, run_after_pause, command.help)


def _startup(out: Path) -> None:
    from latentlm.training import model

    fit = model.fit_normalization

    def fit_after_pause(*args, **kwargs):
        pause(out)
        return fit(*args, **kwargs)

    model.fit_normalization = fit_after_pause


def _step(out: Path) -> None:
    from latentlm.training import loop

    original = loop.ShardedBatchSampler.__iter__

    def iterate_with_pause(self):
        for m, batch in enumerate(original(self), start=self.start):
            if m == 4:
                pause(out)
            yield batch

    loop.ShardedBatchSampler.__iter__ = iterate_with_pause


def _save(out: Path) -> None:
    from latentlm import checkpoint

    original = checkpoint.write_torch

    def write_then_pause(path, obj):
        original(path, obj)
        if path.name == "optimizer.pt" and path.parent.name == "step-00000002":
            pause(out)

    checkpoint.write_torch = write_then_pause


if __name__ == "__main__":
    mode, out_dir, data_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    {"import": _import, "startup": _startup, "step": _step, "save": _save}[mode](out_dir)
    from latentlm import cli

    cli.main(cli_args(out_dir / "run", data_dir, "--max-steps", "5", "--checkpoint-every", "2", *sys.argv[4:]))
