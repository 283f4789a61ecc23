"""Where DINO's CPU work calls oneDNN directly: which products run faster there than on aten's BLAS on this CPU
(`onednn_products_are_faster`, `onednn_runs_every_feed_forward_product`), whether bfloat16 runs on it
(`onednn_runs_bfloat16_products`), the operands such a call takes under CPU autocast (`autocast_operands`,
`autocast_allows`), and the backbone's convolutions with their epilogues fused (`onednn_convolution_applies`,
`onednn_convolution_relu`).

The token-wise products that use these rules are `DinoLinear` and `DinoReluFeedForwardInChunks` (modeling_dino.py);
the convolutions, `DinoFoldedResNet` (backbone_dino.py).
"""

from __future__ import annotations

import functools
import platform

import torch


def cpu_vendor() -> str:
    """The CPU's vendor string (`"GenuineIntel"`, `"AuthenticAMD"`, ...) as Linux's `/proc/cpuinfo` names it, or
    elsewhere as `platform.processor()` describes the CPU (on Windows it ends with the vendor); `""` if unknown."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def has_onednn_linear_ops() -> bool:
    """Whether this torch build has the oneDNN operators `onednn_linear` calls: the product
    (`torch.ops.mkldnn._linear_pointwise`) and the weight packing (`torch.ops.mkldnn._reorder_linear_weight`)."""
    try:
        return (torch.ops.mkldnn._linear_pointwise.default is not None
                and torch.ops.mkldnn._reorder_linear_weight.default is not None)
    except (AttributeError, RuntimeError):  # a build without them
        return False


@functools.cache
def onednn_products_are_faster() -> bool:
    """Whether float32 CPU products run faster on oneDNN than on aten's BLAS (MKL) here: on AMD CPUs and on CPUs with
    AVX2 but not AVX-512. MKL's sgemm is at the ceiling on Intel's AVX-512 CPUs, not on AMD's. The `[tokens, 256] x
    [256, N]` products of the encoder, MKL against oneDNN: on a 2-core AMD EPYC with AVX2 (Zen 3) 31-79 against
    51-110 GFLOP/s (`[20097, 256] x [256, 256]`: 84 vs 52 ms); on a 2-core AMD EPYC with AVX-512 (Zen 4) 115-166
    against 174-370 GFLOP/s (21.8 vs 9.1 ms); on a 2-core AMD EPYC Zen 5 122-179 against 204-400 (20.2 vs 7.7 ms)."""
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkl.is_available():
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    if not (capability == "AVX2" or (capability == "AVX512" and "AuthenticAMD" in cpu_vendor())):
        return False
    return has_onednn_linear_ops()


def onednn_runs_every_feed_forward_product() -> bool:
    """Whether, beyond the products `onednn_products_are_faster` sends to oneDNN, the feed-forward block's backward
    runs `grad_hidden @ W1` and `grad_hidden^T @ x` (output width 256, long reductions) there too: on AVX-512 CPUs
    where oneDNN is the faster library (AMD's; per 1024-token chunk on the AMD EPYC Zen 4 2.95 vs 6.36 ms and 5.23 vs
    6.47 ms). On AVX2 CPUs MKL is faster for those two (Zen 3: 9 vs 10.5 ms and 13-15 vs 17-18 ms)."""
    return onednn_products_are_faster() and torch.backends.cpu.get_cpu_capability() == "AVX512"



@functools.cache
def onednn_runs_bfloat16_products() -> bool:
    """Whether aten runs bfloat16 CPU products and convolutions on oneDNN here
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`: CPUs with AVX-512, native bf16 arithmetic or not). There calling
    oneDNN's product directly computes the same values without aten's copy of the broadcast bias into the output, and
    with the feed-forward's ReLU fused: a bf16 forward (800x1201) 1.28 -> 1.22 s on the AMD EPYC Zen 4 (six
    interleaved calls each), bit-identical logits."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported() and has_onednn_linear_ops()
    except (AttributeError, RuntimeError):  # a build without the ops
        return False


def autocast_operands(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors as CPU autocast to bfloat16 hands them to a product or a convolution: float32 ones cast to bfloat16
    (None and other dtypes as they are); outside such autocast, unchanged. Autocast does not see our direct oneDNN
    calls (`onednn_linear`, `onednn_convolution_relu`): their callers pass the operands through this first, so that
    under `torch.autocast("cpu", torch.bfloat16)` they compute in bfloat16 as `F.linear` / `F.conv2d` would."""
    if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return tensors
    return tuple(t.to(torch.bfloat16) if t is not None and t.dtype == torch.float32 else t for t in tensors)


def autocast_allows(*tensors: torch.Tensor | None) -> bool:
    """Whether a direct oneDNN call on these operands computes what CPU autocast would: outside CPU autocast, or
    bfloat16 operands (`autocast_operands`) under autocast to bfloat16 (which runs products in 16 bits)."""
    if not torch.is_autocast_enabled("cpu"):
        return True
    return torch.get_autocast_dtype("cpu") == torch.bfloat16 and all(
        t.dtype == torch.bfloat16 for t in tensors if t is not None)


def onednn_convolution_applies(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether `onednn_convolution_relu` computes `relu(F.conv2d(x, weight, ...) [+ residual])` here: where aten runs
    the convolution on oneDNN anyway (CPU tensors of one dtype, float32, or bfloat16 where this CPU runs it on
    oneDNN), without autograd on any of the tensors (the fused op has no backward: in training, only the frozen stem's
    and layer1's convolutions qualify), outside CPU autocast or on its bfloat16 operands (`autocast_allows`) and with
    oneDNN enabled (`torch.backends.mkldnn.flags(enabled=False)` turns it off for aten's operators and ours alike).
    Graph capture never reaches it: the folded ResNet that calls it runs only in eager mode."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if (x.device.type != "cpu" or weight.dtype != x.dtype or not autocast_allows(*tensors)
            or not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return False
    if x.dtype == torch.bfloat16:
        return onednn_runs_bfloat16_products()
    return x.dtype == torch.float32


def onednn_convolution_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                            residual: torch.Tensor | None = None) -> torch.Tensor:
    """`relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))`, `[B, C_in, H, W]` -> `[B, C_out, H', W']`,
    as one oneDNN convolution with the ReLU fused (see `onednn_convolution_applies` for where it applies), a new
    tensor; or with `residual` (`[B, C_out, H', W']`, overwritten) `relu(conv(x) + residual)` written into `residual`
    and returned: a bottleneck's last convolution, shortcut and ReLU in one pass, no new tensor (a float32 model's
    largest maps are 60 MB, which glibc's allocator maps afresh, page by page, at every call). The sum is taken in
    the convolution's float32 accumulator, so a bfloat16 result is rounded once, not twice; in float32 the values
    are `F.conv2d`'s followed by aten's `+` and `relu` to rounding (the same logits bit for bit on an 800x1201 image)."""
    padding, stride, dilation = list(padding), list(stride), list(dilation)
    if residual is not None:
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, x, weight, bias, padding, stride, dilation, groups, "add", None, "relu", [], ""
        )
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, "relu", [], "")
