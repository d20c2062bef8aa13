"""Distil a TAESD-style decoder (diffusers `AutoencoderTiny`) for the shipped toy model's latent space.

`decoder: taesd` decodes EmerDiff's branch latents with a tiny decoder instead of the VAE's. The public TAESD
weights fit SD's latents, not the toy model's, so this script trains one: an `AutoencoderTiny` whose decoder
matches the toy VAE's decoder (the teacher) on

- the U-Net's latents of training scenes (VAE posterior means × scaling factor, seed 12345 as in training), and
- EmerDiff branch latents of a few training scenes (the x₀ each modulated branch ends at: what the decoder sees
  in use), with an extra loss on each (−, +) pair's difference, the quantity the difference maps measure.

Only the decoder is trained (images are always encoded by the VAE; the encoder stays as initialised). The result
is saved as an AutoencoderTiny folder (default: emerdiff_pl/assets/toyworld-taesd, which `taesd_model:
toyworld-taesd` loads) with `training_info.json` (teacher agreement on held-out latents, seconds per decode).

    python benchmarks/toyworld/distill_taesd.py --minutes 12            # CPU, 2 threads
    python benchmarks/toyworld/distill_taesd.py --minutes 3 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TOY_MODEL = ROOT / "emerdiff_pl" / "assets" / "toyworld-ldm"
DEFAULT_OUT = ROOT / "emerdiff_pl" / "assets" / "toyworld-taesd"
TRAIN_SEED = 12345  # the toy model's training scenes; evaluation scenes use other seeds
HELD_OUT_SEED = 777  # teacher agreement is measured here (neither training nor the evaluate.py seeds 0 / 1)
# constant width (DecoderTiny needs it); no block at full resolution, so a decode costs ~2.5× less than the
# toy VAE decoder's on a CPU (the VAE spends most of its decode at 128²)
CHANNELS = 32
BLOCKS = (3, 2, 0)


def student(latent_channels: int, stages: int, seed: int):
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    blocks = BLOCKS[-stages:] if stages <= len(BLOCKS) else (3,) * (stages - len(BLOCKS)) + BLOCKS
    return AutoencoderTiny(
        encoder_block_out_channels=(16,) * stages,
        num_encoder_blocks=(1,) * stages,
        decoder_block_out_channels=(CHANNELS,) * stages,
        num_decoder_blocks=blocks,
        latent_channels=latent_channels,
        scaling_factor=1.0,  # it decodes the U-Net's latents as they are (emerdiff_pl.segmenter.decode)
    )


def scene_latents(vae, num: int, seed: int, batch: int = 32):
    """U-Net latents (VAE posterior mean × scaling factor) of `num` scenes of `seed`."""
    import torch

    from emerdiff_pl.datasets import toyworld

    out = []
    scenes = toyworld.generate_scenes(num, seed, 128)
    images = np.stack([s.image for s in scenes])
    for start in range(0, num, batch):
        x = torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


def branch_latents(num_scenes: int, seed: int, steps: int):
    """x₀ of every (−, +) EmerDiff branch of `num_scenes` scenes (pairs adjacent), toy defaults, `steps` after t_m."""
    import torch

    from emerdiff_pl.datasets import toyworld
    from emerdiff_pl.segmenter import EmerDiffSegmenter

    sys.path.insert(0, str(ROOT / "benchmarks" / "toyworld"))
    from evaluate import DEFAULT_MODEL_ARGS

    args = {k: v for k, v in DEFAULT_MODEL_ARGS.items() if not k.startswith("refine")}
    seg = EmerDiffSegmenter(pretrained=str(TOY_MODEL), **args, steps_after_modulation=steps)
    seg.configure_model()
    captured = []
    decode = seg.decode

    def capture(latents, chunk):
        captured.append(latents.detach().float().cpu())
        return decode(latents, chunk)

    seg.decode = capture
    scenes = list(toyworld.generate_scenes(num_scenes, seed, 128, start=100_000))
    for i, scene in enumerate(scenes):
        x = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 255
        seg.segment(x, seeds=[seed + i])
    return torch.cat(captured)


def teacher_decode(vae, latents, batch: int = 32):
    import torch

    parts = []
    for z in latents.split(batch):
        with torch.no_grad():
            parts.append(vae.decode(z / vae.config.scaling_factor).sample.clamp(-1.5, 1.5).half())
    return torch.cat(parts)


def agreement(taesd, vae, latents, targets, pairs, pair_targets) -> dict[str, float]:
    """PSNR of the student against the teacher (images in [-1, 1], peak-to-peak 2) and the correlation of the
    per-pixel difference norms ‖D(z⁻) − D(z⁺)‖ over branch pairs."""
    import torch

    with torch.no_grad():
        out = torch.cat([taesd.decode(z).sample for z in latents.split(32)])
        mse = torch.mean((out.clamp(-1, 1) - targets.float().clamp(-1, 1)) ** 2).item()
        pout = torch.cat([taesd.decode(z).sample for z in pairs.split(32)])
        d_student = (pout[0::2] - pout[1::2]).norm(dim=1).flatten()
        d_teacher = (pair_targets[0::2].float() - pair_targets[1::2].float()).norm(dim=1).flatten()
        corr = torch.corrcoef(torch.stack([d_student, d_teacher]))[0, 1].item()
    return {"psnr_db": 10 * math.log10(4 / max(mse, 1e-12)), "difference_map_correlation": corr}


def seconds_per_decode(module, latents, repeats: int = 3) -> float:
    import torch

    with torch.no_grad():
        module(latents)
        start = time.perf_counter()
        for _ in range(repeats):
            module(latents)
    return (time.perf_counter() - start) / repeats / len(latents)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default=str(DEFAULT_OUT), help=f"AutoencoderTiny folder to write (default {DEFAULT_OUT})"
    )
    p.add_argument("--minutes", type=float, default=12.0, help="training wall time (default 12)")
    p.add_argument("--scenes", type=int, default=768, help="training scenes (seed 12345; default 768)")
    p.add_argument(
        "--branch-scenes", type=int, default=12, help="scenes whose EmerDiff branches are used (12)"
    )
    p.add_argument("--batch", type=int, default=8, help="latents per step, plus as many branch pairs / 2 (8)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate, cosine to 5%% (2e-3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    from emerdiff_pl.backbone import latent_scale_factor

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(str(TOY_MODEL / "vae")).eval().requires_grad_(False)
    print("encoding training and held-out scenes …", flush=True)
    train_z = scene_latents(vae, args.scenes, TRAIN_SEED)
    held_z = scene_latents(vae, 64, HELD_OUT_SEED)
    print(f"collecting the branch latents of {args.branch_scenes} training scenes …", flush=True)
    pairs = branch_latents(args.branch_scenes, TRAIN_SEED, steps=5)
    held_pairs, pairs = pairs[: 2 * 32], pairs[2 * 32 :]  # the first 2 scenes' branches are held out
    print("teacher decodes …", flush=True)
    train_t, held_t = teacher_decode(vae, train_z), teacher_decode(vae, held_z)
    pair_t, held_pair_t = teacher_decode(vae, pairs), teacher_decode(vae, held_pairs)
    prep = time.perf_counter() - t0
    print(
        f"data ready in {prep:.0f} s: {len(train_z)} scene latents, {len(pairs) // 2} branch pairs",
        flush=True,
    )

    stages = int(math.log2(latent_scale_factor(vae))) + 1
    taesd = student(vae.config.latent_channels, stages, args.seed).to(args.device)
    before = agreement(taesd.eval(), vae, held_z, held_t, held_pairs, held_pair_t)
    decoder = taesd.decoder.train().requires_grad_(True)
    opt = torch.optim.Adam(decoder.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    budget, start, step, losses = args.minutes * 60, time.perf_counter(), 0, []
    npairs = max(1, args.batch // 4)
    while (elapsed := time.perf_counter() - start) < budget:
        for group in opt.param_groups:  # cosine over the wall-time budget, to 5 %
            group["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget))))
        idx = torch.randint(len(train_z), (args.batch,), generator=gen)
        pidx = torch.randint(len(pairs) // 2, (npairs,), generator=gen) * 2
        pidx = torch.stack([pidx, pidx + 1], 1).flatten()
        z = torch.cat([train_z[idx], pairs[pidx]]).to(args.device)
        target = torch.cat([train_t[idx], pair_t[pidx]]).float().to(args.device)
        out = taesd.decode(z).sample
        loss = F.mse_loss(out, target) + 0.5 * F.l1_loss(out, target)
        d_out = out[args.batch :][0::2] - out[args.batch :][1::2]
        d_target = target[args.batch :][0::2] - target[args.batch :][1::2]
        loss = loss + 4 * F.mse_loss(d_out, d_target)  # the pair's difference: what the maps measure
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step}  {elapsed / 60:5.1f} min  loss {np.mean(losses[-50:]):.5f}", flush=True)
    taesd = taesd.eval().requires_grad_(False).cpu()
    after = agreement(taesd, vae, held_z, held_t, held_pairs, held_pair_t)
    probe = held_z[:16]
    timing = {
        "vae_decode_s": seconds_per_decode(lambda z: vae.decode(z / vae.config.scaling_factor), probe),
        "taesd_decode_s": seconds_per_decode(lambda z: taesd.decode(z), probe),
    }
    out_dir = Path(args.out)
    taesd.save_pretrained(out_dir)
    config_path = out_dir / "config.json"  # diffusers writes a key it then warns about on every load
    config = json.loads(config_path.read_text())
    config.pop("block_out_channels", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    info = {
        "teacher": "emerdiff_pl/assets/toyworld-ldm/vae (decoder)",
        "trained_on": f"{args.device}, {args.threads} CPU threads" if args.device == "cpu" else args.device,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/toyworld/distill_taesd.py " + " ".join(argv or sys.argv[1:]),
        "steps": step,
        "train_minutes": round((time.perf_counter() - start) / 60, 2),
        "data_seconds": round(prep, 1),
        "train_scene_latents": len(train_z),
        "train_branch_pairs": len(pairs) // 2,
        "held_out": f"64 scenes of seed {HELD_OUT_SEED}; branches of 2 training-seed scenes not trained on",
        "held_out_before_training": before,
        "held_out_after_training": after,
        "seconds_per_decode_128px": timing,
        "threads": args.threads,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
    }
    (out_dir / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
