"""One fitting iteration (render forward + backward + loss) with the CPU kernel vs the dense
PyTorch reference, on the same inputs in one run. Prints the ratio (the goal: at least 30x).

    python benchmarks/kernel_speed.py [--num-splats 400] [--batch 8] [--size 224]
"""

import argparse
import platform
import statistics
import time

import torch

from timm_splat import extension, ops
from timm_splat.fitting import FitConfig, initial_splats
from timm_splat.images import to_rgb_tensors
from timm_splat.samples import SAMPLE_PHOTOS, sample_photos


def iteration_seconds(splats, targets, backend, repeats):
    height, width = targets.shape[-2:]
    times = []
    for _ in range(repeats):
        param = splats.detach().requires_grad_(True)
        start = time.perf_counter()
        loss = (ops.render(param, height, width, backend) - targets).square().mean()
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-splats", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    assert extension.load(), extension.load_error()

    photos = list(sample_photos(args.size).values())
    images = [photos[i % len(SAMPLE_PHOTOS)] for i in range(args.batch)]
    targets = torch.stack(to_rgb_tensors(images))
    # Realistic splat sizes: the fitter's structured initialisation at this budget.
    splats = initial_splats(targets, args.num_splats, FitConfig(num_splats=args.num_splats))
    iteration_seconds(splats, targets, "kernel", 2)  # warm-up
    kernel = iteration_seconds(splats, targets, "kernel", max(args.repeats, 5))
    reference = iteration_seconds(splats, targets, "reference", args.repeats)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"N={splats.shape[1]} splats, {args.size}x{args.size}, batch {args.batch}: "
          "one iteration (forward + backward)")
    print(f"  kernel    {kernel * 1e3:9.1f} ms  ({kernel / args.batch * 1e3:.2f} ms/image)")
    print(f"  reference {reference * 1e3:9.1f} ms  ({reference / args.batch * 1e3:.2f} ms/image)")
    print(f"  speed-up  {reference / kernel:9.1f}x")


if __name__ == "__main__":
    main()
