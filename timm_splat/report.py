"""Tables, image grids and plots of fitting results (the demo's and the CLI's output)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .splats import BYTES_PER_SPLAT_FP16


@dataclass
class FitRow:
    image: str
    budget: int
    kept: int
    psnr: float
    height: int
    width: int
    seconds: float  # wall time per image (batch time / batch size)

    @property
    def fp16_bytes(self) -> int:
        return self.kept * BYTES_PER_SPLAT_FP16

    @property
    def compression(self) -> float:
        return self.height * self.width * 3 / max(1, self.fp16_bytes)


HEADER = ("image", "budget", "splats", "PSNR dB", "bytes fp16", "vs uint8", "s/image")


def format_table(rows: list[FitRow]) -> str:
    cells = [HEADER] + [
        (
            r.image,
            str(r.budget),
            str(r.kept),
            f"{r.psnr:.2f}",
            str(r.fp16_bytes),
            f"{r.compression:.1f}x",
            f"{r.seconds:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` float (any range; clamped to [0, 1]) -> RGB PIL image."""
    array = (image.detach().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def save_grid(path: Path, rows: list[list[torch.Tensor]], pad: int = 4) -> None:
    """A PNG with one row per image: each entry a ``[3, H, W]`` tensor of the same size."""
    height, width = rows[0][0].shape[-2:]
    cols = max(len(r) for r in rows)
    canvas = Image.new(
        "RGB", (cols * (width + pad) + pad, len(rows) * (height + pad) + pad), "white"
    )
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas.paste(to_pil(image), (pad + j * (width + pad), pad + i * (height + pad)))
    canvas.save(path)


def psnr_figure(rows: list[FitRow]):
    """PSNR against splat budget, one line per image plus the mean (a matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, NullLocator

    budgets = sorted({r.budget for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r.image for r in rows):
        mine = sorted((r for r in rows if r.image == name), key=lambda r: r.budget)
        ax.plot([r.budget for r in mine], [r.psnr for r in mine], "o-", alpha=0.5, label=name)
    means = [
        sum(r.psnr for r in rows if r.budget == b) / sum(r.budget == b for r in rows)
        for b in budgets
    ]
    ax.plot(budgets, means, "k*-", linewidth=2.5, label="mean")
    ax.set_xscale("log")
    # Label only the budgets: a log axis adds minor ticks labelled 6x10^2, 2x10^3, ... that land
    # on and beside the budgets' labels.
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("splats per image")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_psnr_plot(path: Path, rows: list[FitRow]) -> None:
    """The PSNR plot (:func:`psnr_figure`) as a PNG."""
    import matplotlib.pyplot as plt

    fig = psnr_figure(rows)
    fig.savefig(path, dpi=120)
    plt.close(fig)
