"""Checkpoint files: atomic writes, completeness, pruning, and a run killed while writing one."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentlm import checkpoint as ckpt_io
from latentlm.io import atomic_write, write_json
from latentlm.training.model import train
from train_helpers import make_image_folder, subprocess_env, tiny_config, wait_for


def fake_checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint directory with small but real files (world size 1)."""
    path = ckpt_io.checkpoint_dir(output_dir, step)
    ckpt_io.begin_checkpoint(path)
    weights = {"w": torch.full((2, 3), float(step))}
    ckpt_io.write_main_files(path, model=weights, ema=weights, config={"train": {}}, tokenizer={"kind": "identity"},
                             state={"step": step}, optimizer={"state": {}}, schedule={"scheduler": {}})
    ckpt_io.write_rng(path, 0)
    if complete:
        ckpt_io.mark_complete(path, step, world_size=1)
    return path


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "state.json"
    write_json(target, {"v": 1})

    def broken(tmp: Path) -> None:
        tmp.write_text('{"v": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left behind


def test_completeness_problems_are_named(tmp_path):
    good = fake_checkpoint(tmp_path, 10)
    assert ckpt_io.checkpoint_problem(good) is None
    no_marker = fake_checkpoint(tmp_path, 20, complete=False)
    assert "no COMPLETE marker" in ckpt_io.checkpoint_problem(no_marker)
    truncated = fake_checkpoint(tmp_path, 30)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(10)
    assert "model.safetensors has 10 bytes, the marker says" in ckpt_io.checkpoint_problem(truncated)
    missing = fake_checkpoint(tmp_path, 40)
    (missing / "rng-rank0.pt").unlink()
    assert ckpt_io.checkpoint_problem(missing) == "rng-rank0.pt is missing"

    reasons: list[str] = []
    assert ckpt_io.latest_checkpoint(tmp_path, report=reasons.append) == good
    assert [r.split(": ", 1)[0].rsplit("/", 1)[1] for r in reasons] == ["step-00000040", "step-00000030",
                                                                         "step-00000020"]
    assert ckpt_io.resolve_checkpoint(tmp_path) == good
    with pytest.raises(ValueError, match="incomplete"):
        ckpt_io.resolve_checkpoint(no_marker)
    with pytest.raises(FileNotFoundError):
        ckpt_io.resolve_checkpoint(tmp_path / "elsewhere")


def test_mark_complete_refuses_missing_files(tmp_path):
    path = fake_checkpoint(tmp_path, 5, complete=False)
    with pytest.raises(RuntimeError, match=r"missing \['rng-rank1.pt'\]"):
        ckpt_io.mark_complete(path, 5, world_size=2)  # process 1 never wrote its RNG state
    assert not (path / ckpt_io.MARKER).exists()


def test_prune_keeps_last_complete(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 4, complete=False)  # being written: old ones must survive
    assert ckpt_io.prune_checkpoints(tmp_path, keep_last=2) == [ckpt_io.checkpoint_dir(tmp_path, 1)]
    assert [e.step for e in ckpt_io.list_checkpoints(tmp_path)] == [2, 3, 4]
    fake_checkpoint(tmp_path, 5)
    ckpt_io.prune_checkpoints(tmp_path, keep_last=2)  # stale incomplete step 4 goes too
    assert [e.step for e in ckpt_io.list_checkpoints(tmp_path)] == [3, 5]


def test_non_finite_weights_are_never_written(tmp_path):
    path = ckpt_io.checkpoint_dir(tmp_path, 1)
    ckpt_io.begin_checkpoint(path)
    bad = {"ok": torch.zeros(2), "w": torch.tensor([1.0, math.nan])}
    with pytest.raises(ckpt_io.NonFiniteWeightsError, match="model tensor 'w' has NaN"):
        ckpt_io.write_main_files(path, model=bad, ema=bad, config={}, tokenizer={}, state={}, optimizer={},
                                 schedule={})
    assert list(path.iterdir()) == []


def test_load_checkpoint_round_trip(tmp_path):
    path = fake_checkpoint(tmp_path, 7)
    loaded = ckpt_io.load_checkpoint(path)
    assert loaded.step == 7 and torch.equal(loaded.model["w"], torch.full((2, 3), 7.0))
    assert torch.equal(loaded.rng(0)["cpu"], ckpt_io.rng_state()["cpu"])
    assert loaded.rng(1) is None


def test_sigkill_while_writing_keeps_previous_checkpoint(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("train_helpers.py")), "sigkill", str(out),
                             str(data)], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for(out / "ready", proc)  # inside the second checkpoint (step 4): weights written, no marker
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait(timeout=30)
    run = out / "run"
    entries = ckpt_io.list_checkpoints(run)
    assert [(e.step, e.problem is None) for e in entries] == [(2, True), (4, False)]
    assert (entries[1].path / "model.safetensors").is_file()  # it died mid-write, not before

    with caplog.at_level(logging.INFO, logger="latentlm"):
        result = train(tiny_config(run, data, max_steps=7, checkpoint_every=2, resume="auto"))
    assert f"skipping incomplete checkpoint {entries[1].path}: no COMPLETE marker" in caplog.text
    assert f"resuming from {entries[0].path} (step 2)" in caplog.text
    assert result.step == 7 and len(result.losses) == 7
    assert [(e.step, e.problem) for e in ckpt_io.list_checkpoints(run)] == [(4, None), (6, None), (7, None)]
