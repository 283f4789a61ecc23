"""Shared test set-up: where the project's shared data lives, the parity-fixture helpers, the one tiny model
configuration, and the query-selection forcer.

Import path: `pyproject.toml` (`[tool.pytest.ini_options] pythonpath`) puts this checkout's `src/` first (whatever an
installed copy of `hf_dino` points to) and `conversion/` (the converter scripts); pytest puts `tests/` there for the
helpers below (`from conftest import ...`). No test edits `sys.path`.

Data outside the repository (`../shared`: the original implementation's parity fixtures, COCO-MINI) exists only in
the project's workspace; tests that need it skip with a message saying so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PARITY = SHARED / "parity"
COCO_MINI = SHARED / "data" / "coco-mini"

# parity fixture folder -> the converter's --model-name
FIXTURE_MODEL_NAMES = {"r50_4scale": "dino-r50-4scale", "swinl_4scale": "dino-swinl-4scale"}

# the tiny model of every plumbing test (random weights, a forward pass in well under a second on a CPU)
TINY_CONFIG = dict(
    backbone="resnet18",
    encoder_layers=1,
    decoder_layers=1,
    d_model=64,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    encoder_n_points=2,
    decoder_n_points=2,
    num_queries=20,
    num_denoising=0,
)
SMALL_SIZE = {"shortest_edge": 96, "longest_edge": 160}  # keeps CPU forward passes fast


def tiny_config(**overrides):
    """`DinoConfig` of the tiny model; `overrides` change what a test needs (e.g. denoising queries, labels)."""
    from hf_dino import DinoConfig

    return DinoConfig(**{**TINY_CONFIG, **overrides})


def tiny_model(seed: int = 0, **overrides):
    """The tiny model, seeded, in eval mode."""
    from hf_dino import DinoForObjectDetection

    torch.manual_seed(seed)
    return DinoForObjectDetection(tiny_config(**overrides)).eval()


def tiny_processor():
    from hf_dino import DinoImageProcessor

    return DinoImageProcessor(size=dict(SMALL_SIZE))


def save_tiny_model_dir(path: str | Path, seed: int = 0) -> Path:
    """A plain `save_pretrained` folder (weights, config, processor config), no remote code."""
    path = Path(path)
    tiny_model(seed).save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return path


def require_parity(fixture: str | None = None) -> Path:
    """The fixture folder, or skip the test with a clear message when ../shared is absent (a user's clone)."""
    path = PARITY if fixture is None else PARITY / fixture
    if not path.exists():
        pytest.skip(f"parity fixtures not found at {path} (../shared is only present in the project's workspace)")
    return path


def write_original_checkpoint(fixture: str, out_dir: Path) -> Path:
    """Write the fixture's synthetic ORIGINAL-format checkpoint with the fixture's own script."""
    folder = require_parity(fixture)
    out = out_dir / f"{fixture}.pth"
    subprocess.run(
        [sys.executable, str(PARITY / "make_original_checkpoint.py"), str(folder / "manifest.json"), str(out)],
        check=True, capture_output=True,
    )
    return out


def convert_with_cli(checkpoint: Path, model_name: str, output_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "conversion" / "convert_original_checkpoint.py"),
         "--checkpoint", str(checkpoint), "--model-name", model_name, "--output-dir", str(output_dir)],
        capture_output=True, text=True, env=subprocess_env(),
    )


def subprocess_env(**extra) -> dict:
    """The environment of a child Python process that must import this checkout's package."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


@pytest.fixture
def force_selection():
    """`forced_query_selection(model, indices)`: replay a recorded query selection on one model instance (the
    parity protocol of ../shared/parity/README.md); see `hf_dino.modeling_dino.forced_query_selection`."""
    from hf_dino.modeling_dino import forced_query_selection

    return forced_query_selection


# ----------------------------------------------------------------------------------------------------------------------
# Running on several workers (pytest-xdist; the README's test command uses `-n 2 --dist loadgroup`)
# ----------------------------------------------------------------------------------------------------------------------
def _shares_a_fixture(item) -> bool:
    """Whether the test uses a fixture of this test suite built once for several tests (module, class, package or
    session scope; pytest's own, such as `tmp_path_factory`, have no `baseid` and do not count)."""
    definitions = item._fixtureinfo.name2fixturedefs.values()
    return any(d.scope != "function" and d.baseid for defs in definitions for d in defs)


def pytest_configure(config):
    """On an xdist worker: the CPU cores are shared by the workers, so torch (and the processes tests start) use
    `cores / workers` threads instead of every core each, which would oversubscribe them."""
    import os

    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """Work units for `--dist loadgroup`: the tests of one file stay together (their module-scoped fixtures, such as
    a converted parity fixture or an exported graph, are built once), except slow tests that share nothing, which
    are units of their own; the units holding slow tests come first (run `--no-loadscope-reorder`), so that the
    longest work starts at once and the workers finish together. Without xdist this only orders the tests."""
    def unit(item) -> str:
        slow_alone = item.get_closest_marker("slow") is not None and not _shares_a_fixture(item)
        return item.nodeid if slow_alone else item.nodeid.split("::")[0]

    units = {item: unit(item) for item in items}
    slow_units = {units[item] for item in items if item.get_closest_marker("slow") is not None}
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(units[item]))
    order = {item: index for index, item in enumerate(items)}
    items.sort(key=lambda item: (units[item] not in slow_units, order[item]))
