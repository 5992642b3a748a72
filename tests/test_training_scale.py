"""Training at scale, the single-process parts: activation checkpointing gives the same loss and gradients and
saves less; the compiled loss equals eager; the trainer's switches reach the model and the optimizer."""

from __future__ import annotations

import json

import pytest
import torch

from latentlm import cli, get_config, list_models, model_from_config
from latentlm.checkpoint import SHARDED_DIR, Checkpoint, checkpoint_problem, mark_complete
from latentlm.commands.export_weights import export_weights
from latentlm.config import ConfigError, ExportWeightsConfig
from latentlm.memory import GiB, format_plan, plan_memory, saved_tensor_bytes
from latentlm.training.model import train
from train_helpers import assert_states_equal, make_image_folder, tiny_config

SMALL = dict(in_channels=4, input_size=8, num_classes=10, hidden_size=64, num_heads=4, depth=2)
FAMILIES = {"latentlm": ("Transformer-Tiny", dict(head_depth=2, batch_mul=2)), "dit": ("DiT-Tiny", {})}


def small_model(family: str) -> torch.nn.Module:
    name, extra = FAMILIES[family]
    torch.manual_seed(0)
    return model_from_config(get_config(name, **SMALL, **extra)).train()


def loss_and_grads(model: torch.nn.Module, loss_fn=None, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training loss (label dropout, timesteps and noise drawn from ``seed``) and its gradients."""
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(123)
    latents, labels = torch.randn(3, 4, 8, 8, generator=generator), torch.randint(0, 10, (3,), generator=generator)
    torch.manual_seed(seed)
    loss = (model if loss_fn is None else loss_fn)(latents, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_activation_checkpointing_same_loss_and_gradients(family):
    model = small_model(family)
    loss, grads = loss_and_grads(model)
    model.set_activation_checkpointing(True)
    loss_ac, grads_ac = loss_and_grads(model)
    assert torch.allclose(loss_ac, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        assert torch.allclose(grads_ac[name], grad, rtol=1e-5, atol=1e-7), name
    assert any(g.abs().max() > 0 for g in grads.values())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_activation_checkpointing_keeps_only_block_inputs(family):
    """Checkpointing is really on: far fewer bytes are saved for backward, and none without autograd."""
    model = small_model(family)
    latents, labels = torch.randn(3, 4, 8, 8), torch.randint(0, 10, (3,))
    full = saved_tensor_bytes(model, lambda: model(latents, labels)).activations
    model.set_activation_checkpointing(True)
    checkpointed = saved_tensor_bytes(model, lambda: model(latents, labels)).activations
    assert checkpointed < 0.6 * full
    with torch.no_grad():  # inference is untouched: no checkpoint is entered
        torch.manual_seed(0)
        a = model(latents, labels)
        model.set_activation_checkpointing(False)
        torch.manual_seed(0)
        assert torch.equal(model(latents, labels), a)


@pytest.mark.slow  # about a minute of Inductor C++ compilation on a CPU; DiT's compiled step is checked on the GPU
def test_compiled_loss_equals_eager():
    torch._dynamo.reset()
    model = small_model("latentlm")
    loss, grads = loss_and_grads(model)
    # Inductor draws random numbers with its own generator unless told to call torch's: the same draws as eager
    with torch._inductor.config.patch(fallback_random=True):
        loss_c, grads_c = loss_and_grads(model, torch.compile(model, dynamic=False))
    assert torch.allclose(loss_c, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grads_c[name], grad, rtol=1e-4, atol=1e-6), name


def test_trainer_switches_reach_model_and_optimizer(tmp_path):
    data = make_image_folder(tmp_path / "data")
    plain = train(tiny_config(tmp_path / "plain", data, max_steps=2))
    result = train(tiny_config(tmp_path / "ac", data, max_steps=2, activation_checkpointing=True))
    assert result.model.activation_checkpointing and result.model.head.activation_checkpointing
    assert not plain.model.activation_checkpointing
    group = result.optimizer.param_groups[0]
    assert group["foreach"] and not group["fused"]  # CPU: multi-tensor AdamW (fused is for CUDA)
    # Same run, same numbers: checkpointing changes memory, not the arithmetic
    assert result.losses == pytest.approx(plain.losses, rel=1e-6)
    for (name, a), b in zip(plain.model.state_dict().items(), result.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


# ---------------------------------------------------------------------------------------------
# The commands: plan-memory, export-weights; options that cannot work
# ---------------------------------------------------------------------------------------------


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


def test_plan_memory_prints_the_planner_numbers(capsys):
    args = ["plan-memory", "--model", "Transformer-3B", "--gpus", "8", "--batch-size", "256", "--strategy", "fsdp"]
    assert run_main([*args, "--activation-checkpointing"]) == 0
    out = capsys.readouterr().out
    plan = plan_memory(get_config("Transformer-3B"), 8, 256, strategy="fsdp", activation_checkpointing=True)
    row = next(line for line in out.splitlines() if line.startswith("| Transformer-3B"))
    assert row == format_plan([plan]).splitlines()[-1]
    assert f"| {plan.weights / GiB:.1f} | {plan.gradients / GiB:.1f} | {plan.optimizer / GiB:.1f} |" in row
    assert row.endswith("| yes |") and "fits: Transformer-3B" in out
    assert run_main(["plan-memory", "--model", "Transformer-3B", "--gpus", "1", "--batch-size", "256"]) == 1
    assert "does not fit: Transformer-3B" in capsys.readouterr().out


def test_plan_memory_all_presets(capsys):
    run_main(["plan-memory", "--model", "all", "--gpus", "8", "--batch-size", "256", "--strategy", "fsdp"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == list_models()


@pytest.mark.parametrize(("argv", "message"), [
    (["plan-memory", "--model", "Transformer-Huge"], "error: model=Transformer-Huge: unknown preset; choose 'all'"),
    (["plan-memory", "--gpus", "0"], "error: gpus=0: must be >= 1"),
    (["plan-memory", "--gpus", "3", "--batch-size", "256"], "error: batch_size=256 is not divisible by gpus x"),
    (["plan-memory", "--gpu-memory-gb", "-1"], "error: gpu_memory_gb=-1.0: must be a number > 0"),
    (["export-weights", "--checkpoint", "/no/run", "--out", "x"], "error: checkpoint=/no/run: no such directory"),
    (["train", "--strategy", "fsdp", "--mixed-precision", "fp16"], "error: strategy=fsdp with mixed_precision=fp16"),
])
def test_bad_values_exit_2_with_one_line(argv, message, capsys):
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err, err


def test_export_refuses_an_incomplete_checkpoint(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "step-00000002").mkdir(parents=True)
    assert run_main(["export-weights", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "step-00000002"),
                     "--out", str(tmp_path / "out")]) == 2
    assert "is incomplete: no COMPLETE marker" in capsys.readouterr().err


def test_resume_refuses_exports_and_the_other_strategy(tmp_path):
    data = make_image_folder(tmp_path / "data")
    run = train(tiny_config(tmp_path / "run", data, max_steps=2))
    exported = export_weights(ExportWeightsConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "export")))
    assert_states_equal(Checkpoint(exported).ema, run.ema.state_dict(), "exported EMA")
    assert not (exported / "optimizer.pt").exists()
    with pytest.raises(ConfigError, match="holds exported weights only"):
        train(tiny_config(tmp_path / "export", data, max_steps=3, resume="auto"))
    with pytest.raises(ConfigError, match=r"by a --strategy ddp run \(not sharded\); resume it with --strategy ddp"):
        train(tiny_config(tmp_path / "run", data, max_steps=3, resume="auto", strategy="fsdp"))


def test_sharded_marker_needs_the_dcp_metadata_and_lists_subfolders(tmp_path):
    path = tmp_path / "step-00000001"
    (path / SHARDED_DIR).mkdir(parents=True)
    for name in ["config.json", "tokenizer.json", "state.json", "schedule.pt", "rng-rank0.pt",
                 f"{SHARDED_DIR}/__0_0.distcp"]:
        (path / name).write_text("x")
    with pytest.raises(RuntimeError, match=r"missing \['sharded/.metadata'\]"):
        mark_complete(path, 1, 1)
    (path / SHARDED_DIR / ".metadata").write_text("xy")
    mark_complete(path, 1, 1)
    assert json.loads((path / "COMPLETE").read_text())["files"]["sharded/.metadata"]["size"] == 2
    assert checkpoint_problem(path) is None
    (path / SHARDED_DIR / "__0_0.distcp").unlink()  # a lost shard makes the checkpoint incomplete
    assert checkpoint_problem(path) == "sharded/__0_0.distcp is missing"
