"""disa.schedules against the step counts and timestep maps recorded from the official code."""
from __future__ import annotations

import pytest
import torch

from disa.schedules import (
    DDIM_CLIP,
    DISA_CLIP,
    STRATEGIES,
    annealed_steps,
    flowar_time_grid,
    respaced_timesteps,
    step_schedule,
    xar_time_grid,
)


# --- annealed step counts -------------------------------------------------------------------------------------


def test_mar_step_schedules_match_official(golden):
    entries = golden("mar/disa/step_schedules.json")["schedules"]
    assert {e["strategy"] for e in entries} == set(STRATEGIES)
    for e in entries:
        got = step_schedule(e["num_iter"], e["upper"], e["lower"], e["strategy"])
        assert got == e["nominal_steps"], (e["strategy"], e["num_iter"], e["upper"], e["lower"])
        assert [s - e["lower"] for s in got] == e["schedule_id"]


def test_harmon_step_schedules_match_official(golden):
    data = golden("harmon/disa_schedule.json")
    for name, cfg in data["configs"].items():
        if cfg["schedule_id"][0] is None:  # the original Harmon: one fixed count
            continue
        got = step_schedule(cfg["num_iter"], cfg["upper"], cfg["lower"], cfg["strategy"])
        assert got == cfg["nominal_steps"], name
    run = data["tiny_disa_run"]
    got = step_schedule(run["num_iter"], run["upper"], run["lower"], "linear")
    assert [s - run["lower"] for s in got] == run["schedule_id"]


@pytest.mark.parametrize("family,num_ar_steps", [("flowar", 5), ("xar", 4)])
def test_flow_families_full_sweep(golden, family, num_ar_steps):
    sweep = golden(f"{family}/disa_schedules.json")["sweep"]
    assert len(sweep["entries"]) == 5050
    for key, expected in sweep["entries"].items():
        upper, lower = map(int, key.split(","))
        assert step_schedule(num_ar_steps, upper, lower) == expected, key


def test_constant_means_lower_and_single_step():
    # MAR_DiSA's quirk: "constant" runs the lower count every time.
    assert step_schedule(4, 50, 5, "constant") == [5, 5, 5, 5]
    assert step_schedule(4, 50, 5, "two-stage") == [50, 50, 5, 5]
    assert annealed_steps(0, 1, 50, 5, "linear") == 50
    assert annealed_steps(0, 1, 50, 5, "constant") == 5
    # upper == lower reproduces the original sampler for every strategy
    for s in STRATEGIES:
        assert step_schedule(7, 25, 25, s) == [25] * 7


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 64, 5, 50, "linear"), "lower steps \\(50\\) must be <= upper steps \\(5\\)"),
        ((0, 64, 50, 5, "exponential"), "unknown annealing strategy 'exponential'; allowed: linear, cosine, two-stage, constant"),
        ((0, 64, 0, 0, "linear"), "lower must be >= 1"),
        ((0, 0, 50, 5, "linear"), "num_ar_steps must be >= 1"),
        ((64, 64, 50, 5, "linear"), "ar_step must be in \\[0, num_ar_steps - 1\\] = \\[0, 63\\]"),
        ((-1, 64, 50, 5, "linear"), "ar_step must be >= 0"),
    ],
)
def test_annealed_steps_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        annealed_steps(*args)


def test_annealed_steps_rejects_non_integers():
    with pytest.raises(TypeError, match="upper must be an int"):
        annealed_steps(0, 4, 50.0, 5)


# --- respaced DDPM timesteps ----------------------------------------------------------------------------------


def test_respaced_maps_match_official(golden):
    data = golden("mar/diffusion/respacing.json")
    for key, expected in data["timestep_maps"].items():
        spec, clip = key.split("@clip")
        spec = "" if spec == "full" else spec
        assert respaced_timesteps(spec, clip=int(clip)) == expected, key


def test_respaced_maps_every_count(golden):
    all_n = golden("mar/diffusion/respacing.json")["timestep_maps_all_n"]
    for n, expected in all_n["disa_plain_clip950"].items():
        assert respaced_timesteps(n, clip=DISA_CLIP) == expected, n
    for n, expected in all_n["plain_clip1001"].items():
        assert respaced_timesteps(n, clip=None) == expected, n
        assert respaced_timesteps(int(n), clip=1001) == expected, n
    for n, expected in all_n["ddim_clip980"].items():
        assert respaced_timesteps(f"ddim{n}", clip=DDIM_CLIP) == expected, n


def test_respacing_clip_losses_and_sections():
    # Spec §2.5: nominal counts >= 22 lose steps under the 950 clip.
    assert len(respaced_timesteps("100", clip=DISA_CLIP)) == 96
    assert len(respaced_timesteps("50", clip=DISA_CLIP)) == 48
    assert respaced_timesteps("5", clip=DISA_CLIP) == [0, 250, 500, 749, 950]
    assert respaced_timesteps("5", clip=None) == [0, 250, 500, 749, 999]
    # comma-separated sections split the 1000 steps into equal parts
    assert respaced_timesteps("2,3", clip=None) == [0, 499, 500, 750, 999]


def test_respacing_bad_specs():
    with pytest.raises(ValueError, match="invalid timestep respacing 'abc'"):
        respaced_timesteps("abc", clip=None)
    with pytest.raises(ValueError, match="step counts must be >= 1"):
        respaced_timesteps("0", clip=None)
    with pytest.raises(ValueError, match="cannot keep 1001 timesteps"):
        respaced_timesteps("1001", clip=None)
    # the original MAR has no fallback for ddim counts no stride fits
    with pytest.raises(ValueError, match="no integer stride gives exactly 37 DDIM steps"):
        respaced_timesteps("ddim37", clip=None, ddim_shrink_range=False)
    assert respaced_timesteps("ddim37", clip=None)[-1] == 972


# --- flow time grids ------------------------------------------------------------------------------------------


def test_flowar_grid_quirks():
    assert len(flowar_time_grid(25)) - 1 == 24  # odd counts lose a step
    assert len(flowar_time_grid(50)) - 1 == 50  # only 50 is uniform
    assert torch.equal(flowar_time_grid(1), torch.tensor([0.25], dtype=torch.float64))
    clean = flowar_time_grid(25, official=False)
    assert len(clean) == 26 and torch.allclose(clean.diff(), torch.full((25,), -1 / 25, dtype=torch.float64))


def test_xar_grid():
    g = xar_time_grid(15)
    assert len(g) == 16 and g[0] == 1.0 and g[-2] == 0.04 and g[-1] == 0.0
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        xar_time_grid(1)
