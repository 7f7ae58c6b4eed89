"""The loss of each stage, per task: what one batch costs the model that trains."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import TrainConfig


def _mixup(config: TrainConfig, num_classes: int, splats: bool):
    """timm's Mixup / CutMix (SplatMixup on splats) when asked for, with label smoothing."""
    if not (config.mixup or config.cutmix):
        return None
    from ..augment import SplatMixup

    options = dict(
        mixup_alpha=config.mixup,
        cutmix_alpha=config.cutmix,
        label_smoothing=config.smoothing,
        num_classes=num_classes,
    )
    if splats:
        return SplatMixup(**options, cutmix_grid=config.image_size)
    from timm.data import Mixup

    return Mixup(**options)


class StageLoss:
    """``loss(model, batch)`` for ``config``'s stage. ``model`` is the unwrapped model that
    trains; ``teacher`` stage 1's (frozen, on the device)."""

    def __init__(self, config: TrainConfig, accelerator, teacher=None, num_classes=None):
        self.config, self.teacher = config, teacher
        self.kind = "distill" if config.stage == "distill" else "fit"
        if config.task == "clip" and self.kind == "fit":
            import open_clip

            self.clip_loss = open_clip.ClipLoss(
                gather_with_grad=True,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
            )
        if config.task == "classify" and self.kind == "fit":
            from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

            self.mixup = _mixup(config, num_classes, splats=config.reads_splats)
            if self.mixup is not None:
                self.criterion = SoftTargetCrossEntropy()  # mixup's targets are soft
            elif config.smoothing:
                self.criterion = LabelSmoothingCrossEntropy(config.smoothing)
            else:
                self.criterion = torch.nn.CrossEntropyLoss()

    def inputs(self, batch):
        return batch["splats"] if self.config.reads_splats else batch["pixels"]

    def __call__(self, model, batch) -> torch.Tensor:
        if self.config.task == "clip":
            return self._clip(model, batch)
        return self._classify(model, batch)

    def _clip(self, model, batch):
        image = F.normalize(model.encode_image(self.inputs(batch)), dim=-1)
        if self.kind == "distill":
            with torch.no_grad():
                target = F.normalize(self.teacher.encode_image(batch["pixels"]), dim=-1)
            return F.mse_loss(image.float(), target.float())
        # Stage 2 and baseline keep the text tower frozen; stage pixel trains both towers.
        with torch.set_grad_enabled(self.config.stage == "pixel"):
            text = F.normalize(model.encode_text(batch["tokens"]), dim=-1)
        return self.clip_loss(image, text, model.logit_scale.exp())

    def _classify(self, model, batch):
        inputs = self.inputs(batch)
        if self.kind == "distill":
            return self._distill_classifier(model, inputs, batch["pixels"])
        targets = batch["labels"]
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, targets)
        return self.criterion(model(inputs).float(), targets)

    def _distill_classifier(self, model, splats, pixels):
        """Stage 1 of a classifier: the stem learns to give the teacher's blocks and head what
        the teacher's patch embedding gave them. ``features`` (default) matches the pre-logit
        features, scaled by their mean square: with the head shared and frozen, equal features
        give equal logits, and a 128-wide feature carries more per image than 10 logits;
        ``logits`` matches the class distribution (KL, temperature 1), ``both`` adds them."""
        target = self.config.distill_target
        features = model.forward_head(model.forward_features(splats), pre_logits=True).float()
        with torch.no_grad():
            teacher = self.teacher.forward_head(
                self.teacher.forward_features(pixels), pre_logits=True
            ).float()
        loss = features.new_zeros(())
        if target in ("features", "both"):
            loss = loss + F.mse_loss(features, teacher) / teacher.pow(2).mean().clamp_min(1e-12)
        if target in ("logits", "both"):
            student_logits = model.get_classifier()(features).float()
            teacher_logits = self.teacher.get_classifier()(teacher).float()
            loss = loss + F.kl_div(
                F.log_softmax(student_logits, -1),
                F.log_softmax(teacher_logits, -1),
                log_target=True,
                reduction="batchmean",
            )
        return loss

    def after_step(self, model) -> None:
        """open_clip's clamp: temperature >= 0.01."""
        scale = getattr(model, "logit_scale", None)
        if isinstance(scale, torch.nn.Parameter) and scale.requires_grad:
            with torch.no_grad():
                scale.clamp_(0, math.log(100))
