"""Training-step throughput: images/s and achieved FLOP rate, beside this machine's fp32 matmul rate.

A step is what ``latentlm train`` does per optimizer update: forward (the model's own loss, with
``batch_mul`` head copies for LatentLM), backward, gradient clipping, AdamW, EMA update. FLOPs are
``latentlm.flops.training_flops`` (matmuls and attention, forward and backward; the rate columns use
it), printed beside ``torch.utils.flop_counter.FlopCounterMode``'s count of one step: the two agree
where torch counts attention (CUDA SDPA); on CPU, and with the flash-attn package, torch counts no
attention, so its number is the analytic matmul part. The optimizer and elementwise work are not
counted but are timed. On a known GPU, MFU is the achieved rate over its dense BF16 peak.

    .venv/bin/python benchmarks/training.py                 # tiny and Base Transformer, fp32, CPU
    .venv/bin/python benchmarks/training.py --models DiT-Base --batch 8 --device cuda --dtype bf16

Prints a markdown table. Latents are ImageNet-256-shaped (16 x 16 x 16, 1000 classes) unless
``--latent-size`` / ``--channels`` say otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from latentlm.flops import mfu, training_breakdown
from latentlm.models import get_config, model_from_config
from latentlm.training.model import param_groups


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Achieved FLOP/s of an n x n x n matmul (the best of ``reps``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, batch: int, steps: int, device: torch.device, dtype: torch.dtype, channels: int,
                latent_size: int) -> dict[str, float]:
    """Median time of ``steps`` training steps (after one warm-up step) of preset ``name``."""
    torch.manual_seed(0)
    cfg = get_config(name, in_channels=channels, input_size=latent_size, num_classes=1000)
    model = model_from_config(cfg).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1, decay_all=False), lr=1e-4, betas=(0.9, 0.98))
    latents = torch.randn(batch, channels, latent_size, latent_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            loss = model(latents, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1e-4)

    with FlopCounterMode(display=False) as counter:
        step()  # also the warm-up step
    analytic = training_breakdown(cfg, batch)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)  # the median resists other processes' bursts on a shared machine
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "step_s": seconds,
            "images_per_s": batch / seconds, "gflop_per_step": analytic.total / 1e9,
            "attention_gflop": analytic.attention / 1e9, "counter_gflop": counter.get_total_flops() / 1e9,
            "gflops": analytic.total / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["Transformer-Tiny", "Transformer-Base"])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 2], help="one per model, or one for all")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--latent-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    batches = args.batch * len(args.models) if len(args.batch) == 1 else args.batch
    peak = matmul_rate(device, dtype)
    results = [bench_model(name, batch, args.steps, device, dtype, args.channels, args.latent_size)
               for name, batch in zip(args.models, batches, strict=True)]
    peak = max(peak, matmul_rate(device, dtype))  # measured before and after, the better one counts
    print(f"device {device} ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.dtype}")
    print(f"matmul 2048^3 {args.dtype}: {peak / 1e9:.1f} GFLOP/s\n")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print("| model | params | batch | step (s) | images/s | GFLOP/step (of it attention) | FlopCounterMode GFLOP "
          "| achieved GFLOP/s | % of matmul rate | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, batch, r in zip(args.models, batches, results, strict=True):
        utilization = mfu(r["gflop_per_step"] * 1e9, r["step_s"], card)
        mfu_text = "n/a" if utilization is None else f"{100 * utilization:.1f}%"
        print(f"| {name} | {r['params_m']:.1f}M | {batch} | {r['step_s']:.3f} | {r['images_per_s']:.2f} | "
              f"{r['gflop_per_step']:.1f} ({r['attention_gflop']:.1f}) | {r['counter_gflop']:.1f} | "
              f"{r['gflops']:.1f} | {100 * r['gflops'] * 1e9 / peak:.0f}% | {mfu_text} |")


if __name__ == "__main__":
    main()
