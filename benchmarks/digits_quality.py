"""Why the demo's LatentLM plateaus at a Fréchet ratio of ~2.6 on the digits, and what fixes it.

Every study uses the demo's pieces (σ-VAE, digit classifier, Transformer-Tiny / DiT-Tiny, the
trainer, ``model.generate``) at one torch thread, and the demo's metric: class accuracy and the
Fréchet distance in the classifier's feature space divided by the real-data floor (300 real
training digits, 30 per class; ratio 1 = as good as real digits).

Trained artifacts are cached under ``--cache`` (one directory per setting, keyed by a hash of the
setting), so a guidance sweep over a trained model costs only sampling, and a second run of a
study costs only what is new::

    PYTHONPATH=src python benchmarks/digits_quality.py --cache runs/quality recon
    PYTHONPATH=src python benchmarks/digits_quality.py --cache runs/quality guidance --family latentlm
    PYTHONPATH=src python benchmarks/digits_quality.py --cache runs/quality guidance --family dit
    PYTHONPATH=src python benchmarks/digits_quality.py --cache runs/quality noise
    PYTHONPATH=src python benchmarks/digits_quality.py --cache runs/quality variants --family latentlm \\
        --variant default --variant "noise_std=0.25" --variant "steps=800"
    PYTHONPATH=src python benchmarks/digits_quality.py --cache runs/quality solver
    PYTHONPATH=src python benchmarks/digits_quality.py --cache runs/quality seeds --variant "noise_std=0.25"

A *variant* is a comma-separated list of ``key=value`` overrides of ``Setting`` (below):
σ-VAE fields (``noise_std``, ``latent_channels``, ``base_channels``, ``vae_steps``, ``prior_weight``),
generator fields (``steps``, ``lr``, ``ema_decay``, ``batch_mul``, ``head_depth``, ``process``,
``sample_posterior``) and the seed. ``default`` is the demo's defaults. Each study prints markdown
tables; CPU seconds are ``time.process_time`` of this (one-thread) process, so they stay
comparable on a busy machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentlm.config import (
    DataConfig,
    ModelConfig,
    ProcessConfig,
    SamplerConfig,
    SigmaVAEConfig,
    TokenizerConfig,
    TokenizerTrainConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from latentlm.data.digits import DigitsDataset
from latentlm.metrics.digits import DigitClassifier, DigitsEvaluator, classify, train_digit_classifier
from latentlm.metrics.statistics import gaussian_statistics
from latentlm.models import get_config, model_from_config
from latentlm.tokenizers.sigma_vae import load_sigma_vae
from latentlm.training.model import train
from latentlm.training.tokenizer import train_tokenizer

IMAGE_SIZE = 16
PER_CLASS = 30  # the demo's eval_per_class
CLASSIFIER_EPOCHS = 20


@dataclass(frozen=True)
class Setting:
    """One point of the design space: σ-VAE, generator training, seed. Defaults: the demo's before it moved to
    C_σ 0.25 and CFG 1.5 (docs/digits-quality.md), so every study compares against the same baseline."""

    # σ-VAE
    latent_channels: int = 8
    base_channels: int = 16
    noise_std: float = 0.75  # C_σ
    vae_steps: int = 400
    prior_weight: float = 1e-2
    # generator
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.999
    batch_mul: int = 1  # LatentLM only
    head_depth: int = 2  # LatentLM only (Transformer-Tiny's preset)
    process: str = "ddpm"  # "ddpm" (v-prediction, cosine) or "flow"
    sample_posterior: bool = True  # train the generator on posterior samples (False: on the mode μ)
    seed: int = 0

    def vae_key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("latent_channels", "base_channels", "noise_std", "vae_steps",
                                               "prior_weight", "seed")}

    def model_key(self, family: str) -> dict[str, Any]:
        keys = ["steps", "batch_size", "lr", "ema_decay", "process", "sample_posterior", "seed"]
        if family == "latentlm":
            keys += ["batch_mul", "head_depth"]
        return {"family": family, "vae": self.vae_key(), **{k: getattr(self, k) for k in keys}}

    def describe(self) -> str:
        diff = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]
        return ", ".join(diff) or "default"


def parse_variant(text: str, base: Setting | None = None) -> Setting:
    """``"default"`` or ``"key=value,key=value"`` -> a ``Setting`` (values typed like the field)."""
    base = base or Setting()
    if text.strip() in ("", "default"):
        return base
    types = {f.name: type(f.default) for f in dataclasses.fields(Setting)}
    values: dict[str, Any] = {}
    for part in text.split(","):
        key, _, raw = part.partition("=")
        key = key.strip()
        if key not in types:
            raise SystemExit(f"unknown setting {key!r}; known: {sorted(types)}")
        kind = types[key]
        values[key] = raw.strip().lower() in ("1", "true", "yes") if kind is bool else kind(raw)
    return dataclasses.replace(base, **values)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Cached artifacts
# ---------------------------------------------------------------------------------------------


class Study:
    """Trains (or loads) σ-VAEs, the classifier and generators under ``cache``; samples and scores."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        cache.mkdir(parents=True, exist_ok=True)
        self.train_set = DigitsDataset("train", image_size=IMAGE_SIZE)
        self.test_set = DigitsDataset("test", image_size=IMAGE_SIZE)
        self.evaluator = self._evaluator()
        self.labels = torch.arange(10).repeat_interleave(PER_CLASS)  # (300,), class-major as in the demo
        self.floor = self.evaluator.floor(self.labels)

    # -- metric -------------------------------------------------------------------------------
    def _evaluator(self, seed: int = 0) -> DigitsEvaluator:
        path = self.cache / f"classifier-seed{seed}.pt"
        if path.exists():
            classifier = DigitClassifier()
            classifier.load_state_dict(torch.load(path, weights_only=True))
        else:
            classifier = train_digit_classifier(self.train_set.images, self.train_set.labels,
                                                epochs=CLASSIFIER_EPOCHS, seed=seed)
            torch.save(classifier.state_dict(), path)
        return DigitsEvaluator(classifier.eval(), self.train_set.images, self.train_set.labels,
                               self.test_set.images, seed=seed)

    def floor_indices(self) -> torch.Tensor:
        """The training digits the floor uses (same generator as ``DigitsEvaluator.floor``)."""
        generator = torch.Generator().manual_seed(self.evaluator.seed)
        picks = []
        for c, count in zip(*torch.unique(self.labels, return_counts=True), strict=True):
            pool = torch.nonzero(self.train_set.labels == c).flatten()
            picks.append(pool[torch.randperm(len(pool), generator=generator)[: int(count)]])
        return torch.cat(picks)

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """Accuracy, Fréchet distance and ratio, plus two diagnostics of the generated features: ``spread``,
        tr Σ_gen / tr Σ_test (diversity; the floor's real digits give ~1), and ``mean_part``, the share of
        the Fréchet distance that is ‖μ_gen − μ_test‖² (the rest is the covariance term)."""
        s = self.evaluator.score(images, self.labels if labels is None else labels)
        _, features = classify(self.evaluator.classifier, images)
        mu, sigma = gaussian_statistics(features)
        ref_mu, ref_sigma = self.evaluator.reference_stats
        return {"acc": s.accuracy, "frechet": s.frechet, "ratio": s.frechet_ratio,
                "spread": float(np.trace(sigma) / np.trace(ref_sigma)),
                "mean_part": float(((mu - ref_mu) ** 2).sum() / max(s.frechet, 1e-12))}

    # -- σ-VAE --------------------------------------------------------------------------------
    def vae(self, setting: Setting) -> tuple[Path, dict[str, Any]]:
        """The σ-VAE file of ``setting`` (trained on first use) and its record (CPU seconds, final loss)."""
        key = setting.vae_key()
        run = self.cache / f"vae-{_hash(key)}"
        record_path = run / "record.json"
        if not record_path.exists():
            vae_cfg = SigmaVAEConfig(variant="conv", latent_channels=setting.latent_channels,
                                     base_channels=setting.base_channels, channel_mult=(1, 2, 2),
                                     noise_std=setting.noise_std)
            cfg = TokenizerTrainConfig(
                output_dir=str(run), vae=vae_cfg,
                data=DataConfig(kind="digits", image_size=IMAGE_SIZE, hflip=False, num_workers=0),
                max_steps=setting.vae_steps, prior_weight=setting.prior_weight, seed=setting.seed,
                checkpoint_every=setting.vae_steps, keep_last=1, progress=False)
            t0 = time.process_time()
            result = train_tokenizer(cfg)
            cpu = time.process_time() - t0
            record = {"key": key, "cpu_s": cpu, "final_loss": result.losses[-1],
                      "recon_mse_last50": float(sum(result.losses[-50:]) / 50), **result.tokenizer.normalization()}
            record_path.write_text(json.dumps(record, indent=1))
        return run / "tokenizer.safetensors", json.loads(record_path.read_text())

    # -- generators ---------------------------------------------------------------------------
    def model(self, family: str, setting: Setting) -> tuple[dict[str, torch.nn.Module], Any, dict[str, Any]]:
        """``({"ema": ..., "raw": ...}, tokenizer with the run's normalization, record)``, trained on first use."""
        vae_path, _ = self.vae(setting)
        key = setting.model_key(family)
        run = self.cache / f"{family}-{_hash(key)}"
        weights = run / "weights.pt"
        if not weights.exists():
            preset = "Transformer-Tiny" if family == "latentlm" else "DiT-Tiny"
            overrides: dict[str, Any] = {"process": ProcessConfig(kind=setting.process)}
            if family == "latentlm":
                overrides |= {"batch_mul": setting.batch_mul, "head_depth": setting.head_depth}
            tokenizer = load_sigma_vae(vae_path)
            # The file's normalization was fitted on posterior samples; training on the mode refits it on μ.
            norm_images = 0 if setting.sample_posterior else 10_000
            cfg = TrainConfig(
                output_dir=str(run), model=get_config(preset, **overrides),
                data=DataConfig(kind="digits", image_size=IMAGE_SIZE, hflip=False, num_workers=0),
                tokenizer=TokenizerConfig(kind="sigma_vae", path=str(vae_path.resolve()), norm_images=norm_images,
                                          sample_posterior=setting.sample_posterior),
                max_steps=setting.steps, batch_size=setting.batch_size, lr=setting.lr,
                warmup_steps=min(100, setting.steps // 10 + 1), weight_decay=0.0, ema_decay=setting.ema_decay,
                mixed_precision="no", seed=setting.seed, checkpoint_every=setting.steps, keep_last=1,
                sample_every=0, log_every=100, tensorboard=False, progress=False,
                sampler=_default_sampler(setting))  # only checked against the process (no grids are drawn)
            t0 = time.process_time()
            result = train(cfg, tokenizer=tokenizer)
            cpu = time.process_time() - t0
            torch.save({"ema": result.ema.state_dict(), "raw": result.model.state_dict()}, weights)
            record = {"key": key, "cpu_s": cpu, "cpu_s_per_step": cpu / setting.steps,
                      "final_loss_last50": float(sum(result.losses[-50:]) / 50),
                      "model_config": to_dict(result.ema.config), **tokenizer.normalization()}
            (run / "record.json").write_text(json.dumps(record, indent=1))
        record = json.loads((run / "record.json").read_text())
        state = torch.load(weights, weights_only=True)
        models = {}
        for which in ("ema", "raw"):
            m = model_from_config(from_dict(ModelConfig, record["model_config"]))
            m.load_state_dict(state[which])
            models[which] = m.eval()
        tokenizer = load_sigma_vae(vae_path)
        tokenizer.set_normalization(record["scale"], record["bias"])
        return models, tokenizer, record

    def sample_score(self, model: torch.nn.Module, tokenizer: Any, sampler: SamplerConfig,
                     seed: int = 0) -> dict[str, float]:
        t0 = time.process_time()
        with torch.no_grad():
            latents = model.generate(self.labels, sampler=sampler, seed=seed)
            images = tokenizer.decode(latents.float())
        return {**self.score(images), "sample_cpu_s": time.process_time() - t0}


# ---------------------------------------------------------------------------------------------
# Studies
# ---------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _sampler(cfg_scale: float = 2.0, **kw: Any) -> SamplerConfig:
    return SamplerConfig(**{"sampler": "dpm_solver", "num_steps": 20, "cfg_scale": cfg_scale, **kw})


def _default_sampler(setting: Setting, cfg_scale: float = 2.0, **kw: Any) -> SamplerConfig:
    if setting.process == "flow":
        kw = {"sampler": "heun", "num_steps": 10, **kw}
    return _sampler(cfg_scale, **kw)


def study_recon(st: Study, settings: list[Setting], samples: int) -> None:
    """Reconstructions of the floor's 300 training digits (so ratio 1 = lossless) and of the 359 test digits."""
    print(f"\n### σ-VAE reconstructions (floor {st.floor:.2f}: 300 real training digits vs the test set)\n")
    idx = st.floor_indices()
    train_x, train_y = st.train_set.images[idx], st.train_set.labels[idx]
    rows = []
    for setting in settings:
        path, record = st.vae(setting)
        vae = load_sigma_vae(path)
        with torch.no_grad():
            mode = vae.decode_raw(vae.encode_raw(train_x, sample=False)).clamp(-1, 1)
            mode_score = st.score(mode, train_y)
            mse_mode = float((mode - train_x).pow(2).mean())
            sample_scores, sample_mse = [], []
            for k in range(samples):
                g = torch.Generator().manual_seed(k)
                z = vae.encode_raw(train_x, generator=g)
                x = vae.decode_raw(z).clamp(-1, 1)
                sample_scores.append(st.score(x, train_y))
                sample_mse.append(float((x - train_x).pow(2).mean()))
            test_mode = vae.decode_raw(vae.encode_raw(st.test_set.images, sample=False)).clamp(-1, 1)
            test_score = st.score(test_mode, st.test_set.labels)
            mu = vae.encode_raw(train_x, sample=False)
        mean = {k: sum(s[k] for s in sample_scores) / samples for k in ("acc", "ratio")}
        spread = max(s["ratio"] for s in sample_scores) - min(s["ratio"] for s in sample_scores)
        rows.append([setting.describe(), f"{record['cpu_s']:.0f}", f"{mse_mode:.4f}", f"{mode_score['acc']:.1%}",
                     f"{mode_score['ratio']:.2f}", f"{sum(sample_mse) / samples:.4f}", f"{mean['acc']:.1%}",
                     f"{mean['ratio']:.2f} (±{spread / 2:.2f})", f"{test_score['ratio']:.2f}",
                     f"{float(mu.std()):.2f}", f"{float(mu.pow(2).mean().sqrt() / max(setting.noise_std, 1e-9)):.2f}"])
    print(_table(["σ-VAE setting", "train CPU s", "MSE mode", "acc mode", "ratio mode", "MSE sample",
                  "acc sample", f"ratio sample (mean of {samples})", "ratio test mode¹", "std μ", "rms μ / C_σ"],
                 rows))
    print("\n¹ test reconstructions scored against the test set itself (optimistic: same images).")


def study_guidance(st: Study, family: str, setting: Setting, scales: list[float], schedules: list[str],
                   temperatures: list[float], raw: bool) -> None:
    models, tokenizer, record = st.model(family, setting)
    print(f"\n### {family} guidance sweep — {setting.describe()}; train {record['cpu_s']:.0f} CPU s "
          f"({record['cpu_s_per_step'] * 1000:.0f} ms/step), 300 samples, sampling seed 0\n")
    rows = []
    weights = ["ema", "raw"] if raw else ["ema"]
    for which in weights:
        for schedule in schedules if family == "latentlm" else ["constant"]:
            for temp in temperatures:
                for scale in scales:
                    if schedule == "linear" and scale == 1.0:
                        continue
                    r = st.sample_score(models[which], tokenizer, _default_sampler(
                        setting, scale, cfg_schedule=schedule, temperature=temp))
                    rows.append([which, schedule, temp, scale, f"{r['acc']:.1%}", f"{r['frechet']:.2f}",
                                 f"{r['ratio']:.2f}", f"{r['spread']:.2f}", f"{r['mean_part']:.0%}",
                                 f"{r['sample_cpu_s']:.1f}"])
    print(_table(["weights", "cfg schedule", "temperature", "cfg scale", "acc", "Fréchet", "ratio",
                  "spread tr Σ/tr Σ_test", "mean term share", "sample CPU s"], rows))
    real = st.score(st.train_set.images[st.floor_indices()])
    print(f"\n(the floor's 300 real training digits: spread {real['spread']:.2f}, mean term share "
          f"{real['mean_part']:.0%})")


def study_noise(st: Study, family: str, setting: Setting, sample_seeds: int, scale: float) -> None:
    """Seed-to-seed spread of the metric with a fixed model (sampling seeds)."""
    models, tokenizer, _ = st.model(family, setting)
    accs, ratios = [], []
    for seed in range(sample_seeds):
        r = st.sample_score(models["ema"], tokenizer, _default_sampler(setting, scale), seed=seed)
        accs.append(r["acc"])
        ratios.append(r["ratio"])
    t = torch.tensor(ratios)
    a = torch.tensor(accs)
    print(f"\n### metric noise: {family}, {setting.describe()}, CFG {scale}, {sample_seeds} sampling seeds\n")
    print(_table(["seed"] + [str(s) for s in range(sample_seeds)] + ["mean", "std"],
                 [["ratio"] + [f"{v:.2f}" for v in ratios] + [f"{t.mean():.2f}", f"{t.std():.2f}"],
                  ["acc"] + [f"{v:.1%}" for v in accs] + [f"{a.mean():.1%}", f"{a.std():.1%}"]]))


def study_variants(st: Study, family: str, settings: list[Setting], scales: list[float],
                   temperatures: list[float]) -> None:
    """Each variant trained once, sampled at every (temperature, scale); the best ratio with acc >= 97% marked."""
    print(f"\n### {family} variants (300 samples, sampling seed 0; ratio / acc per CFG scale)\n")
    rows = []
    for setting in settings:
        models, tokenizer, record = st.model(family, setting)
        vae_cpu = st.vae(setting)[1]["cpu_s"]
        for temp in temperatures:
            cells, best = [], None
            for scale in scales:
                r = st.sample_score(models["ema"], tokenizer, _default_sampler(setting, scale, temperature=temp))
                cells.append(f"{r['ratio']:.2f} / {r['acc']:.0%}")
                if r["acc"] >= 0.97 and (best is None or r["ratio"] < best[1]):
                    best = (scale, r["ratio"])
            rows.append([setting.describe(), f"{vae_cpu:.0f}", f"{record['cpu_s']:.0f}",
                         f"{record['cpu_s_per_step'] * 1000:.0f}", f"{record['final_loss_last50']:.3f}", temp, *cells,
                         f"{best[1]:.2f} @ {best[0]}" if best else "—"])
    print(_table(["setting", "σ-VAE CPU s", "train CPU s", "ms/step", "loss (last 50)", "temperature"]
                 + [f"CFG {s}" for s in scales] + ["best ratio (acc ≥ 97%)"], rows))


def study_solver(st: Study, setting: Setting, scale: float) -> None:
    """Sampler settings on one trained LatentLM (DDPM process)."""
    models, tokenizer, _ = st.model("latentlm", setting)
    rows = []
    for name, steps, order in [("dpm_solver", 20, 2), ("dpm_solver", 50, 2), ("dpm_solver", 10, 2),
                               ("dpm_solver", 20, 1), ("ddim", 50, 2), ("ddpm", 100, 2)]:
        r = st.sample_score(models["ema"], tokenizer, _sampler(scale, sampler=name, num_steps=steps,
                                                               solver_order=order))
        rows.append([name, steps, order if name == "dpm_solver" else "", f"{r['acc']:.1%}", f"{r['ratio']:.2f}",
                     f"{r['sample_cpu_s']:.1f}"])
    print(f"\n### LatentLM sampler — {setting.describe()}, CFG {scale}\n")
    print(_table(["sampler", "steps", "order", "acc", "ratio", "sample CPU s"], rows))


def study_seeds(st: Study, families: list[str], setting: Setting, seeds: int, scales: list[float],
                temperatures: list[float]) -> None:
    """Training seeds 0..seeds-1 (σ-VAE and generator; the classifier stays seed 0): ratio / acc per scale,
    then per scale the mean over seeds and how many seeds reach acc >= 97%."""
    for family in families:
        for temp in temperatures:
            rows, per_scale = [], {s: [] for s in scales}
            for seed in range(seeds):
                s = dataclasses.replace(setting, seed=seed)
                models, tokenizer, record = st.model(family, s)
                cells = []
                for scale in scales:
                    r = st.sample_score(models["ema"], tokenizer, _default_sampler(s, scale, temperature=temp))
                    cells.append(f"{r['ratio']:.2f} / {r['acc']:.1%}")
                    per_scale[scale].append(r)
                rows.append([seed, f"{st.vae(s)[1]['cpu_s']:.0f}", f"{record['cpu_s']:.0f}", *cells])
            mean_cells = []
            for scale in scales:
                rs = per_scale[scale]
                ratio = torch.tensor([r["ratio"] for r in rs])
                acc = torch.tensor([r["acc"] for r in rs])
                mean_cells.append(f"**{ratio.mean():.2f}** ±{ratio.std():.2f} / {acc.mean():.1%} "
                                  f"({int((acc >= 0.97).sum())}/{len(rs)} ≥ 97%)")
            rows.append(["mean ± std", "", "", *mean_cells])
            print(f"\n### {family} training seeds — {setting.describe()}, temperature {temp} "
                  f"(ratio / acc, sampling seed 0)\n")
            print(_table(["seed", "σ-VAE CPU s", "train CPU s"] + [f"CFG {s}" for s in scales], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=["recon", "guidance", "noise", "variants", "solver", "seeds"])
    p.add_argument("--cache", type=Path, default=Path("runs/digits-quality"))
    p.add_argument("--family", default="latentlm", help="latentlm, dit, or both (seeds)")
    p.add_argument("--variant", action="append", default=None,
                   help="'default' or 'key=value,...' (repeatable; guidance/noise/solver/seeds use the first)")
    p.add_argument("--scales", type=float, nargs="+", default=None)
    p.add_argument("--schedules", nargs="+", default=["constant", "linear"])
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    p.add_argument("--raw", action="store_true", help="guidance: also sample the raw (non-EMA) weights")
    p.add_argument("--samples", type=int, default=3, help="recon: posterior samples per image set")
    p.add_argument("--seeds", type=int, default=5, help="noise: sampling seeds; seeds: training seeds")
    p.add_argument("--scale", type=float, default=2.0, help="noise/solver: CFG scale")
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("latentlm").setLevel(logging.WARNING)
    settings = [parse_variant(v) for v in (args.variant or ["default"])]
    st = Study(args.cache)
    t0 = time.perf_counter()
    if args.study == "recon":
        study_recon(st, settings, args.samples)
    elif args.study == "guidance":
        study_guidance(st, args.family, settings[0], args.scales or [1.0, 1.25, 1.5, 2.0, 3.0, 4.0],
                       args.schedules, args.temperatures, args.raw)
    elif args.study == "noise":
        study_noise(st, args.family, settings[0], args.seeds, args.scale)
    elif args.study == "variants":
        study_variants(st, args.family, settings, args.scales or [1.0, 1.25, 1.5, 1.75, 2.0], args.temperatures)
    elif args.study == "solver":
        study_solver(st, settings[0], args.scale)
    elif args.study == "seeds":
        families = ["latentlm", "dit"] if args.family == "both" else [args.family]
        study_seeds(st, families, settings[0], args.seeds, args.scales or [1.25, 1.5, 1.75, 2.0],
                    args.temperatures)
    print(f"\n(wall {time.perf_counter() - t0:.0f} s; floor {st.floor:.2f}; CPU s = process time at 1 thread)")


if __name__ == "__main__":
    main()
