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
    """Outputs of the graph after ``p`` in ONNX Runtime; OpenVINO only for bfloat16 graphs (no ORT CPU kernels).

    Any failure to load or run (ORT's own exceptions included) is a PassError naming the runtime's
    message, so the manager rolls the pass back instead of crashing.
    """
    from sdgraph.ir import runtime

    try:
        return runtime.run(model, feeds)
    except Exception as exc:
        why = first_line(exc)
        if not _has_bf16(model):
            raise PassError(why if why.startswith("ONNX Runtime") else f"ONNX Runtime cannot run it: {why}") from None
    from sdgraph.passes._precision import run_any

    try:
        return run_any(model, feeds, runtime="openvino")[0]
    except Exception as exc:
        raise PassError(f"neither ONNX Runtime ({why}) nor OpenVINO ({first_line(exc)}) runs it") from None


def first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _has_bf16(model: Model) -> bool:
    import numpy as np

    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover
        return False
    bf16 = np.dtype(ml_dtypes.bfloat16)
    return any(t.dtype is not None and np.dtype(t.dtype) == bf16 for t in model.graph.tensors().values())


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
