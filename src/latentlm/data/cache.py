"""Latent caches: encode a dataset once, then train from its posterior moments for many epochs.

``latentlm cache-latents`` (``cache_latents``) writes, under ``out``::

    plan.json        what is cached: tokenizer identity (kind, config, weight fingerprint, file), image
                     size, latent shape, class list, data identity, shard layout, dtype, and the
                     normalization stats. Written first, by process 0, before any shard.
    shards/shard-000000.safetensors
                     dataset indices [s P, (s + 1) P) (P = images_per_shard) minus the unreadable ones.
    manifest.json    the plan + per-shard and per-class counts + the unreadable files. Written last:
                     a directory without it is an unfinished cache.

A shard holds, for its n readable images (``dtype`` float32 or float16):

    mean, mean_flip  (n, C, h, w)  posterior mean of the image and of its horizontal flip
    std, std_flip    posterior std: (n, C, h, w) for KL-16's diagonal Gaussian; (n, 1, 1, 1) for the
                     σ-VAE (its C_σ: the scale of the per-image noise scale); absent for deterministic
                     tokenizers. ``std_shape`` in the manifest says which.
    labels, indices  (n,) int64: class and dataset index of each row

So the flip and the posterior sample are still drawn at training time, from the trainer's RNG, exactly
as when images are encoded on the fly: with float32 moments, training from the cache takes the same
steps as training from the images (up to the encoder's own batch-size-dependent rounding).

Processes: the shards follow ``latentlm.shards`` (fixed boundaries by index, every W-th missing shard
per process, atomic shard files, resume). Process 0 writes the plan (and the normalization stats,
fitted on ``tokenizer.norm_images`` images of a seeded random subset) before any shard; rerun with the
same options, a killed run encodes the missing shards and ends with the same files, byte for byte, as
an uninterrupted run.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from latentlm.config import CacheLatentsConfig, ConfigError
from latentlm.data.images import BadImage, ImageFolder, check_bad_fraction, collate_skipping_bad
from latentlm.distributed import Distributed
from latentlm.io import atomic_write, write_json
from latentlm.lock import hold as hold_lock
from latentlm.shards import ShardDir, ShardPlan, shard_name
from latentlm.tokenizers import Tokenizer
from latentlm.tokenizers.normalization import fit_normalization

log = logging.getLogger(__name__)

FORMAT = "latentlm.latent_cache.v1"
PLAN, MANIFEST, SHARDS = "plan.json", "manifest.json", "shards"
META_KEY = "latentlm"  # the one safetensors metadata key (several keys are written in random order)
# Plan entries a rerun must agree with; the others (batch_size, normalization) are taken from the plan on disk.
IDENTITY = ("format", "tokenizer", "image_size", "latent_shape", "std_shape", "classes", "data", "images_per_shard",
            "num_shards", "dtype", "norm_images", "seed")


# ---------------------------------------------------------------------------------------------
# Writing a cache
# ---------------------------------------------------------------------------------------------


def _data_identity(dataset: Dataset, kind: str) -> dict[str, Any]:
    """What the cached data is: for an ImageFolder its root and a hash of its file list (paths and labels)."""
    if isinstance(dataset, ImageFolder):
        digest = hashlib.sha256()
        for path, label in dataset.samples:
            digest.update(f"{path.relative_to(dataset.root)}\t{label}\n".encode())
        return {"kind": "folder", "root": str(dataset.root.resolve()), "files": len(dataset),
                "files_sha256": digest.hexdigest()}
    return {"kind": kind, "items": len(dataset), "dataset": type(dataset).__name__}


class _Indexed(Dataset):
    """``(index, dataset[index])``: shard rows remember which image they hold."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


def _collate_indexed(items: Sequence[tuple[int, Any]]) -> tuple[list[int], Any, Any, list[BadImage]]:
    indices = [i for i, item in items if not isinstance(item, BadImage)]
    images, labels, bad = collate_skipping_bad([item for _, item in items])
    return indices, images, labels, bad


def _identity(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan entries a rerun must agree with; where the tokenizer file and the images live may change."""
    ident = {k: plan.get(k) for k in IDENTITY}
    ident["tokenizer"] = {k: v for k, v in (ident["tokenizer"] or {}).items() if k != "source"}
    ident["data"] = {k: v for k, v in (ident["data"] or {}).items() if k != "root"}
    return ident


@torch.no_grad()
def _encode(tokenizer: Tokenizer, images: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Moments of ``images`` (n, 3, S, S) and of their horizontal flips, on CPU in ``dtype``."""
    out = {}
    for suffix, x in (("", images), ("_flip", images.flip(-1))):
        mean, std = tokenizer.encode_moments(x)
        out["mean" + suffix] = mean.to("cpu", dtype).contiguous()  # KL-16's mean is a view of (mean, logvar)
        if std is not None:
            out["std" + suffix] = std.expand(mean.shape[0], *std.shape[1:]).to("cpu", dtype).contiguous()
    return out


def _write_shard(path: Path, parts: list[dict[str, torch.Tensor]], meta: dict[str, Any], empty: dict[str, tuple],
                 dtype: torch.dtype) -> None:
    tensors = {}
    for key, shape in empty.items():
        chunks = [p[key] for p in parts]
        tensors[key] = torch.cat(chunks) if chunks else torch.zeros((0, *shape),
                                                                    dtype=torch.int64 if not shape else dtype)
    metadata = {META_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _assemble_manifest(out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    shards, unreadable = [], []
    per_class = [0] * len(plan["classes"])
    for s in range(plan["num_shards"]):
        path = out / SHARDS / shard_name(s, ".safetensors")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            labels = f.get_tensor("labels")
        for label, n in enumerate(torch.bincount(labels, minlength=len(per_class)).tolist()):
            per_class[label] += n
        shards.append({"file": f"{SHARDS}/{path.name}", "first": meta["first"], "end": meta["end"],
                       "images": len(labels), "bytes": path.stat().st_size})
        unreadable.extend(meta["unreadable"])
    counts = {"files": plan["data"].get("files", plan["data"].get("items")), "images": sum(per_class),
              "unreadable": len(unreadable), "per_class": per_class}
    return {**plan, "shards": shards, "counts": counts, "unreadable": unreadable}


def _cache_settings(cfg: CacheLatentsConfig, dataset: Dataset, tokenizer: Tokenizer,
                    latent_shape: tuple[int, ...], std_shape: list[int] | None) -> dict[str, Any]:
    """The plan of a new cache (its normalization stats are added when it is written)."""
    from latentlm.data import class_names

    return {
        "format": FORMAT,
        "tokenizer": {"kind": tokenizer.kind, "config": tokenizer.config_dict(), "fingerprint": tokenizer.fingerprint(),
                      "source": cfg.tokenizer.path},
        "image_size": cfg.data.image_size, "latent_shape": list(latent_shape), "std_shape": std_shape,
        "classes": class_names(dataset), "data": _data_identity(dataset, cfg.data.kind),
        "images_per_shard": cfg.images_per_shard, "num_shards": -(-len(dataset) // cfg.images_per_shard),
        "dtype": cfg.dtype, "norm_images": cfg.tokenizer.norm_images, "seed": cfg.seed, "batch_size": cfg.batch_size,
    }


def _with_normalization(plan: dict[str, Any], cfg: CacheLatentsConfig, dataset: Dataset, tokenizer: Tokenizer,
                        device: torch.device) -> dict[str, Any]:
    """``plan`` with the normalization stats of posterior samples and of the mode (so a training run can pick
    the one matching its ``sample_posterior``), or the tokenizer's stored stats when ``norm_images`` is 0."""
    from latentlm.data import subset_batches

    if cfg.tokenizer.norm_images == 0:  # e.g. a σ-VAE saved with its own
        stored = tokenizer.normalization()
        return {**plan, "normalization": {"sample": stored, "mode": stored, "images": 0}}
    log.info("normalization stats over %d images", min(cfg.tokenizer.norm_images, len(dataset)))
    images = subset_batches(dataset, cfg.tokenizer.norm_images, cfg.seed, cfg.batch_size, cfg.data.num_workers)
    return {**plan, "normalization": fit_normalization(tokenizer, images, device, cfg.seed)}


def _encode_shards(shards: ShardDir, mine: list[int], plan: dict[str, Any], dataset: Dataset, tokenizer: Tokenizer,
                   empty: dict[str, tuple], cfg: CacheLatentsConfig, dist: Distributed) -> None:
    """Encode this process's shards ``mine`` in the plan's fixed batches and write each atomically."""
    dtype = getattr(torch, plan["dtype"])
    batches, owners = [], []
    for s in mine:
        lo, hi = shards.plan.bounds(s)
        for start in range(lo, hi, plan["batch_size"]):
            batches.append(list(range(start, min(start + plan["batch_size"], hi))))
            owners.append(s)
    loader = DataLoader(_Indexed(dataset), batch_sampler=batches, num_workers=cfg.data.num_workers,
                        collate_fn=_collate_indexed)
    parts: list[dict[str, torch.Tensor]] = []
    unreadable: list[list[Any]] = []
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc=f"cache (process {dist.rank})",
               dynamic_ncols=True, disable=not (cfg.progress and dist.is_main))
    for k, (indices, images, labels, bad) in enumerate(loader):
        shard = owners[k]
        if images is not None:
            part = _encode(tokenizer, images.to(dist.device), dtype)
            part["labels"] = labels.to(torch.int64)
            part["indices"] = torch.tensor(indices, dtype=torch.int64)
            parts.append(part)
        unreadable.extend([b.index, b.path, b.reason] for b in bad)
        for b in bad:
            log.warning("skipped unreadable image %s: %s", b.path, b.reason)
        bar.update(len(batches[k]))
        if k + 1 == len(batches) or owners[k + 1] != shard:  # the shard's last batch
            first, end = shards.plan.bounds(shard)
            meta = {"format": FORMAT, "shard": shard, "first": first, "end": end, "unreadable": unreadable}
            _write_shard(shards.path(shard), parts, meta, empty, dtype)
            parts, unreadable = [], []
    bar.close()


def write_cache(cfg: CacheLatentsConfig, dataset: Dataset | None = None, tokenizer: Tokenizer | None = None
                ) -> Path:
    """Encode ``cfg.data`` (or ``dataset``) with ``cfg.tokenizer`` (or ``tokenizer``) into the cache directory
    ``cfg.out`` (layout in the module docstring); returns the manifest path.

    Runs in every process of a ``torchrun`` / ``accelerate launch`` job (or alone). Raises ``ConfigError`` for bad
    options, for an ``out`` holding a cache of other settings, and (``BadDataError``) when more than
    ``data.max_bad_fraction`` of the images are unreadable (the shards stay; the manifest is not written).
    """
    from latentlm.tokenizers import build_tokenizer

    # Validate ----------------------------------------------------------------------------------
    cfg.validate()
    if dataset is None:
        cfg.data.validate()
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.tokenizer)
    try:
        latent_shape = tokenizer.latent_shape(cfg.data.image_size)
    except ValueError as err:
        raise ConfigError(f"data.image_size: {err}") from err
    dist = Distributed.start(cfg.device)
    with hold_lock(cfg.out, dist, "--out"):  # one writer per cache directory
        return _write_cache(cfg, dataset, tokenizer, latent_shape, dist)


def _write_cache(cfg: CacheLatentsConfig, dataset: Dataset | None, tokenizer: Tokenizer,
                 latent_shape: tuple[int, int, int], dist: Distributed) -> Path:
    from latentlm.data import build_dataset

    out = Path(cfg.out)

    # Setup: dataset, tokenizer, the plan ---------------------------------------------------------
    if dataset is None:
        dataset = build_dataset(cfg.data)
    tokenizer.to(dist.device).eval().requires_grad_(False)
    probe = _encode(tokenizer, torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size, device=dist.device),
                    getattr(torch, cfg.dtype))
    std_shape = list(probe["std"].shape[1:]) if "std" in probe else None
    settings = _cache_settings(cfg, dataset, tokenizer, latent_shape, std_shape)
    shards = ShardDir(out / SHARDS, ShardPlan(len(dataset), cfg.images_per_shard), ".safetensors",
                      plan_file=out / PLAN)
    plan, pending, mine = shards.open(dist, settings, _identity, "a latent cache",
                             prepare=lambda p: _with_normalization(p, cfg, dataset, tokenizer, dist.device))
    if dist.is_main and plan["batch_size"] != cfg.batch_size:
        log.warning("batch_size=%d: the remaining shards use the plan's batch_size %d, so that every shard is "
                    "encoded alike", cfg.batch_size, plan["batch_size"])
    if dist.is_main:
        log.info("%d of %d shards to encode, %d process(es)", len(pending), plan["num_shards"],
                 dist.world_size)

    # Shards, then the manifest: written last, by process 0 ------------------------------------------
    empty = {k: tuple(v.shape[1:]) for k, v in probe.items()} | {"labels": (), "indices": ()}
    _encode_shards(shards, mine, plan, dataset, tokenizer, empty, cfg, dist)
    dist.barrier()
    path = out / MANIFEST
    if dist.is_main:
        manifest = _assemble_manifest(out, plan)
        examples = [BadImage(i, p, r) for i, p, r in manifest["unreadable"]]
        check_bad_fraction(len(examples), len(dataset), cfg.data.max_bad_fraction, examples, where=f"{out}: ")
        write_json(path, manifest)
        log.info("wrote %s: %d images in %d shards (%d unreadable skipped)", path, manifest["counts"]["images"],
                 plan["num_shards"], len(examples))
    dist.barrier()
    return path

# ---------------------------------------------------------------------------------------------
# Reading a cache
# ---------------------------------------------------------------------------------------------


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a complete cache; ``ConfigError`` saying what to do otherwise."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        hint = ("its `latentlm cache-latents` run did not finish: rerun the same command, it resumes"
                if (root / PLAN).is_file() else "not a latent cache directory (written by `latentlm cache-latents`)")
        raise ConfigError(f"{root}: no {MANIFEST}; {hint}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class CachedLatents(Dataset):
    """Items ``(moments, label)`` of a latent cache: ``moments`` maps ``mean``, ``mean_flip`` (and ``std``,
    ``std_flip`` for stochastic tokenizers) to float32 tensors of one image; ``select_moments`` and the
    tokenizer's ``sample_posterior`` turn a batch of them into latents. Rows are read from the memory-mapped
    shards on demand (a few open shards per worker), so a cache of any size fits.
    """

    max_open_shards = 16

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.classes: list[str] = list(self.manifest["classes"])
        self.keys = ("mean", "mean_flip") + (("std", "std_flip") if self.manifest["std_shape"] is not None else ())
        self._files = [self.root / s["file"] for s in self.manifest["shards"]]
        self._ends = []  # cumulative image counts: shard s holds items [ends[s-1], ends[s])
        total = 0
        for s in self.manifest["shards"]:
            total += s["images"]
            self._ends.append(total)
        if total == 0:
            raise ConfigError(f"{self.root}: the cache holds no images")
        self._open: OrderedDict[int, Any] = OrderedDict()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    def __len__(self) -> int:
        return self._ends[-1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": OrderedDict()}  # DataLoader workers open their own handles

    def _shard(self, shard: int) -> Any:
        handle = self._open.pop(shard, None)
        if handle is None:
            handle = safe_open(str(self._files[shard]), framework="pt", device="cpu")
            if len(self._open) >= self.max_open_shards:
                self._open.popitem(last=False)
        self._open[shard] = handle  # most recently used last
        return handle

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached images")
        shard = bisect.bisect_right(self._ends, index)
        row = index - (self._ends[shard - 1] if shard else 0)
        f = self._shard(shard)
        moments = {k: f.get_slice(k)[row:row + 1][0].float() for k in self.keys}
        return moments, int(f.get_slice("labels")[row:row + 1][0])

    def normalization(self, sample_posterior: bool) -> tuple[float, float]:
        """``(scale, bias)`` fitted when the cache was written, on posterior samples or on the mode."""
        stats = self.manifest["normalization"]["sample" if sample_posterior else "mode"]
        return float(stats["scale"]), float(stats["bias"])

    def check_run(self, tokenizer: Tokenizer, source: str | None, image_size: int) -> None:
        """Raise ``ConfigError`` unless ``tokenizer`` (from ``source``) is the one the cache was written with and
        ``image_size`` its resolution."""
        cached = self.manifest["tokenizer"]
        if cached["fingerprint"] != tokenizer.fingerprint():
            raise ConfigError(
                f"the latent cache {self.root} was written with tokenizer {cached['kind']} (fingerprint "
                f"{cached['fingerprint']}, from {cached['source']}), but this run's tokenizer is {tokenizer.kind} "
                f"(fingerprint {tokenizer.fingerprint()}, from {source}); pass --tokenizer.kind {cached['kind']} "
                f"--tokenizer.path {cached['source']}, or cache the data again with this tokenizer")
        if image_size != self.image_size:
            raise ConfigError(f"the latent cache {self.root} holds {self.image_size}x{self.image_size} images, but "
                              f"data.image_size={image_size}; pass --data.image-size {self.image_size}")


def select_moments(batch: dict[str, torch.Tensor], flip: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mean, std)`` (std None for deterministic tokenizers) of each item's image, or of its horizontal flip
    where ``flip`` (N,) is True. Feed them to ``tokenizer.sample_posterior`` as encoding on the fly would."""
    if flip is None:
        return batch["mean"], batch.get("std")
    where = flip[:, None, None, None]  # (N, 1, 1, 1)
    mean = torch.where(where, batch["mean_flip"], batch["mean"])  # (N, C, h, w)
    std = torch.where(where, batch["std_flip"], batch["std"]) if "std" in batch else None
    return mean, std


def iterate_shards(root: str | Path) -> Iterator[dict[str, torch.Tensor]]:
    """Every shard of a complete cache as a dict of tensors, in order (for inspection and tests)."""
    root = Path(root)
    for entry in read_manifest(root)["shards"]:
        with safe_open(str(root / entry["file"]), framework="pt", device="cpu") as f:
            yield {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


__all__ = [
    "FORMAT",
    "MANIFEST",
    "PLAN",
    "CachedLatents",
    "iterate_shards",
    "read_manifest",
    "select_moments",
    "write_cache",
]
