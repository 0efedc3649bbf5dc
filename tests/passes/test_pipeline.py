"""Pipeline text: bracket-aware parsing, canonical printing, presets, option errors."""

from __future__ import annotations

import pytest

from sdgraph.errors import UsageError
from sdgraph.passes import Option, Pass, PassResult, register
from sdgraph.passes.pipeline import PRESETS, format_pipeline, parse_pipeline, split_elements


@register
class _Demo(Pass):
    name = "demo-opts"
    summary = "test pass with every option type"
    options = (
        Option("n", int, 1, positional=True, min=0),
        Option("ratio", float, 0.5),
        Option("flag", bool, False),
        Option("exclude", list, []),
        Option("impl", str, "auto", choices=("auto", "x", "y")),
    )

    def run(self, model):
        return PassResult(False)


def test_split_is_bracket_aware():
    assert split_elements("a,b{x=1,2 y=3},c") == ["a", "b{x=1,2 y=3}", "c"]


def test_positional_and_named_options_are_typed():
    (p,) = parse_pipeline("demo-opts:5{ratio=0.25 flag=true exclude=conv_in|conv_out impl=x}")
    assert p.opts.as_dict() == {"n": 5, "ratio": 0.25, "flag": True, "exclude": ("conv_in", "conv_out"), "impl": "x"}


def test_canonical_form_drops_defaults_and_spaces():
    text = "  fold ,  demo-opts:3{ ratio=0.5 flag=yes }, cse,demo-opts{impl=auto}"
    assert format_pipeline(parse_pipeline(text)) == "fold,demo-opts:3{flag=true},cse,demo-opts"


def test_canonical_form_round_trips():
    text = "fold{max_growth=64},demo-opts:2{ratio=0.3 exclude=a|b},infer"
    canon = format_pipeline(parse_pipeline(text))
    assert canon == text
    assert format_pipeline(parse_pipeline(canon)) == canon


def test_presets_expand():
    canon = format_pipeline(parse_pipeline("cleanup, infer"))
    assert canon == "fold,cse,infer"
    assert set(PRESETS) >= {"cleanup", "sd-unet", "sd-vae", "sd-text"}


@pytest.mark.parametrize("text,match", [
    ("fold,nosuchpass", "unknown pass 'nosuchpass'"),
    ("fodl", "did you mean 'fold'"),
    ("demo-opts:abc", "bad value 'abc' for option 'n'"),
    ("fold{max_growth=abc}", "bad value 'abc' for option 'max_growth'"),
    ("demo-opts{ratio=x}", "expected a number"),
    ("demo-opts{flag=maybe}", "expected true or false"),
    ("demo-opts{impl=z}", "expected one of"),
    ("demo-opts:-1", "must be >= 0"),
    ("fold{max_growth=1", "unbalanced"),
    ("fold}", "unbalanced"),
    ("fold{a={b=1}}", "nested"),
    ("fold,,cse", "empty element"),
    ("fold{nosuch=1}", "has no option 'nosuch'"),
    ("fold:1", "takes no positional value"),
    ("fold{x}", "expected KEY=VALUE"),
    ("", "empty pipeline"),
    ("cleanup:1", "takes no options"),
])
def test_bad_pipelines(text, match):
    with pytest.raises(UsageError, match=match):
        parse_pipeline(text)
