import pytest

from timm_splat.cli.demo import DEMO_BUDGETS
from timm_splat.report import FitRow, psnr_figure, save_psnr_plot

pytest.importorskip("matplotlib")

BUDGETS = list(DEMO_BUDGETS)  # the demo's: under one decade, where the minor labels show


def rows():
    return [
        FitRow(name, budget, budget, 20 + i + budget / 1000, 224, 224, 0.1)
        for i, name in enumerate(("a", "b"))
        for budget in BUDGETS
    ]


def test_psnr_plot_labels_only_the_budgets(tmp_path):
    """matplotlib's log axis labels its own minor ticks (6x10^2, 2x10^3, 3x10^3), which were
    drawn over and beside the budgets' labels: only the budgets are labelled."""
    fig = psnr_figure(rows())
    fig.canvas.draw()
    axis = fig.axes[0].xaxis
    low, high = sorted(fig.axes[0].get_xlim())
    shown = [
        label.get_text()
        for minor in (False, True)
        for tick, label in zip(axis.get_ticklocs(minor=minor), axis.get_ticklabels(minor=minor))
        if low <= tick <= high and label.get_visible() and label.get_text()
    ]
    assert shown == [str(b) for b in BUDGETS]
    save_psnr_plot(tmp_path / "psnr.png", rows())
    assert (tmp_path / "psnr.png").stat().st_size > 1000
