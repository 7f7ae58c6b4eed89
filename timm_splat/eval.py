"""Zero-shot classification of splat CLIPs with open_clip's own classifier builder, class names
and prompt templates (ImageNet-1k by default)::

    timm-splat eval --pretrained runs/gs400 --data imagenet-val-gs400/       # pre-fitted splats
    timm-splat eval --pretrained hf-hub:org/repo --data /data/imagenet/val     # images, fitted here
    timm-splat eval --model splat-ViT-B-16 --pretrained model.safetensors --data pets/ \\
        --classnames folder --templates "a photo of a {}, a type of pet."

``--data`` is a pre-fitted splat dataset (parquet shards with ``splats`` [N, 8] fp16 and
``label`` columns: a local folder laid out like a Hub dataset, or a Hub dataset id) or an image
folder (``class/image.jpg``, fitted on the fly a batch at a time with the model's budget).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .splats import SPLAT_CHANNELS

TOPK = (1, 5)


# ------------------------------------------------------------------------ the metric

def zero_shot_classifier(model, tokenizer, classnames, templates=None, device="cpu") -> torch.Tensor:
    """Class embeddings ``[embed_dim, num_classes]`` (unit columns): open_clip's
    ``build_zero_shot_classifier``, with its ImageNet prompt templates by default.

    ``templates``: callables ``name -> prompt`` or ``str.format`` strings (``{}`` or ``{c}``)."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier

    templates = [_as_callable(t) for t in (templates or OPENAI_IMAGENET_TEMPLATES)]
    return build_zero_shot_classifier(model, tokenizer=tokenizer, classnames=list(classnames),
                                      templates=templates, num_classes_per_batch=10,
                                      device=device, use_tqdm=False)


def _as_callable(template):
    if callable(template):
        return template
    if "{}" not in template and "{c}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' or '{{c}}' for the class name")
    return lambda name, t=template: t.format(name, c=name)


@torch.no_grad()
def evaluate_zero_shot(model, classifier: torch.Tensor, loader, device="cpu", *, amp: bool = False,
                       progress: bool = False) -> dict:
    """Top-1 / top-5 zero-shot accuracy (fractions in [0, 1]), the sample count ``n`` and the
    most real splats an input had (``max_splats``).

    ``loader`` yields ``(splats [B, N, 8], labels [B])`` (or dicts with those keys);
    ``classifier`` is :func:`zero_shot_classifier`'s ``[embed_dim, num_classes]``. With fewer
    than 5 classes, top-5 counts the top ``num_classes`` (so it is 1)."""
    device = torch.device(device)
    classifier = classifier.to(device)
    num_classes = classifier.shape[1]
    ks = [min(k, num_classes) for k in TOPK]
    correct, n, max_splats = torch.zeros(len(ks), dtype=torch.long), 0, 0
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="zero-shot", unit="batch")
    for batch in batches:
        splats, labels = (batch["splats"], batch["label"]) if isinstance(batch, dict) else batch[:2]
        labels = torch.as_tensor(labels).long()
        if labels.numel() and int(labels.min()) < 0:  # the pre-fit writer's "no label"
            raise ValueError("unlabelled rows (label -1): zero-shot classification needs labels")
        if labels.numel() and int(labels.max()) >= num_classes:
            raise ValueError(f"label {int(labels.max())} but the classifier has {num_classes} "
                             "classes: pass the dataset's class names (--classnames)")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            features = model.encode_image(splats.to(device, torch.float32))
        logits = F.normalize(features.float(), dim=-1) @ classifier.float()
        top = logits.topk(max(ks), dim=1).indices.cpu()
        hits = top == labels.view(-1, 1)
        correct += torch.tensor([int(hits[:, :k].any(dim=1).sum()) for k in ks])
        n += len(labels)
        max_splats = max(max_splats, int((splats[..., 2] > 0).sum(-1).max()))  # l11 > 0: real
    if n == 0:
        raise ValueError("the data loader yielded no samples")
    return {"top1": correct[0].item() / n, "top5": correct[1].item() / n, "n": n,
            "max_splats": max_splats}


# ------------------------------------------------------------------ class names, prompts

def load_classnames(spec: str | None, folder_classes: list[str] | None = None) -> list[str]:
    """``imagenet`` (open_clip's IMAGENET_CLASSNAMES), ``folder`` (an image folder's class
    folders, ``_`` read as a space), a .txt (one per line) or .json (a list) file, or a
    comma-separated list. None: ``folder`` for an image folder without 1000 classes, else
    ``imagenet`` (an ImageNet folder's sorted synsets are open_clip's class order)."""
    from open_clip import IMAGENET_CLASSNAMES

    if spec is None:
        spec = "folder" if folder_classes and len(folder_classes) != 1000 else "imagenet"
    if spec == "imagenet":
        return list(IMAGENET_CLASSNAMES)
    if spec == "folder":
        if not folder_classes:
            raise ValueError("--classnames folder needs an image folder as --data")
        return [name.replace("_", " ") for name in folder_classes]
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
        text = path.read_text()
        items = json.loads(text) if path.suffix == ".json" else text.splitlines()
    elif split_commas:
        items = spec.split(",")
    else:
        raise ValueError(f"{what}: {spec!r} is neither a file nor a template with '{{}}'")
    items = [str(item).strip() for item in items if str(item).strip()]
    if not items:
        raise ValueError(f"no {what} in {spec!r}")
    return items


# ------------------------------------------------------------------------------- data

def is_image_folder(path) -> bool:
    """A local folder without parquet shards (a pre-fitted dataset has them)."""
    folder = Path(path)
    return folder.is_dir() and not any(folder.rglob("*.parquet"))


class PadSplats:
    """Collate pre-fitted rows into ``(splats [B, N, 8] float32, labels [B])``, padding with
    zero rows (the padding convention) to ``num_splats`` or else the longest row of the batch."""

    def __init__(self, num_splats: int | None = None):
        self.num_splats = num_splats

    def __call__(self, rows):
        sets = [torch.as_tensor(row["splats"], dtype=torch.float32).reshape(-1, SPLAT_CHANNELS)
                for row in rows]
        longest = max(len(s) for s in sets)
        if self.num_splats is not None and longest > self.num_splats:
            raise ValueError(f"pre-fitted rows hold up to {longest} splats, more than "
                             f"--num-splats {self.num_splats}")
        width = self.num_splats or longest
        splats = torch.stack([F.pad(s, (0, 0, 0, width - len(s))) for s in sets])
        labels = torch.tensor([int(row["label"]) for row in rows])
        return splats, labels


def _samples(batch):
    return batch


class FitBatches:
    """Batches of an image folder's loader, each fitted in one :meth:`SplatTransform.collate`
    call in this process: workers only decode, resize and crop (a fit on the GPU cannot run in
    forked workers)."""

    def __init__(self, loader, transform):
        self.loader, self.transform = loader, transform

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield self.transform.collate(batch)


def build_loader(data, *, split: str = "validation", batch_size: int = 64, transform=None,
                 num_splats: int | None = None, workers: int = 0, limit: int | None = None):
    """``(loader, folder_classes)`` for ``--data``; ``folder_classes`` is None unless ``data``
    is an image folder. ``transform``: the :class:`SplatTransform` that fits an image folder
    (each batch in one call); ``num_splats`` pads pre-fitted rows; ``limit``: first N samples."""
    from torch.utils.data import DataLoader, Subset

    if is_image_folder(data):
        from torchvision.datasets import ImageFolder

        if transform is None:
            raise ValueError("an image folder needs a SplatTransform to fit its images")
        dataset = ImageFolder(str(data), transform=transform.image_transform)
        classes = list(dataset.classes)
        if limit:
            dataset = Subset(dataset, range(min(limit, len(dataset))))
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                            collate_fn=_samples)
        return FitBatches(loader, transform), classes
    from .data import load_prefit

    # Streaming reads the parquet shards as they are: no Arrow copy in the datasets cache.
    rows = load_prefit(data, split, streaming=True)
    missing = {"splats", "label"} - set(rows.column_names or ["splats", "label"])
    if missing:
        raise ValueError(f"{data} has no {sorted(missing)} column(s): not a labelled splat dataset")
    rows = rows.select_columns(["splats", "label"]).with_format("torch")
    if limit:
        rows = rows.take(limit)
    loader = DataLoader(rows, batch_size=batch_size, num_workers=workers,
                        collate_fn=PadSplats(num_splats))
    return loader, None


# -------------------------------------------------------------------------------- CLI

def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``eval`` subcommand's arguments (for ``timm-splat eval``)."""
    parser.add_argument("--model", default=None,
                        help="splat-ViT-* config (default: what --pretrained records)")
    parser.add_argument("--pretrained", default=None,
                        help="run dir (final/model.safetensors), .safetensors file, saved Hub "
                             "folder or hf-hub:org/repo (default: random weights, a smoke test)")
    parser.add_argument("--data", required=True,
                        help="pre-fitted splat dataset (folder of parquet shards or Hub id) or "
                             "image folder (class/image.jpg)")
    parser.add_argument("--split", default="validation", help="split of a pre-fitted dataset")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-splats", type=int, default=None,
                        help="fit budget for images (default: the model's); pads pre-fitted rows")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--classnames", default=None,
                        help="imagenet | folder | FILE (.txt lines / .json list) | a,b,c "
                             "(default: folder names for a non-ImageNet image folder, else imagenet)")
    parser.add_argument("--templates", nargs="+", default=None,
                        help="openai (default) | simple | FILE | 'a photo of a {}.' (several allowed)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="crop size images are fitted at (default: the model's)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="fitting iterations for images (default: the fitter's)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N samples")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast for the image tower")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.set_defaults(func=run_cli)
    return parser


def format_table(result: dict) -> str:
    columns = ("model", "splats", "data", "n", "top1", "top5")
    cells = [str(result["model"]), str(result["max_splats"]), Path(str(result["data"])).name or
             str(result["data"]), str(result["n"]), f"{100 * result['top1']:.2f}",
             f"{100 * result['top5']:.2f}"]
    widths = [max(len(c), len(v)) for c, v in zip(columns, cells)]
    rows = [columns, ["-" * w for w in widths], cells]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows)


def run_cli(args) -> int:
    import open_clip

    from .hub import load_clip
    from .models.clip import splat_trunk
    from .transforms import SplatTransform

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.pretrained is None:
        print("no --pretrained: evaluating random weights (a smoke test)", file=sys.stderr)
    model, info = load_clip(args.pretrained, args.model, num_splats=args.num_splats, device=device)
    trunk = splat_trunk(model)
    transform = None
    if is_image_folder(args.data):
        overrides = {"device": device}
        if args.image_size:
            overrides["image_size"] = args.image_size
        if args.iterations:
            overrides["iterations"] = args.iterations
        transform = SplatTransform.from_config(trunk, **overrides)
    loader, folder_classes = build_loader(
        args.data, split=args.split, batch_size=args.batch_size, transform=transform,
        num_splats=args.num_splats, workers=args.workers, limit=args.limit)
    classnames = load_classnames(args.classnames, folder_classes)
    templates = load_templates(args.templates)
    tokenizer = open_clip.get_tokenizer(info["tokenizer"])
    start = time.perf_counter()
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device)
    metrics = evaluate_zero_shot(model, classifier, loader, device, amp=args.amp,
                                 progress=sys.stderr.isatty())
    result = {
        "model": info["model"], "pretrained": args.pretrained, "num_splats": trunk.num_splats,
        "data": str(args.data), "split": None if folder_classes else args.split, **metrics,
        "num_classes": len(classnames), "num_templates": len(templates),
        "seconds": round(time.perf_counter() - start, 2), "device": str(device),
    }
    print(format_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(
        prog="timm-splat eval", description="zero-shot classification of a splat CLIP"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"timm-splat eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
