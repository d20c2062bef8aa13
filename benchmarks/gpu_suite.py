"""The GPU measurements of issue 5 in one process (one model build, one lease): SD 1.x architecture with random
weights (`sd14-arch`, same FLOPs as the real model), 512², K = 20, paper schedule.

    python benchmarks/gpu_suite.py --out results/            # writes suite.jsonl, profile.txt; prints a table

Variants share one backbone (built once; it takes most of a minute) and run in a fixed order, each on the same
synthetic images; a variant that fails is recorded and the suite goes on. Rows:
  peak            bf16 matmul peak of this device (8192³, the denominator of every "% of peak")
  unet_only       one U-Net call at several batch sizes: the ceiling the branches can reach
  decode_only     the VAE decoder at batch 4
  default         the default path (auto chunk), timings per phase, peak memory
  gn_micro        one GroupNorm at the U-Net's activation sizes: stock (NCHW input), the torch-op NHWC version,
                  the Triton NHWC kernels (emerdiff_pl.triton_norm); time, GB/s and error against float32
  stock_layout    default with the stock GroupNorm / Transformer2DModel (NCHW round trips; emerdiff_pl.layout)
  torch_group_norm  default with the NHWC GroupNorm in torch ops instead of the Triton kernels
  no_prefix_sharing  default without computing the t_m call's prefix once per image (emerdiff_pl.prefix)
  reference_step_by_step  default with one batch-1 U-Net call per reference step (the inversion unbatched)
  profile         torch.profiler of one default image: time by kernel family
  naive           the naive reference path on 1 image; its labels against the default path's
  chunk_N         max_branch_batch N: time and peak memory
  <option>        each fast option, with its label agreement against `default` on the same images
  fast_preset     the settings configs/sd14-fast.yaml changes, on as many images as `default`
Random weights make label agreement a measure of numerical sensitivity, not of quality.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from diffusers.models.transformers.transformer_2d import Transformer2DModel  # noqa: E402
from throughput import (  # noqa: E402
    bf16_matmul_peak,
    flops_per_image,
    run_path,
    sync,
    synthetic_images,
)

import emerdiff_pl.layout as layout_module  # noqa: E402
import emerdiff_pl.segmenter as segmenter_module  # noqa: E402
from emerdiff_pl import EmerDiffSegmenter  # noqa: E402
from emerdiff_pl.layout import (  # noqa: E402
    ChannelsLastGroupNorm,
    ChannelsLastTransformer2DModel,
    set_group_norm_kernel,
)

UNET_TFLOP_512 = 0.803  # per U-Net call at 512², batch 1 (benchmarks/cost_model.py)
DECODE_TFLOP_512 = 2.515


def use_stock_layout(modules, stock: bool) -> None:
    """Swap emerdiff_pl.layout's NHWC-keeping GroupNorm / Transformer2DModel classes for the stock ones, or back."""
    pairs = [
        (ChannelsLastGroupNorm, torch.nn.GroupNorm),
        (ChannelsLastTransformer2DModel, Transformer2DModel),
    ]
    for module in modules:
        for child in module.modules():
            for fast, plain in pairs:
                if type(child) in (fast, plain):
                    child.__class__ = plain if stock else fast


def cuda_time(fn, device: torch.device, repeats: int = 3) -> float:
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


class Suite:
    def __init__(self, args):
        self.args, self.rows, self.t0 = args, [], time.time()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # --smoke: the same code on CPU with tiny-random at 64², K 4, to catch errors before a GPU lease
        self.base = (
            dict(
                pretrained="tiny-random", resolution=64, num_masks=4, dtype="float32", max_branch_batch="auto"
            )
            if args.smoke
            else dict(
                pretrained="sd14-arch",
                resolution=512,
                num_masks=20,
                dtype="bfloat16",
                max_branch_batch="auto",
            )
        )
        self.dtype = torch.float32 if args.smoke else torch.bfloat16
        self.images = synthetic_images(args.num_images, self.base["resolution"], seed=1)
        self.reference_labels: torch.Tensor | None = None
        self.default_flops: float | None = None
        # every variant reuses the one backbone: load_backbone is cached for this process
        segmenter_module.load_backbone = functools.cache(segmenter_module.load_backbone)

    def record(self, row: dict) -> None:
        row["elapsed_s"] = round(time.time() - self.t0, 1)
        self.rows.append(row)
        with open(self.out / "suite.jsonl", "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        print(json.dumps(row, default=float), flush=True)

    def over_budget(self) -> bool:
        return time.time() - self.t0 > self.args.budget_s

    def model(
        self,
        prefix_sharing: bool = True,
        stock_layout: bool = False,
        group_norm: str = "auto",
        **overrides,
    ) -> EmerDiffSegmenter:
        """A segmenter on the shared backbone; `prefix_sharing=False`, `stock_layout=True` and
        `group_norm="torch"` undo one optimization of the default path each (the before-measurements of
        emerdiff_pl.prefix / .layout / .triton_norm)."""
        kwargs = dict(self.base, **overrides, prefix_sharing=prefix_sharing, group_norm_kernel=group_norm)
        model = EmerDiffSegmenter(**kwargs).to(self.device)
        model.configure_model()
        channels_last = kwargs.get("channels_last", True)
        for module in (model.unet, model.vae):  # shared modules: set the layout each variant asks for
            module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        model._ensure_ready()  # converts the (shared) modules again, whatever an earlier variant left
        if stock_layout:
            use_stock_layout((model.unet, model.vae), True)
        return model

    def timed(
        self,
        name: str,
        n: int,
        naive: bool = False,
        batch: int = 1,
        flops=None,
        batched_reference: bool = True,
        **overrides,
    ) -> None:
        if self.over_budget():
            self.record({"name": name, "skipped": "suite time budget spent"})
            return
        try:
            # batched_reference=False: one U-Net call per reference step, as before the batched inversion
            model = self.model(**overrides, batched_reference=batched_reference)
            warmup_s = None
            if not naive:  # warm-up: probe, allocator, compile (the naive path runs after `default`, warm)
                start = time.perf_counter()
                model.segment(self.images[:1])
                sync(self.device)
                warmup_s = time.perf_counter() - start
            if flops is None:
                flops = flops_per_image(model, self.images[:1], naive)
            result, labels = run_path(model, self.images[:n], naive, batch, flops, name)
            row = {
                "name": name,
                "overrides": {k: str(v) for k, v in overrides.items()}
                | ({} if batched_reference else {"batched_reference": "False"}),
                "images": n,
                "batch": batch,
                "s_per_image": result.seconds / n,
                "phases_s_per_image": result.phases_s_per_image,
                "unet_calls_per_s": result.unet_calls_per_s,
                "unet_rows_per_s": result.unet_rows_per_s,
                "peak_memory_gb": result.peak_memory_gb,
                "tflop_per_image": flops / 1e12,
                "tflop_per_s": result.tflops_per_s,
                "pct_of_peak": 100 * result.tflops_per_s / self.peak,
                "attention_backend": model.backend,
                "warmup_image_s": warmup_s,
            }
            if name == "default":
                self.reference_labels, self.default_flops = labels, flops
            elif self.reference_labels is not None:
                m = min(len(labels), len(self.reference_labels))
                row["label_agreement_vs_default"] = (
                    (labels[:m] == self.reference_labels[:m]).float().mean().item()
                )
            self.record(row)
            model.remove_hooks()  # the backbone is shared: leave no hooks to the next variant
            del model
        except Exception as err:  # record and go on: one broken option must not cost the lease
            self.record(
                {
                    "name": name,
                    "error": f"{type(err).__name__}: {err}",
                    "trace": traceback.format_exc()[-2000:],
                }
            )
        (torch.cuda.empty_cache() if torch.cuda.is_available() else None)

    def ceilings(self) -> None:
        self.peak = bf16_matmul_peak(
            self.device, n=512 if self.args.smoke else 8192, repeats=2 if self.args.smoke else 20
        )
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.record({"name": "peak", "device": name, "bf16_matmul_tflops": self.peak})
        model = self.model()
        emb = model.backbone.empty_prompt_embedding().to(self.device, self.dtype)
        side = self.base["resolution"] // 8 if not self.args.smoke else 32
        unet, vae = model.unet, model.vae
        for batch, stock, norm in (
            (1, False, "auto"),
            (8, False, "auto"),
            (16, False, "auto"),
            (32, False, "auto"),
            (16, True, "auto"),
            (16, False, "torch"),
        ):
            use_stock_layout((unet,), stock)
            set_group_norm_kernel(unet, norm)
            x = torch.randn(
                batch, model.unet.config.in_channels, side, side, device=self.device, dtype=self.dtype
            )
            x = x.contiguous(memory_format=torch.channels_last)
            t = torch.full((batch,), 281, device=self.device)
            with torch.no_grad():
                cond = emb.expand(batch, -1, -1)
                s = cuda_time(functools.partial(unet, x, t, encoder_hidden_states=cond), self.device)
            tflops = batch * UNET_TFLOP_512 / s
            self.record(
                {
                    "name": f"unet_only_b{batch}"
                    + ("_stock_layout" if stock else "")
                    + ("_torch_group_norm" if norm == "torch" else ""),
                    "ms_per_call": 1e3 * s,
                    "tflop_per_s": tflops,
                    "pct_of_peak": 100 * tflops / self.peak,
                    "backend": "diffusers default processors",
                }
            )
        use_stock_layout((unet,), False)
        z = torch.randn(4, model.unet.config.in_channels, side, side, device=self.device, dtype=self.dtype)
        for stock, norm in ((False, "auto"), (True, "auto"), (False, "torch")):
            use_stock_layout((vae,), stock)
            set_group_norm_kernel(vae, norm)
            with torch.no_grad():
                s = cuda_time(functools.partial(vae.decode, z), self.device)
            self.record(
                {
                    "name": "decode_only_b4"
                    + ("_stock_layout" if stock else "")
                    + ("_torch_group_norm" if norm == "torch" else ""),
                    "ms_per_image": 1e3 * s / 4,
                    "tflop_per_s": 4 * DECODE_TFLOP_512 / s,
                    "pct_of_peak": 100 * 4 * DECODE_TFLOP_512 / s / self.peak,
                }
            )
        use_stock_layout((vae,), False)
        set_group_norm_kernel(unet, "auto")
        set_group_norm_kernel(vae, "auto")
        (torch.cuda.empty_cache() if torch.cuda.is_available() else None)

    def group_norm_micro(self) -> None:
        """One GroupNorm(32) at the U-Net's activation sizes (batch 16, the branch chunk's order of size)."""
        import torch.nn.functional as F

        shapes = [(16, 320, 64), (16, 960, 64), (16, 640, 32), (16, 1280, 16), (16, 1280, 8)]
        if self.args.smoke:
            shapes = [(2, 64, 8)]
        for n, c, side in shapes:
            x = torch.randn(n, c, side, side, device=self.device, dtype=self.dtype) * 3 + 1
            w = torch.randn(c, device=self.device, dtype=self.dtype)
            b = torch.randn(c, device=self.device, dtype=self.dtype)
            nhwc, nchw = x.contiguous(memory_format=torch.channels_last), x.contiguous()
            exact = F.group_norm(x.float(), 32, w.float(), b.float(), 1e-5)
            row = {
                "name": f"gn_micro_{n}x{c}x{side}x{side}",
                "mbytes": 2 * x.numel() * x.element_size() / 1e6,
            }
            args = (32, w, b, 1e-5)
            variants = {
                "stock_nchw_input": functools.partial(F.group_norm, nchw, *args),
                "stock_nhwc_input": functools.partial(F.group_norm, nhwc, *args),
                "torch_ops_nhwc": functools.partial(
                    layout_module._group_norm_channels_last_torch, nhwc, *args
                ),
            }
            if self.device.type == "cuda":
                from emerdiff_pl.triton_norm import group_norm_nhwc

                variants["triton_nhwc"] = functools.partial(group_norm_nhwc, nhwc, *args)
            for key, fn in variants.items():
                try:
                    s = cuda_time(fn, self.device, repeats=20)
                    row[f"{key}_us"] = 1e6 * s
                    row[f"{key}_gb_per_s"] = row["mbytes"] / 1e3 / s
                    row[f"{key}_max_err"] = (fn().float() - exact).abs().max().item()
                except Exception as err:
                    row[f"{key}_error"] = f"{type(err).__name__}: {err}"
            self.record(row)

    def profile(self) -> None:
        if self.over_budget():
            return
        from torch.profiler import ProfilerActivity, profile

        model = self.model()
        model.segment(self.images[:1])
        activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            model.segment(self.images[:1])
            sync(self.device)
        events = prof.key_averages()

        def device_us(e) -> float:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

        families = {  # first match wins: cuDNN convolutions are implicit GEMMs named like matmuls
            "attention (flash/mem-efficient/fmha)": ("flash", "fmha", "attention", "efficient", "cutlassF"),
            "convolution": ("conv", "implicit", "winograd", "dgrad", "fprop"),
            "group/layer norm": ("norm", "welford", "rowwisemoments"),
            "matmul (gemm)": ("gemm", "nvjet", "xmma", "cutlass", "sm90", "matmul"),
        }
        totals: dict[str, float] = {}
        for e in events:
            us, name = device_us(e), e.key.lower()
            family = next(
                (f for f, keys in families.items() if any(k in name for k in keys)),
                "other (elementwise, copies)",
            )
            totals[family] = totals.get(family, 0.0) + us
        all_us = sum(totals.values()) or 1.0
        table = events.table(sort_by="self_cuda_time_total", row_limit=25)
        (self.out / "profile.txt").write_text(table)
        self.record(
            {
                "name": "profile",
                "device_ms_per_image": all_us / 1e3,
                "share_by_family": {
                    k: round(100 * v / all_us, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])
                },
            }
        )


def fast_preset(smoke: bool) -> dict:
    """The model settings configs/sd14-fast.yaml changes from configs/sd14.yaml (the `fast_preset` row)."""
    import yaml

    configs = Path(__file__).resolve().parents[1] / "configs"
    fast = yaml.safe_load((configs / "sd14-fast.yaml").read_text())["model"]
    base = yaml.safe_load((configs / "sd14.yaml").read_text())["model"]
    changed = {k: v for k, v in fast.items() if base.get(k) != v}
    if changed.get("decoder") == "taesd":  # random weights of the real TAESD's shape: the same FLOPs
        changed["taesd_model"] = "tiny-random" if smoke else "sd14-arch"
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_suite_out")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=420, help="skip the remaining variants after this")
    p.add_argument("--skip", default="", help="comma-separated variant names to skip")
    p.add_argument("--only", default="", help="comma-separated variant names to run, in this order")
    p.add_argument("--compile", action="store_true", help="also time compile=True (slow to build)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny-random: check the script, measure nothing")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    torch.backends.cuda.matmul.allow_tf32 = True
    suite = Suite(args)
    if "gn_micro" not in skip:
        suite.group_norm_micro()
    suite.ceilings()
    n, few = args.num_images, min(2, args.num_images)
    plan = [
        ("default", dict(n=n)),
        ("stock_layout", dict(n=few, flops="default", stock_layout=True)),
        ("torch_group_norm", dict(n=few, flops="default", group_norm="torch")),
        ("no_prefix_sharing", dict(n=few, prefix_sharing=False)),
        ("reference_step_by_step", dict(n=few, flops="default", batched_reference=False)),
        ("chunk_8", dict(n=few, flops="default", max_branch_batch=8)),
        ("chunk_40", dict(n=few, flops="default", max_branch_batch=40)),
        ("naive", dict(n=1, naive=True)),
        ("chunk_24", dict(n=few, flops="default", max_branch_batch=24)),
        ("batch_2_images", dict(n=few, batch=2, flops="default")),
        ("float16", dict(n=few, flops="default", dtype="float16")),
        ("no_channels_last", dict(n=few, flops="default", channels_last=False)),
        ("xformers", dict(n=few, flops="default", attention_backend="xformers")),
        ("one_sided", dict(n=few, difference="one_sided")),
        ("steps_after_modulation_5", dict(n=few, steps_after_modulation=5)),
        (
            "taesd_decoder",
            dict(n=few, decoder="taesd", taesd_model="tiny-random" if args.smoke else "sd14-arch"),
        ),
        ("latent_decoder", dict(n=few, decoder="latent")),
        ("fast_preset", dict(n=n, **fast_preset(args.smoke))),
    ]
    if args.compile:
        plan.append(("compile", dict(n=few, flops="default", compile=True)))
    if args.only:
        if "compile" in args.only.split(",") and not args.compile:
            plan.append(("compile", dict(n=few, flops="default", compile=True)))
        by_name = dict(plan)
        plan = [(name, by_name[name]) for name in args.only.split(",") if name in by_name]
    for name, kw in plan:
        if name in skip:
            continue
        if kw.get("flops") == "default":
            kw["flops"] = suite.default_flops
        suite.timed(name, **kw)
        if name == "default" and "profile" not in skip:  # early: what holds the default path back
            try:
                suite.profile()
            except Exception as err:
                suite.record({"name": "profile", "error": f"{type(err).__name__}: {err}"})
    print("\nname | s/image | TFLOP/s | % of peak | peak GB | agreement")
    for r in suite.rows:
        if "s_per_image" in r:
            print(
                f"{r['name']} | {r['s_per_image']:.3f} | {r['tflop_per_s']:.0f} | {r['pct_of_peak']:.1f} | "
                f"{r['peak_memory_gb']:.1f} | {r.get('label_agreement_vs_default', '')}"
            )
        elif "error" in r or "skipped" in r:
            print(f"{r['name']} | {r.get('error') or r.get('skipped')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
