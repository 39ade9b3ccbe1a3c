"""Unit tests of the CFG wrappers, guidance-scale schedules and noise sources."""
from __future__ import annotations

import pytest
import torch

from disa.guidance import (
    doubled_velocity_cfg,
    eps_cfg,
    interval_velocity_cfg,
    mar_cfg_scale,
    ramp_cfg_scale,
)
from disa.noise import PerImageNoise, ReplayNoise, TorchNoise


def _recording_net(outputs: torch.Tensor, calls: list):
    def net(x, t):
        calls.append(x.clone())
        return outputs

    return net


def test_eps_cfg_guides_only_eps_channels():
    x = torch.randn(4, 3)  # 2N = 4 rows: cond rows 0..1, uncond rows 2..3
    out = torch.randn(4, 6)  # 3 eps channels + 3 variance channels
    calls: list = []
    guided = eps_cfg(_recording_net(out, calls), 2.0, eps_channels=3)(x, torch.zeros(4, dtype=torch.long))
    assert torch.equal(calls[0], torch.cat([x[:2], x[:2]]))  # the net sees the cond half twice
    g = out[2:, :3] + 2.0 * (out[:2, :3] - out[2:, :3])
    assert torch.equal(guided[:, :3], torch.cat([g, g]))
    assert torch.equal(guided[:, 3:], out[:, 3:])  # variance channels untouched


def test_interval_cfg_switches_on_inside_interval():
    x = torch.randn(4, 2)
    out = torch.randn(4, 2)
    calls: list = []
    fn = interval_velocity_cfg(_recording_net(out, calls), 3.0, interval=(0.0, 0.7))
    # outside: both halves integrated independently (float64, the sampler's state dtype)
    assert torch.equal(fn(x, torch.tensor(0.9, dtype=torch.float64)), out.double())
    assert torch.equal(calls[-1], x)
    v = fn(x, torch.tensor(0.7, dtype=torch.float64))  # the bound is inclusive
    o = out.double()  # guidance happens after the cast to float64, as in FlowAR
    g = o[2:] + 3.0 * (o[:2] - o[2:])
    assert torch.equal(v, torch.cat([g, g])) and torch.equal(calls[-1], torch.cat([x[:2], x[:2]]))
    # scale 1 never guides
    fn1 = interval_velocity_cfg(_recording_net(out, calls), 1.0, interval=(0.0, 1.0))
    assert torch.equal(fn1(x, torch.tensor(0.5, dtype=torch.float64)), out.double())


def test_doubled_cfg_always_doubles():
    x = torch.randn(2, 5)
    out = torch.randn(4, 5)
    calls: list = []
    v = doubled_velocity_cfg(_recording_net(out, calls), 1.0)(x, torch.tensor(1.0))
    assert torch.equal(calls[0], torch.cat([x, x]))
    assert torch.allclose(v, out[:2].double(), rtol=0, atol=1e-12)  # w = 1 -> conditional velocity (float64)


def test_cfg_schedules():
    m = torch.tensor([255.0])
    assert torch.allclose(mar_cfg_scale(3.0, "linear", m, 256), torch.tensor([1 + 2.0 / 256]))
    assert mar_cfg_scale(3.0, "constant", m, 256).item() == 3.0
    assert [ramp_cfg_scale(2.5, s, 4) for s in range(4)] == [1.0, 1.5, 2.0, 2.5]
    with pytest.raises(ValueError, match="unknown cfg schedule 'cosine'; allowed: linear, constant"):
        mar_cfg_scale(3.0, "cosine", m, 256)
    with pytest.raises(ValueError, match="cfg scale must be a finite number >= 0"):
        ramp_cfg_scale(-1.0, 0, 4)
    with pytest.raises(ValueError, match="cfg scale must be a finite number >= 0"):
        eps_cfg(lambda x, t: x, float("nan"), eps_channels=1)
    with pytest.raises(ValueError, match="guidance interval must satisfy"):
        interval_velocity_cfg(lambda x, t: x, 2.0, interval=(0.8, 0.2))


def test_replay_noise_checks_shapes_and_exhaustion():
    src = ReplayNoise([torch.ones(2, 3)])
    with pytest.raises(ValueError, match="recorded shape \\(2, 3\\) != requested \\(3, 2\\)"):
        src((3, 2), dtype=torch.float32, device="cpu")
    assert torch.equal(src((2, 3), dtype=torch.float64, device="cpu"), torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="exhausted"):
        src((2, 3), dtype=torch.float32, device="cpu")


def test_per_image_noise_is_batch_invariant():
    # Image k's noise depends on its seed only, not on which other images share the batch.
    together = PerImageNoise([11, 12, 13])((6, 4), dtype=torch.float32, device="cpu")
    alone = PerImageNoise([12])((2, 4), dtype=torch.float32, device="cpu")
    assert torch.equal(together[1], alone[0]) and torch.equal(together[4], alone[1])
    assert not torch.equal(together[0], together[1])
    with pytest.raises(ValueError, match="cannot fill 4 rows"):
        PerImageNoise([1, 2, 3])((4, 2), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="seeds must lie in \\[0, 2\\*\\*32\\)"):
        PerImageNoise([5, 2**32 + 5])


def test_torch_noise_uses_generator():
    a = TorchNoise(torch.Generator().manual_seed(0))((3,), dtype=torch.float32, device="cpu")
    b = TorchNoise(torch.Generator().manual_seed(0))((3,), dtype=torch.float32, device="cpu")
    assert torch.equal(a, b)
