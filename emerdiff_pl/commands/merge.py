"""``emerdiff-pl merge-manifests OUTPUT_DIR``: one manifest, one failures file, and the array tasks to resubmit."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emerdiff_pl.manifest import merge


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl merge-manifests",
        description="Merge the per-task manifests / failures / summaries of a predict output folder into "
        "manifest.jsonl, failures.jsonl (inputs still unlabelled, and every duplicate input key) and summary.json, "
        "after verifying each shard's size and checksum against its manifest line, and list the SLURM array "
        "tasks to rerun (resubmit them with sbatch --array=<list>).",
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
    """Merge, print what is done and what to resubmit; exit 1 when a key appears in more than one shard."""
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
    if summary["unfinished_array_tasks"]:
        tasks = ",".join(str(i) for i in summary["unfinished_array_tasks"])
        print(f"array tasks not finished: {tasks}  ->  sbatch --array={tasks} slurm/array.sbatch ...")
    if summary["temp_files"]:
        print(f"{len(summary['temp_files'])} temporary shard files remain (running or killed tasks)")
    if summary["duplicate_keys"]:
        print(f"error: {len(summary['duplicate_keys'])} keys appear in more than one shard:", file=sys.stderr)
        for key, copies in list(summary["duplicate_keys"].items())[:10]:
            where = "; ".join(f"{c['shard']} (input {c['input']})" for c in copies)
            print(f"  {key}: {where}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
