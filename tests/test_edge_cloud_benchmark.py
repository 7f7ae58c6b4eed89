"""benchmarks/edge_cloud.py at its smallest: client, three servers, a shaped link (in a network
namespace of its own where this machine allows one), a load test, the report."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # CI installs the serve extra: there a missing one fails
    pytest.importorskip("litserve", reason="the serve extra is not installed")

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "edge_cloud.py"


def _namespaces() -> bool:
    if shutil.which("unshare") is None or shutil.which("tc") is None:
        return False
    probe = "ip link set lo up && tc qdisc add dev lo root tbf rate 1mbit burst 1600 latency 1s"
    command = ["unshare", "--net", "--map-root-user", "sh", "-c", probe]
    return subprocess.run(command, capture_output=True).returncode == 0


def test_the_smallest_run(tmp_path):
    shaped = _namespaces()
    command = [sys.executable, str(BENCHMARK), "--photos", "1", "--budgets", "16"]
    command += ["--rates", "100", "--load", "2", "--load-requests", "1", "--out", str(tmp_path)]
    command += ["--model", "splat-ViT-test", "--rgb-model", "ViT-Mini-7"]
    command += [] if shaped else ["--no-netns"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "edge_cloud.json").read_text())
    assert report["shaped"] == shaped
    assert [w["kind"] for w in report["ways"]] == ["jpeg-rgb", "splat", "jpeg-fit"]
    row = report["payloads"]["16"][0]
    assert row["splat_bytes"] < row["jpeg_bytes"] or row["jpeg_quality"] == 1
    assert abs(row["jpeg_db"] - row["splat_db"]) < 3 or row["jpeg_quality"] in (1, 100)
    for way in report["ways"]:
        assert way["load"][0]["requests"] == 2 and way["load"][0]["images_per_s"] > 0
        assert list(way["rates"]) == (["100.0"] if shaped else [])
    assert "splats faster below" in result.stdout and "images/s" in result.stdout
    again = subprocess.run(
        [sys.executable, str(BENCHMARK), "--report", str(tmp_path / "edge_cloud.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and again.stdout.strip() in result.stdout
