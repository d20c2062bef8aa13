"""slurm/: the sbatch scripts are valid bash and render commands that the CLI accepts."""

import json
import os
import random
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from emerdiff_pl.commands.predict import cli_main

SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))


def render(script: Path, env: dict[str, str], *extra: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        ["bash", str(script), *extra],
        cwd=REPO,
        env={**clean, "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def parsed_config(command: list[str], capsys: pytest.CaptureFixture) -> dict:
    """What ``emerdiff-pl predict ...`` would run, via --print_config (nothing is instantiated)."""
    start = command.index("emerdiff-pl")
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*command[start + 1 :], "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_there_are_array_and_ddp_scripts_for_gpus_and_cpus():
    assert {p.name for p in SCRIPTS} == {"array.sbatch", "array-cpu.sbatch", "ddp.sbatch", "ddp-cpu.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_are_valid_bash(script: Path):
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    assert "#SBATCH" in script.read_text()


def test_array_script_renders_one_gpu_task_of_its_block(capsys: pytest.CaptureFixture):
    env = {
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_ARRAY_TASK_COUNT": "7",
        "SLURM_CPUS_PER_TASK": "8",
        "INPUT": "/data/in-{000000..000099}.tar",
        "OUTPUT": "/data/out",
        "WEIGHTS": "/weights/sd14",
    }
    command = render(REPO / "slurm" / "array.sbatch", env, "--model.num_masks", "30")
    assert command[:2] == ["emerdiff-pl", "predict"]
    config = parsed_config(command, capsys)
    assert config["data"]["urls"] == "/data/in-{000000..000099}.tar"
    assert (config["data"]["array_index"], config["data"]["array_count"]) == (3, 7)
    assert config["data"]["num_workers"] == 6
    assert config["writer"]["output_dir"] == "/data/out"
    assert config["model"]["pretrained"] == "/weights/sd14" and config["model"]["num_masks"] == 30
    assert str(config["trainer"]["devices"]) == "1" and config["trainer"]["accelerator"] == "gpu"
    assert config["return_predictions"] is False
    assert config["trainer"]["plugins"]["init_args"]["auto_requeue"] is False


def test_array_script_keeps_the_original_count_when_resubmitting_a_subset(capsys: pytest.CaptureFixture):
    env = {
        "SLURM_ARRAY_TASK_ID": "17",
        "SLURM_ARRAY_TASK_COUNT": "2",
        "ARRAY_COUNT": "100",
        "FOLDER": "/data/images",
        "OUTPUT": "/data/out",
    }
    config = parsed_config(render(REPO / "slurm" / "array.sbatch", env), capsys)
    assert (config["data"]["array_index"], config["data"]["array_count"]) == (17, 100)
    assert config["data"]["folder"] == "/data/images" and config["data"]["urls"] is None
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "array.sbatch")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={
            **os.environ,
            "DRY_RUN": "1",
            "SLURM_ARRAY_TASK_ID": "17",
            "SLURM_ARRAY_TASK_COUNT": "2",
            "INPUT": "x.tar",
            "OUTPUT": "/o",
        },
    )
    assert result.returncode != 0 and "ARRAY_COUNT" in result.stderr  # a subset without the count is refused


def test_ddp_script_renders_srun_with_one_task_per_gpu(capsys: pytest.CaptureFixture):
    env = {
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "4(x2)",
        "SLURM_NTASKS": "8",
        "SLURM_CPUS_PER_TASK": "8",
        "INPUT": "/data/in-{000000..000099}.tar",
        "OUTPUT": "/data/out",
    }
    command = render(REPO / "slurm" / "ddp.sbatch", env)
    assert command[0] == "srun"
    config = parsed_config(command, capsys)
    trainer = config["trainer"]
    assert (trainer["num_nodes"], str(trainer["devices"]), trainer["strategy"]) == (2, "4", "ddp")
    plugin = trainer["plugins"][0] if isinstance(trainer["plugins"], list) else trainer["plugins"]
    assert plugin["class_path"].endswith("SLURMEnvironment") and plugin["init_args"]["auto_requeue"] is False
    assert (config["data"]["array_index"], config["data"]["array_count"]) == (0, 1)


def test_scripts_refuse_to_run_without_input_or_output():
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "array.sbatch")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "DRY_RUN": "1", "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"},
    )
    assert result.returncode != 0 and "OUTPUT" in result.stderr


# ---- CPU variants --------------------------------------------------------------------------------------------------


def test_cpu_variants_request_no_gpu_and_run_the_shared_script_on_the_cpu(capsys: pytest.CaptureFixture):
    for name in ("array-cpu.sbatch", "ddp-cpu.sbatch"):
        text = (REPO / "slurm" / name).read_text()
        assert "gpu" not in "".join(line for line in text.splitlines() if line.startswith("#SBATCH"))
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_CPUS_PER_TASK": "2"}
    command = render(
        REPO / "slurm" / "array-cpu.sbatch", {**env, "INPUT": "/in/x-{0..3}.tar", "OUTPUT": "/o"}
    )
    config = parsed_config(command, capsys)
    assert config["trainer"]["accelerator"] == "cpu" and config["data"]["num_workers"] == 1
    env = {
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": "2",
        "SLURM_CPUS_PER_TASK": "1",
        "INPUT": "/i.tar",
        "OUTPUT": "/o",
    }
    command = render(REPO / "slurm" / "ddp-cpu.sbatch", env)  # --ntasks=2 (no --ntasks-per-node) on one node
    config = parsed_config(command, capsys)
    assert (config["trainer"]["accelerator"], str(config["trainer"]["devices"])) == ("cpu", "2")
    # --ntasks=1 beside the script's --ntasks-per-node=2: srun starts one rank, so devices must be 1
    command = render(
        REPO / "slurm" / "ddp-cpu.sbatch", {**env, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "2"}
    )
    assert str(parsed_config(command, capsys)["trainer"]["devices"]) == "1"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_requeue_and_append_to_their_log(script: Path):
    lines = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in lines and "#SBATCH --open-mode=append" in lines
    signal = next(line for line in lines if line.startswith("#SBATCH --signal="))
    # the array task is the batch shell itself (B:); the DDP ranks are an srun step (srun kills on SIGTERM)
    assert signal == ("#SBATCH --signal=TERM@120" if "ddp" in script.name else "#SBATCH --signal=B:TERM@120")


# ---- merge-manifests: exit codes and the resubmit command ---------------------------------------------------------


RUN = "20261201T000000Z-aaaaaa"
LATER = "20261202T000000Z-bbbbbb"


def _task_files(
    out: Path, index: int, count: int, status: str | None, run: str = RUN, rank: int = 0, world: int = 1
):
    """What a task leaves when it ends: its summary (None: killed before writing one) and an empty manifest."""
    out.mkdir(parents=True, exist_ok=True)
    tag = f"a{index:04d}of{count:04d}-r{rank:03d}of{world:03d}-{run}"
    (out / f"manifest-{tag}.jsonl").write_text("")
    if status is not None:
        (out / f"summary-{tag}.json").write_text(json.dumps({"status": status}))
    return tag


def _saved_config(out: Path, tag: str, capsys: pytest.CaptureFixture, *overrides: str) -> Path:
    """The config-<tag>.yaml a run saves: here the tiny config with ``overrides``, resolved by the CLI."""
    with pytest.raises(SystemExit):
        cli_main(["predict", "--config", str(REPO / "configs" / "tiny.yaml"), *overrides, "--print_config"])
    path = out / f"config-{tag}.yaml"
    path.write_text(capsys.readouterr().out)
    return path


def _merge(out: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from emerdiff_pl.commands.merge import main

    code = main([str(out)])
    return code, capsys.readouterr().out


def test_merge_exit_status_is_0_when_complete_3_with_work_left_and_documented(tmp_path: Path, capsys):
    out = tmp_path / "out"
    _task_files(out, 0, 2, "finished")
    _task_files(out, 1, 2, "interrupted: SIGTERMException: 143")
    code, printed = _merge(out, capsys)
    assert code == 3 and "array tasks 1 of 2" in printed
    _task_files(out, 1, 2, "finished", run=LATER)
    assert _merge(out, capsys)[0] == 0
    from emerdiff_pl.commands.merge import build_parser

    epilog = build_parser().epilog
    assert "0 complete" in epilog and "3 work left" in epilog and "1 a key appears in more than one" in epilog


def test_merge_reports_a_ddp_task_unfinished_when_one_ranks_summary_is_missing(tmp_path: Path, capsys):
    out = tmp_path / "out"
    tag = _task_files(out, 0, 1, "finished", rank=0, world=2)
    _task_files(out, 0, 1, None, rank=1, world=2)  # rank 1 killed before its summary
    _saved_config(
        out,
        tag,
        capsys,
        "--data.urls",
        "/in/x-{0..7}.tar",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
    )
    code, printed = _merge(out, capsys)
    assert code == 3
    resubmit = printed.split("repository's root:\n", 1)[1].splitlines()[0].strip()
    assert resubmit.endswith("sbatch --nodes=1 --ntasks-per-node=2 slurm/ddp-cpu.sbatch")  # not array.sbatch
    assert "ARRAY_COUNT" not in resubmit and "--array" not in resubmit
    assert "INPUT='/in/x-{0..7}.tar'" in resubmit and f"CONFIG={out / f'config-{tag}.yaml'}" in resubmit
    _task_files(out, 0, 1, "finished", rank=1, world=2)
    assert _merge(out, capsys)[0] == 0


def test_merge_suggests_the_ddp_script_when_every_rank_died_before_its_summary(tmp_path: Path, capsys):
    out = tmp_path / "out"
    for rank in (0, 1):
        _task_files(out, 0, 1, None, rank=rank, world=2)  # manifests only
    code, printed = _merge(out, capsys)
    assert code == 3 and "sbatch --nodes=1 --ntasks-per-node=2 slurm/ddp.sbatch" in printed


def test_merge_counts_a_resubmission_with_another_count_where_it_did_the_work(tmp_path: Path, capsys):
    from emerdiff_pl.manifest import merge

    out = tmp_path / "out"
    for index in range(4):
        _task_files(out, index, 4, "finished" if index < 2 else "interrupted: SIGTERMException: 143")
    _task_files(out, 0, 2, "finished", run=LATER)  # ARRAY_COUNT forgotten: task 0 of 2 = tasks 0-1 of 4
    summary = merge(out)
    assert summary["array_count"] == 4 and summary["unfinished_array_tasks"] == [2, 3]
    assert "ARRAY_COUNT=4 " in summary["resubmit"] and "--array=2-3 " in summary["resubmit"]
    _task_files(out, 1, 2, "finished", run=LATER)  # task 1 of 2 covers tasks 2-3 of 4
    summary = merge(out)
    assert summary["unfinished_array_tasks"] == [] and not summary["work_left"]


def test_coverage_by_tasks_of_other_counts_agrees_with_the_real_split():
    from emerdiff_pl.data import partition
    from emerdiff_pl.manifest import _covered

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 40)
        finished = {(i, c) for c in rng.sample([2, 3, 4, 5, 7, 8], 3) for i in range(c) if rng.random() < 0.6}
        done = {u for i, c in finished for u in partition(range(n), i, c)}
        for count in (3, 4, 6):
            for index in range(count):
                if _covered(index, count, finished):  # never claims a unit that no finished task labelled
                    assert set(partition(range(n), index, count)) <= done, (n, finished, index, count)


def test_resubmit_command_runs_the_array_script_with_the_original_count_and_settings(tmp_path: Path, capsys):
    """The printed command, pasted with a stand-in sbatch that runs the script as SLURM would (DRY_RUN), labels
    the missing task's block with the first run's settings."""
    out = tmp_path / "out"
    tag = _task_files(out, 0, 4, "finished")
    for index in (1, 3):
        _task_files(out, index, 4, "finished")
    _saved_config(out, tag, capsys, "--data.urls", "/in/x-{0..7}.tar", "--model.num_masks", "7")
    code, printed = _merge(out, capsys)
    assert code == 3
    resubmit = printed.split("repository's root:\n", 1)[1].splitlines()[0].strip()
    assert resubmit.startswith("ARRAY_COUNT=4 ") and "--array=2 slurm/array-cpu.sbatch" in resubmit
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        ["bash", "-c", resubmit],
        cwd=REPO,
        env={**clean, "PATH": f"{bin_dir}:{clean['PATH']}", "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config = parsed_config(shlex.split(result.stdout), capsys)
    assert (config["data"]["array_index"], config["data"]["array_count"]) == (2, 4)
    assert config["model"]["num_masks"] == 7 and config["data"]["urls"] == "/in/x-{0..7}.tar"
    assert config["writer"]["output_dir"] == str(out) and config["trainer"]["accelerator"] == "cpu"


def test_resubmit_command_without_a_saved_config_shows_placeholders(tmp_path: Path, capsys):
    out = tmp_path / "out"
    _task_files(out, 0, 3, "finished")
    _task_files(out, 2, 3, None)
    code, printed = _merge(out, capsys)
    assert code == 3 and "--array=1-2 slurm/array.sbatch" in printed
    assert "CONFIG=<your config.yaml>" in printed and "INPUT=<the input shards>" in printed
    assert "fill in the <...> values" in printed


# ---- emerdiff-pl submit ---------------------------------------------------------------------------------------------

# a stand-in for sbatch: runs the script as one array task would (SLURM_ARRAY_TASK_ID = the first of --array) and
# records every call; prints a job id as `sbatch --parsable` does
FAKE_SBATCH = """#!/usr/bin/env python3
import os, re, subprocess, sys
args = sys.argv[1:]
with open(os.environ.get("SBATCH_LOG", os.devnull), "a") as log:
    log.write(repr((args, os.environ.get("ARRAY_COUNT"))) + "\\n")
array = next((a.split("=", 1)[1] for a in args if a.startswith("--array=")), None)
script = next((i for i, a in enumerate(args) if a.endswith(".sbatch")), None)
if script is not None and os.environ.get("DRY_RUN") == "1":
    first = re.match(r"\\d+", array or "0")[0]
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": first, "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_CPUS_PER_TASK": "2"}
    sys.exit(subprocess.run(["bash", args[script], *args[script + 1 :]], env=env).returncode)
print(str(100 + sum(1 for _ in open(os.environ["SBATCH_LOG"]))) if "SBATCH_LOG" in os.environ else "100")
"""


def test_submit_sizes_the_array_from_the_shard_count_and_chains_the_merge(
    tmp_path: Path, monkeypatch, capsys
):
    from emerdiff_pl.commands.submit import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(log))
    for shard in range(10):
        (tmp_path / f"in-{shard:06d}.tar").touch()  # counted, not read
    monkeypatch.setenv("INPUT", str(tmp_path / "in-{000000..000009}.tar"))
    monkeypatch.setenv("OUTPUT", str(tmp_path / "out"))
    monkeypatch.delenv("ARRAY_COUNT", raising=False)
    args = ["slurm/array.sbatch", "--shards-per-task", "3", "--max-running", "2", "--partition=gpu", "--"]
    assert main([*args, "--model.num_masks", "30"]) == 0
    printed = capsys.readouterr().out
    assert "array of 4 tasks over 10 input units (3 per task): job 101" in printed
    assert "job 102, after job 101" in printed
    calls = [eval(line) for line in log.read_text().splitlines()]  # noqa: S307 - our own repr
    (work, count), (merge, _) = calls
    assert count == "4" and "--array=0-3%2" in work and "--partition=gpu" in work
    assert work[-3:] == ["slurm/array.sbatch", "--model.num_masks", "30"]
    assert (
        "--dependency=afterok:101" in merge
        and f"--wrap=emerdiff-pl merge-manifests {tmp_path / 'out'}" in merge
    )
    assert "--partition=gpu" not in merge  # per-job options stay with the labelling job

    log.unlink()
    assert main(["slurm/array.sbatch", "--dry-run"]) == 0  # prints the commands, submits nothing
    printed = capsys.readouterr().out
    assert not log.exists() and "ARRAY_COUNT=10 " in printed and "--array=0-9 " in printed


def test_slurm_readme_shows_the_commands_the_cluster_tests_run():
    """tests/test_slurm_cluster.py submits exactly these; the README must show them the same way."""
    readme = (REPO / "slurm" / "README.md").read_text()
    tests = (REPO / "tests" / "test_slurm_cluster.py").read_text()
    for command in (
        "emerdiff-pl submit slurm/array-cpu.sbatch --cpus-per-task=1 --mem=2G -- --writer.samples_per_shard 3",
        "emerdiff-pl submit slurm/ddp-cpu.sbatch -- --writer.samples_per_shard 3",
        "sbatch --array=0-1 --cpus-per-task=1 --mem=2G slurm/array-cpu.sbatch",
        "scancel --signal=TERM --full",
        "scancel --signal=TERM JOB",
        "scontrol requeue",
        "emerdiff-pl merge-manifests",
    ):
        assert command in readme, command
        assert command.replace(" JOB", " {job}") in tests, command
