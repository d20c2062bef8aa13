import numpy as np
import pytest
from PIL import Image

from emerdiff_pl.commands.show import main
from emerdiff_pl.labelmaps import boundaries
from emerdiff_pl.shardio import TarWriter
from emerdiff_pl.viz import (
    BOUNDARY_COLOR,
    colorize,
    display_ids,
    match_to_gt,
    overlay,
    palette,
)


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


def test_match_to_gt_pairs_ids_by_shared_pixels_and_leaves_extra_clusters_unmatched():
    gt = np.array([[3, 3, 0, 0], [3, 3, 0, 255]])
    pred = np.array([[1, 1, 5, 5], [1, 7, 5, 5]])  # 7: one stray pixel of class 3, fewer pixels than id 1
    mapping = match_to_gt([(pred, gt)])
    assert mapping == {1: 3, 5: 0}  # 7 loses the Hungarian match to 1; ignore (255) pixels never count
    ids = display_ids(pred, mapping, num_gt=4)
    assert (
        ids[0, 0] == 3 and ids[0, 2] == 0 and ids[1, 1] == 4 + 7
    )  # unmatched: a colour after the GT classes


def _cell_colour(sheet: np.ndarray, column: int, fx: float, key_len: int, cell: int = 64) -> tuple:
    """Colour at fraction fx across the middle of one cell of the first row (the layout of contact_sheet)."""
    pad, head, cell_w = 6, 24, cell * 4 // 3
    label_w = min(max(8 * key_len, 60) + pad, 220)
    x = label_w + pad + column * (cell_w + pad) + int(cell_w * fx)
    return tuple(sheet[head + cell // 2, x])


def test_show_colours_predicted_ids_like_the_gt_class_they_match(tmp_path):
    gt = np.zeros((32, 40), np.uint8)
    gt[:, 20:] = 3
    seg = np.where(gt == 3, 1, 5).astype(np.uint8)  # cluster 1 is class 3, cluster 5 is class 0
    with TarWriter(tmp_path / "pred.tar") as pred, TarWriter(tmp_path / "gt.tar") as truth:
        pred.write({"__key__": "k", "seg.png": seg, "lowres.png": seg[::4, ::4]})
        truth.write({"__key__": "k", "jpg": np.zeros((32, 40, 3), np.uint8), "gt.png": gt})
    out = tmp_path / "sheet.png"
    args = [
        "--input",
        str(tmp_path / "pred.tar"),
        "--gt",
        str(tmp_path / "gt.tar"),
        "--out",
        str(out),
        "--cell",
        "64",
    ]
    assert main(args) == 0
    sheet = np.asarray(Image.open(out).convert("RGB"))
    for fx in (0.25, 0.75):  # left (class 0) and right (class 3) halves: low-res column (2) == GT column (3)
        assert _cell_colour(sheet, 2, fx, 1) == _cell_colour(sheet, 3, fx, 1)
    assert main([*args, "--match", "none"]) == 0  # fixed colours per id: cluster 5 is not class 0's colour
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert _cell_colour(sheet, 2, 0.25, 1) != _cell_colour(sheet, 3, 0.25, 1)


def test_show_reads_images_from_the_folder_predict_read(tmp_path, capsys):
    from emerdiff_pl.paths import list_folder

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(folder / "a.jpg")
    ((key, _),) = list_folder(folder)
    with TarWriter(tmp_path / "pred.tar") as pred:
        pred.write(
            {
                "__key__": key,
                "seg.png": np.zeros((30, 40), np.uint8),
                "lowres.png": np.zeros((4, 4), np.uint8),
            }
        )
    out = tmp_path / "sheet.png"
    assert (
        main(
            [
                "--input",
                str(tmp_path / "pred.tar"),
                "--images",
                str(folder),
                "--out",
                str(out),
                "--cell",
                "64",
            ]
        )
        == 0
    )
    assert "no image found" not in capsys.readouterr().err
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert abs(int(_cell_colour(sheet, 0, 0.5, len(key))[0]) - 200) <= 3  # the image column holds the photo
