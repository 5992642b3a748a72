"""Per-sample noise whose values depend only on (seed, sample index), never on the batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


class SampleNoise:
    """One CPU ``torch.Generator`` per sample, seeded from ``SeedSequence([seed, index])``.

    Sample k gets the same noise stream whatever batch, rank or order it is generated in, so
    large-scale generation does not depend on the world size or batch size. Every ``randn`` call
    advances each sample's stream by the same amount, so callers must make the same sequence of
    calls per sample (one solve per token, same shapes) for results to match across batchings.
    """

    def __init__(self, seed: int, indices: Sequence[int]) -> None:
        if seed < 0 or any(index < 0 for index in indices):
            raise ValueError(f"seed={seed} and sample indices must be >= 0 (numpy SeedSequence entropy)")
        self.indices = [int(index) for index in indices]
        self.generators = []
        for index in self.indices:
            # SeedSequence mixes (seed, index) into well-separated 64-bit states, unlike seed + index.
            state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
            self.generators.append(torch.Generator(device="cpu").manual_seed(int(state)))

    def __len__(self) -> int:
        return len(self.generators)

    def randn(
        self,
        shape: tuple[int, ...],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Standard normal noise (N, *shape): row k from sample k's generator.

        Drawn in float32 on the CPU (so values do not depend on the accelerator), then moved/cast.
        """
        shape = tuple(shape)
        if not self.generators:
            return torch.empty((0, *shape), device=device, dtype=dtype)
        rows = [torch.randn(shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(device=device, dtype=dtype)  # (N, *shape)
