import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from timm_splat import load_splats, render_splats
from timm_splat.cli import main


def test_fit_end_to_end(tmp_path, astronaut_64, capsys):
    rgba = astronaut_64.convert("RGBA")
    rgba.save(tmp_path / "photo.png")
    Image.fromarray(np.linspace(0, 255, 40 * 30).astype(np.uint8).reshape(40, 30)).save(
        tmp_path / "ramp.jpg"
    )
    out = tmp_path / "out"
    code = main(
        [
            "fit",
            str(tmp_path / "photo.png"),
            str(tmp_path / "ramp.jpg"),
            "--num-splats",
            "60",
            "--iterations",
            "40",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "photo.png" in printed and "ramp.jpg" in printed and "PSNR" in printed
    splats, meta = load_splats(out / "photo.safetensors")
    assert splats.shape == (60, 8) and (meta["height"], meta["width"]) == ("64", "64")
    render = np.asarray(Image.open(out / "photo.png"), dtype=np.float32) / 255
    expected = render_splats(splats, 64, 64).clamp(0, 1).permute(1, 2, 0).numpy()
    assert np.abs(render - expected).max() <= 1 / 255 + 1e-6
    # the stored PSNR is that of the stored (fp16) splats, within fp16 rounding
    target = torch.from_numpy(np.asarray(rgba.convert("RGB"), dtype=np.float32) / 255)
    mse = ((torch.from_numpy(expected) - target) ** 2).mean()
    assert float(-10 * torch.log10(mse)) == pytest.approx(float(meta["psnr"]), abs=0.1)
    ramp, meta = load_splats(out / "ramp.safetensors")
    assert (meta["height"], meta["width"]) == ("40", "30") and len(ramp) <= 60


def test_fit_takes_a_preset(tmp_path, astronaut_64, capsys):
    from timm_splat import FitConfig, fit_splats

    astronaut_64.save(tmp_path / "photo.png")
    args = ["fit", str(tmp_path / "photo.png"), "--num-splats", "60", "--out", str(tmp_path)]
    assert main([*args, "--preset", "fast"]) == 0
    splats, _ = load_splats(tmp_path / "photo.safetensors")
    expected = fit_splats(astronaut_64, FitConfig.preset("fast", num_splats=60)).splats[0]
    torch.testing.assert_close(splats, expected.half().float())
    with pytest.raises(SystemExit):
        main([*args, "--preset", "fastest"])
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


def test_fit_reports_bad_files(tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    code = main(["fit", str(tmp_path / "broken.png"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "cannot read image" in capsys.readouterr().err


def test_console_script_demo_runs(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "timm-splat")
    result = subprocess.run(
        [
            script,
            "demo",
            "--out",
            str(tmp_path),
            "--budgets",
            "30",
            "60",
            "--size",
            "32",
            "--iterations",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mean at    60 splats" in result.stdout
    grid = Image.open(tmp_path / "demo_grid.png")
    assert grid.size == (3 * 36 + 4, 7 * 36 + 4)  # 7 photos x (original + 2 budgets)
    assert (tmp_path / "demo_psnr.png").stat().st_size > 1000
