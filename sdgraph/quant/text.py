"""Text conditioning as diffusers' pipelines make it: tokenized prompts through the ONNX text encoder(s)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from sdgraph.errors import InputError
from sdgraph.ir.runtime import penultimate_hidden_state, pick_output
from sdgraph.quant.modeldir import need

__all__ = ["TextEncoder", "tokenized_feeds"]


class TextEncoder:
    """Tokenizer(s) + text encoder(s) of the pipeline, run in ONNX Runtime.

    ``xl``: SDXL's pair, conditioned like diffusers' StableDiffusionXLPipeline (the penultimate
    hidden state of each encoder, concatenated on the last axis, and text_encoder_2's pooled
    projection as ``text_embeds``).
    """

    def __init__(self, directory: Path, role: str, xl: bool = False):
        self.parts = [self._load(directory, role, "tokenizer", "text_encoder")]
        if xl:
            self.parts.append(self._load(directory, role, "tokenizer_2", "text_encoder_2"))
        self.xl = xl
        self.tokenizer, self.model, self.specs, self.sess = self.parts[0]

    @staticmethod
    def _load(directory: Path, role: str, tok_sub: str, te_sub: str):
        from transformers import CLIPTokenizer

        from sdgraph.ir import runtime as rt
        from sdgraph.ir.model import Model

        tok_dir = need(directory, tok_sub, role, f"the tokenizer ({tok_sub})")
        te_file = need(directory, f"{te_sub}/model.onnx", role, f"the text encoder ({te_sub})")
        try:
            tok = CLIPTokenizer.from_pretrained(str(tok_dir))
        except Exception as exc:
            raise InputError(f"{tok_dir}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
        model = Model.load(te_file)
        return tok, model, rt.input_specs(model), rt.session(model)

    def feeds(self, prompts: list[str]) -> list[dict[str, np.ndarray]]:
        return tokenized_feeds(self.tokenizer, self.specs, prompts)

    def encode(self, prompt: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(encoder_hidden_states, pooled text_embeds or None) for one prompt."""
        outs = []
        for tok, _, specs, sess in self.parts:
            names = [o.name for o in sess.get_outputs()]
            outs.append(dict(zip(names, sess.run(None, tokenized_feeds(tok, specs, [prompt])[0]))))
        if not self.xl:
            return pick_output(outs[0], ("last_hidden_state",), 0), None
        hidden = np.concatenate([penultimate_hidden_state(o) for o in outs], axis=-1)
        return hidden, pick_output(outs[1], ("text_embeds", "pooler_output"), 1)


def tokenized_feeds(tokenizer, specs: Mapping[str, tuple], prompts: list[str]) -> list[dict[str, np.ndarray]]:
    """One feed dict per prompt for a text encoder with ``input_ids`` (and maybe ``attention_mask``)."""
    ids_name = next((n for n in specs if "input_ids" in n or "ids" in n), next(iter(specs)))
    (shape, dtype) = specs[ids_name]
    seq = shape[-1] if len(shape) >= 2 else 77
    out = []
    for p in prompts:
        enc = tokenizer([p], padding="max_length", max_length=seq, truncation=True, return_tensors="np")
        feed = {ids_name: enc["input_ids"].astype(dtype).reshape((1, seq) if len(shape) >= 2 else (seq,))}
        for name, (_, dt) in specs.items():
            if name != ids_name and "mask" in name:
                feed[name] = enc["attention_mask"].astype(dt).reshape(feed[ids_name].shape)
        out.append(feed)
    return out
