"""``timm-splat serve --pretrained RUN --classes a,b,c``: an inference service (LitServe) that
answers ``POST /predict`` (multipart: a ``splat`` file of ``.splat`` bytes, or an ``image``
file) with an embedding and the top-k classes; ``/health`` (ready), ``/live``, ``/info``.
Stop it with Ctrl+C or SIGTERM (in-flight requests finish)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument(
        "--pretrained",
        help="a training run directory, saved Hub folder, .safetensors or hf-hub:org/repo "
        "(none: random weights of --model, a smoke test)",
    )
    parser.add_argument(
        "--model", help="splat-ViT-* / open_clip config or timm classifier (default: the run's)"
    )
    parser.add_argument(
        "--classes",
        help="class names: a comma-separated list, a .txt / .json file, or 'imagenet' "
        "(CLIP default: imagenet; a classifier's default: 'class 0', 'class 1', ...)",
    )
    parser.add_argument(
        "--templates",
        nargs="+",
        default=["simple"],
        help="zero-shot prompt templates: 'simple', 'openai' (80 per class: a slow start on a "
        "CPU), a file, or templates with '{}' (default: simple)",
    )
    parser.add_argument("--topk", type=int, default=5, help="labels per answer (default: 5)")
    parser.add_argument("--num-splats", type=int, help="the splat model's budget (default: its)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--accelerator", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="inference processes per device (default: 1)"
    )
    parser.add_argument(
        "--api-servers", type=int, default=1, help="HTTP server processes (default: 1)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=16, help="dynamic batching limit (default: 16)"
    )
    parser.add_argument(
        "--batch-timeout",
        type=float,
        default=0.01,
        help="seconds a batch waits to fill (default: 0.01)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds a request may wait for a worker before a 504 (default: 30)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=8 << 20,
        help="larger requests get a 413 (default: 8 MiB)",
    )


def _positive(value, flag: str, kind=int):
    if not isinstance(value, kind) or value <= 0:
        raise ValueError(f"{flag} must be positive, got {value!r}")
    return value


def run(args) -> int:
    try:
        import litserve  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            f"timm-splat serve needs the serve extra ({exc.name} is missing): "
            "pip install 'timm-splat[serve]'"
        ) from exc
    from ..serve.api import ServeConfig, serve
    from ..serve.engine import EngineConfig

    if args.pretrained is None and args.model is None:
        raise ValueError("say what to serve: --pretrained RUN (or --model NAME, random weights)")
    for flag in ("workers", "api_servers", "max_batch_size", "max_request_bytes", "topk"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    _positive(args.timeout, "--timeout", (int, float))
    if not 0 <= args.batch_timeout < args.timeout:
        raise ValueError("--batch-timeout must be in [0, --timeout)")
    if not 1024 <= args.port < 65536:  # LitServe's range
        raise ValueError(f"--port must be in [1024, 65535], got {args.port}")
    engine = EngineConfig(
        pretrained=args.pretrained,
        model=args.model,
        classes=args.classes,
        templates=args.templates,
        topk=args.topk,
        num_splats=args.num_splats,
        device="cuda" if args.accelerator == "cuda" else "cpu",
    )
    serve(
        ServeConfig(
            engine=engine,
            host=args.host,
            port=args.port,
            max_batch_size=args.max_batch_size,
            batch_timeout=args.batch_timeout,
            workers=args.workers,
            api_servers=args.api_servers,
            timeout=args.timeout,
            max_request_bytes=args.max_request_bytes,
            accelerator=args.accelerator,
        )
    )
    return 0
