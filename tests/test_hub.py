"""hf_dino.hub / model_card / released_checkpoints: the released-checkpoint table, model cards, Hub push (intercepted at
HfApi's public API, offline), `model.push_to_hub`, and the converter's --write-expected / --verify / --push-to-hub."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import verify
from conftest import REPO, subprocess_env, tiny_model, tiny_processor
from hf_dino import hub
from hf_dino.model_card import CITATION, finetuned_model_card, metrics_table, released_model_card, usage_snippet
from hf_dino.released_checkpoints import BY_FILE_NAME, RELEASED_CHECKPOINTS, find_checkpoint, markdown_table

ORIGINAL_MIRROR = Path("/work/.mirror/IDEA-Research+DINO/repo")

# (file name as released, backbone, scales, epochs, box AP) -- README model zoo + the release folder's file names
RELEASED = [
    ("checkpoint0011_4scale.pth", "R50", 4, 12, 49.0),
    ("checkpoint0023_4scale.pth", "R50", 4, 24, 50.4),
    ("checkpoint0033_4scale.pth", "R50", 4, 36, 50.9),
    ("checkpoint0011_5scale.pth", "R50", 5, 12, 49.4),
    ("checkpoint0022_5scale.pth", "R50", 5, 24, 51.3),
    ("checkpoint0031_5scale.pth", "R50", 5, 36, 51.2),
    ("checkpoint0011_4scale_swin.pth", "Swin-L", 4, 12, 56.8),
    ("checkpoint0029_4scale_swin.pth", "Swin-L", 4, 36, 58.0),
    ("checkpoint0011_5scale_swin.pth", "Swin-L", 5, 12, 57.3),
    ("checkpoint0027_5scale_swin.pth", "Swin-L", 5, 36, 58.5),
]


def _load_converter():
    spec = importlib.util.spec_from_file_location("convert_original_checkpoint", REPO / "conversion" / "convert_original_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the table ----------------------------------------------------------------------------------------------------


def test_table_covers_every_released_checkpoint():
    got = [(c.file_name, c.backbone_short, c.num_feature_levels, c.epochs, c.box_ap) for c in RELEASED_CHECKPOINTS]
    assert sorted(got) == sorted(RELEASED)
    assert len(BY_FILE_NAME) == len(RELEASED)
    assert len({c.hub_repo for c in RELEASED_CHECKPOINTS}) == len(RELEASED)
    converter = _load_converter()
    for c in RELEASED_CHECKPOINTS:
        assert c.model_name in converter.MODEL_CONFIGS
        config = converter.MODEL_CONFIGS[c.model_name]
        assert config["num_feature_levels"] == c.num_feature_levels
        assert config["backbone"] == ("resnet50" if c.backbone_short == "R50" else "swin_large_patch4_window12_384")
        scale = re.fullmatch(r"checkpoint(\d{4})_(\d)scale(_swin)?\.pth", c.file_name)
        assert scale and int(scale.group(2)) == c.num_feature_levels and bool(scale.group(3)) == (c.backbone_short == "Swin-L")
        assert int(scale.group(1)) < c.epochs  # the 0-based index of the saved epoch
        assert re.fullmatch(r"hf-dino/dino-(r50|swinl)-[45]scale-(12|24|36)ep", c.hub_repo)
        assert find_checkpoint(f"/downloads/{c.file_name}") is c
    assert find_checkpoint("checkpoint0099_4scale.pth") is None
    table = markdown_table()
    assert all(f"`{name}`" in table and f"| {ap:.1f} |" in table for name, *_, ap in RELEASED)


def test_table_agrees_with_the_original_readme():
    """Every (model, backbone, box AP) row of the README's three model-zoo tables is in the table, per schedule."""
    try:
        readme = subprocess.run(
            ["git", "-C", str(ORIGINAL_MIRROR), "show", "HEAD:README.md"], capture_output=True, text=True, check=True
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip(f"no git mirror of IDEA-Research/DINO at {ORIGINAL_MIRROR}")
    rows = set()
    for epochs, section in re.findall(r"### (\d+) epoch setting(.*?)</table>", readme, flags=re.S):
        for name, backbone, ap in re.findall(
            r"<td>(DINO-\dscale)</td>\s*<td>([^<]+)</td>\s*<td>([\d.]+)</td>", section
        ):
            rows.add((int(epochs), name, backbone.strip(), float(ap)))
    assert len(rows) == 10
    ours = {(c.epochs, c.display_name, c.backbone_short, c.box_ap) for c in RELEASED_CHECKPOINTS}
    assert ours == rows
    assert "checkpoint0011_4scale.pth" in readme  # the one file name the README spells out


# ---- model cards --------------------------------------------------------------------------------------------------


def _front_matter(card: str):
    from huggingface_hub import ModelCard

    return ModelCard(card).data


@pytest.mark.parametrize("entry", RELEASED_CHECKPOINTS, ids=lambda c: c.file_name)
def test_released_model_card(entry):
    card = released_model_card(entry)
    data = _front_matter(card)
    assert data.license == "apache-2.0" and data.pipeline_tag == "object-detection"
    assert data.library_name == "transformers" and data.datasets == ["coco"]
    [result] = data.eval_results
    assert result.metric_value == entry.box_ap and result.dataset_type == "coco"
    assert f"**{entry.epochs} epochs**" in card and f"`{entry.file_name}`" in card
    highlighted = [line for line in card.splitlines() if line.startswith(f"| **`{entry.file_name}`**")]
    assert len(highlighted) == 1 and f"**{entry.box_ap:.1f}**" in highlighted[0]
    # every released checkpoint's reported AP is in the card's table
    assert all(f"{c.box_ap:.1f}" in card for c in RELEASED_CHECKPOINTS)
    assert usage_snippet(entry.hub_repo) in card and "trust_remote_code=True" in card
    assert CITATION in card and "## Intended use and limitations" in card and "Apache-2.0" in card
    for code in re.findall(r"```python\n(.*?)```", card, flags=re.S):
        compile(code, "snippet", "exec")


def test_released_model_card_with_measured_metrics():
    entry = BY_FILE_NAME["checkpoint0011_4scale.pth"]
    measured = {"AP": 0.4903, "AP50": 0.6661, "AP75": 0.5347, "APs": 0.3214, "APm": 0.5226, "APl": 0.6342}
    card = released_model_card(entry, repo_id="me/dino", measured_metrics=measured)
    assert "| 49.0 | 66.6 | 53.5 | 32.1 | 52.3 | 63.4 |" in card
    assert 'model="me/dino"' in card


def test_finetuned_model_card_carries_metrics_and_label_map():
    id2label = {0: "balloon", 1: "kite", 2: "N/A"}
    metrics = {"AP": 0.41234, "AP50": 0.7, "AP75": 0.4, "APs": -1.0, "APm": 0.3, "APl": 0.55}
    card = finetuned_model_card(
        "me/dino-balloons", id2label, metrics, base_model="hf-dino/dino-r50-4scale-12ep", dataset_name="balloons",
        training_args={"epochs": 5, "learning_rate": 1e-4},
    )
    data = _front_matter(card)
    assert data.base_model == "hf-dino/dino-r50-4scale-12ep" and data.datasets == ["balloons"]
    values = {r.metric_name: r.metric_value for r in data.eval_results}
    assert values["box AP (IoU 0.50:0.95)"] == 41.2 and "box AP, small objects" not in values  # -1: undefined
    assert metrics_table(metrics) in card and "| 41.2 | 70.0 | 40.0 | - | 30.0 | 55.0 |" in card
    assert "| 0 | balloon |\n| 1 | kite |\n| 2 | N/A |" in card
    assert "It detects 2 categories." in card and "| epochs | 5 |" in card
    assert usage_snippet("me/dino-balloons") in card


def test_model_cards_refuse_metrics_that_are_not_coco_fractions():
    """Percentages would be published as 4910.0 and a training run's metrics.json as a row of dashes: both are
    refused, naming the problem; fractions, pycocotools' -1 and no metrics are fine."""
    entry = BY_FILE_NAME["checkpoint0011_4scale.pth"]
    with pytest.raises(ValueError, match=r"measured_metrics\['AP'\] must be a fraction .* got 49.1 \(a percentage"):
        released_model_card(entry, measured_metrics={"AP": 49.1})
    with pytest.raises(ValueError, match=r"metrics must hold COCO metrics .* got \['best_AP', 'history'\]"):
        finetuned_model_card("me/dino", {0: "a"}, {"history": [], "best_AP": 0.3})
    with pytest.raises(ValueError, match=r"metrics\['AP50'\] must be a fraction"):
        finetuned_model_card("me/dino", {0: "a"}, {"AP": 0.3, "AP50": "high"})
    import numpy as np

    for metrics in (None, {}, {"AP": 0.3, "APs": -1.0, "loss": 3.2}, {"AP": np.float32(0.3), "AP50": 1}):
        finetuned_model_card("me/dino", {0: "a"}, metrics)


def test_model_card_tables_escape_their_cells():
    """A `|` in a label name or a setting would split its table row into more cells than the table has."""
    card = finetuned_model_card("me/dino", {0: "car|truck", 1: "bus"}, training_args={"note": "a|b\nc"})
    assert "| 0 | car\\|truck |" in card and "| note | a\\|b c |" in card


def test_finetuned_model_card_publishes_no_local_paths(tmp_path):
    """A local data set or starting model (what examples/train.py is given as files) is not named in the card: the
    model-index, the `datasets:` / `base_model:` entries and the text say "custom" instead of a path of the
    training machine (the annotations file's path was published, as the data the metrics were measured on)."""
    annotations = tmp_path / "annotations" / "instances_train2017.json"
    annotations.parent.mkdir()
    annotations.write_text("{}")
    start = tmp_path / "runs" / "start"
    start.mkdir(parents=True)
    card = finetuned_model_card("me/dino-local", {0: "balloon"}, {"AP": 0.5}, base_model=str(start),
                                dataset_name=str(annotations))
    assert str(tmp_path) not in card and "instances_train2017" not in card
    data = _front_matter(card)
    assert data.datasets is None and data.base_model is None
    assert {(r.dataset_name, r.dataset_type) for r in data.eval_results} == {("custom", "custom")}
    assert "on a custom data set" in card and "on the validation split:" in card


# ---- push, intercepted --------------------------------------------------------------------------------------------


def _expected_py_files() -> set[str]:
    """configuration, modeling and image processing modules plus their relative imports, followed here
    independently of transformers."""
    src = REPO / "src" / "hf_dino"
    todo, seen = ["configuration_dino", "modeling_dino", "image_processing_dino"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += re.findall(r"^\s*from \.(\w+) import", (src / f"{name}.py").read_text(), flags=re.M)
    return {f"{name}.py" for name in seen}


class FakeHub:
    """Replaces HfApi.create_repo / create_commit: records the calls and the bytes of every file sent."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi

        self.repos, self.commits = [], []
        hub_self = self

        def create_repo(api, repo_id, **kwargs):
            hub_self.repos.append({"repo_id": repo_id, **kwargs})
            return f"https://huggingface.co/{repo_id}"

        def create_commit(api, repo_id, operations, **kwargs):
            files = {}
            for op in operations:
                source = op.path_or_fileobj
                files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
            hub_self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
            return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

        def refuse(*args, **kwargs):
            raise AssertionError("only create_repo and create_commit may be used")

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "upload_folder", refuse)
        monkeypatch.setattr(HfApi, "upload_file", refuse)


def _check_repo_files(files: dict[str, bytes], model, card: str, tmp_path: Path) -> None:
    from safetensors.torch import load

    assert set(files) == {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} | _expected_py_files()
    assert files["README.md"].decode() == card
    for name in _expected_py_files():
        assert files[name] == (REPO / "src" / "hf_dino" / name).read_bytes(), name
    config = json.loads(files["config.json"])
    assert config["auto_map"] == {
        "AutoConfig": "configuration_dino.DinoConfig",
        "AutoModelForObjectDetection": "modeling_dino.DinoForObjectDetection",
    }
    assert config["model_type"] == model.config.model_type and config["d_model"] == model.config.d_model
    assert {int(k): v for k, v in config["id2label"].items()} == model.config.id2label
    processor_config = json.loads(files["preprocessor_config.json"])
    assert processor_config["auto_map"] == {"AutoImageProcessor": "image_processing_dino.DinoImageProcessor"}
    assert processor_config["image_processor_type"] == "DinoImageProcessor"
    weights = load(files["model.safetensors"])
    state = model.state_dict()
    assert set(weights) <= set(state) and len(weights) > 0
    for key, tensor in weights.items():
        assert torch.equal(tensor, state[key]), key
    # the files as sent make a loadable model
    folder = tmp_path / "sent"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    from transformers import AutoModelForObjectDetection

    reloaded = AutoModelForObjectDetection.from_pretrained(folder).eval()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, state[key]), key


def test_push_finetuned_model_sends_exact_files(monkeypatch, tmp_path):
    fake = FakeHub(monkeypatch)
    model = tiny_model(seed=1, id2label={0: "balloon", 1: "kite"}, label2id={"balloon": 0, "kite": 1})
    processor = tiny_processor()
    metrics = {"AP": 0.3456, "AP50": 0.6, "AP75": 0.3, "APs": 0.1, "APm": 0.2, "APl": 0.5}
    hub.push_finetuned_model(
        model, processor, "me/dino-balloons", metrics=metrics, base_model="hf-dino/dino-r50-4scale-12ep",
        dataset_name="balloons", training_args={"epochs": 2}, private=True,
    )
    assert fake.repos == [{"repo_id": "me/dino-balloons", "repo_type": "model", "private": True, "exist_ok": True, "token": None}]
    [commit] = fake.commits
    assert commit["repo_id"] == "me/dino-balloons" and commit["repo_type"] == "model"
    card = finetuned_model_card(
        "me/dino-balloons", model.config.id2label, metrics, base_model="hf-dino/dino-r50-4scale-12ep",
        dataset_name="balloons", training_args={"epochs": 2},
        architecture="DINO 4-scale, resnet18 backbone",
    )
    _check_repo_files(commit["files"], model, card, tmp_path)
    readme = commit["files"]["README.md"].decode()
    assert "| 34.6 | 60.0 | 30.0 | 10.0 | 20.0 | 50.0 |" in readme and "| 1 | kite |" in readme
    assert getattr(model.config, "auto_map", None) is None  # the caller's model is left as it was


def test_model_push_to_hub_sends_the_same_repo(monkeypatch, tmp_path):
    """A user with their own training loop calls `model.push_to_hub(...)` and gets what --push-to-hub produces:
    weights, config, processor, card and remote code (compared with `push_finetuned_model` byte for byte)."""
    fake = FakeHub(monkeypatch)
    model = tiny_model(seed=2, id2label={0: "balloon", 1: "kite"}, label2id={"balloon": 0, "kite": 1})
    metrics = {"AP": 0.25, "AP50": 0.5, "AP75": 0.2, "APs": 0.1, "APm": 0.2, "APl": 0.4}
    model.push_to_hub("me/own-loop", image_processor=tiny_processor(), metrics=metrics, dataset_name="balloons")
    hub.push_finetuned_model(model, tiny_processor(), "me/own-loop", metrics=metrics, dataset_name="balloons")
    via_model, via_hub = (commit["files"] for commit in fake.commits)
    assert via_model == via_hub
    card = finetuned_model_card("me/own-loop", model.config.id2label, metrics, dataset_name="balloons",
                                architecture="DINO 4-scale, resnet18 backbone")
    _check_repo_files(via_model, model, card, tmp_path)
    with pytest.raises(TypeError, match="max_shard_sizes"):
        model.push_to_hub("me/own-loop", max_shard_sizes="1GB")  # no argument is swallowed


# ---- the converter CLI: --write-expected, --verify, --push-to-hub --------------------------------------------------


@pytest.fixture
def converter(monkeypatch):
    """The converter module with its conversion replaced by a tiny model (the conversion itself is covered by the
    parity tests); what runs for real is the CLI's argument parsing and the end of its main()."""
    module = _load_converter()
    state = {"perturb": False}

    def fake_convert(checkpoint, model_name, output_dir=None, **options):
        model = tiny_model(seed=7)
        if state["perturb"]:
            with torch.no_grad():
                model.class_embed.bias.add_(0.01)
        if output_dir is not None:
            model.save_pretrained(output_dir)
            tiny_processor().save_pretrained(output_dir)
        return model

    monkeypatch.setattr(module, "convert", fake_convert)
    module.state = state
    return module


def test_converter_write_expected_verify_and_push(converter, monkeypatch, tmp_path, capsys):
    fake = FakeHub(monkeypatch)
    checkpoint = tmp_path / "checkpoint0011_4scale.pth"
    checkpoint.write_bytes(b"")  # never read: conversion is stubbed
    expected = tmp_path / "expected.safetensors"
    base = ["--checkpoint", str(checkpoint), "--model-name", "dino-r50-4scale"]

    assert converter.main(base + ["--output-dir", str(tmp_path / "a"), "--write-expected", str(expected)]) == 0
    from safetensors import safe_open

    with safe_open(str(expected), "pt") as f:
        assert f.metadata()["format"] == verify.FORMAT and f.metadata()["checkpoint"] == checkpoint.name
        keys = set(f.keys())
    assert {"pixel_values", "pixel_mask", "logits", "pred_boxes", "encoder_topk_indices"} <= keys
    assert fake.commits == []

    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text(json.dumps({"AP": 0.49, "AP50": 0.66, "AP75": 0.53, "APs": 0.32, "APm": 0.52, "APl": 0.63}))
    rc = converter.main(
        base + ["--output-dir", str(tmp_path / "b"), "--verify", str(expected), "--push-to-hub", "me/dino-r50",
                "--measured-metrics", str(metrics_file)]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "OK: max |diff| logits 0.00e+00" in out and "Pushed to https://huggingface.co/me/dino-r50" in out
    [commit] = fake.commits
    card = released_model_card(
        BY_FILE_NAME["checkpoint0011_4scale.pth"], repo_id="me/dino-r50",
        measured_metrics=json.loads(metrics_file.read_text()),
    )
    _check_repo_files(commit["files"], converter.convert(checkpoint, "dino-r50-4scale"), card, tmp_path)
    assert "**49.0**" in card and "| 49.0 | 66.0 | 53.0 | 32.0 | 52.0 | 63.0 |" in card

    # a conversion that does not reproduce the expected outputs stops before anything is pushed
    converter.state["perturb"] = True
    rc = converter.main(base + ["--output-dir", str(tmp_path / "c"), "--verify", str(expected), "--push-to-hub", "me/x"])
    assert rc == 2 and len(fake.commits) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_converter_refuses_bad_verify_and_metrics_files_before_converting(converter, tmp_path, capsys):
    """A --verify folder without expected outputs, a --measured-metrics file that is not COCO fractions, unreadable
    --expected-images or an unwritable --write-expected is an `error:` line before anything is converted or written
    (it used to be a traceback after the conversion)."""
    checkpoint = tmp_path / "checkpoint0011_4scale.pth"
    checkpoint.write_bytes(b"")
    empty_folder, not_safetensors, percent = tmp_path / "empty", tmp_path / "expected.safetensors", tmp_path / "m.json"
    empty_folder.mkdir()
    not_safetensors.write_text("not a safetensors file")
    percent.write_text(json.dumps({"AP": 49.0}))
    base = ["--checkpoint", str(checkpoint), "--model-name", "dino-r50-4scale", "--output-dir", str(tmp_path / "out")]
    not_an_image = tmp_path / "fake.jpg"
    not_an_image.write_bytes(b"not an image")
    for extra, message in (
        (["--verify", str(empty_folder)], "no expected-output file at"),
        (["--verify", str(not_safetensors)], f"--verify {str(not_safetensors)!r}: "),
        (["--measured-metrics", str(percent)], "must be a fraction in [0, 1]"),
        # the next three failed after the conversion (a PIL / safetensors traceback) or were silently ignored
        (["--write-expected", str(tmp_path / "e.safetensors"), "--expected-images", str(not_an_image)],
         f"--expected-images: cannot read {str(not_an_image)!r}"),
        (["--write-expected", str(empty_folder)], "cannot be written as a file"),
        (["--expected-images", str(not_an_image)], "give --write-expected FILE too"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            converter.main(base + extra)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_verify_reads_parity_fixture_format():
    fixture = REPO.parent / "shared" / "parity" / "r50_4scale"
    if not fixture.is_dir():
        pytest.skip(f"parity fixtures not found at {fixture}")
    data = verify.load_expected(fixture)
    batch, height, width = data["pixel_mask"].shape
    assert data["pixel_values"].shape == (batch, 3, height, width)
    assert data["logits"].shape == (batch, 900, 91) and data["pred_boxes"].shape == (batch, 900, 4)
    assert data["encoder_topk_indices"].shape == (batch, 900) and data["encoder_logits"].shape == (batch, 900, 91)
    # HF convention after the inversion: 1 on real pixels; the top-left pixel is always real
    assert data["pixel_mask"].dtype == torch.int64 and bool((data["pixel_mask"][:, 0, 0] == 1).all())
    assert bool((data["pixel_mask"] == 0).any())  # the batch has padding


@pytest.mark.slow
def test_converter_verify_against_original_fixture(tmp_path):
    """Full-size: the fixture's original-format checkpoint, converted by the CLI and verified against the ORIGINAL
    implementation's outputs (forced query selection)."""
    fixture = REPO.parent / "shared" / "parity" / "r50_4scale"
    if not fixture.is_dir():
        pytest.skip(f"parity fixtures not found at {fixture}")
    checkpoint = tmp_path / "r50.pth"
    subprocess.run([sys.executable, str(fixture.parent / "make_original_checkpoint.py"), str(fixture / "manifest.json"),
                    str(checkpoint)], check=True, capture_output=True)
    proc = subprocess.run(
        [sys.executable, str(REPO / "conversion" / "convert_original_checkpoint.py"), "--checkpoint", str(checkpoint),
         "--model-name", "dino-r50-4scale", "--output-dir", str(tmp_path / "hf"), "--verify", str(fixture)],
        capture_output=True, text=True, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: max |diff|" in proc.stdout


def test_conversion_readme_holds_the_generated_table():
    readme = (REPO / "conversion" / "README.md").read_text()
    assert markdown_table() in readme


def test_push_of_an_unlisted_original_checkpoint(monkeypatch):
    fake = FakeHub(monkeypatch)
    model = tiny_model(seed=2)
    hub.push_converted_checkpoint(model, tiny_processor(), "me/own-dino", checkpoint_file="/x/my_run.pth",
                                  model_name="dino-r50-4scale")
    readme = fake.commits[0]["files"]["README.md"].decode()
    assert "converted from `my_run.pth`" in readme and "not one of the released checkpoints" in readme
    assert "It detects 80 categories." in readme and "| 1 | person |" in readme
    assert fake.commits[0]["commit_message"] == "Upload converted my_run.pth (hf_dino)"
    with pytest.raises(ValueError, match="pass model_name for the card, one of dino-r50-4scale, "):
        hub.push_converted_checkpoint(model, tiny_processor(), "me/own-dino", checkpoint_file="/x/my_run.pth")
    with pytest.raises(ValueError, match=r"one of .*\(got 'dino-r50'\)"):
        hub.push_converted_checkpoint(model, tiny_processor(), "me/own-dino", checkpoint_file="/x/my_run.pth",
                                      model_name="dino-r50")
    assert len(fake.commits) == 1
