"""FLOPs of one U-Net call and one VAE decode of the SD 1.x architecture, counted on the meta device (no
compute, no weights), and the per-image cost of EmerDiff they imply (docs/method.md §9), with and without
computing the t_m call's layers before the modulated one once per image (`emerdiff_pl.prefix`).

    python benchmarks/cost_model.py [--resolution 512] [--num-masks 20] [--steps 15] [--peak-tflops 800]
    python benchmarks/cost_model.py --one-sided --steps 5 --decoder latent     # a fast setting, against the default

`--one-sided` runs K branches (+ one reference decode) instead of 2K; `--decoder` counts the branch decodes with
the VAE, TAESD (diffusers' AutoencoderTiny, madebyollin/taesd's architecture) or none (`latent`).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from emerdiff_pl.attention import AttentionController
from emerdiff_pl.backbone import sd14_arch_components
from emerdiff_pl.config import FEATURE_LAYER, MODULATED_LAYER
from emerdiff_pl.prefix import PrefixSharing


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
    parser.add_argument("--one-sided", action="store_true", help="difference: one_sided (K branches)")
    parser.add_argument("--decoder", choices=("vae", "taesd", "latent"), default="vae", help="branch decoder")
    args = parser.parse_args(argv)
    latent = args.resolution // 8
    with torch.device("meta"):
        parts = sd14_arch_components()  # the same architecture as `pretrained: sd14-arch`
        unet, vae = parts["unet"], parts["vae"]
        x = torch.empty(1, 4, latent, latent)
        emb = torch.empty(1, 77, 768)
        image = torch.empty(1, 3, args.resolution, args.resolution)
        prefix = PrefixSharing(unet, AttentionController(FEATURE_LAYER, MODULATED_LAYER))
        prefix.trace_next_call()
        unet_flops = count(lambda: unet(x, 1, encoder_hidden_states=emb))
        vae_decode_flops = count(lambda: vae.decode(x))
        from diffusers import AutoencoderTiny

        taesd = AutoencoderTiny()  # TAESD for SD 1.x/2.x
        decode_flops = {"vae": vae_decode_flops, "taesd": count(lambda: taesd.decode(x)), "latent": 0.0}[
            args.decoder
        ]
        encode_flops = count(lambda: vae.encode(image))
        k, s = args.num_masks, args.steps
        branches = k if args.one_sided else 2 * k
        rows = torch.empty(branches, 4, latent, latent)
        prefix.share(torch.zeros(branches, dtype=torch.long, device="cpu"))  # the t_m call of one image
        shared_tm_call = count(lambda: unet(rows, 1, encoder_hidden_states=emb.expand(branches, -1, -1)))
        prefix.stop()
    saved = branches * unet_flops - shared_tm_call
    decodes = branches + (1 if args.one_sided else 0)  # one-sided: the unmodified run is decoded too
    total = (branches + 1) * s * unet_flops + decodes * decode_flops + encode_flops - saved
    print(
        f"U-Net call: {unet_flops / 1e12:.3f} TFLOP   VAE decode: {vae_decode_flops / 1e12:.3f} TFLOP   "
        f"{args.decoder} decode: {decode_flops / 1e12:.3f} TFLOP   VAE encode: {encode_flops / 1e12:.3f} TFLOP   "
        f"({args.resolution}², batch 1)"
    )
    print(
        f"per image, K={k}, {'one' if args.one_sided else 'two'}-sided, {s} steps: branches "
        f"{(branches * s * unet_flops - saved) / 1e12:.0f} + reference {s * unet_flops / 1e12:.0f} (U-Net) + "
        f"{decodes} decodes {decodes * decode_flops / 1e12:.0f} = {total / 1e12:.0f} TFLOP"
    )
    print(
        f"prefix of the t_m call ({len(prefix.modules)} modules before {MODULATED_LAYER}): "
        f"{(branches * unet_flops - shared_tm_call) / (branches - 1) / unet_flops:.1%} of a U-Net call, "
        f"computed once per image instead of {branches} times: −{saved / 1e12:.1f} TFLOP per image (subtracted above)"
    )
    print(f"floor at {args.peak_tflops:.0f} TFLOP/s: {total / 1e12 / args.peak_tflops:.2f} s per image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
