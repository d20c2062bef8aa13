"""``emerdiff-pl convert <dataset>``: ground-truth shards (``<key>.jpg`` or ``.png`` + ``<key>.gt.png``) for evaluate.

One parser per dataset; the work is the dataset module's (:mod:`emerdiff_pl.datasets`). Nothing heavy is imported
before a dataset is chosen, so ``convert --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from emerdiff_pl.commands import split_command


def _output_options(parser: argparse.ArgumentParser, shard_size: int, prefix: str | None = None) -> None:
    """The options of every converter's output: ``--out``, ``--shard-size`` and (with its default) ``--prefix``."""
    parser.add_argument("--out", required=True, help="output folder for the shards and info.json")
    parser.add_argument(
        "--shard-size", type=int, default=shard_size, help=f"samples per shard (default {shard_size})"
    )
    if prefix is not None:
        parser.add_argument("--prefix", default=None, help=f"shard name prefix (default {prefix})")


def _toyworld_parser() -> argparse.ArgumentParser:
    from emerdiff_pl.datasets.toyworld import CLASS_NAMES, DEFAULT_SIZE

    parser = argparse.ArgumentParser(
        prog="emerdiff-pl convert toyworld",
        description=(
            "Write procedural toy-world scenes with ground truth as WebDataset shards "
            f"(<key>.png, <key>.gt.png with class ids {', '.join(f'{i}={n}' for i, n in enumerate(CLASS_NAMES))})."
        ),
    )
    _output_options(parser, shard_size=1000)
    parser.add_argument("--num-images", type=int, default=100, help="number of scenes (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; scene i depends only on (seed, i)")
    parser.add_argument(
        "--start",
        type=int,
        default=0,
        help="index of the first scene (default 0): --start 100000 gives scenes disjoint from 0 … 99999, e.g. "
        "labelled scenes for fit-probe beside held-out ones",
    )
    parser.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help=f"image side in pixels (default {DEFAULT_SIZE})"
    )
    return parser


def toyworld(argv: list[str]) -> int:
    """``convert toyworld``: generated scenes, no download."""
    from emerdiff_pl.datasets.toyworld import write_shards

    args = _toyworld_parser().parse_args(argv)
    paths = write_shards(
        args.out, args.num_images, args.seed, size=args.size, shard_size=args.shard_size, start=args.start
    )
    print(f"wrote {args.num_images} scenes to {len(paths)} shard(s) in {args.out}")
    return 0


def _cocostuff27_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl convert cocostuff27",
        description="Write COCO-Stuff-27 ground truth as WebDataset shards (<key>.jpg, <key>.gt.png with the "
        "27 coarse classes of STEGO/PiCIE, 255 = ignore). Images are copied byte for byte (re-encoded only "
        "when an EXIF rotation would misalign them with the label map).",
    )
    parser.add_argument("--images", required=True, help="folder of COCO images, e.g. coco/val2017")
    parser.add_argument(
        "--annotations",
        required=True,
        help="folder of COCO-Stuff label maps (stuffthingmaps_trainval2017/val2017: <image id>.png, fine ids)",
    )
    _output_options(parser, shard_size=1000, prefix="cocostuff27[-curated]")
    parser.add_argument(
        "--curated",
        default=None,
        help="optional image-id list (one id per line), e.g. STEGO's Coco164kFull_Stuff_Coarse_7.txt (2175 val images)",
    )
    return parser


def cocostuff27(argv: list[str]) -> int:
    """``convert cocostuff27``: COCO-Stuff 164k → 27 coarse classes."""
    from emerdiff_pl.datasets.cocostuff27 import convert

    args = _cocostuff27_parser().parse_args(argv)
    shards, samples, stats, unlabelled = convert(
        args.images, args.annotations, args.out, args.curated, args.shard_size, args.prefix
    )
    if unlabelled:
        print(
            f"warning: {len(unlabelled)} image(s) without a label map skipped, e.g. {unlabelled[:5]}",
            file=sys.stderr,
        )
    print(f"wrote {samples} samples to {len(shards)} shard(s) in {args.out} ({stats})")
    return 0


def _cityscapes27_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl convert cityscapes27",
        description="Write Cityscapes-27 ground truth as WebDataset shards (<key>.jpg, <key>.gt.png with "
        "labelIds 7–33 → 0–26, everything else 255 = ignore). Keys are the Cityscapes names, e.g. "
        "frankfurt_000000_000294.",
    )
    parser.add_argument("--root", required=True, help="Cityscapes root holding leftImg8bit/ and gtFine/")
    _output_options(parser, shard_size=500, prefix="cityscapes27-<split>")
    parser.add_argument(
        "--split", default="val", choices=["train", "val", "test"], help="split (default val)"
    )
    parser.add_argument(
        "--jpeg-quality", type=int, default=95, help="JPEG quality of the images (default 95)"
    )
    return parser


def cityscapes27(argv: list[str]) -> int:
    """``convert cityscapes27``: Cityscapes fine labelIds 7–33 → 0–26."""
    from emerdiff_pl.datasets.cityscapes27 import convert

    args = _cityscapes27_parser().parse_args(argv)
    if not 1 <= args.jpeg_quality <= 100:
        print(f"error: --jpeg-quality must be in 1..100, got {args.jpeg_quality}", file=sys.stderr)
        return 2
    if args.split == "test":
        print(
            "warning: Cityscapes test labels are withheld (all void): every pixel will be 255",
            file=sys.stderr,
        )
    shards, samples = convert(
        args.root, args.out, args.split, args.shard_size, args.jpeg_quality, args.prefix
    )
    print(f"wrote {samples} samples to {len(shards)} shard(s) in {args.out}")
    return 0


# name → (the converter's main, one line for the usage)
CONVERTERS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "cocostuff27": (cocostuff27, "COCO-Stuff 164k → 27 coarse classes (STEGO/PiCIE)"),
    "cityscapes27": (cityscapes27, "Cityscapes fine labelIds 7–33 → 0–26"),
    "toyworld": (toyworld, "procedural scenes with ground truth (no download)"),
}


def _usage() -> str:
    lines = ["usage: emerdiff-pl convert {" + ",".join(CONVERTERS) + "} [--help] ...", "", "datasets:"]
    lines += [f"  {name:<14}{doc}" for name, (_, doc) in CONVERTERS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``convert <dataset> ...`` to the dataset's converter; 2 for an unknown dataset."""
    picked = split_command(
        list(sys.argv[1:] if argv is None else argv), CONVERTERS, _usage(), "error: unknown dataset"
    )
    if isinstance(picked, int):
        return picked
    name, rest = picked
    return int(CONVERTERS[name][0](rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
