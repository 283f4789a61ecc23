"""``torch.library`` custom ops around the compiled kernels.

* ``hf_dino::ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)``
* ``hf_dino::ms_deform_attn_backward(..., grad_output) -> (grad_value, grad_sampling_locations,
  grad_attention_weights)``

Both have fake (meta) implementations, and the forward has a registered autograd formula that calls the
backward op, so ``torch.compile`` / ``torch.export`` keep the kernel in the graph. Registering the ops
compiles nothing: the extension for a device type is built the first time an op actually runs there. If
that build is impossible the ops compute the same result with the pure-PyTorch reference, so a graph that
was traced with the op in it stays correct.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _loader

OP_NAMESPACE = "hf_dino"

#: dtypes the compiled kernels accept for ``value``, per device type. On CPU a bfloat16 / float16 value is
#: read as it is and everything is computed and summed in float32.
SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _reference():
    from ..deformable_attention import multi_scale_deformable_attention_pytorch

    return multi_scale_deformable_attention_pytorch


def _extension_for(value: Tensor):
    device_type = value.device.type
    if value.dtype not in SUPPORTED_DTYPES.get(device_type, ()) or _loader.kernels_disabled():
        return None
    return _loader.load_extension(device_type)


def _forward_impl(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    extension = _extension_for(value)
    if extension is None:
        return _reference()(value, spatial_shapes, sampling_locations, attention_weights)
    return extension.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _backward_impl(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    grad_output: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    extension = _extension_for(value)
    if extension is None:
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (value, sampling_locations, attention_weights)]
            output = _reference()(inputs[0], spatial_shapes, inputs[1], inputs[2])
            grads = torch.autograd.grad(output, inputs, grad_output, allow_unused=True)
        return tuple(  # type: ignore[return-value]
            t.new_zeros(t.shape) if g is None else g.contiguous() for g, t in zip(grads, inputs)
        )
    grad_value, grad_locations, grad_weights = extension.backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    )
    return grad_value, grad_locations, grad_weights


def _register():
    qualname = f"{OP_NAMESPACE}::ms_deform_attn"
    try:
        torch.ops.hf_dino.ms_deform_attn  # noqa: B018
        return  # already registered (this module imported a second time under another name)
    except (AttributeError, RuntimeError):
        pass

    forward = torch.library.custom_op(qualname, _forward_impl, mutates_args=())
    backward = torch.library.custom_op(f"{OP_NAMESPACE}::ms_deform_attn_backward", _backward_impl, mutates_args=())

    @forward.register_fake
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        batch, _, heads, head_dim = value.shape
        return value.new_empty((batch, sampling_locations.shape[1], heads * head_dim))

    @backward.register_fake
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
        # the kernels return contiguous gradients whatever the input strides
        return (
            value.new_empty(value.shape),
            sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape),
        )

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_formula(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.hf_dino.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
        )
        return grad_value, None, None, grad_locations, grad_weights

    forward.register_autograd(backward_formula, setup_context=setup_context)


_register()


def kernel_dtypes(value: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes ``(value, locations and weights)`` are given to the compiled kernel in.

    The kernel computes in the widest dtype of the three inputs; on CPU, at least in float32, reading a
    bfloat16 / float16 ``value`` as it is (no widened copy) with float32 locations and weights. On CUDA the
    three share the widest dtype (the CUDA kernel has native half-precision paths).
    """
    widest = torch.promote_types(value.dtype, torch.promote_types(sampling_locations.dtype, attention_weights.dtype))
    if value.device.type != "cpu":
        return widest, widest
    compute = torch.promote_types(widest, torch.float32)
    if value.dtype in _HALF_DTYPES and compute == torch.float32:
        return value.dtype, torch.float32
    return compute, compute


def kernel_usable(value: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> bool:
    """Whether :func:`ms_deform_attn` should run the compiled kernel for these inputs.

    Builds the extension for the device type on first use in eager mode. While ``torch.compile`` /
    ``torch.export`` trace, nothing is built: the op goes into the graph unless a build already failed in
    this process (the op would fall back to the reference itself anyway).
    """
    device_type = value.device.type
    if _loader.kernels_disabled():
        return False
    if not (value.is_floating_point() and sampling_locations.is_floating_point() and attention_weights.is_floating_point()):
        return False
    if kernel_dtypes(value, sampling_locations, attention_weights)[0] not in SUPPORTED_DTYPES.get(device_type, ()):
        return False
    if torch.compiler.is_compiling():
        return _loader.build_state(device_type) is not False
    return _loader.load_extension(device_type) is not None


def ms_deform_attn(
    value: Tensor,
    spatial_shapes,
    level_start_index,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention through the custom op (``[B, Q, H * D]``).

    ``spatial_shapes`` / ``level_start_index`` may be tensors on any device or sequences (moved to
    ``value``'s device as int64); ``level_start_index=None`` is derived from the shapes. The result has
    ``value``'s dtype; it is computed in the widest dtype of the three floating inputs, on CPU at least in
    float32 (see :func:`kernel_dtypes`), so a bfloat16 model gets float32 sums rounded once.
    """
    device = value.device
    spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=device)
    if level_start_index is None:
        sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
        level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    level_start_index = torch.as_tensor(level_start_index, dtype=torch.long, device=device)
    output_dtype = value.dtype
    value_dtype, geometry_dtype = kernel_dtypes(value, sampling_locations, attention_weights)
    output = torch.ops.hf_dino.ms_deform_attn(
        value.to(value_dtype), spatial_shapes, level_start_index,
        sampling_locations.to(geometry_dtype), attention_weights.to(geometry_dtype),
    )
    return output.to(output_dtype)


def bfloat16_attention_usable(query: Tensor) -> bool:
    """Whether :func:`bfloat16_attention` runs for ``query``: a bfloat16 CPU tensor, the custom kernels not
    disabled, the CPU extension built (on first use) and the CPU with AVX-512 BF16."""
    if query.device.type != "cpu" or query.dtype != torch.bfloat16:
        return False
    extension = _extension_for(query)
    return extension is not None and extension.attention_supported()


def bfloat16_attention(query: Tensor, key: Tensor, value: Tensor, num_heads: int) -> Tensor:
    """Softmax attention with heads of 32 channels, no mask, scale ``1 / sqrt(32)``: query ``[B, L, H * 32]``, key and
    value ``[B, S, H * 32]`` bfloat16 (any row strides, e.g. column slices of one projection; channels contiguous)
    -> ``[B, L, H * 32]`` bfloat16, heads side by side as ``nn.MultiheadAttention`` concatenates them.

    The arithmetic of ``F.scaled_dot_product_attention`` on bfloat16 CPU tensors (float32 scores and softmax,
    bfloat16 probabilities times the values summed in float32), in the CPU extension's AVX-512 BF16 loops: DINO's
    decoder self-attention (900 queries, 8 heads) takes ~half the time of aten's flash attention there. Inference
    only (no autograd); check :func:`bfloat16_attention_usable` first.
    """
    return _loader.load_extension("cpu").attention(query, key, value, num_heads)


def residual_layer_norm_usable(residual: Tensor, update: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """Whether :func:`residual_layer_norm` runs for these tensors: CPU, ``residual`` float32 or bfloat16 with a last
    dimension that is a multiple of 16, ``update`` of its shape in its dtype or bfloat16, ``weight`` and ``bias`` of
    that size and of one dtype, the residual's or float32, the custom kernels not disabled, the CPU extension built
    (on first use) and the CPU with AVX-512."""
    dim = residual.shape[-1] if residual.dim() else 0
    if (any(t.device.type != "cpu" for t in (residual, update, weight, bias)) or not dim or dim % 16
            or residual.dtype not in (torch.float32, torch.bfloat16) or update.shape != residual.shape
            or update.dtype not in (residual.dtype, torch.bfloat16) or weight.shape != (dim,) or bias.shape != (dim,)
            or weight.dtype not in (residual.dtype, torch.float32) or bias.dtype != weight.dtype):
        return False
    extension = _extension_for(residual)
    return extension is not None and extension.layer_norm_supported()


def residual_layer_norm(residual: Tensor, update: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.layer_norm(residual + update, (D,), weight, bias, eps)`` in one pass over the rows: residual ``[..., D]``
    float32 or bfloat16 (D a multiple of 16), update of its shape in its dtype or bfloat16 (a float32 residual plus
    a bfloat16 update is float32, as the add promotes it), weight and bias ``[D]`` in the residual's dtype or float32
    (as CPU autocast leaves them next to bfloat16 activations) -> a new tensor like ``residual``.

    The sum is rounded to the residual's dtype as the add rounds it, then normalised in float32 (mean and variance
    by the corrected two-pass algorithm over the row in cache) and rounded once: within a few float32 ulps of aten's
    LayerNorm, which sums in another order, and as close to float64 or closer. The sum is never written to memory:
    in DINO's encoder on Zen 5 ~0.5x the time of aten's add and LayerNorm in float32, ~0.65x in bfloat16 (aten's
    bfloat16 LayerNorm is slower than its float32 one there). Inference only (no autograd); check
    :func:`residual_layer_norm_usable` first.
    """
    return _loader.load_extension("cpu").residual_layer_norm(residual, update, weight, bias, eps)


def ms_deform_attn_from_offsets_usable(value: Tensor, sampling_offsets: Tensor, attention_logits: Tensor) -> bool:
    """Whether :func:`ms_deform_attn_from_offsets` runs for these tensors: CPU, value, offsets and logits of one dtype
    (float32, bfloat16 or float16), the custom kernels not disabled and the CPU extension built (on first use)."""
    if (value.device.type != "cpu" or value.dtype == torch.float64 or sampling_offsets.dtype != value.dtype
            or attention_logits.dtype != value.dtype):
        return False
    return _extension_for(value) is not None


def ms_deform_attn_from_offsets(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    reference_points: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
) -> Tensor:
    """:func:`ms_deform_attn` with the sampling locations ``reference_points[:, :, None, :, None] + sampling_offsets /
    (w_l, h_l)`` and the attention weights ``attention_logits.softmax`` over each (query, head)'s levels x points
    computed inside the CPU kernel, block by block, in float32: the locations as the model computes them (the offsets
    widened, divided, then added: the same bits), the softmax as aten's (max subtracted, float32 exp, times the
    reciprocal of the sum; within a few float32 ulps of it). No ``[B, Q, H, L, P, 2]`` locations and ``[B, Q, H, L,
    P]`` weights tensors are written to memory and read back (30 MB per encoder layer of an 800x1201 image).

    value ``[B, S, H, D]``; reference_points ``[B, Q, L, 2]`` float32 (x, y); sampling_offsets ``[B, Q, H, L, P, 2]``
    in value's dtype, in pixels of each level; attention_logits ``[B, Q, H, L, P]`` in value's dtype. Returns ``[B,
    Q, H * D]`` in value's dtype. Inference only (no autograd); check :func:`ms_deform_attn_from_offsets_usable`
    first.
    """
    device = value.device
    spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=device)
    level_start_index = torch.as_tensor(level_start_index, dtype=torch.long, device=device)
    return _loader.load_extension("cpu").forward_from_offsets(
        value, spatial_shapes, level_start_index, reference_points.float(), sampling_offsets, attention_logits
    )
