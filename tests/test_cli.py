"""The command line: recipes + flags -> configs, invalid options -> exit 2, and `latentlm sample`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from latentlm import cli, recipes
from latentlm.config import TrainConfig
from latentlm.tokenizers import IdentityTokenizer
from latentlm.training.model import train
from latentlm.visualize import sample_grid
from train_helpers import cli_args, make_image_folder, subprocess_env, tiny_config

RECIPES = sorted(recipes.shipped().values())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def test_recipe_values_are_defaults_that_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: DiT-Tiny, depth: 2, process: {kind: flow}}\n"
                      "lr: 1e-4\nbatch-size: 64\nbetas: [0.8, 0.9]\nsampler: {sampler: euler}\n")
    name, cfg = cli.parse(["train", "--config", str(recipe), "--lr", "0.5", "--model.hidden-size", "64"])
    assert name == "train" and isinstance(cfg, TrainConfig)
    assert cfg.config == str(recipe)
    assert cfg.lr == 0.5 and cfg.batch_size == 64 and cfg.betas == (0.8, 0.9)  # YAML's "1e-4" string became a float
    assert (cfg.model.name, cfg.model.family, cfg.model.depth, cfg.model.hidden_size) == ("DiT-Tiny", "dit", 2, 64)
    assert cfg.model.mlp_ratio == 4.0  # from the DiT-Tiny preset, not the ModelConfig default
    assert cfg.model.process.kind == "flow" and cfg.sampler.sampler == "euler"
    # --model.name on the command line picks the preset; the recipe's other model values still apply.
    _, cfg = cli.parse(["train", "--config", str(recipe), "--model.name=Transformer-Tiny"])
    assert (cfg.model.family, cfg.model.depth, cfg.model.head_depth) == ("latentlm", 2, 2)
    # No recipe: the default preset, resolved.
    _, cfg = cli.parse(["train"])
    assert cfg.model.name == "Transformer-Tiny" and cfg.lr == TrainConfig().lr


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_parse_and_validate(recipe):
    _, cfg = cli.parse(["train", "--config", str(recipe)])
    cfg.validate()
    assert cfg.model.name in recipe.read_text()


def test_commands_registry_is_extensible(monkeypatch):
    @dataclasses.dataclass
    class HelloConfig:
        name: str = "world"

    seen = []
    monkeypatch.setitem(cli.COMMANDS, "hello", cli.Command(HelloConfig, seen.append, "say hello"))
    assert cli.parse(["hello", "--name", "you"]) == ("hello", HelloConfig("you"))
    assert run_main(["hello"]) == 0 and seen == [HelloConfig()]


# ---------------------------------------------------------------------------------------------
# Invalid options: exit 2, one line, before any data or model work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch-size", "0"], "error: batch_size=0: must be >= 1"),
    (["--lr", "-1"], "error: lr=-1.0: must be a finite number > 0"),
    (["--lr", "nan"], "error: lr=nan: must be a finite number > 0"),
    (["--model.name", "Transformer-Huge"], "error: unknown model 'Transformer-Huge'; choose one of: Transformer-Tiny"),
    (["--data.path", "/no/such/dir"], "error: data.path=/no/such/dir: no such directory"),
    (["--data.image-size", "9", "--tokenizer.patch", "2"], "error: data.image_size: image_size=9 is not divisible by "
                                                            "the tokenizer's downsampling factor 2"),
    (["--model.name", "DiT-Tiny", "--sampler.cfg-schedule", "linear"], "error: sampler.cfg_schedule='linear' "
                                                                         "follows LatentLM's token order"),
    (["--model.process.kind", "flow"], "error: sampler: sampler='dpm_solver' does not fit a flow process"),
    (["--config", "/no/recipe.yaml"], "error: --config /no/recipe.yaml: no such recipe file"),
    (["--resume", "/no/run"], "error: resume=/no/run: no such checkpoint"),
])
def test_invalid_options_exit_2_with_one_line(tmp_path, data, monkeypatch, capsys, flags, message):
    import latentlm.training.model as train_module

    def forbidden(*args, **kwargs):
        raise AssertionError("data or model work started before validation")

    monkeypatch.setattr(train_module, "model_from_config", forbidden)
    monkeypatch.setattr(train_module, "build_dataset", forbidden)
    monkeypatch.setattr(train_module, "make_accelerator", forbidden)
    args = cli_args(tmp_path / "run", data)
    if flags[0] in ("--model.name", "--data.path", "--data.image-size"):  # replace the value cli_args set
        i = args.index(flags[0])
        del args[i:i + 2]
    assert run_main(args + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err, err


def test_unknown_recipe_key_exits_2(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("data: {pth: /x}\n")
    assert run_main(["train", "--config", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {recipe}: data.pth: unknown option; did you mean 'path'?"


def test_unknown_flag_exits_2(capsys):
    assert run_main(["train", "--batch-sise", "3"]) == 2


def test_divergence_exits_4(monkeypatch, capsys):
    from latentlm.training.loop import TrainingDiverged

    def diverge(cfg):
        raise TrainingDiverged("stopped at step 3: 3 consecutive steps had non-finite loss")

    monkeypatch.setitem(cli.COMMANDS, "train", dataclasses.replace(cli.COMMANDS["train"], run=diverge))
    assert run_main(["train"]) == 4
    assert capsys.readouterr().err.strip() == "error: stopped at step 3: 3 consecutive steps had non-finite loss"


# ---------------------------------------------------------------------------------------------
# Training and sampling end to end
# ---------------------------------------------------------------------------------------------


def test_train_then_sample_grid(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert run_main(cli_args(run, data, "--max-steps", "3", "--stop-at-step", "2")) == 0
    result = train(tiny_config(run, data, max_steps=3, resume="auto"))  # library call continues the CLI run
    assert result.step == 3

    out = tmp_path / "new" / "folder" / "grid.png"
    argv = ["sample", "--checkpoint", str(run), "--out", str(out), "--classes", "0", "2", "--per-class", "3",
            "--sampler.num-steps", "3", "--sampler.cfg-scale", "2.0", "--seed", "1", "--device", "cpu"]
    assert run_main(argv) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape[0] == 2 * (64 + 2) + 2  # two rows of 8x8 images shown at 64 px
    # The grid is the EMA model's: regenerate it in memory from the trained EMA weights.
    record = json.loads((result.checkpoint / "tokenizer.json").read_text())
    tokenizer = IdentityTokenizer(1)
    tokenizer.set_normalization(record["scale"], record["bias"])
    sampler = dataclasses.replace(tiny_config(run, data).sampler, num_steps=3, cfg_scale=2.0)
    expected = sample_grid(result.ema, tokenizer, [0, 2], 3, sampler, seed=1,
                             class_names=["class0", "class1", "class2"])
    assert np.array_equal(grid, np.asarray(expected))
    # Same seed -> same PNG; raw weights -> a different one.
    first = out.read_bytes()
    assert run_main(argv) == 0 and out.read_bytes() == first
    assert run_main([*argv, "--no-ema"]) == 0 and out.read_bytes() != first
    # Bad sampling options exit 2 before generating.
    capsys.readouterr()
    assert run_main([*argv[:5], "--classes", "7"]) == 2
    assert "classes [7] out of range: this model has classes 0..2" in capsys.readouterr().err
    assert run_main([*argv, "--sampler.sampler", "euler"]) == 2
    assert "does not fit a ddpm process" in capsys.readouterr().err


def test_console_module_runs(tmp_path):
    # The real entry point in a fresh process: `python -m latentlm.cli` with an invalid option.
    proc = subprocess.run([sys.executable, "-m", "latentlm.cli", "train", "--batch-size", "0"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: batch_size=0: must be >= 1"



def test_progress_bars_write_plain_lines_when_stderr_is_not_a_terminal(capsys):
    from latentlm.progress import progress_bar

    for _ in progress_bar(range(3), desc="work"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("work: 100%|") and "3/3" in err.splitlines()[-1]


def test_num_workers_default_leaves_a_core(monkeypatch):
    from latentlm.config import DataConfig, default_num_workers

    for cpus, workers in ((1, 0), (2, 1), (3, 2), (16, 4)):
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, n=cpus: set(range(n)), raising=False)
        assert default_num_workers() == workers and DataConfig().num_workers == workers
