"""slurm/: the sbatch scripts are valid bash and render commands that the CLI accepts."""

import os
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


def test_there_are_array_and_ddp_scripts():
    assert {p.name for p in SCRIPTS} == {"array.sbatch", "ddp.sbatch"}


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
    command = render(SCRIPTS[0], env, "--model.num_masks", "30")
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
    config = parsed_config(render(SCRIPTS[0], env), capsys)
    assert (config["data"]["array_index"], config["data"]["array_count"]) == (17, 100)
    assert config["data"]["folder"] == "/data/images" and config["data"]["urls"] is None
    result = subprocess.run(
        ["bash", str(SCRIPTS[0])],
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
        "SLURM_CPUS_PER_TASK": "8",
        "INPUT": "/data/in-{000000..000099}.tar",
        "OUTPUT": "/data/out",
    }
    command = render(SCRIPTS[1], env)
    assert command[0] == "srun"
    config = parsed_config(command, capsys)
    trainer = config["trainer"]
    assert (trainer["num_nodes"], str(trainer["devices"]), trainer["strategy"]) == (2, "4", "ddp")
    plugin = trainer["plugins"][0] if isinstance(trainer["plugins"], list) else trainer["plugins"]
    assert plugin["class_path"].endswith("SLURMEnvironment") and plugin["init_args"]["auto_requeue"] is False
    assert (config["data"]["array_index"], config["data"]["array_count"]) == (0, 1)


def test_scripts_refuse_to_run_without_input_or_output():
    result = subprocess.run(
        ["bash", str(SCRIPTS[0])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "DRY_RUN": "1", "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"},
    )
    assert result.returncode != 0 and "OUTPUT" in result.stderr
