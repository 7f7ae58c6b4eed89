"""timm's generic model contract (the checks of timm's own tests/test_models.py: forward,
backward, default cfgs, forward_intermediates, features_only), written for every registered
splat_vit_* with valid splats where timm's suite feeds random pixels. The small models run in
CI; the full-size ones are marked slow (``pytest -m slow``)."""

import pytest
import timm
import torch

import timm_splat  # noqa: F401  (registers the models)
from timm_splat.testing import random_splats

FAST = ["splat_vit_test", "splat_vit_mini", "splat_vit_s16"]
MODELS = [
    pytest.param(name, marks=[] if name in FAST else pytest.mark.slow)
    for name in timm.list_models("splat_vit_*")
]


def splats(batch: int) -> torch.Tensor:
    return random_splats(batch, 64, dtype=torch.float32)


def test_every_registered_model_is_covered():
    assert {p.values[0] for p in MODELS} == set(timm.list_models("splat_vit_*"))
    assert set(FAST) <= set(timm.list_models("splat_vit_*"))


@pytest.mark.parametrize("name", MODELS)
def test_forward(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(splats(1))
    assert out.shape == (1, model.num_classes) and not torch.isnan(out).any()


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(splats(2))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert out.shape == (2, 42) and not torch.isnan(out).any()


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg(name):
    model = timm.create_model(name).eval()
    cfg, state = model.default_cfg, model.state_dict()
    for key in (cfg["classifier"], cfg["first_conv"]):
        assert f"{key}.weight" in state, f"{key} named by the cfg is not a layer"
    x = splats(1)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (
            1,
            model.num_prefix_tokens + model.patch_embed.num_patches,
            model.num_features,
        )
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name):
    model = timm.create_model(name).eval()
    x = splats(2)
    height, width = model.patch_embed.grid_size
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(intermediates) == len(model.blocks)
        for y in intermediates:
            assert y.shape == (2, model.embed_dim, height, width)
        tokens = model.forward_intermediates(
            x, indices=[0], output_fmt="NLC", intermediates_only=True
        )
        assert tokens[0].shape == (2, height * width, model.embed_dim)
        layers = model.get_intermediate_layers(x, n=1, reshape=True)
        torch.testing.assert_close(layers[0], intermediates[-1])
    kept = model.prune_intermediate_layers(indices=1)
    assert kept == [len(model.blocks) - 1]


@pytest.mark.parametrize("name", MODELS)
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    channels = model.feature_info.channels()
    with torch.no_grad():
        outputs = model(splats(1))
    assert len(outputs) == len(channels) >= 1
    for c, y in zip(channels, outputs):
        assert y.shape[:2] == (1, c) and not torch.isnan(y).any()


def test_meta_device_and_input_size():
    model = timm.create_model("splat_vit_test", device="meta")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    model = timm.create_model("splat_vit_test")
    grid = model.patch_embed.grid_size
    model.set_input_size((256, 256))  # the pixels splats are fitted from; the latents stay
    assert model.patch_embed.img_size == (256, 256) and model.patch_embed.grid_size == grid


def test_fx_feature_extraction_and_export():
    """timm's FX feature extractor and torch.export trace splat inputs."""
    from timm.models import create_feature_extractor, get_graph_node_names

    model = timm.create_model("splat_vit_test").eval()
    x = splats(2)
    assert any(name.startswith("blocks.1.") for name in get_graph_node_names(model)[1])
    extractor = create_feature_extractor(model, return_nodes={"blocks.1": "b1", "head": "out"})
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["out"], model(x))
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.slow
def test_compile_fullgraph():
    model = timm.create_model("splat_vit_test").eval()
    x = splats(2)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def pixels(model, batch: int = 2, size: int = 32) -> torch.Tensor:
    """Images normalised with the model's data config, as timm's pipelines feed them."""
    return (torch.rand(batch, 3, size, size) - model.pixel_mean) / model.pixel_std


def test_compile_on_pixels_fits_eagerly_and_fullgraph_says_why():
    """The pixel path fits splats with an optimiser (autograd steps, data-dependent pruning),
    which no graph capture can hold: torch.compile breaks the graph there and compiles the rest;
    fullgraph=True and torch.export raise with the reason and the way out (splat inputs)."""
    model = timm.create_model("splat_vit_test", num_splats=16, fit_options={"iterations": 5})
    model.eval()
    x, s = pixels(model), splats(2)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.compile(model, backend="eager")(x), expected)
        torch._dynamo.reset()
        torch.testing.assert_close(
            torch.compile(model, backend="eager", fullgraph=True)(s), model(s)
        )
        torch._dynamo.reset()
        with pytest.raises(Exception, match="fit pixel inputs with an optimiser"):
            torch.compile(model, backend="eager", fullgraph=True)(x)
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match="compile or export the model on splats"):
            torch.export.export(model, (x,))
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_on_pixels_with_inductor():
    model = timm.create_model("splat_vit_test", num_splats=16, fit_options={"iterations": 5})
    model.eval()
    x = pixels(model)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_onnx_export_on_splats():
    """torch.onnx.export(dynamo=True) of the splat path (needs onnx and onnxscript, which are
    not dependencies; onnxruntime, when there, checks the outputs). Pixel inputs cannot be
    exported (see the compile test)."""
    pytest.importorskip("onnxscript")
    model = timm.create_model("splat_vit_test").eval()
    x = splats(2)
    program = torch.onnx.export(model, (x,), dynamo=True)
    assert program is not None
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-4)


def test_jit_trace_on_splats_and_not_on_pixels():
    """torch.jit.trace (open_clip's --trace) records the splat path; on pixels it would bake one
    fit into the graph, so it raises instead."""
    import warnings

    model = timm.create_model("splat_vit_test").eval()
    x = splats(2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the input checks
        traced = torch.jit.trace(model, (x,))
        other = random_splats(2, 64, dtype=torch.float32, seed=1)
        torch.testing.assert_close(traced(other), model(other))
        with pytest.raises(RuntimeError, match="fit pixel inputs with an optimiser"):
            torch.jit.trace(model, (pixels(model),))


def test_torchscript_is_refused_with_the_way_out():
    """timm's test_model_forward_torchscript scripts every model: TorchScript is deprecated in
    PyTorch 2 and cannot hold the pixel path's fitter, so splat models refuse it up front (not
    with an error about a constant inside the stem), naming torch.compile / torch.export."""
    model = timm.create_model("splat_vit_test").eval()
    for module in (model, model.patch_embed):
        with pytest.raises(RuntimeError, match="do not support TorchScript.*torch.compile"):
            torch.jit.script(module)


def test_timm_create_dataset_cannot_read_prefit_splats_load_prefit_can(tmp_path, monkeypatch):
    """timm's hfds reader reads an ``image`` column and has no hook for another reader, so a
    pre-fitted dataset fails at its first item (what the README tells users, pointing them to
    load_prefit / PrefitSplats). If timm ever reads it, this test says the README is stale."""
    import numpy as np
    from datasets import Dataset
    from timm.data import create_dataset

    from timm_splat.data import load_prefit, prefit_features

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "gs4"
    (folder / "data").mkdir(parents=True)
    rows = {
        "splats": np.zeros((2, 4, 8), np.float16),
        "label": [0, 1],
        "caption": ["a", "b"],
        "source_id": ["0", "1"],
        "psnr": [30.0, 31.0],
    }
    features = prefit_features(4, ["cat", "dog"])
    Dataset.from_dict(rows, features=features).to_parquet(
        str(folder / "data" / "train-00000-00000.parquet")
    )
    dataset = create_dataset(f"hfds/{folder}", root=str(tmp_path / "cache"), split="train")
    with pytest.raises(TypeError, match="NoneType"):
        dataset[0]
    loaded = load_prefit(folder, cache_dir=str(tmp_path / "cache2"))
    assert loaded[0]["splats"].shape == (4, 8) and loaded[1]["label"] == 1
