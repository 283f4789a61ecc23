"""bfloat16 / float16 models (`model.to(dtype)`, `from_pretrained(..., dtype=...)`) and bfloat16 autocast run end to
end on CPU, with the compiled kernel and with the pure-PyTorch path, and agree with the float32 model.

Box geometry (anchors, proposals, reference points, sampling locations) stays float32 in a 16-bit model, and so do the
query-selection heads (their ranking); features are 16-bit. The comparisons are against the same weights run in
float32, to the 16-bit resolution."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hf_dino.deformable_attention as da
from hf_dino import DinoForObjectDetection, DinoImageProcessor
from hf_dino.kernels import _loader

from conftest import subprocess_env
from conftest import tiny_model as conftest_tiny_model

def tiny_model() -> DinoForObjectDetection:
    """The shared tiny model with two encoder and decoder layers and denoising queries (training steps)."""
    return conftest_tiny_model(seed=0, encoder_layers=2, decoder_layers=2, num_queries=30, num_denoising=10,
                               num_labels=5)


def batch():
    """Two images of different sizes, the second padded (bottom, right) as the processor pads."""
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 96, 128, generator=generator)
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.long)
    pixel_mask[1, 80:] = 0
    pixel_mask[1, :, 100:] = 0
    pixel_values[1] *= pixel_mask[1]
    return pixel_values, pixel_mask


@pytest.fixture(scope="module")
def fp32_run():
    model = tiny_model()
    pixel_values, pixel_mask = batch()
    with torch.no_grad():
        return model, model(pixel_values=pixel_values, pixel_mask=pixel_mask)


@pytest.fixture(params=["kernel", "pytorch"])
def attention_path(request, monkeypatch):
    """Runs a test with the compiled kernel (checking that it really runs) and with the pure-PyTorch path."""
    calls = []
    if request.param == "kernel":
        try:
            _loader.check_toolchain("cpu")
        except _loader.KernelBuildError as error:
            pytest.skip(f"cannot build the CPU kernel here: {error}")
        monkeypatch.delenv(_loader.ENV_DISABLE, raising=False)
        for name in ("ms_deform_attn", "ms_deform_attn_from_offsets"):  # (the encoder's, at inference: the latter)
            original = getattr(da._kernels, name)

            def spy(value, *args, original=original):
                calls.append(value.dtype)
                return original(value, *args)

            monkeypatch.setattr(da._kernels, name, spy)
    else:
        monkeypatch.setenv(_loader.ENV_DISABLE, "1")
    yield request.param, calls


def forced_float32_run(selection: torch.Tensor):
    """The float32 model, with its query selection (`torch.topk` over the encoder scores) forced to `selection`."""
    original = torch.topk

    def topk(x, k, dim=-1, largest=True, sorted=True):
        if x.dim() == 2 and x.shape[0] == selection.shape[0] and k == selection.shape[1]:
            return torch.return_types.topk((x.gather(1, selection), selection))
        return original(x, k, dim=dim, largest=largest, sorted=sorted)

    pixel_values, pixel_mask = batch()
    torch.topk = topk
    try:
        with torch.no_grad():
            return tiny_model()(pixel_values=pixel_values, pixel_mask=pixel_mask)
    finally:
        torch.topk = original


def assert_agrees_with_float32(outputs, reference, dtype):
    """Encoder memory within a few 16-bit roundings (relative to its scale); the top-K selection the same as in
    float32 up to near-ties (a random model's encoder scores are close together); with the float32 model forced to
    the same selection, boxes within 0.02 (a 16-bit box coordinate has a resolution of ~0.004) and logits within a
    few 16-bit roundings of their scale."""
    eps = torch.finfo(dtype).eps
    memory, memory_ref = outputs.encoder_last_hidden_state.float(), reference.encoder_last_hidden_state
    assert (memory - memory_ref).abs().max() <= 16 * eps * memory_ref.abs().max()
    common = sum(len(set(a.tolist()) & set(b.tolist()))
                 for a, b in zip(outputs.encoder_topk_indices, reference.encoder_topk_indices))
    assert common >= 0.8 * reference.encoder_topk_indices.numel(), "16-bit query selection differs beyond near-ties"
    forced = forced_float32_run(outputs.encoder_topk_indices)
    assert (outputs.pred_boxes - forced.pred_boxes).abs().max() <= 0.02
    assert (outputs.logits.float() - forced.logits).abs().max() <= 16 * eps * forced.logits.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_16bit_model_runs_end_to_end(fp32_run, attention_path, dtype):
    fp32_model, reference = fp32_run
    path, kernel_calls = attention_path
    model = tiny_model().to(dtype)
    pixel_values, pixel_mask = batch()
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values.to(dtype), pixel_mask=pixel_mask)
    if path == "kernel":  # 2 encoder + 2 decoder layers, each in the model's dtype (no float32 copy of the value)
        assert kernel_calls == [dtype] * 4
    assert outputs.logits.dtype == dtype and outputs.encoder_last_hidden_state.dtype == dtype
    assert outputs.pred_boxes.dtype == torch.float32  # box geometry stays float32
    assert_agrees_with_float32(outputs, reference, dtype)
    detections = DinoImageProcessor().post_process_object_detection(outputs, threshold=0.0, target_sizes=[(96, 128)] * 2)
    assert all(torch.isfinite(d["boxes"]).all() and d["scores"].dtype == torch.float32 for d in detections)


def test_from_pretrained_in_bfloat16(fp32_run, tmp_path):
    fp32_model, reference = fp32_run
    fp32_model.save_pretrained(tmp_path)
    model = DinoForObjectDetection.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    # everything bfloat16 but the query-selection heads (`_keep_in_fp32_modules_strict`)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    kept = {name for name in dtypes if name.startswith(SELECTION_HEADS)}
    assert len(kept) == 12 and all(dtypes[name] == torch.float32 for name in kept)
    assert {dtypes[name] for name in dtypes.keys() - kept} == {torch.bfloat16}
    pixel_values, pixel_mask = batch()
    converted = to_bfloat16_but_selection_heads(tiny_model())
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values.bfloat16(), pixel_mask=pixel_mask)
        converted = converted(pixel_values=pixel_values.bfloat16(), pixel_mask=pixel_mask)
    assert torch.equal(outputs.logits, converted.logits) and torch.equal(outputs.pred_boxes, converted.pred_boxes)
    assert outputs.logits.dtype == outputs.encoder_logits.dtype == torch.bfloat16
    assert_agrees_with_float32(outputs, reference, torch.bfloat16)


def test_from_pretrained_in_bfloat16_with_a_new_label_set(fp32_run, tmp_path):
    """Re-labelling while loading in 16 bits re-initialises the encoder's class head: it must be float32 like the
    other selection heads (it was created in bfloat16 and the forward pass failed with a dtype mismatch)."""
    fp32_model, _ = fp32_run
    fp32_model.save_pretrained(tmp_path)
    model = DinoForObjectDetection.from_pretrained(
        tmp_path, dtype=torch.bfloat16, num_labels=3, ignore_mismatched_sizes=True).eval()
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    kept = {name for name in dtypes if name.startswith(SELECTION_HEADS)}
    assert len(kept) == 12 and all(dtypes[name] == torch.float32 for name in kept)
    assert {dtypes[name] for name in dtypes.keys() - kept} == {torch.bfloat16}
    assert model.model.enc_out_class_embed.weight.shape[0] == 3
    pixel_values, pixel_mask = batch()
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values.bfloat16(), pixel_mask=pixel_mask)
    assert outputs.logits.shape[-1] == 3 and torch.isfinite(outputs.logits.float()).all()


SELECTION_HEADS = ("model.enc_output", "model.enc_output_norm", "model.enc_out_class_embed", "model.enc_out_bbox_embed")


def to_bfloat16_but_selection_heads(model: DinoForObjectDetection) -> DinoForObjectDetection:
    """The model cast to bfloat16 by hand, its query-selection heads left as they are (float32)."""
    heads = {name: copy.deepcopy(model.get_submodule(name)) for name in SELECTION_HEADS}
    model.to(torch.bfloat16)
    for name, head in heads.items():
        model.set_submodule(name, head)
    return model


@pytest.mark.parametrize("how", ["from_pretrained", "autocast"])
def test_query_selection_ranks_in_float32(fp32_run, tmp_path, how):
    """The top-K ranking of encoder tokens is made on float32 scores, from the float32 head weights, in a bfloat16
    model from `from_pretrained` and under bfloat16 autocast: the scores it ranks equal a float64 recomputation of the
    heads on the (16-bit) memory they read, with the float32 weights, to float32 precision. (bfloat16 weights or
    products would be ~1e-2 off, and reorder near-tied tokens.)"""
    fp32_model, _ = fp32_run
    if how == "from_pretrained":
        fp32_model.save_pretrained(tmp_path)
        model = DinoForObjectDetection.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        cast = contextlib.nullcontext()
    else:
        model, cast = tiny_model(), torch.autocast("cpu", dtype=torch.bfloat16)
    inner, captured = model.model, {}

    def rank(scores, k):
        captured["scores"] = scores
        return type(inner).rank_encoder_tokens(inner, scores, k)

    def first_input(module, args):
        captured.setdefault("memory", args[0])  # the all-token call comes first

    inner.rank_encoder_tokens = rank
    hook = inner.enc_output.register_forward_pre_hook(first_input)
    pixel_values, pixel_mask = batch()
    with torch.no_grad(), cast:
        outputs = model(pixel_values=pixel_values.to(inner.level_embed.dtype), pixel_mask=pixel_mask)
    hook.remove()
    memory, scores = captured["memory"], captured["scores"]
    assert memory.dtype == scores.dtype == torch.float32
    # the heads read the model's memory (zeroed at the invalid tokens), upcast exactly
    kept = memory.abs().sum(-1) > 0
    assert torch.equal(memory[kept], outputs.encoder_last_hidden_state.float()[kept]) and kept.float().mean() > 0.5
    heads = fp32_model.model
    expected = F.linear(
        F.layer_norm(F.linear(memory.double(), heads.enc_output.weight.double(), heads.enc_output.bias.double()),
                     (memory.shape[-1],), heads.enc_output_norm.weight.double(), heads.enc_output_norm.bias.double()),
        heads.enc_out_class_embed.weight.double(), heads.enc_out_class_embed.bias.double(),
    ).max(-1)[0]
    assert (scores.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_bfloat16_autocast_inference_and_training_step(fp32_run, attention_path):
    _, reference = fp32_run
    pixel_values, pixel_mask = batch()
    model = tiny_model()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    assert_agrees_with_float32(outputs, reference, torch.bfloat16)
    labels = [
        {"class_labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads)
    # the deformable attention's projections get a gradient through the kernel's / the fallback's backward
    assert model.model.encoder.layers[0].self_attn.value_proj.weight.grad.abs().sum() > 0
    assert model.model.encoder.layers[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0


def test_encoder_positions_in_the_tokens_dtype_under_autocast(monkeypatch):
    """Under CPU autocast to bfloat16 the encoder gets its position embeddings in the tokens' dtype (bfloat16, like a
    bfloat16 model's), not float32 (which the float32 level embedding would make them): each layer's query, states
    plus positions, is then a bfloat16 add that its products take as it is."""
    from hf_dino import modeling_dino

    seen = []
    forward = modeling_dino.DinoEncoder.forward

    def recorded(self, hidden_states, position_embeddings, *args, **kwargs):
        seen.append((hidden_states.dtype, position_embeddings.dtype))
        return forward(self, hidden_states, position_embeddings, *args, **kwargs)

    monkeypatch.setattr(modeling_dino.DinoEncoder, "forward", recorded)
    model = tiny_model()
    pixel_values, pixel_mask = batch()
    with torch.no_grad():
        model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    assert seen == [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_encoder_feed_forward_in_chunks_in_16_bits(dtype):
    """A 16-bit model's encoder feed-forward block on more tokens than one chunk (the CPU's chunked path,
    `DinoReluFeedForwardInChunks`): output and gradients within a few 16-bit roundings of a float64 recomputation of
    the plain block with the same (16-bit) weights and inputs."""
    from hf_dino.modeling_dino import ENCODER_FFN_CHUNK_TOKENS

    layer = tiny_model().model.encoder.layers[0].train().to(dtype)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, ENCODER_FFN_CHUNK_TOKENS + 700, layer.linear1.in_features, generator=generator).to(dtype)
    upstream = torch.randn(hidden.shape, generator=generator).to(dtype)
    weights = [p.detach().double().requires_grad_() for p in (layer.linear1.weight, layer.linear1.bias,
                                                              layer.linear2.weight, layer.linear2.bias)]
    reference_input = hidden.double().requires_grad_()
    expected = F.linear(F.linear(reference_input, *weights[:2]).relu(), *weights[2:])
    expected.backward(upstream.double())

    trained_input = hidden.clone().requires_grad_()
    output = layer.feed_forward(trained_input)
    assert type(output.grad_fn.next_functions[0][0]).__name__ == "DinoReluFeedForwardInChunksBackward"
    output.backward(upstream)
    eps = torch.finfo(dtype).eps
    pairs = [(output, expected), (trained_input.grad, reference_input.grad)]
    pairs += [(p.grad, w.grad) for p, w in zip((layer.linear1.weight, layer.linear1.bias, layer.linear2.weight,
                                                layer.linear2.bias), weights)]
    for got, want in pairs:
        assert got.dtype == dtype
        assert (got.double() - want).abs().max() <= 16 * eps * want.abs().max()


# ---- asking for bfloat16 from the pipeline, the CLI and evaluate.py ----------------------------------------------
COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(path)
    DinoImageProcessor(size={"shortest_edge": 96, "longest_edge": 160}).save_pretrained(path)
    return path


def test_pipeline_and_cli_in_bfloat16(model_dir, tmp_path):
    from PIL import Image
    from transformers import pipeline

    from hf_dino_cli import main

    image = Image.fromarray(torch.randint(0, 255, (120, 150, 3), generator=torch.Generator().manual_seed(1),
                                          dtype=torch.uint8).numpy())
    detector = pipeline("object-detection", model=str(model_dir), dtype=torch.bfloat16)
    assert detector.model.dtype == torch.bfloat16
    detections = detector(image, threshold=0.0)
    # the same model converted by hand, fed the processor's float32 pixels (the model casts them)
    model = to_bfloat16_but_selection_heads(DinoForObjectDetection.from_pretrained(model_dir)).eval()
    processor = DinoImageProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    expected = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(120, 150)])[0]
    assert len(detections) == len(expected["scores"]) > 0
    assert [d["score"] for d in detections] == pytest.approx(expected["scores"].tolist(), abs=1e-6)

    image.save(tmp_path / "image.png")
    rc = main(["predict", str(tmp_path / "image.png"), "--model", str(model_dir), "--dtype", "bfloat16",
               "--threshold", "0.0", "--device", "cpu", "--out", str(tmp_path / "out"), "--no-draw"])
    assert rc == 0
    results = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted(r["score"] for r in results) == pytest.approx(sorted(d["score"] for d in detections), abs=1e-4)


def test_evaluate_script_in_bfloat16(model_dir, tmp_path):
    annotations = COCO_MINI / "annotations" / "instances_val2017.json"
    if not annotations.exists():
        pytest.skip(f"COCO-MINI not found at {COCO_MINI} (../shared is only present in the project's workspace)")
    script = Path(__file__).resolve().parents[1] / "examples" / "evaluate.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--model", str(model_dir), "--images", str(COCO_MINI / "val2017"),
         "--annotations", str(annotations), "--max-images", "2", "--dtype", "bfloat16", "--labels-are-category-ids",
         "--output", str(tmp_path / "results.json"), "--metrics-output", str(tmp_path / "metrics.json")],
        capture_output=True, text=True, timeout=600, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results and all(math.isfinite(r["score"]) and len(r["bbox"]) == 4 for r in results)
    assert set(json.loads((tmp_path / "metrics.json").read_text())) >= {"AP", "AP50"}


def test_decoder_self_attention_in_bfloat16(monkeypatch):
    """A bfloat16 decoder layer at inference takes its self-attention from the CPU extension's bfloat16 attention
    where that runs (AVX-512 BF16; elsewhere nothing changes): as close to the float64 module as the bfloat16
    module itself; so does a float32 layer under CPU autocast to bfloat16. With a mask (the denoising queries'),
    autograd, training, a hook on `self_attn`, custom kernels disabled or autocast to float16, the module runs (the
    hook fires)."""
    import hf_dino.kernels as kernels
    from conftest import tiny_config
    from hf_dino.modeling_dino import DinoDecoderLayer

    torch.manual_seed(0)
    layer = DinoDecoderLayer(tiny_config()).eval()  # d_model 64, 2 heads of 32
    half = copy.deepcopy(layer).to(torch.bfloat16)
    query_key, value = torch.randn(2, 30, 64).bfloat16(), torch.randn(2, 30, 64).bfloat16()
    with torch.no_grad():
        want = layer.double().self_attn(query_key.double(), query_key.double(), value.double(), need_weights=False)[0]
        module = half.self_attn(query_key, query_key, value, need_weights=False)[0]
    calls = []
    original = kernels.bfloat16_attention
    monkeypatch.setattr(kernels, "bfloat16_attention", lambda *args: calls.append(1) or original(*args))
    usable = kernels.bfloat16_attention_usable(query_key)

    with torch.no_grad():
        got = half.self_attention(query_key, value, None)
    assert calls == ([1] if usable else []) and got.dtype == torch.bfloat16
    error, module_error = (got.double() - want).abs(), (module.double() - want).abs()
    assert error.max() <= 1.25 * module_error.max() + 1e-3 and error.mean() <= 1.25 * module_error.mean() + 1e-4

    calls.clear()
    mask = torch.zeros(30, 30, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(half.self_attention(query_key, value, mask),
                           half.self_attn(query_key, query_key, value, attn_mask=mask, need_weights=False)[0])
    assert torch.equal(half.self_attention(query_key, value, None).detach(), module)  # autograd on
    with torch.no_grad():
        half.train()
        assert torch.equal(half.self_attention(query_key, value, None), module)  # (DINO's dropout is 0)
        half.eval()
        seen = []
        handle = half.self_attn.register_forward_hook(lambda *args: seen.append(1))
        assert torch.equal(half.self_attention(query_key, value, None), module) and seen == [1]
        handle.remove()
        half.disable_custom_kernels = True
        assert torch.equal(half.self_attention(query_key, value, None), module)
        half.disable_custom_kernels = False
        with torch.autocast("cpu", torch.float16):  # not bfloat16: the module (autocast casts its products)
            assert torch.equal(half.self_attention(query_key, value, None),
                               half.self_attn(query_key, query_key, value, need_weights=False)[0])
    assert calls == []

    # the float32 layer under CPU autocast to bfloat16: the kernel on the bfloat16 projections autocast makes
    layer = layer.float()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        got = layer.self_attention(query_key.float(), value.float(), None)
        module = layer.self_attn(query_key.float(), query_key.float(), value.float(), need_weights=False)[0]
    assert calls == ([1] if usable else []) and got.dtype == module.dtype == torch.bfloat16
    error, module_error = (got.double() - want).abs(), (module.double() - want).abs()
    assert error.max() <= 1.25 * module_error.max() + 1e-3 and error.mean() <= 1.25 * module_error.mean() + 1e-4
