"""Shared fixtures: tiny random-weight pipelines and their ONNX exports, built once per session.

Pipelines (diffusers directories, ``sdgraph.demo``; UNet latents 16x16 = 128 px images):

- ``tiny_pipeline(arch)``: factory, arch in sd15 | sd21 | sdxl | pix2pix | turbo -> Path
- ``tiny_sd15_pipeline``, ``tiny_sd21_pipeline``, ``tiny_sdxl_pipeline``, ``tiny_pix2pix_pipeline``
- ``tiny_taesd``: a tiny AutoencoderTiny folder (for ``--vae``)

Exports (``sdgraph.export``; model dirs with ``<submodel>/model.onnx`` + ``model.onnx_data`` and
``sdgraph.json``):

- ``tiny_onnx(arch, exporter="legacy", **options)``: factory, cached per (arch, exporter, options)
- ``tiny_sd15_onnx`` (legacy), ``tiny_sd15_onnx_dynamo``, ``tiny_sdxl_onnx`` (legacy)
- ``tiny_unet_onnx``, ``tiny_text_encoder_onnx``, ``tiny_vae_decoder_onnx``,
  ``tiny_vae_encoder_onnx``: the ``model.onnx`` paths inside ``tiny_sd15_onnx``

Treat them as read-only: copy before modifying (``shutil.copytree``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

_ARCHS = ("sd15", "sd21", "sdxl", "pix2pix", "turbo")

# The fast layer (`pytest -m "not slow"`) builds nothing with torch: unit tests of matchers, helpers,
# passes and targets on graphs made in code. A test that asks for one of these fixtures (each
# exports a tiny diffusers pipeline or model with torch) is an integration test: marked slow here.
_EXPORTING_FIXTURES = frozenset({
    # this file
    "tiny_pipeline", "tiny_sd15_pipeline", "tiny_sd21_pipeline", "tiny_sdxl_pipeline", "tiny_pix2pix_pipeline",
    "tiny_taesd", "tiny_onnx", "tiny_sd15_onnx", "tiny_sd15_onnx_dynamo", "tiny_sdxl_onnx", "tiny_unet_onnx",
    "tiny_text_encoder_onnx", "tiny_vae_decoder_onnx", "tiny_vae_encoder_onnx",
    # module fixtures that export
    "exported",    # tests/passes/test_tome.py: a tiny UNet through torch.onnx
    "sd",          # tests/passes/test_qdq.py, test_fp16_bf16.py: precision_models.tiny_sd15_dir()
    "fused_sd15",  # tests/passes/test_ort_contrib.py: fusion_models.unet()
    "tiny_dir",    # tests/targets/test_ascend.py: tiny modules exported and optimized
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _EXPORTING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _private_sdgraph_cache(tmp_path_factory):
    """Tests lower into a cache of their own, never the user's ``~/.cache/sdgraph``."""
    import os

    old = os.environ.get("SDGRAPH_CACHE_DIR")
    os.environ["SDGRAPH_CACHE_DIR"] = str(tmp_path_factory.mktemp("sdgraph-cache"))
    yield
    if old is None:
        os.environ.pop("SDGRAPH_CACHE_DIR", None)
    else:
        os.environ["SDGRAPH_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """Factory: ``tiny_pipeline("sdxl")`` -> path of a tiny random-weight diffusers pipeline."""
    from sdgraph.demo import build_demo_pipeline

    root = tmp_path_factory.mktemp("tiny-pipelines")
    built: dict[str, Path] = {}

    def get(arch: str = "sd15") -> Path:
        assert arch in _ARCHS, arch
        if arch not in built:
            built[arch] = build_demo_pipeline(root / arch, arch, "tiny", seed=0)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_sd15_pipeline(tiny_pipeline) -> Path:
    return tiny_pipeline("sd15")


@pytest.fixture(scope="session")
def tiny_sd21_pipeline(tiny_pipeline) -> Path:
    return tiny_pipeline("sd21")


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tiny_pipeline) -> Path:
    return tiny_pipeline("sdxl")


@pytest.fixture(scope="session")
def tiny_pix2pix_pipeline(tiny_pipeline) -> Path:
    return tiny_pipeline("pix2pix")


@pytest.fixture(scope="session")
def tiny_taesd(tmp_path_factory) -> Path:
    from sdgraph.demo import build_demo_vae

    return build_demo_vae(tmp_path_factory.mktemp("tiny-vae") / "taesd", "taesd", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_pipeline, tmp_path_factory):
    """Factory: ``tiny_onnx("sd15", "dynamo", submodels="unet")`` -> exported model dir (cached)."""
    from sdgraph.export import export_pipeline

    root = tmp_path_factory.mktemp("tiny-onnx")
    built: dict[tuple, Path] = {}

    def get(arch: str = "sd15", exporter: str = "legacy", **options) -> Path:
        key = (arch, exporter, tuple(sorted((k, str(v)) for k, v in options.items() if v is not None)))
        if key not in built:
            out = root / f"{arch}-{exporter}-{len(built)}"
            export_pipeline(tiny_pipeline(arch), out, exporter=exporter, **options)
            built[key] = out
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_sd15_onnx(tiny_onnx) -> Path:
    return tiny_onnx("sd15", "legacy")


@pytest.fixture(scope="session")
def tiny_sd15_onnx_dynamo(tiny_onnx) -> Path:
    return tiny_onnx("sd15", "dynamo")


@pytest.fixture(scope="session")
def tiny_sdxl_onnx(tiny_onnx) -> Path:
    return tiny_onnx("sdxl", "legacy")


@pytest.fixture(scope="session")
def tiny_unet_onnx(tiny_sd15_onnx) -> Path:
    return tiny_sd15_onnx / "unet" / "model.onnx"


@pytest.fixture(scope="session")
def tiny_text_encoder_onnx(tiny_sd15_onnx) -> Path:
    return tiny_sd15_onnx / "text_encoder" / "model.onnx"


@pytest.fixture(scope="session")
def tiny_vae_decoder_onnx(tiny_sd15_onnx) -> Path:
    return tiny_sd15_onnx / "vae_decoder" / "model.onnx"


@pytest.fixture(scope="session")
def tiny_vae_encoder_onnx(tiny_sd15_onnx) -> Path:
    return tiny_sd15_onnx / "vae_encoder" / "model.onnx"
