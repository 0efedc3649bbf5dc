"""The ``openvino`` target: OpenVINO IR (.xml/.bin) through openvino's converter, compiled and checked on CPU."""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from sdgraph.errors import InputError, UnsupportedError
from sdgraph.ir.canonical import inline_functions
from sdgraph.ir.model import CANONICAL_DOMAIN, Model
from sdgraph.passes.base import Option
from sdgraph.targets._ov_native import NATIVE_OPS, NATIVE_OV_TYPES, extensions
from sdgraph.targets.base import Capability, LowerContext, Problem, Target, register_target

__all__ = ["OpenVinoTarget", "OpenVinoRunner", "ov_has_rule"]

log = logging.getLogger(__name__)

# precision -> (inference precision hint, compress weights to fp16 on save)
_PRECISION = {"fp32": ("f32", False), "bf16": ("bf16", False), "fp16": ("f32", True), "int8": ("f32", False)}
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@functools.lru_cache(maxsize=None)
def ov_has_rule(domain: str, op: str, opset: int, n_in: int, n_out: int) -> tuple[bool, str]:
    """Whether OpenVINO's ONNX frontend has a conversion rule for this op (probed on a one-node graph)."""
    import openvino as ov

    ins = [onnx.helper.make_tensor_value_info(f"i{k}", onnx.TensorProto.FLOAT, None) for k in range(n_in)]
    outs = [onnx.helper.make_tensor_value_info(f"o{k}", onnx.TensorProto.FLOAT, None) for k in range(n_out)]
    node = onnx.helper.make_node(op, [f"i{k}" for k in range(n_in)], [f"o{k}" for k in range(n_out)], domain=domain)
    imports = [onnx.helper.make_opsetid("", opset)] + ([onnx.helper.make_opsetid(domain, 1)] if domain else [])
    proto = onnx.helper.make_model(onnx.helper.make_graph([node], "probe", ins, outs), opset_imports=imports)
    proto.ir_version = 8
    with tempfile.TemporaryDirectory(prefix="sdgraph-ovprobe-") as d:
        f = Path(d) / "p.onnx"
        onnx.save(proto, str(f))
        try:
            fe = ov.frontend.FrontEndManager().load_by_framework("onnx")  # ~1000x cheaper than convert_model
            fe.convert(fe.load(str(f)))
        except Exception as exc:  # a rule that needs constant inputs still counts as a rule
            msg = str(exc)
            if "No conversion rule found" in msg:
                return False, "no conversion rule in OpenVINO's ONNX frontend"
    return True, ""


class OpenVinoRunner:
    """A compiled OpenVINO model per shape bucket (imported from the exported blob when present)."""

    def __init__(self, core, artifact_dir: Path, entry: Mapping[str, Any], config: dict[str, str], dynamic_ok: bool):
        from sdgraph.targets.driver import bucket_for

        self._bucket_for = bucket_for
        self.core, self.dir, self.entry, self.config = core, artifact_dir, entry, config
        self.buckets = [dict(b) for b in entry.get("shapes", [])]
        self.blobs = list(entry.get("blobs", []))
        self.dynamic_ok = dynamic_ok
        self.input_names = list(entry["inputs"])
        self.output_names = list(entry["outputs"])
        self._compiled: dict[Any, Any] = {}
        self._model = None
        # compile the first (or only) variant now: a load is ready to run
        compiled, _ = self._get(0 if self.buckets else None)
        # input shapes/dtypes from the artifact itself (the pipeline needs static dims, e.g. the UNet's
        # batch, to split the guidance batch): it must not depend on the source model dir still existing
        self.input_shapes, self.input_dtypes = {}, {}
        for i, port in enumerate(compiled.inputs if not self.buckets else self._read().inputs):
            names = port.get_names()  # OpenVINO may merge a graph input's name with an inner tensor's
            name = next((n for n in self.input_names if n in names), None) or self.input_names[i]
            self.input_shapes[name] = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
            self.input_dtypes[name] = np.dtype(port.get_element_type().to_dtype())

    def _read(self):
        if self._model is None:
            self._model = self.core.read_model(str(self.dir / self.entry["xml"]))
        return self._model

    def _get(self, idx):
        if idx in self._compiled:
            return self._compiled[idx]
        blob = self.blobs[idx if idx is not None else 0] if self.blobs and (idx is not None or not self.buckets) else None
        if blob and (self.dir / blob).is_file():
            config = dict(self.config)
            if self.entry.get("weightless"):  # the blob holds no weights: they are read from model.bin
                config.update(CACHE_MODE="OPTIMIZE_SIZE", WEIGHTS_PATH=str(self.dir / self.entry.get("bin", "model.bin")))
            with open(self.dir / blob, "rb") as f:
                compiled = self.core.import_model(f.read(), "CPU", config)
        else:
            model = self._read()
            if idx is not None:
                model = model.clone()
                model.reshape({k: list(v) for k, v in self.buckets[idx].items()})
            compiled = self.core.compile_model(model, "CPU", self.config)
        self._compiled[idx] = (compiled, compiled.create_infer_request())
        return self._compiled[idx]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        idx = self._bucket_for(feeds, self.buckets) if self.buckets else None
        if self.buckets and idx is None:
            idx = "dynamic"
            if idx not in self._compiled:
                self._compiled[idx] = None
                compiled = self.core.compile_model(self._read(), "CPU", self.config)
                self._compiled[idx] = (compiled, compiled.create_infer_request())
        compiled, req = self._get(idx)
        res = req.infer({k: np.ascontiguousarray(feeds[k]) for k in self.input_names})
        return {name: np.array(res[compiled.output(name)]) for name in self.output_names}


@register_target
class OpenVinoTarget(Target):
    """OpenVINO on CPU.

    1. check: every node's op has a conversion rule in OpenVINO's ONNX frontend (probed per op).
    2. legalize: canonical Attention/GroupNorm/GeGLU stay (``native=true``, the default) and become
       OpenVINO's own ScaledDotProductAttention / GroupNormalization / Gelu through ONNX-frontend
       conversion extensions (``sdgraph.targets._ov_native``); every other model-local function is
       inlined (the frontend has no rule for them: "No conversion rule found for operations: ai.sdgraph.*").
    3. build: ``openvino.convert_model`` -> ``model.xml``/``model.bin`` (fp16 weight compression for
       precision fp16; QDQ graphs become FakeQuantize and run int8), compiled on CPU with an explicit
       INFERENCE_PRECISION_HINT (this CPU's default is bf16), exported as a blob per shape bucket.
    4. load: imports the blob (no recompilation) or compiles the IR. Blobs are weightless by default
       (OpenVINO's ``CACHE_MODE=OPTIMIZE_SIZE``): the weights stay in ``model.bin`` alone and are read
       from it at import, so a refit of float weights rewrites ``model.bin`` and keeps the blobs.
    """

    name = "openvino"
    summary = "OpenVINO IR (.xml/.bin) compiled for CPU; fp32/bf16 by hint, fp16 weights, int8 from QDQ"
    extra = "openvino"
    capability = Capability(
        ops=None,  # probed per op against OpenVINO's ONNX frontend
        canonical_ops=NATIVE_OPS,  # with native=true (the default)
        dtypes=frozenset({"float32", "float16", "int64", "int32", "int8", "uint8", "bool"}),
        precisions=("fp32", "bf16", "fp16", "int8"),
        static_shapes=False,
    )
    options = (
        Option("threads", int, 0, "INFERENCE_NUM_THREADS (0: OpenVINO's default)", min=0),
        Option("hint", str, "auto", "PERFORMANCE_HINT", choices=("auto", "latency", "throughput")),
        Option("blob", bool, True, "export the compiled model per shape bucket for fast loading"),
        Option("weightless", bool, True, "blobs without the weights, which are read from model.bin at load "
               "(a fraction of the disk; sdgraph refit then rewrites model.bin only, no recompilation)"),
        Option("dynamic", bool, False, "with shape buckets, run undeclared shapes on a dynamic compile instead of failing"),
        Option("native", bool, True, "canonical Attention/GroupNorm/GeGLU as OpenVINO's ScaledDotProductAttention/"
               "GroupNormalization/Gelu (false: inline their function bodies)"),
        Option("precise_native", bool, False, "under a recorded bf16 mode, also run the natively lowered canonical ops "
               "(SDPA, GroupNormalization, GeGLU) that the pass keeps for their op type in f32 (default: left to "
               "OpenVINO's bf16 kernels, which accumulate in f32: same outputs, fewer Reorders); names in keep= always are"),
    )

    def available(self) -> tuple[bool, str]:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False, "openvino is not installed"
        return True, ""

    def precision_native(self, precision: str) -> tuple[bool, str]:
        if precision != "bf16":
            return True, ""
        import openvino as ov

        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" in caps:
            return True, ""
        return False, f"this CPU has no bf16 kernels (OPTIMIZATION_CAPABILITIES: {', '.join(caps)}); bf16 would run f32"

    def tool_versions(self) -> dict[str, str]:
        import openvino as ov

        return {"openvino": ov.get_version()}

    def check(self, model: Model, ctx: LowerContext) -> list[Problem]:
        problems = []
        for n in model.graph.nodes:
            d = n.domain or ""
            if (d, n.op) in model.functions or (d == CANONICAL_DOMAIN and self._native(ctx, n.op)):
                continue  # inlined in legalize, or converted natively
            ok, why = ov_has_rule("" if d == "ai.onnx" else d, n.op, model.opset if d in ("", "ai.onnx") else 1,
                                  len(n.inputs), len(n.outputs))
            if not ok:
                problems.append(Problem(n.name, n.op if d in ("", "ai.onnx") else f"{d}::{n.op}", why,
                                        "try --target ort, or a pass that rewrites it to standard ops"))
        if ctx.precision == "int8" and not any(n.op in _QDQ for n in model.graph.nodes):
            problems.append(Problem(model.name, "graph", "precision int8 needs a quantized (QDQ) graph",
                                    "run the qdq pass first (sdgraph optimize --passes qdq)"))
        return problems

    @staticmethod
    def _native(ctx: LowerContext, op: str) -> bool:
        return bool(ctx.options.get("native", True)) and op in NATIVE_OPS

    def supports_precision_mode(self, precision: str) -> bool:
        return precision == "bf16"  # INFERENCE_PRECISION_HINT=bf16, keep list as per-layer "precise" rt_info

    def legalize(self, model: Model, ctx: LowerContext) -> None:
        if ctx.options.get("native", True):
            inline_functions(model, keep={(CANONICAL_DOMAIN, op) for op in NATIVE_OPS})
        else:
            inline_functions(model)

    def _config(self, ctx: LowerContext, precision: str) -> dict[str, str]:
        cfg = {"INFERENCE_PRECISION_HINT": _PRECISION[precision][0]}
        if ctx.options.get("threads"):
            cfg["INFERENCE_NUM_THREADS"] = str(int(ctx.options["threads"]))
        if ctx.options.get("hint", "auto") != "auto":
            cfg["PERFORMANCE_HINT"] = ctx.options["hint"].upper()
        return cfg

    def build(self, model: Model, out_dir: Path, ctx: LowerContext) -> dict[str, Any]:
        import openvino as ov

        with tempfile.TemporaryDirectory(prefix="sdgraph-ov-", dir=out_dir.parent) as d:
            f = model.save_to_dir_unchecked(Path(d))
            try:
                native = {n.op: 0 for n in model.graph.nodes if n.domain == CANONICAL_DOMAIN and self._native(ctx, n.op)}
                for n in model.graph.nodes:
                    if n.op in native and n.domain == CANONICAL_DOMAIN:
                        native[n.op] += 1
                ov_model = ov.convert_model(str(f), extension=extensions() if native else None)
            except Exception as exc:
                raise InputError(f"{ctx.submodel}: OpenVINO could not convert the graph: {_first(exc)}") from None
        compress = _PRECISION[ctx.precision][1]
        keep = ctx.precision_keep
        if keep is not None and not ctx.options.get("precise_native", False):
            lowered = {n.name for n in model.graph.nodes if n.domain == CANONICAL_DOMAIN and self._native(ctx, n.op)}
            keep = tuple(k for k in keep if k not in lowered or k in ctx.precision_named)
        precise = _keep_layers(ov_model, model, keep) if keep is not None else set()
        ov.save_model(ov_model, str(out_dir / "model.xml"), compress_to_fp16=compress)
        if precise:
            _mark_precise(out_dir / "model.xml", precise)
        config = self._config(ctx, ctx.precision)
        core = ov.Core()
        entry: dict[str, Any] = {"xml": "model.xml", "bin": "model.bin", "config": config, "compress_to_fp16": compress,
                                 "dynamic": not ctx.shapes or bool(ctx.options.get("dynamic")),
                                 "inputs": [t.name for t in model.graph.inputs],  # OV ports answer to every tensor name
                                 "outputs": [t.name for t in model.graph.outputs], "blobs": [],
                                 "precision_mode": None if ctx.precision_keep is None else {
                                     "precision": ctx.precision, "kept_nodes": len(keep),
                                     "precise_layers": len(precise)},
                                 "native": {op: {"count": c, "openvino_op": NATIVE_OV_TYPES[op]} for op, c in sorted(native.items())}}
        self._compile_and_export(core, out_dir, entry, config, ctx)
        return entry

    def _compile_and_export(self, core, out_dir: Path, entry: dict[str, Any], config: dict[str, str], ctx: LowerContext) -> None:
        """Compile the saved IR per shape bucket (the check), export each compiled model as a blob."""
        entry["blobs"] = []
        variants = [None] if not ctx.shapes else list(range(len(ctx.shapes)))
        saved = core.read_model(str(out_dir / "model.xml"))
        for i in variants:
            m = saved
            if i is not None:
                m = saved.clone()
                m.reshape({k: list(v) for k, v in ctx.shapes[i].items()})
            weightless = bool(ctx.options.get("weightless", True)) and bool(ctx.options.get("blob", True))
            try:
                compiled = core.compile_model(m, "CPU", {**config, **({"CACHE_MODE": "OPTIMIZE_SIZE"} if weightless else {})})
            except Exception as exc:
                raise InputError(f"{ctx.submodel}: OpenVINO cannot compile it on CPU: {_first(exc)}") from None
            effective = str(compiled.get_property("INFERENCE_PRECISION_HINT")).replace("<Type: '", "").rstrip("'>")
            entry["effective_precision"] = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(effective, effective)
            if entry["effective_precision"] != config["INFERENCE_PRECISION_HINT"]:
                log.warning("%s: OpenVINO compiled with %s, not the requested %s (this CPU lacks it)",
                            ctx.submodel, entry["effective_precision"], config["INFERENCE_PRECISION_HINT"])
            if ctx.options.get("blob", True):
                name = "model.blob" if i is None else f"model.{i}.blob"
                with open(out_dir / name, "wb") as fh:
                    blob = compiled.export_model()
                    fh.write(blob.getvalue() if hasattr(blob, "getvalue") else blob)
                entry["blobs"].append(name)
                entry["weightless"] = weightless

    def refit(self, sub_dir: Path, entry: Mapping[str, Any], changes, ctx: LowerContext) -> dict[str, Any]:
        """Each changed weight is found among the IR's Const layers by its bytes (as stored, transposed, or
        compressed to f16) and overwritten in ``model.bin`` in the same layout. Weightless blobs stay valid
        when every overwritten Const feeds a MatMul/Convolution (directly or through its f16 Convert): OpenVINO
        reads those from ``model.bin`` at import. Otherwise (an INT8 weight, whose dequantization OpenVINO
        folds into the blob; blobs with weights) the blobs are compiled and exported again."""
        import mmap
        import xml.etree.ElementTree as ET

        import openvino as ov

        xml, binf = sub_dir / entry.get("xml", "model.xml"), sub_dir / entry.get("bin", "model.bin")
        root = ET.parse(xml).getroot()
        consts: dict[int, list[tuple[int, int, str]]] = {}
        types: dict[str, str] = {}
        for layer in root.iter("layer"):
            types[layer.get("id")] = layer.get("type")
            if layer.get("type") == "Const":
                data = layer.find("data")
                if data is not None and data.get("offset") is not None:
                    size = int(data.get("size"))
                    consts.setdefault(size, []).append((int(data.get("offset")), size, layer.get("id")))
        missed, patched = [], set()
        with open(binf, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            heads: dict[tuple[int, bytes], list[tuple[int, int, str]]] = {}  # (size, first 64 bytes) -> Consts
            for size, cs in consts.items():
                for off, sz, lid in cs:
                    heads.setdefault((size, mm[off:off + 64]), []).append((off, sz, lid))
            for name, (cur, new) in changes.items():
                layouts = [(cur, new)] + ([(cur.T, new.T)] if cur.ndim == 2 else [])
                if entry.get("compress_to_fp16"):
                    layouts += [(a.astype(np.float16), b.astype(np.float16)) for a, b in layouts if a.dtype == np.float32]
                done = 0
                for a, b in layouts:
                    want = np.ascontiguousarray(a).tobytes()
                    for off, size, lid in heads.get((len(want), want[:64]), []):
                        if mm[off:off + size] == want:
                            mm[off:off + size] = np.ascontiguousarray(b).tobytes()
                            patched.add(lid)
                            done += 1
                if not done:
                    missed.append(name)
            mm.flush()
        if missed:
            raise UnsupportedError(f"{sub_dir}: OpenVINO transformed {len(missed)} weight(s) such as {missed[0]!r} while "
                                   "converting (no Const holds their bytes): lower the LoRA-fused model instead")
        out = dict(entry)
        if entry.get("weightless") and entry.get("blobs") and _read_at_import(root, types, patched):
            return {"refit": {"tensors": len(changes), "blobs": "kept (weightless: read from model.bin at load)"}}
        self._compile_and_export(ov.Core(), sub_dir, out, dict(entry.get("config", {})), ctx)
        return {"blobs": out["blobs"], "weightless": out.get("weightless", False),
                "refit": {"tensors": len(changes), "blobs": "compiled again"}}

    def load(self, artifact_dir: Path, entry: Mapping[str, Any], ctx: LowerContext) -> OpenVinoRunner:
        import openvino as ov

        try:
            return OpenVinoRunner(ov.Core(), artifact_dir, entry, dict(entry.get("config", {})), bool(entry.get("dynamic")))
        except Exception as exc:
            raise InputError(f"{artifact_dir}: corrupted artifact, OpenVINO cannot load it: {_first(exc)}") from None


_WEIGHT_CONSUMERS = frozenset({"MatMul", "Convolution", "GroupConvolution"})


def _read_at_import(root, types: Mapping[str, str], const_ids: set[str]) -> bool:
    """Whether every Const in ``const_ids`` feeds only MatMul/Convolution layers (directly, or through the
    Convert of an f16-compressed weight): the weights a weightless blob reads from ``model.bin`` at import as
    they are there. Anything else (a dequantizing Subtract/Multiply of an INT8 weight) may be folded into
    the blob at compile time."""
    consumers: dict[str, list[str]] = {}
    for edge in root.iter("edge"):
        consumers.setdefault(edge.get("from-layer"), []).append(edge.get("to-layer"))

    def ok(lid: str, depth: int = 0) -> bool:
        users = consumers.get(lid, [])
        return bool(users) and all(types.get(u) in _WEIGHT_CONSUMERS or (types.get(u) == "Convert" and depth == 0 and ok(u, 1))
                                   for u in users)

    return all(ok(c) for c in const_ids)


def _first(exc: Exception) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip() and not ln.startswith(("Check ", "FrontEnd API"))]
    return lines[0] if lines else type(exc).__name__


def _keep_layers(ov_model, model: Model, keep) -> set[str]:
    """OpenVINO layer names that implement the ONNX nodes in ``keep``.

    The ONNX frontend names a node's ops after the node (or, for a graph output, its tensor) and
    gives the op that produces a node output that tensor's name; the ops of a decomposition in
    between carry no tensor name. So: the op producing a kept node's output, plus its producers
    upward while they have no tensor name of their own (Constants and Parameters excepted).
    """
    keep = set(keep)
    outs = {o.name for n in model.graph.nodes if n.name in keep for o in n.outputs}
    marked: set[str] = set()
    stack = []
    for op in ov_model.get_ordered_ops():
        name = op.get_friendly_name()
        if op.get_type_name() in ("Parameter", "Constant", "Result"):
            continue
        if name in keep or name.split("/")[0] in keep or any(o.get_names() & outs for o in op.outputs()):
            stack.append(op)
    while stack:
        op = stack.pop()
        if op.get_friendly_name() in marked:
            continue
        marked.add(op.get_friendly_name())
        for inp in op.inputs():
            src = inp.get_source_output().get_node()
            if src.get_type_name() not in ("Parameter", "Constant") and not inp.get_source_output().get_names():
                stack.append(src)
    return marked


def _mark_precise(xml: Path, layers: set[str]) -> None:
    """Add OpenVINO's ``precise`` rt_info (``ov::disable_fp16_compression``) to these layers of the IR:
    the CPU plugin then runs them in f32 under a bf16 inference precision. (Python cannot make this
    typed rt_info attribute; the IR reader builds it from the serialized form.)"""
    import xml.etree.ElementTree as ET

    tree = ET.parse(xml)
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") in layers:
            rt = layer.find("rt_info")
            if rt is None:
                rt = ET.SubElement(layer, "rt_info")
            if not any(a.get("name") == "precise" for a in rt.iter("attribute")):
                ET.SubElement(rt, "attribute", name="precise", version="0")
    tree.write(xml, encoding="utf-8", xml_declaration=True)
