"""Multi-scale deformable attention: the sampling-and-weighting core of DINO's encoder and decoder.

The model calls :func:`multi_scale_deformable_attention`. It dispatches to the compiled kernel
(``hf_dino.kernels``) when that is available for the inputs' device, and otherwise runs
:func:`multi_scale_deformable_attention_pytorch`, the pure-PyTorch reference (bilinear ``grid_sample``,
zeros padding, ``align_corners=False``), which is the definition the kernel is tested against. (At inference on the
CPU the encoder hands the kernel its reference points, sampling offsets and attention logits instead,
``ms_deform_attn_from_offsets``, which computes the same locations and the softmax weights itself.)
"""

from __future__ import annotations

import importlib
from typing import Sequence

import torch
import torch.nn.functional as F


def _import_kernels():
    """``hf_dino.kernels`` if it can be imported, else None (pure-PyTorch path).

    Imported by name at run time rather than with an import statement, so that this file also works where it
    travels alone (Hub ``trust_remote_code``: there the sibling package is missing, and an installed
    ``hf_dino`` is used when present). Importing the package only registers the custom op; nothing is
    compiled before the op first runs.
    """
    candidates = [f"{__package__}.kernels"] if __package__ else []
    candidates.append("hf_dino.kernels")
    for name in candidates:
        try:
            return importlib.import_module(name)
        except Exception:  # missing sources / package, or an unusable torch.library: fall back
            continue
    return None


_kernels = _import_kernels()


def compiled_kernels():
    """The ``hf_dino.kernels`` package (compiled kernels, built on first use), or None where it cannot be imported."""
    return _kernels


def multi_scale_deformable_attention_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure-PyTorch multi-scale deformable attention.

    Args:
        value: ``[batch, num_tokens, num_heads, head_dim]``, the flattened feature maps of all levels,
            level after level (``num_tokens = sum(h_l * w_l)``).
        spatial_shapes: ``[num_levels, 2]`` the ``(height, width)`` of every level.
        sampling_locations: ``[batch, num_queries, num_heads, num_levels, num_points, 2]``, normalised
            ``(x, y)`` in ``[0, 1]`` of the level (values outside sample zeros).
        attention_weights: ``[batch, num_queries, num_heads, num_levels, num_points]``.

    Returns:
        ``[batch, num_queries, num_heads * head_dim]`` in ``value``'s dtype, computed in the widest dtype of
        the inputs and at least in float32 (a bfloat16 / float16 value is widened first, as in the kernel).
    """
    output_dtype = value.dtype
    dtype = torch.promote_types(
        torch.promote_types(value.dtype, sampling_locations.dtype),
        torch.promote_types(attention_weights.dtype, torch.float32),
    )
    value, sampling_locations, attention_weights = (t.to(dtype) for t in (value, sampling_locations, attention_weights))
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shape_list = spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes
    shapes = [(h, w) for h, w in shape_list]
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants coordinates in [-1, 1]
    sampling_grids = 2 * sampling_locations - 1
    # [batch * heads, 1, queries, levels, points]
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels, num_points)
    output = None
    for level, (height, width) in enumerate(shapes):
        # [batch * heads, head_dim, h, w]
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * num_heads, head_dim, height, width)
        # [batch * heads, queries, points, 2]
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # [batch * heads, head_dim, queries, points]
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        # weighted sum over the level's points, accumulated level by level: the same sum as over all levels x points
        # at once, without materialising the samples of every level together ([batch * heads, head_dim, queries,
        # levels * points], 0.3 GB per encoder layer for one 800x1201 image; a Concat in the ONNX graph)
        weighted = (sampled * weights[:, :, :, level]).sum(-1)
        output = weighted if output is None else output.add_(weighted)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous().to(output_dtype)


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    use_custom_kernel: bool = True,
    spatial_shapes_list: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention, through the compiled kernel when possible.

    Same arguments and result as :func:`multi_scale_deformable_attention_pytorch`, plus
    ``level_start_index`` (``[num_levels]``, offset of every level in ``value``) that the kernel needs,
    ``use_custom_kernel`` (``False`` forces the pure-PyTorch path, e.g. ``config.disable_custom_kernels``) and
    ``spatial_shapes_list``, the sizes of ``spatial_shapes`` as Python ints (or symbolic sizes), which the
    pure-PyTorch path then uses instead of reading the tensor back (a device sync on GPU).

    The kernel (custom op ``hf_dino::ms_deform_attn``) runs when ``use_custom_kernel`` is true, the environment
    variable ``HF_DINO_DISABLE_CUSTOM_KERNELS`` is not ``1``, the device type is CPU or CUDA (float32 / float64 /
    float16 / bfloat16), and its extension could be built; otherwise the pure-PyTorch path. Both paths
    return ``value``'s dtype and sum in at least float32 on CPU. (``torch.export`` records the custom op;
    ``hf_dino.export`` switches the attention modules to the pure-PyTorch path for ONNX, whose ``GridSample``
    is a standard operator.)
    """
    kernels = _kernels
    if use_custom_kernel and kernels is not None:
        if kernels.kernel_usable(value, sampling_locations, attention_weights):
            return kernels.ms_deform_attn(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights
            )
    shapes = spatial_shapes if spatial_shapes_list is None else spatial_shapes_list
    return multi_scale_deformable_attention_pytorch(value, shapes, sampling_locations, attention_weights)
