"""``timm-splat demo``: fit scikit-image's sample photos at several budgets; a table, an image
grid and a PSNR plot."""

from __future__ import annotations

from pathlib import Path

from ..images import to_rgb_tensors
from ..ops import render_splats
from ..report import format_table, save_grid, save_psnr_plot
from ..samples import sample_photos
from .timed import add_fit_arguments, fit_timed, report_rows

DEMO_BUDGETS = (400, 900, 1600, 3136)


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="out/demo", help="folder for the grid and plot PNGs")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(DEMO_BUDGETS))
    parser.add_argument("--size", type=int, default=224)
    add_fit_arguments(parser)


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = sample_photos(args.size)
    names = list(photos)
    images = to_rgb_tensors(list(photos.values()))
    print(
        f"fitting {len(names)} scikit-image photos at {args.size}x{args.size}, "
        f"budgets {list(args.budgets)}",
        flush=True,
    )
    rows, renders = [], []
    for budget in args.budgets:
        result, seconds = fit_timed(images, budget, args.iterations, args.preset)
        rows += report_rows(names, images, result, budget, seconds)
        renders.append(render_splats(result.splats, args.size, args.size))
    rows.sort(key=lambda r: (names.index(r.image), r.budget))
    print(format_table(rows))
    for budget in args.budgets:
        mine = [r for r in rows if r.budget == budget]
        print(
            f"mean at {budget:>5} splats: {sum(r.psnr for r in mine) / len(mine):.2f} dB, "
            f"{sum(r.seconds for r in mine) / len(mine):.2f} s/image"
        )
    grid = [[images[i]] + [render[i] for render in renders] for i in range(len(names))]
    save_grid(out / "demo_grid.png", grid)
    save_psnr_plot(out / "demo_psnr.png", rows)
    print(
        f"wrote {out / 'demo_grid.png'} (original | {' | '.join(map(str, args.budgets))} "
        f"splats) and {out / 'demo_psnr.png'}"
    )
    return 0
