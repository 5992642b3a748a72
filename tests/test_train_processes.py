"""Training in other processes: SIGTERM -> checkpoint and clean exit; 2-process CPU training under torchrun."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentlm.checkpoint import list_checkpoints
from latentlm.training.loop import EXIT_INTERRUPTED
from latentlm.training.model import train
from train_helpers import (
    assert_states_equal,
    make_image_folder,
    subprocess_env,
    tiny_config,
    wait_for,
)

HELPER = str(Path(__file__).with_name("train_helpers.py"))


def test_sigterm_checkpoints_at_step_boundary_and_resume_is_exact(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, HELPER, "sigterm", str(out), str(data)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(out / "ready", proc)  # the process is inside step 3 (drawing its first micro-batch)
        proc.send_signal(signal.SIGTERM)
        (out / "go").touch()
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
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
