"""Bad input on every command: exit code 2, exactly one ``error:`` line, no traceback, nothing written or damaged.

The table runs each command line in-process through ``latentlm.cli.main`` (fast); a few run as real
subprocesses. Below it, the bugs of the hardening issue are each pinned by a test of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latentlm import checkpoint, cli
from latentlm.config import ConfigError, ProcessConfig, SigmaVAEConfig, TrainConfig
from latentlm.data.images import ImageFolder
from latentlm.lock import LOCK_FILE
from latentlm.tokenizers import IdentityTokenizer, tokenizer_record
from latentlm.tokenizers.sigma_vae import SigmaVAE, save_sigma_vae
from latentlm.training.model import train
from test_kl16 import tiny_ldm
from train_helpers import cli_args, make_image_folder, subprocess_env, tiny_config

# ---------------------------------------------------------------------------------------------
# The world the bad inputs are run against: data, a trained run, tokenizer files, damaged copies
# ---------------------------------------------------------------------------------------------


def _corrupt_header(path: Path) -> None:
    """Overwrite bytes 8..40 (the start of a safetensors JSON header) with 0xFF: same size, unreadable."""
    blob = bytearray(path.read_bytes())
    blob[8:40] = b"\xff" * 32
    path.write_bytes(bytes(blob))


def _run_copy(root: Path, name: str, edit) -> Path:
    """A copy of the trained run whose newest checkpoint ``edit(checkpoint_dir)`` changes."""
    run = root / name
    shutil.copytree(root / "run", run)
    edit(checkpoint.latest_checkpoint(run))
    return run


def _reseal(path: Path) -> None:
    """Mark an edited checkpoint complete again, as if it had been written that way."""
    checkpoint.mark_complete(path, int(json.loads((path / "state.json").read_text())["step"]), world_size=1)


def _mismatched_weights(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["train"]["model"]["depth"] = 2  # the weights have one block
    (path / "config.json").write_text(json.dumps(config))
    _reseal(path)


def _pickled_optimizer(path: Path) -> None:
    torch.save({"state": {}, "param_groups": [], "note": pathlib.PurePosixPath("x")}, path / "optimizer.pt")
    _reseal(path)


def _moved_tokenizer(path: Path) -> None:
    record = json.loads((path / "tokenizer.json").read_text())
    record.update(kind="sigma_vae", source=str(path.parents[3] / "moved-away" / "vae.safetensors"))
    (path / "tokenizer.json").write_text(json.dumps(record))
    _reseal(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    data = make_image_folder(root / "data")
    train(tiny_config(root / "run", data, max_steps=2))
    w = {"data": data, "run": root / "run"}
    w["badema"] = _run_copy(root, "badema", lambda p: _corrupt_header(p / "ema.safetensors"))
    w["mismatch"] = _run_copy(root, "mismatch", _mismatched_weights)
    w["pickled"] = _run_copy(root, "pickled", _pickled_optimizer)
    w["movedtok"] = _run_copy(root, "movedtok", _moved_tokenizer)
    torch.manual_seed(0)
    w["sigma"] = save_sigma_vae(SigmaVAE(SigmaVAEConfig(latent_channels=4, base_channels=8, channel_mult=(1, 2))),
                                root / "vae.safetensors")
    w["sigma_bad"] = root / "vae-bad.safetensors"
    shutil.copy(w["sigma"], w["sigma_bad"])
    _corrupt_header(w["sigma_bad"])
    ldm = tiny_ldm(ch=32, ch_mult=(1, 2), blocks=1, z=4, enc_attn=(), dec_attn=()).state_dict()
    renamed = {("encoder.conv_in.weihgt" if k == "encoder.conv_in.weight" else k): v for k, v in ldm.items()}
    save_file(renamed, str(root / "kl16-renamed.safetensors"))
    reshaped = {**ldm, "decoder.conv_out.weight": torch.zeros(3, 7, 3, 3)}
    save_file(reshaped, str(root / "kl16-shape.safetensors"))
    w["kl16_renamed"], w["kl16_shape"] = root / "kl16-renamed.safetensors", root / "kl16-shape.safetensors"
    np.savez(root / "objects.npz", arr_0=np.array([{"a": 1}, None], dtype=object))
    w["objects"] = root / "objects.npz"
    w["root"] = root
    return w


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file's size, modification time and content hash."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).digest())
            for p in files}


# ---------------------------------------------------------------------------------------------
# The table: (id, command line, what the error line must say, files written in {in} first)
# {out} holds no file afterwards (but released run locks); {train} expands to a complete valid `latentlm train` line.
# ---------------------------------------------------------------------------------------------

TRAIN = "{train}"
CASES = [
    # train: flags
    ("train-unknown-flag", f"{TRAIN} --batch-sise 3", "did you mean '--batch-size'?"),
    ("train-non-integer", f"{TRAIN} --model.depth 1.5", "--model.depth: expected an integer, got '1.5'"),
    ("train-bool-with-value", f"{TRAIN} --data.hflip no", "pass one of --data.hflip / --data.no-hflip"),
    ("train-literal", f"{TRAIN} --mixed-precision fp17", "not a choice; choose one of 'no', 'fp16', 'bf16'"),
    ("train-tuple-length", f"{TRAIN} --betas 0.9", "--betas: expected a list of 2 values"),
    ("train-not-a-number", f"{TRAIN} --lr fast", "--lr: expected a number, got 'fast'"),
    ("train-stray-value", "train stray", "unexpected value 'stray'"),
    ("unknown-command", "trian --lr 1", "unknown command 'trian'; did you mean 'train'?"),
    ("train-missing-value", f"{TRAIN} --seed", "--seed: expected one value"),
    ("no-command", "", "Missing subcommand"),
    ("sample-required", "sample --out {out}/g.png", "Missing from latentlm sample: --checkpoint"),
    # train: contradictions
    ("train-fewer-classes", f"{TRAIN} --data.num-classes 2", "data.num_classes=2 contradicts the data"),
    ("train-one-class", f"{TRAIN} --data.num-classes 1", "data.num_classes=1 contradicts the data"),
    ("train-family", f"{TRAIN} --model.family dit", "contradicts the preset model.name='Transformer-Tiny'"),
    ("train-negative-cfg", f"{TRAIN} --sampler.cfg-scale -1", "cfg_scale=-1.0: must be >= 0"),
    ("train-linear-betas", f"{TRAIN} --model.process.beta-schedule linear --model.process.num-train-timesteps 10 "
                           "--sampler.num-steps 5", "makes the last beta 2 >= 1"),
    ("train-identity-patch-and-file", f"{TRAIN} --tokenizer.path {{sigma}} --tokenizer.patch 2", "drop one of the two"),
    ("train-wrong-kind", f"{TRAIN} --tokenizer.kind kl16 --tokenizer.path {{sigma}}", "is a sigma_vae checkpoint"),
    ("train-not-a-cache", f"{TRAIN} --data.kind cached", "no manifest.json"),
    ("train-no-data", f"{TRAIN} --data.path {{in}}/nothing", "no such directory"),
    # train: files
    ("train-kl16-renamed-key", f"{TRAIN} --tokenizer.path {{kl16_renamed}}", "kl16-renamed.safetensors"),
    ("train-kl16-wrong-shape", f"{TRAIN} --tokenizer.kind kl16 --tokenizer.path {{kl16_shape}}",
     "kl16-shape.safetensors"),
    ("train-sigma-corrupt", f"{TRAIN} --tokenizer.kind sigma_vae --tokenizer.path {{sigma_bad}}",
     "vae-bad.safetensors"),
    ("train-resume-pickle", f"{TRAIN} --resume {{pickled}}", "optimizer.pt"),
    ("train-resume-bitrot", f"{TRAIN} --resume {{badema}}", "ema.safetensors"),
    ("train-resume-missing", f"{TRAIN} --resume {{in}}/none", "no such checkpoint or run directory"),
    # train: recipes
    ("recipe-bool", f"{TRAIN} --config {{in}}/r.yaml", "r.yaml: data.hflip: expected true or false",
     "data: {hflip: maybe}"),
    ("recipe-model-scalar", f"{TRAIN} --config {{in}}/r.yaml", "pick a preset with `model: {name: DiT-Tiny}`",
     "model: DiT-Tiny"),
    ("recipe-section-scalar", f"{TRAIN} --config {{in}}/r.yaml", "data is a section of options", "data: 3"),
    ("recipe-fraction", f"{TRAIN} --config {{in}}/r.yaml", "r.yaml: batch_size: expected an integer, got 8.5",
     "batch_size: 8.5"),
    ("recipe-unknown-key", f"{TRAIN} --config {{in}}/r.yaml", "r.yaml: data.pth: unknown option; did you mean 'path'?",
     "data: {pth: x}"),
    ("recipe-nested-key", f"{TRAIN} --config {{in}}/r.yaml",
     "r.yaml: hflip: unknown option; did you mean 'data.hflip'?", "hflip: false"),
    ("recipe-yaml", f"{TRAIN} --config {{in}}/r.yaml", "not valid YAML", "a: [1"),
    ("recipe-list", f"{TRAIN} --config {{in}}/r.yaml", "a recipe is a mapping of options", "- a"),
    ("recipe-literal", f"{TRAIN} --config {{in}}/r.yaml", "r.yaml: mixed_precision: 'maybe' is not a choice",
     "mixed_precision: maybe"),
    ("recipe-string", f"{TRAIN} --config {{in}}/r.yaml", "r.yaml: tokenizer.path: expected a string",
     "tokenizer: {path: 5}"),
    ("recipe-null", f"{TRAIN} --config {{in}}/r.yaml", "r.yaml: lr: expected a number, got an empty value", "lr:"),
    ("recipe-name", f"{TRAIN} --config digit-tiny", "did you mean 'digits-tiny'?"),
    # train-tokenizer
    ("tok-literal", "train-tokenizer --output-dir {out} --vae.variant cnn", "'cnn' is not a choice"),
    ("tok-tuple-item", "train-tokenizer --output-dir {out} --vae.channel-mult 1 x",
     "channel-mult[1]: expected an integer"),
    ("tok-divisible", "train-tokenizer --output-dir {out} --data.image-size 15", "not divisible"),
    ("tok-unknown", "train-tokenizer --output-dir {out} --prior-weigth 1", "did you mean '--prior-weight'?"),
    ("tok-bool-word", "train-tokenizer --output-dir {out} --cpu yes", "pass one of --cpu / --no-cpu"),
    # sample
    ("sample-missing", "sample --checkpoint {in}/none --out {out}/g.png", "no complete checkpoint"),
    ("sample-bitrot", "sample --checkpoint {badema} --out {out}/g.png --device cpu", "ema.safetensors"),
    ("sample-mismatch", "sample --checkpoint {mismatch} --out {out}/g.png --device cpu", "do not fit"),
    ("sample-device", "sample --checkpoint {run} --out {out}/g.png --device cuda:7", "device='cuda:7'"),
    ("sample-device-name", "sample --checkpoint {run} --out {out}/g.png --device gpu", "device='gpu': not a device"),
    ("sample-negative-cfg", "sample --checkpoint {run} --out {out}/g.png --device cpu --classes 0 "
                            "--sampler.cfg-scale -2",
     "must be >= 0"),
    ("sample-moved-tokenizer", "sample --checkpoint {movedtok} --out {out}/g.png --device cpu", "--tokenizer-path"),
    ("sample-class", "sample --checkpoint {run} --out {out}/g.png --device cpu --classes 7", "out of range"),
    ("sample-png", "sample --checkpoint {run} --out {out}/g.jpg", "must be a .png path"),
    ("sample-solver", "sample --checkpoint {run} --out {out}/g.png --device cpu --classes 0 "
                      "--sampler.sampler euler",
     "does not fit a ddpm process"),
    # sample-many
    ("many-bitrot", "sample-many --checkpoint {badema} --out {out}/s.npz --device cpu", "ema.safetensors"),
    ("many-npz", "sample-many --checkpoint {run} --out {out}/s.png", "must end in .npz"),
    ("many-moved-tokenizer", "sample-many --checkpoint {movedtok} --out {out}/s.npz --device cpu",
     "--tokenizer-path"),
    ("many-tokenizer-path", "sample-many --checkpoint {movedtok} --out {out}/s.npz --device cpu --tokenizer-path "
                            "{in}/none.safetensors", "none.safetensors"),
    ("many-per-class", "sample-many --checkpoint {run} --out {out}/s.npz --per-class 0", "per_class=0"),
    # evaluate
    ("eval-object-npz", "evaluate --out {objects} --reference {objects} --results {out}/r.json", "objects.npz"),
    ("eval-missing", "evaluate --out {out}/none.npz --reference {objects}", "do not exist"),
    ("eval-images", "evaluate --checkpoint {run} --out {out}/s.npz --eval-images 1", "need at least 2 images"),
    # sweep
    ("sweep-no-checkpoints", "sweep --out {out}/sw", "--checkpoints is required"),
    ("sweep-negative-cfg", "sweep --checkpoints {run} --cfg-scales -1 2 --out {out}/sw", "must be finite and >= 0"),
    ("sweep-missing", "sweep --checkpoints {run} {in}/none --out {out}/sw --device cpu", "checkpoints[1]="),
    # cache-latents
    ("cache-from-cache", "cache-latents --out {out}/c --data.kind cached --data.path {in}", "encodes images"),
    ("cache-kl16-renamed", "cache-latents --out {out}/c --data.path {data} --tokenizer.kind kl16 --tokenizer.path "
                           "{kl16_renamed}", "kl16-renamed.safetensors"),
    ("cache-dtype", "cache-latents --out {out}/c --dtype float8", "'float8' is not a choice"),
    # vae-roundtrip
    ("roundtrip-corrupt", "vae-roundtrip --tokenizer {sigma_bad} --images {in}/x.png --out {out}/r.png",
     "vae-bad.safetensors"),
    ("roundtrip-no-images", "vae-roundtrip --tokenizer {sigma} --out {out}/r.png", "give image files"),
    ("roundtrip-directory-named-jpg", "vae-roundtrip --tokenizer {sigma} --folder {in}/folder --out {out}/r.png",
     "no images"),
    # scan-images
    ("scan-no-path", "scan-images", "pass --data.path ROOT"),
    ("scan-missing", "scan-images --data.path {in}/none", "is not a directory"),
    ("scan-batch", "scan-images --data.path {data} --batch-size 0", "batch_size=0"),
    # reference-stats
    ("refstats-out", "reference-stats --folder {data} --out {out}/r.txt", "must end in .npz"),
    ("refstats-size", "reference-stats --folder {data} --out {out}/r.npz --image-size 0", "must be >= 1"),
    # import-reference
    ("import-missing", "import-reference --checkpoint {in}/none --tokenizer {sigma} --out {out}/imp --preset "
                       "Transformer-L", "no such file or directory"),
    ("import-no-heads", "import-reference --checkpoint {run} --tokenizer {sigma} --out {out}/imp", "pass --preset"),
    # demo and recipes
    ("demo-eval-per-class", "demo --output-dir {out}/d --eval-per-class 3", "eval_per_class=3: must be >= 10"),
    ("demo-negative-cfg", "demo --output-dir {out}/d --cfg-scales -1", "guidance scale >= 0"),
    ("demo-negative-fixed-cfg", "demo --output-dir {out}/d --sampler.cfg-scale -1", "must be >= 0"),
    ("demo-dit-preset", "demo --output-dir {out}/d --dit-model Transformer-Tiny", "not a dit preset"),
    ("demo-unknown-preset", "demo --output-dir {out}/d --latentlm-model Transformer-Huge", "not a latentlm preset"),
    ("plan-memory-strategy", "plan-memory --strategy zero3", "'zero3' is not a choice"),
    ("plan-memory-gpus", "plan-memory --gpus two", "--gpus: expected an integer, got 'two'"),
    ("export-missing", "export-weights --checkpoint {in}/none --out {out}/exp", "no such directory"),
    ("export-bitrot", "export-weights --checkpoint {badema} --out {out}/exp", "ema.safetensors"),
    ("recipes-flag", "recipes --all", "unknown option of `latentlm recipes`"),
]


def _argv(template: str, world: dict[str, Path], inputs: Path, out: Path) -> list[str]:
    values = {k: str(v) for k, v in world.items()} | {"in": str(inputs), "out": str(out)}
    argv = []
    for token in template.split():
        if token == "{train}":
            argv += cli_args(out / "run", world["data"])
        else:
            argv.append(token.format(**values))
    return argv


def _inputs(tmp_path: Path, recipe: str | None) -> Path:
    inputs = tmp_path / "in"
    (inputs / "folder" / "x.jpg").mkdir(parents=True)  # a directory named like an image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(inputs / "x.png")
    if recipe is not None:
        (inputs / "r.yaml").write_text(recipe + "\n")
    return inputs


def _main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


def _check_error(code: int, stderr: str, expected: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, stderr
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert expected in errors[0], errors[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(case, world, tmp_path, capsys):
    _, template, expected, *recipe = case
    inputs, out = _inputs(tmp_path, recipe[0] if recipe else None), tmp_path / "out"
    before = _snapshot(world["root"]), _snapshot(inputs)
    code = _main(_argv(template, world, inputs, out))
    _check_error(code, capsys.readouterr().err, expected)
    assert _written(out) == [], f"{template} wrote {_written(out)}"
    assert (_snapshot(world["root"]), _snapshot(inputs)) == before, "an input file changed"


def _written(out: Path) -> list[Path]:
    """Files under ``out`` other than released (empty) run locks (``latentlm.lock``: the lock file stays)."""
    files = sorted(p for p in out.rglob("*") if p.is_file()) if out.exists() else []
    return [p for p in files if not (p.name.endswith(LOCK_FILE) and p.stat().st_size == 0)]


def test_the_table_covers_every_command_with_50_cases():
    commands = {_argv_command(c[1]) for c in CASES}
    assert commands >= set(cli.COMMANDS) and len(CASES) >= 50


def _argv_command(template: str) -> str:
    first = (template.split() or [""])[0]
    return "train" if first == "{train}" else first


@pytest.mark.parametrize(("template", "expected"), [
    ("train --model.depth 1.5", "expected an integer"),
    ("sample --checkpoint {badema} --out {out}/g.png --device cpu", "ema.safetensors"),
    ("trian", "did you mean 'train'?"),
])
def test_bad_input_in_a_real_process(template, expected, world, tmp_path):
    out = tmp_path / "out"
    argv = _argv(template, world, tmp_path, out)
    proc = subprocess.run([sys.executable, "-m", "latentlm.cli", *argv], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    _check_error(proc.returncode, proc.stderr, expected)
    assert _written(out) == []


# ---------------------------------------------------------------------------------------------
# The bugs, one test each
# ---------------------------------------------------------------------------------------------


def test_bug3_yaml_values_are_typed_strictly(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text('data: {hflip: "no"}\nmixed_precision: no\nbatch_size: 8.0\nlr: 1e-4\n'
                      "sampler: {fused: on}\nema_warmup: 0\n")
    _, cfg = cli.parse(["train", "--config", str(recipe)])
    assert cfg.data.hflip is False and cfg.ema_warmup is False  # a quoted "no" and 0 are False, not truthy
    assert cfg.mixed_precision == "no" and cfg.sampler.fused == "on"  # YAML 1.1's no/on read as the words
    assert cfg.batch_size == 8 and type(cfg.batch_size) is int and cfg.lr == 1e-4
    _, flags = cli.parse(["train", "--batch-size", "8.0", "--data.no-hflip"])
    assert flags.batch_size == 8 and flags.data.hflip is False


def test_bug4_num_classes_must_match_the_data(world, tmp_path):
    for given in (1, 2):
        with pytest.raises(ConfigError, match=f"data.num_classes={given} contradicts the data .* has 3 classes"):
            cfg = tiny_config(tmp_path / f"run{given}", world["data"], max_steps=1)
            train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_classes=given)))
    assert not any(tmp_path.iterdir())


def test_bug5_gif_files_count_and_directories_named_like_images_do_not(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    Image.fromarray(np.full((8, 8), 3, np.uint8), "L").convert("P").save(data / "class1" / "palette.gif")
    (data / "class2" / "folder.jpg").mkdir()
    folder = ImageFolder(data, image_size=8)
    names = [p.name for p, _ in folder.samples]
    assert len(folder) == 7 and "palette.gif" in names and "folder.jpg" not in names
    image, label = folder[names.index("palette.gif")]
    assert label == 1 and torch.allclose(image, torch.full_like(image, 3 / 127.5 - 1))


def test_bug6_preview_grids_show_every_class_when_there_are_fewer(world, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, world["data"], max_steps=1, sample_every=1, sample_classes=8))
    grid = np.asarray(Image.open(run / "samples" / "step-00000001.png"))
    assert grid.shape[0] == 3 * (64 + 2) + 2  # three rows of 8x8 images shown at 64 px: classes 0, 1 and 2


def test_bug7_tokenizer_paths_are_stored_resolved(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    record = tokenizer_record(IdentityTokenizer(1), "tokenizers/vae.safetensors")
    assert record["source"] == str(tmp_path.resolve() / "tokenizers" / "vae.safetensors")
    # A run trained with a relative tokenizer path samples from another directory.
    shutil.copy(world["sigma"], tmp_path / "vae.safetensors")
    base = tiny_config(tmp_path / "run", world["data"], max_steps=1)
    train(dataclasses.replace(base, tokenizer=dataclasses.replace(base.tokenizer, path="vae.safetensors",
                                                                  norm_images=8)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    argv = ["sample", "--checkpoint", str(tmp_path / "run"), "--out", "g.png", "--classes", "0", "--per-class", "1",
            "--sampler.num-steps", "2", "--device", "cpu"]
    assert _main(argv) == 0 and (elsewhere / "g.png").is_file()


def test_bug8_damaged_files_name_the_file(world):
    # Through the library too, not only the command line: every damaged file gives a ConfigError naming it.
    ckpt = checkpoint.Checkpoint(checkpoint.latest_checkpoint(world["pickled"]))
    with pytest.raises(ConfigError, match="optimizer.pt: holds Python objects"):
        ckpt.optimizer  # noqa: B018
    with pytest.raises(ConfigError, match=r"ema\.safetensors.*(corrupt|not a readable safetensors file)"):
        checkpoint.load_trained(world["badema"])
    with pytest.raises(ConfigError, match="do not fit the model of its config.json"):
        checkpoint.load_trained(world["mismatch"])


def test_bug9_linear_ddpm_with_too_few_timesteps_is_refused():
    with pytest.raises(ConfigError, match=r"num_train_timesteps=20 with beta_schedule=linear: .* last beta 1 >= 1"):
        ProcessConfig(beta_schedule="linear", num_train_timesteps=20).validate()
    ProcessConfig(beta_schedule="linear", num_train_timesteps=21).validate()
    ProcessConfig(beta_schedule="cosine", num_train_timesteps=10).validate()
    ProcessConfig(kind="flow", num_train_timesteps=10).validate()


def test_shipped_recipes_are_found_by_name_and_listed(capsys):
    _, cfg = cli.parse(["train", "--config", "digits-tiny"])
    assert cfg.data.kind == "digits" and cfg.config == "digits-tiny"
    assert _main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "digits-tiny  " in listing and "imagenet256-latentlm-l" in listing


def test_train_config_is_unchanged_by_strict_typing():
    _, cfg = cli.parse(["train"])
    assert cfg == dataclasses.replace(TrainConfig(), model=cfg.model) and cfg.model.name == "Transformer-Tiny"


def test_a_tokenizer_path_alone_is_loaded_as_what_it_is(world):
    from latentlm.config import TokenizerConfig
    from latentlm.tokenizers import build_tokenizer, load_sigma_vae

    tokenizer = build_tokenizer(TokenizerConfig(path=str(world["sigma"])))  # kind left at "identity"
    assert tokenizer.kind == "sigma_vae" and tokenizer.fingerprint() == load_sigma_vae(world["sigma"]).fingerprint()
