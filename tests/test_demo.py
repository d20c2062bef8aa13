"""The README's main command: `emerdiff-pl demo` runs scenes → predict → relabel → evaluate → show."""

import json

import pytest
from PIL import Image

from emerdiff_pl import cli
from emerdiff_pl.shardio import iter_samples


@pytest.mark.slow
def test_demo_produces_labels_scores_and_a_contact_sheet_for_every_scene(tmp_path):
    out = tmp_path / "demo"
    # fewer steps and masks than the shipped config, to keep the test short; the pipeline is the same
    code = cli.main(
        [
            "demo",
            "--out",
            str(out),
            "--num-images",
            "2",
            "--model.steps_after_modulation",
            "2",
            "--model.num_masks",
            "4",
            "--model.kmeans_n_init",
            "1",
        ]
    )
    assert code == 0
    scene_keys = {s["__key__"] for s in iter_samples(str(out / "scenes"))}
    relabelled = list(iter_samples(str(out / "relabelled")))
    assert len(scene_keys) == 2 and {s["__key__"] for s in relabelled} == scene_keys
    for sample in relabelled:
        assert sample["seg.png"].shape == (128, 128) and sample["seg.png"].max() < 7
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert 0.0 <= report["global"]["miou"] <= 100.0
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 500 and sheet.height > 200


def test_demo_with_a_missing_config_is_one_message_before_any_work(tmp_path, capsys):
    code = cli.main(["demo", "--out", str(tmp_path / "demo"), "--config", str(tmp_path / "no.yaml")])
    assert code == 2
    err = capsys.readouterr().err
    assert "emerdiff-pl demo: error: demo config" in err and "--config" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()  # no scenes generated for a run that cannot start
