"""The verifier the manager runs around each pass: structural checks, and outputs compared in ONNX Runtime."""

from __future__ import annotations

from sdgraph.errors import InputError, PassError
from sdgraph.ir.model import Model, structure_problem
from sdgraph.passes.base import Pass

__all__ = ["verify_structure", "check_input", "run_after", "judge"]


def verify_structure(model: Model, expected_outputs: list[str] | None = None) -> None:
    """Cheap checks after a pass: acyclic, unique node names, no dangling tensors, outputs intact."""
    problem = structure_problem(model.graph, expected_outputs, when=" after the pass")
    if problem:
        raise PassError(problem)


def check_input(model: Model) -> None:
    """The same checks before the first pass: an invalid graph is bad input, not a pass failure."""
    problem = structure_problem(model.graph)
    if problem:
        raise InputError(f"{model.path or model.name}: invalid graph: {problem}")


def run_after(p: Pass, model: Model, feeds) -> dict:
    """ONNX Runtime; for an approximate pass whose graph ORT's CPU provider cannot load (bf16), OpenVINO."""
    from sdgraph.ir import runtime

    try:
        return runtime.run(model, feeds)
    except InputError:
        if p.exact:
            raise
        from sdgraph.passes._precision import run_any

        return run_any(model, feeds, runtime="openvino")[0]


def judge(p: Pass, numbers: dict[str, float]) -> str | None:
    """Why the outputs after ``p`` are not acceptable (exact: max_rel over ``rtol``; approximate:
    cosine under an explicit ``min_cosine``; any pass: NaN/Inf), or None."""
    if numbers["cosine"] != numbers["cosine"]:  # NaN
        return "outputs are NaN/Inf after the pass"
    min_cos = getattr(p.opts, "min_cosine", None)
    if p.exact:
        if numbers["max_rel"] > p.rtol:
            return f"outputs moved by max_rel {numbers['max_rel']:.3g} (> {p.rtol:g}), cosine {numbers['cosine']:.6f}"
    elif min_cos is not None and numbers["cosine"] < float(min_cos):
        return f"cosine {numbers['cosine']:.6f} is below min_cosine={min_cos}"
    return None
