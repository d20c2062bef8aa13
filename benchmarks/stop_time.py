"""How long a clean stop takes: SIGTERM to a labelling ``emerdiff-pl predict`` (its whole process group, as
``scancel`` and preemption send it) until the process has exited, against the batch size.

    python benchmarks/stop_time.py [--config configs/tiny.yaml] [--batch-sizes 1 2 4 8] [--trials 3]

A run checks for SIGTERM before every U-Net call and decode (the batch in flight is dropped), so the stop waits
for one call, not for the batch: it must fit SLURM's grace period before SIGKILL (KillWait, 30 s by default). Prints, per batch size, the time per image and the
stop times (mean and max over the trials, each signal sent at a random point of the run). No weights needed with
the tiny config; a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_shards, subprocess_env  # noqa: E402


def one_stop(
    config: str, inputs: str, out: Path, batch_size: int, rng: random.Random, num_workers: int = 1
) -> tuple[float, float, float]:
    """Seconds from SIGTERM to the summary (shard closed: a SIGKILL from then on loses nothing) and to the exit,
    and seconds per image, of one run signalled while labelling."""
    command = ["emerdiff-pl", "predict", "--config", config, "--data.urls", inputs, "--writer.output_dir", str(out),
               "--data.batch_size", str(batch_size), "--data.num_workers", str(num_workers), "--writer.samples_per_shard", "1",
               "--trainer.enable_progress_bar", "false"]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    while proc.poll() is None and not list(out.glob("*.tar")):  # labelling: the first image is written
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 2.0))
    start, wall = time.perf_counter(), time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=600)
    stop = time.perf_counter() - start
    if proc.returncode != 143:
        raise RuntimeError(
            f"expected exit 143 after SIGTERM, got {proc.returncode}: {proc.stderr.read()[-2000:]}"
        )
    path = next(out.glob("summary-*.json"))
    summary = json.loads(path.read_text())
    return path.stat().st_mtime - wall, stop, summary["segment_seconds"] / max(summary["done"], 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--images", type=int, default=64, help="input images (one shard)")
    parser.add_argument("--num-workers", type=int, default=1, help="dataloader workers (default 1)")
    args = parser.parse_args(argv)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="emerdiff-stop-") as work:
        make_shards(Path(work) / "in", num_shards=1, per_shard=args.images, size=32)
        inputs = str(Path(work) / "in" / "in-000000.tar")
        print(
            f"{args.config}, {args.num_workers} dataloader worker(s), SIGTERM to the process group while "
            f"labelling; {os.cpu_count()} CPUs"
        )
        print(
            "seconds from SIGTERM to the summary written (shard closed) and to the process exit, mean / max"
        )
        print("batch  s/image  summary mean  summary max  exit mean  exit max")
        for batch_size in args.batch_sizes:
            closed, stops, per_image = [], [], []
            for trial in range(args.trials):
                out = Path(work) / f"out-{batch_size}-{trial}"
                summary, stop, seconds = one_stop(args.config, inputs, out, batch_size, rng, args.num_workers)
                closed.append(summary)
                stops.append(stop)
                per_image.append(seconds)
            print(
                f"{batch_size:5d}  {sum(per_image) / len(per_image):7.2f}  {sum(closed) / len(closed):12.2f}  "
                f"{max(closed):11.2f}  {sum(stops) / len(stops):9.2f}  {max(stops):8.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
