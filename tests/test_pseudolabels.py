"""Training on the output: writer.include_image, PseudoLabelDataset (join, workers, shuffle), its DataModule."""

import io
import re
import tarfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import ColourQuantizer, encode, good_inputs, random_rgb, write_tar
from PIL import Image

from emerdiff_pl.codec import decode_image, encode_label_png
from emerdiff_pl.data import EmerDiffDataModule
from emerdiff_pl.datasets import toyworld
from emerdiff_pl.pseudolabels import PseudoLabelDataModule, PseudoLabelDataset, pseudolabel_loader
from emerdiff_pl.shardio import ShardReadError, TarWriter, iter_raw_samples
from emerdiff_pl.writer import PseudoLabelWriter


def predict(output_dir: Path, include_image: bool, **data) -> None:
    data = {"batch_size": 2, "num_workers": 0, **data}
    writer = PseudoLabelWriter(str(output_dir), include_image=include_image)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=[writer]
    )
    trainer.predict(ColourQuantizer(), datamodule=EmerDiffDataModule(**data), return_predictions=False)


def raw_output(output_dir: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in iter_raw_samples(sorted(str(p) for p in output_dir.glob("*.tar")))}


@pytest.fixture
def varied_inputs(tmp_path: Path) -> dict:
    """A shard of JPEG, PNG (RGBA too), EXIF-rotated JPEG, WebP and BMP inputs: key → (field, bytes)."""
    good = good_inputs()
    inputs = {k: good[k][:2] for k in ("rgb", "gray", "rgba", "cmyk", "exif_rotated")}
    inputs["webp"] = ("webp", encode(Image.fromarray(random_rgb(20, 28, 11)), "WEBP"))
    inputs["bmp"] = ("bmp", encode(Image.fromarray(random_rgb(18, 26, 12)), "BMP"))
    shard = write_tar(tmp_path / "in" / "in-000000.tar", [(k, {f: b}) for k, (f, b) in inputs.items()])
    return {"shard": str(shard), "inputs": inputs}


def test_include_image_stores_jpeg_and_png_inputs_byte_identical_and_others_as_decoded_jpeg(
    tmp_path: Path, varied_inputs: dict
):
    out = tmp_path / "out"
    predict(out, include_image=True, urls=varied_inputs["shard"])
    samples = raw_output(out)
    assert set(samples) == set(varied_inputs["inputs"])
    for key, (field, data) in varied_inputs["inputs"].items():
        sample = samples[key]
        stored = [f for f in ("jpg", "png") if f in sample]
        assert len(stored) == 1, (key, sorted(sample))
        if key != "exif_rotated" and field in ("jpg", "png"):
            assert stored == [field] and sample[field] == data, key  # the input file, byte for byte
        else:  # decoded original (upright pixel grid) re-encoded
            assert stored == ["jpg"], key
            assert decode_image(sample["jpg"]).shape == decode_image(data).shape, key
    # the loader reads the shards alone: images on the labels' grid, exactly the decoded input for lossless ones
    items = {key: (image, label) for image, label, key in PseudoLabelDataset(str(out))}
    assert set(items) == set(samples)
    for key, (image, label) in items.items():
        assert image.dtype == torch.uint8 and label.dtype == torch.int64
        assert image.shape == (*label.shape, 3)
        field, data = varied_inputs["inputs"][key]
        if field == "png":  # lossless: the pixels that were segmented
            np.testing.assert_array_equal(image.numpy(), decode_image(data))


def test_include_image_is_off_by_default(tmp_path: Path, varied_inputs: dict):
    out = tmp_path / "out"
    predict(out, include_image=False, urls=varied_inputs["shard"])
    for sample in raw_output(out).values():
        assert not {"jpg", "png"} & set(sample)
    with pytest.raises(ValueError, match="no image member.*images= / --images"):
        next(iter(PseudoLabelDataset(str(out))))


class _BytesSpy(pl.Callback):
    """Records the ``original_bytes`` of every batch the model receives."""

    def __init__(self) -> None:
        self.seen: list = []

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen += list(batch["original_bytes"])


@pytest.mark.parametrize("include_image", [False, True])
def test_input_bytes_travel_in_batches_only_when_the_writer_stores_images(
    tmp_path: Path, varied_inputs: dict, include_image: bool
):
    datamodule = EmerDiffDataModule(urls=varied_inputs["shard"], batch_size=2, num_workers=0)
    alone = next(iter(datamodule.dataloader(ColourQuantizer().input_policy)))
    assert alone["original_bytes"] == [None] * len(alone["key"])  # a DataModule on its own carries no bytes
    spy = _BytesSpy()
    writer = PseudoLabelWriter(str(tmp_path / "out"), include_image=include_image)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=[writer, spy]
    )
    trainer.predict(ColourQuantizer(), datamodule=datamodule, return_predictions=False)
    assert len(spy.seen) == len(varied_inputs["inputs"])
    if include_image:
        assert sorted(spy.seen) == sorted(data for _, data in varied_inputs["inputs"].values())
    else:
        assert spy.seen == [None] * len(spy.seen)


@pytest.fixture
def toy(tmp_path: Path) -> dict:
    """Toy-world scene shards (``<key>.png`` + ``gt.png``) and their pseudo-labels written without images."""
    scenes = toyworld.write_shards(tmp_path / "scenes", 6, seed=3, size=32, shard_size=3, progress=False)
    predict(tmp_path / "labels", include_image=False, urls=scenes)
    return {"scenes": scenes, "labels": str(tmp_path / "labels"), "tmp": tmp_path}


def test_join_pairs_each_label_with_the_image_of_its_key(toy: dict):
    dataset = PseudoLabelDataset(toy["labels"], images=toy["scenes"])
    got = {key: (image, label) for image, label, key in dataset}
    scenes = {
        key: s for key, s in zip(sorted(got), toyworld.generate_scenes(6, seed=3, size=32), strict=True)
    }
    assert len(got) == 6
    labels = {s["__key__"]: s["seg.png"] for s in iter_raw_samples(toy["labels"])}
    for key, (image, label) in got.items():
        np.testing.assert_array_equal(image.numpy(), scenes[key].image)
        expected = np.asarray(Image.open(io.BytesIO(labels[key])))
        np.testing.assert_array_equal(label.numpy(), expected)


def _drop_member(src: str, dst: Path, key: str) -> str:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin:
            if not member.name.startswith(key + "."):
                tout.addfile(member, tin.extractfile(member))
    return str(dst)


def test_a_key_on_one_side_of_the_join_is_an_error_naming_it(toy: dict):
    tmp = toy["tmp"]
    first = sorted(s["__key__"] for s in iter_raw_samples(toy["scenes"][0]))[0]
    fewer_images = [_drop_member(toy["scenes"][0], tmp / "img-a.tar", first), toy["scenes"][1]]
    with pytest.raises(KeyError, match=f"in the label shards but not in the image shards: '{first}'"):
        PseudoLabelDataset(toy["labels"], images=fewer_images)
    label_shard = sorted(Path(toy["labels"]).glob("*.tar"))[0]
    fewer_labels = _drop_member(str(label_shard), tmp / "lab-a.tar", first)
    with pytest.raises(KeyError, match=f"in the image shards but not in the label shards: '{first}'"):
        PseudoLabelDataset(fewer_labels, images=toy["scenes"])


def test_label_pngs_are_read_raw_uint16_ids_included(tmp_path: Path):
    labels = np.array([[0, 300], [1000, 65535]], dtype=np.uint16)
    image = encode(Image.fromarray(random_rgb(2, 2, 0)), "PNG")
    shard = write_tar(tmp_path / "l.tar", [("a", {"png": image, "seg.png": encode_label_png(labels)})])
    (_, label, key), *_ = list(PseudoLabelDataset(str(shard)))
    assert key == "a"
    np.testing.assert_array_equal(label.numpy(), labels.astype(np.int64))


def crop(size: int):
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomResizedCrop(size, scale=(0.5, 1.0))])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_with_workers_yields_every_sample_once(toy: dict, num_workers: int):
    dataset = PseudoLabelDataset(toy["labels"], images=toy["scenes"], transform=crop(16), shuffle=4)
    keys, seen = [], 0
    for image, label, key in pseudolabel_loader(dataset, batch_size=2, num_workers=num_workers):
        assert image.shape == (len(key), 3, 16, 16) and image.dtype == torch.uint8
        assert label.shape == (len(key), 16, 16) and label.dtype == torch.int64
        keys += key
        seen += 1
    assert sorted(keys) == sorted(s["__key__"] for s in iter_raw_samples(toy["scenes"]))
    assert seen >= 3


def test_transform_moves_image_and_label_together(tmp_path: Path):
    from torchvision.transforms import v2

    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[:, :4] = 255  # left half white, labelled 1
    labels = np.zeros((8, 8), dtype=np.uint8)
    labels[:, :4] = 1
    shard = write_tar(
        tmp_path / "l.tar",
        [("a", {"png": encode(Image.fromarray(image), "PNG"), "seg.png": encode_label_png(labels)})],
    )
    dataset = PseudoLabelDataset(str(shard), transform=v2.RandomHorizontalFlip(p=1.0))
    (flipped, label, _), *_ = list(dataset)
    assert label[:, 4:].eq(1).all() and label[:, :4].eq(0).all()
    assert flipped[:, :, 4:].eq(255).all() and flipped[:, :, :4].eq(0).all()


def test_shuffle_buffer_permutes_the_samples_reproducibly(toy: dict):
    plain = [k for _, _, k in PseudoLabelDataset(toy["labels"], images=toy["scenes"])]
    shuffled = PseudoLabelDataset(toy["labels"], images=toy["scenes"], shuffle=6, seed=1)
    first = [k for _, _, k in shuffled]
    assert sorted(first) == sorted(plain)
    assert first == [k for _, _, k in shuffled]  # same seed, same epoch: same order
    orders = set()
    for epoch in range(4):
        shuffled.set_epoch(epoch)
        orders.add(tuple(k for _, _, k in shuffled))
    assert len(orders | {tuple(plain)}) > 1


class _PixelClassifier(pl.LightningModule):
    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, num_classes, 1)
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        image, label, keys = batch
        self.seen += list(keys)
        logits = self.conv(image.float() / 255)
        return torch.nn.functional.cross_entropy(logits, label)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_datamodule_trains_a_model(toy: dict):
    data = PseudoLabelDataModule(
        toy["labels"], images=toy["scenes"], transform=crop(16), batch_size=3, num_workers=0, shuffle=6
    )
    model = _PixelClassifier()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 4  # 6 samples / batch 3 × 2 epochs
    assert sorted(set(model.seen)) == sorted(s["__key__"] for s in iter_raw_samples(toy["scenes"]))


# ---- the reader: epochs, truncated shards, the validation field ---------------------------------------------


def label_shards(directory: Path, shards: int = 4, per_shard: int = 4) -> list[str]:
    """``shards`` label shards of ``per_shard`` 8×8 samples (``png`` image, ``seg.png`` and ``gt.png`` labels)."""
    paths = []
    for s in range(shards):
        path = directory / f"labels-{s:06d}.tar"
        with TarWriter(path) as sink:
            for i in range(per_shard):
                n = s * per_shard + i
                sink.write({"__key__": f"k{n:02d}", "png": random_rgb(8, 8, n),
                            "seg.png": np.full((8, 8), n % 3, np.uint8), "gt.png": np.full((8, 8), 7, np.uint8)})  # fmt: skip
        paths.append(str(path))
    return paths


class _KeyRecorder(pl.LightningModule):
    """Records the keys of every training batch, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.orders: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        _, _, keys = batch
        self.orders.setdefault(self.current_epoch, []).extend(keys)
        return (self.weight**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_orders(shards: list[str], num_workers: int, seed: int, epochs: int = 3) -> list[tuple[str, ...]]:
    data = PseudoLabelDataModule(shards, batch_size=2, num_workers=num_workers, shuffle=8, seed=seed)
    model = _KeyRecorder()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=data)
    return [tuple(model.orders[epoch]) for epoch in range(epochs)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fit_shuffles_each_epoch_differently_and_repeats_the_orders_for_a_seed(
    tmp_path: Path, num_workers: int
):
    shards = label_shards(tmp_path)
    orders = fit_orders(shards, num_workers, seed=0)
    assert all(sorted(order) == [f"k{n:02d}" for n in range(16)] for order in orders)  # every sample once
    assert len(set(orders)) == 3  # another order every epoch
    assert fit_orders(shards, num_workers, seed=0) == orders  # reproducible from the seed
    assert fit_orders(shards, num_workers, seed=1) != orders


def test_truncated_shard_raises_naming_the_file(tmp_path: Path):
    (good, cut) = label_shards(tmp_path, shards=2, per_shard=6)
    with tarfile.open(cut) as tar:
        fourth = next(m for m in tar.getmembers() if m.name.startswith("k09."))
    Path(cut).write_bytes(Path(cut).read_bytes()[: fourth.offset])  # Python's tarfile sees a 3-sample archive
    with pytest.raises(ShardReadError, match=f"{re.escape(cut)}.*truncated tar"):
        list(PseudoLabelDataset([good, cut]))
    with pytest.raises(ShardReadError, match=re.escape(cut)):
        list(pseudolabel_loader(PseudoLabelDataset(cut, shuffle=4), batch_size=2))


def test_validation_set_reads_val_label_field(tmp_path: Path):
    shards = label_shards(tmp_path, shards=2, per_shard=2)
    data = PseudoLabelDataModule(shards[0], val=shards[1], val_label_field="gt.png", batch_size=2)
    labels = [label for _, label, _ in data.val_dataloader()]
    assert labels and all(bool((label == 7).all()) for label in labels)  # gt.png, not seg.png
    assert all(bool((label < 3).all()) for _, label, _ in data.train_dataloader())  # train: seg.png
