"""EmerDiff vs the cheap refiners of the same low-res masks, on held-out toy-world scenes (known ground truth).

``--methods`` names are ``method[+refine]``: ``method`` is ``emerdiff`` or ``lowres_bilinear``, ``refine`` one
of ``guided``, ``bilateral``, ``pamr`` (emerdiff_pl.refine). Each base method labels the scenes once (same
model, K and per-image seeds, so the same low-res k-means masks: checked); its score maps before the argmax
(EmerDiff's smoothed difference maps, or the bilinear upsampling of the one-hot masks) are kept, and every
refiner is applied to those same maps. A method's seconds per image = its base method's ``segment()`` time +
its refiner's time. Reported for each:

- dataset-wide Hungarian mIoU (the paper's Table 1 protocol): the per-image masks get global ids by one
  weighted k-means of all mask embeddings into as many clusters as there are classes (``relabel.py``'s
  functions); the same mask → global id table for every method; also split into stuff and object classes;
- per-image Hungarian mIoU (DiffSeg/DiffCut style, lenient), on the per-image mask ids;
- concept mIoU (the paper's Table 2 protocol, dataset-wide concepts; emerdiff_pl.metrics.ConceptIoU);
- boundary F (per-class, tolerance ``--boundary-tolerance`` px, on the dataset-wide matched labels);
- majority-oracle mIoU (diagnostic): each mask takes the ground-truth class most of its low-res pixels have.

The last line is ``<name>=<dataset-wide mIoU>`` for every method, space-separated (percent).

    python benchmarks/toyworld/evaluate.py --num-images 40
    python benchmarks/toyworld/evaluate.py --methods emerdiff,lowres_bilinear,lowres_bilinear+pamr --quick
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
    # the refiners' options (used by method+refine names only): radius 16 px (two feature cells) and ε 0.01
    # for guided / bilateral, chosen on 16 scenes of seed 7 (RESULTS.md); PAMR keeps its authors' settings
    "refine_radius": 16,
    "refine_eps": 0.01,
}
METHODS = ("emerdiff", "lowres_bilinear")
BASE_METHODS = ("emerdiff", "lowres_bilinear")
REFINE_OPTIONS = ("refine_iterations", "refine_dilations", "refine_radius", "refine_eps")


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
    for name in ("method", "refine"):
        if name in out:
            raise SystemExit(f"--model.{name} cannot be overridden: name the methods in --methods instead")
    return out


def parse_methods(spec: str) -> list[tuple[str, str, str]]:
    """``emerdiff,lowres_bilinear+pamr`` → [(name, base method, refiner)], checked."""
    from emerdiff_pl.refine import REFINERS

    out = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        base, _, refiner = name.partition("+")
        refiner = refiner or "none"
        if base not in BASE_METHODS or refiner not in REFINERS:
            raise SystemExit(
                f"method {name!r}: expected method[+refine] with method in {BASE_METHODS} and refine in {REFINERS}"
            )
        out.append((name, base, refiner))
    if not out:
        raise SystemExit("--methods is empty")
    if len({n for n, _, _ in out}) != len(out):
        raise SystemExit(f"--methods names a method twice: {spec}")
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
    from emerdiff_pl.labelmaps import resize_labels_nearest

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


def _capturing_segmenter(**kwargs: Any):
    """An EmerDiffSegmenter (refine: none) that keeps the score maps its `refine_scores` step receives."""
    from emerdiff_pl.segmenter import EmerDiffSegmenter

    class Capturing(EmerDiffSegmenter):
        def refine_scores(self, scores, images):
            self.captured_scores = scores.detach().float().cpu()
            return scores

    return Capturing(**kwargs)


def label_scenes(args: argparse.Namespace, base: str, model_args: dict[str, Any], images: np.ndarray):
    """Run `base` over the scenes once: labels, low-res masks, embeddings, score maps, seconds per batch.

    With ``--cache DIR`` each batch is stored as it finishes and reused on the next run with the same
    settings (a crash or a re-scoring loses no finished batch)."""
    import torch
    from tqdm.auto import tqdm

    seg = _capturing_segmenter(pretrained=args.pretrained, method=base, **model_args).to(args.device)
    out: dict[str, list] = {"labels": [], "lowres": [], "emb": [], "scores": [], "seconds": []}
    tag = None
    if args.cache:
        import hashlib

        key = json.dumps(
            [base, args.pretrained, args.seed, args.size, args.width, model_args], sort_keys=True
        )
        tag = hashlib.sha1(key.encode()).hexdigest()[:10]
        os.makedirs(args.cache, exist_ok=True)
    for start in tqdm(range(0, len(images), args.batch_size), desc=base):
        stop = min(start + args.batch_size, len(images))
        path = os.path.join(args.cache, f"{base}-{tag}-{start:05d}-{stop:05d}.npz") if tag else None
        if path and os.path.exists(path):
            with np.load(path) as z:
                batch = {name: z[name] for name in ("labels", "lowres", "emb", "scores", "seconds")}
        else:
            x = torch.from_numpy(images[start:stop]).permute(0, 3, 1, 2).float() / 255
            seeds = [args.seed * 1_000_003 + i for i in range(start, stop)]
            t0 = time.perf_counter()
            res = seg.segment(x, seeds=seeds)
            seconds = time.perf_counter() - t0
            scores = seg.captured_scores
            # the kept maps are the ones segment() took the argmax of (same size here: scene = resolution)
            if scores.shape[-2:] == res.labels.shape[-2:] and not torch.equal(scores.argmax(1), res.labels):
                raise RuntimeError("captured score maps do not give segment()'s labels")
            batch = {
                "labels": res.labels.numpy(),
                "lowres": res.lowres_labels.numpy(),
                "emb": res.mask_embeddings.numpy(),
                "scores": scores.numpy(),
                "seconds": np.float64(seconds),
            }
            if path:
                np.savez(path + ".tmp.npz", **batch)
                os.replace(path + ".tmp.npz", path)
        for name in ("labels", "lowres", "emb", "scores"):
            out[name] += list(batch[name])
        out["seconds"].append(float(batch["seconds"]))
    return out


def run(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from emerdiff_pl.datasets import toyworld
    from emerdiff_pl.metrics import BoundaryFScore, ConceptIoU, hungarian_miou
    from emerdiff_pl.refine import refine

    torch.set_num_threads(args.threads)
    methods = parse_methods(getattr(args, "methods", ",".join(METHODS)))
    scenes = list(toyworld.generate_scenes(args.num_images, args.seed, args.size, width=args.width))
    images = np.stack([s.image for s in scenes])
    targets = [s.labels for s in scenes]
    num_classes = toyworld.NUM_CLASSES
    stuff = list(toyworld.STUFF_CLASSES)
    objects = [c for c in range(num_classes) if c not in stuff]
    model_args = {**DEFAULT_MODEL_ARGS, **overrides}
    refine_args = {k.removeprefix("refine_"): model_args.pop(k) for k in REFINE_OPTIONS if k in model_args}
    k = int(model_args["num_masks"])

    bases = [b for b in BASE_METHODS if any(m[1] == b for m in methods)]
    outputs = {b: label_scenes(args, b, model_args, images) for b in bases}
    same = all(
        np.array_equal(a, b)
        for a, b in zip(outputs[bases[0]]["lowres"], outputs[bases[-1]]["lowres"], strict=True)
    )
    if not same:
        print("WARNING: the methods produced different low-res masks; the comparison is not like for like")
    ref = outputs[bases[0]]
    num_global = args.global_clusters or num_classes
    tables = global_ids(ref["emb"], ref["lowres"], num_global, args.seed)
    oracle = [majority_oracle(lr, t, k, num_classes) for lr, t in zip(ref["lowres"], targets, strict=True)]
    guide = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255

    results: dict[str, Any] = {
        "seed": args.seed,
        "num_images": args.num_images,
        "model": args.pretrained,
        "model_args": model_args,
        "refine_args": refine_args,
        "device": args.device,
        "same_lowres_masks": same,
        "boundary_tolerance": args.boundary_tolerance,
        "methods": [name for name, _, _ in methods],
    }
    global_preds: dict[str, list[np.ndarray]] = {}
    for name, base, refiner in methods:
        out = outputs[base]
        labels, refine_seconds = [], 0.0
        for start in range(0, len(images), args.batch_size):
            scores = torch.from_numpy(np.stack(out["scores"][start : start + args.batch_size]))
            t0 = time.perf_counter()
            refined = refine(scores, guide[start : start + args.batch_size], refiner, **refine_args)
            lab = refined.argmax(1)
            if lab.shape[-2:] != images.shape[1:3]:  # scores at the model size, as segment()
                lab = F.interpolate(lab[:, None].float(), size=images.shape[1:3], mode="nearest-exact")
                lab = lab[:, 0].long()
            refine_seconds += time.perf_counter() - t0
            labels += list(lab.numpy())
        if refiner == "none":
            assert all(np.array_equal(a, b) for a, b in zip(labels, out["labels"], strict=True))
        global_preds[name] = [tab[lab] for tab, lab in zip(tables, labels, strict=True)]
        dataset = hungarian_miou(global_preds[name], targets, num_classes, num_clusters=num_global)
        per_class = dataset["per_class_iou"]
        per_image = hungarian_miou(labels, targets, num_classes, protocol="per-image")
        oracle_preds = [tab[lab] for tab, lab in zip(oracle, labels, strict=True)]
        oracle_scores = hungarian_miou(oracle_preds, targets, num_classes, num_clusters=num_classes)
        concept = ConceptIoU(num_classes, concepts="dataset")
        concept_img = ConceptIoU(num_classes, concepts="image")
        bf = BoundaryFScore(num_classes, num_global, tolerance=args.boundary_tolerance)
        for lab, gp, t, e in zip(labels, global_preds[name], targets, out["emb"], strict=True):
            tt = torch.from_numpy(t.astype(np.int64))
            concept.update(torch.from_numpy(lab), tt, torch.from_numpy(e))
            concept_img.update(torch.from_numpy(lab), tt, torch.from_numpy(e))
            bf.update(torch.from_numpy(gp), tt)
        concept_out, concept_img_out, bf_out = concept.compute(), concept_img.compute(), bf.compute()
        bf_per_class = bf_out["per_class_f"].numpy()
        results[name] = {
            "dataset_miou": dataset["miou"],
            "dataset_pixel_accuracy": dataset.get("pixel_accuracy"),
            "dataset_iou_per_class": [None if np.isnan(v) else float(v) for v in per_class],
            "stuff_miou": float(np.nanmean(per_class[stuff])),
            "object_miou": float(np.nanmean(per_class[objects])),
            "per_image_miou": per_image["miou"],
            "concept_miou": float(concept_out["miou"]),
            "concept_image_miou": float(concept_img_out["miou"]),
            "boundary_f": float(bf_out["boundary_f"]),
            "boundary_precision": float(bf_out["precision"]),
            "boundary_recall": float(bf_out["recall"]),
            "stuff_boundary_f": float(np.nanmean(bf_per_class[stuff])),
            "object_boundary_f": float(np.nanmean(bf_per_class[objects])),
            "oracle_miou": oracle_scores["miou"],
            "seconds_per_image": (sum(out["seconds"]) + refine_seconds) / len(images),
            "refine_seconds_per_image": refine_seconds / len(images),
        }
    if args.examples:
        save_examples(args.examples, images, targets, global_preds)
    return results


def print_report(results: dict[str, Any]) -> None:
    from emerdiff_pl.datasets.toyworld import CLASS_NAMES

    names = results.get("methods", list(METHODS))
    print(
        f"\ntoy world, seed {results['seed']}, {results['num_images']} held-out scenes, model {results['model']}"
    )
    print(
        f"settings: {json.dumps(results['model_args'])}; refiners: {json.dumps(results.get('refine_args', {}))}; "
        f"same low-res masks: {results['same_lowres_masks']}"
    )
    cols = [
        ("dataset mIoU", "dataset_miou"),
        ("stuff", "stuff_miou"),
        ("objects", "object_miou"),
        ("per-image", "per_image_miou"),
        ("concept", "concept_miou"),
        ("concept/img", "concept_image_miou"),
        (f"bound. F@{results.get('boundary_tolerance', 2)}", "boundary_f"),
        ("BF stuff", "stuff_boundary_f"),
        ("BF obj", "object_boundary_f"),
        ("oracle", "oracle_miou"),
        ("s/image", "seconds_per_image"),
    ]
    width = max(24, max(len(n) for n in names) + 2)
    print(f"{'method':<{width}}" + "".join(f"{c:>13}" for c, _ in cols))
    for m in names:
        r = results[m]
        print(f"{m:<{width}}" + "".join(f"{float(r[key] or float('nan')):>13.2f}" for _, key in cols))
    print("dataset-wide IoU per class: " + ", ".join(CLASS_NAMES))
    for m in names:
        vals = results[m]["dataset_iou_per_class"]
        print(f"  {m:<{width}}" + " ".join("  -  " if v is None else f"{v:5.1f}" for v in vals))
    print(" ".join(f"{m}={results[m]['dataset_miou']:.2f}" for m in names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any --model.<name> <value> is passed to EmerDiffSegmenter (e.g. --model.num_masks 6); "
        "--model.refine_radius / refine_eps / refine_iterations / refine_dilations set the refiners. "
        f"Defaults: {json.dumps(DEFAULT_MODEL_ARGS)}",
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated method[+refine] names, e.g. emerdiff,lowres_bilinear+pamr "
        "(default emerdiff,lowres_bilinear)",
    )
    p.add_argument("--seed", type=int, default=0, help="scene seed (training used 12345; default 0)")
    p.add_argument("--num-images", type=int, default=40, help="held-out scenes (default 40)")
    p.add_argument("--quick", action="store_true", help="8 scenes: a smoke run, not a measurement")
    p.add_argument(
        "--pretrained", default=DEFAULT_MODEL, help="diffusers folder (default: the shipped toyworld-ldm)"
    )
    p.add_argument(
        "--size", type=int, default=128, help="scene side in pixels (default 128); the height with --width"
    )
    p.add_argument(
        "--width", type=int, default=None, help="scene width in pixels (default: --size, square scenes)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per segment() call")
    p.add_argument(
        "--global-clusters",
        type=int,
        default=None,
        help="global ids for the dataset-wide protocol (default: number of classes)",
    )
    p.add_argument(
        "--boundary-tolerance", type=int, default=2, help="boundary F tolerance in pixels (default 2)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda; on cuda add --model.dtype float32 to match CPU numbers (auto = bf16)",
    )
    p.add_argument(
        "--cache",
        default=None,
        help="folder for each labelled batch (score maps included); a rerun with the same settings reuses them",
    )
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--examples", default=None, help="save an example grid PNG here (image | gt | methods)")
    return p


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    overrides = parse_overrides(extra)
    parse_methods(args.methods)
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
