"""`latentlm sweep`: a grid of sampler settings scored per point; a killed sweep resumes without redoing points.

As a script (``python tests/test_sweep.py MODE CONFIG_JSON``) it runs the sweep in a fresh process with
a 1-epoch digit classifier; ``kill`` SIGKILLs the process right after the first shard of the third point
is written (two points are finished and scored, the third is half generated).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from latentlm.checkpoint import mark_complete
from latentlm.commands.sweep import METRICS, best_points, sweep
from latentlm.config import ConfigError, SamplerConfig, SweepConfig, from_dict, to_dict
from latentlm.metrics import digits as digits_metrics
from test_sample_many import make_checkpoint, subprocess_env

THIS = str(Path(__file__).resolve())


def digits_checkpoint(root: Path, preset: str = "Transformer-Tiny") -> Path:
    """An untrained tiny model on 16x16 'digits' (identity tokenizer): the digits metrics score it offline."""
    path = make_checkpoint(root, preset=preset, num_classes=10, image_size=16)
    config = path / "config.json"
    config.write_text(config.read_text().replace('"kind": "folder"', '"kind": "digits"'))  # same size
    mark_complete(path, 7, 1)  # the marker records the sha256 of the edited file
    return path


def sweep_config(checkpoints: list[Path], out: Path, **overrides) -> SweepConfig:
    """2 scales x 2 step counts; 20 images per point in 2 shards."""
    values = dict(checkpoints=tuple(str(c) for c in checkpoints), out=str(out), cfg_scales=(1.0, 2.0),
                  num_steps=(1, 2), per_class=2, images_per_shard=10, batch_size=10, device="cpu", progress=False)
    return SweepConfig(**(values | overrides))


def one_epoch_classifier():
    train = digits_metrics.train_digit_classifier
    return mock.patch.object(digits_metrics, "train_digit_classifier",
                             lambda *a, **k: train(*a, **{**k, "epochs": 1}))


def run_script(cfg: SweepConfig, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, THIS, mode, json.dumps(to_dict(cfg))], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return digits_checkpoint(tmp_path_factory.mktemp("run") / "tiny")


def test_sweep_scores_every_point_and_picks_the_best(checkpoint, tmp_path, capsys):
    dit = digits_checkpoint(tmp_path / "dit", preset="DiT-Tiny")
    cfg = sweep_config([checkpoint, dit], tmp_path / "sweep", cfg_schedules=("constant", "linear"))
    with one_epoch_classifier():
        points = sweep(cfg)
    # LatentLM: 2 schedules x 2 steps x 2 scales; DiT keeps the constant schedule only: 2 x 2.
    assert len(points) == 8 + 4 and len({p.key for p in points}) == 12
    assert all(p.metrics["digits_accuracy"] is not None and p.metrics["digits_frechet_ratio"] > 0 for p in points)
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [p["key"] for p in summary["points"]] == [p.key for p in points]
    for model, best in summary["best"].items():
        mine = [p for p in points if p.model == model]
        assert best["digits_frechet_ratio"]["value"] == min(p.metrics["digits_frechet_ratio"] for p in mine)
        assert best["digits_accuracy"]["value"] == max(p.metrics["digits_accuracy"] for p in mine)
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "digits_frechet_ratio" in table and table.count("DiT-Tiny") == 4
    # A point's file is an ordinary sample-many output; its scores match the point's.
    first = json.loads((tmp_path / "sweep" / "points" / f"{points[0].key}.eval.json").read_text())
    # (sample-many records the fused switch as it resolved on the device: off on a CPU)
    assert first["generation"]["sampler"] == {**to_dict(points[0].sampler), "fused": "off"}
    assert best_points(points) == summary["best"]


def test_killed_sweep_resumes_without_regenerating_finished_points(checkpoint, tmp_path):
    straight = tmp_path / "straight"
    with one_epoch_classifier():
        reference = sweep(sweep_config([checkpoint], straight))
    killed = sweep_config([checkpoint], tmp_path / "killed")
    run = run_script(killed, "kill")
    assert run.returncode == -signal.SIGKILL, run.stdout + run.stderr
    points_dir = tmp_path / "killed" / "points"
    done = sorted(p.name for p in points_dir.glob("*.eval.json"))
    assert len(done) == 2  # two points finished and scored before the kill
    kept = {p.name: p.stat().st_mtime_ns for p in points_dir.iterdir()
            if p.is_file() and not p.name.endswith(".lock")}  # the killed point's lock is taken over
    with one_epoch_classifier():
        resumed = sweep(killed)
    assert [p.reused for p in resumed] == [True, True, False, False]
    assert {name: (points_dir / name).stat().st_mtime_ns for name in kept} == kept  # finished points untouched
    for a, b in zip(reference, resumed, strict=True):
        assert (straight / "points" / f"{a.key}.npz").read_bytes() == (points_dir / f"{b.key}.npz").read_bytes()
        assert a.metrics == b.metrics


def test_bad_sweeps_are_refused_before_any_work(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="--checkpoints is required"):
        sweep(SweepConfig(out=str(tmp_path / "s")))
    with pytest.raises(ConfigError, match=r"checkpoints\[0\]=.*no complete checkpoint"):
        sweep(sweep_config([tmp_path / "nothing"], tmp_path / "s"))
    with pytest.raises(ConfigError, match=r"sampler='euler' does not fit a ddpm process"):
        sweep(sweep_config([checkpoint], tmp_path / "s", solvers=("euler",)))
    with pytest.raises(ConfigError, match="cfg_scales is empty"):
        sweep(sweep_config([checkpoint], tmp_path / "s", cfg_scales=()))
    assert not (tmp_path / "s").exists()
    assert set(METRICS) >= {"fid", "inception_score", "digits_accuracy", "digits_frechet_ratio"}


def test_cli_parses_the_sweep_grid(checkpoint):
    from latentlm import cli

    name, cfg = cli.parse(["sweep", "--checkpoints", str(checkpoint), "--cfg-scales", "1", "1.5",
                           "--num-steps", "10", "20", "--sampler.solver-order", "1"])
    assert name == "sweep" and cfg.cfg_scales == (1.0, 1.5) and cfg.num_steps == (10, 20)
    assert cfg.sampler == SamplerConfig(solver_order=1)


# ---------------------------------------------------------------------------------------------
# Script mode (run in a fresh process by the tests above)
# ---------------------------------------------------------------------------------------------


def _kill_after_first_shard_of_third_point() -> None:
    from latentlm.commands import sample_many

    original = sample_many._write_shard
    calls = {"n": 0}

    def write_then_die(path, images, labels):
        original(path, images, labels)
        calls["n"] += 1
        if calls["n"] == 5:  # points have 2 shards each: the third point's first shard
            os.kill(os.getpid(), signal.SIGKILL)

    sample_many._write_shard = write_then_die


if __name__ == "__main__":
    mode, config = sys.argv[1], from_dict(SweepConfig, json.loads(sys.argv[2]))
    if mode == "kill":
        _kill_after_first_shard_of_third_point()
    with one_epoch_classifier():
        sweep(config)
