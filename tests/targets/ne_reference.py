"""A numpy/torch reading of an emitted Neural Engine IR (conf.yaml + model.bin), for tests where the engine cannot run.

It executes each engine operator with the semantics sdgraph's emitter relies on (input order, perms,
attributes), so a wrong mapping (a swapped Gather, a missing transpose, a bad dst_shape, a bias on the
wrong axis) shows up as a numeric mismatch against ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

_DT = {"fp32": np.float32, "s32": np.int32, "bf16": np.uint16, "fp16": np.float16, "s8": np.int8, "u8": np.uint8}


def _ints(s) -> list[int]:
    return [int(x) for x in str(s).split(",") if x != ""]


def _bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def _trunc_bf16(a: np.ndarray) -> np.ndarray:
    return ((np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16) << 16).view(np.float32)


def _f(a: np.ndarray) -> np.ndarray:
    return _bf16_to_f32(a) if a.dtype == np.uint16 else a


def load(ir_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    conf = yaml.safe_load((Path(ir_dir) / "conf.yaml").read_text())
    blob = (Path(ir_dir) / "model.bin").read_bytes()
    consts = {}
    for name, spec in conf["model"]["operator"]["input_data"]["output"].items():
        if "location" in spec:
            off, n = spec["location"]
            consts[name] = np.frombuffer(blob[off:off + n], dtype=_DT[spec["dtype"]]).reshape(spec["shape"])
    return conf, consts


def run(ir_dir: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    conf, env = load(ir_dir)
    env = dict(env)
    for name, spec in conf["model"]["operator"]["input_data"]["output"].items():
        if "location" not in spec:
            env[name] = feeds[name].astype(_DT[spec["dtype"]])
    outputs = []
    for op in conf["model"]["operator"].values():
        typ, attr = op["type"], op.get("attr", {}) or {}
        if typ == "Input":
            continue
        ins = [env[i] for i in op.get("input", {})]
        if typ == "Output":
            outputs = list(op["input"])
            continue
        out = _OPS[typ](ins, attr)
        for o, v in zip(op["output"], out if isinstance(out, tuple) else (out,)):
            env[o] = v
    return {o: env[o] for o in outputs}


def _quantize(ins, attr):
    """bf16: truncation. s8/u8 (dynamic int8): three outputs (data, min, scale), as measured on the
    1.4.2 runtime: u8 per tensor, scale (max - min) / 255; s8 per token (row), scale max|row| / 127."""
    dt = attr.get("output_dtype")
    if dt == "bf16":
        return _trunc_bf16(ins[0])
    x = _f(ins[0]).astype(np.float32)
    if dt == "u8":
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        scale = np.float32((hi - lo) / 255.0 or 1.0)
        q = np.clip(np.round((x - lo) / scale), 0, 255).astype(np.uint8)
        return q, np.array([lo], np.float32), np.array([scale], np.float32)
    assert dt == "s8" and attr.get("per_token"), attr
    rows = x.reshape(-1, x.shape[-1])
    scale = np.abs(rows).max(axis=1) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.round(rows / scale[:, None]), -127, 127).astype(np.int8).reshape(x.shape)
    return q, rows.min(axis=1).astype(np.float32), scale


def _dequantized(ins):
    """(x, w, rest) of an InnerProduct/Convolution, dequantized when they are int8 (dynamic_int8:
    inputs x, w, [bias], x_min, x_scale, w_min, w_scale)."""
    x, w = ins[0], ins[1]
    if w.dtype != np.int8:
        return _f(x), _f(w), ins[2:]
    x_min, x_scale, _, w_scale = ins[-4:]
    if x.dtype == np.uint8:
        xf = x.astype(np.float32) * x_scale[0] + x_min[0]
    else:  # s8 per token: one scale per row
        xf = (x.reshape(-1, x.shape[-1]).astype(np.float32) * x_scale[:, None]).reshape(x.shape)
    return xf, w.astype(np.float32) * w_scale, ins[2:-4]


def _inner_product(ins, attr):
    perm = _ints(attr.get("src1_perm", "1,0"))
    if ins[1].dtype == np.int8 and perm == [0, 1]:  # w [N, K]: its per-channel scale runs along axis 0
        ins = list(ins)
        ins[-1] = ins[-1].reshape(-1, 1)
    x, w, rest = _dequantized(ins)
    y = x @ w if perm == [1, 0] else x @ w.T  # [1,0]: w is [K, N]; [0,1]: w is [N, K]
    if len(rest):
        y = y + _f(rest[0])
    return y.astype(np.float32)


def _matmul(ins, attr):
    a, b = _f(ins[0]), _f(ins[1])
    if "src0_perm" in attr:
        a = a.transpose(_ints(attr["src0_perm"]))
    if "src1_perm" in attr:
        b = b.transpose(_ints(attr["src1_perm"]))
    y = np.matmul(a, b) * float(attr.get("output_scale", 1.0))
    if "dst_perm" in attr:
        y = y.transpose(_ints(attr["dst_perm"]))
    return y.astype(np.float32)


def _conv(ins, attr):
    xf, wf, rest = _dequantized(ins)
    x, w = torch.from_numpy(np.ascontiguousarray(xf, np.float32)), torch.from_numpy(np.ascontiguousarray(wf, np.float32))
    b = torch.from_numpy(_f(rest[0]).copy()) if len(rest) else None
    # the engine's pads are (begin, end) per spatial axis (measured on 1.4.2), not ONNX's [begins, ends]
    pads = _ints(attr.get("pads", "0,0,0,0"))
    nd = w.ndim - 2
    begin, end = pads[0::2], pads[1::2]
    if begin != end:
        x = F.pad(x, [p for i in reversed(range(nd)) for p in (begin[i], end[i])])
        pad = 0
    else:
        pad = begin
    y = F.conv2d(x, w, b, stride=_ints(attr.get("strides", "1,1")), padding=pad,
                 dilation=_ints(attr.get("dilations", "1,1")), groups=int(attr.get("group", 1)))
    return y.numpy()


def _cos_sin(ins, attr):
    # cossin.cpp: 8 floats per AVX2 step and no tail ("Tail should equals 0"); output dtype from output_dtype
    assert ins[0].size % 8 == 0 and attr.get("output_dtype") == "fp32"
    return (np.sin if attr["algorithm"] == "sin" else np.cos)(ins[0]).astype(np.float32)


def _binary_add(ins, attr):
    # the real engine's BinaryAdd refuses broadcasting (oneDNN: no primitive descriptor); BinaryOp broadcasts
    assert ins[0].shape == ins[1].shape, f"BinaryAdd of {ins[0].shape} and {ins[1].shape}: shapes must be equal"
    return (_f(ins[0]) + _f(ins[1])).astype(np.float32)


def _binary_op(ins, attr):
    a, b = _f(ins[0]), _f(ins[1])
    return {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[attr["algorithm"]](a, b).astype(np.float32)


def _layer_norm(ins, attr):
    x = torch.from_numpy(ins[0].copy())
    return F.layer_norm(x, x.shape[-1:], torch.from_numpy(ins[1].copy()), torch.from_numpy(ins[2].copy()),
                        float(attr["epsilon"])).numpy()


def _group_norm(ins, attr):
    x = torch.from_numpy(ins[0].copy())
    y = F.group_norm(x, int(attr["group"]), torch.from_numpy(ins[1].copy()), torch.from_numpy(ins[2].copy()),
                     float(attr["epsilon"]))
    if attr.get("append_op") == "swish":
        y = y * torch.sigmoid(float(attr.get("swish_beta", 1)) * y)
    return y.numpy()


def _reshape(ins, attr):
    return ins[0].reshape(_ints(attr["dst_shape"]))


def _reorder(ins, attr):
    src, dst = _ints(attr["src_perm"]), _ints(attr["dst_perm"])
    assert src == list(range(len(src)))
    return np.ascontiguousarray(ins[0].transpose(dst))


def _gather(ins, attr):
    # the engine's Gather(indices, data): ``axis`` is the index axis (must be idx's last), ``batch_dims``
    # the source axis; gather.cpp: out = idx.shape[:axis] + [idx.shape[axis]] + src.shape[src_axis + 1:]
    idx, data = ins
    idx_axis, src_axis = int(attr["axis"]), int(attr.get("batch_dims", 0))
    assert idx_axis == idx.ndim - 1, "Gather: axis must be the last index axis"
    assert src_axis == 0 or idx.ndim == 1, "Gather: a source axis other than 0 needs a 1-D index"
    return np.take(_f(data), idx.astype(np.int64), axis=src_axis)


def _slice(ins, attr):
    x = ins[0]
    sl = [slice(None)] * x.ndim
    for s, e, a, st in zip(_ints(attr["starts"]), _ints(attr["ends"]), _ints(attr["axes"]), _ints(attr["steps"])):
        sl[a] = slice(s, e, st)
    return x[tuple(sl)]


def _resampling(ins, attr):
    assert attr.get("algorithm", "nearest") == "nearest"
    y = ins[0]
    for axis, s in enumerate(_ints(attr["scales"])):
        if s != 1:
            y = np.repeat(y, s, axis=axis)
    return y


def _reduce(fn):
    def go(ins, attr):
        return fn(ins[0], axis=tuple(_ints(attr["axis"])), keepdims=bool(attr.get("keep_dims", True)))
    return go


def _softmax(ins, attr):
    return torch.softmax(torch.from_numpy(ins[0].copy()), dim=int(attr.get("axis", -1))).numpy()


_OPS = {
    "InnerProduct": _inner_product,
    "Matmul": _matmul,
    "Convolution": _conv,
    "BinaryAdd": _binary_add,
    "BinaryOp": _binary_op,
    "Softmax": _softmax,
    "LayerNorm": _layer_norm,
    "GroupNorm": _group_norm,
    "Reshape": _reshape,
    "Reorder": _reorder,
    "Gather": _gather,
    "Concat": lambda ins, attr: np.concatenate(ins, axis=int(attr["axis"])),
    "Slice": _slice,
    # the runtime's Erf executor is the exact GELU x·Φ(x) (measured on ITREX 1.4.2), not erf
    "Erf": lambda ins, attr: F.gelu(torch.from_numpy(ins[0].copy())).numpy(),
    "Exp": lambda ins, attr: np.exp(ins[0]),
    "Sigmoid": lambda ins, attr: (1.0 / (1.0 + np.exp(-ins[0]))).astype(np.float32),
    "Pow": lambda ins, attr: np.power(ins[0], ins[1]).astype(np.float32),
    "CosSin": _cos_sin,
    "Resampling": _resampling,
    "ReduceMean": _reduce(np.mean),
    "ReduceSum": _reduce(np.sum),
    "Quantize": _quantize,
}
