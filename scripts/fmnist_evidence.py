"""The DiSA paper's three pieces of evidence, measured on the embedded Fashion-MNIST MAR: one plot, one JSON.

DiSA (arXiv 2505.20297) motivates annealing by three observations about the per-token diffusion head: as AR
generation proceeds, (a) the tokens it samples vary less, (b) its denoising paths are straighter, and (c) a small MLP
predicts the next token from the model's condition vector ``z`` more accurately. This script measures all three on
the trained testbed model (:mod:`mar_disa.testbed`) and says plainly which the numbers support.

    python scripts/fmnist_evidence.py [--checkpoint PATH] [--out-dir outputs/evidence] [--num-images 200]

What is measured, and how (per AR step k of ``--num-iter`` steps, MAR's cosine reveal schedule):

* **Contexts** are teacher-forced on REAL Fashion-MNIST images: each image gets its own random generation order
  (:func:`~mar_disa.models.mar.orders_from_seeds`, seed = ``--seed`` + image index), step k's mask hides the tokens
  not yet revealed, and ``z = decoder(encoder(tokens, mask, class))`` at the positions step k predicts is exactly
  what the head would be conditioned on had the model generated that image. No CFG (scale 1): ``z`` is the class-
  conditional row. Test images (the first ``--num-images`` of the test split) give the contexts of (a), (b) and the
  evaluation of (c); training images (the first ``--train-images``, other order seeds) give (c)'s training set.
* **Top timestep.** Both head samplers below start at t = 950 by default (``--clip 950``, MAR_DiSA's clip): the
  shipped testbed head breaks when started at the official t = 999 (its eps error there is amplified ~30x per
  step; the model card has the numbers), so its 999-start variance would measure the breakage, not the context.
  ``--clip none`` gives the official top timesteps (999 ancestral, 980 DDIM), ``--clip auto`` the checkpoint's
  ``train_clip``, ``--clip T`` any other.
* **(a) Sampled-token variance.** For each context the head draws ``--samples`` tokens with the original sampler
  without annealing (ancestral DDPM, ``--head-steps`` 50 nominal steps at every AR step, from the top timestep
  above; with a clip it is MAR_DiSA's ``DiSA`` sampler with ``upper = lower``, whose respacing keeps 48 steps;
  temperature 1); the unbiased variance over the draws, averaged over
  the 16 token channels, is one number per context; the curve is its mean over contexts (the paper: 100 draws per
  position). To keep this affordable, ``--variance-positions`` (default 1) positions per image and step are drawn at
  random among the ones the step predicts: an unbiased estimate of the per-step mean. The reference line is the
  variance of REAL tokens given only their class and position (from the training images): what the head's spread
  should be when the context tells it nothing more; ``sampled_over_real`` in the JSON is the ratio of the two
  (it removes the step-to-step noise of which positions happened to be drawn).
* **(b) Straightness.** One deterministic DDIM path (eta 0, ``ddim{--ddim-steps}`` as MAR_DiSA's
  ``--diff_sampler DDIM``, its 980 clip lowered to the top timestep above) per context, from the head's starting
  noise to the token. The path is measured in rectified-flow coordinates ``y = x / (alpha + sigma)`` at flow time
  ``tau = alpha / (alpha + sigma)``: the standard map from a VP diffusion ``x = alpha x0 + sigma eps`` to the linear
  interpolation ``y = tau x0 + (1 - tau) eps``. Why not raw ``x``: in VP coordinates even a token the context fully
  determines travels an arc (chord/arc ~0.9), while in flow coordinates a DDIM path with a fixed ``x0``
  prediction is exactly a straight line; so 1 means "the target was a point mass" and any spread of the
  conditional distribution bends the path. Two numbers per path:
  ``chord / arc`` (|y_end - y_start| over the summed segment lengths; 1 = straight) and the Rectified-Flow
  straightness of Liu et al. 2022, ``int ||(y_1 - y_0) - dy/dtau||^2 dtau`` per channel (0 = straight at
  constant speed; :func:`rf_straightness`).
* **(c) MLP predictability.** A small MLP (``z`` -> Linear -> GELU -> Linear -> GELU -> Linear -> token, width
  ``--mlp-width``) is fitted with MSE on every teacher-forced context of the training images (all steps pooled, one
  fit), then evaluated per step on the test contexts: MSE per channel and ``1 - R^2`` = MSE / variance of the real
  tokens around the training mean (1 = no better than a constant). The dashed reference is the MSE of predicting
  each token by the training mean of its class and position (what step 0 can at best know).

A claim counts as supported when its curve moves the claimed way between the first and last quarter of the AR steps
by more than two standard errors of that change (from the per-step standard errors over contexts) and the Spearman
rank correlation with k has the claimed sign with ``|rho| >= 0.5``; the script prints a verdict for
each, and "NOT supported" when the numbers say so. Everything is seeded (order seeds, head noise, MLP init and
batches): a rerun with the same flags gives the same JSON (timings aside).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
import torch
from disa.checkpoints import CheckpointError
from disa.diffusion import GaussianDiffusion, ModelFn, ddim_sample
from disa.evaluation import atomic_path
from disa.fashion_mnist import FashionMNIST
from disa.noise import TorchNoise
from disa.schedules import DDIM_CLIP, DISA_CLIP
from mar_disa.main_mar import SamplerConfig
from mar_disa.models.mar import MAR, mask_steps, orders_from_seeds
from mar_disa.testbed import SHIPPED_CHECKPOINT, load_testbed_model, read_model_config
from scipy import stats
from torch import nn

TRAIN_ORDER_SEED_OFFSET = 1_000_000  # training images' order seeds never coincide with the test images'
SUPPORT_RHO = 0.5  # |Spearman rho| a trend needs, besides moving the right way between the first and last quarter


# ---- path straightness ---------------------------------------------------------------------------------------------


def chord_arc_ratio(path: torch.Tensor) -> torch.Tensor:
    """``|p_T - p_0| / sum_i |p_{i+1} - p_i|`` per row of ``path (T+1, R, C)`` -> ``(R,)``; 1 = straight line.

    A path that never moves counts as straight (1)."""
    arc = path.diff(dim=0).norm(dim=-1).sum(dim=0)  # (R,)
    chord = (path[-1] - path[0]).norm(dim=-1)  # (R,)
    return torch.where(arc > 0, chord / arc.clamp_min(torch.finfo(path.dtype).tiny), torch.ones_like(arc))


def rf_straightness(path: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Rectified-Flow straightness (Liu et al. 2022) of piecewise-linear ``path (T+1, R, C)`` at increasing ``times
    (T+1,)`` -> ``(R,)``: ``mean_tau ||v(tau) - v_bar||^2 / C`` with ``v`` the segment velocities and ``v_bar`` the
    chord over the time span (the paper's ``Z_1 - Z_0`` on a unit span). 0 = a straight line at constant speed."""
    if times.dim() != 1 or times.shape[0] != path.shape[0] or not bool((times.diff() > 0).all()):
        raise ValueError(f"times must be ({path.shape[0]},) strictly increasing, got {tuple(times.shape)}")
    dt = times.diff()  # (T,)
    span = times[-1] - times[0]
    velocity = path.diff(dim=0) / dt[:, None, None]  # (T, R, C)
    mean_velocity = (path[-1] - path[0]) / span  # (R, C)
    deviation = (velocity - mean_velocity).pow(2).mean(dim=-1)  # (T, R), per channel
    return (deviation * dt[:, None]).sum(dim=0) / span


def ddim_flow_path(
    model_fn: ModelFn, x_start: torch.Tensor, diffusion: GaussianDiffusion
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic DDIM from ``x_start (R, C)`` (noise at the top kept timestep) to the token, returned in
    rectified-flow coordinates: states ``y = x / (alpha + sigma)`` ``(T+1, R, C)`` and flow times ``tau = alpha /
    (alpha + sigma)`` ``(T+1,)``, increasing from ~0 (noise) to 1 (the token)."""
    states = [x_start]
    ddim_sample(model_fn, x_start, diffusion, callback=lambda info: states.append(info["x"]))
    tab = diffusion.tables(x_start.device)
    # State i is at the noise level left by step i: abar of the top timestep, then abar_prev of each step in turn.
    abar = torch.cat([tab.alphas_cumprod[-1:], tab.alphas_cumprod_prev.flip(0)])  # (T+1,)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    return torch.stack(states) / (alpha + sigma)[:, None, None], alpha / (alpha + sigma)


# ---- teacher-forced contexts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepContexts:
    """The teacher-forced contexts of one AR step: one row per (image, predicted position)."""

    z: torch.Tensor  # (R, D) condition vectors the head would see
    target: torch.Tensor  # (R, C) the real tokens there
    position: torch.Tensor  # (R,) int64 token index
    label: torch.Tensor  # (R,) int64 class


@torch.no_grad()
def teacher_forced_contexts(
    model: MAR,
    images: torch.Tensor,
    labels: torch.Tensor,
    seeds: Sequence[int],
    num_iter: int,
    *,
    per_image: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 250,
) -> list[StepContexts]:
    """Contexts of every AR step for real ``images (B, 1, H, W)`` in [-1, 1] with classes ``labels (B,)``; image b
    is revealed in the order of ``seeds[b]``. ``per_image``: keep that many of the positions each step predicts,
    drawn with ``generator`` (all of them if ``None`` or if the step predicts fewer)."""
    device = model.fake_latent.device
    parts: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(num_iter)]
    for start in range(0, len(labels), batch_size):
        tokens = model.patchify(images[start : start + batch_size].to(device))  # (b, N, C): the pixels themselves
        label = labels[start : start + batch_size].to(device)  # (b,)
        orders = orders_from_seeds(list(seeds[start : start + batch_size]), model.seq_len, device)  # (b, N)
        class_embedding = model.class_emb(label)  # (b, D)
        for st in mask_steps(orders, num_iter):
            z = model.forward_mae_decoder(model.forward_mae_encoder(tokens, st.mask, class_embedding), st.mask)
            positions = st.positions  # (b, n)
            b, n = positions.shape
            if per_image is not None and per_image < n:
                pick = torch.rand(b, n, generator=generator).argsort(dim=1)[:, :per_image].to(device)  # (b, k)
                positions = positions.gather(1, pick)
            rows = positions.shape[1]
            picked_z = z.gather(1, positions[..., None].expand(-1, -1, z.shape[-1]))  # (b, k, D)
            picked_x = tokens.gather(1, positions[..., None].expand(-1, -1, tokens.shape[-1]))  # (b, k, C)
            parts[st.step].append((picked_z.reshape(b * rows, -1), picked_x.reshape(b * rows, -1),
                                   positions.reshape(-1), label[:, None].expand(-1, rows).reshape(-1)))  # fmt: skip
    return [StepContexts(*(torch.cat(col) for col in zip(*step))) for step in parts]


# ---- the three measurements ----------------------------------------------------------------------------------------


@torch.no_grad()
def sampled_variance(model: MAR, z: torch.Tensor, step: int, num_iter: int, *, samples: int, temperature: float,
                     noise: TorchNoise, chunk_rows: int = 16384) -> torch.Tensor:  # fmt: skip
    """Per-context variance ``(R,)`` of ``samples`` head draws for each row of ``z (R, D)`` (unbiased over draws,
    mean over channels), with the head's configured sampler at AR step ``step``."""
    out = []
    per_chunk = max(1, chunk_rows // samples)
    for start in range(0, z.shape[0], per_chunk):
        rows = z[start : start + per_chunk]  # (r, D)
        draws = model.diffloss.sample(rows.repeat_interleave(samples, dim=0), temperature, 1.0, step=step,
                                      ar_num_iter=num_iter, noise=noise)  # (r S, C), draws of one row adjacent
        out.append(draws.reshape(rows.shape[0], samples, -1).var(dim=1, unbiased=True).mean(dim=1))  # (r,)
    return torch.cat(out)


@torch.no_grad()
def path_straightness(model: MAR, z: torch.Tensor, diffusion: GaussianDiffusion, noise: TorchNoise,
                      chunk_rows: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(chord/arc (R,), RF straightness (R,))`` of one DDIM path per row of ``z (R, D)``."""
    ratios, rf = [], []
    for start in range(0, z.shape[0], chunk_rows):
        rows = z[start : start + chunk_rows]
        x_start = noise((rows.shape[0], model.token_embed_dim), dtype=torch.float32, device=rows.device)  # (r, C)
        path, times = ddim_flow_path(lambda x, t, c=rows: model.diffloss.net(x, t, c), x_start, diffusion)
        ratios.append(chord_arc_ratio(path))
        rf.append(rf_straightness(path, times))
    return torch.cat(ratios), torch.cat(rf)


def make_mlp(in_dim: int, width: int, out_dim: int) -> nn.Sequential:
    """The probe: two hidden layers of ``width`` with GELU."""
    return nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, out_dim))  # fmt: skip


def fit_mlp(z: torch.Tensor, target: torch.Tensor, *, width: int, epochs: int, batch_size: int, lr: float,
            seed: int) -> tuple[nn.Sequential, float]:  # fmt: skip
    """Fit :func:`make_mlp` on ``z (R, D) -> target (R, C)`` with MSE (AdamW, cosine-decayed learning rate);
    returns the probe and its final training MSE per channel."""
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's global RNG alone
        torch.manual_seed(seed)
        mlp = make_mlp(z.shape[1], width, target.shape[1]).to(z.device)
    batches = math.ceil(z.shape[0] / batch_size)
    opt = torch.optim.AdamW(mlp.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * batches)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(z.shape[0], generator=gen).to(z.device)
        for i in range(batches):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss = (mlp(z[idx]) - target[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    mlp.eval()
    with torch.no_grad():
        train_mse = float((mlp(z) - target).pow(2).mean())
    return mlp, train_mse


def group_mean_table(
    contexts: Sequence[StepContexts], num_classes: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance (per channel, averaged) of the real tokens of each (class, position) over ``contexts``:
    ``(K, N, C)`` means and ``(K, N)`` variances (a group with fewer than two tokens gets NaN)."""
    target = torch.cat([c.target for c in contexts])  # (R, C)
    group = torch.cat([c.label * seq_len + c.position for c in contexts])  # (R,)
    groups, channels = num_classes * seq_len, target.shape[1]
    count = torch.zeros(groups, device=target.device).index_add_(0, group, torch.ones_like(group, dtype=target.dtype))
    total = torch.zeros(groups, channels, device=target.device).index_add_(0, group, target)
    squares = torch.zeros(groups, channels, device=target.device).index_add_(0, group, target.pow(2))
    mean = total / count[:, None].clamp_min(1)  # (G, C)
    var = ((squares - count[:, None] * mean.pow(2)) / (count[:, None] - 1)).mean(dim=1)  # (G,)
    var = torch.where(count > 1, var, torch.full_like(var, math.nan))
    return mean.reshape(num_classes, seq_len, channels), var.reshape(num_classes, seq_len)


def mean_and_sem(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of ``values (R,)`` (SEM 0 for one value)."""
    v = values.double()
    sem = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
    return float(v.mean()), sem


def trend_verdict(values: Sequence[float], sems: Sequence[float], direction: str, claim: str) -> dict[str, Any]:
    """Whether ``values`` (one per AR step, standard errors ``sems``) move in ``direction`` ("decrease" or
    "increase"): the first- vs last-quarter means must differ that way by more than two standard errors of the
    difference, and Spearman's rho against the step index must have that sign with ``|rho| >= 0.5``."""
    if direction not in ("decrease", "increase"):
        raise ValueError(f"direction must be 'decrease' or 'increase', got {direction!r}")
    v = np.asarray(values, dtype=np.float64)
    quarter = max(1, len(v) // 4)
    first, last = float(v[:quarter].mean()), float(v[-quarter:].mean())
    se = np.asarray(sems, dtype=np.float64)
    se_diff = float(np.sqrt((se[:quarter] ** 2).sum() + (se[-quarter:] ** 2).sum()) / quarter)
    rho = float(stats.spearmanr(np.arange(len(v)), v).statistic) if len(v) > 2 and np.ptp(v) > 0 else 0.0
    sign = -1.0 if direction == "decrease" else 1.0
    supported = bool(sign * (last - first) > 2 * se_diff and sign * rho >= SUPPORT_RHO)
    word = "supported" if supported else "NOT supported"
    return {"claim": claim, "direction": direction, "first_quarter_mean": first, "last_quarter_mean": last,
            "difference_se": se_diff, "spearman_rho": rho, "supported": supported,
            "verdict": f"{claim}: {word} (first-quarter mean {first:.4g} -> last-quarter mean {last:.4g}, "
                       f"standard error of the change {se_diff:.2g}, Spearman rho {rho:+.2f}; needs a change the "
                       f"claimed way of more than 2 standard errors and |rho| >= {SUPPORT_RHO})"}  # fmt: skip


# ---- the run -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvidenceConfig:
    """What :func:`run_evidence` measures and at which cost (see the module docstring)."""

    checkpoint: str = str(SHIPPED_CHECKPOINT)
    clip: int | None | Literal["auto"] = DISA_CLIP
    num_iter: int = 16
    num_images: int = 200
    samples: int = 32
    variance_positions: int = 1
    head_steps: int = 50
    temperature: float = 1.0
    ddim_steps: int = 50
    train_images: int = 1000
    mlp_width: int = 256
    mlp_epochs: int = 30
    mlp_batch_size: int = 256
    mlp_lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        minimum = {"num_iter": 2, "num_images": 1, "samples": 2, "variance_positions": 1, "head_steps": 1,
                   "ddim_steps": 1, "train_images": 1, "mlp_width": 1, "mlp_epochs": 1,
                   "mlp_batch_size": 1}  # fmt: skip
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("temperature", "mlp_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.clip != "auto" and self.clip is not None and (
            isinstance(self.clip, bool) or not isinstance(self.clip, int) or not 1 <= self.clip <= 999
        ):
            raise ValueError(f"clip must be 'auto', None or a timestep in [1, 999], got {self.clip!r}")
        if not 0 <= self.seed < 2**32 - TRAIN_ORDER_SEED_OFFSET - self.train_images:
            raise ValueError(f"seed must be in [0, 2**32 - {TRAIN_ORDER_SEED_OFFSET} - train_images), got {self.seed}")


def _load_split(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images ``(B, 1, 28, 28)`` in [-1, 1] of a split and their labels ``(B,)``."""
    data = FashionMNIST(split)
    if count > len(data):
        raise ValueError(f"asked for {count} Fashion-MNIST {split} images, the split has {len(data)}")
    images, labels = zip(*(data[i] for i in range(count)))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def run_evidence(cfg: EvidenceConfig) -> dict[str, Any]:
    """Measure (a), (b) and (c) per AR step; returns the JSON-ready results (see the module docstring)."""
    timings: dict[str, float] = {}
    began = time.perf_counter()
    top = read_model_config(cfg.checkpoint).train_clip if cfg.clip == "auto" else cfg.clip
    if top is None:  # the original MAR sampler as the official code runs it (top timestep 999)
        sampler = SamplerConfig(num_iter=cfg.num_iter, diff_sampler="default", diff_upper_steps=cfg.head_steps,
                                diff_lower_steps=min(5, cfg.head_steps), temperature=cfg.temperature)  # fmt: skip
    else:  # the same ancestral sampler from t = top: MAR_DiSA's "DiSA" sampler without annealing (upper = lower)
        sampler = SamplerConfig(num_iter=cfg.num_iter, diff_sampler="DiSA", diff_upper_steps=cfg.head_steps,
                                diff_lower_steps=cfg.head_steps, disa_clip=top,
                                temperature=cfg.temperature)  # fmt: skip
    model = load_testbed_model(cfg.checkpoint, sampler=sampler, device=cfg.device)
    ancestral = model.diffloss.diffusion_for(cfg.head_steps)
    ddim = GaussianDiffusion.from_spec(f"ddim{cfg.ddim_steps}", clip=DDIM_CLIP if top is None else min(DDIM_CLIP, top))
    if cfg.num_iter > model.seq_len:
        raise ValueError(f"num_iter must be <= the model's {model.seq_len} tokens (every step must predict one), "
                         f"got {cfg.num_iter}")  # fmt: skip
    test_images, test_labels = _load_split("test", cfg.num_images)
    train_images, train_labels = _load_split("train", cfg.train_images)
    test_seeds = [cfg.seed + i for i in range(cfg.num_images)]
    train_seeds = [cfg.seed + TRAIN_ORDER_SEED_OFFSET + i for i in range(cfg.train_images)]
    test_ctx = teacher_forced_contexts(model, test_images, test_labels, test_seeds, cfg.num_iter)
    train_ctx = teacher_forced_contexts(model, train_images, train_labels, train_seeds, cfg.num_iter)
    picker = torch.Generator().manual_seed(cfg.seed)
    var_ctx = teacher_forced_contexts(model, test_images, test_labels, test_seeds, cfg.num_iter,
                                      per_image=cfg.variance_positions, generator=picker)  # fmt: skip
    tokens_per_step = [c.z.shape[0] // cfg.num_images for c in test_ctx]
    timings["contexts"] = time.perf_counter() - began

    # (a) spread of the head's own samples; reference: the real tokens' spread given class and position only.
    t0 = time.perf_counter()
    class_pos_mean, class_pos_var = group_mean_table(train_ctx, model.num_classes, model.seq_len)
    noise = TorchNoise(torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1))
    variance, variance_sem, real_var = [], [], []
    for k, ctx in enumerate(var_ctx):
        m, s = mean_and_sem(sampled_variance(model, ctx.z, k, cfg.num_iter, samples=cfg.samples,
                                             temperature=cfg.temperature, noise=noise))  # fmt: skip
        variance.append(m)
        variance_sem.append(s)
        real_var.append(float(class_pos_var[ctx.label, ctx.position].double().nanmean()))
    timings["variance"] = time.perf_counter() - t0

    # (b) straightness of one deterministic DDIM path per test context.
    t0 = time.perf_counter()
    noise = TorchNoise(torch.Generator(device=cfg.device).manual_seed(cfg.seed + 2))
    chord, chord_sem, rf, rf_sem = [], [], [], []
    for ctx in test_ctx:
        ratio, rf_rows = path_straightness(model, ctx.z, ddim, noise)
        for values, mean_out, sem_out in ((ratio, chord, chord_sem), (rf_rows, rf, rf_sem)):
            m, s = mean_and_sem(values)
            mean_out.append(m)
            sem_out.append(s)
    timings["straightness"] = time.perf_counter() - t0

    # (c) one probe on all training contexts, evaluated per step on the test contexts.
    t0 = time.perf_counter()
    z_train = torch.cat([c.z for c in train_ctx])
    y_train = torch.cat([c.target for c in train_ctx])
    mlp, train_mse = fit_mlp(z_train, y_train, width=cfg.mlp_width, epochs=cfg.mlp_epochs,
                             batch_size=cfg.mlp_batch_size, lr=cfg.mlp_lr, seed=cfg.seed + 3)  # fmt: skip
    train_mean = y_train.mean(dim=0)  # (C,)
    mse, mse_sem, baseline, normalised, class_pos_mse = [], [], [], [], []
    with torch.no_grad():
        for ctx in test_ctx:
            m, s = mean_and_sem((mlp(ctx.z) - ctx.target).pow(2).mean(dim=1))
            base = float((ctx.target - train_mean).pow(2).mean())
            mse.append(m)
            mse_sem.append(s)
            baseline.append(base)
            normalised.append(m / base)
            class_pos_mse.append(float((class_pos_mean[ctx.label, ctx.position] - ctx.target).pow(2).mean()) / base)
    timings["mlp"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - began

    verdicts = {
        "variance": trend_verdict(variance, variance_sem, "decrease",
                                  "(a) sampled-token variance falls as AR generation proceeds"),
        "straightness": trend_verdict(chord, chord_sem, "increase",
                                      "(b) denoising paths get straighter in later AR steps"),
        "mlp": trend_verdict(normalised, [s / b for s, b in zip(mse_sem, baseline)], "decrease",
                             "(c) an MLP predicts later tokens better than earlier ones"),
    }
    return {
        "checkpoint": os.fspath(cfg.checkpoint),
        "config": asdict(cfg),
        "ar_step": list(range(cfg.num_iter)),
        "tokens_per_step": tokens_per_step,
        "samplers": {
            "variance": {"kind": sampler.diff_sampler, "steps_run": ancestral.num_timesteps,
                         "top_timestep": int(ancestral.timestep_map[-1])},
            "ddim": {"steps_run": ddim.num_timesteps, "top_timestep": int(ddim.timestep_map[-1])},
        },
        "variance": {"sampled": variance, "sampled_sem": variance_sem, "real_given_class_position": real_var,
                     "sampled_over_real": [v / r for v, r in zip(variance, real_var)],
                     "contexts_per_step": [c.z.shape[0] for c in var_ctx]},
        "straightness": {"chord_over_arc": chord, "chord_over_arc_sem": chord_sem, "rf_straightness": rf,
                         "rf_straightness_sem": rf_sem,
                         "contexts_per_step": [c.z.shape[0] for c in test_ctx]},
        "mlp": {"mse": mse, "mse_sem": mse_sem, "baseline_variance": baseline, "one_minus_r2": normalised,
                "class_position_mean_one_minus_r2": class_pos_mse, "train_mse": train_mse,
                "train_contexts": int(z_train.shape[0])},  # fmt: skip
        "verdicts": verdicts,
        "seconds": timings,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": cfg.device},
    }


# ---- outputs -------------------------------------------------------------------------------------------------------


def plot_evidence(results: dict[str, Any], path: Path) -> Path:
    """The three panels (a) variance, (b) chord/arc straightness, (c) MLP 1 - R^2, against the AR step."""
    k = np.asarray(results["ar_step"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (
        (axes[0], results["variance"]["sampled"], results["variance"]["sampled_sem"],
         f"head samples ({results['config']['samples']} per context)",
         results["variance"]["real_given_class_position"], "real tokens given class + position",
         "(a) variance of sampled tokens", "variance per channel"),
        (axes[1], results["straightness"]["chord_over_arc"], results["straightness"]["chord_over_arc_sem"],
         f"DDIM-{results['config']['ddim_steps']} paths (flow coordinates)", None, None,
         "(b) straightness of denoising paths", "chord / arc length (1 = straight)"),
        (axes[2], results["mlp"]["one_minus_r2"], [s / b for s, b in zip(results["mlp"]["mse_sem"],
                                                                           results["mlp"]["baseline_variance"])],
         "MLP probe on z", results["mlp"]["class_position_mean_one_minus_r2"], "mean token of class + position",
         "(c) MLP prediction of the next token", "MSE / token variance (1 - R$^2$)"),
    )  # fmt: skip
    for ax, values, sem, label, ref, ref_label, title, ylabel in panels:
        values, sem = np.asarray(values), np.asarray(sem)
        ax.plot(k, values, "o-", label=label)
        ax.fill_between(k, values - sem, values + sem, alpha=0.25)
        if ref is not None:
            ax.plot(k, ref, "--", color="gray", label=ref_label)
        verdict = results["verdicts"][{"(a)": "variance", "(b)": "straightness", "(c)": "mlp"}[title[:3]]]
        ax.set_title(f"{title}\n{'supported' if verdict['supported'] else 'NOT supported'}, "
                     f"Spearman rho {verdict['spearman_rho']:+.2f}", fontsize=10)  # fmt: skip
        ax.set_xlabel("AR step k (0 = first)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"DiSA evidence on the Fashion-MNIST MAR ({Path(results['checkpoint']).name}, "
                 f"{results['config']['num_images']} test images, {len(k)} AR steps, teacher-forced)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def format_table(results: dict[str, Any]) -> str:
    head = f"{'k':>3} {'tokens':>6} {'variance':>9} {'real var':>9} {'chord/arc':>9} {'RF str.':>8} {'MLP MSE':>8} " \
           f"{'1-R^2':>6} {'cls+pos':>7}"  # fmt: skip
    lines = [head, "-" * len(head)]
    v, s, m = results["variance"], results["straightness"], results["mlp"]
    for i, k in enumerate(results["ar_step"]):
        lines.append(f"{k:>3} {results['tokens_per_step'][i]:>6} {v['sampled'][i]:>9.4f} "
                     f"{v['real_given_class_position'][i]:>9.4f} {s['chord_over_arc'][i]:>9.4f} "
                     f"{s['rf_straightness'][i]:>8.4f} {m['mse'][i]:>8.4f} {m['one_minus_r2'][i]:>6.3f} "
                     f"{m['class_position_mean_one_minus_r2'][i]:>7.3f}")  # fmt: skip
    return "\n".join(lines)


def _clip_arg(text: str) -> int | None | str:
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or a timestep, got {text!r}") from None


def parse_args(argv: Sequence[str] | None) -> tuple[EvidenceConfig, Path, int | None]:
    d = EvidenceConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=d.checkpoint, help="testbed checkpoint (default: the shipped one)")
    p.add_argument("--out-dir", type=Path, default=Path("outputs/evidence"),
                   help="folder for evidence.png and evidence.json")
    p.add_argument("--clip", type=_clip_arg, default=d.clip, metavar="auto|none|T",
                   help="top timestep of both head samplers (default 950; auto: the checkpoint's train_clip; none: official)")
    p.add_argument("--num-iter", type=int, default=d.num_iter, help="AR steps (MAR's cosine reveal schedule)")
    p.add_argument("--num-images", type=int, default=d.num_images, help="test images: contexts of (a), (b), (c)")
    p.add_argument("--samples", type=int, default=d.samples, help="(a) head draws per context (the paper: 100)")
    p.add_argument("--variance-positions", type=int, default=d.variance_positions,
                   help="(a) positions per image and AR step, drawn among those the step predicts")
    p.add_argument("--head-steps", type=int, default=d.head_steps, help="(a) DDPM steps of the original sampler")
    p.add_argument("--temperature", type=float, default=d.temperature, help="(a) sampling temperature")
    p.add_argument("--ddim-steps", type=int, default=d.ddim_steps, help="(b) DDIM steps per path")
    p.add_argument("--train-images", type=int, default=d.train_images,
                   help="(c) training images; each gives one context per token")
    p.add_argument("--mlp-width", type=int, default=d.mlp_width)
    p.add_argument("--mlp-epochs", type=int, default=d.mlp_epochs)
    p.add_argument("--mlp-batch-size", type=int, default=d.mlp_batch_size)
    p.add_argument("--mlp-lr", type=float, default=d.mlp_lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k not in ("out_dir", "threads")}
    try:
        cfg = EvidenceConfig(**fields)
    except ValueError as err:
        name, _, rest = str(err).partition(" ")  # EvidenceConfig's messages start with the field's name
        p.error(f"--{name.replace('_', '-')} {rest}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return cfg, args.out_dir, args.threads


def main(argv: Sequence[str] | None = None) -> int:
    cfg, out_dir, threads = parse_args(argv)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        results = run_evidence(cfg)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"fmnist_evidence.py: error: {err}", file=sys.stderr)
        return 1
    json_path, png_path = out_dir / "evidence.json", out_dir / "evidence.png"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    plot_evidence(results, png_path)
    print(format_table(results))
    print()
    for verdict in results["verdicts"].values():
        print(verdict["verdict"])
    sec = results["seconds"]
    print(f"\n{cfg.num_images} test images, {cfg.samples} head draws per context, {cfg.train_images} training images; "
          f"{sec['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in sec.items() if k != 'total')}; "
          f"{torch.get_num_threads()} threads)")
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
