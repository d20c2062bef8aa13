"""EmerDiffDataModule: splitting (array tasks, ranks, workers), decoding of awkward inputs, failures, resume."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MIXED_MAX_PIXELS, bad_inputs, encode, good_inputs, make_shards, random_rgb, write_tar
from PIL import Image

from emerdiff_pl.codec import ImageDecodeError, decode_image
from emerdiff_pl.data import EmerDiffDataModule, ImageStream, partition
from emerdiff_pl.inputs import InputPolicy, ReadPlan
from emerdiff_pl.manifest import array_task
from emerdiff_pl.paths import expand_urls as expand_shard_urls
from emerdiff_pl.paths import file_key, list_folder

SQUARE_16 = InputPolicy(16, "square", 16)


def _collect(batches) -> tuple[list[str], list[dict], int]:
    keys, failures, skipped = [], [], 0
    for batch in batches:
        keys += batch["key"]
        failures += batch["failures"]
        skipped += batch["skipped"]
    return keys, failures, skipped


# ---- splitting --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3, 7])
def test_array_tasks_partition_the_shards(tmp_path: Path, count: int):
    make_shards(tmp_path, num_shards=10, per_shard=1, size=8)
    urls = str(tmp_path / "in-{000000..000009}.tar")
    blocks = [
        EmerDiffDataModule(urls=urls, array_index=i, array_count=count).task_units() for i in range(count)
    ]
    flat = [u for block in blocks for u in block]
    assert sorted(flat) == sorted(expand_shard_urls(urls))  # complete
    assert len(flat) == len(set(flat)) == 10  # disjoint
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1  # balanced


@pytest.mark.parametrize("count", [1, 3, 7])
def test_array_tasks_partition_a_folder(image_folder: dict, count: int):
    root = image_folder["root"]
    blocks = [
        EmerDiffDataModule(folder=str(root), array_index=i, array_count=count).task_units()
        for i in range(count)
    ]
    keys = [key for block in blocks for key, _ in block]
    assert sorted(keys) == sorted(k for k, _ in list_folder(root, all_files=True))
    assert len(keys) == len(set(keys))


def test_array_task_defaults_come_from_slurm(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT", raising=False)
    assert array_task() == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "7")
    assert array_task() == (5, 7)
    assert array_task(count=20) == (5, 20)  # resubmitting a subset: the original count is passed explicitly
    assert array_task(index=2, count=3) == (2, 3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")  # sbatch --array=3,5 without --data.array_count
    with pytest.raises(ValueError, match="array_count"):
        array_task()


def test_partition_blocks_are_contiguous_and_cover():
    items = list(range(10))
    assert [partition(items, i, 3) for i in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [partition(items[:2], i, 7) for i in range(7)].count([]) == 5


@pytest.mark.parametrize("world_size,num_workers", [(1, 3), (2, 1), (2, 2), (3, 2)])
def test_ranks_and_workers_read_each_sample_once(tmp_path: Path, world_size: int, num_workers: int):
    keys = make_shards(tmp_path, num_shards=7, per_shard=3, size=8)
    units = expand_shard_urls(str(tmp_path / "in-{000000..000006}.tar"))
    seen: list[str] = []
    for rank in range(world_size):
        stream = ImageStream(units, "shards", SQUARE_16, 2, 10**6, rank=rank, world_size=world_size)
        for worker in range(num_workers):
            share = stream.my_units(worker, num_workers)
            seen += _collect(ImageStream(share, "shards", SQUARE_16, 2, 10**6))[0]
    assert sorted(seen) == sorted(keys)


def test_dataloader_workers_split_shards_exactly_once(tmp_path: Path):
    keys = make_shards(tmp_path, num_shards=5, per_shard=3, size=8)
    dm = EmerDiffDataModule(urls=str(tmp_path / "in-{000000..000004}.tar"), batch_size=2, num_workers=2)
    seen, failures, _ = _collect(dm.dataloader(SQUARE_16))
    assert sorted(seen) == sorted(keys) and failures == []


def test_done_keys_are_skipped_and_counted(tmp_path: Path):
    keys = make_shards(tmp_path, num_shards=2, per_shard=4, size=8)
    dm = EmerDiffDataModule(urls=[str(p) for p in sorted(tmp_path.glob("*.tar"))], num_workers=0)
    seen, _, skipped = _collect(dm.dataloader(SQUARE_16, ReadPlan(done_keys=frozenset(keys[:5]))))
    assert seen == keys[5:] and skipped == 5
    everything = ReadPlan(done_keys=frozenset(keys))
    assert _collect(dm.dataloader(SQUARE_16, everything)) == ([], [], 8)  # one empty batch carries the count


def test_originals_and_bytes_travel_only_when_the_plan_asks(tmp_path: Path):
    make_shards(tmp_path, num_shards=1, per_shard=3, size=8)
    dm = EmerDiffDataModule(urls=str(tmp_path / "in-000000.tar"), batch_size=3, num_workers=0)
    (plain,) = dm.dataloader(SQUARE_16)
    assert plain["original"] == plain["original_bytes"] == [None] * 3
    assert plain["original_size"].tolist() == [[8, 8], [8, 12], [8, 16]]  # the size travels always
    (kept,) = dm.dataloader(SQUARE_16, ReadPlan(keep_bytes=True, keep_originals=True))
    assert [tuple(o.shape) for o in kept["original"]] == [(8, 8, 3), (8, 12, 3), (8, 16, 3)]
    assert all(data.startswith(b"\xff\xd8") for data in kept["original_bytes"])


# ---- decoding -----------------------------------------------------------------------------------------------------


def test_bad_inputs_are_failures_and_good_ones_keep_their_size(mixed_shards: dict):
    dm = EmerDiffDataModule(
        urls=mixed_shards["urls"], batch_size=3, num_workers=0, max_pixels=MIXED_MAX_PIXELS
    )
    sizes: dict[str, tuple[int, int]] = {}
    failures = []
    # square: one model input shape for every image (keep_aspect buckets: tests/test_aspect.py)
    for batch in dm.dataloader(SQUARE_16, ReadPlan(keep_originals=True)):
        assert (
            batch["image"].shape == (len(batch["key"]), 3, 16, 16) and batch["image"].dtype == torch.float32
        )
        if len(batch["key"]):
            assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
        for key, original, size in zip(batch["key"], batch["original"], batch["original_size"], strict=True):
            assert original.dtype == torch.uint8 and original.shape == (*size.tolist(), 3)
            sizes[key] = tuple(size.tolist())
        failures += batch["failures"]
    assert sizes == mixed_shards["good"]
    reasons = {f["key"]: f["reason"] for f in failures}
    for key, word in mixed_shards["bad"].items():
        assert word in reasons[key], (key, reasons[key])
    assert "corrupt" in reasons["lost_a"]  # the truncated tar names the sample it broke in
    assert {f["url"] for f in failures if f["key"] == "lost_a"} == {mixed_shards["corrupt_tar"]}
    assert len(failures) == len(mixed_shards["bad"]) + 1


def test_decoding_normalises_modes_to_rgb():
    good = good_inputs()
    gray = decode_image(good["gray"][1], 10**6)
    assert gray.shape == (30, 20, 3) and (gray[..., 0] == gray[..., 2]).all()
    sixteen = decode_image(good["sixteen_bit"][1], 10**6)  # 0 / 65535 halves → black / white, not clipped
    assert sixteen[:, :11].max() == 0 and sixteen[:, 11:].min() == 255
    rgba = decode_image(good["rgba"][1], 10**6)  # transparent half composited over white
    assert (rgba[:, :15] == 40).all() and (rgba[:, 15:] == 255).all()
    assert decode_image(good["exif_rotated"][1], 10**6).shape == (40, 24, 3)
    cmyk = Image.fromarray(np.full((4, 4, 3), (200, 30, 60), dtype=np.uint8)).convert("CMYK")
    assert np.abs(decode_image(encode(cmyk, "TIFF"), 10**6).astype(int) - (200, 30, 60)).max() <= 2
    assert decode_image(good["palette"][1], 10**6).shape == (16, 24, 3)


@pytest.mark.parametrize("key", sorted(bad_inputs()))
def test_undecodable_inputs_raise_with_a_reason(key: str):
    _, data, word = bad_inputs()[key]
    with pytest.raises(ImageDecodeError, match=word):
        decode_image(data, MIXED_MAX_PIXELS)


def test_pil_decompression_bomb_is_a_failure_not_a_crash():
    bomb = encode(Image.new("1", (12000, 8000)), "PNG")  # 96 Mpx > PIL's MAX_IMAGE_PIXELS: PIL warns
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(bomb, 10**9)


# ---- keys and inputs ---------------------------------------------------------------------------------------------


def test_folder_keys_are_unique_tar_safe_and_dotless(image_folder: dict):
    pairs = list_folder(image_folder["root"])
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)) == len(image_folder["sizes"])  # hidden files and non-images ignored
    assert all("." not in k.rsplit("/", 1)[-1] and " " not in k for k in keys)
    by_path = {Path(p).relative_to(image_folder["root"]).as_posix(): k for k, p in pairs}
    assert by_path["a.jpg"] == "a_jpg" and by_path["a.png"] == "a_png"  # the extension keeps them apart
    assert by_path["x.y.z.jpeg"].startswith(
        "x_y_z_jpeg-"
    )  # dots replaced: a hash of the path keeps it unique
    assert by_path["sub dir/b.c.png"].startswith("sub_dir/b_c_png-")
    assert by_path["sub.dir2/d.webp"].startswith("sub_dir2/d_webp-")
    assert by_path["sub dir/deeper/C.JPG"].endswith("/C_JPG") or "C_JPG-" in by_path["sub dir/deeper/C.JPG"]


def test_file_keys_depend_on_the_path_alone():
    assert file_key("a/b.c/d.e.jpg") != file_key("a/b_c/d_e.jpg") == "a/b_c/d_e_jpg"
    assert file_key("weird name(1).png").startswith("weird_name_1__png-")
    assert file_key("a.jpg") == "a_jpg" and file_key("a.png") == "a_png"


def test_adding_a_file_never_changes_another_files_key(image_folder: dict):
    root = image_folder["root"]
    before = {p: k for k, p in list_folder(root)}
    (root / "a.bmp").write_bytes(
        encode(Image.fromarray(random_rgb(5, 5)), "BMP")
    )  # a third "a", sorted first
    after = {p: k for k, p in list_folder(root)}
    assert all(after[p] == k for p, k in before.items())
    assert len(set(after.values())) == len(after)


def test_folder_input_yields_every_image_once(image_folder: dict):
    dm = EmerDiffDataModule(folder=str(image_folder["root"]), batch_size=4, num_workers=2)
    keys, failures, _ = _collect(dm.dataloader(SQUARE_16))
    assert sorted(keys) == sorted(k for k, _ in list_folder(image_folder["root"]))
    # the one visible file without an image extension is recorded, not silently dropped
    assert [(Path(f["url"]).name, "not an image file" in f["reason"]) for f in failures] == [
        ("notes.txt", True)
    ]


def test_input_errors_name_the_bad_input(tmp_path: Path):
    with pytest.raises(ValueError, match="exactly one input"):
        EmerDiffDataModule()
    with pytest.raises(FileNotFoundError, match="missing"):
        EmerDiffDataModule(urls=str(tmp_path / "missing-{0..3}.tar")).task_units()
    with pytest.raises(FileNotFoundError, match="not a directory"):
        EmerDiffDataModule(folder=str(tmp_path / "nope")).task_units()


def test_sample_with_dotted_fields_uses_its_image_member(tmp_path: Path):
    image = encode(Image.fromarray(random_rgb(9, 7)), "PNG")
    write_tar(tmp_path / "x.tar", [("k", {"meta.json": b"{}", "input.png": image})])
    dm = EmerDiffDataModule(urls=str(tmp_path / "x.tar"), num_workers=0)
    batch = next(iter(dm.dataloader(SQUARE_16)))
    assert batch["key"] == ["k"] and batch["original_size"].tolist() == [[9, 7]]


def test_symlinked_folders_are_followed_once(image_folder: dict):
    root = image_folder["root"]
    (root / "sub dir" / "loop").symlink_to(root, target_is_directory=True)  # a cycle back to the root
    (root / "linked").symlink_to(root / "sub dir" / "deeper", target_is_directory=True)
    keys = [k for k, _ in list_folder(root)]
    assert len(keys) == len(set(keys)) == len(image_folder["sizes"])  # the loop is cut, no image twice
    assert [k for k in keys if k.endswith("/C_JPG")] == [
        "linked/C_JPG"
    ]  # first path in sorted walk order wins


def test_image_member_is_found_next_to_label_maps(tmp_path: Path):
    image = encode(Image.fromarray(random_rgb(9, 7)), "PNG")
    label = encode(Image.fromarray(np.zeros((5, 5), dtype=np.uint8)), "PNG")
    samples = [
        (
            "gt_first",
            {"gt.png": label, "json": b"{}", "png": image},
        ),  # ground-truth shards (convert toyworld)
        ("compound", {"seg.png": label, "input.png": image}),
        ("only_labels", {"gt.png": label, "mask.png": label}),
    ]
    write_tar(tmp_path / "x.tar", samples)
    dm = EmerDiffDataModule(urls=str(tmp_path / "x.tar"), num_workers=0, batch_size=4)
    batch = next(iter(dm.dataloader(SQUARE_16)))
    assert batch["key"] == ["gt_first", "compound"] and batch["original_size"].tolist() == [[9, 7], [9, 7]]
    assert [f["key"] for f in batch["failures"]] == ["only_labels"]
