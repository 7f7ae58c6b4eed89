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
    run = _read_config(run_file) if run_file.is_file() else {}
    budget, model, quick = run.get("num_splats"), run.get("model"), run.get("quick_gelu", False)
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int) or budget < 1
    ):
        raise ValueError(f"{run_file}: num_splats must be a positive int, got {budget!r}")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"{run_file}: model must be a config name, got {model!r}")
    if not isinstance(quick, bool):
        raise ValueError(f"{run_file}: quick_gelu must be true or false, got {quick!r}")
    _check_against_weights(run, path, run_file)
    return path, run


# What builds the model again, copied into the weights file's header when training writes it,
# so an edited run.json (quick_gelu, the budget, the latents) cannot change the model silently.
RUN_METADATA_KEY = "timm_splat_run"
MODEL_DEFINING = (
    "model",
    "num_splats",
    "num_classes",
    "num_latents",
    "quick_gelu",
    "local_latents",
)


def run_metadata(run: dict) -> dict[str, str]:
    """The safetensors metadata training writes beside its weights (see above)."""
    return {RUN_METADATA_KEY: json.dumps({k: run.get(k) for k in MODEL_DEFINING})}


def _check_against_weights(run: dict, weights: Path, run_file: Path) -> None:
    if not run:
        return
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            stored = (f.metadata() or {}).get(RUN_METADATA_KEY)
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f"{weights} is not a readable safetensors file ({exc})") from None
    if stored is None:  # weights written before the header recorded the run
        return
    try:
        recorded = json.loads(stored)
    except (ValueError, RecursionError):  # RecursionError: deeply nested brackets
        raise ValueError(f"{weights}: its {RUN_METADATA_KEY} header is not JSON") from None
    changed = [
        k
        for k in MODEL_DEFINING
        if k in run and isinstance(recorded, dict) and run[k] != recorded.get(k)
    ]
    if not isinstance(recorded, dict) or changed:
        key = changed[0] if changed else RUN_METADATA_KEY
        raise ValueError(
            f"{run_file} says {key} = {run.get(key)!r}, but {weights.name} was trained with "
            f"{recorded.get(key) if isinstance(recorded, dict) else '?'!r}: run.json was edited "
            "or belongs to other weights; restore it from the training run"
        )


def _read_config(path: Path, what: str = "a JSON object") -> dict:
    """A model folder's JSON file as a dict, or ValueError naming the file."""
    try:
        data = json.loads(path.read_bytes())
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a model config") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not {what}")
    return data


def _check_open_clip_config(config: dict, path: Path) -> None:
    """What open_clip would build from ``config``, checked before it allocates: a splat trunk,
    a sane size for the text tower and projections, and timm_splat's own entries."""
    from timm.models import is_model

    model_cfg = config.get("model_cfg")
    vision, text = (
        (model_cfg.get(k) for k in ("vision_cfg", "text_cfg"))
        if isinstance(model_cfg, dict)
        else (None, None)
    )
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise ValueError(f"{path}: model_cfg needs vision_cfg and text_cfg objects")
    trunk = vision.get("timm_model_name")
    if not (isinstance(trunk, str) and trunk.startswith("splat_vit") and is_model(trunk)):
        raise ValueError(
            f"{path}: vision_cfg.timm_model_name is {trunk!r}, not a splat ViT (splat_vit_*): "
            "this is not a timm-splat model folder"
        )
    width = text.get("width", 512)
    embed_dim = model_cfg.get("embed_dim", 512)
    context = text.get("context_length", 77)
    check_model_size(
        width,
        text.get("layers", 12),
        text.get("mlp_ratio", 4.0),
        what=f"the text tower of {path}",
        tables={
            "vocab_size": text.get("vocab_size", 49408),
            "context_length": context,
            "embed_dim": embed_dim,  # the text projection
        },
        # open_clip's causal mask is context x context; the image projection at most 4096 wide
        extra={
            "attention mask": context * context if isinstance(context, int) else context,
            "image projection": embed_dim * 4096 if isinstance(embed_dim, int) else embed_dim,
        },
    )
    stored = config.get("timm_splat", {})
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: timm_splat must be an object, got {stored!r:.60}")
    budget = stored.get("num_splats")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int) or budget < 1
    ):
        raise ValueError(f"{path}: timm_splat.num_splats must be a positive int, got {budget!r}")
    name = stored.get("model_name")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"{path}: timm_splat.model_name must be a string, got {name!r}")


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
    from safetensors import SafetensorError
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
        config = _read_config(Path(config_file))
        _check_open_clip_config(config, Path(config_file))
        # Weights saved with local_latents=False switch the stem to match as they load.
        try:
            model = open_clip.create_model(source, device=device)
        except SafetensorError as exc:
            raise ValueError(
                f"{pretrained}: the weights do not load ({exc}); restore them"
            ) from exc
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
            try:
                state = load_file(str(weights))
            except SafetensorError as exc:
                raise ValueError(f"{weights} is not a readable safetensors file ({exc})") from exc
            try:
                model.load_state_dict(_strip_prefixes(state), strict=True)
            except RuntimeError as exc:  # missing / unexpected keys, other shapes
                first = str(exc).strip().splitlines()[0]
                raise ValueError(f"{weights} does not fit a {name}: {first}") from exc
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
        try:
            model, run = timm.create_model(source, pretrained=True), {}
        except (TypeError, RuntimeError, KeyError) as exc:  # an edited or foreign config.json
            raise ValueError(
                f"{pretrained}: its config.json does not build a classifier its weights fit "
                f"({type(exc).__name__}: {exc}); save it again with timm-splat push"
            ) from exc
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


def pixel_config(model) -> tuple[tuple[int, int], tuple, tuple]:
    """``(size, mean, std)`` an RGB model's pixels are prepared with: an open_clip CLIP's
    ``preprocess_cfg`` or a timm model's data config."""
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "preprocess_cfg"):
        cfg = visual.preprocess_cfg
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return size, tuple(cfg["mean"]), tuple(cfg["std"])
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    return tuple(cfg["input_size"][-2:]), tuple(cfg["mean"]), tuple(cfg["std"])


def pixel_transform(model):
    """The eval transform an RGB model's images go through: open_clip's ``image_transform`` of
    a CLIP's preprocess config, or timm's ``create_transform`` of a timm model's data config."""
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "preprocess_cfg"):
        import open_clip

        cfg = visual.preprocess_cfg
        return open_clip.image_transform(
            cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"]
        )
    from timm.data import create_transform, resolve_model_data_config

    return create_transform(**resolve_model_data_config(model), is_training=False)
