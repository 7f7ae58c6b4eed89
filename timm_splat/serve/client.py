"""The edge side: fit and encode an image on this machine, post the ``.splat`` bytes (or, for
comparison, the image as JPEG / PNG) to a ``timm-splat serve`` service, and say what it cost.

Only the standard library's ``http.client`` on the wire (an edge device needs no web stack);
the fit is the package's own CPU fitter, with the budget and crop the server's ``/info`` gives.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
import urllib.parse
import uuid
from http.client import HTTPConnection, HTTPException

from ..codec import encode
from ..images import to_rgb_tensors

KINDS = ("splat", "jpeg", "png")


@dataclasses.dataclass
class Sent:
    """One request and what it cost, client side."""

    name: str
    kind: str  # "splat", "jpeg" or "png"
    status: int
    answer: dict  # the server's JSON (top-k, embedding, server_ms) or {"detail": ...}
    prepare_ms: float  # fit + encode (splat) or resize + image encode
    payload_bytes: int  # the .splat / image bytes
    request_bytes: int  # all that went up: request line, headers, multipart framing, payload
    round_trip_ms: float  # from the first byte sent to the whole answer read
    psnr: float | None = None  # of the splats (or the JPEG) against the cropped image


class Client:
    """A keep-alive connection to one service (``http://host:port``)."""

    def __init__(self, url: str, timeout: float = 60.0):
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--server must be http://HOST:PORT, got {url!r}")
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self.connection = HTTPConnection(self.host, self.port, timeout=timeout)

    def close(self) -> None:
        self.connection.close()

    def get(self, path: str) -> tuple[int, bytes]:
        return self._request("GET", path, b"", {})[:2]

    def info(self) -> dict:
        status, body = self.get("/info")
        if status != 200:
            raise ValueError(f"{self.host}:{self.port}/info answered {status}: {body[:200]!r}")
        try:
            return json.loads(body)["model"]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ValueError(f"{self.host}:{self.port}/info is not a timm-splat service") from exc

    def predict(
        self,
        field: str,
        payload: bytes,
        filename: str,
        topk: int | None = None,
        embedding: bool = True,
    ):
        """POST one file; ``(status, answer dict, request bytes, round trip ms)``."""
        boundary = uuid.uuid4().hex
        fields = {"topk": topk, "embedding": None if embedding else "false"}
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
            for name, value in fields.items()
            if value is not None
        ]
        parts.append(
            f"--{boundary}\r\nContent-Disposition: form-data; name={json.dumps(field)}; "
            f"filename={json.dumps(filename)}\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        body = "".join(parts).encode() + payload + f"\r\n--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        status, data, sent, ms = self._request("POST", "/predict", body, headers)
        try:
            answer = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: deeply nested brackets
            answer = {"detail": data[:200].decode("utf-8", "replace")}
        return status, answer, sent, ms

    def _request(self, method, path, body: bytes, headers: dict):
        # Every header given here, so http.client adds none and the count below is exact.
        headers = {
            "Host": f"{self.host}:{self.port}",
            "Accept-Encoding": "identity",
            "Content-Length": str(len(body)),
            **headers,
        }
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sent = len(f"{method} {path} HTTP/1.1\r\n") + len(head) + 2 + len(body)
        for attempt in range(2):  # a kept-alive connection the server closed: reconnect once
            start = time.perf_counter()
            try:
                self.connection.request(method, path, body=body, headers=headers)
                response = self.connection.getresponse()
                data = response.read()
                return response.status, data, sent, (time.perf_counter() - start) * 1e3
            except (ConnectionResetError, BrokenPipeError, HTTPException) as exc:
                self.connection.close()
                if attempt:
                    raise ValueError(f"{self.host}:{self.port}: {exc}") from exc
            except OSError as exc:  # refused, unreachable, timed out
                self.connection.close()
                raise ValueError(f"cannot reach {self.host}:{self.port} ({exc})") from exc
        raise AssertionError("unreachable")


def prepare(image, info: dict, kind: str = "splat", *, jpeg_quality: int = 90, **fit_options):
    """``(payload bytes, field, ms, psnr)`` for one image, as the server's ``/info`` asks:
    resized and cropped like the server's model reads it, then fitted and encoded (``splat``)
    or encoded as an image (``jpeg`` / ``png``)."""
    from ..fitting import fit_splats
    from ..transforms import SplatTransform

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    fit = info.get("fit") or {}
    start = time.perf_counter()
    transform = SplatTransform(
        info.get("num_splats") or 400,
        image_size=tuple(info.get("image_size") or (224, 224)),
        crop_pct=fit.get("crop_pct", 1.0),
        interpolation=fit.get("interpolation", "bicubic"),
        crop_mode=fit.get("crop_mode", "center"),
        **fit_options,
    )
    pixels = transform.image_transform(image)
    height, width = pixels.shape[-2:]
    if kind == "splat":
        if info.get("input") != "splats":
            model = info.get("model")
            raise ValueError(f"the server's model ({model}) reads pixels: use --as jpeg")
        result = fit_splats([pixels], transform.fit_config, progress=False)
        payload = encode(result.splats[0], size=(height, width))
        return payload, "splat", (time.perf_counter() - start) * 1e3, float(result.psnr[0])
    payload = image_bytes(pixels, kind.upper(), jpeg_quality)
    ms = (time.perf_counter() - start) * 1e3
    return payload, "image", ms, image_psnr(payload, pixels)


def image_bytes(pixels, format: str = "JPEG", quality: int = 90) -> bytes:
    """Pixels ``[3, H, W]`` in [0, 1] as an encoded image (``JPEG`` at ``quality``, or PNG)."""
    from PIL import Image

    array = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    options = {"quality": int(quality)} if format == "JPEG" else {}
    Image.fromarray(array).save(buffer, format, **options)
    return buffer.getvalue()


def image_psnr(payload: bytes, pixels) -> float:
    """PSNR of the decoded ``payload`` against the pixels it was encoded from."""
    from PIL import Image

    from ..fitting import psnr

    decoded = to_rgb_tensors(Image.open(io.BytesIO(payload)))[0]
    return float(psnr(decoded[None], pixels[None].clamp(0, 1))[0])


def send(
    client: Client,
    image,
    name: str,
    info: dict,
    kind: str = "splat",
    *,
    topk: int | None = None,
    embedding: bool = True,
    jpeg_quality: int = 90,
    **fit_options,
) -> Sent:
    """Prepare one image on this machine and post it; what came back and what it cost."""
    payload, field, ms, quality = prepare(
        image, info, kind, jpeg_quality=jpeg_quality, **fit_options
    )
    suffix = {"splat": ".splat", "jpeg": ".jpg", "png": ".png"}[kind]
    status, answer, sent, round_trip = client.predict(
        field, payload, name + suffix, topk, embedding
    )
    return Sent(name, kind, status, answer, ms, len(payload), sent, round_trip, quality)
