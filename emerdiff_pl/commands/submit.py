"""``emerdiff-pl submit SCRIPT``: submit one of the slurm/ scripts, its job array sized from the input's shard count,
and ``merge-manifests`` chained after it (``--dependency=afterok``); print the job ids.

The scripts' settings come from the environment, as for ``sbatch slurm/<script>`` (INPUT or FOLDER, OUTPUT, CONFIG,
WEIGHTS, ...), and the submitted jobs inherit it. See slurm/README.md.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

from emerdiff_pl.paths import expand_urls, list_folder

MERGE_OPTIONS = [
    "--job-name=emerdiff-pl-merge",
    "--ntasks=1",
    "--cpus-per-task=1",
    "--mem=4G",
    "--time=02:00:00",
    "--output=emerdiff-pl-merge-%j.out",
    "--open-mode=append",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl submit",
        allow_abbrev=False,
        description="Submit slurm/array.sbatch (or array-cpu, ddp, ddp-cpu) with the array sized from the number "
        "of input shards (or files of FOLDER): one task per --shards-per-task shards; then submit "
        "`emerdiff-pl merge-manifests OUTPUT` to run after it when every task succeeded (--dependency=afterok; "
        "the merge job is dropped if a task fails: run merge-manifests by hand, it prints what to resubmit). "
        "Settings come from the environment as for the scripts: INPUT or FOLDER, OUTPUT, CONFIG, WEIGHTS. "
        "Run it from the repository's root.",
        epilog="Other options before `--` go to sbatch for the labelling job, written --option=value (e.g. --partition=gpu --time=4:00:00 "
        "--mem=32G); arguments after `--` go to emerdiff-pl predict (e.g. -- --model.num_masks 30). Site-wide "
        "options for every job, the merge job included, can live in the environment: SBATCH_PARTITION, "
        "SBATCH_ACCOUNT.",
    )
    parser.add_argument(
        "script", help="slurm/array.sbatch, slurm/array-cpu.sbatch, slurm/ddp.sbatch or slurm/ddp-cpu.sbatch"
    )
    parser.add_argument(
        "--shards-per-task",
        type=int,
        default=1,
        help="input shards (or files of FOLDER) per array task; the array has ceil(shards / this) tasks (default 1)",
    )
    parser.add_argument(
        "--max-running", type=int, default=None, help="at most this many array tasks at once (%%N)"
    )
    parser.add_argument("--no-merge", action="store_true", help="do not chain merge-manifests after the job")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the sbatch commands instead of running them"
    )
    return parser


def count_units(env: dict[str, str]) -> int:
    """How many units the scripts' input splits into: shards of INPUT, or files of FOLDER (as the data module)."""
    if env.get("FOLDER"):
        return len(list_folder(env["FOLDER"], all_files=True))
    if env.get("INPUT"):
        return len(expand_urls(env["INPUT"]))
    raise ValueError(
        "set INPUT to the input shards (e.g. INPUT='/data/in/shard-{000000..000999}.tar') or FOLDER"
    )


def _sbatch(command: list[str], env: dict[str, str], dry_run: bool, shown_env: list[str]) -> str:
    """Run sbatch --parsable and return the job id (in a dry run: print the command, return a placeholder)."""
    if dry_run:
        print(" ".join([*shown_env, *map(shlex.quote, command)]))
        return "<jobid>"
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"{shlex.join(command)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    """Submit the job (and the merge after it); print the job ids. Exit 2 on a usage error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args, sbatch_options = build_parser().parse_known_args(argv)
    env = dict(os.environ)
    script = Path(args.script)
    if not script.is_file():
        raise FileNotFoundError(
            f"no script {args.script!r} (run from the repository's root: slurm/array.sbatch)"
        )
    if not env.get("OUTPUT"):
        raise ValueError("set OUTPUT to the output folder, e.g. OUTPUT=/data/pseudo-sd14")
    if args.shards_per_task < 1:
        raise ValueError(f"--shards-per-task must be ≥ 1, got {args.shards_per_task}")
    units = count_units(env)
    if units == 0:
        raise ValueError(f"no input: {env.get('FOLDER') or env.get('INPUT')!r} matches no shard or file")
    shown = [
        f"{k}={shlex.quote(env[k])}" for k in ("INPUT", "FOLDER", "OUTPUT", "CONFIG", "WEIGHTS") if env.get(k)
    ]
    command = ["sbatch", "--parsable", *sbatch_options]
    if "ddp" in script.name:
        what = f"DDP job over {units} input units"
    else:
        tasks = math.ceil(units / args.shards_per_task)
        env["ARRAY_COUNT"] = str(tasks)  # resubmitted subsets keep this count
        shown.insert(0, f"ARRAY_COUNT={tasks}")
        limit = f"%{args.max_running}" if args.max_running else ""
        command.append(f"--array=0-{tasks - 1}{limit}")
        what = f"array of {tasks} tasks over {units} input units ({args.shards_per_task} per task)"
    job = _sbatch([*command, str(script), *overrides], env, args.dry_run, shown)
    print(f"{what}: job {job}")
    if not args.no_merge:
        merge = [
            "sbatch",
            "--parsable",
            f"--dependency=afterok:{job}",
            "--kill-on-invalid-dep=yes",
            *MERGE_OPTIONS,
            f"--wrap=emerdiff-pl merge-manifests {shlex.quote(env['OUTPUT'])}",
        ]
        merge_job = _sbatch(merge, env, args.dry_run, [])
        print(f"merge-manifests {env['OUTPUT']}: job {merge_job}, after job {job} if every task succeeds")
    if not args.dry_run:
        print(
            f"follow with: squeue -j {job}; afterwards: emerdiff-pl merge-manifests {shlex.quote(env['OUTPUT'])}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
