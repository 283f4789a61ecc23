"""The converter's reading of original checkpoint files: the release layout the original `main.py` writes (with an
`argparse.Namespace` of arguments), the bare layout, the EMA copy, and one-line errors for files that are not
original DINO checkpoints -- all before any model is built."""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import subprocess
import sys
import time

import pytest
import torch

from conftest import PARITY, REPO, require_parity, subprocess_env

CONVERTER = REPO / "conversion" / "convert_original_checkpoint.py"


@pytest.fixture(scope="module")
def converter():
    spec = importlib.util.spec_from_file_location("convert_original_checkpoint", CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dino_like_state_dict(value: float = 0.0) -> dict[str, torch.Tensor]:
    return {"transformer.level_embed": torch.full((4, 8), value), "class_embed.0.weight": torch.full((91, 8), value)}


def test_release_layout_with_argparse_namespace(converter, tmp_path):
    """What the original main.py saves: model, optimizer, lr_scheduler, epoch and an argparse.Namespace."""
    state_dict = _dino_like_state_dict(1.0)
    path = tmp_path / "checkpoint0011_4scale.pth"
    torch.save({"model": state_dict, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "lr_scheduler": {"step_size": 11, "_last_lr": [1e-5]}, "epoch": 11,
                "args": argparse.Namespace(lr=1e-4, backbone="resnet50", num_feature_levels=4)}, path)
    with pytest.raises(Exception, match="Namespace"):  # what a plain weights_only load does (the bug)
        torch.load(path, weights_only=True)
    loaded = converter.load_original_state_dict(path)
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)


def test_release_layout_written_by_the_fixture_script(converter, tmp_path):
    folder = require_parity("r50_4scale")
    path = tmp_path / "r50.pth"
    subprocess.run([sys.executable, str(PARITY / "make_original_checkpoint.py"), str(folder / "manifest.json"),
                    str(path)], check=True, capture_output=True)
    raw = torch.load(path, weights_only=False)
    assert isinstance(raw["args"], argparse.Namespace) and {"optimizer", "lr_scheduler", "epoch"} <= raw.keys()
    loaded = converter.load_original_state_dict(path)
    assert loaded.keys() == raw["model"].keys()
    assert all(torch.equal(loaded[k], raw["model"][k]) for k in loaded)


def test_model_only_layout_and_ema_weights(converter, tmp_path):
    path = tmp_path / "model_only.pth"
    torch.save({"model": _dino_like_state_dict(1.0)}, path)
    assert float(converter.load_original_state_dict(path)["transformer.level_embed"][0, 0]) == 1.0
    with pytest.raises(converter.ConversionError, match="has no 'ema_model' entry"):
        converter.load_original_state_dict(path, weights="ema_model")

    path = tmp_path / "with_ema.pth"
    torch.save({"model": _dino_like_state_dict(1.0), "ema_model": _dino_like_state_dict(2.0), "epoch": 3}, path)
    assert float(converter.load_original_state_dict(path)["transformer.level_embed"][0, 0]) == 1.0
    assert float(converter.load_original_state_dict(path, weights="ema_model")["transformer.level_embed"][0, 0]) == 2.0


def test_weights_saved_from_a_distributed_wrapper_lose_its_prefix(converter, tmp_path):
    """A fine-tuning script that saves `model.state_dict()` of a DistributedDataParallel-wrapped model prefixes every
    key with `module.`; the file converts like the unwrapped one (its keys were reported as not DINO's)."""
    folder = require_parity("r50_4scale")
    plain = tmp_path / "plain.pth"
    subprocess.run([sys.executable, str(PARITY / "make_original_checkpoint.py"), str(folder / "manifest.json"),
                    str(plain)], check=True, capture_output=True)
    raw = torch.load(plain, weights_only=False)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({**raw, "model": {f"module.{k}": v for k, v in raw["model"].items()}}, wrapped)
    loaded = converter.load_original_state_dict(wrapped)
    assert list(loaded) == list(raw["model"])
    assert all(torch.equal(loaded[k], raw["model"][k]) for k in loaded)
    assert converter.looks_like_dino(loaded)

    # a prefix on some keys only is a name like any other, not a wrapper's
    partial = {"module.transformer.level_embed": torch.zeros(4, 8), "class_embed.0.weight": torch.zeros(91, 8)}
    assert list(converter.strip_distributed_prefix(partial)) == list(partial)


def test_other_pickled_objects_need_an_explicit_opt_in(converter, tmp_path):
    path = tmp_path / "untrusted.pth"
    torch.save({"model": _dino_like_state_dict(), "note": pathlib.PurePosixPath("/a")}, path)
    with pytest.raises(converter.ConversionError, match=r"PurePosixPath.*--trust-checkpoint"):
        converter.load_original_state_dict(path)
    assert "transformer.level_embed" in converter.load_original_state_dict(path, trust_checkpoint=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERTER), *args], capture_output=True, text=True, env=subprocess_env())


def test_bad_files_fail_with_one_line_naming_the_file(tmp_path):
    truncated = tmp_path / "truncated.pth"
    full = tmp_path / "full.pth"
    torch.save({"model": {f"transformer.w{i}": torch.randn(64, 64) for i in range(8)}}, full)
    truncated.write_bytes(full.read_bytes()[:2000])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    other = tmp_path / "resnet.pth"  # a random non-DINO checkpoint: many keys, none of them DINO's
    torch.save({"model": {f"layer{i}.conv.weight": torch.zeros(1) for i in range(500)}}, other)
    cases = {
        tmp_path / "missing.pth": "no such file",
        empty: "the file is empty",
        truncated: "truncated or corrupt",
        other: "not an original DINO checkpoint",
    }
    for path, message in cases.items():
        start = time.perf_counter()
        proc = _cli("--checkpoint", str(path), "--model-name", "dino-r50-4scale", "--output-dir", str(tmp_path / "o"))
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and message in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "o").exists()
        print(f"{path.name}: {lines[0][:120]} ({time.perf_counter() - start:.1f} s)")
