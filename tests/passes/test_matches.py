"""Matchers return typed match objects; pattern variants are tables the matchers read."""

from __future__ import annotations

import dataclasses

import pytest

from sdgraph.ir.model import Model
from sdgraph.ir.pattern import Mismatch
from sdgraph.ir.shapes import infer_shapes
from sdgraph.passes import fa, geglu, gn
from tests.passes.test_fa import _attn_text
from tests.passes.test_geglu import _geglu_model
from tests.passes.test_gn import _gn_model


def _anchor(m: Model, op: str):
    infer_shapes(m)
    return next(n for n in m.graph.nodes if n.op == op)


def test_attention_match_is_typed_with_named_fields():
    m = Model.from_onnx_text(_attn_text())
    match = fa.match_attention(_anchor(m, "Softmax"))
    assert isinstance(match, fa.AttentionMatch)
    ins = {t.name: t for t in m.graph.inputs}
    assert (match.q, match.kt, match.v, match.mask) == (ins["q"], ins["kt"], ins["v"], None)
    assert match.scale == pytest.approx(0.35) and match.out is m.graph.outputs[0]
    assert (match.canonical_op, match.rank, fa.LAYOUTS[match.rank].wrap) == ("Attention", 4, False)


def test_attention_layouts_table_drives_the_rank_check():
    text = _attn_text().replace("float[1,2,4,8] q", "float[2,4,8] q").replace("float[1,2,8,4] kt", "float[2,8,4] kt") \
        .replace("float[1,2,4,8] v", "float[2,4,8] v").replace("float[1,2,4,8] y", "float[2,4,8] y")
    match = fa.match_attention(_anchor(Model.from_onnx_text(text), "Softmax"))
    assert match.rank == 3 and fa.LAYOUTS[3].wrap
    five = _attn_text().replace("float[1,2,4,8] q", "float[1,1,2,4,8] q")
    with pytest.raises(Mismatch, match=r"query rank is 5; expected 4 \(\[B,H,S,D\]\) or 3"):
        fa.match_attention(_anchor(Model.from_onnx_text(five), "Softmax"))


@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_match_is_typed_and_frozen(silu):
    m = _gn_model(silu=silu)
    match = gn.match_group_norm(_anchor(m, "InstanceNormalization"))
    assert isinstance(match, gn.GroupNormMatch)
    assert (match.groups, match.epsilon, match.silu) == (4, pytest.approx(1e-6), silu)
    assert match.x is m.graph.inputs[0] and match.gamma.name == "gamma" and match.beta.name == "beta"
    assert match.affine_out.name == "pre" and match.out.name == ("y" if silu else "pre")
    assert match.canonical_op == ("GroupNormSilu" if silu else "GroupNorm")
    with pytest.raises(dataclasses.FrozenInstanceError):
        match.groups = 2
    plain = match.without_silu()
    assert (plain.silu, plain.out, plain.canonical_op) == (False, match.affine_out, "GroupNorm")
    assert list(gn.EPILOGUES) == ["silu", "none"]  # SiLU is tried first


@pytest.mark.parametrize("split", ["slice", "split"])
def test_geglu_match_names_the_variants_it_matched(split):
    m = _geglu_model(split=split)
    match = geglu.match_geglu(_anchor(m, "Erf"))
    assert isinstance(match, geglu.GeGLUMatch)
    assert match.x is m.graph.inputs[0] and match.out is m.graph.outputs[0]
    assert (match.gate, match.halves) == ("Erf", split.capitalize())
    assert set(geglu.GATES) == {"Erf", "Gelu"} and set(geglu.HALVES) == {"Split", "Slice"}


def test_geglu_halves_table_names_the_accepted_producers():
    m = _geglu_model()
    slc = next(n for n in m.graph.nodes if n.op == "Slice")
    slc.op = "Gather"  # no longer a way to cut halves
    with pytest.raises(Mismatch, match="comes from Gather, not a Split/Slice"):
        geglu.match_geglu(_anchor(m, "Erf"))
