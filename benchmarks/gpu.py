"""Everything a GPU machine should show, in one call: build the CUDA kernels, check them against
the reference, run the GPU tests, time batched fitting, then training and zero-shot evaluation.
Prints a short table last and writes the full log to ``--out`` (default ``$OUT`` or ./out/gpu).

    python benchmarks/gpu.py                 # on a GPU machine
    python benchmarks/gpu.py --dry-run       # anywhere: tiny sizes on the CPU, same code path

Measured (issue 23, items 1 and 3): correctness of both kernels (forward values and backward
gradients, fp32, relative error < 1e-4, fresh random inputs, outputs poisoned first); images/s
and PSNR of the default fitter, the fast preset and the paper preset for N = 400 / 1600 / 3136
and batches 256 to 4096, each at its own iteration count; images/s to a target PSNR; GPU
utilisation during a fit (NVML, as nvidia-smi); peak GPU memory per image; a per-image loop of
the same fit as the baseline. Then, when open_clip imports: training steps/s (bf16 autocast,
AdamW, open_clip's ClipLoss) of splat-ViT-B-16 from pre-fitted splats and from pixels through
the in-model fit, against open_clip's ViT-B-16 on pixels, with peak memory, and zero-shot eval
images/s.

The GPU machine has no open_clip: carry its wheels (the script prints the commands when it is
missing; ``--dry-run`` prints them with this machine's versions):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
        open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
    # there, first: python3 -m pip install -q --no-index --no-deps --target /tmp/site \
    #     .whl/*.whl && export PYTHONPATH=/tmp/site
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from timm_splat import FitConfig, extension, fit_splats, ops
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


def timed_fit(images, budget, iterations, device, batch_size=None, preset="default"):
    """A fit of ``images`` with ``preset`` (its own iteration count when ``iterations`` is
    None): (result, seconds, peak bytes; 0 off the GPU)."""
    overrides = {} if iterations is None else {"iterations": iterations}
    config = FitConfig.preset(preset, num_splats=budget, **overrides)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fit_splats(
        images,
        config,
        device=device,
        progress=False,
        batch_size=batch_size or len(images),
    )
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return result, seconds, peak


def peak_text(peak_bytes: float, device) -> str:
    return f"{peak_bytes / 2**20:.2f} MiB" if device.type == "cuda" else "n/a on the CPU"


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


# What the training part needs beyond torch, timm and the rest the GPU machine has (its package
# list: /work/.library/device/KINDS.md): open_clip and the two it imports that are missing there.
CARRY = ("open_clip_torch", "ftfy", "wcwidth")


def carry_commands() -> str:
    """The commands that bring open_clip's wheels to the GPU machine, pinned to this machine's
    versions where they are installed here."""
    from importlib import metadata

    pins = []
    for name in CARRY:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return (
        "here: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
        f"-d .whl {' '.join(pins)}\n"
        "there (carry .whl): python3 -m pip install -q --no-index --no-deps --target /tmp/site "
        ".whl/*.whl && export PYTHONPATH=/tmp/site"
    )


def clip_pixels(model, photos, batch, device):
    """Pixels at the model's image size: raw [0, 1] and normalised as open_clip feeds them."""
    import open_clip
    import torch.nn.functional as F

    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = F.interpolate(batch_of(photos, batch, device), size=(size, size), mode="bilinear")
    images = images.clamp(0, 1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)
    return images, (images - mean) / std


def train_steps(model, inputs, text, steps, device) -> tuple[float, int]:
    """Steps/s of open_clip training steps (bf16 autocast, AdamW, ClipLoss) after one warm-up
    step, and the peak memory of the timed steps."""
    import open_clip

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = open_clip.ClipLoss()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            image, text_features, scale = model(inputs, text)[:3]
            loss = loss_fn(image, text_features, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return steps / (time.perf_counter() - start), peak


def eval_rate(model, inputs, classifier, repeats, device) -> float:
    """Zero-shot evaluation images/s: image embeddings and class logits, bf16, no grad."""
    model.eval()

    def run():
        # no_grad, not inference_mode: the in-model fit of pixel inputs runs autograd steps,
        # which inference tensors refuse (a splat model on pixels fails under inference_mode).
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            features = model.encode_image(inputs, normalize=True)
            return (features @ classifier.to(features.dtype)).argmax(-1)

    run()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    sync(device)
    return repeats * len(inputs) / (time.perf_counter() - start)


def train_and_eval(args, device, photos) -> list[tuple[str, str]]:
    """Item 3: training steps/s and peak memory, then zero-shot eval images/s, of the splat
    model (from splats, from pixels) against the RGB model on pixels."""
    try:
        import open_clip
    except ImportError:
        log(f"open_clip is not importable: training and evaluation skipped. {carry_commands()}")
        return [("training / zero-shot eval", "skipped: no open_clip (log: wheels to carry)")]
    import timm_splat  # noqa: F401  (registers the splat-ViT-* configs)
    from timm_splat.evaluation import zero_shot_classifier

    log(f"open_clip {open_clip.__version__}; the wheels the GPU machine needs: {carry_commands()}")
    rows = []
    text_of = open_clip.get_tokenizer(args.rgb_model)
    classnames = ["cat", "dog", "car", "tree", "house", "boat", "bird", "flower", "horse", "cup"]
    models = {
        "splat": open_clip.create_model(args.splat_model).to(device),
        "rgb": open_clip.create_model(args.rgb_model).to(device),
    }
    captions = [f"a photo of a {classnames[i % 10]}" for i in range(args.train_batch)]
    text = text_of(captions).to(device)
    raw, pixels = {}, {}
    for key, model in models.items():
        raw[key], pixels[key] = clip_pixels(model, photos, args.train_batch, device)
    budget = models["splat"].visual.trunk.num_splats
    # Pre-fitted (untimed: a pre-fitted dataset serves them) from the splat model's pixels.
    splats = fit_splats(
        raw["splat"], num_splats=budget, iterations=args.prefit_iterations, progress=False
    ).splats.float()
    runs = [
        (f"{args.splat_model} train, pre-fitted splats (N={budget})", "splat", splats),
        (f"{args.splat_model} train, pixels + in-model fit", "splat", pixels["splat"]),
        (f"{args.rgb_model} train, pixels", "rgb", pixels["rgb"]),
    ]
    if args.dry_run:  # the in-model fit at its default 150 steps: minutes on a CPU
        models["splat"].visual.trunk.fit_options = {"iterations": args.prefit_iterations}
    for name, key, inputs in runs:
        try:
            rate, peak = train_steps(models[key], inputs, text, args.train_steps, device)
        except torch.OutOfMemoryError:
            log(f"{name}: out of memory at batch {args.train_batch}")
            rows.append((name, "out of memory"))
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
        line = (
            f"{rate:.2f} steps/s ({rate * args.train_batch:.0f} img/s), batch "
            f"{args.train_batch}, bf16, peak {peak_text(peak, device)}"
        )
        log(f"{name}: {line}")
        rows.append((name, line))
    for key, model in models.items():
        classifier = zero_shot_classifier(
            model, text_of, classnames, ["a photo of a {}."], device=device
        )
        inputs = [(f"{args.splat_model} zero-shot, splats", splats)] if key == "splat" else []
        inputs.append(
            (
                f"{args.rgb_model if key == 'rgb' else args.splat_model} zero-shot, pixels",
                pixels[key],
            )
        )
        for name, x in inputs:
            rate = eval_rate(model, x, classifier, args.eval_repeats, device)
            log(f"{name}: {rate:.0f} images/s (batch {len(x)}, bf16)")
            rows.append((name, f"{rate:.0f} img/s"))
    return rows


def fitting_benchmark(args, device, photos, start) -> list[tuple[str, str]]:
    """Item 1: images/s, PSNR and peak memory per preset, budget and batch; images/s to a
    target PSNR; GPU utilisation; the per-image loop baseline."""
    summary = []
    rows = []  # (preset, budget, batch, images/s, PSNR, peak bytes per image)
    for preset in args.presets:
        steps = args.iterations or FitConfig.preset(preset).iterations
        for budget in args.budgets:
            last = None  # (batch, seconds) of the previous batch size at this budget
            for batch in args.batches:
                elapsed = time.perf_counter() - start
                if last and elapsed + last[1] * batch / last[0] > args.deadline:
                    deadline = f"{args.deadline:.0f} s"
                    log(f"{preset} N={budget} batch={batch}: skipped, would pass {deadline}")
                    continue
                images = batch_of(photos, batch, device)
                try:
                    result, seconds, peak = timed_fit(
                        images, budget, args.iterations, device, preset=preset
                    )
                except torch.OutOfMemoryError:
                    log(f"{preset} N={budget} batch={batch}: out of memory")
                    continue
                rate, psnr = batch / seconds, float(result.psnr.mean())
                last = (batch, seconds)
                rows.append((preset, budget, batch, rate, psnr, peak / batch))
                log(
                    f"{preset} N={budget} batch={batch}: {rate:.1f} images/s at {steps} "
                    f"iterations, mean PSNR {psnr:.2f} dB, peak {peak_text(peak / batch, device)}"
                    "/image"
                )

    budget, batch = 400, max(args.batches)
    images = batch_of(photos, batch, device)
    target_rate = None
    for iterations in sorted({50, 100, 150, 200, 300, 400}) if not args.dry_run else [2, 3]:
        if time.perf_counter() - start > args.deadline + 60:
            log("  to target: stopped at the deadline")
            break
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

    # The baseline: the same default fit, one image at a time (what a per-image fitter does).
    loop_images = images[: 16 if not args.dry_run else 2]
    _, loop_seconds, _ = timed_fit(loop_images, budget, args.iterations, device, batch_size=1)
    loop_rate = len(loop_images) / loop_seconds
    batched = next((r for r in rows if r[:3] == ("default", 400, batch)), None)
    log(f"per-image loop baseline (default fit, N=400): {loop_rate:.2f} images/s")

    summary += [
        (
            "N=400 images/s to target",
            f"{target_rate[1]:.0f} ({target_rate[0]} it, "
            f"{target_rate[2]:.2f} dB; goal >= 3600 at {args.target_psnr} dB)"
            if target_rate
            else "target not reached",
        ),
        ("GPU utilisation (NVML)", f"{share:.1%} (goal >= 95%)"),
        (
            f"batched vs per-image loop (batch {batch})",
            f"{batched[3] / loop_rate:.1f}x (goal >= 50x)" if batched else "n/a",
        ),
    ]
    for preset, budget_, batch_, rate, psnr, per_image in rows:
        summary.append(
            (
                f"{preset} N={budget_} batch={batch_}",
                f"{rate:.0f} img/s, {psnr:.2f} dB, {peak_text(per_image, device)}/img",
            )
        )
    return summary


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "out/gpu"))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--budgets", type=int, nargs="+", default=[400, 1600, 3136])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--presets", nargs="+", default=["default", "fast", "paper"])
    parser.add_argument(
        "--iterations", type=int, help="fit steps for every preset (default: each preset's own)"
    )
    parser.add_argument("--splat-model", default="splat-ViT-B-16")
    parser.add_argument("--rgb-model", default="ViT-B-16")
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--eval-repeats", type=int, default=5)
    parser.add_argument("--prefit-iterations", type=int, default=150)
    parser.add_argument("--skip-fitting", action="store_true", help="item 3 alone")
    parser.add_argument("--skip-training", action="store_true", help="item 1 alone")
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
        # The same steps at tiny sizes: the budgets and presets of the real run, two small
        # batches, a few fit steps, and the training part on the miniature CLIP pair.
        args.batches, args.iterations, args.deadline = [2, 4], 3, 1e9
        args.splat_model, args.rgb_model = "splat-ViT-Mini-7", "ViT-Mini-7"
        args.train_batch, args.train_steps, args.eval_repeats = 4, 2, 2
        args.prefit_iterations = 3
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
    if not args.skip_fitting:
        summary += fitting_benchmark(args, device, photos, start)
    if not args.skip_training:
        summary += train_and_eval(args, device, photos)

    width = max(len(k) for k, _ in summary)
    log("\n" + "\n".join(f"{k.ljust(width)}  {v}" for k, v in summary))


if __name__ == "__main__":
    main()
