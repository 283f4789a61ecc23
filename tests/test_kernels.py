"""The compiled multi-scale deformable attention kernels (hf_dino.kernels) against the pure-PyTorch reference.

Every numerical check recomputes the reference (`multi_scale_deformable_attention_pytorch`, i.e. grid_sample)
in float64 on the same inputs, and compares forward output and the gradients of value, sampling locations and
attention weights. The first test that needs the CPU extension compiles it once into the user cache (about a
minute on 2 cores); later runs load it. Tests marked `slow` compile from scratch (wheel install, CUDA sources).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import hf_dino.deformable_attention as da
import hf_dino.kernels as K
from conftest import REPO, tiny_model
from hf_dino.kernels import _loader

SRC = Path(da.__file__).resolve().parents[1]  # the directory holding the hf_dino package

LEVEL_SETS = {
    "odd": [(7, 5), (3, 4), (1, 1), (2, 9)],
    "lines": [(1, 7), (6, 1), (5, 3)],
    "square": [(8, 8), (4, 4)],
}


def _subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env.pop(_loader.ENV_DISABLE, None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cpu_extension():
    """The CPU extension (built on first use); skip with the reason where it cannot be built."""
    try:
        _loader.check_toolchain("cpu")
    except _loader.KernelBuildError as error:
        pytest.skip(f"cannot build the CPU kernel here: {error}")
    if _loader.kernels_disabled():
        pytest.skip(f"{_loader.ENV_DISABLE} is set")
    return _loader.build("cpu")


@pytest.fixture
def simd_variants(cpu_extension):
    """Run a test with every vectorised copy of the CPU loops this machine supports, and with both backward
    decompositions (single pass over batch x head; split into sampling gradients + channel blocks of
    grad_value, used automatically when there are more threads than batch x head)."""
    original = cpu_extension.simd()
    simds = ["baseline"] + [simd for simd in ("avx2", "avx512") if cpu_extension.set_simd(simd)]

    def each():
        for simd in simds:
            for mode in ("single", "split"):
                assert cpu_extension.set_simd(simd) and cpu_extension.set_backward_mode(mode)
                yield simd, mode

    yield each
    cpu_extension.set_simd(original)
    cpu_extension.set_backward_mode("auto")


def make_inputs(levels, batch=2, queries=11, heads=3, head_dim=8, points=3, dtype=torch.float64, spread=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), heads, head_dim, generator=generator, dtype=torch.float64)
    # locations in [-spread, 1 + spread]: some points fall outside the level, some partly
    locations = torch.rand(batch, queries, heads, len(levels), points, 2, generator=generator, dtype=torch.float64)
    locations = locations * (1 + 2 * spread) - spread
    weights = torch.rand(batch, queries, heads, len(levels), points, generator=generator, dtype=torch.float64)
    return value.to(dtype), shapes, starts, locations.to(dtype), weights.to(dtype)


def reference64(value, shapes, locations, weights, grad_output):
    """Output and gradients of the pure-PyTorch reference, recomputed in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (value, locations, weights)]
    output = da.multi_scale_deformable_attention_pytorch(leaves[0], shapes, leaves[1], leaves[2])
    grads = torch.autograd.grad(output, leaves, grad_output.double())
    return output.detach(), grads


def kernel_with_grads(value, shapes, starts, locations, weights, grad_output):
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    output = K.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
    assert "hf_dino" in type(output.grad_fn).__name__  # the custom op ran, not a fallback
    grads = torch.autograd.grad(output, leaves, grad_output)
    return output.detach(), grads


def assert_close_to_reference(value, shapes, starts, locations, weights, seed=1):
    output_shape = (value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
    grad_output = torch.randn(output_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref_out, ref_grads = reference64(value, shapes, locations, weights, grad_output)
    out, grads = kernel_with_grads(value, shapes, starts, locations, weights, grad_output.to(value.dtype))
    tol = dict(rtol=1e-10, atol=1e-10) if value.dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    assert out.dtype == value.dtype and out.shape == output_shape
    torch.testing.assert_close(out.double(), ref_out, **tol)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        # location gradients scale with the level size (d/dx = W * ...): compare relative to their magnitude
        scale = max(1.0, want.abs().max().item()) if name == "sampling_locations" else 1.0
        torch.testing.assert_close(got.double() / scale, want / scale, **tol, msg=lambda m: f"grad {name}: {m}")


# --------------------------------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", list(LEVEL_SETS.values()), ids=list(LEVEL_SETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("head_dim", [32, 8, 5], ids=["D32", "D8", "D5"])
def test_forward_and_gradients_match_float64_reference(simd_variants, levels, dtype, head_dim):
    inputs = make_inputs(levels, head_dim=head_dim, dtype=dtype, seed=head_dim)
    for _ in simd_variants():
        assert_close_to_reference(*inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_more_than_64_points_per_query_match_float64_reference(simd_variants, dtype):
    """Above 64 levels x points per query and head (here 4 x 17) the forward sets up each point's corners on its
    own instead of all of them ahead (the other tests' path)."""
    inputs = make_inputs(LEVEL_SETS["odd"], points=17, head_dim=32, dtype=dtype, seed=9)
    for _ in simd_variants():
        assert_close_to_reference(*inputs)


@pytest.mark.parametrize("levels_points", [(1, 1), (1, 7), (4, 2), (3, 3), (4, 4), (5, 4), (3, 11), (4, 16)],
                         ids=lambda lp: f"{lp[0]}x{lp[1]}")
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_vectorised_set_up_is_the_scalar_one(cpu_extension, levels_points, value_dtype):
    """The AVX-512 copy sets up float32 corners 16 sampling points at a time in vector registers (the last step
    partial); it gives the scalar set-up's results bit for bit (the AVX2 copy's forward), for 1 to 64 levels x points
    per query and head, points outside, on the borders and NaN."""
    levels, points = levels_points
    sizes = [(7, 5), (3, 4), (1, 1), (2, 9), (6, 1)][:levels]
    value, shapes, starts, locations, weights = make_inputs(sizes, points=points, heads=4, head_dim=32,
                                                            dtype=torch.float32, seed=levels * 100 + points)
    locations[0, :, 0, 0, 0] = torch.tensor([0.0, 1.0])  # on the borders
    locations[0, :, 1, -1, -1] = torch.tensor([1.0, 0.0])
    locations[1, :, 2, 0, 0, 1] = float("nan")
    value = value.to(value_dtype)
    original = cpu_extension.simd()
    if not cpu_extension.set_simd("avx512"):
        pytest.skip("this CPU has no AVX-512: the vectorised set-up is not used here")
    try:
        vectorised = cpu_extension.forward(value, shapes, starts, locations, weights)
        assert cpu_extension.set_simd("avx2")
        scalar = cpu_extension.forward(value, shapes, starts, locations, weights)
    finally:
        cpu_extension.set_simd(original)
    torch.testing.assert_close(vectorised, scalar, rtol=0, atol=0)
    assert vectorised.abs().sum() > 0


def test_dino_encoder_shapes_match_reference(simd_variants):
    """Realistic sizes (a small image's 4-level pyramid, 8 heads x 32, 4 points), float32."""
    inputs = make_inputs([(20, 30), (10, 15), (5, 8), (3, 4)], batch=2, queries=300, heads=8, head_dim=32,
                         points=4, dtype=torch.float32, spread=0.05)
    for _ in simd_variants():
        assert_close_to_reference(*inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("queries", [2, 60], ids=["few-queries", "many-queries"])
def test_backward_writes_every_grad_value_row(simd_variants, dtype, queries):
    """The single-pass backward sums each (batch, head)'s grad_value rows in a scratch block and writes all of them
    out (grad_value is not zero-filled first), and gathers the value rows into a block first when the queries sample
    them several times each (queries x levels x points >= 2 x tokens: the many-queries case here, not the few).
    All points lie in the left half of each level: the right half's gradient must be exactly zero, the rest agree
    with the float64 reference."""
    levels = [(6, 10), (3, 5)]
    value, shapes, starts, locations, weights = make_inputs(levels, batch=2, queries=queries, heads=4, head_dim=8,
                                                            points=4, dtype=torch.float64, seed=queries)
    tokens, samples = value.shape[1], queries * len(levels) * 4
    assert (samples >= 2 * tokens) == (queries == 60)
    locations[..., 0] = locations[..., 0].clamp(0, 1) * 0.3  # x < 0.3: pixel x*W - 0.5 < 0.3*W - 0.5, corners < W/2
    value = value.to(dtype)
    if dtype == torch.bfloat16:
        locations, weights = locations.float(), weights.float()
    else:
        locations, weights = locations.to(dtype), weights.to(dtype)
    grad_output = torch.randn(2, queries, 4 * 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, ref_grads = reference64(value, shapes, locations, weights, grad_output.to(value.dtype).double())
    right_half = torch.cat([
        (torch.arange(h * w) % w >= w // 2) for h, w in levels
    ])
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: torch.finfo(torch.bfloat16).eps}[dtype]
    for _ in simd_variants():
        for _ in range(2):  # twice: a second call must not see the first one's sums in reused memory
            _, grads = kernel_with_grads(value, shapes, starts, locations, weights, grad_output.to(value.dtype))
            assert torch.count_nonzero(grads[0][:, right_half]) == 0
            assert torch.count_nonzero(grads[0][:, ~right_half]) > 0
            scale = ref_grads[0].abs().max().item()
            torch.testing.assert_close(grads[0].double() / scale, ref_grads[0] / scale, rtol=tol, atol=tol)


def test_default_loops_are_the_widest_the_cpu_supports(cpu_extension):
    """A fresh process runs the widest copy of the loops that the CPU's flags (as /proc/cpuinfo lists them) allow:
    AVX-512 F/BW/VL/DQ, else AVX2 + FMA, else the baseline; `set_simd` refuses a copy the CPU lacks or an unknown name."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or not any(line.startswith("flags") for line in cpuinfo.read_text().splitlines()):
        pytest.skip("needs an x86 Linux /proc/cpuinfo")
    compiler = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True).stdout
    if "clang" in compiler.lower():
        pytest.skip("the AVX2 / AVX-512 copies are built with GCC's target pragmas only")
    line = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    flags = set(line.split(":", 1)[1].split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"} <= flags:
        expected = "avx512"
    elif {"avx2", "fma"} <= flags:
        expected = "avx2"
    else:
        expected = "baseline"
    code = "from hf_dino.kernels import _loader; print(_loader.build('cpu').simd())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == expected
    original = cpu_extension.simd()
    try:
        assert not cpu_extension.set_simd("avx1024")
        if expected != "avx512":
            assert not cpu_extension.set_simd("avx512")
    finally:
        cpu_extension.set_simd(original)


def test_gradcheck_float64(cpu_extension):
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], batch=1, queries=3, heads=2,
                                                            head_dim=3, points=2, seed=3)
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: K.ms_deform_attn(v, shapes, starts, loc, w), leaves, eps=1e-6, atol=1e-5, rtol=1e-4
    )


def test_opcheck_fake_and_autograd_registration(cpu_extension):
    for dtype in (torch.float32, torch.float64):
        value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], queries=4, dtype=dtype)
        args = (value.requires_grad_(), shapes, starts, locations.requires_grad_(), weights.requires_grad_())
        torch.library.opcheck(torch.ops.hf_dino.ms_deform_attn.default, args)
    # non-contiguous inputs: the fake implementations must describe the real outputs' strides
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], queries=4, dtype=torch.float32)
    value = value.transpose(0, 2).contiguous().transpose(0, 2)
    grad_output = torch.randn(2, 4, value.shape[2] * value.shape[3]).transpose(0, 1).contiguous().transpose(0, 1)
    torch.library.opcheck(torch.ops.hf_dino.ms_deform_attn.default, (value, shapes, starts, locations, weights))
    torch.library.opcheck(torch.ops.hf_dino.ms_deform_attn_backward.default,
                          (value, shapes, starts, locations, weights, grad_output))


# --------------------------------------------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------------------------------------------
def test_points_far_outside_and_on_the_border(cpu_extension):
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], seed=5)
    locations = locations.clone()
    locations[:, 0] = 7.5  # all points of query 0 far outside: zero output and zero gradients
    locations[:, 1] = -3.0
    locations[:, 2, :, :, :, 0] = 0.0  # exactly on the left border of every level
    locations[:, 3, :, :, :, 1] = 1.0  # exactly on the bottom border
    assert_close_to_reference(value, shapes, starts, locations, weights)
    out = K.ms_deform_attn(value, shapes, starts, locations, weights)
    assert out[:, :2].abs().max() == 0


@pytest.mark.parametrize("points", [3, 17], ids=["set-up-ahead", "per-point"])
def test_nan_locations_sample_nothing(simd_variants, points):
    """A NaN sampling location contributes nothing (as a point outside every level), whether the forward sets up
    the corners of all levels x points ahead (up to 64 per query and head) or point by point (17 x 4 = 68)."""
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], points=points, dtype=torch.float32,
                                                            seed=8)
    nan_locations, outside = locations.clone(), locations.clone()
    nan_locations[:, :, :, 1, 0, 0] = float("nan")  # x of one point per (query, head)
    nan_locations[:, :, :, 2, :, 1] = float("nan")  # y of a whole level
    outside[:, :, :, 1, 0, 0] = 5.0
    outside[:, :, :, 2, :, 1] = 5.0
    for _ in simd_variants():
        torch.testing.assert_close(K.ms_deform_attn(value, shapes, starts, nan_locations, weights),
                                   K.ms_deform_attn(value, shapes, starts, outside, weights), rtol=0, atol=0)


def test_levels_of_size_one(cpu_extension):
    assert_close_to_reference(*make_inputs([(1, 1), (1, 1), (1, 2)], seed=6))


def test_empty_batch_and_no_queries(cpu_extension):
    for batch, queries in ((0, 5), (2, 0)):
        value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], batch=batch, queries=queries)
        leaves = [t.requires_grad_() for t in (value, locations, weights)]
        out = K.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
        assert out.shape == (batch, queries, value.shape[2] * value.shape[3])
        grads = torch.autograd.grad(out.sum(), leaves)
        ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
        ref = da.multi_scale_deformable_attention_pytorch(ref_leaves[0], shapes, ref_leaves[1], ref_leaves[2])
        ref_grads = torch.autograd.grad(ref.sum(), ref_leaves)
        assert out.shape == ref.shape
        for grad, ref_grad, leaf in zip(grads, ref_grads, leaves):
            assert grad.shape == leaf.shape and (grad.numel() == 0 or grad.abs().max() == 0)
            torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["float32", "float64", "bfloat16"])
def test_no_sampling_points_sample_nothing(simd_variants, dtype):
    """Zero points per level: every query samples nothing (zero output and value gradient, empty location and weight
    gradients), in every vectorised copy; not a division by the number of points."""
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], points=0, head_dim=32, seed=21)
    value = value.to(dtype)
    if dtype == torch.bfloat16:
        locations, weights = locations.float(), weights.float()
    else:
        locations, weights = locations.to(dtype), weights.to(dtype)
    for _ in simd_variants():
        leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
        out = K.ms_deform_attn(*[leaves[0], shapes, starts, leaves[1], leaves[2]])
        assert out.shape == (value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
        assert out.abs().max() == 0
        grads = torch.autograd.grad(out.float().sum(), leaves)
        assert grads[0].abs().max() == 0 and grads[1].numel() == 0 and grads[2].numel() == 0


def test_levels_that_do_not_tile_value_are_refused(cpu_extension):
    """The loops read `value` rows by `level_start_index` and each level's (H, W): shapes that need more tokens than
    `value` has read past its end (a value stored just after a 46-token view came back as the output), and a wrong
    `level_start_index` read the wrong rows. Both are refused now, forward and backward (the pure-PyTorch path
    raises on the sizes too)."""
    value, shapes, starts, locations, weights = make_inputs([(4, 5), (3, 3), (2, 3), (2, 2)], dtype=torch.float32)
    assert value.shape[1] == 39
    with pytest.raises(RuntimeError, match=r"give 39 tokens, but value has 38"):
        K.ms_deform_attn(value[:, :38], shapes, starts, locations, weights)
    with pytest.raises(RuntimeError, match=r"level_start_index must be the running sum .*\(29 for level 2\)"):
        K.ms_deform_attn(value, shapes, torch.tensor([0, 20, 30, 35]), locations, weights)
    with pytest.raises(RuntimeError, match=r"spatial_shapes must be non-negative"):
        K.ms_deform_attn(value, torch.tensor([[4, 5], [3, 3], [2, 3], [-2, -2]]), starts, locations, weights)
    grad = torch.ones(*locations.shape[:2], value.shape[2] * value.shape[3])
    with pytest.raises(RuntimeError, match=r"give 39 tokens, but value has 38"):
        torch.ops.hf_dino.ms_deform_attn_backward(value[:, :38], shapes, starts, locations, weights, grad)
    with pytest.raises(RuntimeError):
        da.multi_scale_deformable_attention_pytorch(value[:, :38], shapes, locations, weights)


def test_non_contiguous_inputs(cpu_extension):
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], dtype=torch.float32, seed=7)
    # same values, non-contiguous memory: transposed storage and a strided slice
    value_nc = value.transpose(0, 2).contiguous().transpose(0, 2)
    locations_nc = torch.stack([locations, locations], -1)[..., 0]
    weights_nc = weights.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (value_nc.is_contiguous() or locations_nc.is_contiguous() or weights_nc.is_contiguous())
    assert_close_to_reference(value_nc, shapes, starts, locations_nc, weights_nc)
    torch.testing.assert_close(
        K.ms_deform_attn(value_nc, shapes, starts, locations_nc, weights_nc),
        K.ms_deform_attn(value, shapes, starts, locations, weights),
        rtol=0, atol=0,
    )


def test_padding_mask_zeroes_padded_tokens(cpu_extension):
    """The model zeroes padded value tokens (masked_fill) before sampling: results and gradients still agree."""
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["square"], dtype=torch.float32, seed=8)
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[1, 40:64] = True  # bottom rows of the first level of batch element 1 are padding
    mask[1, 64 + 10 :] = True
    value = value.masked_fill(mask[..., None, None], 0.0)
    assert_close_to_reference(value, shapes, starts, locations, weights)


def test_mixed_dtypes_compute_in_the_widest(cpu_extension):
    """Under autocast the value can be bfloat16 while locations / weights are float32: the kernel reads the bfloat16
    value, sums in float32 and returns the value's dtype (the float32 result rounded once)."""
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], dtype=torch.float32, seed=10)
    value16 = value.bfloat16()
    assert K.kernel_usable(value16, locations, weights)
    out = da.multi_scale_deformable_attention(value16.requires_grad_(), shapes, starts, locations, weights)
    assert out.dtype == torch.bfloat16 and _ran_kernel(out)
    torch.testing.assert_close(out, K.ms_deform_attn(value16.float(), shapes, starts, locations, weights).bfloat16(),
                               rtol=0, atol=0)
    out.float().sum().backward()
    assert value16.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("geometry", ["float32", "same"])
@pytest.mark.parametrize("head_dim", [32, 5], ids=["D32", "D5"])
def test_half_precision_matches_float64_reference(simd_variants, dtype, geometry, head_dim):
    """A 16-bit value (with float32 or 16-bit locations / weights) runs in the kernel, summed in float32: forward
    and gradients agree with the float64 reference on the same (rounded) inputs to the 16-bit resolution."""
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], head_dim=head_dim, seed=13)
    value = value.to(dtype)
    if geometry == "same":
        locations, weights = locations.to(dtype), weights.to(dtype)
    else:
        locations, weights = locations.float(), weights.float()
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * head_dim,
                              generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    ref_out, ref_grads = reference64(value, shapes, locations, weights, grad_output.to(dtype).double())
    resolution = torch.finfo(dtype).eps  # relative: 2^-7 (bfloat16), 2^-10 (float16)
    for _ in simd_variants():
        out, grads = kernel_with_grads(value, shapes, starts, locations, weights, grad_output.to(dtype))
        assert out.dtype == dtype and [g.dtype for g in grads] == [value.dtype, locations.dtype, weights.dtype]
        # float32 sums rounded once: within one 16-bit rounding of the exact result
        torch.testing.assert_close(out.double(), ref_out, rtol=resolution, atol=resolution)
        for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
            scale = max(1.0, want.abs().max().item())
            # 16-bit outputs are one rounding away; float32 ones only carry float32 sums of the rounded inputs
            tol = resolution if got.dtype == dtype else 1e-4
            torch.testing.assert_close(got.double() / scale, want / scale, rtol=tol, atol=tol,
                                       msg=lambda m: f"grad {name}: {m}")


def test_half_precision_forward_is_the_float32_result_rounded(cpu_extension):
    """Realistic encoder sizes: the bfloat16 kernel equals the float32 kernel on the widened value, rounded once
    (it accumulates in float32, it does not sum in bfloat16), and the pure-PyTorch path agrees."""
    value, shapes, starts, locations, weights = make_inputs([(20, 30), (10, 15), (5, 8), (3, 4)], batch=1, queries=200,
                                                            heads=8, head_dim=32, points=4, dtype=torch.float32,
                                                            spread=0.05, seed=15)
    value16 = value.bfloat16()
    out = K.ms_deform_attn(value16, shapes, starts, locations, weights)
    wide = K.ms_deform_attn(value16.float(), shapes, starts, locations, weights)
    torch.testing.assert_close(out, wide.bfloat16(), rtol=0, atol=0)
    pytorch = da.multi_scale_deformable_attention_pytorch(value16, shapes, locations, weights)
    assert pytorch.dtype == torch.bfloat16
    torch.testing.assert_close(pytorch.float(), wide, rtol=2 ** -8, atol=1e-5)


def test_shapes_given_on_another_device_or_as_lists(cpu_extension):
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], seed=9)
    expected = K.ms_deform_attn(value, shapes, starts, locations, weights)
    torch.testing.assert_close(K.ms_deform_attn(value, shapes.tolist(), None, locations, weights), expected)
    torch.testing.assert_close(K.ms_deform_attn(value, shapes.int(), starts.int(), locations, weights), expected)


# --------------------------------------------------------------------------------------------------------------
# forward from sampling offsets (inference)
# --------------------------------------------------------------------------------------------------------------
def offsets_inputs(levels, dtype, points=3, heads=3, head_dim=8, seed=0):
    """value, shapes, starts, float32 reference points [B, Q, L, 2], offsets in pixels of each level (some points
    land outside, one is NaN) and attention logits (one (query, head) with logits up to +-200, far beyond exp's
    float32 range) in value's dtype."""
    value, shapes, starts, _, _ = make_inputs(levels, points=points, heads=heads, head_dim=head_dim,
                                              dtype=torch.float32, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    reference = torch.rand(value.shape[0], 11, len(levels), 2, generator=generator)
    offsets = torch.randn(value.shape[0], 11, heads, len(levels), points, 2, generator=generator) * 2
    offsets[1, 3, 0, 0, 0, 1] = float("nan")
    logits = torch.randn(value.shape[0], 11, heads, len(levels), points, generator=generator) * 2
    logits[0, 4, 1] *= 100
    return value.to(dtype), shapes, starts, reference, offsets.to(dtype), logits.to(dtype)


def model_locations(reference, offsets, shapes):
    """The locations as the model computes them without the kernel: offsets widened to float32, divided by the
    level's (w, h), reference added."""
    normalizer = shapes.flip(-1).float()[None, None, None, :, None, :]
    return offsets.float().div(normalizer).add(reference[:, :, None, :, None, :])


def model_weights(logits, dtype=torch.float32):
    """The attention weights as the model computes them without the kernel: softmax over levels x points."""
    return logits.to(dtype).flatten(3).softmax(-1).view(logits.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("levels,points,head_dim", [("odd", 4, 32), ("lines", 2, 8), ("square", 33, 5)])
def test_forward_from_offsets_is_the_forward_on_the_model_geometry(simd_variants, dtype, levels, points, head_dim):
    """The kernel computing the locations from reference points and offsets and the weights from attention logits
    (block by block, in float32) gives the forward on the locations and softmax weights the model computes, in every
    vectorised copy: the locations are the same bits (a NaN offset's point sampled as outside); the softmax is as
    close to float64 as aten's, so the output is as close to the float64 forward as the model's, and within float32
    (16-bit) rounding of it. Value dtypes; heads of 32 (bfloat16 sums in intrinsics); 4 levels x 4 points (DINO's:
    one vector of 16 logits), 3 x 2 and 2 x 33 (several vectors; more than 64 points per (query, head): the
    per-point path); logits far beyond exp's range (the maximum subtracted)."""
    value, shapes, starts, reference, offsets, logits = offsets_inputs(LEVEL_SETS[levels], dtype, points=points,
                                                                       head_dim=head_dim)
    locations = model_locations(reference, offsets, shapes)
    ext = _loader.build("cpu")
    exact = ext.forward(value.double(), shapes, starts, locations.double(), model_weights(logits, torch.float64))
    exact_scale = exact.abs().max()
    for _ in simd_variants():
        # equal logits: weights 1 / (levels x points) from both softmaxes, so the locations show bit for bit
        uniform = torch.zeros_like(logits)
        assert torch.equal(ext.forward_from_offsets(value, shapes, starts, reference, offsets, uniform),
                           ext.forward(value, shapes, starts, locations, model_weights(uniform)))
        got = ext.forward_from_offsets(value, shapes, starts, reference, offsets, logits)
        model = ext.forward(value, shapes, starts, locations, model_weights(logits))
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert (got.double() - exact).abs().max() <= 1.25 * (model.double() - exact).abs().max() + 1e-7 * exact_scale
            assert (got - model).abs().max() <= 1e-6 * exact_scale
        else:  # the float32 sums rounded to 16 bits: at most a rounding step apart
            step = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
            assert (got.double() - model.double()).abs().max() <= step * exact_scale
            assert (got.double() - exact).abs().max() <= (model.double() - exact).abs().max() + step * exact_scale
    assert got.float().abs().sum() > 0


@pytest.mark.parametrize("levels,points", [(4, 4), (3, 2), (2, 33)])
def test_forward_from_offsets_softmax_against_float64(simd_variants, levels, points):
    """The kernel's softmax weights themselves, read out through one-hot values: level l is one row of pixels,
    point k of (query, head) samples pixel k of its level at its centre (bilinear weight 1), and that pixel's value
    is the one-hot channel l * points + k, so output channel l * points + k is the weight. Against the float64
    softmax of the same logits, in every copy, for one vector of 16 logits (DINO's 4 x 4), a partial one and
    several: for logits of moderate size (std <= 3, where exp is accurate to about an ulp) every weight within 1.5x
    aten's float32 softmax's largest relative error; for logits up to +-100 within 1.5x its largest absolute error,
    weights below float32's normal range flushed to 0."""
    lp, batch, queries, heads = levels * points, 2, 40, 2
    width = 1 << (points - 1).bit_length()  # a power of two: the pixel centres (k + 0.5) / width are exact
    shapes = torch.tensor([(1, width)] * levels)
    starts = torch.arange(levels) * width
    value = torch.zeros(batch, levels, width, heads, lp)
    value[:, :, :points] = torch.eye(lp).view(levels, points, 1, lp)  # pixel k of level l -> channel l * P + k
    value = value.view(batch, levels * width, heads, lp)
    reference = torch.zeros(batch, queries, levels, 2)
    reference[..., 1] = 0.5  # (x, y) = (0, row centre)
    offsets = (torch.arange(points) + 0.5).view(1, 1, 1, 1, points, 1) * torch.tensor([1.0, 0.0])  # k + 0.5 pixels
    offsets = offsets.expand(batch, queries, heads, levels, points, 2).contiguous()
    generator = torch.Generator().manual_seed(3)
    scale = torch.logspace(-1, 1.5, queries, dtype=torch.float64)  # the logits' std per query
    logits = torch.randn(batch, queries, heads, lp, generator=generator, dtype=torch.float64)
    logits = (logits * scale[None, :, None, None]).float().double()  # float32 values: the same input for both
    exact = logits.softmax(-1)
    aten = logits.float().softmax(-1).double()
    moderate = scale <= 3
    ext = _loader.build("cpu")
    for _ in simd_variants():
        got = ext.forward_from_offsets(value, shapes, starts, reference, offsets, logits.float().view(
            batch, queries, heads, levels, points)).view(batch, queries, heads, lp).double()
        relative = ((got - exact) / exact)[:, moderate].abs().max()
        assert relative <= 1.5 * ((aten - exact) / exact)[:, moderate].abs().max()
        assert (got - exact).abs().max() <= 1.5 * (aten - exact).abs().max()
        assert (exact[got == 0] < torch.finfo(torch.float32).tiny).all()  # 0 only for weights below float32's normals


def test_forward_from_offsets_softmax_edge_cases(cpu_extension):
    """The softmax inside the kernel treats what exp cannot as aten's does: a NaN logit makes its (query, head)'s
    output NaN and nothing else; logits all equal and huge (1e30) give uniform weights; one logit far above the
    others takes all the weight."""
    value, shapes, starts, reference, offsets, logits = offsets_inputs(LEVEL_SETS["odd"], torch.float32)
    offsets = offsets.nan_to_num()
    logits[1, 2, 0, 1, 1] = float("nan")
    logits[0, 5, 2] = 1e30
    logits[1, 7, 1, 2, 0] = 1e4
    got = cpu_extension.forward_from_offsets(value, shapes, starts, reference, offsets, logits).view(2, 11, 3, 8)
    weights = model_weights(logits)
    assert torch.equal(weights[0, 5, 2], torch.full_like(weights[0, 5, 2], 1 / 12)) and weights[1, 7, 1, 2, 0] == 1
    model = cpu_extension.forward(value, shapes, starts, model_locations(reference, offsets, shapes),
                                  weights).view(2, 11, 3, 8)
    assert got[1, 2, 0].isnan().all() and got.isnan().sum() == 8 and model.isnan().sum() == 8
    torch.testing.assert_close(got.nan_to_num(), model.nan_to_num(), rtol=1e-6, atol=1e-6)


def test_forward_from_offsets_checks_its_inputs(cpu_extension):
    value, shapes, starts, reference, offsets, logits = offsets_inputs(LEVEL_SETS["odd"], torch.bfloat16)
    with pytest.raises(RuntimeError, match="value's dtype"):
        cpu_extension.forward_from_offsets(value, shapes, starts, reference, offsets.float(), logits)
    with pytest.raises(RuntimeError, match="value's dtype"):
        cpu_extension.forward_from_offsets(value, shapes, starts, reference, offsets, logits.float())
    with pytest.raises(RuntimeError, match="reference_points must be float32"):
        cpu_extension.forward_from_offsets(value, shapes, starts, reference.bfloat16(), offsets, logits)
    with pytest.raises(RuntimeError, match="reference_points must be float32"):
        cpu_extension.forward_from_offsets(value, shapes, starts, reference[:, :, :2], offsets, logits)
    with pytest.raises(RuntimeError, match="attention_logits must be"):
        cpu_extension.forward_from_offsets(value, shapes, starts, reference, offsets, logits[:, :, :, :, :2])
    with pytest.raises(RuntimeError, match="attention_logits must be"):
        cpu_extension.forward_from_offsets(value, shapes, starts, reference, offsets, logits.flatten(3))
    empty = cpu_extension.forward_from_offsets(value, shapes, starts, reference[:, :0], offsets[:, :0], logits[:, :0])
    assert empty.shape == (2, 0, 3 * 8)
    # non-contiguous inputs are read as their values
    strided = reference.transpose(0, 1).contiguous().transpose(0, 1)
    got = cpu_extension.forward_from_offsets(value, shapes, starts, strided, offsets, logits)
    want = cpu_extension.forward_from_offsets(value, shapes, starts, reference.contiguous(), offsets, logits)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------------------------
# bfloat16 softmax attention (the decoder's self-attention), AVX-512 BF16
# --------------------------------------------------------------------------------------------------------------
def kernel_where_supported(supported: bool, kernel, skip_reason: str):
    """`kernel` where this CPU runs it; the test skipped with `skip_reason` elsewhere."""
    if not supported:
        pytest.skip(skip_reason)
    return kernel


@pytest.fixture(scope="module")
def bfloat16_attention(cpu_extension):
    return kernel_where_supported(
        cpu_extension.attention_supported(), cpu_extension.attention,
        "this CPU has no AVX-512 BF16: the bfloat16 attention kernel does not run here (the decoder uses "
        "nn.MultiheadAttention)",
    )


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def attention64(query, key, value, heads):
    """Softmax attention in float64 of the (bfloat16) inputs, heads of 32 channels side by side."""
    q, k, v = (_heads(t.double(), heads) for t in (query, key, value))
    weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def aten_attention(query, key, value, heads):
    """aten's attention on the same bfloat16 tensors (flash attention on the CPU)."""
    q, k, v = (_heads(t, heads) for t in (query, key, value))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def attention_inputs(batch, queries, keys, heads, scale, seed=0):
    """bfloat16 query (a column slice: row stride width + 16), key and value (column slices of one projection, as
    the decoder passes them: row stride 2 x width)."""
    generator = torch.Generator().manual_seed(seed)
    width = 32 * heads
    query = (torch.randn(batch, queries, width + 16, generator=generator) * scale).bfloat16()[..., :width]
    key, value = (torch.randn(batch, keys, 2 * width, generator=generator) * scale).bfloat16().split(width, -1)
    return query, key, value


@pytest.mark.parametrize(
    "batch,queries,keys,heads,scale",
    [(1, 900, 900, 8, 2.0), (2, 37, 53, 3, 2.0), (1, 1, 1, 1, 1.0), (1, 901, 17, 2, 2.0), (3, 70, 1000, 1, 1.0),
     (1, 45, 16, 2, 1.0), (1, 8, 33, 1, 8.0), (2, 9, 31, 2, 8.0)],
)
def test_bfloat16_attention_against_float64(bfloat16_attention, batch, queries, keys, heads, scale):
    """The AVX-512 BF16 attention against float64 attention of the same bfloat16 inputs: no further from it than
    aten's bfloat16 attention (float32 scores and softmax, bfloat16 probabilities), in the worst element and on
    average. Key counts around multiples of 16 and odd ones (the padding keys of the last blocks and pairs), query
    counts around the 8-query steps and 64-query tasks, strided inputs, large scores (scale 8: the maximum is
    subtracted before the exponential)."""
    query, key, value = attention_inputs(batch, queries, keys, heads, scale)
    want = attention64(query, key, value, heads)
    got = bfloat16_attention(query, key, value, heads)
    assert got.dtype == torch.bfloat16 and got.shape == (batch, queries, 32 * heads) and got.is_contiguous()
    error = (got.double() - want).abs()
    aten_error = (aten_attention(query, key, value, heads).double() - want).abs()
    assert error.max() <= 1.25 * aten_error.max() + 1e-3
    assert error.mean() <= 1.25 * aten_error.mean() + 1e-4


def test_bfloat16_attention_propagates_nan_as_aten(bfloat16_attention):
    """A NaN in a query makes that query's head output NaN; a NaN in a key, every query's output of that head; a
    NaN in a value, the channel it is in (as aten's attention); nothing else changes."""
    query, key, value = attention_inputs(1, 40, 50, 2, 1.0)
    clean = bfloat16_attention(query, key, value, 2)
    query, key, value = query.clone(), key.clone(), value.clone()
    query[0, 3, 5] = key[0, 7, 40] = value[0, 11, 2] = float("nan")
    got = bfloat16_attention(query, key, value, 2)
    nan = aten_attention(query, key, value, 2).isnan()
    assert nan[0, 3, :32].all() and nan[0, :, 32:].all() and nan[0, :, 2].all()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan], clean[~nan])


def test_bfloat16_attention_refuses_bad_inputs(bfloat16_attention):
    query, key, value = attention_inputs(1, 10, 12, 2, 1.0)
    with pytest.raises(RuntimeError, match="bfloat16"):
        bfloat16_attention(query.float(), key, value, 2)
    with pytest.raises(RuntimeError, match="heads x 32"):
        bfloat16_attention(query, key, value, 4)
    with pytest.raises(RuntimeError, match="key and value"):
        bfloat16_attention(query, key, value[:, :11], 2)
    with pytest.raises(RuntimeError, match="no keys"):
        bfloat16_attention(query, key[:, :0], value[:, :0], 2)
    assert bfloat16_attention(query[:, :0], key, value, 2).shape == (1, 0, 64)


# --------------------------------------------------------------------------------------------------------------
# residual add + LayerNorm (the post-norm layers at inference), AVX-512
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def residual_layer_norm(cpu_extension):
    return kernel_where_supported(
        cpu_extension.layer_norm_supported(), cpu_extension.residual_layer_norm,
        "this CPU has no AVX-512: the residual LayerNorm kernel does not run here (the layers use nn.LayerNorm)",
    )


# (residual, update, weight and bias) dtypes: float32; bfloat16; CPU autocast's encoder (bfloat16 activations,
# float32 parameters) and decoder (a float32 residual plus a bfloat16 product)
NORM_DTYPES = [
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32),
]


def norm_inputs(rows, dim, dtypes, offset=0.0, seed=0):
    """residual [2, rows, dim] (a column slice: row stride dim + 16), update, weight and bias in `dtypes`; `offset`
    shifts every row's values (a large mean next to a small spread)."""
    generator = torch.Generator().manual_seed(seed)
    residual_type, update_type, parameter_type = dtypes
    residual = (torch.randn(2, rows, dim + 16, generator=generator) * 3 + offset).to(residual_type)[..., :dim]
    update = torch.randn(2, rows, dim, generator=generator).to(update_type)
    weight = (1 + torch.randn(dim, generator=generator) / 4).to(parameter_type)
    bias = torch.randn(dim, generator=generator).to(parameter_type)
    return residual, update, weight, bias


@pytest.mark.parametrize("dtypes", NORM_DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("rows,dim,offset", [(900, 256, 0.0), (3, 16, 0.0), (77, 272, 5.0), (5, 1024, 300.0)])
def test_residual_layer_norm_against_float64(residual_layer_norm, dtypes, rows, dim, offset):
    """`LayerNorm(residual + update)` from the kernel against float64 LayerNorm of the sum the unfused add makes (in
    the residual's dtype: a bfloat16 sum rounded): no further from it than aten's `F.layer_norm(residual + update)`
    (float32: in the worst element and on average; bfloat16: in the worst element), and in bfloat16 the float64
    result correctly rounded but for < 0.1 % of the elements (float32's rounding before bfloat16's). Rows of 16 to
    1024 channels, a row count that splits unevenly over threads, strided residuals, rows whose mean is far from 0
    next to a spread of ~3 (the mean is corrected by the deviations' sum; aten's bfloat16 LayerNorm is 35 steps off
    there)."""
    residual, update, weight, bias = norm_inputs(rows, dim, dtypes, offset)
    total = residual + update
    want = torch.nn.functional.layer_norm(total.double(), (dim,), weight.double(), bias.double(), 1e-5)
    aten = torch.nn.functional.layer_norm(total, (dim,), weight, bias, 1e-5)
    got = residual_layer_norm(residual, update, weight, bias, 1e-5)
    assert got.dtype == residual.dtype == aten.dtype and got.shape == residual.shape and got.is_contiguous()
    error, aten_error = (got.double() - want).abs(), (aten.double() - want).abs()
    assert error.max() <= 1.25 * aten_error.max() + 1e-7
    if got.dtype == torch.float32:
        assert error.mean() <= 1.1 * aten_error.mean()
    else:
        assert (got != want.to(torch.bfloat16)).float().mean() < 1e-3


def test_residual_layer_norm_edge_rows(residual_layer_norm):
    """A NaN or an infinity in a row makes that row NaN and leaves the others alone (as aten's LayerNorm); a constant
    row (no spread) normalises to the bias, with `eps` keeping it finite; eps enters as aten's (a row of spread
    ~eps)."""
    for dtypes in NORM_DTYPES:
        residual, update, weight, bias = norm_inputs(6, 32, dtypes)
        residual = residual.contiguous()
        clean = residual_layer_norm(residual, update, weight, bias, 1e-5)
        residual[0, 1, 3] = float("nan")
        residual[1, 2, 5] = float("inf")
        residual[0, 4] = 7.0
        update[0, 4] = 0.0
        got = residual_layer_norm(residual, update, weight, bias, 1e-5)
        aten = torch.nn.functional.layer_norm(residual + update, (32,), weight, bias, 1e-5)
        assert torch.equal(got.isnan(), aten.isnan())
        assert got[0, 1].isnan().all() and got[1, 2].isnan().all()
        assert torch.equal(got[0, 4], bias.to(got.dtype))
        keep = torch.ones(2, 6, dtype=torch.bool)
        keep[0, 1] = keep[1, 2] = keep[0, 4] = False
        assert torch.equal(got[keep], clean[keep])
    residual = torch.tensor([[1.0, -1.0] * 8]) * 1e-3
    for eps in (1e-5, 1e-7, 0.25):
        want = torch.nn.functional.layer_norm(residual.double(), (16,), eps=eps)
        got = residual_layer_norm(residual, torch.zeros_like(residual), torch.ones(16), torch.zeros(16), eps)
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-7)


def test_residual_layer_norm_refuses_bad_inputs(residual_layer_norm):
    """Wrong dtypes, shapes and sizes are refused with a message (and `residual_layer_norm_usable` says no), never
    read out of bounds; no rows give an empty result."""
    residual, update, weight, bias = norm_inputs(4, 32, NORM_DTYPES[0])
    bad = [
        ((residual.double(), update.double(), weight.double(), bias.double()), "float32 or bfloat16"),
        ((residual.half(), update.half(), weight.half(), bias.half()), "float32 or bfloat16"),
        ((residual, update.half(), weight, bias), "update must be"),
        ((residual.bfloat16(), update.float(), weight, bias), "update must be"),
        ((residual, update[:, :3], weight, bias), "update must be"),
        ((residual[..., :24], update[..., :24], weight[:24], bias[:24]), "multiple of 16"),
        ((residual, update, weight[:16], bias), "weight and bias"),
        ((residual, update, weight.bfloat16(), bias.bfloat16()), "weight and bias"),
        ((residual.bfloat16(), update.bfloat16(), weight.bfloat16(), bias), "weight and bias"),
    ]
    for args, message in bad:
        assert not K.residual_layer_norm_usable(*args)
        with pytest.raises(RuntimeError, match=message):
            residual_layer_norm(*args, 1e-5)
    assert K.residual_layer_norm_usable(residual, update, weight, bias)
    assert residual_layer_norm(residual[:, :0], update[:, :0], weight, bias, 1e-5).shape == (2, 0, 32)


# --------------------------------------------------------------------------------------------------------------
# dispatch and switches
# --------------------------------------------------------------------------------------------------------------
def _ran_kernel(output: torch.Tensor) -> bool:
    return "hf_dino" in type(output.grad_fn).__name__


def test_dispatch_uses_kernel_by_default(cpu_extension, monkeypatch):
    monkeypatch.delenv(_loader.ENV_DISABLE, raising=False)
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], dtype=torch.float32)
    out = da.multi_scale_deformable_attention(value.requires_grad_(), shapes, starts, locations, weights)
    assert _ran_kernel(out)
    # bfloat16 and float16 run in the kernel too; integer values (unsupported) take the PyTorch path
    for dtype in (torch.bfloat16, torch.float16):
        out16 = da.multi_scale_deformable_attention(value.detach().to(dtype).requires_grad_(), shapes, starts,
                                                    locations.to(dtype), weights.to(dtype))
        assert _ran_kernel(out16) and out16.dtype == dtype
    assert not K.kernel_usable(value.long(), locations, weights)


@pytest.mark.parametrize("setting", ["1", "true"])
def test_environment_variable_selects_pytorch_path(cpu_extension, monkeypatch, setting):
    monkeypatch.setenv(_loader.ENV_DISABLE, setting)
    calls = []
    monkeypatch.setattr(da._kernels, "ms_deform_attn", lambda *a: calls.append(a))
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], dtype=torch.float32)
    out = da.multi_scale_deformable_attention(value.requires_grad_(), shapes, starts, locations, weights)
    assert not calls and not _ran_kernel(out)
    torch.testing.assert_close(out, da.multi_scale_deformable_attention_pytorch(value, shapes, locations, weights))


def test_use_custom_kernel_false_selects_pytorch_path(cpu_extension, monkeypatch):
    calls = []
    monkeypatch.setattr(da._kernels, "ms_deform_attn", lambda *a: calls.append(a))
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], dtype=torch.float32)
    out = da.multi_scale_deformable_attention(value.requires_grad_(), shapes, starts, locations, weights,
                                              use_custom_kernel=False)
    assert not calls and not _ran_kernel(out)


def _count_kernel_calls(monkeypatch):
    calls = []
    original = da._kernels.ms_deform_attn

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(da._kernels, "ms_deform_attn", spy)
    return calls


@pytest.mark.parametrize("disable", [False, True])
def test_config_switch_and_environment_variable_in_the_model(cpu_extension, monkeypatch, disable):
    monkeypatch.delenv(_loader.ENV_DISABLE, raising=False)
    model = tiny_model(disable_custom_kernels=disable)
    pixel_values = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        out = model(pixel_values=pixel_values)
    assert bool(calls) is not disable  # encoder and decoder layers call the kernel unless disabled
    monkeypatch.setenv(_loader.ENV_DISABLE, "1")
    calls.clear()
    with torch.no_grad():
        out_env = model(pixel_values=pixel_values)
    assert not calls
    torch.testing.assert_close(out_env.logits, out.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_env.pred_boxes, out.pred_boxes, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# torch.compile / torch.export
# --------------------------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_keeps_the_op(cpu_extension):
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], dtype=torch.float32, seed=11)

    def fn(v, loc, w):
        return da.multi_scale_deformable_attention(v * 1.0, shapes, starts, loc, w).sin()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)  # inductor
    leaves_c = [t.clone().requires_grad_() for t in (value, locations, weights)]
    leaves_e = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out_c, out_e = compiled(*leaves_c), fn(*leaves_e)
    torch.testing.assert_close(out_c, out_e)
    out_c.sum().backward()
    out_e.sum().backward()
    for a, b in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, b.grad)


def test_torch_export_has_the_op_in_the_graph(cpu_extension):
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], dtype=torch.float32, seed=12)

    class Attention(torch.nn.Module):
        def forward(self, v, s, i, loc, w):
            return da.multi_scale_deformable_attention(v, s, i, loc, w)

    exported = torch.export.export(Attention(), (value, shapes, starts, locations, weights))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "hf_dino.ms_deform_attn.default" in targets
    torch.testing.assert_close(
        exported.module()(value, shapes, starts, locations, weights),
        da.multi_scale_deformable_attention_pytorch(value, shapes, locations, weights),
    )


def test_torch_compile_model_same_outputs(cpu_extension, monkeypatch):
    """torch.compile of the whole tiny model (aot_eager backend: dynamo + AOTAutograd tracing with the op's fake
    implementation, without inductor's minutes of C++ code generation for the whole model)."""
    monkeypatch.delenv(_loader.ENV_DISABLE, raising=False)
    model = tiny_model()
    pixel_values = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(pixel_values=pixel_values)
        torch._dynamo.reset()
        calls = _count_kernel_calls(monkeypatch)
        compiled = torch.compile(model, backend="aot_eager")(pixel_values=pixel_values)
    assert calls  # traced through the kernel path
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled.pred_boxes, eager.pred_boxes, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# loader: laziness, cache, lock, failure, CLI, packaging
# --------------------------------------------------------------------------------------------------------------
def test_import_compiles_nothing(tmp_path):
    code = textwrap.dedent(
        """
        import hf_dino.deformable_attention, hf_dino.kernels as K
        assert K.build_state("cpu") is None and K.build_state("cuda") is None
        import os; assert not os.path.exists(os.environ["HF_DINO_KERNELS_CACHE"])
        print("ok")
        """
    )
    env = _subprocess_env(HF_DINO_KERNELS_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.parametrize("breakage", ["no_compiler", "no_ninja", "no_sources"])
def test_impossible_build_warns_once_and_falls_back(tmp_path, monkeypatch, breakage):
    monkeypatch.setattr(_loader, "_modules", {})  # a fresh "process": nothing built or failed yet
    monkeypatch.setattr(_loader, "_errors", {})
    for name in [name for name in sys.modules if name.startswith("hf_dino_msda_")]:  # nor loaded by an earlier test
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setenv(_loader.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(_loader.ENV_DISABLE, raising=False)
    if breakage == "no_compiler":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    elif breakage == "no_ninja":
        from torch.utils import cpp_extension

        monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    else:
        monkeypatch.setenv(_loader.ENV_SOURCES, str(tmp_path / "missing"))
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [da.multi_scale_deformable_attention(value, shapes, starts, locations, weights) for _ in range(3)]
        # the op itself (e.g. inside a graph traced before the failure) falls back to the reference as well
        outputs.append(torch.ops.hf_dino.ms_deform_attn(value, shapes, starts, locations, weights))
    ours = [str(w.message) for w in caught if "hf_dino" in str(w.message)]
    assert len(ours) == 1, ours
    assert {"no_compiler": "compiler", "no_ninja": "ninja", "no_sources": "sources"}[breakage] in ours[0]
    assert _loader.build_state("cpu") is False
    reference = da.multi_scale_deformable_attention_pytorch(value, shapes, locations, weights)
    for output in outputs:
        torch.testing.assert_close(output, reference, rtol=0, atol=0)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*/BUILD_OK"))


def test_parallel_processes_build_once(cpu_extension, tmp_path):
    """Processes racing for an empty cache: the file lock lets one build, the others load its result.

    The compiler is replaced by a slow stand-in that counts invocations and installs the real library built by
    the fixture, so the test checks the locking protocol without compiling N times.
    """
    real_dir = _loader.build_directory("cpu")
    code = textwrap.dedent(
        f"""
        import importlib.util, shutil, time, sys
        from pathlib import Path
        from torch.utils import cpp_extension
        # the loader module alone (it only needs torch and filelock): skips importing transformers via hf_dino
        spec = importlib.util.spec_from_file_location("msda_loader", {str(Path(_loader.__file__))!r})
        L = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(L)

        def fake_load(name, sources, build_directory, **kwargs):
            with open({str(tmp_path / "count")!r}, "a") as f:
                f.write("build\\n")
            time.sleep(2.0)
            target = L._library_path(Path(build_directory), name)
            shutil.copy(L._library_path(Path({str(real_dir)!r}), name), target)
            return L._import_built(name, target)

        cpp_extension.load = fake_load
        module = L.build("cpu")
        assert module.forward is not None
        print("loaded", module.__name__)
        """
    )
    env = _subprocess_env(HF_DINO_KERNELS_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=180) + (p.returncode,) for p in procs]
    for out, err, code_ in results:
        assert code_ == 0 and "loaded" in out, err
    assert (tmp_path / "count").read_text().count("build") == 1
    build_dirs = list((tmp_path / "cache").iterdir())
    assert any((d / "BUILD_OK").is_file() for d in build_dirs)


def test_build_directory_is_keyed_by_device_torch_and_source_hash(tmp_path, monkeypatch):
    key_cpu = _loader.build_key("cpu")
    assert key_cpu.startswith("cpu-torch") and torch.__version__.replace("+", "_") in key_cpu
    assert _loader.build_key("cuda").startswith("cuda-")
    sources = tmp_path / "src"
    shutil.copytree(_loader.source_dir(), sources)
    assert _loader.build_key("cpu", sources) == key_cpu
    with open(sources / "msda_cpu_kernel.h", "a") as f:
        f.write("\n// changed\n")
    assert _loader.build_key("cpu", sources) != key_cpu


def test_prebuild_command(cpu_extension, capsys):
    from hf_dino.kernels.__main__ import main

    assert main(["build", "--device", "cpu"]) == 0
    assert "cpu: ok" in capsys.readouterr().out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"{_loader.build_directory('cpu')} (built, " in out and ", verified)" in out


def _corrupt_copy_of_the_cpu_build(cache: Path, marker: str) -> Path:
    """A copy of the real CPU build in ``cache`` with its library cut to half its size (a disk that filled up, an
    interrupted copy). ``marker``: "hashed" (size + SHA-256 recorded at build time) or "legacy" (a marker written
    by an older hf_dino, without them)."""
    real = _loader.build_directory("cpu")
    name = _loader._module_name("cpu", real.name)
    build_dir = cache / real.name
    shutil.copytree(real, build_dir, ignore=shutil.ignore_patterns("lock"))
    library = _loader._library_path(build_dir, name)
    if marker == "hashed":
        _loader._write_marker(build_dir, name, library)
    else:
        (build_dir / _loader.MARKER).write_text(f"{name}\n{torch.__version__}\n")
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
    return build_dir


@pytest.mark.parametrize("marker", ["hashed", "legacy"])
def test_truncated_library_in_the_cache_falls_back_instead_of_crashing(cpu_extension, tmp_path, marker):
    """A truncated .so used to kill every process that loaded it (Bus error). Now it is detected before it is
    loaded; where no compiler can rebuild it, the warning says what happened and how to fix it."""
    build_dir = _corrupt_copy_of_the_cpu_build(tmp_path / "cache", marker)
    code = textwrap.dedent(
        """
        import warnings, torch
        import hf_dino.deformable_attention as da
        value = torch.randn(1, 5, 2, 4); shapes = torch.tensor([[1, 5]]); starts = torch.tensor([0])
        locations = torch.rand(1, 3, 2, 1, 2, 2); weights = torch.rand(1, 3, 2, 1, 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = da.multi_scale_deformable_attention(value, shapes, starts, locations, weights)
        ref = da.multi_scale_deformable_attention_pytorch(value, shapes, locations, weights)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        print("\\n".join(str(w.message) for w in caught if "hf_dino" in str(w.message)))
        """
    )
    env = _subprocess_env(HF_DINO_KERNELS_CACHE=str(tmp_path / "cache"), CXX=str(tmp_path / "no-compiler"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-2000:]}"
    warning = result.stdout.strip()
    assert warning.count("hf_dino: could not build") == 1, warning
    assert f"{build_dir}" in warning and "is corrupt" in warning and "cannot be rebuilt here" in warning
    assert f"delete {build_dir}" in warning and "python -m hf_dino.kernels build" in warning
    assert "HF_DINO_KERNELS_CACHE" in warning and "falling back to the slower pure-PyTorch" in warning


def test_build_command_repairs_a_corrupt_cache_and_info_tells(cpu_extension, tmp_path):
    """`info` reports the corrupt build, `build` deletes and rebuilds it (printing each stage), `info` then
    reports a verified build. The compiler is a stand-in installing the real library (no compilation)."""
    build_dir = _corrupt_copy_of_the_cpu_build(tmp_path / "cache", "hashed")
    real = _loader.build_directory("cpu")
    name = _loader._module_name("cpu", real.name)
    env = _subprocess_env(HF_DINO_KERNELS_CACHE=str(tmp_path / "cache"))

    def kernels(*args, patch_compiler=False):
        code = "import sys\n"
        if patch_compiler:
            code += textwrap.dedent(
                f"""
                import shutil
                from pathlib import Path
                from torch.utils import cpp_extension
                from hf_dino.kernels import _loader as L

                def fake_load(name, sources, build_directory, **kwargs):
                    print("compiler invoked", flush=True)
                    target = L._library_path(Path(build_directory), name)
                    assert not target.exists(), "the corrupt library was not deleted before the rebuild"
                    shutil.copy(L._library_path(Path({str(real)!r}), name), target)
                    return L._import_built(name, target)

                cpp_extension.load = fake_load
                """
            )
        code += f"from hf_dino.kernels.__main__ import main\nsys.exit(main({list(args)!r}))\n"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)

    info = kernels("info")
    assert info.returncode == 0, info.stderr
    assert f"{build_dir} (CORRUPT: {build_dir / name}.so is corrupt:" in info.stdout
    assert "`python -m hf_dino.kernels build` rebuilds it" in info.stdout

    built = kernels("build", "--device", "cpu", patch_compiler=True)
    assert built.returncode == 0, built.stderr
    lines = built.stdout.splitlines()
    assert lines[0].startswith(f"cpu: {build_dir / name}.so is corrupt:") and lines[0].endswith("; rebuilding")
    assert lines[1].startswith(f"cpu: compiling into {build_dir}")
    assert lines[2] == "compiler invoked" and lines[3].startswith("cpu: compiled in")
    assert lines[4].startswith(f"cpu: ok ({build_dir}")

    info = kernels("info")
    assert f"{build_dir} (built, " in info.stdout and ", verified)" in info.stdout
    again = kernels("build", "--device", "cpu")  # nothing to do: the verified build is used as it is
    assert again.returncode == 0 and again.stdout.startswith(f"cpu: cached build {build_dir} (")


def test_no_cuda_runtime_warning_on_machines_without_gpu(tmp_path):
    """torch's cpp_extension logs "No CUDA runtime is found" at import on a machine with a CUDA tool kit and no
    GPU; the loader imports it without that warning (it concerns CUDA builds only)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: torch does not warn")
    plain = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"], env=_subprocess_env(),
                           capture_output=True, text=True, timeout=120)
    if "No CUDA runtime is found" not in plain.stderr:
        pytest.skip("torch does not emit the warning on this machine (no CUDA tool kit found)")
    code = textwrap.dedent(
        f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("msda_loader", {str(Path(_loader.__file__))!r})
        L = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(L)
        L.check_toolchain("cpu")  # the first step of a first build; imports cpp_extension
        import torch.utils.cpp_extension
        print("imported")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], env=_subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert "imported" in result.stdout, result.stderr
    assert "No CUDA runtime is found" not in result.stderr


@pytest.mark.slow
def test_built_wheel_ships_and_compiles_the_sources(tmp_path):
    """Build a wheel (non-editable), unpack it as an installation, and compile + run the kernel from it."""
    try:
        _loader.check_toolchain("cpu")
    except _loader.KernelBuildError as error:
        pytest.skip(f"cannot build the CPU kernel here: {error}")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "pyproject.toml", project)
    for name in ("README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, project)
        else:
            (project / name).write_text("placeholder\n")
    shutil.copytree(REPO / "kernels", project / "kernels")
    shutil.copytree(REPO / "src", project / "src", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(project)], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hf_dino-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for source in _loader._SOURCES["cpu"] + _loader._SOURCES["cuda"] + _loader._HEADERS["cpu"]:
            assert f"hf_dino/kernels/csrc/{source}" in names
        assert "hf_dino_cli/__init__.py" in names  # the `hf-dino` command's package ships too
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        assert "hf-dino = hf_dino_cli:main" in archive.read(entry_points).decode()
        archive.extractall(tmp_path / "site")
    code = textwrap.dedent(
        """
        import torch, hf_dino.kernels as K, hf_dino.deformable_attention as da
        site = __import__("os").environ["SITE"]
        assert str(K.source_dir()).startswith(site), K.source_dir()
        assert K.kernels_disabled() is False
        torch.manual_seed(0)
        shapes = torch.tensor([[4, 5], [2, 3]]); starts = torch.tensor([0, 20])
        v = torch.randn(1, 26, 2, 4); loc = torch.rand(1, 3, 2, 2, 2, 2); w = torch.rand(1, 3, 2, 2, 2)
        out = da.multi_scale_deformable_attention(v, shapes, starts, loc, w)
        assert K.build_state("cpu") is True
        ref = da.multi_scale_deformable_attention_pytorch(v, shapes, loc, w)
        torch.testing.assert_close(out, ref)
        assert str(K.build_directory("cpu")).startswith(__import__("os").environ["HF_DINO_KERNELS_CACHE"])
        print("wheel kernel ok", K.build_directory("cpu"))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), SITE=str(tmp_path / "site"),
               HF_DINO_KERNELS_CACHE=str(tmp_path / "cache"))
    env.pop(_loader.ENV_DISABLE, None)
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "wheel kernel ok" in result.stdout, result.stdout + result.stderr[-3000:]
    assert list((tmp_path / "cache").glob("cpu-*/BUILD_OK"))


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    candidates = [Path(cpp_extension.CUDA_HOME, "bin", "nvcc")] if cpp_extension.CUDA_HOME else []
    found = shutil.which("nvcc")
    candidates += [Path(found)] if found else []
    return next((str(c) for c in candidates if c.exists()), None)


def _nvcc_major(nvcc: str) -> int | None:
    result = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    for token in result.stdout.replace(",", " ").split():
        if token[:1].isdigit() and "." in token:
            return int(token.split(".")[0])
    return None


@pytest.mark.slow
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """The CUDA extension compiles with nvcc (no GPU needed).

    When nvcc matches torch's CUDA major version, the real loader builds the whole extension (nvcc + bindings +
    link + import) into an empty cache for sm_80; otherwise msda_cuda.cu is compiled to an object file with
    torch's headers. About 1.5 minutes of compilation on 2 cores.
    """
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compiled here")
    if torch.version.cuda is None:
        pytest.skip("this torch build has no CUDA headers (CPU-only build)")
    from torch.utils import cpp_extension

    if _nvcc_major(nvcc) == int(torch.version.cuda.split(".")[0]):
        code = textwrap.dedent(
            """
            import hf_dino.kernels._loader as L
            module = L.build("cuda")
            assert callable(module.forward) and callable(module.backward)
            print("cuda extension ok", module.__name__)
            """
        )
        env = _subprocess_env(HF_DINO_KERNELS_CACHE=str(tmp_path / "cache"), TORCH_CUDA_ARCH_LIST="8.0")
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0 and "cuda extension ok" in result.stdout, result.stderr[-4000:]
        assert list((tmp_path / "cache").glob("cuda-*/BUILD_OK"))
        return

    includes = cpp_extension.include_paths("cuda")
    command = [
        nvcc, "-c", str(_loader.source_dir() / "msda_cuda.cu"), "-o", str(tmp_path / "msda_cuda.o"),
        "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
        "-gencode", "arch=compute_80,code=sm_80",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ] + [f"-I{path}" for path in includes]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    symbols = subprocess.run(["nm", "-C", str(tmp_path / "msda_cuda.o")], capture_output=True, text=True)
    if symbols.returncode == 0:
        assert "hf_dino_msda::msda_cuda_forward" in symbols.stdout
        assert "hf_dino_msda::msda_cuda_backward" in symbols.stdout


# --------------------------------------------------------------------------------------------------------------
# CUDA numerics (only where a GPU is present)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [32, 8, 5, 64])
def test_cuda_matches_float64_reference(dtype, head_dim):
    if _loader.load_extension("cuda") is None:
        pytest.fail(f"CUDA kernel did not build: {_loader.build_error('cuda')}")
    value, shapes, starts, locations, weights = make_inputs(LEVEL_SETS["odd"], head_dim=head_dim, seed=head_dim)
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * head_dim, dtype=torch.float64)
    ref_out, ref_grads = reference64(value, shapes, locations, weights, grad_output)
    cuda = [t.cuda() for t in (value, shapes, starts, locations, weights)]
    cuda = [t.to(dtype) if t.is_floating_point() else t for t in cuda]
    out, grads = kernel_with_grads(*cuda, grad_output.cuda().to(dtype))
    tol = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(out.double().cpu(), ref_out, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double().cpu() / scale, want / scale, rtol=tol, atol=tol)
