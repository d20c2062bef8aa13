"""PseudoLabelWriter: shard contents, atomic naming, manifests, failures, resume, merging (in-process, fake model)."""

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from conftest import MIXED_MAX_PIXELS, ColourQuantizer, make_shards, read_output

from emerdiff_pl.commands.merge import main as merge_main
from emerdiff_pl.data import EmerDiffDataModule
from emerdiff_pl.inputs import InputPolicy
from emerdiff_pl.manifest import SHARD_PATTERN, finished_keys, merge
from emerdiff_pl.writer import PseudoLabelWriter


def predict(
    output_dir: Path,
    model: ColourQuantizer | None = None,
    *,
    samples_per_shard: int = 500,
    overlay: bool = False,
    **data,
) -> PseudoLabelWriter:
    data = {"batch_size": 2, "num_workers": 0, **data}
    writer = PseudoLabelWriter(str(output_dir), samples_per_shard=samples_per_shard, overlay=overlay)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=[writer]
    )
    trainer.predict(
        model or ColourQuantizer(), datamodule=EmerDiffDataModule(**data), return_predictions=False
    )
    return writer


def test_every_good_key_is_written_once_with_labels_at_original_size(tmp_path: Path, mixed_shards: dict):
    out = tmp_path / "out"
    predict(out, ColourQuantizer(num_masks=5, seed=7), urls=mixed_shards["urls"], max_pixels=MIXED_MAX_PIXELS)
    result = read_output(out)
    assert sorted(result["keys"]) == sorted(mixed_shards["good"])
    for sample in result["samples"]:
        key = sample["__key__"]
        assert sample["seg.png"].shape == mixed_shards["good"][key] and sample["seg.png"].dtype == np.uint8
        assert sample["seg.png"].max() < 5
        model_h, model_w = InputPolicy(32, "keep_aspect", 64).model_input_size(*mixed_shards["good"][key])
        assert sample["lowres.png"].shape == (model_h // 8, model_w // 8)  # the model's input policy
        assert sample["emb.npy"].shape == (5, 3) and sample["emb.npy"].dtype == np.float16
        meta = sample["json"]
        assert meta["original_size"] == list(mixed_shards["good"][key])
        assert meta["hparams"]["num_masks"] == 5 and meta["seed"] == 7 and meta["model"] == "colour-quantizer"
        assert meta["versions"]["colour-quantizer"] == "1" and "torch" in meta["versions"]
        assert meta["url"].endswith(".tar") and meta["output"]["shard"] in {s.name for s in result["shards"]}
    failed = {f["key"]: f for f in result["failures"]}
    assert set(failed) == set(mixed_shards["bad"]) | {"lost_a"}
    assert all(f["reason"] and f["url"] for f in failed.values())
    (summary,) = result["summaries"]
    assert summary["status"] == "finished"
    assert (summary["done"], summary["skipped"], summary["failed"]) == (
        len(mixed_shards["good"]),
        0,
        len(failed),
    )
    assert sorted(k for m in result["manifests"] for k in m["keys"]) == sorted(result["keys"])
    assert result["temp"] == []


def test_shards_roll_over_and_names_never_collide(tmp_path: Path):
    keys = make_shards(tmp_path / "in", num_shards=1, per_shard=11, size=8)
    out = tmp_path / "out"
    writer = predict(out, urls=str(tmp_path / "in" / "in-000000.tar"), samples_per_shard=4)
    result = read_output(out)
    assert [m["count"] for m in result["manifests"]] == [4, 4, 3]
    assert all(SHARD_PATTERN.match(s.name) for s in result["shards"])
    assert all(s.name.startswith(f"a0000of0001-r000of001-{writer.run_id}-") for s in result["shards"])
    assert result["keys"] == keys
    again = predict(
        out, urls=str(tmp_path / "in" / "in-000000.tar"), samples_per_shard=4
    )  # a rerun: nothing to do
    assert again.run_id != writer.run_id and (again.done, again.skipped) == (0, 11)
    assert read_output(out)["keys"] == keys


class _CrashAfterBatch(pl.Callback):
    """A crash outside the per-sample guard (after the writer stored batch 3): the run ends."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 3:
            raise RuntimeError("planned failure")


def test_interrupted_run_keeps_complete_samples_and_rerun_finishes(tmp_path: Path):
    keys = make_shards(tmp_path / "in", num_shards=2, per_shard=7, size=8)
    out = tmp_path / "out"
    urls = str(tmp_path / "in" / "in-{000000..000001}.tar")
    writer = PseudoLabelWriter(str(out), samples_per_shard=4)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer, _CrashAfterBatch()]
    )
    data = EmerDiffDataModule(urls=urls, batch_size=2, num_workers=0)
    with pytest.raises(RuntimeError, match="planned failure"):
        trainer.predict(ColourQuantizer(), datamodule=data, return_predictions=False)
    first = read_output(out)
    assert (
        first["keys"] == keys[:8]
    )  # batches 0-3 were written; the open shard was committed on the exception
    assert first["summaries"][0]["status"].startswith("interrupted") and first["temp"] == []
    writer = predict(out, urls=urls, samples_per_shard=4)
    assert (writer.done, writer.skipped) == (6, 8)
    final = read_output(out)
    assert sorted(final["keys"]) == sorted(keys) and len(final["keys"]) == len(set(final["keys"]))


def test_input_the_model_cannot_segment_is_recorded_and_its_batch_mates_labelled(tmp_path: Path):
    keys = make_shards(tmp_path / "in", num_shards=1, per_shard=6, size=8)
    out = tmp_path / "out"
    writer = predict(out, ColourQuantizer(crash_key=keys[3]), urls=str(tmp_path / "in" / "in-000000.tar"))
    result = read_output(out)
    assert result["keys"] == [k for k in keys if k != keys[3]] and writer.failed == 1
    (failure,) = result["failures"]
    assert failure["key"] == keys[3] and "segmentation failed" in failure["reason"]


def test_a_model_that_fails_on_everything_still_stops_the_run(tmp_path: Path):
    make_shards(tmp_path / "in", num_shards=1, per_shard=8, size=8)
    with pytest.raises(RuntimeError, match="planned failure"):  # a broken device is not a bad input
        predict(tmp_path / "out", ColourQuantizer(fail_at_batch=0), urls=str(tmp_path / "in"), batch_size=1)


def test_finished_shard_without_manifest_line_still_counts_as_done(tmp_path: Path):
    keys = make_shards(tmp_path / "in", num_shards=1, per_shard=5, size=8)
    out = tmp_path / "out"
    predict(out, urls=str(tmp_path / "in" / "in-000000.tar"), samples_per_shard=2)
    for manifest in out.glob("manifest-*.jsonl"):  # as if killed between the rename and the manifest write
        manifest.unlink()
    assert finished_keys(out) == set(keys)
    assert predict(out, urls=str(tmp_path / "in" / "in-000000.tar")).done == 0


def test_stale_temp_files_of_this_task_are_removed_and_others_kept(tmp_path: Path):
    make_shards(tmp_path / "in", num_shards=1, per_shard=2, size=8)
    out = tmp_path / "out"
    out.mkdir()
    mine = out / ".a0000of0001-r000of001-20200101T000000Z-abcdef-000003.tar.tmp"
    other = out / ".a0001of0002-r000of001-20200101T000000Z-abcdef-000000.tar.tmp"
    mine.write_bytes(b"half a shard")
    other.write_bytes(b"another task is writing this")
    predict(out, urls=str(tmp_path / "in" / "in-000000.tar"))
    assert not mine.exists() and other.exists()


def test_overlay_is_written_when_enabled(tmp_path: Path, image_folder: dict):
    out = tmp_path / "out"
    predict(out, folder=str(image_folder["root"]), overlay=True)
    samples = read_output(out)["samples"]
    assert len(samples) == len(image_folder["sizes"])
    for sample in samples:
        assert sample["overlay.jpg"].shape == (*sample["seg.png"].shape, 3)
        assert sample["json"]["url"].startswith(str(image_folder["root"]))


def test_merge_manifests_lists_unfinished_tasks_and_unresolved_failures(tmp_path: Path, mixed_shards: dict):
    out = tmp_path / "out"
    predict(out, urls=mixed_shards["urls"], max_pixels=MIXED_MAX_PIXELS, array_index=0, array_count=2)
    summary = merge(out)
    assert summary["unfinished_array_tasks"] == [1] and summary["duplicate_keys"] == {}
    merged = [json.loads(line) for line in (out / "manifest.jsonl").open()]
    assert sum(m["count"] for m in merged) == summary["samples"] == len(read_output(out)["keys"])
    predict(out, urls=mixed_shards["urls"], max_pixels=MIXED_MAX_PIXELS, array_index=1, array_count=2)
    predict(
        out, urls=mixed_shards["urls"], max_pixels=MIXED_MAX_PIXELS, array_index=1, array_count=2
    )  # rerun
    summary = merge(out)
    assert summary["unfinished_array_tasks"] == [] and summary["samples"] == len(mixed_shards["good"])
    failures = [json.loads(line) for line in (out / "failures.jsonl").open()]
    assert sorted(f["key"] for f in failures) == sorted([*mixed_shards["bad"], "lost_a"])  # deduplicated
    shard = sorted(out.glob("*.tar"))[0]
    shutil.copy(shard, out / shard.name.replace("-000000.tar", "-000099.tar"))
    assert merge_main([str(out)]) == 1  # a key in two shards is an error


class _SigtermAfterBatch(pl.Callback):
    """Plays SLURM preemption: flags SIGTERM the way Lightning's signal handler does, after one batch."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 1:
            trainer._signal_connector.received_sigterm = True


def test_sigterm_closes_the_open_shard_and_exits(tmp_path: Path):
    keys = make_shards(tmp_path / "in", num_shards=1, per_shard=10, size=8)
    out = tmp_path / "out"
    writer = PseudoLabelWriter(str(out), samples_per_shard=50)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer, _SigtermAfterBatch()]
    )
    data = EmerDiffDataModule(urls=str(tmp_path / "in" / "in-000000.tar"), batch_size=2, num_workers=0)
    with pytest.raises(SystemExit) as exit_info:
        trainer.predict(ColourQuantizer(), datamodule=data, return_predictions=False)
    assert exit_info.value.code == 143
    stopped = read_output(out)
    assert stopped["keys"] == keys[:6] and stopped["temp"] == []  # batches 0-2, committed although not full
    assert stopped["summaries"][0]["status"].startswith("interrupted")
    assert predict(out, urls=str(tmp_path / "in" / "in-000000.tar")).done == 4


# ---- crash windows ------------------------------------------------------------------------------------------


def _torn_members(out: Path) -> list[str]:
    """Keys of published samples that lack one of the writer's four members."""
    from emerdiff_pl.shardio import iter_raw_samples

    fields = {"seg.png", "lowres.png", "emb.npy", "json"}
    return (
        [s["__key__"] for s in iter_raw_samples(str(out)) if not fields <= set(s)]
        if list(out.glob("*.tar"))
        else []
    )


@pytest.mark.parametrize("step", ["fsync", "close"])
def test_failed_close_or_fsync_publishes_nothing_and_still_writes_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
):
    import errno
    import os

    import webdataset

    keys = make_shards(tmp_path / "in", num_shards=1, per_shard=5, size=8)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if step == "fsync":
        monkeypatch.setattr(os, "fsync", disk_full)
    else:
        monkeypatch.setattr(webdataset.TarWriter, "close", disk_full)
    with pytest.raises(OSError, match="No space"):
        predict(tmp_path / "out", urls=str(tmp_path / "in" / "in-000000.tar"), samples_per_shard=2)
    monkeypatch.undo()
    result = read_output(tmp_path / "out")
    assert result["shards"] == [] and result["temp"] == []  # nothing under a final name, no partial .tmp
    assert result["summaries"][0]["status"].startswith("interrupted: OSError")
    assert predict(tmp_path / "out", urls=str(tmp_path / "in" / "in-000000.tar")).done == len(keys)


@pytest.mark.parametrize("damage", ["truncate", "delete", "same_size_corruption"])
def test_shard_that_no_longer_matches_its_manifest_is_redone(tmp_path: Path, damage: str, capsys):
    keys = make_shards(tmp_path / "in", num_shards=1, per_shard=6, size=8)
    out, urls = tmp_path / "out", str(tmp_path / "in" / "in-000000.tar")
    predict(out, urls=urls, samples_per_shard=3)
    first, second = sorted(out.glob("*.tar"))
    data = first.read_bytes()
    if damage == "truncate":
        first.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        first.unlink()
    else:
        first.write_bytes(data[:1000] + bytes(100) + data[1100:])
    summary = merge(out)
    assert summary["samples"] == 3 and summary["unfinished_array_tasks"] == [0]  # merge does not trust it
    assert (first.name in summary["bad_shards"]) != (first.name in summary["missing_shards"])
    writer = predict(out, urls=urls, samples_per_shard=3)
    assert (writer.done, writer.skipped) == (3, 3)
    if damage != "delete":
        assert "failed its check" in capsys.readouterr().err and (out / f"{first.name}.corrupt").exists()
    final = read_output(out)
    assert sorted(final["keys"]) == sorted(keys) and len(final["keys"]) == len(set(final["keys"]))
    summary = merge(out)
    assert (
        summary["unfinished_array_tasks"] == []
        and summary["missing_shards"] == []
        and summary["samples"] == 6
    )


def test_error_encoding_the_second_field_publishes_no_torn_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from emerdiff_pl import writer as writer_module

    keys = make_shards(tmp_path / "in", num_shards=1, per_shard=4, size=8)
    out, urls = tmp_path / "out", str(tmp_path / "in" / "in-000000.tar")
    calls = {"n": 0}
    real = writer_module.encode_label_png

    def fail_on_third(labels):  # seg.png then lowres.png of each sample: the 3rd call is sample 2's lowres
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("encoder crashed")
        return real(labels)

    monkeypatch.setattr(writer_module, "encode_label_png", fail_on_third)
    first = predict(out, urls=urls)
    monkeypatch.undo()
    result = read_output(out)
    assert result["keys"] == [keys[0], *keys[2:]] and _torn_members(out) == []
    assert [f["key"] for f in result["failures"]] == [keys[1]] and "encoder crashed" in result["failures"][0][
        "reason"
    ]
    assert first.failed == 1
    again = predict(out, urls=urls)  # a recorded failure is not retried by default ...
    assert (again.done, again.skipped, again.skipped_failed) == (0, 3, 1)
    writer = PseudoLabelWriter(str(out), retry_failures=True)  # ... unless asked
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    data = EmerDiffDataModule(urls=urls, batch_size=2, num_workers=0)
    trainer.predict(ColourQuantizer(), datamodule=data, return_predictions=False)
    assert writer.done == 1 and sorted(read_output(out)["keys"]) == sorted(keys)


def test_error_while_writing_a_sample_drops_the_torn_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from emerdiff_pl import shardio

    keys = make_shards(tmp_path / "in", num_shards=1, per_shard=4, size=8)
    out, urls = tmp_path / "out", str(tmp_path / "in" / "in-000000.tar")
    real = shardio._HashingFile.write

    def write(self, data):  # the disk fills up once the shard holds about one sample
        if self.size > 3000:
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(shardio._HashingFile, "write", write)
    with pytest.raises(OSError):
        predict(out, urls=urls)
    monkeypatch.undo()
    result = read_output(out)
    assert result["shards"] == [] and result["temp"] == [] and result["summaries"]
    assert predict(out, urls=urls).done == len(keys)


def _field_paths(value: object, prefix: str = "") -> set[str]:
    """Every key path of a JSON document (``timings.batch.reference_s``, ...)."""
    if not isinstance(value, dict):
        return set()
    return {f"{prefix}{k}" for k in value} | {
        path for k, v in value.items() for path in _field_paths(v, f"{prefix}{k}.")
    }


def test_a_retried_images_json_has_the_fields_of_its_batch_mates(tmp_path: Path):
    keys = make_shards(tmp_path / "in", num_shards=1, per_shard=6, size=8)
    out = tmp_path / "out"
    predict(out, ColourQuantizer(crash_key=keys[3]), urls=str(tmp_path / "in" / "in-000000.tar"))
    meta = {s["__key__"]: s["json"] for s in read_output(out)["samples"]}
    retried, whole = meta[keys[2]], meta[keys[0]]  # keys[2] shared its batch with the crash; keys[0] did not
    assert retried["timings"]["batch_size"] == 1 and whole["timings"]["batch_size"] == 2
    assert _field_paths(retried) == _field_paths(whole)
    assert retried["model_size"] == whole["model_size"] and "quantize_s" in retried["timings"]["batch"]


def test_plain_python_predict_takes_the_models_input_policy_and_the_writers_plan(tmp_path: Path):
    """No CLI: the DataModule has no size of its own, so the model's policy decides the batches, and a rerun
    skips what the writer's output folder holds."""
    keys = make_shards(tmp_path / "in", num_shards=1, per_shard=4, size=8)
    urls = str(tmp_path / "in" / "in-000000.tar")
    predict(tmp_path / "out", ColourQuantizer(resolution=16), urls=urls)
    sample = read_output(tmp_path / "out")["samples"][0]
    assert sample["json"]["model_size"] == [16, 16] and sample["lowres.png"].shape == (2, 2)
    again = predict(tmp_path / "out", ColourQuantizer(resolution=16), urls=urls)
    assert (again.done, again.skipped) == (0, len(keys))
