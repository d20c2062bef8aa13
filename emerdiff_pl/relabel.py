"""Dataset-level relabelling: per-image cluster ids → global class ids shared by every image.

Every low-res mask of every image has an embedding (``<key>.emb.npy``, K×D, the mean feature inside the mask).
``emerdiff-pl relabel`` clusters these embeddings into C global classes with seeded torch k-means, each mask
weighted by its area (pixel count in ``<key>.lowres.png``), then rewrites each image's label maps through its
mask → class mapping. To keep a million images in memory the fit uses a seeded uniform sub-sample of masks
(``--max-fit-masks``); every mask is then assigned to its nearest centroid in a second, streaming pass.
The centroids are saved so the same mapping can be applied to new data (``--centroids``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from emerdiff_pl.codec import (
    ImageDecodeError,
    decode_field,
    decode_image,
    encode_json,
    encode_label_png,
    image_field,
)
from emerdiff_pl.fields import EMB_FIELD, JSON_FIELD, LOWRES_FIELD, OVERLAY_FIELD, SEG_FIELD
from emerdiff_pl.paths import expand_urls
from emerdiff_pl.shardio import TarWriter, iter_raw_samples
from emerdiff_pl.viz import overlay_jpeg


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mask_areas(sample: dict[str, Any], num_masks: int, key: str) -> np.ndarray:
    """Pixel count of each mask id in the low-res map (``seg.png`` when there is no low-res map)."""
    field = LOWRES_FIELD if LOWRES_FIELD in sample else SEG_FIELD
    if field not in sample:
        raise KeyError(f"sample {key!r} has neither {LOWRES_FIELD!r} nor {SEG_FIELD!r} to weigh its masks")
    labels = sample[field]
    if labels.size and int(labels.max()) >= num_masks:
        raise ValueError(
            f"sample {key!r}: {field} holds id {int(labels.max())} but {EMB_FIELD} has only {num_masks} rows"
        )
    return np.bincount(labels.reshape(-1).astype(np.int64), minlength=num_masks)[:num_masks]


def iter_mask_embeddings(urls: str | list[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(key, embeddings K×D float32, areas K) per sample, decoding only the fields needed."""
    for raw in iter_raw_samples(urls, fields={EMB_FIELD, LOWRES_FIELD, SEG_FIELD}):
        key = raw["__key__"]
        if EMB_FIELD not in raw:
            raise KeyError(
                f"sample {key!r} in {raw['__url__']} has no {EMB_FIELD!r}: not a prediction shard?"
            )
        emb = decode_field(EMB_FIELD, raw[EMB_FIELD]).astype(np.float32)
        if emb.ndim != 2:
            raise ValueError(f"sample {key!r}: {EMB_FIELD} must be K×D, got shape {emb.shape}")
        area_src = {f: decode_field(f, raw[f]) for f in (LOWRES_FIELD, SEG_FIELD) if f in raw}
        if LOWRES_FIELD in area_src:
            area_src.pop(SEG_FIELD, None)
        yield key, emb, mask_areas(area_src, emb.shape[0], key)


class MaskReservoir:
    """Seeded uniform sample (Algorithm R) of at most ``capacity`` mask embeddings and their areas."""

    def __init__(self, capacity: int, seed: int):
        if capacity < 1:
            raise ValueError(f"--max-fit-masks must be ≥ 1, got {capacity}")
        self.capacity = capacity
        self.rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
        self.embeddings: np.ndarray | None = None  # capacity × D float16 (memory: half of float32)
        self.weights = np.zeros(capacity, dtype=np.float64)
        self.seen = 0

    def add(self, emb: np.ndarray, areas: np.ndarray) -> None:
        keep = (areas > 0) & np.isfinite(emb).all(1)
        emb, areas = emb[keep], areas[keep]
        if len(emb) == 0:
            return
        if self.embeddings is None:
            self.embeddings = np.zeros((self.capacity, emb.shape[1]), dtype=np.float16)
        elif emb.shape[1] != self.embeddings.shape[1]:
            raise ValueError(
                f"embedding dimension {emb.shape[1]} differs from the first sample's {self.embeddings.shape[1]}"
            )
        index = self.seen + np.arange(len(emb))  # 0-based position of each mask in the stream
        slots = np.where(
            index < self.capacity, index, (self.rng.random(len(emb)) * (index + 1)).astype(np.int64)
        )
        take = slots < self.capacity
        self.embeddings[slots[take]] = emb[take]
        self.weights[slots[take]] = areas[take]
        self.seen += len(emb)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.seen, self.capacity)
        if self.embeddings is None or n == 0:
            raise ValueError("no mask with a non-zero area and finite embedding was found")
        return self.embeddings[:n].astype(np.float32), self.weights[:n]


def fit_centroids(
    embeddings: np.ndarray,
    weights: np.ndarray,
    num_classes: int,
    *,
    seed: int,
    n_init: int,
    max_iter: int,
    normalize: bool,
    device: torch.device,
) -> tuple[np.ndarray, float]:
    """Weighted k-means of the sampled mask embeddings; restarts run one by one (memory ∝ one copy of x)."""
    from emerdiff_pl.kmeans import batched_kmeans

    if len(embeddings) < num_classes:
        raise ValueError(
            f"only {len(embeddings)} masks to fit {num_classes} global classes: lower --num-classes or give more data"
        )
    x = torch.from_numpy(embeddings).to(device)
    if normalize:
        x = _normalize(x)
    w = torch.from_numpy(weights).float().to(device)
    best = None
    for restart in range(n_init):
        restart_seed = int(np.random.SeedSequence([int(seed), restart]).generate_state(1)[0])
        result = batched_kmeans(
            x.unsqueeze(0),
            num_classes,
            n_init=1,
            max_iter=max_iter,
            seeds=[restart_seed],
            weights=w.unsqueeze(0),
        )
        inertia = float(result.inertia[0])
        if best is None or inertia < best[1]:
            best = (result.centroids[0], inertia)
    centroids, inertia = best
    return centroids.cpu().numpy().astype(np.float32), inertia


def assign_masks(emb: np.ndarray, centroids: torch.Tensor, normalize: bool) -> np.ndarray:
    """Nearest centroid (Euclidean, after optional L2 normalisation) of each mask embedding."""
    if emb.ndim != 2 or emb.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"mask embeddings of shape {tuple(emb.shape)} do not match the {tuple(centroids.shape)} centroids "
            "(different feature layer or model?)"
        )
    x = torch.from_numpy(np.nan_to_num(emb.astype(np.float32))).to(centroids.device)
    if normalize:
        x = _normalize(x)
    return torch.cdist(x, centroids).argmin(-1).cpu().numpy()


def relabel_sample(
    raw: dict[str, Any], centroids: torch.Tensor, normalize: bool, info: dict[str, Any]
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Rewrite one prediction sample with global ids; returns (sample, mapping K, class areas C)."""
    key = raw["__key__"]
    emb = decode_field(EMB_FIELD, raw[EMB_FIELD])
    mapping = assign_masks(emb, centroids, normalize)
    out: dict[str, Any] = {"__key__": key}
    class_areas = np.zeros(len(centroids), dtype=np.int64)
    for field, value in raw.items():
        if field.startswith("__"):
            continue
        if field in (SEG_FIELD, LOWRES_FIELD):
            labels = decode_field(field, value)
            if labels.size and int(labels.max()) >= len(mapping):
                raise ValueError(f"sample {key!r}: {field} holds id {int(labels.max())} ≥ K = {len(mapping)}")
            relabelled = mapping[labels.astype(np.int64)]
            out[field] = encode_label_png(relabelled)
            if field == SEG_FIELD:
                class_areas += np.bincount(relabelled.reshape(-1), minlength=len(centroids))
        elif field == JSON_FIELD:
            meta = decode_field(field, value)
            meta["relabel"] = {**info, "mapping": mapping.tolist()}
            out[field] = encode_json(meta)
        elif field == OVERLAY_FIELD:
            fields = {f: v for f, v in raw.items() if not f.startswith("__")}
            with contextlib.suppress(ImageDecodeError):  # the one image-field rule and decoder of shardio
                image = decode_image(image_field(fields))
                if SEG_FIELD in raw:
                    seg = mapping[decode_field(SEG_FIELD, raw[SEG_FIELD]).astype(np.int64)]
                    out[field] = overlay_jpeg(image, seg)
            # without the image the stale per-image overlay is dropped
        else:
            out[field] = value  # copied byte for byte (emb.npy, jpg, …)
    return out, mapping, class_areas


def relabel_shard(
    url: str,
    target: str,
    centroids: np.ndarray,
    normalize: bool,
    info: dict[str, Any],
    device: str = "cpu",
    progress: Callable[[int], Any] | None = None,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Relabel every sample of one input shard into ``target`` (written atomically).

    Returns (samples, pixels per global class, masks per global class). Runs in worker processes too.
    """
    num_classes = len(centroids)
    centroids_t = torch.from_numpy(centroids).to(device)
    class_areas = np.zeros(num_classes, dtype=np.int64)
    used = np.zeros(num_classes, dtype=np.int64)
    count = 0
    with TarWriter(target) as writer:
        for raw in iter_raw_samples(url):
            if EMB_FIELD not in raw:
                raise KeyError(
                    f"sample {raw['__key__']!r} in {url} has no {EMB_FIELD!r}: not a prediction shard?"
                )
            sample, mapping, areas = relabel_sample(raw, centroids_t, normalize, info)
            writer.write(sample)
            class_areas += areas
            used += np.bincount(mapping, minlength=num_classes)
            count += 1
            if progress is not None:
                progress(1)
    return count, class_areas, used


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_centroids(path: str, num_classes: int | None, normalize: bool) -> tuple[np.ndarray, bool]:
    """Centroids of a previous run and its normalisation (from the relabel.json beside them, if any)."""
    centroids = np.load(path).astype(np.float32)
    if centroids.ndim != 2:
        raise ValueError(f"{path!r} must hold a C×D array, got shape {centroids.shape}")
    if num_classes is not None and num_classes != len(centroids):
        raise ValueError(f"--num-classes {num_classes} but {path!r} holds {len(centroids)} centroids")
    meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), "relabel.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            fitted_normalized = bool(json.load(f).get("normalize", False))
        if normalize and not fitted_normalized:
            raise ValueError(f"--normalize given, but the centroids of {meta_path} were fitted without it")
        normalize = fitted_normalized
    return centroids, normalize


def centroids_digest(centroids: np.ndarray) -> str:
    """SHA-256 (hex) of a C×D centroid array as float32: the identity of a relabel run's classes, recorded in
    every sample it writes, so that samples of different runs (whose class ids mean different things) are told
    apart. Applying saved centroids (``--centroids``) gives the same digest: those classes are the same."""
    array = np.ascontiguousarray(centroids, dtype=np.float32)
    return hashlib.sha256(f"{array.shape}".encode() + array.tobytes()).hexdigest()


def class_count_problem(num_classes: int | None, centroids: str | None) -> str | None:
    """What is wrong with the requested classes (``--num-classes`` / ``--centroids``), or None."""
    if centroids is None and num_classes is None:
        return "give --num-classes C (or --centroids to apply a previous fit)"
    if num_classes is not None and not 1 <= num_classes <= 65535:
        return f"--num-classes must be in 1..65535, got {num_classes}"
    return None


def relabel_dataset(
    input_urls: str,
    output: str,
    num_classes: int | None = None,
    *,
    centroids: str | None = None,
    max_fit_masks: int = 100_000,
    n_init: int = 4,
    max_iter: int = 300,
    seed: int = 0,
    normalize: bool = False,
    device: str = "auto",
    workers: int = 1,
) -> dict[str, Any]:
    """Relabel the prediction shards ``input_urls`` into ``output`` (shards under the input names with global ids,
    ``centroids.npy``, ``relabel.json``) and return the ``relabel.json`` record.

    The C global classes are fitted (``num_classes``) or taken from a previous run's ``centroids``; see the
    module docstring for the fit and the options of ``emerdiff-pl relabel`` for each argument.
    """
    from tqdm import tqdm

    problem = class_count_problem(num_classes, centroids)
    if problem is not None:
        raise ValueError(problem)
    urls = expand_urls(input_urls)
    names = [os.path.basename(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError(
            "input shards share file names; output shards keep the input names, so they must be unique"
        )
    out_dir = os.path.abspath(output)
    if out_dir in {os.path.dirname(os.path.abspath(u)) for u in urls}:
        raise ValueError(f"--output {output!r} is the input folder; choose another folder")
    os.makedirs(out_dir, exist_ok=True)
    torch_device = _pick_device(device)
    started = time.time()

    fit: dict[str, Any] = {}
    if centroids is not None:
        centroids_np, normalize = _load_centroids(centroids, num_classes, normalize)
        fit["from_centroids"] = os.path.abspath(centroids)
    else:
        reservoir = MaskReservoir(max_fit_masks, seed)
        images = 0
        for _, emb, areas in tqdm(iter_mask_embeddings(urls), desc="relabel: sample masks", unit="img"):
            reservoir.add(emb, areas)
            images += 1
        x, w = reservoir.arrays()
        print(f"fitting {num_classes} classes on {len(x)} of {reservoir.seen} masks ({images} images)")
        centroids_np, inertia = fit_centroids(
            x, w, num_classes, seed=seed, n_init=n_init, max_iter=max_iter, normalize=normalize,
            device=torch_device,
        )  # fmt: skip
        fit.update(
            seed=seed,
            fit_masks=len(x),
            total_masks=reservoir.seen,
            inertia=inertia,
            n_init=n_init,
            max_iter=max_iter,
            max_fit_masks=max_fit_masks,
        )
    num_classes = len(centroids_np)
    centroids_path = os.path.join(out_dir, "centroids.npy")
    if centroids is None or os.path.abspath(centroids) != centroids_path:
        np.save(centroids_path, centroids_np)
    info = {
        "num_classes": num_classes,
        "centroids": centroids_path,
        "centroids_sha256": centroids_digest(centroids_np),
        "normalize": normalize,
    }

    jobs = [(url, os.path.join(out_dir, os.path.basename(url))) for url in urls]
    class_areas = np.zeros(num_classes, dtype=np.int64)
    used = np.zeros(num_classes, dtype=np.int64)
    count = 0
    if workers <= 1:
        bar = tqdm(desc="relabel: write", unit="img")
        for url, target in jobs:
            n, areas, masks = relabel_shard(
                url, target, centroids_np, normalize, info, str(torch_device), bar.update
            )
            count, class_areas, used = count + n, class_areas + areas, used + masks
        bar.close()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch / CUDA state
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            futures = [
                pool.submit(relabel_shard, url, target, centroids_np, normalize, info, str(torch_device))
                for url, target in jobs
            ]
            for future in tqdm(futures, desc="relabel: write", unit="shard"):
                n, areas, masks = future.result()
                count, class_areas, used = count + n, class_areas + areas, used + masks
    report = {
        **info,
        **fit,
        "input": input_urls,
        "input_shards": urls,
        "output_shards": [os.path.basename(target) for _, target in jobs],
        "images": count,
        "embedding_dim": int(centroids_np.shape[1]),
        "masks_per_class": used.tolist(),
        "pixels_per_class": class_areas.tolist(),
        "seconds": round(time.time() - started, 2),
        "torch": torch.__version__,
    }
    with open(os.path.join(out_dir, "relabel.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return report


__all__ = [
    "MaskReservoir",
    "assign_masks",
    "centroids_digest",
    "class_count_problem",
    "fit_centroids",
    "iter_mask_embeddings",
    "mask_areas",
    "relabel_dataset",
    "relabel_sample",
    "relabel_shard",
]
