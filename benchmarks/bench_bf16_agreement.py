"""How far bfloat16 inference is from float32: the top-100 detections per image of a bfloat16 run matched against
the float32 ones (same label, IoU >= 0.95, score within 0.02), on a converted parity fixture of the original DINO
(../shared/parity, synthetic weights) or on a saved model folder and images (e.g. the README demo's ``final/``).

bfloat16 is run two ways: ``from_pretrained(..., dtype=torch.bfloat16)`` and the float32 model under
``torch.autocast("cpu", torch.bfloat16)``. A float32 detection counts as matched when some unused bfloat16 detection
of the same image satisfies the rule (greedy, best IoU first).

Each bfloat16 run is reported twice: free, and with the float32 run's query selection replayed
(``forced_query_selection``). The second isolates the arithmetic from the top-900 choice among near-tied encoder
scores: with the fixture's synthetic weights thousands of encoder tokens score within bfloat16's rounding of each
other, so a free bfloat16 run picks other queries and its detections cannot be compared one to one (a trained model
separates its scores, see the README demo model).

    python benchmarks/bench_bf16_agreement.py                          # the r50_4scale fixture
    python benchmarks/bench_bf16_agreement.py --model out/final --images img1.jpg img2.jpg
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PARITY = REPO.parent / "shared" / "parity"
FIXTURE_MODEL_NAMES = {"r50_4scale": "dino-r50-4scale", "swinl_4scale": "dino-swinl-4scale"}


def convert_fixture(fixture: str, out_dir: Path) -> Path:
    checkpoint = out_dir / f"{fixture}.pth"
    subprocess.run([sys.executable, str(PARITY / "make_original_checkpoint.py"), str(PARITY / fixture / "manifest.json"),
                    str(checkpoint)], check=True, capture_output=True)
    subprocess.run([sys.executable, str(REPO / "conversion" / "convert_original_checkpoint.py"), "--checkpoint",
                    str(checkpoint), "--model-name", FIXTURE_MODEL_NAMES[fixture], "--output-dir", str(out_dir / "hf")],
                   check=True, capture_output=True)
    return out_dir / "hf"


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of xyxy boxes, `[n, 4] x [m, 4] -> [n, m]`."""
    from torchvision.ops import box_iou as iou

    return iou(a.double(), b.double())


def matched_fraction(reference: list[dict], candidate: list[dict], iou_min=0.95, score_tol=0.02) -> tuple[int, int]:
    matched = total = 0
    for ref, cand in zip(reference, candidate):
        total += len(ref["scores"])
        if not len(ref["scores"]) or not len(cand["scores"]):
            continue
        iou = box_iou(ref["boxes"], cand["boxes"])
        ok = ((ref["labels"][:, None] == cand["labels"][None]) & (iou >= iou_min)
              & ((ref["scores"][:, None] - cand["scores"][None]).abs() <= score_tol))
        used = set()
        for i in range(len(ref["scores"])):
            for j in torch.argsort(iou[i], descending=True).tolist():
                if ok[i, j] and j not in used:
                    used.add(j)
                    matched += 1
                    break
    return matched, total


def own_selection(model, **inputs) -> torch.Tensor:
    """The query selection `[B, K]` the model makes itself on `inputs` (its `rank_encoder_tokens` result)."""
    inner = model.model
    captured = []

    def rank(scores: torch.Tensor, k: int) -> torch.Tensor:
        captured.append(type(inner).rank_encoder_tokens(inner, scores, k))
        return captured[-1]

    inner.rank_encoder_tokens = rank
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        del inner.rank_encoder_tokens
    return captured[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="r50_4scale", choices=sorted(FIXTURE_MODEL_NAMES))
    parser.add_argument("--model", default=None, help="saved model folder (instead of a fixture)")
    parser.add_argument("--images", nargs="*", default=None, help="images for --model")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.model is not None and not args.images:
        parser.error("--model needs --images (the images to compare the detections on)")
    if args.model is None and args.images:
        parser.error("--images are the input of --model (a fixture brings its own images)")
    missing = [path for path in args.images or [] if not Path(path).is_file()]
    if missing:
        parser.error(f"--images: no file {missing[0]!r}")
    if args.threads < 1 or args.top_k < 1:
        parser.error("--threads and --top-k must be >= 1")
    torch.set_num_threads(args.threads)
    from PIL import Image
    from safetensors.torch import load_file

    from hf_dino import DinoForObjectDetection, DinoImageProcessor
    from hf_dino.modeling_dino import forced_query_selection

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder = Path(args.model)
            processor = DinoImageProcessor.from_pretrained(folder)
            pil = [Image.open(p).convert("RGB") for p in args.images]
            inputs = processor(images=pil, return_tensors="pt")
            pixel_values, pixel_mask = inputs["pixel_values"], inputs["pixel_mask"]
            sizes = [(im.height, im.width) for im in pil]
            source = f"{folder} on {len(pil)} images"
        else:
            folder = convert_fixture(args.fixture, Path(tmp))
            inputs = load_file(PARITY / args.fixture / "inputs.safetensors")
            pixel_values, pixel_mask = inputs["pixel_values"], (~inputs["pixel_mask"]).long()
            sizes = [tuple(pixel_values.shape[-2:])] * pixel_values.shape[0]
            source = f"parity fixture {args.fixture} (synthetic weights, {pixel_values.shape[0]} images)"
        processor = DinoImageProcessor()
        model = DinoForObjectDetection.from_pretrained(folder).eval()

        def detections(run_model, autocast=False, selection=None):
            forced = contextlib.nullcontext() if selection is None else forced_query_selection(run_model, selection)
            cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with torch.inference_mode(), cast, forced:
                outputs = run_model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            return processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes,
                                                           top_k=args.top_k)

        reference = detections(model)
        selection = own_selection(model, pixel_values=pixel_values, pixel_mask=pixel_mask)
        bf16_model = DinoForObjectDetection.from_pretrained(folder, dtype=torch.bfloat16).eval()
        results = [
            ("from_pretrained(dtype=bfloat16)", detections(bf16_model)),
            ("  with float32's selection", detections(bf16_model, selection=selection)),
            ("bfloat16 autocast", detections(model, autocast=True)),
            ("  with float32's selection", detections(model, autocast=True, selection=selection)),
        ]
    print(f"{source}: top-{args.top_k} detections per image, matched to float32 (same label, IoU >= 0.95, "
          f"score within 0.02)")
    for name, candidate in results:
        matched, total = matched_fraction(reference, candidate)
        print(f"  {name:32s} {matched}/{total} = {100 * matched / max(total, 1):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
