"""``emerdiff-pl demo``: the whole pipeline on the shipped toy-world model, on a CPU in a few minutes.

Generates held-out toy scenes with ground truth, labels them (``predict`` with ``configs/toyworld.yaml``), maps
the per-image masks to dataset-wide classes (``relabel``), scores them (``evaluate``, both protocols) and draws
a contact sheet (``show``). Each step is the subcommand a user would run, called in this process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toyworld.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl demo",
        description="Label a few generated toy scenes with the shipped toy model, end to end: scenes -> predict "
        "-> relabel -> evaluate -> show. Options not listed here go to predict (e.g. --model.num_masks 8).",
    )
    parser.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    parser.add_argument("--num-images", type=int, default=4, help="toy scenes to label (default 4)")
    parser.add_argument(
        "--seed", type=int, default=1000, help="scene seed; the model was trained on seed 12345"
    )
    parser.add_argument(
        "--config", default=str(REPO_CONFIG), help="predict config (default configs/toyworld.yaml)"
    )
    return parser


def _step(number: int, text: str) -> float:
    print(f"[{number}/5] {text}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code of the first step that fails, else 0."""
    from emerdiff_pl.cli import run_subcommand
    from emerdiff_pl.datasets import toyworld
    from emerdiff_pl.validation import UserError

    parser = build_parser()
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.num_images < 1:
        parser.error(f"--num-images must be ≥ 1, got {args.num_images}")
    if not Path(args.config).is_file():
        raise UserError(f"demo config {args.config} not found; pass --config path/to/toyworld.yaml")
    out = Path(args.out)
    start = _step(1, f"generating {args.num_images} toy scenes with ground truth -> {out / 'scenes'}")
    scenes = "::".join(toyworld.write_shards(out / "scenes", args.num_images, args.seed))
    labels_dir, relabelled = out / "labels", out / "relabelled"
    _step(2, "labelling them with the shipped toy model (predict; a CPU takes about a minute per image)")
    # one image per batch: the progress moves per image; labels do not depend on the batch
    code = run_subcommand(
        "predict",
        ["--config", args.config, "--data.urls", scenes, "--writer.output_dir", str(labels_dir),
         "--data.batch_size", "1", *overrides],
    )  # fmt: skip
    label_shards = sorted(str(p) for p in labels_dir.glob("*.tar"))
    if code or not label_shards:
        print(f"emerdiff-pl demo: no shards were written to {labels_dir}", file=sys.stderr)
        return code or 1
    classes = str(toyworld.NUM_CLASSES)
    steps = [
        (3, "mapping per-image masks to dataset-wide classes (relabel)", "relabel",
         ["--input", "::".join(label_shards), "--num-classes", classes, "--output", str(relabelled)]),
        (4, "scoring against the ground truth (evaluate, dataset-wide and per-image Hungarian mIoU)", "evaluate",
         ["--pred", str(relabelled), "--gt", scenes, "--num-classes", classes, "--class-names", "toyworld",
          "--protocol", "both", "--out", str(out / "evaluation")]),
        (5, "drawing the contact sheet (show)", "show",
         ["--input", str(relabelled), "--images", scenes, "--gt", scenes, "--class-names", "toyworld",
          "--out", str(out / "contact_sheet.png"), "--n", str(min(args.num_images, 8))]),
    ]  # fmt: skip
    for number, text, command, command_args in steps:
        _step(number, text)
        code = run_subcommand(command, command_args)
        if code:
            return code
    print(
        f"demo done in {time.perf_counter() - start:.0f} s: pseudo-labels in {labels_dir}, global classes in "
        f"{relabelled}, scores in {out / 'evaluation'}, picture {out / 'contact_sheet.png'}"
    )
    return 0


__all__ = ["build_parser", "main"]
