"""What the reference fallback costs: one fitting step (render forward, residual, render
backward, as the fitter runs them) with the kernels against the pure-PyTorch reference, N=400,
224x224, batch 64, on the CPU, in one run (interleaved repeats, CPU time and wall time).

    python benchmarks/reference_cost.py [--batch 64] [--num-splats 400] [--size 224] \\
        [--repeats 2] [--reference-slice 1]

The reference's backward is autograd through dense [B, n, H, W] tensors: at batch 64 it would
hold tens of GB, so it runs ``--reference-slice`` images at a time (its time is linear in the
batch; the kernels run the whole batch at once, as the fitter does). The printed ratio is what
extension.REFERENCE_SLOWDOWN and docs/benchmarks.md quote.
"""

import argparse
import platform
import statistics
import time

import torch

from timm_splat import extension, ops
from timm_splat.fitting import FitConfig, initial_splats
from timm_splat.images import to_rgb_tensors
from timm_splat.samples import sample_photos


def targets_of(batch: int, size: int) -> torch.Tensor:
    """``batch`` images: the sample photos, flipped and transposed so neighbours differ."""
    base = torch.stack(to_rgb_tensors(list(sample_photos(size).values())))
    pool = torch.cat([base, base.flip(-1), base.flip(-2), base.transpose(-1, -2)])
    return pool[torch.arange(batch) % len(pool)].contiguous()


def step(splats, targets, backend: str, slice_size: int) -> None:
    height, width = targets.shape[-2:]
    for start in range(0, len(splats), slice_size):
        s, t = splats[start : start + slice_size], targets[start : start + slice_size]
        residual = ops.render(s, height, width, backend) - t
        ops.render_vjp(s, residual, height, width, backend)


def timed(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-splats", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-slice", type=int, default=1)
    args = parser.parse_args()
    if not extension.load():
        raise SystemExit(f"the kernels are not available: {extension.load_error()}")

    targets = targets_of(args.batch, args.size)
    cfg = FitConfig(num_splats=args.num_splats)
    splats = initial_splats(targets, args.num_splats, cfg).float().contiguous()
    print(
        f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
        f"N={splats.shape[1]} (the fitter's initialisation of {args.num_splats}), "
        f"{args.size}x{args.size}, batch {args.batch}; reference {args.reference_slice} "
        f"image(s) at a time"
    )
    step(splats[:2], targets[:2], "kernel", args.batch)  # warm-up
    step(splats[:1], targets[:1], "reference", 1)
    runs = {"kernel": (args.batch, []), "reference": (args.reference_slice, [])}
    for repeat in range(args.repeats):
        for backend, (slice_size, times) in runs.items():
            times.append(timed(lambda b=backend, n=slice_size: step(splats, targets, b, n)))
            cpu, wall = times[-1]
            print(f"  repeat {repeat}: {backend:9s} {cpu:8.2f} s CPU, {wall:8.2f} s wall")
    medians = {
        name: tuple(statistics.median(t[i] for t in times) for i in (0, 1))
        for name, (_, times) in runs.items()
    }
    for name, (cpu, wall) in medians.items():
        print(
            f"{name:9s} {cpu / args.batch * 1e3:9.1f} ms CPU / image-step, "
            f"{wall / args.batch * 1e3:9.1f} ms wall"
        )
    ratio_cpu = medians["reference"][0] / medians["kernel"][0]
    ratio_wall = medians["reference"][1] / medians["kernel"][1]
    print(f"reference / kernel: {ratio_cpu:.0f}x CPU time, {ratio_wall:.0f}x wall time")


if __name__ == "__main__":
    main()
