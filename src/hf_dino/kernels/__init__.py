"""Compiled multi-scale deformable attention kernels (CPU C++ and CUDA) for hf_dino.

Importing this package registers the ``torch.library`` ops ``hf_dino::ms_deform_attn`` /
``hf_dino::ms_deform_attn_backward`` and compiles nothing. The C++/CUDA sources (``csrc/`` in an installed
package, ``kernels/`` in the repository) are compiled with ``torch.utils.cpp_extension.load`` the first time
the op runs on a device type, into a cache keyed by source hash, torch version and device kind, under a file
lock. Pre-build them (Docker images, clusters) with ``python -m hf_dino.kernels build``. The CPU extension also
carries, for inference, :func:`ms_deform_attn_from_offsets` (the forward computing the sampling locations from
reference points and offsets, and the attention weights' softmax from their logits, itself) and
:func:`bfloat16_attention`, the softmax attention the decoder's self-attention uses in bfloat16 on CPUs with AVX-512
BF16, and :func:`residual_layer_norm`, the post-norm layers' residual add and LayerNorm in one pass on CPUs with
AVX-512 (each with its ``..._usable`` check).

Switches: ``HF_DINO_DISABLE_CUSTOM_KERNELS=1`` and ``DinoConfig(disable_custom_kernels=True)`` select the
pure-PyTorch implementation; ``HF_DINO_KERNELS_CACHE`` moves the build cache; ``HF_DINO_KERNELS_VERBOSE=1``
shows the compiler output.
"""

from ._loader import (
    ENV_CACHE,
    ENV_DISABLE,
    KernelBuildError,
    build,
    build_directory,
    build_error,
    build_state,
    cache_root,
    kernels_disabled,
    load_extension,
    source_dir,
)
from ._ops import (
    SUPPORTED_DTYPES,
    bfloat16_attention,
    bfloat16_attention_usable,
    kernel_usable,
    ms_deform_attn,
    ms_deform_attn_from_offsets,
    ms_deform_attn_from_offsets_usable,
    residual_layer_norm,
    residual_layer_norm_usable,
)

__all__ = [
    "ENV_CACHE",
    "ENV_DISABLE",
    "KernelBuildError",
    "SUPPORTED_DTYPES",
    "bfloat16_attention",
    "bfloat16_attention_usable",
    "build",
    "build_directory",
    "build_error",
    "build_state",
    "cache_root",
    "kernel_usable",
    "kernels_disabled",
    "load_extension",
    "ms_deform_attn",
    "ms_deform_attn_from_offsets",
    "ms_deform_attn_from_offsets_usable",
    "residual_layer_norm",
    "residual_layer_norm_usable",
    "source_dir",
]
