"""The models of a stage: the RGB teacher and the model that trains (a splat student, or an RGB
model for stages pixel and baseline), for either task."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from ..models import (
    copy_rgb_weights,
    from_rgb,
    register_open_clip_configs,
    resolve_run,
    set_local_latents,
    set_quick_gelu,
    splat_trunk,
)
from .config import TrainConfig


def _weights_file(pretrained: str | None) -> str | None:
    """A local run dir / weights file as its .safetensors path; tags and hf-hub: ids as given."""
    if pretrained and not pretrained.startswith("hf-hub:") and Path(pretrained).exists():
        return str(resolve_run(Path(pretrained))[0])
    return pretrained


def stage_one_weights(config: TrainConfig, run_dir: Path) -> Path | None:
    """Stage 1's final weights, where this stage is a second stage that starts from them."""
    previous = run_dir / "distill" / "final" / "model.safetensors"
    return previous if config.second_stage and previous.exists() else None


def build_teacher(config: TrainConfig, run_dir: Path, num_classes: int | None):
    """The RGB teacher (frozen, eval mode), or None where the stage has none or does not use
    it: stage pixel, and a second stage that starts from stage 1 (its student is built)."""
    if not config.teacher or config.stage == "pixel" or stage_one_weights(config, run_dir):
        return None
    weights = _weights_file(config.teacher_pretrained)
    if config.task == "classify":
        import timm

        if weights and not weights.startswith("hf-hub:") and not Path(weights).is_file():
            raise ValueError(  # timm would raise a FileNotFoundError without a message
                f"--teacher-pretrained {weights}: no such run folder or weights file; give the "
                "folder of a stage pixel run or a .safetensors file"
            )

        teacher = timm.create_model(
            config.teacher, num_classes=num_classes, checkpoint_path=weights or ""
        )
    else:
        import open_clip

        register_open_clip_configs()
        teacher = open_clip.create_model(config.teacher, pretrained=weights)
    return teacher.eval().requires_grad_(False)


def build_model(config: TrainConfig, run_dir: Path, teacher, num_classes: int | None):
    """What the stage trains: stage pixel a new RGB model, stage baseline the teacher itself,
    stage 1 a student made of the teacher, stage 2 the student stage 1 finished (without one:
    a student made of the teacher with a new stem, the paper's "no stage 1" ablation, or a new
    model when no teacher is given)."""
    if config.stage == "baseline":
        return teacher.train().requires_grad_(True)
    if config.stage == "pixel":
        model = _new_model(config, num_classes)
        if splat_trunk(model) is not None:
            raise ValueError(
                f"stage pixel trains an RGB model (ViT-Mini-7, vit_mini_patch7_28); "
                f"{config.model} is a splat model"
            )
        return model
    previous = stage_one_weights(config, run_dir)
    starts_from_stage_one = previous is not None
    stage_one_run = _stage_one_run(previous) if previous else {}
    if starts_from_stage_one and config.task == "classify" and not config.num_latents:
        # Stage 2 builds stage 1's architecture again: its latent count is in its run.json.
        recorded = stage_one_run.get("num_latents")
        if isinstance(recorded, int) and recorded > 0:
            config.num_latents = recorded
    if teacher is not None:  # build_teacher gives none where stage 1's student is the start
        student = _student_of(config, teacher, num_classes)
    else:
        student = _new_model(config, num_classes)
    if splat_trunk(student) is None:
        raise ValueError(f"{config.model} is not a splat model")
    if config.plain_latents:  # before stage 1's weights load: they carry no locality either
        set_local_latents(student, False)
    if starts_from_stage_one:
        # Stage 2 starts where stage 1 ended (a stage-2 checkpoint, if any, overrides later).
        if stage_one_run.get("quick_gelu"):
            set_quick_gelu(student)
        student.load_state_dict(load_file(previous))
    splat_trunk(student).num_splats = config.num_splats
    return student


def _stage_one_run(weights: Path) -> dict:
    """Stage 1's run.json beside its ``weights``, read as untrusted (resolve_run checks its
    types and, where the weights' header records them, its model-defining values): stage 2
    builds stage 1's architecture from it."""
    run_file = weights.parent / "run.json"
    if not run_file.is_file():
        raise ValueError(
            f"{run_file} is missing, so stage 1's model cannot be built again: run stage "
            "distill on this run directory again to rewrite it"
        )
    try:
        return resolve_run(weights)[1]
    except ValueError as exc:
        raise ValueError(
            f"stage 1's result cannot be read ({exc}); run stage distill on this run directory "
            "again to rewrite it"
        ) from None


def _new_model(config: TrainConfig, num_classes: int | None):
    if config.task == "classify":
        import timm

        kwargs = {"num_classes": num_classes}
        if config.reads_splats:
            kwargs["num_splats"] = config.num_splats
            if config.num_latents:
                kwargs["num_latents"] = config.num_latents
        return timm.create_model(config.model, **kwargs)
    import open_clip

    register_open_clip_configs()
    return open_clip.create_model(config.model)


def _student_of(config: TrainConfig, teacher, num_classes: int | None):
    """``from_rgb`` of the teacher, as the architecture ``--model`` names (run.json records it:
    evaluation and push build the model again from that name)."""
    if config.task == "classify":
        student = _new_model(config, num_classes)
        if splat_trunk(student) is None:
            raise ValueError(f"{config.model} is not a splat model (a splat_vit_* name)")
        try:
            copy_rgb_weights(student, teacher)
        except ValueError as exc:
            raise ValueError(
                f"from_rgb of the teacher {config.teacher} does not fit --model {config.model}: "
                f"{exc}; pass the splat model of the teacher's layout"
            ) from exc
        return student
    import open_clip

    student = from_rgb(teacher, num_splats=config.num_splats)
    wanted = (open_clip.get_model_config(config.model) or {}).get("vision_cfg", {})
    made = splat_trunk(student).pretrained_cfg.get("architecture")
    if wanted.get("timm_model_name") not in (None, made):  # run.json records --model
        raise ValueError(
            f"from_rgb of the teacher {config.teacher} makes a {made} tower, and --model "
            f"{config.model} names {wanted['timm_model_name']}: pass the matching config"
        )
    return student
