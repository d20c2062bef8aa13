"""The first two hours of a new user: mistakes give one message and a non-zero exit before any weight loads (and
before Lightning is imported, where the command line shows them), progress is counted in images, runs are quiet,
light subcommands start without torch, every command reads the image folder predict read, a rerun with other
settings is refused, and Ctrl-C says what was kept."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_shards, run, subprocess_env
from PIL import Image

from emerdiff_pl import cli
from emerdiff_pl.commands.predict import cli_main
from emerdiff_pl.progress import ImageProgressBar, InputCount, format_rate
from emerdiff_pl.validation import UserError, check_model_settings
from emerdiff_pl.writer import WriterCounts

TINY = str(REPO / "configs" / "tiny.yaml")


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emerdiff_pl", *args],
        cwd=REPO,
        env={**subprocess_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---- mistakes: one message, the real flag, exit 2, no files ------------------------------------------------


def test_missing_folder_is_one_message_naming_the_flag_and_leaves_no_files(tmp_path: Path):
    out = tmp_path / "out"
    result = _cli(
        "predict", "--config", TINY, "--data.folder", str(tmp_path / "nope"), "--writer.output_dir", str(out)
    )
    assert result.returncode == 2
    assert (
        "Traceback" not in result.stderr
        and "--data.folder" in result.stderr
        and "does not exist" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) <= 3  # the message and the --debug hint
    assert _files(out) == []  # neither config nor summary of a run that never started
    debug = _cli("predict", "--config", TINY, "--data.folder", str(tmp_path / "nope"), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserError" in debug.stderr


def test_gpu_config_without_a_gpu_says_how_to_run_on_the_cpu(tmp_path: Path, image_folder: dict):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = _cli(
        "predict", "--config", str(REPO / "configs" / "sd14.yaml"), "--data.folder", str(image_folder["root"]),
        "--writer.output_dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--trainer.accelerator cpu" in result.stderr and "configs/toyworld.yaml" in result.stderr
    assert "MisconfigurationException" not in result.stderr and _files(tmp_path / "out") == []


def _mistake(tmp_path: Path, image_folder: dict, case: str) -> tuple[list[str], str]:
    """Arguments of one typical mistake and a phrase the message must contain."""
    folder = str(image_folder["root"])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    make_shards(tmp_path / "shards", num_shards=1, per_shard=1)
    shard = str(tmp_path / "shards" / "in-000000.tar")
    cases = {
        "empty_folder": (["--data.folder", str(empty)], "holds no images"),
        "tar_as_folder": (["--data.folder", shard], "pass it as --data.urls"),
        "images_as_urls": (["--data.urls", str(next(Path(folder).glob("*.jpg")))], "--data.folder"),
        "missing_shards": (["--data.urls", str(tmp_path / "in-{000000..000003}.tar")], "--data.urls"),
        "both_inputs": (["--data.folder", folder, "--data.urls", shard], "exactly one input"),
        "output_is_a_file": (["--data.folder", folder, "--writer.output_dir", str(a_file)], "is a file"),
        "wrong_layer": (
            ["--data.folder", folder, "--model.feature_layer", "up_blocks.1.attentions.0.attn2"],
            "up_blocks.1.attentions.0.transformer_blocks.0.attn2",  # the valid names are listed
        ),
        "too_many_masks": (
            ["--data.folder", folder, "--model.num_masks", "65"],
            "--model.num_masks 65 exceeds",
        ),
        "not_a_model_folder": (
            ["--data.folder", folder, "--model.pretrained", str(empty)],
            "--model.pretrained",
        ),
        "offline_hub_id": (
            ["--data.folder", folder, "--model.pretrained", "no-such-org/no-such-model"],
            "hf download no-such-org/no-such-model",
        ),
    }
    return cases[case]


@pytest.mark.parametrize(
    "case",
    [
        "empty_folder", "tar_as_folder", "images_as_urls", "missing_shards", "both_inputs", "output_is_a_file",
        "wrong_layer", "too_many_masks", "not_a_model_folder", "offline_hub_id",
    ],
)  # fmt: skip
def test_user_mistakes_exit_2_with_one_clear_message(tmp_path: Path, image_folder: dict, case: str, capsys):
    args, phrase = _mistake(tmp_path, image_folder, case)
    out = tmp_path / "out"
    if "--writer.output_dir" not in args:
        args = [*args, "--writer.output_dir", str(out)]
    assert cli.main(["predict", "--config", TINY, *args]) == 2  # the same main() as the console script
    err = capsys.readouterr().err
    assert err.startswith("emerdiff-pl predict: error: ") and phrase in err, err
    assert "Traceback" not in err and _files(out) == []


def test_tiny_random_layer_grid_matches_the_backbone():
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"  # 8×8 at 64² (tiny_random_components)
    check_model_settings(
        {"pretrained": "tiny-random", "resolution": 64, "num_masks": 64, "feature_layer": layer}
    )
    with pytest.raises(UserError, match="8×8 = 64"):
        check_model_settings(
            {"pretrained": "tiny-random", "resolution": 64, "num_masks": 65, "feature_layer": layer}
        )
    shipped = "up_blocks.2.attentions.0.transformer_blocks.0.attn2"  # configs/toyworld.yaml: 16×16 at 128²
    check_model_settings(
        {"pretrained": "toyworld-ldm", "resolution": 128, "num_masks": 256, "feature_layer": shipped}
    )
    with pytest.raises(UserError, match="16×16 = 256"):
        check_model_settings(
            {"pretrained": "toyworld-ldm", "resolution": 128, "num_masks": 257, "feature_layer": shipped}
        )


def test_a_run_that_fails_before_its_first_sample_writes_no_config(tmp_path: Path, image_folder: dict):
    from conftest import ColourQuantizer

    out = tmp_path / "out"
    args = [
        "predict", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--data.folder", str(image_folder["root"]), "--data.num_workers", "0", "--writer.output_dir", str(out),
        "--model.fail_at_batch", "0",
    ]  # fmt: skip
    with pytest.raises(RuntimeError, match="planned failure"):
        cli_main(args, model_class=ColourQuantizer)
    assert not list(out.glob("config-*.yaml"))
    summaries = [json.loads(p.read_text()) for p in out.glob("summary-*.json")]
    assert len(summaries) <= 1 and all(s["status"].startswith("interrupted") for s in summaries)


# ---- progress ----------------------------------------------------------------------------------------------


class _Counts:
    def __init__(self, done: int, skipped: int = 0, failed: int = 0):
        self._counts = WriterCounts(done, skipped, 0, failed)

    def counts(self) -> WriterCounts:
        return self._counts


def test_progress_line_shows_done_of_total_seconds_per_image_and_eta():
    bar = ImageProgressBar()
    bar._writer, bar.count = _Counts(done=3, failed=1), InputCount(10, True)
    bar._start, bar._last_done_at = 0.001, 8.0
    line = bar.line(now=8.0)  # 3 labelled in 8 s
    assert "4/10 images (40%)" in line and "2.7 s/image" in line and "ETA 16s" in line and "1 failed" in line
    bar._batch_images, bar._batch_start = 4, 8.0
    later = bar.line(now=14.0)  # a batch running for 6 s: the rate stays, the ETA counts down
    assert "batch of 4 running 6s" in later and "2.7 s/image" in later and "ETA 10s" in later
    assert format_rate(0.25) == "4.0 images/s" and format_rate(2.0) == "2.0 s/image"
    bar.count = InputCount(None, False)
    assert bar.line(now=8.0).startswith("4 images ·")


def test_predict_logs_image_counts_without_a_terminal_and_stays_quiet(tmp_path: Path, fake_cli: Path):
    make_shards(tmp_path / "in", num_shards=2, per_shard=3, size=16)
    base = [
        sys.executable, str(fake_cli), "predict", "--trainer.accelerator", "cpu", "--data.urls",
        str(tmp_path / "in" / "in-{000000..000001}.tar"), "--data.batch_size", "2", "--data.num_workers", "0",
    ]  # fmt: skip
    result = run([*base, "--writer.output_dir", str(tmp_path / "out")])
    text = result.stdout + result.stderr
    assert "6 images to label" in text and "6/6 images (100%)" in text and "images/s" in text
    noises = ("Tip:", "GPU available", "TPU available", "Seed set", "Predicting", "LOCAL_RANK", "deprecated")
    assert not [noise for noise in noises if noise in text]
    assert "\r" not in result.stderr  # plain lines, not a redrawn bar, when stderr is not a terminal
    loud = subprocess.run(
        [*base, "--writer.output_dir", str(tmp_path / "loud")], cwd=REPO, capture_output=True, text=True,
        env={**subprocess_env(), "EMERDIFF_VERBOSE": "1"}, timeout=300,
    )  # fmt: skip
    assert loud.returncode == 0 and "GPU available" in loud.stdout + loud.stderr


# ---- start-up, help ----------------------------------------------------------------------------------------

_PROBE = """
import sys
from emerdiff_pl.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "lightning", "diffusers", "transformers") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


@pytest.mark.parametrize(
    "command", ["", "show", "convert", "demo", "relabel", "evaluate", "export", "merge-manifests", "submit"]
)
def test_help_and_light_subcommands_import_no_torch(command: str):
    argv = [command, "--help"] if command else ["--help"]
    result = run([sys.executable, "-c", _PROBE.format(argv=argv)])
    assert "HEAVY=\n" in result.stdout, result.stdout[-500:]


def test_top_level_help_lists_convert_toyworld_and_the_global_flags(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "convert toyworld --out" in out and "--debug" in out and "--verbose" in out


def test_every_model_option_has_help_and_no_help_cites_a_file_outside_the_project(capsys):
    import dataclasses

    from emerdiff_pl.config import EmerDiffConfig

    with pytest.raises(SystemExit):
        cli_main(["predict", "--help"])
    text = capsys.readouterr().out
    for name in (spec.name for spec in dataclasses.fields(EmerDiffConfig)):
        start = text.index(f"--model.{name} ")
        block = text[start : text.index("\n  --", start + 1)]
        words = block.split("\n", 1)[1] if "\n" in block else block
        description = words.split("(type:", 1)[0].strip()
        assert description, f"--model.{name} has no help text"
    import re

    cited = set(re.findall(r"[\w./-]+\.(?:md|py|yaml)\b", text))
    assert not [c for c in cited if not (REPO / c).exists() and not list(REPO.rglob(Path(c).name))]


# ---- show on the folder predict read -----------------------------------------------------------------------


def test_readme_folder_recipe_gives_a_sheet_with_the_image_column(
    tmp_path: Path, image_folder: dict, fake_cli: Path
):
    out = tmp_path / "out"
    run([
        sys.executable, str(fake_cli), "predict", "--trainer.accelerator", "cpu", "--data.folder",
        str(image_folder["root"]), "--data.num_workers", "0", "--writer.output_dir", str(out),
    ])  # fmt: skip
    sheet = tmp_path / "grid.png"
    result = _cli("show", "--input", str(out), "--images", str(image_folder["root"]), "--out", str(sheet))
    assert result.returncode == 0, result.stderr
    assert "no image found" not in result.stderr
    bare = tmp_path / "bare.png"
    assert _cli("show", "--input", str(out), "--out", str(bare)).returncode == 0
    with Image.open(sheet) as with_images, Image.open(bare) as without:
        assert with_images.size == without.size
        assert not np.array_equal(np.asarray(with_images), np.asarray(without))  # the image column is filled


def _bar_total(out: Path, model, **data) -> tuple[int | None, int]:
    """(the progress bar's total, its position at the end) of a plain-Python predict run into ``out``."""
    import io

    import lightning.pytorch as pl

    from emerdiff_pl.data import EmerDiffDataModule
    from emerdiff_pl.writer import PseudoLabelWriter

    bar = ImageProgressBar(stream=io.StringIO(), is_tty=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[PseudoLabelWriter(str(out)), bar])
    trainer.predict(model, datamodule=EmerDiffDataModule(num_workers=0, **data), return_predictions=False)
    assert bar.count.exact
    return bar.count.total, bar.position()


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_progress_total_leaves_out_inputs_earlier_runs_finished_or_recorded_as_failures(
    tmp_path: Path, kind: str
):
    from conftest import ColourQuantizer, encode, random_rgb

    def add_images(*names: str) -> None:
        for name in names:
            (tmp_path / "in" / f"{name}.png").write_bytes(encode(Image.fromarray(random_rgb(8, 8)), "PNG"))

    if kind == "shards":
        make_shards(tmp_path / "in", num_shards=2, per_shard=3, size=8)
        first, both = {"urls": str(tmp_path / "in" / "in-000000.tar")}, {"urls": str(tmp_path / "in")}
        poison = "s00_001"
    else:
        (tmp_path / "in").mkdir()
        add_images("a", "b", "c")
        first = both = {"folder": str(tmp_path / "in")}
        poison = "b_png"
    out = tmp_path / "out"
    assert _bar_total(out, ColourQuantizer(poison_key=poison), **first) == (3, 3)  # 2 labelled, 1 failed
    if kind == "folder":
        add_images("d", "e", "f")
    # the earlier run's 2 done inputs and its 1 failure are left out of the total: 3 to go, and the count ends there
    assert _bar_total(out, ColourQuantizer(poison_key=poison), **both) == (3, 3)


# ==== the second hour (issue 31) ============================================================================

# ---- 1. a rerun with other settings is refused, naming them ------------------------------------------------


def test_label_settings_are_every_config_field_but_the_runtime_only_ones():
    import dataclasses

    from emerdiff_pl.config import EmerDiffConfig

    config = EmerDiffConfig()
    runtime = set(config.hparams()) - set(config.label_settings())
    assert runtime == {
        "max_branch_batch", "attention_backend", "channels_last", "group_norm_kernel", "prefix_sharing",
        "batched_reference", "compile",
    }  # fmt: skip
    assert {"num_masks", "seed", "resolution", "modulation_timestep", "pretrained", "dtype"} <= set(
        config.label_settings()
    )

    @dataclasses.dataclass(frozen=True)
    class Later(EmerDiffConfig):  # a setting added to the config later counts without being listed anywhere
        sharpen: float | None = None

    assert "sharpen" in Later().label_settings() and Later.label_defaults()["sharpen"] is None


def _predict_main(script: Path, out: Path, folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), "predict", "--trainer.accelerator", "cpu", "--data.folder", str(folder),
         "--data.num_workers", "0", "--writer.output_dir", str(out), *args],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _photos(folder: Path, count: int, size: tuple[int, int] = (24, 32)) -> Path:
    from conftest import encode, random_rgb

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"p{i}.jpg").write_bytes(encode(Image.fromarray(random_rgb(*size, seed=i)), "JPEG"))
    return folder


def test_rerun_with_other_settings_is_refused_naming_them_and_same_settings_resume(tmp_path: Path, fake_main):
    script, folder, out = fake_main("ConfiguredQuantizer"), _photos(tmp_path / "in", 3), tmp_path / "out"
    first = _predict_main(script, out, folder, "--model.num_masks", "4")
    assert first.returncode == 0, first.stderr
    files = _files(out)
    changed = _predict_main(script, out, folder, "--model.num_masks", "8")
    assert changed.returncode == 2, changed.stdout + changed.stderr
    assert "model.num_masks 4 → 8" in changed.stderr and "Traceback" not in changed.stderr
    assert (
        "--writer.output_dir" in changed.stderr and "--writer.allow_changed_settings true" in changed.stderr
    )
    assert _files(out) == files  # refused before writing anything
    # runtime-only settings (rows per U-Net call, ...) are no change: the same settings resume
    same = _predict_main(script, out, folder, "--model.num_masks", "4", "--model.delay", "0.01")
    assert same.returncode == 0 and "0 labelled, 3 skipped (already done)" in same.stdout, same.stderr
    _photos(folder, 4)  # one new image, labelled with K = 8 on purpose
    mixed = _predict_main(
        script, out, folder, "--model.num_masks", "8", "--writer.allow_changed_settings", "true"
    )
    assert mixed.returncode == 0 and "1 labelled, 3 skipped" in mixed.stdout, mixed.stderr
    assert "model.num_masks 4 → 8" in mixed.stderr
    (record,) = [json.loads(p.read_text()) for p in out.glob("settings-*.json")]
    assert record["changed"] == {"num_masks": [4, 8]} and record["label_settings"]["num_masks"] == 8
    assert json.loads((out / "settings.json").read_text())["label_settings"]["num_masks"] == 4


def test_settings_record_is_created_once_and_compared_by_concurrent_writers(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    from emerdiff_pl.manifest import SettingsChangedError, check_settings

    out = tmp_path / "out"
    out.mkdir()
    (out / "a0000of0002-r000of001-20260101T000000Z-abcdef-000000.tar").write_bytes(b"")  # labels exist
    with ThreadPoolExecutor(8) as pool:  # eight tasks starting at once: one record, all agree
        results = list(pool.map(lambda _: check_settings(out, {"num_masks": 4}), range(8)))
    assert results == [{}] * 8 and json.loads((out / "settings.json").read_text())["label_settings"] == {
        "num_masks": 4
    }
    with pytest.raises(SettingsChangedError, match="num_masks 4 → 5"):
        check_settings(out, {"num_masks": 5})
    with pytest.raises(SettingsChangedError, match="num_masks 4 → 5"):  # the pre-Lightning check only reads
        check_settings(out, {"num_masks": 5}, record=False)
    assert check_settings(out, {"num_masks": 5}, allow_changed=True) == {"num_masks": (4, 5)}
    # a setting the record predates counts as its default
    assert check_settings(out, {"num_masks": 4, "classifier": None}, {"classifier": None}) == {}


# ---- 2. and 3. every command takes the folder predict read; evaluate takes a folder of label PNGs ----------


def _labelled(tmp_path: Path, folder: Path) -> Path:
    """The stand-in's labels of ``folder`` (no images stored), relabelled into 3 classes."""
    import lightning.pytorch as pl
    from conftest import ColourQuantizer

    from emerdiff_pl.commands.relabel import main as relabel_main
    from emerdiff_pl.data import EmerDiffDataModule
    from emerdiff_pl.writer import PseudoLabelWriter

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         callbacks=[PseudoLabelWriter(str(tmp_path / "pred"))])  # fmt: skip
    data = EmerDiffDataModule(folder=str(folder), num_workers=0)
    trainer.predict(ColourQuantizer(), datamodule=data, return_predictions=False)
    relabel_main(["--input", str(tmp_path / "pred"), "--output", str(tmp_path / "rel"), "--num-classes", "3",
                  "--device", "cpu"])  # fmt: skip
    return tmp_path / "rel"


def test_settings_of_a_run_that_left_no_labels_bind_nothing_and_older_folders_are_read_from_their_samples(
    tmp_path: Path,
):
    from emerdiff_pl.manifest import SettingsChangedError, check_settings
    from emerdiff_pl.shardio import TarWriter

    idle = tmp_path / "idle"
    idle.mkdir()
    check_settings(idle, {"num_masks": 4})  # a first try that failed before its first shard
    assert check_settings(idle, {"num_masks": 5}) == {}
    assert json.loads((idle / "settings.json").read_text())["label_settings"] == {"num_masks": 5}
    older = tmp_path / "older"  # labelled before folders recorded their settings
    shard = TarWriter(older / "a0000of0001-r000of001-20260101T000000Z-abcdef-000000.tar")
    shard.write(
        {"__key__": "k", "json": json.dumps({"hparams": {"num_masks": 4, "max_branch_batch": 8}}).encode()}
    )
    shard.close()
    with pytest.raises(SettingsChangedError, match="num_masks 4 → 5"):
        check_settings(older, {"num_masks": 5})
    assert check_settings(older, {"num_masks": 4}) == {}


def test_export_takes_the_image_folder_predict_read(tmp_path: Path, image_folder: dict):
    from emerdiff_pl.paths import list_folder

    rel = _labelled(tmp_path, image_folder["root"])
    out = tmp_path / "export"
    assert (
        cli.main(["export", "--input", str(rel), "--images", str(image_folder["root"]), "--out", str(out)])
        == 0
    )
    paths = dict(list_folder(image_folder["root"]))
    exported = sorted(
        p.relative_to(out / "images").with_suffix("").as_posix() for p in out.rglob("images/**/*.png")
    )
    assert exported == sorted(paths)  # every image, keyed as predict keyed it (a.jpg → a_jpg)
    for key, path in paths.items():
        with Image.open(path) as source, Image.open(out / "images" / f"{key}.png") as copy:
            assert np.array_equal(np.asarray(source.convert("RGB")), np.asarray(copy))


def test_image_shards_are_keyed_as_predict_keys_them(tmp_path: Path):
    """A tar of a folder (``tar cf photos.tar -C photos .``: members ``./p0.jpg``) read by export, show or a
    training set gives the keys predict gave (``p0``), not the member names."""
    from conftest import write_tar

    from emerdiff_pl.sources import image_of, open_images

    folder = _photos(tmp_path / "photos", 2)
    tar = write_tar(
        tmp_path / "photos.tar", [(f"./p{i}", {"jpg": (folder / f"p{i}.jpg").read_bytes()}) for i in range(2)]
    )
    images = open_images(str(tar))
    assert sorted(images.keys()) == ["p0", "p1"] and image_of(images, "p0").shape == (24, 32, 3)
    assert sorted(open_images(folder).keys()) == ["p0_jpg", "p1_jpg"]


def _label_folder(tmp_path: Path) -> tuple[Path, Path]:
    """Images in nested folders with awkward names, and where their label PNGs go (named like the images)."""
    from conftest import encode, random_rgb

    images, labels = tmp_path / "photos", tmp_path / "masks"
    for rel, fmt in (("p0.jpg", "JPEG"), ("sub dir/p1.png", "PNG"), ("x.y.jpeg", "JPEG")):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(encode(Image.fromarray(random_rgb(16, 24, seed=len(rel))), fmt))
    return images, labels


def test_evaluate_scores_against_a_folder_of_label_pngs_named_like_the_images(tmp_path: Path, capsys):
    from emerdiff_pl.shardio import iter_samples

    images, labels = _label_folder(tmp_path)
    _labelled(tmp_path, images)
    for sample in iter_samples(str(tmp_path / "pred"), fields={"seg.png", "json"}):  # the truth: the labels
        stem = Path(sample["json"]["url"]).relative_to(images).with_suffix("").as_posix()
        (labels / stem).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample["seg.png"]).save(labels / f"{stem}.png")
    code = cli.main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(labels), "--num-classes", "4",
                     "--protocol", "per-image"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "3 images scored" in captured.out and "only" not in captured.err
    assert re.search(r"mIoU\s+100\.00", captured.out), captured.out


def test_evaluate_names_the_missing_ground_truth_member(tmp_path: Path, capsys):
    rel = _labelled(tmp_path, _photos(tmp_path / "in", 2))
    assert cli.main(["evaluate", "--pred", str(rel), "--gt", str(rel), "--num-classes", "3"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"sample 'p0_jpg' of .* has no 'gt.png' member \(its members: .*seg.png", err), err
    assert "is --gt the ground truth" in err and "same images" not in err
    labels = tmp_path / "masks"
    labels.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(labels / "other.png")
    assert cli.main(["evaluate", "--pred", str(rel), "--gt", str(labels), "--num-classes", "3"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"no label file p0.png .* for prediction 'p0_jpg'", err) and "other.png" in err, err


def test_evaluate_refuses_one_label_file_for_two_images(tmp_path: Path, capsys):
    from conftest import encode, random_rgb

    folder, labels = tmp_path / "in", tmp_path / "masks"
    _photos(folder, 1)
    (folder / "p0.png").write_bytes(encode(Image.fromarray(random_rgb(24, 32)), "PNG"))
    _labelled(tmp_path, folder)
    labels.mkdir()
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(labels / "p0.png")  # p0.jpg's, or p0.png's?
    assert (
        cli.main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(labels), "--num-classes", "3"])
        == 2
    )
    assert "matches two predictions, 'p0_jpg' and 'p0_png'" in capsys.readouterr().err


# ---- 4. Ctrl-C ---------------------------------------------------------------------------------------------


def test_ctrl_c_keeps_finished_shards_says_how_to_resume_and_exits_130(tmp_path: Path, fake_main):
    import os
    import signal
    import time

    from conftest import read_output

    from emerdiff_pl.manifest import scan_output

    folder, out = _photos(tmp_path / "in", 6), tmp_path / "out"
    command = [sys.executable, str(fake_main()), "predict", "--trainer.accelerator", "cpu", "--data.folder",
               str(folder), "--data.num_workers", "1", "--writer.output_dir", str(out),
               "--writer.samples_per_shard", "1", "--model.delay", "1.0"]  # fmt: skip
    # as from a terminal: SIGINT handled by default, even where the suite itself runs with SIGINT ignored (a
    # background job of a shell without job control, e.g. `nohup ... &`, inherits SIG_IGN and passes it on)
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 240
    while not list(out.glob("*.tar")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # e.g. waiting at exit for a dataloader worker that ignores SIGTERM
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"predict did not exit within 120 s of Ctrl-C:\n{stdout}{stderr}")
    assert process.returncode == 130, stdout + stderr
    kept = read_output(out)
    assert kept["keys"] and not kept["temp"] and not scan_output(out, checksum=True).bad
    assert f"kept {len(kept['keys'])} image(s)" in stderr and "rerun the same command" in stderr, stderr
    assert "Traceback" not in stderr
    resumed = subprocess.run(command[:-2], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0 and f"{len(kept['keys'])} skipped" in resumed.stdout, resumed.stderr
    assert sorted(read_output(out)["keys"]) == [f"p{i}_jpg" for i in range(6)]


# ---- 5. and 6. the command line: checked before Lightning is imported, no prefixes, short help, --version ---

_PROBE_CODE = """
import sys
from emerdiff_pl.cli import main
print("CODE=%s" % main({argv!r}))
heavy = sorted(m for m in ("torch", "lightning", "diffusers", "transformers") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


@pytest.mark.parametrize(
    "case",
    [
        "help", "bare", "missing_folder", "prefix", "zero_masks", "not_a_number", "missing_config", "bad_yaml",
        "missing_probe",
    ],
)  # fmt: skip
def test_predict_help_and_mistakes_are_answered_before_lightning_is_imported(tmp_path: Path, case: str):
    (tmp_path / "bad.yaml").write_text("model: [\n")
    folder = str(_photos(tmp_path / "in", 1))
    out = str(tmp_path / "out")
    base = ["predict", "--config", TINY, "--data.folder", folder, "--writer.output_dir", out]
    argv, code, phrase = {
        "help": (["predict", "--help"], 0, "--model.num_masks"),
        "bare": (["predict"], 2, "usage: emerdiff-pl predict --config"),
        "missing_folder": (
            [*base[:3], "--data.folder", "/no/such/folder"],
            2,
            "--data.folder '/no/such/folder'",
        ),
        "prefix": ([*base, "--model.num_mask", "8"], 2, "did you mean --model.num_masks?"),
        "zero_masks": ([*base, "--model.num_masks", "0"], 2, "--model.num_masks must be ≥ 1, got 0"),
        "not_a_number": ([*base, "--model.num_masks", "abc"], 2, "--model.num_masks must be int, got 'abc'"),
        "missing_config": (["predict", "--config", str(tmp_path / "nope.yaml")], 2, "nope.yaml'"),
        "bad_yaml": (["predict", "--config", str(tmp_path / "bad.yaml")], 2, "is not valid YAML (line 2"),
        "missing_probe": (
            [*base, "--model.classifier", "probe", "--model.probe", str(tmp_path / "p.safetensors")],
            2,
            "--model.probe: probe file",
        ),
    }[case]
    result = run([sys.executable, "-c", _PROBE_CODE.format(argv=argv)])
    assert f"CODE={code}" in result.stdout and "HEAVY=\n" in result.stdout, (
        result.stdout[-800:] + result.stderr
    )
    assert phrase in result.stdout + result.stderr


def test_the_refusal_needs_no_lightning_and_names_the_setting(tmp_path: Path):
    from emerdiff_pl.config import EmerDiffConfig
    from emerdiff_pl.manifest import check_settings

    out, folder = tmp_path / "out", _photos(tmp_path / "in", 1)
    out.mkdir()
    (out / "a0000of0001-r000of001-20260101T000000Z-abcdef-000000.tar").write_bytes(b"")
    check_settings(out, EmerDiffConfig(pretrained="tiny-random", num_masks=4).label_settings())
    argv = ["predict", "--model.pretrained", "tiny-random", "--model.num_masks", "6", "--data.folder", str(folder),
            "--writer.output_dir", str(out)]  # fmt: skip
    result = run([sys.executable, "-c", _PROBE_CODE.format(argv=argv)])
    assert "CODE=2" in result.stdout and "HEAVY=\n" in result.stdout, result.stdout + result.stderr
    assert "model.num_masks 4 → 6" in result.stderr


def test_an_option_prefix_is_an_error_naming_the_option(tmp_path: Path, capsys):
    folder = str(_photos(tmp_path / "in", 1))
    args = ["--config", TINY, "--data.folder", folder, "--writer.output_dir", str(tmp_path / "out")]
    assert cli.main(["predict", *args, "--model.num_mask", "8"]) == 2
    err = capsys.readouterr().err
    assert "--model.num_mask is not an option" in err and "did you mean --model.num_masks?" in err
    with pytest.raises(SystemExit) as parsed:  # LightningCLI itself, every group (--trainer.* too)
        cli_main(["predict", *args, "--trainer.max_epoc", "1", "--print_config"])
    assert parsed.value.code == 2 and "--trainer.max_epoc" in capsys.readouterr().err


def test_bare_predict_prints_a_short_usage_and_help_leads_with_the_projects_options(capsys):
    assert cli.main(["predict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: emerdiff-pl predict --config") and len(err.splitlines()) <= 8
    assert "{predict}" not in err and "tip:" not in err
    assert cli.main(["predict", "--help"]) == 0
    text = capsys.readouterr().out
    options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert options.index("--data.folder") < 12 and "--help-all" in text
    assert not [o for o in options if o.startswith("--trainer.")] and len(text.splitlines()) < 200
    import dataclasses

    from emerdiff_pl.config import EmerDiffConfig

    assert {f"--model.{f.name}" for f in dataclasses.fields(EmerDiffConfig)} <= set(options)


def test_version_is_printed(capsys):
    from emerdiff_pl import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"emerdiff-pl {__version__}"


# ---- 7. progress -------------------------------------------------------------------------------------------


class _Model:
    def __init__(self, share: float):
        self.share = share

    def batch_progress(self) -> float:
        return self.share


def test_progress_estimates_rate_and_eta_inside_the_first_batch():
    bar = ImageProgressBar()
    bar._writer, bar.count, bar._model = _Counts(done=0), InputCount(8, True), _Model(0.5)
    bar._start = bar._batch_start = 0.001
    bar._batch_images = 4
    line = bar.line(now=120.0)  # half of a batch of 4 in 2 minutes: ~60 s per image, 6 images to go
    assert "0/8 images" in line and "~60.0 s/image" in line and "ETA ~6m00s" in line, line
    assert "batch of 4 running 2m00s (50% done)" in line


def test_segmenter_reports_the_share_of_its_batch_done():
    from conftest import FAST_SEGMENTER, smooth_images

    from emerdiff_pl.segmenter import EmerDiffSegmenter

    model = EmerDiffSegmenter(**FAST_SEGMENTER, max_branch_batch=4)
    seen: list[float | None] = []
    tell = model._count_branch_rows
    model._count_branch_rows = lambda done, total: (tell(done, total), seen.append(model.batch_progress()))
    model.segment(smooth_images(2))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 2
    assert model.batch_progress() is None  # between batches


def test_terminal_summary_starts_on_its_own_line_once(tmp_path: Path, monkeypatch):
    import io

    import lightning.pytorch as pl
    from conftest import ColourQuantizer

    from emerdiff_pl.data import EmerDiffDataModule
    from emerdiff_pl.writer import PseudoLabelWriter

    screen = io.StringIO()  # stdout and stderr of a terminal land on one screen
    monkeypatch.setattr(sys, "stdout", screen)
    bar = ImageProgressBar(stream=screen, is_tty=True)
    trainer = pl.Trainer(accelerator="cpu", logger=False,
                         callbacks=[PseudoLabelWriter(str(tmp_path / "out")), bar])  # fmt: skip
    data = EmerDiffDataModule(folder=str(_photos(tmp_path / "in", 3)), num_workers=0)
    trainer.predict(ColourQuantizer(), datamodule=data, return_predictions=False)
    text = screen.getvalue()
    before, summary = text.split("emerdiff-pl predict [")
    last = before.rsplit("\r\x1b[K", 1)[-1]  # the progress line as it stands when the summary comes
    assert last.startswith("predict: 3/3 images (100%)") and last.endswith("\n"), repr(text[-400:])
    assert "predict: " not in summary  # the progress line is not drawn again after the summary


def test_slow_runs_say_seconds_per_image(tmp_path: Path, fake_main):
    result = _predict_main(fake_main(), tmp_path / "out", _photos(tmp_path / "in", 1), "--model.delay", "1.2",
                           "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r"1 labelled, .* \(1\.\d s/image\)", result.stdout) and "images/s" not in result.stdout


def test_srun_warning_is_hidden_unless_verbose(tmp_path: Path, fake_cli: Path):
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    command = [sys.executable, str(fake_cli), "predict", "--trainer.accelerator", "cpu", "--data.folder",
               str(_photos(tmp_path / "in", 1)), "--data.num_workers", "0"]  # fmt: skip
    outputs = {}
    for verbose in ("0", "1"):
        env = {
            **subprocess_env(),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "EMERDIFF_VERBOSE": verbose,
        }
        result = subprocess.run([*command, "--writer.output_dir", str(tmp_path / f"out{verbose}")], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr
        outputs[verbose] = result.stdout + result.stderr
    assert "`srun` command" not in outputs["0"] and "`srun` command" in outputs["1"]


# ---- 8. docs -----------------------------------------------------------------------------------------------


def test_cpu_hint_says_hours_per_image():
    import torch

    from emerdiff_pl.validation import check_accelerator

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="hours per image"):
        check_accelerator("gpu")


def test_readme_webdataset_recipe_reads_label_ids(tmp_path: Path, monkeypatch):
    from emerdiff_pl.shardio import iter_samples

    readme = (REPO / "README.md").read_text()
    recipe = readme.split("<!-- recipe: webdataset -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    _labelled(tmp_path, _photos(tmp_path / "in", 3))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "pred").rename(tmp_path / "outputs" / "labels")
    scope: dict = {}
    exec(compile(recipe, "README.md recipe", "exec"), scope)
    expected = {s["__key__"]: s["seg.png"] for s in iter_samples("outputs/labels", fields={"seg.png"})}
    got = scope["labels"]
    assert sorted(got) == sorted(expected)
    for key, label in got.items():
        assert label.ndim == 2 and np.array_equal(label, expected[key])
