"""``emerdiff-pl merge-manifests OUTPUT_DIR``: one manifest, one failures file, and the array tasks to resubmit."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emerdiff_pl.manifest import merge

EXIT_COMPLETE = 0  # every task finished, every shard verified
EXIT_DUPLICATES = 1  # a key in two shards (duplicate input keys): an error that reruns cannot fix
EXIT_WORK_LEFT = (
    3  # tasks not finished or shards failing their checks: rerun the printed command, merge again
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl merge-manifests",
        description="Merge the per-task manifests / failures / summaries of a predict output folder into "
        "manifest.jsonl, failures.jsonl (inputs still unlabelled, and every duplicate input key) and summary.json, "
        "after verifying each shard's size and checksum against its manifest line; list the SLURM array tasks "
        "whose block no finished task covers, and print the command that resubmits them (the original array "
        "count, config and input, read from the folder).",
        epilog=f"Exit status: {EXIT_COMPLETE} complete; {EXIT_WORK_LEFT} work left (unfinished tasks, or shards "
        f"failing their checks: run the printed command, then merge again); {EXIT_DUPLICATES} a key appears in "
        "more than one shard (duplicate input keys; the shards and inputs are named); 2 usage errors.",
    )
    parser.add_argument("output_dir", help="the writer.output_dir of the predict runs")
    parser.add_argument(
        "--clean-temp",
        action="store_true",
        help="delete leftover .*.tar.tmp files of tasks that no running process holds",
    )
    parser.add_argument(
        "--no-checksum",
        action="store_true",
        help="check shard sizes only, not their SHA-256 (faster on very large outputs)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Merge, print what is done and what to resubmit; the exit status says which (see the parser's epilog)."""
    args = build_parser().parse_args(argv)
    summary = merge(args.output_dir, clean_temp=args.clean_temp, checksum=not args.no_checksum)
    print(f"{summary['shards']} shards, {summary['samples']} samples, {summary['failed']} failed inputs")
    print(f"wrote {Path(args.output_dir) / 'manifest.jsonl'}, failures.jsonl, summary.json")
    for name, problem in summary["bad_shards"].items():
        print(f"shard {name} failed its check ({problem}): left out; rerun its task to redo its samples")
    for name in summary["missing_shards"]:
        print(f"shard {name} is listed in a manifest but missing: rerun its task to redo its samples")
    if summary["tasks_without_summary"]:
        tasks = ",".join(str(i) for i in summary["tasks_without_summary"])
        print(f"array tasks that never wrote a summary (killed, or still running): {tasks}")
    if summary["temp_files"]:
        print(f"{len(summary['temp_files'])} temporary shard files remain (running or killed tasks)")
    if summary["duplicate_keys"]:
        print(f"error: {len(summary['duplicate_keys'])} keys appear in more than one shard:", file=sys.stderr)
        for key, copies in list(summary["duplicate_keys"].items())[:10]:
            where = "; ".join(f"{c['shard']} (input {c['input']})" for c in copies)
            print(f"  {key}: {where}", file=sys.stderr)
        return EXIT_DUPLICATES
    if summary["work_left"]:
        if "slurm/ddp" in summary["resubmit"]:
            print(
                "not finished: the DDP job (its finished ranks skip their work); rerun it from the repository's root:"
            )
        else:
            tasks = ",".join(str(i) for i in summary["unfinished_array_tasks"])
            count = summary["array_count"]
            print(f"not finished: array tasks {tasks} of {count}; resubmit them from the repository's root:")
        print(f"  {summary['resubmit']}")
        if "<" in summary["resubmit"]:
            print("(fill in the <...> values: this folder holds no config of the run to read them from)")
        print("(add the sbatch options you submitted with, e.g. --partition or --time; then merge again)")
        return EXIT_WORK_LEFT
    print("complete: every array task finished and every shard passed its check")
    return EXIT_COMPLETE


if __name__ == "__main__":
    raise SystemExit(main())
