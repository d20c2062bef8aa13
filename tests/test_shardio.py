import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from emerdiff_pl.shardio import (
    ShardIndex,
    ShardSequenceWriter,
    TarWriter,
    encode_label_png,
    expand_urls,
    iter_samples,
    read_label_png,
    resize_labels_nearest,
)


def _image(h=6, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_uint16_labels_round_trip_through_shards(tmp_path):
    seg = np.array([[0, 300, 65535], [7, 256, 1]], dtype=np.uint16)
    lowres = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    emb = np.arange(12, dtype=np.float16).reshape(4, 3)
    with TarWriter(tmp_path / "a-000000.tar") as sink:
        sink.write(
            {"__key__": "img0", "seg.png": seg, "lowres.png": lowres, "emb.npy": emb, "json": {"k": 1}}
        )
    with TarWriter(tmp_path / "a-000001.tar") as sink:
        sink.write({"__key__": "img1", "seg.png": seg[:, :2].astype(np.uint8), "jpg": _image()})

    samples = list(iter_samples(str(tmp_path / "a-{000000..000001}.tar")))
    assert [s["__key__"] for s in samples] == ["img0", "img1"]
    first, second = samples
    assert first["seg.png"].dtype == np.uint16 and np.array_equal(first["seg.png"], seg)
    assert first["lowres.png"].dtype == np.uint8 and np.array_equal(first["lowres.png"], lowres)
    assert first["emb.npy"].dtype == np.float16 and np.array_equal(first["emb.npy"], emb)
    assert first["json"] == {"k": 1}
    assert first["__url__"].endswith("a-000000.tar")
    assert second["seg.png"].dtype == np.uint8
    assert second["jpg"].shape == (6, 8, 3) and second["jpg"].dtype == np.uint8


def test_label_png_uses_8_bit_when_ids_fit_else_16_bit():
    small = np.array([[0, 255]], dtype=np.int64)
    large = np.array([[0, 256]], dtype=np.int64)
    assert Image.open(io.BytesIO(encode_label_png(small))).mode == "L"
    assert Image.open(io.BytesIO(encode_label_png(large))).mode.startswith("I;16")
    assert read_label_png(encode_label_png(large)).dtype == np.uint16
    with pytest.raises(ValueError, match="negative"):
        encode_label_png(np.array([[-1, 0]]))


def test_palette_png_is_read_as_raw_indices_not_colours():
    labels = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    im = Image.new("P", (2, 2))
    im.putdata(labels.reshape(-1).tolist())
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * (256 * 3 - 12))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    out = read_label_png(buf.getvalue())
    assert out.ndim == 2 and np.array_equal(out, labels)


def test_webdataset_key_convention_with_dots_and_folders(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("dir/abc.seg.png", encode_label_png(np.zeros((2, 2)))), ("dir/abc.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = iter_samples(str(path))
    assert sample["__key__"] == "dir/abc"
    assert set(sample) == {"__key__", "__url__", "seg.png", "json"}


def test_field_filter_skips_other_fields(tmp_path):
    with TarWriter(tmp_path / "s.tar") as sink:
        sink.write({"__key__": "k", "seg.png": np.zeros((2, 2), np.uint8), "jpg": _image()})
    (sample,) = iter_samples(str(tmp_path / "s.tar"), fields={"seg.png"})
    assert "jpg" not in sample and "seg.png" in sample


def test_missing_shard_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope-000000.tar"):
        expand_urls(str(tmp_path / "nope-{000000..000001}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_urls(str(tmp_path / "*.tar"))


def test_directory_expands_to_sorted_shards(tmp_path):
    for i in (1, 0):
        with TarWriter(tmp_path / f"s-{i}.tar") as sink:
            sink.write({"__key__": f"k{i}", "json": {}})
    assert [os.path.basename(u) for u in expand_urls(str(tmp_path))] == ["s-0.tar", "s-1.tar"]


def test_failed_writer_leaves_no_shard_under_the_final_name(tmp_path):
    target = tmp_path / "out.tar"
    with pytest.raises(RuntimeError), TarWriter(target) as sink:
        sink.write({"__key__": "k", "json": {}})
        raise RuntimeError("boom")
    assert not target.exists() and not (tmp_path / "out.tar.tmp").exists()


def test_sequence_writer_splits_by_maxcount(tmp_path):
    with ShardSequenceWriter(str(tmp_path / "x-%06d.tar"), maxcount=2) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "json": {"i": i}})
    assert [os.path.basename(p) for p in sink.written] == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    assert [s["json"]["i"] for s in iter_samples(str(tmp_path / "x-{000000..000002}.tar"))] == list(range(5))


def test_shard_index_reads_samples_by_key_in_any_order(tmp_path):
    with ShardSequenceWriter(str(tmp_path / "x-%06d.tar"), maxcount=2) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "gt.png": np.full((3, 3), i, np.uint8), "jpg": _image(seed=i)})
    with ShardIndex(str(tmp_path), fields={"gt.png"}) as index:
        assert sorted(index.keys()) == [f"k{i}" for i in range(5)]
        for i in (4, 0, 2):
            sample = index.get(f"k{i}")
            assert set(sample) == {"__key__", "__url__", "gt.png"}
            assert np.array_equal(sample["gt.png"], np.full((3, 3), i, np.uint8))
        with pytest.raises(KeyError, match="k9"):
            index.get("k9")


def test_resize_labels_nearest_keeps_ids_and_blocks():
    labels = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    up = resize_labels_nearest(labels, (4, 6))
    assert up.dtype == np.uint16 and up.shape == (4, 6)
    assert np.array_equal(up[:2, :3], np.zeros((2, 3))) and np.array_equal(up[2:, 3:], np.full((2, 3), 3))
    assert resize_labels_nearest(labels, (2, 2)) is labels
