// Multi-scale deformable attention (MSDA): shared declarations and input checks.
//
// Layouts (all contiguous, row-major):
//   value               [B, S, H, D]      S = sum_l H_l * W_l, levels stored one after the other
//   spatial_shapes      [L, 2]  int64     (H_l, W_l)
//   level_start_index   [L]     int64     offset of level l in S
//   sampling_locations  [B, Q, H, L, P, 2] normalised (x, y); the pixel grid of a level spans [0, 1]
//   attention_weights   [B, Q, H, L, P]
//   output              [B, Q, H * D]
//
// Sampling is bilinear with zero padding and align_corners=False, i.e. exactly
// torch.nn.functional.grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False):
// the continuous pixel coordinate is (x * W_l - 0.5, y * H_l - 0.5) and each of the four neighbouring
// pixels contributes only when it lies inside the level.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace hf_dino_msda {

// `float_geometry_for_half_value`: a bfloat16 / float16 value may come with float32 sampling locations and
// attention weights (the CPU kernel computes in float32 then); otherwise all three share one dtype.
inline void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                         const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                         bool float_geometry_for_half_value = false) {
  TORCH_CHECK(value.dim() == 4, "msda: value must be [batch, tokens, heads, head_dim], got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, "msda: spatial_shapes must be [levels, 2], got ",
              spatial_shapes.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "msda: spatial_shapes must be int64");
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, "msda: level_start_index must be int64");
  const int64_t levels = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == levels,
              "msda: level_start_index must be [levels]");
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "msda: sampling_locations must be [batch, queries, heads, levels, points, 2], got ", sampling_locations.sizes());
  TORCH_CHECK(sampling_locations.size(0) == value.size(0) && sampling_locations.size(2) == value.size(2) &&
                  sampling_locations.size(3) == levels,
              "msda: sampling_locations ", sampling_locations.sizes(), " do not match value ", value.sizes(), " and ",
              levels, " levels");
  TORCH_CHECK(attention_weights.dim() == 5, "msda: attention_weights must be [batch, queries, heads, levels, points]");
  for (int d = 0; d < 5; ++d) {
    TORCH_CHECK(attention_weights.size(d) == sampling_locations.size(d), "msda: attention_weights ",
                attention_weights.sizes(), " do not match sampling_locations ", sampling_locations.sizes());
  }
  const bool half_value = value.scalar_type() == at::kBFloat16 || value.scalar_type() == at::kHalf;
  if (float_geometry_for_half_value && half_value) {
    TORCH_CHECK(sampling_locations.scalar_type() == at::kFloat && attention_weights.scalar_type() == at::kFloat,
                "msda: with a ", value.scalar_type(), " value, sampling_locations and attention_weights must be float32");
  } else {
    TORCH_CHECK(value.scalar_type() == sampling_locations.scalar_type() &&
                    value.scalar_type() == attention_weights.scalar_type(),
                "msda: value, sampling_locations and attention_weights must share a dtype");
  }
  TORCH_CHECK(value.device() == sampling_locations.device() && value.device() == attention_weights.device() &&
                  value.device() == spatial_shapes.device() && value.device() == level_start_index.device(),
              "msda: all inputs must be on the same device");
  // The levels must tile `value`'s tokens exactly: the loops index value rows by level_start_index and the level's
  // (H, W), so a mismatch would read outside `value`. Checked where the shapes are host memory (the CPU kernel; the
  // CUDA kernel, like the original's, trusts them rather than synchronising the device).
  if (spatial_shapes.device().is_cpu()) {
    const auto shapes = spatial_shapes.contiguous();
    const auto starts = level_start_index.contiguous();
    const int64_t* hw = shapes.data_ptr<int64_t>();
    const int64_t* start = starts.data_ptr<int64_t>();
    int64_t tokens = 0;
    for (int64_t l = 0; l < levels; ++l) {
      TORCH_CHECK(hw[2 * l] >= 0 && hw[2 * l + 1] >= 0, "msda: spatial_shapes must be non-negative, got ", shapes);
      TORCH_CHECK(start[l] == tokens, "msda: level_start_index must be the running sum of the levels' H * W (",
                  tokens, " for level ", l, "), got ", starts);
      tokens += hw[2 * l] * hw[2 * l + 1];
    }
    TORCH_CHECK(tokens == value.size(1), "msda: spatial_shapes ", shapes, " give ", tokens,
                " tokens, but value has ", value.size(1));
  }
}

}  // namespace hf_dino_msda
