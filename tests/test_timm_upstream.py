"""Two of timm's own generic model tests, vendored from timm 1.0.31's tests/test_models.py
(Apache-2.0, https://github.com/huggingface/pytorch-image-models) and pointed at the splat ViTs.

Verbatim below the marked line: the constants and ``_get_input_size`` they use and the test
bodies. What differs, and why:
- the model list: ``list_models(module=FEAT_INTER_FILTERS, exclude_filters=EXCLUDE_FILTERS)``
  becomes the registered ``splat_vit_*`` (timm's list is of timm's own modules), the full-size
  ones beyond splat_vit_b16 marked slow as in tests/test_timm_contract.py;
- timm's ``features`` / ``timeout`` marks are dropped (its CI sharding and the pytest-timeout
  plugin, which this project does not use).
timm feeds ``torch.randn`` pixels at the cfg's input size (the splat ViTs declare
``fixed_input_size``: the latent grid does not follow the input), so each test fits them with
the model's in-model fitter first. This file is kept out of ruff so it stays as timm wrote it.
"""

import pytest
import timm
import torch
from timm import create_model, get_pretrained_cfg_value
from timm.layers import get_channel_dim, get_spatial_dim

import timm_splat  # noqa: F401  (registers the models)

FAST = ["splat_vit_test", "splat_vit_mini", "splat_vit_s16", "splat_vit_b16"]
SPLAT_MODELS = [
    pytest.param(name, marks=[] if name in FAST else pytest.mark.slow)
    for name in timm.list_models("splat_vit_*")
]


def test_the_vendored_tests_cover_every_splat_model():
    assert {p.values[0] for p in SPLAT_MODELS} == set(timm.list_models("splat_vit_*"))


# ---- verbatim from timm 1.0.31 tests/test_models.py below, except the parametrize lines ----

TARGET_FFEAT_SIZE = 96
MAX_FFEAT_SIZE = 256


def _get_input_size(model=None, model_name='', target=None):
    if model is None:
        assert model_name, "One of model or model_name must be provided"
        input_size = get_pretrained_cfg_value(model_name, 'input_size')
        fixed_input_size = get_pretrained_cfg_value(model_name, 'fixed_input_size')
        min_input_size = get_pretrained_cfg_value(model_name, 'min_input_size')
    else:
        default_cfg = model.default_cfg
        input_size = default_cfg['input_size']
        fixed_input_size = default_cfg.get('fixed_input_size', None)
        min_input_size = default_cfg.get('min_input_size', None)
    assert input_size is not None

    if fixed_input_size:
        return input_size

    if min_input_size:
        if target and max(input_size) > target:
            input_size = min_input_size
    else:
        if target and max(input_size) > target:
            input_size = tuple([min(x, target) for x in input_size])
    return input_size


@pytest.mark.parametrize('model_name', SPLAT_MODELS)
@pytest.mark.parametrize('batch_size', [1])
def test_model_forward_intermediates_features(model_name, batch_size):
    """Run a single forward pass with each model in feature extraction mode"""
    model = create_model(model_name, pretrained=False, features_only=True, feature_cls='getter')
    model.eval()
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()

    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    if max(input_size) > MAX_FFEAT_SIZE:
        pytest.skip("Fixed input size model > limit.")
    output_fmt = getattr(model, 'output_fmt', 'NCHW')
    feat_axis = get_channel_dim(output_fmt)
    spatial_axis = get_spatial_dim(output_fmt)
    import math

    outputs = model(torch.randn((batch_size, *input_size)))
    assert len(expected_channels) == len(outputs)
    spatial_size = input_size[-2:]
    for e, r, o in zip(expected_channels, expected_reduction, outputs):
        print(o.shape)
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(spatial_size[0] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(spatial_size[1] / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()


@pytest.mark.parametrize('model_name', SPLAT_MODELS)
@pytest.mark.parametrize('batch_size', [1])
def test_model_forward_intermediates(model_name, batch_size):
    """Run a single forward pass with each model in feature extraction mode"""
    model = create_model(model_name, pretrained=False)
    model.eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    expected_channels = feature_info.channels()
    expected_reduction = feature_info.reduction()
    assert len(expected_channels) >= 3  # all models here should have at least 3 feature levels

    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    if max(input_size) > MAX_FFEAT_SIZE:
        pytest.skip("Fixed input size model > limit.")
    output_fmt = 'NCHW'  # NOTE output_fmt determined by forward_intermediates() arg, not model attribute
    feat_axis = get_channel_dim(output_fmt)
    spatial_axis = get_spatial_dim(output_fmt)
    import math

    inpt = torch.randn((batch_size, *input_size))
    output, intermediates = model.forward_intermediates(
        inpt,
        output_fmt=output_fmt,
    )
    assert len(expected_channels) == len(intermediates)
    spatial_size = input_size[-2:]
    for e, r, o in zip(expected_channels, expected_reduction, intermediates):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(spatial_size[0] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(spatial_size[1] / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()

    output2 = model.forward_features(inpt)
    torch.testing.assert_close(output, output2, rtol=1e-5, atol=1e-8)

    # Test that grad-checkpointing, if supported
    try:
        model.set_grad_checkpointing()
    except Exception:
        # throws if not supported, that's fine
        pass
    else:
        output3, _ = model.forward_intermediates(
            inpt,
            output_fmt=output_fmt,
        )
        torch.testing.assert_close(output, output3, rtol=1e-4, atol=1e-5)

