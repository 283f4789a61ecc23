// CPU implementation of multi-scale deformable attention (forward and backward), float32 and float64.
// Built lazily by hf_dino.kernels (torch.utils.cpp_extension.load) as a Python extension module.
#include <torch/extension.h>

#include "msda_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <tuple>
#include <vector>

namespace hf_dino_msda {

struct MsdaParams {
  int64_t batch, tokens, queries, heads, head_dim, levels, points;
  const int64_t* shapes;  // [levels, 2] (height, width)
  const int64_t* starts;  // [levels]
};

namespace cpu_baseline {
#include "msda_cpu_kernel.h"
}  // namespace cpu_baseline

// A second copy of the same loops compiled for AVX2 + FMA, selected at run time on CPUs that have them,
// so the extension stays portable (no -march=native in a possibly shared build cache) and still uses
// 256-bit vectors where available.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__AVX2__)
#define HF_DINO_MSDA_HAS_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace cpu_avx2 {
#include "msda_cpu_kernel.h"
}  // namespace cpu_avx2
#pragma GCC pop_options
#endif

namespace {

bool cpu_has_avx2() {
#ifdef HF_DINO_MSDA_HAS_AVX2
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

std::atomic<bool>& avx2_enabled() {
  static std::atomic<bool> enabled{cpu_has_avx2()};
  return enabled;
}

// Backward decomposition: 0 = automatic, 1 = single pass over (batch, head), 2 = split (tests force both).
std::atomic<int>& backward_mode() {
  static std::atomic<int> mode{0};
  return mode;
}

MsdaParams make_params(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                     const at::Tensor& locations) {
  MsdaParams p;
  p.batch = value.size(0);
  p.tokens = value.size(1);
  p.heads = value.size(2);
  p.head_dim = value.size(3);
  p.queries = locations.size(1);
  p.levels = locations.size(3);
  p.points = locations.size(4);
  p.shapes = shapes.data_ptr<int64_t>();
  p.starts = starts.data_ptr<int64_t>();
  return p;
}

// Calls fn(std::integral_constant<int, D>) with D = head_dim for the common head sizes (fully unrolled
// inner loops with the accumulator in registers), D = 0 (run-time length) otherwise.
template <typename Fn>
void dispatch_head_dim(int64_t head_dim, Fn&& fn) {
  switch (head_dim) {
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 64: fn(std::integral_constant<int, 64>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

// Grain sizes: ~a few hundred samples per forward task; one (batch, head) per backward task.
constexpr int64_t kForwardGrain = 64;

}  // namespace

at::Tensor msda_cpu_forward(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                            const at::Tensor& level_start_index_in, const at::Tensor& sampling_locations_in,
                            const at::Tensor& attention_weights_in) {
  check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in, attention_weights_in);
  TORCH_CHECK(value_in.device().is_cpu(), "msda_cpu_forward: inputs must be on the CPU");
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();
  const auto p = make_params(value, shapes, starts, locations);
  at::Tensor output = at::empty({p.batch, p.queries, p.heads * p.head_dim}, value.options());
  const int64_t work = p.batch * p.queries * p.heads;
  if (work == 0 || p.head_dim == 0) return output.zero_();
  const bool avx2 = avx2_enabled().load();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_cpu_forward", [&] {
    std::vector<scalar_t> zeros(p.head_dim, scalar_t(0));
    const scalar_t* v = value.const_data_ptr<scalar_t>();
    const scalar_t* loc = locations.const_data_ptr<scalar_t>();
    const scalar_t* att = weights.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    dispatch_head_dim(p.head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      at::parallel_for(0, work, kForwardGrain, [&](int64_t begin, int64_t end) {
#ifdef HF_DINO_MSDA_HAS_AVX2
        if (avx2) {
          cpu_avx2::msda_forward_range<scalar_t, D>(p, v, loc, att, out, zeros.data(), begin, end);
          return;
        }
#endif
        (void)avx2;
        cpu_baseline::msda_forward_range<scalar_t, D>(p, v, loc, att, out, zeros.data(), begin, end);
      });
    });
  });
  return output;
}

std::vector<at::Tensor> msda_cpu_backward(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                          const at::Tensor& level_start_index_in,
                                          const at::Tensor& sampling_locations_in,
                                          const at::Tensor& attention_weights_in, const at::Tensor& grad_output_in) {
  check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in, attention_weights_in);
  TORCH_CHECK(value_in.device().is_cpu(), "msda_cpu_backward: inputs must be on the CPU");
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();
  const auto p = make_params(value, shapes, starts, locations);
  TORCH_CHECK(grad_output_in.numel() == p.batch * p.queries * p.heads * p.head_dim,
              "msda_cpu_backward: grad_output has ", grad_output_in.numel(), " elements, expected ",
              p.batch * p.queries * p.heads * p.head_dim);
  const at::Tensor grad_output = grad_output_in.to(value.scalar_type()).contiguous();
  // grad_value is zeroed by all threads (its first touch, i.e. its page faults, dominates small backward calls)
  at::Tensor grad_value = at::empty_like(value);
  {
    auto* bytes = static_cast<char*>(grad_value.data_ptr());
    const int64_t size = grad_value.numel() * grad_value.element_size();
    at::parallel_for(0, size, int64_t(1) << 18, [&](int64_t begin, int64_t end) {
      std::memset(bytes + begin, 0, static_cast<size_t>(end - begin));
    });
  }
  at::Tensor grad_locations = at::zeros_like(locations);
  at::Tensor grad_weights = at::zeros_like(weights);
  const int64_t work = p.batch * p.heads;
  if (work == 0 || p.queries == 0 || p.head_dim == 0) return {grad_value, grad_locations, grad_weights};
  const bool avx2 = avx2_enabled().load();
  // Single pass over (batch, head) when that gives every thread work; otherwise (e.g. batch 1 on a many-core
  // machine) the split variant: sampling gradients over (batch, query, head), then grad_value over
  // (batch, head, channel block).
  const int mode = backward_mode().load();
  const int64_t threads = at::get_num_threads();
  const bool split = mode == 2 || (mode == 0 && work < threads);
  int64_t block = p.head_dim;
  if (split) {  // halve the channel blocks until there is a task per thread (forced: >= 4 blocks, for tests)
    const int64_t target = mode == 2 ? std::max<int64_t>(threads, 4 * work) : threads;
    while (block > 4 && work * ((p.head_dim + block - 1) / block) < target) block = (block + 1) / 2;
  }
  const int64_t value_tasks = work * ((p.head_dim + block - 1) / block);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_cpu_backward", [&] {
    std::vector<scalar_t> zeros(p.head_dim, scalar_t(0));
    const scalar_t* v = value.const_data_ptr<scalar_t>();
    const scalar_t* loc = locations.const_data_ptr<scalar_t>();
    const scalar_t* att = weights.const_data_ptr<scalar_t>();
    const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
    scalar_t* gv = grad_value.mutable_data_ptr<scalar_t>();
    scalar_t* gl = grad_locations.mutable_data_ptr<scalar_t>();
    scalar_t* ga = grad_weights.mutable_data_ptr<scalar_t>();
    dispatch_head_dim(p.head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if (!split) {
        at::parallel_for(0, work, 1, [&](int64_t begin, int64_t end) {
#ifdef HF_DINO_MSDA_HAS_AVX2
          if (avx2) {
            cpu_avx2::msda_backward_range<scalar_t, D>(p, v, loc, att, g, gv, gl, ga, zeros.data(), begin, end);
            return;
          }
#endif
          (void)avx2;
          cpu_baseline::msda_backward_range<scalar_t, D>(p, v, loc, att, g, gv, gl, ga, zeros.data(), begin, end);
        });
        return;
      }
      at::parallel_for(0, p.batch * p.queries * p.heads, kForwardGrain, [&](int64_t begin, int64_t end) {
#ifdef HF_DINO_MSDA_HAS_AVX2
        if (avx2) {
          cpu_avx2::msda_backward_sampling_range<scalar_t, D>(p, v, loc, att, g, gl, ga, zeros.data(), begin, end);
          return;
        }
#endif
        cpu_baseline::msda_backward_sampling_range<scalar_t, D>(p, v, loc, att, g, gl, ga, zeros.data(), begin, end);
      });
      at::parallel_for(0, value_tasks, 1, [&](int64_t begin, int64_t end) {
#ifdef HF_DINO_MSDA_HAS_AVX2
        if (avx2) {
          cpu_avx2::msda_backward_value_range<scalar_t>(p, loc, att, g, gv, block, begin, end);
          return;
        }
#endif
        cpu_baseline::msda_backward_value_range<scalar_t>(p, loc, att, g, gv, block, begin, end);
      });
    });
  });
  return {grad_value, grad_locations, grad_weights};
}

// Which vectorised copy of the loops runs ("avx2" or "baseline"); the switch exists so tests can check both.
std::string msda_cpu_simd() { return avx2_enabled().load() ? "avx2" : "baseline"; }

bool msda_cpu_set_simd(const std::string& level) {
  if (level == "baseline") {
    avx2_enabled().store(false);
    return true;
  }
  if (level == "avx2" && cpu_has_avx2()) {
    avx2_enabled().store(true);
    return true;
  }
  return false;
}

bool msda_cpu_set_backward_mode(const std::string& mode) {
  if (mode == "auto") backward_mode().store(0);
  else if (mode == "single") backward_mode().store(1);
  else if (mode == "split") backward_mode().store(2);
  else return false;
  return true;
}

}  // namespace hf_dino_msda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hf_dino multi-scale deformable attention, CPU kernels";
  m.def("forward", &hf_dino_msda::msda_cpu_forward, "MSDA forward (CPU)");
  m.def("backward", &hf_dino_msda::msda_cpu_backward, "MSDA backward (CPU): grad value, locations, weights");
  m.def("simd", &hf_dino_msda::msda_cpu_simd, "vectorised variant in use");
  m.def("set_backward_mode", &hf_dino_msda::msda_cpu_set_backward_mode,
        "backward decomposition: 'auto', 'single' (over batch x head) or 'split'; False if unknown");
  m.def("set_simd", &hf_dino_msda::msda_cpu_set_simd, "select 'avx2' or 'baseline' loops; False if unavailable");
}
