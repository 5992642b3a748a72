"""What LatentLM's and DiT's ``generate`` share: input checks, per-sample noise streams, the guided
denoiser, LatentLM's fused head solve, the compiler wrapper, and the fixed-shape runner that replays a
step as a CUDA graph.

Noise: sample k of a call draws from a generator seeded by (seed, sample_indices[k]), so a sample
never depends on the batch, rank or world size it is generated in (``SampleNoise``).
Guidance: with classifier-free guidance the batch is [conditional half; null-class half] and the
network's output becomes ``uncond + s·(cond − uncond)`` on every channel (``guided_denoiser``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from latentlm.config import ModelConfig, SamplerConfig
from latentlm.diffusion import Denoiser, Process, evaluation_times, guidance_combine, sample

# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def check_labels(labels: Tensor, num_classes: int, allow_null: bool = True) -> None:
    """Refuse labels outside [0, num_classes] (num_classes itself is the null class)."""
    if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} {labels.dtype}")
    if labels.numel() == 0:
        raise ValueError("labels is empty: give at least one class id")
    high = num_classes if allow_null else num_classes - 1
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > high:
        raise ValueError(f"label {lo if lo < 0 else hi} out of range: allowed 0..{num_classes - 1}"
                         + (f" (and {num_classes} = null class)" if allow_null else ""))


def check_latents(latents: Tensor, cfg: ModelConfig) -> None:
    """Refuse latents whose shape is not (N, in_channels, input_size, input_size) of ``cfg``."""
    expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if latents.dim() != 4 or tuple(latents.shape[1:]) != expected:
        raise ValueError(f"latents of shape {tuple(latents.shape)} do not match the model: expected "
                         f"(N, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}) (in_channels, input_size)")


# ---------------------------------------------------------------------------------------------
# Noise streams
# ---------------------------------------------------------------------------------------------


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

    def randn(self, shape: tuple[int, ...], device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal noise (N, *shape): row k from sample k's generator.

        Drawn in float32 on the CPU (so values do not depend on the accelerator), then moved/cast. To a
        CUDA device the copy goes through pinned memory without blocking: a plain copy would wait for
        the GPU to finish its queued work, once per generated token.
        """
        shape = tuple(shape)
        if not self.generators:
            return torch.empty((0, *shape), device=device, dtype=dtype)
        rows = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in self.generators])
        if device is not None and torch.device(device).type == "cuda":
            rows = rows.pin_memory().to(device, non_blocking=True)  # the host allocator keeps it until copied
        return rows.to(device=device, dtype=dtype)  # (N, *shape)


# ---------------------------------------------------------------------------------------------
# The prologue of every generate call
# ---------------------------------------------------------------------------------------------


@dataclass
class GenerationSetup:
    """A checked generate call: the labels (N,), their noise, and the batch the network runs on."""

    labels: Tensor  # (N,) class ids
    sampler: SamplerConfig
    noise: SampleNoise
    work: torch.dtype  # solver state dtype: >= float32 even under bf16 weights
    stream: Tensor  # (B,) labels of the network's batch: [labels; null labels] when guided, else labels

    @property
    def guided(self) -> bool:
        return self.stream.shape[0] != self.labels.shape[0]

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        """Per-sample noise (N, *shape) in the solver's dtype, scaled by the sampling temperature."""
        return self.sampler.temperature * self.noise.randn(shape, device=self.labels.device, dtype=self.work)


def start_generation(model: torch.nn.Module, labels: Tensor, sampler: SamplerConfig | None, seed: int,
                     sample_indices: Sequence[int] | None) -> GenerationSetup:
    """Check a generate call's inputs (``ValueError`` naming the bad one) and set up its noise and batch.

    Sample k's noise comes from (seed, sample_indices[k]), default indices 0..N-1.
    """
    sampler = sampler or SamplerConfig()
    cfg: ModelConfig = model.config
    check_labels(labels, cfg.num_classes)
    sampler.validate(cfg)
    n = labels.shape[0]
    noise = SampleNoise(seed, range(n) if sample_indices is None else sample_indices)
    if len(noise) != n:
        raise ValueError(f"sample_indices has {len(noise)} entries for {n} labels")
    work = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    stream = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if sampler.guided else labels
    return GenerationSetup(labels, sampler, noise, work, stream)


def guided_denoiser(denoise: Denoiser, scale: float | Tensor, guided: bool) -> Denoiser:
    """The denoiser a solver calls. Guided, ``denoise`` runs once on the doubled batch [x; x] (its
    conditioning is [labels; null labels]) and the two halves are combined on every channel."""
    if not guided:
        return denoise

    def combined(x_t: Tensor, t: Tensor) -> Tensor:
        out = denoise(torch.cat([x_t, x_t]), torch.cat([t, t]))  # (2N, ...): conditional half, null half
        return guidance_combine(*out.chunk(2), scale)

    return combined


# ---------------------------------------------------------------------------------------------
# Fixed-shape steps, replayed as CUDA graphs
# ---------------------------------------------------------------------------------------------


class StaticGraph:
    """Runs ``fn`` on fixed input buffers; on CUDA (``capture=True``) as one replayed CUDA graph.

    Per-token generation is hundreds of small kernels per step; replaying them as a graph removes
    the launch overhead that otherwise dominates on a GPU. Inputs are copied into the buffers (tensors)
    or filled in (Python numbers); the output buffer is cloned so callers may keep it.
    With ``capture=False`` the same fixed-shape code runs eagerly (CPU, tests).
    """

    def __init__(self, fn: Callable[..., Tensor], *examples: Tensor, capture: bool) -> None:
        self.fn = fn
        self.inputs = [e.clone() for e in examples]
        self.graph = None
        if capture:
            # Warm up on a side stream first (lazy inits, autotuning), as CUDA graph capture requires.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = fn(*self.inputs)

    def __call__(self, *args: Tensor | float) -> Tensor:
        for buffer, value in zip(self.inputs, args, strict=True):
            if isinstance(value, Tensor):
                buffer.copy_(value)
            else:
                buffer.fill_(value)
        if self.graph is None:
            return self.fn(*self.inputs)
        self.graph.replay()
        return self.output.clone()


# ---------------------------------------------------------------------------------------------
# The fused path: precomputed conditioning, torch.compile
# ---------------------------------------------------------------------------------------------


class FusedHeadSolve:
    """One token's full solver run of LatentLM's head, with what is constant over a solve hoisted out of it.

    The same computation as ``sample(process, guided_denoiser(head(., ., cond)), x_T, sampler)``, reorganised:

    * the timestep embeddings of the solver's grid (``evaluation_times``) are computed once, here, per
      ``generate`` call: (E, D) for the E distinct times;
    * per token, every modulation vector of every evaluation comes from one matmul,
      ``head.modulations(cond + t_emb)`` over (E, B, D) (the adaLN inputs do not depend on x_t);
    * the solver then calls ``head.forward_modulated`` with the modulations of its k-th call: the k-th
      time of ``evaluation_times`` (pinned against the samplers in the tests).

    What differs from the reference is the shapes of three matmuls (the E rows of the timestep MLP, the
    E x B rows and stacked weights of the modulations), so results agree to float rounding. Written as
    one function of tensors with Python-number coefficients, so ``torch.compile`` unrolls the whole
    solve into one graph.
    """

    def __init__(self, head: torch.nn.Module, process: Process, setup: GenerationSetup) -> None:
        self.head, self.process, self.sampler, self.guided = head, process, setup.sampler, setup.guided
        times = evaluation_times(process, setup.sampler)
        distinct = sorted(set(times), key=times.index)
        self.calls = [distinct.index(t) for t in times]  # call k uses embedding calls[k]
        time_dtype = torch.float64 if setup.work == torch.float64 else torch.float32  # as the samplers feed it
        grid = torch.tensor(distinct, dtype=time_dtype, device=setup.labels.device)  # (E,)
        self.time_emb = head.time_embed(grid)  # (E, D)
        self.weight = head.modulation_weight()  # ((3 depth + 2) D, D)

    def __call__(self, x_T: Tensor, cond: Tensor, scale: Tensor | float) -> Tensor:
        """x_T (N, C p^2) scaled noise, cond (B, D), guidance scale -> token (N, C p^2)."""
        mods = self.head.modulations(cond[None] + self.time_emb[:, None], self.weight)  # (E, B, (3 depth + 2) D)
        per_call = iter([mods[k] for k in self.calls])

        def denoise(x_t: Tensor, t: Tensor) -> Tensor:  # t is implied by the call number
            return self.head.forward_modulated(x_t, next(per_call))

        return sample(self.process, guided_denoiser(denoise, scale, self.guided), x_T, self.sampler)


def compiled(fn: Callable[..., Tensor], fullgraph: bool = True) -> Callable[..., Tensor]:
    """``fn`` through ``torch.compile`` (Inductor, default mode: no CUDA graphs of its own; ``StaticGraph``
    captures them). ``fullgraph``: a graph break is an error, not a silent split into eager pieces.
    Shapes: specialised on the first call; a second batch size recompiles with the sizes that changed
    (the batch) symbolic, and that graph then serves every later size (sample-many's smaller last batch
    of a shard included). ``dynamic=True`` would start symbolic, but then also makes the solver's step
    counts and coefficients symbolic and still specialises the batch through the head's matmuls."""
    return torch.compile(fn, fullgraph=fullgraph)
