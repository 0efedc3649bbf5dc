"""Intel Neural Engine (intel-extension-for-transformers 1.4.2): sdgraph's own emitter of the engine's IR (conf.yaml + model.bin)."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.errors import PassError, TargetUnavailable, UnsupportedError
from sdgraph.ir.canonical import inline_functions
from sdgraph.ir.build import GraphBuilder
from sdgraph.ir.model import CANONICAL_DOMAIN, Model
from sdgraph.ir.pattern import Mismatch
from sdgraph.ir.shapes import infer_shapes, static_shape
from sdgraph.passes.geglu import match_erf_gelu
from sdgraph.targets.base import Capability, LowerContext, Problem, Target, register_target

__all__ = ["NeuralEngineTarget", "neural_engine_status", "emit_ir", "NE_OPS", "MAPPED_ONNX_OPS", "ne_python"]

log = logging.getLogger(__name__)

# Engine operator types we emit (executor classes of libneural_engine.so, 1.4.2).
NE_OPS = frozenset({
    "Input", "Output", "InnerProduct", "Matmul", "Convolution", "BinaryAdd", "BinaryOp", "Softmax", "LayerNorm",
    "GroupNorm", "Reorder", "Reshape", "Gather", "Concat", "Slice", "Erf", "Exp", "Sigmoid", "Pow", "CosSin",
    "Resampling", "ReduceMean", "ReduceSum", "Quantize",
})
# ONNX ops the emitter maps (after fold and static shapes); anything else is reported by check().
MAPPED_ONNX_OPS = frozenset({
    "MatMul", "Gemm", "Conv", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Softmax", "LayerNormalization",
    "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Gather", "Concat", "Slice", "Gelu", "Exp",
    "Sigmoid", "Sin", "Cos", "Resize", "ReduceMean", "ReduceSum", "Identity", "Cast", "Constant", "Expand",
})
# Canonical ops with a native engine form; others are inlined to their bodies first.
NATIVE_CANONICAL = frozenset({"Attention", "AttentionMasked", "GroupNorm", "GroupNormSilu"})
_BINARY = {"Sub": "sub", "Mul": "mul", "Div": "div"}
_NE_DTYPES = {np.dtype(np.float32): "fp32", np.dtype(np.int32): "s32", np.dtype(np.int64): "s32",
              np.dtype(np.uint16): "bf16", np.dtype(np.float16): "fp16", np.dtype(np.bool_): "s32"}


# -- the engine's environment ----------------------------------------------------------------------
def ne_python() -> Path:
    """The Python of the engine's own environment ($SDGRAPH_NE_PYTHON, else <repo>/.venv-ne)."""
    env = os.environ.get("SDGRAPH_NE_PYTHON")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".venv-ne" / "bin" / "python"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _worker_cmd(python: str, *args: str) -> list[str]:
    # -P: the script folder (sdgraph/targets: torch.py, openvino.py, ...) must not shadow packages
    return [python, "-P", str(Path(__file__).with_name("ne_worker.py")), *args]


def failure_reason(returncode: int | None, stderr: str) -> str:
    """Why the engine's environment cannot run: the one wording ``doctor``, ``targets`` and ``run`` give."""
    if returncode == -4:
        avx = sorted(f for f in _cpu_flags() if f.startswith("avx"))
        return (f"the engine runtime dies with SIGILL on import: libkernellibs.so runs an AVX-512 instruction "
                f"(vpbroadcastq from a general register, in jd::jit_generator's constructor) and this CPU has "
                f"{', '.join(avx) or 'no AVX'} only")
    tail = [ln for ln in (stderr or "").strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return f"the engine runtime does not import (exit {returncode}): {tail[0]}"


@functools.lru_cache(maxsize=4)
def _status(python: str) -> tuple[bool, str]:
    if not Path(python).exists():
        return False, f"no engine environment at {python} (create it: tools/setup_neural_engine.sh)"
    try:  # started exactly as run starts the worker, so a probe that passes means run can load
        proc = subprocess.run(_worker_cmd(python, "--probe"), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, "the engine runtime did not import within 120 s"
    except OSError as exc:
        return False, f"the engine environment's python does not start ({exc.strerror or exc})"
    if proc.returncode != 0:
        return False, failure_reason(proc.returncode, proc.stderr or proc.stdout)
    return True, f"{python} (numpy {proc.stdout.strip()})"


def neural_engine_status() -> tuple[bool, str]:
    """(usable, why): whether the engine's own environment exists and its runtime loads on this CPU."""
    return _status(str(ne_python()))


# -- the IR emitter ---------------------------------------------------------------------------------
def _s(values) -> str:
    return ",".join(str(int(v)) for v in values)


def _bf16(a: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (truncation, as the engine's InsertBF16Node does)."""
    return (np.ascontiguousarray(a, dtype=np.float32).view(np.int32) >> 16).astype(np.uint16)


class _IR:
    """Collects engine ops, constant tensors (model.bin) and graph inputs/outputs."""

    def __init__(self, precision: str):
        self.precision = precision
        self.ops: OrderedDict[str, dict] = OrderedDict()
        self.inputs: OrderedDict[str, dict] = OrderedDict()
        # name -> (array or a loader called at write time, engine dtype, shape): weights stream to model.bin
        self.consts: OrderedDict[str, tuple[Any, str, list[int]]] = OrderedDict()
        self.n = 0

    def lazy(self, name: str, load, ne_dtype: str, shape) -> str:
        """A constant read only when model.bin is written (one tensor in memory at a time)."""
        if name in self.consts:
            self.n += 1
            name = f"{name}__{self.n}"
        self.consts[name] = (load, ne_dtype, [int(d) for d in shape] or [1])
        return name

    def const(self, name: str, value: np.ndarray, ne_dtype: str | None = None) -> str:
        arr = np.asarray(value)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if ne_dtype is None:
            if arr.dtype in (np.int64, np.int32, np.bool_):
                arr, ne_dtype = arr.astype(np.int32), "s32"
            else:
                arr, ne_dtype = arr.astype(np.float32), "fp32"
        if name in self.consts:
            self.n += 1
            name = f"{name}__{self.n}"
        self.consts[name] = (np.ascontiguousarray(arr), ne_dtype, [int(d) for d in arr.shape])
        return name

    def fconst(self, name: str, value) -> str:
        return self.const(name, np.asarray(value, dtype=np.float32))

    def op(self, name: str, typ: str, inputs: list[str], outputs: list[str], attr: dict | None = None) -> None:
        if name in self.ops:
            self.n += 1
            name = f"{name}__{self.n}"
        entry = OrderedDict(type=typ, input=OrderedDict((i, {}) for i in inputs),
                            output=OrderedDict((o, {}) for o in outputs))
        if attr:
            entry["attr"] = OrderedDict((k, v) for k, v in attr.items())
        self.ops[name] = entry

    def tmp(self, base: str) -> str:
        self.n += 1
        return f"{base}:{self.n}"

    def write(self, out_dir: Path, outputs: list[str]) -> dict[str, Any]:
        import yaml

        input_out = OrderedDict()
        for name, spec in self.inputs.items():
            input_out[name] = spec
        pos = 0
        with open(out_dir / "model.bin", "wb") as f:
            for name, (value, dt, shape) in self.consts.items():
                arr = np.ascontiguousarray(value() if callable(value) else value)
                if [int(d) for d in arr.shape] != shape and arr.size != int(np.prod(shape)):
                    raise PassError(f"constant {name!r}: loaded shape {list(arr.shape)} is not the declared {shape}")
                f.write(memoryview(arr).cast("B"))
                input_out[name] = OrderedDict(dtype=dt, shape=shape, location=[pos, arr.nbytes])
                pos += arr.nbytes
                del arr
        operators = OrderedDict()
        operators["input_data"] = OrderedDict(type="Input", output=input_out)
        operators.update(self.ops)
        operators["output_data"] = OrderedDict(type="Output", input=OrderedDict((o, {}) for o in outputs))
        net = OrderedDict(model=OrderedDict(name="model", operator=operators))

        class _Dumper(yaml.SafeDumper):
            pass

        _Dumper.add_representer(OrderedDict, lambda d, data: d.represent_mapping("tag:yaml.org,2002:map", data.items()))
        _Dumper.add_representer(list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))
        (out_dir / "conf.yaml").write_text(yaml.dump(net, Dumper=_Dumper, default_flow_style=False, sort_keys=False))
        return {"weights_bytes": pos, "operators": len(self.ops) + 2}


def _cval(t) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def _shape(t) -> tuple[int, ...]:
    s = static_shape(t)
    if s is None:
        raise UnsupportedError(f"tensor {t.name!r} has no static shape after inference; the emitter needs every shape")
    return s


def _reshape_attr(shape: tuple[int, ...]) -> str:
    return _s(shape)


class _Lowerer:
    """ONNX node -> engine ops. Each handler returns nothing; unknown ops were rejected by check()."""

    def __init__(self, model: Model, precision: str):
        self.m, self.ir, self.precision = model, _IR(precision), precision
        self.consumers: dict[str, list[gs.Node]] = {}
        for n in model.graph.nodes:
            for t in n.inputs:
                self.consumers.setdefault(t.name, []).append(n)
        self.skip: set[int] = set()
        self.alias: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    # -- helpers
    def name(self, t) -> str:
        if isinstance(t, gs.Constant):
            if t.name not in self.ir.consts:
                integer = t.dtype is not None and np.issubdtype(np.dtype(t.dtype), np.integer)
                np_dt = np.int32 if integer else np.float32
                self.ir.lazy(t.name, lambda t=t, d=np_dt: np.asarray(t.values).astype(d), "s32" if integer else "fp32",
                             list(t.shape or [1]))
            return t.name
        return self.alias.get(t.name, t.name)

    def count(self, typ: str) -> None:
        self.counts[typ] = self.counts.get(typ, 0) + 1

    def emit(self, node_name: str, typ: str, inputs, outputs, attr=None) -> None:
        self.count(typ)
        self.ir.op(node_name, typ, inputs, outputs, attr)

    def odt(self) -> dict:
        return {"output_dtype": "fp32"}

    def to_bf16(self, node_name: str, src: str) -> str:
        out = self.ir.tmp(src + "_bf16")
        self.emit(node_name + "_quant", "Quantize", [src], [out], {"output_dtype": "bf16"})
        return out

    def weight(self, t, flat: bool = False) -> str:
        """A weight or bias constant (bf16 bits under --precision bf16), read at write time."""
        shape = [int(np.prod(t.shape))] if flat else list(t.shape)

        def load(t=t):
            a = np.asarray(t.values, dtype=np.float32).reshape(shape)
            return _bf16(a) if self.precision == "bf16" else a

        return self.ir.lazy(t.name, load, "bf16" if self.precision == "bf16" else "fp32", shape)

    def quantize_src(self, node_name: str, src: str, per_token: bool) -> tuple[str, str, str]:
        """dynamic_int8: the engine's run-time ``Quantize`` of an activation -> (data, min, scale).

        As ITREX 1.4.2's dynamic quantization emits it: s8 per token (row) in front of an
        InnerProduct, u8 per tensor (asymmetric) in front of a Convolution.
        """
        q, mn, sc = (self.ir.tmp(src + suffix) for suffix in ("_quant", "_min", "_scale"))
        self.emit(node_name + "_quant", "Quantize", [src], [q, mn, sc],
                  {"output_dtype": "s8" if per_token else "u8", "per_token": per_token})
        return q, mn, sc

    def int8_weight(self, t, channel_axis: int) -> tuple[str, str, str]:
        """dynamic_int8: a weight as s8, symmetric per output channel (``channel_axis``), with its min and
        scale tensors (scale = max|w| / 127 over the other axes, 0 for an all-zero channel)."""
        shape = [int(d) for d in t.shape]
        axes = tuple(a for a in range(len(shape)) if a != channel_axis)
        keep = len(shape) > 2  # Convolution: [O,1,1,1]; InnerProduct: [N]
        stat_shape = [shape[channel_axis]] + ([1] * (len(shape) - 1) if keep else [])

        def stats(t=t):
            w = np.asarray(t.values, dtype=np.float32)
            mn = w.min(axis=axes, keepdims=keep)
            scale = np.maximum(np.abs(mn), np.abs(w.max(axis=axes, keepdims=keep))) / 127.0
            return w, mn.astype(np.float32), scale.astype(np.float32)

        def quant(t=t):
            w, _, scale = stats()
            safe = np.where(scale == 0, 1.0, scale)
            return np.clip(np.round(w / (safe if keep else np.expand_dims(safe, axes))), -127, 127).astype(np.int8)

        wq = self.ir.lazy(t.name + "_quant", quant, "s8", shape)
        mn = self.ir.lazy(t.name + "_min", lambda: stats()[1].reshape(stat_shape), "fp32", stat_shape)
        sc = self.ir.lazy(t.name + "_scale", lambda: stats()[2].reshape(stat_shape), "fp32", stat_shape)
        return wq, mn, sc

    def _weighted(self, node_name: str, typ: str, src: str, w, channel_axis: int, bias, out: str, attr: dict) -> None:
        """InnerProduct / Convolution at the lowering's precision (bf16 and dynamic_int8 forms).

        dynamic_int8 keeps an InnerProduct whose reduction size K is not a multiple of 4 in fp32: the
        engine's s8 kernel refuses it ("k must pad with 4", dynamic_quant_matmul.cpp on 1.4.2).
        """
        k = int(w.shape[1 - channel_axis]) if typ == "InnerProduct" else 0
        if self.precision == "dynamic_int8" and k % 4:
            self.count("fp32_kept")
        elif self.precision == "dynamic_int8":
            q, mn, sc = self.quantize_src(node_name, src, per_token=typ == "InnerProduct")
            wq, wmn, wsc = self.int8_weight(w, channel_axis)
            ins = [q, wq] + ([self.weight(bias, flat=True)] if bias is not None else []) + [mn, sc, wmn, wsc]
            self.emit(node_name, typ, ins, [out], attr)
            return
        if self.precision == "bf16":
            src = self.to_bf16(node_name, src)
        ins = [src, self.weight(w)] + ([self.weight(bias, flat=True)] if bias is not None else [])
        self.emit(node_name, typ, ins, [out], attr)

    # -- graph
    def run(self) -> dict[str, Any]:
        g = self.m.graph
        for t in g.inputs:
            dt = _NE_DTYPES.get(np.dtype(t.dtype), "fp32")
            shape = list(_shape(t))
            self.ir.inputs[t.name] = OrderedDict(dtype=dt, shape=[-1] + shape[1:] if shape else shape)
        for i, node in enumerate(g.nodes):
            if i in self.skip:
                continue
            getattr(self, f"op_{node.op}", self.unknown)(i, node)
        outs = [self.alias.get(t.name, t.name) for t in g.outputs]
        return {"outputs": outs}

    def unknown(self, i, node):  # pragma: no cover - check() rejects these first
        raise UnsupportedError(f"{node.name} ({node.op}): no Neural Engine mapping")

    def _fuse_bias(self, node: gs.Node, n_out: int) -> tuple[gs.Tensor | None, gs.Tensor]:
        """An Add of a constant [N] right after node (its only consumer) becomes the op's bias."""
        out = node.outputs[0]
        cons = self.consumers.get(out.name, [])
        if len(cons) == 1 and cons[0].op == "Add" and out not in self.m.graph.outputs:
            add = cons[0]
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            v = _cval(other)
            if v is not None and v.size == n_out and v.ndim <= 1 + (v.ndim > 1 and all(d == 1 for d in v.shape[:-1])):
                self.skip.add(self.m.graph.nodes.index(add))
                return other, add.outputs[0]
        return None, out

    # -- ops
    def op_MatMul(self, i, node):
        a, b = node.inputs
        if not isinstance(b, gs.Constant) or len(b.shape) != 2:
            self.emit(node.name, "Matmul", [self.name(a), self.name(b)], [node.outputs[0].name], self.odt())
            return
        k, n_out = (int(d) for d in b.shape)
        bias, out = self._fuse_bias(node, n_out)
        a_shape = _shape(a)
        src = self.name(a)
        if len(a_shape) != 2:
            src2 = self.ir.tmp(node.name + "_2d")
            self.emit(node.name + "_reshape_2d", "Reshape", [src], [src2], {"dst_shape": f"-1,{k}"})
            src = src2
        out_name = out.name if len(a_shape) == 2 else self.ir.tmp(node.name + "_ip")
        self._weighted(node.name, "InnerProduct", src, b, 1, bias, out_name, {"src1_perm": "1,0", **self.odt()})
        if len(a_shape) != 2:
            self.emit(node.name + "_reshape_nd", "Reshape", [out_name], [out.name],
                      {"dst_shape": _reshape_attr(tuple(a_shape[:-1]) + (n_out,))})

    def op_Gemm(self, i, node):
        a, b = node.inputs[:2]
        trans_b = int(node.attrs.get("transB", 0))
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name else None
        self._weighted(node.name, "InnerProduct", self.name(a), b, 0 if trans_b else 1, bias, node.outputs[0].name,
                       {"src1_perm": "0,1" if trans_b else "1,0", **self.odt()})

    def op_Conv(self, i, node):
        x, w = node.inputs[:2]
        wshape = [int(d) for d in w.shape]
        bias, out = self._fuse_bias(node, wshape[0]) if len(node.inputs) < 3 else (node.inputs[2], node.outputs[0])
        nd = len(wshape) - 2
        pads = list(node.attrs.get("pads", [0] * 2 * nd))
        # ONNX pads are [begin..., end...]; the engine's are (begin, end) per spatial axis (measured on 1.4.2)
        attr = {"group": int(node.attrs.get("group", 1)), "pads": _s(v for i in range(nd) for v in (pads[i], pads[i + nd])),
                "strides": _s(node.attrs.get("strides", [1] * nd)), **self.odt()}
        dil = list(node.attrs.get("dilations", [1] * nd))
        if any(d != 1 for d in dil):
            attr["dilations"] = _s(dil)
        self._weighted(node.name, "Convolution", self.name(x), w, 0, bias if bias is not None and bias.name else None,
                       out.name, attr)

    def _binary(self, node, typ, algorithm=None):
        ins = []
        for t in node.inputs:
            v = _cval(t)
            ins.append(self.ir.fconst(t.name, v if v.ndim else v.reshape(1)) if v is not None else self.name(t))
        self.emit(node.name, typ, ins, [node.outputs[0].name], {"algorithm": algorithm} if algorithm else None)

    def op_Add(self, i, node):
        # The engine's BinaryAdd takes equal shapes only (oneDNN "could not create a primitive
        # descriptor for a binary operation primitive" otherwise); BinaryOp broadcasts.
        a, b = node.inputs
        if _shape(a) == _shape(b):
            self._binary(node, "BinaryAdd")
        else:
            self._binary(node, "BinaryOp", "add")

    def op_Sub(self, i, node):
        self._binary(node, "BinaryOp", "sub")

    def op_Mul(self, i, node):
        self._binary(node, "BinaryOp", "mul")

    def op_Div(self, i, node):
        self._binary(node, "BinaryOp", "div")

    def op_Pow(self, i, node):
        self._binary(node, "Pow")

    def op_Sqrt(self, i, node):
        half = self.ir.fconst(node.name + "_half", np.array([0.5], np.float32))
        self.emit(node.name, "Pow", [self.name(node.inputs[0]), half], [node.outputs[0].name])

    def _unary(self, node, typ, attr=None):
        self.emit(node.name, typ, [self.name(node.inputs[0])], [node.outputs[0].name], attr)

    def op_Gelu(self, i, node):
        # the engine's "Erf" executor computes the exact GELU x·Φ(x) (measured on ITREX 1.4.2's runtime)
        self._unary(node, "Erf")

    def op_Exp(self, i, node):
        self._unary(node, "Exp")

    def op_Sigmoid(self, i, node):
        self._unary(node, "Sigmoid")

    def op_Sin(self, i, node):
        # CosSin sets its output dtype from output_dtype (unset: an undefined tensor, the engine segfaults)
        self._unary(node, "CosSin", {"algorithm": "sin", "output_dtype": "fp32"})

    def op_Cos(self, i, node):
        self._unary(node, "CosSin", {"algorithm": "cos", "output_dtype": "fp32"})

    def op_Softmax(self, i, node):
        rank = len(_shape(node.inputs[0]))
        self._unary(node, "Softmax", {"axis": int(node.attrs.get("axis", -1)) % rank})

    def op_LayerNormalization(self, i, node):
        x, scale = node.inputs[:2]
        c = _shape(x)[-1]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        beta = _cval(bias) if bias is not None else np.zeros(c, np.float32)
        self.emit(node.name, "LayerNorm", [self.name(x), self.ir.fconst(scale.name, _cval(scale)),
                                           self.ir.fconst((bias.name if bias is not None else node.name + "_beta"), beta)],
                  [node.outputs[0].name], {"epsilon": float(node.attrs.get("epsilon", 1e-5))})

    def op_Transpose(self, i, node):
        perm = list(node.attrs["perm"])
        self._unary(node, "Reorder", {"src_perm": _s(range(len(perm))), "dst_perm": _s(perm)})

    def _reshape(self, node):
        self.emit(node.name, "Reshape", [self.name(node.inputs[0])], [node.outputs[0].name],
                  {"dst_shape": _reshape_attr(_shape(node.outputs[0]))})

    def op_Reshape(self, i, node):
        self._reshape(node)

    op_Unsqueeze = op_Squeeze = op_Flatten = op_Reshape

    def op_Expand(self, i, node):
        x, out = node.inputs[0], node.outputs[0]
        if _shape(x) == _shape(out):
            self.alias[out.name] = self.name(x)
            return
        zeros = self.ir.fconst(node.name + "_zeros", np.zeros(_shape(out), np.float32))
        self.emit(node.name, "BinaryOp", [self.name(x), zeros], [out.name], {"algorithm": "add"})

    def op_Identity(self, i, node):
        self.alias[node.outputs[0].name] = self.name(node.inputs[0])

    def op_Cast(self, i, node):
        # float graphs only: casts between float widths/ints of the same values are the identity here
        self.alias[node.outputs[0].name] = self.name(node.inputs[0])

    def op_Gather(self, i, node):
        # The engine's Gather(idx, src): ``axis`` is the index axis and must be idx's last one,
        # ``batch_dims`` is the source axis; out = idx.shape[:axis] + [idx.shape[axis]] + src.shape[src_axis+1:].
        # That is ONNX's Gather for source axis 0 (any index rank) or for a 1-D index (any source axis).
        data, idx = node.inputs
        src_axis = int(node.attrs.get("axis", 0)) % len(_shape(data))
        rank = len(_shape(idx))
        if rank == 0 or (src_axis != 0 and rank != 1):
            raise UnsupportedError(f"{node.name} (Gather): index rank {rank} on source axis {src_axis} "
                                   "has no Neural Engine Gather form")
        self.emit(node.name, "Gather", [self.name(idx), self.name(data)], [node.outputs[0].name],
                  {"axis": rank - 1, "batch_dims": src_axis})

    def op_Concat(self, i, node):
        rank = len(_shape(node.outputs[0]))
        self.emit(node.name, "Concat", [self.name(t) for t in node.inputs], [node.outputs[0].name],
                  {"axis": int(node.attrs["axis"]) % rank})

    def op_Slice(self, i, node):
        x = node.inputs[0]
        shape = _shape(x)
        starts, ends = _cval(node.inputs[1]), _cval(node.inputs[2])
        axes = _cval(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else np.arange(len(starts))
        steps = _cval(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else np.ones(len(starts), np.int64)
        axes = [int(a) % len(shape) for a in axes]
        st, en = [], []
        for s, e, a in zip(starts, ends, axes):
            dim = shape[a]
            s, e = int(s), int(e)
            s = max(0, min(dim, s + dim if s < 0 else s))
            e = max(0, min(dim, e + dim if e < 0 else e))
            st.append(s)
            en.append(e)
        self._unary(node, "Slice", {"starts": _s(st), "ends": _s(en), "axes": _s(axes), "steps": _s(steps)})

    def op_Resize(self, i, node):
        x = node.inputs[0]
        mode = node.attrs.get("mode", "nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        ins, outs = _shape(x), _shape(node.outputs[0])
        scales = [o // s for o, s in zip(outs, ins)]
        self._unary(node, "Resampling", {"scales": _s(scales), "algorithm": mode})

    def _reduce(self, node, typ):
        x = node.inputs[0]
        rank = len(_shape(x))
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
            axes = _cval(node.inputs[1]).tolist()
        axes = [int(a) % rank for a in (axes if axes is not None else range(rank))]
        self._unary(node, typ, {"axis": _s(axes), "keep_dims": bool(node.attrs.get("keepdims", 1))})

    def op_ReduceMean(self, i, node):
        self._reduce(node, "ReduceMean")

    def op_ReduceSum(self, i, node):
        self._reduce(node, "ReduceSum")

    # canonical ops with a native engine form
    def _attention(self, node, masked: bool):
        q, k, v = node.inputs[:3]
        scale = float(node.attrs.get("scale", 0.0)) or 1.0 / np.sqrt(_shape(q)[-1])
        scores, probs = self.ir.tmp(node.name + "_scores"), self.ir.tmp(node.name + "_probs")
        # Matmul: q [B,H,S,D] x k^T (src1_perm swaps the last two axes), scaled by output_scale
        self.emit(node.name + "_qk", "Matmul", [self.name(q), self.name(k)], [scores],
                  {"src1_perm": "0,1,3,2", "output_scale": scale, **self.odt()})
        if masked:
            added = self.ir.tmp(node.name + "_masked")
            same = _shape(node.inputs[3]) == _shape(q)[:3] + (_shape(k)[2],)
            self.emit(node.name + "_mask", "BinaryAdd" if same else "BinaryOp", [scores, self.name(node.inputs[3])],
                      [added], None if same else {"algorithm": "add"})
            scores = added
        self.emit(node.name + "_softmax", "Softmax", [scores], [probs], {"axis": 3})
        self.emit(node.name + "_pv", "Matmul", [probs, self.name(v)], [node.outputs[0].name], self.odt())

    def op_Attention(self, i, node):
        self._attention(node, False)

    def op_AttentionMasked(self, i, node):
        self._attention(node, True)

    def _group_norm(self, node, silu: bool):
        x, gamma, beta = node.inputs[:3]
        c = _shape(x)[1]
        attr = {"group": int(node.attrs["groups"]), "channels": c, "epsilon": float(node.attrs.get("epsilon", 1e-5))}
        if silu:
            attr.update(append_op="swish", swish_beta=1)
        self.emit(node.name, "GroupNorm", [self.name(x), self.ir.fconst(gamma.name, _cval(gamma).reshape(c)),
                                           self.ir.fconst(beta.name, _cval(beta).reshape(c))],
                  [node.outputs[0].name], attr)

    def op_GroupNorm(self, i, node):
        self._group_norm(node, False)

    def op_GroupNormSilu(self, i, node):
        self._group_norm(node, True)


def unsupported_nodes(model: Model) -> list[Problem]:
    """Nodes the emitter has no mapping for (after canonical ops are inlined where they have no native form)."""
    probs = []
    for n in model.graph.nodes:
        if n.domain == CANONICAL_DOMAIN:
            if n.op not in NATIVE_CANONICAL and (n.domain, n.op) not in model.functions:
                probs.append(Problem(n.name, f"{n.domain}::{n.op}", "canonical op without a body to inline"))
            continue
        if n.domain not in ("", None, "ai.onnx"):
            probs.append(Problem(n.name, f"{n.domain}::{n.op}", "no Neural Engine mapping for this domain"))
        elif n.op not in MAPPED_ONNX_OPS:
            hint = "GroupNorm patterns become the engine's GroupNorm via the gn pass" if n.op == "InstanceNormalization" else ""
            probs.append(Problem(n.name, n.op, f"no Neural Engine operator for {n.op} (the engine has no standalone Relu, Tanh, Where, ...)", hint))
        elif n.op == "Gemm" and not isinstance(n.inputs[1], gs.Constant):
            probs.append(Problem(n.name, n.op, "Gemm with a non-constant weight"))
        elif n.op == "Conv" and not isinstance(n.inputs[1], gs.Constant):
            probs.append(Problem(n.name, n.op, "Convolution with a non-constant weight"))
        elif n.op == "Gemm" and (float(n.attrs.get("alpha", 1.0)) != 1.0 or float(n.attrs.get("beta", 1.0)) != 1.0
                                 or int(n.attrs.get("transA", 0))):
            probs.append(Problem(n.name, n.op, "Gemm with alpha/beta != 1 or transA"))
        elif n.op in ("Reshape", "Slice", "Unsqueeze", "Squeeze") and any(
                not isinstance(t, gs.Constant) for t in n.inputs[1:] if t is not None and t.name):
            probs.append(Problem(n.name, n.op, "shape/index inputs are not constants (fold them at a static shape)"))
        elif n.op == "Resize" and static_shape(n.outputs[0]) is None:
            probs.append(Problem(n.name, n.op, "Resize output size unknown"))
        elif n.op == "Gelu" and n.attrs.get("approximate", "none") != "none":
            probs.append(Problem(n.name, n.op, "tanh-approximate Gelu (the engine's Erf operator is the exact GELU)"))
        elif n.op in ("Sin", "Cos") and (static_shape(n.inputs[0]) is None or int(np.prod(static_shape(n.inputs[0]))) % 8):
            probs.append(Problem(n.name, n.op, "the engine's CosSin handles sizes that are a multiple of 8 only"))
    first = next((n for n in model.graph.nodes if n.op == "Erf"), None)
    if first is not None:
        probs.append(Problem(first.name, "Erf", "the engine's Erf operator computes GELU(x), not erf(x); only "
                             "x·0.5·(1+erf(x/√2)) patterns (GELU, GEGLU) lower"))
    return probs


def emit_ir(model: Model, out_dir: Path, precision: str = "fp32") -> dict[str, Any]:
    """Write the engine IR (conf.yaml + model.bin) of a legalized, static-shaped model into ``out_dir``."""
    low = _Lowerer(model, precision)
    res = low.run()
    info = low.ir.write(Path(out_dir), res["outputs"])
    return {"ops": dict(sorted(low.counts.items())), "inputs": list(low.ir.inputs), "outputs": res["outputs"], **info}


# -- the target -------------------------------------------------------------------------------------
@register_target
class NeuralEngineTarget(Target):
    """Intel Neural Engine through sdgraph's own IR emitter.

    Cases handled:
    1. static shapes per bucket; shape subgraphs folded to constants;
    2. a text encoder's pooled output (ArgMax) is dropped when last_hidden_state lowers fully;
       Expand of an input is the identity or a BinaryOp add with zeros;
    3. MatMul with a constant weight -> InnerProduct (2-D, src1_perm 1,0, bias fused); other MatMul -> Matmul;
    4. Conv -> Convolution; Add -> BinaryAdd (equal shapes) or BinaryOp add (broadcast); Sub/Mul/Div -> BinaryOp;
       GELU chains -> Erf (the engine's Erf is GELU; a bare Erf is refused); Exp/Sigmoid/Sin/Cos/Pow/Sqrt;
    5. Softmax, LayerNormalization -> LayerNorm, Transpose -> Reorder, Reshape-family -> Reshape, Gather,
       Concat, Slice, Resize -> Resampling, ReduceMean/ReduceSum;
    6. canonical Attention(Masked) -> Matmul(output_scale, src1_perm) + Softmax + Matmul;
       GroupNorm(Silu) -> GroupNorm (append_op swish); other canonical ops inlined;
    7. bf16: weights as bf16, a Quantize(bf16) in front of each InnerProduct/Convolution, fp32 outputs;
       dynamic_int8 (the seed's "fp32 + dynamic int8"): InnerProduct/Convolution weights s8 per output
       channel (symmetric), a run-time Quantize of the activation in front (s8 per token for
       InnerProduct, u8 per tensor for Convolution), fp32 everywhere else;
    7b. a zero constant Pad feeding only Convolutions (the VAE encoder's downsampling) folds into their pads;
    8. run/bench through a worker subprocess in the engine's own environment (tools/setup_neural_engine.sh).
    """

    name = "neural-engine"
    summary = "Intel Neural Engine (ITREX 1.4.2) via sdgraph's conf.yaml + model.bin emitter; runtime in .venv-ne"
    extra = None
    capability = Capability(
        ops=None,
        canonical_ops=NATIVE_CANONICAL,
        dtypes=frozenset({"float32", "int64", "int32"}),
        precisions=("fp32", "bf16", "dynamic_int8"),
        static_shapes=True,
        devices=("cpu",),
    )
    options = ()

    def available(self) -> tuple[bool, str]:
        ok, why = neural_engine_status()
        return True, ("" if ok else f"IR is emitted; running it needs the engine runtime: {why}")

    def tool_versions(self) -> dict[str, str]:
        return {"neural_engine_ir": "itrex-1.4.2"}

    def check(self, model: Model, ctx: LowerContext) -> list[Problem]:
        probs = []
        if len(ctx.shapes) > 1:
            probs.append(Problem("model", "--shape", "one IR holds one static shape; got several buckets", "lower once per shape"))
        work = model.copy()
        try:
            _legalize(work, ctx)
        except UnsupportedError as exc:
            return probs + [Problem("model", "legalize", str(exc))]
        return probs + unsupported_nodes(work)

    def legalize(self, model: Model, ctx: LowerContext) -> None:
        self.stats = _legalize(model, ctx)
        probs = unsupported_nodes(model)
        if probs:
            raise UnsupportedError(f"{len(probs)} node(s) have no Neural Engine mapping: {probs[0]}", [str(p) for p in probs])

    def build(self, model: Model, out_dir: Path, ctx: LowerContext) -> dict[str, Any]:
        info = emit_ir(model, Path(out_dir), ctx.precision)
        feeds = {t.name: [int(d) for d in _shape(t)] for t in model.graph.inputs}
        dtypes = {t.name: str(np.dtype(t.dtype)) for t in model.graph.inputs}
        return {"format": "neural-engine-ir", "conf": "conf.yaml", "weights": "model.bin", "ir": info,
                "input_shapes": feeds, "input_dtypes": dtypes, "legalize": getattr(self, "stats", {}), "dynamic": False,
                "inputs": info["inputs"], "outputs": info["outputs"]}

    def load(self, artifact_dir: Path, entry: Mapping[str, Any], ctx: LowerContext):
        ok, why = neural_engine_status()
        if not ok:
            raise TargetUnavailable(f"Neural Engine runtime unavailable: {why}")
        return NeuralEngineRunner(Path(artifact_dir), entry)


def _fuse_gelu(model: Model) -> int:
    """x·0.5·(1+erf(x/√2)) (any order of the last two Muls) -> one standard ``Gelu`` node.

    The engine's ``Erf`` executor is the whole GELU, so a bare erf cannot be lowered; the exported
    GELU/GEGLU chains of SD UNets and OpenCLIP text encoders can.
    """
    b = GraphBuilder(model.graph)
    fused = 0
    for erf in [n for n in model.graph.nodes if n.op == "Erf"]:
        try:
            m = match_erf_gelu(erf)
        except Mismatch:
            continue
        inner = m.nodes[:-1]  # what the Gelu replaces must not be read from anywhere else
        if any(len(n.outputs[0].outputs) > 1 for n in inner) or any(o in model.graph.outputs for n in inner for o in n.outputs):
            continue
        for n in m.nodes:
            n.outputs.clear()
        b.op("Gelu", [m.g], name=erf.name + "_gelu", out=m.out)
        fused += 1
    if fused:
        model.graph.cleanup().toposort()
    return fused


def _fold_pads(model: Model) -> int:
    """A zero-valued constant ``Pad`` of the spatial axes whose outputs feed only ``Conv`` nodes becomes
    part of those convolutions' ``pads`` (the engine has no Pad operator; its Convolution takes
    asymmetric pads). The VAE encoder's downsampling (pad right/bottom by 1, stride 2) is one."""
    folded = 0
    for pad in [n for n in model.graph.nodes if n.op == "Pad"]:
        mode = pad.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads = _cval(pad.inputs[1]) if len(pad.inputs) > 1 else None
        value = _cval(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2].name else np.zeros(1)
        has_axes = len(pad.inputs) > 3 and pad.inputs[3].name
        users = pad.outputs[0].outputs
        if (mode != "constant" or pads is None or value is None or has_axes or np.any(value != 0)
                or pad.outputs[0] in model.graph.outputs or not users):
            continue
        pads = [int(v) for v in pads.ravel()]
        rank = len(pads) // 2
        if any(v < 0 for v in pads) or any(pads[i] or pads[i + rank] for i in range(2)):
            continue
        if not all(u.op == "Conv" and u.inputs[0] is pad.outputs[0] and u.attrs.get("auto_pad", "NOTSET") in
                   ("NOTSET", b"NOTSET") for u in users):
            continue
        extra = pads[2:rank] + pads[rank + 2:]
        for conv in list(users):
            nd = rank - 2
            old = list(conv.attrs.get("pads", [0] * 2 * nd))
            conv.attrs["pads"] = [a + b for a, b in zip(old, extra)]
            conv.inputs[0] = pad.inputs[0]
        pad.outputs.clear()
        folded += 1
    if folded:
        model.graph.cleanup().toposort()
    return folded


def _legalize(model: Model, ctx: LowerContext, fold: bool = True) -> dict[str, Any]:
    from sdgraph.targets.ascend import resolve_castlike, apply_static_shapes

    stats: dict[str, Any] = {}
    stats["inlined"] = inline_functions(model, keep={(CANONICAL_DOMAIN, n) for n in NATIVE_CANONICAL})
    apply_static_shapes(model, ctx)
    stats["castlike_resolved"] = resolve_castlike(model)
    if fold:
        from sdgraph.passes.base import create_pass

        # static shapes make masks and position tables constants: let them grow the model (up to 64 MiB)
        # (a few rounds: folding a Reshape's shape input makes the next Shape static)
        for rnd in range(6):
            res = create_pass("fold", named={"max_growth": 64 << 20})(model)
            stats[f"fold_{rnd}"] = dict(res.stats)
            if not res.modified or not any(n.op in ("Shape", "Size") for n in model.graph.nodes):
                break
        stats["gelu"] = _fuse_gelu(model)
        stats["pads_folded"] = _fold_pads(model)
        if any(n.op == "InstanceNormalization" for n in model.graph.nodes):
            # the exported GroupNorm pattern (Reshape-InstanceNormalization-Reshape-Mul-Add) -> engine GroupNorm
            stats["gn"] = dict(create_pass("gn")(model).stats)
    infer_shapes(model)
    model.graph.cleanup().toposort()
    stats["dropped_outputs"] = _drop_unmappable_outputs(model, ctx)
    # Constant nodes become constants, so handlers see values
    for n in list(model.graph.nodes):
        if n.op == "Constant" and "value" in n.attrs:
            n.outputs[0].to_constant(np.asarray(n.attrs["value"].values))
    model.graph.cleanup().toposort()
    return stats


def _drop_unmappable_outputs(model: Model, ctx: LowerContext) -> list[str]:
    """A text encoder's pooled output (ArgMax over the token ids) has no engine form: drop it when
    another output (last_hidden_state, what SD 1.x/2.x use) lowers fully. Recorded in the manifest."""
    # (SDXL's text_encoder_2 needs its pooled text_embeds: there the ArgMax stays a reported problem)
    if ctx.role != "text_encoder" or len(model.graph.outputs) < 2:
        return []
    bad = {p.node for p in unsupported_nodes(model)}
    if not bad:
        return []
    producers = {o.name: n for n in model.graph.nodes for o in n.outputs}

    def cone_has_bad(t) -> bool:
        seen, stack = set(), [t]
        while stack:
            x = stack.pop()
            n = producers.get(x.name)
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if n.name in bad:
                return True
            stack.extend(n.inputs)
        return False

    keep = [o for o in model.graph.outputs if not cone_has_bad(o)]
    dropped = [o.name for o in model.graph.outputs if o not in keep]
    if keep and dropped:
        log.warning("%s: dropping output(s) %s: they need ops the engine lacks", ctx.submodel, ", ".join(dropped))
        model.graph.outputs = keep
        model.graph.cleanup().toposort()
        return dropped
    return []


class NeuralEngineRunner:
    """Runs one IR in the engine's environment: a ne_worker.py subprocess that loads the model once."""

    def __init__(self, ir_dir: Path, entry: Mapping[str, Any]):
        self.dir = Path(ir_dir)
        self.input_names = list(entry.get("inputs", []))
        self.output_names = list(entry.get("outputs", []))
        self._proc: subprocess.Popen | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="sdgraph-ne-")
        self.load_s: float | None = None

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(_worker_cmd(str(ne_python()), str(self.dir), "--serve"), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
            hello = self._read()
            self.load_s = hello.get("load_s")
        return self._proc

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            err = (self._proc.stderr.read() or "").strip().splitlines()[-1:] or [f"exit {self._proc.wait()}"]
            raise PassError(f"Neural Engine worker stopped (exit {self._proc.poll()}): {err[0]}")
        return json.loads(line)

    def run(self, feeds: Mapping[str, np.ndarray], warmup: int = 0, iters: int = 1) -> tuple[dict[str, np.ndarray], list[float]]:
        """Outputs by name and the per-call seconds the engine took (after ``warmup`` calls)."""
        proc = self._start()
        src, dst = Path(self._tmp.name) / "in.npz", Path(self._tmp.name) / "out.npz"
        np.savez(src, **{n: np.ascontiguousarray(feeds[n]) for n in self.input_names})
        proc.stdin.write(json.dumps({"in": str(src), "out": str(dst), "warmup": warmup, "iters": iters,
                                     "inputs": self.input_names}) + "\n")
        proc.stdin.flush()
        reply = self._read()
        if not reply.get("ok"):
            raise PassError(f"Neural Engine worker failed: {reply.get('error', 'no reason given')}")
        with np.load(dst) as z:
            outs = {k: z[k] for k in z.files if not k.startswith("__")}
        return outs, list(reply.get("times", []))

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run(feeds)[0]

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None
        self._tmp.cleanup()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
