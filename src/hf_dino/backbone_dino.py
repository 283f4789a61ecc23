"""DINO's backbones: timm ResNets with frozen batch norm, and Swin Transformers (own code, for the original's padding
order: pad before the cyclic shift, never shrink the window, a LayerNorm on every returned stage).

`DinoBackbone` returns one feature map per `config.backbone_out_indices` with its padding mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_dino import SWIN_ARCHITECTURES, DinoConfig

def _window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """`[B, H, W, C]` -> `[B * num_windows, window * window, C]` (H, W multiples of `window`)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def _window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `_window_partition`: `[B * num_windows, window * window, C]` -> `[B, H, W, C]`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


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
            attn = attn.view(-1, self.num_heads, n, n)
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
        pad_b, pad_r = (window - height % window) % window, (window - width % window) % window
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = x.shape[1:3]
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        x = self.attn(_window_partition(x, window), shift_mask if self.shift_size > 0 else None)
        x = _window_reverse(x, window, hp, wp)
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
        x = F.pad(x.view(b, height, width, c), (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


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
        """Attention mask `[windows, N, N]` (0 / -100) that keeps rolled-in regions apart."""
        window, shift = self.window_size, self.window_size // 2
        hp, wp = math.ceil(height / window) * window, math.ceil(width / window) * window
        region = torch.zeros((1, hp, wp, 1), device=device)
        count = 0
        for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                region[:, hs, ws, :] = count
                count += 1
        region = _window_partition(region, window).squeeze(-1)
        mask = region[:, None, :] - region[:, :, None]
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

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
        x = self.proj(F.pad(pixel_values, (0, (p - w % p) % p, 0, (p - h % p) % p)))
        return x


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
        height, width = x.shape[-2:]
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        outputs = []
        for i, stage in enumerate(self.layers):
            x = stage(x, height, width)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(x)
                outputs.append(out.view(-1, height, width, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
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


class DinoBackbone(nn.Module):
    """The convolutional (timm ResNet, frozen batch norm) or Swin backbone; `body` holds its weights.

    Returns one `[B, C_l, H_l, W_l]` map per entry of `config.backbone_out_indices` and the matching padding
    masks `[B, H_l, W_l]` (True = padding), resized from the image mask with nearest interpolation as the
    original does.
    """

    def __init__(self, config: DinoConfig):
        super().__init__()
        if config.is_swin_backbone:
            self.body = DinoSwinTransformer(
                config.backbone, config.backbone_out_indices, config.backbone_drop_path_rate, config.num_channels
            )
        else:
            import timm

            body = timm.create_model(
                config.backbone,
                pretrained=config.use_pretrained_backbone,
                features_only=True,
                out_indices=[i + 1 for i in config.backbone_out_indices],
                in_chans=config.num_channels,
                # frozen batch norms never move: a zero scale on each block's last norm (timm's default for
                # training from scratch) would disable every residual branch of a randomly initialised backbone
                zero_init_last=False,
            )
            self.body = DinoFrozenBatchNorm2d.replace_batch_norms(body)
            # As the original: the stem and layer1 are never trained.
            for name, parameter in self.body.named_parameters():
                if not name.startswith(("layer2", "layer3", "layer4")):
                    parameter.requires_grad_(False)
            # the ResNet keeps timm's initialisation (or its pretrained weights); transformers must not redo it
            for module in self.body.modules():
                module._is_hf_initialized = True

    def forward(self, pixel_values: torch.Tensor, padding_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        features = self.body(pixel_values)
        return [(f, F.interpolate(padding_mask[None].float(), size=f.shape[-2:])[0].bool()) for f in features]
