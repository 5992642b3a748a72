"""KV-cached LatentLM generation vs re-running the backbone over the whole prefix for every token.

Prints a table: model, tokens L, seconds for both methods, their ratio, and tokens/s of the cached
method. The head's solver work (steps x 2 for CFG) is identical in both; only the backbone differs.

    .venv/bin/python benchmarks/generation.py                       # tiny + Base, L = 64 and 256
    .venv/bin/python benchmarks/generation.py --models Transformer-Medium DiT-Medium --lengths 256 \
        --batch 64 --device cuda --dtype bf16 --skip-naive          # the GPU comparison with DiT

For large models on CPU the full-prefix method is quadratic and slow; ``--naive-positions K``
times K evenly spaced tokens and integrates (cost per token is linear in the prefix length), which
the table marks ``est.``.

``--fused`` prints a second table instead: the reference path (``sampler.fused="off"``) against the
fused path (``"on"``: ``FusedHeadSolve`` + ``torch.compile`` of the solve and of the backbone step), at
each ``--batches`` size. The first fused call per batch size compiles and is not timed; then the two
paths alternate ``--repeats`` times (interleaved, so a busy machine slows both alike) and the medians
are compared:

    .venv/bin/python benchmarks/generation.py --fused --lengths 64 --batches 1 8 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

from latentlm import SamplerConfig, build_model
from latentlm.diffusion import guidance_combine, sample
from latentlm.models.generation import SampleNoise

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def naive_token_time(model, labels, sampler: SamplerConfig, position: int) -> float:
    """Seconds for token ``position`` of the full-prefix method: one backbone pass over
    ``position + 1`` inputs, then the head's guided solver run for that token."""
    cfg, device = model.config, labels.device
    dtype = next(model.parameters()).dtype
    stream = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
    prefix = torch.randn(stream.shape[0], position + 1, cfg.token_dim, device=device, dtype=dtype)
    noise = SampleNoise(0, range(labels.shape[0]))

    def step() -> None:
        cond = model.forward_parallel(prefix, stream)[:, -1]  # (2N, D)

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = model.head(torch.cat([x_t, x_t]), torch.cat([t, t]), cond)
            return guidance_combine(*out.chunk(2), sampler.cfg_scale)

        sample(model.process, denoise, noise.randn((cfg.token_dim,), device=device, dtype=dtype), sampler)

    return timed(step, device)


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    sampler = SamplerConfig(num_steps=args.steps, cfg_scale=args.cfg, fused="off")  # the cache alone
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", {args.dtype}, batch {args.batch}, {args.steps} DPM-Solver++ steps, CFG {args.cfg}")
    print("| model | L | KV cache (s) | full prefix (s) | speed-up | images/s (cached) | tokens/s (cached) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for L in args.lengths:
            side = int(math.isqrt(L))
            torch.manual_seed(0)
            model = build_model(name, input_size=side, num_classes=1000).to(device=device, dtype=dtype).eval()
            labels = torch.arange(args.batch, device=device) % 1000
            model.generate(labels[:1], SamplerConfig(num_steps=1, cfg_scale=args.cfg, fused="off"))  # warm-up
            cached = timed(lambda m=model, y=labels: m.generate(y, sampler), device)
            naive_cell, speedup = "—", "—"
            if not args.skip_naive and model.config.family == "latentlm":
                k = args.naive_positions or L
                positions = sorted({round(i * (L - 1) / max(k - 1, 1)) for i in range(k)})
                times = [naive_token_time(model, labels, sampler, p) for p in positions]
                naive = sum(times) / len(times) * L  # mean token cost x L (exact when k = L)
                naive_cell = f"{naive:.2f}" + (" est." if len(positions) < L else "")
                speedup = f"{naive / cached:.2f}x"
            print(f"| {name} | {L} | {cached:.2f} | {naive_cell} | {speedup} | {args.batch / cached:.2f} "
                  f"| {args.batch * L / cached:.1f} |", flush=True)


def run_fused(args: argparse.Namespace) -> None:
    """Median seconds of generate with fused "off" and "on", interleaved, after an untimed compiling call."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, device {device}, {args.dtype}, {args.steps} DPM-Solver++ steps, CFG {args.cfg}, "
          f"{args.repeats} interleaved repeats (medians)")
    print("| model | L | batch | reference (s) | fused (s) | speed-up | fused images/s | compile + first call (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for L in args.lengths:
            torch.manual_seed(0)
            model = build_model(name, input_size=int(math.isqrt(L)), num_classes=1000).to(device, dtype).eval()
            for batch in args.batches:
                labels = torch.arange(batch, device=device) % 1000
                samplers = {mode: SamplerConfig(num_steps=args.steps, cfg_scale=args.cfg, fused=mode)
                            for mode in ("off", "on")}
                first = timed(lambda m=model, y=labels, s=samplers["on"]: m.generate(y, s), device)  # compiles
                times: dict[str, list[float]] = {"off": [], "on": []}
                for _ in range(args.repeats):
                    for mode in ("off", "on"):
                        times[mode].append(timed(lambda m=model, y=labels, s=samplers[mode]: m.generate(y, s), device))
                ref, fused = (statistics.median(times[m]) for m in ("off", "on"))
                print(f"| {name} | {L} | {batch} | {ref:.2f} | {fused:.2f} | {ref / fused:.2f}x | {batch / fused:.2f} "
                      f"| {first:.1f} |", flush=True)
            torch.compiler.reset()  # the next model compiles afresh (and this one's graphs are freed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["Transformer-Tiny", "Transformer-Base"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 256], help="tokens L (a square)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--skip-naive", action="store_true", help="time only the KV-cached method")
    parser.add_argument("--naive-positions", type=int, default=0,
                        help="time this many evenly spaced tokens of the full-prefix method (0: all)")
    parser.add_argument("--fused", action="store_true", help="reference vs fused generation instead (see above)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="--fused: batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="--fused: interleaved timed runs per path")
    args = parser.parse_args()
    for L in args.lengths:
        if math.isqrt(L) ** 2 != L:
            parser.error(f"--lengths {L}: must be a square (a side x side latent grid)")
    run_fused(args) if args.fused else run(args)


if __name__ == "__main__":
    main()
