"""Pipeline text, smaller pieces: element formatting, values, splitting, every preset's expansion."""

from __future__ import annotations

import pytest

from sdgraph.passes.base import format_element, format_value, get_pass
from sdgraph.passes.pipeline import PRESETS, format_pipeline, parse_pipeline, split_elements


@pytest.mark.parametrize("value,text", [
    (True, "true"), (False, "false"), (None, "none"), (["a", "b"], "a|b"), ((1, 2), "1|2"),
    (0.5, "0.5"), (2.0, "2"), (1e-05, "1e-05"), (7, "7"), ("conv_in", "conv_in"),
])
def test_format_value(value, text):
    assert format_value(value) == text


def test_format_element_positional_then_named_in_declared_order():
    tome = get_pass("tome")
    assert format_element("tome", {}, tome) == "tome"
    assert format_element("tome", {"seed": 3, "ratio": 0.6, "blocks": 5}, tome) == "tome:5{ratio=0.6 seed=3}"


def test_spec_is_format_element_of_the_non_defaults():
    (p,) = parse_pipeline("tome{ratio=0.6 sx=2}")
    assert p.spec() == "tome{ratio=0.6}"
    assert repr(p) == "<Pass tome{ratio=0.6}>"


def test_split_keeps_spaces_and_empty_tail_for_the_parser():
    assert split_elements(" fold , tome{ratio=0.5 seed=1} ") == [" fold ", " tome{ratio=0.5 seed=1} "]
    assert split_elements("a{x=1|2},b") == ["a{x=1|2}", "b"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_expands_to_its_passes(preset):
    assert format_pipeline(parse_pipeline(preset)) == PRESETS[preset]
