"""What the service does with one request, without the serving library: a splat CLIP or timm
classifier loaded once, untrusted upload bytes turned into model inputs (or a :class:`Rejected`
saying why not), and a batch of inputs turned into embeddings and top-k labels.

Inputs: ``.splat`` bytes (the codec; a splat model reads them as they are) and encoded images
(JPEG, PNG, ...: a splat model's server fits them itself, an RGB model reads their pixels)."""

from __future__ import annotations

import dataclasses
import io
import time

import torch
import torch.nn.functional as F

from ..codec import decode as decode_splats
from ..splats import pad_splats, splat_count

KINDS = ("splat", "image")
# Decoded pixels a request may ask for: a 4096 x 4096 image is 200 MB as float32, and fitting
# it is resized to the model's size anyway. A 30 KB PNG can claim 2^31 pixels.
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclasses.dataclass
class Rejected:
    """A request the service refuses: the HTTP status and the one-line reason."""

    status: int
    detail: str


@dataclasses.dataclass
class Item:
    """One decoded request: the model input (splats ``[n, 8]`` or pixels ``[3, H, W]``)."""

    kind: str
    tensor: torch.Tensor
    topk: int
    decode_ms: float
    embedding: bool = True  # False: answer the top-k alone (a few hundred bytes back)


@dataclasses.dataclass
class EngineConfig:
    pretrained: str | None = None  # a run directory, Hub folder, .safetensors or hf-hub: id
    model: str | None = None  # splat-ViT-* / open_clip config, or a timm classifier name
    classes: str | None = None  # zero-shot / head class names: list, .txt / .json, "imagenet"
    templates: list[str] | None = None  # prompt templates (zero-shot); default open_clip's
    topk: int = 5
    num_splats: int | None = None  # the splat model's budget (default: the model's own)
    device: str = "cpu"
    max_image_pixels: int = MAX_IMAGE_PIXELS


class Engine:
    """A loaded model and its class embeddings / head; :meth:`decode` then :meth:`predict`."""

    def __init__(self, config: EngineConfig, device: str | None = None):
        from ..evaluation import (
            load_classnames,
            load_templates,
            local_run,
            task_of,
            zero_shot_classifier,
        )
        from ..models import load_classifier, pixel_config, pixel_transform, splat_trunk
        from ..transforms import SplatTransform

        if not isinstance(config.topk, int) or config.topk < 1:
            raise ValueError(f"topk must be a positive int, got {config.topk!r}")
        self.config = config
        self.device = torch.device(device or config.device)
        name, pretrained = config.model, config.pretrained
        local = local_run(pretrained)
        self.task = task_of(local, name or (local[1].get("model") if local else None))
        if self.task == "classify":
            if pretrained is None:
                raise ValueError(f"a classifier ({name}) needs trained weights: --pretrained RUN")
            model, info = load_classifier(
                pretrained, name, num_splats=config.num_splats, device=self.device
            )
        else:
            model, info = _load_clip(pretrained, name, config.num_splats, self.device)
        self.model, self.info = model, info
        self.trunk = splat_trunk(model)
        if self.trunk is not None:
            self.num_splats = self.trunk.num_splats
            self.fit = SplatTransform.from_config(self.trunk, device=self.device)
            self.image_size = self.fit.image_size
        else:
            self.num_splats, self.fit = None, None
            self.pixels = pixel_transform(model)
            self.image_size = tuple(pixel_config(model)[0])
        if self.task == "classify":
            self.classnames = _classifier_names(config.classes, model.num_classes)
            self.classifier = None
        else:
            import open_clip

            self.classnames = load_classnames(config.classes or "imagenet")
            tokenizer = open_clip.get_tokenizer(info["tokenizer"])
            templates = load_templates(config.templates)
            self.classifier = zero_shot_classifier(
                model, tokenizer, self.classnames, templates, self.device
            )
        self.default_topk = min(config.topk, len(self.classnames))

    # -- what a client may ask ------------------------------------------------------------

    def describe(self) -> dict:
        """What ``/info`` tells clients: what to send and what comes back."""
        height, width = self.image_size
        return {
            "model": self.info["model"],
            "task": self.task,
            "input": "splats" if self.trunk is not None else "pixels",
            "accepts": list(KINDS) if self.trunk is not None else ["image"],
            "num_splats": self.num_splats,
            "image_size": [height, width],
            "fit": None
            if self.fit is None
            else {
                "crop_pct": self.fit.crop_pct,
                "interpolation": self.fit.interpolation.value,
                "crop_mode": self.fit.crop_mode,
            },
            "num_classes": len(self.classnames),
            "topk": self.default_topk,
        }

    # -- one request ----------------------------------------------------------------------

    def decode(
        self, kind: str, data: bytes, topk: int | None = None, embedding: bool = True
    ) -> Item | Rejected:
        """Untrusted upload bytes -> an :class:`Item`, or a :class:`Rejected` (4xx) saying what
        was wrong; never raises for bad bytes."""
        start = time.perf_counter()
        topk = self.default_topk if topk is None else topk
        if not isinstance(topk, int) or not 1 <= topk <= len(self.classnames):
            return Rejected(400, f"topk must be an int in [1, {len(self.classnames)}]")
        if kind == "splat":
            if self.trunk is None:
                return Rejected(415, "this model reads pixels: send an image, not .splat bytes")
            try:
                tensor = decode_splats(data)
            except ValueError as exc:
                return Rejected(400, f"bad .splat bytes: {exc}")
            if len(tensor) > self.num_splats:
                return Rejected(
                    413,
                    f"{len(tensor)} splats, but this model reads at most {self.num_splats}: "
                    f"fit with --num-splats {self.num_splats}",
                )
        elif kind == "image":
            try:
                image = _open_image(data, self.config.max_image_pixels)
                tensor = (self.fit.image_transform if self.fit else self.pixels)(image)
            except ValueError as exc:
                return Rejected(400, f"bad image: {exc}")
            except Exception as exc:  # noqa: BLE001 (an image plugin's own error on bad bytes)
                return Rejected(400, f"bad image: cannot decode it ({type(exc).__name__})")
        else:
            return Rejected(400, f"unknown input kind {kind!r}: send a file field {KINDS}")
        return Item(kind, tensor, topk, (time.perf_counter() - start) * 1e3, embedding)

    @torch.no_grad()
    def predict(self, items: list[Item]) -> list[dict]:
        """Embeddings and top-k labels for decoded items, one batched forward (images of a
        splat model fitted first, in one batched fit)."""
        start = time.perf_counter()
        inputs, fit_ms = self._batch(items)
        forward = time.perf_counter()
        if self.task == "classify":
            features = self.model.forward_head(self.model.forward_features(inputs), pre_logits=True)
            probs = self.model.get_classifier()(features).float().softmax(-1)
        else:
            features = self.model.encode_image(inputs)
            features = F.normalize(features.float(), dim=-1)
            scale = self.model.logit_scale.exp().float()
            probs = (scale * features @ self.classifier.float()).softmax(-1)
        done = time.perf_counter()
        results = []
        for item, feature, p in zip(items, features.float().cpu(), probs.cpu()):
            scores, indices = p.topk(item.topk)
            answer = {
                "input": item.kind,
                "num_splats": int(splat_count(item.tensor)) if item.tensor.ndim == 2 else None,
                "topk": [
                    {"label": self.classnames[i], "score": round(float(s), 6)}
                    for s, i in zip(scores, indices.tolist())
                ],
                "server_ms": {
                    "decode": round(item.decode_ms, 3),
                    "fit": round(fit_ms, 3),
                    "forward": round((done - forward) * 1e3, 3),
                    "batch": round((done - start) * 1e3 + item.decode_ms, 3),
                    "batch_size": len(items),
                },
            }
            if item.embedding:
                answer["embedding"] = [round(v, 6) for v in feature.tolist()]
            results.append(answer)
        return results

    def _batch(self, items: list[Item]) -> tuple[torch.Tensor, float]:
        if self.trunk is None:  # pixels, already resized and normalised by the transform
            return torch.stack([i.tensor for i in items]).to(self.device), 0.0
        start = time.perf_counter()
        images = [i.tensor for i in items if i.kind == "image"]
        fitted = iter(self.fit.collate(images) if images else [])
        sets = [next(fitted) if i.kind == "image" else i.tensor for i in items]
        fit_ms = (time.perf_counter() - start) * 1e3 if images else 0.0
        return pad_splats([s.cpu() for s in sets], self.num_splats).to(self.device), fit_ms


def _load_clip(pretrained, name, num_splats, device):
    """A splat CLIP through the factory, or an RGB open_clip model (pixels)."""
    from ..evaluation import is_splat_config, load_rgb_clip
    from ..models import load_clip

    if name and not is_splat_config(name):
        return load_rgb_clip(name, pretrained, device), {"model": name, "tokenizer": name}
    return load_clip(pretrained, name, num_splats=num_splats, device=device)


def _classifier_names(spec, num_classes: int) -> list[str]:
    from ..evaluation import load_classnames

    if spec is None:
        return [f"class {i}" for i in range(num_classes)]
    names = load_classnames(spec)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a classifier of {num_classes} classes")
    return names


def _open_image(data: bytes, max_pixels: int):
    """A PIL image from untrusted encoded bytes; ValueError for anything undecodable or too
    large (checked from the header, before any pixel is decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
    except UnidentifiedImageError as exc:
        raise ValueError("not an image format PIL reads (JPEG, PNG, WebP, ...)") from exc
    except Image.DecompressionBombError:
        width = height = max_pixels + 1  # PIL's own, higher, limit: refused below all the same
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read the image ({exc})") from exc
    if width * height > max_pixels:
        raise ValueError(
            f"more pixels than the server's limit of {max_pixels}: resize it on the client"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode the image ({exc})") from exc
    return image
