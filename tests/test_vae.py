"""disa.vae: KL-16 key schema, parity with the official AutoencoderKL (tiny random weights), loud loading,
latent scaling and the uint8 conversion."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from disa.noise import ReplayNoise
from disa.vae import (
    LATENT_SCALE,
    AutoencoderKL,
    DiagonalGaussian,
    latent_to_tokens,
    load_vae,
    to_uint8,
    tokens_to_latent,
)

TINY_DIR = Path(__file__).parent / "fixtures" / "golden" / "mar" / "tiny_vae"
TOL = dict(atol=1e-5, rtol=1e-5)  # golden/mar/README.md: single forward passes, VAE encode/decode


def _tiny_config() -> dict[str, Any]:
    cfg = json.loads((TINY_DIR / "config.json").read_text())
    return {k: cfg[k] for k in ("embed_dim", "ch", "ch_mult", "num_res_blocks", "resolution")}


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    return load_vae(TINY_DIR / "state_dict.pt", **_tiny_config())


@pytest.fixture(scope="module")
def units(golden: Callable[[str], Any]) -> dict[str, Any]:
    return golden("mar/tiny_vae/units.pt")


@pytest.fixture
def tiny_state(golden: Callable[[str], Any]) -> dict[str, torch.Tensor]:
    return dict(golden("mar/tiny_vae/state_dict.pt"))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOL)


# ---------------------------------------------------------------------------------------------- schema


def test_full_size_schema_matches_official(golden: Callable[[str], Any]) -> None:
    schema = golden("mar/schemas/vae_kl16.json")
    with torch.device("meta"):  # shapes only: no 266 MB of random init
        vae = AutoencoderKL()
    state = vae.state_dict()
    assert list(state) == list(schema["keys"])  # same names in the same order
    assert {k: list(v.shape) for k, v in state.items()} == schema["keys"]
    assert len(state) == schema["num_keys"] == 312
    assert sum(p.numel() for p in vae.parameters()) == schema["num_params"] == 66_456_019
    assert sum(p.numel() for n, p in vae.named_parameters() if n.startswith("encoder.")) == 28_265_760
    assert sum(p.numel() for n, p in vae.named_parameters() if n.startswith("decoder.")) == 38_188_931
    assert not list(vae.buffers())


def test_decoder_only_model_has_only_decoder_keys(golden: Callable[[str], Any]) -> None:
    schema = golden("mar/schemas/vae_kl16.json")["keys"]
    with torch.device("meta"):
        vae = AutoencoderKL(with_encoder=False)
    expected = {k: v for k, v in schema.items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == expected
    with pytest.raises(RuntimeError, match="without its encoder"):
        vae.encode(torch.zeros(1, 3, 32, 32, device="meta"))


def test_tiny_config_param_count(tiny_vae: AutoencoderKL, golden: Callable[[str], Any]) -> None:
    assert sum(p.numel() for p in tiny_vae.parameters()) == golden("mar/tiny_vae/config.json")["num_params"]
    assert not tiny_vae.training


# ---------------------------------------------------------------------------------------------- parity


def test_encode_posterior_matches_official(tiny_vae: AutoencoderKL, units: dict[str, Any]) -> None:
    with torch.no_grad():
        post = tiny_vae.encode(units["image"])
    _assert_close(torch.cat([post.mean, post.logvar], dim=1), units["moments"])  # logvar is not clamped here
    _assert_close(post.mean, units["posterior_mean"])
    _assert_close(post.logvar, units["posterior_logvar"])
    _assert_close(post.std, units["posterior_std"])
    _assert_close(post.var, units["posterior_var"])
    _assert_close(post.mode(), units["posterior_mode"])
    _assert_close(post.sample(units["sample_eps"]), units["posterior_sample"])
    # The same draw through a NoiseSource.
    _assert_close(post.sample(ReplayNoise([units["sample_eps"]])), units["posterior_sample"])


def test_latent_scaling_matches_official(units: dict[str, Any]) -> None:
    assert LATENT_SCALE == units["scale_factor"] == 0.2325
    _assert_close(latent_to_tokens(units["posterior_sample"]), units["mar_tokens_latent"])
    _assert_close(tokens_to_latent(units["mar_tokens_latent"]), units["posterior_sample"])


def test_decode_matches_official(tiny_vae: AutoencoderKL, units: dict[str, Any]) -> None:
    with torch.no_grad():
        _assert_close(tiny_vae.decode(units["decode_input"]), units["decoded"])
        decoded = tiny_vae.decode(tokens_to_latent(units["mar_tokens_latent"]))
    _assert_close(decoded, units["decoded_from_mar_tokens"])


def test_posterior_clamps_logvar_and_checks_noise_shape() -> None:
    moments = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([100.0, -100.0]).view(1, 2, 1, 1)], dim=1)
    post = DiagonalGaussian(moments)
    assert post.logvar.flatten().tolist() == [20.0, -30.0]
    assert torch.isfinite(post.var).all() and (post.std > 0).all()
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 2\)"):
        post.sample(torch.zeros(1, 2, 2, 2))


# ---------------------------------------------------------------------------------------------- loading


def test_load_official_layout_and_bare_state_dict(tmp_path: Path, tiny_state: dict, units: dict) -> None:
    wrapped = tmp_path / "kl16.ckpt"
    torch.save({"model": tiny_state, "epoch": 3}, wrapped)  # the official {"model": ...} layout
    bare = tmp_path / "bare.pt"
    torch.save(tiny_state, bare)
    for path in (wrapped, bare):
        vae = load_vae(path, **_tiny_config())
        with torch.no_grad():
            _assert_close(vae.decode(units["decode_input"]), units["decoded"])


def test_missing_path_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "kl16.ckpt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vae(path)


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "kl16.ckpt"
    path.write_text("<html>Dropbox - sign in</html>")  # what a failed download saves
    with pytest.raises(RuntimeError, match="could not read VAE checkpoint .*kl16.ckpt"):
        load_vae(path)


def test_non_state_dict_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"model_ema": {"x": 1}, "epoch": 3}, path)
    with pytest.raises(ValueError, match="neither a checkpoint with a 'model' state dict"):
        load_vae(path)


def test_weights_only_refusal_suggests_opt_out(tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "with_args.ckpt"
    torch.save({"model": tiny_state, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(RuntimeError, match="weights_only=False"):
        load_vae(path, **_tiny_config())
    load_vae(path, weights_only=False, **_tiny_config())


def test_misshaped_key_is_named_with_both_shapes(tmp_path: Path, tiny_state: dict) -> None:
    tiny_state["decoder.conv_out.weight"] = torch.zeros(4, 32, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save({"model": tiny_state}, path)
    with pytest.raises(ValueError, match=r"mis-shaped \(1\)") as err:
        load_vae(path, **_tiny_config())
    assert "decoder.conv_out.weight: checkpoint (4, 32, 3, 3), model (3, 32, 3, 3)" in str(err.value)
    with pytest.raises(ValueError, match="decoder.conv_out.weight"):  # never tolerated
        load_vae(path, strict=False, decoder_only=True, **_tiny_config())


def test_missing_decoder_key_always_raises(tmp_path: Path, tiny_state: dict) -> None:
    del tiny_state["decoder.mid.attn_1.q.bias"]
    path = tmp_path / "bad.pt"
    torch.save(tiny_state, path)
    for kwargs in ({}, {"strict": False}, {"decoder_only": True}):
        with pytest.raises(ValueError, match=r"missing \(1\):\s+decoder.mid.attn_1.q.bias"):
            load_vae(path, **kwargs, **_tiny_config())


def test_unexpected_key_raises_unless_not_strict(tmp_path: Path, tiny_state: dict, units: dict) -> None:
    tiny_state["loss.logvar"] = torch.zeros(())
    path = tmp_path / "extra.pt"
    torch.save(tiny_state, path)
    with pytest.raises(ValueError, match=r"unexpected \(1\):\s+loss.logvar[\s\S]*strict=False"):
        load_vae(path, **_tiny_config())
    vae = load_vae(path, strict=False, **_tiny_config())
    with torch.no_grad():
        _assert_close(vae.decode(units["decode_input"]), units["decoded"])


def test_encoder_keys_may_be_absent_only_with_decoder_only(tmp_path: Path, tiny_state: dict, units: dict) -> None:
    decoder_state = {k: v for k, v in tiny_state.items() if k.startswith(("decoder.", "post_quant_conv."))}
    path = tmp_path / "decoder.pt"
    torch.save({"model": decoder_state}, path)
    with pytest.raises(ValueError, match=r"missing \(\d+\):[\s\S]*encoder.conv_in.weight[\s\S]*decoder_only=True"):
        load_vae(path, **_tiny_config())
    for source in (path, TINY_DIR / "state_dict.pt"):  # with or without encoder weights in the file
        vae = load_vae(source, decoder_only=True, **_tiny_config())
        assert vae.encoder is None and vae.quant_conv is None
        with torch.no_grad():
            _assert_close(vae.decode(units["decode_input"]), units["decoded"])


def test_a_different_architecture_is_reported(tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny_state, path)
    with pytest.raises(ValueError, match=r"missing \(\d+\)[\s\S]*\.\.\. and \d+ more[\s\S]*mis-shaped"):
        with torch.device("meta"):  # the KL-16 default against a tiny file; the lists are truncated
            load_vae(path)


# ---------------------------------------------------------------------------------------------- to_uint8


def _reference_uint8(x: np.ndarray) -> np.ndarray:
    """The official post-processing, (x + 1) / 2 then np.round(np.clip(x * 255, 0, 255)), in float32."""
    y = (x.astype(np.float32) + np.float32(1)) / np.float32(2)
    return np.round(np.clip(y * np.float32(255), 0, 255)).astype(np.uint8)


def _inputs_landing_on_half(k: int) -> list[float]:
    """float32 inputs x whose (x + 1) / 2 * 255 is exactly k + 0.5 (found by scanning nearby floats)."""
    x0 = np.float32(2 * (k + 0.5) / 255 - 1)
    found: set[float] = set()
    for direction in (np.float32(np.inf), np.float32(-np.inf)):
        x = x0
        for _ in range(64):
            if (x + np.float32(1)) / np.float32(2) * np.float32(255) == np.float32(k + 0.5):
                found.add(float(x))
            x = np.nextafter(x, direction, dtype=np.float32)
    return sorted(found)


def test_to_uint8_rounds_half_to_even() -> None:
    cases = [(k, x) for k in range(255) for x in _inputs_landing_on_half(k)]
    assert len({k for k, _ in cases}) > 100  # enough ties on both parities to mean something
    xs = torch.tensor([x for _, x in cases], dtype=torch.float32)
    got = to_uint8(xs.view(1, 1, -1).expand(3, 1, -1))[0, :, 0]  # (3, 1, N) -> (1, N, 3)
    expected = np.array([k + (k % 2) for k, _ in cases], dtype=np.uint8)  # k + 0.5 -> the even neighbour
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, _reference_uint8(xs.numpy()))


def test_to_uint8_saturates_and_matches_reference() -> None:
    special = torch.tensor([-1.0, 1.0, 0.0, -1.5, 1.5, 7.0, -7.0, float("inf"), float("-inf"), 1e30, -1e30])
    got = to_uint8(special.view(1, 1, -1).expand(3, 1, -1))[0, :, 0]
    np.testing.assert_array_equal(got, [0, 255, 128, 0, 255, 255, 0, 255, 0, 255, 0])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8
    np.testing.assert_array_equal(to_uint8(x), _reference_uint8(x.numpy()).transpose(0, 2, 3, 1))


def test_to_uint8_layout_and_dtype() -> None:
    chw = torch.stack([torch.full((2, 4), v) for v in (-1.0, 0.0, 1.0)])  # R = 0, G = 128, B = 255
    out = to_uint8(chw)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (2, 4, 3)
    assert out[0, 0].tolist() == [0, 128, 255]  # RGB stays RGB
    assert to_uint8(chw.unsqueeze(0).repeat(5, 1, 1, 1).half()).shape == (5, 2, 4, 3)


def test_to_uint8_rejects_nan_and_bad_shapes() -> None:
    bad = torch.zeros(1, 3, 2, 2)
    bad[0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        to_uint8(bad)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        to_uint8(torch.zeros(2, 4, 8, 8))
