"""FLOPs of one U-Net call and one VAE decode of the SD 1.x architecture, counted on the meta device (no
compute, no weights), and the per-image cost of EmerDiff they imply (SPEC §2).

    python benchmarks/cost_model.py [--resolution 512] [--num-masks 20] [--steps 15] [--peak-tflops 800]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from emerdiff_pl.backbone import sd14_arch_components


def count(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--num-masks", type=int, default=20)
    parser.add_argument(
        "--steps", type=int, default=15, help="denoising steps from t_m (281 on 50 steps: 15)"
    )
    parser.add_argument("--peak-tflops", type=float, default=800.0, help="dense bf16 peak of the target GPU")
    args = parser.parse_args(argv)
    latent = args.resolution // 8
    with torch.device("meta"):
        parts = sd14_arch_components()  # the same architecture as `pretrained: sd14-arch`
        unet, vae = parts["unet"], parts["vae"]
        x = torch.empty(1, 4, latent, latent)
        emb = torch.empty(1, 77, 768)
        image = torch.empty(1, 3, args.resolution, args.resolution)
        unet_flops = count(lambda: unet(x, 1, encoder_hidden_states=emb))
        decode_flops = count(lambda: vae.decode(x))
        encode_flops = count(lambda: vae.encode(image))
    k, s = args.num_masks, args.steps
    branches = 2 * k
    total = (branches + 1) * s * unet_flops + branches * decode_flops + encode_flops
    print(
        f"U-Net call: {unet_flops / 1e12:.3f} TFLOP   VAE decode: {decode_flops / 1e12:.3f} TFLOP   "
        f"VAE encode: {encode_flops / 1e12:.3f} TFLOP   ({args.resolution}², batch 1)"
    )
    print(
        f"per image, K={k}, {s} steps: branches {branches * s * unet_flops / 1e12:.0f} + reference "
        f"{s * unet_flops / 1e12:.0f} (U-Net) + decodes {branches * decode_flops / 1e12:.0f} = {total / 1e12:.0f} TFLOP"
    )
    print(f"floor at {args.peak_tflops:.0f} TFLOP/s: {total / 1e12 / args.peak_tflops:.2f} s per image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
