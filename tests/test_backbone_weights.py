"""ImageNet backbone weights (issue 14), offline: timm models with random weights stand in for the ImageNet files.

- Swin-L: a timm `swin_large_patch4_window12_384` saved in timm's layout (safetensors, as on the Hub) and in
  Microsoft's (`{"model": state_dict}`, patch merging at the end of a stage) loads into our Swin; at 768x768 (every
  stage map a multiple of the 12-window and larger than it) our features equal timm's `features_only` outputs (timm
  loading the same file itself) through fresh per-stage LayerNorms, to <= 1e-5.
- With padding (maps not multiples of the window) ours pads before the cyclic shift (the original DINO; end to end in
  tests/test_parity.py::swinl_4scale at 511x426) and timm rolls first: a block of ours equals timm's block applied to
  the map zero-padded to window multiples (exact when norm1's bias is zero, so that padding stays zero after it), and
  timm's features on the unpadded map differ from ours.
- ResNet: the default tag is torchvision's ImageNet-1k V1 file; a `resnet50.tv_in1k` state dict loads and the
  frozen-BN features equal timm's (eval-mode batch norm) to <= 1e-6.
"""

from __future__ import annotations

import logging
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hf_dino import DinoConfig, DinoForObjectDetection
from hf_dino.backbone_dino import DinoBackbone, DinoSwinBlock, fetch_timm_weights

SWIN_L = "swin_large_patch4_window12_384"


def random_timm_model(name: str, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A timm model with random weights and its state dict, norms and batch-norm statistics moved off their
    initial 1 / 0 values so that a swapped or skipped tensor shows."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point() and value.ndim == 1:
            noise = 0.1 * torch.randn(value.shape, generator=generator)
            value = value + (noise.abs() if key.endswith("running_var") else noise)
        state[key] = value.contiguous()
    return model, state


def random_timm_state_dict(name: str, seed: int) -> dict[str, torch.Tensor]:
    return random_timm_model(name, seed)[1]


def to_microsoft_layout(state: dict[str, torch.Tensor], depths: tuple[int, ...], window: int) -> dict:
    """timm's Swin keys -> the Microsoft release's (`{"model": ...}`): patch merging `layers.{i}.downsample` closes
    stage i (timm: opens stage i + 1), classifier `head.*`, and the buffers the release stores."""
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key):
            key = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[key.replace("head.fc.", "head.")] = value
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
    index = relative[..., 0] * (2 * window - 1) + relative[..., 1]
    for stage, depth in enumerate(depths):
        for block in range(depth):
            out[f"layers.{stage}.blocks.{block}.attn.relative_position_index"] = index
            if block % 2:
                out[f"layers.{stage}.blocks.{block}.attn_mask"] = torch.zeros(4, window * window, window * window)
    return {"model": out}


def timm_features(name: str, file, image: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """timm's `features_only` model with timm itself loading `file` (its own key filter), eval mode."""
    model = timm.create_model(name, pretrained=True, features_only=True, pretrained_cfg_overlay={"file": str(file)},
                              **kwargs).eval()
    with torch.no_grad():
        return model(image)


# ---- Swin-L -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swin_large(tmp_path_factory):
    """Swin-L files in both layouts, our backbone loaded from the timm one, one 768x768 forward of ours and timm's."""
    folder = tmp_path_factory.mktemp("swin_large")
    reference, state = random_timm_model(SWIN_L, seed=0)
    timm_file, microsoft_file = folder / "model.safetensors", folder / "swin_large_patch4_window12_384_22k.pth"
    save_file(state, timm_file)
    microsoft = to_microsoft_layout(state, depths=(2, 2, 18, 2), window=12)
    torch.save(microsoft, microsoft_file)
    # the Microsoft-layout file is what timm itself reads as the original release
    from timm.models.swin_transformer import checkpoint_filter_fn

    converted = checkpoint_filter_fn(microsoft, reference)
    assert set(converted) == set(state) and all(torch.equal(converted[k], state[k]) for k in state)
    del reference, converted, microsoft

    backbone = DinoBackbone(DinoConfig(backbone=SWIN_L, backbone_weights=str(timm_file))).eval()
    image = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = backbone.body(image)
    theirs = timm_features(SWIN_L, timm_file, image, out_indices=(1, 2, 3), img_size=768)
    return {"state": state, "backbone": backbone, "ours": ours, "theirs": theirs, "microsoft_file": microsoft_file}


def expected_timm_key(key: str) -> str:
    """Our Swin parameter -> timm's name for it: patch merging closing our stage i opens timm's stage i + 1."""
    if m := re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key):
        return f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    return key


def test_swin_large_features_equal_timm_through_fresh_stage_norms(swin_large):
    ours, theirs = swin_large["ours"], swin_large["theirs"]
    assert [tuple(f.shape) for f in ours] == [(1, 384, 96, 96), (1, 768, 48, 48), (1, 1536, 24, 24)]
    for mine, reference in zip(ours, theirs):  # timm: [B, H, W, C] stage outputs, before any norm
        expected = F.layer_norm(reference, reference.shape[-1:]).permute(0, 3, 1, 2)  # weight 1, bias 0
        assert (mine - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layout", ["timm", "microsoft"])
def test_swin_large_both_layouts_load_every_weight(swin_large, layout):
    backbone, state = swin_large["backbone"], swin_large["state"]
    if layout == "microsoft":
        backbone.load_pretrained_weights(swin_large["microsoft_file"])
    loaded = {k: v for k, v in backbone.body.state_dict().items() if not re.fullmatch(r"norm\d\..+", k)}
    assert len(loaded) == len(state) - 4  # all but timm's classifier (2) and final norm (2)
    assert all(torch.equal(value, state[expected_timm_key(key)]) for key, value in loaded.items())


def test_swin_large_stage_norms_are_reported_newly_initialised(swin_large, caplog):
    backbone = swin_large["backbone"]
    for module in (backbone.body.norm1, backbone.body.norm2, backbone.body.norm3):
        assert torch.equal(module.weight, torch.ones_like(module.weight))
        assert torch.equal(module.bias, torch.zeros_like(module.bias))
    with torch.no_grad():
        backbone.body.norm2.weight.mul_(3.0)  # a reload resets them
    with caplog.at_level(logging.INFO, logger="hf_dino.backbone_dino"):
        new = backbone.load_pretrained_weights(swin_large["microsoft_file"])
    assert new == [f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
    assert torch.equal(backbone.body.norm2.weight, torch.ones_like(backbone.body.norm2.weight))
    assert any("newly initialised" in r.message and "norm3.bias" in r.message for r in caplog.records)


# ---- Swin with padding (Swin-T, cheap) -------------------------------------------------------------------------
def test_swin_padding_ours_pads_before_the_shift_timm_after():
    torch.manual_seed(0)
    height, width, window, dim = 17, 23, 7, 32  # maps that are not multiples of the window
    hp, wp = 21, 28
    ours = DinoSwinBlock(dim, num_heads=2, window_size=window, shift_size=3, drop_path=0.0).eval()
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * (0.1 if parameter.ndim == 1 else 0.3))
        ours.norm1.bias.zero_()  # LayerNorm of a zero (padding) token is its bias: keep padding zero after norm1
    from hf_dino.backbone_dino import DinoSwinStage

    mask = DinoSwinStage(dim, 2, 2, window, [0.0, 0.0], downsample=False).shift_mask(height, width, torch.device("cpu"))
    x = torch.randn(2, height, width, dim)
    with torch.no_grad():
        mine = ours(x.reshape(2, -1, dim), height, width, mask).view(2, height, width, dim)

    from timm.models.swin_transformer import SwinTransformerBlock

    def timm_block(resolution):
        block = SwinTransformerBlock(dim, resolution, num_heads=2, window_size=window, shift_size=3).eval()
        block.load_state_dict(ours.state_dict(), strict=False)
        return block

    with torch.no_grad():
        padded = timm_block((hp, wp))(F.pad(x, (0, 0, 0, wp - width, 0, hp - height)))[:, :height, :width]
        unpadded = timm_block((height, width))(x)
    torch.testing.assert_close(mine, padded, atol=1e-5, rtol=0)  # pad, then roll: the original's order
    assert (mine - unpadded).abs().max() > 1e-2  # timm rolls the unpadded map: other tokens share a window


def test_swin_padded_input_features_differ_from_timm(tmp_path):
    name = "swin_tiny_patch4_window7_224"
    file = tmp_path / "model.safetensors"
    save_file(random_timm_state_dict(name, seed=1), file)
    backbone = DinoBackbone(DinoConfig(backbone=name, backbone_weights=str(file))).eval()
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(1, 3, 264, 264, generator=generator)  # maps 66/33/17/9: larger than the 7-window, not multiples
    with torch.no_grad():
        ours = backbone.body(image)
    theirs = timm_features(name, file, image, out_indices=(1, 2, 3), img_size=264)
    for mine, reference in zip(ours, theirs):
        assert (mine - F.layer_norm(reference, reference.shape[-1:]).permute(0, 3, 1, 2)).abs().max() > 1e-2


# ---- ResNet -------------------------------------------------------------------------------------------------------
def test_resnet_default_weights_are_the_originals_torchvision_files():
    assert DinoConfig().use_pretrained_backbone is False  # nothing is loaded unless asked
    from timm.models import get_pretrained_cfg

    for name, file in (("resnet50", "resnet50-0676ba61.pth"), ("resnet101", "resnet101-63fe2227.pth")):
        config = DinoConfig(backbone=name, use_pretrained_backbone=True)
        tag = config.pretrained_backbone_weights
        assert tag == f"{name}.tv_in1k"
        assert get_pretrained_cfg(tag).url == f"https://download.pytorch.org/models/{file}"  # torchvision V1
    chosen = DinoConfig(backbone_weights="resnet50.a1_in1k")
    assert chosen.use_pretrained_backbone and chosen.pretrained_backbone_weights == "resnet50.a1_in1k"
    swin = DinoConfig(backbone=SWIN_L, use_pretrained_backbone=True).pretrained_backbone_weights
    assert get_pretrained_cfg(swin).url.endswith("/swin_large_patch4_window12_384_22k.pth")  # ImageNet-22k


def test_resnet50_tv_in1k_loads_and_frozen_bn_features_equal_timm(tmp_path):
    state = random_timm_state_dict("resnet50.tv_in1k", seed=3)
    file = tmp_path / "model.safetensors"
    save_file(state, file)
    backbone = DinoBackbone(DinoConfig(backbone="resnet50", backbone_weights=str(file)))
    assert torch.equal(backbone.body.layer3[5].bn2.running_var, state["layer3.5.bn2.running_var"])
    image = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = backbone.body(image)
    theirs = timm_features("resnet50.tv_in1k", file, image, out_indices=(2, 3, 4))  # eval-mode batch norm
    for mine, reference in zip(ours, theirs):  # features of order 1 (measured max |f| ~1.5, deviation 3.6e-7)
        assert 0.1 < reference.abs().max().item() < 10.0
        assert (mine - reference).abs().max().item() <= 1e-6


def test_torchvision_resnet_pth_loads(tmp_path):
    """The original's own file format: torchvision's `resnet50()` state dict (with `num_batches_tracked`)."""
    import torchvision

    torch.manual_seed(9)
    state = torchvision.models.resnet50().state_dict()
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            value.copy_(torch.rand_like(value) + 0.5)
    torch.save(state, tmp_path / "resnet50-0676ba61.pth")
    backbone = DinoBackbone(DinoConfig(backbone="resnet50", backbone_weights=str(tmp_path / "resnet50-0676ba61.pth")))
    ours = backbone.body.state_dict()
    assert set(state) - set(ours) == {"fc.weight", "fc.bias"} | {k for k in state if k.endswith("num_batches_tracked")}
    assert all(torch.equal(value, state[key]) for key, value in ours.items())


def test_strict_loading_lists_every_problem(tmp_path):
    state = random_timm_state_dict("resnet18", seed=5)
    state["layer2.0.extra.weight"] = torch.zeros(3)
    del state["layer3.1.bn1.running_mean"]
    state["layer4.1.conv2.weight"] = torch.zeros(512, 512, 1, 1)
    file = tmp_path / "bad.safetensors"
    save_file(state, file)
    with pytest.raises(ValueError) as error:
        DinoBackbone(DinoConfig(backbone="resnet18", backbone_weights=str(file)))
    message = str(error.value)
    assert "unmapped keys (1): layer2.0.extra.weight\n" in message
    assert "missing keys (1): layer3.1.bn1.running_mean\n" in message
    assert "layer4.1.conv2.weight: file (512, 512, 1, 1), model (512, 512, 3, 3)" in message
    assert "whole detector" not in message
    # a ResNet-50 file does not fit a ResNet-18, a Swin-L file does not fit a Swin-T
    save_file(random_timm_state_dict("resnet50", seed=6), tmp_path / "r50.safetensors")
    with pytest.raises(ValueError, match="mis-shaped"):
        DinoBackbone(DinoConfig(backbone="resnet18", backbone_weights=str(tmp_path / "r50.safetensors")))
    with pytest.raises(FileNotFoundError, match="not found"):
        DinoBackbone(DinoConfig(backbone="resnet18", backbone_weights=str(tmp_path / "missing.pth")))


def test_unfit_or_unreadable_files_give_short_messages_naming_them(tmp_path):
    """A whole detector's weights given as backbone weights listed all of its ~540 keys (31 000 characters) without
    saying what the file is; a corrupt .safetensors file raised safetensors' error without the path."""
    from conftest import tiny_model

    model = tiny_model()
    model.save_pretrained(tmp_path / "detector")
    detector_file = tmp_path / "detector" / "model.safetensors"
    with pytest.raises(ValueError) as error:
        DinoBackbone(DinoConfig(backbone="resnet18", backbone_weights=str(detector_file)))
    message = str(error.value)
    assert "weights of a whole detector" in message and "from_pretrained" in message
    assert len(message) < 4000 and "more)" in message, len(message)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 8)
    with pytest.raises(ValueError, match=f"cannot read backbone weights {corrupt}"):
        DinoBackbone(DinoConfig(backbone="resnet18", backbone_weights=str(corrupt)))


def test_unknown_tag_and_unreachable_hub_say_what_to_pass(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"resnet18.tv_in1k"):  # the message lists the tags timm has
        DinoBackbone(DinoConfig(backbone="resnet18", backbone_weights="resnet18.nonexistent"))
    with pytest.raises(ValueError, match="nor a timm tag of the 'resnet18' backbone"):
        DinoBackbone(DinoConfig(backbone="resnet18", backbone_weights="resnet101.tv_in1k"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    tag = DinoConfig(backbone=SWIN_L, use_pretrained_backbone=True).pretrained_backbone_weights
    with pytest.raises(OSError) as error:  # what building the Swin-L backbone with that config runs
        fetch_timm_weights(tag, SWIN_L)
    message = str(error.value)
    assert "swin_large_patch4_window12_384.ms_in22k" in message and "backbone_weights=PATH" in message
    assert "--backbone-weights" in message and "swin_large_patch4_window12_384_22k.pth" in message


def test_model_keeps_loaded_weights_and_from_pretrained_does_not_reload(tmp_path):
    """transformers' initialisation leaves the ImageNet weights alone; a saved model is rebuilt from its own
    checkpoint even when the ImageNet file is gone."""
    name = "swin_tiny_patch4_window7_224"
    state = random_timm_state_dict(name, seed=7)
    file = tmp_path / "swin_t.safetensors"
    save_file(state, file)
    config = DinoConfig(backbone=name, backbone_weights=file, d_model=64, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        num_queries=10, num_denoising=4, num_labels=3)
    model = DinoForObjectDetection(config)
    body = model.model.backbone.body
    assert torch.equal(body.layers[1].blocks[1].attn.relative_position_bias_table,
                       state["layers.1.blocks.1.attn.relative_position_bias_table"])
    assert torch.equal(body.patch_embed.norm.bias, state["patch_embed.norm.bias"])
    assert torch.equal(body.norm3.weight, torch.ones(768))
    model.save_pretrained(tmp_path / "saved")
    file.unlink()
    reloaded = DinoForObjectDetection.from_pretrained(tmp_path / "saved")
    assert reloaded.config.use_pretrained_backbone
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())


# ---- examples/train.py ------------------------------------------------------------------------------------------
def test_train_script_starts_from_imagenet_weights_with_data(tmp_path, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    import huggingface_hub.constants

    from hf_dino.data import build_label_map

    spec = importlib.util.spec_from_file_location("train_script", Path(__file__).parents[1] / "examples" / "train.py")
    train = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_script", train)  # its dataclasses look their module up
    spec.loader.exec_module(train)
    labels = build_label_map([{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}], "contiguous")
    data = ["--train-images", str(tmp_path), "--train-annotations", str(tmp_path / "a.json"), "--config", "compact"]
    state = random_timm_state_dict("resnet18.tv_in1k", seed=8)
    file = tmp_path / "resnet18.pth"
    torch.save(state, file)

    model = train.build_model(train.parse_args(data + ["--backbone-weights", str(file)]), labels, None)
    body = model.model.backbone.body
    assert model.config.backbone_weights == str(file)
    assert torch.equal(body.layer2[1].conv1.weight, state["layer2.1.conv1.weight"])
    assert not body.conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad  # as the original

    # default with data: the original's weights, from the Hub; here offline, so the message names the file to pass
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit, match=r"resnet18\.tv_in1k.*--backbone-weights PATH"):
        train.build_model(train.parse_args(data), labels, None)
    scratch = train.build_model(train.parse_args(data + ["--scratch-backbone"]), labels, None)
    assert not scratch.config.use_pretrained_backbone and scratch.model.backbone.body.conv1.weight.requires_grad
    demo = train.build_model(train.parse_args([]), labels, None)  # the synthetic demo stays from scratch
    assert not demo.config.use_pretrained_backbone and demo.model.backbone.body.conv1.weight.requires_grad
    for conflict in (["--scratch-backbone"], ["--model-name-or-path", str(tmp_path)]):
        with pytest.raises(SystemExit):
            train.parse_args(data + ["--backbone-weights", str(file), *conflict])
