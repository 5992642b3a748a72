"""Shared pieces of the trainer/checkpoint/CLI tests, and a script for their subprocesses.

As a module: a generated ImageFolder of coloured squares, tiny training configs, state comparison.
As a script (``python tests/train_helpers.py MODE OUT_DIR DATA_DIR ...``), run by the tests in a fresh
process:

* ``sigkill``: trains through ``latentlm.cli.main`` and, while writing its second checkpoint, creates
  ``OUT_DIR/ready`` and hangs until the test kills it with SIGKILL.
* ``sigterm``: trains through ``latentlm.cli.main``; when it draws micro-batch ``PAUSE_AT`` it creates
  ``OUT_DIR/ready`` and waits for ``OUT_DIR/go`` (the test sends SIGTERM first, then creates it).
* ``ddp``: under ``torchrun``: trains a few steps and writes each process's final weights to
  ``OUT_DIR/final-rank<r>.safetensors``.
* ``fsdp``: under ``torchrun``: FSDP straight, FSDP stopped and resumed, DDP; whole states to ``OUT_DIR/<run>.pt``.
* ``fsdp-one``: one process resumes the ``fsdp`` mode's sharded step-3 checkpoint; then bf16 FSDP vs DDP.
* ``fsdp-compiled``: one process, FSDP + AC eager and with ``--compile``; their losses to ``OUT_DIR/compiled.pt``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import latentlm
from latentlm.config import DataConfig, TokenizerConfig, TrainConfig
from latentlm.models import get_config

SRC_DIR = Path(latentlm.__file__).resolve().parents[1]
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 70, 230)]
TINY_MODEL = {"depth": 1, "hidden_size": 32, "num_heads": 2}


def make_image_folder(root: Path, per_class: int = 7, size: int = 8, seed: int = 0) -> Path:
    """root/class{c}/{i}.png: a coloured square at a random place on black, one colour per class."""
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(COLOURS):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = np.zeros((size, size, 3), np.uint8)
            x, y = rng.integers(0, size // 2, 2)
            image[y:y + size // 2, x:x + size // 2] = colour
            Image.fromarray(image).save(folder / f"{i}.png")
    return root


def tiny_config(out: Path, data: Path, preset: str = "Transformer-Tiny", **overrides) -> TrainConfig:
    """A run that takes well under a second per step on one CPU thread: 21 images of 8x8, batch 4 in
    2 micro-batches (so 10 micro-batches per epoch), depth 1, D 32."""
    values = dict(
        output_dir=str(out), model=get_config(preset, **TINY_MODEL),
        data=DataConfig(path=str(data), image_size=8, num_workers=0), tokenizer=TokenizerConfig(norm_images=64),
        max_steps=7, batch_size=4, grad_accum_steps=2, lr=1e-3, warmup_steps=2, mixed_precision="no",
        checkpoint_every=100, sample_every=0, log_every=100, progress=False, tensorboard=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def cli_args(out: Path, data: Path, *extra: str) -> list[str]:
    """``latentlm train`` flags for the same run as ``tiny_config``."""
    return ["train", "--output-dir", str(out), "--model.name", "Transformer-Tiny", "--model.depth", "1",
            "--model.hidden-size", "32", "--model.num-heads", "2", "--data.path", str(data),
            "--data.image-size", "8", "--data.num-workers", "0", "--tokenizer.norm-images", "64",
            "--max-steps", "7", "--batch-size", "4", "--grad-accum-steps", "2", "--lr", "1e-3",
            "--warmup-steps", "2", "--mixed-precision", "no", "--checkpoint-every", "100", "--sample-every", "0",
            "--log-every", "100", "--no-progress", "--no-tensorboard", *extra]


def subprocess_env() -> dict[str, str]:
    """Environment for test subprocesses: the package importable, one thread, no Hub calls."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def assert_states_equal(a: dict, b: dict, what: str) -> None:
    """Nested dicts/lists of tensors and numbers are equal (tensors by ``torch.equal``)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{what} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{what}: keys differ"
        for k in a:
            assert_states_equal(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{what}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_states_equal(x, y, f"{what}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{what}: {a} != {b}"  # NaN == NaN here


def wait_for(path: Path, proc, timeout: float = 60.0) -> None:
    """Wait until ``path`` exists; fail early with the subprocess output if it exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"subprocess exited with {proc.returncode} before {path.name}:\n{out}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Subprocess modes
# ---------------------------------------------------------------------------------------------

def signal_at_pause(proc, out: Path, signum: int) -> str:
    """Send ``signum`` to a helper process paused at ``out/ready``, let it go on (``out/go``), and return
    its output once it exits (killed if it has not within 60 s)."""
    try:
        wait_for(out / "ready", proc)
        proc.send_signal(signum)
        (out / "go").touch()
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return output


PAUSE_AT = 4  # sigterm mode: the first micro-batch of step 3 (2 micro-batches per step)


def _sigkill(out: Path, data: Path) -> None:
    from latentlm import checkpoint, cli

    original = checkpoint.write_torch
    calls = {"n": 0}

    def write_torch_then_hang(path, obj):
        original(path, obj)
        if path.name == "optimizer.pt":
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint is half written: weights yes, marker no
                (out / "ready").touch()
                time.sleep(600)

    checkpoint.write_torch = write_torch_then_hang
    cli.main(cli_args(out / "run", data, "--checkpoint-every", "2"))


def _sigterm(out: Path, data: Path) -> None:
    from latentlm import cli
    from latentlm.training import loop

    original = loop.ShardedBatchSampler.__iter__

    def iterate_with_pause(self):
        for m, batch in enumerate(original(self), start=self.start):
            if m == PAUSE_AT:
                (out / "ready").touch()
                deadline = time.monotonic() + 30
                while not (out / "go").exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
            yield batch

    loop.ShardedBatchSampler.__iter__ = iterate_with_pause
    cli.main(cli_args(out / "run", data, "--max-steps", "5", "--checkpoint-every", "100"))


def _ddp(out: Path, data: Path) -> None:
    from safetensors.torch import save_file

    from latentlm.training.model import train

    cfg = tiny_config(out / "run", data, max_steps=3, batch_size=8, grad_accum_steps=2, checkpoint_every=2)
    result = train(cfg)
    rank = int(os.environ["RANK"])
    weights = {f"model.{k}": v for k, v in result.model.state_dict().items()}
    weights.update({f"ema.{k}": v for k, v in result.ema.state_dict().items()})
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(out / f"final-rank{rank}.safetensors"))
    (out / f"losses-rank{rank}.txt").write_text(repr(result.losses))


def full_states(result) -> dict[str, dict]:
    """A finished run's weights, EMA and AdamW state, whole and keyed by parameter name (every process must call
    this under FSDP: it gathers; the first process gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(result.model, options=options),
            "ema": get_model_state_dict(result.ema, options=options),
            "optimizer": get_optimizer_state_dict(result.model, result.optimizer, options=options)}


def fsdp_config(out: Path, data: Path, strategy: str = "fsdp", **overrides) -> TrainConfig:
    """The 2-process FSDP/DDP comparison run: 5 steps of 8 images in 2 micro-batches, AC on."""
    values = dict(max_steps=5, batch_size=8, grad_accum_steps=2, strategy=strategy, activation_checkpointing=True,
                  checkpoint_every=100)
    return tiny_config(out, data, **{**values, **overrides})


def _fsdp(out: Path, data: Path) -> None:
    """Under ``torchrun``: FSDP 5 steps straight; FSDP stopped at step 3 and resumed to 5; DDP 5 steps. The first
    process saves each run's whole weights, EMA and optimizer state as ``<run>.pt``."""
    from latentlm.training.model import train

    runs = {"fsdp": fsdp_config(out / "fsdp", data, sample_every=5),  # a grid from the gathered EMA at the end
            "fsdp-stopped": fsdp_config(out / "resumed", data, stop_at_step=3),
            "fsdp-resumed": fsdp_config(out / "resumed", data, resume="auto"),
            "ddp": fsdp_config(out / "ddp", data, strategy="ddp")}
    for name, cfg in runs.items():
        result = train(cfg)
        states = full_states(result)
        if int(os.environ["RANK"]) == 0:
            torch.save({**states, "losses": result.losses}, out / f"{name}.pt")


def _fsdp_one_process(out: Path, data: Path) -> None:
    """One process resumes the 2-process FSDP run's step-3 checkpoint (DCP reshards) for 0 steps, then 2 more;
    then FSDP and DDP train 3 steps in bf16."""
    from latentlm.training.model import train

    step3 = str(out / "resumed" / "checkpoints" / "step-00000003")
    torch.save(full_states(train(fsdp_config(out / "one", data, resume=step3, stop_at_step=3))), out / "one-step3.pt")
    result = train(fsdp_config(out / "one", data, resume=step3))
    torch.save({"step": result.step, "losses": result.losses}, out / "one-step5.pt")
    # bf16: FSDP gathers bf16 units and reduces in fp32; DDP runs fp32 weights under autocast
    bf16 = {s: train(fsdp_config(out / f"bf16-{s}", data, strategy=s, mixed_precision="bf16", max_steps=3))
            for s in ("fsdp", "ddp")}
    torch.save({s: {"losses": r.losses, "dtypes": sorted({str(p.dtype) for p in r.model.parameters()})}
                for s, r in bf16.items()}, out / "one-bf16.pt")


def _fsdp_compiled(out: Path, data: Path) -> None:
    """One process: FSDP + AC 3 steps eager, then with ``--compile`` (Inductor drawing torch's random numbers)."""
    from latentlm.training.model import train

    eager = train(fsdp_config(out / "eager", data, max_steps=3))
    with torch._inductor.config.patch(fallback_random=True):
        compiled = train(fsdp_config(out / "compiled", data, max_steps=3, compile=True))
    torch.save({"eager": eager.losses, "compiled": compiled.losses}, out / "compiled.pt")


if __name__ == "__main__":
    mode, out_dir, data_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    modes = {"sigkill": _sigkill, "sigterm": _sigterm, "ddp": _ddp, "fsdp": _fsdp, "fsdp-one": _fsdp_one_process,
             "fsdp-compiled": _fsdp_compiled}
    modes[mode](out_dir, data_dir)
