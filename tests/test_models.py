"""splat_vit models in timm and open_clip: registry, invariances, from_rgb, freeze, pixel inputs."""

import os
import subprocess
import sys

import open_clip
import pytest
import timm
import torch
from conftest import random_splats
from timm.data import resolve_model_data_config

import timm_splat
from timm_splat import SplatTransform, SplatVisionTransformer, freeze, from_rgb

FULL_SIZE = ["splat_vit_s16", "splat_vit_b16", "splat_vit_b32", "splat_vit_l14"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("splat_vit_test", num_classes=10).eval()


def test_registry_lists_the_models():
    assert set(FULL_SIZE) <= set(timm.list_models("splat_vit*"))
    assert {"splat-ViT-B-16", "splat-ViT-B-32", "splat-ViT-L-14"} <= set(open_clip.list_models())


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_models_build(name):
    model = timm.create_model(name)
    params = sum(p.numel() for p in model.parameters())
    stem = sum(p.numel() for p in model.patch_embed.parameters())
    print(
        f"{name}: {params / 1e6:.1f}M parameters, GS stem {stem / 1e6:.2f}M, "
        f"{model.patch_embed.num_patches} latents, budget {model.num_splats}"
    )
    assert isinstance(model, SplatVisionTransformer)
    assert model.pos_embed.shape[1] == 196 + 1
    assert model.num_splats == 400
    if name == "splat_vit_b16":  # one forward at full size
        with torch.no_grad():
            out = model.eval()(random_splats(1, 400, dtype=torch.float32))
        assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_timm_surface(tiny):
    s = random_splats(2, 40, dtype=torch.float32)
    with torch.no_grad():
        tokens = tiny.forward_features(s)
        assert tokens.shape == (2, 1 + 49, tiny.num_features)
        assert tiny.forward_head(tokens).shape == (2, 10)
        assert tiny.forward_head(tokens, pre_logits=True).shape == (2, tiny.num_features)
    assert tiny.group_matcher()["stem"].startswith("^cls_token")
    model = timm.create_model("splat_vit_test")
    model.reset_classifier(0)
    assert model(s).shape == (2, model.num_features)
    model.set_grad_checkpointing(True)
    model.train()(s).sum().backward()
    assert model.patch_embed.proj.weight.grad is not None
    assert tiny.num_splats == 400


def test_budget_is_a_model_arg_and_no_tag_promises_missing_weights():
    assert timm.create_model("splat_vit_test", num_splats=900).num_splats == 900
    assert timm.list_models("splat_vit*", pretrained=True) == []
    with pytest.raises(ValueError, match="no pretrained weights are published for splat_vit_b16"):
        timm.create_model("splat_vit_b16", pretrained=True)


def test_timm_save_for_hf_round_trip(tmp_path):
    """timm's own writer and loader, no timm_splat code in between: the budget travels in
    config.json's model_args (timm's PretrainedCfg has no field for it)."""
    from timm.models import save_for_hf

    model = timm.create_model("splat_vit_test", num_splats=48)
    model.num_splats = 64
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert loaded.num_splats == 64
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_num_splats_is_one_validated_value():
    model = timm.create_model("splat_vit_test")
    model.num_splats = 64
    assert model._model_args["num_splats"] == 64  # what save_for_hf writes to config.json
    for bad in (-5, 0, 2.5, True):
        with pytest.raises(ValueError, match="num_splats must be a positive int"):
            model.num_splats = bad
    assert model.num_splats == 64


def test_padding_rows_change_nothing(tiny):
    s = random_splats(2, 50, dtype=torch.float32, padding=0)
    padded = torch.zeros(2, 90, 8)
    slots = torch.randperm(90)[:50].sort().values  # real rows spread among the padding
    padded[:, slots] = s
    with torch.no_grad():
        torch.testing.assert_close(tiny(padded), tiny(s), rtol=0, atol=1e-5)


def test_splat_order_changes_nothing(tiny):
    s = random_splats(2, 50, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(tiny(s[:, torch.randperm(50)]), tiny(s), rtol=0, atol=1e-5)


def test_an_image_without_splats_is_finite(tiny):
    with torch.no_grad():
        assert torch.isfinite(tiny(torch.zeros(1, 5, 8))).all()


def test_normalised_noise_is_an_image():
    """timm's tests and tools feed torch.randn as pixels: it is clamped to [0, 1] and fitted."""
    model = timm.create_model("splat_vit_test", num_splats=8, fit_options={"iterations": 3})
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 3, 16, 16))).all()
        # A 224x224 batch of noise reaches beyond 5 sigma now and then (timm's own tests do).
        noise = torch.randn(1, 3, 16, 16)
        noise[0, :, 0, 0], noise[0, :, 0, 1] = -6.0, 6.0
        assert torch.isfinite(model(noise)).all()


def test_bad_inputs_are_explained(tiny):
    with pytest.raises(ValueError, match=r"splats \[B, N, 8\] or pixels"):
        tiny(torch.zeros(2, 10, 7))
    pixels = torch.rand(1, 3, 32, 32)  # [0, 1], not normalised with the data config
    tiny.set_pixel_normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    try:
        with pytest.raises(ValueError, match="data config"):
            tiny(pixels * 10)
    finally:
        tiny.set_pixel_normalization(timm.data.OPENAI_CLIP_MEAN, timm.data.OPENAI_CLIP_STD)


def test_pixels_are_fitted_with_the_cfg_budget(astronaut_64):
    model = timm.create_model(
        "splat_vit_test", num_splats=32, fit_options={"iterations": 20}
    ).eval()
    cfg = resolve_model_data_config(model)
    transform = SplatTransform.from_config(model, image_size=64, iterations=20)
    assert transform.num_splats == 32
    splats = transform(astronaut_64)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    pixels = (transform.image_transform(astronaut_64) - mean) / std  # timm's normalisation
    with torch.no_grad():
        from_pixels = model(pixels[None])
        from_splats = model(splats[None])
    torch.testing.assert_close(from_pixels, from_splats, rtol=0, atol=1e-4)


def test_from_config_with_a_data_config(tiny):
    transform = SplatTransform.from_config(resolve_model_data_config(tiny))
    assert (transform.num_splats, transform.image_size, transform.crop_pct) == (
        400,
        (224, 224),
        1.0,
    )


def test_from_rgb_copies_a_timm_vit_exactly():
    torch.manual_seed(0)
    rgb = timm.create_model("vit_tiny_patch16_224", num_classes=7).eval()
    student = from_rgb(rgb).eval()
    tokens = torch.randn(2, 197, rgb.embed_dim)
    with torch.no_grad():
        for i in (0, len(rgb.blocks) - 1):
            assert torch.equal(student.blocks[i](tokens), rgb.blocks[i](tokens))
        assert torch.equal(student.norm(tokens), rgb.norm(tokens))
    assert torch.equal(student.head.weight, rgb.head.weight)
    assert torch.equal(student.pos_embed, rgb.pos_embed)  # 14 x 14 patches = 196 latents
    assert torch.equal(student.cls_token, rgb.cls_token)
    assert student(random_splats(1, 30, dtype=torch.float32)).shape == (1, 7)


def test_from_rgb_resamples_position_embeddings_to_the_latent_grid():
    rgb = timm.create_model("vit_tiny_patch16_224").eval()
    student = from_rgb(rgb, num_latents=98)
    assert student.pos_embed.shape == (1, 1 + 98, rgb.embed_dim)
    assert torch.equal(student.pos_embed[:, 0], rgb.pos_embed[:, 0])  # the class token's


@pytest.fixture(scope="module")
def rgb_clip():
    torch.manual_seed(0)
    # The layout of splat-ViT-test's towers, as a pixel CLIP.
    vision = dict(layers=3, width=64, head_width=32, patch_size=32, image_size=224)
    text = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


def test_from_rgb_copies_an_open_clip_clip(rgb_clip):
    student = from_rgb(rgb_clip).eval()
    trunk = student.visual.trunk
    tokens = torch.randn(2, 50, 64)
    with torch.no_grad():
        for rgb_block, block in zip(rgb_clip.visual.transformer.resblocks, trunk.blocks):
            # open_clip's block runs nn.MultiheadAttention, timm's runs SDPA: same weights,
            # different kernels, so equal to rounding.
            torch.testing.assert_close(block(tokens), rgb_block(tokens), rtol=0, atol=1e-5)
        torch.testing.assert_close(trunk.norm_pre(tokens), rgb_clip.visual.ln_pre(tokens))
        text = open_clip.get_tokenizer("splat-ViT-test")(["a photo of a cat", "a dog"])
        assert torch.equal(student.encode_text(text), rgb_clip.encode_text(text))
    assert torch.equal(student.visual.head.proj.weight, rgb_clip.visual.proj.T)
    assert torch.equal(trunk.cls_token.flatten(), rgb_clip.visual.class_embedding)
    assert torch.equal(student.logit_scale, rgb_clip.logit_scale)
    assert student.encode_image(random_splats(2, 40, dtype=torch.float32)).shape == (2, 32)


def test_from_rgb_keeps_quick_gelu():
    from timm_splat.models.convert import uses_quick_gelu

    vision = dict(layers=3, width=64, head_width=32, patch_size=32, image_size=224)
    text = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
    rgb = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    student = from_rgb(rgb).eval()
    assert uses_quick_gelu(student)
    tokens = torch.randn(1, 50, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            student.visual.trunk.blocks[0](tokens),
            rgb.visual.transformer.resblocks[0](tokens),
            rtol=0,
            atol=1e-5,
        )


def test_from_rgb_rejects_what_it_cannot_mirror():
    with pytest.raises(TypeError, match="from_rgb takes"):
        from_rgb(torch.nn.Linear(2, 2))


def test_freeze_presets_on_the_tiny_model():
    model = timm.create_model("splat_vit_test")
    freeze(model, "distill")
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"patch_embed"}
    freeze(model, "clip")
    trainable = {
        ".".join(n.split(".")[:2]) if n.startswith("blocks") else n.split(".")[0]
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"patch_embed", "blocks.0", "blocks.1", "norm", "head"}
    with pytest.raises(ValueError, match="stage must be one of"):
        freeze(model, "all")


def test_freeze_clip_stage_on_splat_vit_b16(capsys):
    clip = open_clip.create_model("splat-ViT-B-16")
    fraction = freeze(clip, "clip")
    assert "training" in capsys.readouterr().out
    assert 0.05 <= fraction <= 0.15, fraction
    trainable = {n for n, p in clip.named_parameters() if p.requires_grad}
    assert all(n.startswith("visual.") for n in trainable)  # the text tower stays frozen
    assert "visual.head.proj.weight" in trainable
    assert not any(n.startswith("visual.trunk.blocks.2.") for n in trainable)


def test_open_clip_factory_and_splat_preprocess(astronaut_64):
    model, _, preprocess = timm_splat.create_model_and_transforms("splat-ViT-test", num_splats=24)
    assert isinstance(preprocess, SplatTransform) and preprocess.num_splats == 24
    preprocess = SplatTransform.from_config(model.visual.trunk, image_size=32, iterations=10)
    with torch.no_grad():
        assert model.encode_image(preprocess(astronaut_64)[None]).shape == (1, 32)


def test_models_work_without_compiled_kernels():
    code = (
        "import torch, timm, timm_splat\n"
        "from timm_splat import extension\n"
        "m = timm.create_model('splat_vit_test', num_splats=8,\n"
        "                      fit_options={'iterations': 3}).eval()\n"
        "x = (torch.rand(1, 3, 16, 16) - m.pixel_mean) / m.pixel_std\n"
        "with torch.no_grad(): print(tuple(m(x).shape), extension.cuda_kernels_loaded())\n"
    )
    env = dict(os.environ, TIMM_SPLAT_NO_KERNELS="1")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 1000) False"


@pytest.mark.parametrize("local", [True, False])
def test_local_latents_option_trains(local):
    """local_latents=False: plain Perceiver latents, no locality bias and no parameter for it."""
    torch.manual_seed(0)
    model = timm.create_model("splat_vit_test", local_latents=local, num_latents=36)
    resampler = model.patch_embed.resampler
    assert resampler.local_latents is local
    has_key = any(k.endswith("resampler.locality") for k in model.state_dict())
    assert has_key is local
    assert model._model_args["local_latents"] is local  # what save_for_hf writes
    assert f"local_latents={local}" in repr(resampler)
    s = random_splats(2, 30, dtype=torch.float32, padding=5)
    out = model(s)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert resampler.latents.grad.abs().sum() > 0
    if local:
        assert resampler.locality.grad.abs().sum() > 0
    with torch.no_grad():  # padding rows still change nothing
        padded = torch.cat([s, torch.zeros(2, 7, 8)], dim=1)
        torch.testing.assert_close(model.eval()(padded), model(s), rtol=1e-5, atol=1e-5)


def test_plain_latents_do_not_see_positions_through_a_bias():
    """Without the bias every latent's attention weights depend on content alone: moving the
    splats (Fourier features aside) changes nothing the bias would have added."""
    model = timm.create_model("splat_vit_test", local_latents=False)
    resampler = model.patch_embed.resampler
    positions = torch.rand(1, 5, 2)
    mask = torch.tensor([[True, True, False, True, True]])
    bias = resampler.attention_bias(positions, mask)
    assert bias.shape == (1, 1, 49, 6)
    assert torch.equal(bias[..., [0, 1, 3, 4, 5]], torch.zeros(1, 1, 49, 5))
    assert torch.isneginf(bias[..., 2]).all()


def test_local_latents_round_trip_through_timm_files(tmp_path):
    from timm.models import save_for_hf

    model = timm.create_model("splat_vit_test", local_latents=False, num_latents=36)
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)  # strict load
    assert not loaded.patch_embed.resampler.local_latents
    assert loaded.patch_embed.num_patches == 36
    s = random_splats(2, 30, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model.eval()(s), loaded.eval()(s))
    with pytest.raises(ValueError, match="local_latents must be True or False"):
        timm.create_model("splat_vit_test", local_latents="no")


def test_local_latents_survive_from_rgb_and_clip_save_load(rgb_clip, tmp_path):
    from safetensors.torch import save_file

    from timm_splat import hub
    from timm_splat.models import load_clip, set_local_latents, uses_local_latents

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2)
    student = from_rgb(vit, num_latents=98, local_latents=False)
    assert not uses_local_latents(student) and student.patch_embed.num_patches == 98
    assert "locality" not in "".join(student.state_dict())

    clip = from_rgb(rgb_clip, local_latents=False).eval()
    assert not uses_local_latents(clip)
    assert not any("locality" in k for k in clip.state_dict())
    s = random_splats(2, 30, dtype=torch.float32)
    with torch.no_grad():
        expected = clip.encode_image(s)
    # A training run's final folder (weights + run.json) and a Hub folder (open_clip layout).
    run = tmp_path / "run" / "final"
    run.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, run / "model.safetensors")
    (run / "run.json").write_text('{"model": "splat-ViT-test"}')
    folder = hub.save_pretrained(clip, tmp_path / "hub", model_name="splat-ViT-test")
    plain = open_clip.create_model(f"local-dir:{folder}")  # open_clip alone, strict load
    for source in (tmp_path / "run", folder, plain):
        loaded = load_clip(source)[0] if not isinstance(source, torch.nn.Module) else source
        assert not uses_local_latents(loaded), source
        assert loaded.visual.trunk._model_args["local_latents"] is False  # save_for_hf's args
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval().encode_image(s), expected, rtol=0, atol=0)
    # The timm layout of the same folder rebuilds the trunk from config.json's model_args.
    vit = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert not vit.patch_embed.resampler.local_latents

    model, _, _ = timm_splat.create_model_and_transforms("splat-ViT-test", local_latents=False)
    assert not uses_local_latents(model)
    set_local_latents(model, True)  # back on: a fresh bias, recorded in the model args
    assert uses_local_latents(model) and model.visual.trunk._model_args["local_latents"]
    assert model.visual.trunk.patch_embed.resampler.locality.shape == (2,)


def test_loading_weights_switches_the_locality_bias_to_match():
    """A state dict with the resampler's latents decides whether it has the locality bias; one
    without the resampler (from_rgb's: blocks only) leaves the new stem as it is."""
    plain = timm.create_model("splat_vit_test", local_latents=False)
    local = timm.create_model("splat_vit_test")
    with torch.no_grad():
        local.patch_embed.resampler.locality.fill_(0.25)
    model = timm.create_model("splat_vit_test")
    model.load_state_dict(plain.state_dict())
    assert not model.patch_embed.resampler.local_latents
    model.load_state_dict(local.state_dict())
    assert model.patch_embed.resampler.local_latents
    assert torch.equal(model.patch_embed.resampler.locality, torch.full((2,), 0.25))
    assert model._model_args["local_latents"] is True
    blocks_only = {k: v for k, v in plain.state_dict().items() if not k.startswith("patch_")}
    model.load_state_dict(blocks_only, strict=False)
    assert model.patch_embed.resampler.local_latents
