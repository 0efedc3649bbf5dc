"""What stays in float and what gets quantized.

The seeds' ignored scope (conv_in, conv_out, time embedding, first shortcut conv), found from the
graph's structure with diffusers' names as fallback, serves qdq and the fp16/bf16 passes alike;
user names add to it; the Conv/Gemm/MatMul layers outside it are quantized.
"""

from __future__ import annotations

from typing import Iterable

import onnx_graphsurgeon as gs

from sdgraph.errors import UsageError

__all__ = ["QUANT_OPS", "reachable_from", "time_embedding_nodes", "default_scope", "match_names", "resolve_scope",
           "quantized_nodes", "activation_matmuls", "watched_tensors"]

QUANT_OPS = ("Conv", "Gemm", "MatMul")
_TIME_INPUTS = ("timestep", "time_ids", "text_embeds", "timestep_cond")

# Name fragments used when the structural search finds nothing (diffusers' module names).
_NAME_FALLBACK = {
    "unet": ("conv_in", "conv_out", "time_embedding", "time_emb_proj", "down_blocks.1.resnets.0.conv_shortcut"),
    "vae_decoder": ("post_quant_conv", "decoder.conv_in", "decoder.conv_out"),
    "vae_encoder": ("encoder.conv_in", "encoder.conv_out", "quant_conv"),
}


def reachable_from(graph: gs.Graph, names: Iterable[str]) -> set[int]:
    """ids of the nodes that depend (transitively) on any of the tensors ``names``."""
    names = set(names)
    seen: set[int] = set()
    for node in graph.toposort().nodes:
        if any((t.name in names) or (t.inputs and id(t.inputs[0]) in seen) for t in node.inputs if isinstance(t, gs.Variable)):
            seen.add(id(node))
    return seen


def time_embedding_nodes(graph: gs.Graph) -> list[gs.Node]:
    """UNet nodes that read the timestep (or SDXL's added conditions) but not the latents.

    That is the sinusoidal embedding, the time MLP and every resnet's ``time_emb_proj``.
    """
    ins = {t.name for t in graph.inputs}
    time_ins = [n for n in ins if any(k in n.lower() for k in _TIME_INPUTS)]
    latent_ins = [n for n in ins if n not in time_ins and "encoder_hidden" not in n.lower()]
    if not time_ins:
        return []
    from_time = reachable_from(graph, time_ins)
    from_latent = reachable_from(graph, latent_ins)
    return [n for n in graph.nodes if id(n) in from_time and id(n) not in from_latent]


def _kernel(node: gs.Node) -> tuple | None:
    ks = node.attrs.get("kernel_shape")
    if ks is not None:
        return tuple(ks)
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if isinstance(w, gs.Constant) and w.shape is not None and len(w.shape) == 4:
        return tuple(w.shape[2:])
    return None


def _first_shortcut_conv(convs: list[gs.Node]) -> gs.Node | None:
    """The first 1x1 Conv added to a 3x3 Conv's output: a resnet's ``conv_shortcut``.

    Attention's 1x1 ``proj_out`` is added to the block input, not to a 3x3 Conv, so it is not taken.
    """
    for conv in convs:
        if _kernel(conv) != (1, 1):
            continue
        for add in conv.outputs[0].outputs:
            if add.op != "Add":
                continue
            other = [t for t in add.inputs if t is not conv.outputs[0]]
            if other and other[0].inputs and other[0].inputs[0].op == "Conv" and _kernel(other[0].inputs[0]) == (3, 3):
                return conv
    return None


def default_scope(model) -> tuple[list[str], list[str]]:
    """(node names, notes) the seeds leave in float: conv_in, conv_out, time embedding, first shortcut.

    Found from the graph's structure; diffusers' module names are the fallback for what the
    structure does not show.
    """
    graph = model.graph.toposort()
    role = model.role
    convs = [n for n in graph.nodes if n.op == "Conv"]
    picked: dict[str, str] = {}
    if role == "unet":
        if convs:
            picked[convs[0].name] = "conv_in"
            picked[convs[-1].name] = "conv_out"
        for n in time_embedding_nodes(graph):
            if n.op in QUANT_OPS:
                picked[n.name] = "time_embedding"
        sc = _first_shortcut_conv(convs)
        if sc is not None:
            picked[sc.name] = "first_shortcut_conv"
    elif role in ("vae_decoder", "vae_encoder"):
        # The convolutions straight after the input (post_quant_conv, conv_in) and the last one.
        ins = {t.name for t in graph.inputs}
        for conv in convs:
            src = conv.inputs[0]
            while src.inputs and src.inputs[0].op == "Conv":
                src = src.inputs[0].inputs[0]
            if src.name in ins:
                picked[conv.name] = "conv_in"
        if convs:
            picked[convs[-1].name] = "conv_out"
    notes = []
    fragments = _NAME_FALLBACK.get(role, ())
    found_kinds = set(picked.values())
    wanted = {"unet": {"conv_in", "conv_out", "time_embedding", "first_shortcut_conv"},
              "vae_decoder": {"conv_in", "conv_out"}, "vae_encoder": {"conv_in", "conv_out"}}.get(role, set())
    if wanted - found_kinds:
        extra = match_names(graph, fragments, ops=QUANT_OPS)
        for name in extra:
            picked.setdefault(name, "by_name")
        notes.append(f"structural scope missed {sorted(wanted - found_kinds)}; matched {len(extra)} node(s) by name")
    return list(picked), notes


def match_names(graph: gs.Graph, patterns: Iterable[str], ops: Iterable[str] | None = None) -> list[str]:
    """Node names equal to or containing any pattern (optionally only nodes of ``ops``)."""
    patterns = [p for p in patterns if p]
    ops = set(ops) if ops else None
    out = []
    for n in graph.nodes:
        if ops and n.op not in ops:
            continue
        if any(p == n.name or p in n.name for p in patterns):
            out.append(n.name)
    return out


def resolve_scope(model, exclude: Iterable[str]) -> tuple[list[str], list[str]]:
    """(node names kept in float, notes) for ``exclude`` items: ``default`` (the SD scope), ``none``, names."""
    names: list[str] = []
    notes: list[str] = []
    for item in exclude:
        if item == "default":
            found, n = default_scope(model)
            names += found
            notes += n
        elif item != "none":
            found = match_names(model.graph, [item])
            if not found:
                raise UsageError(f"pass 'qdq': exclude={item!r} matches no node")
            names += found
    return list(dict.fromkeys(names)), notes


def quantized_nodes(graph) -> list:
    """Conv/Gemm/MatMul nodes whose inputs all come from DequantizeLinear (they run in INT8)."""
    return [n for n in graph.nodes
            if n.op in QUANT_OPS and all(t.inputs and t.inputs[0].op == "DequantizeLinear" for t in n.inputs[:2])]


def activation_matmuls(graph) -> list[str]:
    """MatMuls of two activations (attention scores and probabilities x values)."""
    return [n.name for n in graph.nodes if n.op == "MatMul" and not isinstance(n.inputs[1], gs.Constant)]


def watched_tensors(graph, excluded: Iterable[str], act_matmul: bool) -> set[str]:
    """Inputs and outputs of the layers that will be quantized: the only tensors calibration must range."""
    skip = set(excluded)
    watch: set[str] = set()
    for n in graph.nodes:
        if n.name in skip or n.op not in QUANT_OPS:
            continue
        if n.op == "MatMul" and not act_matmul and not isinstance(n.inputs[1], gs.Constant):
            continue  # attention scores / probabilities: not quantized, not watched
        watch.update(t.name for t in n.inputs[:2] if not isinstance(t, gs.Constant))
        watch.update(t.name for t in n.outputs)
    return watch
