"""``latentlm scan-images``: list the images of an ImageFolder that training cannot read."""

from __future__ import annotations

from pathlib import Path

from latentlm.config import ConfigError, ScanImagesConfig
from latentlm.data.images import BadImage, ImageFolder, scan_images
from latentlm.io import check_writable


def scan_folder(cfg: ScanImagesConfig) -> list[BadImage]:
    """The unreadable images of the ImageFolder ``cfg.data`` describes (also written to ``cfg.out`` as
    ``path<TAB>reason`` lines when set). Raises ``ConfigError`` for a bad folder or option."""
    cfg.validate()
    if cfg.out is not None:
        check_writable(Path(cfg.out).parent, "--out")
    try:
        dataset = ImageFolder(cfg.data.path, cfg.data.image_size, cfg.data.max_image_pixels)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    bad = scan_images(dataset, cfg.data.num_workers, cfg.batch_size, cfg.progress)
    if cfg.out is not None:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text("".join(f"{b.path}\t{b.reason}\n" for b in bad))
    return bad


def run(cfg: ScanImagesConfig) -> int:
    """Exit code 1 when any image is unreadable (each printed as ``path<TAB>reason``), else 0."""
    bad = scan_folder(cfg)
    for record in bad:
        print(f"{record.path}\t{record.reason}")
    return 1 if bad else 0
