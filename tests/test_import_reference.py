"""The reference LatentLM code's checkpoints: mapped weights equal its golden outputs; `import-reference`
makes a run that samples, evaluates and resumes; corrupt or unsafe files are refused with one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from latentlm import cli
from latentlm.checkpoint import Checkpoint, list_checkpoints, load_trained
from latentlm.commands.sample_many import sample_many
from latentlm.config import ProcessConfig, SampleManyConfig, SamplerConfig, SigmaVAEConfig
from latentlm.diffusion import guidance_combine
from latentlm.models import model_from_config
from latentlm.models.layers import patchify, unpatchify
from latentlm.models.reference import convert, read_architecture
from latentlm.models.registry import REFERENCE_PRESETS, list_models
from latentlm.tokenizers.sigma_vae import SigmaVAE, save_sigma_vae
from train_helpers import make_image_folder

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_latentlm"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"the shared fixtures are not at {FIXTURES}")
TOLERANCE = 1e-8  # max |ours - golden| / max |golden|, float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def formula_state(name: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(manifest, golden tensors, the state dict the fixture README's weight formula gives, float64)."""
    manifest = json.loads((FIXTURES / f"{name}.manifest.json").read_text())
    golden = load_file(FIXTURES / f"{name}.golden.safetensors")
    state = {}
    for t in manifest["tensors"]:
        shape, key = t["shape"], t["key"]
        if t["stored"]:
            state[key] = golden[f"state.{key}"].double()
            continue
        z = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + t["index"]), dtype=torch.float64)
        if len(shape) >= 2:
            state[key] = z * (0.02 if shape[0] == 1 else 1 / math.sqrt(math.prod(shape[1:])))
        else:
            state[key] = 1 + 0.1 * z if key.endswith("weight") else 0.1 * z
    return manifest, golden, state


def head_outputs(model, x_noise: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """The reference's ``forward_diffusion``: the head over every token, t per image (N,) or per token (N, L)."""
    cfg, (n, length, dim) = model.config, condition.shape
    tokens = patchify(x_noise, cfg.patch_size).reshape(n * length, -1)
    times = t.reshape(-1) if t.dim() > 1 else t.repeat_interleave(length)
    out = model.head(tokens, times, condition.reshape(n * length, dim)).reshape(n, length, -1)
    return unpatchify(out, cfg.in_channels, cfg.input_size, cfg.patch_size)


@pytest.mark.parametrize("name", ["transformer_p1", "transformer_p2", "dit_p1", "dit_p2"])
def test_mapped_weights_give_the_reference_outputs(name):
    manifest, g, state = formula_state(name)
    kw = manifest["kwargs"]
    cfg = read_architecture(state, kw["num_heads"], kw["input_size"], name, ProcessConfig(), 4)
    assert (cfg.patch_size, cfg.num_classes, cfg.depth, cfg.kv_heads) == (
        kw["patch_size"], kw["num_classes"], kw["depth"], kw["num_kv_heads"] or kw["num_heads"])
    model = model_from_config(cfg).double().eval()
    model.load_state_dict(convert(state, cfg))
    y, t, s = g["in.y"], g["in.t"], 4.0
    with torch.no_grad():
        if cfg.family == "latentlm":
            tokens = patchify(g["in.x_start"], cfg.patch_size)
            assert rel(model.forward_parallel(tokens, y), g["f64.forward_parallel"]) < TOLERANCE
            assert rel(model.forward_parallel(tokens, g["in.y_null"]), g["f64.forward_parallel_null"]) < TOLERANCE
            caches = model.new_cache(2, "cpu", torch.float64)
            steps = [model.forward_recurrent(y, 0, caches)]
            steps += [model.forward_recurrent(tokens[:, i - 1], i, caches) for i in range(1, cfg.seq_len)]
            assert rel(torch.stack(steps, dim=1), g["f64.forward_recurrent"]) < TOLERANCE  # the KV cache
            assert rel(head_outputs(model, g["in.x_noise"], t, g["in.condition"]), g["f64.forward_diffusion"]) < 1e-8
            assert rel(head_outputs(model, g["in.x_noise"], g["in.t_tok"], g["in.condition"]),
                       g["f64.forward_diffusion_tok"]) < TOLERANCE
            # CFG on one token: the first half duplicated, conditions [cond; null], guidance on every channel.
            half = g["in.x_cfg"][:2]  # (2, C, p, p): a token laid out (C, p, p), as ours
            both = model.head(torch.cat([half, half]).flatten(1), g["in.t_cfg"], g["in.cfg_condition"][:, 0])
            guided = guidance_combine(*both.reshape(half.shape[0] * 2, *half.shape[1:]).chunk(2), s)
        else:
            assert rel(model.denoise(g["in.x_noise"], t, y), g["f64.forward"]) < TOLERANCE
            assert rel(model.denoise(g["in.x_noise"], t, g["in.y_null"]), g["f64.forward_null"]) < TOLERANCE
            half = g["in.x_cfg"][:2]
            guided = guidance_combine(*model.denoise(torch.cat([half, half]), g["in.t_cfg"], g["in.y_cfg"]).chunk(2), s)
        assert rel(torch.cat([guided, guided]), g["f64.forward_with_cfg"]) < TOLERANCE


# ---------------------------------------------------------------------------------------------
# import-reference
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A tiny σ-VAE of ours with the fixtures' latents: 64-pixel images -> (16, 4, 4)."""
    torch.manual_seed(0)
    vae = SigmaVAE(SigmaVAEConfig(latent_channels=16, base_channels=4, channel_mult=(1, 1, 1, 1, 1)))
    return save_sigma_vae(vae, tmp_path_factory.mktemp("tok") / "vae.safetensors")


def import_args(checkpoint: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return ["import-reference", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer), "--out", str(out),
            "--num-heads", "4", "--image-size", "64", *extra]


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tokenizer_file) -> dict[str, Path]:
    runs = {}
    for family in ("transformer", "dit"):
        out = tmp_path_factory.mktemp("imported") / family
        assert run_main(import_args(FIXTURES / f"{family}_p1_run" / "latest", tokenizer_file, out)) == 0
        runs[family] = out
    return runs


@pytest.mark.parametrize("family", ["transformer", "dit"])
def test_imported_run_samples_with_the_ema_and_carries_scale_bias_and_step(imported, family):
    golden = load_file(FIXTURES / f"{family}_p1_run.golden.safetensors")
    ckpt = Checkpoint(list_checkpoints(imported[family])[-1].path)
    assert ckpt.step == 123 and ckpt.tokenizer["scale"] == pytest.approx(0.31) and ckpt.tokenizer["bias"] == -0.05
    outputs = {}
    for ema in (True, False):
        model = load_trained(imported[family], ema=ema).model.double()  # EMA by default, as sampling uses
        with torch.no_grad():
            if family == "transformer":
                out = model.forward_parallel(patchify(golden["in.x_start"], 1), golden["in.y"])
                outputs[ema] = (out, head_outputs(model, golden["in.x_noise"], golden["in.t"], out))
            else:
                outputs[ema] = (model.denoise(golden["in.x_noise"], golden["in.t"], golden["in.y"]),)
    names = ("forward_parallel", "forward_diffusion") if family == "transformer" else ("forward",)
    for weights, key in ((True, "ema"), (False, "raw")):
        for got, name in zip(outputs[weights], names, strict=True):
            # Outputs of the float32 checkpoint run in float64: against the f64 goldens of the same float32 weights.
            assert rel(got, golden[f"{key}.f64.{name}"]) < TOLERANCE, (key, name)
    assert rel(outputs[True][-1], golden[f"raw.f64.{names[-1]}"]) > 0.1  # the EMA really is other weights
    record = json.loads((imported[family] / "import.json").read_text())
    assert record["step"] == 123 and any("random_states" in n for n in record["not_imported"])


def test_imported_run_generates_and_resumes_training(imported, tmp_path):
    run = imported["transformer"]
    out = tmp_path / "samples.npz"
    sample_many(SampleManyConfig(checkpoint=str(run), out=str(out), num_images=4, images_per_shard=4, batch_size=4,
                                 sampler=SamplerConfig(num_steps=2, cfg_scale=2.0), device="cpu", progress=False))
    with np.load(out) as data:
        assert data["arr_0"].shape == (4, 64, 64, 3)
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    data = make_image_folder(tmp_path / "data", per_class=4, size=64)
    code = run_main(["train", "--config", str(resumed / "recipe.yaml"), "--output-dir", str(resumed),
                     "--resume", "auto", "--data.path", str(data), "--data.num-classes", "10", "--data.num-workers",
                     "0", "--max-steps", "125", "--batch-size", "4", "--mixed-precision", "no", "--no-progress",
                     "--no-tensorboard", "--sample-every", "0"])
    assert code == 0
    steps = [e.step for e in list_checkpoints(resumed)]
    assert steps[-1] == 125
    before, after = Checkpoint(list_checkpoints(run)[-1].path), Checkpoint(list_checkpoints(resumed)[-1].path)
    assert any(not torch.equal(before.model[k], after.model[k]) for k in before.model)  # it trained on


@pytest.fixture
def corrupt_run(tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "transformer_p1_run", run)
    for path in run.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return run / "checkpoint-123"


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_corrupt_or_unsafe_reference_checkpoints_are_refused(corrupt_run, tokenizer_file, tmp_path, capsys):
    out = tmp_path / "out"
    # A pickle in other_state.pth that would run code on a plain torch.load.
    marker = tmp_path / "pwned"
    torch.save({"scaling_factor": 0.3, "bias_factor": 0.0, "steps": 1, "ema": _RunsCode(str(marker))},
               corrupt_run / "other_state.pth")
    assert run_main(import_args(corrupt_run, tokenizer_file, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "refusing to unpickle" in err and "\n" not in err
    assert not marker.exists() and not out.exists()
    # No other_state.pth at all.
    (corrupt_run / "other_state.pth").unlink()
    assert run_main(import_args(corrupt_run, tokenizer_file, out)) == 2
    assert "no other_state.pth" in capsys.readouterr().err
    # A renamed key in the weights.
    shutil.copy(FIXTURES / "transformer_p1_run" / "checkpoint-123" / "other_state.pth", corrupt_run)
    weights = load_file(corrupt_run / "model.safetensors")
    weights["blocks.0.attn.qkv_renamed.weight"] = weights.pop("blocks.0.attn.qkv.weight")
    save_file(weights, str(corrupt_run / "model.safetensors"))
    assert run_main(import_args(corrupt_run, tokenizer_file, out)) == 2
    err = capsys.readouterr().err
    assert "missing ['blocks.0.attn.qkv.weight']" in err and "qkv_renamed" in err
    # A preset that does not fit the weights; a DiT at another image size than it was trained at.
    shutil.copy(FIXTURES / "transformer_p1_run" / "checkpoint-123" / "model.safetensors", corrupt_run)
    assert run_main(import_args(corrupt_run, tokenizer_file, out, "--preset", "Transformer-L")) == 2
    assert "is not a Transformer-L: depth: 2 in the weights, 32 in Transformer-L" in capsys.readouterr().err
    dit = FIXTURES / "dit_p1_run" / "checkpoint-123"
    assert run_main(import_args(dit, tokenizer_file, out, "--image-size", "128")) == 2
    assert "pos_embed has 16 positions but the tokenizer gives 64 tokens" in capsys.readouterr().err
    assert not out.exists()


def test_reference_presets_are_registered_and_the_command_listed(capsys):
    assert set(REFERENCE_PRESETS) <= set(list_models())
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "import-reference" in capsys.readouterr().out
