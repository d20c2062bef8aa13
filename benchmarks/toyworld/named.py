"""Named classes on the toy world (issue 27): EmerDiff's masks named by a classifier vs the classifier alone.

The probe route as a user runs it: `--num-labelled` labelled scenes (seed `--seed`, scene indices from 100000,
disjoint from the held-out ones) are written as ground-truth shards and `emerdiff-pl fit-probe` fits the probe on
them with configs/toyworld-named.yaml; `--num-images` held-out scenes (seed `--seed`, indices 0 …, per-image
seeds as evaluate.py's) are then labelled by the segmenter of that config with `classifier: probe` (K =
`--num-masks`). Rows (named mIoU: class ids against the ground truth, no matching, the `named` protocol of
`emerdiff-pl evaluate`; boundary F at 2 px; seconds per image):

- `probe_bilinear`: `method: lowres_bilinear` + the probe (the classifier alone: its scores upsampled bilinearly,
  argmax); `probe_bilinear+pamr`: the same with `refine: pamr`;
- `emerdiff`: `method: emerdiff` + the probe (EmerDiff's masks, each named by the probe); `emerdiff+pamr`: with
  `refine: pamr` (on the difference maps before the mask argmax, and on the named class maps before the final
  argmax: docs/method.md §14);
- the same four with the `field` classifier, prefixed `field_`: a simulated coarse predictor (the ground truth at
  the 16×16 feature grid, majority per cell, `--field-noise` of the cells relabelled to a random other class),
  sent as `<key>.coarse.png` bytes through the DataModule's decoder; and `field2x2_`: the noise drawn per 2×2-cell
  block (errors as large as objects, which a refiner cannot average away);
- diagnostics on the same masks (emerdiff_pl.method's functions, not a product setting): `…+pamr[no diff-map
  refine]` (refine only the named class maps), `…+pamr[no class-map refine]` (refine only the difference maps),
  `…[mean score]` (each mask named by its mean pixel score instead of the probe on its embedding),
  `…[mask prototypes]` (nearest class prototype of mask embeddings: each labelled scene's k-means masks named by
  their ground-truth majority, class means of their centred, normalized embeddings, cosine), `…[mask linear]`
  (a softmax regression fit on those mask embeddings instead of the product probe's single cells), and
  `oracle_emerdiff(+pamr)` (each mask named by the ground-truth majority of its pixels: the ceiling of any naming).

EmerDiff's score maps (`EmerDiffSegmenter.score_maps`, segment()'s first half) are cached per batch of 4 scenes
under `--cache`, so N = 4 and N = 16 share one EmerDiff pass per seed; every product row then runs
`label_maps` (segment()'s second half) on them, and `--verify` reruns `segment()` on the first batch and checks
the labels are the cached path's. Seconds per image: `score_maps` as cached (fresh batches only) + `label_maps`
here; wall time on a shared CPU with one torch thread. Differences come with a bootstrap over the scenes (the
5–95 % interval, and how often the row is ahead).

    nice python benchmarks/toyworld/named.py --seed 0 --num-labelled 16 --num-images 64

The last line is `name=value` pairs: named mIoU (percent) of every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "toyworld-named.yaml"
BATCH = 4
LABELLED_START = 100_000  # the labelled scenes' indices: disjoint from the held-out scenes 0 …
MAP_FIELDS = ("scores", "lowres", "embeddings", "features")
SIZE = 128


def model_settings(num_masks: int, **changes: Any) -> dict[str, Any]:
    """configs/toyworld-named.yaml's model settings with K = num_masks, no classifier or refiner, and `changes`."""
    import yaml

    settings = yaml.safe_load(CONFIG.read_text())["model"]
    settings.update(num_masks=int(num_masks), classifier="none", probe=None, refine="none")
    settings.update(changes)
    return settings


def scenes(num: int, seed: int, start: int = 0):
    """(images (n, 3, 128, 128) in [0, 1], labels (n, 128, 128) uint8, per-image seeds) of toy scenes."""
    import torch

    from emerdiff_pl.datasets import toyworld

    made = list(toyworld.generate_scenes(num, seed, SIZE, start=start))
    images = torch.from_numpy(np.stack([s.image for s in made])).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(np.stack([s.labels for s in made]))
    return images, labels, [seed * 1_000_003 + start + i for i in range(num)]


def settings_tag(settings: dict[str, Any], seed: int) -> str:
    digest = hashlib.sha1(json.dumps([settings, seed], sort_keys=True).encode()).hexdigest()[:10]
    return f"k{settings['num_masks']}-{digest}"


def cached_maps(segmenter, images, seeds, cache: str | None, tag: str) -> list[Any]:
    """`segmenter.score_maps` of BATCH-sized chunks (segment() up to the refiner), each chunk cached as one .npz
    under `cache` (a rerun, or the other N, reads them back bit for bit)."""
    import torch

    from emerdiff_pl.segmenter import ScoreMaps

    out = []
    for start in range(0, len(images), BATCH):
        stop = min(start + BATCH, len(images))
        path = os.path.join(cache, f"{tag}-{start:05d}-{stop:05d}.npz") if cache else None
        chunk = images[start:stop]
        if path and os.path.exists(path):
            with np.load(path) as z:
                arrays = {name: torch.from_numpy(z[name]) for name in MAP_FIELDS}
                timings = json.loads(str(z["timings"]))
        else:
            t0 = time.perf_counter()
            maps = segmenter.score_maps(chunk, seeds=seeds[start:stop])
            arrays = {name: getattr(maps, name).detach().cpu() for name in MAP_FIELDS}
            timings = maps.timings
            if path:
                os.makedirs(cache, exist_ok=True)
                tmp = path + ".tmp.npz"
                np.savez(tmp, timings=json.dumps(timings), **{k: v.numpy() for k, v in arrays.items()})
                os.replace(tmp, path)
            print(f"  scenes {start}-{stop - 1}: {time.perf_counter() - t0:.1f} s", flush=True)
        out.append(ScoreMaps(chunk, **arrays, timings=timings))
    return out


def fit_probe_cli(num: int, seed: int, folder: str) -> tuple[str, str]:
    """The probe as a user fits it: labelled scenes as ground-truth shards, then `emerdiff-pl fit-probe` with
    configs/toyworld-named.yaml. Returns (probe path, the command's summary line)."""
    import contextlib

    from emerdiff_pl.cli import run_subcommand
    from emerdiff_pl.datasets import toyworld

    shards = toyworld.write_shards(Path(folder) / "labelled", num, seed, progress=False, start=LABELLED_START)
    probe = str(Path(folder) / "probe.safetensors")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = run_subcommand(
            "fit-probe",
            ["--config", str(CONFIG), "--labelled", "::".join(shards), "--class-names", "toyworld"]
            + ["--out", probe],
        )
    if code != 0:
        raise RuntimeError(f"fit-probe failed ({code}): {printed.getvalue()}")
    return probe, printed.getvalue().splitlines()[0]


def field_coarse(labels, noise: float, seed: int, block: int, num_classes: int) -> list[bytes]:
    """A simulated coarse predictor, as `<key>.coarse.png` bytes: each label map's majority class per cell of the
    16×16 feature grid, `noise` of the cells relabelled to a random other class (drawn per block×block cells,
    seeded by the seed and the scene)."""
    import torch
    from PIL import Image

    from emerdiff_pl.classifiers.probe import cell_label_fractions

    h = w = 16
    bh, bw = -(-h // block), -(-w // block)
    out = []
    for i, lab in enumerate(labels):
        majority = cell_label_fractions(lab, (h, w), num_classes)[:num_classes].argmax(0)
        rng = np.random.default_rng([seed, i, 27])
        flip = torch.from_numpy(rng.random((bh, bw)) < noise)
        offset = torch.from_numpy(rng.integers(1, num_classes, (bh, bw)))
        flip, offset = (
            t.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w] for t in (flip, offset)
        )
        cells = torch.where(flip, (majority + offset) % num_classes, majority).to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(cells).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def decode_coarse(blobs: list[bytes], keys: list[str], num_classes: int) -> list[Any]:
    """The DataModule's decoding of `<key>.coarse.png` members (emerdiff_pl.classifiers.field)."""
    from emerdiff_pl.classifiers.field import check_coarse_size, coarse_scores

    return [
        check_coarse_size(coarse_scores(b, "coarse.png", num_classes, k), (SIZE, SIZE), k)
        for b, k in zip(blobs, keys, strict=True)
    ]


# ------------------------------------------------------------------------------------------------ diagnostics
def labelled_masks(maps, labels, num_classes: int):
    """The labelled scenes' k-means masks (`maps`) as training data: (embeddings (M, D), the ground-truth majority
    class of each mask's cells (M,), its labelled cell mass (M,)), masks without labelled cells left out."""
    import torch
    import torch.nn.functional as F

    from emerdiff_pl.classifiers.probe import cell_label_fractions

    grid = tuple(maps.lowres.shape[-2:])
    k = maps.embeddings.shape[1]
    names, vectors, mass = [], [], []
    for lowres, lab, emb in zip(maps.lowres, labels, maps.embeddings, strict=True):
        fractions = cell_label_fractions(lab, grid, num_classes).flatten(1)  # (C + 1, N)
        per_mask = F.one_hot(lowres.flatten(), k).float().T @ fractions[:num_classes].T  # (K, C)
        labelled = per_mask.sum(1) > 0
        names.append(per_mask.argmax(1)[labelled])
        vectors.append(emb[labelled].float())
        mass.append(per_mask.sum(1)[labelled])
    return torch.cat(vectors), torch.cat(names), torch.cat(mass)


def mask_prototypes(maps, labels, num_classes: int):
    """Nearest class prototype of mask embeddings (`labelled_masks`); prototypes = class means of centred,
    normalized embeddings. Returns `scores(embeddings (B, K, D)) → (B, K, C)` (softmax of 20 × cosine; classes
    without masks never win)."""
    import torch
    import torch.nn.functional as F

    x, y, _ = labelled_masks(maps, labels, num_classes)
    mean = x.mean(0)
    unit = F.normalize(x - mean, dim=-1)
    present = torch.stack([(y == c).any() for c in range(num_classes)])
    prototypes = torch.stack(
        [F.normalize(unit[y == c].mean(0), dim=0) if present[c] else unit[0] * 0 for c in range(num_classes)]
    )

    def scores(embeddings):
        cosine = F.normalize(embeddings.float() - mean, dim=-1) @ prototypes.T
        return (20 * cosine).masked_fill(~present, float("-inf")).softmax(-1)

    return scores


def mask_linear(maps, labels, probe, weight_decay: float = 2e-4):
    """The product's linear probe (`classifiers.probe`'s softmax regression, its L2 `weight_decay`; 2e-4 beat
    2e-3 and 2e-2 in a try at N = 16) fit on mask embeddings (`labelled_masks`, each mask weighted by its
    labelled cells) instead of single cells: a probe trained on what it names. `probe` gives the class names and
    the feature source. Returns `scores(embeddings (B, K, D)) → (B, K, C)`."""
    import torch.nn.functional as F

    from emerdiff_pl.classifiers.probe import Probe, _fit_linear

    x, y, mass = labelled_masks(maps, labels, probe.num_classes)
    target = F.one_hot(y, probe.num_classes).float()
    present = ((target * mass[:, None]).sum(0) > 0).float()
    tensors = _fit_linear(x, target, mass, present, weight_decay, max_iter=500)
    return Probe("linear", probe.class_names, probe.source, tensors).mask_scores


def oracle_names(masks, targets, num_masks: int, num_classes: int):
    """(B, K) ground-truth majority class of each mask's pixels (0 for an empty mask): the oracle naming."""
    import torch

    n = masks.shape[0]
    idx = masks.flatten(1) * num_classes + targets.long().clamp_max(num_classes - 1).flatten(1)
    counts = torch.zeros(n, num_masks * num_classes, dtype=torch.long)
    counts.scatter_add_(1, idx, torch.ones_like(idx))
    return counts.view(n, num_masks, num_classes).argmax(-1)


def named_variant(seg, maps, mean_of, scores, refine_classes: bool):
    """EmerDiff masks, the argmax of `scores` (the difference maps, refined or not), named by `mean_of(masks) →
    (B, K, C)`, with the segmenter's refiner on the named class maps or not: emerdiff_pl.method's steps as
    label_maps runs them."""
    from emerdiff_pl import method

    masks = scores.argmax(1)
    mean = mean_of(masks)
    if refine_classes:
        class_maps = seg._refine(method.mask_class_maps(mean, masks), maps.images, lambda _: None)
        return method.assign_classes(class_maps, (SIZE, SIZE))
    return method.name_masks(masks, method.classes_of_masks(mean))


# ------------------------------------------------------------------------------------------------ scoring
class Scorer:
    """Named scores as `emerdiff-pl evaluate --protocol named` computes them (emerdiff_pl.metrics: NamedIoU,
    BoundaryFScore with the named assignment), plus each row's per-image confusions for the bootstrap."""

    def __init__(self, num_classes: int, tolerance: int = 2):
        self.c, self.tolerance = num_classes, tolerance
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, row: str, pred, target, seconds: float) -> None:
        from emerdiff_pl.metrics import BoundaryFScore, NamedIoU, named_ids

        entry = self.rows.setdefault(
            row,
            {
                "boundary": BoundaryFScore(self.c, self.c + 1, self.tolerance, "global"),
                "confusions": [],
                "seconds": 0.0,
                "images": 0,
            },
        )
        for p, t in zip(pred, target, strict=True):
            one = NamedIoU(self.c)
            one.update(p, t)
            entry["confusions"].append(one.confusion.numpy().copy())
            entry["boundary"].update(named_ids(p, self.c), t)
        entry["seconds"] += seconds
        entry["images"] += len(pred)

    def results(self) -> dict[str, dict[str, Any]]:
        from emerdiff_pl.datasets.toyworld import SHAPE_CLASSES
        from emerdiff_pl.metrics import assigned_scores, named_assignment

        out = {}
        for row, entry in self.rows.items():
            scores = assigned_scores(sum(entry["confusions"]), named_assignment(self.c))
            bf = entry["boundary"].compute(named_assignment(self.c))
            iou = scores["per_class_iou"]
            out[row] = {
                "miou": scores["miou"],
                "object_miou": float(np.nanmean(iou[list(SHAPE_CLASSES)])),
                "pixel_accuracy": scores["pixel_accuracy"],
                "boundary_f": float(bf["boundary_f"]),
                "seconds_per_image": entry["seconds"] / max(entry["images"], 1),
                "iou_per_class": [None if np.isnan(v) else float(v) for v in iou],
            }
        return out

    def bootstrap(self, pairs: list[tuple[str, str]], resamples: int, seed: int) -> dict[str, tuple]:
        """mIoU(row) − mIoU(base) of each pair, its 5/95 % bootstrap quantiles over the scenes (the same
        resamples for every pair) and the fraction of resamples where the row is ahead."""
        from emerdiff_pl.metrics import assigned_scores, named_assignment

        assignment = named_assignment(self.c)

        def miou(confusion):
            return assigned_scores(confusion, assignment)["miou"]

        stacks = {row: np.stack(e["confusions"]) for row, e in self.rows.items()}
        n = len(next(iter(stacks.values())))
        rng = np.random.default_rng(seed)
        weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)])
        out = {}
        for row, base in pairs:
            a = np.einsum("rn,nij->rij", weights, stacks[row])
            b = np.einsum("rn,nij->rij", weights, stacks[base])
            deltas = np.array([miou(x) - miou(y) for x, y in zip(a, b, strict=True)])
            point = miou(stacks[row].sum(0)) - miou(stacks[base].sum(0))
            lo, hi = np.quantile(deltas, [0.05, 0.95])
            out[f"{row} vs {base}"] = (point, float(lo), float(hi), float((deltas > 0).mean()))
        return out


# ------------------------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from emerdiff_pl import method
    from emerdiff_pl.classifiers.probe import Probe
    from emerdiff_pl.datasets import toyworld
    from emerdiff_pl.segmenter import EmerDiffSegmenter

    c, k = toyworld.NUM_CLASSES, args.num_masks
    images, targets, seeds = scenes(args.num_images, args.seed)
    keys = [toyworld.scene_key(args.seed, i) for i in range(args.num_images)]
    notes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="named-") as tmp:
        t0 = time.perf_counter()
        probe_path, notes["fit_probe"] = fit_probe_cli(args.num_labelled, args.seed, tmp)
        notes["fit_probe_s"] = time.perf_counter() - t0
        probe = Probe.load(probe_path)
        plain = model_settings(k)
        seg = {
            "probe": EmerDiffSegmenter(**model_settings(k, classifier="probe", probe=probe_path)),
            "field": EmerDiffSegmenter(**model_settings(k, classifier="field", class_names="toyworld")),
        }
        bil = {
            "probe": EmerDiffSegmenter(**model_settings(k, method="lowres_bilinear", classifier="probe", probe=probe_path)),
            "field": EmerDiffSegmenter(**model_settings(k, method="lowres_bilinear", classifier="field", class_names="toyworld")),
        }  # fmt: skip
        for s in (*seg.values(), *bil.values()):
            s._ensure_ready()  # loading is not the rows' time
        t0 = time.perf_counter()
        maps = cached_maps(seg["probe"], images, seeds, args.cache or None, settings_tag(plain, args.seed))
        notes["emerdiff_maps_s_here"] = time.perf_counter() - t0
        labelled_images, labelled_targets, labelled_seeds = scenes(
            args.num_labelled, args.seed, LABELLED_START
        )
        labelled_maps = bil["probe"].score_maps(labelled_images, seeds=labelled_seeds)
        mask_namers = {
            "mask prototypes": mask_prototypes(labelled_maps, labelled_targets, c),
            "mask linear": mask_linear(labelled_maps, labelled_targets, probe),
        }
        coarse = {
            "field": field_coarse(targets, args.field_noise, args.seed, 1, c),
            "field2x2": field_coarse(targets, args.field_noise, args.seed, 2, c),
        }
        score = Scorer(c, args.boundary_tolerance)
        fresh = [m for m in maps if "reused_from" not in m.timings]
        notes["score_maps_s_per_image"] = sum(sum(m.timings.values()) for m in fresh) / max(
            1, sum(len(m.images) for m in fresh)
        )
        notes["score_maps_fresh_scenes"] = sum(len(m.images) for m in fresh)
        emerdiff_s = notes["score_maps_s_per_image"]
        for b, m in enumerate(maps):
            rows = slice(b * BATCH, b * BATCH + len(m.images))
            target, batch_keys, batch_seeds = targets[rows], keys[rows], seeds[rows]
            t0 = time.perf_counter()
            lowres_maps = bil["probe"].score_maps(m.images, seeds=batch_seeds)
            lowres_s = time.perf_counter() - t0
            # the difference maps as each refine setting leaves them (the diagnostics' masks; computed once)
            masks_of = {"none": m.scores}
            for src in ("probe", "field", "field2x2"):
                cls = "probe" if src == "probe" else "field"
                prefix = "" if src == "probe" else f"{src}_"
                batch_coarse = None if src == "probe" else decode_coarse(coarse[src][rows], batch_keys, c)
                for refine in ("none", "pamr"):
                    suffix = "" if refine == "none" else "+pamr"
                    for name, segmenter, source, base_s in (
                        ("bilinear", bil[cls], lowres_maps, lowres_s),
                        ("emerdiff", seg[cls], m, emerdiff_s * len(m.images)),
                    ):
                        segmenter.config = dataclasses.replace(segmenter.config, refine=refine)
                        t0 = time.perf_counter()
                        result = segmenter.label_maps(source, (SIZE, SIZE), coarse=batch_coarse)
                        seconds = base_s + time.perf_counter() - t0
                        row = f"{src}_{name}{suffix}" if name == "bilinear" else f"{prefix}{name}{suffix}"
                        score.add(row, result.labels, target, seconds)
                        if name != "emerdiff":
                            continue
                        # the diagnostics re-run the product's steps: they must give its labels first
                        if refine not in masks_of:
                            masks_of[refine] = segmenter._refine(m.scores, m.images, lambda _: None)
                        probe_or_none = probe if cls == "probe" else None
                        rule = _naming_rule(segmenter, m, result.class_scores, probe_or_none)
                        again = named_variant(segmenter, m, rule, masks_of[refine], refine != "none")
                        assert torch.equal(again, result.labels), f"{row}: method steps ≠ label_maps"
                        diagnostics = _diagnostics(
                            segmenter, m, result, cls, probe, mask_namers, masks_of, refine
                        )
                        for tag, pred in diagnostics.items():
                            score.add(f"{prefix}{name}{suffix}[{tag}]", pred, target, seconds)
                        if src == "probe":
                            masks = masks_of[refine].argmax(1)
                            named = method.name_masks(masks, oracle_names(masks, target, k, c))
                            score.add(f"oracle_emerdiff{suffix}", named, target, float("nan"))
            print(f"  scored scenes {rows.start}-{rows.stop - 1}", flush=True)
        if args.verify:
            seg["probe"].config = dataclasses.replace(seg["probe"].config, refine="pamr")
            first = maps[0]
            t0 = time.perf_counter()
            direct = seg["probe"].segment(first.images, seeds=seeds[: len(first.images)]).labels
            cached = seg["probe"].label_maps(first, (SIZE, SIZE)).labels
            notes["verify"] = {
                "scenes": len(first.images),
                "equal_pixel_fraction": float((direct == cached).float().mean()),
                "seconds": time.perf_counter() - t0,
            }
    results = score.results()
    pairs = [
        (f"{p}{row}", f"{p or 'probe_'}bilinear{base}")
        for p in ("", "field_", "field2x2_")
        for row in ("emerdiff", "emerdiff+pamr")
        for base in ("", "+pamr")
    ]
    return {
        "rows": results,
        "deltas": score.bootstrap(pairs, args.bootstrap, args.seed),
        "notes": notes,
        "probe_fit": notes["fit_probe"],
    }


def _naming_rule(segmenter, maps, class_scores, probe):
    """`mean_of(masks)` as label_maps names masks: the probe on the mask embeddings, else the mean score."""
    from emerdiff_pl import method

    if probe is not None:
        return lambda masks: segmenter.mask_scores(maps, class_scores, masks)
    return lambda masks: method.mask_mean_scores(class_scores, masks, segmenter.config.num_masks)


def _diagnostics(segmenter, maps, result, cls, probe, mask_namers, masks_of, refine) -> dict[str, Any]:
    """Labels of the diagnostic namings of one batch (module docstring); `masks_of[refine]`: the difference maps
    as `refine` leaves them."""
    from emerdiff_pl import method

    rule = _naming_rule(segmenter, maps, result.class_scores, probe if cls == "probe" else None)
    refined = refine != "none"
    out = {}
    if refined:
        out["no diff-map refine"] = named_variant(segmenter, maps, rule, masks_of["none"], True)
        out["no class-map refine"] = named_variant(segmenter, maps, rule, masks_of[refine], False)
    if cls == "probe":
        k = segmenter.config.num_masks
        mean_score = lambda masks: method.mask_mean_scores(result.class_scores, masks, k)  # noqa: E731
        out["mean score"] = named_variant(segmenter, maps, mean_score, masks_of[refine], refined)
        for tag, namer in mask_namers.items():
            by_embedding = lambda masks, namer=namer: namer(maps.embeddings)  # noqa: E731
            out[tag] = named_variant(segmenter, maps, by_embedding, masks_of[refine], refined)
    return out


def machine() -> str:
    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} CPUs, 1 torch thread, {time.strftime('%Y-%m-%d')}"


def print_report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    rows = results["rows"]
    print(
        f"\ntoy world, seed {args.seed}: probe fit on {args.num_labelled} labelled scenes, {args.num_images} "
        f"held-out scenes, K {args.num_masks}; {machine()}"
    )
    for key, value in results["notes"].items():
        print(f"  {key}: {value}")
    width = max(len(r) for r in rows) + 2
    cols = [
        ("mIoU", "miou"),
        ("objects", "object_miou"),
        ("pix acc", "pixel_accuracy"),
        (f"BF@{args.boundary_tolerance}", "boundary_f"),
        ("s/image", "seconds_per_image"),
    ]
    print("\n" + f"{'row':<{width}}" + "".join(f"{h:>10}" for h, _ in cols))
    for name, r in rows.items():
        print(f"{name:<{width}}" + "".join(f"{r[key]:>10.2f}" for _, key in cols))
    print(
        f"\nnamed mIoU differences, the 5–95 % interval of {args.bootstrap} bootstrap resamples of the scenes, "
        "and the fraction of resamples where the row is ahead"
    )
    for pair, (point, lo, hi, ahead) in results["deltas"].items():
        print(f"  {pair:<{2 * width}} {point:+7.2f}  [{lo:+6.2f}, {hi:+6.2f}]  {ahead:5.2f}")
    print(" ".join(f"{name.replace(' ', '_')}={r['miou']:.2f}" for name, r in rows.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    p.add_argument(
        "--num-labelled", type=int, default=16, help="labelled scenes the probe is fit on (default 16)"
    )
    p.add_argument("--num-images", type=int, default=64, help="held-out scenes (default 64)")
    p.add_argument("--num-masks", type=int, default=32, help="EmerDiff's K (default 32, the named config's)")
    p.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "emerdiff-named-cache"),
        help="folder for the EmerDiff score maps, reused across runs and N ('': none; default: in the temp folder)",
    )
    p.add_argument("--compute-only", action="store_true", help="fill the cache and stop")
    p.add_argument(
        "--verify", action="store_true", help="rerun segment() on the first batch against the cache"
    )
    p.add_argument("--field-noise", type=float, default=0.2, help="fraction of field cells relabelled (0.2)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the scenes (1000)")
    p.add_argument("--boundary-tolerance", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    if args.compute_only:
        from emerdiff_pl.segmenter import EmerDiffSegmenter

        images, _, seeds = scenes(args.num_images, args.seed)
        settings = model_settings(args.num_masks)
        t0 = time.perf_counter()
        cached_maps(
            EmerDiffSegmenter(**settings),
            images,
            seeds,
            args.cache or None,
            settings_tag(settings, args.seed),
        )
        print(f"EmerDiff K = {args.num_masks}: {time.perf_counter() - t0:.1f} s", flush=True)
        return 0
    t0 = time.perf_counter()
    with torch.no_grad():
        results = run(args)
    results["notes"]["wall_s"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine(), **results}, f, indent=1, default=float)
    print_report(args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
