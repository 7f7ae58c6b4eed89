"""The data of a stage: the training set, its splat budget and classes, and the loader whose
collate step fits splats, preprocesses the teacher's pixels, tokenises captions and keeps
labels."""

from __future__ import annotations

from torch.utils.data import DataLoader, IterableDataset

from ..augment import SplatAugment
from ..data import TrainingCollate, open_train_data
from ..models import pixel_transform
from ..splats import DEFAULT_NUM_SPLATS
from ..transforms import SplatTransform
from .config import TrainConfig


def _templates(name: str):
    import open_clip

    return {
        "openai": open_clip.OPENAI_IMAGENET_TEMPLATES,
        "simple": open_clip.SIMPLE_IMAGENET_TEMPLATES,
        "none": None,
    }[name]


def open_dataset(config: TrainConfig):
    """The training set (captions drawn for a CLIP; labels read for a classifier)."""
    if config.task == "classify":
        return open_train_data(config.train_data, config.split, None, need="label")
    return open_train_data(config.train_data, config.split, _templates(config.caption_templates))


def budget_of(config: TrainConfig, dataset) -> int | None:
    """The splat budget of the run: a pre-fitted dataset's own (an explicit --num-splats must
    match it), else --num-splats or the default; None for the stages that read pixels."""
    data_budget = getattr(dataset, "num_splats", None)
    if not config.reads_splats:
        if data_budget is not None and config.stage == "pixel":
            raise ValueError(
                f"stage pixel reads images, and {config.train_data} is a pre-fitted splat dataset"
            )
        return None
    if data_budget is None:
        return config.num_splats or DEFAULT_NUM_SPLATS
    if config.num_splats not in (None, data_budget):
        raise ValueError(
            f"{config.train_data} was pre-fitted with {data_budget} splats per image, not "
            f"--num-splats {config.num_splats}: leave --num-splats out (the data's budget is used) "
            "or pre-fit the data again"
        )
    return data_budget


def num_classes_of(config: TrainConfig, dataset) -> int | None:
    """A classifier's class count: the data's class names (class folders, ClassLabel names)."""
    if config.task != "classify":
        return None
    names = getattr(dataset, "class_names", None) or getattr(
        getattr(dataset, "source", None), "class_names", None
    )
    if not names:
        raise ValueError(
            f"{config.train_data} names no classes (class folders, a ClassLabel label column): "
            "a classifier needs them"
        )
    return len(names)


def build_loader(config: TrainConfig, dataset, rgb_model, fit_device) -> DataLoader:
    """Batches for this stage: ``splats`` (students), ``pixels`` (``rgb_model``: stage 1's
    teacher, or the RGB model that trains), ``tokens`` (a CLIP's captions), ``labels``."""
    splat_transform = augment = None
    if config.reads_splats:
        fit_options = {"iterations": config.fit_iterations} if config.fit_iterations else {}
        splat_transform = SplatTransform(
            config.num_splats, config.image_size, device=fit_device, **fit_options
        )
        if config.augment and config.task == "classify":  # digits and text do not flip
            augment = SplatAugment(hflip=0.0, scale=(0.6, 1.0), brightness=0.3, saturation=0.3)
    contrastive = config.task == "clip" and config.stage != "distill"
    tokenizer = None
    if contrastive:
        import open_clip

        tokenizer = open_clip.get_tokenizer(config.model)
    streamed = isinstance(dataset, IterableDataset)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=not streamed,
        drop_last=True,
        num_workers=config.workers,
        collate_fn=TrainingCollate(
            splat_transform,
            pixel_transform(rgb_model) if rgb_model is not None else None,
            tokenizer,
            labels=config.task == "classify" and config.stage != "distill",
            splat_augment=augment,
        ),
    )
