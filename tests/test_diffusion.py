"""Processes and samplers pinned against diffusers (the oracle) and against exact solutions.

diffusers keeps its schedules in float32 and casts the DPM-Solver sample to float32 inside
``step``, so float64 comparisons with it hold to about 1e-7 relative; the tolerance is 1e-6,
measured as max |ours - oracle| / max |oracle| over the whole tensor.
"""

from __future__ import annotations

import math

import pytest
import torch

from latentlm.config import ModelConfig, ProcessConfig, SamplerConfig
from latentlm.diffusion import (
    DDPMProcess,
    FlowProcess,
    build_process,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    euler_sample,
    evaluation_times,
    flow_time_grid,
    guidance_combine,
    guidance_scale_at,
    heun_sample,
    inference_timesteps,
    sample,
)
from latentlm.models.generation import SampleNoise

# ORACLE_SCHEDULE_NOTE: the schedule is pinned against diffusers' own in
# test_schedule_matches_diffusers. Elsewhere diffusers' DDPM/DDIM formulas get our float64 ᾱ, because
# its float32 ᾱ loses 1 - ᾱ near t = 0 to cancellation (cosine: ~1e-3 relative at t = 0), which the
# leading grids visit. DPM-Solver runs on diffusers' own float32 schedule: its grids stop at t >= 50.
# diffusers 0.42 + numpy 2 warn inside DPMSolverMultistepScheduler.set_timesteps; not our code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
TOL = 1e-6


@pytest.fixture(scope="module")
def schedulers():
    """diffusers' scheduler module, imported once per test module (the import takes seconds)."""
    import diffusers.schedulers as module

    return module


def rel_err(ours: torch.Tensor, oracle: torch.Tensor) -> float:
    return ((ours - oracle).abs().max() / oracle.abs().max()).item()


def ddpm(beta_schedule: str = "cosine", prediction_type: str = "v_prediction", **kwargs) -> DDPMProcess:
    return DDPMProcess(ProcessConfig(kind="ddpm", beta_schedule=beta_schedule,
                                     prediction_type=prediction_type, **kwargs))


def smooth_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed smooth nonlinear stand-in for a network: (N, ...) x (N,) model time -> (N, ...)."""
    t = t.reshape(-1, *([1] * (x.dim() - 1)))
    return 0.3 * torch.tanh(x) * torch.cos(t / 300) + 0.1 * x


class Recorder:
    """Wraps a denoiser and keeps every (x_t, t) it is called with: the sampler's trajectory."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone()))
        return self.fn(x, t)


def assert_same_trajectory(ours: Recorder, oracle: Recorder, tol: float = TOL) -> None:
    assert len(ours.calls) == len(oracle.calls)
    for (x, t), (x_ref, t_ref) in zip(ours.calls, oracle.calls, strict=True):
        assert torch.equal(t, t_ref.to(t.dtype)), (t, t_ref)
        assert rel_err(x, x_ref) < tol


def noise(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- DDPM schedule and training quantities -----------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_schedule_matches_diffusers(schedulers, beta_schedule):
    process = ddpm(beta_schedule)
    oracle = schedulers.DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[beta_schedule])
    assert process.betas.dtype == process.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(process.betas, oracle.betas.double(), rtol=TOL, atol=0)
    # atol for cosine's last step: ᾱ_999 ≈ 2e-9 and diffusers' float32 1 - β there (β = 0.999)
    # keeps only ~4 digits; our float64 value is the accurate one.
    torch.testing.assert_close(process.alphas_cumprod, oracle.alphas_cumprod.double(), rtol=TOL, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 16), (8, 4, 3, 3)])
@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_add_noise_and_v_target_match_diffusers(schedulers, beta_schedule, shape):
    process = ddpm(beta_schedule, "v_prediction")
    oracle = schedulers.DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[beta_schedule])
    oracle.alphas_cumprod = process.alphas_cumprod.clone()  # see ORACLE_SCHEDULE_NOTE
    x0, eps = noise(shape, 0), noise(shape, 1)
    t = torch.randint(0, 1000, (shape[0],), generator=torch.Generator().manual_seed(2))
    t[:2] = torch.tensor([0, 999])
    x_t = process.add_noise(x0, eps, t)
    assert x_t.shape == shape and x_t.dtype == torch.float64
    assert rel_err(x_t, oracle.add_noise(x0, eps, t)) < 1e-12
    assert rel_err(process.target(x0, eps, t), oracle.get_velocity(x0, eps, t)) < 1e-12
    assert torch.equal(ddpm(beta_schedule, "epsilon").target(x0, eps, t), eps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_predictions_invert_add_noise(prediction_type):
    process = ddpm("cosine", prediction_type)
    x0, eps = noise((32, 4, 2, 2), 0), noise((32, 4, 2, 2), 1)
    t = torch.arange(0, 960, 30)  # ᾱ_t not too small, so epsilon's 1/√ᾱ stays tame
    x_t = process.add_noise(x0, eps, t)
    target = process.target(x0, eps, t)
    torch.testing.assert_close(process.predict_x0(target, x_t, t), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(process.predict_eps(target, x_t, t), eps, rtol=0, atol=1e-10)
    # An int timestep gives the same as the per-sample tensor.
    t5 = torch.full((32,), 500)
    torch.testing.assert_close(process.predict_x0(target, x_t, 500), process.predict_x0(target, x_t, t5))


def oracle_ddpm_denoiser(process: DDPMProcess, x0: torch.Tensor):
    """Returns the exact target for the known clean x0: the loss must then be ~0."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = t.round().long()
        abar = process.alphas_cumprod[step].reshape(-1, *([1] * (x0.dim() - 1)))
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return process.target(x0, eps, step)

    return denoise


def oracle_flow_denoiser(process: FlowProcess, x0: torch.Tensor):
    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (t / process.num_train_timesteps).reshape(-1, *([1] * (x0.dim() - 1)))
        return (x_t - x0) / s  # v = ε - x0 = (x_t - x0) / t

    return denoise


@pytest.mark.parametrize("shape", [(256, 8), (16, 4, 4, 4)])
@pytest.mark.parametrize(
    "cfg",
    [
        ProcessConfig(kind="ddpm", prediction_type="epsilon", beta_schedule="linear"),
        ProcessConfig(kind="ddpm", prediction_type="v_prediction", timestep_sampling="min_snr"),
        ProcessConfig(kind="flow"),
        ProcessConfig(kind="flow", timestep_sampling="logit_normal"),
    ],
    ids=["ddpm-eps", "ddpm-v-minsnr", "flow", "flow-logitnormal"],
)
def test_loss_is_zero_for_the_exact_denoiser_and_reproducible(cfg, shape):
    process = build_process(cfg)
    x0 = noise(shape, 3)
    exact = (oracle_ddpm_denoiser if cfg.kind == "ddpm" else oracle_flow_denoiser)(process, x0)
    loss = process.loss(exact, x0, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (shape[0],) and loss.dtype == torch.float64
    assert loss.max().item() < 1e-16

    def zero(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (shape[0],) and t.dtype == torch.float32  # never the bf16 trap
        return torch.zeros_like(x_t)

    # Same global RNG state -> same loss; the float32 path returns float32.
    torch.manual_seed(7)
    first = process.loss(zero, x0.float())
    torch.manual_seed(7)
    assert torch.equal(process.loss(zero, x0.float()), first) and first.dtype == torch.float32


def test_min_snr_sampling_follows_the_weights():
    process = ddpm("cosine", "v_prediction", timestep_sampling="min_snr", min_snr_gamma=5.0)
    snr = process.alphas_cumprod / (1 - process.alphas_cumprod)
    weights = snr.clamp(max=5.0) / (snr + 1)
    torch.testing.assert_close(process.timestep_probs, weights / weights.sum())
    n = 200_000
    t = process.sample_timesteps(n, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    # Chi-square over 20 bins of 50 timesteps: 19 dof, 99.9% quantile ≈ 43.8.
    observed = torch.bincount(t // 50, minlength=20).double()
    expected = n * process.timestep_probs.reshape(20, 50).sum(dim=1)
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 43.8, chi2
    # epsilon uses min(SNR, γ)/SNR: all weight at high noise, 1 for every t with SNR <= γ.
    eps_process = ddpm("linear", "epsilon", timestep_sampling="min_snr")
    low_snr = snr_of(eps_process) <= 5.0
    assert torch.allclose(eps_process.timestep_probs[low_snr], eps_process.timestep_probs.max())


def snr_of(process: DDPMProcess) -> torch.Tensor:
    return process.alphas_cumprod / (1 - process.alphas_cumprod)


def test_uniform_and_flow_timestep_sampling():
    t = ddpm().sample_timesteps(50_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.min() == 0 and t.max() == 999
    flow = FlowProcess(ProcessConfig(kind="flow", timestep_sampling="logit_normal", logit_normal_mean=0.5))
    s = flow.sample_timesteps(50_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.float32 and s.min() > 0 and s.max() < 1
    assert abs(s.median().item() - 1 / (1 + math.exp(-0.5))) < 0.01
    assert torch.equal(flow.model_time(torch.tensor([0.0, 0.25, 1.0])), torch.tensor([0.0, 250.0, 1000.0]))


# -- DDPM-family samplers against diffusers ----------------------------------------------------

SOLVER_CASES = [("linear", "epsilon"), ("cosine", "v_prediction"), ("linear", "v_prediction")]


@pytest.mark.parametrize("num_steps,shape", [(20, (4, 3, 2, 2)), (7, (16, 4))])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("beta_schedule,prediction_type", SOLVER_CASES)
def test_dpm_solver_matches_diffusers(schedulers, beta_schedule, prediction_type, order, num_steps, shape):
    # Not cosine + epsilon: there x̂0 = (x - σε̂)/α with α_999 ≈ 5e-5 amplifies any denoiser error
    # (and diffusers' float32 rounding) 2e4-fold; it is the ill-posed pairing, not a solver test.
    process = ddpm(beta_schedule, prediction_type)
    x_T = noise(shape)
    ours = Recorder(smooth_denoiser)
    x0 = dpm_solver_sample(process, ours, x_T, num_steps=num_steps, order=order)

    scheduler = schedulers.DPMSolverMultistepScheduler(
        beta_schedule=DIFFUSERS_SCHEDULE[beta_schedule], prediction_type=prediction_type,
        algorithm_type="dpmsolver++", solver_type="midpoint", solver_order=order,
        timestep_spacing="linspace", lower_order_final=True, final_sigmas_type="zero",
    )
    scheduler.set_timesteps(num_steps)
    oracle, x = Recorder(smooth_denoiser), x_T.clone()
    for t in scheduler.timesteps:
        output = oracle(x, torch.full((shape[0],), float(t), dtype=torch.float64))
        x = scheduler.step(output, t, x).prev_sample
    assert_same_trajectory(ours, oracle)
    assert x0.shape == shape and x0.dtype == torch.float64
    assert rel_err(x0, x) < TOL


@pytest.mark.parametrize("num_steps,shape", [(20, (4, 3, 2, 2)), (7, (16, 4))])
@pytest.mark.parametrize("beta_schedule,prediction_type", SOLVER_CASES)
def test_ddim_leading_matches_diffusers(schedulers, beta_schedule, prediction_type, num_steps, shape):
    process = ddpm(beta_schedule, prediction_type)
    x_T = noise(shape)
    ours = Recorder(smooth_denoiser)
    x0 = ddim_sample(process, ours, x_T, num_steps, spacing="leading")

    scheduler = schedulers.DDIMScheduler(
        beta_schedule=DIFFUSERS_SCHEDULE[beta_schedule], prediction_type=prediction_type,
        clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading",
    )
    scheduler.alphas_cumprod = process.alphas_cumprod.clone()  # see ORACLE_SCHEDULE_NOTE
    scheduler.set_timesteps(num_steps)
    oracle, x = Recorder(smooth_denoiser), x_T.clone()
    for t in scheduler.timesteps:
        output = oracle(x, torch.full((shape[0],), float(t), dtype=torch.float64))
        x = scheduler.step(output, t, x, eta=0.0).prev_sample
    assert_same_trajectory(ours, oracle, tol=1e-12)
    assert rel_err(x0, x) < 1e-12


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_linspace_equals_first_order_dpm_solver(prediction_type):
    # DDIM is first-order DPM-Solver++ (Lu et al. 2022): on the same grid they are the same map.
    process = ddpm("cosine", prediction_type)
    x_T = noise((8, 4, 2, 2))
    torch.testing.assert_close(
        ddim_sample(process, smooth_denoiser, x_T, 12),
        dpm_solver_sample(process, smooth_denoiser, x_T, 12, order=1),
        rtol=1e-10, atol=1e-10,
    )


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("beta_schedule,prediction_type", SOLVER_CASES)
def test_ddpm_ancestral_matches_diffusers(schedulers, beta_schedule, prediction_type, spacing):
    process = ddpm(beta_schedule, prediction_type)
    shape, num_steps = (6, 3, 2, 2), 10
    x_T = noise(shape)
    ours_gen = torch.Generator().manual_seed(5)

    def randn(sample_shape: tuple[int, ...]) -> torch.Tensor:
        # Same draws, same order as diffusers' DDPMScheduler.step with a generator of the same seed.
        return torch.randn((shape[0], *sample_shape), generator=ours_gen, dtype=torch.float64)

    ours = Recorder(smooth_denoiser)
    x0 = ddpm_sample(process, ours, x_T, num_steps, randn, spacing=spacing)

    scheduler = schedulers.DDPMScheduler(
        beta_schedule=DIFFUSERS_SCHEDULE[beta_schedule], prediction_type=prediction_type, clip_sample=False,
    )
    scheduler.alphas_cumprod = process.alphas_cumprod.clone()  # see ORACLE_SCHEDULE_NOTE
    if spacing == "leading":
        scheduler.set_timesteps(num_steps)
    else:  # diffusers' DDPM "linspace" grid differs from DPM-Solver's; pass ours as custom timesteps
        scheduler.set_timesteps(timesteps=inference_timesteps(1000, num_steps, "linspace"))
    oracle, x = Recorder(smooth_denoiser), x_T.clone()
    oracle_gen = torch.Generator().manual_seed(5)
    for t in scheduler.timesteps:
        output = oracle(x, torch.full((shape[0],), float(t), dtype=torch.float64))
        x = scheduler.step(output, t, x, generator=oracle_gen).prev_sample
    assert_same_trajectory(ours, oracle, tol=1e-12)
    # diffusers adds √1e-20·z on a final step that starts at t > 0 (its variance clamp); we add none.
    assert rel_err(x0, x) < 1e-9


def test_inference_timesteps():
    assert inference_timesteps(1000, 20, "linspace")[:3] == [999, 949, 899]
    assert inference_timesteps(1000, 20, "linspace")[-1] == 50
    assert inference_timesteps(1000, 20, "leading") == list(range(950, -1, -50))
    assert inference_timesteps(1000, 999, "linspace") == list(range(999, 0, -1))
    with pytest.raises(ValueError, match="num_steps=1000"):
        inference_timesteps(1000, 1000, "linspace")
    with pytest.raises(ValueError, match="spacing='trailing'"):
        inference_timesteps(1000, 10, "trailing")


def test_samplers_feed_float32_time_for_float32_samples():
    # Timesteps above 256 are not representable in bf16; they must reach the network exactly.
    seen = []

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return smooth_denoiser(x, t)

    x_T = noise((4, 8)).float()
    x0 = dpm_solver_sample(ddpm(), denoise, x_T, num_steps=20)
    assert x0.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in seen)
    assert [int(t[0]) for t in seen] == inference_timesteps(1000, 20, "linspace")
    x0_bf16_net = dpm_solver_sample(ddpm(), lambda x, t: smooth_denoiser(x, t).bfloat16(), x_T, 20)
    assert x0_bf16_net.dtype == torch.float32


# -- Flow samplers ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 16), (4, 3, 4, 4)])
@pytest.mark.parametrize("num_steps", [1, 7, 50])
def test_flow_euler_is_exact_on_a_straight_path(shape, num_steps):
    process = FlowProcess(ProcessConfig(kind="flow"))
    x0, eps = noise(shape, 0), noise(shape, 1)
    velocity = eps - x0  # the true, constant velocity of the path from x0 to eps
    recovered = euler_sample(process, lambda x, t: velocity, eps, num_steps)
    torch.testing.assert_close(recovered, x0, rtol=0, atol=1e-12)
    x_t = process.add_noise(x0, eps, torch.full((shape[0],), 0.3, dtype=torch.float64))
    torch.testing.assert_close(process.predict_x0(velocity, x_t, 0.3), x0)
    torch.testing.assert_close(process.predict_eps(velocity, x_t, torch.full((shape[0],), 0.3)), eps)
    assert torch.equal(process.target(x0, eps, torch.zeros(shape[0])), velocity)


def test_flow_heun_is_second_order():
    # dx/dt = cos(t)·x has x(0) = x(1)·exp(-sin 1): the velocity field reads t from model time.
    process = FlowProcess(ProcessConfig(kind="flow"))
    x_T = noise((5, 2, 2, 2))
    exact = x_T * math.exp(-math.sin(1.0))

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(t / 1000).reshape(-1, 1, 1, 1) * x

    errors = [(heun_sample(process, velocity, x_T, n) - exact).abs().max().item() for n in (8, 16, 32)]
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 3.0 < coarse / fine < 5.0, errors
    euler_errors = [(euler_sample(process, velocity, x_T, n) - exact).abs().max().item() for n in (16, 32)]
    assert 1.6 < euler_errors[0] / euler_errors[1] < 2.4  # first order, for contrast


def _gaussian_flow(s: float):
    """The exact flow velocity of 1-D Gaussian data x0 ~ N(0, s²) in model time (t · 1000); x(0) = s · x(1)."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t / 1000
        return x * (t - (1 - t) * s * s) / ((1 - t) ** 2 * s * s + t * t)

    return velocity


def _heun_without_last_corrector(velocity, x: torch.Tensor, n: int) -> torch.Tensor:
    grid = flow_time_grid(n)
    for i, (t, t_next) in enumerate(zip(grid, grid[1:], strict=False)):
        v = velocity(x, torch.full((1,), t * 1000.0, dtype=torch.float64))
        x_euler = x + (t_next - t) * v
        if i == n - 1:
            return x_euler  # EDM's choice: the last step is an Euler step
        x = x + 0.5 * (t_next - t) * (v + velocity(x_euler, torch.full((1,), t_next * 1000.0, dtype=torch.float64)))
    return x


def test_heun_keeps_its_last_corrector_for_accuracy_not_for_order():
    # Dropping the last corrector stays second order but is 3-4.5x less accurate on the exact flow of Gaussian
    # data; heun_sample keeps it (the numbers of its docstring).
    process = FlowProcess(ProcessConfig(kind="flow"))
    x_T = torch.ones(1, dtype=torch.float64)
    for s in (0.1, 0.5):
        velocity = _gaussian_flow(s)
        full = {n: abs(heun_sample(process, velocity, x_T, n).item() - s) for n in (16, 32, 64)}
        drop = {n: abs(_heun_without_last_corrector(velocity, x_T, n).item() - s) for n in (16, 32, 64)}
        assert all(3.0 < drop[n] / full[n] < 4.5 for n in full), (full, drop)
        assert 3.2 < drop[32] / drop[64] < 4.8 and 3.2 < full[32] / full[64] < 4.8  # both second order


# -- Dispatcher, guidance, noise --------------------------------------------------------------


def test_sample_dispatches_to_the_named_sampler():
    x_T = noise((4, 8))
    cos = ddpm()
    flow = build_process(ProcessConfig(kind="flow"))
    assert isinstance(flow, FlowProcess) and isinstance(cos, DDPMProcess)
    torch.testing.assert_close(sample(cos, smooth_denoiser, x_T, SamplerConfig(num_steps=9, solver_order=1)),
                               dpm_solver_sample(cos, smooth_denoiser, x_T, 9, order=1))
    torch.testing.assert_close(sample(cos, smooth_denoiser, x_T, SamplerConfig(sampler="ddim", num_steps=9)),
                               ddim_sample(cos, smooth_denoiser, x_T, 9))
    torch.testing.assert_close(sample(flow, smooth_denoiser, x_T, SamplerConfig(sampler="heun", num_steps=5)),
                               heun_sample(flow, smooth_denoiser, x_T, 5))
    torch.testing.assert_close(sample(flow, smooth_denoiser, x_T, SamplerConfig(sampler="euler", num_steps=5)),
                               euler_sample(flow, smooth_denoiser, x_T, 5))
    noise_a, noise_b = SampleNoise(0, range(4)), SampleNoise(0, range(4))
    torch.testing.assert_close(
        sample(cos, smooth_denoiser, x_T, SamplerConfig(sampler="ddpm", num_steps=9), randn=noise_a.randn),
        ddpm_sample(cos, smooth_denoiser, x_T, 9, noise_b.randn),
    )


@pytest.mark.parametrize("kind,name,order", [("ddpm", "dpm_solver", 1), ("ddpm", "dpm_solver", 2), ("ddpm", "ddim", 2),
                                             ("ddpm", "ddpm", 2), ("flow", "euler", 2), ("flow", "heun", 2)])
@pytest.mark.parametrize("num_steps", [1, 2, 7, 20])
def test_evaluation_times_are_the_times_each_sampler_calls(kind, name, order, num_steps):
    """The fused head solve looks modulations up by call number: the grid must be the sampler's, in order."""
    process = build_process(ProcessConfig(kind=kind, num_train_timesteps=1000 if kind == "ddpm" else 500))
    cfg = SamplerConfig(sampler=name, num_steps=num_steps, solver_order=order)
    recorder = Recorder(smooth_denoiser)
    sample(process, recorder, noise((3, 4)).float(), cfg, randn=SampleNoise(0, range(3)).randn)
    called = [t for _, t in recorder.calls]
    expected = evaluation_times(process, cfg)
    assert len(called) == len(expected) == (2 * num_steps if name == "heun" else num_steps)
    for t, value in zip(called, expected, strict=True):
        assert t.dtype == torch.float32 and torch.equal(t, torch.full((3,), value, dtype=torch.float32))


@pytest.mark.parametrize(
    "process_cfg,sampler_cfg,match",
    [
        (ProcessConfig(kind="flow"), SamplerConfig(sampler="dpm_solver"), "sampler='dpm_solver'.*euler"),
        (ProcessConfig(kind="ddpm"), SamplerConfig(sampler="euler"), "sampler='euler'.*dpm_solver"),
        (ProcessConfig(kind="ddpm"), SamplerConfig(sampler="unipc"), "sampler='unipc'"),
        (ProcessConfig(kind="ddpm"), SamplerConfig(solver_order=3), "solver_order=3"),
        (ProcessConfig(kind="flow"), SamplerConfig(sampler="heun", num_steps=0), "num_steps=0"),
        (ProcessConfig(kind="ddpm"), SamplerConfig(sampler="ddpm"), "randn"),
    ],
)
def test_sample_refuses_bad_configs(process_cfg, sampler_cfg, match):
    """Sampler rules are checked once, by ``SamplerConfig.validate``; ``sample`` only asks for what it needs."""
    with pytest.raises(ValueError, match=match):
        sampler_cfg.validate(ModelConfig(process=process_cfg))
        sample(build_process(process_cfg), smooth_denoiser, noise((2, 4)), sampler_cfg)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (ProcessConfig(kind="diffusion"), "kind='diffusion'"),
        (ProcessConfig(beta_schedule="quadratic"), "beta_schedule='quadratic'"),
        (ProcessConfig(prediction_type="sample"), "prediction_type='sample'"),
        (ProcessConfig(timestep_sampling="logit_normal"), "timestep_sampling='logit_normal'"),
        (ProcessConfig(kind="flow", timestep_sampling="min_snr"), "timestep_sampling='min_snr'"),
    ],
)
def test_build_process_refuses_bad_configs(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_process(cfg)


def test_sampler_validate_accepts_every_valid_pair():
    for kind, names in (("ddpm", ("dpm_solver", "ddim", "ddpm")), ("flow", ("euler", "heun"))):
        for name in names:
            SamplerConfig(sampler=name).validate(ModelConfig(process=ProcessConfig(kind=kind)))


def test_guidance_combine_and_schedule():
    cond, uncond = noise((3, 4, 2, 2), 0), noise((3, 4, 2, 2), 1)
    assert torch.equal(guidance_combine(cond, uncond, 1.0), cond)
    torch.testing.assert_close(guidance_combine(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(guidance_combine(cond, uncond, 3.0), 3 * cond - 2 * uncond)  # all channels
    assert guidance_scale_at(0, 256, 3.0, "constant") == 3.0
    assert guidance_scale_at(255, 256, 3.0, "linear") == 3.0
    assert guidance_scale_at(127, 256, 3.0, "linear") == 2.0
    with pytest.raises(ValueError, match="cfg_schedule='cosine'.*constant"):
        guidance_scale_at(0, 256, 3.0, "cosine")


def test_sample_noise_depends_only_on_seed_and_index():
    together = SampleNoise(seed=11, indices=[0, 1, 2, 3, 4, 5])
    split = [SampleNoise(seed=11, indices=[4, 1]), SampleNoise(seed=11, indices=[5, 3, 0, 2])]
    assert len(together) == 6 and len(split[1]) == 4
    for shape in [(16,), (4, 3, 3)]:  # successive calls keep agreeing, whatever the shape
        rows = together.randn(shape, dtype=torch.float64)
        assert rows.shape == (6, *shape) and rows.dtype == torch.float64
        first, second = split[0].randn(shape), split[1].randn(shape)
        assert torch.equal(first[0], rows[4].float()) and torch.equal(first[1], rows[1].float())
        assert torch.equal(second, rows[[5, 3, 0, 2]].float())
    assert not torch.equal(SampleNoise(12, [0]).randn((16,)), SampleNoise(11, [0]).randn((16,)))
    assert SampleNoise(0, []).randn((3,)).shape == (0, 3)
