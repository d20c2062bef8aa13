"""Run the toy-world measurement for several models and settings in one process (one GPU lease, or one CPU job),
appending each result to a JSON-lines file and printing a table at the end.

    python benchmarks/toyworld/sweep.py --device cuda --num-images 48 --out sweep.jsonl \\
        --models A=/path/a B=/path/b --ablate A

Rows: every model on seeds 0 and 1 with the defaults (the headline), then, for the models named by --ablate,
one row per setting in ABLATIONS (seed 0). Each row is exactly what `evaluate.py` computes for the same
arguments (`--model.<name> <value>` overrides); float32 on every device so CPU and GPU rows are comparable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import evaluate  # noqa: E402

LAYER = "up_blocks.{}.attentions.{}.transformer_blocks.0.attn2"
ABLATIONS: list[tuple[str, dict]] = [  # the order is the priority when a GPU lease runs short
    (
        "8×8 level (up_blocks.1), K 8",
        {"feature_layer": LAYER.format(1, 0), "modulated_layer": LAYER.format(1, 2), "num_masks": 8},
    ),
    ("K 12", {"num_masks": 12}),
    ("K 20", {"num_masks": 20}),
    ("λ 40", {"modulation_strength": 40.0}),
    ("injection off", {"attention_injection": False}),
    ("σ 0", {"gaussian_sigma": 0.0}),
    ("one-sided difference", {"difference": "one_sided"}),
    ("5 steps after t_m", {"steps_after_modulation": 5}),
    ("t_m 481", {"modulation_timestep": 481}),
    ("λ 5", {"modulation_strength": 5.0}),
    ("σ 4", {"gaussian_sigma": 4.0}),
    ("t_m 181", {"modulation_timestep": 181}),
    ("modulate up_blocks.2 attentions.1", {"modulated_layer": LAYER.format(2, 1)}),
    ("λ 20", {"modulation_strength": 20.0}),
    ("K 6", {"num_masks": 6}),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="NAME=diffusers-folder ...")
    p.add_argument("--ablate", nargs="*", default=[], help="model names to run the ablations on")
    p.add_argument("--num-images", type=int, default=48)
    p.add_argument("--ablation-images", type=int, default=None, help="default: --num-images")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="run only the ablations with these labels")
    p.add_argument("--examples", default=None, help="example grid of the first model's seed-0 headline")
    p.add_argument("--out", default="sweep.jsonl")
    p.add_argument(
        "--base",
        default="{}",
        help="JSON settings applied to every row before its own overrides (evaluate.py's defaults otherwise)",
    )
    args = p.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.models)
    base = json.loads(args.base)

    jobs = [(name, seed, "defaults", {}) for name in models for seed in args.seeds]
    for name in args.ablate:
        jobs += [
            (name, 0, label, ov) for label, ov in ABLATIONS if args.only is None or label in set(args.only)
        ]
    rows = []
    for i, (name, seed, label, overrides) in enumerate(jobs):
        headline = label == "defaults"
        ns = evaluate.build_parser().parse_args([])
        ns.pretrained, ns.seed, ns.device = models[name], seed, args.device
        ns.num_images = args.num_images if headline else (args.ablation_images or args.num_images)
        ns.batch_size, ns.threads = args.batch_size, args.threads
        ns.examples = args.examples if (headline and seed == 0 and i == 0) else None
        start = time.time()
        try:
            res = evaluate.run(ns, {"dtype": "float32", **base, **overrides})
            row = {
                "model": name,
                "seed": seed,
                "setting": label,
                "overrides": overrides,
                "base": base,
                "images": ns.num_images,
                "same_lowres_masks": res["same_lowres_masks"],
                "wall_s": round(time.time() - start, 1),
            }
            for method in evaluate.METHODS:
                r = res[method]
                row[method] = {
                    k: r[k] for k in ("dataset_miou", "per_image_miou", "oracle_miou", "seconds_per_image")
                }
                row[method]["iou_per_class"] = r["dataset_iou_per_class"]
        except Exception as err:  # record it and go on with the other rows
            row = {"model": name, "seed": seed, "setting": label, "error": f"{type(err).__name__}: {err}"}
            row["trace"] = traceback.format_exc()[-1500:]
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}, default=float), flush=True)

    print(
        "\nmodel | seed | setting | images | EmerDiff dataset | bilinear dataset | Δ | EmerDiff per-image | "
        "bilinear per-image | EmerDiff oracle | bilinear oracle"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['model']} | {r['seed']} | {r['setting']} | ERROR {r['error']}")
            continue
        e, b = r["emerdiff"], r["lowres_bilinear"]
        print(
            f"{r['model']} | {r['seed']} | {r['setting']} | {r['images']} | {e['dataset_miou']:.2f} | "
            f"{b['dataset_miou']:.2f} | {e['dataset_miou'] - b['dataset_miou']:+.2f} | {e['per_image_miou']:.2f} | "
            f"{b['per_image_miou']:.2f} | {e['oracle_miou']:.2f} | {b['oracle_miou']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
