"""Named recipes shipped with the package: ``latentlm train --config digits-tiny`` finds ``digits-tiny.yaml`` here.

A recipe is a YAML mapping of a command's options (values become defaults that flags override); its first
comment line is its one-line description (``latentlm recipes`` lists them).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped() -> dict[str, Path]:
    """Recipe name -> file, for every recipe shipped with the package."""
    folder = resources.files(__name__)
    return {Path(p.name).stem: Path(str(p)) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")}


def description(path: Path) -> str:
    """The recipe's first comment line, without the ``#``."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def find(name: str) -> Path | None:
    """A recipe file: ``name`` itself when it is a file, else the shipped recipe ``name`` (``.yaml`` optional)."""
    path = Path(name)
    if path.is_file():
        return path
    return shipped().get(name.removesuffix(".yaml"))
