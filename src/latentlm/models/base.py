"""The contract LatentLM and DiT share, so one trainer and one sampler serve both.

``model(latents, labels)`` is the training loss (a forward call, so DDP/FSDP wrappers see it) and
``model.generate(labels, sampler, seed, sample_indices)`` samples normalized latents (N, C, H, W).
"""

from __future__ import annotations

import torch
from torch import nn

from latentlm.config import ModelConfig
from latentlm.diffusion import build_process
from latentlm.models.generation import check_labels, check_latents
from latentlm.models.layers import LabelEmbedder


class LatentModel(nn.Module):
    """Base of LatentLM and DiT: subclasses define ``loss`` and ``generate``."""

    label_embed: LabelEmbedder

    def __init__(self, cfg: ModelConfig, family: str) -> None:
        super().__init__()
        cfg.validate()
        if cfg.family != family:
            raise ValueError(f"{type(self).__name__} needs family={family!r}, got {cfg.family!r}")
        self.config = cfg
        # Activation checkpointing per block (backbone and head): a training-time switch, not architecture
        self.activation_checkpointing = False
        with torch.device("cpu"):  # schedules are float64 CPU data, even when the model is built on meta
            self.process = build_process(cfg.process)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Run every backbone block (and LatentLM's head blocks) under non-reentrant activation checkpointing
        while autograd records: each keeps only its input and recomputes its activations in backward. Same
        loss and gradients; less memory for about one more forward pass."""
        for module in self.modules():
            if hasattr(module, "activation_checkpointing"):
                module.activation_checkpointing = enabled

    def loss(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of normalized latents (N, C, H, W) with class labels (N,): a scalar."""
        return self.loss(latents, labels)

    def training_labels(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Check a training batch; in training mode each label becomes the null class with probability
        ``class_dropout_prob`` (label dropout trains the null class that guidance needs). A compiled loss
        skips the label range check (the trainer checks its labels on the CPU)."""
        check_latents(latents, self.config)
        if not torch.compiler.is_compiling():  # reading the range back is a device sync and a graph break
            check_labels(labels, self.config.num_classes)
        return self.label_embed.drop(labels) if self.training else labels
