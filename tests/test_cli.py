"""emerdiff-pl CLI: subcommand dispatch, configs, and predict end to end (tiny model, kill + resume, 2-process DDP)."""

import dataclasses
import importlib.machinery
import inspect
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml
from conftest import MIXED_MAX_PIXELS, REPO, ColourQuantizer, make_shards, read_output, run, subprocess_env

from emerdiff_pl import cli
from emerdiff_pl.commands.predict import cli_main
from emerdiff_pl.config import EmerDiffConfig
from emerdiff_pl.data import EmerDiffDataModule
from emerdiff_pl.segmenter import EmerDiffSegmenter
from emerdiff_pl.writer import PseudoLabelWriter

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _params(cls: type) -> set[str]:
    return {name for name in inspect.signature(cls.__init__).parameters if name != "self"}


def _settings() -> set[str]:
    return {spec.name for spec in dataclasses.fields(EmerDiffConfig)}


# ---- dispatch ------------------------------------------------------------------------------------------------------


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("predict", "demo", "relabel", "evaluate", "show", "convert", "merge-manifests"):
        assert f"  {name} " in out
    assert cli.main([]) == 2  # no command: usage, non-zero


def test_unknown_command_is_an_error(capsys: pytest.CaptureFixture):
    assert cli.main(["fit"]) == 2
    assert "unknown command 'fit'" in capsys.readouterr().err


def test_subcommands_dispatch_to_their_module_main(monkeypatch: pytest.MonkeyPatch):
    seen = []
    module = types.ModuleType("fake_subcommand")
    module.__spec__ = importlib.machinery.ModuleSpec("fake_subcommand", None)
    module.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fake_subcommand", module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "relabel", ("fake_subcommand", "test"))
    assert cli.main(["relabel", "--in", "x", "-k", "5"]) == 3
    assert seen == [["--in", "x", "-k", "5"]]


def test_missing_subcommand_module_is_reported_not_a_crash(monkeypatch, capsys: pytest.CaptureFixture):
    monkeypatch.setitem(cli.SUBCOMMANDS, "evaluate", ("emerdiff_pl.no_such_module", "test"))
    assert cli.main(["evaluate", "--help"]) == 2
    assert "emerdiff_pl.no_such_module" in capsys.readouterr().err


def test_merge_manifests_is_a_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "out").mkdir()
    assert cli.main(["merge-manifests", str(tmp_path / "out")]) == 0
    assert "0 shards, 0 samples" in capsys.readouterr().out
    assert (tmp_path / "out" / "manifest.jsonl").read_text() == ""


# ---- configs -------------------------------------------------------------------------------------------------------


def test_the_four_predict_configs_exist():
    assert {"tiny.yaml", "sd14.yaml", "sd15.yaml", "sd21-base.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.stem)
def test_print_config_shows_every_field(config_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", "--config", str(config_path), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert list(config["model"]) == [
        spec.name for spec in dataclasses.fields(EmerDiffConfig)
    ]  # every setting
    assert set(config["data"]) == _params(EmerDiffDataModule)
    assert set(config["writer"]) == _params(PseudoLabelWriter)
    assert isinstance(config["seed_everything"], int) and not isinstance(config["seed_everything"], bool)
    assert config["return_predictions"] is False and config["trainer"]["logger"] is False
    assert "optimizer" not in config and "ckpt_path" not in config
    raw = yaml.safe_load(config_path.read_text())
    assert "predict" not in raw and set(raw) <= set(config)  # flat, only known groups


def test_paper_configs_hold_the_paper_defaults():
    expected = {
        "sd14": "CompVis/stable-diffusion-v1-4",
        "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "sd21-base": "stabilityai/stable-diffusion-2-1-base",
    }
    for name, hub_id in expected.items():
        config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        model = config["model"]
        assert model["pretrained"] == hub_id
        assert (model["resolution"], model["num_masks"], model["modulation_timestep"]) == (512, 20, 281)
        assert (model["modulation_strength"], model["feature_timestep"], model["dtype"]) == (
            10.0,
            1,
            "bfloat16",
        )
        assert model["attention_injection"] is True and config["trainer"]["accelerator"] == "gpu"
    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    assert tiny["model"]["pretrained"] == "tiny-random" and tiny["trainer"]["accelerator"] == "cpu"


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_builds_its_model_settings_and_overrides_apply(config_path: Path, capsys):
    """Each shipped config, as written (flat ``model:`` keys), parses; a flag overrides one setting; the model
    group it resolves to builds the segmenter with exactly those settings (what <key>.json records)."""
    with pytest.raises(SystemExit):
        cli_main(["predict", "--config", str(config_path), "--model.num_masks", "8", "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    raw = yaml.safe_load(config_path.read_text())["model"]
    assert set(raw) <= _settings()
    expected = {**raw, "num_masks": 8}
    assert {k: v for k, v in model.items() if k in expected} == expected
    built = EmerDiffSegmenter(**model)  # nothing loads before configure_model
    assert built.config == EmerDiffConfig(**model) and dict(built.hparams) == built.config.hparams()


def _says_something_untrue(model: dict, trainer: dict) -> set[str]:
    """The settings a config sets that its other values make unread (a config field nothing reads)."""
    unread = set()
    if model.get("decoder", "vae") != "taesd":
        unread.add("taesd_model")
    if model.get("refine", "none") != "pamr":
        unread |= {"refine_iterations", "refine_dilations"}
    if model.get("refine", "none") not in ("guided", "bilateral"):
        unread |= {"refine_radius", "refine_eps"}
    classifier = model.get("classifier", "none")
    if classifier != "probe":
        unread.add("probe")
    if classifier != "clip":
        unread |= {"clip_model", "clip_resolution"}
    if classifier == "none":
        unread |= {"class_names", "classifier_threshold"}
    if trainer.get("accelerator") == "cpu":  # CUDA-only settings
        unread |= {"channels_last", "group_norm_kernel"}
    return unread & set(model)


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.stem)
def test_configs_set_no_field_that_nothing_reads(config_path: Path):
    config = yaml.safe_load(config_path.read_text())
    assert _says_something_untrue(config["model"], config["trainer"]) == set()


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.stem)
def test_config_headers_name_the_model_input_they_configure(config_path: Path):
    """A header that promises 512×512 (the paper's squashed input) is only true of a `resize: square` config."""
    header = "".join(
        line for line in config_path.read_text().splitlines(keepends=True) if line.startswith("#")
    )
    resize = yaml.safe_load(config_path.read_text())["model"].get("resize", EmerDiffConfig.resize)
    if resize != "square":
        assert not re.search(r"\b(\d+)×\1\b", header), header


# ---- predict end to end ------------------------------------------------------------------------------------------


def test_predict_keeps_no_predictions_in_memory_by_default(tmp_path: Path, image_folder: dict):
    args = [
        "predict",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--data.folder",
        str(image_folder["root"]),
        "--data.num_workers",
        "0",
        "--writer.output_dir",
        str(tmp_path / "out"),
    ]  # fmt: skip  (no config file: return_predictions is unset)
    built = cli_main(args, model_class=ColourQuantizer)
    assert (
        built.trainer.predict_loop.return_predictions is False
        and built.trainer.predict_loop.predictions == []
    )
    assert len(read_output(tmp_path / "out")["keys"]) == len(image_folder["sizes"])


@pytest.mark.slow
def test_predict_tiny_config_labels_every_good_image_once(tmp_path: Path, mixed_shards: dict):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "emerdiff_pl", "predict", "--config", "configs/tiny.yaml",
        "--data.urls", mixed_shards["urls"], "--data.max_pixels", str(MIXED_MAX_PIXELS), "--data.num_workers", "0",
        "--writer.output_dir", str(out), "--model.resolution", "32", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    stdout = run(command, timeout=600).stdout
    assert f"{len(mixed_shards['good'])} labelled, 0 skipped (already done), " in stdout
    result = read_output(out)
    assert sorted(result["keys"]) == sorted(mixed_shards["good"])
    for sample in result["samples"]:
        assert sample["seg.png"].shape == mixed_shards["good"][sample["__key__"]]
        assert sample["seg.png"].max() < 4 and sample["lowres.png"].max() < 4
        assert sample["emb.npy"].shape[0] == 4
        assert sample["overlay.jpg"].shape == (*sample["seg.png"].shape, 3)  # tiny.yaml turns overlays on
        meta = sample["json"]
        assert meta["hparams"]["pretrained"] == "tiny-random" and meta["hparams"]["num_masks"] == 4
        assert meta["hparams"]["resolution"] == 32 and meta["seed"] == 0 and meta["model"] == "tiny-random"
        assert meta["original_size"] == list(mixed_shards["good"][sample["__key__"]])
        assert {"torch", "diffusers", "lightning"} <= set(meta["versions"])
    assert {f["key"] for f in result["failures"]} == set(mixed_shards["bad"]) | {"lost_a"}
    assert result["temp"] == [] and len(list(out.glob("config-*.yaml"))) == 1


def _fake_predict_args(fake_cli: Path, urls: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(fake_cli), "predict",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--model.resolution", "32",
        "--data.urls", urls, "--data.batch_size", "2", "--writer.output_dir", str(out),
        "--writer.samples_per_shard", "3", "--return_predictions", "false", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_kill_and_resume_gives_every_key_exactly_once(tmp_path: Path, fake_cli: Path, capsys):
    keys = make_shards(tmp_path / "in", num_shards=4, per_shard=6, size=16)
    urls, out = str(tmp_path / "in" / "in-{000000..000003}.tar"), tmp_path / "out"
    log = (tmp_path / "killed.log").open("w")
    first = subprocess.Popen(
        _fake_predict_args(fake_cli, urls, out, "--model.delay", "0.25", "--data.num_workers", "1"),
        cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None:
        if sum(1 for m in out.glob("manifest-*.jsonl") for _ in m.open()) >= 2:
            break
        time.sleep(0.2)
    assert first.poll() is None, (
        "the run ended before it could be killed: " + (tmp_path / "killed.log").read_text()
    )
    os.killpg(first.pid, signal.SIGKILL)  # the run and its dataloader worker, mid-shard
    first.wait(timeout=30)
    killed = read_output(out)
    assert 6 <= len(killed["keys"]) < len(keys) and len(set(killed["keys"])) == len(killed["keys"])

    rerun = _fake_predict_args(fake_cli, urls, out, "--data.num_workers", "1")[
        2:
    ]  # same CLI, in this process
    cli_main(rerun, model_class=ColourQuantizer)
    assert (
        f"{len(keys) - len(killed['keys'])} labelled, {len(killed['keys'])} skipped"
        in capsys.readouterr().out
    )
    final = read_output(out)
    assert sorted(final["keys"]) == sorted(keys) and len(final["keys"]) == len(keys)  # exactly once
    assert final["temp"] == [] and final["failures"] == []


@pytest.mark.slow
def test_two_process_ddp_covers_every_key_once_and_disjointly(tmp_path: Path, fake_cli: Path):
    keys = make_shards(tmp_path / "in", num_shards=5, per_shard=3, size=16)
    urls, out = str(tmp_path / "in" / "in-{000000..000004}.tar"), tmp_path / "out"
    args = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.num_workers", "1"]
    run(_fake_predict_args(fake_cli, urls, out, *args), timeout=500)
    result = read_output(out)
    assert sorted(result["keys"]) == sorted(keys) and len(result["keys"]) == len(keys)
    urls_by_rank: dict[int, set[str]] = {}
    for sample in result["samples"]:
        rank = int(sample["json"]["output"]["shard"].split("-r")[1][:3])
        urls_by_rank.setdefault(rank, set()).add(sample["json"]["url"])
    assert set(urls_by_rank) == {0, 1} and not urls_by_rank[0] & urls_by_rank[1]  # shards split across ranks
    assert sorted(s["rank"] for s in result["summaries"]) == [0, 1]
    assert len({s["run_id"] for s in result["summaries"]}) == 1  # one run id for the whole DDP job
    assert all(s["status"] == "finished" for s in result["summaries"]) and result["temp"] == []


# the knobs a `-fast` preset may change (benchmarks/toyworld/frontier.py measures each)
FAST_KNOBS = {
    "difference",
    "steps_after_modulation",
    "decoder",
    "taesd_model",
    "num_masks",
    "modulation_timestep",
}


def test_fast_presets_change_only_the_fast_knobs_of_their_base_config():
    fast = sorted((REPO / "configs").glob("*-fast.yaml"))
    assert {p.name for p in fast} >= {"toyworld-fast.yaml", "sd14-fast.yaml"}
    for path in fast:
        preset = yaml.safe_load(path.read_text())
        base = yaml.safe_load((path.parent / path.name.replace("-fast", "")).read_text())
        changed = {
            k
            for k in preset["model"].keys() | base["model"].keys()
            if preset["model"].get(k) != base["model"].get(k)
        }
        assert changed and changed <= FAST_KNOBS, (path.name, changed - FAST_KNOBS)
        assert preset["model"]["difference"] == "one_sided"  # the frontier's largest single saving
        assert preset["writer"].pop("output_dir") != base["writer"].pop("output_dir")
        assert {k: v for k, v in preset.items() if k != "model"} == {
            k: v for k, v in base.items() if k != "model"
        }
