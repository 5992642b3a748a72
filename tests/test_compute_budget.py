"""Compute accounting: the trainer's counted FLOPs equal FlopCounterMode's over whole runs, are logged and
checkpointed, and ``max_flops`` stops a run (and its LR schedule) at the step that reaches the budget."""

from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from latentlm.checkpoint import load_checkpoint
from latentlm.config import ConfigError
from latentlm.flops import training_flops
from latentlm.training.loop import TrainState
from latentlm.training.model import budget_steps, done_flops, train
from test_flops import CUDA_SDPA_RULES
from test_train import assert_same_run
from train_helpers import make_image_folder, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


def step_flops(result) -> int:
    return training_flops(result.model.config, 4)  # tiny_config: batch 4


@pytest.mark.parametrize("preset", ["Transformer-Tiny", "DiT-Tiny"])
def test_counted_flops_equal_flop_counter_over_a_run(tmp_path, data, preset):
    # Everything train() runs (normalization fit, 2 micro-batches per step, optimizer, EMA) under the counter:
    # only the model's forward and backward do matmul/attention work, and the analytic count is all of it.
    with FlopCounterMode(display=False, custom_mapping=CUDA_SDPA_RULES) as counter:
        result = train(tiny_config(tmp_path, data, preset, max_steps=3))
    assert result.train_flops == counter.get_total_flops() == 3 * step_flops(result) > 0
    assert load_checkpoint(result.checkpoint).state["train_flops"] == result.train_flops


def test_max_flops_ends_the_run_and_its_schedule_at_the_budget(tmp_path, data):
    per_step = step_flops(train(tiny_config(tmp_path / "probe", data, max_steps=1)))
    budget = 4.5 * per_step  # reached during step 5
    by_flops = train(tiny_config(tmp_path / "flops", data, max_flops=budget))  # max_steps left at 7
    assert by_flops.step == 5
    assert 4 * per_step < budget <= by_flops.train_flops == 5 * per_step
    by_steps = train(tiny_config(tmp_path / "steps", data, max_steps=5))
    assert by_flops.losses == by_steps.losses  # the cosine spans the budget, as a 5-step run's does
    saved = load_checkpoint(by_flops.checkpoint)
    assert saved.train_config["max_steps"] == 5 and saved.train_config["max_flops"] == budget


def test_max_flops_resumes_exactly(tmp_path, data):
    per_step = step_flops(train(tiny_config(tmp_path / "probe", data, max_steps=1)))
    straight = train(tiny_config(tmp_path / "a", data, max_flops=6 * per_step))
    first = train(tiny_config(tmp_path / "b", data, max_flops=6 * per_step, stop_at_step=2))
    assert first.step == 2 and first.train_flops == 2 * per_step
    resumed = train(tiny_config(tmp_path / "b", data, max_flops=6 * per_step, resume="auto"))
    assert resumed.step == straight.step == 6
    assert resumed.train_flops == straight.train_flops == 6 * per_step
    assert resumed.losses == straight.losses
    assert_same_run(straight.checkpoint, resumed.checkpoint)
    # A larger budget on resume continues from the counted FLOPs, not from step 0.
    longer = train(tiny_config(tmp_path / "b", data, max_flops=7.5 * per_step, resume="auto"))
    assert longer.step == 8 and longer.train_flops == 8 * per_step


def test_flops_are_logged_to_tensorboard(tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(tiny_config(tmp_path, data, max_steps=4, log_every=2, tensorboard=True, peak_tflops=1e-6))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    flops = [(e.step, e.value) for e in events.Scalars("train/flops")]
    assert flops == [(2, pytest.approx(2 * step_flops(result))), (4, pytest.approx(4 * step_flops(result)))]
    rates = [e.value for e in events.Scalars("train/tflops_per_s")]
    mfus = [e.value for e in events.Scalars("train/mfu")]
    assert all(r > 0 for r in rates)
    assert mfus == pytest.approx([r / 1e-6 for r in rates], rel=1e-5)  # MFU against --peak-tflops


def test_budget_arithmetic():
    assert budget_steps(10, TrainState(), 3) == 4  # 9 < 10 <= 12
    assert budget_steps(9, TrainState(), 3) == 3  # exactly reached
    assert budget_steps(1, TrainState(), 3) == 1
    assert budget_steps(20, TrainState(step=2, train_flops=6), 3) == 7
    assert budget_steps(5, TrainState(step=4, train_flops=12), 3) == 4  # already past: stop where it is
    assert done_flops(TrainState(step=5, train_flops=0), 3) == 15  # a checkpoint from before the count
    assert done_flops(TrainState(step=5, train_flops=7), 3) == 7
    assert budget_steps(1.5e15, TrainState(), 10**12) == 1500  # large budgets in exact integer arithmetic


@pytest.mark.parametrize("field", ["max_flops", "peak_tflops"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_budget_options_are_validated(tmp_path, data, field, value):
    with pytest.raises(ConfigError, match=field):
        tiny_config(tmp_path, data, **{field: value}).validate()
