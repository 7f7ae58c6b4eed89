"""Peak resident memory of fitting a batch of 64 images at N=3136 (224x224), measured in a fresh
process so nothing else counts. Goal: under 4 GB.

    python benchmarks/fit_memory.py [--batch 64] [--num-splats 3136] [--iterations 30]
                                    [--config default[,field=value...]]
"""

import argparse
import dataclasses
import json
import subprocess
import sys

from fit_lab import parse_variant

CHILD = """
import json, resource, sys, time
import numpy as np
import torch
from timm_splat import FitConfig, extension, fit_splats
from timm_splat.samples import sample_photos
extension.load()
photos = list(sample_photos(224).values())
batch, budget, iterations = map(int, sys.argv[1:4])
config = FitConfig(**json.loads(sys.argv[4]))
images = torch.stack(
    [torch.from_numpy(np.asarray(photos[i % len(photos)])).permute(2, 0, 1) for i in range(batch)]
)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
result = fit_splats(images, config, num_splats=budget, iterations=iterations, progress=False)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{peak / 2**20:.2f} {before / 2**20:.2f} {seconds:.1f} {result.psnr.mean():.2f}")
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-splats", type=int, default=3136)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument(
        "--config", default="default", help="preset[,field=value...] as fit_lab.py's variants"
    )
    args = parser.parse_args()
    config = dataclasses.asdict(parse_variant(f"run={args.config}")[1])
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(args.batch), str(args.num_splats), str(args.iterations)]
        + [json.dumps(config)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    peak, before, seconds, psnr = map(float, out)
    print(
        f"{args.config}: batch {args.batch}, N={args.num_splats}, 224x224, "
        f"{args.iterations} iterations: "
        f"peak RSS {peak:.2f} GB (torch + data before the fit: {before:.2f} GB), "
        f"{seconds:.1f} s, mean PSNR {psnr:.2f} dB"
    )
    print("goal < 4 GB:", "met" if peak < 4 else "NOT met")


if __name__ == "__main__":
    main()
