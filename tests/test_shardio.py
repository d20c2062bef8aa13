import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from emerdiff_pl.codec import (
    decode_field,
    decode_image,
    encode_jpeg,
    encode_label_png,
    image_field,
    read_label_png,
)
from emerdiff_pl.labelmaps import resize_labels_nearest
from emerdiff_pl.paths import expand_urls, safe_key
from emerdiff_pl.shardio import (
    ShardIndex,
    ShardReadError,
    ShardSequenceWriter,
    TarWriter,
    iter_samples,
    iter_tar,
    tar_keys,
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
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the hidden temporary file


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


# ---- one shard layer: truncation, keys, URLs, decoding -------------------------------------------------------


def _three_sample_tar(path):
    with TarWriter(path) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "jpg": _image(seed=i), "json": {"i": i}})
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]  # header offsets: k0.jpg k0.json k1.jpg k1.json ...


@pytest.mark.parametrize("where", ["at_header", "inside_header", "end_blocks_missing"])
def test_truncated_tar_is_detected_where_tarfile_sees_a_normal_end(tmp_path, where):
    path = tmp_path / "s.tar"
    offsets = _three_sample_tar(path)
    data = path.read_bytes()
    cut = {"at_header": offsets[2], "inside_header": offsets[2] + 100, "end_blocks_missing": None}[where]
    if cut is None:  # every member complete, but the end-of-archive blocks are gone
        with tarfile.open(path) as tar:
            last = tar.getmembers()[-1]
        cut = last.offset_data + -(-last.size // 512) * 512
    path.write_bytes(data[:cut])
    with tarfile.open(path) as tar:  # Python's tarfile reads this as a shorter, valid archive
        assert len(tar.getmembers()) == {"at_header": 2, "inside_header": 2}.get(where, 6)
    items = list(iter_tar(str(path)))
    *samples, last_item = items
    assert last_item.fatal and "truncated tar after" in last_item.reason
    # the sample being read at the cut is not trusted either (it may have lost members): it names the failure
    assert [s.key for s in samples] == (["k0", "k1"] if where == "end_blocks_missing" else [])
    assert last_item.key == ("k2" if where == "end_blocks_missing" else "k0")
    with pytest.raises(ShardReadError, match=r"s\.tar.*truncated tar after"):
        list(iter_samples(str(path)))
    with pytest.raises(ShardReadError, match="truncated"):
        ShardIndex(str(path))
    with pytest.raises(ShardReadError, match="truncated"):
        tar_keys(path)


def test_complete_tar_reads_without_failures(tmp_path):
    _three_sample_tar(tmp_path / "s.tar")
    items = list(iter_tar(str(tmp_path / "s.tar")))
    assert [i.key for i in items] == ["k0", "k1", "k2"] and all(i.reason is None for i in items)


def test_member_without_extension_is_reported_not_silently_dropped(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.jpg", "README", "__index__", "b.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    items = list(iter_tar(str(path)))
    assert sorted((i.key, i.fields is None) for i in items) == [("README", True), ("a", False), ("b", False)]
    (stray,) = [i for i in items if i.fields is None]
    assert "no extension" in stray.reason and not stray.fatal


def test_safe_key_removes_path_traversal_and_awkward_characters():
    assert safe_key("../escape") == "__/escape"
    assert safe_key("/abs/key") == "abs/key"
    assert safe_key("a/./b\\c d") == "a/b/c_d"
    assert safe_key("dir/s00_001") == "dir/s00_001"  # safe keys are unchanged


def test_writer_refuses_unsafe_keys(tmp_path):
    with pytest.raises(ValueError, match="awkward"), TarWriter(tmp_path / "s.tar") as sink:
        sink.write({"__key__": "../escape", "json": {}})
    assert list(tmp_path.iterdir()) == []


def test_expand_urls_keeps_remote_urls_and_refuses_duplicates(tmp_path):
    _three_sample_tar(tmp_path / "s.tar")
    remote = "pipe:cat " + str(tmp_path / "s-{0..1}.tar")
    assert expand_urls(remote) == [f"pipe:cat {tmp_path}/s-0.tar", f"pipe:cat {tmp_path}/s-1.tar"]
    with pytest.raises(ValueError, match="more than once"):
        expand_urls(f"{tmp_path / 's.tar'}::{tmp_path}")


def test_remote_pipe_urls_are_read_like_local_files(tmp_path):
    _three_sample_tar(tmp_path / "s.tar")
    local = [s["__key__"] for s in iter_samples(str(tmp_path / "s.tar"))]
    assert (
        [s["__key__"] for s in iter_samples(f"pipe:cat {tmp_path / 's.tar'}")] == local == ["k0", "k1", "k2"]
    )


def test_every_reader_decodes_images_like_predict_does():
    """One decoder: show / relabel / evaluate get the same RGB as predict (alpha composited, 16-bit scaled)."""
    from conftest import good_inputs

    for key, (ext, data, hw) in good_inputs().items():
        rgb = decode_image(data)
        assert rgb.shape == (*hw, 3) and rgb.dtype == np.uint8, key
        assert np.array_equal(decode_field(ext, data), rgb), key
        assert np.array_equal(decode_field(f"input.{ext}", data), rgb), key
    rgba = good_inputs()["rgba"][1]
    assert (decode_field("png", rgba)[:, 15:] == 255).all()  # transparent half over white, not black


def test_label_fields_stay_raw_and_are_not_taken_for_the_image():
    labels = np.array([[0, 300]], dtype=np.uint16)
    data = encode_label_png(labels)
    for field in ("gt.png", "seg.png", "lowres.png", "mask.png"):
        assert np.array_equal(decode_field(field, data), labels)
    assert image_field({"gt.png": b"label", "overlay.jpg": b"o", "input.png": b"img"}) == b"img"


def test_jpeg_is_downscaled_to_fit_its_side_limit():
    wide = np.zeros((1, 70000, 3), np.uint8)
    assert decode_image(encode_jpeg(wide)).shape == (1, 65500, 3)
