// The residual add and LayerNorm of a post-norm transformer layer, `LayerNorm(residual + update)` over rows of `dim`
// channels (a multiple of 16), in one pass over the rows, for CPUs with AVX-512 (F, BW). Included by msda_cpu.cpp
// inside a `#pragma GCC target(... avx512bw ...)` region; the caller checks the CPU (layer_norm_cpu_supported).
//
// Per row: the sum residual + update in float32, rounded to the residual's type (as the unfused add rounds it), kept
// in `row`; its mean and variance by the corrected two-pass algorithm (a second pass over the row in cache sums the
// deviations from the first pass's mean and their squares; their mean corrects the mean); then
// (x - mean) / sqrt(variance + eps) * weight + bias, rounded once to the output's type. This is LayerNorm's arithmetic in float32 with another order of the sums than aten's: outputs
// within a few float32 ulps of aten's (as close to float64 or closer), in bfloat16 aten's but for rare ties. The
// unfused pair on the CPU writes the sum to memory and reads it back, and aten's bfloat16 LayerNorm is slower than
// its float32 one: in the model on Zen 5, [20097, 256] per call, float32 ~5 -> ~2.4 ms, bfloat16 ~2.6 -> ~1.7 ms.
//
// Types: `R` is the residual's and the output's type (float or c10::BFloat16), `U` the update's (R, or c10::BFloat16
// next to a float32 residual), `W` the weight's and the bias's (R, or float next to a bfloat16 residual). Under CPU
// autocast to bfloat16 a layer's products are bfloat16 and its LayerNorm parameters float32.

inline __m512 norm_load(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 norm_load(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// bfloat16 bits of 16 floats in the low halves of 32-bit lanes, rounded to nearest even, NaN as 0x7FC0 (the rounding
// of c10::BFloat16)
inline __m512i norm_bfloat16_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lowest_kept = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lowest_kept), 16);
  return _mm512_mask_mov_epi32(_mm512_set1_epi32(0x7FC0), _mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), rounded);
}

inline __m512 norm_rounded(__m512 x, const float*) { return x; }

inline __m512 norm_rounded(__m512 x, const c10::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(norm_bfloat16_bits(x), 16));
}

inline void norm_store(float* p, __m512 x) { _mm512_storeu_ps(p, x); }

inline void norm_store(c10::BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(norm_bfloat16_bits(x)));
}

// Rows [0, rows) of `residual` and `update` ([rows, dim], contiguous) -> `output`; `row` is scratch for `dim` floats.
template <typename R, typename U, typename W>
void residual_layer_norm_rows(const R* residual, const U* update, const W* weight, const W* bias, R* output,
                              int64_t rows, int64_t dim, float eps, float* row) {
  const float count = static_cast<float>(dim);
  for (int64_t i = 0; i < rows; ++i) {
    const R* r = residual + i * dim;
    const U* u = update + i * dim;
    // two accumulators (even and odd vectors of the row), so that the adds of one do not wait on the other's
    __m512 sums[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < dim; k += 16) {
      const __m512 x = norm_rounded(_mm512_add_ps(norm_load(r + k), norm_load(u + k)), r);
      _mm512_storeu_ps(row + k, x);
      sums[(k >> 4) & 1] = _mm512_add_ps(sums[(k >> 4) & 1], x);
    }
    const float rough_mean = _mm512_reduce_add_ps(_mm512_add_ps(sums[0], sums[1])) / count;
    // the corrected two-pass variance: the deviations from the first pass's mean, their sum (the rounding error of
    // that mean, which the mean is corrected by: a row's mean far from 0 costs no accuracy) and their squares
    const __m512 rough = _mm512_set1_ps(rough_mean);
    __m512 squares[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    sums[0] = sums[1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < dim; k += 16) {
      const __m512 deviation = _mm512_sub_ps(_mm512_loadu_ps(row + k), rough);
      sums[(k >> 4) & 1] = _mm512_add_ps(sums[(k >> 4) & 1], deviation);
      squares[(k >> 4) & 1] = _mm512_fmadd_ps(deviation, deviation, squares[(k >> 4) & 1]);
    }
    const float correction = _mm512_reduce_add_ps(_mm512_add_ps(sums[0], sums[1])) / count;
    const float variance =
        _mm512_reduce_add_ps(_mm512_add_ps(squares[0], squares[1])) / count - correction * correction;
    const __m512 mean = _mm512_set1_ps(rough_mean + correction);
    const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(std::max(variance, 0.0f) + eps));
    R* o = output + i * dim;
    for (int64_t k = 0; k < dim; k += 16) {
      const __m512 normalized = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row + k), mean), scale);
      norm_store(o + k, _mm512_fmadd_ps(normalized, norm_load(weight + k), norm_load(bias + k)));
    }
  }
}
