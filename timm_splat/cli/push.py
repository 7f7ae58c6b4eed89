"""``timm-splat push RUN_DIR REPO_ID``: publish a training run on the Hugging Face Hub in timm's
and open_clip's layouts (see :mod:`timm_splat.hub`)."""

from __future__ import annotations

from ..hub import push_run


def add_arguments(parser) -> None:
    parser.add_argument(
        "run_dir", help="training run directory (final/model.safetensors + run.json)"
    )
    parser.add_argument("repo_id", help="Hub repo, e.g. timm-splat/splat_vit_b16.gs400_datacomp")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument(
        "--folder-only", metavar="OUT", help="write the repo folder to OUT and do not push"
    )
    parser.add_argument(
        "--folder",
        metavar="DIR",
        help="keep the pushed repo folder in DIR (default: a temporary folder)",
    )
    parser.add_argument("--commit-message", default=None)


def run(args) -> int:
    if args.folder_only:
        folder = push_run(args.run_dir, args.repo_id, folder=args.folder_only, push=False)
        print(f"wrote {sorted(p.name for p in folder.iterdir())} to {folder} (not pushed)")
        return 0
    push_run(
        args.run_dir,
        args.repo_id,
        private=args.private,
        folder=args.folder,
        commit_message=args.commit_message,
    )
    print(f"pushed {args.run_dir} to https://huggingface.co/{args.repo_id}")
    return 0
