"""Textual pipelines: a bracket-aware parser, a canonical printer and named presets.

    pipeline := element ("," element)*
    element  := NAME (":" VALUE)? ("{" KEY "=" VALUE (" " KEY "=" VALUE)* "}")?
"""

from __future__ import annotations

import re

from sdgraph.errors import UsageError
from sdgraph.passes.base import Pass, create_pass, format_element

__all__ = ["PRESETS", "parse_pipeline", "format_pipeline", "format_element", "split_elements", "build_pipeline"]

# Named presets expand in place; the report prints the expanded, canonical form.
PRESETS: dict[str, str] = {
    "cleanup": "fold,cse",
    "sd-unet": "fold,cse,fa,gn,geglu",
    "sd-text": "fold,cse,fa",
    "sd-vae": "fold,cse,fa,gn",
    "sd-fast": "fold,cse,tome,fa,gn,geglu",
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.]*\Z")


def split_elements(text: str) -> list[str]:
    """Split on top-level commas; commas inside ``{...}`` belong to the element."""
    parts, depth, cur = [], 0, []
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
            if depth > 1:
                raise UsageError(f"pipeline {text!r}: nested '{{' at position {i}")
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise UsageError(f"pipeline {text!r}: unbalanced '}}' at position {i}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise UsageError(f"pipeline {text!r}: unbalanced '{{' (missing '}}')")
    parts.append("".join(cur))
    return parts


def _parse_element(elem: str, whole: str) -> tuple[str, str | None, dict[str, str]]:
    elem = elem.strip()
    if not elem:
        raise UsageError(f"pipeline {whole!r}: empty element (stray comma?)")
    named: dict[str, str] = {}
    if "{" in elem:
        head, _, rest = elem.partition("{")
        if not rest.endswith("}"):
            raise UsageError(f"pipeline {whole!r}: text after '}}' in {elem!r}")
        body = rest[:-1].strip()
        for item in body.split():
            key, eq, value = item.partition("=")
            if not eq or not key or value == "":
                raise UsageError(f"pipeline {whole!r}: expected KEY=VALUE in {{...}}, got {item!r}")
            if key in named:
                raise UsageError(f"pipeline {whole!r}: option {key!r} given twice")
            named[key] = value
    else:
        head = elem
    head = head.strip()
    name, colon, positional = head.partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise UsageError(f"pipeline {whole!r}: bad pass name {name!r}")
    if colon and not positional.strip():
        raise UsageError(f"pipeline {whole!r}: missing value after '{name}:'")
    return name, (positional.strip() if colon else None), named


def parse_pipeline(text: str) -> list[Pass]:
    """Parse pipeline text into Pass instances (presets expanded, options type-checked)."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("empty pipeline (give passes like 'fold,fa')")
    passes: list[Pass] = []
    for elem in split_elements(text):
        name, pos, named = _parse_element(elem, text)
        if name in PRESETS:
            if pos is not None or named:
                raise UsageError(f"preset {name!r} takes no options")
            passes.extend(parse_pipeline(PRESETS[name]))
            continue
        passes.append(create_pass(name, pos, named))
    return passes


def build_pipeline(spec: "str | list") -> list[Pass]:
    """Text, a list of texts, or Pass objects -> Pass instances."""
    if isinstance(spec, str):
        return parse_pipeline(spec)
    out: list[Pass] = []
    for item in spec:
        out.extend(parse_pipeline(item) if isinstance(item, str) else [item])
    return out


def format_pipeline(passes: list[Pass]) -> str:
    """Canonical text: presets expanded, defaults dropped, no spaces around commas."""
    return ",".join(p.spec() for p in passes)
