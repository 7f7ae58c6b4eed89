"""Creating and loading splat CLIPs, the way open_clip's ``factory`` does for RGB ones:
:func:`create_model_and_transforms` builds a ``splat-ViT-*`` config with a :class:`SplatTransform`
as its preprocess, :func:`load_clip` loads trained or published weights with their budget."""

from __future__ import annotations

import json
from pathlib import Path

from ..transforms import SplatTransform
from .clip import OPEN_CLIP_CONFIG, register_open_clip_configs, splat_trunk
from .convert import set_local_latents, set_quick_gelu
from .splat_vit import check_model_size


def create_model_and_transforms(model_name: str, pretrained: str | None = None, **kwargs):
    """``open_clip.create_model_and_transforms`` whose preprocess is a :class:`SplatTransform`
    (the same for training and evaluation: splats need no pixel augmentation here).

    ``num_splats`` (optional) overrides the budget of the model's cfg; ``local_latents=False``
    gives the stem plain Perceiver latents (no locality bias; an untrained model only); the rest
    goes to open_clip. Returns ``(model, preprocess_train, preprocess_val)``."""
    import open_clip

    register_open_clip_configs()
    num_splats = kwargs.pop("num_splats", None)
    local_latents = kwargs.pop("local_latents", True)
    if not local_latents and pretrained:
        raise ValueError(
            "local_latents=False with pretrained weights: load a model trained without the "
            "locality bias with timm_splat.load_clip, which reads the setting from its files"
        )
    model = open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
    trunk = splat_trunk(model)
    if trunk is None:
        raise ValueError(f"{model_name!r} is not a splat model: use a splat-ViT-* config")
    if not local_latents:
        set_local_latents(model, False)
    if num_splats:
        trunk.num_splats = num_splats
    preprocess = SplatTransform.from_config(trunk)
    return model, preprocess, preprocess


def _strip_prefixes(state: dict) -> dict:
    # DDP ("module.") and torch.compile ("_orig_mod.") wrappers prefix every key.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def resolve_run(path: Path) -> tuple[Path, dict]:
    """A run dir / final dir / weights file -> (weights file, run.json contents or {})."""
    if path.is_dir():
        for weights in (path / "final" / "model.safetensors", path / "model.safetensors"):
            if weights.is_file():
                path = weights
                break
        else:
            raise ValueError(
                f"{path}: no final/model.safetensors or model.safetensors "
                "(a training run directory, or a saved Hub folder)"
            )
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: weights must be a .safetensors file (pickle checkpoints are not loaded)"
        )
    run_file = path.parent / "run.json"
    return path, json.loads(run_file.read_text()) if run_file.is_file() else {}


def load_clip(
    pretrained=None, model_name: str | None = None, *, num_splats: int | None = None, device="cpu"
):
    """A splat CLIP and what is known about it: ``(model, info)`` in eval mode.

    ``pretrained``: ``hf-hub:org/repo``, a local Hub folder (``open_clip_config.json``), a
    training run directory (``final/model.safetensors`` + ``final/run.json``), a
    ``.safetensors`` state dict, or None (random weights, for smoke tests). ``model_name``: the
    ``splat-ViT-*`` config (read from run.json / the Hub config when there). ``num_splats``
    overrides the stored budget. ``info``: ``model`` (config name), ``num_splats``,
    ``tokenizer`` (the name for ``open_clip.get_tokenizer``) and ``run`` (run.json or {})."""
    import open_clip
    from safetensors.torch import load_file

    register_open_clip_configs()
    run, stored = {}, {}
    pretrained = None if pretrained is None else str(pretrained)
    local = Path(pretrained) if pretrained and not pretrained.startswith("hf-hub:") else None
    if pretrained and (local is None or (local / OPEN_CLIP_CONFIG).is_file()):
        # A published model: open_clip reads its config and weights (also from a local folder).
        source = pretrained if local is None else f"local-dir:{local}"
        if local is None:
            from huggingface_hub import hf_hub_download

            config_file = hf_hub_download(pretrained.removeprefix("hf-hub:"), OPEN_CLIP_CONFIG)
        else:
            config_file = local / OPEN_CLIP_CONFIG
        config = json.loads(Path(config_file).read_text())
        text = config.get("model_cfg", {}).get("text_cfg", {})
        check_model_size(
            text.get("width", 512),
            text.get("layers", 12),
            text.get("mlp_ratio", 4.0),
            what=f"the text tower of {pretrained}",
        )
        # Weights saved with local_latents=False switch the stem to match as they load.
        model = open_clip.create_model(source, device=device)
        stored = config.get("timm_splat", {})
        name, tokenizer = stored.get("model_name"), source
        if model_name and name and model_name != name:
            raise ValueError(f"{pretrained} holds a {name}, not a {model_name}")
    else:
        weights = None
        if local is not None:
            if not local.exists():
                raise ValueError(f"--pretrained {pretrained}: no such file or directory")
            weights, run = resolve_run(local)
        name = run.get("model") or model_name
        if model_name and name != model_name:
            raise ValueError(f"{pretrained} was trained as {name}, not {model_name}")
        if not name:
            raise ValueError(
                "say which model: a model name (splat-ViT-...) or a run directory "
                "whose run.json names it"
            )
        model = open_clip.create_model(name)
        trunk = splat_trunk(model)
        if trunk is None:
            raise ValueError(f"{name!r} is not a splat model: use a splat-ViT-* config")
        if run.get("quick_gelu"):
            set_quick_gelu(model)
        if weights is not None:
            model.load_state_dict(_strip_prefixes(load_file(str(weights))), strict=True)
        model.to(device)
        tokenizer = name
    trunk = splat_trunk(model)
    if trunk is None:
        raise ValueError(f"{pretrained} is not a splat model")
    budget = int(
        num_splats or run.get("num_splats") or stored.get("num_splats") or trunk.num_splats
    )
    trunk.num_splats = budget
    info = {
        "model": name,
        "num_splats": budget,
        "tokenizer": tokenizer,
        "run": run,
        "pretrained": pretrained,
    }
    return model.eval(), info


# Far above any classifier trained here; a run.json asking for more was edited or damaged.
MAX_CLASSES = 100_000


def _recorded_int(run: dict, key: str, where, low: int = 1, high: int = 10**7):
    value = run.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{where}: {key} must be a whole number in [{low}, {high}], got {value!r}")
    return value


def load_classifier(pretrained, model_name: str | None = None, *, num_splats=None, device="cpu"):
    """A timm classifier (splat or RGB) trained by ``timm-splat train``, and what is known
    about it: ``(model, info)`` in eval mode, loaded the timm way (``timm.create_model(name,
    pretrained=True, pretrained_cfg_overlay=dict(file=...))``, the head kept).

    ``pretrained``: a run directory, its ``final/`` or a ``.safetensors`` file beside a
    run.json; ``hf-hub:org/repo`` or a saved timm folder (``config.json``) load through timm's
    own Hub path. ``model_name`` overrides what run.json names; ``num_splats`` the budget."""
    import timm

    pretrained = str(pretrained)
    local = None if pretrained.startswith("hf-hub:") else Path(pretrained)
    if local is None or (local / "config.json").is_file():
        source = pretrained if local is None else f"local-dir:{local}"
        model, run = timm.create_model(source, pretrained=True), {}
        name = model.pretrained_cfg.get("architecture", source)
    else:
        if not local.exists():
            raise ValueError(f"--pretrained {pretrained}: no such file or directory")
        weights, run = resolve_run(local)
        name = model_name or run.get("model")
        if not name or not timm.is_model(name):
            raise ValueError(
                f"{pretrained}: say which timm model it is (run.json names {name!r}; pass "
                "--model splat_vit_... or vit_...)"
            )
        num_classes = _recorded_int(run, "num_classes", local, high=MAX_CLASSES)
        kwargs = {"num_classes": num_classes} if num_classes else {}
        if name.startswith("splat_vit"):
            for key in ("num_latents", "num_splats"):
                value = _recorded_int(run, key, local)
                if value:
                    kwargs[key] = value
            if run.get("local_latents") is False:
                kwargs["local_latents"] = False
        overlay = dict(file=str(weights), **({"num_classes": num_classes} if num_classes else {}))
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    trunk = splat_trunk(model)
    if trunk is not None and num_splats:
        trunk.num_splats = int(num_splats)
    info = {
        "model": name,
        "num_splats": trunk.num_splats if trunk is not None else None,
        "num_classes": model.num_classes,
        "run": run,
        "pretrained": pretrained,
    }
    return model.to(device).eval(), info


def model_task(name: str) -> str:
    """``classify`` for a timm model name (``splat_vit_mini``, ``vit_mini_patch7_28``), ``clip``
    for an open_clip config (``splat-ViT-Mini-7``, ``ViT-Mini-7``, ``local-dir:...``)."""
    import timm

    register_open_clip_configs()
    import open_clip

    if open_clip.get_model_config(name) is None and timm.is_model(name):
        return "classify"
    return "clip"
