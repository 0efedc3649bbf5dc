"""Matrix products: MatMul, Gemm, Einsum."""

from __future__ import annotations

from sdgraph.targets.torch_fx._values import torch_mod
from sdgraph.targets.torch_fx.registry import converter

__all__: list[str] = []


def _gemm(a, b, c, alpha, beta, ta, tb):
    if ta:
        a = a.t()
    if tb:
        b = b.t()
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _einsum(eq, *xs):
    return torch_mod().einsum(eq, *xs)


@converter("MatMul")
def matmul(em, x):
    return [x.tensor_out(em.call(em.torch.matmul, em.tensor(x.ins[0]), em.tensor(x.ins[1])))]


@converter("Gemm")
def gemm(em, x):
    a = x.attrs
    return [x.tensor_out(em.call(_gemm, em.tensor(x.ins[0]), em.tensor(x.ins[1]), em.tensor(x.input(2)),
                                 float(a.get("alpha", 1.0)), float(a.get("beta", 1.0)),
                                 int(a.get("transA", 0)), int(a.get("transB", 0))))]


@converter("Einsum")
def einsum(em, x):
    return [x.tensor_out(em.call(_einsum, x.attrs["equation"], *(em.tensor(v) for v in x.ins)))]
