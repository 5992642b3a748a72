"""Generation on one GPU: fused vs eager correctness, LatentLM vs DiT images/s, and ``sample-many`` end to end.

Prepared for one H100/H200 session of under 8 minutes (``bash benchmarks/gpu_generation.sh``); every phase
checks the time left first and records what it skipped. ``--dry`` runs the same code on the CPU at tiny
sizes (Transformer-Tiny / DiT-Tiny, 16 tokens, 3 steps, fp32) to check the script end to end.

1. Correctness on the device, each a PASS/FAIL line: LatentLM's fused path (compiled solve and backbone
   step, CUDA graphs) against the eager reference path for DPM-Solver++ 2 with linear CFG and GQA and for
   flow Heun with CFG and p = 2 (fp32); a fused rerun is bit-identical and a sample does not depend on its
   batch; fused CUDA samples against CPU reference samples; bf16 fused against bf16 CUDA graphs; DiT's
   compiled denoiser against eager. Then the cached step's attention: which SDPA kernels accept it (each
   forced in turn, timed) and which kernels ran by default (profiler), and whether flash-attn 2 imports.
2. Throughput, bf16, 256 tokens (16x16x16 latents), 20 DPM-Solver++ steps, CFG 1.65 (doubled batch):
   Transformer-Medium vs DiT-Medium at batch 64 / 256 / 512, fused and eager (LatentLM "graphs" is
   fused off: the fixed-shape steps as CUDA graphs, the previous best), then Base vs Base, the narrower
   MAR-sized head (``head_ffn_hidden_size = hidden_size``) and GQA kv=4. ``latentlm_over_dit`` is
   LatentLM-Medium fused over the faster DiT-Medium mode in the same run.
3. ``sample-many`` on the device in bf16 (untrained Transformer-Medium and DiT-Medium, a random-weight
   16-channel σ-VAE): an uninterrupted run, then a run SIGKILLed after its first shard and resumed; the
   two ``.npz`` files must be byte-identical. Images/s between the first and the last shard, extrapolated
   to 50,000 images.

Phases run in order of priority (correctness, Medium vs DiT-Medium, sample-many LatentLM, Base vs Base,
sample-many DiT, the narrow head, GQA, eager LatentLM); one whose estimate does not fit in what is left
of ``--budget-s`` is skipped and listed, and ``--phases`` runs a selection (a second session can run
what a first one skipped: ``--phases base sample-many-dit variants``). Compiling (Inductor) happens in
each model's untimed warm-up (batches 2 and 3, or the one batch size of a variant row); every timed
``generate`` includes capturing its CUDA graphs.

Results: a table on stdout and ``$OUT/benchmarks/results/<date>-<card>-generation.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from generation import sync, timed  # benchmarks/generation.py: one definition of a synchronized timing
from latentlm import SamplerConfig, build_model
from latentlm.flops import denoiser_calls, generation_flops, mfu

SIZES = {  # what each mode runs; dry is the same code on the CPU at tiny sizes
    "real": dict(device="cuda", dtype=torch.bfloat16, input_size=16, channels=16, steps=20, batches=(64, 256, 512),
                 medium=("Transformer-Medium", "DiT-Medium"), base=("Transformer-Base", "DiT-Base"), classes=1000,
                 image_size=256, vae=dict(patch_size=16, hidden_size=256, depth=2, num_heads=4),
                 many={"latentlm": (2048, 512), "dit": (1024, 256)}, many_batch=256),
    "dry": dict(device="cpu", dtype=torch.float32, input_size=4, channels=4, steps=3, batches=(2, 4),
                medium=("Transformer-Tiny", "DiT-Tiny"), base=("Transformer-Tiny", "DiT-Tiny"), classes=10,
                image_size=16, vae=dict(patch_size=4, hidden_size=32, depth=1, num_heads=2),
                many={"latentlm": (16, 8), "dit": (16, 8)}, many_batch=4),
}
CFG_SCALE = 1.65  # the paper's final LatentLM-L setting


class Session:
    """The time budget, the checks and the rows of one run, and the JSON they end up in."""

    def __init__(self, budget_s: float, dry: bool) -> None:
        self.start, self.budget, self.dry = time.perf_counter(), budget_s, dry
        self.checks: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.errors: list[str] = []
        self.extra: dict[str, Any] = {}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def has(self, seconds: float, what: str) -> bool:
        """Whether ``what`` (estimated ``seconds``) fits in the time left; records a skip otherwise."""
        if self.left() >= seconds:
            return True
        self.skipped.append(f"{what} (needs ~{seconds:.0f} s, {self.left():.0f} s left)")
        print(f"[SKIP] {what}: ~{seconds:.0f} s needed, {self.left():.0f} s left", flush=True)
        return False

    def check(self, name: str, ok: bool, detail: str) -> None:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})

    def guarded(self, phase: str, fn, *args) -> Any:
        """Run one phase; an exception is recorded (and printed) instead of ending the session."""
        try:
            return fn(*args)
        except Exception:  # a failing phase must not cost the others their device time
            text = traceback.format_exc()
            print(f"[ERROR] {phase}:\n{text}", flush=True)
            self.errors.append(f"{phase}: {text.strip().splitlines()[-1]}")
            return None


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# 1. Correctness
# ---------------------------------------------------------------------------------------------


def tiny(kind: str, dev: torch.device, name: str = "Transformer-Tiny", **overrides) -> torch.nn.Module:
    """A tiny model with a non-zero head (a fresh one predicts exactly 0), fp32 on ``dev``."""
    torch.manual_seed(0)
    shape = dict(depth=2, hidden_size=64, num_heads=4, head_depth=2, in_channels=4, input_size=4, num_classes=10)
    model = build_model(name, **{**shape, "process": {"kind": kind}, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dev)


def correctness(s: Session, dev: torch.device) -> None:
    labels = torch.tensor([4, 2, 10, 7], device=dev)
    cases = [("ddpm", dict(sampler="dpm_solver", cfg_scale=2.5, cfg_schedule="linear"), dict(num_kv_heads=2)),
             ("flow", dict(sampler="heun", cfg_scale=2.5), dict(patch_size=2, input_size=8))]  # ~15 s of compiling each
    for kind, sampler, overrides in cases:
        model = tiny(kind, dev, **overrides)
        ref_cfg, fused_cfg = (SamplerConfig(num_steps=4, fused=f, **sampler) for f in ("off", "on"))
        reference = model.generate(labels, ref_cfg, seed=3, static=False)
        fused = model.generate(labels, fused_cfg, seed=3)
        tag = f"{sampler['sampler']} {overrides}"
        s.check(f"fused == eager fp32 ({tag})", max_diff(reference, fused) < 1e-4,
                f"max diff {max_diff(reference, fused):.1e} (tol 1e-4)")
        again = model.generate(labels, fused_cfg, seed=3)
        s.check(f"fused rerun bit-identical ({tag})", torch.equal(again, fused),
                f"max diff {max_diff(again, fused):.1e}")
        other = model.generate(torch.tensor([5, 2, 1], device=dev), fused_cfg, seed=3, sample_indices=[9, 1, 8])
        s.check(f"fused batch-independent ({tag})", max_diff(other[1], fused[1]) < 1e-4,
                f"max diff {max_diff(other[1], fused[1]):.1e}")
        cpu = model.cpu().generate(labels.cpu(), ref_cfg, seed=3, static=False)
        s.check(f"fused {dev.type} vs CPU reference ({tag})", max_diff(cpu, fused) < 1e-3,
                f"max diff {max_diff(cpu, fused):.1e} (tol 1e-3)")
        torch.compiler.reset()
    low = tiny("ddpm", dev).to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
    graphs = low.generate(labels, SamplerConfig(num_steps=4, cfg_scale=2.5, fused="off"), seed=3)
    fused = low.generate(labels, SamplerConfig(num_steps=4, cfg_scale=2.5, fused="on"), seed=3)
    rel = max_diff(graphs, fused) / graphs.float().abs().max().item()
    s.check(f"fused vs CUDA graphs in {next(low.parameters()).dtype}", bool(torch.isfinite(fused).all()) and rel < 0.1,
            f"max diff {rel:.1e} of the samples' range (bf16 rounding carried through 16 autoregressive tokens)")
    torch.compiler.reset()
    dit = tiny("ddpm", dev, "DiT-Tiny")
    eager, compiled = (dit.generate(labels, SamplerConfig(num_steps=4, cfg_scale=2.5, fused=f), seed=3)
                       for f in ("off", "on"))
    s.check("DiT compiled == eager fp32", max_diff(eager, compiled) < 1e-4, f"max diff {max_diff(eager, compiled):.1e}")
    torch.compiler.reset()


def attention_probe(s: Session, dev: torch.device, dtype: torch.dtype, batch: int, kv_heads: int) -> dict[str, Any]:
    """Which kernels run the fixed-shape cached step's attention (Medium shapes, one position), and how fast."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from latentlm.models.layers import Attention, KVCache, cached_step_backend

    torch.manual_seed(0)
    attn = Attention(1024, 16, kv_heads, causal=True).to(dev, dtype)
    L, B = 256, 2 * batch  # guided: two streams per image
    cache = KVCache(torch.randn(B, kv_heads, L, 64, device=dev, dtype=dtype),
                    torch.randn(B, kv_heads, L, 64, device=dev, dtype=dtype))
    x, pos = torch.randn(B, 1, 1024, device=dev, dtype=dtype), torch.tensor([L // 2], device=dev)
    result: dict[str, Any] = {"batch": batch, "kv_heads": kv_heads, "path": cached_step_backend(x), "backends": {}}
    with torch.no_grad():
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel(backend):
                    attn.step(x, cache, pos, None)
                    times = [timed(lambda: attn.step(x, cache, pos, None), dev) for _ in range(20)]
                result["backends"][backend.name] = {"ok": True, "ms": round(1e3 * statistics.median(times), 4)}
            except RuntimeError as err:
                result["backends"][backend.name] = {"ok": False, "error": str(err).splitlines()[0][:160]}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=activities) as prof:
            attn.step(x, cache, pos, None)
            sync(dev)
    names = {e.key for e in prof.key_averages()}
    pattern = re.compile(r"flash|fmha|efficient|cutlass|cudnn|sdpa|scaled_dot|softmax|bmm", re.I)
    result["default_kernels"] = sorted(n for n in names if pattern.search(n))[:12]
    print(f"cached-step attention (batch {batch}, kv heads {kv_heads}): {json.dumps(result)}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# 2. Throughput
# ---------------------------------------------------------------------------------------------


def sampler_for(mode: str, steps: int) -> tuple[SamplerConfig, dict[str, Any]]:
    """The sampler and generate keywords of a row mode: fused, graphs (fused off, fixed shapes as CUDA
    graphs on CUDA) or eager (fused off, dynamic shapes: the reference path)."""
    fused = "on" if mode == "fused" else "off"
    keywords = {"static": False} if mode == "eager" else {}
    return SamplerConfig(num_steps=steps, cfg_scale=CFG_SCALE, fused=fused), keywords


def measure_model(s: Session, size: dict, name: str, modes: tuple[str, ...], extra: dict[str, Any] | None = None,
                  label: str | None = None, estimate_s: float = 60.0, batches: tuple[int, ...] | None = None) -> None:
    """Rows for one model: every mode at every batch size (``batches``, default the size's), one timed
    ``generate`` each.

    The fused mode first generates untimed (``warmup_s``) with the same sampler: for several batch sizes
    at batches 2 and 3 (the first call compiles, the second recompiles with a symbolic batch, which then
    serves every timed size), for one batch size at that size (one compilation). The timed calls only
    capture their CUDA graphs.
    """
    extra, label, batches = extra or {}, label or name, batches or size["batches"]
    if not s.has(estimate_s, f"{label} {'/'.join(modes)}"):
        return
    dev = torch.device(size["device"])
    torch.manual_seed(0)
    model = build_model(name, input_size=size["input_size"], in_channels=size["channels"],
                        num_classes=size["classes"], **extra).to(dev, size["dtype"]).eval()
    cfg, params = model.config, sum(p.numel() for p in model.parameters())
    for mode in modes:
        sampler, kw = sampler_for(mode, size["steps"])
        kw = kw if cfg.family == "latentlm" else {}  # DiT has no fixed-shape variant: eager is fused off
        warm_sampler = sampler if mode == "fused" else dataclasses.replace(sampler, num_steps=1)
        warmup = 0.0
        for n in ((2, 3) if len(batches) > 1 else batches) if mode == "fused" else (2,):
            labels = torch.arange(n, device=dev)
            warmup += timed(lambda m=model, y=labels, w=warm_sampler, k=kw: m.generate(y, w, **k), dev)
        for batch in batches:
            if mode == "eager" and cfg.family == "latentlm" and batch > batches[0]:
                continue  # eager LatentLM is ~8x slower: its smallest batch tells the story
            labels = torch.arange(batch, device=dev) % cfg.num_classes
            secs = timed(lambda m=model, y=labels, w=sampler, k=kw: m.generate(y, w, **k), dev)
            flops = generation_flops(cfg, denoiser_calls(sampler), guided=True, static=mode != "eager")
            rate = mfu(flops * batch, secs, torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
            row = {"model": label, "family": cfg.family, "params": params, "mode": mode, "batch": batch,
                   "seconds": round(secs, 4), "images_per_s": round(batch / secs, 3), "warmup_s": round(warmup, 2),
                   "gflop_per_image": round(flops / 1e9, 1), "mfu": None if rate is None else round(rate, 4)}
            s.rows.append(row)
            print(f"| {label} | {params / 1e6:.1f}M | {mode} | {batch} | {secs:.3f} | {batch / secs:.2f} | "
                  f"{warmup:.1f} | {row['mfu']} |", flush=True)
    del model
    torch.compiler.reset()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def ratios(s: Session, latentlm: str, dit: str, batches: tuple[int, ...]) -> dict[str, Any]:
    """LatentLM fused images/s over DiT's faster mode (and over DiT eager), per batch, from this run's rows."""
    def rate(model: str, mode: str, batch: int) -> float | None:
        found = [r["images_per_s"] for r in s.rows if (r["model"], r["mode"], r["batch"]) == (model, mode, batch)]
        return found[0] if found else None

    best, eager = {}, {}
    for batch in batches:
        ours = rate(latentlm, "fused", batch)
        theirs = [v for v in (rate(dit, "fused", batch), rate(dit, "eager", batch)) if v is not None]
        if ours is not None and theirs:
            best[str(batch)] = round(ours / max(theirs), 3)
        if ours is not None and rate(dit, "eager", batch) is not None:
            eager[str(batch)] = round(ours / rate(dit, "eager", batch), 3)
    return {"latentlm_over_dit": best, "latentlm_over_dit_eager": eager}


def slot(s: Session, name: str, role: str) -> str:
    """A row label: the preset's name (dry mode runs Tiny in every role, so it says which role)."""
    return f"{name} [{role}]" if s.dry else name


def throughput(s: Session, size: dict) -> None:
    (lm, dit), batches = size["medium"], size["batches"]
    print("\n| model | params | mode | batch | s / batch | images/s | warm-up (s) | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    s.guarded("throughput Medium", measure_model, s, size, lm, ("fused",), None, slot(s, lm, "Medium"), 150)
    s.guarded("throughput DiT-Medium", measure_model, s, size, dit, ("fused", "eager"), None,
              slot(s, dit, "Medium"), 80)
    s.extra["medium"] = ratios(s, slot(s, lm, "Medium"), slot(s, dit, "Medium"), batches)
    s.guarded("throughput Medium graphs", measure_model, s, size, lm, ("graphs",), None, slot(s, lm, "Medium"), 20)


def throughput_base(s: Session, size: dict) -> None:
    (lm_b, dit_b), batches = size["base"], size["batches"]
    s.guarded("throughput Base", measure_model, s, size, lm_b, ("fused",), None, slot(s, lm_b, "Base"), 100)
    s.guarded("throughput DiT-Base", measure_model, s, size, dit_b, ("fused", "eager"), None,
              slot(s, dit_b, "Base"), 50)
    s.extra["base"] = ratios(s, slot(s, lm_b, "Base"), slot(s, dit_b, "Base"), batches)


def throughput_variants(s: Session, size: dict) -> None:
    """At the middle batch size only (one compilation each): the MAR-sized head, GQA, and eager LatentLM."""
    lm_m, batch = size["medium"][0], size["batches"][len(size["batches"]) // 2]
    width = 64 if s.dry else 1024  # MAR's head MLP is D -> D
    s.guarded("throughput narrow head", measure_model, s, size, lm_m, ("fused",), {"head_ffn_hidden_size": width},
              f"{slot(s, lm_m, 'Medium')} (head FFN {width})", 70, (batch,))
    s.guarded("throughput GQA", measure_model, s, size, lm_m, ("fused",), {"num_kv_heads": 4 if not s.dry else 2},
              f"{slot(s, lm_m, 'Medium')} (GQA)", 70, (batch,))
    s.guarded("throughput Medium eager", measure_model, s, size, lm_m, ("eager",), None, slot(s, lm_m, "Medium"), 30,
              size["batches"][:1])


# ---------------------------------------------------------------------------------------------
# 3. sample-many end to end
# ---------------------------------------------------------------------------------------------


def write_checkpoint(root: Path, preset: str, size: dict) -> Path:
    """A complete checkpoint of an untrained ``preset`` whose zero-initialised layers (adaLN, outputs) get
    small random weights, so every part of the network shapes the samples, with a random 16-channel σ-VAE."""
    from latentlm.checkpoint import begin_checkpoint, checkpoint_dir, mark_complete, write_main_files, write_rng
    from latentlm.config import DataConfig, SigmaVAEConfig, TokenizerConfig, TrainConfig, to_dict
    from latentlm.tokenizers import SigmaVAE, tokenizer_record
    from latentlm.tokenizers.sigma_vae import save_sigma_vae

    torch.manual_seed(0)
    vae = SigmaVAE(SigmaVAEConfig(variant="vit", latent_channels=size["channels"], **size["vae"]))
    vae_path = save_sigma_vae(vae, root / "tokenizer.safetensors")
    model = build_model(preset, input_size=size["input_size"], in_channels=size["channels"],
                        num_classes=size["classes"])
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    train_cfg = TrainConfig(output_dir=str(root), model=model.config,
                            data=DataConfig(path="unused", image_size=size["image_size"]),
                            tokenizer=TokenizerConfig(kind="sigma_vae", path=str(vae_path)))
    path = checkpoint_dir(root, 0)
    begin_checkpoint(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_main_files(path, model=state, ema=state, config={"train": to_dict(train_cfg)},
                     tokenizer=tokenizer_record(vae, str(vae_path)), state={"step": 0}, optimizer={}, schedule={})
    write_rng(path, 0)
    mark_complete(path, 0, 1)
    return path


def child_command(cfg) -> list[str]:
    from latentlm.config import to_dict

    return [sys.executable, __file__, "--child", json.dumps(to_dict(cfg))]


def run_child(cfg) -> float:
    """``sample_many(cfg)`` in a fresh process (as ``latentlm sample-many`` runs); its wall seconds."""
    start = time.perf_counter()
    subprocess.run(child_command(cfg), check=True, timeout=420)
    return time.perf_counter() - start


def killed_after_first_shard(cfg, shards: Path) -> bool:
    """Start ``sample_many(cfg)`` and SIGKILL it as soon as its first shard file exists; whether it was
    killed before finishing."""
    proc = subprocess.Popen(child_command(cfg))
    while proc.poll() is None and not any(shards.glob("shard-*.npz")):
        time.sleep(0.05)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return not finished


def sample_many_e2e(s: Session, size: dict, family: str, preset: str, tmp: Path) -> None:
    from latentlm.config import SampleManyConfig

    n, per_shard = size["many"][family]
    root = tmp / family
    checkpoint = write_checkpoint(root / "run", preset, size)
    cfg = SampleManyConfig(checkpoint=str(checkpoint), out=str(root / "a.npz"), num_images=n,
                           images_per_shard=per_shard, batch_size=size["many_batch"], keep_shards=True,
                           sampler=SamplerConfig(num_steps=size["steps"], cfg_scale=CFG_SCALE),
                           weights_dtype="float32" if s.dry else "bfloat16", device=size["device"], progress=False)
    started = time.time()
    seconds = run_child(cfg)
    stamps = sorted(p.stat().st_mtime for p in (root / "a.shards").glob("shard-*.npz"))
    rate = (n - per_shard) / (stamps[-1] - stamps[0])  # images/s between the first and the last shard
    startup = stamps[0] - started - per_shard / rate  # process start, loading, compiling
    other = dataclasses.replace(cfg, out=str(root / "b.npz"))
    killed = killed_after_first_shard(other, root / "b.shards")
    s.check(f"sample-many {preset}: killed mid-run", killed and not (root / "b.npz").exists(),
            f"{len(list((root / 'b.shards').glob('shard-*.npz')))} of {n // per_shard} shards written when killed")
    resumed = run_child(other)
    same = (root / "a.npz").read_bytes() == (root / "b.npz").read_bytes()
    s.check(f"sample-many {preset}: resumed == uninterrupted", same, f"{n} images, {(root / 'a.npz').stat().st_size} "
            "bytes, byte-identical" if same else "the .npz files differ")
    record = json.loads((root / "a.json").read_text())
    entry = {"model": preset, "images": n, "images_per_shard": per_shard, "batch_size": cfg.batch_size,
             "weights_dtype": cfg.weights_dtype, "fused": record["settings"]["sampler"]["fused"],
             "uninterrupted_s": round(seconds, 1), "resumed_run_s": round(resumed, 1), "startup_s": round(startup, 1),
             "images_per_s": round(rate, 2), "extrapolated_50k_s": round(startup + 50_000 / rate, 1),
             "byte_identical": same}
    s.extra.setdefault("sample_many", []).append(entry)
    print(f"sample-many {preset}: {json.dumps(entry)}", flush=True)


# ---------------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------------


def environment(dev: torch.device) -> dict[str, Any]:
    from latentlm.models.layers import _flash_attn_kvcache

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "flash_attn_with_kvcache": _flash_attn_kvcache() is not None, "driver": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # no nvidia-smi: driver unknown
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip() or None
    return env


def write_results(s: Session, env: dict[str, Any], out: Path, command: str) -> Path:
    date = datetime.date.today().isoformat()
    card = re.sub(r"[^a-z0-9]+", "-", env["card"].lower()).strip("-") + ("-dry" if s.dry else "")
    medium = s.extra.get("medium", {})
    result = {"card": env["card"], "date": date, "torch": env["torch"], "driver": env["driver"], "cuda": env["cuda"],
              "command": command, "dry": s.dry, "flash_attn_with_kvcache": env["flash_attn_with_kvcache"],
              "settings": {"tokens": 256 if not s.dry else 16, "solver": "dpm_solver", "cfg_scale": CFG_SCALE},
              "generation": {"rows": s.rows, "latentlm_over_dit": medium.get("latentlm_over_dit", {}),
                             "latentlm_over_dit_eager": medium.get("latentlm_over_dit_eager", {}),
                             "base": s.extra.get("base", {})},
              "attention": s.extra.get("attention", []), "sample_many": s.extra.get("sample_many", []),
              "checks": s.checks, "skipped": s.skipped, "errors": s.errors,
              "seconds": round(time.perf_counter() - s.start, 1)}
    path = out / "benchmarks" / "results" / f"{date}-{card}-generation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def sample_many_phase(family: str):
    def phase(s: Session, size: dict) -> None:
        preset = size["medium"][0 if family == "latentlm" else 1]
        if s.has(130 if family == "latentlm" else 100, f"sample-many {preset}"):
            with tempfile.TemporaryDirectory() as tmp:  # the .npz files stay on the machine, not under OUT
                s.guarded(f"sample-many {preset}", sample_many_e2e, s, size, family, preset, Path(tmp))

    return phase


def checks(s: Session, size: dict) -> None:
    dev = torch.device(size["device"])
    s.guarded("correctness", correctness, s, dev)
    s.extra["attention"] = [r for r in (s.guarded("attention probe", attention_probe, s, dev, size["dtype"], b, kv)
                                        for b, kv in ((64, 16), (64, 4), (256, 16))) if r is not None]


# In order of priority; --phases picks some (e.g. a second session for what the first one skipped).
PHASES = {"checks": checks, "medium": throughput, "sample-many-latentlm": sample_many_phase("latentlm"),
          "base": throughput_base, "sample-many-dit": sample_many_phase("dit"), "variants": throughput_variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU: check the script end to end")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="results go to OUT/benchmarks/results/")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting phases after this many seconds")
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES), help="what to run")
    args = parser.parse_args()
    size = SIZES["dry" if args.dry else "real"]
    dev = torch.device(size["device"])
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_generation needs a CUDA device (or --dry)")
    s, env = Session(args.budget_s, args.dry), environment(dev)
    print(f"# {json.dumps(env)}", flush=True)
    for name in args.phases:
        PHASES[name](s, size)
    path = write_results(s, env, Path(args.out), " ".join(["python", *sys.argv]))
    failed = [c["name"] for c in s.checks if not c["ok"]]
    print(f"\nwrote {path}; {len(s.checks) - len(failed)} checks passed, failed: {failed}, errors: {s.errors}, "
          f"skipped: {s.skipped}, {time.perf_counter() - s.start:.0f} s", flush=True)
    sys.exit(1 if failed or s.errors else 0)


def child(config_json: str) -> None:
    from latentlm.commands.sample_many import sample_many
    from latentlm.config import SampleManyConfig, from_dict

    sample_many(from_dict(SampleManyConfig, json.loads(config_json)))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
