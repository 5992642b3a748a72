"""Training in other processes: SIGTERM -> checkpoint and clean exit; 2-process CPU training under torchrun,
with DDP and with FSDP (sharded checkpoints, exact resume, resharding to one process, consolidated export)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentlm.checkpoint import Checkpoint, CorruptCheckpoint, list_checkpoints, load_trained
from latentlm.commands.export_weights import export_weights
from latentlm.config import ConfigError, ExportWeightsConfig
from latentlm.training.loop import EXIT_INTERRUPTED
from latentlm.training.model import train
from train_helpers import (
    assert_states_equal,
    make_image_folder,
    signal_at_pause,
    subprocess_env,
    tiny_config,
)

HELPER = str(Path(__file__).with_name("train_helpers.py"))


def test_sigterm_checkpoints_at_step_boundary_and_resume_is_exact(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, HELPER, "sigterm", str(out), str(data)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = signal_at_pause(proc, out, signal.SIGTERM)  # paused inside step 3 (its first micro-batch)
    assert proc.returncode == EXIT_INTERRUPTED, output
    assert "stopped by SIGTERM at step 3" in output
    assert [(e.step, e.problem) for e in list_checkpoints(out / "run")] == [(3, None)]  # the step in flight finished

    resumed = train(tiny_config(out / "run", data, max_steps=5, resume="auto"))
    straight = train(tiny_config(tmp_path / "straight", data, max_steps=5))
    assert resumed.step == straight.step == 5
    assert resumed.losses == straight.losses
    assert_states_equal(resumed.model.state_dict(), straight.model.state_dict(), "model")
    assert_states_equal(resumed.ema.state_dict(), straight.ema.state_dict(), "ema")


@pytest.mark.distributed
def test_two_process_cpu_training_keeps_ranks_equal(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          HELPER, "ddp", str(out), str(data)], env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    ranks = [load_file(out / f"final-rank{r}.safetensors") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert (out / "losses-rank0.txt").read_text() == (out / "losses-rank1.txt").read_text()
    newest = list_checkpoints(out / "run")[-1]
    assert newest.step == 3 and newest.problem is None
    assert {p.name for p in newest.path.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    # Both processes trained: the weights moved away from the step-2 checkpoint both agree on.
    step2 = load_file(list_checkpoints(out / "run")[0].path / "model.safetensors")
    assert any(not torch.equal(v, ranks[0][f"model.{k}"]) for k, v in step2.items())


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """Under torchrun with 2 CPU processes (gloo), AC on: FSDP 5 steps; FSDP stopped at step 3 and resumed to 5;
    DDP 5 steps (``train_helpers._fsdp``). Then one process resumes the step-3 checkpoint (``_fsdp_one_process``)."""
    root = tmp_path_factory.mktemp("fsdp")
    data = make_image_folder(root / "data")
    out = root / "out"
    out.mkdir()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          HELPER, "fsdp", str(out), str(data)], env=subprocess_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    one = subprocess.run([sys.executable, HELPER, "fsdp-one", str(out), str(data)], env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    states = {p.stem: torch.load(p, weights_only=True) for p in out.glob("*.pt")}
    return out, states


@pytest.mark.slow  # one torchrun launch of 4 runs (~45 s, shared)
@pytest.mark.distributed
def test_fsdp_trains_like_ddp(fsdp_runs):
    out, states = fsdp_runs
    fsdp, ddp = states["fsdp"], states["ddp"]
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
    for part in ("model", "ema"):
        assert fsdp[part].keys() == ddp[part].keys()
        for name, tensor in fsdp[part].items():
            assert torch.allclose(tensor, ddp[part][name], rtol=1e-4, atol=1e-6), f"{part}.{name}"
    moved = [not torch.equal(fsdp["model"][k], states["fsdp-stopped"]["model"][k]) for k in fsdp["model"]]
    assert any(moved)  # steps 4-5 trained
    assert (out / "fsdp" / "samples" / "step-00000005.png").is_file()  # the sharded EMA, gathered for the grid


@pytest.mark.slow  # one torchrun launch of 4 runs (~45 s, shared)
@pytest.mark.distributed
def test_fsdp_stop_and_resume_is_exact(fsdp_runs):
    out, states = fsdp_runs
    straight, resumed = states["fsdp"], states["fsdp-resumed"]
    assert resumed["losses"] == straight["losses"]
    assert_states_equal(resumed["model"], straight["model"], "model")
    assert_states_equal(resumed["ema"], straight["ema"], "ema")
    assert_states_equal(resumed["optimizer"], straight["optimizer"], "optimizer")
    # Sharded checkpoints: one DCP file per process, listed in the marker with every other file
    step3 = out / "resumed" / "checkpoints" / "step-00000003"
    marker = json.loads((step3 / "COMPLETE").read_text())
    on_disk = {p.relative_to(step3).as_posix() for p in step3.rglob("*") if p.is_file() and p.name != "COMPLETE"}
    assert set(marker["files"]) == on_disk
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "rng-rank1.pt"} <= on_disk
    assert not (step3 / "model.safetensors").exists()


@pytest.mark.slow  # one torchrun launch of 4 runs (~45 s, shared)
@pytest.mark.distributed
def test_fsdp_checkpoint_reads_consolidated_and_reshards_to_one_process(fsdp_runs, tmp_path):
    out, states = fsdp_runs
    step3, stopped = out / "resumed" / "checkpoints" / "step-00000003", states["fsdp-stopped"]
    saved = Checkpoint(step3)
    assert saved.sharded
    assert_states_equal(saved.model, stopped["model"], "model")
    assert_states_equal(saved.ema, stopped["ema"], "ema")
    # One process loads the 2-process shards exactly (DCP reshards), optimizer included, and trains on
    assert_states_equal(states["one-step3"], {k: stopped[k] for k in ("model", "ema", "optimizer")}, "one process")
    assert states["one-step5"]["step"] == 5 and all(math.isfinite(v) for v in states["one-step5"]["losses"])
    bf16 = states["one-bf16"]  # bf16 mixed precision: sharded fp32 master weights, losses like DDP's autocast
    assert bf16["fsdp"]["dtypes"] == bf16["ddp"]["dtypes"] == ["torch.float32"]
    assert bf16["fsdp"]["losses"] == pytest.approx(bf16["ddp"]["losses"], rel=2e-2)
    corrupt = shutil.copytree(step3, tmp_path / "corrupt" / "checkpoints" / step3.name)
    shard = corrupt / "sharded" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped: only the sha256 in the marker tells
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="__1_0.distcp is corrupt"):
        _ = Checkpoint(corrupt).ema
    direct = load_trained(out / "resumed")  # sampling reads a sharded checkpoint as it is
    assert_states_equal(direct.model.state_dict(), states["fsdp-resumed"]["ema"], "sharded ema, sampled")
    # export-weights: consolidated safetensors that sampling loads
    exported = export_weights(ExportWeightsConfig(checkpoint=str(out / "resumed"), out=str(tmp_path / "export")))
    assert exported.name == "step-00000005" and not Checkpoint(exported).sharded
    assert_states_equal(load_file(exported / "ema.safetensors"), states["fsdp-resumed"]["ema"], "exported ema")
    trained = load_trained(tmp_path / "export")
    assert_states_equal(trained.model.state_dict(), states["fsdp-resumed"]["ema"], "sampled ema")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        export_weights(ExportWeightsConfig(checkpoint=str(out / "resumed"), out=str(tmp_path / "export")))


@pytest.mark.slow  # Inductor compiles the FSDP model's forward and backward on the CPU (~45 s)
def test_fsdp_with_compile_trains_like_eager(tmp_path):
    data = make_image_folder(tmp_path / "data")
    run = subprocess.run([sys.executable, HELPER, "fsdp-compiled", str(tmp_path), str(data)], env=subprocess_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    losses = torch.load(tmp_path / "compiled.pt", weights_only=True)
    assert len(losses["compiled"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
