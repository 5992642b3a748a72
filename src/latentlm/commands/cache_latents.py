"""``latentlm cache-latents``: encode a dataset once into resumable latent shards (``latentlm.data.cache``)."""

from __future__ import annotations

from latentlm.config import CacheLatentsConfig
from latentlm.data.cache import write_cache


def run(cfg: CacheLatentsConfig) -> int:
    write_cache(cfg)
    return 0
