"""The INT8 quantization workflow behind the ``qdq`` pass, one module per step.

- ``modeldir``: the pipeline folder around a submodel, prompts, the calibration cache.
- ``text``: prompts through the pipeline's tokenizer(s) and ONNX text encoder(s).
- ``calibration``: calibration inputs by role (UNet trajectories, tokenized prompts, VAE latents).
- ``calib_file``: calibration inputs from ``.npz`` files (for a bare graph without a pipeline folder).
- ``scope``: what stays float (the SD ignored scope, shared with fp16/bf16; user names) and what is quantized.
- ``ort``: range calibration and QDQ insertion through onnxruntime.quantization.
- ``sensitivity``: held-back fidelity, per-layer sensitivity, auto-exclude.

Layering: between ``sdgraph.ir`` and ``sdgraph.passes`` (the layer ``sdgraph.calibration`` had): it
imports ``sdgraph.ir``, ``sdgraph.errors`` and ``sdgraph.paths`` only; the ``qdq`` pass and the
precision helpers import it.
"""
