// CPU implementation of multi-scale deformable attention (forward and backward): float32 and float64, and
// bfloat16 / float16 values read in place and summed in float32.
// Built lazily by hf_dino.kernels (torch.utils.cpp_extension.load) as a Python extension module.
#include <torch/extension.h>

#include "msda_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

namespace hf_dino_msda {

struct MsdaParams {
  int64_t batch, tokens, queries, heads, head_dim, levels, points;
  const int64_t* shapes;  // [levels, 2] (height, width)
  const int64_t* starts;  // [levels]
};

namespace cpu_baseline {
#include "msda_cpu_kernel.h"
}  // namespace cpu_baseline

// Further copies of the same loops compiled for AVX2 + FMA and for AVX-512 (F, BW, VL, DQ), selected at run time
// on CPUs that have them, so the extension stays portable (no -march=native in a possibly shared build cache)
// and still uses the widest vectors that pay off. The AVX-512 copy serves the forward only (see dispatch_simd);
// there a head's 32 channels are two 512-bit float32 vectors, or one 512-bit load of 16-bit values widened in
// registers: the encoder's forward per layer, Zen 5, 23 -> 15 ms in bfloat16 and 20 -> 17 ms in float32. Its float32
// corner set-up also runs in AVX-512 intrinsics, 16 sampling points per step (`msda_point_corners_avx512`, the same
// table bit for bit): the model's encoder layer 19.1 -> 14.8 ms in bfloat16, 23.5 -> 19.0 ms in float32 (19 of 20).
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#if !defined(__AVX2__)
#define HF_DINO_MSDA_HAS_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace cpu_avx2 {
#include "msda_cpu_kernel.h"
}  // namespace cpu_avx2
#pragma GCC pop_options
#endif
#if !defined(__AVX512F__)
#define HF_DINO_MSDA_HAS_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define HF_DINO_MSDA_AVX512_SET_UP 1  // the forward's corner set-up and bfloat16 sums in AVX-512 intrinsics
namespace cpu_avx512 {
#include "msda_cpu_kernel.h"
}  // namespace cpu_avx512
#undef HF_DINO_MSDA_AVX512_SET_UP
#pragma GCC pop_options
#endif
// The decoder's self-attention in bfloat16 (attention_cpu_kernel.h), for CPUs with AVX-512 BF16 (GCC 10 and later
// know its instructions; with an older GCC the extension builds without it and the decoder keeps aten's attention).
#if __GNUC__ >= 10
#define HF_DINO_HAS_BF16_ATTENTION 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
namespace cpu_avx512_bf16 {
#include "attention_cpu_kernel.h"
}  // namespace cpu_avx512_bf16
#pragma GCC pop_options
#endif
// The post-norm layers' residual add + LayerNorm at inference (layer_norm_cpu_kernel.h), for CPUs with AVX-512.
#define HF_DINO_HAS_AVX512_LAYER_NORM 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace cpu_avx512_layer_norm {
#include "layer_norm_cpu_kernel.h"
}  // namespace cpu_avx512_layer_norm
#pragma GCC pop_options
#endif

namespace {

// The copies of the loops, from the most portable to the widest vectors.
enum Simd : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

#ifdef HF_DINO_HAS_AVX512_LAYER_NORM  // (every x86 GCC build)
// Whether the CPU has what the AVX-512 code is compiled for: AVX-512 F, BW, VL, DQ, with AVX2 and FMA.
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

bool cpu_supports(Simd simd) {
  switch (simd) {
    case kBaseline: return true;
#ifdef HF_DINO_MSDA_HAS_AVX2
    case kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
#ifdef HF_DINO_MSDA_HAS_AVX512
    case kAvx512: return cpu_has_avx512();
#endif
    default: return false;
  }
}

Simd widest_supported() {
  for (Simd simd : {kAvx512, kAvx2}) {
    if (cpu_supports(simd)) return simd;
  }
  return kBaseline;
}

const char* simd_name(int simd) {
  switch (simd) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "baseline";
  }
}

std::atomic<int>& simd_in_use() {
  static std::atomic<int> simd{widest_supported()};
  return simd;
}

// Calls fn(Loops{}) with the copy of the loops in use, at most `kWidest` (`Loops` is one namespace's `MsdaLoops`).
// The forward takes every copy; the backward at most AVX2: its AVX-512 copy was slower (encoder backward, batch 2,
// float32, Zen 5: 163 vs 142 ms, 0 of 10 runs faster; 256-bit AVX-512 ran like AVX2 both ways), so it is not built.
template <int kWidest, typename Fn>
void dispatch_simd(Fn&& fn) {
  const int simd = std::min(simd_in_use().load(), kWidest);
#ifdef HF_DINO_MSDA_HAS_AVX512
  if constexpr (kWidest >= kAvx512) {
    if (simd == kAvx512) return fn(cpu_avx512::MsdaLoops{});
  }
#endif
#ifdef HF_DINO_MSDA_HAS_AVX2
  if (simd >= kAvx2) return fn(cpu_avx2::MsdaLoops{});
#endif
  (void)simd;
  fn(cpu_baseline::MsdaLoops{});
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

// Items whose sampling locations the forward from offsets computes at a time (a few KB, in cache).
constexpr int64_t kOffsetsBlock = 64;

// Forward with values stored as V and everything computed in T (see msda_cpu_kernel.h), on the locations `loc` and
// weights `att`, or, given `block_geometry(loops, first, last, locations, weights)`, on the locations and weights it
// writes for each block of kOffsetsBlock items into small buffers with the chosen copy of the loops (the forward from
// offsets; `loc` and `att` are then unused).
template <typename T, typename V, typename BlockGeometry = std::nullptr_t>
void forward_typed(const MsdaParams& p, const at::Tensor& value, const T* loc, const T* att, at::Tensor& output,
                   BlockGeometry block_geometry = nullptr) {
  const int64_t work = p.batch * p.queries * p.heads, lp = p.levels * p.points;
  std::vector<V> zeros(p.head_dim, V(0));
  const V* v = value.const_data_ptr<V>();
  V* out = output.mutable_data_ptr<V>();
  dispatch_simd<kAvx512>([&](auto loops) {
    using Loops = decltype(loops);
    dispatch_head_dim(p.head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      at::parallel_for(0, work, kForwardGrain, [&](int64_t begin, int64_t end) {
        std::vector<T> scratch(D > 0 ? 0 : p.head_dim);
        if constexpr (std::is_same<BlockGeometry, std::nullptr_t>::value) {
          Loops::template forward<T, V, D>(p, v, loc, att, out, zeros.data(), scratch.data(), begin, end);
        } else {
          std::vector<T> locations(kOffsetsBlock * lp * 2), weights(kOffsetsBlock * lp);
          for (int64_t first = begin; first < end; first += kOffsetsBlock) {
            const int64_t last = std::min(end, first + kOffsetsBlock);
            block_geometry(loops, first, last, locations.data(), weights.data());
            Loops::template forward<T, V, D>(p, v, locations.data(), weights.data(), out, zeros.data(),
                                             scratch.data(), first, last, first);
          }
        }
      });
    });
  });
}

// Whether the backward runs the split variant: forced, or automatically when there are fewer (batch, head)
// pairs than threads (e.g. batch 1 on a many-core machine).
bool backward_splits(const MsdaParams& p) {
  const int mode = backward_mode().load();
  return mode == 2 || (mode == 0 && p.batch * p.heads < at::get_num_threads());
}

// Backward with values stored as V and everything (grad_value included) computed in T.
// `split`: backward_splits(p), decided once by the caller (it also decides how grad_value is allocated).
template <typename T, typename V>
void backward_typed(const MsdaParams& p, bool split, const at::Tensor& value, const at::Tensor& locations,
                    const at::Tensor& weights, const at::Tensor& grad_output, at::Tensor& grad_value,
                    at::Tensor& grad_locations, at::Tensor& grad_weights) {
  const int64_t work = p.batch * p.heads;
  // Single pass over (batch, head) when that gives every thread work; otherwise (e.g. batch 1 on a many-core
  // machine) the split variant: sampling gradients over (batch, query, head), then grad_value over
  // (batch, head, channel block).
  const int mode = backward_mode().load();
  const int64_t threads = at::get_num_threads();
  int64_t block = p.head_dim;
  if (split) {  // halve the channel blocks until there is a task per thread (forced: >= 4 blocks, for tests)
    const int64_t target = mode == 2 ? std::max<int64_t>(threads, 4 * work) : threads;
    while (block > 4 && work * ((p.head_dim + block - 1) / block) < target) block = (block + 1) / 2;
  }
  const int64_t value_tasks = work * ((p.head_dim + block - 1) / block);
  // gather a (batch, head)'s value rows into a compact block when the queries sample them several times each
  const bool stage_value = p.queries * p.levels * p.points >= 2 * p.tokens;
  std::vector<V> zeros(p.head_dim, V(0));
  const V* v = value.const_data_ptr<V>();
  const T* loc = locations.const_data_ptr<T>();
  const T* att = weights.const_data_ptr<T>();
  const T* g = grad_output.const_data_ptr<T>();
  T* gv = grad_value.mutable_data_ptr<T>();
  T* gl = grad_locations.mutable_data_ptr<T>();
  T* ga = grad_weights.mutable_data_ptr<T>();
  dispatch_simd<kAvx2>([&](auto loops) {
    using Loops = decltype(loops);
    dispatch_head_dim(p.head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if (!split) {
        at::parallel_for(0, work, 1, [&](int64_t begin, int64_t end) {
          // per thread: the task's grad_value rows, and its value rows when they are read several times each
          std::vector<T> grad_scratch(p.tokens * p.head_dim);
          std::vector<V> value_scratch(stage_value ? p.tokens * p.head_dim : 0);
          V* vs = stage_value ? value_scratch.data() : nullptr;
          Loops::template backward<T, V, D>(p, v, loc, att, g, gv, gl, ga, zeros.data(), vs, grad_scratch.data(),
                                            begin, end);
        });
        return;
      }
      at::parallel_for(0, p.batch * p.queries * p.heads, kForwardGrain, [&](int64_t begin, int64_t end) {
        Loops::template backward_sampling<T, V, D>(p, v, loc, att, g, gl, ga, zeros.data(), begin, end);
      });
      at::parallel_for(0, value_tasks, 1, [&](int64_t begin, int64_t end) {
        Loops::template backward_value<T>(p, loc, att, g, gv, block, begin, end);
      });
    });
  });
}

bool is_half(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf; }

// A zero-filled tensor, zeroed by all threads (the first touch, i.e. the page faults, dominates small calls).
at::Tensor parallel_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  auto* bytes = static_cast<char*>(out.data_ptr());
  const int64_t size = out.numel() * out.element_size();
  at::parallel_for(0, size, int64_t(1) << 18, [&](int64_t begin, int64_t end) {
    std::memset(bytes + begin, 0, static_cast<size_t>(end - begin));
  });
  return out;
}

// The inputs as the loops read them, checked: contiguous; a 16-bit value is computed in float32, its (small) locations
// and weights widened, the value itself not. `p` points into `shapes` and `starts`, which this struct keeps alive.
struct MsdaInputs {
  at::Tensor value, shapes, starts, locations, weights;
  at::ScalarType compute_type;
  MsdaParams p;
};

MsdaInputs prepare_inputs(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                          const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
               /*float_geometry_for_half_value=*/true);
  TORCH_CHECK(value.device().is_cpu(), op, ": inputs must be on the CPU");
  MsdaInputs in;
  in.value = value.contiguous();
  in.shapes = spatial_shapes.contiguous();
  in.starts = level_start_index.contiguous();
  in.compute_type = is_half(in.value) ? at::kFloat : in.value.scalar_type();
  in.locations = sampling_locations.to(in.compute_type).contiguous();
  in.weights = attention_weights.to(in.compute_type).contiguous();
  in.p = make_params(in.value, in.shapes, in.starts, in.locations);
  return in;
}

}  // namespace

// value: float32, float64, bfloat16 or float16; locations and weights: value's dtype, or float32 with a
// bfloat16 / float16 value (the kernel then reads the 16-bit values and sums in float32). Output: value's dtype.
at::Tensor msda_cpu_forward(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                            const at::Tensor& level_start_index_in, const at::Tensor& sampling_locations_in,
                            const at::Tensor& attention_weights_in) {
  const MsdaInputs in = prepare_inputs("msda_cpu_forward", value_in, spatial_shapes_in, level_start_index_in,
                                      sampling_locations_in, attention_weights_in);
  const MsdaParams& p = in.p;
  at::Tensor output = at::empty({p.batch, p.queries, p.heads * p.head_dim}, in.value.options());
  if (p.batch * p.queries * p.heads == 0 || p.head_dim == 0) return output.zero_();
  switch (in.value.scalar_type()) {
    case at::kFloat:
      forward_typed<float, float>(p, in.value, in.locations.const_data_ptr<float>(),
                                  in.weights.const_data_ptr<float>(), output);
      break;
    case at::kDouble:
      forward_typed<double, double>(p, in.value, in.locations.const_data_ptr<double>(),
                                    in.weights.const_data_ptr<double>(), output);
      break;
    case at::kBFloat16:
      forward_typed<float, c10::BFloat16>(p, in.value, in.locations.const_data_ptr<float>(),
                                          in.weights.const_data_ptr<float>(), output);
      break;
    case at::kHalf:
      forward_typed<float, c10::Half>(p, in.value, in.locations.const_data_ptr<float>(),
                                      in.weights.const_data_ptr<float>(), output);
      break;
    default: TORCH_CHECK(false, "msda_cpu_forward: unsupported dtype ", in.value.scalar_type());
  }
  return output;
}

// msda_cpu_forward with sampling_locations = reference_points[:, :, None, :, None] + sampling_offsets / (w_l, h_l)
// and attention_weights = softmax of attention_logits over levels x points, both computed in float32 block by block
// inside the loops (`msda_block_geometry`), without the [B, Q, H, L, P, 2] locations and [B, Q, H, L, P] weights
// tensors. reference_points: [B, Q, L, 2] float32; sampling_offsets: [B, Q, H, L, P, 2] and attention_logits:
// [B, Q, H, L, P], both in value's dtype (float32, bfloat16, float16). Inference only (no backward).
at::Tensor msda_cpu_forward_from_offsets(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                         const at::Tensor& level_start_index_in, const at::Tensor& reference_in,
                                         const at::Tensor& offsets_in, const at::Tensor& logits_in) {
  TORCH_CHECK(value_in.device().is_cpu(), "msda_cpu_forward_from_offsets: inputs must be on the CPU");
  TORCH_CHECK(offsets_in.scalar_type() == value_in.scalar_type() && logits_in.scalar_type() == value_in.scalar_type() &&
                  value_in.scalar_type() != at::kDouble,
              "msda_cpu_forward_from_offsets: sampling_offsets and attention_logits must have value's dtype (float32 "
              "or 16-bit)");
  TORCH_CHECK(reference_in.scalar_type() == at::kFloat && reference_in.dim() == 4 && reference_in.size(3) == 2 &&
                  reference_in.size(0) == offsets_in.size(0) && reference_in.size(1) == offsets_in.size(1) &&
                  reference_in.size(2) == offsets_in.size(3),
              "msda_cpu_forward_from_offsets: reference_points must be float32 [batch, queries, levels, 2], got ",
              reference_in.sizes());
  TORCH_CHECK(logits_in.dim() == 5 && offsets_in.dim() == 6 && logits_in.sizes() == offsets_in.sizes().slice(0, 5),
              "msda_cpu_forward_from_offsets: attention_logits must be [batch, queries, heads, levels, points] as "
              "sampling_offsets without its last dimension, got ", logits_in.sizes(), " and ", offsets_in.sizes());
  // msda_cpu_forward's checks, on float32 stand-ins of the locations' and the logits' shapes (no memory of their own)
  const at::Tensor locations_like = at::zeros({1}, offsets_in.options().dtype(at::kFloat)).expand(offsets_in.sizes());
  const at::Tensor weights_like = at::zeros({1}, logits_in.options().dtype(at::kFloat)).expand(logits_in.sizes());
  check_inputs(value_in, spatial_shapes_in, level_start_index_in, locations_like, weights_like,
               /*float_geometry_for_half_value=*/true);
  const at::Tensor value = value_in.contiguous(), shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous(), reference = reference_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous(), logits = logits_in.contiguous();
  const MsdaParams p = make_params(value, shapes, starts, locations_like);
  at::Tensor output = at::empty({p.batch, p.queries, p.heads * p.head_dim}, value.options());
  if (p.batch * p.queries * p.heads == 0 || p.head_dim == 0) return output.zero_();
  const float* ref = reference.const_data_ptr<float>();
  const auto run = [&](auto type) {  // the value's, the offsets' and the logits' type
    using V = decltype(type);
    const V* off = offsets.const_data_ptr<V>();
    const V* z = logits.const_data_ptr<V>();
    forward_typed<float, V>(p, value, nullptr, nullptr, output,
                            [&](auto loops, int64_t first, int64_t last, float* locations, float* weights) {
                              decltype(loops)::template block_geometry<V>(p, ref, off, z, first, last, locations,
                                                                          weights);
                            });
  };
  switch (value.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "msda_cpu_forward_from_offsets: unsupported dtype ", value.scalar_type());
  }
  return output;
}

// Gradients in the dtypes of the inputs they belong to; a 16-bit grad_value is accumulated in float32 and
// rounded once at the end.
std::vector<at::Tensor> msda_cpu_backward(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                          const at::Tensor& level_start_index_in,
                                          const at::Tensor& sampling_locations_in,
                                          const at::Tensor& attention_weights_in, const at::Tensor& grad_output_in) {
  const MsdaInputs in = prepare_inputs("msda_cpu_backward", value_in, spatial_shapes_in, level_start_index_in,
                                      sampling_locations_in, attention_weights_in);
  const MsdaParams& p = in.p;
  TORCH_CHECK(grad_output_in.numel() == p.batch * p.queries * p.heads * p.head_dim,
              "msda_cpu_backward: grad_output has ", grad_output_in.numel(), " elements, expected ",
              p.batch * p.queries * p.heads * p.head_dim);
  const at::Tensor grad_output = grad_output_in.to(in.compute_type).contiguous();
  const bool runs = p.batch * p.heads != 0 && p.queries != 0 && p.head_dim != 0;
  const bool split = backward_splits(p);
  // the single pass writes every grad_value element once; the split variant accumulates into zeros
  at::Tensor grad_value = runs && !split
                              ? at::empty(in.value.sizes(), in.value.options().dtype(in.compute_type))
                              : parallel_zeros(in.value.sizes(), in.value.options().dtype(in.compute_type));
  at::Tensor grad_locations = at::zeros_like(in.locations);
  at::Tensor grad_weights = at::zeros_like(in.weights);
  if (runs) {
    // T: the type the loops compute in, V: the value's storage type
    const auto run = [&](auto compute_tag, auto value_tag) {
      backward_typed<decltype(compute_tag), decltype(value_tag)>(p, split, in.value, in.locations, in.weights,
                                                                 grad_output, grad_value, grad_locations, grad_weights);
    };
    switch (in.value.scalar_type()) {
      case at::kFloat: run(float{}, float{}); break;
      case at::kDouble: run(double{}, double{}); break;
      case at::kBFloat16: run(float{}, c10::BFloat16{}); break;
      case at::kHalf: run(float{}, c10::Half{}); break;
      default: TORCH_CHECK(false, "msda_cpu_backward: unsupported dtype ", in.value.scalar_type());
    }
  }
  return {grad_value.to(in.value.scalar_type()), grad_locations.to(sampling_locations_in.scalar_type()),
          grad_weights.to(attention_weights_in.scalar_type())};
}

// Which vectorised copy of the loops runs ("avx512", "avx2" or "baseline"; the widest the CPU supports unless
// set_simd chose another); the switch exists so tests can check every copy this CPU can run.
std::string msda_cpu_simd() { return simd_name(simd_in_use().load()); }

bool msda_cpu_set_simd(const std::string& level) {
  for (Simd simd : {kBaseline, kAvx2, kAvx512}) {
    if (level == simd_name(simd)) {
      if (!cpu_supports(simd)) return false;
      simd_in_use().store(simd);
      return true;
    }
  }
  return false;
}

// Whether attention_cpu_forward runs here: an x86 GCC build on a CPU with AVX-512 (F, BW, VL, DQ) and AVX-512 BF16.
bool attention_cpu_supported() {
#ifdef HF_DINO_HAS_BF16_ATTENTION
  static const bool supported = [] {
    __builtin_cpu_init();
    return cpu_supports(kAvx512) && __builtin_cpu_supports("avx512bf16");
  }();
  return supported;
#else
  return false;
#endif
}

// Softmax attention (scale 1 / sqrt(32)), no mask, of bfloat16 query [B, L, H * 32], key and value [B, S, H * 32]
// (any row strides, channels contiguous) -> [B, L, H * 32] bfloat16; see attention_cpu_kernel.h.
at::Tensor attention_cpu_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                 int64_t heads) {
  TORCH_CHECK(attention_cpu_supported(), "attention_cpu_forward: needs a CPU with AVX-512 BF16 (and a GCC x86 build)");
  for (const at::Tensor* t : {&query, &key, &value}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->dim() == 3 && t->stride(2) == 1,
                "attention_cpu_forward: query, key and value must be 3-D bfloat16 CPU tensors with contiguous "
                "channels");
  }
  const int64_t batch = query.size(0), queries = query.size(1), keys = key.size(1), width = query.size(2);
  TORCH_CHECK(heads > 0 && width == heads * 32, "attention_cpu_forward: the channels must be heads x 32, got ", width,
              " for ", heads, " heads");
  TORCH_CHECK(key.size(0) == batch && value.size(0) == batch && key.size(2) == width && value.size(2) == width &&
                  value.size(1) == keys,
              "attention_cpu_forward: key and value must be [", batch, ", S, ", width, "] alike");
  at::Tensor output = at::empty({batch, queries, width}, query.options());
  if (batch * queries == 0) return output;
  TORCH_CHECK(keys > 0, "attention_cpu_forward: no keys to attend to");
#ifdef HF_DINO_HAS_BF16_ATTENTION
  using namespace cpu_avx512_bf16;
  const auto* q = reinterpret_cast<const uint16_t*>(query.const_data_ptr<at::BFloat16>());
  const auto* k = reinterpret_cast<const uint16_t*>(key.const_data_ptr<at::BFloat16>());
  const auto* v = reinterpret_cast<const uint16_t*>(value.const_data_ptr<at::BFloat16>());
  auto* out = reinterpret_cast<uint16_t*>(output.mutable_data_ptr<at::BFloat16>());
  std::vector<AttentionHead> packed(batch * heads);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / heads, h = t % heads;
      packed[t].pack(k + b * key.stride(0) + h * 32, key.stride(1), v + b * value.stride(0) + h * 32, value.stride(1),
                     keys);
    }
  });
  // tasks of up to 64 queries of one (batch, head), so that a single image's 8 heads keep more than 8 cores busy
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (queries + kChunk - 1) / kChunk;
  const float scale = 1.0f / std::sqrt(32.0f);
  at::parallel_for(0, batch * heads * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / chunks, b = bh / heads, h = bh % heads, first = (t % chunks) * kChunk;
      attention_queries(q + b * query.stride(0) + h * 32, query.stride(1), packed[bh], scale,
                        out + b * queries * width + h * 32, width, first, std::min(first + kChunk, queries));
    }
  });
#endif
  return output;
}

// Whether residual_layer_norm_cpu runs here: an x86 GCC build on a CPU with AVX-512 (F, BW, VL, DQ).
bool layer_norm_cpu_supported() {
#ifdef HF_DINO_HAS_AVX512_LAYER_NORM
  static const bool supported = cpu_has_avx512();
  return supported;
#else
  return false;
#endif
}

// LayerNorm(residual + update) over the last dimension (a multiple of 16): residual [..., dim] float32 or bfloat16,
// update of its shape in its dtype or bfloat16 (next to a float32 residual), weight and bias [dim] in the residual's
// dtype or float32 (next to a bfloat16 residual) -> a new contiguous tensor like residual; see
// layer_norm_cpu_kernel.h.
at::Tensor residual_layer_norm_cpu(const at::Tensor& residual_in, const at::Tensor& update_in,
                                   const at::Tensor& weight_in, const at::Tensor& bias_in, double eps) {
  TORCH_CHECK(layer_norm_cpu_supported(), "residual_layer_norm_cpu: needs a CPU with AVX-512 (and a GCC x86 build)");
  const auto type = residual_in.scalar_type();
  TORCH_CHECK(residual_in.device().is_cpu() && (type == at::kFloat || type == at::kBFloat16),
              "residual_layer_norm_cpu: residual must be a float32 or bfloat16 CPU tensor, got ", type);
  TORCH_CHECK(update_in.device().is_cpu() && update_in.sizes() == residual_in.sizes() &&
                  (update_in.scalar_type() == type || update_in.scalar_type() == at::kBFloat16),
              "residual_layer_norm_cpu: update must be a CPU tensor of residual's shape ", residual_in.sizes(),
              " in its dtype or bfloat16, got ", update_in.scalar_type(), " ", update_in.sizes());
  const int64_t dim = residual_in.dim() > 0 ? residual_in.size(-1) : 0;
  TORCH_CHECK(dim > 0 && dim % 16 == 0, "residual_layer_norm_cpu: the last dimension must be a positive multiple of "
              "16, got ", residual_in.sizes());
  const auto parameter_type = weight_in.scalar_type();
  for (const at::Tensor* t : {&weight_in, &bias_in}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == parameter_type && t->dim() == 1 && t->size(0) == dim &&
                    (parameter_type == type || parameter_type == at::kFloat),
                "residual_layer_norm_cpu: weight and bias must be [", dim, "] CPU tensors of one dtype, the residual's "
                "(", type, ") or float32, got ", t->scalar_type(), " ", t->sizes());
  }
  const at::Tensor residual = residual_in.contiguous(), update = update_in.contiguous();
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor output = at::empty(residual.sizes(), residual.options());
  const int64_t rows = residual.numel() / dim;
#ifdef HF_DINO_HAS_AVX512_LAYER_NORM
  auto run = [&](auto residual_value, auto update_value, auto parameter_value) {  // (values of the three types)
    using R = decltype(residual_value);
    using U = decltype(update_value);
    using W = decltype(parameter_value);
    const R* r = residual.const_data_ptr<R>();
    const U* u = update.const_data_ptr<U>();
    const W* w = weight.const_data_ptr<W>();
    const W* b = bias.const_data_ptr<W>();
    R* o = output.mutable_data_ptr<R>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> row(dim);
      cpu_avx512_layer_norm::residual_layer_norm_rows(r + begin * dim, u + begin * dim, w, b, o + begin * dim,
                                                      end - begin, dim, static_cast<float>(eps), row.data());
    });
  };
  if (type == at::kFloat) {
    if (update.scalar_type() == at::kFloat) run(float{}, float{}, float{});
    else run(float{}, c10::BFloat16{}, float{});
  } else {
    if (parameter_type == at::kFloat) run(c10::BFloat16{}, c10::BFloat16{}, float{});
    else run(c10::BFloat16{}, c10::BFloat16{}, c10::BFloat16{});
  }
#endif
  return output;
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
  m.def("forward_from_offsets", &hf_dino_msda::msda_cpu_forward_from_offsets,
        "MSDA forward from reference points, sampling offsets and attention logits (CPU, inference)");
  m.def("backward", &hf_dino_msda::msda_cpu_backward, "MSDA backward (CPU): grad value, locations, weights");
  m.def("simd", &hf_dino_msda::msda_cpu_simd, "vectorised variant in use");
  m.def("set_backward_mode", &hf_dino_msda::msda_cpu_set_backward_mode,
        "backward decomposition: 'auto', 'single' (over batch x head) or 'split'; False if unknown");
  m.def("attention", &hf_dino_msda::attention_cpu_forward,
        "softmax attention of bfloat16 [B, L, H * 32] queries, [B, S, H * 32] keys / values (AVX-512 BF16)");
  m.def("attention_supported", &hf_dino_msda::attention_cpu_supported, "whether `attention` runs on this CPU");
  m.def("residual_layer_norm", &hf_dino_msda::residual_layer_norm_cpu,
        "LayerNorm(residual + update) over rows of a multiple of 16 channels, float32 or bfloat16 (AVX-512)");
  m.def("layer_norm_supported", &hf_dino_msda::layer_norm_cpu_supported,
        "whether `residual_layer_norm` runs on this CPU");
  m.def("set_simd", &hf_dino_msda::msda_cpu_set_simd,
        "select 'avx512', 'avx2' or 'baseline' loops; False if unavailable");
}
