"""Tiny exported SD1.5-architecture pipeline (unet, text_encoder, vae_decoder) for the precision tests."""

from __future__ import annotations

from pathlib import Path

__all__ = ["build_tiny_sd15", "tiny_sd15_dir"]

_BUILT: dict[str, Path] = {}


def tiny_sd15_dir() -> Path:
    """Build the tiny pipeline once per test process (in a temporary folder) and return it."""
    import atexit
    import shutil
    import tempfile

    if "dir" not in _BUILT:
        root = Path(tempfile.mkdtemp(prefix="sdgraph-precision-"))
        atexit.register(shutil.rmtree, root, True)
        _BUILT["dir"] = build_tiny_sd15(root / "sd15")
    return _BUILT["dir"]


def build_tiny_sd15(out: Path) -> Path:
    """Export tiny random-weight submodels to ``out`` in the optimum layout; returns ``out``."""
    import torch

    from sdgraph import demo

    comps = demo._components("sd15", "tiny", 0)
    out.mkdir(parents=True, exist_ok=True)
    demo.make_clip_tokenizer(1000, out / "tokenizer")
    comps["scheduler"].save_pretrained(out / "scheduler")

    class Unet(torch.nn.Module):
        def __init__(self, u):
            super().__init__()
            self.u = u

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.u(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class Text(torch.nn.Module):
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, input_ids):
            o = self.t(input_ids, return_dict=False)
            return o[0], o[1]

    class Dec(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, latent_sample):
            return self.v.decode(latent_sample, return_dict=False)[0]

    jobs = [
        ("unet", Unet(comps["unet"]), (torch.randn(2, 4, 16, 16), torch.tensor([10.0, 10.0]), torch.randn(2, 77, 32)),
         ["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
        ("text_encoder", Text(comps["text_encoder"]), (torch.ones(1, 77, dtype=torch.int32),),
         ["input_ids"], ["last_hidden_state", "pooler_output"]),
        ("vae_decoder", Dec(comps["vae"]), (torch.randn(1, 4, 16, 16),), ["latent_sample"], ["sample"]),
    ]
    with torch.no_grad():
        for name, mod, args, ins, outs in jobs:
            (out / name).mkdir(exist_ok=True)
            torch.onnx.export(mod.eval(), args, str(out / name / "model.onnx"), input_names=ins, output_names=outs,
                              opset_version=17, dynamo=False)
    (out / "vae_decoder" / "config.json").write_text('{"scaling_factor": 0.18215}\n')
    return out
