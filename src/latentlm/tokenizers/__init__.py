"""Tokenizers: images in [-1, 1] <-> normalized latents.

``build_tokenizer(TokenizerConfig)`` makes the tokenizer a run asks for; ``tokenizer_record`` /
``tokenizer_from_record`` are what a checkpoint stores about it (kind, constructor arguments,
source file, weight fingerprint and the normalization stats) and how sampling rebuilds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentlm.config import ConfigError, TokenizerConfig
from latentlm.tokenizers.base import Tokenizer
from latentlm.tokenizers.identity import PatchTokenizer
from latentlm.tokenizers.sigma_vae import SigmaVAE, load_sigma_vae

TOKENIZER_KINDS = ("identity", "sigma_vae")


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer ``cfg`` names, on CPU, in eval mode, with frozen weights.

    Raises ``ConfigError`` (a bad option: unknown kind, missing file) before loading anything big.
    """
    if cfg.kind == "identity":
        if cfg.patch < 1:
            raise ConfigError(f"tokenizer.patch={cfg.patch}: must be >= 1")
        tokenizer: Tokenizer = PatchTokenizer(cfg.patch)
    elif cfg.kind == "sigma_vae":
        if not cfg.path:
            raise ConfigError("tokenizer.kind=sigma_vae needs --tokenizer.path "
                              "(a file written by `latentlm train-tokenizer`)")
        if not Path(cfg.path).exists():
            raise ConfigError(f"tokenizer.path={cfg.path}: no such file or directory")
        tokenizer = load_sigma_vae(cfg.path)
    else:
        raise ConfigError(f"tokenizer.kind={cfg.kind!r}: choose one of {', '.join(TOKENIZER_KINDS)}")
    return tokenizer.eval().requires_grad_(False)


def tokenizer_record(tokenizer: Tokenizer, source: str | None) -> dict[str, Any]:
    """JSON-ready description saved with every checkpoint: enough to rebuild ``tokenizer`` exactly.

    ``source`` is the file the weights came from (None for parameter-free tokenizers).
    """
    return {
        "kind": tokenizer.kind,
        "config": tokenizer.config_dict(),
        "source": source,
        "fingerprint": tokenizer.fingerprint(),
        **tokenizer.normalization(),  # "scale", "bias"
    }


def tokenizer_from_record(record: dict[str, Any], path: str | None = None) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint was trained with, normalization included.

    ``path`` overrides the recorded weights file (e.g. the run moved machines); the weights found
    must have the recorded fingerprint, else ``ValueError`` says which file differs.
    """
    if record["kind"] == "identity":
        tokenizer: Tokenizer = PatchTokenizer(**record["config"]).eval()
    else:
        source = path or record.get("source")
        tokenizer = build_tokenizer(TokenizerConfig(kind=record["kind"], path=source))
        if tokenizer.fingerprint() != record["fingerprint"]:
            raise ValueError(
                f"tokenizer weights at {source} (fingerprint {tokenizer.fingerprint()}) are not the ones this "
                f"checkpoint was trained with ({record['fingerprint']}); pass the original file"
            )
    tokenizer.set_normalization(float(record["scale"]), float(record["bias"]))
    return tokenizer


__all__ = [
    "PatchTokenizer",
    "SigmaVAE",
    "Tokenizer",
    "build_tokenizer",
    "load_sigma_vae",
    "tokenizer_from_record",
    "tokenizer_record",
]
