"""``timm-splat send IMAGE... --server http://HOST:PORT``: fit and encode each image here (the
budget and crop the server's ``/info`` gives), post the ``.splat`` bytes (``--as jpeg`` / ``png``:
the image instead), print the answer and what it cost: prepare (fit + encode) ms, bytes sent,
round trip ms and the server's own ms."""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--server", required=True, help="the service, http://HOST:PORT")
    parser.add_argument(
        "--as",
        dest="kind",
        default="splat",
        choices=["splat", "jpeg", "png"],
        help="what to send (default: splat)",
    )
    parser.add_argument("--jpeg-quality", type=int, default=90, help="(default: 90)")
    parser.add_argument("--topk", type=int, help="labels per answer (default: the server's)")
    parser.add_argument("--iterations", type=int, help="fitter steps (default: the fitter's)")
    parser.add_argument(
        "--no-embedding", action="store_true", help="ask for the top-k alone (a smaller answer)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default: 60)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")


def run(args) -> int:
    from PIL import Image

    from ..serve.client import Client, send

    if not 1 <= args.jpeg_quality <= 95:
        raise ValueError(f"--jpeg-quality must be in [1, 95], got {args.jpeg_quality}")
    paths = [Path(p) for p in args.images]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no such image: {path}")
    fit_options = {"iterations": args.iterations} if args.iterations else {}
    client = Client(args.server, timeout=args.timeout)
    failed = 0
    try:
        info = client.info()
        for path in paths:
            try:
                with Image.open(path) as image:
                    image.load()
            except (OSError, SyntaxError) as exc:
                raise ValueError(f"{path}: cannot read the image ({exc})") from exc
            sent = send(
                client,
                image,
                path.stem,
                info,
                args.kind,
                topk=args.topk,
                embedding=not args.no_embedding,
                jpeg_quality=args.jpeg_quality,
                **fit_options,
            )
            failed += sent.status != 200
            print(json.dumps(_record(path, sent)) if args.json else _line(path, sent))
    finally:
        client.close()
    return 1 if failed else 0


def _record(path: Path, sent) -> dict:
    answer = {k: v for k, v in sent.answer.items() if k != "embedding"}
    return {
        "image": str(path),
        "as": sent.kind,
        "status": sent.status,
        "prepare_ms": round(sent.prepare_ms, 2),
        "psnr": None if sent.psnr is None else round(sent.psnr, 2),
        "payload_bytes": sent.payload_bytes,
        "request_bytes": sent.request_bytes,
        "round_trip_ms": round(sent.round_trip_ms, 2),
        "answer": answer,
        "embedding_dim": len(sent.answer.get("embedding", [])),
    }


def _line(path: Path, sent) -> str:
    cost = (
        f"{sent.kind}: prepare {sent.prepare_ms:.0f} ms ({sent.psnr:.2f} dB), "
        f"{sent.payload_bytes} B payload / {sent.request_bytes} B sent, "
        f"round trip {sent.round_trip_ms:.0f} ms"
    )
    if sent.status != 200:
        return f"{path}: {cost}: error {sent.status}: {sent.answer.get('detail')}"
    server = sent.answer.get("server_ms", {})
    labels = ", ".join(f"{t['label']} {t['score']:.2f}" for t in sent.answer["topk"])
    return f"{path}: {cost} (server {server.get('batch', 0):.0f} ms): {labels}"
