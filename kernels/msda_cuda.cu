// CUDA implementation of multi-scale deformable attention (forward and backward).
// dtypes: float32, float64, float16 and bfloat16; half types accumulate in float32 (at::opmath_type).
//
// One thread per output element (batch, query, head, channel): consecutive threads walk the contiguous
// head dimension, so the gathers from `value` and the stores of the output are coalesced.
// Backward: the same mapping; grad_value is scattered with atomicAdd into an opmath-typed buffer, the
// per-channel contributions to the sampling-location / attention-weight gradients are summed over the
// head dimension with warp shuffles (segments of `width` lanes) before one lane writes / adds them.
#include "msda_common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <vector>

namespace hf_dino_msda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Corners {
  int64_t index[4];
  T weight[4];
  bool valid[4];
  T lh, lw, hh, hw;
};

// grid_sample semantics: zeros padding, align_corners=False.
template <typename T>
__device__ __forceinline__ bool sample_corners(T x, T y, int64_t height, int64_t width, int64_t start, Corners<T>& s) {
  const T him = y * static_cast<T>(height) - T(0.5);
  const T wim = x * static_cast<T>(width) - T(0.5);
  if (!(him >= T(-1) && wim >= T(-1) && him < static_cast<T>(height) && wim < static_cast<T>(width))) return false;
  const T hf = floor(him);
  const T wf = floor(wim);
  const int64_t h0 = static_cast<int64_t>(hf);
  const int64_t w0 = static_cast<int64_t>(wf);
  s.lh = him - hf;
  s.lw = wim - wf;
  s.hh = T(1) - s.lh;
  s.hw = T(1) - s.lw;
  const bool top = h0 >= 0, bottom = h0 + 1 < height, left = w0 >= 0, right = w0 + 1 < width;
  s.valid[0] = top && left;
  s.valid[1] = top && right;
  s.valid[2] = bottom && left;
  s.valid[3] = bottom && right;
  const int64_t base = start + h0 * width + w0;
  s.index[0] = base;
  s.index[1] = base + 1;
  s.index[2] = base + width;
  s.index[3] = base + width + 1;
  s.weight[0] = s.valid[0] ? s.hh * s.hw : T(0);
  s.weight[1] = s.valid[1] ? s.hh * s.lw : T(0);
  s.weight[2] = s.valid[2] ? s.lh * s.hw : T(0);
  s.weight[3] = s.valid[3] ? s.lh * s.lw : T(0);
  return true;
}

struct Sizes {
  int64_t tokens, queries, heads, head_dim, levels, points;
};

template <typename scalar_t>
__global__ void msda_forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                                    const int64_t* __restrict__ starts, const scalar_t* __restrict__ locations,
                                    const scalar_t* __restrict__ weights, scalar_t* __restrict__ output, int64_t n,
                                    Sizes z) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t token_stride = z.heads * z.head_dim;
  const int64_t lp = z.levels * z.points;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n; t += stride) {
    const int64_t c = t % z.head_dim;
    const int64_t i = t / z.head_dim;  // (b, q, h)
    const int64_t h = i % z.heads;
    const int64_t b = i / (z.queries * z.heads);
    const scalar_t* vbase = value + b * z.tokens * token_stride + h * z.head_dim + c;
    const scalar_t* loc = locations + i * lp * 2;
    const scalar_t* att = weights + i * lp;
    acc_t acc = acc_t(0);
    for (int64_t l = 0; l < z.levels; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1], start = starts[l];
      for (int64_t k = l * z.points; k < (l + 1) * z.points; ++k) {
        Corners<acc_t> s;
        if (!sample_corners<acc_t>(static_cast<acc_t>(loc[2 * k]), static_cast<acc_t>(loc[2 * k + 1]), height, width,
                                   start, s))
          continue;
        const acc_t a = static_cast<acc_t>(att[k]);
        acc_t sample = acc_t(0);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (s.valid[j]) sample += s.weight[j] * static_cast<acc_t>(vbase[s.index[j] * token_stride]);
        }
        acc += a * sample;
      }
    }
    output[t] = static_cast<scalar_t>(acc);
  }
}

// Sum over segments of `width` consecutive lanes (width a power of two <= 32); every lane of the warp
// must call it.
template <typename T>
__device__ __forceinline__ T segment_sum(T v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  return v;
}

template <typename scalar_t>
__global__ void msda_backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                                     const int64_t* __restrict__ starts, const scalar_t* __restrict__ locations,
                                     const scalar_t* __restrict__ weights, const scalar_t* __restrict__ grad_output,
                                     at::opmath_type<scalar_t>* __restrict__ grad_value,
                                     at::opmath_type<scalar_t>* __restrict__ grad_locations,
                                     at::opmath_type<scalar_t>* __restrict__ grad_weights, int64_t n, Sizes z,
                                     int width) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;  // a multiple of 32
  const int64_t n_warps = (n + 31) / 32 * 32;  // every lane of a warp runs the same number of iterations
  const int64_t token_stride = z.heads * z.head_dim;
  const int64_t lp = z.levels * z.points;
  // The segment leader writes; when the segment covers the whole head dimension it is the only writer.
  const bool exclusive = width == z.head_dim;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n_warps; t += stride) {
    const bool active = t < n;
    const int64_t tt = active ? t : 0;
    const int64_t c = tt % z.head_dim;
    const int64_t i = tt / z.head_dim;
    const int64_t h = i % z.heads;
    const int64_t b = i / (z.queries * z.heads);
    const int64_t vofs = b * z.tokens * token_stride + h * z.head_dim + c;
    const scalar_t* vbase = value + vofs;
    acc_t* gvbase = grad_value + vofs;
    const scalar_t* loc = locations + i * lp * 2;
    const scalar_t* att = weights + i * lp;
    const acc_t g = active ? static_cast<acc_t>(grad_output[tt]) : acc_t(0);
    const bool leader = (c % width) == 0;
    for (int64_t l = 0; l < z.levels; ++l) {
      const int64_t height = shapes[2 * l], width_l = shapes[2 * l + 1], start = starts[l];
      for (int64_t k = l * z.points; k < (l + 1) * z.points; ++k) {
        Corners<acc_t> s;
        bool inside = false;
        acc_t a = acc_t(0);
        if (active) {
          inside = sample_corners<acc_t>(static_cast<acc_t>(loc[2 * k]), static_cast<acc_t>(loc[2 * k + 1]), height,
                                         width_l, start, s);
          a = static_cast<acc_t>(att[k]);
        }
        acc_t part_w = acc_t(0), part_x = acc_t(0), part_y = acc_t(0);
        if (inside) {
          acc_t v[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            v[j] = s.valid[j] ? static_cast<acc_t>(vbase[s.index[j] * token_stride]) : acc_t(0);
            if (s.valid[j]) atomicAdd(gvbase + s.index[j] * token_stride, a * s.weight[j] * g);
          }
          part_w = g * (s.weight[0] * v[0] + s.weight[1] * v[1] + s.weight[2] * v[2] + s.weight[3] * v[3]);
          part_x = g * a * static_cast<acc_t>(width_l) * (s.hh * (v[1] - v[0]) + s.lh * (v[3] - v[2]));
          part_y = g * a * static_cast<acc_t>(height) * (s.hw * (v[2] - v[0]) + s.lw * (v[3] - v[1]));
        }
        part_w = segment_sum(part_w, width);
        part_x = segment_sum(part_x, width);
        part_y = segment_sum(part_y, width);
        if (inside && leader) {
          if (exclusive) {
            grad_weights[i * lp + k] = part_w;
            grad_locations[(i * lp + k) * 2] = part_x;
            grad_locations[(i * lp + k) * 2 + 1] = part_y;
          } else {
            atomicAdd(grad_weights + i * lp + k, part_w);
            atomicAdd(grad_locations + (i * lp + k) * 2, part_x);
            atomicAdd(grad_locations + (i * lp + k) * 2 + 1, part_y);
          }
        }
      }
    }
  }
}

int64_t grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 20));
}

// Lanes per reduction segment: the whole head dimension when it is a power of two <= 32, a full warp when
// it is a multiple of 32, otherwise no shuffle reduction (every lane adds atomically).
int segment_width(int64_t head_dim) {
  if (head_dim <= 32 && (head_dim & (head_dim - 1)) == 0) return static_cast<int>(head_dim);
  if (head_dim % 32 == 0) return 32;
  return 1;
}

Sizes make_sizes(const at::Tensor& value, const at::Tensor& locations) {
  return Sizes{value.size(1), locations.size(1), value.size(2), value.size(3), locations.size(3), locations.size(4)};
}

}  // namespace

at::Tensor msda_cuda_forward(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                             const at::Tensor& level_start_index_in, const at::Tensor& sampling_locations_in,
                             const at::Tensor& attention_weights_in) {
  check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in, attention_weights_in);
  TORCH_CHECK(value_in.is_cuda(), "msda_cuda_forward: inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();
  const Sizes z = make_sizes(value, locations);
  at::Tensor output = at::empty({value.size(0), z.queries, z.heads * z.head_dim}, value.options());
  const int64_t n = output.numel();
  if (n == 0) return output;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_cuda_forward", [&] {
    msda_forward_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        value.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
        locations.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
        n, z);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::vector<at::Tensor> msda_cuda_backward(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                           const at::Tensor& level_start_index_in,
                                           const at::Tensor& sampling_locations_in,
                                           const at::Tensor& attention_weights_in, const at::Tensor& grad_output_in) {
  check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in, attention_weights_in);
  TORCH_CHECK(value_in.is_cuda(), "msda_cuda_backward: inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();
  const Sizes z = make_sizes(value, locations);
  const int64_t n = value.size(0) * z.queries * z.heads * z.head_dim;
  TORCH_CHECK(grad_output_in.numel() == n, "msda_cuda_backward: grad_output has ", grad_output_in.numel(),
              " elements, expected ", n);
  const at::Tensor grad_output = grad_output_in.to(value.scalar_type()).contiguous();
  // Accumulate in opmath precision (float32 for half / bfloat16), convert at the end.
  const auto acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_locations = at::zeros(locations.sizes(), locations.options().dtype(acc_type));
  at::Tensor grad_weights = at::zeros(weights.sizes(), weights.options().dtype(acc_type));
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int width = segment_width(z.head_dim);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_cuda_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      msda_backward_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
          value.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
          locations.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
          grad_output.const_data_ptr<scalar_t>(), grad_value.mutable_data_ptr<acc_t>(),
          grad_locations.mutable_data_ptr<acc_t>(), grad_weights.mutable_data_ptr<acc_t>(), n, z, width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_value.to(value.scalar_type()), grad_locations.to(value.scalar_type()),
          grad_weights.to(value.scalar_type())};
}

}  // namespace hf_dino_msda
