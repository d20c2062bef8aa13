import json
import os

import numpy as np
import pytest

from emerdiff_pl.commands.relabel import main
from emerdiff_pl.relabel import MaskReservoir
from emerdiff_pl.shardio import TarWriter, iter_samples

D, K, GROUPS = 8, 4, 3
CENTERS = np.random.default_rng(123).normal(size=(GROUPS, D)) * 10


def _write_predictions(folder, num_images, seed, images_per_shard=10, with_image=False):
    """Prediction shards whose mask embeddings come from GROUPS known groups; returns {key: groups of masks}."""
    rng = np.random.default_rng(seed)
    truth = {}
    os.makedirs(folder, exist_ok=True)
    for shard_start in range(0, num_images, images_per_shard):
        with TarWriter(os.path.join(folder, f"pred-{shard_start // images_per_shard:06d}.tar")) as sink:
            for i in range(shard_start, min(num_images, shard_start + images_per_shard)):
                groups = rng.integers(0, GROUPS, K)
                emb = CENTERS[groups] + rng.normal(size=(K, D)) * 0.3
                lowres = rng.permutation(np.arange(16) % K).reshape(4, 4).astype(np.uint8)
                seg = np.kron(lowres, np.ones((3, 2), np.uint8))  # 12×8 "image-size" map
                key = f"s{seed}-{i:04d}"
                sample = {
                    "__key__": key,
                    "seg.png": seg,
                    "lowres.png": lowres,
                    "emb.npy": emb.astype(np.float16),
                    "json": {"num_masks": K, "original_size": [12, 8]},
                }
                if with_image:
                    sample["jpg"] = rng.integers(0, 256, (12, 8, 3), dtype=np.uint8)
                    sample["overlay.jpg"] = np.zeros((12, 8, 3), np.uint8)
                elif i % 2:
                    sample["overlay.jpg"] = np.zeros((12, 8, 3), np.uint8)  # stale, cannot be redrawn
                sink.write(sample)
                truth[key] = (groups, seg, lowres)
    return truth


def _check_consistent(out_dir, truth):
    """Every mask of a group got the same global id, distinct groups distinct ids; returns group → id."""
    group_to_id = {}
    samples = list(iter_samples(os.path.join(out_dir, "pred-*.tar")))
    assert [s["__key__"] for s in samples] == list(truth)
    for s in samples:
        groups, seg, lowres = truth[s["__key__"]]
        mapping = np.asarray(s["json"]["relabel"]["mapping"])
        assert np.array_equal(s["seg.png"], mapping[seg])
        assert np.array_equal(s["lowres.png"], mapping[lowres])
        assert s["json"]["num_masks"] == K  # the rest of the metadata is kept
        assert s["emb.npy"].shape == (K, D)
        for g, m in zip(groups, mapping, strict=True):
            assert group_to_id.setdefault(int(g), int(m)) == int(m)
    assert sorted(group_to_id.values()) == list(range(GROUPS))
    return group_to_id, samples


def test_relabel_recovers_known_groups_and_keeps_keys(tmp_path):
    truth = _write_predictions(tmp_path / "pred", 30, seed=0)
    out = tmp_path / "out"
    assert (
        main(["--input", str(tmp_path / "pred"), "--num-classes", "3", "--output", str(out), "--n-init", "2"])
        == 0
    )
    group_to_id, samples = _check_consistent(out, truth)
    assert sorted(os.listdir(out)) == ["centroids.npy", "pred-000000.tar", "pred-000001.tar", "pred-000002.tar",
                                       "relabel.json"]  # fmt: skip
    centroids = np.load(out / "centroids.npy")
    for g, c in group_to_id.items():
        assert np.abs(centroids[c] - CENTERS[g]).max() < 0.5
    report = json.loads((out / "relabel.json").read_text())
    assert report["images"] == 30 and report["total_masks"] == 30 * K and report["num_classes"] == 3
    assert sum(report["pixels_per_class"]) == 30 * 12 * 8
    # stale per-image overlays cannot be redrawn without the image: they are dropped, never kept wrong
    assert all("overlay.jpg" not in s for s in samples)


def test_saved_centroids_give_the_same_mapping_on_new_data(tmp_path):
    truth = _write_predictions(tmp_path / "pred", 20, seed=0)
    first = tmp_path / "first"
    main(["--input", str(tmp_path / "pred"), "--num-classes", "3", "--output", str(first)])
    first_map, _ = _check_consistent(first, truth)
    new_truth = _write_predictions(tmp_path / "new", 10, seed=5)
    second = tmp_path / "second"
    main(
        [
            "--input",
            str(tmp_path / "new"),
            "--centroids",
            str(first / "centroids.npy"),
            "--output",
            str(second),
        ]
    )
    second_map, _ = _check_consistent(second, new_truth)
    assert first_map == second_map


def test_subsampled_fit_is_seeded_and_still_recovers_groups(tmp_path):
    truth = _write_predictions(tmp_path / "pred", 30, seed=1)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        args = ["--input", str(tmp_path / "pred"), "--num-classes", "3", "--output", str(out)]
        main([*args, "--max-fit-masks", "24", "--seed", "7"])
        _check_consistent(out, truth)
        runs.append(np.load(out / "centroids.npy"))
        assert json.loads((out / "relabel.json").read_text())["fit_masks"] == 24
    assert np.array_equal(runs[0], runs[1])


def test_fit_weighs_masks_by_area(tmp_path):
    a, b = np.zeros(D), np.full(D, 16.0)
    with TarWriter(tmp_path / "pred" / "p.tar") as sink:
        for i in range(3):
            lowres = np.zeros((4, 4), np.uint8)
            lowres[0, 0] = 1  # mask 0: 15 cells, mask 1: 1 cell
            sink.write({"__key__": f"k{i}", "seg.png": lowres, "lowres.png": lowres,
                        "emb.npy": np.stack([a, b]).astype(np.float16), "json": {}})  # fmt: skip
    main(["--input", str(tmp_path / "pred" / "p.tar"), "--num-classes", "1", "--output", str(tmp_path / "o")])
    centroid = np.load(tmp_path / "o" / "centroids.npy")[0]
    assert np.allclose(centroid, (15 * a + 1 * b) / 16, atol=1e-4)


def test_overlay_is_redrawn_with_global_ids_when_the_image_is_there(tmp_path):
    truth = _write_predictions(tmp_path / "pred", 4, seed=2, with_image=True)
    main(["--input", str(tmp_path / "pred"), "--num-classes", "3", "--output", str(tmp_path / "o")])
    for s in iter_samples(str(tmp_path / "o" / "pred-000000.tar")):
        assert s["overlay.jpg"].shape == (12, 8, 3) and s["overlay.jpg"].max() > 0
    assert len(truth) == 4


def test_reservoir_keeps_a_uniform_seeded_sample():
    def fill(seed):
        r = MaskReservoir(100, seed)
        for start in range(0, 1000, 10):
            ids = np.arange(start, start + 10, dtype=np.float32)
            r.add(np.repeat(ids[:, None], 2, axis=1), np.ones(10))
        return r.arrays()[0][:, 0]

    sample = fill(0)
    assert len(sample) == 100 and len(np.unique(sample)) == 100
    assert 30 <= (sample < 500).sum() <= 70  # both halves of the stream are represented
    assert np.array_equal(sample, fill(0)) and not np.array_equal(sample, fill(1))


def test_relabel_needs_num_classes_or_centroids(tmp_path, capsys):
    _write_predictions(tmp_path / "pred", 2, seed=0)
    assert main(["--input", str(tmp_path / "pred"), "--output", str(tmp_path / "o")]) == 2
    assert "--num-classes" in capsys.readouterr().err
    with pytest.raises(ValueError, match="only 8 masks"):
        main(["--input", str(tmp_path / "pred"), "--num-classes", "9", "--output", str(tmp_path / "o")])


@pytest.mark.slow
def test_parallel_workers_write_the_same_shards(tmp_path):
    truth = _write_predictions(tmp_path / "pred", 30, seed=4)
    base = ["--input", str(tmp_path / "pred"), "--num-classes", "3", "--seed", "1"]
    main([*base, "--output", str(tmp_path / "one")])
    main([*base, "--output", str(tmp_path / "two"), "--workers", "2"])
    _check_consistent(tmp_path / "two", truth)
    for a, b in zip(iter_samples(str(tmp_path / "one")), iter_samples(str(tmp_path / "two")), strict=True):
        assert a["__key__"] == b["__key__"]
        assert np.array_equal(a["seg.png"], b["seg.png"]) and np.array_equal(a["lowres.png"], b["lowres.png"])
    one = json.loads((tmp_path / "one" / "relabel.json").read_text())
    two = json.loads((tmp_path / "two" / "relabel.json").read_text())
    assert one["pixels_per_class"] == two["pixels_per_class"] and two["images"] == 30
