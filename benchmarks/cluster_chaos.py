"""Cluster chaos, bounded and local: kill -9 at random points, SIGTERM to the process group, the same task started
twice, and array tasks running side by side, each followed by reruns until the task is done; then checks that every
input was labelled exactly once, that no visible shard is torn, and that merge-manifests agrees.

    python benchmarks/cluster_chaos.py [--kills 6] [--images 48] [--seed 0] [--work /tmp/chaos]

It runs the real CLI (``emerdiff-pl predict`` through LightningCLI) with the tests' fast stand-in segmenter
(tests/conftest.py ``ColourQuantizer``), so it needs no model weights; a run takes a few minutes on a 2-core CPU,
most of it process start-up. Exit status 0 when every check holds, 1 otherwise (the failed checks are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT))

from conftest import FAKE_CLI, make_shards, subprocess_env  # noqa: E402


def _command(cli: Path, inputs: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(cli), "predict", "--data.urls", inputs, "--writer.output_dir", str(out),
            "--data.batch_size", "1", "--data.num_workers", "2", "--writer.samples_per_shard", "3",
            "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip


def _start(command: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("a")
    return subprocess.Popen(
        command, env=subprocess_env(), stdout=handle, stderr=handle, start_new_session=True
    )


def _wait_started(out: Path, proc: subprocess.Popen, labelling: bool = False, timeout: float = 300) -> bool:
    """Until the run holds its task lock (set-up done), or with ``labelling`` writes a shard; False if it ended."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if labelling and (list(out.glob(".*.tar.tmp")) or list(out.glob("*.tar"))):
            return True
        if not labelling and any(p.stat().st_size > 0 for p in out.glob(".*.lock")):
            return True
        time.sleep(0.05)
    return False


def _finish(command: list[str], log: Path, timeout: float = 600) -> int:
    proc = _start(command, log)
    return proc.wait(timeout=timeout)


def _published(out: Path) -> list[str]:
    from emerdiff_pl.shardio import iter_raw_samples

    shards = sorted(out.glob("*.tar"))
    if not shards:
        return []
    fields = {"seg.png", "lowres.png", "emb.npy", "json"}
    keys = []
    for sample in iter_raw_samples([str(s) for s in shards]):
        if not fields <= set(sample):
            raise AssertionError(f"torn sample {sample['__key__']} in {sample['__url__']}")
        keys.append(sample["__key__"])
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=6, help="kill -9 rounds (default 6)")
    parser.add_argument("--images", type=int, default=48, help="input images, in 4 shards (default 48)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument(
        "--work", default=None, help="work folder (default: a fresh temporary one, removed after)"
    )
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="emerdiff-chaos-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cli = work / "fake_cli.py"
    cli.write_text(FAKE_CLI.format(tests=str(TESTS)))
    per_shard = max(1, args.images // 4)
    keys = make_shards(work / "in", num_shards=4, per_shard=per_shard, size=16)
    inputs = str(work / "in" / "in-{000000..000003}.tar")
    log = work / "runs.log"
    problems: list[str] = []
    start = time.perf_counter()

    # 1. kill -9 at random points of set-up, labelling and shard commits, rerunning each time
    out = work / "kill9"
    for round_ in range(args.kills):
        proc = _start(_command(cli, inputs, out, "--model.delay", "0.3"), log)
        phase = "set-up" if round_ % 3 == 0 else "labelling"  # kill during start-up, labelling and commits
        if not _wait_started(out, proc, labelling=phase == "labelling"):
            break  # finished before it could be killed
        time.sleep(rng.uniform(0.0, 2.0 if phase == "set-up" else 6.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        temp = len(list(out.glob(".*.tar.tmp")))
        print(
            f"kill -9 round {round_ + 1} ({phase}): {len(_published(out))} samples published, {temp} temp files"
        )
    if _finish(_command(cli, inputs, out), log) != 0:
        problems.append("kill -9: the final rerun failed")
    _check(out, keys, "kill -9", problems)

    # 2. SIGTERM to the whole process group (preemption, scancel): exit 143, summary, no temp file
    out = work / "sigterm"
    proc = _start(_command(cli, inputs, out, "--model.delay", "0.2"), log)
    if _wait_started(out, proc):
        time.sleep(rng.uniform(0.5, 2.0))
        os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=300)
    summaries = [json.loads(p.read_text()) for p in out.glob("summary-*.json")]
    if code != 143 or not summaries or list(out.glob(".*.tmp")):
        problems.append(
            f"SIGTERM: exit {code}, {len(summaries)} summaries, temp files {list(out.glob('.*.tmp'))}"
        )
    if _finish(_command(cli, inputs, out), log) != 0:
        problems.append("SIGTERM: the rerun failed")
    _check(out, keys, "SIGTERM", problems)

    # 3. the same task started twice at once: one labels, the other is refused; then array tasks side by side
    out = work / "twice"
    first = _start(_command(cli, inputs, out, "--model.delay", "0.1"), log)
    second = _start(_command(cli, inputs, out, "--model.delay", "0.1"), log)
    codes = sorted([first.wait(timeout=600), second.wait(timeout=600)])
    if codes[0] != 0 or codes[1] == 0:
        problems.append(f"same task twice: exit codes {codes} (want one success and one refusal)")
    _check(out, keys, "same task twice", problems)
    out = work / "array"
    tasks = [
        _start(_command(cli, inputs, out, "--data.array_index", str(i), "--data.array_count", "2"), log)
        for i in range(2)
    ]
    if any(t.wait(timeout=600) != 0 for t in tasks):
        problems.append("array tasks side by side: a task failed")
    _check(out, keys, "array tasks", problems)

    print(f"{time.perf_counter() - start:.0f} s; log: {log}")
    for problem in problems:
        print(f"FAILED: {problem}")
    if not problems:
        print("all chaos checks passed: every input labelled exactly once, no torn shard, merge agrees")
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


def _check(out: Path, keys: list[str], what: str, problems: list[str]) -> None:
    from emerdiff_pl.manifest import merge

    try:
        published = _published(out)
    except AssertionError as err:
        problems.append(f"{what}: {err}")
        return
    if sorted(published) != sorted(keys):
        missing = sorted(set(keys) - set(published))
        doubled = sorted(k for k in set(published) if published.count(k) > 1)
        problems.append(
            f"{what}: {len(missing)} keys missing {missing[:3]}, {len(doubled)} doubled {doubled[:3]}"
        )
    summary = merge(out, clean_temp=True)
    if summary["duplicate_keys"] or summary["unfinished_array_tasks"] or summary["samples"] != len(keys):
        problems.append(f"{what}: merge-manifests disagrees: {json.dumps(summary)[:300]}")
    print(f"{what}: {len(published)} / {len(keys)} samples, merge: {summary['samples']} samples", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
