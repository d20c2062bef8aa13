"""A week on a shared cluster, in miniature: the situations that used to duplicate work, lose samples without a
word or stop a task for good (each test reproduces one; subprocess runs of the real CLI where the process matters).
"""

import json
import os
import signal
import tarfile
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from conftest import ColourQuantizer, encode, make_shards, random_rgb, read_output, run, spawn, write_tar
from PIL import Image

from emerdiff_pl.codec import DEFAULT_MAX_PIXELS
from emerdiff_pl.commands.merge import main as merge_main
from emerdiff_pl.data import EmerDiffDataModule
from emerdiff_pl.inputs import InputPolicy
from emerdiff_pl.manifest import TaskLock, lock_path, merge
from emerdiff_pl.writer import PseudoLabelWriter


def predict(output_dir: Path, model: ColourQuantizer | None = None, *, overlay: bool = False, **data):
    data = {"batch_size": 2, "num_workers": 0, **data}
    writer = PseudoLabelWriter(str(output_dir), overlay=overlay, samples_per_shard=data.pop("per_shard", 500))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    trainer.predict(
        model or ColourQuantizer(), datamodule=EmerDiffDataModule(**data), return_predictions=False
    )
    return writer


HANG = 900  # seconds after which a wait that an event should end counts as a hang


def _wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# ---- 1 and 7: the same task twice, and SIGTERM to the process group ------------------------------------------


@pytest.mark.slow  # three CLI processes: about 40 s on a quiet 2-core CPU
def test_second_start_of_a_running_task_is_refused_and_sigterm_to_the_group_exits_143(
    tmp_path: Path, fake_cli: Path
):
    """Every wait ends on an event of the processes (a file the first run writes, a process exit), never on a
    sleep; the timeouts only bound a hang (a loaded machine is slower, not wrong)."""
    keys = make_shards(tmp_path / "in", num_shards=3, per_shard=4, size=8)
    out = tmp_path / "out"
    command = ["python", str(fake_cli), "predict", "--data.urls", str(tmp_path / "in" / "in-{000000..000002}.tar"),
               "--writer.output_dir", str(out), "--data.batch_size", "1", "--data.num_workers", "2",
               "--writer.samples_per_shard", "2", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    hold = tmp_path / "hold"
    hold.touch()
    first = spawn([*command, "--model.hold_file", str(hold)])  # labels 3 images, then waits for the test
    try:
        held = Path(f"{hold}.held")  # written by the first run once batches 0-2 are in its shards
        _wait_for(
            lambda: held.exists() or first.poll() is not None, HANG, "the first run to hold its 4th batch"
        )
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert len(list(out.glob("*.tar"))) == 1  # batches 0-1: a finished shard; batch 2: the open one
        (open_shard,) = out.glob(".*.tar.tmp")
        second = spawn(command)  # a resubmit while the first still runs
        _, err = second.communicate(timeout=HANG)
        assert second.returncode != 0 and "already running" in err, err[-2000:]
        assert f"pid {first.pid}" in err  # the message names the owner
        assert open_shard.exists()  # the second start deleted nothing of the live run
        os.killpg(first.pid, signal.SIGTERM)  # what scancel / preemption send: workers get it too
        _, err = first.communicate(timeout=HANG)  # the held batch ends on the SIGTERM: no sleep, no race
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 143, err[-3000:]
    assert "DataLoader worker" not in err
    stopped = read_output(out)
    assert stopped["temp"] == [] and stopped["summaries"][0]["status"].startswith("interrupted")
    assert 0 < len(stopped["keys"]) < len(keys) and len(stopped["keys"]) == len(set(stopped["keys"]))
    run(command, timeout=HANG)  # the rerun finishes the task (the lock of the dead run does not block)
    final = read_output(out)
    assert sorted(final["keys"]) == sorted(keys) and len(final["keys"]) == len(keys)
    assert merge(out)["unfinished_array_tasks"] == []


def test_sigterm_stops_the_batch_in_flight_at_its_next_unet_call_and_resume_redoes_it(tmp_path: Path):
    """A stop must fit SLURM's grace period: after SIGTERM not one more U-Net call runs (the batch in flight is
    dropped, not finished), the finished shards and the summary are kept, and a rerun labels each key once."""
    from conftest import FAST_SEGMENTER

    from emerdiff_pl.segmenter import EmerDiffSegmenter

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(random_rgb(24, 24, seed=i)).save(folder / f"im{i}.png")
    model = EmerDiffSegmenter(**FAST_SEGMENTER)
    calls_after_sigterm = []
    unet_call = model.call_unet

    def counted(*args, **kwargs):
        out = unet_call(*args, **kwargs)
        if model.trainer.received_sigterm:
            calls_after_sigterm.append(1)
        return out

    model.call_unet = counted

    class SigtermInSecondBatch(pl.Callback):  # what Lightning's SIGTERM handler does, as batch 1 starts
        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 1:
                trainer._signal_connector.received_sigterm = True

    out = tmp_path / "out"
    writer = PseudoLabelWriter(str(out), samples_per_shard=2)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer, SigtermInSecondBatch()]
    )
    data = {"folder": str(folder), "batch_size": 3, "num_workers": 0}
    with pytest.raises(SystemExit) as stop:
        trainer.predict(model, datamodule=EmerDiffDataModule(**data), return_predictions=False)
    assert stop.value.code == 143 and calls_after_sigterm == []
    first = read_output(out)
    assert len(first["keys"]) == 3 and not first["failures"] and not first["temp"]
    assert [s["status"] for s in first["summaries"]] == ["interrupted: SIGTERMException: 143"]

    model.call_unet = unet_call
    predict(out, model, **data)
    assert sorted(read_output(out)["keys"]) == sorted(f"im{i}_png" for i in range(6))


def test_stale_lock_file_of_a_dead_process_does_not_block(tmp_path: Path):
    keys = make_shards(tmp_path / "in", num_shards=1, per_shard=3, size=8)
    out = tmp_path / "out"
    out.mkdir()
    lock = lock_path(out, "a0000of0001-r000of001")
    lock.write_text(json.dumps({"host": "gone", "pid": 999999, "started": "2020-01-01T00:00:00Z"}))
    stale_tmp = out / ".a0000of0001-r000of001-20200101T000000Z-abcdef-000000.tar.tmp"
    stale_tmp.write_bytes(b"half a shard of the dead run")
    assert not TaskLock.is_held(lock)
    assert predict(out, urls=str(tmp_path / "in" / "in-000000.tar")).done == len(keys)
    assert not stale_tmp.exists()


def test_merge_clean_temp_keeps_the_temp_files_of_a_live_task(tmp_path: Path):
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    live = out / ".a0001of0002-r000of001-20200101T000000Z-abcdef-000000.tar.tmp"
    dead = out / ".a0000of0002-r000of001-20200101T000000Z-abcdef-000000.tar.tmp"
    live.write_bytes(b"being written")
    dead.write_bytes(b"left by a killed run")
    holder = subprocess.Popen(  # another process holds task 1's lock, as a running predict does
        [sys.executable, "-c", "import sys, time; from emerdiff_pl.manifest import TaskLock; "
         "TaskLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
         str(lock_path(out, "a0001of0002-r000of001"))],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        merge(out, clean_temp=True)
    finally:
        holder.kill()
        holder.wait()
    assert live.exists() and not dead.exists()


# ---- 2: poison pills -----------------------------------------------------------------------------------------


def test_sample_whose_output_cannot_be_written_is_recorded_and_the_run_goes_on(tmp_path: Path):
    keys = make_shards(tmp_path / "in", num_shards=1, per_shard=5, size=8)
    out, urls = tmp_path / "out", str(tmp_path / "in" / "in-000000.tar")
    writer = predict(out, ColourQuantizer(poison_key=keys[2]), urls=urls)
    result = read_output(out)
    assert result["keys"] == [k for k in keys if k != keys[2]] and writer.failed == 1
    (failure,) = result["failures"]
    assert failure["key"] == keys[2] and "negative" in failure["reason"]
    again = predict(out, ColourQuantizer(poison_key=keys[2]), urls=urls)  # the rerun does not die on it again
    assert (again.done, again.skipped_failed, again.failed) == (0, 1, 0)


def test_retry_failures_is_a_cli_option(capsys: pytest.CaptureFixture):
    import yaml

    from emerdiff_pl.commands.predict import cli_main

    with pytest.raises(SystemExit):
        cli_main(["predict", "--data.folder", ".", "--writer.output_dir", "o", "--writer.retry_failures", "true",
                  "--print_config"], model_class=ColourQuantizer)  # fmt: skip
    assert yaml.safe_load(capsys.readouterr().out)["writer"]["retry_failures"] is True


def test_extreme_panorama_overlay_is_downscaled_not_a_crash(tmp_path: Path):
    panorama = encode(Image.fromarray(random_rgb(1, 70000)), "PNG")
    write_tar(
        tmp_path / "in.tar",
        [("pano", {"png": panorama}), ("small", {"png": encode(Image.fromarray(random_rgb(8, 8)), "PNG")})],
    )
    out = tmp_path / "out"
    predict(out, urls=str(tmp_path / "in.tar"), overlay=True)
    samples = {s["__key__"]: s for s in read_output(out)["samples"]}
    assert set(samples) == {"pano", "small"}
    assert samples["pano"]["seg.png"].shape == (1, 70000) and samples["pano"]["overlay.jpg"].shape[1] == 65500


# ---- 3: truncated input tars ---------------------------------------------------------------------------------


def test_input_tar_cut_at_a_header_is_a_recorded_failure(tmp_path: Path):
    make_shards(tmp_path / "in", num_shards=1, per_shard=4, size=8)
    path = tmp_path / "in" / "in-000000.tar"
    with tarfile.open(path) as tar:
        third = [m for m in tar.getmembers() if m.name.startswith("s00_002.")][0]
    path.write_bytes(path.read_bytes()[: third.offset])  # Python's tarfile sees a valid 2-sample archive here
    out = tmp_path / "out"
    predict(out, urls=str(path))
    result = read_output(out)
    assert result["keys"] == ["s00_000"]  # s00_001 may have lost members at the cut: not trusted
    (failure,) = result["failures"]
    assert "truncated tar after 1 samples" in failure["reason"] and failure["url"] == str(path)


# ---- 4: folder keys --------------------------------------------------------------------------------------------


def test_adding_files_to_a_folder_labels_only_the_new_ones(tmp_path: Path, image_folder: dict):
    root, out = image_folder["root"], tmp_path / "out"
    first = predict(out, folder=str(root))
    (root / "a.bmp").write_bytes(
        encode(Image.fromarray(random_rgb(9, 9)), "BMP")
    )  # sorts before a.jpg, a.png
    again = predict(out, folder=str(root))
    assert (again.done, again.skipped) == (1, first.done)
    by_key = {s["__key__"]: s["json"]["url"] for s in read_output(out)["samples"]}
    assert (
        by_key["a_png"].endswith("a.png")
        and by_key["a_jpg"].endswith("a.jpg")
        and by_key["a_bmp"].endswith("a.bmp")
    )


# ---- 6: duplicate input keys -----------------------------------------------------------------------------------


def test_duplicate_input_keys_are_kept_through_merge_and_name_their_inputs(tmp_path: Path, capsys):
    image = encode(Image.fromarray(random_rgb(8, 8)), "JPEG")
    write_tar(tmp_path / "in" / "x-000000.tar", [("dup", {"jpg": image}), ("a", {"jpg": image})])
    write_tar(tmp_path / "in" / "x-000001.tar", [("dup", {"jpg": image}), ("b", {"jpg": image})])
    out = tmp_path / "out"
    predict(out, urls=str(tmp_path / "in"))  # one task reads both: the second copy is a recorded failure
    merge(out)
    merged = [json.loads(line) for line in (out / "failures.jsonl").open()]
    assert [(f["key"], Path(f["url"]).name) for f in merged] == [("dup", "x-000001.tar")]
    assert "x-000000.tar" in merged[0]["reason"]  # names the input it was first labelled from
    split = tmp_path / "split"  # two array tasks running at once, one shard each: both copies get labelled
    for index in (0, 1):
        predict(tmp_path / f"task{index}", urls=str(tmp_path / "in"), array_index=index, array_count=2)
        for path in (tmp_path / f"task{index}").iterdir():
            split.mkdir(exist_ok=True)
            path.rename(split / path.name)
    assert merge_main([str(split)]) == 1
    err = capsys.readouterr().err
    assert "dup" in err and "x-000000.tar" in err and "x-000001.tar" in err


# ---- 8: the smaller ones ---------------------------------------------------------------------------------------


def test_unsafe_member_keys_are_sanitised_and_the_original_recorded(tmp_path: Path):
    image = encode(Image.fromarray(random_rgb(8, 8)), "JPEG")
    write_tar(
        tmp_path / "in.tar", [("../escape", {"jpg": image}), ("/abs/key", {"jpg": image}), ("NOEXT", {})]
    )
    with tarfile.open(tmp_path / "in.tar", "a") as tar:  # a member without any extension
        info = tarfile.TarInfo("README")
        info.size = 2
        tar.addfile(info, __import__("io").BytesIO(b"hi"))
    out = tmp_path / "out"
    predict(out, urls=str(tmp_path / "in.tar"))
    result = read_output(out)
    assert sorted(result["keys"]) == ["__/escape", "abs/key"]
    for shard in result["shards"]:
        with tarfile.open(shard) as tar:
            assert all(not n.startswith(("/", "..")) and "/../" not in n for n in tar.getnames())
    sources = {s["__key__"]: s["json"]["source_key"] for s in result["samples"]}
    assert sources == {"__/escape": "../escape", "abs/key": "/abs/key"}
    assert [f["key"] for f in result["failures"]] == ["README"] and "no extension" in result["failures"][0][
        "reason"
    ]


def test_merge_says_which_tasks_never_wrote_a_summary(tmp_path: Path, capsys):
    make_shards(tmp_path / "in", num_shards=2, per_shard=2, size=8)
    out = tmp_path / "out"
    for index in (0, 1):
        predict(out, urls=str(tmp_path / "in"), array_index=index, array_count=2)
    for summary in out.glob("summary-a0001of0002-*.json"):  # task 1 killed before its summary
        summary.unlink()
    assert merge_main([str(out)]) == 3  # work left
    assert "never wrote a summary" in capsys.readouterr().out
    assert merge(out)["tasks_without_summary"] == [1] and merge(out)["unfinished_array_tasks"] == [1]


def test_default_max_pixels_is_bounded_and_documented():
    from PIL import Image as PILImage

    assert DEFAULT_MAX_PIXELS < PILImage.MAX_IMAGE_PIXELS
    assert EmerDiffDataModule(folder=".").max_pixels == DEFAULT_MAX_PIXELS
    assert "GiB" in EmerDiffDataModule.__doc__  # the memory it bounds is documented


def test_dataloader_workers_survive_sigterm_to_the_process_group(tmp_path: Path):
    """SLURM signals every process of the job: the workers must leave the shutdown to the main process."""
    keys = make_shards(tmp_path / "in", num_shards=4, per_shard=3, size=8)
    dm = EmerDiffDataModule(urls=str(tmp_path / "in"), batch_size=1, num_workers=2)
    loader = iter(dm.dataloader(InputPolicy(16, "square", 16)))
    # batches come from the workers in turn: after two, both have run their worker_init_fn
    seen = [key for _ in range(2) for key in next(loader)["key"]]
    for worker in loader._workers:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    # without the workers' SIGTERM handling this raises "DataLoader worker ... is killed by signal"
    seen += [key for batch in loader for key in batch["key"]]
    assert sorted(seen) == sorted(keys)
