"""trust_remote_code: a repo staged by `conversion/hub.py` loads and predicts in a fresh Python process where
`hf_dino` cannot be imported (only the `.py` files of the repo travel; pure-PyTorch deformable attention).

The fresh process runs `python -I` (no PYTHONPATH, no script directory, no user site) with `HF_HUB_OFFLINE=1` and a
meta-path hook that refuses every `hf_dino` import (the package may be installed in site-packages, even editable).
It loads the model (1) from the local folder and (2) by repo id from a Hub-layout cache, compares its outputs with
the ones computed here with the installed package, runs `pipeline("object-detection", trust_remote_code=True)`, and
runs the two code snippets of the generated model card.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO, tiny_model, tiny_processor
from hf_dino import hub
from hf_dino.model_card import finetuned_model_card

COCO_IMAGE = REPO.parent / "shared" / "data" / "coco-mini" / "val2017" / "000000000139.jpg"
REPO_ID = "hf-dino-test/tiny-dino"

CHILD = r'''
import importlib.abc, json, os, re, sys

attempts = []

class BlockHfDino(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_dino" or name.startswith("hf_dino."):
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

# an installed package (an editable install puts src/ on sys.path through a .pth file) is taken off the path,
# and any other way in is refused
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "hf_dino"))]
sys.meta_path.insert(0, BlockHfDino())
try:
    import hf_dino  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("FAIL: hf_dino is importable in the clean process")
attempts.clear()

import time
t0 = time.time()
timings = {}
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection, pipeline

work, image_path = sys.argv[1], sys.argv[2]
data = load_file(os.path.join(work, "io.safetensors"))
report = {}
for source in (os.path.join(work, "repo"), "REPO_ID"):
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    model = AutoModelForObjectDetection.from_pretrained(source, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=True)
    with torch.no_grad():
        out = model(pixel_values=data["pixel_values"], pixel_mask=data["pixel_mask"])
    report[source] = {
        "model_module": type(model).__module__,
        "config_module": type(config).__module__,
        "processor_class": type(processor).__name__,
        "processor_module": type(processor).__module__,
        "logits_diff": float((out.logits - data["logits"]).abs().max()),
        "boxes_diff": float((out.pred_boxes - data["pred_boxes"]).abs().max()),
    }
    timings[source] = time.time() - t0

detector = pipeline("object-detection", model=os.path.join(work, "repo"), trust_remote_code=True)
detections = detector(image_path, threshold=0.0)
report["pipeline"] = {"n": len(detections), "first": detections[0], "model_module": type(detector.model).__module__}
by_id = pipeline("object-detection", model="REPO_ID", trust_remote_code=True)(image_path, threshold=0.0)
report["pipeline_by_repo_id"] = [d["score"] for d in by_id] == [d["score"] for d in detections]
timings["pipeline"] = time.time() - t0

readme = open(os.path.join(work, "repo", "README.md")).read()
snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
report["snippets"] = len(snippets)
for i, code in enumerate(snippets):
    exec(compile(code, f"<model card snippet {i}>", "exec"), {"__name__": "__main__"})
    timings[f"snippet{i}"] = time.time() - t0

report["hf_dino_import_attempts"] = sorted(set(attempts))
msda = [m for k, m in sys.modules.items() if k.startswith("transformers_modules.") and k.endswith(".deformable_attention")]
report["remote_attention_modules"] = len(msda)
report["remote_kernels_loaded"] = [repr(getattr(m, "_kernels", None)) for m in msda if getattr(m, "_kernels", None) is not None]
report["timings"] = timings
report["hf_dino_modules_loaded"] = sorted(k for k in sys.modules if k == "hf_dino" or k.startswith("hf_dino."))
print("REPORT " + json.dumps(report))
'''.replace("REPO_ID", REPO_ID)


def _write_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """The files of ``folder`` as the Hub cache would hold ``repo_id`` at ``main`` (offline loading by repo id)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def test_saved_repo_predicts_without_hf_dino(tmp_path):
    image = COCO_IMAGE
    if not image.is_file():  # COCO-MINI absent: any RGB image will do for the plumbing
        from PIL import Image

        image = tmp_path / "image.jpg"
        Image.new("RGB", (200, 150), (120, 30, 200)).save(image)

    model, processor = tiny_model(seed=3), tiny_processor()
    repo = tmp_path / "repo"
    card = finetuned_model_card(REPO_ID, model.config.id2label, metrics=None)
    # the card's snippets load the local folder and a local image (no network in tests)
    card = card.replace(f'"{REPO_ID}"', f'"{repo}"').replace(
        '"http://images.cocodataset.org/val2017/000000039769.jpg"', f'"{image}"'
    )
    files = hub.save_for_hub(model, processor, repo, card)

    # what travels: weights, configs, card and the .py files; every .py file is a verbatim copy of the package's
    py_files = sorted(f for f in files if f.endswith(".py"))
    assert {"configuration_dino.py", "modeling_dino.py", "image_processing_dino.py", "deformable_attention.py"} <= set(py_files)
    assert "__init__.py" not in py_files
    for name in py_files:
        assert (repo / name).read_bytes() == (REPO / "src" / "hf_dino" / name).read_bytes(), name
        for match in re.finditer(r"^\s*from \.(\w+) import", (repo / name).read_text(), flags=re.M):
            assert f"{match.group(1)}.py" in py_files, f"{name} imports .{match.group(1)}, which does not travel"
    config = json.loads((repo / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_dino.DinoConfig",
        "AutoModelForObjectDetection": "modeling_dino.DinoForObjectDetection",
    }
    assert json.loads((repo / "preprocessor_config.json").read_text())["auto_map"] == {
        "AutoImageProcessor": "image_processing_dino.DinoImageProcessor"
    }
    assert getattr(model.config, "auto_map", None) is None  # staging leaves the caller's objects as they were

    # reference outputs with the installed package
    from PIL import Image
    from safetensors.torch import save_file

    inputs = processor(images=[Image.open(image).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    save_file(
        {
            "pixel_values": inputs["pixel_values"].contiguous(),
            "pixel_mask": inputs["pixel_mask"].contiguous(),
            "logits": out.logits.contiguous(),
            "pred_boxes": out.pred_boxes.contiguous(),
        },
        tmp_path / "io.safetensors",
    )
    cache = tmp_path / "hub_cache"
    _write_hub_cache(cache, REPO_ID, repo)

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_CACHE": str(cache),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, str(tmp_path), str(image)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])

    for source in (str(repo), REPO_ID):
        r = report[source]
        assert r["model_module"].startswith("transformers_modules.") and r["model_module"].endswith(".modeling_dino")
        assert r["config_module"].startswith("transformers_modules.")
        assert r["processor_class"] == "DinoImageProcessor" and r["processor_module"].startswith("transformers_modules.")
        assert r["logits_diff"] < 1e-4 and r["boxes_diff"] < 1e-5, r
    assert report["pipeline"]["model_module"].startswith("transformers_modules.")
    assert report["pipeline"]["n"] > 0 and set(report["pipeline"]["first"]) == {"score", "label", "box"}
    assert report["pipeline_by_repo_id"] is True
    assert report["snippets"] == 2
    assert report["hf_dino_modules_loaded"] == []
    assert report["remote_attention_modules"] >= 1 and report["remote_kernels_loaded"] == []  # pure PyTorch there
    print("timings in the clean process:", report["timings"])
    # the remote modules never reach for the package (e.g. a compiled-kernel loader imported as `hf_dino.kernels`);
    # if one does, it must be optional (inside try/except), which the successful run above shows
    print("hf_dino imports attempted by the remote code:", report["hf_dino_import_attempts"])


def test_remote_code_needs_only_documented_packages():
    """transformers refuses remote code whose imports (outside try/except) are not installed: the travelling files
    may only need what the model card lists."""
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    src = REPO / "src" / "hf_dino"
    files = {src / f"{name}.py" for name in ("configuration_dino", "modeling_dino", "image_processing_dino")}
    for f in list(files):
        files |= {Path(p) for p in get_relative_import_files(str(f))}
    third_party = set()
    for f in files:
        third_party |= {name for name in get_imports(str(f)) if name not in sys.stdlib_module_names}
    card_says = {"torch", "torchvision", "transformers", "timm", "scipy", "PIL"}
    assert third_party <= card_says | {"numpy", "huggingface_hub", "safetensors"}, sorted(third_party)
    card = finetuned_model_card("me/x", {0: "a"})
    assert "needs `torch`, `torchvision`, `transformers`, `timm`, `scipy` and `pillow`" in card
