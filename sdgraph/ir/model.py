"""Model: one ONNX graph on onnx-graphsurgeon, with weights left on disk until needed."""

from __future__ import annotations

import collections
import copy as _copy
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from sdgraph._version import __version__
from sdgraph.errors import InputError
from sdgraph.ir import io

__all__ = ["Model", "ExternalValues", "detect_role", "structure_problem", "ROLES", "CANONICAL_DOMAIN"]

log = logging.getLogger(__name__)

CANONICAL_DOMAIN = "ai.sdgraph"
ROLES = ("unet", "text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder", "controlnet")


class ExternalValues(LazyValues):
    """LazyValues whose bytes live in an external-data file; read only when a pass asks."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: Path):
        super().__init__(tensor)
        self.base_dir = base_dir

    def load(self) -> np.ndarray:
        data = io.read_external(self.tensor, self.base_dir)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        return np.frombuffer(data, dtype=dtype).reshape(tuple(self.tensor.dims)).copy()


def _dims(t: gs.Tensor) -> list:
    return list(t.shape) if t.shape is not None else []


def detect_role(graph: gs.Graph) -> str:
    """Tell a UNet, a text encoder and the VAE halves apart from their inputs and outputs."""
    ins = {t.name: t for t in graph.inputs}
    outs = {t.name: t for t in graph.outputs}
    names_in = set(ins)
    if "controlnet_cond" in names_in:
        return "controlnet"
    if {"timestep", "encoder_hidden_states"} & names_in or "sample" in names_in and len(ins) >= 3:
        return "unet"
    if "input_ids" in names_in:
        return "text_encoder_2" if "text_embeds" in outs and len(outs) >= 2 and "pooler_output" not in outs else "text_encoder"
    if "latent_sample" in names_in:
        return "vae_decoder"
    if {"latent_sample", "latent", "latent_dist", "latent_parameters"} & set(outs):
        return "vae_encoder"
    # Fall back to shapes: image (3 channels) <-> latent (4 channels).
    if len(ins) == 1 and len(outs) == 1:
        i, o = _dims(next(iter(ins.values()))), _dims(next(iter(outs.values())))
        if len(i) == 4 and len(o) == 4:
            if i[1] == 3 and o[1] in (4, 8):
                return "vae_encoder"
            if i[1] == 4 and o[1] == 3:
                return "vae_decoder"
    ranks = sorted(len(_dims(t)) for t in ins.values())
    if len(ins) >= 3 and 4 in ranks and 3 in ranks:
        return "unet"
    if len(ins) == 1 and next(iter(ins.values())).dtype in (np.int64, np.int32):
        return "text_encoder"
    return "unknown"


def structure_problem(graph: gs.Graph, expected_outputs: list[str] | None = None, when: str = "") -> str | None:
    """What makes ``graph`` invalid, in one line (None: valid).

    Checks: acyclic, unique node names, one producer per tensor, every node input produced (or a
    graph input or constant), graph outputs produced, and the outputs equal ``expected_outputs``.
    """
    names = collections.Counter(n.name for n in graph.nodes if n.name)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        return f"duplicate node names: {', '.join(sorted(dup)[:5])}"
    graph_inputs = {t.name for t in graph.inputs}
    producers: collections.Counter = collections.Counter()
    for node in graph.nodes:
        for out in node.outputs:
            producers[out.name] += 1
    multi = [n for n, c in producers.items() if c > 1]
    if multi:
        return f"tensors with more than one producer: {', '.join(sorted(multi)[:5])}"
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) or t.name == "" or t.name in graph_inputs or t.name in producers:
                continue
            return f"node {node.name!r} ({node.op}) reads {t.name!r}, which nothing produces"
    from sdgraph.ir.topology import describe_nodes, find_cycle

    cycle = find_cycle(graph)
    if cycle:
        return f"graph is not a DAG{when}: cycle {describe_nodes(cycle)}"
    graph.toposort()
    outs = [t.name for t in graph.outputs]
    if expected_outputs is not None and outs != expected_outputs:
        return f"graph outputs changed: {expected_outputs} -> {outs}"
    for t in graph.outputs:
        if t.name not in producers and t.name not in graph_inputs and not isinstance(t, gs.Constant):
            return f"graph output {t.name!r} is not produced by any node"
    return None


class Model:
    """An ONNX model held as an onnx-graphsurgeon graph.

    Large weights stay in their external-data file (``ExternalValues``) until a pass reads them;
    saving streams them to the new location, so no protobuf over 2 GB is ever serialized.
    Canonical ``ai.sdgraph`` ops are model-local functions kept in ``functions``.
    """

    def __init__(
        self,
        graph: gs.Graph,
        *,
        opset_imports: dict[str, int] | None = None,
        ir_version: int = io.MAX_IR_VERSION,
        functions: dict[tuple[str, str], onnx.FunctionProto] | None = None,
        base_dir: Path | None = None,
        path: Path | None = None,
        producer: str = "sdgraph",
        metadata: dict[str, str] | None = None,
    ):
        self.graph = graph
        self.opset_imports = dict(opset_imports or {"": 17})
        self.ir_version = ir_version
        self.functions = dict(functions or {})
        self.base_dir = base_dir
        self.path = path
        self.producer = producer
        self.metadata = dict(metadata or {})

    # The attributes that make up a model (``assign`` copies exactly these).
    _STATE = ("graph", "opset_imports", "ir_version", "functions", "base_dir", "path", "producer", "metadata")

    def assign(self, other: "Model") -> "Model":
        """Replace this model's contents with ``other``'s, in place (the one way to swap a model).

        Used to roll back to a snapshot (the pass manager) and by rewrites that rebuild the model
        from a proto (onnxsim): holders of this Model object see the new graph.
        """
        for key in self._STATE:
            setattr(self, key, getattr(other, key))
        return self

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Model":
        proto, base = io.load_proto(path)
        m = cls.from_proto(proto, base_dir=base)
        m.path = io.resolve_model_file(path)
        problem = structure_problem(m.graph)
        if problem:
            raise InputError(f"{m.path}: invalid graph: {problem}")
        return m

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, base_dir: Path | None = None) -> "Model":
        functions = {(f.domain, f.name): f for f in proto.functions}
        stripped = onnx.ModelProto()
        stripped.CopyFrom(proto)
        del stripped.functions[:]
        try:
            graph = gs.import_onnx(stripped)
        except Exception as exc:
            raise InputError(f"cannot import the graph: {exc}".splitlines()[0]) from None
        if base_dir is not None:
            for t in _constants(graph):
                if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) and io.is_external(t._values.tensor):
                    t._values = ExternalValues(t._values.tensor, base_dir)
                    # Once a pass reads .values, gs swaps in the numpy array; the tensor must then
                    # export as ordinary data (write_proto moves it back out), not "external".
                    t.data_location = None
        opsets = {o.domain: o.version for o in proto.opset_import}
        return cls(
            graph,
            opset_imports=opsets,
            ir_version=proto.ir_version,
            functions=functions,
            base_dir=base_dir,
            producer=proto.producer_name,
            metadata={p.key: p.value for p in proto.metadata_props},
        )

    @classmethod
    def from_onnx_text(cls, text: str) -> "Model":
        """Build a model from ONNX textual syntax (tests and small graphs)."""
        return cls.from_proto(onnx.parser.parse_model(text))

    # -- properties -------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return self.opset_imports.get("", self.opset_imports.get("ai.onnx", 17))

    @property
    def role(self) -> str:
        return self.metadata.get("sdgraph.role") or detect_role(self.graph)

    @property
    def name(self) -> str:
        if self.path is not None:
            return self.path.parent.name if self.path.name == "model.onnx" else self.path.stem
        return self.graph.name or "model"

    def op_histogram(self) -> collections.Counter:
        return collections.Counter(_op_key(n) for n in self.graph.nodes)

    def num_nodes(self) -> int:
        return len(self.graph.nodes)

    def parameters(self) -> tuple[int, int]:
        """(parameter count, bytes) over constant tensors."""
        count = nbytes = 0
        for t in self.graph.tensors().values():
            if isinstance(t, gs.Constant):
                shape = t.shape if t.shape is not None else ()
                n = int(np.prod(shape)) if len(shape) else 1
                count += n
                nbytes += n * np.dtype(t.dtype).itemsize if t.dtype is not None else 0
        return count, nbytes

    def name_unnamed_nodes(self, prefix: str | None = None) -> int:
        """Give every unnamed node a unique name (``prefix_N``, or ``Op_N`` without a prefix)."""
        used = {n.name for n in self.graph.nodes if n.name}
        counter = named = 0
        for node in self.graph.nodes:
            if not node.name:
                stem = prefix or node.op
                while f"{stem}_{counter}" in used:
                    counter += 1
                node.name = f"{stem}_{counter}"
                used.add(node.name)
                named += 1
        return named

    # -- canonical functions ----------------------------------------------------------------
    def add_function(self, fn: onnx.FunctionProto) -> None:
        self.functions[(fn.domain, fn.name)] = fn
        self.opset_imports.setdefault(fn.domain, 1)
        for imp in fn.opset_import:
            if imp.domain not in self.opset_imports:
                self.opset_imports[imp.domain] = imp.version

    # -- export -----------------------------------------------------------------------------
    def to_proto(self) -> onnx.ModelProto:
        """The model as a ModelProto; large weights keep their external references."""
        self.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        proto = gs.export_onnx(self.graph, do_type_check=False)
        used = {(n.domain, n.op_type) for n in proto.graph.node}
        # Functions may call each other: keep the transitive closure of what the graph uses.
        changed = True
        while changed:
            changed = False
            for key, fn in self.functions.items():
                if key in used:
                    for n in fn.node:
                        k = (n.domain, n.op_type)
                        if k in self.functions and k not in used:
                            used.add(k)
                            changed = True
        fns = [fn for key, fn in self.functions.items() if key in used]
        del proto.opset_import[:]
        domains_used = {n.domain for n in proto.graph.node} | {"", *(fn.domain for fn in fns)}
        for fn in fns:
            domains_used |= {n.domain for n in fn.node}
        for domain, version in sorted(self.opset_imports.items()):
            if domain in domains_used or domain == "":
                proto.opset_import.add(domain=domain, version=version)
        proto.functions.extend(fns)
        proto.ir_version = min(max(self.ir_version, 8), io.MAX_IR_VERSION)
        proto.producer_name = "sdgraph"
        proto.producer_version = __version__
        for k, v in self.metadata.items():
            proto.metadata_props.add(key=k, value=v)
        return proto

    def save(self, out: str | os.PathLike, force: bool = False) -> Path:
        """Save atomically. ``out`` is a directory (gets ``model.onnx``) or a ``.onnx`` file path.

        An existing non-empty ``out`` is replaced only with ``force``; an ``out`` that is, holds or
        lies inside this model's own files is refused.
        """
        from sdgraph.ir import outputs

        out = Path(out)
        inputs = outputs.model_inputs(self.path) + self.external_files() if self.path is not None else self.external_files()
        outputs.guard_output(out, inputs, force=force)
        proto = self.to_proto()
        if out.suffix == ".onnx":
            with outputs.atomic_model_file(out, force=force, protect=inputs) as (graph, data_name):
                io.write_proto(proto, graph, self.base_dir, data_name=data_name)
            return out
        with outputs.atomic_dir(out, force=force) as tmp:
            io.write_proto(proto, tmp / "model.onnx", self.base_dir)
        return out / "model.onnx"

    def external_files(self) -> list[Path]:
        """The files this model's weights still live in (resolved), for guarding outputs against them."""
        files = set()
        if self.base_dir is None:
            return []
        for t in self.graph.tensors().values():
            if isinstance(t, gs.Constant):
                tensor = getattr(t._values, "tensor", None)
                if tensor is not None and io.is_external(tensor):
                    files.add(Path(os.path.realpath(self.base_dir / io.external_info(tensor)["location"])))
        return sorted(files)

    def save_to_dir_unchecked(self, directory: Path, filename: str = "model.onnx") -> Path:
        """Write into an existing (temporary) directory without the atomic rename dance."""
        proto = self.to_proto()
        io.write_proto(proto, directory / filename, self.base_dir)
        return directory / filename

    def copy(self) -> "Model":
        """A structural copy (weights are shared, they are never mutated in place)."""
        g = self.graph.copy()
        return Model(
            g,
            opset_imports=self.opset_imports,
            ir_version=self.ir_version,
            functions={k: _copy.deepcopy(v) for k, v in self.functions.items()},
            base_dir=self.base_dir,
            path=self.path,
            producer=self.producer,
            metadata=self.metadata,
        )

    def __repr__(self) -> str:
        return f"Model({self.name!r}, role={self.role}, nodes={self.num_nodes()}, opset={self.opset})"


def _constants(graph: gs.Graph):
    """Every constant of the graph and its subgraphs, node attributes (Constant values) included."""
    for g in _graphs(graph):
        yield from g.tensors().values()
        for node in g.nodes:
            for v in node.attrs.values():
                yield from (x for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, gs.Constant))


def _graphs(graph: gs.Graph):
    """The graph and every subgraph (If/Loop/Scan bodies), recursively."""
    yield graph
    for node in graph.nodes:
        for v in node.attrs.values():
            for g in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(g, gs.Graph):
                    yield from _graphs(g)


def _op_key(node: gs.Node) -> str:
    domain = node.domain or ""
    return node.op if domain in ("", "ai.onnx") else f"{domain}::{node.op}"
