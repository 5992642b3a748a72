"""Latent caches: exact moments, byte-identical resume after a kill, 2 processes, training equal to images.

Run as a script (``python tests/test_latent_cache.py MODE OUT DATA TOKENIZER``) it is the subprocess of
the tests: ``kill`` hangs while writing the third shard (after creating ``OUT.ready``) until the test
kills it; ``ranks`` (under torchrun) records which process wrote which shard in ``OUT.writes-rank<r>``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from latentlm.checkpoint import Checkpoint
from latentlm.config import CacheLatentsConfig, ConfigError, DataConfig, TokenizerConfig
from latentlm.data import BadDataError, ImageFolder
from latentlm.data.cache import MANIFEST, PLAN, CachedLatents, iterate_shards, read_manifest, write_cache
from latentlm.tokenizers import Tokenizer
from latentlm.tokenizers.kl16 import kl16_from_ldm_state_dict
from latentlm.tokenizers.sigma_vae import SigmaVAE, load_sigma_vae, save_sigma_vae
from latentlm.training.model import train
from test_images import LIMIT, make_mixed_folder
from test_kl16 import tiny_ldm
from train_helpers import make_image_folder, subprocess_env, tiny_config, wait_for

THIS = str(Path(__file__).resolve())


class ToyGaussian(Tokenizer):
    """A diagonal-Gaussian tokenizer built from elementwise operations on 2x2 patches, so its moments do not
    depend on the batch they are computed in (a conv encoder's last bits do): moments from a cache and from
    on-the-fly encoding are then bit-identical, and so must the training runs be."""

    kind = "toy_gaussian"
    latent_channels, downsample = 12, 2

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = F.pixel_unshuffle(images, 2) * 0.5 + 0.1  # (N, 12, S/2, S/2)
        return mean, mean.abs() * 0.1 + 0.05

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle((z - 0.1) / 0.5, 2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))  # 21 images of 8x8, 3 classes


@pytest.fixture(scope="module")
def sigma_file(tmp_path_factory):
    torch.manual_seed(0)
    return save_sigma_vae(SigmaVAE(latent_channels=4, base_channels=32, channel_mult=(1, 2)),
                          tmp_path_factory.mktemp("tok") / "sigma.safetensors")


def cache_config(out: Path, data: Path, tokenizer: Path | None = None, **overrides) -> CacheLatentsConfig:
    values = dict(out=str(out), data=DataConfig(path=str(data), image_size=8, num_workers=0),
                  tokenizer=TokenizerConfig(kind="sigma_vae" if tokenizer else "identity",
                                            path=str(tokenizer) if tokenizer else None, norm_images=16),
                  images_per_shard=4, batch_size=3, device="cpu", progress=False)
    return CacheLatentsConfig(**(values | overrides))


def cli_args(out: Path, data: Path, tokenizer: Path) -> list[str]:
    """``latentlm cache-latents`` flags for ``cache_config(out, data, tokenizer)``."""
    return ["cache-latents", "--out", str(out), "--data.path", str(data), "--data.image-size", "8",
            "--data.num-workers", "0", "--tokenizer.kind", "sigma_vae", "--tokenizer.path", str(tokenizer),
            "--tokenizer.norm-images", "16", "--images-per-shard", "4", "--batch-size", "3", "--device", "cpu",
            "--no-progress"]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Contents, and training from the cache
# ---------------------------------------------------------------------------------------------


def test_cache_holds_exact_moments_and_trains_like_the_images(tmp_path, data):
    cache = tmp_path / "cache"
    manifest_path = write_cache(cache_config(cache, data, images_per_shard=5, batch_size=2), tokenizer=ToyGaussian())
    manifest = json.loads(manifest_path.read_text())
    folder = ImageFolder(data, 8)
    assert manifest["classes"] == folder.classes == ["class0", "class1", "class2"]
    assert manifest["counts"] == {"files": 21, "images": 21, "unreadable": 0, "per_class": [7, 7, 7]}
    assert [s["images"] for s in manifest["shards"]] == [5, 5, 5, 5, 1]
    assert manifest["latent_shape"] == [12, 4, 4] and manifest["std_shape"] == [12, 4, 4]
    assert manifest["tokenizer"]["fingerprint"] == ToyGaussian().fingerprint()
    rows = 0
    toy = ToyGaussian()
    for shard in iterate_shards(cache):
        for k, index in enumerate(shard["indices"].tolist()):
            image, label = folder[index]
            mean, std = toy.encode_moments(image[None])
            mean_flip, std_flip = toy.encode_moments(image[None].flip(-1))
            assert shard["labels"][k] == label
            for key, value in (("mean", mean), ("std", std), ("mean_flip", mean_flip), ("std_flip", std_flip)):
                assert torch.equal(shard[key][k], value[0]), (index, key)
            rows += 1
    assert rows == 21

    # Training: from the images (encoded on the fly) and from the cache, with the cache's normalization.
    scale, bias = CachedLatents(cache).normalization(sample_posterior=True)
    on_the_fly = ToyGaussian()
    on_the_fly.set_normalization(scale, bias)
    base = tiny_config(tmp_path / "images", data, max_steps=5)
    base = dataclasses.replace(base, tokenizer=dataclasses.replace(base.tokenizer, norm_images=0))
    from_images = train(base, tokenizer=on_the_fly)
    cached_cfg = dataclasses.replace(base, output_dir=str(tmp_path / "cached"),
                                     data=dataclasses.replace(base.data, kind="cached", path=str(cache)))
    from_cache = train(cached_cfg, tokenizer=ToyGaussian())
    assert from_cache.losses == from_images.losses  # flips and posterior samples drawn identically
    for name, p in from_images.model.state_dict().items():
        assert torch.equal(p, from_cache.model.state_dict()[name]), name
    assert len(set(from_images.losses)) == 5


def test_kl16_cache_holds_its_diagonal_gaussian(tmp_path, data):
    kl16 = kl16_from_ldm_state_dict(tiny_ldm().state_dict())  # f = 4: 8x8 images -> 16 x 2 x 2 latents
    manifest = json.loads(write_cache(cache_config(tmp_path, data, batch_size=7), tokenizer=kl16).read_text())
    assert manifest["tokenizer"]["kind"] == "kl16" and manifest["std_shape"] == [16, 2, 2]
    folder = ImageFolder(data, 8)
    images = torch.stack([folder[i][0] for i in range(21)])
    with torch.no_grad():
        mean, std = kl16.encode_moments(images.flip(-1))
    shards = list(iterate_shards(tmp_path))
    for key, expected in (("mean_flip", mean), ("std_flip", std)):
        cached = torch.cat([s[key] for s in shards])
        assert cached.shape == (21, 16, 2, 2)
        torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)  # other batches: last bits differ


def test_unreadable_images_are_listed_and_too_many_refused(tmp_path):
    root = tmp_path / "mixed"
    good, bad = make_mixed_folder(root)
    cfg = cache_config(tmp_path / "cache", root, images_per_shard=5)
    cfg.data = dataclasses.replace(cfg.data, max_image_pixels=LIMIT, max_bad_fraction=0.5)
    manifest = json.loads(write_cache(cfg, tokenizer=ToyGaussian()).read_text())
    assert manifest["counts"]["images"] == len(good) and manifest["counts"]["unreadable"] == len(bad)
    assert sorted(str(Path(p).relative_to(root)) for _, p, _ in manifest["unreadable"]) == sorted(bad)
    assert len(CachedLatents(tmp_path / "cache")) == len(good)

    cfg = dataclasses.replace(cfg, out=str(tmp_path / "strict"))
    cfg.data = dataclasses.replace(cfg.data, max_bad_fraction=0.1)
    with pytest.raises(BadDataError, match=r"strict: 6 of 18 images are unreadable"):
        write_cache(cfg, tokenizer=ToyGaussian())
    assert not (tmp_path / "strict" / MANIFEST).exists()  # an unfinished cache is never trained from
    with pytest.raises(ConfigError, match="no manifest.json; its `latentlm cache-latents` run did not finish"):
        read_manifest(tmp_path / "strict")


def test_a_cache_from_another_tokenizer_or_size_is_refused(tmp_path, data, sigma_file):
    cache = tmp_path / "cache"
    write_cache(cache_config(cache, data, sigma_file))
    torch.manual_seed(1)
    other = save_sigma_vae(SigmaVAE(latent_channels=4, base_channels=32, channel_mult=(1, 2)),
                           tmp_path / "other.safetensors")
    base = tiny_config(tmp_path / "run", data, max_steps=1)
    cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, kind="cached", path=str(cache)),
                              tokenizer=TokenizerConfig(kind="sigma_vae", path=str(other)))
    manifest = read_manifest(cache)
    with pytest.raises(ConfigError) as refused:
        train(cfg)
    message = str(refused.value)
    assert f"written with tokenizer sigma_vae (fingerprint {manifest['tokenizer']['fingerprint']}, from {sigma_file})" \
        in message
    assert f"this run's tokenizer is sigma_vae (fingerprint {load_sigma_vae(other).fingerprint()}, from {other})" \
        in message
    cfg = dataclasses.replace(cfg, tokenizer=TokenizerConfig(kind="sigma_vae", path=str(sigma_file)),
                              data=dataclasses.replace(cfg.data, image_size=16))
    with pytest.raises(ConfigError, match=r"holds 8x8 images, but data.image_size=16; pass --data.image-size 8"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"holds a latent cache made with other settings \(tokenizer: "):
        write_cache(cache_config(cache, data, other))  # nor is it mixed with another tokenizer's shards
    before = files(cache)
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(sigma_file.read_bytes())
    write_cache(cache_config(cache, data, moved))  # the same weights elsewhere: the same cache, untouched
    assert files(cache) == before


# ---------------------------------------------------------------------------------------------
# Processes: kill and rerun; two processes
# ---------------------------------------------------------------------------------------------


def test_killed_run_reruns_to_the_files_of_an_uninterrupted_run(tmp_path, data, sigma_file):
    straight = tmp_path / "straight"
    write_cache(cache_config(straight, data, sigma_file))  # 21 images -> 6 shards of <= 4
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, THIS, "kill", str(killed), str(data), str(sigma_file)],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(Path(f"{killed}.ready"), proc, timeout=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    left = files(killed)
    assert PLAN in left and MANIFEST not in left
    assert sorted(k for k in left if k.startswith("shards/shard-")) == [f"shards/shard-00000{i}.safetensors"
                                                                         for i in range(2)]
    assert any(".tmp-" in k for k in left)  # the shard being written when it died
    kept = {k: os.stat(killed / k).st_mtime_ns for k in left if k.startswith("shards/shard-")}

    write_cache(cache_config(killed, data, sigma_file))
    assert files(killed) == files(straight)  # same names, same bytes; the temporary file is gone
    assert {k: os.stat(killed / k).st_mtime_ns for k in kept} == kept  # finished shards were not redone


@pytest.mark.distributed
def test_two_processes_write_every_image_once(tmp_path, data, sigma_file):
    out = tmp_path / "two"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          THIS, "ranks", str(out), str(data), str(sigma_file)], env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    writes = [set(Path(f"{out}.writes-rank{r}").read_text().split()) for r in range(2)]
    assert writes[0] and writes[1] and not writes[0] & writes[1]  # both worked, never on the same file
    assert writes[0] | writes[1] == {f"shard-{s:06d}.safetensors" for s in range(6)}
    indices = [i for shard in iterate_shards(out) for i in shard["indices"].tolist()]
    assert sorted(indices) == list(range(21))  # every image exactly once
    one = tmp_path / "one"
    write_cache(cache_config(one, data, sigma_file))
    assert files(out) == files(one)  # the files do not depend on the number of processes


# ---------------------------------------------------------------------------------------------
# Subprocess modes
# ---------------------------------------------------------------------------------------------


def _kill_mode(out: Path, data: Path, tokenizer: Path) -> None:
    from latentlm import cli
    from latentlm.data import cache

    calls = {"n": 0}
    original = cache.save_file

    def save_then_hang(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the third shard: half its bytes are on disk under the temporary name
            Path(path).write_bytes(b"partial")
            Path(f"{out}.ready").touch()
            time.sleep(600)
        original(tensors, path, metadata=metadata)

    cache.save_file = save_then_hang
    cli.main(cli_args(out, data, tokenizer))


def _ranks_mode(out: Path, data: Path, tokenizer: Path) -> None:
    from latentlm import cli
    from latentlm.data import cache

    original = cache._write_shard
    record = Path(f"{out}.writes-rank{os.environ['RANK']}")
    record.touch()

    def write_and_record(path, *args):
        original(path, *args)
        with record.open("a") as f:
            f.write(path.name + "\n")

    cache._write_shard = write_and_record
    cli.main(cli_args(out, data, tokenizer))


if __name__ == "__main__":
    mode, out_dir, data_dir, tokenizer_file = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    {"kill": _kill_mode, "ranks": _ranks_mode}[mode](out_dir, data_dir, tokenizer_file)


def test_training_from_a_cache_takes_its_tokenizer_and_image_size(tmp_path, data, sigma_file):
    # Only --data.kind cached and --data.path: the tokenizer (kind, file) and the image size come from the plan.
    cache = tmp_path / "cache"
    write_cache(cache_config(cache, data, sigma_file))
    base = tiny_config(tmp_path / "run", data, max_steps=1)
    result = train(dataclasses.replace(base, data=DataConfig(kind="cached", path=str(cache), num_workers=0),
                                       tokenizer=TokenizerConfig()))
    saved = Checkpoint(result.checkpoint)
    assert saved.train_config["tokenizer"]["kind"] == "sigma_vae"
    assert saved.train_config["tokenizer"]["path"] == str(sigma_file.resolve())
    assert saved.train_config["data"]["image_size"] == 8
    assert saved.tokenizer["fingerprint"] == read_manifest(cache)["tokenizer"]["fingerprint"]
