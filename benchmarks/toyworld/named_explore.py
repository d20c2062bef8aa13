"""Exploration for issue 27's named-classes benchmark: EmerDiff's image-resolution masks named by a coarse
classifier vs the classifier alone, on held-out toy-world scenes (CPU, the current code: no segmenter option yet).

Two coarse classifiers:
- `probe`: the default (linear) probe on the feature layer's queries, fit on `--num-labelled` training scenes
  (seed `--seed`, scene indices from 100000, probe_compare.py's `toy_features`), softmax probabilities at the
  16×16 feature grid;
- `field`: a simulated external coarse segmenter: each held-out scene's ground truth at the feature grid (the
  majority label per cell) with `--field-noise` of the cells relabelled to a random other class, one-hot scores.

Each held-out scene (seed `--seed`, indices 0 …, evaluate.py's scenes and per-image seeds) is segmented once
per K in `--num-masks` with configs/toyworld.yaml's EmerDiff settings; the smoothed difference maps (the
scores before the argmax), the k-means masks and the feature layer's queries are cached under `--cache` (one
file per batch of 4 scenes and K), so a rerun only re-scores. Rows (named mIoU: supervised, no matching; ground
truth 255 ignored; a prediction of 255 counts as a miss of the true class):

- `{src}_bilinear`: the classifier's scores upsampled bilinearly to 128², argmax (the classifier alone);
- `{src}_bilinear+pamr`: PAMR (refine.py, its authors' settings) on those upsampled scores, argmax;
- `{src}_emerdiff{K}`: EmerDiff's masks (argmax of the smoothed difference maps), each named by its mean class
  probability (method.classify_masks); `@t`: masks whose best mean is below t → 255 (ignore);
- `{src}_emerdiff{K}+pamr`: PAMR on the difference maps before the argmax, then the same naming;
- `{src}_emerdiff{K}_logit` (probe only): masks named by the mean logit (= the logit of the mean query, the
  paper's "embeddings averaged inside the mask") instead of the mean probability;
- `{src}_emerdiff{K}_fb@t`: masks whose best mean probability is below t take the classifier's own pixel labels
  (`{src}_bilinear`) instead of 255 (fallback);
- `{src}_emerdiff{K}_named+pamr`: name first, then PAMR on the named class scores (C maps: each pixel holds
  its mask's mean class scores), argmax (the refiner on C class maps, after naming, as the baseline's);
- `{src}_emerdiff{K}_x`: per pixel, argmax over classes of (its mask's mean probability × the pixel's own
  upsampled probability): the mask decides where the classifier is unsure, a confident pixel can split a mask
  that straddles two classes;
- `{src}_kmeans{K}`: the k-means low-res masks nearest-upsampled, named the same way (probe_compare.py's last
  table: the partition EmerDiff refines);
- `oracle_emerdiff{K}` / `oracle_kmeans{K}`: each mask named by the ground-truth majority of its pixels (how
  good the partition is once named perfectly: the ceiling of any naming).

`--field-grid` / `--field-block` change the simulated predictor (a coarser grid; noise drawn per block of
cells: spatially correlated errors, which PAMR cannot average away). Differences between rows come with a
bootstrap over the scenes (the 5–95 % interval of the mIoU difference, and how often the row is ahead).

Seconds per image: the features (`reference_s`: the one-U-Net-call reference pass, for the `probe` rows) or
EmerDiff's `segment()` (for the EmerDiff rows: it reads the same queries) + the classifier + naming + refiner.
Wall time on a shared, loaded CPU with one torch thread.

    nice python benchmarks/toyworld/named_explore.py --seed 0 --num-labelled 16 --num-images 32 \
        --num-masks 16,32 --cache /tmp/named_explore

The last line is `name=value` pairs (named mIoU, percent) for every row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LABELLED_START = 100_000  # probe_compare.py's training scenes: disjoint from the held-out indices 0 …
BATCH = 4
IGNORE = 255


def toy_config(num_masks: int) -> dict[str, Any]:
    """configs/toyworld.yaml's model settings with K = num_masks."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "toyworld.yaml").read_text())["model"]
    config.update(num_masks=int(num_masks), pretrained="toyworld-ldm", refine="none")
    return config


def _capturing_segmenter(**kwargs: Any):
    """An EmerDiffSegmenter that keeps the queries of its reference pass and the score maps before the argmax."""
    from emerdiff_pl.segmenter import EmerDiffSegmenter

    class Capturing(EmerDiffSegmenter):
        def reference_pass(self, x0, seeds, record):
            trajectory, features = super().reference_pass(x0, seeds, record)
            self.captured_features = features.detach().float().cpu()
            return trajectory, features

        def refine_scores(self, scores, images):
            self.captured_scores = scores.detach().float().cpu()
            return scores

    return Capturing(**kwargs)


def emerdiff_maps(num_masks: int, images, seeds: list[int], cache: str | None, seed: int) -> dict[str, Any]:
    """EmerDiff at K = num_masks over the scenes: features (n, N, D), low-res masks (n, h, w), smoothed
    difference maps (n, K, R, R), segment() seconds per batch. Each batch of BATCH scenes cached on its own."""
    import torch

    config = toy_config(num_masks)
    tag = hashlib.sha1(json.dumps([config, seed], sort_keys=True).encode()).hexdigest()[:10]
    seg = None
    out: dict[str, list] = {"features": [], "lowres": [], "scores": [], "seconds": []}
    for start in range(0, len(images), BATCH):
        stop = min(start + BATCH, len(images))
        path = (
            os.path.join(cache, f"emerdiff-k{num_masks}-{tag}-{start:05d}-{stop:05d}.npz") if cache else None
        )
        if path and os.path.exists(path):
            with np.load(path) as z:
                batch = {name: z[name] for name in out}
        else:
            if seg is None:
                seg = _capturing_segmenter(**config)
            t0 = time.perf_counter()
            res = seg.segment(images[start:stop], seeds=seeds[start:stop])
            seconds = time.perf_counter() - t0
            scores = seg.captured_scores
            if not torch.equal(scores.argmax(1), res.labels):
                raise RuntimeError("captured score maps do not give segment()'s labels")
            batch = {
                "features": seg.captured_features.numpy(),
                "lowres": res.lowres_labels.numpy(),
                "scores": scores.numpy(),
                "seconds": np.float64(seconds),
            }
            if path:
                os.makedirs(cache, exist_ok=True)
                np.savez(path + ".tmp.npz", **batch)
                os.replace(path + ".tmp.npz", path)
            print(f"  K = {num_masks}: scenes {start}-{stop - 1} in {seconds:.1f} s", flush=True)
        for name in ("features", "lowres", "scores"):
            out[name].append(torch.from_numpy(batch[name]))
        out["seconds"].append(float(batch["seconds"]))
    return {
        "features": torch.cat(out["features"]),
        "lowres": torch.cat(out["lowres"]),
        "scores": torch.cat(out["scores"]),
        "seconds_per_image": sum(out["seconds"]) / len(images),
    }


def field_coarse(labels, grid: tuple[int, int], num_classes: int, noise: float, seed: int, block: int = 1):
    """A simulated coarse predictor: each label map's majority class per cell of `grid`, `noise` of the cells
    (Bernoulli per block of block×block cells, seeded by seed and scene) relabelled to a random other class;
    one-hot (n, C, h, w), as `field.coarse_scores` decodes a coarse label map."""
    import torch
    import torch.nn.functional as F

    from emerdiff_pl.classifiers.probe import cell_label_fractions

    h, w = grid
    bh, bw = -(-h // block), -(-w // block)
    out = []
    for i, lab in enumerate(labels):
        fractions = cell_label_fractions(lab, grid, num_classes)
        majority = fractions[:num_classes].argmax(0)  # (h, w); the toy world has no ignored pixels
        rng = np.random.default_rng([seed, i, 27])
        flip = torch.from_numpy(rng.random((bh, bw)) < noise)
        offset = torch.from_numpy(rng.integers(1, num_classes, (bh, bw)))
        flip, offset = (
            t.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w] for t in (flip, offset)
        )
        cells = torch.where(flip, (majority + offset) % num_classes, majority)
        out.append(F.one_hot(cells, num_classes).permute(2, 0, 1).float())
    return torch.stack(out)


class Scorer:
    """Named scores of class maps (n, H, W) against the ground truth: dataset-wide confusion (no matching; a
    prediction of 255 counts as a miss of the true class), pixel accuracy, coverage, boundary F (named: class c's
    predicted mask against class c's ground truth)."""

    def __init__(self, targets, num_classes: int, tolerance: int = 2):
        self.targets, self.c, self.tolerance = targets.long(), num_classes, tolerance
        self.history: list[np.ndarray] = []  # per-image confusions (n, C, C + 1) of every call, in order

    def __call__(self, pred) -> dict[str, Any]:
        import torch

        from emerdiff_pl.datasets.toyworld import SHAPE_CLASSES, STUFF_CLASSES
        from emerdiff_pl.metrics import BoundaryFScore

        c = self.c
        pred = pred.long()
        valid = self.targets != IGNORE
        g, q = self.targets[valid], pred[valid]
        q = torch.where(q == IGNORE, c, q)
        image = torch.arange(len(pred))[:, None, None].expand_as(pred)[valid]
        cells = c * (c + 1)
        per_image = torch.bincount(image * cells + g * (c + 1) + q, minlength=len(pred) * cells)
        self.history.append(per_image.view(len(pred), c, c + 1).numpy())
        confusion = per_image.view(len(pred), c, c + 1).sum(0).double()
        tp = confusion.diag()
        union = confusion.sum(1) + confusion[:, :c].sum(0) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp_min(1), torch.nan)
        bf = BoundaryFScore(c, c + 1, tolerance=self.tolerance)
        bf.update(torch.where(pred == IGNORE, c, pred), self.targets)
        bf_out = bf.compute(assignment=np.array(list(range(c)) + [-1]))
        per_class = 100 * iou.numpy()
        return {
            "miou": float(np.nanmean(per_class)),
            "stuff_miou": float(np.nanmean(per_class[list(STUFF_CLASSES)])),
            "object_miou": float(np.nanmean(per_class[list(SHAPE_CLASSES)])),
            "pixel_accuracy": float(100 * tp.sum() / confusion.sum()),
            "coverage": float(100 * confusion[:, :c].sum() / confusion.sum()),
            "boundary_f": float(bf_out["boundary_f"]),
            "iou_per_class": [None if np.isnan(v) else float(v) for v in per_class],
        }


def miou_of(confusion: np.ndarray) -> float:
    """mIoU (percent) of a confusion (C, C + 1) (last column: predicted 255), over classes in truth or prediction."""
    c = confusion.shape[0]
    tp = np.diag(confusion[:, :c])
    union = confusion.sum(1) + confusion[:, :c].sum(0) - tp
    return float(100 * np.mean(tp[union > 0] / union[union > 0]))


def bootstrap_deltas(
    confusions: dict[str, np.ndarray], pairs: list[tuple[str, str]], resamples: int, seed: int
) -> dict[str, tuple[float, float, float, float]]:
    """mIoU(row) − mIoU(baseline) for each pair, and its 5/95 % bootstrap quantiles over scenes (the same
    resampled scenes for every pair), and the fraction of resamples where the row is ahead."""
    rng = np.random.default_rng(seed)
    n = next(iter(confusions.values())).shape[0]
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)])
    out = {}
    for row, base in pairs:
        a = np.einsum("rn,nij->rij", weights, confusions[row])
        b = np.einsum("rn,nij->rij", weights, confusions[base])
        deltas = np.array([miou_of(x) - miou_of(y) for x, y in zip(a, b, strict=True)])
        point = miou_of(confusions[row].sum(0)) - miou_of(confusions[base].sum(0))
        lo, hi = np.quantile(deltas, [0.05, 0.95])
        out[f"{row} vs {base}"] = (point, float(lo), float(hi), float((deltas > 0).mean()))
    return out


def majority_names(masks, targets, num_masks: int, num_classes: int):
    """(n, K) ground-truth majority class of each mask's pixels (0 for an empty mask): the oracle naming."""
    import torch

    n = masks.shape[0]
    idx = masks.flatten(1) * num_classes + targets.long().clamp_max(num_classes - 1).flatten(1)
    counts = torch.zeros(n, num_masks * num_classes, dtype=torch.long)
    counts.scatter_add_(1, idx, torch.ones_like(idx))
    return counts.view(n, num_masks, num_classes).argmax(-1)


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def batched(fn, n: int, *tensors):
    """fn over BATCH-sized chunks of the tensors (as segment() batches), concatenated; and the seconds."""
    import torch

    parts, seconds = [], 0.0
    for s in range(0, n, BATCH):
        out, dt = timed(fn, *(t[s : s + BATCH] for t in tensors))
        parts.append(out)
        seconds += dt
    return torch.cat(parts), seconds


def analyse(args, maps: dict[int, dict[str, Any]], images, targets) -> dict[str, Any]:
    import torch
    from probe_compare import toy_features

    from emerdiff_pl import method
    from emerdiff_pl.classifiers.probe import FeatureSource, fit_probe
    from emerdiff_pl.datasets import toyworld
    from emerdiff_pl.refine import refine

    n, size = len(images), tuple(images.shape[-2:])
    names, c = toyworld.CLASS_NAMES, toyworld.NUM_CLASSES
    pamr = lambda scores, guide: refine(scores, guide, "pamr")  # noqa: E731
    score = Scorer(targets, c, args.boundary_tolerance)
    results: dict[str, Any] = {"rows": {}, "notes": {}}
    rows = results["rows"]

    # the probe: fit on the training scenes; held-out queries from the one-call reference pass (timed)
    train_f, grid, train_y, _, _, seg = toy_features(args.num_labelled, args.seed, LABELLED_START)
    held_f, grid_h, held_y, held_seeds, latent_hw, _ = toy_features(n, args.seed, 0)
    with torch.no_grad():  # the probe's feature cost: encode + the one-call reference pass, one batch timed
        t0 = time.perf_counter()
        seg.reference_pass(seg.encode(images[:BATCH]), held_seeds[:BATCH], "none")
        reference_s = (time.perf_counter() - t0) / min(BATCH, n)
    assert grid_h == grid and torch.equal(held_y, targets.to(held_y.dtype))
    hp = seg.hparams
    source = FeatureSource(
        hp.pretrained, hp.feature_layer, hp.feature_timestep, train_f.shape[-1], hp.resolution, hp.resize
    )
    probe, fit = fit_probe([(train_f, grid, train_y)], names, source, heldout=[(held_f, grid, held_y)])
    results["notes"]["probe_fit"] = fit.summary()
    for k, m in maps.items():
        diff = float((m["features"] - held_f).abs().max())
        results["notes"][f"features_max_abs_diff_k{k}"] = diff
    with torch.no_grad():
        probs, probe_s = timed(probe.scores, held_f, grid)
        logits = probe.logits(held_f).transpose(1, 2).reshape_as(probs)
        logits = logits.masked_fill(torch.isinf(logits), -1e4)
    probe_s /= n
    field_grid = (args.field_grid, args.field_grid) if args.field_grid else grid
    field = field_coarse(targets, field_grid, c, args.field_noise, args.seed, args.field_block)
    field_acc = float(
        (method.assign_classes(method.bilinear_class_scores(field, size), size) == targets).float().mean()
    )
    results["notes"]["field"] = (
        f"ground truth at {field_grid[0]}×{field_grid[1]} (cell majority), {100 * args.field_noise:g} % of "
        f"{args.field_block}×{args.field_block}-cell blocks relabelled"
    )
    sources = {
        # name: (class scores at the grid, per-image seconds to get them, logits or None)
        "probe": (probs, reference_s + probe_s, logits),
        "field": (field, 0.0, None),
    }

    # the partitions (classifier-independent): EmerDiff masks, with PAMR on the difference maps, k-means
    partitions: dict[str, tuple[Any, int, float]] = {}
    for k, m in maps.items():
        partitions[f"emerdiff{k}"] = (m["scores"].argmax(1), k, m["seconds_per_image"])
        refined, pamr_s = batched(lambda s, g: pamr(s, g).argmax(1), n, m["scores"], images)
        partitions[f"emerdiff{k}+pamr"] = (refined, k, m["seconds_per_image"] + pamr_s / n)
        (lowres, _), km_s = timed(
            method.lowres_masks, held_f, k, held_seeds, latent_hw, hp.kmeans_n_init, hp.kmeans_max_iter
        )
        results["notes"][f"kmeans{k}_same_as_emerdiff_run"] = bool(torch.equal(lowres, m["lowres"]))
        up = torch.nn.functional.interpolate(m["lowres"][:, None].float(), size=size, mode="nearest-exact")
        partitions[f"kmeans{k}"] = (up[:, 0].long(), k, reference_s + km_s / n)
    for pname, (masks, k, _) in partitions.items():
        named = method.name_masks(masks, majority_names(masks, targets, k, c))
        rows[f"oracle_{pname}"] = {**score(named), "seconds_per_image": float("nan")}

    for src, (scores, src_s, src_logits) in sources.items():
        if src not in args.sources.split(","):
            continue
        up, up_s = timed(method.bilinear_class_scores, scores, size)
        bil = up.argmax(1)
        rows[f"{src}_bilinear"] = {**score(bil), "seconds_per_image": src_s + up_s / n}
        bil_pamr, pamr_s = batched(lambda s, g: pamr(s, g).argmax(1), n, up, images)
        rows[f"{src}_bilinear+pamr"] = {
            **score(bil_pamr),
            "seconds_per_image": src_s + (up_s + pamr_s) / n,
        }
        for pname, (masks, k, seconds) in partitions.items():
            # segment() reads the probe's queries itself: the probe rows add only the probe's own cost
            base_s = seconds + (0.0 if src == "probe" else src_s)
            if src == "probe" and not pname.startswith("kmeans"):
                base_s += probe_s
            mean, name_s = timed(method.mask_mean_scores, scores, masks, k)
            rows[f"{src}_{pname}"] = {
                **score(method.name_masks(masks, method.classes_of_masks(mean))),
                "seconds_per_image": base_s + name_s / n,
            }
            if pname.startswith("kmeans"):
                continue
            for t in args.thresholds:
                classes = method.classes_of_masks(mean, t)
                named = method.name_masks(masks, classes)
                rows[f"{src}_{pname}@{t:g}"] = {**score(named), "seconds_per_image": base_s + name_s / n}
                fallback = torch.where(named == IGNORE, bil, named)
                rows[f"{src}_{pname}_fb@{t:g}"] = {
                    **score(fallback),
                    "seconds_per_image": base_s + (name_s + up_s) / n,
                }
            # the mask's mean × the pixel's own score: (n, H, W, C) gathered per pixel
            per_pixel = mean.gather(1, masks.flatten(1)[..., None].expand(-1, -1, c)).view(n, *size, c)
            product = (per_pixel.permute(0, 3, 1, 2) * up).argmax(1)
            rows[f"{src}_{pname}_x"] = {**score(product), "seconds_per_image": base_s + (name_s + up_s) / n}
            # name first, then PAMR on the named class scores (C maps, each pixel its mask's mean scores)
            soft = per_pixel.permute(0, 3, 1, 2).contiguous()
            named_pamr, npamr_s = batched(lambda s, g: pamr(s, g).argmax(1), n, soft, images)
            rows[f"{src}_{pname}_named+pamr"] = {
                **score(named_pamr),
                "seconds_per_image": base_s + (name_s + npamr_s) / n,
            }
            if src_logits is not None:
                named = method.classify_masks(src_logits, masks, k)
                rows[f"{src}_{pname}_logit"] = {**score(named), "seconds_per_image": base_s + name_s / n}
    assert len(score.history) == len(rows)  # one score() call per row, in order
    confusions = dict(zip(rows, score.history, strict=True))
    pairs = [
        (row, f"{src}_{base}")
        for src in sources
        if src in args.sources.split(",")
        for row in rows
        if row.startswith(f"{src}_emerdiff") and "@" not in row
        for base in ("bilinear", "bilinear+pamr")
    ]
    results["deltas"] = bootstrap_deltas(confusions, pairs, args.bootstrap, args.seed)
    results["notes"]["field_bilinear_pixel_accuracy"] = 100 * field_acc
    results["notes"]["reference_s_per_image"] = reference_s
    results["notes"]["probe_s_per_image"] = probe_s
    results["notes"]["segment_s_per_image"] = {k: m["seconds_per_image"] for k, m in maps.items()}
    return results


def print_report(args, results: dict[str, Any], machine: str) -> None:
    from emerdiff_pl.datasets.toyworld import CLASS_NAMES

    rows = results["rows"]
    print(
        f"\ntoy world, seed {args.seed}, probe on {args.num_labelled} labelled scenes, {args.num_images} "
        f"held-out scenes, K {args.num_masks}; {machine}"
    )
    for key, value in results["notes"].items():
        print(f"  {key}: {value}")
    width = max(len(r) for r in rows) + 2
    cols = [
        ("mIoU", "miou"),
        ("stuff", "stuff_miou"),
        ("objects", "object_miou"),
        ("pix acc", "pixel_accuracy"),
        ("coverage", "coverage"),
        (f"BF@{args.boundary_tolerance}", "boundary_f"),
        ("s/image", "seconds_per_image"),
    ]
    header = f"{'row':<{width}}" + "".join(f"{h:>10}" for h, _ in cols)
    for group in ("probe_", "field_", "oracle_"):
        print("\n" + header)
        for name, r in rows.items():
            if name.startswith(group):
                print(f"{name:<{width}}" + "".join(f"{r[key]:>10.2f}" for _, key in cols))
    print(
        f"\nnamed mIoU differences, with the 5–95 % interval of {args.bootstrap} bootstrap resamples of the scenes "
        "and the fraction of resamples where the row is ahead"
    )
    for pair, (point, lo, hi, ahead) in results["deltas"].items():
        print(f"  {pair:<{2 * width}} {point:+7.2f}  [{lo:+6.2f}, {hi:+6.2f}]  {ahead:5.2f}")
    print("\nnamed IoU per class: " + ", ".join(CLASS_NAMES))
    for name, r in rows.items():
        if "@" in name or name.endswith(("_x", "_logit")):
            continue
        print(
            f"  {name:<{width}}" + " ".join("  -  " if v is None else f"{v:5.1f}" for v in r["iou_per_class"])
        )
    print(" ".join(f"{name}={r['miou']:.2f}" for name, r in rows.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-labelled", type=int, default=16, help="training scenes of the probe (default 16)")
    p.add_argument("--num-images", type=int, default=32, help="held-out scenes (default 32)")
    p.add_argument(
        "--num-masks", default="16,32", help="EmerDiff's K values, comma-separated (default 16,32)"
    )
    p.add_argument("--cache", default="/tmp/named_explore", help="folder for the EmerDiff maps ('' = none)")
    p.add_argument("--compute-only", action="store_true", help="fill the cache and stop")
    p.add_argument("--thresholds", default="0.5,0.7", help="mask-score thresholds to try (default 0.5,0.7)")
    p.add_argument("--field-noise", type=float, default=0.2, help="fraction of field cells relabelled")
    p.add_argument(
        "--field-grid", type=int, default=0, help="field cells per side (default: the feature grid)"
    )
    p.add_argument(
        "--field-block", type=int, default=1, help="field noise drawn per block of cells (default 1)"
    )
    p.add_argument("--sources", default="probe,field", help="classifiers to score (default probe,field)")
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples of the scenes (default 1000)"
    )
    p.add_argument("--boundary-tolerance", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.thresholds = [float(v) for v in args.thresholds.split(",") if v.strip()]

    import torch

    from emerdiff_pl.datasets import toyworld

    torch.set_num_threads(args.threads)
    ks = [int(v) for v in args.num_masks.split(",") if v.strip()]
    scenes = list(toyworld.generate_scenes(args.num_images, args.seed, 128))
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    seeds = [args.seed * 1_000_003 + i for i in range(args.num_images)]
    maps = {}
    for k in ks:
        t0 = time.perf_counter()
        maps[k] = emerdiff_maps(k, images, seeds, args.cache or None, args.seed)
        print(f"EmerDiff K = {k}: {time.perf_counter() - t0:.1f} s here", flush=True)
    if args.compute_only:
        return 0
    import platform

    targets = torch.from_numpy(np.stack([s.labels for s in scenes]))
    t0 = time.perf_counter()
    with torch.no_grad():
        results = analyse(args, maps, images, targets)
    results["notes"]["analysis_s"] = time.perf_counter() - t0
    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):  # the model name, where there is one
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    machine = f"{cpu}, {os.cpu_count()} CPUs, {args.threads} torch thread(s), {time.strftime('%Y-%m-%d')}"
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine, **results}, f, indent=2, default=float)
    print_report(args, results, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
