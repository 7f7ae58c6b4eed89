"""``timm-splat-benchmark``: LAION's clip_benchmark with splat CLIPs
(``pip install clip_benchmark``).

    timm-splat-benchmark eval --model splat-ViT-B-16 --pretrained runs/gs400 \\
        --dataset cifar10 --dataset_root data/cifar10 --task zeroshot_classification

The arguments are clip_benchmark's own (``clip_benchmark eval ...``); this wrapper registers a
``splat`` model type in clip_benchmark's loader registry (``clip_benchmark.models.TYPE2FUNC``
and ``MODEL_TYPES``), makes it the default ``--model_type``, and runs clip_benchmark's CLI.
``--pretrained`` is what :func:`timm_splat.models.load_clip` takes (run dir, .safetensors file,
saved Hub folder, ``hf-hub:org/repo``). Images are fitted a batch at a time by the model
(:func:`load_splat`); for ImageNet, ``timm-splat eval`` on a pre-fitted dataset is faster still.

numpy >= 2.4: clip_benchmark's zero-shot ``accuracy()`` (metrics/zeroshot_classification.py)
does ``float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy())``, a float() of
a 1-element 1-d array: deprecated since numpy 1.25 and a TypeError ("only 0-dimensional arrays
can be converted to Python scalars") since 2.4, so every zero-shot classification run fails.
:func:`register` patches around it (see :func:`_scalar_float`).
"""

from __future__ import annotations

import sys

MODEL_TYPE = "splat"
INSTALL_HINT = "timm-splat-benchmark needs LAION's clip_benchmark: pip install clip_benchmark"


def load_splat(
    model_name: str, pretrained: str | None = None, cache_dir: str | None = None, device="cpu"
):
    """clip_benchmark's loader contract: ``(model, transform, tokenizer)``.

    clip_benchmark runs the transform per image in its DataLoader workers and hands batches to
    ``model.encode_image``: the transform only resizes and crops to [0, 1] pixels, and the
    model fits each whole batch in one call, on its own device (the splat ViT's pixel path, told
    that its pixels are not normalised)."""
    import open_clip

    from ..models import load_clip, splat_trunk
    from ..transforms import SplatTransform

    model, info = load_clip(pretrained or None, model_name or None, device=device)
    trunk = splat_trunk(model)
    trunk.set_pixel_normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    transform = SplatTransform.from_config(trunk).image_transform
    return model, transform, open_clip.get_tokenizer(info["tokenizer"])


def _scalar_float(value=0.0):
    """``float`` as numpy < 2.4 let clip_benchmark use it: a size-1 array becomes its element."""
    import numpy as np

    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(())[()]
    return float(value)


def _patch_numpy_scalars() -> None:
    try:
        from clip_benchmark.metrics import zeroshot_classification
    except ImportError:  # layout changed: nothing to patch
        return
    # Shadowing the builtin in that module's namespace fixes accuracy() whichever version is
    # installed (older ones return counts, newer ones fractions) without copying its code.
    zeroshot_classification.float = _scalar_float


def register() -> None:
    """Add the ``splat`` model type to clip_benchmark (ImportError with the pip hint if it is
    not installed)."""
    try:
        import clip_benchmark.models as models
    except ImportError as exc:
        if (exc.name or "clip_benchmark").split(".")[0] != "clip_benchmark":
            raise ImportError(
                f"clip_benchmark is installed but importing it failed: {exc}"
            ) from exc
        raise ImportError(INSTALL_HINT) from exc
    registry = getattr(models, "TYPE2FUNC", None)
    if not isinstance(registry, dict):
        raise RuntimeError(
            "this clip_benchmark has no TYPE2FUNC loader registry in "
            "clip_benchmark.models: cannot register the splat model type"
        )
    registry[MODEL_TYPE] = load_splat
    types = getattr(models, "MODEL_TYPES", None)
    # The CLI's --model_type choices and load_clip's check use this very list object.
    if isinstance(types, list) and MODEL_TYPE not in types:
        types.append(MODEL_TYPE)
    _patch_numpy_scalars()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        register()
        from clip_benchmark import cli
    except ImportError as exc:
        print(f"timm-splat-benchmark: error: {exc}", file=sys.stderr)
        return 2
    if argv[:1] == ["eval"] and not any(a.startswith("--model_type") for a in argv):
        argv += ["--model_type", MODEL_TYPE]
    saved, sys.argv = sys.argv, ["clip_benchmark", *argv]  # its CLI parses sys.argv itself
    try:
        return cli.main() or 0
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(main())
