"""Tokenizers: images in [-1, 1] <-> normalized latents.

``build_tokenizer(TokenizerConfig)`` makes the tokenizer a run asks for; ``load_tokenizer(path)``
loads any tokenizer file by its content (KL-16, our σ-VAE or the reference code's); ``tokenizer_record`` /
``tokenizer_from_record`` are what a checkpoint stores about it (kind, constructor arguments,
source file, weight fingerprint and the normalization stats) and how sampling rebuilds it.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from latentlm.config import ConfigError, TokenizerConfig
from latentlm.tokenizers.base import Tokenizer
from latentlm.tokenizers.identity import IdentityTokenizer
from latentlm.tokenizers.kl16 import KL16, KL16Config, is_ldm_vae_state_dict, kl16_from_ldm_state_dict
from latentlm.tokenizers.reference_sigma_vae import CONFIG_KEYS as REFERENCE_CONFIG_KEYS
from latentlm.tokenizers.reference_sigma_vae import (
    ReferenceSigmaVAE,
    is_reference_sigma_vae_config,
    load_reference_sigma_vae,
)
from latentlm.tokenizers.sigma_vae import CHECKPOINT_NAME, SigmaVAE, is_sigma_vae_config, load_sigma_vae

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")  # read with torch.load(weights_only=True)
ACCEPTED_LAYOUTS = (
    "a σ-VAE checkpoint (a .safetensors file with 'config' metadata, its directory, or a torch file "
    "{'config': ..., 'model': state_dict}), a reference-code σ-VAE torch file {'config': {'latent_size', 'std', "
    "...}, 'model': state_dict}, or an LDM/MAR KL-VAE state dict (keys like "
    "'encoder.down.0.block.0.conv1.weight', 'quant_conv.weight') in a .safetensors file or a torch file, "
    "under 'model' (MAR's kl16.ckpt), 'state_dict' (LDM) or at the top level"
)


def _describe(blob: Any) -> str:
    if isinstance(blob, dict):
        keys = sorted(str(k) for k in blob)
        return f"a dict with {len(keys)} keys {keys[:8]}" + (" ..." if len(keys) > 8 else "")
    return f"a {type(blob).__name__}"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer file, telling the layout from its content, on CPU in eval mode with frozen weights.

    * σ-VAE: a ``.safetensors`` file with ``config`` metadata (or a directory holding
      ``tokenizer.safetensors``), or a torch file ``{"config": {...}, "model": state_dict}``;
      its stored normalization comes with it.
    * Reference σ-VAE (the original LatentLM code's): a torch file ``{"config": {...}, "model": ...}``
      whose config has the reference's keys (``latent_size``, ``std``, ...); identity normalization.
    * KL-16 (any LDM-layout KL-VAE, architecture read from the weights): an LDM state dict in a
      ``.safetensors`` file, or in a torch file under ``"model"`` (MAR), ``"state_dict"`` (LDM) or at
      the top level; identity normalization until fitted.

    Torch files (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) are read with ``torch.load(weights_only=True)``:
    never an arbitrary unpickle. Raises ``FileNotFoundError`` for a missing path and ``ValueError``
    saying what was found and which layouts are accepted otherwise.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT_NAME).is_file():
            raise ValueError(f"{path} is a directory without {CHECKPOINT_NAME}; expected {ACCEPTED_LAYOUTS}")
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                has_config = "config" in (f.metadata() or {})
        except SafetensorError as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
        if has_config:
            tokenizer: Tokenizer = load_sigma_vae(path)
        else:
            state = load_file(str(path))
            if not is_ldm_vae_state_dict(state):
                raise ValueError(f"{path}: unknown tokenizer layout: found {_describe(state)} and no 'config' "
                                 f"metadata; expected {ACCEPTED_LAYOUTS}")
            tokenizer = _kl16(state, path)
    elif path.suffix in TORCH_SUFFIXES:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path} holds Python objects other than tensors, which are not unpickled (that could run code). "
                "If you trust the file, extract its state dict elsewhere, e.g. torch.save({'model': "
                "torch.load(p, weights_only=False)['model']}, 'clean.ckpt')") from err
        if isinstance(blob, dict) and "config" in blob and "model" in blob:
            tokenizer = _config_and_model(blob, path)
        else:
            state = next((blob[k] for k in ("model", "state_dict") if isinstance(blob, dict) and k in blob), blob)
            if not is_ldm_vae_state_dict(state):
                raise ValueError(f"{path}: unknown tokenizer layout: found {_describe(blob)}; "
                                 f"expected {ACCEPTED_LAYOUTS}")
            tokenizer = _kl16(state, path)
    else:
        raise ValueError(f"{path}: unknown tokenizer file type {path.suffix!r}; expected .safetensors (preferred) "
                         f"or one of {', '.join(TORCH_SUFFIXES)}")
    return tokenizer.eval().requires_grad_(False)


def _config_and_model(blob: dict[str, Any], path: Path) -> Tokenizer:
    """A torch file ``{"config": ..., "model": ...}``: our σ-VAE or the reference code's, told by the config."""
    config, state = blob["config"], blob["model"]
    if is_reference_sigma_vae_config(config):
        return load_reference_sigma_vae(path, blob)
    if is_sigma_vae_config(config):
        return load_sigma_vae(path)
    keys = sorted(str(k) for k in config) if isinstance(config, dict) else f"(a {type(config).__name__})"
    weights = f"{len(state)} weight tensors" if isinstance(state, dict) else f"a {type(state).__name__}"
    raise ValueError(f"{path}: a dict with config keys {keys} and {weights}: not a σ-VAE of latentlm or of the "
                     f"reference code (expected a config with 'kind': 'sigma_vae', or the reference's keys "
                     f"{', '.join(REFERENCE_CONFIG_KEYS)})")


def _kl16(state: dict[str, torch.Tensor], path: Path) -> KL16:
    try:
        return kl16_from_ldm_state_dict(state)
    except ValueError as err:
        raise ValueError(f"{path}: an LDM KL-VAE state dict that does not load: {err}") from err


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer ``cfg`` names, on CPU, in eval mode, with frozen weights.

    A ``path`` with the default kind ``identity`` loads the file as whatever it is (``load_tokenizer`` tells the
    kind from its content, unambiguously), so ``--tokenizer.path`` alone is never silently ignored.
    Raises ``ConfigError`` for a bad option (unknown kind, missing file) or a file that is not of that kind or
    does not load (damaged, weights that do not fit its config).
    """
    cfg.validate()
    if cfg.kind == "identity" and not cfg.path:
        return IdentityTokenizer(cfg.patch).eval()
    try:
        if cfg.kind == "sigma_vae":
            return load_sigma_vae(cfg.path).eval().requires_grad_(False)
        tokenizer = load_tokenizer(cfg.path)
    except (ValueError, OSError, RuntimeError, KeyError, SafetensorError) as err:
        raise ConfigError(f"tokenizer.path={cfg.path}: {' '.join(str(err).split())[:400]}") from err
    if cfg.kind == "identity":
        if cfg.patch != TokenizerConfig.patch:
            raise ConfigError(f"tokenizer.patch={cfg.patch} is for the identity tokenizer, but tokenizer.path="
                              f"{cfg.path} is a {tokenizer.kind} file; drop one of the two")
        log.info("tokenizer.path %s is a %s file: tokenizer.kind %s", cfg.path, tokenizer.kind, tokenizer.kind)
    elif tokenizer.kind != cfg.kind:
        wanted = {"kl16": "KL-16", "reference_sigma_vae": "the reference code's σ-VAE"}[cfg.kind]
        raise ConfigError(f"tokenizer.path={cfg.path} is a {tokenizer.kind} checkpoint, not {wanted}; pass "
                          f"--tokenizer.kind {tokenizer.kind}")
    return tokenizer


def tokenizer_record(tokenizer: Tokenizer, source: str | None) -> dict[str, Any]:
    """JSON-ready description saved with every checkpoint: enough to rebuild ``tokenizer`` exactly.

    ``source`` is the file the weights came from (None for parameter-free tokenizers); it is stored resolved
    (absolute), so sampling from another directory finds it.
    """
    return {
        "kind": tokenizer.kind,
        "config": tokenizer.config_dict(),
        "source": str(Path(source).resolve()) if source else None,
        "fingerprint": tokenizer.fingerprint(),
        **tokenizer.normalization(),  # "scale", "bias"
    }


def tokenizer_from_record(record: dict[str, Any], path: str | None = None) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint was trained with, normalization included.

    ``path`` overrides the recorded weights file (e.g. the run moved machines); the weights found
    must have the recorded fingerprint, else ``ValueError`` says which file differs.
    """
    if record["kind"] == "identity":
        tokenizer: Tokenizer = IdentityTokenizer(**record["config"]).eval()
    else:
        source = path or record.get("source")
        if not path and not (source and Path(source).exists()):
            raise ConfigError(f"the tokenizer file this checkpoint was trained with ({source}) is not there (moved, or "
                              "another machine?); pass it with --tokenizer-path FILE")
        tokenizer = build_tokenizer(TokenizerConfig(kind=record["kind"], path=source))
        if tokenizer.fingerprint() != record["fingerprint"]:
            raise ValueError(
                f"tokenizer weights at {source} (fingerprint {tokenizer.fingerprint()}) are not the ones this "
                f"checkpoint was trained with ({record['fingerprint']}); pass the original file"
            )
    tokenizer.set_normalization(float(record["scale"]), float(record["bias"]))
    return tokenizer


__all__ = [
    "KL16",
    "KL16Config",
    "IdentityTokenizer",
    "ReferenceSigmaVAE",
    "SigmaVAE",
    "Tokenizer",
    "build_tokenizer",
    "load_reference_sigma_vae",
    "load_sigma_vae",
    "load_tokenizer",
    "tokenizer_from_record",
    "tokenizer_record",
]
