"""The slurm/ scripts under a real scheduler: a single-node SLURM cluster from Debian's packages, started by
slurm/local-cluster.sh for this module and stopped by pid after it. Every job is submitted with the commands of
slurm/README.md, from a folder that holds the repository's configs/ and slurm/ (as a user submits from the
repository's root), with the tiny config (seconds per image on a CPU).

Skipped where ``sbatch`` is missing or the cluster cannot start (not root, no munge); with
``EMERDIFF_SLURM_TESTS=required`` (what .ci/run sets) those are failures instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, make_shards

from emerdiff_pl.shardio import iter_raw_samples

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

LOCAL_CLUSTER = REPO / "slurm" / "local-cluster.sh"
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "DEADLINE",
}
SAMPLE_FIELDS = {"seg.png", "lowres.png", "emb.npy", "json"}
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
LOCKED = "this task is already running into the same output folder"


def _unavailable(reason: str) -> None:
    if os.environ.get("EMERDIFF_SLURM_TESTS") == "required":
        pytest.fail(f"SLURM tests required but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


class Cluster:
    """The running test cluster: where to submit from and the environment that reaches it."""

    def __init__(self, state: Path, submit_dir: Path):
        self.state, self.submit_dir = state, submit_dir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env.update(
            SLURM_CONF=str(state / "slurm.conf"),
            PYTHONPATH=os.pathsep.join(
                p for p in [str(REPO), env.get("PYTHONPATH", "")] if p
            ),  # this checkout
            HF_HUB_OFFLINE="1",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
        )
        self.env = env

    def sh(
        self, command: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """``command`` in bash, from the submit folder, as a user types it (``VAR=... sbatch ...``)."""
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=self.submit_dir,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{command!r} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def jobs(self, job: str) -> dict[str, dict[str, str]]:
        """Array task id (or job id) → scontrol's fields, for every task of ``job``."""
        out = self.sh(f"scontrol -o show job {job}", check=False).stdout
        jobs = {}
        for line in out.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            jobs[fields.get("ArrayTaskId") or fields["JobId"]] = fields
        return jobs

    def wait(self, job: str, timeout: float = 400) -> dict[str, dict[str, str]]:
        """Until every task of ``job`` has ended; its tasks' fields."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            jobs = self.jobs(job)
            if jobs and all(j["JobState"] in TERMINAL for j in jobs.values()):
                return jobs
            time.sleep(1)
        raise AssertionError(f"job {job} did not end in {timeout} s: {self.jobs(job)}\n{self.squeue()}")

    def squeue(self) -> str:
        return self.sh("squeue", check=False).stdout


@pytest.fixture(scope="module")
def cluster():
    missing = [
        name
        for name in ("sbatch", "slurmctld", "slurmd", "munged")
        if shutil.which(name, path=SEARCH_PATH) is None
    ]
    if missing:
        _unavailable(f"{', '.join(missing)} not installed (as root: slurm/local-cluster.sh install)")
    if os.geteuid() != 0:
        _unavailable("slurm/local-cluster.sh needs root to start the daemons")
    state = Path(tempfile.mkdtemp(prefix="emerdiff-slurm-"))
    submit_dir = state / "submit"
    submit_dir.mkdir()
    for name in (
        "configs",
        "slurm",
    ):  # submit "from the repository's root", with the logs kept out of the repo
        (submit_dir / name).symlink_to(REPO / name)
    ctld_port, slurmd_port = _free_port(), _free_port()
    while slurmd_port == ctld_port:
        slurmd_port = _free_port()
    ports = {"SLURMCTLD_PORT": str(ctld_port), "SLURMD_PORT": str(slurmd_port)}
    start = subprocess.run(
        ["bash", str(LOCAL_CLUSTER), "start", str(state)],
        env={**os.environ, **ports},
        capture_output=True,
        text=True,
        timeout=900,
    )
    if start.returncode != 0:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "stop", str(state)], capture_output=True, timeout=120)
        _unavailable(f"the local cluster did not start:\n{start.stderr[-3000:]}")
    try:
        yield Cluster(state, submit_dir)
    finally:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "stop", str(state)], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def _job_ids(text: str) -> list[str]:
    return re.findall(r"job (\d+)", text)


def _wait_for(condition, timeout: float, what: str, cluster: Cluster) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}\n{cluster.squeue()}")
        time.sleep(0.2)


def _check_exactly_once(out: Path, keys: list[str]) -> list[dict]:
    """Every input key in exactly one finished shard, every shard whole and listed by manifest.jsonl."""
    shards = sorted(out.glob("*.tar"))
    samples = list(iter_raw_samples([str(s) for s in shards]))
    assert all(set(s) >= SAMPLE_FIELDS for s in samples), "a torn sample in a finished shard"
    counts = Counter(s["__key__"] for s in samples)
    assert sorted(counts) == sorted(keys) and set(counts.values()) == {1}, counts
    merged = [json.loads(line) for line in (out / "manifest.jsonl").open()]
    assert sorted(m["shard"] for m in merged) == sorted(s.name for s in shards)
    assert sorted(k for m in merged for k in m["keys"]) == sorted(keys)
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.corrupt"))
    return samples


def _inputs(tmp_path: Path, shards: int, per_shard: int) -> tuple[list[str], Path, dict[str, str]]:
    """Input shards of random images: their keys, the output folder, and the scripts' settings for them."""
    keys = make_shards(tmp_path / "in", num_shards=shards, per_shard=per_shard, size=16)
    out = tmp_path / "out"
    pattern = str(tmp_path / "in" / f"in-{{000000..{shards - 1:06d}}}.tar")
    return keys, out, {"INPUT": pattern, "OUTPUT": str(out), "CONFIG": "configs/tiny.yaml"}


def _summaries(out: Path, prefix: str) -> list[str]:
    """Statuses of the summaries of one task prefix, oldest attempt first."""
    return [json.loads(p.read_text())["status"] for p in sorted(out.glob(f"summary-{prefix}-*.json"))]


def test_array_with_a_requeued_and_a_cancelled_task_ends_with_every_key_once(
    cluster: Cluster, tmp_path: Path
):
    """slurm/README.md's recipe: `emerdiff-pl submit` sizes the array from the shard count and chains the merge;
    one task is requeued mid-run, one stopped with the scancel the README names; merge-manifests then exits 3
    and prints a resubmit command that, pasted, finishes the work; the merge after it exits 0."""
    keys, out, env = _inputs(tmp_path, shards=4, per_shard=12)
    # task 2's input is longer, so that it is still labelling when both scancels arrive on a quiet machine
    long_keys = make_shards(tmp_path / "long", num_shards=3, per_shard=36, size=16)
    shutil.copy(tmp_path / "long" / "in-000002.tar", tmp_path / "in" / "in-000002.tar")
    keys = [k for k in keys if not k.startswith("s02_")] + [k for k in long_keys if k.startswith("s02_")]
    submitted = cluster.sh(
        "emerdiff-pl submit slurm/array-cpu.sbatch --cpus-per-task=1 --mem=2G -- --writer.samples_per_shard 3",
        env=env,
    ).stdout
    assert "array of 4 tasks over 4 input units" in submitted, submitted
    job, merge_job = _job_ids(submitted)[:2]

    # task 1: requeued once it has finished a shard (SIGTERM, then it starts again and skips what is done)
    _wait_for(lambda: list(out.glob("a0001of0004-*.tar")), 300, "task 1's first shard", cluster)
    cluster.sh(f"scontrol requeue {job}_1")
    # a requeued job waits ~2 min before it may start again; the test does not
    _wait_for(lambda: cluster.jobs(job)["1"]["JobState"] == "PENDING", 120, "task 1 pending again", cluster)
    cluster.sh(f"scontrol update JobId={job}_1 StartTime=now")

    # task 2: `scancel --signal=TERM` alone reaches job steps only, and this script has none; --full stops it
    _wait_for(lambda: list(out.glob("a0002of0004-*.tar")), 300, "task 2's first shard", cluster)
    cluster.sh(f"scancel --signal=TERM {job}_2", check=False)
    time.sleep(3)
    assert cluster.jobs(job)["2"]["JobState"] == "RUNNING" and not _summaries(out, "a0002of0004-r000of001")
    cluster.sh(f"scancel --signal=TERM --full {job}_2")

    tasks = cluster.wait(job)
    assert {t: tasks[t]["JobState"] for t in tasks} == {
        "0": "COMPLETED",
        "1": "COMPLETED",
        "2": "FAILED",
        "3": "COMPLETED",
    }, tasks
    assert tasks["2"]["ExitCode"] == "143:0" and tasks["1"]["Restarts"] == "1"
    assert _summaries(out, "a0002of0004-r000of001") == ["interrupted: SIGTERMException: 143"]
    assert _summaries(out, "a0001of0004-r000of001") == ["interrupted: SIGTERMException: 143", "finished"]
    requeued_log = (cluster.submit_dir / f"emerdiff-pl-{job}_1.out").read_text()
    # --open-mode=append kept the first attempt's log
    assert "task 1/4 (job" in requeued_log and "restart 0)" in requeued_log and "restart 1)" in requeued_log
    # the chained merge (afterok) is dropped when a task fails
    _wait_for(
        lambda: cluster.jobs(merge_job)[merge_job]["JobState"] == "CANCELLED", 120, "merge dropped", cluster
    )

    merged = cluster.sh(f"emerdiff-pl merge-manifests {out}", check=False)
    assert merged.returncode == 3, merged.stdout + merged.stderr
    assert "not finished: array tasks 2 of 4" in merged.stdout
    resubmit = next(line.strip() for line in merged.stdout.splitlines() if " sbatch " in line)
    assert resubmit.startswith("ARRAY_COUNT=4 ") and "--array=2 slurm/array-cpu.sbatch" in resubmit
    again = _job_ids(cluster.sh(resubmit).stdout)[0]  # pasted as printed
    assert cluster.wait(again)["2"]["JobState"] == "COMPLETED"
    assert _summaries(out, "a0002of0004-r000of001")[-1] == "finished"

    merged = cluster.sh(f"emerdiff-pl merge-manifests {out}", check=False)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    _check_exactly_once(out, keys)
    log = (cluster.submit_dir / f"emerdiff-pl-{again}_2.out").read_text()
    assert "--writer.samples_per_shard" not in log and "config-a000" in log  # the saved config carried it
    assert all(re.match(r"a000[0-3]of0004-", p.name) for p in out.glob("*.tar"))  # the original split, kept


def test_the_same_array_submitted_twice_at_once_labels_each_key_once(cluster: Cluster, tmp_path: Path):
    """Two identical arrays at once: per task, one of the two jobs is refused by the task lock with a clear
    message, and every key ends up exactly once."""
    keys, out, env = _inputs(tmp_path, shards=2, per_shard=8)
    submit = "sbatch --array=0-1 --cpus-per-task=1 --mem=2G slurm/array-cpu.sbatch"
    first, second = (_job_ids(cluster.sh(submit, env=env).stdout)[0] for _ in range(2))
    jobs = {first: cluster.wait(first), second: cluster.wait(second)}
    for task in ("0", "1"):
        logs = {j: (cluster.submit_dir / f"emerdiff-pl-{j}_{task}.out").read_text() for j in jobs}
        refused = [j for j, log in logs.items() if LOCKED in log]
        assert len(refused) == 1, logs  # exactly one of the two ran the task
        assert jobs[refused[0]][task]["JobState"] == "FAILED"
        (winner,) = set(jobs) - set(refused)
        assert jobs[winner][task]["JobState"] == "COMPLETED"
    assert cluster.sh(f"emerdiff-pl merge-manifests {out}", check=False).returncode == 0
    _check_exactly_once(out, keys)


def test_ddp_job_stopped_with_the_readme_scancel_resumes_from_the_printed_command(
    cluster: Cluster, tmp_path: Path
):
    """slurm/ddp-cpu.sbatch through `emerdiff-pl submit`: two ranks under srun (gloo) label disjoint input shards;
    `scancel --signal=TERM JOB` stops both ranks cleanly (exit 143, both summaries); merge-manifests prints the
    DDP script to rerun, which pasted finishes the work."""
    keys, out, env = _inputs(tmp_path, shards=4, per_shard=6)
    submit = "emerdiff-pl submit slurm/ddp-cpu.sbatch -- --writer.samples_per_shard 3"
    job, merge_job = _job_ids(cluster.sh(submit, env=env).stdout)[:2]
    _wait_for(lambda: list(out.glob("a0000of0001-r*.tar")), 300, "a rank's first shard", cluster)
    cluster.sh(f"scancel --signal=TERM {job}")
    stopped = cluster.wait(job)[job]
    assert (stopped["JobState"], stopped["ExitCode"]) == ("FAILED", "143:0"), stopped
    for rank in (0, 1):  # both ranks closed their shard and wrote their summary: nothing was killed
        assert _summaries(out, f"a0000of0001-r{rank:03d}of002") == ["interrupted: SIGTERMException: 143"]
    _wait_for(
        lambda: cluster.jobs(merge_job)[merge_job]["JobState"] == "CANCELLED", 120, "merge dropped", cluster
    )

    merged = cluster.sh(f"emerdiff-pl merge-manifests {out}", check=False)
    assert merged.returncode == 3, merged.stdout + merged.stderr
    resubmit = next(line.strip() for line in merged.stdout.splitlines() if " sbatch " in line)
    assert resubmit.endswith("sbatch --nodes=1 --ntasks-per-node=2 slurm/ddp-cpu.sbatch"), resubmit
    again = _job_ids(cluster.sh(resubmit).stdout)[0]  # pasted as printed
    assert cluster.wait(again)[again]["JobState"] == "COMPLETED"
    assert cluster.sh(f"emerdiff-pl merge-manifests {out}", check=False).returncode == 0
    samples = _check_exactly_once(out, keys)
    ranks = {
        r: {json.loads(s["json"])["url"] for s in samples if f"-r{r:03d}of002-" in s["__url__"]}
        for r in (0, 1)
    }
    assert ranks[0] and ranks[1] and not ranks[0] & ranks[1]  # each input shard labelled by one rank
    assert "1 node(s) x 2 rank(s) on cpu" in (cluster.submit_dir / f"emerdiff-pl-ddp-{again}.out").read_text()
