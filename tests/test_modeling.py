"""Model behaviour beyond the parity fixtures: save/load, Auto classes, converter errors, 5-scale conversion,
batch independence, denoising isolation, bad configs, training forward."""

from __future__ import annotations

import contextlib
import copy
import importlib
import re

import numpy as np
import pytest
import torch

import hf_dino
from conftest import TINY_CONFIG
from convert_original_checkpoint import MODEL_CONFIGS, ConversionError, convert, main as convert_main
from hf_dino import DinoConfig, DinoForObjectDetection, DinoModel


def tiny_config(**overrides) -> DinoConfig:
    """The tests' tiny config (conftest) with what these tests need: two decoder layers (auxiliary outputs), denoising
    queries, 5 labels, the default 4 sampling points."""
    values = dict(TINY_CONFIG, decoder_layers=2, num_queries=30, num_denoising=10, num_labels=5, encoder_n_points=4,
                  decoder_n_points=4)
    values.update(overrides)
    return DinoConfig(**values)


def images(seed: int, shape=(2, 3, 96, 128)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---- the original's key layout, written independently of the converter's rename table --------------------------
def to_original_state_dict(model: DinoForObjectDetection) -> dict[str, torch.Tensor]:
    """Our weights under the ORIGINAL checkpoint's names, shared heads under every alias (as the original saves)."""
    config = model.config
    swin = config.is_swin_backbone
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.backbone.body."):
            rest = key[len("model.backbone.body."):]
            out[("backbone.0." if swin else "backbone.0.body.") + rest] = value
        elif key.startswith("model.decoder.bbox_embed."):
            for j in range(config.decoder_layers):
                suffix = key[len("model.decoder.bbox_embed."):]
                out[f"transformer.decoder.bbox_embed.{j}.{suffix}"] = value
                out[f"bbox_embed.{j}.{suffix}"] = value
        elif key.startswith("class_embed."):
            for j in range(config.decoder_layers):
                out[f"transformer.decoder.class_embed.{j}.{key[len('class_embed.'):]}"] = value
                out[f"class_embed.{j}.{key[len('class_embed.'):]}"] = value
        else:
            for ours, theirs in [
                ("model.decoder.layer_norm.", "transformer.decoder.norm."),
                ("model.decoder.reference_point_head.", "transformer.decoder.ref_point_head."),
                ("model.content_query_embed.", "transformer.tgt_embed."),
                ("model.denoising_class_embed.", "label_enc."),
                ("model.input_projections.", "input_proj."),
                ("model.", "transformer."),
            ]:
                if key.startswith(ours):
                    out[theirs + key[len(ours):]] = value
                    break
    if swin:
        for name, buffer in model.named_buffers():
            if name.endswith("relative_position_index"):
                out[name.replace("model.backbone.body.", "backbone.0.")] = buffer
    return out


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DinoForObjectDetection(tiny_config()).eval()


# ---- save / load, Auto classes ------------------------------------------------------------------------------------
def test_save_load_roundtrip_identical(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = DinoForObjectDetection.from_pretrained(tmp_path).eval()
    x = images(1)
    with torch.no_grad():
        a, b = tiny_model(x), loaded(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.pred_boxes, b.pred_boxes)


def test_auto_classes_and_double_import(tiny_model, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForObjectDetection

    importlib.reload(hf_dino)  # registering twice must be harmless
    tiny_model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is DinoConfig
    assert type(AutoModelForObjectDetection.from_pretrained(tmp_path)) is DinoForObjectDetection
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is DinoModel
    # our model type must not shadow one that transformers itself defines (DINOv2, Grounding DINO, ...)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert DinoConfig.model_type not in CONFIG_MAPPING_NAMES


def test_missing_and_unexpected_keys_in_saved_folder_are_reported(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("model.level_embed")
    weights["model.not_a_weight"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, info = DinoForObjectDetection.from_pretrained(tmp_path, output_loading_info=True)
    assert "model.level_embed" in info["missing_keys"]
    assert "model.not_a_weight" in info["unexpected_keys"]


# ---- converter -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dino-r50-5scale", "dino-swinl-5scale"])
def test_five_scale_variants_convert_and_run(name, tmp_path):
    torch.manual_seed(0)
    reference = DinoForObjectDetection(DinoConfig(**MODEL_CONFIGS[name])).eval()
    assert reference.config.num_feature_levels == 5 and len(reference.model.input_projections) == 5
    checkpoint = tmp_path / "original.pth"
    torch.save({"model": to_original_state_dict(reference)}, checkpoint)
    # (the Swin-L folder would be ~0.9 GB: save/reload is exercised on the ResNet variant only)
    swin = reference.config.is_swin_backbone
    converted = convert(checkpoint, name, None if swin else tmp_path / "hf")
    models = [converted] if swin else [converted, DinoForObjectDetection.from_pretrained(tmp_path / "hf").eval()]
    x, mask = images(2, (1, 3, 160, 192)), torch.ones(1, 160, 192, dtype=torch.long)
    mask[:, :, 150:] = 0
    with torch.no_grad():
        expected = reference(x, mask)
        for model in models:
            out = model(x, mask)
            assert torch.equal(out.logits, expected.logits) and torch.equal(out.pred_boxes, expected.pred_boxes)
    # 5 levels: strides 4..64 over the 160x192 input
    assert expected.encoder_last_hidden_state.shape[1] == 40 * 48 + 20 * 24 + 10 * 12 + 5 * 6 + 3 * 3


@pytest.fixture(scope="module")
def r50_original(tmp_path_factory):
    torch.manual_seed(0)
    model = DinoForObjectDetection(DinoConfig(**MODEL_CONFIGS["dino-r50-4scale"])).eval()
    return to_original_state_dict(model)


def _save(state_dict, path):
    torch.save({"model": state_dict}, path)
    return path


def test_converter_lists_missing_keys(r50_original, tmp_path):
    broken = dict(r50_original)
    del broken["transformer.level_embed"]
    del broken["backbone.0.body.layer3.0.conv1.weight"]
    with pytest.raises(ConversionError) as error:
        convert(_save(broken, tmp_path / "c.pth"), "dino-r50-4scale")
    assert "model.level_embed" in str(error.value) and "model.backbone.body.layer3.0.conv1.weight" in str(error.value)


def test_converter_lists_unmapped_keys_and_cli_fails(r50_original, tmp_path, capsys):
    broken = dict(r50_original)
    broken["transformer.some_research_flag.weight"] = torch.zeros(3)
    path = _save(broken, tmp_path / "c.pth")
    assert convert_main(["--checkpoint", str(path), "--model-name", "dino-r50-4scale", "--output-dir", str(tmp_path / "o")]) == 1
    assert "transformer.some_research_flag.weight" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_converter_rejects_diverging_head_aliases(r50_original, tmp_path):
    broken = dict(r50_original)
    broken["class_embed.3.bias"] = broken["class_embed.3.bias"] + 1
    with pytest.raises(ConversionError, match=re.escape("class_embed.3.bias")):
        convert(_save(broken, tmp_path / "c.pth"), "dino-r50-4scale")


def test_converter_rejects_wrong_architecture(r50_original, tmp_path):
    with pytest.raises(ConversionError, match="shape mismatch"):
        convert(_save(r50_original, tmp_path / "c.pth"), "dino-r50-5scale")


def test_converter_lists_the_keys_of_a_swin_checkpoint_given_an_r50_name(r50_original, tmp_path):
    """A Swin checkpoint (here: Swin-style keys, a `relative_position_index` buffer among them) converted with a
    ResNet model name gets the listing of what does not fit (an AttributeError from the buffer check before)."""
    swin_like = {k: v for k, v in r50_original.items() if not k.startswith("backbone.0.body.")}
    swin_like["backbone.0.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(144, 144, dtype=torch.long)
    swin_like["backbone.0.layers.0.blocks.0.attn.qkv.weight"] = torch.zeros(576, 192)
    with pytest.raises(ConversionError) as error:
        convert(_save(swin_like, tmp_path / "swin.pth"), "dino-r50-4scale")
    message = str(error.value)
    assert "265 model weights the checkpoint does not provide" in message  # the ResNet's
    assert "renamed keys the model does not have:\n  model.backbone.body.layers.0.blocks.0.attn.qkv.weight" in message


def test_converter_cli_checks_its_files_before_converting(r50_original, tmp_path, capsys):
    """--verify, --expected-images and --measured-metrics files that do not exist, a negative --verify-atol and an
    --output-dir that is a file are refused before anything is converted or written (a traceback after the
    folder was written before)."""
    path = _save(r50_original, tmp_path / "c.pth")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = ["--checkpoint", str(path), "--model-name", "dino-r50-4scale", "--output-dir", str(tmp_path / "o")]
    for options, message in [
        (["--verify", str(tmp_path / "missing.safetensors")], "--verify: no file or folder"),
        (["--write-expected", str(tmp_path / "e.safetensors"), "--expected-images", str(tmp_path / "x.jpg")],
         "--expected-images: no file"),
        (["--verify-atol", "-1"], "--verify-atol must be >= 0"),
    ]:
        with pytest.raises(SystemExit):
            convert_main(base + options)
        assert message in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        convert_main(base[:-1] + [str(a_file)])
    assert "is a file, not a folder" in capsys.readouterr().err


# ---- batching and padding ---------------------------------------------------------------------------------------------
def test_outputs_do_not_depend_on_batch_partner_or_order(tiny_model):
    """Image A padded onto the same canvas gives the same outputs whatever image shares its batch, in any order."""
    a = torch.zeros(3, 96, 128)
    a[:, :80, :100] = images(3, (3, 80, 100))
    mask_a = torch.zeros(96, 128, dtype=torch.long)
    mask_a[:80, :100] = 1
    partner1, partner2 = images(4, (3, 96, 128)), images(5, (3, 96, 128)) * 2
    full = torch.ones(96, 128, dtype=torch.long)
    with torch.no_grad():
        first = tiny_model(torch.stack([a, partner1]), torch.stack([mask_a, full]))
        second = tiny_model(torch.stack([partner2, a]), torch.stack([full, mask_a]))
        alone = tiny_model(a[None], mask_a[None])
    for other, index in ((second, 1), (alone, 0)):
        assert (first.logits[0] - other.logits[index]).abs().max() <= 1e-4
        assert (first.pred_boxes[0] - other.pred_boxes[index]).abs().max() <= 1e-4


def test_boxes_are_relative_to_the_unpadded_image(tiny_model):
    """Valid ratios: boxes are normalized by the real (unpadded) image, as in the original. With the box heads at
    zero (their initialisation) every detection is its encoder proposal, centred on its token and normalized by the
    valid part of its level (paper, Deformable DETR two-stage): computed here independently for an image whose right
    half is padding. Normalizing by the padded canvas would halve every cx."""
    model = copy.deepcopy(tiny_model)
    for head in (model.model.enc_out_bbox_embed, model.model.decoder.bbox_embed):
        torch.nn.init.zeros_(head.layers[-1].weight)
        torch.nn.init.zeros_(head.layers[-1].bias)
    x = images(6, (1, 3, 128, 128))
    mask = torch.zeros(1, 128, 128, dtype=torch.long)
    mask[:, :, :64] = 1  # the image is the left half of the canvas
    x = x * mask[:, None]
    shapes = []
    hooks = [p.register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape[-2:]))) for p in model.model.input_projections]
    with torch.no_grad():
        out = model(x, mask)
    for hook in hooks:
        hook.remove()
    assert [w for _, w in shapes] == [16, 8, 4, 2]  # strides 8, 16, 32, 64
    starts = torch.tensor([0] + [h * w for h, w in shapes]).cumsum(0)
    checked = 0
    for query, token in enumerate(out.encoder_topk_indices[0].tolist()):
        level = int((starts[1:] <= token).sum())
        h, w = shapes[level]
        row, col = divmod(token - int(starts[level]), w)
        valid_w = w // 2
        expected = torch.tensor([(col + 0.5) / valid_w, (row + 0.5) / h, 0.05 * 2**level, 0.05 * 2**level])
        if col >= valid_w or not ((expected > 0.01) & (expected < 0.99)).all():
            continue  # a padded / border token: no proposal (its box saturates)
        checked += 1
        torch.testing.assert_close(out.encoder_pred_boxes[0, query], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.pred_boxes[0, query], expected, rtol=0, atol=1e-4)
    assert checked >= 10
    assert out.logits.shape == (1, 30, 5) and out.intermediate_logits.shape == (1, 2, 30, 5)
    assert out.intermediate_reference_points.shape == (1, 3, 30, 4)


def test_forced_query_selection_replays_indices_on_one_instance_only(tiny_model):
    """The seam used by the parity tests and conversion/verify.py: the given selection is used by this instance (its
    encoder outputs are the forced tokens' own), the model's own ranking is reported, nothing else is touched."""
    from hf_dino.modeling_dino import forced_query_selection

    torch.manual_seed(0)
    other = DinoForObjectDetection(tiny_config()).eval()
    x = images(12, (1, 3, 96, 128))
    token_logits = {}

    def first_call(module, args, output):  # the class head's first call scores every token (the ranking); its
        token_logits.setdefault("all", output)  # second, the selected tokens. Returns None: output unchanged

    hook = tiny_model.model.enc_out_class_embed.register_forward_hook(first_call)
    with torch.no_grad():
        own = tiny_model(x)
        forced_indices = torch.randperm(own.encoder_last_hidden_state.shape[1], generator=torch.Generator().manual_seed(0))[:30][None]
        with forced_query_selection(tiny_model, forced_indices) as record:
            forced = tiny_model(x)
            other_inside = other(x)
        after = tiny_model(x)
    hook.remove()
    assert record.calls == 1 and torch.equal(record.own, own.encoder_topk_indices)
    assert torch.equal(forced.encoder_topk_indices, forced_indices)
    expected_logits = token_logits["all"].gather(1, forced_indices[..., None].expand(-1, -1, 5))
    torch.testing.assert_close(forced.encoder_logits, expected_logits, rtol=1e-6, atol=1e-6)
    assert not torch.equal(forced.logits, own.logits)
    assert torch.equal(after.logits, own.logits) and "rank_encoder_tokens" not in vars(tiny_model.model)
    with torch.no_grad():
        assert torch.equal(other_inside.logits, other(x).logits)
    with pytest.raises(ValueError, match="forced selection has shape"):
        with forced_query_selection(tiny_model, forced_indices[:, :10]), torch.no_grad():
            tiny_model(x)


# ---- training forward: denoising isolation, losses, gradients ------------------------------------------------------
def _labels():
    return [
        {"class_labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"class_labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8])
def test_narrow_integer_class_ids_give_the_int64_loss(dtype):
    """Class ids in any signed integer dtype train as int64 ids do (same loss terms), in training with denoising
    queries and in eval mode; torch indexes only with int64 / int32, so the loss widens them."""
    model = DinoForObjectDetection(tiny_config(num_denoising=10))
    for mode in ("train", "eval"):
        getattr(model, mode)()
        expected = None
        for ids_dtype in (torch.int64, dtype):
            labels = [{**t, "class_labels": t["class_labels"].to(ids_dtype)} for t in _labels()]
            torch.manual_seed(0)
            outputs = model(images(3), labels=labels)
            if expected is None:
                expected = outputs.loss_dict
        assert outputs.loss_dict.keys() == expected.keys()
        for name, value in outputs.loss_dict.items():
            assert torch.equal(value, expected[name]), (mode, name)


def test_denoising_queries_do_not_leak(monkeypatch):
    """Perturbing denoising group 1 leaves the matching queries and group 0 unchanged, and changes group 1."""
    import hf_dino.modeling_dino as modeling

    torch.manual_seed(0)
    model = DinoForObjectDetection(tiny_config(dropout=0.0)).train()
    x = images(7)
    original_builder = modeling.build_contrastive_denoising_queries
    perturb = {"on": False}

    def builder(*args, **kwargs):
        queries = original_builder(*args, **kwargs)
        if perturb["on"]:
            size = queries.meta.group_size
            queries.content = queries.content.clone()
            queries.content[:, size: 2 * size] += 5.0
        return queries

    monkeypatch.setattr(modeling, "build_contrastive_denoising_queries", builder)
    runs = []
    for flag in (False, True):
        perturb["on"] = flag
        torch.manual_seed(1)
        with torch.no_grad():
            runs.append(model(x, labels=_labels()))
    clean, perturbed = runs
    size = clean.denoising_meta.group_size
    assert clean.denoising_meta.num_groups >= 2
    assert torch.allclose(clean.logits, perturbed.logits, atol=1e-6)
    assert torch.allclose(clean.pred_boxes, perturbed.pred_boxes, atol=1e-6)
    assert torch.allclose(clean.denoising_logits[:, :, :size], perturbed.denoising_logits[:, :, :size], atol=1e-6)
    assert (clean.denoising_logits[:, :, size: 2 * size] - perturbed.denoising_logits[:, :, size: 2 * size]).abs().max() > 1e-3


def test_training_forward_returns_all_losses_and_gradients():
    torch.manual_seed(0)
    model = DinoForObjectDetection(tiny_config()).train()
    out = model(images(8), labels=_labels())
    assert torch.isfinite(out.loss)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_ce_interm", "loss_ce_dn", "loss_bbox_dn_0"):
        assert key in out.loss_dict, key
    out.loss.backward()
    assert model.class_embed.weight.grad.abs().sum() > 0
    assert model.model.denoising_class_embed.weight.grad.abs().sum() > 0
    assert model.model.decoder.bbox_embed.layers[-1].weight.grad.abs().sum() > 0  # (earlier layers: 0 at init)
    # ResNet stem and layer1 stay frozen as in the original
    assert not model.model.backbone.body.conv1.weight.requires_grad
    assert model.model.backbone.body.layer2[0].conv1.weight.requires_grad


def test_query_selection_gradients_are_those_of_heads_over_all_tokens():
    """`select_queries` runs the heads over all tokens without autograd (for the ranking) and differentiably on the
    selected tokens only. The original runs them over all tokens, ranks, and gathers the selected rows (gradients
    flow through the gather). In float64 both give the same selection, outputs and gradients, for the memory and
    every head parameter; tokens that are padding or whose proposal is invalid are zeroed in both."""
    torch.manual_seed(0)
    # 65 tokens, 15 of them padding in the second image: 60 queries must select some of those
    model = DinoModel(tiny_config(num_queries=60)).double().train()
    shapes = [(6, 8), (3, 4), (2, 2), (1, 1)]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in shapes]
    for mask in masks:  # the second image's right quarter is padding
        mask[1, :, mask.shape[2] - mask.shape[2] // 4:] = True
    padding_mask = torch.cat([m.flatten(1) for m in masks], 1)
    memory = torch.randn(2, padding_mask.shape[1], 64, dtype=torch.float64, requires_grad=True)
    k = model.config.num_queries
    generator = torch.Generator().manual_seed(1)
    logit_weights = torch.randn(2, k, 5, generator=generator, dtype=torch.float64)
    box_weights = torch.randn(2, k, 4, generator=generator, dtype=torch.float64)
    heads = [model.enc_output, model.enc_output_norm, model.enc_out_class_embed, model.enc_out_bbox_embed]
    params = [memory] + [p for head in heads for p in head.parameters()]

    def original():
        proposals, invalid = model.encoder_proposals(padding_mask, shapes, memory.dtype)
        output = model.enc_output_norm(model.enc_output(memory.masked_fill(invalid, 0.0)))
        logits = model.enc_out_class_embed(output)
        boxes_logit = model.enc_out_bbox_embed(output) + proposals
        topk = torch.topk(logits.max(-1)[0], k, dim=1)[1]
        selected_logits = logits.gather(1, topk[..., None].expand(-1, -1, logits.shape[-1]))
        selected_boxes = boxes_logit.gather(1, topk[..., None].expand(-1, -1, 4)).sigmoid()
        return selected_logits, selected_boxes, topk

    results = []
    for run in (original, lambda: model.select_queries(memory, padding_mask, shapes)[1:]):
        logits, boxes, topk = run()
        loss = (logits * logit_weights).sum() + (boxes * box_weights).sum()
        results.append((logits, boxes, topk, torch.autograd.grad(loss, params)))
    (want_logits, want_boxes, want_topk, want_grads), (logits, boxes, topk, grads) = results
    assert torch.equal(topk, want_topk)
    torch.testing.assert_close(logits, want_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(boxes, want_boxes, rtol=1e-12, atol=1e-12)
    assert want_grads[0].abs().sum() > 0 and want_grads[0][padding_mask].abs().sum() == 0
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = DinoForObjectDetection(tiny_config(num_denoising=0)).train()
    x = images(9)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        model(x, labels=_labels()).loss.backward()
        grads.append(model.model.encoder.layers[0].linear1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_images_without_objects_train():
    model = DinoForObjectDetection(tiny_config()).train()
    empty = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    out = model(images(10), labels=empty)
    assert torch.isfinite(out.loss)
    out.loss.backward()


# ---- bad input ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(backbone="vgg16"), "Unknown backbone"),
        (dict(d_model=250), "divisible"),
        (dict(num_feature_levels=2, backbone_out_indices=[1, 2, 3]), "num_feature_levels"),
        (dict(backbone_out_indices=[3, 1]), "backbone_out_indices"),
        (dict(num_queries=0), "num_queries"),
        (dict(label_noise_ratio=1.5), "label_noise_ratio"),
        # used to fail deep in the model, or never: labels the model cannot name, values nn modules reject
        (dict(id2label={1: "cat", 3: "dog"}), r"id2label must name the labels 0..1 .*got keys \[1, 3\].*'N/A'"),
        (dict(dropout=1.5), r"dropout must be in \[0, 1\]"),
        (dict(focal_alpha=2.0), r"focal_alpha must be in \[0, 1\]"),
        (dict(init_std=-1.0), "init_std must be positive"),
        (dict(encoder_ffn_dim=0), "encoder_ffn_dim must be positive"),
        (dict(box_noise_scale=-0.5), "box_noise_scale must be >= 0"),
    ],
)
def test_bad_configs_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        DinoConfig(**overrides)


@pytest.mark.parametrize(
    "overrides", [dict(num_queries=20.5), dict(num_queries="20"), dict(auxiliary_loss="no"), dict(dropout="0.1")]
)
def test_config_fields_are_type_checked(overrides):
    """As transformers' own configs (huggingface_hub's strict dataclasses): the field types were strings under
    `from __future__ import annotations`, so nothing was checked; `auxiliary_loss="no"` stayed truthy and a float
    num_queries failed deep in torch. Ints where floats go, paths and tuples stay accepted."""
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    field = next(iter(overrides))
    with pytest.raises(StrictDataclassFieldValidationError, match=f"Field '{field}' expected"):
        DinoConfig(**overrides)
    from pathlib import Path

    config = DinoConfig(dropout=0, focal_alpha=1, backbone_weights=Path("weights.pth"), backbone_out_indices=(1, 2, 3))
    assert config.backbone_weights == "weights.pth" and config.backbone_out_indices == [1, 2, 3]


def test_one_feature_level_defaults_to_the_last_stage():
    """`num_feature_levels=1` gave no stage at all ("backbone_out_indices ... got []"); it is the last one now, and
    every other level count keeps its stages (4 levels: C3-C5 + one more; 5 levels: C2-C5 + one more)."""
    assert [DinoConfig(num_feature_levels=n).backbone_out_indices for n in (1, 2, 3, 4, 5, 6)] == [
        [3], [3], [2, 3], [1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]


def test_compact_config():
    from hf_dino.configuration_dino import compact_config

    from hf_dino.denoising import denoising_group_count

    config = compact_config(id2label={0: "a", 1: "b"})
    assert config.backbone == "resnet18" and config.d_model % 32 == 0 and config.num_labels == 2
    assert not config.use_pretrained_backbone
    # a denoising budget: with many objects per image (real data) the denoising queries stay about 2 * num_denoising
    # (2 per object and group), instead of growing with the objects next to the 50 matching queries
    for max_objects in (3, 10, 40):
        assert 2 * max_objects * denoising_group_count(config.num_denoising, max_objects) <= 2 * config.num_denoising



def test_bad_inputs_raise_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="pixel_values"):
        tiny_model(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="pixel_mask"):
        tiny_model(torch.zeros(1, 3, 64, 64), torch.ones(1, 32, 32))
    with pytest.raises(ValueError, match="fewer than num_queries"):
        tiny_model(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="class_labels"):
        tiny_model.train()
        try:
            tiny_model(images(11), labels=[{"class_labels": torch.tensor([9]), "boxes": torch.rand(1, 4)}] * 2)
        finally:
            tiny_model.eval()
    with pytest.raises(TypeError, match="pixel_values must be a torch.Tensor.*got ndarray"):
        tiny_model(images(11).numpy())
    one_image_labels = {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    with pytest.raises(ValueError, match="labels must be a list with one dict per image, got dict"):
        tiny_model(images(11)[:1], labels=one_image_labels)


def test_processor_labels_go_straight_into_the_model(tiny_model):
    """`model(**processor(images=..., annotations=..., return_tensors="pt"))`: the processor's labels (one
    `BatchFeature` per image, a mapping but not a dict) are accepted, with the loss of plain dicts of the same
    tensors."""
    from PIL import Image

    from conftest import tiny_processor

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)) for _ in range(2)]
    annotations = [
        {"image_id": i, "annotations": [{"bbox": [10.0 + i, 12.0, 40.0, 30.0], "category_id": 3, "area": 1200.0,
                                         "iscrowd": 0}]}
        for i in range(2)
    ]
    inputs = tiny_processor()(images=pictures, annotations=annotations, return_tensors="pt")
    assert not isinstance(inputs["labels"][0], dict)
    tiny_model.train()
    try:
        torch.manual_seed(0)  # the denoising queries draw noise
        loss = tiny_model(**inputs).loss
        torch.manual_seed(0)
        expected = tiny_model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"],
                              labels=[dict(target) for target in inputs["labels"]]).loss
    finally:
        tiny_model.eval()
    assert torch.isfinite(loss) and torch.equal(loss, expected)


def test_unknown_keyword_arguments_raise_type_error(tiny_model):
    """A typo must not silently drop an input (a `pixel_maks=` run would ignore the padding)."""
    x, mask = images(13, (1, 3, 96, 128)), torch.ones(1, 96, 128, dtype=torch.long)
    for module in (tiny_model, tiny_model.model):
        with pytest.raises(TypeError, match="pixel_maks"):
            module(x, pixel_maks=mask)
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        tiny_model(x, output_attentions=True)


def test_labels_in_pixels_or_outside_the_image_are_rejected(tiny_model):
    x = images(14)
    pixels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[60.0, 40.0, 30.0, 20.0]])}] * 2
    with pytest.raises(ValueError, match=r"labels\[0\]\['boxes'\] has values outside \[0, 1\].*\(cx, cy, w, h\)"):
        tiny_model(x, labels=pixels)


def test_pixel_masks_the_model_cannot_read_are_rejected(tiny_model):
    """The valid ratios and the encoder proposals measure each image from its first row and column: an all-zero or
    inverted mask, or padding at the top / left, used to give meaningless boxes (all ~[1, 1, 1, 1] for an all-zero
    mask) without an error. A bottom/right padded mask, as the processor writes, and no mask still run."""
    x = images(15)
    padded = torch.zeros(2, 96, 128, dtype=torch.long)
    padded[0] = 1
    padded[1, :64, :100] = 1
    letterbox = torch.zeros(2, 96, 128, dtype=torch.long)
    letterbox[:, 16:80] = 1
    with torch.no_grad():
        for mask, bad in ((torch.zeros(2, 96, 128), "[0, 1]"), (1 - padded, "[0, 1]"), (letterbox, "[0, 1]")):
            with pytest.raises(ValueError, match=rf"pixel_mask of image\(s\) {re.escape(bad)}: .*top left"):
                tiny_model(x, pixel_mask=mask)
        one_bad = padded.clone()
        one_bad[1, 5, 5] = 0  # a hole inside the image
        with pytest.raises(ValueError, match=r"pixel_mask of image\(s\) \[1\]"):
            tiny_model(x, pixel_mask=one_bad)
        tiny_model(x, pixel_mask=padded)
        tiny_model(x, pixel_mask=padded.bool())
        tiny_model(x)


def test_decoder_hidden_states_are_the_matching_queries_in_training():
    """In training with labels the denoising queries lead the decoder's queries; every decoder output left them out
    but `decoder_hidden_states` ([B, 50, D] instead of [B, 30, D] here, query q at index q + 20). Each layer's state,
    after the decoder's LayerNorm, must be that layer's `intermediate_hidden_states` (the same queries)."""
    torch.manual_seed(0)
    model = DinoModel(tiny_config()).train()
    labels = [{"class_labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])}] * 2
    out = model(images(16), labels=labels, output_hidden_states=True)
    assert out.denoising_hidden_states is not None and out.denoising_hidden_states.shape[2] > 0
    states = out.decoder_hidden_states
    assert len(states) == 3 and all(state.shape == (2, 30, 64) for state in states)
    for layer in range(2):
        torch.testing.assert_close(model.decoder.layer_norm(states[layer + 1]), out.intermediate_hidden_states[:, layer])


def test_labels_are_validated_once_per_training_forward(monkeypatch):
    import hf_dino.box_ops
    import hf_dino.modeling_dino as modeling

    calls = []
    check = hf_dino.box_ops.check_detection_labels
    monkeypatch.setattr(modeling, "check_detection_labels", lambda *a: calls.append(1) or check(*a))
    torch.manual_seed(0)
    model = DinoForObjectDetection(tiny_config()).train()
    out = model(images(15), labels=_labels())
    assert calls == [1] and out.denoising_meta is not None and torch.isfinite(out.loss)
    # the denoising queries and the loss do not validate again
    import hf_dino.denoising
    import hf_dino.loss_dino

    assert not hasattr(hf_dino.denoising, "check_detection_labels") and not hasattr(hf_dino.loss_dino, "check_detection_labels")


def test_new_model_gets_dino_initialisation():
    """transformers skips parameter-less modules of custom-code models; DINO's own init must still happen."""
    import math

    model = DinoForObjectDetection(tiny_config())
    prior = -math.log((1 - 0.01) / 0.01)
    assert torch.allclose(model.class_embed.bias, torch.full_like(model.class_embed.bias, prior))
    assert torch.allclose(model.model.enc_out_class_embed.bias, torch.full_like(model.model.enc_out_class_embed.bias, prior))
    attentions = [layer.self_attn for layer in model.model.encoder.layers]
    attentions += [layer.cross_attn for layer in model.model.decoder.layers]
    for attention in attentions:
        assert not attention.sampling_offsets.weight.any() and not attention.attention_weights.weight.any()
        # the bias grid: head h points along angle 2*pi*h/heads, point p at distance p + 1
        grid = attention.sampling_offsets.bias.view(attention.n_heads, attention.n_levels, attention.n_points, 2)
        assert torch.allclose(grid[0, 0, :, 0], torch.arange(1.0, attention.n_points + 1))
    assert not model.model.decoder.bbox_embed.layers[-1].weight.any()
    # a randomly initialised ResNet keeps live residual branches (frozen norms start as identity)
    assert torch.equal(model.model.backbone.body.layer1[0].bn2.weight, torch.ones(64))


def test_new_label_set_reinitialises_class_heads(tmp_path):
    import math

    DinoForObjectDetection(tiny_config(num_labels=91)).save_pretrained(tmp_path)
    model = DinoForObjectDetection.from_pretrained(tmp_path, num_labels=3, ignore_mismatched_sizes=True)
    prior = -math.log((1 - 0.01) / 0.01)
    assert model.class_embed.weight.shape == (3, 64) and model.model.denoising_class_embed.weight.shape == (4, 64)
    assert torch.allclose(model.class_embed.bias, torch.full((3,), prior))


def test_loaded_model_keeps_the_stem_frozen(tmp_path):
    """transformers makes every loaded floating-point parameter trainable: fine-tuning a saved or converted model
    trained the ResNet stem and layer1, which DINO never trains. `from_pretrained` (direct, Auto class, new label set)
    freezes them again, as a model built from its config."""
    from transformers import AutoModelForObjectDetection

    from conftest import tiny_model as build_tiny_model

    model = build_tiny_model()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert any(n.startswith("model.backbone.body.layer2") for n in trainable)
    assert not any(n.startswith(("model.backbone.body.conv1", "model.backbone.body.layer1")) for n in trainable)
    model.save_pretrained(tmp_path)
    loaded = [
        DinoForObjectDetection.from_pretrained(tmp_path),
        AutoModelForObjectDetection.from_pretrained(tmp_path),
        DinoForObjectDetection.from_pretrained(tmp_path, output_loading_info=True)[0],
    ]
    for again in loaded:
        assert sorted(n for n, p in again.named_parameters() if p.requires_grad) == trainable
    relabelled = DinoForObjectDetection.from_pretrained(tmp_path, num_labels=3, ignore_mismatched_sizes=True)
    assert sorted(n for n, p in relabelled.named_parameters() if p.requires_grad) == trainable

    # one optimizer step leaves the stem as it was
    stem = relabelled.model.backbone.body.conv1.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in relabelled.parameters() if p.requires_grad], lr=1e-2)
    relabelled.train()
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    relabelled(pixel_values=torch.randn(1, 3, 64, 96), labels=labels).loss.backward()
    optimizer.step()
    assert torch.equal(relabelled.model.backbone.body.conv1.weight, stem)


def test_relu_feed_forward_in_chunks_gradcheck():
    """`DinoReluFeedForwardInChunks` against numerical derivatives (float64, a partial last chunk), with every input
    trainable and with frozen weights (only the tokens' gradient computed)."""
    from hf_dino.modeling_dino import DinoReluFeedForwardInChunks

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(10, 4, dtype=torch.float64, generator=generator)
    # linear1's weight and bias, linear2's weight and bias
    weights = [torch.randn(*shape, dtype=torch.float64, generator=generator) for shape in ((6, 4), (6,), (4, 6), (4,))]
    block = lambda x, w1, b1, w2, b2: DinoReluFeedForwardInChunks.apply(x, w1, b1, w2, b2, 3)  # noqa: E731
    expected = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(tokens, *weights[:2])), *weights[2:])
    assert torch.allclose(block(tokens, *weights), expected, rtol=0, atol=1e-12)
    inputs = [tokens.clone().requires_grad_()] + [w.clone().requires_grad_() for w in weights]
    assert torch.autograd.gradcheck(block, inputs)
    assert torch.autograd.gradcheck(block, [tokens.clone().requires_grad_(), *weights])
    # only some rows (2 full chunks and a partial one); the others' output rows are zeros
    rows = torch.tensor([0, 2, 3, 5, 7, 8, 9])
    on_rows = lambda x, w1, b1, w2, b2: DinoReluFeedForwardInChunks.apply(x, w1, b1, w2, b2, 3, rows)  # noqa: E731
    expected_on_rows = torch.zeros_like(expected)
    expected_on_rows[rows] = expected[rows]
    assert torch.allclose(on_rows(tokens, *weights), expected_on_rows, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(on_rows, inputs)
    assert torch.autograd.gradcheck(on_rows, [tokens.clone().requires_grad_(), *weights])


@pytest.mark.parametrize(
    "capability, vendor, expected, expected_every",
    [("AVX2", "GenuineIntel", True, False), ("AVX2", "AuthenticAMD", True, False),
     ("AVX512", "AuthenticAMD", True, True), ("AVX512", "GenuineIntel", False, False),
     ("DEFAULT", "AuthenticAMD", False, False), ("SVE256", "", False, False)],
)
def test_onednn_products_are_faster_on_amd_and_avx2(monkeypatch, capability, vendor, expected, expected_every):
    """oneDNN runs the float32 products on AMD CPUs (measured: AVX2 Zen 3, AVX-512 Zen 4) and on AVX2-only CPUs, and
    every product of the feed-forward's backward on AVX-512 AMD CPUs only; MKL keeps them on Intel's AVX-512 CPUs; no
    x86 vector unit, no oneDNN products."""
    from hf_dino import onednn

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(onednn, "cpu_vendor", lambda: vendor)
    onednn.onednn_products_are_faster.cache_clear()
    try:
        torch.ops.mkldnn._linear_pointwise.default
        has_op = torch.backends.mkldnn.is_available() and torch.backends.mkl.is_available()
    except (AttributeError, RuntimeError):
        has_op = False
    try:
        assert onednn.onednn_products_are_faster() == (expected and has_op)
        assert onednn.onednn_runs_every_feed_forward_product() == (expected_every and has_op)
    finally:
        onednn.onednn_products_are_faster.cache_clear()


@pytest.fixture(params=["aten", "onednn", "onednn-all"])
def cpu_products(request, monkeypatch):
    """The library the token-wise float32 CPU products run on: aten's BLAS, or oneDNN (forced, whatever this CPU is;
    see `onednn_products_are_faster`), with (`onednn-all`, as on AVX-512 AMD CPUs) or without (as on AVX2 ones) the
    feed-forward backward's last two products (`onednn_runs_every_feed_forward_product`); and the list of the shapes
    oneDNN's products ran on."""
    from hf_dino import modeling_dino

    if request.param != "aten":
        try:
            torch.ops.mkldnn._linear_pointwise.default
        except (AttributeError, RuntimeError):
            pytest.skip("this torch build has no oneDNN linear op (torch.ops.mkldnn._linear_pointwise)")
    monkeypatch.setattr(modeling_dino, "onednn_products_are_faster", lambda: request.param != "aten")
    monkeypatch.setattr(modeling_dino, "onednn_runs_every_feed_forward_product", lambda: request.param == "onednn-all")
    # bfloat16 products on oneDNN only where this CPU has them (as aten decides)
    bfloat16 = request.param != "aten" and modeling_dino.onednn_runs_bfloat16_products()
    monkeypatch.setattr(modeling_dino, "onednn_runs_bfloat16_products", lambda: bfloat16)
    calls = []
    product = modeling_dino.onednn_linear

    def recorded(*args, **kwargs):
        calls.append(args[0].shape)
        return product(*args, **kwargs)

    monkeypatch.setattr(modeling_dino, "onednn_linear", recorded)
    return request.param, calls


@contextlib.contextmanager
def onednn_disabled():
    """`torch.backends.mkldnn.enabled = False` for the block (what `torch.backends.mkldnn.flags(enabled=False)` does,
    without its TF32 setting and warning)."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def test_dino_linear_is_nn_linear(cpu_products):
    """`DinoLinear` computes `nn.Linear`'s function (float64 recomputation) on 2-D, 3-D and strided inputs, and under
    autograd its gradients (input, weight, bias; any subset trainable; with and without a bias) are the float64 ones.
    Where oneDNN is the faster library it runs the product without autograd (from `ONEDNN_PACK_MIN_ROWS` rows with the
    weight packed first), under CPU autocast to bfloat16 on autocast's bfloat16 operands; with autograd and below
    `ONEDNN_MIN_ROWS` rows it is `F.linear`. Its state dict is `nn.Linear`'s."""
    from hf_dino import modeling_dino
    from hf_dino.modeling_dino import DinoLinear

    library, calls = cpu_products
    onednn = library != "aten"
    torch.manual_seed(0)
    layer = DinoLinear(64, 96)
    plain = torch.nn.Linear(64, 96)
    plain.load_state_dict(layer.state_dict())
    assert list(layer.state_dict()) == ["weight", "bias"]
    rows = modeling_dino.ONEDNN_MIN_ROWS
    inputs = [torch.randn(rows, 64), torch.randn(2, rows, 64), torch.randn(rows, 2, 64).transpose(0, 1),
              torch.randn(rows, 128)[:, ::2], torch.randn(modeling_dino.ONEDNN_PACK_MIN_ROWS, 64)]
    for x in inputs:
        expected = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
        with torch.no_grad():
            assert (layer(x).double() - expected).abs().max() < 1e-5 * expected.abs().max()
    assert len(calls) == (len(inputs) if onednn else 0)
    with torch.no_grad():  # fewer rows: aten's product
        few = torch.randn(rows - 1, 64)
        assert torch.allclose(layer(few), plain(few), rtol=0, atol=1e-6)
    assert len(calls) == (len(inputs) if onednn else 0)
    # bfloat16: oneDNN's product where aten would run it there too (the same values), float16: aten's
    del calls[:]
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float16):
            half = copy.deepcopy(plain).to(dtype)
            half_layer = DinoLinear(64, 96).to(dtype)
            half_layer.load_state_dict(half.state_dict())
            for x in (inputs[1].to(dtype), inputs[-1].to(dtype)):  # the weight as it is, and packed
                assert torch.equal(half_layer(x), half(x)), dtype
    assert len(calls) == (2 if modeling_dino.onednn_runs_bfloat16_products() else 0)
    del calls[:]

    def close(actual, expected):
        return (actual.double() - expected).abs().max() < 1e-5 * expected.abs().max()

    for bias in (True, False):
        for trainable in ({"input", "weight", "bias"}, {"input"}, {"weight"}, {"weight", "bias"}):
            for x in inputs[1:3]:
                layer = DinoLinear(64, 96, bias=bias)
                reference = copy.deepcopy(layer).double()
                for name, parameter in [*layer.named_parameters(), *reference.named_parameters()]:
                    parameter.requires_grad_(name in trainable)
                x, x64 = x.clone().requires_grad_("input" in trainable), x.double().requires_grad_("input" in trainable)
                upstream = torch.randn(*x.shape[:-1], 96, dtype=torch.float64)
                del calls[:]
                output = layer(x)
                assert close(output, reference(x64).detach())
                output.backward(upstream.float())
                reference(x64).backward(upstream)
                assert not calls  # autograd: F.linear
                assert (x.grad is None) == ("input" not in trainable)
                if x.grad is not None:
                    assert close(x.grad, x64.grad)
                for name, parameter in layer.named_parameters():
                    assert (parameter.grad is None) == (name not in trainable), name
                    if parameter.grad is not None:
                        assert close(parameter.grad, reference.get_parameter(name).grad), name

    del calls[:]
    layer = DinoLinear(64, 96)
    plain.load_state_dict(layer.state_dict())
    # CPU autocast to bfloat16: autocast's 16-bit product, as nn.Linear's, bit for bit; at inference on oneDNN where
    # aten runs bfloat16 products there (on the operands cast as autocast casts them), with autograd `F.linear`
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x in (inputs[0], inputs[-1]):
            with torch.no_grad():
                assert layer(x).dtype == torch.bfloat16 and torch.equal(layer(x), plain(x))
    assert len(calls) == (4 if modeling_dino.onednn_runs_bfloat16_products() else 0)
    del calls[:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(inputs[0]).dtype == torch.bfloat16
    assert not calls
    with onednn_disabled(), torch.no_grad():  # the user turned oneDNN off: aten's product
        expected = torch.nn.functional.linear(inputs[0].double(), layer.weight.double(), layer.bias.double())
        assert (layer(inputs[0]).double() - expected).abs().max() < 1e-5 * expected.abs().max()
    assert not calls


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_feed_forward_in_chunks_is_the_plain_block(activation, cpu_products):
    """`DinoEncoderLayer.feed_forward` runs the tokens in chunks: at inference the same function as the plain block,
    under autograd the same function and gradients (float64 recomputation of the plain block), without keeping the
    `[tokens, ffn_dim]` intermediate for the backward pass. ReLU runs as `DinoReluFeedForwardInChunks`, other
    activations as a checkpoint per chunk."""
    import copy

    from conftest import tiny_model as build_tiny_model
    from hf_dino.modeling_dino import ENCODER_FFN_CHUNK_TOKENS

    layer = build_tiny_model(activation_function=activation).model.encoder.layers[0].train()
    hidden = torch.randn(2, ENCODER_FFN_CHUNK_TOKENS + 700, layer.linear1.in_features)  # 3 chunks, the last partial
    reference = copy.deepcopy(layer).double()
    reference_input = hidden.double().requires_grad_()
    expected = reference.linear2(reference.activation(reference.linear1(reference_input)))
    upstream = torch.randn_like(expected)
    expected.backward(upstream)

    with torch.no_grad():
        chunked = layer.feed_forward(hidden)
    assert chunked.shape == hidden.shape
    assert (chunked.double() - expected.detach()).abs().max() < 1e-5
    # the forward products run on oneDNN when asked: DINO's ReLU block as one function, the GELU block's chunks (1024
    # tokens, above `ONEDNN_MIN_ROWS`) through its `DinoLinear`s
    assert bool(cpu_products[1]) == (cpu_products[0] != "aten")
    del cpu_products[1][:]
    with torch.no_grad(), onednn_disabled():  # oneDNN turned off by the user: aten's products
        assert (layer.feed_forward(hidden).double() - expected.detach()).abs().max() < 1e-5
    assert not cpu_products[1]
    with torch.no_grad():  # bfloat16: the same block (within bfloat16's rounding), on oneDNN where aten would use it
        chunked16 = copy.deepcopy(layer).to(torch.bfloat16).feed_forward(hidden.to(torch.bfloat16))
        assert (chunked16.double() - expected.detach()).abs().max() < 2e-2 * expected.abs().max()
    from hf_dino import modeling_dino

    assert bool(cpu_products[1]) == modeling_dino.onednn_runs_bfloat16_products()
    del cpu_products[1][:]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the plain block's bfloat16 result
        automatic = layer.feed_forward(hidden)
        plain_automatic = layer.feed_forward_block(hidden.reshape(-1, hidden.shape[-1])).view_as(hidden)
    assert automatic.dtype == plain_automatic.dtype == torch.bfloat16
    assert (automatic.double() - plain_automatic.double()).abs().max() <= 1e-2 * plain_automatic.abs().max()
    assert bool(cpu_products[1]) == modeling_dino.onednn_runs_bfloat16_products()
    del cpu_products[1][:]

    saved_storages = []

    def pack(tensor):
        saved_storages.append(tensor.untyped_storage().data_ptr())
        return tensor

    trained_input = hidden.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = layer.feed_forward(trained_input)
    chunk_function = type(output.grad_fn.next_functions[0][0]).__name__
    assert (chunk_function == "DinoReluFeedForwardInChunksBackward") == (activation == "relu"), chunk_function
    # kept for the backward pass: the input (or views of it) and the parameters, nothing computed
    input_storage = trained_input.untyped_storage().data_ptr()
    parameter_storages = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    assert input_storage in saved_storages and set(saved_storages) <= {input_storage} | parameter_storages
    assert torch.equal(output.detach(), chunked)
    forward_products = len(cpu_products[1])
    output.backward(upstream.float())
    # oneDNN in the backward pass: per chunk the recomputed hidden chunk, `grad @ W2` and `grad^T @ hidden`, and with
    # `onednn-all` `grad_hidden @ W1` and `grad_hidden^T @ x`
    backward_products = len(cpu_products[1]) - forward_products
    chunks = -(-hidden.shape[0] * hidden.shape[1] // ENCODER_FFN_CHUNK_TOKENS)
    per_chunk = {"aten": 0, "onednn": 3, "onednn-all": 5}[cpu_products[0]] if activation == "relu" else 0
    assert backward_products == per_chunk * chunks
    assert (trained_input.grad.double() - reference_input.grad).abs().max() < 1e-5
    for name in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"):
        grad, expected_grad = layer.get_parameter(name).grad.double(), reference.get_parameter(name).grad
        assert (grad - expected_grad).abs().max() < 1e-5 * expected_grad.abs().max(), name


def test_encoder_feed_forward_skips_padding_tokens(cpu_products):
    """In training, with a padding mask, only the tokens that are not padding go through the encoder's feed-forward
    block: their rows and every gradient are the plain block's on them (float64 recomputation), the padding rows are
    zeros, and the block never sees a padding token. In eval mode every token goes through (as in the original)."""
    import copy

    from conftest import tiny_model as build_tiny_model
    from hf_dino.modeling_dino import ENCODER_FFN_CHUNK_TOKENS

    layer = build_tiny_model().model.encoder.layers[0].train()
    hidden = torch.randn(2, ENCODER_FFN_CHUNK_TOKENS + 700, layer.linear1.in_features)
    padding_mask = torch.zeros(hidden.shape[:2], dtype=torch.bool)
    padding_mask[0, 900:] = True  # image 0 pads more than half its tokens, image 1 its last 100
    padding_mask[1, -100:] = True
    valid = ~padding_mask
    reference = copy.deepcopy(layer).double()
    reference_input = hidden.double().requires_grad_()
    expected = reference.feed_forward_block(reference_input[valid])
    upstream = torch.randn(hidden.shape, dtype=torch.float64)
    expected.backward(upstream[valid])

    from hf_dino.modeling_dino import DinoReluFeedForwardInChunks

    chunks_seen = []
    original_hidden = DinoReluFeedForwardInChunks.hidden

    def counting(chunk, *args):
        chunks_seen.append(chunk.clone())
        return original_hidden(chunk, *args)

    trained_input = hidden.clone().requires_grad_()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DinoReluFeedForwardInChunks, "hidden", staticmethod(counting))
        output = layer.feed_forward(trained_input, padding_mask)
    # the block's first product saw exactly the tokens that are not padding, in order
    assert torch.equal(torch.cat(chunks_seen), hidden[valid])
    assert (output[valid].double() - expected.detach()).abs().max() < 1e-5
    assert not output[padding_mask].any()
    output.backward(upstream.float())
    assert (trained_input.grad.double() - reference_input.grad).abs().max() < 1e-5
    assert not trained_input.grad[padding_mask].any()
    for name in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"):
        grad, expected_grad = layer.get_parameter(name).grad.double(), reference.get_parameter(name).grad
        assert (grad - expected_grad).abs().max() < 1e-5 * expected_grad.abs().max(), name

    layer.eval()
    with torch.no_grad():
        expected_all = reference.feed_forward_block(hidden.double())
        assert (layer.feed_forward(hidden, padding_mask).double() - expected_all).abs().max() < 1e-5
    assert bool(cpu_products[1]) == (cpu_products[0] != "aten")


def test_skipping_padding_tokens_changes_no_output_or_gradient():
    """A batch of two differently sized images (the smaller one padded), in training with denoising queries: the
    encoder feed-forward that skips padding tokens gives the plain run's loss, logits, boxes, encoder memory on the
    tokens that are not padding, and parameter gradients (float64; a no-op forward hook on every `linear1` makes the
    plain run, see `feed_forward`)."""
    from conftest import tiny_model as build_tiny_model
    from hf_dino.modeling_dino import ENCODER_FFN_CHUNK_TOKENS

    model = build_tiny_model(num_denoising=10, encoder_layers=2).double().train()
    pixel_values = torch.randn(2, 3, 256, 320, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pixel_mask = torch.ones(2, 256, 320, dtype=torch.long)
    pixel_mask[1, 160:] = 0
    pixel_mask[1, :, 200:] = 0
    labels = [
        {"class_labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"class_labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    layers = model.model.encoder.layers
    # the padding tokens of the four levels (strides 8 to 64), as the model reads them from the pixel mask
    token_padding = torch.cat([
        torch.nn.functional.interpolate(pixel_mask[None].double(), size=(256 // s, 320 // s))[0].flatten(1) == 0
        for s in (8, 16, 32, 64)
    ], 1)
    assert token_padding.numel() > ENCODER_FFN_CHUNK_TOKENS and token_padding[1].float().mean() > 0.5

    def run(plain: bool):
        handles = [layer.linear1.register_forward_hook(lambda *args: None) for layer in layers] if plain else []
        try:
            model.zero_grad()
            torch.manual_seed(1)  # the same denoising noise in both runs
            outputs = model(pixel_values, pixel_mask=pixel_mask, labels=labels, output_hidden_states=True)
            outputs.loss.backward()
        finally:
            for handle in handles:
                handle.remove()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return outputs, grads

    skipping, skipping_grads = run(plain=False)
    plain, plain_grads = run(plain=True)
    assert torch.allclose(skipping.loss, plain.loss, rtol=1e-10, atol=0)
    for name in ("logits", "pred_boxes"):
        assert torch.allclose(getattr(skipping, name), getattr(plain, name), rtol=1e-9, atol=1e-10), name
    # only the padding rows of the encoder memory differ (nothing reads them)
    differs = (skipping.encoder_last_hidden_state - plain.encoder_last_hidden_state).abs().amax(-1) > 1e-9
    assert torch.equal(differs, token_padding)
    assert skipping_grads.keys() == plain_grads.keys() and len(skipping_grads) > 50
    for name, grad in plain_grads.items():
        assert torch.allclose(skipping_grads[name], grad, rtol=1e-8, atol=1e-12), name


class ScaledLinear(torch.nn.Module):
    """An adapter-style wrapper of a linear layer (as PEFT's LoRA layers): its output is the base layer's plus a
    trainable change, and it exposes the base layer's `weight` and `bias` as attributes of its own."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base_layer = base
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) * (1 + self.scale)


def test_encoder_feed_forward_calls_replaced_modules():
    """A wrapped `linear1` (an adapter) is called by the chunked feed-forward: the output and the gradients, the
    wrapper's own parameter included, are those of the plain block with the wrapper (float64 recomputation); the
    fused function, which reads `linear1.weight`, would skip the wrapper silently."""
    import copy

    from conftest import tiny_model as build_tiny_model
    from hf_dino.modeling_dino import ENCODER_FFN_CHUNK_TOKENS

    layer = build_tiny_model().model.encoder.layers[0].train()
    layer.linear1 = ScaledLinear(layer.linear1)
    hidden = torch.randn(2, ENCODER_FFN_CHUNK_TOKENS + 700, layer.linear2.out_features)
    reference = copy.deepcopy(layer).double()
    reference_input = hidden.double().requires_grad_()
    expected = reference.feed_forward_block(reference_input)
    upstream = torch.randn_like(expected)
    expected.backward(upstream)

    with torch.no_grad():
        assert (layer.feed_forward(hidden).double() - expected).abs().max() < 1e-5
    trained_input = hidden.clone().requires_grad_()
    layer.feed_forward(trained_input).backward(upstream.float())
    assert (trained_input.grad.double() - reference_input.grad).abs().max() < 1e-5
    scale_grad = layer.linear1.scale.grad.double()
    assert abs(scale_grad - reference.linear1.scale.grad) < 1e-5 * abs(reference.linear1.scale.grad)


@pytest.mark.parametrize("module", ["linear1", "activation"])
def test_hooks_on_the_encoder_feed_forward_fire(module):
    """A forward hook on a module of the encoder's feed-forward block sees the whole block's tensor once, as in the
    plain block: the chunked paths do not run then (the fused one would never call the module)."""
    from conftest import tiny_model as build_tiny_model
    from hf_dino.modeling_dino import ENCODER_FFN_CHUNK_TOKENS

    layer = build_tiny_model().model.encoder.layers[0].eval()
    hidden = torch.randn(2, ENCODER_FFN_CHUNK_TOKENS + 700, layer.linear1.in_features)
    seen = []
    handle = layer.get_submodule(module).register_forward_hook(lambda m, args, output: seen.append(output.clone()))
    try:
        with torch.no_grad():
            output = layer.feed_forward(hidden)
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (hidden.shape[0] * hidden.shape[1], layer.linear1.out_features)
    expected_hidden = layer.linear1(hidden.reshape(-1, hidden.shape[-1]))
    if module == "activation":
        expected_hidden = expected_hidden.relu()
    assert torch.equal(seen[0], expected_hidden)
    with torch.no_grad():
        assert torch.equal(output, layer.feed_forward_block(hidden.reshape(-1, hidden.shape[-1])).view_as(hidden))


@pytest.mark.parametrize("padded", [False, True])
def test_deformable_attention_against_float64(padded, monkeypatch):
    """`DinoMultiscaleDeformableAttention` against its float64 recomputation: the value projection with padded tokens
    zeroed (the pass is skipped when nothing is padded), softmax weights, sampling around the references. A bfloat16
    module hands the attention float32 weights (softmax taken in float32) and stays within bfloat16 rounding."""
    from hf_dino import modeling_dino
    from hf_dino.deformable_attention import multi_scale_deformable_attention_pytorch

    torch.manual_seed(0)
    config = tiny_config()
    attention = modeling_dino.DinoMultiscaleDeformableAttention(config, num_heads=4, n_points=2).eval()
    with torch.no_grad():
        for linear in (attention.sampling_offsets, attention.attention_weights):
            linear.weight.normal_(0, 0.05)
    shapes_list = [(12, 16), (6, 8), (3, 4), (2, 2)][: config.num_feature_levels]
    shapes = torch.tensor(shapes_list)
    starts = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    tokens = int(shapes.prod(1).sum())
    value = torch.randn(2, tokens, config.d_model)
    query = torch.randn(2, 30, config.d_model)
    reference = torch.rand(2, 30, config.num_feature_levels, 2)
    mask = torch.zeros(2, tokens, dtype=torch.bool)
    if padded:
        mask[0, 150:] = True

    def expected() -> torch.Tensor:
        a = copy.deepcopy(attention).double()
        b, q, heads, levels, points = 2, 30, 4, config.num_feature_levels, 2
        v = a.value_proj(value.double()).masked_fill(mask[..., None], 0.0).view(b, tokens, heads, -1)
        offsets = a.sampling_offsets(query.double()).view(b, q, heads, levels, points, 2)
        normalizer = shapes.flip(-1).double()[None, None, None, :, None, :]
        locations = reference.double()[:, :, None, :, None, :] + offsets / normalizer
        weights = a.attention_weights(query.double()).view(b, q, heads, -1).softmax(-1).view(b, q, heads, levels, points)
        return a.output_proj(multi_scale_deformable_attention_pytorch(v, shapes_list, locations, weights))

    with torch.no_grad():
        want = expected()
        got = attention(query, reference, value, mask, shapes, shapes_list, starts)
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
        seen = []
        attend = modeling_dino.multi_scale_deformable_attention

        def recorded(*args, **kwargs):
            seen.append((args[3], args[4].dtype))
            return attend(*args, **kwargs)

        monkeypatch.setattr(modeling_dino, "multi_scale_deformable_attention", recorded)
        half = copy.deepcopy(attention).to(torch.bfloat16)
        with torch.enable_grad():  # the path that computes the locations in PyTorch (at inference the kernel does)
            got = half(query.bfloat16(), reference, value.bfloat16(), mask, shapes, shapes_list, starts).detach()
        # its sampling locations: float32, the float32 references plus its own (bfloat16) offsets / (w_l, h_l), to
        # float32 rounding
        half_offsets = half.sampling_offsets(query.bfloat16()).double().view(2, 30, 4, config.num_feature_levels, 2, 2)
        want_locations = reference.double()[:, :, None, :, None, :] + half_offsets / shapes.flip(-1).double()[:, None]
    (locations, weights_dtype), = seen
    assert locations.dtype == weights_dtype == torch.float32 and got.dtype == torch.bfloat16
    assert (locations.double() - want_locations).abs().max() <= 4 * torch.finfo(torch.float32).eps
    assert (got.double() - want).abs().max() <= 3e-2 * want.abs().max()
    # at inference the CPU kernel computes the locations (the same bits) and the softmax (within a few float32 ulps of
    # aten's) itself, where it is built: as close to float64 as the autograd path, and to that path within float32
    # (bfloat16) rounding of the attention's output
    with torch.no_grad():
        fused = half(query.bfloat16(), reference, value.bfloat16(), mask, shapes, shapes_list, starts)
        assert (fused.double() - want).abs().max() <= 3e-2 * want.abs().max()
        assert (fused.double() - got.double()).abs().max() <= 2 ** -7 * got.double().abs().max()
        with torch.enable_grad():
            unfused = attention(query, reference, value, mask, shapes, shapes_list, starts).detach()
        fused = attention(query, reference, value, mask, shapes, shapes_list, starts)
        assert (fused.double() - want).abs().max() <= 1e-5 * want.abs().max()
        assert (fused - unfused).abs().max() <= 1e-6 * unfused.abs().max()


def test_post_norm_residual_layer_norm(monkeypatch):
    """`residual_layer_norm(norm, residual, update, dropout)` is `norm(residual + dropout(update))`. At inference on a
    CPU with AVX-512 it runs the CPU extension's fused kernel (float32, bfloat16, and CPU autocast's bfloat16
    activations next to float32 parameters): float32 within 1.25x aten's float64 error, bfloat16 aten's result but
    for rare rounding ties. The encoder's and decoder's layers call it for each of their LayerNorms. With autograd,
    dropout acting, a hook on the norm, a LayerNorm without bias, or custom kernels disabled, the module runs as it
    is (the same bits; the hook fires)."""
    import hf_dino.kernels as kernels
    from conftest import tiny_config
    from hf_dino import modeling_dino

    torch.manual_seed(0)
    norm, dropout = torch.nn.LayerNorm(64).eval(), torch.nn.Dropout(0.0)
    with torch.no_grad():
        norm.weight.normal_(1, 0.25)
        norm.bias.normal_(0, 1)
    residual, update = torch.randn(2, 50, 64) * 3 + 1, torch.randn(2, 50, 64)
    calls = []
    original = kernels.residual_layer_norm
    monkeypatch.setattr(kernels, "residual_layer_norm", lambda *args: calls.append(args[0].dtype) or original(*args))
    usable = kernels.residual_layer_norm_usable(residual, update, norm.weight, norm.bias)

    cases = [(norm, residual, update, False), (copy.deepcopy(norm).bfloat16(), residual.bfloat16(), update.bfloat16(),
             False), (norm, residual.bfloat16(), update.bfloat16(), True), (norm, residual, update.bfloat16(), True)]
    for module, r, u, autocast in cases:
        want = torch.nn.functional.layer_norm((r + u).double(), (64,), module.weight.double(), module.bias.double())
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            aten = module(r + u)
            got = modeling_dino.residual_layer_norm(module, r, u, dropout)
        assert got.dtype == aten.dtype
        if got.dtype == torch.float32:
            assert (got.double() - want).abs().max() <= 1.25 * (aten.double() - want).abs().max() + 1e-7
        else:
            assert (got != aten).float().mean() <= 2e-3
    assert calls == ([torch.float32, torch.bfloat16, torch.bfloat16, torch.float32] if usable else [])

    calls.clear()
    plain = norm(residual + update)
    assert torch.equal(modeling_dino.residual_layer_norm(norm, residual, update, dropout).detach(), plain)
    with torch.no_grad():
        assert torch.equal(modeling_dino.residual_layer_norm(norm, residual, update, dropout, False), plain)
        acting = torch.nn.Dropout(0.5).train()
        torch.manual_seed(1)
        dropped = modeling_dino.residual_layer_norm(norm, residual, update, acting)
        torch.manual_seed(1)
        assert torch.equal(dropped, norm(residual + acting(update)))
        seen = []
        handle = norm.register_forward_hook(lambda *args: seen.append(1))
        assert torch.equal(modeling_dino.residual_layer_norm(norm, residual, update, dropout), plain) and seen == [1]
        handle.remove()
        unbiased = torch.nn.LayerNorm(64, bias=False)
        assert torch.equal(modeling_dino.residual_layer_norm(unbiased, residual, update, dropout),
                           unbiased(residual + update))
        monkeypatch.setenv(kernels.ENV_DISABLE, "1")
        assert torch.equal(modeling_dino.residual_layer_norm(norm, residual, update, dropout), plain)
        monkeypatch.delenv(kernels.ENV_DISABLE)
    assert calls == []

    # the layers: every LayerNorm after a residual connection through it (encoder 2, decoder 3 per layer)
    config = tiny_config()
    encoder, decoder = modeling_dino.DinoEncoderLayer(config).eval(), modeling_dino.DinoDecoderLayer(config).eval()
    counted = []
    monkeypatch.setattr(modeling_dino, "residual_layer_norm",
                        lambda norm, *args: counted.append(norm) or norm(args[0] + args[2](args[1])))
    shapes_list = [(8, 8), (4, 4), (2, 2), (1, 1)][: config.num_feature_levels]
    shapes = torch.tensor(shapes_list)
    starts = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    tokens = int(shapes.prod(1).sum())
    memory, mask = torch.randn(1, tokens, 64), torch.zeros(1, tokens, dtype=torch.bool)
    with torch.no_grad():
        encoder(memory, torch.randn(1, tokens, 64), torch.rand(1, tokens, config.num_feature_levels, 2), mask, shapes,
                shapes_list, starts)
        decoder(torch.randn(1, 10, 64), torch.randn(1, 10, 64), torch.rand(1, 10, config.num_feature_levels, 4), None,
                memory, mask, shapes, shapes_list, starts)
    assert counted == [encoder.norm1, encoder.norm2, decoder.norm2, decoder.norm1, decoder.norm3]


@pytest.mark.parametrize("points", [4, 3])
def test_box_sampling_locations_are_the_originals_expression(points):
    """Around box references (the decoder's) the sampling locations are the original's
    `centre + offsets / P * size * 0.5` broadcast over heads, levels and points, bit for bit: float32, a 16-bit
    model's offsets next to float32 boxes (the offsets divided in bfloat16, as there; 3 points make that division
    round), float64."""
    from conftest import tiny_config
    from hf_dino import modeling_dino

    torch.manual_seed(0)
    config = tiny_config()
    attention = modeling_dino.DinoMultiscaleDeformableAttention(config, num_heads=4, n_points=points)
    levels = config.num_feature_levels
    for offsets_dtype, boxes_dtype in [(torch.float32,) * 2, (torch.bfloat16, torch.float32), (torch.float64,) * 2]:
        boxes = torch.rand(2, 30, levels, 4, dtype=boxes_dtype)
        offsets = (torch.randn(2, 30, 4, levels, points, 2) * 5).to(offsets_dtype)
        want = boxes[:, :, None, :, None, :2] + offsets / points * boxes[:, :, None, :, None, 2:] * 0.5
        got = attention.sampling_locations(boxes, offsets, torch.tensor([[8, 8]] * levels))
        assert got.dtype == want.dtype == boxes_dtype and torch.equal(got, want)
