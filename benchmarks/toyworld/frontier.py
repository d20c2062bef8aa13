"""The speed/quality frontier of EmerDiff's fast knobs on held-out toy-world scenes (one run, one machine).

Each point is the toy default (evaluate.py's settings) with some knobs changed: ``difference: one_sided``
(K branches instead of 2K), ``steps_after_modulation`` (fewer denoising steps after t_m), a later t_m,
``num_masks``, the branch decoder (``taesd``: the shipped distilled toyworld-taesd; ``latent``: no decoder,
the difference of the latents), a refiner on the score maps, and the cheap ``lowres_bilinear`` baselines for
reference. For every point, on the same scenes:

- images/s relative to the default, timed side by side in this run: every setting segments the same
  ``--time-images`` scenes after a warm-up call, the settings interleaved, ``--time-rounds`` rounds, the
  fastest round kept; a refined point adds its refiner's time (the quality pass's times are reported too, but
  are not the ratio);
- dataset-wide and per-image Hungarian mIoU (evaluate.py's protocols), boundary F;
- agreement with the default: the fraction of pixels whose dataset-wide label matches the default's, after the
  best one-to-one matching of the two label sets (the same global-id table where K and masks are the same).

The Pareto set over (images/s, dataset-wide mIoU) is starred, and the Pareto set of EmerDiff's own settings
(the bilinear baselines left out: the candidates for a fast preset) marked ``+``. The last line is ``<name>=<dataset mIoU>@<speed>x``
for every point. Labels are cached per batch (``--cache``, evaluate.py's format: a default already labelled by
evaluate.py with the same cache is reused).

    python benchmarks/toyworld/frontier.py --num-images 32 --seed 0 --cache /tmp/toy-cache
    python benchmarks/toyworld/frontier.py --points default,one_sided+steps5 --num-images 8
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
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import evaluate  # noqa: E402  (benchmarks/toyworld/evaluate.py)

ONE_SIDED = {"difference": "one_sided"}
STEPS5 = {"steps_after_modulation": 5}
FAST = {**ONE_SIDED, **STEPS5}
# name -> (base method, overrides of evaluate.DEFAULT_MODEL_ARGS, refiner)
POINTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "default": ("emerdiff", {}, "none"),
    "one_sided": ("emerdiff", ONE_SIDED, "none"),
    "steps5": ("emerdiff", STEPS5, "none"),
    "steps3": ("emerdiff", {"steps_after_modulation": 3}, "none"),
    "one_sided+steps5": ("emerdiff", FAST, "none"),
    "one_sided+steps3": ("emerdiff", {**ONE_SIDED, "steps_after_modulation": 3}, "none"),
    "one_sided+steps5+taesd": (
        "emerdiff",
        {**FAST, "decoder": "taesd", "taesd_model": "toyworld-taesd"},
        "none",
    ),
    "one_sided+steps5+latent": ("emerdiff", {**FAST, "decoder": "latent"}, "none"),
    "one_sided+steps5+K12": ("emerdiff", {**FAST, "num_masks": 12}, "none"),
    "one_sided+steps5+tm481": ("emerdiff", {**FAST, "modulation_timestep": 481}, "none"),
    "one_sided+steps5+tm481+K12": ("emerdiff", {**FAST, "modulation_timestep": 481, "num_masks": 12}, "none"),
    "one_sided+steps5+tm481+taesd": (
        "emerdiff",
        {**FAST, "modulation_timestep": 481, "decoder": "taesd", "taesd_model": "toyworld-taesd"},
        "none",
    ),
    "one_sided+steps3+tm481": (
        "emerdiff",
        {**ONE_SIDED, "steps_after_modulation": 3, "modulation_timestep": 481},
        "none",
    ),
    "default+pamr": ("emerdiff", {}, "pamr"),
    "one_sided+steps5+pamr": ("emerdiff", FAST, "pamr"),
    "lowres_bilinear": ("lowres_bilinear", {}, "none"),
    "lowres_bilinear+pamr": ("lowres_bilinear", {}, "pamr"),
}


def point_args(name: str) -> tuple[str, dict[str, Any], dict[str, Any], str]:
    """(base method, segmenter model args, refiner options, refiner) of a point."""
    base, overrides, refiner = POINTS[name]
    model_args = {**evaluate.DEFAULT_MODEL_ARGS, **overrides}
    refine_args = {
        k.removeprefix("refine_"): model_args.pop(k) for k in evaluate.REFINE_OPTIONS if k in model_args
    }
    return base, model_args, refine_args, refiner


def setting_key(name: str) -> str:
    """The segmenter setting a point runs (points that differ only in the refiner share it)."""
    base, model_args, _, _ = point_args(name)
    return json.dumps([base, model_args], sort_keys=True)


def matched_agreement(a: list[np.ndarray], b: list[np.ndarray], n: int) -> float:
    """Fraction of pixels where label maps `a` and `b` (ids < n) agree after the best one-to-one id matching."""
    from scipy.optimize import linear_sum_assignment

    conf = np.zeros((n, n), dtype=np.int64)
    for x, y in zip(a, b, strict=True):
        np.add.at(conf, (x.ravel(), y.ravel()), 1)
    rows, cols = linear_sum_assignment(-conf)
    return float(conf[rows, cols].sum() / conf.sum())


def pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names not dominated in (speed ↑, quality ↑): no other point is at least as good in both and better in one."""
    out = set()
    for name, (speed, quality) in points.items():
        dominated = any(
            s >= speed and q >= quality and (s > speed or q > quality)
            for other, (s, q) in points.items()
            if other != name
        )
        if not dominated:
            out.add(name)
    return out


def time_points(args, names: list[str], images: np.ndarray) -> dict[str, float]:
    """Seconds per image of every point on the first `--time-images` scenes: each distinct segmenter setting runs
    once per round (the settings interleaved, the fastest round kept); a refined point adds its refiner's time on
    that run's score maps."""
    import torch

    from emerdiff_pl.refine import refine

    x = torch.from_numpy(images[: args.time_images]).permute(0, 3, 1, 2).float() / 255
    seeds = [args.seed * 1_000_003 + i for i in range(len(x))]
    segmenters = {}
    for name in names:
        base, model_args, _, _ = point_args(name)
        key = setting_key(name)
        if key not in segmenters:
            seg = evaluate._capturing_segmenter(pretrained=args.pretrained, method=base, **model_args)
            seg.segment(x[:1], seeds=seeds[:1])  # load + warm up
            segmenters[key] = seg
    best: dict[str, float] = {}
    for _ in range(args.time_rounds):
        for key, seg in segmenters.items():
            start = time.perf_counter()
            seg.segment(x, seeds=seeds)
            segment_s = time.perf_counter() - start
            for name in (n for n in names if setting_key(n) == key):
                _, _, refine_args, refiner = point_args(name)
                start = time.perf_counter()
                refine(seg.captured_scores, x, refiner, **refine_args).argmax(1)
                seconds = (segment_s + time.perf_counter() - start) / len(x)
                best[name] = min(best.get(name, float("inf")), seconds)
                print(f"  timed {name}: {seconds:.2f} s/image", flush=True)
    return best


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from emerdiff_pl.datasets import toyworld
    from emerdiff_pl.metrics import BoundaryFScore, hungarian_miou
    from emerdiff_pl.refine import refine

    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.points.split(",") if n.strip()]
    unknown = [n for n in names if n not in POINTS]
    if unknown:
        raise SystemExit(f"unknown points {unknown}; known: {', '.join(POINTS)}")
    if "default" not in names:
        names.insert(0, "default")
    scenes = list(toyworld.generate_scenes(args.num_images, args.seed, args.size))
    images = np.stack([s.image for s in scenes])
    targets = [s.labels for s in scenes]
    num_classes = toyworld.NUM_CLASSES
    guide = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    args.width = None  # evaluate.label_scenes' cache key: square scenes

    print(
        f"timing {len(names)} points on {args.time_images} scenes, {args.time_rounds} round(s) …", flush=True
    )
    seconds = time_points(args, names, images)
    labelled: dict[str, dict] = {}
    results: dict[str, Any] = {
        "seed": args.seed,
        "num_images": args.num_images,
        "time_images": args.time_images,
        "time_rounds": args.time_rounds,
        "threads": args.threads,
        "defaults": evaluate.DEFAULT_MODEL_ARGS,
        "points": {},
    }
    global_preds: dict[str, list[np.ndarray]] = {}
    # the default last: evaluate.py runs over the same scenes often label it into the same cache meanwhile
    for name in sorted(names, key=lambda n: n == "default"):
        base, model_args, refine_args, refiner = point_args(name)
        key = setting_key(name)
        if key not in labelled:
            labelled[key] = evaluate.label_scenes(args, base, model_args, images)
        out = labelled[key]
        labels = []
        for start in range(0, len(images), args.batch_size):
            scores = torch.from_numpy(np.stack(out["scores"][start : start + args.batch_size]))
            refined = refine(scores, guide[start : start + args.batch_size], refiner, **refine_args)
            labels += list(refined.argmax(1).numpy())
        tables = evaluate.global_ids(out["emb"], out["lowres"], num_classes, args.seed)
        global_preds[name] = [tab[lab] for tab, lab in zip(tables, labels, strict=True)]
        dataset = hungarian_miou(global_preds[name], targets, num_classes, num_clusters=num_classes)
        per_image = hungarian_miou(labels, targets, num_classes, protocol="per-image")
        bf = BoundaryFScore(num_classes, num_classes, tolerance=2)
        for gp, t in zip(global_preds[name], targets, strict=True):
            bf.update(torch.from_numpy(gp), torch.from_numpy(t.astype(np.int64)))
        results["points"][name] = {
            "method": base,
            "overrides": POINTS[name][1],
            "refine": refiner,
            "dataset_miou": dataset["miou"],
            "per_image_miou": per_image["miou"],
            "boundary_f": float(bf.compute()["boundary_f"]),
            "seconds_per_image": seconds[name],
            "quality_pass_seconds_per_image": sum(out["seconds"]) / len(images),
        }
    results["points"] = {n: results["points"][n] for n in names}
    default = results["points"]["default"]
    for name in names:
        r = results["points"][name]
        r["speedup"] = default["seconds_per_image"] / r["seconds_per_image"]
        r["miou_change"] = r["dataset_miou"] - default["dataset_miou"]
        r["agreement"] = matched_agreement(global_preds[name], global_preds["default"], num_classes)
    pts = results["points"]
    front = pareto({n: (r["speedup"], r["dataset_miou"]) for n, r in pts.items()})
    results["pareto"] = sorted(front, key=lambda n: pts[n]["speedup"])
    # among EmerDiff's own settings (the bilinear baselines left out): the choices of a fast preset
    own = pareto({n: (r["speedup"], r["dataset_miou"]) for n, r in pts.items() if r["method"] == "emerdiff"})
    results["pareto_emerdiff"] = sorted(own, key=lambda n: pts[n]["speedup"])
    return results


def print_report(results: dict[str, Any]) -> None:
    points = results["points"]
    print(
        f"\ntoy-world frontier, seed {results['seed']}, {results['num_images']} held-out scenes; speed timed on "
        f"{results['time_images']} scenes side by side ({results['threads']} thread(s)); * = Pareto set, "
        "+ = Pareto set of the EmerDiff settings alone"
    )
    width = max(len(n) for n in points) + 3
    cols = ["s/image", "speed ×", "dataset mIoU", "Δ", "per-image", "boundary F", "agree"]
    print(f"{'point':<{width}}" + "".join(f"{c:>13}" for c in cols))
    for name, r in sorted(points.items(), key=lambda kv: kv[1]["speedup"]):
        star = "*" if name in results["pareto"] else "+" if name in results["pareto_emerdiff"] else " "
        vals = [
            r["seconds_per_image"],
            r["speedup"],
            r["dataset_miou"],
            r["miou_change"],
            r["per_image_miou"],
            r["boundary_f"],
            100 * r["agreement"],
        ]
        print(f"{star} {name:<{width - 2}}" + "".join(f"{v:>13.2f}" for v in vals))
    print(" ".join(f"{n}={r['dataset_miou']:.2f}@{r['speedup']:.2f}x" for n, r in points.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--points",
        default=",".join(POINTS),
        help=f"comma-separated points (default all: {', '.join(POINTS)})",
    )
    p.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    p.add_argument("--num-images", type=int, default=32, help="held-out scenes for quality (default 32)")
    p.add_argument("--time-images", type=int, default=4, help="scenes each point is timed on (default 4)")
    p.add_argument(
        "--time-rounds", type=int, default=1, help="interleaved timing rounds, fastest kept (default 1)"
    )
    p.add_argument("--size", type=int, default=128, help="scene side in pixels (default 128)")
    p.add_argument("--batch-size", type=int, default=4, help="images per segment() call (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--pretrained", default=evaluate.DEFAULT_MODEL, help="diffusers folder (default toyworld-ldm)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--cache", default=None, help="label cache folder (evaluate.py's; reused across runs)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.num_images < 2 or args.time_images < 1 or args.time_images > args.num_images:
        raise SystemExit("need --num-images ≥ 2 and 1 ≤ --time-images ≤ --num-images")
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")
    print_report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
