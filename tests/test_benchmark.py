"""disa.benchmark and the four families' benchmark command lines (no timing assertions: a fake clock where timing
arithmetic is checked, tiny models where a CLI runs end to end)."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from disa import benchmark as B
from disa.vae import AutoencoderKL

REPO = Path(__file__).resolve().parents[1]
KNOBS = B.Knobs((
    B.Knob("sampler", "DiSA", "which schedule", ("original", "DiSA")),
    B.precision_knob(),
    B.Knob("steps", 50, "an integer knob", parse=int),
))  # fmt: skip


# ---------------------------------------------------------------------------------------------- overrides


def test_overrides_apply_to_the_base_configuration() -> None:
    assert KNOBS.defaults() == {"sampler": "DiSA", "precision": "fp16", "steps": 50}
    assert KNOBS.parse("precision=bf16") == {"sampler": "DiSA", "precision": "bf16", "steps": 50}
    base = KNOBS.parse("sampler=original")
    assert KNOBS.parse(" precision = fp32 , steps=7", base) == {"sampler": "original", "precision": "fp32", "steps": 7}
    assert base == {"sampler": "original", "precision": "fp16", "steps": 50}  # the base is not modified


@pytest.mark.parametrize(("spec", "message"), [
    ("dtype=bf16", "unknown override key 'dtype'; allowed keys:\n  sampler=original|DiSA (default DiSA"),
    ("precision=fp64", "precision='fp64' is not allowed; precision takes fp16|bf16|fp32"),
    ("precision", "override 'precision' is not key=value"),
    ("precision=", "override 'precision=' is not key=value"),
    ("steps=many", "steps='many': invalid literal for int()"),
    ("steps=1,steps=2", "override key 'steps' given twice"),
])  # fmt: skip
def test_bad_overrides_say_what_is_allowed(spec: str, message: str) -> None:
    with pytest.raises(B.OverrideError) as err:
        KNOBS.parse(spec)
    assert message in str(err.value)


def test_knob_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        B.Knobs((B.attention_knob(), B.attention_knob()))


def _cli(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="bench")
    B.add_arguments(parser, KNOBS, batch_size=8, batch_note="8, the official one")
    return parser, parser.parse_args(argv)


def test_configurations_from_presets_set_and_compare(capsys: pytest.CaptureFixture[str]) -> None:
    presets = [("orig", {"sampler": "original"}), ("disa", {"sampler": "DiSA"})]
    parser, args = _cli(["--set", "steps=3"])
    assert args.batch_size == 8 and args.repeats == 3 and args.warmup == 1
    assert B.configurations(parser, KNOBS, args, presets) == [
        ("orig", {"sampler": "original", "precision": "fp16", "steps": 3}),
        ("disa", {"sampler": "DiSA", "precision": "fp16", "steps": 3}),
    ]
    parser, args = _cli(["--compare", "precision=fp32", "precision=bf16,sampler=original"])
    assert B.configurations(parser, KNOBS, args, presets) == [
        ("precision=fp32", {"sampler": "DiSA", "precision": "fp32", "steps": 50}),
        ("precision=bf16,sampler=original", {"sampler": "original", "precision": "bf16", "steps": 50}),
    ]
    parser, args = _cli(["--compare", "precision=fp32", "attention=math"])
    with pytest.raises(SystemExit) as exit_:
        B.configurations(parser, KNOBS, args, presets)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown override key 'attention'" in err and "precision=fp16|bf16|fp32" in err and "steps=<int>" in err
    assert "knobs for --set / --compare" in parser.format_help()


def test_attention_backends_and_compute_dtypes() -> None:
    q = torch.randn(1, 2, 5, 8)  # (B, H, N, hd)
    with B.attention_backend("math"):
        math_out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(math_out, torch.nn.functional.scaled_dot_product_attention(q, q, q))
    with pytest.raises(ValueError, match="allowed: sdpa, math, flash"):
        B.attention_backend("xformers")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [B.compute_dtype(p, cpu) for p in B.PRECISIONS] == [torch.float32, torch.bfloat16, torch.float32]
    assert B.compute_dtype("fp16", cuda) == torch.float16
    with pytest.raises(ValueError, match="unknown precision"):
        B.compute_dtype("fp8", cpu)


# ---------------------------------------------------------------------------------------------- timing


class FakeClock:
    """A clock that only moves when a fake workload advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_settings_run_interleaved_and_warm_up_untimed() -> None:
    clock, calls = FakeClock(), []
    durations = {"A": iter([9.0, 2.0, 2.5, 4.0]), "B": iter([9.0, 1.0, 1.0, 1.0])}  # first call: the warm-up

    def work(name: str, nfe: float) -> float:
        calls.append(name)
        clock.now += next(durations[name])
        return nfe

    settings = [B.Setting("A", lambda: work("A", 10), batch_size=2), B.Setting("B", lambda: work("B", 4), 2)]
    a, b = B.time_interleaved(settings, torch.device("cpu"), warmup=1, repeats=3, clock=clock)
    assert calls == ["A", "B", "A", "B", "A", "B", "A", "B"]  # warm-ups, then one of each per repeat
    assert a.seconds == (2.0, 2.5, 4.0) and b.seconds == (1.0, 1.0, 1.0)  # the 9 s warm-ups are not timed
    assert (a.nfe_per_image, b.nfe_per_image) == (10, 4)
    assert a.per_image() == B.Spread(median=1.25, q1=1.125, q3=1.625, low=1.0, high=2.0, n=3)
    assert a.seconds_per_image == 1.25 and a.images_per_second().median == 0.8
    speed = B.paired_speedups(a, b)  # per repeat: 2/1, 2.5/1, 4/1
    assert (speed.median, speed.low, speed.high) == (2.5, 2.0, 4.0)
    with pytest.raises(ValueError, match="warmup >= 0 and repeats >= 1"):
        B.time_interleaved(settings, torch.device("cpu"), repeats=0)


def test_memory_probe_starts_after_one_priming_call() -> None:
    """With a probe, the first setting runs once unprobed first, so that one-time process costs are nobody's peak."""
    events: list[str] = []

    class Probe:
        def start(self) -> None:
            events.append("start")

        def stop(self) -> int:
            events.append("stop")
            return 1

    settings = [B.Setting(n, lambda n=n: events.append(n) or 1.0, batch_size=1) for n in "AB"]
    timings = B.time_interleaved(settings, torch.device("cpu"), warmup=1, repeats=1, memory=Probe(),  # type: ignore[arg-type]
                                 clock=FakeClock())  # fmt: skip
    assert events == ["A", "start", "A", "stop", "start", "B", "stop", "A", "B"]
    assert [t.peak_memory for t in timings] == [1, 1]


def test_speedups_are_per_image_when_batch_sizes_differ() -> None:
    one = B.Timing("batch 1", 1, (1.0, 2.0), 5)
    eight = B.Timing("batch 8", 8, (2.0, 2.0), 5)
    assert B.paired_speedups(one, eight).median == pytest.approx((4.0 + 8.0) / 2)
    with pytest.raises(ValueError, match="repeats"):
        B.paired_speedups(one, B.Timing("x", 1, (1.0,), 5))


@pytest.mark.parametrize("samples", [[3.0], [5.0, 1.0], [4.0, 1.0, 9.0, 2.0, 7.0, 3.0, 8.0]])
def test_spread_matches_numpy_percentiles(samples: list[float]) -> None:
    s = B.Spread.of(samples)
    assert (s.q1, s.median, s.q3) == pytest.approx(tuple(np.percentile(samples, [25, 50, 75])))
    assert (s.low, s.high, s.n) == (min(samples), max(samples), len(samples))
    with pytest.raises(ValueError, match="at least one"):
        B.Spread.of([])


def test_peak_matmul_and_the_achieved_fraction() -> None:
    ticks = itertools.count(step=0.25)
    peak = B.peak_matmul_flops(torch.device("cpu"), torch.float32, size=8, repeats=2, clock=lambda: next(ticks))
    assert peak == 2 * 8**3 / 0.25  # every timed product spans one tick of the fake clock
    assert B.peak_fraction(3e9, 2.0, 6e9) == 0.25  # 1.5 GFLOP/s achieved of 6
    with pytest.raises(ValueError, match="positive"):
        B.peak_fraction(1.0, 0.0, 1.0)


def test_report_rows_speedups_and_peak_fraction() -> None:
    base = B.Timing("original", 2, (4.0, 6.0, 5.0), 100, torch.float32, 3 * 2**20, flops_per_batch=8e9)
    fast = B.Timing("DiSA", 2, (1.0, 1.5, 2.0), 25, torch.bfloat16, None, flops_per_batch=2e9)
    text = B.format_report([base, fast], peaks={torch.float32: 1e9, torch.bfloat16: 4e9}, memory_method="probe X")
    lines = text.splitlines()
    assert lines[1].split() == ["original", "2", "2.5[2-3]", "0.4", "100", "0.004", "160.0%", "3MiB"]
    assert lines[2].split() == ["DiSA", "2", "0.75[0.5-1]", "1.33", "25", "0.001", "33.3%", "-"]  # 2e9/1.5/4e9
    # per repeat: 4/1, 6/1.5, 5/2
    assert lines[3].startswith("speed-up of DiSA over original: 4.00x (paired over 3 repeats: min 2.50x, IQR 3.25")
    assert lines[3].endswith("max 4.00x); FLOP ratio 4.00x")
    assert "float32 1.0 GFLOP/s, bfloat16 4.0 GFLOP/s" in lines[4] and "probe X" in lines[5]
    with pytest.raises(ValueError, match="no timings"):
        B.format_report([])


def test_count_flops_of_a_matmul() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert B.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_memory_probe_sees_a_large_allocation() -> None:
    probe = B.MemoryProbe(torch.device("cpu"))
    if not probe.method.startswith("peak RSS"):
        pytest.skip(f"needs Linux /proc/self/clear_refs (this system: {probe.method})")
    probe.start()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so that every page is resident
    del x
    grown = probe.stop()
    probe.start()
    small = probe.stop()
    assert grown is not None and small is not None
    assert grown >= 60 * 2**20 and small < 16 * 2**20


def test_compiled_head_builds_each_variant_once_and_restores_the_eager_forward() -> None:
    module = torch.nn.Linear(2, 2)
    built: list[bool] = []

    def compile_fn(cuda_graphs: bool) -> None:  # stands in for a family's compile_head
        built.append(cuda_graphs)
        module.forward = lambda x, tag=("graphs" if cuda_graphs else "on"): tag  # type: ignore[method-assign]

    head, x = B.CompiledHead(module, compile_fn), torch.ones(1, 2)
    for value, expected in [("on", "on"), ("off", None), ("on", "on"), ("graphs", "graphs"), ("on", "on")]:
        with head.use(value):
            out = module(x)
        assert out == expected if expected else isinstance(out, torch.Tensor)
        assert "forward" not in vars(module)
    assert built == [False, True]


def test_compile_graphs_needs_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench")
    knobs = B.Knobs((B.compile_knob(),))
    B.add_arguments(parser, knobs, batch_size=1, batch_note="1")
    args = parser.parse_args(["--compare", "compile=off", "compile=graphs"])
    assert [v for _, v in B.configurations(parser, knobs, args, [], device=torch.device("cuda"))][1] == {
        "compile": "graphs"}
    with pytest.raises(SystemExit) as exit_:
        B.configurations(parser, knobs, args, [], device=torch.device("cpu"))
    assert exit_.value.code == 2 and "compile=graphs replays CUDA graphs and needs a CUDA device" in (
        capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- family CLIs


def _rows(out: str, names: tuple[str, ...]) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.startswith(names)]


def test_mar_cli_compares_precisions(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from mar_disa import benchmark as mar_bench
    from mar_disa.main_mar import build_model

    def tiny(config, sampler):  # type: ignore[no-untyped-def]
        config = dataclasses.replace(config, embed_dim=32, depth=1, num_heads=2, img_size=64, buffer_size=4,
                                     class_num=3, diffloss_d=2, diffloss_w=32)  # fmt: skip
        return build_model(config, sampler)

    monkeypatch.setattr(mar_bench, "build_model", tiny)
    monkeypatch.setattr(mar_bench, "AutoencoderKL", functools.partial(AutoencoderKL, ch=32))
    argv = ["--models", "mar_base", "--ar_divisor", "32", "--batch_size", "2", "--repeats", "2", "--set",
            "sampler=DiSA", "--compare", "precision=fp32", "precision=bf16,attention=math"]  # fmt: skip
    assert mar_bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = _rows(out, ("precision=",))
    assert [r[0] for r in rows] == ["precision=fp32", "precision=bf16,attention=math"]
    assert [r[4] for r in rows] == ["53", "53"]  # DiSA 50->5 over 2 AR steps of 16 tokens: 48 + 5 head calls
    assert all(r[6].endswith("%") and r[7].endswith("MiB") for r in rows)
    assert "speed-up of precision=bf16,attention=math over precision=fp32" in out and "FLOP ratio 1.00x" in out
    assert "bfloat16" in out and "float32" in out  # a peak per dtype


def test_mar_cli_rejects_bad_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    from mar_disa import benchmark as mar_bench

    with pytest.raises(SystemExit) as exit_:
        mar_bench.main(["--compare", "sampler=DDPM", "sampler=DiSA"])
    assert exit_.value.code == 2
    assert "sampler='DDPM' is not allowed; sampler takes original|fixed|DiSA" in capsys.readouterr().err


def test_flowar_cli_compares_attention_backends(capsys: pytest.CaptureFixture[str]) -> None:
    """Real FlowAR-S at one scale (its smallest run), FLOPs and peak skipped."""
    from flowar_disa import benchmark as flowar_bench

    argv = ["--sizes", "small", "--num_scales", "1", "--batch_size", "1", "--warmup", "0", "--repeats", "2",
            "--no_flops", "--compare", "attention=math", "attention=sdpa,sampler=original"]  # fmt: skip
    assert flowar_bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = _rows(out, ("attention=",))
    assert [(r[0], r[4], r[5], r[6], r[7]) for r in rows] == [
        ("attention=math", "24", "-", "-", "-"), ("attention=sdpa,sampler=original", "24", "-", "-", "-")]
    assert "paired over 2 repeats" in out


def test_xar_cli_runs_presets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from xar_disa import benchmark as xar_bench
    from xar_disa.engine_xar import ModelConfig

    monkeypatch.setattr(xar_bench, "ModelConfig", functools.partial(ModelConfig, class_num=4, embed_dim=32, depth=1,
                                                                      num_heads=2))  # fmt: skip
    monkeypatch.setattr(xar_bench, "AutoencoderKL", functools.partial(AutoencoderKL, ch=32))
    argv = ["--models", "xar_base", "--original_steps", "4", "--flow_upper_steps", "4", "--flow_lower_steps", "3",
            "--batch_size", "1", "--repeats", "2", "--no_vae"]  # fmt: skip
    assert xar_bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = _rows(out, ("xar_base original", "xar_base DiSA"))[:2]  # then the expected table's rows
    assert [r[-4] for r in rows] == ["16", "13"]  # NFE: 4 cells x 4 steps; DiSA 4, 3, 3, 3
    assert "speed-up of xar_base DiSA 4->3 over xar_base original 4 steps" in out
    with pytest.raises(SystemExit) as exit_:
        xar_bench.main(["--compare", "sampler=DiSA", "precision=half"])
    assert exit_.value.code == 2 and "precision takes fp16|bf16|fp32" in capsys.readouterr().err


def test_harmon_cli_runs_presets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from harmon_disa.scripts import benchmark as harmon_bench
    from harmon_disa.src.models import (
        HarmonConfig,
        LLMConfig,
        MARConfig,
        VAEConfig,
        build_harmon,
    )

    micro = HarmonConfig(
        llm=LLMConfig("micro-qwen2", torch_dtype="float32", qwen2_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=64, max_position_embeddings=512, tie_word_embeddings=True)),
        mar=MARConfig.from_dict(dict(
            type="MAR", encoder_embed_dim=16, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=16,
            decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0, norm_eps=1e-6, buffer_size=2, class_num=2,
            diffloss_d=1, diffloss_w=16, num_sampling_steps="100")),
        vae=VAEConfig(ch=32, ch_mult=(1,), num_res_blocks=1, ckpt_path=None, with_encoder=False),
    )  # fmt: skip

    def tiny(size: str, llm_path: Any, device: torch.device, dtype: torch.dtype):  # type: ignore[no-untyped-def]
        return build_harmon(micro).to(device, dtype).eval()

    monkeypatch.setattr(harmon_bench, "build_model", tiny)
    argv = ["--size", "0.5b", "--image_size", "32", "--num_iter", "2", "--prompt_len", "4", "--batch_size", "1",
            "--repeats", "2", "--warmup", "1", "--device", "cpu"]  # fmt: skip
    assert harmon_bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = _rows(out, ("original 100", "DiSA "))
    # The NFE column is what each shipped config's head runs: the same as sampling directly with that head.
    model = tiny("0.5b", None, torch.device("cpu"), torch.float32)
    expected = []
    for key, label in harmon_bench.LABELS.items():
        model.mar.diffloss = harmon_bench.head_for(model, harmon_bench.SETTINGS[key])
        with torch.no_grad():
            model.sample(torch.randint(0, 64, (2, 4)), torch.ones(2, 4, dtype=torch.bool), num_iter=2,
                         image_shape=(2, 2))  # fmt: skip
        expected.append((label, str(model.last_sample_stats.head_calls)))
    assert [(" ".join(r[:2]), r[-4]) for r in rows] == expected
    assert expected[0][1] == "200"  # the original head: 100 steps at each of the 2 AR steps
    assert "reduced setting" in out and "MLP token evaluations per image" in out


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["nope"], 2, "usage: benchmark.py {mar,flowar,xar,harmon}"),
    ([], 2, "got nothing"),
    (["flowar", "--compare", "sampler=DiSA", "turbo=1"], 2, "unknown override key 'turbo'; allowed keys:"),
])  # fmt: skip
def test_dispatcher_rejects_bad_input(argv: list[str], code: int, message: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), *argv], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == code and message in proc.stderr
