"""The ResNet fast path (`DinoFoldedResNet`: batch norms folded into the convolutions, channels-last) computes the
backbone's function and gradients, runs only where it should, and changes nothing that is trained or saved."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hf_dino import DinoConfig
from hf_dino.backbone_dino import DinoBackbone, DinoFoldedResNet, DinoFrozenBatchNorm2d
from conftest import tiny_model


def randomize_batch_norms(module: torch.nn.Module, seed: int = 0) -> None:
    """Statistics far from the identity, so that a folding mistake shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, DinoFrozenBatchNorm2d):
                n = bn.weight.numel()
                bn.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=generator) * 0.5)
                bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                bn.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)


@pytest.fixture(scope="module", params=["resnet18", "resnet50"])  # BasicBlock and Bottleneck stages
def backbone(request):
    torch.manual_seed(0)
    module = DinoBackbone(DinoConfig(backbone=request.param)).eval()
    randomize_batch_norms(module)
    return module


def float64_reference(backbone: DinoBackbone, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The unfolded body (convolution, then frozen batch norm) in float64, on a copy."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(backbone.body).double()(pixel_values.double())


def assert_matches_reference(features, reference) -> None:
    assert len(features) == len(reference)
    for ours, ref in zip(features, reference):
        assert ours.shape == ref.shape and ours.dtype == torch.float32
        scale = ref.abs().max().item()
        # float32 rounding only: the unfolded float32 body deviates from the float64 one by ~1e-6 relative
        assert (ours.double() - ref).abs().max().item() <= 2e-5 * scale


def test_folded_path_matches_float64_unfolded_backbone(backbone):
    assert DinoFoldedResNet.supports(backbone.body)
    pixel_values = torch.randn(2, 3, 48, 64)
    padding_mask = torch.zeros(2, 48, 64, dtype=torch.bool)
    with torch.no_grad():
        features = backbone(pixel_values, padding_mask)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f, _ in features), "fast path not taken"
    assert_matches_reference([f for f, _ in features], float64_reference(backbone, pixel_values))


def test_folded_weights_follow_every_kind_of_weight_update(backbone):
    """The folded view always computes with the current weights, however they changed. A cache keyed on the tensors'
    version counters missed a fused AdamW step (transformers.Trainer's default optimizer: every evaluation after the
    first ran the old backbone) and `.data` edits, and failed on weights converted in `torch.inference_mode()`."""
    import copy

    module = copy.deepcopy(backbone)
    pixel_values = torch.randn(1, 3, 64, 64)
    padding_mask = torch.zeros(1, 64, 64, dtype=torch.bool)

    def check(what: str) -> None:
        with torch.no_grad():
            features = [f for f, _ in module(pixel_values, padding_mask)]
        assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features), what  # the folded view ran
        assert_matches_reference(features, float64_reference(module, pixel_values))

    check("first call")
    with torch.no_grad():
        randomize_batch_norms(module, seed=1)
        module.body.conv1.weight.mul_(0.5)
    check("in-place updates")
    module.body.layer2[0].conv1.weight.data.mul_(2.0)
    module.body.layer3[0].bn2.running_var.data.fill_(3.0)
    check(".data edits")
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.05, fused=True)
    for p in trainable:
        p.grad = torch.randn_like(p)
    versions = [p._version for p in trainable]
    optimizer.step()
    assert [p._version for p in trainable] == versions  # what the cache missed: a fused step bumps no version
    check("fused AdamW step")
    with torch.inference_mode():
        module.double().float()  # new parameters and buffers, created as inference tensors
    check("weights converted in inference mode")


def test_training_runs_the_folded_view_with_the_module_gradients(backbone):
    """Under autograd the folded view runs too, with weights folded afresh from the parameters: the function and the
    gradients of every trainable parameter (layer2-4; the stem and layer1 stay frozen) are the unfolded body's.

    The gradients are compared in float64 (the folded view of a float64 copy against its unfolded body): in float32
    a ReLU input within rounding of zero (this backbone has one at 2.6e-8 of the map's maximum for some inputs) can
    take either side in either computation and change every gradient below it by ~3e-4."""
    import copy

    pixel_values = torch.randn(2, 3, 64, 96)
    padding_mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    backbone.train()
    try:
        features = [f for f, _ in backbone(pixel_values, padding_mask)]
        with torch.no_grad():  # training mode without autograd: the same function
            cached = [f for f, _ in backbone(pixel_values, padding_mask)]
    finally:
        backbone.eval()
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features), "fast path not taken"
    assert all(f.requires_grad for f in features)
    reference = float64_reference(backbone, pixel_values)
    assert_matches_reference([f.detach() for f in features], reference)
    assert_matches_reference(cached, reference)

    double = copy.deepcopy(backbone).double().train()
    unfolded = copy.deepcopy(double.body)
    folded = [f for f, _ in double(pixel_values.double(), padding_mask)]
    expected = unfolded(pixel_values.double())
    upstream = [torch.randn_like(f) for f in expected]
    sum((f * g).sum() for f, g in zip(folded, upstream)).backward()
    sum((f * g).sum() for f, g in zip(expected, upstream)).backward()
    trainable = {n for n, p in double.body.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("layer2", "layer3", "layer4")) for n in trainable)
    unfolded_parameters = dict(unfolded.named_parameters())
    for name, parameter in double.body.named_parameters():
        if name not in trainable:
            assert parameter.grad is None, name
            continue
        expected_grad = unfolded_parameters[name].grad
        assert (parameter.grad - expected_grad).abs().max() <= 1e-10 * expected_grad.abs().max(), name


def test_fast_path_changes_nothing_saved(tmp_path):
    model = tiny_model()
    randomize_batch_norms(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "before")
    with torch.no_grad():
        features = model.model.backbone(torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
        model(pixel_values=torch.randn(1, 3, 64, 96))
    assert features[0][0].is_contiguous(memory_format=torch.channels_last), "the fast path did not run"
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) and after[k].is_contiguous() for k, v in before.items())
    model.save_pretrained(tmp_path / "after")  # safetensors refuses non-contiguous tensors: none were made
    saved_before, saved_after = load_file(tmp_path / "before" / "model.safetensors"), load_file(
        tmp_path / "after" / "model.safetensors"
    )
    assert list(saved_after) == list(saved_before)
    assert all(torch.equal(saved_after[k], v) for k, v in saved_before.items())


def test_replaced_modules_are_seen(backbone):
    """The folded view is rebuilt when a module of the body is replaced after first use: a new convolution is folded
    in, and a layer the view does not know (a wrapped convolution, as adapter libraries insert; a subclass of
    `nn.Conv2d` with a forward of its own) falls back to the body itself."""
    import copy

    module = copy.deepcopy(backbone)
    pixel_values = torch.randn(1, 3, 64, 64)
    padding_mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        module(pixel_values, padding_mask)  # builds the view for the original modules
        block = module.body.layer2[0]
        old = block.conv1
        replacement = torch.nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                      bias=False)
        block.conv1 = replacement
        features = [f for f, _ in module(pixel_values, padding_mask)]
    assert module.folded_body() is not None and all(f.is_contiguous(memory_format=torch.channels_last) for f in features)
    assert_matches_reference(features, float64_reference(module, pixel_values))

    class Wrapped(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.base_layer = conv

        def forward(self, x):
            return self.base_layer(x) * 0.5

    block.conv1 = Wrapped(replacement)
    with torch.no_grad():
        features = [f for f, _ in module(pixel_values, padding_mask)]
    assert module.folded_body() is None
    assert_matches_reference(features, float64_reference(module, pixel_values))

    # a subclass of nn.Conv2d with a forward of its own (timm's weight-standardised convolution)
    from timm.layers import StdConv2d

    block.conv1 = StdConv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    with torch.no_grad():
        features = [f for f, _ in module(pixel_values, padding_mask)]
    assert module.folded_body() is None
    assert_matches_reference(features, float64_reference(module, pixel_values))


@pytest.mark.parametrize("where", ["module", "global"])
def test_hooks_on_the_body_fire(backbone, where):
    """A hook on a module of the body (feature extraction, Grad-CAM), or one registered for all modules, is called
    with the stage's output as the model computes it: the body runs itself then instead of the folded view, which
    would skip its modules."""
    from torch.nn.modules.module import register_module_forward_hook

    pixel_values = torch.randn(1, 3, 64, 64)
    padding_mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    seen = []

    def record(module, args, output):
        if module is backbone.body.layer3:
            seen.append(output)

    handle = (backbone.body.layer3.register_forward_hook(record) if where == "module"
              else register_module_forward_hook(record))
    try:
        with torch.no_grad():
            features = [f for f, _ in backbone(pixel_values, padding_mask)]
    finally:
        handle.remove()
    assert len(seen) == 1
    assert torch.equal(seen[0], features[1])  # layer3 is the second returned stage (out indices 1, 2, 3)
    assert_matches_reference(features, float64_reference(backbone, pixel_values))
    with torch.no_grad():  # without the hook the folded view runs again
        assert all(f.is_contiguous(memory_format=torch.channels_last) for f, _ in backbone(pixel_values, padding_mask))


@pytest.fixture
def fused_calls(monkeypatch):
    """The convolutions oneDNN ran with their ReLU (and shortcut) fused: a list of `"relu"` / `"residual"`."""
    from hf_dino import backbone_dino

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN (torch.backends.mkldnn)")
    calls = []
    fused = backbone_dino.onednn_convolution_relu

    def recorded(*args, residual=None):
        calls.append("relu" if residual is None else "residual")
        return fused(*args, residual=residual)

    monkeypatch.setattr(backbone_dino, "onednn_convolution_relu", recorded)
    return calls


def convolutions(body: torch.nn.Module, stages: tuple[str, ...]) -> tuple[int, int]:
    """(convolutions followed by a ReLU of their own, blocks' last convolutions) in the stem and `stages`."""
    relu = residual = 0
    for name, child in body.named_children():
        if name == "conv1":
            relu += 1
        elif name in stages:
            for block in child:
                n = 3 if hasattr(block, "conv3") else 2
                relu, residual = relu + n - 1, residual + 1
    return relu, residual


def test_inference_fuses_relu_and_shortcut_into_the_convolutions(backbone, fused_calls, monkeypatch):
    """Without autograd every ReLU runs inside its convolution and every block's last convolution sums into the
    shortcut in place (oneDNN): the stage maps are the float64 body's, and those of the unfused path to float32
    rounding (oneDNN may add the bias and the shortcut in another order); the in-place sums never touch a returned
    map."""
    from hf_dino import backbone_dino

    pixel_values = torch.randn(2, 3, 64, 96)
    padding_mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        features = [f for f, _ in backbone(pixel_values, padding_mask)]
        relu, residual = convolutions(backbone.body, ("layer1", "layer2", "layer3", "layer4"))
        assert fused_calls.count("relu") == relu and fused_calls.count("residual") == residual
        assert_matches_reference(features, float64_reference(backbone, pixel_values))
        monkeypatch.setattr(backbone_dino, "onednn_convolution_applies", lambda *tensors: False)
        unfused = [f for f, _ in backbone(pixel_values, padding_mask)]
    assert len(fused_calls) == relu + residual
    # float32 rounding through ~50 layers (2.8e-6 of the maximum in pytest-xdist workers, 0 in one process here)
    assert all((a - b).abs().max() <= 2e-5 * b.abs().max() for a, b in zip(features, unfused))


def test_bfloat16_inference_fuses_where_the_cpu_runs_bfloat16_on_onednn(backbone, fused_calls):
    """A bfloat16 backbone fuses where this CPU runs bfloat16 convolutions on oneDNN, and its maps stay within
    bfloat16 rounding of the float64 body's."""
    import copy

    from hf_dino.onednn import onednn_runs_bfloat16_products

    module = copy.deepcopy(backbone).to(torch.bfloat16)
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = [f for f, _ in module(pixel_values.bfloat16(), torch.zeros(1, 64, 96, dtype=torch.bool))]
    relu, residual = convolutions(backbone.body, ("layer1", "layer2", "layer3", "layer4"))
    assert len(fused_calls) == ((relu + residual) if onednn_runs_bfloat16_products() else 0)
    for ours, ref in zip(features, float64_reference(module.float(), pixel_values)):
        assert ours.dtype == torch.bfloat16
        assert (ours.double() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


def test_training_fuses_only_the_frozen_convolutions(backbone, fused_calls):
    """Under autograd only the frozen stem and layer1, whose inputs need no gradient either, run fused (the fused op
    has no backward); the trained stages run `F.conv2d`, and their gradients flow."""
    pixel_values = torch.randn(1, 3, 64, 96)
    features = [f for f, _ in backbone(pixel_values, torch.zeros(1, 64, 96, dtype=torch.bool))]
    relu, residual = convolutions(backbone.body, ("layer1",))
    assert fused_calls.count("relu") == relu and fused_calls.count("residual") == residual
    sum(f.sum() for f in features).backward()
    trained = [p for p in backbone.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    backbone.zero_grad(set_to_none=True)


def test_autocast_runs_bfloat16_fused_and_onednn_disabled_nothing_fused(backbone, fused_calls):
    """Under CPU autocast to bfloat16 at inference the body runs in bfloat16 (the input and the folded weights cast as
    autocast casts `F.conv2d`'s), fused where this CPU runs bfloat16 convolutions on oneDNN, within bfloat16 rounding
    of the float64 body; a user who turns oneDNN off gets aten's convolutions: nothing fused then."""
    from hf_dino.onednn import onednn_runs_bfloat16_products

    pixel_values = torch.randn(1, 3, 64, 96)
    padding_mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        features = [f for f, _ in backbone(pixel_values, padding_mask)]
    relu, residual = convolutions(backbone.body, ("layer1", "layer2", "layer3", "layer4"))
    assert len(fused_calls) == ((relu + residual) if onednn_runs_bfloat16_products() else 0)
    for ours, ref in zip(features, float64_reference(backbone, pixel_values)):
        assert ours.dtype == torch.bfloat16
        assert (ours.double() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    del fused_calls[:]
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with torch.no_grad():
            features = [f for f, _ in backbone(pixel_values, padding_mask)]
    finally:
        torch.backends.mkldnn.enabled = previous
    assert fused_calls == []
    assert_matches_reference(features, float64_reference(backbone, pixel_values))
