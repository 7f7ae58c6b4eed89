"""Edge to cloud, measured (issue 24): a client that fits and encodes splats (or JPEG-encodes
the image) and a ``timm-splat serve`` service, on this machine, over loopback and over a link
shaped to 1 / 10 / 100 Mbit/s.

Everything runs inside a network namespace of its own (``unshare --net --map-root-user``): the
server and the client both on 127.0.0.1 there, the namespace's own loopback shaped with
``tc`` (token bucket ``tbf``, MTU 1500, burst one packet; this kernel has no ``netem``), so no
other interface or address is ever touched.

Per held-out photo (224 x 224) and budget N: the client's prepare time (fit + encode, one
thread), the ``.splat`` bytes and PSNR; JPEG at the lowest quality that reaches the splats'
PSNR on the same crop (matched PSNR), its encode time and bytes. Then the service, three ways:
a splat model reading the ``.splat`` uploads, the same model fitting the JPEG uploads itself,
and an RGB model of the same size reading the JPEGs' pixels. Per way and link rate: round trip
(upload + server + answer, top-k only), the upload alone (the round trip less the server's own
ms, against the same on loopback), end to end (prepare + round trip), and the link rate below
which splats beat the JPEG end to end. Last, a bounded load test per
way on loopback: C concurrent clients, a fixed number of requests: images/s, p50 / p99 latency.

    python benchmarks/edge_cloud.py                                  # the documented run
    python benchmarks/edge_cloud.py --photos 2 --budgets 400 --rates 10 --load 1 2 \\
        --model splat-ViT-test --rgb-model ViT-Mini-7 --out /tmp/ec   # a quick look

Weights are random (nothing downloads): the cost of a forward does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from timm_splat.samples import HELDOUT_PHOTOS, sample_photos
from timm_splat.serve.client import Client, image_bytes, image_psnr, prepare

SIZE = 224
RAW_BYTES = SIZE * SIZE * 3
CLASSES = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="splat-ViT-B-16", help="the splat CLIP served")
    parser.add_argument("--rgb-model", default="ViT-B-16", help="the RGB CLIP it is set against")
    parser.add_argument("--budgets", type=int, nargs="+", default=[400, 1600])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 10.0, 100.0], help="Mbit/s")
    parser.add_argument("--photos", type=int, default=len(HELDOUT_PHOTOS))
    parser.add_argument(
        "--load", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients"
    )
    parser.add_argument("--load-requests", type=int, default=4, help="per client and level")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads (client: 1)")
    parser.add_argument("--out", default="out/edge_cloud", help="folder for JSON, table, plot")
    parser.add_argument("--no-netns", action="store_true", help="plain loopback, no shaping")
    parser.add_argument("--report", help="only the tables and plot of a saved edge_cloud.json")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- the namespace and the link ----------------------------------------------------------------


def reexec_in_namespace(argv) -> int:
    """Run this script again in a user + network namespace of its own (root there, so ``ip``
    and ``tc`` work on its loopback and nothing else)."""
    command = ["unshare", "--net", "--map-root-user", sys.executable, __file__, *argv, "--inside"]
    return subprocess.call(command)


def loopback_up() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "link", "set", "lo", "mtu", "1500"], check=True)


def shape(rate_mbit: float | None) -> None:
    """Shape the namespace's loopback to ``rate_mbit`` (None: unshaped)."""
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
    if rate_mbit is None:
        return
    command = f"tc qdisc add dev lo root tbf rate {rate_mbit}mbit burst 1600 mtu 1600 latency 5s"
    subprocess.run(command.split(), check=True)


# -- the client side ---------------------------------------------------------------------------


def info_for(budget: int) -> dict:
    return {"input": "splats", "num_splats": budget, "image_size": [SIZE, SIZE], "fit": None}


def jpeg_at(pixels: torch.Tensor, target_db: float) -> tuple[bytes, int, float]:
    """The smallest-quality JPEG of ``pixels`` whose PSNR reaches ``target_db`` (else q=100)."""
    for quality in range(1, 101):
        payload = image_bytes(pixels, "JPEG", quality)
        db = image_psnr(payload, pixels)
        if db >= target_db:
            break
    return payload, quality, db


def timed_jpeg(pixels: torch.Tensor, quality: int, repeats: int = 5) -> float:
    """ms to turn the cropped pixels into JPEG bytes (best of ``repeats``)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        image_bytes(pixels, "JPEG", quality)
        best = min(best, (time.perf_counter() - start) * 1e3)
    return best


def client_side(photos: dict, budgets: list[int]) -> dict:
    """Per budget: per photo, the .splat payload and the PSNR-matched JPEG, with their costs."""
    from timm_splat.transforms import SplatTransform

    torch.set_num_threads(1)  # an edge device: one core
    payloads = {}
    for budget in budgets:
        rows = []
        for name, image in photos.items():
            prepare(image, info_for(budget), "splat", iterations=5)  # warm the kernels
            start_cpu = time.process_time()
            data, _, ms, db = prepare(image, info_for(budget), "splat")
            cpu_ms = (time.process_time() - start_cpu) * 1e3
            pixels = SplatTransform(budget, image_size=SIZE).image_transform(image)
            jpeg, quality, jpeg_db = jpeg_at(pixels, db)
            rows.append(
                {
                    "photo": name,
                    "splat": data,
                    "splat_ms": ms,
                    "splat_cpu_ms": cpu_ms,
                    "splat_db": db,
                    "jpeg": jpeg,
                    "jpeg_quality": quality,
                    "jpeg_db": jpeg_db,
                    "jpeg_ms": timed_jpeg(pixels, quality),
                }
            )
            print(
                f"N={budget} {name}: splat {len(data)} B {db:.2f} dB {ms:.0f} ms; "
                f"JPEG q={quality} {len(jpeg)} B {jpeg_db:.2f} dB",
                flush=True,
            )
        payloads[budget] = rows
    torch.set_num_threads(os.cpu_count() or 1)
    return payloads


# -- the server side ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``timm-splat serve`` in a subprocess on a free local port, stopped with SIGTERM."""

    def __init__(self, model: str, budget: int | None, threads: int, log: Path):
        self.port = free_port()
        command = [sys.executable, "-m", "timm_splat", "serve", "--model", model]
        command += ["--classes", CLASSES, "--templates", "a photo of a {}.", "--topk", "3"]
        command += ["--port", str(self.port), "--max-batch-size", "16"]
        command += ["--batch-timeout", "0.005", "--timeout", "600"]
        if budget:
            command += ["--num-splats", str(budget)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            try:
                if Client(self.url, timeout=5).get("/health")[0] == 200:
                    break
            except ValueError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server was not ready in 600 s")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def round_trips(url: str, requests: list[tuple[str, bytes]], repeats: int = 2) -> list[dict]:
    """Sequential requests on one kept-alive connection: best-of-``repeats`` round trip and
    the server's own batch ms for each (after two warm-up requests)."""
    client = Client(url, timeout=600)
    for _ in range(2):
        client.predict(*requests[0], "warm", embedding=False)
    out = []
    for field, data in requests:
        best = None
        for _ in range(repeats):
            status, answer, sent, ms = client.predict(field, data, "x", embedding=False)
            if status != 200:
                raise RuntimeError(f"the server answered {status}: {answer}")
            if best is None or ms < best["round_trip_ms"]:
                server_ms = answer["server_ms"]["batch"]
                best = {
                    "round_trip_ms": ms,
                    "server_ms": server_ms,
                    "net_ms": ms - server_ms,  # transfers, HTTP, queues: not the model's work
                    "request_bytes": sent,
                }
        out.append(best)
    client.close()
    return out


def load_test(url: str, requests: list[tuple[str, bytes]], clients: int, per_client: int):
    """``clients`` threads, each with its own connection, ``per_client`` requests each, all
    released at once; (images/s, p50 ms, p99 ms, largest batch)."""
    latencies, batches, errors = [], [], []
    barrier = threading.Barrier(clients + 1)

    def worker(index: int):
        client = Client(url, timeout=600)
        client.predict(*requests[0], "warm", embedding=False)
        barrier.wait()
        for k in range(per_client):
            field, data = requests[(index + k) % len(requests)]
            status, answer, _, ms = client.predict(field, data, "x", embedding=False)
            if status != 200:
                errors.append((status, answer))
                continue
            latencies.append(ms)
            batches.append(answer["server_ms"]["batch_size"])
        client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed under load: {errors[0]}")
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "clients": clients,
        "requests": len(latencies),
        "images_per_s": len(latencies) / wall,
        "p50_ms": statistics.median(ordered),
        "p99_ms": p99,
        "max_batch": max(batches),
    }


# -- the run -----------------------------------------------------------------------------------


def measure_way(name, url, requests, prepare_ms, rates, shaping, args) -> dict:
    """One way of serving: round trips per link rate and the load test."""
    row = {"way": name, "rates": {}}
    shape(None)
    base = round_trips(url, requests)
    row["loopback"] = base
    for rate in rates if shaping else []:
        shape(rate)
        shaped = round_trips(url, requests, repeats=1)
        row["rates"][str(rate)] = [
            {
                **s,
                # the link's share: what the shaped rate adds to the request's own net time
                "upload_ms": max(0.0, s["net_ms"] - b["net_ms"]),
                "ideal_upload_ms": s["request_bytes"] * 8 / (rate * 1e3),
                "end_to_end_ms": p + s["round_trip_ms"],
            }
            for s, b, p in zip(shaped, base, prepare_ms)
        ]
        print(f"  {name} @ {rate:g} Mbit/s: {_mean(row['rates'][str(rate)], 'round_trip_ms')} ms")
    shape(None)
    row["load"] = [load_test(url, requests, c, args.load_requests) for c in args.load]
    for level in row["load"]:
        print(f"  {name} load {level}", flush=True)
    return row


def _mean(rows, key) -> float:
    return round(statistics.fmean(r[key] for r in rows), 2)


def run(args) -> dict:
    if args.inside:
        loopback_up()
    shaping = args.inside and shutil.which("tc") is not None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = dict(list(sample_photos(SIZE, HELDOUT_PHOTOS).items())[: args.photos])
    payloads = client_side(photos, args.budgets)
    ways = []

    def measure(name: str, kind: str, url: str, budget: int) -> None:
        rows, field = payloads[budget], "splat" if kind == "splat" else "jpeg"
        requests = [("splat" if kind == "splat" else "image", r[field]) for r in rows]
        prepare_ms = [r[f"{field}_ms"] for r in rows]
        row = measure_way(name, url, requests, prepare_ms, args.rates, shaping, args)
        ways.append({**row, "budget": budget, "kind": kind})

    rgb = Server(args.rgb_model, None, args.server_threads, out / "server-rgb.log")
    try:
        for budget in args.budgets:
            measure(f"JPEG@{budget} -> {args.rgb_model} (pixels)", "jpeg-rgb", rgb.url, budget)
    finally:
        rgb.stop()
    for budget in args.budgets:
        server = Server(args.model, budget, args.server_threads, out / f"server-{budget}.log")
        try:
            measure(f"splats N={budget} -> {args.model}", "splat", server.url, budget)
            name = f"JPEG@{budget} -> {args.model} (fits on the server)"
            measure(name, "jpeg-fit", server.url, budget)
        finally:
            server.stop()
    for rows in payloads.values():  # bytes to sizes for the JSON
        for r in rows:
            r["splat_bytes"], r["jpeg_bytes"] = len(r.pop("splat")), len(r.pop("jpeg"))
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "model": args.model,
        "rgb_model": args.rgb_model,
        "shaped": shaping,
        "link": "tbf on the namespace's loopback, MTU 1500, burst 1600 B" if shaping else None,
        "payloads": {str(k): v for k, v in payloads.items()},
        "ways": ways,
    }


# -- the report --------------------------------------------------------------------------------


def tables(result: dict) -> str:
    lines = ["| way | client ms | payload B | request B | PSNR dB | server ms (median) |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for way in result["ways"]:
        rows = result["payloads"][str(way["budget"])]
        splat = way["kind"] == "splat"
        payload = statistics.fmean(r["splat_bytes" if splat else "jpeg_bytes"] for r in rows)
        db = statistics.fmean(r["splat_db" if splat else "jpeg_db"] for r in rows)
        client, server, request = _costs(result, way)
        lines.append(
            f"| {way['way']} | {client:.1f} | {payload:.0f} | {request:.0f} | {db:.2f} "
            f"| {server:.0f} |"
        )
    rates = _rates(result)
    if rates:
        head = [f"upload @ {r}" for r in rates] + [f"end to end @ {r}" for r in rates]
        lines += ["", f"| way | {' | '.join(head)} |"]
        lines.append("|---|" + "---:|" * (2 * len(rates)))
        for way in result["ways"]:
            ups = [_mean(way["rates"][r], "upload_ms") for r in rates]
            e2e = [_mean(way["rates"][r], "end_to_end_ms") for r in rates]
            cells = " | ".join(f"{v:.0f}" for v in ups + e2e)
            lines.append(f"| {way['way']} | {cells} |")
    lines += ["", *break_even(result)]
    lines += ["", "| way | clients | requests | images/s | p50 ms | p99 ms | largest batch |"]
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for way in result["ways"]:
        for level in way["load"]:
            lines.append(
                f"| {way['way']} | {level['clients']} | {level['requests']} | "
                f"{level['images_per_s']:.2f} | {level['p50_ms']:.0f} | {level['p99_ms']:.0f} | "
                f"{level['max_batch']} |"
            )
    return "\n".join(lines)


def _costs(result: dict, way: dict) -> tuple[float, float, float]:
    """(mean client ms, median server ms, mean request bytes) of one way; the server's ms
    over every round trip it made (loopback and shaped), the median, as a machine shared
    with other work makes single requests slow now and then."""
    rows = result["payloads"][str(way["budget"])]
    key = "splat_ms" if way["kind"] == "splat" else "jpeg_ms"
    client = statistics.fmean(r[key] for r in rows)
    trips = way["loopback"] + [t for shaped in way["rates"].values() for t in shaped]
    server = statistics.median(t["server_ms"] for t in trips)
    return client, server, _mean(way["loopback"], "request_bytes")


def break_even(result: dict) -> list[str]:
    """Per budget, splats against each JPEG way: the uplink rate below which the bytes the
    splats save pay for what they cost (client + server ms), on a link of that rate alone."""
    lines = ["| budget | splats against | bytes saved | ms they cost (client + server) |"]
    lines[0] += " splats faster below |"
    lines.append("|---:|---|---:|---:|---:|")
    for budget in sorted({w["budget"] for w in result["ways"]}):
        ways = [w for w in result["ways"] if w["budget"] == budget]
        splat = next((w for w in ways if w["kind"] == "splat"), None)
        if splat is None:
            continue
        s_client, s_server, s_bytes = _costs(result, splat)
        for other in (w for w in ways if w["kind"] != "splat"):
            o_client, o_server, o_bytes = _costs(result, other)
            saved, cost = o_bytes - s_bytes, (s_client + s_server) - (o_client + o_server)
            if saved <= 0:
                rate = "never"
            elif cost <= 0:
                rate = "always"
            else:
                rate = f"{saved * 8 / cost / 1e3:.3f} Mbit/s"
            lines.append(f"| {budget} | {other['way']} | {saved:.0f} | {cost:.0f} | {rate} |")
    return lines


def _rates(result: dict) -> list[str]:
    """The link rates measured, as the JSON's keys, slowest first."""
    return sorted({r for way in result["ways"] for r in way["rates"]}, key=float)


def plot(result: dict, path: Path) -> None:
    """End to end against the uplink rate: measured (markers) and the model client + server +
    request bytes / rate (lines) from 10 kbit/s, where the crossings are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rates = _rates(result)
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    grid = np.logspace(-2, 2, 200)
    for index, way in enumerate(result["ways"]):
        colour = f"C{index}"
        client, server, request = _costs(result, way)
        style = "-" if way["kind"] == "splat" else "--" if way["kind"] == "jpeg-rgb" else ":"
        model = client + server + request * 8 / (grid * 1e3)
        axis.plot(grid, model, style, color=colour, label=way["way"])
        measured = [_mean(way["rates"][r], "end_to_end_ms") for r in rates]
        axis.plot([float(r) for r in rates], measured, "o", color=colour, markersize=4)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("uplink rate, Mbit/s (lines: client + server + bytes / rate; dots: measured)")
    axis.set_ylabel("end to end per image, ms")
    axis.set_title(f"Edge to cloud, {result['date'][:10]}, {result['machine']}", fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report:
        result = json.loads(Path(args.report).read_text())
        out = Path(args.report).parent
        plot(result, out / "edge_cloud.png")
        print(tables(result))
        return 0
    if not args.inside and not args.no_netns:
        if shutil.which("unshare") is None:
            raise SystemExit("unshare not found: run with --no-netns (loopback only, no shaping)")
        return reexec_in_namespace(argv)
    result = run(args)
    out = Path(args.out)
    (out / "edge_cloud.json").write_text(json.dumps(result, indent=1))
    table = tables(result)
    (out / "edge_cloud.md").write_text(table + "\n")
    plot(result, out / "edge_cloud.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
