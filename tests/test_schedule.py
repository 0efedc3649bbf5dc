"""sdgraph.schedule: cache steps (uniform, DeepCache's quadratic), rules over step indices, validation."""

from __future__ import annotations

import pytest

from sdgraph.errors import InputError
from sdgraph.schedule import Schedule, cache_steps, deepcache_schedule, feature_shape, quadratic_steps, read_schedule

VARIANTS = {"unet_shallow": {"of": "unet", "feature": {"input": "deepcache_feature", "from": "unet"}},
            "unet_tome": {"of": "unet"}, "vae_small": {"of": "vae_decoder"}}


def test_uniform_and_quadratic_cache_steps():
    assert sorted(cache_steps(10, 3)) == [0, 3, 6, 9]
    assert sorted(cache_steps(20, 5)) == [0, 5, 10, 15]
    assert sorted(cache_steps(5, 1)) == [0, 1, 2, 3, 4]
    # quadratic: as many cache steps as uniform (ceil(T/N)), step 0 first, denser around 0.3*T
    assert sorted(cache_steps(10, 3, "quadratic")) == [0, 2, 3, 6]
    assert sorted(cache_steps(20, 3, "quadratic")) == [0, 3, 5, 6, 9, 12, 15]
    assert sorted(cache_steps(50, 5, "quadratic")) == [0, 5, 10, 13, 15, 19, 24, 29, 35, 42]
    for total, n in ((10, 3), (20, 3), (20, 5), (50, 3), (7, 2), (3, 2)):
        steps = quadratic_steps(total, -(-total // n))
        assert steps[0] == 0 and len(steps) == -(-total // n) and steps[-1] < total
    gaps = [b - a for a, b in zip(*(lambda s: (s, s[1:]))(sorted(cache_steps(50, 5, "quadratic"))))]
    assert min(gaps) < 5 < max(gaps)  # non-uniform: closer than N near the center, farther at the end


def test_deepcache_schedule_which_and_plan():
    s = deepcache_schedule("unet", "unet_shallow", 3, "uniform")
    assert [s.which(i, 10) for i in range(4)] == ["unet", "unet_shallow", "unet_shallow", "unet"]
    assert s.plan(10) == ["unet", "unet_shallow", "unet_shallow"] * 3 + ["unet"]
    again = Schedule.parse("unet", s.to_json(), VARIANTS)
    assert again.plan(10) == s.plan(10) and again.features == {"unet_shallow": "unet"}
    q = Schedule.parse("unet", {"cache": {"interval": 3, "spacing": "quadratic"},
                                "rules": [{"steps": "cache", "variant": "unet"}, {"variant": "unet_shallow"}]}, VARIANTS)
    assert [i for i, v in enumerate(q.plan(10)) if v == "unet"] == [0, 2, 3, 6]


def test_ranges_and_fractions():
    # tome for the first 60 % of steps, the plain graph after; a step range wins where it comes first
    s = Schedule.parse("unet", {"rules": [{"steps": [0, 1], "variant": "unet"},
                                          {"steps": {"fraction": [0, 0.6]}, "variant": "unet_tome"}]}, VARIANTS)
    assert s.plan(10) == ["unet"] + ["unet_tome"] * 5 + ["unet"] * 4
    assert s.plan(5) == ["unet", "unet_tome", "unet_tome", "unet", "unet"]
    open_end = Schedule.parse("unet", {"rules": [{"steps": [4, None], "variant": "unet_tome"}]}, VARIANTS)
    assert open_end.plan(6) == ["unet"] * 4 + ["unet_tome"] * 2
    assert Schedule.parse("unet", open_end.to_json(), VARIANTS) == open_end


@pytest.mark.parametrize("raw, message", [
    ([], "must be an object"),
    ({"rules": []}, "rules must be a non-empty list"),
    ({"rules": [{"variant": "unet_x"}]}, "variant 'unet_x' is not 'unet' or one of its variants"),
    ({"rules": [{"variant": "vae_small"}]}, "variant 'vae_small' is not"),
    ({"rules": [{"steps": "cache", "variant": "unet"}]}, 'steps "cache" needs a "cache" entry'),
    ({"rules": [{"steps": [3, 1], "variant": "unet"}]}, "step range [3, 1] must be [a, b]"),
    ({"rules": [{"steps": [-1, 2], "variant": "unet"}]}, "step range"),
    ({"rules": [{"steps": {"fraction": [0.5, 1.5]}, "variant": "unet"}]}, "fraction [0.5, 1.5] must be"),
    ({"rules": [{"steps": "odd", "variant": "unet"}]}, "steps 'odd' must be"),
    ({"rules": [{"variant": "unet", "when": 1}]}, "rule 0: must be"),
    ({"cache": {"interval": 0}, "rules": [{"variant": "unet"}]}, "cache interval 0 must be an integer in 1..1000"),
    ({"cache": {"interval": 3, "spacing": "cubic"}, "rules": [{"variant": "unet"}]}, "spacing 'cubic'"),
    ({"rules": [{"variant": "unet"}], "extra": 1}, "unknown key(s) extra"),
])
def test_bad_schedules_are_one_line_input_errors(raw, message):
    with pytest.raises(InputError) as exc:
        Schedule.parse("unet", raw, VARIANTS)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_feature_before_any_cache_step_is_refused():
    s = Schedule.parse("unet", {"rules": [{"steps": [0, 2], "variant": "unet_shallow"}]}, VARIANTS)
    with pytest.raises(InputError, match="step 0 of 5 calls 'unet_shallow', which reads the feature 'unet' computes"):
        s.plan(5)


def test_read_schedule_and_feature_shape():
    manifest = {"variants": VARIANTS, "schedule": {"unet": deepcache_schedule("unet", "unet_shallow", 5, "uniform").to_json()}}
    assert read_schedule(manifest).plan(6) == ["unet"] + ["unet_shallow"] * 4 + ["unet"]
    assert read_schedule({}) is None and read_schedule(manifest, "vae_decoder") is None
    with pytest.raises(InputError, match='"schedule" must be an object'):
        read_schedule({"schedule": [1]})
    with pytest.raises(InputError, match="must be an object with \"of\""):
        read_schedule({"variants": {"x": 1}, "schedule": {"unet": {"rules": [{"variant": "unet"}]}}})
    assert feature_shape((2, 4, 64, 64), {"channels": 320, "downscale": 2}) == (2, 320, 32, 32)
    assert feature_shape((2, 4, 15, 9), {"channels": 8, "downscale": 2}) == (2, 8, 8, 5)
