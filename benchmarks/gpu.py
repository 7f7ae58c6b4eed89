"""Everything a GPU machine should show, in one call: build the CUDA kernels, check them against
the reference, run the GPU tests, then time batched fitting. Prints a short table last and
writes the full log to ``--out`` (default ``$OUT`` or ./out/gpu).

    python benchmarks/gpu.py                 # on a GPU machine
    python benchmarks/gpu.py --dry-run       # anywhere: tiny sizes on the CPU, same code path

Measured: correctness (values and gradients, fp32, relative error < 1e-4, fresh random
inputs, outputs poisoned first); images/s to a fixed iteration count and to a target PSNR for
N in 400..3136 and batches 256..4096; GPU utilisation during a fit (NVML, as nvidia-smi); peak
GPU memory per image; a per-image loop of the same kernels as the baseline.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from timm_splat import extension, fit_splats, ops
from timm_splat.images import to_rgb_tensors
from timm_splat.reference import render_reference
from timm_splat.samples import sample_photos
from timm_splat.testing import away_from_cutoff, poison_allocator, random_splats

LOG_FILE: Path | None = None  # written line by line, so a run cut off still leaves its log


def log(*parts):
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    if LOG_FILE is not None:
        with LOG_FILE.open("a") as f:
            f.write(line + "\n")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_correctness(device, trials: int) -> float:
    worst = 0.0
    for trial in range(trials):
        height, width = [(224, 224), (37, 53), (16, 16), (100, 31)][trial % 4]
        s = random_splats(4, 50 + 200 * trial, dtype=torch.float32, seed=1000 + trial)
        s = away_from_cutoff(s, height, width).to(device).requires_grad_()
        if device.type == "cuda":
            poison_allocator()
        out = ops.render(s, height, width, "kernel")
        ref = render_reference(s.double(), height, width)
        g = torch.randn_like(ref)
        if device.type == "cuda":
            poison_allocator()
        (grad,) = torch.autograd.grad((out * g.float()).sum(), s)
        (grad_ref,) = torch.autograd.grad((ref * g).sum(), s)
        out, ref = out.detach(), ref.detach()
        value_err = float((out.double() - ref).abs().max() / ref.abs().max())
        grad_err = float((grad.double() - grad_ref).abs().max() / grad_ref.abs().max())
        log(
            f"  trial {trial}: {height}x{width} N={s.shape[1]}: value rel err {value_err:.2e}, "
            f"grad rel err {grad_err:.2e}"
        )
        worst = max(worst, value_err, grad_err)
    return worst


def sanitize_target():
    """A small forward + backward through the CUDA kernels, for compute-sanitizer to watch."""
    extension.load()
    s = random_splats(2, 700, dtype=torch.float32, seed=7).cuda().requires_grad_()
    out = ops.render(s, 45, 70, "kernel")
    out.square().sum().backward()
    torch.cuda.synchronize()
    print("sanitize target ran", float(out.detach().sum()), float(s.grad.abs().sum()))


def run_sanitizer() -> str:
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        return "compute-sanitizer not found"
    result = {}
    for check in ("memcheck", "racecheck"):
        run = subprocess.run(
            [
                tool,
                "--tool",
                check,
                "--error-exitcode",
                "3",
                sys.executable,
                __file__,
                "--sanitize-target",
            ],
            capture_output=True,
            text=True,
            timeout=150,
        )
        log(f"compute-sanitizer {check} (exit {run.returncode}):")
        log(run.stdout[-3000:] + run.stderr[-2000:])
        result[check] = "clean" if run.returncode == 0 else f"exit {run.returncode}"
    return ", ".join(f"{k} {v}" for k, v in result.items())


def profile_fit(photos, device, budget=400, batch=1024, iterations=100):
    """Where a fit's time goes: the op table of the profiler, and the kernels timed alone."""
    from torch.profiler import ProfilerActivity, profile

    images = batch_of(photos, batch, device)
    fit_splats(
        images[:64], num_splats=budget, iterations=10, device=device, progress=False
    )  # warm-up
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fit_splats(
            images,
            num_splats=budget,
            iterations=iterations,
            device=device,
            progress=False,
            batch_size=batch,
        )
        sync(device)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    log(f"profile of a fit, N={budget}, batch {batch}, {iterations} iterations:\n{table}")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    log(f"by CPU time:\n{table}")
    splats = random_splats(batch, int(budget * 1.5), dtype=torch.float32, seed=0).to(device)
    for name, fn in [
        ("forward", lambda: ops.render(splats, 224, 224, "kernel")),
        (
            "forward+backward",
            lambda: torch.autograd.grad(
                ops.render(splats.requires_grad_(), 224, 224, "kernel").sum(), splats
            ),
        ),
    ]:
        fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(10):
            fn()
        sync(device)
        log(
            f"{name} alone, batch {batch}, N={splats.shape[1]}: "
            f"{(time.perf_counter() - start) / 10 * 1e3:.2f} ms"
        )


def batch_of(photos, batch, device):
    """``batch`` images: the sample photos, flipped and rotated so neighbours differ."""
    base = torch.stack(to_rgb_tensors(photos))
    variants = [base, base.flip(-1), base.flip(-2), base.transpose(-1, -2)]
    pool = torch.cat(variants)
    return pool[torch.arange(batch) % len(pool)].to(device)


def timed_fit(images, budget, iterations, device, batch_size=None):
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fit_splats(
        images,
        num_splats=budget,
        iterations=iterations,
        device=device,
        progress=False,
        batch_size=batch_size or len(images),
    )
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return result, seconds, peak


def gpu_busy_share(images, budget, iterations, device) -> float:
    """Share of a fit's wall time the GPU is busy running kernels, as NVML reports it (what
    nvidia-smi's "GPU-Util" shows), sampled every 20 ms while a fit runs."""
    if device.type != "cuda":
        return float("nan")
    try:
        import pynvml
    except ImportError:
        log("  pynvml missing: no GPU utilisation reading")
        return float("nan")
    import threading

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    samples, done = [], threading.Event()

    def sample():
        while not done.wait(0.02):
            samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    fit_splats(
        images[:64], num_splats=budget, iterations=5, device=device, progress=False
    )  # warm-up
    sync(device)
    thread = threading.Thread(target=sample)
    thread.start()
    fit_splats(
        images,
        num_splats=budget,
        iterations=iterations,
        device=device,
        progress=False,
        batch_size=len(images),
    )
    sync(device)
    done.set()
    thread.join()
    steady = samples[len(samples) // 10 :]  # NVML averages over its own window: skip the ramp
    return sum(steady) / max(1, len(steady)) / 100


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "out/gpu"))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--budgets", type=int, nargs="+", default=[400, 900, 1600, 3136])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument(
        "--target-psnr",
        type=float,
        default=27.9,
        help="mean dB the CPU fitter reaches at N=400 by default (docs)",
    )
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument(
        "--deadline",
        type=float,
        default=420,
        help="seconds after which the timing grid skips configs predicted to overrun",
    )
    parser.add_argument("--sanitize-target", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only build, check and profile one fit (where the time goes)",
    )
    args = parser.parse_args()
    if args.sanitize_target:
        return sanitize_target()
    if args.dry_run:
        device = torch.device("cpu")
        args.budgets, args.batches, args.iterations = [400], [4, 8], 20
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: run with --dry-run to check the script on the CPU")
        device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    global LOG_FILE
    LOG_FILE = out / "gpu_bench.log"
    LOG_FILE.write_text("")
    summary: list[tuple[str, str]] = []

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    log(f"torch {torch.__version__}, device {name}")
    start = time.perf_counter()
    built = extension.build(cuda=device.type == "cuda")
    extension.load()
    log(
        f"built {built['name']} ({built['devices']}, archs {built['cuda_archs']}) "
        f"in {time.perf_counter() - start:.0f} s"
    )

    log("correctness vs reference (fp32 kernel vs fp64 reference):")
    worst = check_correctness(device, trials=2 if args.dry_run else 8)
    summary.append(("max rel err (goal < 1e-4)", f"{worst:.2e} {'OK' if worst < 1e-4 else 'FAIL'}"))

    if not args.skip_tests and not args.dry_run:
        test = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py", "tests/test_render.py"],
            capture_output=True,
            text=True,
        )
        log(test.stdout[-6000:] + test.stderr[-3000:])
        tail = (test.stdout.strip().splitlines() or ["no output"])[-1]
        log("GPU tests:", tail)
        summary.append(("GPU tests", tail))
        summary.append(("compute-sanitizer", run_sanitizer()))

    photos = list(sample_photos(224).values())
    if args.profile:
        return profile_fit(photos, device)
    rows = []
    for budget in args.budgets:
        last = None  # (batch, seconds) of the previous batch size at this budget
        for batch in args.batches:
            elapsed = time.perf_counter() - start
            if last and elapsed + last[1] * batch / last[0] > args.deadline:
                deadline = f"{args.deadline:.0f} s"
                log(f"N={budget} batch={batch}: skipped, would pass the {deadline} deadline")
                continue
            images = batch_of(photos, batch, device)
            try:
                result, seconds, peak = timed_fit(images, budget, args.iterations, device)
            except torch.OutOfMemoryError:
                log(f"N={budget} batch={batch}: out of memory")
                continue
            rate = batch / seconds
            last = (batch, seconds)
            rows.append((budget, batch, rate, float(result.psnr.mean()), peak / batch))
            log(
                f"N={budget} batch={batch}: {rate:.1f} images/s at {args.iterations} iterations, "
                f"mean PSNR {result.psnr.mean():.2f} dB, peak {peak / batch / 2**20:.2f} MiB/image"
            )

    budget, batch = 400, max(args.batches)
    images = batch_of(photos, batch, device)
    target_rate = None
    for iterations in sorted({50, 100, 150, 200, 300, 400, args.iterations}):
        if time.perf_counter() - start > args.deadline + 60:
            log("  to target: stopped at the deadline")
            break
        if args.dry_run:
            iterations = min(iterations, args.iterations)
        result, seconds, _ = timed_fit(images, budget, iterations, device)
        psnr = float(result.psnr.mean())
        log(
            f"  to target: {iterations} iterations -> {psnr:.2f} dB, {batch / seconds:.1f} images/s"
        )
        if psnr >= args.target_psnr or args.dry_run:
            target_rate = (iterations, batch / seconds, psnr)
            break
    share = gpu_busy_share(images, budget, 200 if not args.dry_run else 5, device)
    log(f"GPU utilisation during a fit (NVML, N=400, batch {batch}): {share:.1%}")

    loop_images = images[: 16 if not args.dry_run else 2]
    _, loop_seconds, _ = timed_fit(loop_images, budget, args.iterations, device, batch_size=1)
    loop_rate = len(loop_images) / loop_seconds
    batched = next((r for r in rows if r[0] == 400 and r[1] == batch), None)
    log(f"per-image loop baseline: {loop_rate:.2f} images/s")

    summary += [
        (
            "N=400 images/s to target",
            f"{target_rate[1]:.0f} ({target_rate[0]} it, "
            f"{target_rate[2]:.2f} dB; goal >= 1400 at {args.target_psnr} dB)"
            if target_rate
            else "target not reached",
        ),
        ("GPU utilisation (NVML)", f"{share:.1%} (goal >= 95%)"),
        (
            f"batched vs per-image loop (batch {batch})",
            f"{batched[2] / loop_rate:.1f}x (goal >= 50x)" if batched else "n/a",
        ),
    ]
    for budget_, batch_, rate, psnr, per_image in rows:
        summary.append(
            (
                f"N={budget_} batch={batch_}",
                f"{rate:.0f} img/s, {psnr:.2f} dB, {per_image / 2**20:.2f} MiB/img",
            )
        )

    width = max(len(k) for k, _ in summary)
    log("\n" + "\n".join(f"{k.ljust(width)}  {v}" for k, v in summary))


if __name__ == "__main__":
    main()
