import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.utilities.data import dim_zero_sum

from emerdiff_pl.commands.evaluate import main
from emerdiff_pl.metrics import (
    BoundaryFScore,
    ConceptIoU,
    GlobalHungarianIoU,
    PerImageHungarianIoU,
    hungarian_miou,
    per_image_matches,
    short_side_center_crop,
)
from emerdiff_pl.shardio import TarWriter


def _t(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.long)


def _global(pred, target, num_classes, num_clusters=None, ignore_index=255):
    m = GlobalHungarianIoU(num_classes, num_clusters, ignore_index=ignore_index)
    m.update(_t(pred), _t(target))
    return m.compute()


TARGET = np.array(
    [
        [0, 0, 0, 1],
        [0, 0, 1, 1],
        [2, 2, 1, 1],
    ]
)  # class 0: 5 px, class 1: 5 px, class 2: 2 px


def test_perfect_prediction_with_permuted_ids_scores_100():
    perm = np.array([7, 2, 4])  # class c predicted as cluster perm[c]
    out = _global(perm[TARGET], TARGET, num_classes=3, num_clusters=8)
    assert float(out["miou"]) == pytest.approx(100.0)
    assert float(out["pixel_accuracy"]) == pytest.approx(100.0)
    assert out["assignment"][7] == 0 and out["assignment"][2] == 1 and out["assignment"][4] == 2
    per_image = PerImageHungarianIoU(3)
    per_image.update(_t(perm[TARGET]), _t(TARGET))
    assert float(per_image.compute()["miou"]) == pytest.approx(100.0)


def test_all_one_cluster_prediction_scores_the_largest_class_only():
    target = np.array([[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 2, 2]])  # 6 / 4 / 2 px
    out = _global(np.zeros_like(target), target, num_classes=3, num_clusters=1)
    # cluster 0 ↔ class 0: IoU0 = 6 / 12; classes 1 and 2 get no cluster: IoU 0.
    assert out["per_class_iou"].tolist() == pytest.approx([50.0, 0.0, 0.0])
    assert float(out["miou"]) == pytest.approx(50.0 / 3)
    assert float(out["pixel_accuracy"]) == pytest.approx(50.0)
    assert out["assignment"].reshape(-1).tolist() == [0]  # torchmetrics returns one-element tensors 0-d


def test_ignore_pixels_are_not_counted():
    target = np.array([[0, 0, 255, 1], [0, 255, 1, 1]])
    pred = np.array([[3, 3, 1, 1], [3, 0, 1, 1]])  # wrong only on ignored pixels
    out = _global(pred, target, num_classes=2, num_clusters=4)
    assert float(out["miou"]) == pytest.approx(100.0)
    assert int(out["confusion"].sum()) == 6
    ignore_zero = _global(np.array([[1, 0]]), np.array([[0, 1]]), num_classes=2, ignore_index=0)
    assert int(ignore_zero["confusion"].sum()) == 1  # only the pixel whose target is not 0


def test_missing_classes_are_nan_and_left_out_of_the_mean():
    target = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 0, 1, 0]])
    out = _global(pred, target, num_classes=4, num_clusters=4)
    iou = out["per_class_iou"].tolist()
    # class 0: TP 2, FP 1 → 2/3; class 1: TP 1, FN 1 → 1/2; classes 2, 3 absent.
    assert iou[0] == pytest.approx(200 / 3) and iou[1] == pytest.approx(50.0)
    assert math.isnan(iou[2]) and math.isnan(iou[3])
    assert float(out["miou"]) == pytest.approx((200 / 3 + 50) / 2)


def test_unmatched_extra_clusters_count_as_wrong_pixels():
    # class 0: 8 px split into cluster 0 (6 px) and cluster 2 (2 px); class 1: 4 px in cluster 1.
    target = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    pred = np.array([[0, 0, 0, 0, 0, 0], [2, 2, 1, 1, 1, 1]])
    out = _global(pred, target, num_classes=2, num_clusters=3)
    assert out["assignment"].tolist() == [0, 1, -1]
    assert out["per_class_iou"].tolist() == pytest.approx(
        [75.0, 100.0]
    )  # cluster 2's pixels are FN of class 0
    assert float(out["miou"]) == pytest.approx(87.5)
    assert float(out["pixel_accuracy"]) == pytest.approx(100 * 10 / 12)


def test_fewer_clusters_than_classes_leave_classes_at_zero():
    target = np.array([[0, 0, 0, 0, 0, 1], [1, 1, 2, 2, 2, 2]])  # 5 / 3 / 4 px
    pred = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    out = _global(pred, target, num_classes=3, num_clusters=2)
    assert out["per_class_iou"].tolist() == pytest.approx([62.5, 0.0, 100.0])
    assert float(out["pixel_accuracy"]) == pytest.approx(75.0)


def test_out_of_range_ids_raise_clear_errors():
    m = GlobalHungarianIoU(2, 2)
    with pytest.raises(ValueError, match="num_clusters"):
        m.update(_t([[0, 5]]), _t([[0, 1]]))
    with pytest.raises(ValueError, match="ground-truth id 7"):
        m.update(_t([[0, 1]]), _t([[0, 7]]))
    with pytest.raises(ValueError, match="same shape"):
        m.update(_t([[0, 1]]), _t([[0, 1, 1]]))


def test_per_image_protocol_hand_example():
    # image 1: segments 5 {c0: 3}, 7 {c0: 1, c1: 2}, 9 {c1: 2}. Best IoU matching: 5→c0 (3/4), 9→c1 (2/4);
    # segment 7 is unmatched: its pixels are FN of c0 and c1, never FP.
    t1, p1 = np.array([[0, 0, 0, 0, 1, 1, 1, 1]]), np.array([[5, 5, 5, 7, 7, 7, 9, 9]])
    # image 2 (two ignored pixels): segments 0 {c1: 2}, 1 {c1: 2, c2: 2}; matching 0→c1, 1→c2.
    t2, p2 = np.array([[1, 1, 1, 1, 255, 255, 2, 2]]), np.array([[0, 0, 1, 1, 1, 1, 1, 1]])
    m = PerImageHungarianIoU(num_classes=4)
    m.update(_t(p1), _t(t1))
    m.update(_t(np.stack([p2])), _t(np.stack([t2])))  # batched input
    out = m.compute()
    assert out["tp"].tolist() == [3, 4, 2, 0]
    assert out["fp"].tolist() == [0, 0, 2, 0]
    assert out["fn"].tolist() == [1, 4, 0, 0]
    iou = out["per_class_iou"].tolist()
    assert iou[:3] == pytest.approx([75.0, 50.0, 50.0]) and math.isnan(iou[3])
    assert float(out["miou"]) == pytest.approx(175 / 3)
    assert float(out["pixel_accuracy"]) == pytest.approx(100 * 9 / 14)


def test_per_image_pairs_without_overlap_are_not_matches():
    # segment 4 {c0: 3, c1: 1}, segment 5 {c0: 1}; the assignment pairs 5 with c1 (zero overlap): not a match.
    tp, fp, fn, pixels = per_image_matches(
        np.array([4, 4, 4, 5, 4]), np.array([0, 0, 0, 0, 1]), num_classes=2
    )
    assert tp.tolist() == [3, 0] and fp.tolist() == [1, 0] and fn.tolist() == [1, 1] and pixels == 5


def test_per_image_is_more_lenient_than_global_on_inconsistent_ids():
    # each image is perfect on its own, but cluster ids mean different classes in each image
    t = np.array([[0, 0, 1, 1]])
    preds, targets = [np.array([[0, 0, 1, 1]]), np.array([[1, 1, 0, 0]])], [t, t]
    assert hungarian_miou(preds, targets, 2, protocol="per-image")["miou"] == pytest.approx(100.0)
    assert hungarian_miou(preds, targets, 2, protocol="global")["miou"] == pytest.approx(100 / 3)


def test_metric_states_are_summed_across_processes():
    rng = np.random.default_rng(0)
    targets = [rng.integers(0, 3, (5, 7)) for _ in range(4)]
    preds = [rng.integers(0, 4, (5, 7)) for _ in range(4)]
    for make in (lambda: GlobalHungarianIoU(3, 4), lambda: PerImageHungarianIoU(3)):
        whole, rank0, rank1 = make(), make(), make()
        assert all(fx is dim_zero_sum for fx in whole._reductions.values())
        for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
            whole.update(_t(p), _t(t))
            (rank0 if i % 2 else rank1).update(_t(p), _t(t))
        rank0.merge_state(rank1)
        a, b = whole.compute(), rank0.compute()
        assert float(a["miou"]) == pytest.approx(float(b["miou"]))
        assert torch.equal(a["per_class_iou"].nan_to_num(-1), b["per_class_iou"].nan_to_num(-1))


def test_hungarian_miou_resizes_predictions_to_the_target():
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    small = np.array([[3, 1]])  # 1×2 → 2×4 nearest
    out = hungarian_miou([small], [target], num_classes=2)
    assert out["miou"] == pytest.approx(100.0) and out["confusion"].shape == (4, 2)


def _write(path, samples):
    with TarWriter(path) as sink:
        for s in samples:
            sink.write(s)


def test_evaluate_cli_matches_by_key_and_reports_unmatched(tmp_path, capsys):
    rng = np.random.default_rng(1)
    gts = {k: rng.integers(0, 3, (8, 10)).astype(np.uint8) for k in "abcd"}
    gts["b"][0, :] = 255
    perm = np.array([2, 0, 1])
    preds = {k: perm[gts[k] % 255 % 3].astype(np.uint8) for k in "abd"}
    preds["d"][:4] = 0  # some errors
    preds["a"] = preds["a"][::2, ::2]  # half size: resized with nearest to the GT
    preds["e"] = np.zeros((8, 10), np.uint8)  # no ground truth
    _write(tmp_path / "gt-000000.tar", [{"__key__": k, "gt.png": gts[k]} for k in "abcd"])
    meta = {"relabel": {"num_classes": 3}}
    _write(tmp_path / "pred-000000.tar", [{"__key__": k, "seg.png": preds[k], "json": meta} for k in "dbae"])

    out = tmp_path / "eval"
    args = ["--pred", str(tmp_path / "pred-000000.tar"), "--gt", str(tmp_path / "gt-000000.tar")]
    assert main([*args, "--num-classes", "3", "--protocol", "both", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    from emerdiff_pl.labelmaps import resize_labels_nearest

    expected = hungarian_miou(
        [resize_labels_nearest(preds[k], gts[k].shape) for k in "dba"], [gts[k] for k in "dba"], 3, 3
    )
    assert report["images_evaluated"] == 3
    assert report["predictions_resized_to_gt"] == 1
    assert report["keys"]["pred_only"] == 1 and report["keys"]["examples_pred_only"] == ["e"]
    assert report["keys"]["gt_only"] == 1 and report["keys"]["examples_gt_only"] == ["c"]
    assert report["global"]["num_clusters"] == 3  # from the relabel info of the prediction JSON
    assert report["global"]["miou"] == pytest.approx(expected["miou"])
    assert report["global"]["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"])
    assert report["per_image"]["miou"] >= report["global"]["miou"] - 1e-9
    assert Image.open(out / "confusion.png").size[0] > 100
    assert "mIoU" in (out / "table.txt").read_text()
    err = capsys.readouterr().err
    assert "predictions only" in err and "ground truth only" in err


def test_evaluate_class_names_take_a_comma_list_and_a_wrong_count_names_the_flag(tmp_path, capsys):
    from emerdiff_pl.cli import main as cli_main

    gt = np.array([[0, 0, 1, 2]], dtype=np.uint8)
    _write(tmp_path / "gt.tar", [{"__key__": "a", "gt.png": gt}])
    _write(tmp_path / "pred.tar", [{"__key__": "a", "seg.png": gt}])
    args = ["evaluate", "--pred", str(tmp_path / "pred.tar"), "--gt", str(tmp_path / "gt.tar")]
    assert (
        cli_main([*args, "--num-classes", "3", "--class-names", "a,b,c", "--out", str(tmp_path / "o")]) == 0
    )
    assert json.loads((tmp_path / "o" / "report.json").read_text())["class_names"] == ["a", "b", "c"]
    capsys.readouterr()
    assert cli_main([*args, "--num-classes", "3", "--class-names", "a,b"]) == 2
    assert "--class-names gives 2 names but --num-classes gives 3 classes" in capsys.readouterr().err
    assert cli_main([*args, "--num-classes", "3", "--class-names", "toyworld"]) == 2  # 7 toy-world classes
    assert "--class-names gives 7 names" in capsys.readouterr().err


def test_evaluate_cli_fails_clearly_when_no_key_matches(tmp_path):
    _write(tmp_path / "gt.tar", [{"__key__": "x", "gt.png": np.zeros((2, 2), np.uint8)}])
    _write(tmp_path / "pred.tar", [{"__key__": "y", "seg.png": np.zeros((2, 2), np.uint8)}])
    with pytest.raises(ValueError, match="same images"):
        main(["--pred", str(tmp_path / "pred.tar"), "--gt", str(tmp_path / "gt.tar"), "--num-classes", "2",
              "--out", str(tmp_path / "o")])  # fmt: skip


def _ddp_worker(rank: int, world: int, port: int, out_path: str, preds: list, targets: list) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = [GlobalHungarianIoU(3, 4), PerImageHungarianIoU(3)]
        for i in range(rank, len(preds), world):  # each rank sees a different share of the images
            for m in metrics:
                m.update(_t(preds[i]), _t(targets[i]))
        results = [m.compute() for m in metrics]  # torchmetrics syncs the summed states here
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_agree_between_two_ddp_processes_and_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    rng = np.random.default_rng(3)
    targets = [rng.integers(0, 3, (6, 9)) for _ in range(5)]
    preds = [rng.integers(0, 4, (6, 9)) for _ in range(5)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, port, out_path, preds, targets), nprocs=2, join=True)
    ddp_global, ddp_per_image = torch.load(out_path)
    single_global = hungarian_miou(preds, targets, 3, 4)
    single_per_image = hungarian_miou(preds, targets, 3, protocol="per-image")
    assert torch.equal(ddp_global["confusion"], torch.from_numpy(single_global["confusion"]))
    assert float(ddp_global["miou"]) == pytest.approx(single_global["miou"])
    assert ddp_per_image["tp"].tolist() == single_per_image["tp"].tolist()
    assert float(ddp_per_image["miou"]) == pytest.approx(single_per_image["miou"])


def test_short_side_center_crop_gives_stegos_square_view():
    labels = np.zeros((40, 80), np.uint8)
    labels[:, 40:] = 1
    labels[:, :10] = 2  # left margin: cropped away
    view = short_side_center_crop(labels, 20)
    assert view.shape == (20, 20)
    assert set(np.unique(view)) == {0, 1} and (view[:, :10] == 0).all() and (view[:, 10:] == 1).all()


# ----------------------------------------------------------------------------------------------------------------
# boundary F-score
# ----------------------------------------------------------------------------------------------------------------

STRIPES = np.array([[0] * 4] * 3 + [[1] * 4] * 3)  # rows 0–2 class 0, rows 3–5 class 1: boundary rows 2 and 3


def _bf(preds, targets, tolerance, protocol="global", num_classes=2, num_clusters=8):
    m = BoundaryFScore(num_classes, num_clusters if protocol == "global" else None, tolerance, protocol)
    for p, t in zip(preds, targets, strict=True):
        m.update(_t(p), _t(t))
    return {k: v.numpy() if v.ndim else float(v) for k, v in m.compute().items()}


@pytest.mark.parametrize("protocol", ["global", "per-image"])
def test_boundary_f_counts_a_one_pixel_shift_as_a_miss_at_tolerance_0_and_a_hit_at_1(protocol):
    exact = np.where(STRIPES == 0, 7, 1)  # the stripes under other ids
    shifted = np.full((6, 4), 7)
    shifted[4:] = 1  # the boundary one row too low
    # by hand, tolerance 0: class 0's boundary row 2 (4 px per image): exact image hits 4/4, shifted 0/4 (its
    # predicted boundary is row 3) → precision = recall = 4 / 8 = 50 %; the same for class 1 → F 50
    out = _bf([exact, shifted], [STRIPES, STRIPES], 0, protocol)
    assert out["per_class_f"].tolist() == pytest.approx([50.0, 50.0])
    assert out["boundary_f"] == pytest.approx(50.0)
    assert out["precision"] == pytest.approx(50.0) and out["recall"] == pytest.approx(50.0)
    assert _bf([exact, shifted], [STRIPES, STRIPES], 1, protocol)["boundary_f"] == pytest.approx(100.0)


def test_boundary_f_precision_and_recall_differ_for_an_extra_boundary_and_an_unmatched_class():
    target = np.array([[0] * 6] * 3 + [[1] * 6] * 3)  # 6×6, boundary rows 2 | 3
    target[4:, 4:] = 2  # a 2×2 class-2 block in the corner: boundary px (4,4) (4,5) (5,4)
    pred = np.where(target == 0, 0, 1)  # class 2 merged into class 1's cluster
    pred[0, :] = 3  # ... and a spurious top stripe: an extra boundary inside class 0
    out = _bf([pred], [target], 0, num_classes=3, num_clusters=4)
    # by hand (4-neighbour boundaries, tolerance 0), matching 0→0, 1→1, class 2 → a cluster with no overlap:
    # class 0: predicted mask rows 1–2, boundary rows 1 and 2 (12 px), 6 of them on the GT boundary (row 2):
    #   precision 50, recall 6/6 = 100 → F 66.67
    # class 1: predicted boundary row 3 (6 px), all on the GT boundary → precision 100; the GT boundary is
    #   row 3 plus (4,3) and (5,3) beside the block (8 px), 6 found → recall 75 → F 85.71
    # class 2: nothing predicted near the block → F 0
    assert out["per_class_f"].tolist() == pytest.approx([200 / 3, 2 * 100 * 75 / 175, 0.0])
    assert out["boundary_f"] == pytest.approx((200 / 3 + 2 * 100 * 75 / 175) / 3)


def test_boundary_f_ignores_pixels_next_to_the_ignore_label():
    target = STRIPES.copy()
    target[2:4, :2] = 255  # the left half of the boundary is unlabelled
    shifted = np.full((6, 4), 7)
    shifted[4:] = 1
    out = _bf([shifted], [target], 0)
    # pixels within 1 px of a 255 pixel count on neither side: only column 3 of the boundary remains, where
    # class 0's GT boundary (2,3) and its predicted one (3,3) miss each other at tolerance 0 → F 0
    assert out["boundary_f"] == pytest.approx(0.0)
    assert _bf([np.where(target == 0, 7, 1)], [target], 0)["boundary_f"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------------------------------------------
# concept-embedding protocol
# ----------------------------------------------------------------------------------------------------------------

# (mask ids, classes, mask embeddings) of three 1×4 images
CONCEPT_IMAGES = [
    ([0, 0, 1, 1], [0, 0, 1, 1], [[1.0, 0.0], [0.0, 1.0]]),
    ([0, 1, 1, 1], [0, 0, 1, 1], [[1.0, 0.0], [1.0, 1.0]]),
    ([0, 0, 0, 0], [1, 1, 1, 1], [[1.0, 0.1]]),
]


def _concept(images, concepts):
    m = ConceptIoU(2, concepts)
    for masks, target, emb in images:
        m.update(_t([masks]), _t([target]), torch.tensor(emb))
    return m.compute()


def test_concept_miou_with_dataset_wide_concepts_matches_the_hand_computation():
    # two images: class 0 concept = mean of its 4 px = (3·[1, 0] + [1, 1]) / 4 = [1, .25]; class 1 = [.5, 1].
    # image 2's mask 1 ([1, 1]): cos .857 to class 0, .949 to class 1 → class 1, so its px 1 (class 0) is wrong:
    # IoU0 = 3 / 4, IoU1 = 4 / 5
    out = _concept(CONCEPT_IMAGES[:2], "dataset")
    assert float(out["miou"]) == pytest.approx((75.0 + 80.0) / 2)
    # the third image (class 1 only) pulls class 1's concept to [.75, .55]; its own mask [1, .1] is nearer to
    # class 0's (cos .989 vs .861): 4 px wrong. IoU0 = 3 / (3 + 1 + 4), IoU1 = 4 / (4 + 1 + 4)
    out = _concept(CONCEPT_IMAGES, "dataset")
    assert out["per_class_iou"].tolist() == pytest.approx([37.5, 400 / 9])
    assert out["confusion"].tolist() == [[3, 4], [1, 4]]


def test_concept_miou_with_per_image_concepts_is_more_lenient():
    # per image: image 1 perfect; image 2 as above (px 1 wrong); image 3 has only class 1 to choose: right.
    out = _concept(CONCEPT_IMAGES, "image")
    assert out["per_class_iou"].tolist() == pytest.approx([75.0, 800 / 9])


def test_concept_miou_takes_the_nearest_concept_by_cosine_not_by_dot_product():
    # class 0's concept [10, 0] is long, class 1's ([.5, .6]·2 + [1, 1]·2) / 4 = [.75, .8] short: the mask
    # [1, 1] has the larger dot product with class 0 (10 vs 1.55) but points along class 1 (cos .707 vs .9995)
    images = [([0, 0, 1, 1], [0, 0, 1, 1], [[10.0, 0.0], [0.5, 0.6]]), ([0, 0], [1, 1], [[1.0, 1.0]])]
    assert float(_concept(images, "dataset")["miou"]) == pytest.approx(100.0)


@pytest.mark.parametrize("concepts", ["image", "dataset"])
def test_concept_protocol_never_picks_a_class_absent_from_the_image(concepts):
    # image A holds classes 0 and 1; its mask 2 ([-1, -1], one pixel of class 0) points away from both concepts
    # (class 0 ≈ [1, 0], class 1 = [0, 1]: cosine −0.71 each) and from class 2's ([1, 1], from image B). A class
    # with no pixel has a zero concept (cosine 0), which would beat them all if it could be chosen.
    image_a = ([0] * 9 + [1] + [2] + [1] * 10, [0] * 11 + [1] * 10, [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    image_b = ([0, 0], [2, 2], [[1.0, 1.0]])
    m = ConceptIoU(4, concepts)
    for masks, target, emb in (image_a, image_b):
        m.update(_t([masks]), _t([target]), torch.tensor(emb))
    confusion = m.compute()["confusion"]  # predicted class × true class
    assert confusion[3].sum() == 0  # class 3 is in no image: never picked
    if concepts == "image":  # per image, only the image's own classes: A's pixels never become 2 (or 3)
        assert confusion[2:, :2].sum() == 0
    assert confusion.sum() == 23


def test_concept_miou_rejects_mask_ids_without_an_embedding():
    with pytest.raises(ValueError, match="relabelled"):
        _concept([([0, 5, 1, 1], [0, 0, 1, 1], [[1.0, 0.0], [0.0, 1.0]])], "image")


# ----------------------------------------------------------------------------------------------------------------
# evaluate CLI: stdout table, boundary F, concept protocol
# ----------------------------------------------------------------------------------------------------------------


def test_evaluate_cli_without_out_prints_the_table_with_boundary_f(tmp_path, capsys):
    gts = {k: STRIPES.astype(np.uint8) for k in "ab"}
    preds = {
        "a": np.where(STRIPES == 0, 2, 0).astype(np.uint8),
        "b": np.where(STRIPES == 0, 2, 0).astype(np.uint8),
    }
    _write(tmp_path / "gt.tar", [{"__key__": k, "gt.png": gts[k]} for k in "ab"])
    _write(tmp_path / "pred.tar", [{"__key__": k, "seg.png": preds[k]} for k in "ab"])
    args = ["--pred", str(tmp_path / "pred.tar"), "--gt", str(tmp_path / "gt.tar"), "--num-classes", "2"]
    assert main([*args, "--num-clusters", "3", "--protocol", "both"]) == 0
    out = capsys.readouterr().out
    assert "2 images scored" in out and "mIoU" in out and "boundary F (2 px)" in out
    assert "BF global" in out and "BF per-image" in out and "100.00" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt.tar", "pred.tar"]  # nothing written


def test_evaluate_cli_concept_protocol_reads_embeddings_and_refuses_relabelled_shards(tmp_path, capsys):
    samples, gts = [], []
    for i, (masks, target, emb) in enumerate(CONCEPT_IMAGES):
        key = f"k{i}"
        gts.append({"__key__": key, "gt.png": np.array([target], np.uint8)})
        samples.append(
            {"__key__": key, "seg.png": np.array([masks], np.uint8), "emb.npy": np.array(emb, np.float16)}
        )
    _write(tmp_path / "gt.tar", gts)
    _write(tmp_path / "pred.tar", samples)
    args = ["--pred", str(tmp_path / "pred.tar"), "--gt", str(tmp_path / "gt.tar"), "--num-classes", "2"]
    assert main([*args, "--protocol", "concept", "--out", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    expected = _concept(CONCEPT_IMAGES, "dataset")  # float16 embeddings: the same nearest concepts
    assert report["concept"]["miou"] == pytest.approx(float(expected["miou"]))
    assert report["concept_per_image"]["miou"] == pytest.approx((75.0 + 800 / 9) / 2)
    assert "IoU concept" in capsys.readouterr().out
    relabelled = [{**s, "json": {"relabel": {"num_classes": 2}}} for s in samples]
    _write(tmp_path / "relabelled.tar", relabelled)
    with pytest.raises(ValueError, match="relabelled"):
        main(["--pred", str(tmp_path / "relabelled.tar"), *args[2:], "--protocol", "concept"])


def test_evaluate_cli_reads_label_fields_of_any_name_raw(tmp_path, capsys):
    """`--pred-field` / `--gt-field` named unlike the usual label fields are still read as raw ids, not as
    pictures converted to RGB (which scored garbage or failed)."""
    gts = {k: STRIPES.astype(np.uint8) for k in "ab"}
    preds = {k: np.where(STRIPES == 0, 2, 0).astype(np.uint8) for k in "ab"}
    _write(tmp_path / "gt.tar", [{"__key__": k, "truth.png": gts[k]} for k in "ab"])
    _write(tmp_path / "pred.tar", [{"__key__": k, "pseudo.png": preds[k]} for k in "ab"])
    args = ["--pred", str(tmp_path / "pred.tar"), "--gt", str(tmp_path / "gt.tar"), "--num-classes", "2"]
    fields = ["--pred-field", "pseudo.png", "--gt-field", "truth.png", "--num-clusters", "3"]
    assert main([*args, *fields, "--protocol", "global", "--out", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    # one count per pixel: a label map read as an RGB picture counts every pixel three times
    assert np.asarray(report["global"]["confusion"]).sum() == 2 * STRIPES.size
    assert report["global"]["miou"] == pytest.approx(100.0)


def test_named_scores_refuse_ids_beyond_the_classes_but_not_ignore():
    """Class ids ≥ C (other than 255 = ignore) are named, for numpy label maps and tensors alike; the named
    assignment maps 255 to the ignore row."""
    from emerdiff_pl.labelmaps import ids_beyond_classes
    from emerdiff_pl.metrics import named_ids

    labels = np.array([[0, 2, 255], [9, 3, 9]], np.uint8)
    assert ids_beyond_classes(labels, 3) == [3, 9] and ids_beyond_classes(torch.from_numpy(labels), 10) == []
    assert named_ids(torch.tensor([[0, 255, 2]]), 3).tolist() == [[0, 3, 2]]
    with pytest.raises(ValueError, match=r"predicted class ids \[3, 9\] are ≥ the 3 classes"):
        named_ids(torch.from_numpy(labels), 3)
