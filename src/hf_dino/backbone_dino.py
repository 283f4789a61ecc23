"""DINO's backbones: timm ResNets with frozen batch norm, and Swin Transformers (own code, for the original's padding
order: pad before the cyclic shift, never shrink the window, a LayerNorm on every returned stage).

`DinoBackbone` returns one feature map per `config.backbone_out_indices` with its padding mask, and loads the
ImageNet weights DINO trains from (`DinoBackbone.load_pretrained_weights`: a timm tag from the Hub, or a local
timm/Hub `.safetensors`, torchvision `.pth` or Microsoft Swin `.pth` file).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from .configuration_dino import SWIN_ARCHITECTURES, DinoConfig
from .onednn import autocast_operands, onednn_convolution_applies, onednn_convolution_relu

logger = logging.getLogger(__name__)


def captures_graph() -> bool:
    """Whether the code runs under graph capture (`torch.jit.trace`, `torch.compile`, `torch.export`): the eager fast
    paths (the folded ResNet, the chunked encoder feed-forward) leave the plain computation to the capture."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def has_hooks(modules: Iterable[nn.Module]) -> bool:
    """Whether a forward or backward hook is registered on any of `modules`, or globally on all modules
    (`register_module_forward_hook`, ...). The eager fast paths that use modules' weights instead of calling them (the
    folded ResNet, the chunked encoder feed-forward) would skip such hooks (feature extraction, Grad-CAM, activation
    statistics): the plain modules run then."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(torch_module, f"_global{kind}", None) for kind in kinds):
        return True
    return any(getattr(module, kind) for module in modules for kind in kinds)


def _ceil_to(size: int, multiple: int) -> int:
    """`size` rounded up to a multiple of `multiple` (written as a ceil-division, which stays a simple expression when
    `size` is a symbolic size under `torch.export`)."""
    return (size + multiple - 1) // multiple * multiple


def _window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """`[B, H, W, C]` -> `[B * num_windows, window * window, C]` (H, W multiples of `window`)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b * (h // window) * (w // window), window * window, c)


def _window_reverse(windows: torch.Tensor, window: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `_window_partition`: `[B * num_windows, window * window, C]` -> `[B, H, W, C]`."""
    c = windows.shape[-1]
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class DinoSwinWindowAttention(nn.Module):
    """Window multi-head self-attention with a relative position bias (Swin)."""

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # recomputed (in _init_weights too), not stored in checkpoints; the converter checks the original's copy
        self.register_buffer("relative_position_index", self.position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    @staticmethod
    def position_index(window_size: int) -> torch.Tensor:
        """`[N, N]` index into the bias table of every (query, key) offset inside a window (N = window^2)."""
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        coords = coords.flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
        return relative[..., 0] * (2 * window_size - 1) + relative[..., 1]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: `[B * windows, N, C]`; mask: `[windows, N, N]` (0 / -100) or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(bw // windows, windows, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class DinoSwinBlock(nn.Module):
    """A Swin block. As in the original DINO, the map is padded to the window size first, then (for shifted
    blocks) rolled; timm rolls before padding and transformers shrinks windows on small maps, which both give
    different numbers whenever a map is not a multiple of the window."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, drop_path: float):
        super().__init__()
        from timm.layers import DropPath, Mlp

        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DinoSwinWindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)  # fc1, exact GELU, fc2 (timm's dropouts are identities at p=0)

    def forward(self, x: torch.Tensor, height: int, width: int, shift_mask: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        window = self.window_size
        shortcut = x
        x = self.norm1(x).view(b, height, width, c)
        hp, wp = _ceil_to(height, window), _ceil_to(width, window)
        x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        x = self.attn(_window_partition(x, window), shift_mask if self.shift_size > 0 else None)
        x = _window_reverse(x, window, b, hp, wp)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :height, :width].reshape(b, height * width, c)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DinoSwinPatchMerging(nn.Module):
    """2x2 patch merging (pads odd maps), LayerNorm, then a linear reduction 4C -> 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, _, c = x.shape
        x = F.pad(x.view(b, height, width, c), (0, 0, 0, _ceil_to(width, 2) - width, 0, _ceil_to(height, 2) - height))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, (height + 1) // 2 * ((width + 1) // 2), 4 * c)))


class DinoSwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, drop_paths: list[float], downsample: bool):
        super().__init__()
        self.window_size = window_size
        self.blocks = nn.ModuleList(
            DinoSwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, drop_paths[i])
            for i in range(depth)
        )
        self.downsample = DinoSwinPatchMerging(dim) if downsample else None

    def shift_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """Attention mask `[windows, N, N]` (0 / -100) that keeps rolled-in regions apart.

        After the cyclic shift the padded `[hp, wp]` map has three bands per axis (rows `< hp - window`, rows in
        `[hp - window, hp - shift)`, rows `>= hp - shift`; columns alike): 3 x 3 regions, numbered `3 * row_band +
        column_band`. Tokens of a window attend only to tokens of their own region. Computed from comparisons with
        the (possibly symbolic) sizes, so an exported graph builds the mask for every input size."""
        window, shift = self.window_size, self.window_size // 2
        hp, wp = _ceil_to(height, window), _ceil_to(width, window)
        rows, cols = torch.arange(hp, device=device), torch.arange(wp, device=device)
        row_band = (rows >= hp - window).long() + (rows >= hp - shift).long()
        col_band = (cols >= wp - window).long() + (cols >= wp - shift).long()
        region = (3 * row_band[:, None] + col_band[None, :]).to(torch.float32)
        region = _window_partition(region[None, :, :, None], window).squeeze(-1)
        mask = region[:, None, :] - region[:, :, None]
        return torch.where(mask != 0, -100.0, 0.0)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        mask = self.shift_mask(height, width, x.device)
        for block in self.blocks:
            x = block(x, height, width, mask)
        return x


class DinoSwinPatchEmbed(nn.Module):
    def __init__(self, embed_dim: int, num_channels: int = 3, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(num_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, w = pixel_values.shape[-2:]
        return self.proj(F.pad(pixel_values, (0, _ceil_to(w, p) - w, 0, _ceil_to(h, p) - h)))


class DinoSwinTransformer(nn.Module):
    """Swin Transformer backbone as the original DINO uses it: per-stage output LayerNorms `norm{i}` for the
    returned stages, windows never shrunk, padding before shifting. Returns `[B, C_i, H_i, W_i]` maps."""

    def __init__(self, name: str, out_indices: list[int], drop_path_rate: float, num_channels: int = 3):
        super().__init__()
        arch = SWIN_ARCHITECTURES[name]
        embed_dim, depths = arch["embed_dim"], arch["depths"]
        self.out_indices = list(out_indices)
        self.num_features = [embed_dim * 2**i for i in range(len(depths))]
        self.patch_embed = DinoSwinPatchEmbed(embed_dim, num_channels)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(
                DinoSwinStage(
                    self.num_features[i], depth, arch["num_heads"][i], arch["window_size"],
                    rates[sum(depths[:i]): sum(depths[: i + 1])], downsample=i < len(depths) - 1,
                )
            )
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(pixel_values)
        b, _, height, width = x.shape
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        outputs = []
        for i, stage in enumerate(self.layers):
            x = stage(x, height, width)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(x)
                outputs.append(out.view(b, height, width, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x, height, width)
                height, width = (height + 1) // 2, (width + 1) // 2
        return outputs


class DinoFrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (buffers, never trained), as DINO's ResNet uses.

    `y = x * scale + shift` with `scale = weight / sqrt(running_var + 1e-5)`, done in one fused pass.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def replace_batch_norms(cls, module: nn.Module) -> nn.Module:
        """Swap every `nn.BatchNorm2d` inside `module` for a frozen copy (same buffer names and values)."""
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                frozen = cls(child.num_features, child.eps)
                if child.affine:
                    frozen.weight.copy_(child.weight.detach())
                    frozen.bias.copy_(child.bias.detach())
                if child.track_running_stats:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
                setattr(module, name, frozen)
            else:
                cls.replace_batch_norms(child)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))


class DinoFoldedConv(NamedTuple):
    """A convolution with the frozen batch norm after it folded in: `bn(conv(x)) == conv2d(x, weight, bias)`."""

    weight: torch.Tensor  # [C_out, C_in / groups, k_h, k_w], channels-last
    bias: torch.Tensor  # [C_out]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def relu(self, x: torch.Tensor) -> torch.Tensor:
        """`relu(conv(x))`, as one oneDNN call where `onednn_convolution_applies`."""
        if onednn_convolution_applies(x, self.weight):
            return onednn_convolution_relu(x, *self)
        return self(x).relu_()

    def add_relu_(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`relu(conv(x) + residual)`: as one oneDNN call written into `residual` (overwritten) where
        `onednn_convolution_applies`, else into the convolution's output."""
        if onednn_convolution_applies(x, self.weight, residual):
            return onednn_convolution_relu(x, *self, residual=residual)
        out = self(x)
        out += residual
        return out.relu_()


class DinoFoldedResNet:
    """Eager view of a frozen-batch-norm timm ResNet (`DinoBackbone.body`): the same function as
    `body(pixel_values)`, with every batch norm folded into the convolution before it and the maps kept in
    channels-last memory format (what oneDNN's CPU convolutions run fastest on).

    The module is not changed: its parameters and buffers (what is trained, saved and converted) stay as they are.
    The folded weights (`W * scale`, `bias * scale + shift`) are computed afresh at every call, in float32 (or the
    weight's dtype if wider) and cast to the weight's dtype: a pass over the weights (~40 ms for ResNet-50 on
    2 CPU cores, ~1.5 % of an 800x1200 forward), and nothing to go stale, whatever changes the weights (an optimizer
    step, fused or not, `.data` edits, `load_state_dict`, `.to()`). Under autograd (training) the folding is
    differentiable in `conv.weight`, so that the gradients reach it: the frozen batch norm costs no pass over the
    maps, forward or backward.

    `DinoFoldedResNet.supports(body)` tells whether the layout is the plain timm ResNet this class knows (conv-bn-ReLU
    stem, then `Bottleneck` / `BasicBlock` stages without attention, anti-aliasing, drop-block or drop-path);
    `DinoBackbone` falls back to `body` otherwise.
    """

    def __init__(self, body: nn.Module):
        if not self.supports(body):
            raise ValueError(f"{type(body).__name__} is not a plain frozen-batch-norm timm ResNet")
        self.body = body
        self._pairs: list[tuple[nn.Conv2d, DinoFrozenBatchNorm2d]] = []
        self._plan: list[tuple[str, object]] = []  # (child name, what runs it), in the body's order
        for name, child in body.named_children():
            if name == "conv1":
                self._plan.append((name, ("stem", self._pair(child, body.bn1))))
            elif name in ("bn1", "act1"):
                self._plan.append((name, None))  # folded into the stem convolution / applied with it
            elif name == "maxpool":
                self._plan.append((name, ("module", child)))
            else:  # a stage
                blocks = []
                for block in child:
                    convs = [self._pair(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"))
                             for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
                    downsample = None if block.downsample is None else self._pair(*block.downsample)
                    blocks.append((convs, downsample))
                self._plan.append((name, ("stage", blocks)))
        self._return_layers = set(body.return_layers)

    @staticmethod
    def supports(body: nn.Module) -> bool:
        from timm.models.resnet import BasicBlock, Bottleneck

        def conv_bn(conv, bn) -> bool:
            return type(conv) is nn.Conv2d and type(bn) is DinoFrozenBatchNorm2d and conv.padding_mode == "zeros"

        def block_ok(block) -> bool:
            if type(block) not in (Bottleneck, BasicBlock):
                return False
            n = 3 if isinstance(block, Bottleneck) else 2
            plain = all(conv_bn(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")) and
                        type(getattr(block, f"act{i}")) is nn.ReLU for i in range(1, n + 1))
            extras = (isinstance(block.drop_block, nn.Identity) and isinstance(block.aa, nn.Identity)
                      and block.se is None and block.drop_path is None)
            ds = block.downsample
            ds_ok = ds is None or (isinstance(ds, nn.Sequential) and len(ds) == 2 and conv_bn(ds[0], ds[1]))
            return plain and extras and ds_ok

        names = [name for name, _ in body.named_children()]
        if not hasattr(body, "return_layers") or names[:3] != ["conv1", "bn1", "act1"]:
            return False
        if not conv_bn(body.conv1, body.bn1) or type(body.act1) is not nn.ReLU:
            return False
        for name, child in body.named_children():
            if name == "maxpool":
                if not isinstance(child, nn.MaxPool2d):
                    return False
            elif re.fullmatch(r"layer\d", name):
                if not isinstance(child, nn.Sequential) or not all(block_ok(b) for b in child):
                    return False
            elif name not in ("conv1", "bn1", "act1"):
                return False
        return True

    def _pair(self, conv: nn.Conv2d, bn: DinoFrozenBatchNorm2d) -> int:
        self._pairs.append((conv, bn))
        return len(self._pairs) - 1

    @staticmethod
    def _fold(conv: nn.Conv2d, bn: DinoFrozenBatchNorm2d) -> DinoFoldedConv:
        """`bn(conv(x)) == conv2d(x, W * scale, bias * scale + shift)` with `scale`, `shift` the batch norm's
        `y * scale + shift`; computed in float32 or wider and cast to the weight's dtype (differentiable in
        `conv.weight` and `conv.bias`)."""
        dtype = conv.weight.dtype
        compute_dtype = torch.promote_types(dtype, torch.float32)
        scale = bn.weight.to(compute_dtype) * (bn.running_var.to(compute_dtype) + bn.eps).rsqrt()
        shift = bn.bias.to(compute_dtype) - bn.running_mean.to(compute_dtype) * scale
        weight = conv.weight.to(compute_dtype) * scale.view(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias.to(compute_dtype) * scale + shift
        # under CPU autocast to bfloat16, in bfloat16 as autocast would hand them to `F.conv2d`
        weight, bias = autocast_operands(weight.to(dtype), bias.to(dtype))
        return DinoFoldedConv(weight.contiguous(memory_format=torch.channels_last), bias,
                              conv.stride, conv.padding, conv.dilation, conv.groups)

    def __call__(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """`[B, C, H, W]` -> the returned stages' maps `[B, C_l, H_l, W_l]` (channels-last), as `body` returns.
        The in-place additions and ReLUs act on convolution outputs, which no backward formula needs. Where oneDNN
        runs the convolutions without autograd (`onednn_convolution_applies`: inference in float32, or bfloat16 where
        the CPU has it), each ReLU is fused into its convolution and a bottleneck's last convolution sums into the
        shortcut in place (`onednn_convolution_relu`): no pass of its own for either, and no fresh 60 MB map per
        block at 800x1200 in float32 (float32 values to rounding; the same logits bit for bit on an 800x1201 image).
        Under CPU autocast to bfloat16 the input and the folded weights are cast first (`autocast_operands`), so
        the body runs in bfloat16 as autocast runs its convolutions, with the same fusions."""
        convs = [self._fold(conv, bn) for conv, bn in self._pairs]
        x = autocast_operands(pixel_values)[0].contiguous(memory_format=torch.channels_last)
        outputs = []
        for name, step in self._plan:
            if step is not None:
                kind, what = step
                if kind == "stem":
                    x = convs[what].relu(x)
                elif kind == "module":
                    x = what(x)
                else:
                    for block_convs, downsample in what:
                        # a returned stage's map is never summed into (in place): a stage whose first block has no
                        # downsample follows the stem, not a returned stage
                        shortcut = x if downsample is None else convs[downsample](x)
                        for index in block_convs[:-1]:
                            x = convs[index].relu(x)
                        x = convs[block_convs[-1]].add_relu_(x, shortcut)
            if name in self._return_layers:
                outputs.append(x)
        return outputs


# ----------------------------------------------------------------------------------------------------------------------
# ImageNet weights
# ----------------------------------------------------------------------------------------------------------------------
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

# Swin: ImageNet checkpoint key (timm or Microsoft layout) -> our parameter. Both layouts name the blocks alike;
# Microsoft's patch merging `layers.{i}.downsample` closes stage i (as ours), timm's opens stage i + 1.
_SWIN_SAME_KEY = re.compile(
    r"patch_embed\.(proj|norm)\.(weight|bias)"
    r"|layers\.\d+\.blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table"
)
_SWIN_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)")
# in the file, not used by DINO: the ImageNet classifier and final norm (DINO puts a new LayerNorm on every returned
# stage instead) and the buffers the model recomputes (`relative_position_index` is checked against ours)
_SWIN_UNUSED = re.compile(r"head\.(fc\.)?(weight|bias)|norm\.(weight|bias)|layers\.\d+\.blocks\.\d+\.attn_mask")
_SWIN_POSITION_INDEX = re.compile(r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_index")
# ResNet (timm and torchvision name it alike): the ImageNet classifier and BN step counters are not used
_RESNET_UNUSED = re.compile(r"fc\.(weight|bias)|.*\.num_batches_tracked")


def swin_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """`"microsoft"` (patch merging at the end of a stage: `layers.0.downsample`) or `"timm"` (at the start of
    the next one) for an ImageNet Swin state dict."""
    downsampled = {int(m.group(1)) for k in state_dict if (m := _SWIN_DOWNSAMPLE.fullmatch(k))}
    if 0 in downsampled:
        return "microsoft"
    if downsampled:
        return "timm"
    raise ValueError("not a Swin Transformer state dict: no `layers.<i>.downsample` patch-merging weights")


def swin_key_map(state_dict: dict[str, torch.Tensor]) -> dict[str, str | None]:
    """The explicit key map of an ImageNet Swin checkpoint (timm or Microsoft layout) onto `DinoSwinTransformer`:
    checkpoint key -> our parameter name, or None for a key DINO does not use (classifier, final norm, recomputed
    buffers). Keys it does not know are left out (the caller reports them)."""
    shift = -1 if swin_layout(state_dict) == "timm" else 0
    mapping: dict[str, str | None] = {}
    for key in state_dict:
        if _SWIN_SAME_KEY.fullmatch(key):
            mapping[key] = key
        elif m := _SWIN_DOWNSAMPLE.fullmatch(key):
            mapping[key] = f"layers.{int(m.group(1)) + shift}.downsample.{m.group(2)}"
        elif _SWIN_UNUSED.fullmatch(key) or _SWIN_POSITION_INDEX.fullmatch(key):
            mapping[key] = None
    return mapping


def _preview(items: list[str], limit: int = 20) -> str:
    """The first `limit` items of a list, and how many more."""
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def read_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a `.pth` (`torch.load(weights_only=True)`; a `{"model": ...}`
    or `{"state_dict": ...}` wrapper, as in Microsoft's Swin releases, is unwrapped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:  # safetensors' errors for a truncated or foreign file do not name it
            raise ValueError(f"cannot read backbone weights {path}: {type(error).__name__}: {error}") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle / zip errors of a truncated or foreign file
        raise ValueError(f"cannot read backbone weights {path}: {type(error).__name__}: {error}") from error
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of parameter names to tensors)")
    return state


def fetch_timm_weights(tag: str, backbone: str) -> str:
    """Download (or find in the Hub cache) the `model.safetensors` of timm's `tag` for `backbone`; returns its
    path. Raises a `ValueError` for a tag timm does not have for this architecture and an `OSError` naming the file
    to pass instead when the Hub cannot be reached."""
    import timm
    from timm.models import get_pretrained_cfg

    architecture = tag.split(".", 1)[0]
    try:
        cfg = get_pretrained_cfg(tag) if "." in tag else None
    except RuntimeError:  # timm: an invalid tag of a known architecture
        cfg = None
    if architecture != backbone or cfg is None or not cfg.hf_hub_id:
        raise ValueError(
            f"backbone_weights={tag!r} is neither a file nor a timm tag of the {backbone!r} backbone on the Hub; "
            f"tags: {timm.list_pretrained(backbone + '.*')}"
        )
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(cfg.hf_hub_id, "model.safetensors")
    except Exception as error:  # offline, no connection, cache miss in offline mode, HTTP errors
        original = cfg.url  # timm records where the weights were first published (torchvision, Microsoft)
        raise OSError(
            f"cannot fetch the ImageNet weights {tag!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            f"Download them where the Hub is reachable and pass the file instead "
            f"(DinoConfig(backbone_weights=PATH), examples/train.py --backbone-weights PATH): "
            f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors"
            + (f" or the original {original}" if original else "")
        ) from error


class DinoBackbone(nn.Module):
    """The convolutional (timm ResNet, frozen batch norm) or Swin backbone; `body` holds its weights.

    Returns one `[B, C_l, H_l, W_l]` map per entry of `config.backbone_out_indices` and the matching padding
    masks `[B, H_l, W_l]` (True = padding), resized from the image mask with nearest interpolation as the
    original does.

    With `config.use_pretrained_backbone` the ImageNet weights `config.pretrained_backbone_weights` are loaded when
    it is built (`load_pretrained_weights`), except on the meta device (`from_pretrained`).
    """

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.name = config.backbone
        self.out_indices = list(config.backbone_out_indices)
        if config.is_swin_backbone:
            self.body = DinoSwinTransformer(
                config.backbone, config.backbone_out_indices, config.backbone_drop_path_rate, config.num_channels
            )
        else:
            import timm

            body = timm.create_model(
                config.backbone,
                pretrained=False,  # ImageNet weights: `load_pretrained_weights` below
                features_only=True,
                out_indices=[i + 1 for i in config.backbone_out_indices],
                in_chans=config.num_channels,
                # frozen batch norms never move: a zero scale on each block's last norm (timm's default for
                # training from scratch) would disable every residual branch of a randomly initialised backbone
                zero_init_last=False,
            )
            self.body = DinoFrozenBatchNorm2d.replace_batch_norms(body)
            self.freeze_stem()
            # the ResNet keeps timm's initialisation (or its pretrained weights); transformers must not redo it
            for module in self.body.modules():
                module._is_hf_initialized = True
        # not while `from_pretrained` builds the model on the meta device: its checkpoint holds the weights
        if config.use_pretrained_backbone and not any(p.is_meta for p in self.parameters()):
            self.load_pretrained_weights(config.pretrained_backbone_weights)

    def freeze_stem(self) -> None:
        """As the original, a ResNet's stem and layer1 are never trained: their parameters get
        `requires_grad=False` (a Swin has none to freeze). `hf_dino.training.prepare_scratch_backbone` undoes it for a
        backbone trained from scratch."""
        if self.is_swin:
            return
        for name, parameter in self.body.named_parameters():
            if not name.startswith(("layer2", "layer3", "layer4")):
                parameter.requires_grad_(False)

    @property
    def is_swin(self) -> bool:
        return isinstance(self.body, DinoSwinTransformer)

    @torch.no_grad()
    def load_pretrained_weights(self, weights: str | os.PathLike) -> list[str]:
        """Load ImageNet weights into `body`, strictly: a key of the file that maps nowhere, a parameter it does not
        provide, or a shape that differs stops with the full lists (`ValueError`).

        Args:
            weights: a local file (timm/Hub `.safetensors`, torchvision `.pth`, Microsoft Swin `.pth` in either the
                Microsoft or the timm layout, see `swin_key_map`) or a timm tag of this backbone, e.g.
                `"resnet50.tv_in1k"`, fetched from the Hugging Face Hub (`fetch_timm_weights`).

        Returns:
            The parameters the file does not hold, newly initialised: a Swin's per-stage output norms `norm{i}`
            (weight 1, bias 0), which the original DINO adds to the ImageNet network. Empty for a ResNet.
        """
        weights = os.fspath(weights)
        is_file = os.path.isfile(weights) or weights.endswith(_WEIGHT_FILE_SUFFIXES) or os.sep in weights
        path = weights if is_file else fetch_timm_weights(weights, self.name)
        state = read_weight_file(path)
        ours = self.body.state_dict()
        if self.is_swin:
            mapping = swin_key_map(state)
            new = [k for k in ours if re.fullmatch(r"norm\d+\.(weight|bias)", k)]
        else:
            # stages after the last returned one are not built (timm features_only); their weights are not used
            unbuilt = tuple(f"layer{i + 1}." for i in range(max(self.out_indices) + 1, 4))
            mapping = {k: None if _RESNET_UNUSED.fullmatch(k) or k.startswith(unbuilt) else k for k in state}
            new = []
        unmapped = sorted(k for k in state if k not in mapping or (mapping[k] is not None and mapping[k] not in ours))
        loaded = {target: state[key] for key, target in mapping.items() if target is not None and target in ours}
        missing = sorted(set(ours) - set(loaded) - set(new))
        misshaped = sorted(f"{k}: file {tuple(v.shape)}, model {tuple(ours[k].shape)}" for k, v in loaded.items()
                           if v.shape != ours[k].shape)
        if self.is_swin:  # the file's relative position index must be the one the model computes
            for key in (k for k in state if _SWIN_POSITION_INDEX.fullmatch(k)):
                expected = self.body.get_submodule(key.rsplit(".", 1)[0]).relative_position_index
                if state[key].shape != expected.shape or not torch.equal(state[key].to(expected), expected):
                    misshaped.append(f"{key}: differs from the window's relative position index")
        if unmapped or missing or misshaped:
            hint = ""
            if any(key.startswith(("model.backbone.", "backbone.0.", "transformer.")) for key in state):
                hint = ("\n  (these are the weights of a whole detector, not of an ImageNet backbone: load a converted or "
                        "trained DINO with DinoForObjectDetection.from_pretrained, or convert an original checkpoint "
                        "with conversion/convert_original_checkpoint.py)")
            raise ValueError(
                f"{weights} does not fit the {self.name} backbone:\n"
                f"  unmapped keys ({len(unmapped)}): {_preview(unmapped)}\n"
                f"  missing keys ({len(missing)}): {_preview(missing)}\n"
                f"  mis-shaped ({len(misshaped)}): {_preview(misshaped)}{hint}"
            )
        self.body.load_state_dict({k: v.to(ours[k].dtype) for k, v in loaded.items()}, strict=False)
        for key in new:
            self.body.get_parameter(key).fill_(1.0 if key.endswith("weight") else 0.0)
        # transformers' weight initialisation must leave the loaded modules alone
        new_modules = {key.rsplit(".", 1)[0] for key in new}
        for name, module in self.body.named_modules():
            if name not in new_modules:
                module._is_hf_initialized = True
        logger.info("loaded %d ImageNet tensors into the %s backbone from %s (%d in the file not used by DINO: "
                    "classifier, final norm, recomputed buffers, stages not built)", len(loaded), self.name, path,
                    len(state) - len(loaded))
        if new:
            logger.warning("newly initialised (not in the ImageNet weights %s): %s", weights, new)
        return new

    def folded_body(self) -> DinoFoldedResNet | None:
        """The eager view of a ResNet body with its batch norms folded (`DinoFoldedResNet`), None for a Swin
        or a ResNet layout it does not know. Built on first use, and again whenever any module of `body` was replaced
        (e.g. a convolution swapped, or wrapped by an adapter library, which the view may no longer support); not a
        submodule (nothing is saved)."""
        modules = tuple(self.body.modules())
        built_for, folded = self.__dict__.get("_folded_body", ((), None))
        if modules != built_for:  # identity of every module (`nn.Module` compares by identity)
            folded = DinoFoldedResNet(self.body) if DinoFoldedResNet.supports(self.body) else None
            self.__dict__["_folded_body"] = (modules, folded)
        return folded

    def forward(self, pixel_values: torch.Tensor, padding_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """pixel_values `[B, C, H, W]`, padding_mask `[B, H, W]` (True = padding) -> `(map, mask)` per returned stage.

        A ResNet runs eagerly as its folded, channels-last view (`folded_body`), in training and inference alike (the
        gradients reach the same parameters). A Swin, a ResNet layout the folded view does not know, any graph
        capture (tracing, `torch.compile`, `torch.export`) and a body with hooks (`has_hooks`) run `body`
        itself, on the image as given.
        """
        folded = None if self.is_swin or captures_graph() or has_hooks(self.body.modules()) else self.folded_body()
        features = self.body(pixel_values) if folded is None else folded(pixel_values)
        return [(f, F.interpolate(padding_mask[None].float(), size=f.shape[-2:])[0].bool()) for f in features]
