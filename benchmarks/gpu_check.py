"""Correctness on CUDA (fp32 and bf16) and LatentLM-vs-DiT generation throughput on one GPU.

Run on a GPU machine (no install needed beyond torch; the package is read from ``src/``):

    PYTHONPATH=src python3 benchmarks/gpu_check.py

Checks (each prints PASS/FAIL with the measured number):
  * KV-cached conditions equal teacher-forced ones (fp32 tol 1e-4, bf16 tol 5e-2 relative to scale),
    with plain and grouped-query attention;
  * generation is bit-identical on rerun and batch-independent (fp32, < 1e-4);
  * the CUDA solver trajectory agrees with the CPU one in fp32;
  * bf16 autocast training steps of a small model reduce the loss.
Then the throughput table: images/s of Transformer-Medium (also with GQA) and DiT-Medium at 256
tokens, 20 DPM-Solver++ steps, CFG on, batch 64 to 512, in bf16, LatentLM eager and with CUDA graphs.
"""

from __future__ import annotations

import sys
import time

import torch

from latentlm import SamplerConfig, build_model

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def kv_vs_parallel(dev: torch.device, dtype: torch.dtype, **overrides) -> float:
    torch.manual_seed(0)
    model = build_model("Transformer-Tiny", num_classes=10, **overrides).to(dev, dtype).eval()
    cfg = model.config
    tokens = torch.randn(4, cfg.seq_len, cfg.token_dim, device=dev, dtype=dtype)
    labels = torch.tensor([0, 3, 7, 10], device=dev)
    with torch.no_grad():
        par = model.forward_parallel(tokens, labels).float()
        caches = model.new_cache(4, dev, dtype)
        rec = [model.forward_recurrent(labels, 0, caches)]
        for i in range(1, cfg.seq_len):
            rec.append(model.forward_recurrent(tokens[:, i - 1], i, caches))
    rec_t = torch.stack(rec, 1).float()
    return ((par - rec_t).abs().max() / par.abs().max()).item()


def correctness(dev: torch.device) -> None:
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)]:
        for extra in [{}, {"num_kv_heads": 2}, {"patch_size": 2}]:
            err = kv_vs_parallel(dev, dtype, **extra)
            check(f"kv-cache {str(dtype)[6:]} {extra or 'mha'}", err < tol, f"max rel diff {err:.2e} (tol {tol})")

    for name in ["Transformer-Tiny", "DiT-Tiny"]:
        torch.manual_seed(0)
        model = build_model(name, num_classes=10, input_size=8, in_channels=4).to(dev).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        s = SamplerConfig(num_steps=8, cfg_scale=2.0, fused="off")
        labels = torch.tensor([3, 1, 2], device=dev)
        a, b = model.generate(labels, s, seed=7), model.generate(labels, s, seed=7)
        check(f"{name} rerun bit-identical", torch.equal(a, b), f"max diff {(a - b).abs().max().item():.1e}")
        c = model.generate(torch.tensor([5, 1, 7, 0], device=dev), s, seed=7, sample_indices=[10, 1, 11, 12])
        diff = (c[1] - a[1]).abs().max().item()
        check(f"{name} batch-independent", diff < 1e-4, f"max diff {diff:.1e}")
        if name.startswith("Transformer"):
            for sch in ("constant", "linear"):
                s2 = SamplerConfig(num_steps=8, cfg_scale=2.0, cfg_schedule=sch, fused="off")
                eager = model.generate(labels, s2, seed=7, static=False)
                graphed = model.generate(labels, s2, seed=7)  # CUDA graphs by default on CUDA
                diff = (eager - graphed).abs().max().item()
                check(f"{name} CUDA graphs == eager ({sch} CFG)", diff < 1e-4, f"max diff {diff:.1e}")
        cpu = model.cpu().generate(labels.cpu(), s, seed=7)
        diff = (cpu - a.cpu()).abs().max().item()
        check(f"{name} CUDA vs CPU samples", diff < 1e-3, f"max diff {diff:.1e}")

    torch.manual_seed(0)
    model = build_model("Transformer-Tiny", num_classes=10, input_size=8, in_channels=4).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randn(64, 4, 8, 8, device=dev) * 0.5 + torch.linspace(-1, 1, 4, device=dev)[None, :, None, None]
    labels = torch.randint(0, 10, (64,), device=dev)
    losses = []
    for _ in range(200):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(data, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    check("bf16 autocast training", last < 0.8 * first, f"loss {first:.3f} -> {last:.3f}")


def time_generate(model, batch: int, sampler: SamplerConfig, **kw) -> float:
    labels = torch.arange(batch, device="cuda") % 1000
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(labels, sampler, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(dev: torch.device) -> None:
    sampler = SamplerConfig(num_steps=20, cfg_scale=1.65, fused="off")  # the fused path: gpu_generation.py
    print(f"\n{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, bf16, 256 tokens, "
          f"20 DPM-Solver++ steps, CFG on (SDPA attention)")
    print("| model | params | mode | batch | s / batch | images/s |")
    print("|---|---|---|---|---|---|")
    rates = {}
    runs = [("Transformer-Medium", {}, "eager", (64,)),
            ("Transformer-Medium", {}, "CUDA graphs", (64, 256, 512)),
            ("Transformer-Medium", {"num_kv_heads": 4}, "CUDA graphs", (64, 256, 512)),
            ("DiT-Medium", {}, "eager", (64, 256, 512))]
    for name, extra, mode, batches in runs:
        torch.manual_seed(0)
        model = build_model(name, **extra).to(dev, torch.bfloat16).eval()
        kw = {"static": False} if mode == "eager" and name.startswith("Transformer") else {}
        label = name + (f" (GQA kv={extra['num_kv_heads']})" if extra else "")
        n = sum(p.numel() for p in model.parameters())
        time_generate(model, 8, SamplerConfig(num_steps=2, cfg_scale=1.65, fused="off"), **kw)  # warm-up
        for batch in batches:
            secs = time_generate(model, batch, sampler, **kw)
            rates[(label, mode, batch)] = batch / secs
            print(f"| {label} | {n / 1e6:.0f}M | {mode} | {batch} | {secs:.2f} | {batch / secs:.2f} |", flush=True)
        del model
        torch.cuda.empty_cache()
    for batch in (64, 256, 512):
        ratio = rates[("Transformer-Medium", "CUDA graphs", batch)] / rates[("DiT-Medium", "eager", batch)]
        print(f"batch {batch}: LatentLM (CUDA graphs) / DiT images/s = {ratio:.2f}")


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device")
    dev = torch.device("cuda")
    correctness(dev)
    throughput(dev)
    print(f"\n{len(FAILED)} check(s) failed: {FAILED}" if FAILED else "\nall checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
