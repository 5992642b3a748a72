"""`latentlm demo`, CI-sized: every phase runs and writes its files; the metrics file is complete."""

from __future__ import annotations

import json
import math

import torch
from PIL import Image

from latentlm.commands.demo import demo
from latentlm.config import DemoConfig, SamplerConfig
from latentlm.tokenizers.sigma_vae import SigmaVAEConfig


def test_short_demo_writes_metrics_and_pictures(tmp_path, capsys):
    threads = torch.get_num_threads()
    cfg = DemoConfig(output_dir=str(tmp_path / "demo"), vae=SigmaVAEConfig(base_channels=8, latent_channels=4),
                     vae_steps=8, steps=4, batch_size=16, classifier_epochs=1, eval_per_class=10,
                     sampler=SamplerConfig(num_steps=2, cfg_scale=2.0), cfg_scales=(1.0, 1.5), progress=False)
    result = demo(cfg)
    assert torch.get_num_threads() == threads  # the demo's one thread is not left behind
    run = tmp_path / "demo"
    assert result.run_dir == run
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["models"]) == {"latentlm (Transformer-Tiny)", "dit (DiT-Tiny)"}
    for row in metrics["models"].values():
        assert [p["cfg_scale"] for p in row["sweep"]] == [1.0, 1.5, 2.0]  # the sweep, then the fixed scale
        for point in row["sweep"]:
            assert 0 <= point["accuracy"] <= 1 and point["num_images"] == 100
            assert math.isfinite(point["frechet"]) and point["frechet_floor"] > 0
            assert point["frechet_ratio"] == point["frechet"] / point["frechet_floor"]
        assert row["fixed"] == row["sweep"][2]
        eligible = [p for p in row["sweep"][:2] if p["accuracy"] >= cfg.min_accuracy] or row["sweep"][:2]
        assert row["best"]["frechet_ratio"] == min(p["frechet_ratio"] for p in eligible)
    # Equal training compute: DiT gets the steps that match LatentLM's counted FLOPs, within 5%.
    latentlm, dit = metrics["models"]["latentlm (Transformer-Tiny)"], metrics["models"]["dit (DiT-Tiny)"]
    assert latentlm["steps"] == 4 and dit["steps"] > 4
    assert abs(dit["train_flops"] / latentlm["train_flops"] - 1) < 0.05
    assert set(metrics["timings_seconds"]) == {"sigma_vae", "classifier", "latentlm", "dit", "total"}
    assert metrics["config"]["steps"] == 4 and metrics["sigma_vae"]["scale"] > 0
    assert metrics["classifier"]["num_test"] == 359 and metrics["classifier"]["frechet_train_vs_test"] > 0
    for png in ("latentlm_grid.png", "dit_grid.png", "sigma_vae/recon.png", "sigma_vae/loss.png",
                "latentlm/loss.png", "dit/loss.png", "guidance.png"):
        assert Image.open(run / png).size[0] > 0, png
    assert Image.open(run / "latentlm_grid.png").size[1] >= 10 * 16  # 10 rows
    out = capsys.readouterr().out
    assert f"run directory {run}" in out and "class acc" in out and str(run / "metrics.json") in out
