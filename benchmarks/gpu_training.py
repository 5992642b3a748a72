"""Training on one GPU: correctness of the scale switches, throughput and MFU, memory against the planner, FSDP.

Prepared for one H100/H200 session of under 8 minutes (``bash benchmarks/gpu_training.sh``); every phase checks
the time left first and records what it skipped. ``--dry`` runs the same code on the CPU at tiny sizes
(Transformer-Tiny / DiT-Tiny, fp32; ``torch.compile`` with the "eager" backend, which traces but does not
generate kernels) to check the script end to end in under two minutes.

1. ``checks``, each a PASS/FAIL line, on the device in fp32 (TF32 off), both families: activation checkpointing
   gives the loss and gradients of the plain model; the compiled loss and gradients equal eager (Inductor told
   to draw torch's random numbers). In bf16 autocast: Transformer-Medium's loss and gradients are finite, and
   at depth 2 its compiled loss matches eager.
2. ``medium``: training steps as the trainer does them (bf16 autocast, the model's loss, backward, clipping,
   fused AdamW, EMA) of Transformer-Medium and DiT-Medium at batch 64, eager and compiled. Per row: images/s,
   counted TFLOP/s (``latentlm.flops.training_flops``), MFU against the card's dense bf16 peak
   (``latentlm.flops.peak_tflops``: 989.4 TFLOP/s for H100/H200 SXM), peak allocated memory and the planner's
   estimate of it (``plan_memory`` peak less its DDP buckets and fixed overhead, which one GPU without DDP
   does not allocate). A compiled row's untimed warm-up steps include compiling.
3. ``fsdp``: a 1-GPU ``latentlm train --strategy fsdp`` run through the real loop (tiny model, bf16, AC),
   stopped at step 2 and resumed to 4 from its sharded checkpoint, against 4 steps straight (max weight
   difference; exact on a deterministic device), and the same run with ``--compile`` against eager. Then
   Transformer-3B sharded with FSDP (one process: all state on this GPU, as it would be per GPU on
   ``world_size`` = 1) with activation checkpointing, bf16 units with fp32 reduction: a few steps at
   ``big_batch``, peak memory recorded beside the planner's.
   ``big-batch``: batch 256, which fills the card (Transformer-Medium compiled + AC; DiT-Medium compiled,
   and compiled + AC).
4. ``ac`` / ``base``: compiled + AC at batch 64 (the price of recomputation), DiT-Medium eager at 256, then
   the Base presets eager and compiled.

Results: a table on stdout and ``$OUT/benchmarks/results/<date>-<card>-training.json`` (``"training"`` rows in
the schema of issue 10).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gpu_generation import Session, environment, max_diff, sync
from latentlm.config import DataConfig, TokenizerConfig, TrainConfig
from latentlm.distributed import Distributed
from latentlm.flops import mfu, peak_tflops, training_flops
from latentlm.memory import GiB, plan_memory
from latentlm.models import get_config, model_from_config
from latentlm.training import sharding
from latentlm.training.loop import Precision, update_ema
from latentlm.training.model import make_optimizer, train

SIZES = {  # what each mode runs; dry is the same code on the CPU at tiny sizes
    "real": dict(device="cuda", mixed="bf16", channels=16, latent=16, classes=1000, backend="inductor",
                 medium=("Transformer-Medium", "DiT-Medium"), base=("Transformer-Base", "DiT-Base"),
                 batches=(64, 256), steps=8, warmup=3, big="Transformer-3B", big_batch=32, overrides={}),
    "dry": dict(device="cpu", mixed="no", channels=4, latent=4, classes=10, backend="eager",
                medium=("Transformer-Tiny", "DiT-Tiny"), base=("Transformer-Tiny", "DiT-Tiny"),
                batches=(2, 4), steps=2, warmup=1, big="Transformer-Tiny", big_batch=2,
                overrides=dict(depth=2, hidden_size=64, num_heads=4)),
}
VARIANTS = {"eager": (False, False), "compile": (True, False), "compile+ac": (True, True)}  # (compile, AC)


def preset(size: dict, name: str, **extra: Any) -> Any:
    return get_config(name, in_channels=size["channels"], input_size=size["latent"], num_classes=size["classes"],
                      **{**size["overrides"], **extra})


def free_memory() -> None:
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / GiB if dev.type == "cuda" else None


# ---------------------------------------------------------------------------------------------
# 1. Correctness
# ---------------------------------------------------------------------------------------------


def loss_and_grads(model, loss_fn, dev: torch.device, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(123)
    c, h = model.config.in_channels, model.config.input_size
    latents = torch.randn(4, c, h, h, generator=g).to(dev)
    labels = torch.randint(0, model.config.num_classes, (4,), generator=g).to(dev)
    torch.manual_seed(1)
    with autocast():
        loss = loss_fn(latents, labels).float()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def grad_error(a: dict, b: dict) -> float:
    """Largest gradient difference relative to that gradient's scale."""
    return max(max_diff(a[n], b[n]) / max(a[n].abs().max().item(), 1e-12) for n in a)


def correctness(s: Session, size: dict) -> None:
    dev = torch.device(size["device"])
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for name in ("Transformer-Tiny", "DiT-Tiny"):
        torch.manual_seed(0)
        model = model_from_config(preset(size, name, depth=2, hidden_size=64, num_heads=4)).to(dev).train()
        loss, grads = loss_and_grads(model, model, dev)
        model.set_activation_checkpointing(True)
        loss_ac, grads_ac = loss_and_grads(model, model, dev)
        err = grad_error(grads, grads_ac)
        s.check(f"{name} AC = no AC", torch.allclose(loss, loss_ac, rtol=1e-6) and err < 1e-5,
                f"loss {loss.item():.6f} vs {loss_ac.item():.6f}, max relative gradient difference {err:.2e}")
        model.set_activation_checkpointing(False)
        with torch._inductor.config.patch(fallback_random=True):
            loss_c, grads_c = loss_and_grads(model, torch.compile(model, dynamic=False, backend=size["backend"]), dev)
        err = grad_error(grads, grads_c)
        s.check(f"{name} compiled = eager", torch.allclose(loss, loss_c, rtol=1e-4) and err < 1e-3,
                f"loss {loss.item():.6f} vs {loss_c.item():.6f}, max relative gradient difference {err:.2e}")
        free_memory()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bf16 = Precision(size["mixed"], dev).autocast
    for depth in (None, 2):  # the preset (eager), then its width at depth 2 (compiled too: a quick compile)
        torch.manual_seed(0)
        model = model_from_config(preset(size, size["medium"][0], **({"depth": depth} if depth else {})))
        model = model.to(dev).train()
        loss, grads = loss_and_grads(model, model, dev, bf16)
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads.values())
        if depth is None:
            s.check(f"{size['medium'][0]} ({size['mixed']} autocast) loss and gradients finite", finite,
                    f"loss {loss.item():.5f}")
        else:
            with torch._inductor.config.patch(fallback_random=True):
                loss_c, _ = loss_and_grads(model, torch.compile(model, dynamic=False, backend=size["backend"]), dev,
                                           bf16)
            s.check(f"{size['medium'][0]} (depth 2, {size['mixed']} autocast) compiled = eager",
                    finite and abs(loss.item() - loss_c.item()) <= 2e-2 * abs(loss.item()),
                    f"eager {loss.item():.5f}, compiled {loss_c.item():.5f}")
        del model, grads
        free_memory()


# ---------------------------------------------------------------------------------------------
# 2. FSDP: the loop on one GPU; Transformer-3B fits
# ---------------------------------------------------------------------------------------------


def image_folder(root: Path, classes: int = 3, per_class: int = 8, side: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / f"class{c}/{i}.png")
    return root


def fsdp_loop(s: Session, size: dict, tmp: Path) -> None:
    data = image_folder(tmp / "data")
    base = TrainConfig(model=get_config("Transformer-Tiny", depth=2, hidden_size=64, num_heads=4),
                       data=DataConfig(path=str(data), image_size=16, num_workers=0),
                       tokenizer=TokenizerConfig(patch=4, norm_images=24), max_steps=4, batch_size=8,
                       grad_accum_steps=2, lr=1e-3, warmup_steps=1, mixed_precision=size["mixed"], strategy="fsdp",
                       activation_checkpointing=True, checkpoint_every=100, sample_every=0, log_every=100,
                       progress=False, tensorboard=False, cpu=size["device"] == "cpu")
    straight = train(dataclasses.replace(base, output_dir=str(tmp / "straight")))
    train(dataclasses.replace(base, output_dir=str(tmp / "resumed"), stop_at_step=2))
    resumed = train(dataclasses.replace(base, output_dir=str(tmp / "resumed"), resume="auto"))
    a = sharding.full_state_dict(straight.model)
    b = sharding.full_state_dict(resumed.model)
    diff = max(max_diff(a[k], b[k]) for k in a)
    files = sorted(p.name for p in (tmp / "resumed" / "checkpoints").glob("*/sharded/*"))
    s.check("FSDP 1-GPU stop at 2 + resume = 4 straight", diff < 1e-3 and resumed.step == 4,
            f"max weight difference {diff:.3g}; losses {straight.losses} vs {resumed.losses}; shard files {files}")
    if size["backend"] != "inductor":  # the trainer compiles with Inductor: minutes for C++ kernels on a CPU
        s.skipped.append("FSDP + --compile (dry: Inductor on a CPU)")
        return
    with torch._inductor.config.patch(fallback_random=True):  # the same random draws as eager
        compiled = train(dataclasses.replace(base, output_dir=str(tmp / "compiled"), compile=True))
    torch._dynamo.reset()
    gap = max(abs(x - y) / abs(x) for x, y in zip(straight.losses, compiled.losses, strict=True))
    s.check("FSDP + --compile trains like FSDP eager", gap < 2e-2 if size["mixed"] == "bf16" else gap < 1e-4,
            f"largest relative loss difference over 4 steps {gap:.2e}")


def fsdp_big(s: Session, size: dict) -> None:
    """The biggest preset sharded (one process), AC on, a few steps: does it fit, and at what peak."""
    dev = torch.device(size["device"])
    dist = Distributed(rank=0, world_size=1, local_rank=0, device=dev)
    cfg, batch = preset(size, size["big"]), size["big_batch"]
    with torch.device(dev):
        torch.manual_seed(0)
        model = model_from_config(cfg)
    model.set_activation_checkpointing(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    model, ema = sharding.shard(model, dist, size["mixed"]), sharding.shard(ema, dist, None)
    train_cfg = TrainConfig(model=cfg)
    optimizer = make_optimizer(model, train_cfg, dev)
    clip = functools.partial(sharding.clip_grad_norm, model, 1.0)
    step = make_step(model, model, optimizer, ema, dev, size, batch, clip=clip)
    row = measure(s, step, dev, size, cfg, batch, compiled=False, ac=True, strategy="fsdp")
    s.rows.append(row)
    del model, ema, optimizer, step, clip
    free_memory()


# ---------------------------------------------------------------------------------------------
# 3. Throughput
# ---------------------------------------------------------------------------------------------


def make_step(model, loss_fn, optimizer, ema, dev: torch.device, size: dict, batch: int, clip=None):
    """One training step as ``ModelTrainer.train_step`` does it, on fixed random latents."""
    cfg = model.config
    latents = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=dev)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=dev)
    precision = Precision(size["mixed"], dev)
    clip = clip or (lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))

    def step() -> torch.Tensor:
        with precision.autocast():
            loss = loss_fn(latents, labels).float()
        loss.backward()
        clip()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9999)
        return loss.detach()

    return step


def measure(s: Session, step, dev: torch.device, size: dict, cfg, batch: int, compiled: bool, ac: bool,
            strategy: str) -> dict[str, Any]:
    for _ in range(size["warmup"]):  # includes compiling
        loss = step()
    sync(dev)
    start = time.perf_counter()
    for _ in range(size["steps"]):
        loss = step()
    sync(dev)
    seconds = (time.perf_counter() - start) / size["steps"]
    flops = training_flops(cfg, batch)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    capacity = torch.cuda.get_device_properties(dev).total_memory / GiB if dev.type == "cuda" else 80.0
    plan = plan_memory(cfg, 1, batch, strategy=strategy, activation_checkpointing=ac, mixed_precision=size["mixed"],
                       gpu_memory_gb=capacity)
    row = {"model": cfg.name, "batch": batch, "compile": compiled, "activation_checkpointing": ac,
           "strategy": strategy, "images_per_s": round(batch / seconds, 1), "step_s": round(seconds, 4),
           "tflops": round(flops / seconds / 1e12, 1), "mfu": mfu(flops, seconds, card),
           "peak_memory_gb": peak_gb(dev),
           "planned_memory_gb": round((plan.peak - plan.buffers - plan.overhead) / GiB, 2),
           "loss": round(float(loss), 4)}
    print(f"train {json.dumps(row)}", flush=True)
    return row


def throughput_row(s: Session, size: dict, name: str, batch: int, variant: str) -> None:
    dev = torch.device(size["device"])
    compiled, ac = VARIANTS[variant]
    free_memory()
    torch.manual_seed(0)
    cfg = preset(size, name)
    model = model_from_config(cfg).to(dev).train()
    model.set_activation_checkpointing(ac)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = make_optimizer(model, TrainConfig(model=cfg), dev)
    loss_fn = torch.compile(model, dynamic=False, backend=size["backend"]) if compiled else model
    try:
        s.rows.append(measure(s, make_step(model, loss_fn, optimizer, ema, dev, size, batch), dev, size, cfg, batch,
                              compiled, ac, "ddp"))
    except torch.OutOfMemoryError:
        s.rows.append({"model": name, "batch": batch, "compile": compiled, "activation_checkpointing": ac,
                       "strategy": "ddp", "oom": True, "peak_memory_gb": peak_gb(dev)})
        print(f"[OOM] {name} batch {batch} {variant}", flush=True)
    finally:
        del model, ema, optimizer, loss_fn
        free_memory()


def rows_phase(plan: list[tuple[int, str, int, str]]):
    """A phase of throughput rows: (estimated seconds, preset slot, batch slot, variant) each."""

    def phase(s: Session, size: dict) -> None:
        for seconds, slot, batch_slot, variant in plan:
            name = size[slot.split(":")[0]][int(slot.split(":")[1])]
            batch = size["batches"][batch_slot]
            if s.has(seconds if not s.dry else 1, f"{name} batch {batch} {variant}"):
                s.guarded(f"{name} batch {batch} {variant}", throughput_row, s, size, name, batch, variant)
                s.extra["save"]()  # every row on disk as soon as it is measured

    return phase


def fsdp_phase(s: Session, size: dict) -> None:
    if s.has(40, "FSDP loop on one GPU"):
        with tempfile.TemporaryDirectory() as tmp:
            s.guarded("FSDP loop", fsdp_loop, s, size, Path(tmp))
    if s.has(60, f"{size['big']} FSDP + AC"):
        s.guarded(f"{size['big']} FSDP + AC", fsdp_big, s, size)


def checks(s: Session, size: dict) -> None:
    if s.has(60, "checks"):
        s.guarded("checks", correctness, s, size)


# (estimated seconds, preset slot, batch slot, variant); a compiled row's estimate is mostly compiling
MEDIUM = [(20, "medium:0", 0, "eager"), (100, "medium:0", 0, "compile"), (20, "medium:1", 0, "eager"),
          (90, "medium:1", 0, "compile")]
# Batch 256 fills the card: Transformer-Medium needs AC to fit 141 GB (the planner: 144 GiB without, 43 GiB
# with); DiT-Medium fits either way (85 / 17 GiB)
BIG_BATCH = [(100, "medium:0", 1, "compile+ac"), (90, "medium:1", 1, "compile"), (90, "medium:1", 1, "compile+ac")]
AC = [(100, "medium:0", 0, "compile+ac"), (90, "medium:1", 0, "compile+ac"), (30, "medium:1", 1, "eager")]
BASE = [(15, "base:0", 0, "eager"), (60, "base:0", 0, "compile"), (15, "base:1", 0, "eager"),
        (60, "base:1", 0, "compile")]
# In order of priority; --phases picks some (a second session can run what a first one skipped).
PHASES = {"checks": checks, "medium": rows_phase(MEDIUM), "fsdp": fsdp_phase, "big-batch": rows_phase(BIG_BATCH),
          "ac": rows_phase(AC), "base": rows_phase(BASE)}


# ---------------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------------


def write_results(s: Session, env: dict[str, Any], out: Path, command: str) -> Path:
    date = datetime.date.today().isoformat()
    card = re.sub(r"[^a-z0-9]+", "-", env["card"].lower()).strip("-") + ("-dry" if s.dry else "")
    result = {"card": env["card"], "date": date, "torch": env["torch"], "driver": env["driver"], "cuda": env["cuda"],
              "command": command, "dry": s.dry, "peak_tflops": peak_tflops(env["card"]),
              "mfu_basis": "counted matmul + attention FLOPs (latentlm.flops.training_flops) over the card's dense "
                           "BF16 peak (989.4 TFLOP/s for H100/H200 SXM)",
              "training": s.rows, "checks": s.checks, "skipped": s.skipped, "errors": s.errors,
              "seconds": round(time.perf_counter() - s.start, 1)}
    path = out / "benchmarks" / "results" / f"{date}-{card}-training.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| model | batch | strategy | compile | AC | images/s | TFLOP/s | MFU | peak GiB | planned GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['model']} | {r['batch']} | {r['strategy']} | {r['compile']} | {r['activation_checkpointing']} "
                  "| OOM | | | | |")
            continue
        mfu_text = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        peak = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        print(f"| {r['model']} | {r['batch']} | {r['strategy']} | {r['compile']} | {r['activation_checkpointing']} | "
              f"{r['images_per_s']} | {r['tflops']} | {mfu_text} | {peak} | {r['planned_memory_gb']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU: check the script end to end")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="results go to OUT/benchmarks/results/")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting phases after this many seconds")
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES), help="what to run")
    args = parser.parse_args()
    size = SIZES["dry" if args.dry else "real"]
    dev = torch.device(size["device"])
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_training needs a CUDA device (or --dry)")
    s, env = Session(args.budget_s, args.dry), environment(dev)
    print(f"# {json.dumps(env)}", flush=True)
    command = " ".join(["python", *sys.argv])
    s.extra["save"] = functools.partial(write_results, s, env, Path(args.out), command)  # a killed run keeps its rows
    for name in args.phases:
        PHASES[name](s, size)
        path = s.extra["save"]()
    print_table(s.rows)
    failed = [c["name"] for c in s.checks if not c["ok"]]
    print(f"\nwrote {path}; {len(s.checks) - len(failed)} checks passed, failed: {failed}, errors: {s.errors}, "
          f"skipped: {s.skipped}, {time.perf_counter() - s.start:.0f} s", flush=True)
    sys.exit(1 if failed or s.errors else 0)


if __name__ == "__main__":
    main()
