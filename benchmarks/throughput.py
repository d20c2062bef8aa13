"""Throughput of EmerDiff: the naive reference path against the default (vectorized) path, side by side.

    python benchmarks/throughput.py --quick                 # CPU, tiny-random, about a minute
    python benchmarks/throughput.py --model sd14-arch       # GPU: full SD 1.x architecture, random weights
    python benchmarks/throughput.py --model sd14-arch --skip-naive --decoder taesd --compare-to-default

Both paths label the same images; the script checks that their labels agree and reports, for each: images/s,
U-Net calls/s (and branch rows per second), peak memory (RSS on CPU, torch.cuda.max_memory_allocated on GPU),
FLOPs per image (torch.utils.flop_counter), and on CUDA the achieved TFLOP/s against a bf16 matmul peak
measured in the same run. The fast options (--compile, --decoder taesd, --difference one_sided,
--steps-after-modulation, --no-channels-last) apply to both paths; --compare-to-default also runs the model
with every option at its default on the same images and prints `label_agreement_vs_default`, the fraction
of pixels labelled the same. The last line is `speedup: <default over naive images/s>` (with --skip-naive:
`default: <images/s>`).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from emerdiff_pl import EmerDiffSegmenter


@dataclass
class PathResult:
    name: str
    seconds: float
    images_per_s: float
    unet_calls_per_s: float
    unet_rows_per_s: float
    peak_memory_gb: float
    flops_per_image: float
    tflops_per_s: float
    phases_s_per_image: dict[str, float]  # SegmentationResult.timings, averaged over the images


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.peak, self._stop = psutil.Process().memory_info().rss, False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        process = psutil.Process()
        while not self._stop:
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def count_unet_calls(model: EmerDiffSegmenter) -> dict[str, int]:
    """Count the model's U-Net calls and rows from now on: wraps `call_unet`, the one place the segmenter calls
    its U-Net (outside the U-Net, so compiling is unaffected)."""
    counts = {"calls": 0, "rows": 0}
    unet = model.call_unet

    def counted(x: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
        counts["calls"] += 1
        counts["rows"] += x.shape[0]
        return unet(x, t, emb)

    model.call_unet = counted
    return counts


def synthetic_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=size, mode="bilinear", align_corners=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_matmul_peak(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """Achievable dense bf16 TFLOP/s of this device, from a large matmul."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def flops_per_image(model: EmerDiffSegmenter, image: torch.Tensor, naive: bool) -> float:
    """FLOPs of one image at the model's K, from counted runs at K = 1 and K = 2: the cost is the reference
    pass plus K identical per-mask branch sets, so it is exactly linear in K (k-means, not counted, aside)."""
    config = model.config
    k = config.num_masks
    counted = []
    for masks in (1, 2):
        model.config = replace(config, num_masks=masks)
        # eager: the count is the same, and a compiled U-Net would recompile for these batch sizes
        eager = torch.compiler.set_stance("force_eager") if config.compile else nullcontext()
        try:
            with eager, FlopCounterMode(display=False) as counter:
                model.segment(image, naive=naive)
        finally:
            model.config = config
        counted.append(float(counter.get_total_flops()))
    return counted[0] + (k - 1) * (counted[1] - counted[0])


def run_path(
    model: EmerDiffSegmenter, images: torch.Tensor, naive: bool, batch: int, flops: float, name: str = ""
):
    device = model.device
    counts = count_unet_calls(model)
    labels, phases, n = [], {}, len(images)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as rss:
        sync(device)
        start = time.perf_counter()
        for chunk in images.split(1 if naive else batch):
            result = model.segment(chunk, naive=naive)
            labels.append(result.labels)
            for phase, s in result.timings.items():
                phases[phase] = phases.get(phase, 0.0) + s / n
        sync(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
    result = PathResult(
        name=name or ("naive" if naive else "default"),
        seconds=seconds,
        images_per_s=n / seconds,
        unet_calls_per_s=counts["calls"] / seconds,
        unet_rows_per_s=counts["rows"] / seconds,
        peak_memory_gb=peak / 1e9,
        flops_per_image=flops,
        tflops_per_s=flops * n / seconds / 1e12,
        phases_s_per_image=phases,
    )
    return result, torch.cat(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="CPU, tiny-random, 64², K=20, 1 image (~1 minute)"
    )
    parser.add_argument(
        "--model", default="tiny-random", help="tiny-random | sd14-arch | a diffusers folder/hub id"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 for tiny-random, else 512")
    parser.add_argument("--num-masks", type=int, default=20)
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images per segment() call on the default path"
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-branch-batch", default="auto")
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "xformers"])
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels-last U-Net and decoders on CUDA (model default: on)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument(
        "--prefix-sharing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compute the t_m call's layers before the modulated one once per image (model: prefix_sharing)",
    )
    parser.add_argument(
        "--decoder", default="vae", choices=["vae", "taesd"], help="decoder of the branch images"
    )
    parser.add_argument(
        "--taesd-model",
        default=None,
        help="default: tiny-random / sd14-arch to match --model, else madebyollin/taesd",
    )
    parser.add_argument("--difference", default="two_sided", choices=["two_sided", "one_sided"])
    parser.add_argument(
        "--steps-after-modulation", type=int, default=None, help="denoising steps from t_m (default: all)"
    )
    parser.add_argument(
        "--compare-to-default",
        action="store_true",
        help="also run every option at its default on the same images and print label_agreement_vs_default",
    )
    parser.add_argument("--skip-naive", action="store_true", help="only time the default path (large models)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.device = "tiny-random", "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    resolution = args.resolution or (64 if args.model == "tiny-random" else 512)
    num_images = args.num_images or (1 if args.quick or args.model == "tiny-random" else 4)
    branch = args.max_branch_batch if args.max_branch_batch == "auto" else int(args.max_branch_batch)
    taesd_model = args.taesd_model or (
        args.model if args.model in ("tiny-random", "sd14-arch") else "madebyollin/taesd"
    )
    common = dict(
        pretrained=args.model,
        resolution=resolution,
        num_masks=args.num_masks,
        dtype=args.dtype,
        max_branch_batch=branch,
        attention_backend=args.attention_backend,
    )
    options = dict(
        channels_last=args.channels_last,
        compile=args.compile,
        decoder=args.decoder,
        taesd_model=taesd_model,
        difference=args.difference,
        steps_after_modulation=args.steps_after_modulation,
    )
    model = EmerDiffSegmenter(**common, **options, prefix_sharing=args.prefix_sharing)
    model = model.to(torch.device(args.device))
    model.configure_model()
    device = model.device
    images = synthetic_images(num_images, resolution)
    print(
        f"model={args.model} device={device} resolution={resolution} K={args.num_masks} images={num_images} "
        f"dtype={model.compute_dtype()} threads={torch.get_num_threads()} prefix_sharing={args.prefix_sharing} "
        + " ".join(f"{k}={v}" for k, v in options.items() if k != "taesd_model" or args.decoder == "taesd"),
        flush=True,
    )
    start = time.perf_counter()
    model.segment(images[:1])  # warm-up: loading, backend probe, allocator, compilation
    print(f"attention_backend={model.backend} warmup_s={time.perf_counter() - start:.1f}", flush=True)

    results, labels = [], {}
    paths = [False] if args.skip_naive else [True, False]
    for naive in paths:
        flops = flops_per_image(model, images[:1], naive)
        result, labels[naive] = run_path(model, images, naive, args.batch_size, flops)
        results.append(result)
        print(json.dumps(asdict(result)), flush=True)

    report = {"args": vars(args), "device": str(device), "results": [asdict(r) for r in results]}
    if args.compare_to_default:
        plain = EmerDiffSegmenter(**common).to(device)
        plain.configure_model()
        plain.segment(images[:1])  # warm-up
        flops = flops_per_image(plain, images[:1], naive=False)
        result, plain_labels = run_path(plain, images, False, args.batch_size, flops, name="plain_default")
        print(json.dumps(asdict(result)), flush=True)
        report["plain_default"] = asdict(result)
    if device.type == "cuda":
        peak = bf16_matmul_peak(device)
        report["bf16_peak_tflops"] = peak
        print(f"device={torch.cuda.get_device_name(device)} bf16_matmul_peak={peak:.0f} TFLOP/s")
        for r in results:
            print(
                f"{r.name}: {r.tflops_per_s:.0f} TFLOP/s = {100 * r.tflops_per_s / peak:.1f}% of peak, "
                f"{1 / r.images_per_s:.2f} s/image"
            )
    if not args.skip_naive:
        agreement = (labels[True] == labels[False]).float().mean().item()
        report["label_agreement"] = agreement
        print(f"label_agreement: {agreement:.6f}")
    if args.compare_to_default:
        agreement = (labels[False] == plain_labels).float().mean().item()
        report["label_agreement_vs_default"] = agreement
        print(f"label_agreement_vs_default: {agreement:.6f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.skip_naive:
        print(f"default: {results[0].images_per_s:.4f} images/s")
    else:
        print(f"speedup: {results[1].images_per_s / results[0].images_per_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
