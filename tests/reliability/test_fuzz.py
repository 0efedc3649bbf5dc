"""Hypothesis fuzz (issue 15): pipeline text, pass option values, CLI option values and small
random graphs through the exact passes: 710 cases in all; the random graphs must give the same
outputs in ONNX Runtime after fold,cse,fa,gn,geglu,infer as before (rtol 1e-5)."""

from __future__ import annotations

import pytest
import math

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sdgraph.errors import UsageError
from tests.reliability.support import invoke

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _pass_names() -> list[str]:
    from sdgraph.passes.base import registry
    from sdgraph.passes.pipeline import PRESETS

    return sorted(registry()) + sorted(PRESETS)


_WORDS = st.sampled_from(_pass_names() + ["", "ratio", "min_cosine", "nan", "inf", "-1", "1e309", "true", "x",
                                          "0.5", "a|b", "blocks", "method", "mlp"])
_PUNCT = st.sampled_from([",", ":", "{", "}", "=", " ", "|", "", ".", "-", "\u00e9", "\x00", "\udcff"])
_PIPELINE_TEXT = st.lists(st.one_of(_WORDS, _PUNCT), max_size=14).map("".join)


@pytest.mark.slow  # hundreds of generated cases
@settings(max_examples=250, **_SETTINGS)
@given(text=st.one_of(_PIPELINE_TEXT, st.text(max_size=40)))
def test_pipeline_text_parses_or_is_a_usage_error(text):
    from sdgraph.passes.pipeline import format_pipeline, parse_pipeline

    try:
        passes = parse_pipeline(text)
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    # what parses prints canonically and parses again to the same pipeline
    canon = format_pipeline(passes)
    assert format_pipeline(parse_pipeline(canon)) == canon


_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(), st.text(max_size=12), st.sampled_from(["nan", "inf", "-inf", "1e999", "", "none", "0x10", "1_000"]),
)


@settings(max_examples=200, **_SETTINGS)
@given(data=st.data())
def test_pass_option_values_parse_or_are_usage_errors(data):
    from sdgraph.passes.base import registry

    reg = registry()
    name = data.draw(st.sampled_from(sorted(n for n, cls in reg.items() if cls.options)))
    opt = data.draw(st.sampled_from(reg[name].options))
    value = data.draw(_VALUES)
    try:
        p = reg[name](**{opt.name: value})
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    got = getattr(p.opts, opt.name) if hasattr(p, "opts") else p.config[opt.name]
    if isinstance(got, float):
        assert math.isfinite(got), f"{name}{{{opt.name}={value!r}}} accepted a non-finite value"


_OPTION_TEXT = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e309", "100000", "7.5", "8", "abc", "", "1e-400", "0x1f",
                     "2147483648", "-0", " 3", "\udcff"]),
    st.integers(min_value=-(2**66), max_value=2**66).map(str),
    st.floats().map(repr),
)
_NUMERIC_OPTIONS = ["--steps", "--guidance", "--seed", "--strength", "--eta", "--height", "--devices", "--num-images",
                    "--image-guidance"]


@pytest.mark.slow  # hundreds of generated cases
@settings(max_examples=100, **_SETTINGS)
@given(option=st.sampled_from(_NUMERIC_OPTIONS), value=_OPTION_TEXT, prune=_OPTION_TEXT)
def test_cli_option_values_never_crash(option, value, prune, tmp_path_factory):
    """Any value for a numeric option: a usage error or bad-input line (exit 2), never a crash."""
    tmp = tmp_path_factory.mktemp("fuzz")
    res = invoke(["run", tmp / "no-model", "--prompt", "a cat", option, value, "-o", tmp / "o.png"])
    assert res.code == 2 and len(res.error_lines) == 1 and "Traceback" not in res.stderr, res.stderr
    res = invoke(["cache", "--prune", prune, "--cache-dir", tmp / "cache"])
    assert res.code in (0, 2) and "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    assert (res.code == 2) == (len(res.error_lines) == 1)
    if res.code == 0:
        assert math.isfinite(float(prune)) and float(prune) >= 0


# -- random graphs through the exact passes ------------------------------------------------------
_EXACT = "fold,cse,fa,gn,geglu,infer"


@st.composite
def random_graphs(draw):
    """A chain over x[2,3,4]: Add/Mul/MatMul/Relu/Reshape/Transpose/Concat with constants, some
    constant-only subexpressions (for fold) and repeated subexpressions (for cse)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nodes, inits = [], []
    shape = [2, 3, 4]
    cur = "x"
    counter = iter(range(10_000))

    def const(shape_, name=None):
        name = name or f"c{next(counter)}"
        inits.append(numpy_helper.from_array(rng.uniform(-2, 2, shape_).astype(np.float32), name))
        return name

    def node(op, ins, **attrs):
        out = f"t{next(counter)}"
        nodes.append(helper.make_node(op, ins, [out], name=f"n{next(counter)}", **attrs))
        return out

    for op in draw(st.lists(st.sampled_from(["Add", "Mul", "MatMul", "Relu", "Reshape", "Transpose", "Concat",
                                             "FoldMe", "Twice"]), min_size=1, max_size=8)):
        if op in ("Add", "Mul"):
            bshape = draw(st.sampled_from([list(shape), [shape[-1]], [1]]))
            cur = node(op, [cur, const(bshape)] if draw(st.booleans()) else [const(bshape), cur])
        elif op == "MatMul" and len(shape) >= 2:
            k = draw(st.integers(1, 5))
            cur = node("MatMul", [cur, const([shape[-1], k])])
            shape = shape[:-1] + [k]
        elif op == "Relu":
            cur = node("Relu", [cur])
        elif op == "Reshape":
            new = [int(np.prod(shape))] if draw(st.booleans()) or len(shape) < 2 else [shape[0], int(np.prod(shape[1:]))]
            sc = f"s{next(counter)}"
            inits.append(numpy_helper.from_array(np.array(new, np.int64), sc))
            cur = node("Reshape", [cur, sc])
            shape = new
        elif op == "Transpose":
            perm = draw(st.permutations(list(range(len(shape)))))
            cur = node("Transpose", [cur], perm=list(perm))
            shape = [shape[i] for i in perm]
        elif op == "Concat":
            axis = draw(st.integers(0, len(shape) - 1))
            other = cur if draw(st.booleans()) else const(shape)
            cur = node("Concat", [cur, other], axis=axis)
            shape = [d * 2 if i == axis else d for i, d in enumerate(shape)]
        elif op == "FoldMe":  # a constant-only subexpression feeding the chain
            folded = node("Mul", [node("Add", [const([shape[-1]]), const([shape[-1]])]), const([1])])
            cur = node("Add", [cur, folded])
        else:  # "Twice": the same op on the same input twice, summed (cse merges them)
            c = const([shape[-1]])
            cur = node("Add", [node("Mul", [cur, c]), node("Mul", [cur, c])])
        if int(np.prod(shape)) > 4096:
            break
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    g = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _ort(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.slow  # hundreds of generated cases
@settings(max_examples=160, **_SETTINGS)
@given(proto=random_graphs(), seed=st.integers(0, 1000))
def test_exact_passes_keep_random_graphs_equal(proto, seed):
    import sdgraph
    from sdgraph.ir.model import Model

    onnx.checker.check_model(proto)
    x = np.random.default_rng(seed).standard_normal((2, 3, 4)).astype(np.float32)
    ref = _ort(proto, x)
    model = Model.from_proto(proto)
    sdgraph.optimize(model, _EXACT)
    got = _ort(model.to_proto(), x)
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(scale, 1e-30))
