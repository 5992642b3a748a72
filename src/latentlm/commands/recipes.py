"""``latentlm recipes``: the shipped recipes (``latentlm.recipes``), each with its one-line description."""

from __future__ import annotations

from latentlm import recipes
from latentlm.config import RecipesConfig


def run(cfg: RecipesConfig) -> int:
    found = recipes.shipped()
    width = max(map(len, found))
    for name, path in found.items():
        print(f"{name:<{width}}  {recipes.description(path)}")
    print("\nUse one with `latentlm train --config NAME` (a path to your own YAML file works too).")
    return 0
