"""The training function in-process: exact resume, non-finite steps, schedules, and a learning test."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from torch import nn

from latentlm.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, load_trained
from latentlm.config import ConfigError, ModelConfig, from_dict, to_dict
from latentlm.data import ImageFolder
from latentlm.models import get_config
from latentlm.training.loop import ShardedBatchSampler, TrainingDiverged, ema_decay_at
from latentlm.training.model import lr_multiplier, param_groups, train
from train_helpers import assert_states_equal, make_image_folder, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


def assert_same_run(a, b) -> None:
    """Two final checkpoints hold identical weights, EMA, optimizer, schedule, RNG and counters."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step
    assert_states_equal(ca.model, cb.model, "model")
    assert_states_equal(ca.ema, cb.ema, "ema")
    assert_states_equal(ca.optimizer, cb.optimizer, "optimizer")
    assert_states_equal(ca.schedule, cb.schedule, "schedule")
    assert_states_equal(Checkpoint(a).rng(0), Checkpoint(b).rng(0), "rng")
    assert ca.state == cb.state
    assert ca.tokenizer == cb.tokenizer


# ---------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["Transformer-Tiny", "DiT-Tiny"])
def test_resume_mid_epoch_equals_straight_run(tmp_path, data, preset):
    # 21 images, micro-batch 2 -> 10 micro-batches per epoch; 2 per step. Stopping at step 3 (6 micro-batches)
    # is mid-epoch and not a multiple of the accumulation steps; step 6 straddles the epoch boundary.
    straight = train(tiny_config(tmp_path / "a", data, preset, max_steps=7, sample_every=3, checkpoint_every=3))
    first = train(tiny_config(tmp_path / "b", data, preset, max_steps=7, stop_at_step=3))
    assert first.step == 3 and not first.interrupted
    assert first.losses == straight.losses[:3]
    resumed = train(tiny_config(tmp_path / "b", data, preset, max_steps=7, resume="auto"))
    assert resumed.step == straight.step == 7
    assert resumed.losses == straight.losses  # the resumed run carries the history of the first
    assert all(math.isfinite(v) for v in straight.losses)
    assert_same_run(straight.checkpoint, resumed.checkpoint)
    for name, p in resumed.model.state_dict().items():  # and the in-memory weights
        assert torch.equal(p, straight.model.state_dict()[name]), name
    # The weights moved after step 3, so the equality is not vacuous.
    start = load_checkpoint(list_checkpoints(tmp_path / "b")[0].path)
    assert start.step == 3
    assert any(not torch.equal(v, resumed.model.state_dict()[k]) for k, v in start.model.items())
    assert (tmp_path / "a" / "samples" / "step-00000003.png").is_file()
    assert (tmp_path / "a" / "loss.png").is_file()


def test_resume_refuses_changed_architecture(tmp_path, data, caplog):
    train(tiny_config(tmp_path, data, max_steps=4, stop_at_step=2))
    wider = tiny_config(tmp_path, data, max_steps=4, resume="auto")
    wider.model = get_config("Transformer-Tiny", depth=2, hidden_size=32, num_heads=2)
    with pytest.raises(ConfigError, match=r"different architecture \(depth: 1 -> 2\).*--allow-arch-change"):
        train(wider)
    # Objective-only changes are allowed and reported.
    other = tiny_config(tmp_path, data, max_steps=4, resume="auto")
    other.model = dataclasses.replace(other.model, class_dropout_prob=0.2)
    with caplog.at_level(logging.WARNING, logger="latentlm"):
        assert train(other).step == 4
    assert "class_dropout_prob: 0.1 -> 0.2" in caplog.text


def test_head_ffn_hidden_size_round_trips_through_checkpoints(tmp_path, data):
    """A narrower head trains, is saved with its width, loads for sampling and resumes; another width is an
    architecture change; checkpoints written before the field existed load with the backbone's width."""
    cfg = tiny_config(tmp_path, data, max_steps=4, stop_at_step=2)
    cfg.model = dataclasses.replace(cfg.model, head_ffn_hidden_size=16)
    first = train(cfg)
    trained = load_trained(first.checkpoint, device="cpu")
    assert trained.model.config.head_ffn_hidden_size == 16 and trained.model.config.head_ffn_dim == 16
    assert trained.model.head.blocks[0].mlp.w2.weight.shape == (32, 16)
    assert trained.model.blocks[0].mlp.w2.weight.shape == (32, cfg.model.ffn_dim)  # the backbone keeps its own
    assert_states_equal(trained.model.state_dict(), load_checkpoint(first.checkpoint).ema, "ema")
    resumed = dataclasses.replace(cfg, stop_at_step=None, resume="auto")
    assert train(resumed).step == 4
    wider = dataclasses.replace(resumed, max_steps=6)
    wider.model = dataclasses.replace(cfg.model, head_ffn_hidden_size=None)
    with pytest.raises(ConfigError, match=r"different architecture \(head_ffn_hidden_size: 16 -> None\)"):
        train(wider)
    saved = from_dict(ModelConfig, {k: v for k, v in to_dict(get_config("Transformer-Tiny")).items()
                                    if k != "head_ffn_hidden_size"})  # an older checkpoint's config
    assert saved.head_ffn_hidden_size is None and saved.head_ffn_dim == saved.ffn_dim


def test_resume_takes_optimizer_settings_from_the_config(tmp_path, data, caplog):
    train(tiny_config(tmp_path, data, max_steps=4, stop_at_step=2))
    with caplog.at_level(logging.WARNING, logger="latentlm"):
        result = train(tiny_config(tmp_path, data, max_steps=4, resume="auto", lr=5e-3, weight_decay=0.05))
    assert "optimizer settings changed on resume: weight_decay: 0.1 -> 0.05" in caplog.text
    groups = load_checkpoint(result.checkpoint).optimizer["param_groups"]
    cfg = tiny_config(tmp_path, data, max_steps=4, lr=5e-3)
    assert [g["lr"] for g in groups] == [5e-3 * lr_multiplier(4, cfg)] * 2
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, data, caplog):
    with caplog.at_level(logging.INFO, logger="latentlm"):
        result = train(tiny_config(tmp_path, data, max_steps=1, resume="auto"))
    assert result.step == 1
    assert "no complete checkpoint" in caplog.text and "starting fresh" in caplog.text
    with pytest.raises(ConfigError, match="already holds checkpoints of a run; pass --resume auto"):
        train(tiny_config(tmp_path, data, max_steps=1))  # a fresh run must not mix with the old one


# ---------------------------------------------------------------------------------------------
# Non-finite steps
# ---------------------------------------------------------------------------------------------


class Poisoned(torch.utils.data.Dataset):
    """An image dataset whose items at ``indices`` are all-NaN images."""

    def __init__(self, base: ImageFolder, indices: set[int]) -> None:
        self.base, self.indices, self.classes = base, indices, base.classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return (torch.full_like(image, math.nan) if i in self.indices else image), label


def test_nan_batch_is_skipped_with_state_unchanged(tmp_path, data, caplog):
    base = ImageFolder(data, 8)
    sampler = ShardedBatchSampler(len(base), 2, 0, 1, seed=0, start=4)  # micro-batches 4, 5 = step 3
    batches = iter(sampler)
    poisoned = set(next(batches)[:1])  # one image of step 3's first micro-batch
    cfg = tiny_config(tmp_path, data, max_steps=5, checkpoint_every=1, keep_last=10,
                      tokenizer=dataclasses.replace(tiny_config(tmp_path, data).tokenizer, norm_images=0))
    with caplog.at_level(logging.WARNING, logger="latentlm"):
        result = train(cfg, dataset=Poisoned(base, poisoned))
    assert result.step == 5 and result.nonfinite_steps == 1
    assert math.isnan(result.losses[2]) and all(math.isfinite(v) for i, v in enumerate(result.losses) if i != 2)
    assert "step 3: non-finite loss" in caplog.text
    by_step = {e.step: load_checkpoint(e.path) for e in list_checkpoints(tmp_path)}
    assert_states_equal(by_step[2].model, by_step[3].model, "model")
    assert_states_equal(by_step[2].ema, by_step[3].ema, "ema")
    assert_states_equal(by_step[2].optimizer["state"], by_step[3].optimizer["state"], "optimizer")  # moments, count
    assert by_step[3].schedule["scheduler"]["last_epoch"] == 3  # the LR schedule moves on
    assert by_step[3].state["nonfinite_total"] == 1
    assert not torch.equal(by_step[4].model["token_embed.weight"], by_step[3].model["token_embed.weight"])


def test_repeated_nans_stop_the_run(tmp_path, data):
    base = ImageFolder(data, 8)
    cfg = tiny_config(tmp_path, data, max_steps=20, max_nonfinite_steps=3, checkpoint_every=2,
                      tokenizer=dataclasses.replace(tiny_config(tmp_path, data).tokenizer, norm_images=0))
    with pytest.raises(TrainingDiverged, match=r"stopped at step 3: 3 consecutive steps had non-finite loss"):
        train(cfg, dataset=Poisoned(base, set(range(len(base)))))
    assert [e.step for e in list_checkpoints(tmp_path)] == [2]  # nothing after the failure


# ---------------------------------------------------------------------------------------------
# Schedules, parameter groups, data order
# ---------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine(tmp_path, data):
    cfg = tiny_config(tmp_path, data, lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=104)
    values = [lr_multiplier(s, cfg) for s in range(105)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and values[54] == pytest.approx(0.55) and values[104] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))
    constant = dataclasses.replace(cfg, lr_schedule="constant")
    assert lr_multiplier(100, constant) == 1.0


def test_ema_warmup_ramps(tmp_path, data):
    cfg = tiny_config(tmp_path, data, ema_decay=0.9999)
    ramp = [ema_decay_at(t, cfg.ema_decay, cfg.ema_warmup) for t in (0, 1, 80, 890)]
    assert ramp == pytest.approx([0.1, 2 / 11, 0.9, 0.99])
    assert ema_decay_at(10**7, cfg.ema_decay, cfg.ema_warmup) == 0.9999
    assert ema_decay_at(0, cfg.ema_decay, warmup=False) == 0.9999


def test_ema_after_first_step_follows_the_ramp(tmp_path, data):
    from latentlm.models import model_from_config

    result = train(tiny_config(tmp_path, data, max_steps=1))
    torch.manual_seed(0)  # train() seeds with cfg.seed before building the model
    init = model_from_config(result.model.config)
    for (name, e), p, p0 in zip(result.ema.state_dict().items(), result.model.state_dict().values(),
                                init.state_dict().values(), strict=True):
        assert torch.equal(e, torch.lerp(p0, p, 1 - 0.1)), name  # decay 0.1 at the first update


def test_param_groups_exclude_norms_biases_embeddings():
    model = get_config("Transformer-Tiny", depth=1, hidden_size=32, num_heads=2)
    from latentlm.models import model_from_config

    net = model_from_config(model)
    decay, no_decay = param_groups(net, 0.1, decay_all=False)
    names = {id(p): n for n, p in net.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "label_embed.table.weight" in no_decay_names and "token_embed.bias" in no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    assert not any(isinstance(m, nn.Embedding) and id(m.weight) in decayed for m in net.modules())
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))
    (everything,) = param_groups(net, 0.1, decay_all=True)
    assert len(everything["params"]) == len(list(net.parameters()))


def test_sharded_sampler_partitions_each_epoch_and_resumes():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    ranks = [take(ShardedBatchSampler(23, 3, r, 2, seed=5), 6) for r in range(2)]  # 3 batches per epoch of 6
    epoch0 = [i for r in ranks for b in r[:3] for i in b]
    assert len(epoch0) == len(set(epoch0)) == 18
    assert take(ShardedBatchSampler(23, 3, 1, 2, seed=5, start=4), 2) == ranks[1][4:6]
    assert ranks[0][3:] != ranks[0][:3]  # a new permutation per epoch


# ---------------------------------------------------------------------------------------------
# It learns
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("preset", "ratio"), [("Transformer-Tiny", 0.4), ("DiT-Tiny", 0.7)])
def test_tiny_model_learns(tmp_path, data, preset, ratio):
    # 200 steps on 21 fixed images: the mean loss of the last 50 steps must fall well below that of the
    # first 20 (measured: LatentLM 0.91 -> 0.21, DiT 0.98 -> 0.55).
    cfg = tiny_config(tmp_path, data, preset, max_steps=200, batch_size=8, grad_accum_steps=1, lr=2e-3,
                      warmup_steps=10, weight_decay=0.0)
    cfg.data.hflip = False
    result = train(cfg)
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-50:]) / 50
    assert last < ratio * first, (first, last)


def test_precision_can_change_between_runs_in_one_process(tmp_path, data):
    # Accelerate keeps one state per process; train() resets it for single-process callers (demo, notebooks).
    for i, precision in enumerate(["no", "bf16", "no"]):
        result = train(tiny_config(tmp_path / str(i), data, "DiT-Tiny", max_steps=1, mixed_precision=precision))
        assert result.step == 1


def test_invalid_options_raise_before_work(tmp_path, data, monkeypatch):
    import latentlm.training.model as train_module

    def forbidden(*args, **kwargs):
        raise AssertionError("heavy work started before validation")

    monkeypatch.setattr(train_module, "model_from_config", forbidden)
    monkeypatch.setattr(train_module, "build_dataset", forbidden)
    for overrides, message in [
        (dict(batch_size=0), "batch_size=0"),
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(lr=math.nan), "lr=nan"),
        (dict(batch_size=6, grad_accum_steps=4), "not divisible by grad_accum_steps"),
        (dict(mixed_precision="fp16", cpu=True), "fp16 needs a CUDA GPU"),
    ]:
        with pytest.raises(ConfigError, match=message):
            train(tiny_config(tmp_path, data, **overrides))
