"""EmerDiff vs lowres_bilinear on held-out toy-world scenes, where the ground truth is known.

Both methods label the same scenes with the same model, K, seeds and therefore the same low-res k-means masks
(checked); they differ only in how the masks reach image resolution. Reported:

- dataset-wide Hungarian mIoU (the paper's Table 1 protocol): the per-image masks are first given global ids by
  one weighted k-means of all mask embeddings into as many clusters as there are classes (``relabel.py``'s
  functions); the same mask -> global id mapping is used for both methods;
- per-image Hungarian mIoU (DiffSeg/DiffCut style, lenient), on the per-image cluster ids;
- majority-oracle mIoU (diagnostic): each per-image mask takes the ground-truth class most of its low-res pixels
  have, so the score isolates the upsampling from the clustering.

The last line is ``emerdiff_miou=<x> lowres_bilinear_miou=<y>`` (dataset-wide, percent).

    python benchmarks/toyworld/evaluate.py --num-images 40
    python benchmarks/toyworld/evaluate.py --quick --model.modulation_strength 5 --model.gaussian_sigma 2
"""

from __future__ import annotations

import argparse
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

DEFAULT_MODEL = str(ROOT / "emerdiff_pl" / "assets" / "toyworld-ldm")
# Defaults chosen from the ablation table in RESULTS.md (the paper leaves K, σ and the layer open).
DEFAULT_MODEL_ARGS: dict[str, Any] = {
    "resolution": 128,
    "num_masks": 16,
    "feature_layer": "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
    "modulated_layer": "up_blocks.2.attentions.2.transformer_blocks.0.attn2",
    "gaussian_sigma": 2.0,
    "modulation_timestep": 281,
    "modulation_strength": 10.0,
    "kmeans_n_init": 5,
}
METHODS = ("emerdiff", "lowres_bilinear")


def parse_overrides(extra: list[str]) -> dict[str, Any]:
    """``--model.name value`` / ``--model.name=value`` pairs -> {name: YAML-typed value}."""
    import yaml

    out: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--model."):
            raise SystemExit(f"unknown argument {arg!r}: only --model.<name> <value> overrides are accepted")
        name, sep, value = arg[len("--model.") :].partition("=")
        if not sep:
            if i + 1 >= len(extra):
                raise SystemExit(f"{arg} needs a value")
            value, i = extra[i + 1], i + 1
        out[name] = yaml.safe_load(value)
        i += 1
    if "method" in out:
        raise SystemExit("--model.method cannot be overridden: both methods are always run")
    return out


def global_ids(
    embeddings: list[np.ndarray], lowres: list[np.ndarray], num_clusters: int, seed: int
) -> list[np.ndarray]:
    """Per image, a K -> global id table from one area-weighted k-means over every mask embedding."""
    import torch

    from emerdiff_pl.relabel import assign_masks, fit_centroids

    k = embeddings[0].shape[0]
    areas = [np.bincount(lr.ravel(), minlength=k).astype(np.float32) for lr in lowres]
    emb = np.concatenate(embeddings).astype(np.float32)
    weights = np.concatenate(areas)
    keep = weights > 0
    centroids, _ = fit_centroids(
        emb[keep],
        weights[keep],
        num_clusters,
        seed=seed,
        n_init=8,
        max_iter=300,
        normalize=False,
        device=torch.device("cpu"),
    )
    centroids_t = torch.from_numpy(centroids)
    return [assign_masks(e, centroids_t, normalize=False) for e in embeddings]


def majority_oracle(lowres: np.ndarray, target: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """Per-image mask -> majority ground-truth class, measured on the target resized to the low-res grid."""
    from emerdiff_pl.shardio import resize_labels_nearest

    small = resize_labels_nearest(target, lowres.shape)
    table = np.zeros(k, dtype=np.int64)
    for m in range(k):
        hits = small[(lowres == m) & (small < num_classes)]
        table[m] = np.bincount(hits, minlength=num_classes).argmax() if hits.size else 0
    return table


def palette(n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(40, 255, size=(max(n, 1), 3), dtype=np.uint8)


def save_examples(path: str, images, targets, preds: dict[str, list[np.ndarray]], count: int = 6) -> None:
    """A grid: image | ground truth | one column per method (global ids, colours matched to classes)."""
    from PIL import Image

    pal = palette(256)
    rows = []
    for i in range(min(count, len(images))):
        cols = [images[i], pal[targets[i]]] + [pal[preds[m][i]] for m in preds]
        rows.append(np.concatenate(cols, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def run(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from emerdiff_pl import toyworld
    from emerdiff_pl.metrics import hungarian_miou
    from emerdiff_pl.segmenter import EmerDiffSegmenter

    torch.set_num_threads(args.threads)
    scenes = list(toyworld.generate_scenes(args.num_images, args.seed, args.size))
    images = np.stack([s.image for s in scenes])
    targets = [s.labels for s in scenes]
    num_classes = toyworld.NUM_CLASSES
    model_args = {**DEFAULT_MODEL_ARGS, **overrides}
    k = int(model_args["num_masks"])

    outputs: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        seg = EmerDiffSegmenter(pretrained=args.pretrained, method=method, **model_args).to(args.device)
        labels, lowres, emb, seconds = [], [], [], 0.0
        for start in tqdm(range(0, len(images), args.batch_size), desc=method):
            batch = (
                torch.from_numpy(images[start : start + args.batch_size]).permute(0, 3, 1, 2).float() / 255
            )
            seeds = [args.seed * 1_000_003 + start + j for j in range(len(batch))]
            t0 = time.perf_counter()
            res = seg.segment(batch, seeds=seeds)
            seconds += time.perf_counter() - t0
            labels += list(res.labels.numpy())
            lowres += list(res.lowres_labels.numpy())
            emb += list(res.mask_embeddings.numpy())
        outputs[method] = {"labels": labels, "lowres": lowres, "emb": emb, "seconds": seconds}

    same = all(
        np.array_equal(a, b)
        for a, b in zip(outputs["emerdiff"]["lowres"], outputs["lowres_bilinear"]["lowres"], strict=True)
    )
    if not same:
        print(
            "WARNING: the two methods produced different low-res masks; the comparison is not like for like"
        )
    ref = outputs["emerdiff"]
    tables = global_ids(ref["emb"], ref["lowres"], args.global_clusters or num_classes, args.seed)
    oracle = [majority_oracle(lr, t, k, num_classes) for lr, t in zip(ref["lowres"], targets, strict=True)]

    results: dict[str, Any] = {
        "seed": args.seed,
        "num_images": args.num_images,
        "model": args.pretrained,
        "model_args": model_args,
        "device": args.device,
        "same_lowres_masks": same,
    }
    global_preds: dict[str, list[np.ndarray]] = {}
    for method in METHODS:
        labels = outputs[method]["labels"]
        global_preds[method] = [tab[lab] for tab, lab in zip(tables, labels, strict=True)]
        dataset = hungarian_miou(
            global_preds[method], targets, num_classes, num_clusters=args.global_clusters or num_classes
        )
        per_image = hungarian_miou(labels, targets, num_classes, protocol="per-image")
        oracle_preds = [tab[lab] for tab, lab in zip(oracle, labels, strict=True)]
        oracle_scores = hungarian_miou(oracle_preds, targets, num_classes, num_clusters=num_classes)
        results[method] = {
            "dataset_miou": dataset["miou"],
            "dataset_pixel_accuracy": dataset.get("pixel_accuracy"),
            "dataset_iou_per_class": [None if np.isnan(v) else float(v) for v in dataset["per_class_iou"]],
            "per_image_miou": per_image["miou"],
            "oracle_miou": oracle_scores["miou"],
            "seconds_per_image": outputs[method]["seconds"] / len(images),
        }
    if args.examples:
        save_examples(args.examples, images, targets, global_preds)
    return results


def print_report(results: dict[str, Any]) -> None:
    from emerdiff_pl.toyworld import CLASS_NAMES

    print(
        f"\ntoy world, seed {results['seed']}, {results['num_images']} held-out scenes, model {results['model']}"
    )
    print(
        f"settings: {json.dumps(results['model_args'])}; same low-res masks: {results['same_lowres_masks']}"
    )
    print(
        f"{'method':<17}{'dataset mIoU':>13}{'pixel acc':>11}{'per-image mIoU':>16}{'oracle mIoU':>13}{'s/image':>9}"
    )
    for m in METHODS:
        r = results[m]
        print(
            f"{m:<17}{r['dataset_miou']:>13.2f}{r['dataset_pixel_accuracy'] or float('nan'):>11.2f}"
            f"{r['per_image_miou']:>16.2f}{r['oracle_miou']:>13.2f}{r['seconds_per_image']:>9.2f}"
        )
    if results["emerdiff"].get("dataset_iou_per_class"):
        print("dataset-wide IoU per class: " + ", ".join(CLASS_NAMES))
        for m in METHODS:
            vals = results[m]["dataset_iou_per_class"]
            print(f"  {m:<17}" + " ".join("  -  " if v is None else f"{v:5.1f}" for v in vals))
    print(
        f"emerdiff_miou={results['emerdiff']['dataset_miou']:.2f} lowres_bilinear_miou={results['lowres_bilinear']['dataset_miou']:.2f}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any --model.<name> <value> is passed to EmerDiffSegmenter (e.g. --model.num_masks 6). "
        f"Defaults: {json.dumps(DEFAULT_MODEL_ARGS)}",
    )
    p.add_argument("--seed", type=int, default=0, help="scene seed (training used 12345; default 0)")
    p.add_argument("--num-images", type=int, default=40, help="held-out scenes (default 40)")
    p.add_argument("--quick", action="store_true", help="8 scenes: a smoke run, not a measurement")
    p.add_argument(
        "--pretrained", default=DEFAULT_MODEL, help="diffusers folder (default: the shipped toyworld-ldm)"
    )
    p.add_argument("--size", type=int, default=128, help="scene side in pixels (default 128)")
    p.add_argument("--batch-size", type=int, default=4, help="images per segment() call")
    p.add_argument(
        "--global-clusters",
        type=int,
        default=None,
        help="global ids for the dataset-wide protocol (default: number of classes)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda; on cuda add --model.dtype float32 to match CPU numbers (auto = bf16)",
    )
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--examples", default=None, help="save an example grid PNG here (image | gt | methods)")
    return p


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    overrides = parse_overrides(extra)
    if args.quick:
        args.num_images = min(args.num_images, 8)
    if args.num_images < 2:
        raise SystemExit("--num-images must be at least 2 (the global clustering needs several images)")
    results = run(args, overrides)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    print_report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
