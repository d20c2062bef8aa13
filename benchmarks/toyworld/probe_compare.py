"""Which `probe` to default to: linear vs nearest-prototype, majority vs area-fraction cell labels, on the toy world.

Features are configs/toyworld.yaml's feature layer at t_f (the reference pass only: one U-Net call per image, no
branches), so the run takes about a minute on one CPU thread. The probe is fit on N labelled scenes (seed
`--seed`, scene indices from 100000, disjoint from the held-out ones) and scored on `--num-heldout` held-out
scenes (seed `--seed`, indices 0 …, evaluate.py's scenes):

- pixel accuracy and named mIoU at the label resolution (scores upsampled bilinearly, argmax: "the probe alone");
- accuracy at the 16×16 feature grid against each cell's majority label;
- `km_prob` / `km_logit`: the same probe naming configs/toyworld.yaml's 16 k-means low-res masks (nearest-
  upsampled; mask classification averages the scores inside each mask), a cheap stand-in for EmerDiff's masks:
  mean probabilities (what the segmenter averages) vs mean logits (= the logit of the mean feature, the paper's
  embedding average);
- last table: the default probe naming k-means masks of `--kmeans-masks` sizes (how much a coarser partition
  costs once masks are named).

    nice python benchmarks/toyworld/probe_compare.py --train-sizes 4,16 --num-heldout 16 --seed 0

The last line is `name=value` pairs (held-out named mIoU at label resolution, percent).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

LABELLED_START = 100_000
VARIANTS = (
    ("linear", "majority", 1e-3),
    ("linear", "fractions", 1e-3),
    ("linear", "majority", 1e-2),
    ("linear", "majority", 1e-4),
    ("linear", "fractions", 1e-4),
    ("linear", "fractions", 1e-5),
    ("prototype", "majority", 0.0),
    ("prototype", "fractions", 0.0),
)


def toy_features(num: int, seed: int, start: int, batch: int = 8):
    """(features (n, N, D), grid, labels (n, H, W) uint8, per-image seeds, latent size, segmenter) of toy scenes."""
    import numpy as np
    import torch
    import yaml

    from emerdiff_pl import method
    from emerdiff_pl.datasets import toyworld
    from emerdiff_pl.segmenter import EmerDiffSegmenter

    config = yaml.safe_load((ROOT / "configs" / "toyworld.yaml").read_text())["model"]
    config.update(method="lowres_bilinear", pretrained="toyworld-ldm")
    seg = EmerDiffSegmenter(**config)
    scenes = list(toyworld.generate_scenes(num, seed, 128, start=start))
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(np.stack([s.labels for s in scenes]))
    seeds = [seed * 1_000_003 + start + j for j in range(num)]
    feats = []
    with torch.no_grad():
        for i in range(0, num, batch):
            seg._ensure_ready()
            x0 = seg.encode(images[i : i + batch])
            _, f = method.reference_pass(seg.frozen_model(), x0, seeds[i : i + batch], seg.config, "none")
            feats.append(f.float())
    latent_hw = tuple(x0.shape[-2:])
    grid = method.token_grid(feats[0].shape[1], latent_hw)
    return torch.cat(feats), grid, labels, seeds, latent_hw, seg


def kmeans_masks(features, seeds, latent_hw, config, num_masks: int, size):
    """The k-means masks (`config`'s k-means settings, K = `num_masks`) of the features, nearest-upsampled to
    `size` (B, H, W)."""
    import dataclasses

    import torch.nn.functional as F

    from emerdiff_pl import method

    config = dataclasses.replace(config, num_masks=num_masks)
    lowres = method.lowres_masks(features, seeds, latent_hw, config)[0]
    return F.interpolate(lowres[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()


def named_scores(pred, labels, num_classes: int) -> tuple[float, float]:
    """(pixel accuracy, mIoU over classes present in labels or predictions) of class maps, 255 ignored."""
    import torch

    valid = labels != 255
    p, g = pred[valid].long(), labels[valid].long()
    confusion = torch.bincount(g * num_classes + p, minlength=num_classes**2).view(num_classes, num_classes)
    tp = confusion.diag().float()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    present = union > 0
    return float(tp.sum() / confusion.sum()), float((tp[present] / union[present].float()).mean())


def main(argv: list[str] | None = None) -> int:
    import torch

    from emerdiff_pl import method
    from emerdiff_pl.classifiers.probe import DEFAULT_KIND, DEFAULT_TARGETS, FeatureSource, fit_probe
    from emerdiff_pl.datasets import toyworld

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-sizes", default="4,16", help="numbers of labelled scenes, comma-separated")
    p.add_argument("--num-heldout", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--kmeans-masks",
        default="16,32,64",
        help="K of the k-means masks the default probe names (last table)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(v) for v in args.train_sizes.split(",")]
    t0 = time.perf_counter()
    train_f, grid, train_y, _, _, seg = toy_features(max(sizes), args.seed, LABELLED_START)
    held_f, _, held_y, held_seeds, latent_hw, _ = toy_features(args.num_heldout, args.seed, 0)
    print(f"features {tuple(train_f.shape)} on a {grid} grid, {time.perf_counter() - t0:.1f} s", flush=True)
    source = FeatureSource.of(seg.config, train_f.shape[-1])
    names = toyworld.CLASS_NAMES
    size = tuple(held_y.shape[-2:])
    k = seg.config.num_masks
    masks = kmeans_masks(held_f, held_seeds, latent_hw, seg.config, k, size)
    results: dict[str, float] = {}
    print(
        f"{'N':>3} {'kind':<10} {'targets':<10} {'wd':>7} | {'acc':>6} {'mIoU':>6} {'cell':>6} | "
        f"{'km_prob':>7} {'km_logit':>8} | {'fit s':>6}"
    )
    for n in sizes:
        for kind, targets, wd in VARIANTS:
            probe, fit = fit_probe(
                [(train_f[:n], grid, train_y[:n])],
                names,
                source,
                kind=kind,
                targets=targets,
                weight_decay=wd,
                heldout=[(held_f, grid, held_y)],
            )
            with torch.no_grad():
                probs = probe.scores(held_f, grid)
                logits = probe.logits(held_f).transpose(1, 2).reshape_as(probs)
                logits = logits.masked_fill(torch.isinf(logits), -1e4)
                alone = method.assign_classes(method.bilinear_class_scores(probs, size), size)
                km_prob = method.classify_masks(probs, masks, k)
                km_logit = method.classify_masks(logits, masks, k)
            acc, miou = named_scores(alone, held_y, len(names))
            assert abs(acc - fit.heldout_accuracy) < 1e-6, (acc, fit.heldout_accuracy)
            _, miou_km_p = named_scores(km_prob, held_y, len(names))
            _, miou_km_l = named_scores(km_logit, held_y, len(names))
            tag = f"{kind}_{targets}_wd{wd:g}_n{n}" if kind == "linear" else f"{kind}_{targets}_n{n}"
            results[tag] = 100 * miou
            print(
                f"{n:>3} {kind:<10} {targets:<10} {wd:>7g} | {100 * acc:6.2f} {100 * miou:6.2f} "
                f"{100 * fit.heldout_cell_accuracy:6.2f} | "
                f"{100 * miou_km_p:7.2f} {100 * miou_km_l:8.2f} | {fit.seconds:6.2f}",
                flush=True,
            )
    print(
        f"\nthe default probe ({DEFAULT_KIND}, {DEFAULT_TARGETS}) naming k-means masks (mIoU %, N = {sizes[-1]})"
    )
    probe, _ = fit_probe([(train_f, grid, train_y)], names, source)
    with torch.no_grad():
        probs = probe.scores(held_f, grid)
    for num_masks in (int(v) for v in args.kmeans_masks.split(",")):
        named = method.classify_masks(
            probs, kmeans_masks(held_f, held_seeds, latent_hw, seg.config, num_masks, size), num_masks
        )
        miou = named_scores(named, held_y, len(names))[1]
        results[f"kmeans{num_masks}_named_n{sizes[-1]}"] = 100 * miou
        print(f"  K = {num_masks:>3}: {100 * miou:6.2f}", flush=True)
    print(" ".join(f"{name}={v:.2f}" for name, v in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
