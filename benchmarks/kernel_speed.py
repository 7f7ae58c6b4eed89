"""CPU kernel speed: the kernel in csrc/ against the kernel of an older commit, and against the
dense PyTorch reference, on the same inputs in one run.

    python benchmarks/kernel_speed.py [--baseline a0c4ea2] [--num-splats 400] [--batch 8]
        [--size 224] [--repeats 15] [--fit-iterations 150] [--skip-reference] [--callgrind]

Workloads (N splats per image, the sample photos): the fitter's structured initialisation, and
the splats of a real fit (``--fit-iterations`` iterations of ``fit_splats``; 0 skips it).

1. Old vs new kernel: the baseline commit's csrc/ is compiled into a scratch folder with the op
   namespace renamed (``-Dtimm_splat=timm_splat_base``), so both libraries live in this process.
   A fitting iteration's kernel work is one ``render_forward`` and one ``render_backward`` of the
   residual; old and new run interleaved, ``--repeats`` times, and the medians are compared.
   Printed in ms per image-iteration (wall time divided by the batch).
2. With more than one torch thread: the new kernel on one thread against all of them.
3. ``--callgrind``: instructions executed by the kernel calls (valgrind's callgrind, one thread,
   one forward + backward of the batch per library), deterministic whatever the machine's load.
4. One fitting iteration (forward + backward + MSE through autograd) with the kernel against the
   dense reference (the goal of the first CPU kernel: at least 30x).
"""

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from timm_splat import extension, ops

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASELINE = "a0c4ea2"  # the CPU kernels before issue 11 part 3 (SIMD row spans)


def baseline_ops(commit: str, verbose: bool = False):
    """torch.ops.timm_splat_base: the CPU kernels of ``commit``, built into a scratch folder."""
    from torch.utils import cpp_extension

    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "--name-only", f"{commit}:csrc"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    src = Path(tempfile.gettempdir()) / f"timm_splat_kernel_speed_{commit}" / "csrc"
    src.mkdir(parents=True, exist_ok=True)
    for name in files:
        text = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{commit}:csrc/{name}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        path = src / name
        if not path.exists() or path.read_text() != text:  # keep mtimes: ninja rebuilds less
            path.write_text(text)
    build = src.parent / "build"
    build.mkdir(exist_ok=True)
    cpp_extension.load(
        name="timm_splat_base_cpu",
        sources=[str(src / "ops.cpp"), str(src / "render_cpu.cpp")],
        # The same flags as the new kernel's (OpenMP included), so both use the same threads.
        extra_cflags=[*extension.cxx_flags(), "-Dtimm_splat=timm_splat_base"],
        extra_include_paths=[str(src)],
        build_directory=str(build),
        is_python_module=False,
        verbose=verbose,
    )
    return torch.ops.timm_splat_base


def workloads(args):
    """{name: (splats [B, N, 8] float32, targets [B, 3, H, W])}."""
    from timm_splat.fitting import FitConfig, fit_splats, initial_splats
    from timm_splat.images import to_rgb_tensors
    from timm_splat.samples import SAMPLE_PHOTOS, sample_photos

    photos = list(sample_photos(args.size).values())
    images = [photos[i % len(SAMPLE_PHOTOS)] for i in range(args.batch)]
    targets = torch.stack(to_rgb_tensors(images))
    cfg = FitConfig(num_splats=args.num_splats)
    out = {"init": (initial_splats(targets, args.num_splats, cfg).contiguous(), targets)}
    if args.fit_iterations > 0:
        fitted = fit_splats(images, num_splats=args.num_splats, iterations=args.fit_iterations)
        out["fitted"] = (fitted.splats.float().contiguous(), targets)
    return out


def kernel_times(libs, splats, targets, repeats):
    """{name: (forward s, backward s)}, medians over interleaved repeats."""
    height, width = targets.shape[-2:]
    times = {name: ([], []) for name in libs}
    for _ in range(repeats):
        for name, lib in libs.items():
            start = time.perf_counter()
            image = lib.render_forward(splats, height, width)
            middle = time.perf_counter()
            residual = image - targets
            middle2 = time.perf_counter()
            lib.render_backward(residual, splats, height, width)
            end = time.perf_counter()
            times[name][0].append(middle - start)
            times[name][1].append(end - middle2)
    return {name: (statistics.median(f), statistics.median(b)) for name, (f, b) in times.items()}


def agreement(libs, splats, targets):
    """Largest difference of the new kernel from the old one, relative to the largest value."""
    height, width = targets.shape[-2:]
    old, new = libs["old"], libs["new"]
    image_old = old.render_forward(splats, height, width)
    image_new = new.render_forward(splats, height, width)
    residual = image_old - targets
    grad_old = old.render_backward(residual, splats, height, width)
    grad_new = new.render_backward(residual, splats, height, width)
    return ((image_new - image_old).abs().max() / image_old.abs().max()).item(), (
        (grad_new - grad_old).abs().max() / grad_old.abs().max()
    ).item()


def reference_iteration(splats, targets, backend, repeats):
    height, width = targets.shape[-2:]
    times = []
    for _ in range(repeats):
        param = splats.detach().requires_grad_(True)
        start = time.perf_counter()
        loss = (ops.render(param, height, width, backend) - targets).square().mean()
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def callgrind_counts(args, data_file, workload):
    """{library: (forward, backward) instructions per image}, from valgrind in subprocesses."""
    counts = {}
    for which in ("old", "new"):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "callgrind.out")
            cmd = [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                "--toggle-collect=*render_forward_cpu*",
                "--toggle-collect=*render_backward_cpu*",
                sys.executable,
                __file__,
                "--single",
                which,
                "--data",
                data_file,
                "--workload",
                workload,
                "--baseline",
                args.baseline,
            ]
            subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
            text = subprocess.run(
                ["callgrind_annotate", "--inclusive=yes", out],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        found = {}
        for line in text.splitlines():
            match = re.match(r"\s*([\d,]+) .*render_(forward|backward)_cpu\(", line)
            if match and match.group(2) not in found:
                found[match.group(2)] = int(match.group(1).replace(",", "")) / args.batch
        counts[which] = (found["forward"], found["backward"])
    return counts


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="commit of the old kernel")
    parser.add_argument("--num-splats", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--fit-iterations", type=int, default=150)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="also count instructions with valgrind (a few minutes)",
    )
    parser.add_argument("--single", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="init", help=argparse.SUPPRESS)
    args = parser.parse_args()
    assert extension.load(), extension.load_error()

    if args.single:  # one forward + backward for callgrind, one thread
        torch.set_num_threads(1)
        lib = baseline_ops(args.baseline) if args.single == "old" else torch.ops.timm_splat
        splats, targets = torch.load(args.data)[args.workload]
        height, width = targets.shape[-2:]
        residual = lib.render_forward(splats, height, width) - targets
        lib.render_backward(residual, splats, height, width)
        return

    libs = {"old": baseline_ops(args.baseline), "new": torch.ops.timm_splat}
    data = workloads(args)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"N={args.num_splats} splats, {args.size}x{args.size}, batch {args.batch}; old = csrc/ "
        f"at {args.baseline}, new = csrc/ now; ms per image-iteration, median of "
        f"{args.repeats} interleaved repeats"
    )
    print(f"{'workload':9s} {'kernel':6s} {'fwd':>7s} {'bwd':>7s} {'total':>7s} {'speed-up':>9s}")
    for name, (splats, targets) in data.items():
        kernel_times(libs, splats, targets, 2)  # warm-up
        times = kernel_times(libs, splats, targets, args.repeats)
        old_total = sum(times["old"])
        for which in ("old", "new"):
            f, b = (t / args.batch * 1e3 for t in times[which])
            ratio = old_total / sum(times[which])
            print(f"{name:9s} {which:6s} {f:7.3f} {b:7.3f} {f + b:7.3f} {ratio:8.2f}x")
        image_diff, grad_diff = agreement(libs, splats, targets)
        print(
            f"{name:9s} new - old, relative to the largest value: image {image_diff:.1e}, "
            f"gradient {grad_diff:.1e}"
        )

    threads = torch.get_num_threads()
    if threads > 1:  # the new kernel on one thread against all of torch's, same inputs
        libs_new = {"new": torch.ops.timm_splat}
        print(f"threads: the new kernel on 1 and on {threads}, ms per image-iteration")
        for name, (splats, targets) in data.items():
            per_count = {}
            for count in (1, threads):
                torch.set_num_threads(count)
                kernel_times(libs_new, splats, targets, 2)
                per_count[count] = sum(kernel_times(libs_new, splats, targets, args.repeats)["new"])
            torch.set_num_threads(threads)
            one, many = (per_count[c] / args.batch * 1e3 for c in (1, threads))
            print(
                f"{name:9s} 1 thread {one:7.3f}  {threads} threads {many:7.3f}  "
                f"{one / many:.2f}x faster"
            )

    if args.callgrind:
        print("instructions per image-iteration (callgrind, 1 thread)")
        data_file = Path(tempfile.mkdtemp()) / "workloads.pt"
        torch.save(data, data_file)
        for name in data:
            counts = callgrind_counts(args, str(data_file), name)
            old, new = counts["old"], counts["new"]
            print(
                f"{name:9s} old fwd {old[0] / 1e6:6.2f}M bwd {old[1] / 1e6:6.2f}M | new fwd "
                f"{new[0] / 1e6:6.2f}M bwd {new[1] / 1e6:6.2f}M | ratio fwd "
                f"{old[0] / new[0]:.2f}x bwd {old[1] / new[1]:.2f}x total "
                f"{sum(old) / sum(new):.2f}x"
            )

    if not args.skip_reference:
        splats, targets = data["init"]
        reference_iteration(splats, targets, "kernel", 2)  # warm-up
        kernel = reference_iteration(splats, targets, "kernel", max(args.repeats, 5))
        reference = reference_iteration(splats, targets, "reference", args.reference_repeats)
        print("one fitting iteration (forward + backward + MSE, autograd), init workload")
        print(f"  kernel    {kernel * 1e3:9.1f} ms  ({kernel / args.batch * 1e3:.2f} ms/image)")
        print(
            f"  reference {reference * 1e3:9.1f} ms  ({reference / args.batch * 1e3:.2f} ms/image)"
        )
        print(f"  speed-up  {reference / kernel:9.1f}x")


if __name__ == "__main__":
    main()
