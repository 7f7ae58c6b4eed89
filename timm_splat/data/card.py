"""The dataset card of a pre-fitted dataset: ``out/README.md`` from ``hub/dataset_card.md``, the
run's settings and every finished split's statistics."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..fitting import FitConfig
from ..resources import card_template
from ..splats import BYTES_PER_SPLAT_FP16, compression_ratio
from .journal import STATE_DIR, PrefitError, Stats, read_run, read_state_json, write_atomic

CARD_TEMPLATE = card_template("dataset_card.md")


def _size_category(rows: int) -> str:
    bounds = [
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
    ]
    return next((name for bound, name in bounds if rows < bound), "100M<n<1B")


_FALLBACK_TEMPLATE = """---
{{ card_data }}
---

# {{ pretty_name }}

{{ source_text }} pre-fitted into {{ num_splats }} Gaussian splats per image ({{ image_size }}).
"""


def _describe_source(run: dict) -> tuple[str, str, bool]:
    """(short name, markdown text, is a Hub dataset) of a split's source. Local paths stay
    private: the card names the folder, not where it lives."""
    name, kind = run["source"], run["source_kind"]
    if kind == "datasets" and not Path(name).is_absolute():
        return name, f"[{name}](https://huggingface.co/datasets/{name})", True
    short = Path(name).name
    what = {"imagefolder": "the local image folder", "webdataset": "the webdataset shards"}
    return short, f"{what.get(kind, 'the local dataset')} `{short}`", False


def _label_feature(shard: Path):
    """The ``label`` feature a shard's datasets metadata declares (the card lists class names
    from it). The shard was written by a run, but is read back as untrusted."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features

    try:
        return Features.from_arrow_schema(pq.read_schema(shard))["label"]
    except (
        OSError,
        pa.ArrowException,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        RecursionError,
    ) as exc:
        raise PrefitError(
            f"{shard} is not a readable pre-fitted shard ({type(exc).__name__}: {exc}); delete "
            "it and run the same prefit command again to rewrite it"
        ) from exc


def write_card(out: str | Path, repo_id: str | None = None) -> Path:
    """(Re)write ``out/README.md`` from ``hub/dataset_card.md``, the run settings and every
    finished split's statistics; its YAML ``configs`` let the Hub viewer and
    ``datasets.load_dataset`` find each split (any split name)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from ..version import __version__

    out = Path(out)
    state = out / STATE_DIR
    settings = read_state_json(state / "settings.json")
    splits, sources = [], {}
    for path in sorted(state.glob("*/summary.json")):
        try:
            summary = Stats.from_dict(read_state_json(path)).summary()
        except PrefitError:
            raise
        except ValueError as exc:
            raise PrefitError(
                f"{path}: {exc}; delete it and run the same prefit command again to rewrite it"
            ) from exc
        splits.append({"name": path.parent.name, **summary})
        run = read_run(path.parent / "run.json")
        sources.setdefault(_describe_source(run), []).append(path.parent.name)
    if not splits:
        raise PrefitError(f"{out} holds no finished split yet")

    (short, text, _), first_run = next(iter(sources)), splits[0]["name"]
    if len(sources) > 1:  # splits fitted from different sources: say which is which
        text = "; ".join(f"{t} ({', '.join(names)})" for (_, t, _), names in sources.items())
    height, width = settings["image_size"]
    num_splats = settings["num_splats"]
    shard = next((out / "data").glob(f"{first_run}-*.parquet"), None)
    label = _label_feature(shard) if shard else None
    defaults = dataclasses.asdict(FitConfig())
    command = [
        f"timm-splat prefit --dataset {short} --split {first_run}",
        f"--num-splats {num_splats} --image-size {height} --out {out.name}",
    ]
    if settings["crop_pct"] != 1.0 or settings["interpolation"] != "bicubic":
        command.append(
            f"--crop-pct {settings['crop_pct']} --interpolation {settings['interpolation']}"
        )
    command += [f"--fit-option {k}={v}" for k, v in settings["fit"].items() if defaults[k] != v]
    rows = sum(s["rows"] for s in splits)
    card_data = DatasetCardData(
        pretty_name=f"{short} as {num_splats} Gaussian splats",
        size_categories=_size_category(rows),
        source_datasets=sorted(n for (n, _, hub) in sources if hub) or None,
        tags=["timm-splat", "gaussian-splatting", "image"],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": s["name"], "path": f"data/{s['name']}-*"} for s in splits],
            }
        ],
    )
    kind = read_run(state / first_run / "run.json")["source_kind"]
    context = dict(
        source_text=text[0].upper() + text[1:],
        source_text_lower=text,
        version=__version__,
        num_splats=num_splats,
        image_size=f"{height}x{width}",
        crop_pct=settings["crop_pct"],
        interpolation=settings["interpolation"],
        splits=splits,
        bytes_per_image=num_splats * BYTES_PER_SPLAT_FP16,
        pixel_bytes=height * width * 3,
        compression=compression_ratio(num_splats, height, width),
        disk_bytes_per_image=round(
            sum(s["bytes_per_row"] * s["rows"] for s in splits) / max(1, rows)
        ),
        label_type=(
            f"`ClassLabel` ({label.num_classes} classes)" if hasattr(label, "names") else "`int64`"
        ),
        source_id_text={
            "imagefolder": "the file's path in the folder",
            "webdataset": "the webdataset key",
        }.get(kind, "the row index in the split"),
        repo_id=repo_id or "path/to/this/dataset",
        command=" \\\n    ".join(command),
        fit={"num_splats": num_splats, **settings["fit"]},
    )
    if CARD_TEMPLATE is not None:
        card = DatasetCard.from_template(card_data, template_path=str(CARD_TEMPLATE), **context)
    else:  # an installed wheel without the hub/ folder
        card = DatasetCard.from_template(card_data, template_str=_FALLBACK_TEMPLATE, **context)
    path = out / "README.md"
    write_atomic(path, str(card))
    return path
