"""``latentlm import-reference``: a run of the reference LatentLM code as a latentlm run directory.

The reference's ``train_hf.py`` leaves ``<output_dir>/checkpoint-<step>/`` (Accelerate's ``save_state``:
``model.safetensors`` or ``pytorch_model.bin``, pickled ``optimizer.bin`` / ``scheduler.bin`` /
``random_states_<r>.pkl``, and its own ``other_state.pth`` with ``scaling_factor``, ``bias_factor``,
``steps`` and the EMA's positional ``shadow_params``) and a text file ``<output_dir>/latest`` naming the
newest one. This command reads the weights (safetensors, or ``torch.load(weights_only=True)``), the EMA
and ``other_state.pth`` (``weights_only=True``: a file that would need arbitrary unpickling is refused),
maps them to our layout exactly (``latentlm.models.reference``), and writes one complete checkpoint in
ours: weights, EMA, the model config read from the weights, the tokenizer record with the run's
scaling/bias as our normalization, the step, and AdamW's moments when ``optimizer.bin`` holds nothing but
tensors (else a fresh optimizer). ``scheduler.bin`` and the RNG pickles are never unpickled: the LR
schedule restarts at the imported step from our config, the RNG streams are new. Beside the checkpoint:
``recipe.yaml`` (``latentlm train --config <out>/recipe.yaml --resume auto ...`` continues the run) and
``import.json`` (sources, and what was and was not imported).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from latentlm import checkpoint as ckpt_io
from latentlm.config import (
    ConfigError,
    DataConfig,
    ImportReferenceConfig,
    ModelConfig,
    ProcessConfig,
    TokenizerConfig,
    TrainConfig,
    to_dict,
)
from latentlm.io import atomic_write, write_json
from latentlm.models import get_config, model_from_config
from latentlm.models.layers import sincos_2d
from latentlm.models.reference import check_position_table, convert, family_of, parameter_order, read_architecture
from latentlm.tokenizers import Tokenizer, load_tokenizer, tokenizer_record
from latentlm.training.loop import TrainState
from latentlm.training.model import param_groups

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model/mp_rank_00_model_states.pt")


def resolve_reference_checkpoint(path: str | Path) -> Path:
    """The ``checkpoint-<step>`` directory ``path`` names: itself, or what a ``latest`` file (or the run
    directory holding one) points to. ``latest`` holds the path as typed at training time (relative to the
    training's working directory), so its last component is looked up beside the ``latest`` file."""
    path = Path(path)
    if path.is_dir() and (path / "latest").is_file():
        path = path / "latest"
    if path.is_file():
        name = Path(path.read_text().strip()).name
        target = path.parent / name
        if not target.is_dir():
            raise ConfigError(f"{path} names {name}, but there is no {target}; pass the checkpoint directory itself")
        return target
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"{path} is not a checkpoint of the reference code: no {' / '.join(WEIGHT_FILES)}")
    return path


def _torch_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU (the reference saves GPU-tagged storages); ``ConfigError`` for a
    file that needs arbitrary unpickling (it could run code) or is corrupt."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"{path} holds Python objects other than tensors and plain containers; refusing to "
                          "unpickle it (that could run code)") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ConfigError(f"{path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from err


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if file.suffix == ".safetensors":
            try:
                return load_file(file)
            except (SafetensorError, OSError) as err:
                raise ConfigError(f"{file} is not a readable safetensors file ({err})") from err
        blob = _torch_file(file)
        return blob["module"] if name.startswith("pytorch_model/") else blob  # DeepSpeed keeps it under "module"
    raise ConfigError(f"{folder} has no weights ({', '.join(WEIGHT_FILES)})")


def _other_state(folder: Path) -> dict[str, Any]:
    file = folder / "other_state.pth"
    if not file.is_file():
        raise ConfigError(f"{folder} has no other_state.pth: without it the latent scaling/bias and the step are "
                          "unknown (was it written by train_hf.py?)")
    other = _torch_file(file)
    if not isinstance(other, dict) or not {"scaling_factor", "bias_factor", "steps"} <= set(other):
        raise ConfigError(f"{file} lacks scaling_factor, bias_factor or steps (found {sorted(other)[:6]})")
    return other


def _ema(other: dict[str, Any], state: dict[str, torch.Tensor], cfg: ModelConfig, notes: list[str]
         ) -> dict[str, torch.Tensor]:
    """The EMA weights from ``shadow_params`` (positional, ``parameters()`` order); the raw weights without one."""
    ema = other.get("ema")
    if ema is None:
        notes.append("the run was trained without --use_ema: the EMA is a copy of the weights")
        return dict(state)
    order = parameter_order(cfg.family, cfg.depth, cfg.head_depth if cfg.family == "latentlm" else 0)
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, list) or len(shadow) != len(order):
        raise ConfigError(f"other_state.pth's EMA has {len(shadow) if isinstance(shadow, list) else 'no'} shadow "
                          f"params; this model has {len(order)}")
    for key, tensor in zip(order, shadow, strict=True):
        if tensor.shape != state[key].shape:
            raise ConfigError(f"EMA shadow param of {key} has shape {tuple(tensor.shape)}, the weight "
                              f"{tuple(state[key].shape)}")
    return dict(zip(order, shadow, strict=True))


def _optimizer(folder: Path, model: torch.nn.Module, cfg: ModelConfig, step: int, notes: list[str]
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our AdamW and LR-schedule states at ``step``: the reference's moments mapped to our parameters when
    ``optimizer.bin`` reads with ``weights_only=True`` and holds them, else a fresh optimizer's."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.01, decay_all=True), lr=1e-4, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0).state_dict()
    schedule.update(last_epoch=step, _step_count=step + 1)  # the trainer sets the LR of `step` from its config
    fresh = optimizer.state_dict()
    file = folder / "optimizer.bin"
    try:
        saved = _torch_file(file) if file.is_file() else None
    except ConfigError as err:
        notes.append(f"optimizer.bin not imported ({err}); a fresh AdamW starts at step {step}")
        return fresh, schedule
    if not saved or not saved.get("state"):
        notes.append(f"optimizer.bin holds no AdamW moments (none, or no step was taken); a fresh AdamW starts at "
                     f"step {step}")
        return fresh, schedule
    order = parameter_order(cfg.family, cfg.depth, cfg.head_depth if cfg.family == "latentlm" else 0)
    by_name = {order[i]: s for i, s in saved["state"].items()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    moments = {k: convert({n: by_name[n][k] for n in by_name}, cfg) for k in ("exp_avg", "exp_avg_sq")}
    fresh["state"] = {i: {"step": torch.tensor(float(step)), "exp_avg": moments["exp_avg"][n],
                          "exp_avg_sq": moments["exp_avg_sq"][n]} for i, n in enumerate(names)}
    return fresh, schedule


def _tokenizer(cfg: ImportReferenceConfig, other: dict[str, Any]) -> Tokenizer:
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
        latent_shape = tokenizer.latent_shape(cfg.image_size)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"tokenizer: {' '.join(str(err).split())}") from err
    tokenizer.set_normalization(float(other["scaling_factor"]), float(other["bias_factor"]))  # x = (z + b) s
    log.info("tokenizer %s: latents %s at %d px, scale %.6g, bias %.6g", tokenizer.kind, latent_shape,
             cfg.image_size, other["scaling_factor"], other["bias_factor"])
    return tokenizer


def _architecture(cfg: ImportReferenceConfig, state: dict[str, torch.Tensor], tokenizer: Tokenizer) -> ModelConfig:
    preset = get_config(cfg.preset) if cfg.preset else None
    num_heads = cfg.num_heads or preset.num_heads
    channels, side, _ = tokenizer.latent_shape(cfg.image_size)
    process = ProcessConfig(kind="ddpm", beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type)
    model = read_architecture(state, num_heads, side, cfg.preset or "reference", process, cfg.batch_mul)
    if model.in_channels != channels:
        raise ConfigError(f"the weights take {model.in_channels}-channel latents, the tokenizer gives {channels}: "
                          "pass the tokenizer the run trained with")
    if preset is not None:
        wrong = [f"{k}: {getattr(model, k)} in the weights, {getattr(preset, k)} in {cfg.preset}"
                 for k in ("family", "depth", "hidden_size", "ffn_dim", "head_depth")
                 if k != "head_depth" or model.family == "latentlm"
                 if getattr(model, k) != getattr(preset, k)]
        if wrong:
            raise ConfigError(f"the checkpoint is not a {cfg.preset}: {'; '.join(wrong)}; pass the run's --model as "
                              "--preset")
    return model


def _write(out: Path, train_cfg: TrainConfig, files: dict[str, Any], step: int, record: dict[str, Any]) -> Path:
    path = ckpt_io.checkpoint_dir(out, step)
    ckpt_io.begin_checkpoint(path)
    ckpt_io.write_main_files(path, **files)
    ckpt_io.write_rng(path, 0)
    ckpt_io.mark_complete(path, step, 1)
    # The model section starts from a preset of the family (the recipe loader needs one) and sets every field.
    base = train_cfg.model.name if train_cfg.model.name != "reference" else (
        "Transformer-Tiny" if train_cfg.model.family == "latentlm" else "DiT-Tiny")
    recipe = {"model": {**to_dict(train_cfg.model), "name": base}, "tokenizer": to_dict(train_cfg.tokenizer),
              **{k: getattr(train_cfg, k) for k in ("lr", "weight_decay", "decay_all_params", "warmup_steps")},
              "betas": list(train_cfg.betas), "data": {"image_size": train_cfg.data.image_size}}
    atomic_write(out / "recipe.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(recipe, sort_keys=False)))
    write_json(out / "import.json", record)
    return path


def import_reference(cfg: ImportReferenceConfig) -> Path:
    """Import the run (see the module docstring); returns the written checkpoint directory."""
    # Read and check everything before writing anything -------------------------------------------------
    cfg.validate()
    out = Path(cfg.out)
    if ckpt_io.list_checkpoints(out):
        raise ConfigError(f"out={out} already holds checkpoints; choose another --out")
    folder = resolve_reference_checkpoint(cfg.checkpoint)
    state, other = _weights(folder), _other_state(folder)
    family_of(state)
    tokenizer = _tokenizer(cfg, other)
    model_cfg = _architecture(cfg, state, tokenizer)
    notes: list[str] = []
    ema = _ema(other, state, model_cfg, notes)
    if model_cfg.family == "dit":
        table = sincos_2d(model_cfg.input_size // model_cfg.patch_size, model_cfg.hidden_size, columns_first=True)
        check_position_table(state["pos_embed"], table)
        check_position_table(ema["pos_embed"], table)
    model = model_from_config(model_cfg)
    weights, ema_weights = convert(state, model_cfg), convert(ema, model_cfg)
    for what, tensors in (("weights", weights), ("EMA", ema_weights)):
        try:
            model.load_state_dict({k: v.float() for k, v in tensors.items()})
        except RuntimeError as err:
            raise ConfigError(f"the {what} do not fit the model read from them: {' '.join(str(err).split())[:300]}"
                              ) from err
    step = int(other["steps"])

    # Write the run ---------------------------------------------------------------------------------------
    train_cfg = TrainConfig(
        output_dir=str(out), model=model_cfg, data=DataConfig(image_size=cfg.image_size),
        tokenizer=TokenizerConfig(kind=tokenizer.kind, path=str(Path(cfg.tokenizer).resolve()), norm_images=0),
        lr=1e-4, weight_decay=0.01, decay_all_params=True, warmup_steps=100, betas=(0.9, 0.98))  # train_hf's
    notes += ["scheduler.bin not read (a pickle): the LR schedule continues from our config at the imported step",
              "random_states_*.pkl not read (pickles): the RNG streams are new, so a resumed run is not bit-exact"]
    optimizer, schedule = _optimizer(folder, model, model_cfg, step, notes)
    record = {"source": str(folder.resolve()), "tokenizer": str(Path(cfg.tokenizer).resolve()), "step": step,
              "model": model_cfg.name, "family": model_cfg.family, "not_imported": notes}
    out.mkdir(parents=True, exist_ok=True)
    path = _write(out, train_cfg, dict(
        model=weights, ema=ema_weights, config={"train": to_dict(train_cfg),
                                                "class_names": [str(i) for i in range(model_cfg.num_classes)]},
        tokenizer=tokenizer_record(tokenizer, train_cfg.tokenizer.path),
        state=TrainState(step=step).to_dict(), optimizer=optimizer, schedule={"scheduler": schedule, "scaler": None}),
        step, record)
    print(f"imported {folder} (step {step}, {model_cfg.family}, {sum(v.numel() for v in weights.values()) / 1e6:.1f}M "
          f"parameters) as {path}")
    for note in notes:
        print(f"  not imported: {note}")
    print(f"sample with `latentlm sample --checkpoint {out}`; continue training with "
          f"`latentlm train --config {out / 'recipe.yaml'} --output-dir {out} --resume auto --data.path ...`")
    return path


def run(cfg: ImportReferenceConfig) -> int:
    import_reference(cfg)
    return 0
