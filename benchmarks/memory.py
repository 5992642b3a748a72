"""Per-GPU training memory of every preset from the analytic planner (``latentlm.memory``): DDP vs FSDP,
with and without activation checkpointing. No model is built; runs in well under a second.

    .venv/bin/python benchmarks/memory.py                           # 8 x 80 GiB, batch 256, bf16
    .venv/bin/python benchmarks/memory.py --gpus 16 --batch 1024 --grad-accum 2 --models Transformer-3B

Prints a markdown table (sizes in GiB per GPU) and, per preset, the analytic training FLOPs per image.
"""

from __future__ import annotations

import argparse

from latentlm.flops import training_flops
from latentlm.memory import format_plan, plan_memory
from latentlm.models import get_config, list_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list_models())
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256, help="global images per optimizer step")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="bf16")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GiB per GPU")
    args = parser.parse_args()
    plans = []
    for name in args.models:
        cfg = get_config(name)
        for strategy in ("ddp", "fsdp"):
            for ac in (False, True):
                plans.append(plan_memory(cfg, args.gpus, args.batch, args.grad_accum, strategy, ac,
                                         args.mixed_precision, args.gpu_memory_gb))
    print(f"{args.gpus} GPUs x {args.gpu_memory_gb:g} GiB, batch {args.batch}, grad accum {args.grad_accum}, "
          f"{args.mixed_precision}; sizes in GiB per GPU\n")
    print(format_plan(plans))
    print("\n| model | training TFLOP per image (fwd + bwd) |\n|---|---|")
    for name in args.models:
        print(f"| {name} | {training_flops(get_config(name), 1) / 1e12:.3f} |")


if __name__ == "__main__":
    main()
