import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from emerdiff_pl import EmerDiffSegmenter
from emerdiff_pl.attention import resolve_backend
from emerdiff_pl.backbone import COMPONENTS, load_backbone, tiny_random_components

FAST = dict(resolution=64, num_masks=4, num_inference_steps=10, modulation_timestep=201, kmeans_n_init=2)


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    for name, component in tiny_random_components().items():
        component.save_pretrained(folder / name)
    return folder


def test_saved_folder_gives_the_same_labels_as_in_process_model(saved_folder):
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    in_process = EmerDiffSegmenter(pretrained="tiny-random", **FAST).segment(images)
    from_folder = EmerDiffSegmenter(pretrained=str(saved_folder), **FAST).segment(images)
    assert torch.equal(in_process.labels, from_folder.labels)
    assert torch.equal(in_process.mask_embeddings, from_folder.mask_embeddings)


def test_empty_prompt_embedding_is_computed_once_and_matches_the_tokenizer(saved_folder):
    backbone = load_backbone(str(saved_folder))
    first = backbone.empty_prompt_embedding()
    assert backbone.empty_prompt_embedding() is first
    ids = backbone.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, :2].tolist() == [0, 1]  # <|startoftext|> <|endoftext|>, then padding
    torch.testing.assert_close(first, backbone.text_encoder(ids)[0])


def test_scheduler_is_ddpm_leading_with_offset(saved_folder):
    scheduler = load_backbone(str(saved_folder)).scheduler
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[:3].tolist() == [981, 961, 941] and scheduler.timesteps[-1].item() == 1


def test_missing_folder_and_missing_components_are_clear_errors(tmp_path, saved_folder):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_backbone(str(tmp_path / "nope"))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks \['vae'"):
        load_backbone(str(partial))
    assert set(COMPONENTS) <= {p.name for p in saved_folder.iterdir()}


def test_unreachable_hub_id_says_how_to_get_the_weights():
    with pytest.raises(OSError, match="download it once"):
        load_backbone("example-org/not-a-cached-model")


def test_backend_probe_falls_back_to_sdpa_on_cpu():
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert resolve_backend("sdpa", torch.device("cpu"), torch.float32) == "sdpa"
    with pytest.raises(RuntimeError, match="xformers cannot run"):
        resolve_backend("xformers", torch.device("cpu"), torch.float32)
