"""Publish splat models on the Hugging Face Hub, in timm's and open_clip's layouts at once.

One repo folder serves both libraries (weights only as safetensors, never pickle)::

    config.json + model.safetensors                          timm: the image tower
    open_clip_config.json + open_clip_model.safetensors      open_clip: the whole CLIP
    README.md                                                model card (hub/model_card.md)

so that, after ``import timm_splat``::

    timm.create_model("hf-hub:org/repo", pretrained=True)(splats)   # == clip.encode_image(splats)
    open_clip.create_model_and_transforms("hf-hub:org/repo")        # the CLIP

For a CLIP the timm model is the vision trunk with the CLIP projection as its classifier head
(a Linear with a zero bias), so timm gives the image embedding (before L2 normalisation). The
splat budget travels in timm's ``model_args`` (``num_splats``) and in a ``timm_splat`` block of
``open_clip_config.json`` (open_clip itself has no field for it;
:func:`timm_splat.models.load_clip` reads it).

``timm-splat push RUN_DIR REPO_ID`` publishes a training run (``final/model.safetensors`` +
``final/run.json``, written by :mod:`timm_splat.training`); dataset uploaders send pre-fitted
shards (:func:`timm_splat.data.prefit`) to a dataset repo as they finish.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .resources import card_template

logger = logging.getLogger(__name__)

TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = "model.safetensors"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
CARD = "README.md"
# Pickle-based checkpoint formats: never published (loading one runs arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


CARD_TEMPLATE = card_template("model_card.md")
# Factory arguments about where weights come from, not the architecture. (Drop rates stay, so
# the rebuilt model matches module for module; timm's config writer leaves them out.)
_RUNTIME_ARGS = {
    "pretrained_model_args",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "device",
    "dtype",
    "cache_dir",
}
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ----------------------------------------------------------------------------- saving


def open_clip_config_name(model) -> str:
    """The ``splat-ViT-*`` config a splat CLIP was built from: the config whose timm trunk and
    embedding width match the model's."""
    from .models.clip import CONFIG_DIR, splat_trunk

    trunk = splat_trunk(model)
    arch = trunk.pretrained_cfg.get("architecture")
    embed_dim = model.text_projection.shape[-1] if hasattr(model, "text_projection") else None
    matches = []
    for path in sorted(CONFIG_DIR.glob("*.json")):
        cfg = json.loads(path.read_text())
        if cfg["vision_cfg"].get("timm_model_name") == arch and cfg["embed_dim"] == embed_dim:
            matches.append(path.stem)
    if len(matches) != 1:
        raise ValueError(
            f"cannot tell the open_clip config of this CLIP (trunk {arch!r}, embed_dim "
            f"{embed_dim}): {matches or 'no config'} matches; pass model_name='splat-ViT-...'"
        )
    return matches[0]


def _timm_export(model, trunk, num_splats: int):
    """A fresh timm model, built from the arguments config.json will hold, with ``model``'s
    weights: what ``timm.create_model("hf-hub:...", pretrained=True)`` will rebuild."""
    import timm
    from timm.models import PretrainedCfg

    from .models import uses_quick_gelu

    arch = trunk.pretrained_cfg.get("architecture")
    if not arch or not timm.is_model(arch):
        raise ValueError(
            f"the trunk's architecture {arch!r} is not a registered timm model: save models built "
            "with timm.create_model('splat_vit_*') or open_clip's splat-ViT-* configs"
        )
    args = {k: v for k, v in getattr(trunk, "_model_args", {}).items() if k not in _RUNTIME_ARGS}
    if uses_quick_gelu(trunk):  # from_rgb of OpenAI weights swaps it in
        args["act_layer"] = "quick_gelu"
    state = dict(trunk.state_dict())
    if trunk is model:
        num_classes = trunk.num_classes
    else:  # the CLIP projection becomes timm's classifier head
        head = model.visual.head
        if [name for name, _ in head.named_children()] != [
            "drop",
            "proj",
        ] or head.proj.bias is not None:
            raise ValueError(
                "only splat CLIPs with a plain linear projection (timm_proj='linear') "
                "map onto a timm classifier head"
            )
        num_classes = head.proj.out_features
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state["head.weight"] = head.proj.weight.detach()
        state["head.bias"] = torch.zeros(num_classes, dtype=head.proj.weight.dtype)
    args.update(num_classes=num_classes, global_pool=trunk.global_pool, num_splats=num_splats)
    export = timm.create_model(arch, **args)
    export.load_state_dict(state, strict=True)
    for name, child in export.named_children():
        # Anything swapped after construction would load fine and compute something else.
        if name != "head" and repr(child) != repr(getattr(trunk, name)):
            raise ValueError(
                f"the trunk's {name!r} differs from what {arch}({args}) builds: it "
                "was changed after construction and cannot be published as is"
            )
    # config.json's pretrained_cfg is rebuilt into timm's PretrainedCfg: only its fields (not
    # num_splats, which travels in model_args) and no source tag (these are new weights).
    # Nor a local weights file a loader was pointed at (timm would look for it again).
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)} - {"tag", "file", "state_dict"}
    export.pretrained_cfg = {k: v for k, v in trunk.pretrained_cfg.items() if k in fields}
    return export.eval(), args


def _cpu_tensors(state: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _save_open_clip(model, folder: Path, name: str, num_splats: int) -> None:
    import open_clip
    from safetensors.torch import save_file

    from .models.clip import CONFIG_DIR, OPEN_CLIP_CONFIG

    if not (CONFIG_DIR / f"{name}.json").is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"no splat open_clip config {name!r}; known: {known}")
    config = {
        "model_cfg": json.loads((CONFIG_DIR / f"{name}.json").read_text()),
        "preprocess_cfg": dict(open_clip.get_model_preprocess_cfg(model)),
        # open_clip ignores unknown top-level keys; timm_splat.models.load_clip reads this one.
        "timm_splat": {"model_name": name, "num_splats": num_splats},
    }
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(
        _cpu_tensors(model.state_dict()), str(folder / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"}
    )


def _hub_id(value) -> str | None:
    """``value`` as a Hub repo id for the card's metadata (which the Hub validates), else None."""
    if not value:
        return None
    value = str(value).removeprefix("hf-hub:")
    if Path(value).expanduser().exists():  # "data/train" is a local folder, not a repo
        return None
    return value if _REPO_ID.match(value) else None


def _format_metric(value):
    return f"{value:.4g}" if isinstance(value, float) else value


def _write_card(
    folder: Path,
    *,
    architecture,
    num_classes,
    repo_id,
    open_clip_name,
    num_splats,
    metrics,
    data,
    base_model,
    stage,
    parameters,
) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    from .splats import compression_ratio

    tags = ["timm", "timm-splat", "gaussian-splatting", "image-feature-extraction"]
    if open_clip_name:
        tags += ["open_clip", "clip", "zero-shot-image-classification"]
    card_data = ModelCardData(
        library_name="timm",
        license="apache-2.0",
        tags=tags,
        pipeline_tag="zero-shot-image-classification" if open_clip_name else "image-classification",
        base_model=_hub_id(base_model),
        datasets=[_hub_id(data)] if _hub_id(data) else None,
    )
    values = dict(
        title=repo_id.split("/")[-1] if repo_id else architecture,
        kind="CLIP model" if open_clip_name else "vision transformer",
        repo_id=repo_id or "ORG/REPO",
        architecture=architecture,
        open_clip_name=open_clip_name,
        num_splats=num_splats,
        splat_bytes=16 * num_splats,
        compression=f"{compression_ratio(num_splats):.1f}",
        output=(
            f"{num_classes}-d CLIP image embedding (timm) / CLIP (open_clip)"
            if open_clip_name
            else f"{num_classes} classes"
        ),
        parameters=f"{parameters / 1e6:.1f}M",
        stage=stage,
        data=data,
        base_model=base_model,
        metrics={k: _format_metric(v) for k, v in (metrics or {}).items()},
    )
    if CARD_TEMPLATE is not None:
        card = ModelCard.from_template(card_data, template_path=str(CARD_TEMPLATE), **values)
    else:  # an installed wheel has no hub/ folder: huggingface_hub's default template
        card = ModelCard.from_template(card_data, model_id=values["title"])
    card.save(folder / CARD)


def save_pretrained(
    model,
    folder,
    *,
    num_splats: int | None = None,
    metrics: dict | None = None,
    data: str | None = None,
    base_model: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    stage: str | None = None,
) -> Path:
    """Write ``model`` as a Hub repo folder (see the module docstring); returns the folder.

    ``model``: a splat CLIP (open_clip ``splat-ViT-*``; ``model_name`` names its config when it
    cannot be inferred) or a timm splat ViT (timm layout only). ``num_splats``: the budget the
    weights expect (default: the model's). ``metrics`` / ``data`` / ``base_model`` / ``stage`` go
    into the model card; ``repo_id`` into its snippets.
    """
    from timm.models import save_for_hf

    from .models.clip import splat_trunk

    trunk = splat_trunk(model)
    if trunk is None:
        raise TypeError(
            f"save_pretrained takes a splat CLIP or a splat ViT, got {type(model).__name__}"
        )
    bad = [
        k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise ValueError(
            f"the model has non-finite weights ({bad[0]}, ...): nothing is saved or published; "
            "train it again from a checkpoint before the loss diverged"
        )
    is_clip = trunk is not model
    num_splats = int(num_splats or trunk.num_splats)
    if num_splats < 1:
        raise ValueError(f"num_splats must be positive, got {num_splats}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in folder.iterdir()]
    if stale:
        raise FileExistsError(f"{folder} is not empty ({stale[:5]}): save into a new folder")

    export, args = _timm_export(model, trunk, num_splats)
    # timm's own writer keeps config.json in the format its loader expects.
    save_for_hf(
        export,
        str(folder),
        model_config={"model_args": {"num_splats": num_splats}},
        safe_serialization=True,
    )
    open_clip_name = None
    if is_clip:
        if "act_layer" in args:
            # open_clip builds timm towers with timm's default GELU: these weights would load
            # and compute something else. timm's layout records the activation, so it is kept.
            warnings.warn(
                "the trunk uses QuickGELU, which open_clip configs of timm towers cannot "
                "express: writing the timm layout only",
                stacklevel=2,
            )
        else:
            open_clip_name = model_name or open_clip_config_name(model)
            _save_open_clip(model, folder, open_clip_name, num_splats)
    _write_card(
        folder,
        architecture=trunk.pretrained_cfg["architecture"],
        num_classes=export.num_classes,
        repo_id=repo_id,
        open_clip_name=open_clip_name,
        num_splats=num_splats,
        metrics=metrics,
        data=data,
        base_model=base_model,
        stage=stage,
        parameters=sum(p.numel() for p in model.parameters()),
    )
    return folder


# ---------------------------------------------------------------------------- pushing


def push_to_hub(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str | None = None,
    api=None,
    token: str | None = None,
):
    """Create ``repo_id`` (if new) and upload ``folder``; returns ``upload_folder``'s result.

    ``api``: an ``HfApi``-like object (``create_repo`` + ``upload_folder``), by default
    ``HfApi(token=token)``; tests pass a recorder."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.rglob("*") if p.is_file())
    pickled = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise ValueError(f"{folder} holds pickle checkpoints {pickled}: publish safetensors only")
    if TIMM_CONFIG not in files:
        raise ValueError(
            f"{folder} is not a saved model folder (no {TIMM_CONFIG}): use save_pretrained first"
        )
    if api is None:
        from huggingface_hub import HfApi

        from .version import __version__

        api = HfApi(token=token, library_name="timm-splat", library_version=__version__)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(url, "repo_id", None) or repo_id  # the owner may have been implicit
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=commit_message or "Add timm-splat model",
    )


def push_run(
    run_dir,
    repo_id: str,
    *,
    private: bool = False,
    folder=None,
    push: bool = True,
    api=None,
    token: str | None = None,
    commit_message: str | None = None,
) -> Path | None:
    """Publish a training run: build its model (open_clip, no pretrained weights), load
    ``final/model.safetensors``, :func:`save_pretrained` it (into ``folder``, else a temporary
    folder) with run.json's budget, metrics and data, and push it unless ``push`` is False.
    Returns ``folder`` (None when it was temporary)."""
    from .models.factory import load_classifier, load_clip, resolve_run

    local = Path(run_dir)
    recorded = resolve_run(local)[1] if local.exists() else {}
    load = load_classifier if recorded.get("task") == "classify" else load_clip
    model, info = load(run_dir)
    run = info["run"]
    base_model = run.get("base_model")
    teacher_weights = str(run.get("teacher_pretrained") or "")
    if not base_model and teacher_weights.startswith("hf-hub:"):
        base_model = teacher_weights  # a Hub id: goes into the card's base_model metadata
    elif not base_model and run.get("teacher"):
        base_model = " ".join(str(run[k]) for k in ("teacher", "teacher_pretrained") if run.get(k))
    card = dict(
        num_splats=info["num_splats"],
        metrics=run.get("metrics"),
        data=run.get("data"),
        base_model=base_model,
        model_name=info["model"],
        repo_id=repo_id,
        stage=run.get("stage"),
    )
    if folder is not None:
        save_pretrained(model, folder, **card)
        if push:
            push_to_hub(
                folder,
                repo_id,
                private=private,
                commit_message=commit_message,
                api=api,
                token=token,
            )
        return Path(folder)
    with tempfile.TemporaryDirectory(prefix="timm-splat-push-") as tmp:
        save_pretrained(model, Path(tmp) / "repo", **card)
        if push:
            push_to_hub(
                Path(tmp) / "repo",
                repo_id,
                private=private,
                commit_message=commit_message,
                api=api,
                token=token,
            )
    return None


# ------------------------------------------------------------------ uploading datasets


class HubUploader:
    """Uploads each file as it is finished to a Hub dataset repo (created on first use).

    One commit per shard: ``datasets.Dataset.push_to_hub`` would replace the whole split, and
    a crash would lose what was uploaded."""

    def __init__(
        self, repo_id: str, private: bool | None = None, token: str | None = None, retries: int = 4
    ):
        from huggingface_hub import HfApi

        self.repo_id, self.private, self.target = repo_id, private, f"hf://datasets/{repo_id}"
        self.api = HfApi(token=token)
        self.retries = retries
        self._created = False

    def __call__(self, local_path: Path, path_in_repo: str) -> None:
        if not self._created:
            self.api.create_repo(
                self.repo_id, repo_type="dataset", private=self.private, exist_ok=True
            )
            self._created = True
        for attempt in range(self.retries + 1):
            try:
                self.api.upload_file(
                    path_or_fileobj=str(local_path),
                    path_in_repo=path_in_repo,
                    repo_id=self.repo_id,
                    repo_type="dataset",
                    commit_message=f"timm-splat prefit: {path_in_repo}",
                )
                return
            except OSError as exc:  # HTTP errors are OSErrors; ranks' commits can collide
                if attempt == self.retries:
                    raise
                logger.warning("upload of %s failed (%s); retrying", path_in_repo, exc)
                time.sleep(5 * 2**attempt)


class DirectoryUploader:
    """``--dry-run-push DIR``: copies what would be uploaded into ``DIR``, laid out as the repo."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.target = str(self.root.resolve())

    def __call__(self, local_path: Path, path_in_repo: str) -> None:
        dest = self.root / path_in_repo
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, dest)
