"""``emerdiff-pl relabel``: its options, parsed without importing torch so that ``--help`` is instant; the work
is :func:`emerdiff_pl.relabel.relabel_dataset`."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl relabel",
        description="Cluster the mask embeddings of a whole prediction dataset into C global classes (weighted "
        "by mask area, seeded k-means) and rewrite every <key>.seg.png / <key>.lowres.png with global ids. "
        "Output shards keep the input names and keys; DIR also gets centroids.npy and relabel.json. Named output "
        "(predict with model.classifier) already holds class ids: it is refused (exit 2), export it as it is.",
    )
    parser.add_argument(
        "--input", required=True, help="prediction shards, e.g. 'preds/shard-{000000..000099}.tar'"
    )
    parser.add_argument("--output", required=True, help="output folder (shards, centroids.npy, relabel.json)")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="number of global classes C (required unless --centroids)",
    )
    parser.add_argument(
        "--centroids",
        default=None,
        help="apply saved centroids (a previous run's centroids.npy) instead of fitting new ones; the "
        "normalisation of that run is read from the relabel.json beside it",
    )
    parser.add_argument(
        "--max-fit-masks",
        type=int,
        default=100_000,
        help="masks sampled (uniformly, seeded) to fit the centroids; all masks are assigned afterwards "
        "(default 100000; memory ≈ 2·D bytes per mask)",
    )
    parser.add_argument(
        "--n-init", type=int, default=4, help="k-means restarts, the lowest inertia wins (default 4)"
    )
    parser.add_argument(
        "--max-iter", type=int, default=300, help="k-means iterations per restart (default 300)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the sub-sample and of k-means (default 0)"
    )
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="L2-normalise embeddings before clustering (cosine k-means); default: raw Euclidean, as per image",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 …")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that rewrite shards in parallel (one input shard each; PNG encoding is the cost of the "
        "second pass). Default 1: in this process",
    )
    return parser


def named_output_problem(urls: str) -> str | None:
    """Why relabel must not run on ``urls``: named output (predict with ``model.classifier``) already holds
    class ids, which relabelling would scramble into clusters; None for per-image mask ids."""
    from emerdiff_pl.classifiers.names import output_class_names

    names = output_class_names(urls)
    if names is None:
        return None
    return (
        f"{urls!r} holds named output (class ids of {len(names)} classes: {', '.join(names[:8])}"
        f"{', …' if len(names) > 8 else ''}), not per-image mask ids: relabel is not needed. Export it "
        "(emerdiff-pl export) or evaluate it (emerdiff-pl evaluate) as it is"
    )


def main(argv: list[str] | None = None) -> int:
    """``emerdiff-pl relabel``: 0 on success; 2 for named output (nothing to relabel) or when neither
    --num-classes nor --centroids is usable."""
    args = build_parser().parse_args(argv)
    from emerdiff_pl.relabel import class_count_problem, relabel_dataset

    problem = named_output_problem(args.input) or class_count_problem(args.num_classes, args.centroids)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    report = relabel_dataset(
        args.input, args.output, args.num_classes, centroids=args.centroids, max_fit_masks=args.max_fit_masks,
        n_init=args.n_init, max_iter=args.max_iter, seed=args.seed, normalize=args.normalize,
        device=args.device, workers=args.workers,
    )  # fmt: skip
    empty = [c for c, masks in enumerate(report["masks_per_class"]) if masks == 0]
    if empty:
        print(f"warning: {len(empty)} global class(es) received no mask: {empty[:10]}", file=sys.stderr)
    print(
        f"relabelled {report['images']} images into {report['num_classes']} classes: "
        f"{len(report['output_shards'])} shard(s) in {os.path.abspath(args.output)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
