"""mar_disa.engine_mar: MAR training on a tiny config (loss goes down, EMA, lr schedule, clipping, precision,
gradient checkpointing, cached latents) and checkpoints in the official layout that load for generation."""
from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from disa.checkpoints import CheckpointError, CheckpointNotFoundError
from disa.noise import PerImageNoise, TorchNoise
from disa.vae import AutoencoderKL
from mar_disa.engine_mar import (
    CHECKPOINT_KEYS,
    LossScaler,
    TrainConfig,
    adjust_learning_rate,
    build_optimizer,
    effective_lr,
    ema_copy,
    latents_from_batch,
    load_for_generation,
    lr_at,
    param_groups,
    resume_from_checkpoint,
    save_model,
    train_one_epoch,
    update_ema,
)
from mar_disa.models.mar import MAR, orders_from_seeds

NUM_CLASSES = 4


def tiny_mar(seed: int = 0, **overrides) -> MAR:
    """4x4 tokens of 16 channels, width 32; the diffusion loss sees each row twice (diffusion_batch_mul=2)."""
    torch.manual_seed(seed)
    kwargs = dict(
        img_size=64, vae_stride=16, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=2, class_num=NUM_CLASSES,
        diffloss_d=2, diffloss_w=64, diffusion_batch_mul=2, diff_upper_steps=5, diff_lower_steps=2,
        diff_sampler="DiSA",
    )  # fmt: skip
    kwargs.update(overrides)
    return MAR(**kwargs)


def cached_moments(n: int = 16, seed: int = 0) -> TensorDataset:
    """Posterior moments (B, 32, 4, 4) as main_cache.py stores them: a class-dependent mean, small log-variance."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    patterns = torch.randn(NUM_CLASSES, 16, 4, 4, generator=gen) * 3.0
    mean = patterns[labels] + 0.3 * torch.randn(n, 16, 4, 4, generator=gen)
    logvar = torch.full((n, 16, 4, 4), -8.0)
    return TensorDataset(torch.cat([mean, logvar], dim=1), labels)


def fixed_loss(model: MAR, data: TensorDataset, seed: int = 123) -> float:
    """The training loss on the whole set with every random draw (mask, t, noise, posterior) seeded."""
    moments, labels = data.tensors
    torch.manual_seed(seed)
    np.random.seed(seed)
    model.eval()
    with torch.no_grad():
        return float(model(latents_from_batch(moments, None, use_cached=True), labels))


def config(**overrides) -> TrainConfig:
    base = dict(lr=2e-3, epochs=100, warmup_epochs=0, use_cached=True, precision="fp32", ema_rate=0.9)
    base.update(overrides)
    return TrainConfig(**base)


def train(model: MAR, data: TensorDataset, cfg: TrainConfig, epochs: int, batch_size: int = 8):
    torch.manual_seed(1)
    np.random.seed(1)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(2))
    optimizer = build_optimizer(model, cfg.lr, weight_decay=0.02)
    scaler = LossScaler.for_precision("cpu", cfg.precision)
    params = list(model.parameters())
    ema = ema_copy(model)
    history = [
        train_one_epoch(model, None, params, ema, loader, optimizer, "cpu", epoch, scaler, cfg)
        for epoch in range(epochs)
    ]
    return optimizer, scaler, ema, history


# ---- training reduces the loss -------------------------------------------------------------------------------


def test_training_steps_reduce_the_loss():
    model, data = tiny_mar(), cached_moments()
    before = fixed_loss(model, data)
    _, _, _, history = train(model, data, config(), epochs=15)  # 30 optimiser steps
    after = fixed_loss(model, data)
    assert [h["steps"] for h in history] == [2.0] * 15
    assert after < 0.7 * before, (before, after)
    assert history[-1]["loss"] < history[0]["loss"]


# ---- EMA -----------------------------------------------------------------------------------------------------


def test_update_ema_formula():
    ema, params = [torch.tensor([1.0, -2.0]), torch.tensor(4.0)], [torch.tensor([3.0, 2.0]), torch.tensor(0.0)]
    update_ema(ema, params, rate=0.75)
    assert torch.equal(ema[0], torch.tensor([1.5, -1.0])) and torch.equal(ema[1], torch.tensor(3.0))
    assert torch.equal(params[0], torch.tensor([3.0, 2.0]))  # the source is untouched
    with pytest.raises(ValueError, match="2 EMA tensors for 1 parameters"):
        update_ema(ema, params[:1], 0.5)


def test_ema_is_updated_once_per_step():
    data = cached_moments(n=8)
    model = tiny_mar()
    initial = [p.detach().clone() for p in model.parameters()]
    _, _, ema, history = train(model, data, config(ema_rate=0.5), epochs=1)  # one step
    assert history[0]["steps"] == 1.0
    for e, p0, p1 in zip(ema, initial, model.parameters()):
        torch.testing.assert_close(e, 0.5 * p0 + 0.5 * p1.detach(), rtol=0, atol=1e-7)
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(initial, model.parameters()))

    model = tiny_mar()
    _, _, ema, _ = train(model, data, config(ema_rate=1.0), epochs=2)
    assert all(torch.equal(e, p0) for e, p0 in zip(ema, initial))  # rate 1: the EMA never moves


# ---- learning rate, optimiser, clipping, precision -----------------------------------------------------------


def test_lr_schedule_warmup_constant_and_cosine():
    constant = TrainConfig(lr=1.0, epochs=10, warmup_epochs=2, lr_schedule="constant")
    assert [lr_at(e, constant) for e in (0, 0.5, 1, 2, 5, 10)] == [0.0, 0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = TrainConfig(lr=1.0, min_lr=0.1, epochs=10, warmup_epochs=2, lr_schedule="cosine")
    assert lr_at(1, cosine) == 0.5
    assert lr_at(2, cosine) == pytest.approx(1.0)
    assert lr_at(6, cosine) == pytest.approx(0.55)  # half-way down the half-cosine
    assert lr_at(10, cosine) == pytest.approx(0.1)
    optimizer = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]},
                                 {"params": [nn.Parameter(torch.zeros(1))], "lr_scale": 0.1}], lr=0.0)  # fmt: skip
    assert adjust_learning_rate(optimizer, 1.0, constant) == 0.5
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.05])
    assert effective_lr(1e-4, batch_size=64, world_size=4) == pytest.approx(1e-4)
    assert effective_lr(1e-4, 64, 4, lr=3e-4) == 3e-4


def test_lr_follows_the_schedule_within_an_epoch():
    model, data = tiny_mar(), cached_moments()
    _, _, _, history = train(model, data, config(lr=1.0, warmup_epochs=4, epochs=8), epochs=1)
    assert history[0]["lr"] == pytest.approx(1.0 * 0.5 / 4)  # second of two iterations: epoch 0.5 of 4 warmup


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(lr_schedule="step"), "lr_schedule.*constant, cosine"),
        (dict(precision="fp8"), "precision.*fp16, bf16, fp32"),
        (dict(ema_rate=1.5), "ema_rate"),
        (dict(grad_clip=0.0), "grad_clip"),
        (dict(lr_schedule="cosine", warmup_epochs=100, epochs=100), "warmup_epochs < epochs"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=None), "effective_lr"),
    ],
)
def test_bad_train_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        config(**overrides)


def test_train_config_from_main_mar_args():
    args = argparse.Namespace(lr=1e-3, blr=1e-4, epochs=3, warmup_epochs=1, min_lr=0.0, lr_schedule="cosine",
                              grad_clip=3.0, ema_rate=0.999, use_cached=True, model="mar_base")  # fmt: skip
    cfg = TrainConfig.from_args(args)
    assert (cfg.lr, cfg.epochs, cfg.lr_schedule, cfg.ema_rate, cfg.use_cached) == (1e-3, 3, "cosine", 0.999, True)
    assert cfg.precision == "fp16"  # the official setting (fp16 autocast on CUDA)


def test_weight_decay_groups_follow_upstream():
    model = tiny_mar()
    no_decay, decay = param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    assert {"fake_latent", "class_emb.weight", "z_proj.weight", "encoder_blocks.0.attn.qkv.weight"} <= decayed
    assert not any(n.startswith("diffloss.") for n in decayed)
    assert {"z_proj.bias", "z_proj_ln.weight", "diffloss.net.input_proj.weight"} <= not_decayed


def test_loss_scaler_clips_the_gradient_norm():
    param = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=1.0)
    loss = (param * torch.tensor([30.0, 40.0, 0.0])).sum()  # gradient (30, 40, 0), norm 50
    norm = LossScaler()(loss, optimizer, parameters=[param], clip_grad=2.0)
    assert float(norm) == pytest.approx(50.0)  # reported before clipping
    torch.testing.assert_close(param.detach(), torch.tensor([-1.2, -1.6, 0.0]))  # step of norm 2
    assert LossScaler.for_precision("cpu", "fp16").state_dict() == {}  # no loss scaling off CUDA


def test_bf16_autocast_step_runs_on_cpu():
    model, data = tiny_mar(), cached_moments(n=8)
    _, _, _, history = train(model, data, config(precision="bf16"), epochs=1)
    assert np.isfinite(history[0]["loss"])


def test_non_finite_loss_stops_before_any_update():
    model = tiny_mar()
    moments, labels = cached_moments(n=8).tensors
    bad = TensorDataset(torch.full_like(moments, float("nan")), labels)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train(model, bad, config(), epochs=1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- model-side training options -----------------------------------------------------------------------------


def test_diffusion_batch_mul_tiles_the_rows():
    model = tiny_mar(diffusion_batch_mul=3).train()
    seen = []
    model.diffloss.net.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[2]))  # c (R, D)
    moments, labels = cached_moments(n=2).tensors
    model(latents_from_batch(moments, None, use_cached=True), labels)
    rows = 2 * model.seq_len
    (c,) = seen
    assert c.shape[0] == 3 * rows
    assert torch.equal(c[:rows], c[rows : 2 * rows]) and torch.equal(c[:rows], c[2 * rows :])


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    no_dropout = dict(attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.0)
    plain, ckpt = tiny_mar(**no_dropout), tiny_mar(**no_dropout, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    moments, labels = cached_moments(n=4).tensors
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(5)
        np.random.seed(5)
        loss = model.train()(latents_from_batch(moments, None, use_cached=True), labels)
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-7)


def test_latents_from_images_and_from_cached_moments_agree():
    torch.manual_seed(0)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16).eval()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(images))  # what main_cache.py stores, (2, 32, 4, 4)
    from_images = latents_from_batch(images, vae, use_cached=False, noise=PerImageNoise([1, 2]))
    from_cache = latents_from_batch(moments, None, use_cached=True, noise=PerImageNoise([1, 2]))
    torch.testing.assert_close(from_images, from_cache)
    mean = moments[:, :16]
    assert from_cache.shape == (2, 16, 4, 4) and not torch.equal(from_cache, mean * 0.2325)
    with pytest.raises(ValueError, match="VAE is needed"):
        latents_from_batch(images, None, use_cached=False, noise=TorchNoise())

    # one training step straight from images through the VAE (vae_stride 2 -> 4x4 tokens)
    model = tiny_mar(img_size=8, vae_stride=2)
    optimizer = build_optimizer(model, 1e-3)
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 1])), batch_size=2)
    params = list(model.parameters())
    out = train_one_epoch(model, vae, params, ema_copy(model), loader, optimizer, "cpu", 0, LossScaler(),
                          config(use_cached=False))  # fmt: skip
    assert out["steps"] == 1.0 and np.isfinite(out["loss"])


# ---- checkpoints ---------------------------------------------------------------------------------------------


def generate(model: MAR) -> torch.Tensor:
    return model.eval().sample_tokens(2, 3, cfg=2.0, labels=torch.tensor([1, 3]), noise=PerImageNoise([7, 8]),
                                      orders=orders_from_seeds([7, 8], model.seq_len))  # fmt: skip


def test_checkpoint_in_official_layout_loads_ema_weights_for_generation(tmp_path):
    model, data = tiny_mar(), cached_moments()
    optimizer, scaler, ema, _ = train(model, data, config(ema_rate=0.8), epochs=3)
    args = argparse.Namespace(model="tiny", diffloss_d=2, diffloss_w=64, ema_rate=0.8)
    path = save_model(tmp_path, model, ema, optimizer, 2, scaler, args)
    assert path == tmp_path / "checkpoint-last.pth" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert tuple(ckpt) == CHECKPOINT_KEYS and ckpt["epoch"] == 2 and ckpt["args"] == args
    assert list(ckpt["model_ema"]) == list(ckpt["model"]) == list(model.state_dict())
    for (name, p), e in zip(model.named_parameters(), ema):
        assert torch.equal(ckpt["model"][name], p.detach()) and torch.equal(ckpt["model_ema"][name], e)
    assert any(not torch.equal(ckpt["model"][k], ckpt["model_ema"][k]) for k in ckpt["model"])

    fresh = tiny_mar(seed=99)
    load_for_generation(fresh, tmp_path)  # the --resume folder form; weights_only with the Namespace allowed
    assert all(torch.equal(v, ckpt["model_ema"][k]) for k, v in fresh.state_dict().items())
    reference = tiny_mar(seed=98)
    reference.load_state_dict(ckpt["model_ema"])
    torch.testing.assert_close(generate(fresh), generate(reference), rtol=0, atol=0)
    raw = tiny_mar(seed=97)
    raw.load_state_dict(ckpt["model"])
    assert (generate(raw) - generate(fresh)).abs().max() > 1e-4  # the EMA weights, not the raw ones, were used


def test_resume_restores_model_ema_optimizer_and_epoch(tmp_path):
    model, data = tiny_mar(), cached_moments()
    optimizer, scaler, ema, _ = train(model, data, config(), epochs=2)
    save_model(tmp_path, model, ema, optimizer, 1, scaler, argparse.Namespace(epochs=2))
    again = tiny_mar(seed=42)
    again_optimizer = build_optimizer(again, 1e-3)
    file = tmp_path / "checkpoint-last.pth"
    ema_params, start_epoch = resume_from_checkpoint(file, again, again_optimizer, LossScaler())
    assert start_epoch == 2
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(ema_params, ema))
    assert again_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"] == 4


def test_mismatched_or_missing_checkpoints_are_refused(tmp_path):
    model = tiny_mar()
    save_model(tmp_path, model, ema_copy(model), build_optimizer(model, 1e-3), 0, LossScaler(), None)
    wider = tiny_mar(diffloss_w=32)
    before = copy.deepcopy(wider.state_dict())
    with pytest.raises(CheckpointError, match=r"(?s)mis-shaped.*diffloss\.net\.time_embed"):
        load_for_generation(wider, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())  # untouched
    with pytest.raises(CheckpointNotFoundError, match="checkpoint not found.*missing.pth"):
        load_for_generation(model, tmp_path / "missing.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint-last.pth"):
        load_for_generation(model, tmp_path / "empty")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "checkpoint-last.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_for_generation(model, tmp_path / "truncated.pth")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_mar()
    optimizer = build_optimizer(model, 1e-3)
    path = save_model(tmp_path, model, ema_copy(model), optimizer, 0, LossScaler(), None)
    good = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(tmp_path, model, ema_copy(model), optimizer, 1, LossScaler(), None)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
