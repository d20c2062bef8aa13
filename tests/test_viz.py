import numpy as np
import pytest
from PIL import Image

from emerdiff_pl.shardio import TarWriter
from emerdiff_pl.viz import BOUNDARY_COLOR, boundaries, colorize, main, overlay, palette


def test_palette_is_deterministic_distinct_and_prefix_stable():
    big = palette(300)
    assert big.shape == (300, 3) and big.dtype == np.uint8
    assert len({tuple(c) for c in big[:256]}) == 256  # no two of the first 256 ids share a colour
    assert np.array_equal(palette(27), big[:27])  # colour of id i does not depend on n
    assert np.array_equal(palette(300), big)
    first = palette(27).astype(int)
    gaps = [np.abs(first[i] - first[j]).sum() for i in range(27) for j in range(i + 1, 27)]
    assert min(gaps) >= 100  # any two classes of a 27-class dataset are told apart
    assert palette(0).shape == (0, 3)


def test_colorize_uses_the_palette_and_blacks_out_ignore():
    labels = np.array([[0, 1], [2, 255]])
    rgb = colorize(labels, ignore_index=255)
    pal = palette(3)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert np.array_equal(rgb[0, 0], pal[0]) and np.array_equal(rgb[1, 0], pal[2])
    assert rgb[1, 1].tolist() == [0, 0, 0]


def test_overlay_blends_interiors_and_draws_boundaries():
    image = np.full((6, 6, 3), 100, np.uint8)
    labels = np.zeros((6, 6), np.int64)
    labels[:, 3:] = 1
    out = overlay(image, labels, alpha=0.5)
    assert out.shape == (6, 6, 3) and out.dtype == np.uint8
    edge = boundaries(labels)
    assert edge[:, 2].all() and not edge[:, :2].any() and not edge[:, 3:].any()
    assert (out[edge] == BOUNDARY_COLOR).all()
    expected = np.rint(0.5 * 100 + 0.5 * palette(2)[0].astype(float)).astype(np.uint8)
    assert np.array_equal(out[0, 0], expected)
    plain = overlay(image, labels, alpha=0.0, draw_boundaries=False)
    assert np.array_equal(plain, image)
    solid = overlay(image, labels, alpha=1.0, draw_boundaries=False)
    assert np.array_equal(solid[0, 5], palette(2)[1])


def test_overlay_resizes_low_res_labels_to_the_image():
    image = np.zeros((8, 12, 3), np.uint8)
    low = np.array([[0, 1], [2, 3]])
    out = overlay(image, low, alpha=1.0, draw_boundaries=False)
    assert out.shape == (8, 12, 3)
    assert np.array_equal(out[0, 0], palette(4)[0]) and np.array_equal(out[7, 11], palette(4)[3])
    with pytest.raises(ValueError, match="H×W×3"):
        overlay(np.zeros((4, 4)), low)


def _shards(tmp_path, with_image):
    rng = np.random.default_rng(0)
    with TarWriter(tmp_path / "pred.tar") as sink, TarWriter(tmp_path / "src.tar") as src:
        for i in range(3):
            image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
            lowres = rng.integers(0, 5, (4, 4)).astype(np.uint8)
            sample = {"__key__": f"k{i}", "seg.png": np.kron(lowres, np.ones((8, 10), np.uint8))[:30],
                      "lowres.png": lowres}  # fmt: skip
            if with_image:
                sample["jpg"] = image
            sink.write(sample)
            src.write({"__key__": f"k{i}", "jpg": image, "gt.png": np.zeros((30, 40), np.uint8)})


def test_show_writes_a_contact_sheet_with_one_row_per_sample(tmp_path):
    _shards(tmp_path, with_image=True)
    out = tmp_path / "grid.png"
    assert main(["--input", str(tmp_path / "pred.tar"), "--out", str(out), "--n", "2", "--cell", "64"]) == 0
    one_row = Image.open(out)
    main(["--input", str(tmp_path / "pred.tar"), "--out", str(out), "--n", "3", "--cell", "64"])
    sheet = Image.open(out)
    assert sheet.width == one_row.width and sheet.height - one_row.height == 64 + 6  # one more row
    assert len(np.unique(np.asarray(sheet).reshape(-1, 3), axis=0)) > 50  # pictures, not a blank canvas


def test_show_takes_images_from_source_shards_by_key(tmp_path, capsys):
    _shards(tmp_path, with_image=False)
    out = tmp_path / "grid.png"
    args = ["--input", str(tmp_path / "pred.tar"), "--out", str(out), "--cell", "64"]
    main([*args, "--images", str(tmp_path / "src.tar"), "--gt", str(tmp_path / "src.tar"),
          "--class-names", "cocostuff27"])  # fmt: skip
    assert "no image found" not in capsys.readouterr().err
    with_gt = Image.open(out)
    main(args)
    assert "no image found" in capsys.readouterr().err
    assert with_gt.width > Image.open(out).width  # the ground-truth column
