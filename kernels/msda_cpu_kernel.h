// CPU inner loops of multi-scale deformable attention, on raw pointers.
//
// This header is deliberately free of includes and namespaces: msda_cpu.cpp includes it several times,
// each time inside its own namespace and (on x86 with GCC) under a different `#pragma GCC target`, to get
// a baseline build, an AVX2/FMA build and an AVX-512 build of the same loops, chosen at run time. Everything
// here must therefore be templates / inline functions that only use what the caller includes (<algorithm>,
// <cmath>, <cstdint>, <cstring>, <limits>, <type_traits>, <vector>, and <immintrin.h> for the AVX-512 copy's set-up,
// compiled only where the caller defines HF_DINO_MSDA_AVX512_SET_UP). `MsdaLoops` at the end bundles one copy's entry
// points into a type the caller can pass on.
//
// Work decomposition:
//   forward : one task per (batch, query, head); the head dimension is innermost and contiguous in both
//             `value` ([B, S, H, D]) and the output, so the per-sample update
//                 acc[0:D] += w0 * v0[0:D] + w1 * v1[0:D] + w2 * v2[0:D] + w3 * v3[0:D]
//             vectorises. The next task's rows are prefetched meanwhile.
//   backward: one task per (batch, head). A task owns grad_value[b, :, h, :] exclusively, so the scatter
//             into grad_value needs neither atomics nor per-thread buffers; sampling-location and
//             attention-weight gradients of (b, q, h) are written by the single task owning (b, h).

// Types: `T` is the type everything is computed and accumulated in (float or double), `V` the type `value` is
// stored in: T itself, or a 16-bit float (c10::BFloat16 / c10::Half) read and widened to T element by element,
// so a reduced-precision value is never copied to a wider tensor and every sum is carried in T.
//
// `MsdaParams` (sizes and the level tables) is defined by the including file, outside the namespaces.

template <typename T>
struct MsdaCorners {
  int64_t index[4];  // token index of the corners (top-left, top-right, bottom-left, bottom-right)
  T weight[4];       // bilinear weight, 0 for a corner outside the level
  bool valid[4];
  T lh, lw, hh, hw;  // fractional parts and their complements
};

// Bilinear set-up of one sampling point, grid_sample semantics (zeros padding, align_corners=False).
// Returns false when no corner can contribute (the point is at least one pixel outside, or NaN).
template <typename T>
inline bool msda_corners(T x, T y, int64_t height, int64_t width, int64_t start, MsdaCorners<T>& s) {
  const T him = y * static_cast<T>(height) - T(0.5);
  const T wim = x * static_cast<T>(width) - T(0.5);
  if (!(him >= T(-1) && wim >= T(-1) && him < static_cast<T>(height) && wim < static_cast<T>(width))) return false;
  const T hf = std::floor(him);
  const T wf = std::floor(wim);
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

// Calls fn(k, corners, height, width) for every sampling point k (levels x points) of one (query, head) that has a
// corner inside its level; `loc` holds the item's levels x points (x, y) locations.
template <typename T, typename Fn>
inline void msda_for_each_point(const MsdaParams& p, const T* loc, Fn&& fn) {
  for (int64_t l = 0; l < p.levels; ++l) {
    const int64_t height = p.shapes[2 * l], width = p.shapes[2 * l + 1], start = p.starts[l];
    for (int64_t k = l * p.points; k < (l + 1) * p.points; ++k) {
      MsdaCorners<T> s;
      if (msda_corners<T>(loc[2 * k], loc[2 * k + 1], height, width, start, s)) fn(k, s, height, width);
    }
  }
}

// acc[0:n] += w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3. GCC contracts the sum to w1 * v1, then + w0 * v0, + w2 * v2 and
// + w3 * v3 fused, which the AVX-512 copy's bfloat16 sums in intrinsics (`msda_point_sums_bf16_avx512`) repeat, so
// that every copy computes the same bits (the kernel tests compare them bit for bit; spelling the order out with
// std::fma here makes the float32 forward ~7 % slower).
template <typename T, typename V, int D>
inline void msda_axpy4(T* __restrict__ acc, const V* __restrict__ v0, const V* __restrict__ v1,
                       const V* __restrict__ v2, const V* __restrict__ v3, T w0, T w1, T w2, T w3, int64_t n) {
  const int64_t len = D > 0 ? D : n;
  for (int64_t c = 0; c < len; ++c) {
    acc[c] += w0 * static_cast<T>(v0[c]) + w1 * static_cast<T>(v1[c]) + w2 * static_cast<T>(v2[c]) +
              w3 * static_cast<T>(v3[c]);
  }
}

// dst[0:n] += w * src[0:n]
template <typename T, int D>
inline void msda_axpy(T* __restrict__ dst, const T* __restrict__ src, T w, int64_t n) {
  const int64_t len = D > 0 ? D : n;
  for (int64_t c = 0; c < len; ++c) dst[c] += w * src[c];
}

// s_k = <g, v_k> for the four corners. `omp simd reduction` lets the compiler vectorise the sums (lane-wise
// partial sums) without -ffast-math; it needs -fopenmp or -fopenmp-simd and is ignored elsewhere.
template <typename T, typename V, int D>
inline void msda_dot4(const T* __restrict__ g, const V* __restrict__ v0, const V* __restrict__ v1,
                      const V* __restrict__ v2, const V* __restrict__ v3, int64_t n, T* out) {
  const int64_t len = D > 0 ? D : n;
  T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t c = 0; c < len; ++c) {
    const T gc = g[c];
    s0 += gc * static_cast<T>(v0[c]);
    s1 += gc * static_cast<T>(v1[c]);
    s2 += gc * static_cast<T>(v2[c]);
    s3 += gc * static_cast<T>(v3[c]);
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// A hint to fetch the cache line at `address` (a no-op where the compiler has no such builtin).
inline void msda_prefetch(const void* address) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(address);
#else
  (void)address;
#endif
}

// Sampling points per (query, head) (levels x points) up to which the forward sets up the corners of all of them
// one (query, head) ahead of the row updates and prefetches their rows (`msda_point_corners`); more fall back to one
// `msda_corners` call per point, without prefetching.
constexpr int64_t kMsdaMaxBatchedPoints = 64;

template <typename T>
struct MsdaPointCorners {
  int32_t index[4][kMsdaMaxBatchedPoints];  // corner token index, -1 outside (every corner of a point outside)
  T weight[4][kMsdaMaxBatchedPoints];       // attention weight x bilinear weight (read where index is not -1)
#ifdef HF_DINO_MSDA_AVX512_SET_UP
  const char* row[4][kMsdaMaxBatchedPoints];  // its value row (`zeros` outside; 16-bit values only)
#endif
};

// The bilinear corners of all levels x points sampling points of one (query, head), from `msda_corners`: index -1
// for a corner outside its level, and at every corner of a point outside (or NaN).
template <typename T>
inline void msda_point_corners(const MsdaParams& p, const T* loc, const T* att, MsdaPointCorners<T>& c) {
  for (int e = 0; e < 4; ++e) {
    for (int64_t k = 0; k < p.levels * p.points; ++k) c.index[e][k] = -1;
  }
  msda_for_each_point<T>(p, loc, [&](int64_t k, const MsdaCorners<T>& s, int64_t, int64_t) {
    for (int e = 0; e < 4; ++e) {
      c.index[e][k] = s.valid[e] ? static_cast<int32_t>(s.index[e]) : -1;
      c.weight[e][k] = att[k] * s.weight[e];
    }
  });
}

#ifdef HF_DINO_MSDA_AVX512_SET_UP
// Each sampling point's level as the vectorised set-up reads it: height, width (as floats and as ints) and the
// level's first token, for the levels x points points of a (query, head) (level-major, as the locations).
struct MsdaPointLevels {
  float height[kMsdaMaxBatchedPoints], width[kMsdaMaxBatchedPoints];
  int32_t int_height[kMsdaMaxBatchedPoints], int_width[kMsdaMaxBatchedPoints], start[kMsdaMaxBatchedPoints];
};

inline void msda_point_levels(const MsdaParams& p, MsdaPointLevels& t) {
  for (int64_t k = 0; k < kMsdaMaxBatchedPoints; ++k) {
    const int64_t l = std::min<int64_t>(k / p.points, p.levels - 1);
    t.int_height[k] = static_cast<int32_t>(p.shapes[2 * l]);
    t.int_width[k] = static_cast<int32_t>(p.shapes[2 * l + 1]);
    t.height[k] = static_cast<float>(p.shapes[2 * l]);
    t.width[k] = static_cast<float>(p.shapes[2 * l + 1]);
    t.start[k] = static_cast<int32_t>(p.starts[l]);
  }
}

// `msda_point_corners` for float32, 16 sampling points per step in AVX-512 registers (the AVX-512 copy of the loops
// only; msda_cpu.cpp defines HF_DINO_MSDA_AVX512_SET_UP there): the same arithmetic in the same order, so the same
// table bit for bit, without the scalar set-up's branches (~25-30 % of the forward's time).
inline void msda_point_corners_avx512(const MsdaPointLevels& t, int64_t lp, const float* loc, const float* att,
                                      MsdaPointCorners<float>& c) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f);
  const __m512i outside = _mm512_set1_epi32(-1), int_one = _mm512_set1_epi32(1), int_zero = _mm512_setzero_si512();
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t k = 0; k < lp; k += 16) {
    const int64_t n = std::min<int64_t>(16, lp - k);  // points in this step; the (x, y) pairs span 2n floats
    const __mmask16 points = static_cast<__mmask16>((1u << n) - 1);
    const __mmask16 first = static_cast<__mmask16>(n >= 8 ? 0xFFFFu : (1u << (2 * n)) - 1);
    const __mmask16 second = static_cast<__mmask16>(n > 8 ? (1u << (2 * (n - 8))) - 1 : 0u);
    const __m512 xy0 = _mm512_maskz_loadu_ps(first, loc + 2 * k);
    const __m512 xy1 = _mm512_maskz_loadu_ps(second, loc + 2 * k + 16);
    const __m512 x = _mm512_permutex2var_ps(xy0, even, xy1);
    const __m512 y = _mm512_permutex2var_ps(xy0, odd, xy1);
    const __m512 height = _mm512_loadu_ps(t.height + k), width = _mm512_loadu_ps(t.width + k);
    const __m512 him = _mm512_sub_ps(_mm512_mul_ps(y, height), half);
    const __m512 wim = _mm512_sub_ps(_mm512_mul_ps(x, width), half);
    // inside: at most one pixel outside the level; false for NaN (ordered comparisons)
    const __mmask16 inside = points & _mm512_cmp_ps_mask(him, minus_one, _CMP_GE_OQ) &
                             _mm512_cmp_ps_mask(wim, minus_one, _CMP_GE_OQ) &
                             _mm512_cmp_ps_mask(him, height, _CMP_LT_OQ) & _mm512_cmp_ps_mask(wim, width, _CMP_LT_OQ);
    const __m512 hf = _mm512_roundscale_ps(him, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 wf = _mm512_roundscale_ps(wim, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512i h0 = _mm512_cvttps_epi32(hf), w0 = _mm512_cvttps_epi32(wf);
    const __m512 lh = _mm512_sub_ps(him, hf), lw = _mm512_sub_ps(wim, wf);
    const __m512 hh = _mm512_sub_ps(one, lh), hw = _mm512_sub_ps(one, lw);
    const __m512i int_height = _mm512_loadu_si512(t.int_height + k), int_width = _mm512_loadu_si512(t.int_width + k);
    const __mmask16 top = inside & _mm512_cmpge_epi32_mask(h0, int_zero);
    const __mmask16 bottom = inside & _mm512_cmplt_epi32_mask(_mm512_add_epi32(h0, int_one), int_height);
    const __mmask16 left = _mm512_cmpge_epi32_mask(w0, int_zero);
    const __mmask16 right = _mm512_cmplt_epi32_mask(_mm512_add_epi32(w0, int_one), int_width);
    const __m512i base = _mm512_add_epi32(_mm512_loadu_si512(t.start + k),
                                          _mm512_add_epi32(_mm512_mullo_epi32(h0, int_width), w0));
    const __m512 a = _mm512_maskz_loadu_ps(points, att + k);
    const __mmask16 valid[4] = {static_cast<__mmask16>(top & left), static_cast<__mmask16>(top & right),
                                static_cast<__mmask16>(bottom & left), static_cast<__mmask16>(bottom & right)};
    const __m512i index[4] = {base, _mm512_add_epi32(base, int_one), _mm512_add_epi32(base, int_width),
                              _mm512_add_epi32(base, _mm512_add_epi32(int_width, int_one))};
    const __m512 weight[4] = {_mm512_mul_ps(hh, hw), _mm512_mul_ps(hh, lw), _mm512_mul_ps(lh, hw),
                              _mm512_mul_ps(lh, lw)};
    for (int e = 0; e < 4; ++e) {
      _mm512_mask_storeu_epi32(c.index[e] + k, points, _mm512_mask_blend_epi32(valid[e], outside, index[e]));
      _mm512_mask_storeu_ps(c.weight[e] + k, points, _mm512_mask_mul_ps(zero, valid[e], a, weight[e]));
    }
  }
}

// The value rows of the corners in `c` (`vbase` + index x `row_stride` bytes; `zeros` for a corner outside), eight
// at a time in AVX-512 registers: the forward of 16-bit values prefetches and sums from this table instead of turning
// each index into an address twice, with a branch each time (its prefetch loop was ~30 % of its instructions).
inline void msda_corner_rows_avx512(MsdaPointCorners<float>& c, int64_t lp, const char* vbase, int64_t row_stride,
                                    const char* zeros) {
  const __m512i base = _mm512_set1_epi64(reinterpret_cast<int64_t>(vbase));
  const __m512i outside = _mm512_set1_epi64(reinterpret_cast<int64_t>(zeros));
  const __m512i stride = _mm512_set1_epi64(row_stride);
  for (int e = 0; e < 4; ++e) {
    for (int64_t k = 0; k < lp; k += 8) {
      const __mmask8 points = static_cast<__mmask8>(lp - k >= 8 ? 0xFFu : (1u << (lp - k)) - 1);
      const __m256i index = _mm256_maskz_loadu_epi32(points, c.index[e] + k);
      const __mmask8 inside = points & _mm256_cmpge_epi32_mask(index, _mm256_setzero_si256());
      const __m512i address = _mm512_add_epi64(base, _mm512_mullo_epi64(_mm512_cvtepi32_epi64(index), stride));
      _mm512_mask_storeu_epi64(c.row[e] + k, points, _mm512_mask_blend_epi64(inside, outside, address));
    }
  }
}

// The batched forward's sums for a head of 32 bfloat16 channels: acc[0:32] = sum over the points k of (w0 v0 + w1 v1
// + w2 v2 + w3 v3), each point's four products summed first and then added, in the order GCC gives `msda_axpy4`
// (w1 v1, then w0 v0, w2 v2 and w3 v3 fused), so the same bits as every other copy and as float32. A row's 32
// channels are 16 32-bit words: the even channels are the words shifted left by 16 bits, the odd ones the words with
// their low half cleared, which makes float32 of them in two operations per row instead of GCC's five for widening
// them in order; even and odd channels are summed apart and interleaved once at the end.
inline void msda_point_sums_bf16_avx512(const MsdaPointCorners<float>& c, int64_t lp, float* acc) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
  for (int64_t k = 0; k < lp; ++k) {
    if ((c.index[0][k] & c.index[1][k] & c.index[2][k] & c.index[3][k]) < 0) continue;  // the point is outside
    __m512 point_even = _mm512_setzero_ps(), point_odd = _mm512_setzero_ps();
    for (int e : {1, 0, 2, 3}) {  // the order of msda_axpy4
      const __m512i words = _mm512_loadu_si512(c.row[e][k]);
      const __m512 w = _mm512_set1_ps(c.weight[e][k]);
      const __m512 row_even = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
      const __m512 row_odd = _mm512_castsi512_ps(_mm512_and_si512(words, high_half));
      point_even = e == 1 ? _mm512_mul_ps(w, row_even) : _mm512_fmadd_ps(w, row_even, point_even);
      point_odd = e == 1 ? _mm512_mul_ps(w, row_odd) : _mm512_fmadd_ps(w, row_odd, point_odd);
    }
    even = _mm512_add_ps(even, point_even);
    odd = _mm512_add_ps(odd, point_odd);
  }
  const __m512i low_channels = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i high_channels = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  _mm512_storeu_ps(acc, _mm512_permutex2var_ps(even, low_channels, odd));
  _mm512_storeu_ps(acc + 16, _mm512_permutex2var_ps(even, high_channels, odd));
}
#endif

// The softmax of `n` logits into float32 `w` (aten's arithmetic: the maximum subtracted, exp in float32, times the
// reciprocal of the sum; a NaN logit makes every weight NaN). GCC gets it on vectors of 16 floats (its vector
// extensions, which each copy of the loops lowers to its own registers: one AVX-512 register, two AVX2 ones, four SSE
// ones), with Cephes' expf (x = m ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial of r times 2^m; relative error
// < 2e-7, as aten's vectorised exp); other compilers (which build the baseline copy only) a scalar loop over std::exp.
#if defined(__GNUC__) && !defined(__clang__)
typedef float MsdaFloats __attribute__((vector_size(64)));
typedef int32_t MsdaInts __attribute__((vector_size(64)));
constexpr int kMsdaLanes = 16;

// exp of 16 floats: 0 below -87.34 (where exp is no longer a normal float: 2^m must stay one), exp(88) above 88,
// NaN for NaN.
inline MsdaFloats msda_exp(MsdaFloats in) {
  const MsdaFloats lowest = MsdaFloats{} - 87.3365448f, highest = MsdaFloats{} + 88.0f;
  MsdaFloats x = in < lowest ? lowest : in;
  x = x > highest ? highest : x;
  const MsdaFloats t = x * 1.44269504088896341f + 0.5f;
  MsdaFloats m = __builtin_convertvector(__builtin_convertvector(t, MsdaInts), MsdaFloats);
  m = t < m ? m - 1.0f : m;  // floor(t)
  const MsdaFloats r = (x - m * 0.693359375f) - m * -2.12194440e-4f;
  MsdaFloats y = MsdaFloats{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const MsdaInts scale = (__builtin_convertvector(m, MsdaInts) + 127) << 23;  // 2^m
  return in < lowest ? MsdaFloats{} : y * (MsdaFloats)scale;
}

typedef float MsdaHalfFloats __attribute__((vector_size(32)));
typedef float MsdaQuarterFloats __attribute__((vector_size(16)));

template <typename O>
inline MsdaFloats msda_lanes(const O* z, int64_t n) {  // z[0:min(n, 16)], the other lanes -inf
  MsdaFloats x;
  if (n >= kMsdaLanes) {
    for (int j = 0; j < kMsdaLanes; ++j) x[j] = static_cast<float>(z[j]);
  } else {
    const float none = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < kMsdaLanes; ++j) x[j] = j < n ? static_cast<float>(z[j]) : none;
  }
  return x;
}

// The 16 lanes combined into one value, halving the vector three times: their maximum (`msda_max`; a NaN lane may be
// skipped, it reaches the sum) and their sum.
template <typename Combine>
inline float msda_reduce(MsdaFloats x, Combine combine) {
  MsdaHalfFloats a, b;
  std::memcpy(&a, &x, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&x) + sizeof a, sizeof b);
  a = combine(a, b);
  MsdaQuarterFloats c, d;
  std::memcpy(&c, &a, sizeof c);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + sizeof c, sizeof d);
  c = combine(c, d);
  return combine(combine(c[0], c[2]), combine(c[1], c[3]));
}

inline float msda_max(MsdaFloats x) {
  return msda_reduce(x, [](auto u, auto v) { return u < v ? v : u; });
}

inline float msda_sum(MsdaFloats x) {
  return msda_reduce(x, [](auto u, auto v) { return u + v; });
}

// exp(x - top) of z[0:n] (n <= 16), 0 in the other lanes
template <typename O>
inline MsdaFloats msda_shifted_exp(const O* z, int64_t n, float top) {
  MsdaFloats e = msda_exp(msda_lanes(z, n) - top);
  for (int j = static_cast<int>(n); j < kMsdaLanes; ++j) e[j] = 0.0f;
  return e;
}

template <typename O>
inline void msda_softmax(const O* z, float* w, int64_t n) {
  if (n <= kMsdaLanes) {  // DINO's 4 levels x 4 points: one vector
    MsdaFloats e = msda_shifted_exp(z, n, msda_max(msda_lanes(z, n)));
    e *= 1.0f / msda_sum(e);
    if (n == kMsdaLanes) {
      std::memcpy(w, &e, sizeof e);
    } else {
      for (int64_t j = 0; j < n; ++j) w[j] = e[j];
    }
    return;
  }
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < n; k += kMsdaLanes) {
    const float lanes_top = msda_max(msda_lanes(z + k, n - k));
    top = top < lanes_top ? lanes_top : top;
  }
  float sum = 0.0f;
  for (int64_t k = 0; k < n; k += kMsdaLanes) {
    const MsdaFloats e = msda_shifted_exp(z + k, std::min<int64_t>(n - k, kMsdaLanes), top);
    for (int64_t j = 0; j < kMsdaLanes && k + j < n; ++j) w[k + j] = e[j];
    sum += msda_sum(e);
  }
  const float inverse = 1.0f / sum;
  for (int64_t k = 0; k < n; ++k) w[k] *= inverse;
}
#else
template <typename O>
inline void msda_softmax(const O* z, float* w, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < n; ++k) top = top < static_cast<float>(z[k]) ? static_cast<float>(z[k]) : top;
  float sum = 0.0f;
  for (int64_t k = 0; k < n; ++k) {
    w[k] = std::exp(static_cast<float>(z[k]) - top);
    sum += w[k];
  }
  const float inverse = 1.0f / sum;
  for (int64_t k = 0; k < n; ++k) w[k] *= inverse;
}
#endif

// The sampling geometry of items [first, last) (flattened (batch, query, head)) for the forward from offsets, into
// the block buffers `locations` ([items, levels x points, 2]) and `weights` ([items, levels x points]):
//   locations: reference + offset / (w_l, h_l) in float32, as the model computes them (the offset widened, divided,
//              then the reference added: nothing to contract into a fused multiply-add, so the same bits in every
//              copy). Each item's values run as one flat loop over per-value divisor and reference rows, which the
//              compiler vectorises (the scalar loop compiled for the baseline was ~1/6 of the bfloat16 call).
//   weights:   the softmax of the item's levels x points attention logits, in float32 (`msda_softmax`).
// `reference` [B, Q, L, 2] float32; `offsets` [B, Q, H, L, P, 2] and `logits` [B, Q, H, L, P] in O (float,
// c10::BFloat16 or c10::Half).
template <typename O>
void msda_block_geometry(const MsdaParams& p, const float* reference, const O* offsets, const O* logits,
                         int64_t first, int64_t last, float* locations, float* weights) {
  const int64_t lp = p.levels * p.points, lp2 = 2 * lp;
  float divisor[2 * kMsdaMaxBatchedPoints], shift[2 * kMsdaMaxBatchedPoints];
  std::vector<float> wide_divisor, wide_shift;  // more points than the batched forward's tables hold
  float* d = divisor;
  float* r = shift;
  if (lp2 > 2 * kMsdaMaxBatchedPoints) {
    wide_divisor.resize(lp2);
    wide_shift.resize(lp2);
    d = wide_divisor.data();
    r = wide_shift.data();
  }
  for (int64_t l = 0; l < p.levels; ++l) {
    for (int64_t k = l * p.points; k < (l + 1) * p.points; ++k) {
      d[2 * k] = static_cast<float>(p.shapes[2 * l + 1]);
      d[2 * k + 1] = static_cast<float>(p.shapes[2 * l]);
    }
  }
  int64_t query = -1;  // the (batch, query) whose reference `r` holds
  for (int64_t i = first; i < last; ++i) {
    if (i / p.heads != query) {
      query = i / p.heads;
      const float* ref = reference + query * p.levels * 2;
      for (int64_t l = 0; l < p.levels; ++l) {
        for (int64_t k = l * p.points; k < (l + 1) * p.points; ++k) {
          r[2 * k] = ref[2 * l];
          r[2 * k + 1] = ref[2 * l + 1];
        }
      }
    }
    const O* __restrict__ o = offsets + i * lp2;
    float* __restrict__ loc = locations + (i - first) * lp2;
    for (int64_t j = 0; j < lp2; ++j) loc[j] = static_cast<float>(o[j]) / d[j] + r[j];
    msda_softmax(logits + i * lp, weights + (i - first) * lp, lp);
  }
}

// Forward for the flattened (batch, query, head) range [begin, end).
// `zeros` is a read-only row of at least head_dim zeros, read in place of corners outside the level;
// `scratch` a writable row of at least head_dim T (the accumulator when D is not a compile-time constant).
// `locations` and `weights` start at item `geometry_first` (0: they cover every item; a block's own buffer otherwise).
template <typename T, typename V, int D>
void msda_forward_range(const MsdaParams& p, const V* value, const T* locations, const T* weights, V* output,
                        const V* zeros, T* scratch, int64_t begin, int64_t end, int64_t geometry_first = 0) {
  const int64_t dim = D > 0 ? D : p.head_dim;
  const int64_t token_stride = p.heads * dim;
  const int64_t lp = p.levels * p.points;
  T local[D > 0 ? D : 1];
  T* acc = D > 0 ? local : scratch;
  const bool batched = lp <= kMsdaMaxBatchedPoints;
  // The gathers of value rows are bound by memory latency, not by arithmetic or bandwidth: while the rows of item i
  // are summed, the corners of item i + 1 are set up and their rows (every 64-byte line) prefetched. The encoder's
  // forward per layer on Zen 5, 800x1201: 21.7 -> 15.5 ms in float32, 18.9 -> 14.0 ms in bfloat16 (20 of 20 runs).
  // The set-up in turn waited on its own loads (half its samples on the load of the locations): it prefetches the
  // locations and weights of item i + 2, 20.0 -> 15.6 ms in float32, 14.4 -> 10.4 ms in bfloat16 (20 of 20).
  MsdaPointCorners<T> corners[2];
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(V));
#ifdef HF_DINO_MSDA_AVX512_SET_UP
  // 16-bit values prefetch and sum from the corners' row addresses (`msda_corner_rows_avx512`): the encoder's call,
  // bfloat16, 12.78 -> 11.67 ms (18 of 20); float32's (two cache lines a row) gained nothing (12.50 -> 12.84 ms)
  constexpr bool kRowTable = std::is_same<T, float>::value && sizeof(V) == 2;
  MsdaPointLevels point_levels;
  if (batched && lp > 0) msda_point_levels(p, point_levels);  // (no points: nothing to set up)
#endif
  const auto set_up = [&](int64_t i, MsdaPointCorners<T>& c) {
#ifdef HF_DINO_MSDA_AVX512_SET_UP
    if constexpr (std::is_same<T, float>::value) {
      msda_point_corners_avx512(point_levels, lp, locations + (i - geometry_first) * lp * 2,
                                weights + (i - geometry_first) * lp, c);
    } else  // the scalar set-up below: this copy's other types, and every other copy
#endif
    {
      msda_point_corners<T>(p, locations + (i - geometry_first) * lp * 2, weights + (i - geometry_first) * lp, c);
    }
    const V* vbase = value + (i / (p.queries * p.heads)) * p.tokens * token_stride + (i % p.heads) * dim;
#ifdef HF_DINO_MSDA_AVX512_SET_UP
    if constexpr (kRowTable) {
      msda_corner_rows_avx512(c, lp, reinterpret_cast<const char*>(vbase), token_stride * sizeof(V),
                              reinterpret_cast<const char*>(zeros));
      for (int64_t k = 0; k < lp; ++k) {
        for (int e = 0; e < 4; ++e) {
          for (int64_t byte = 0; byte < row_bytes; byte += 64) msda_prefetch(c.row[e][k] + byte);
        }
      }
    } else
#endif
    {
      for (int64_t k = 0; k < lp; ++k) {
        for (int e = 0; e < 4; ++e) {
          if (c.index[e][k] < 0) continue;
          const char* row = reinterpret_cast<const char*>(vbase + c.index[e][k] * token_stride);
          for (int64_t byte = 0; byte < row_bytes; byte += 64) msda_prefetch(row + byte);
        }
      }
    }
    if (i + 1 < end) {  // and the locations and weights of the item after it (the set-up waited on their loads)
      const char* next_loc = reinterpret_cast<const char*>(locations + (i + 1 - geometry_first) * lp * 2);
      const char* next_att = reinterpret_cast<const char*>(weights + (i + 1 - geometry_first) * lp);
      const int64_t att_bytes = lp * static_cast<int64_t>(sizeof(T));
      for (int64_t byte = 0; byte < 2 * att_bytes; byte += 64) msda_prefetch(next_loc + byte);
      for (int64_t byte = 0; byte < att_bytes; byte += 64) msda_prefetch(next_att + byte);
    }
  };
  if (batched && begin < end) set_up(begin, corners[0]);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t h = i % p.heads;
    const int64_t b = i / (p.queries * p.heads);
    const V* vbase = value + b * p.tokens * token_stride + h * dim;
    const T* loc = locations + (i - geometry_first) * lp * 2;
    const T* att = weights + (i - geometry_first) * lp;
    V* out = output + i * dim;
    for (int64_t c = 0; c < dim; ++c) acc[c] = T(0);
    if (batched) {
      const MsdaPointCorners<T>& c = corners[(i - begin) & 1];
      if (i + 1 < end) set_up(i + 1, corners[(i + 1 - begin) & 1]);
#ifdef HF_DINO_MSDA_AVX512_SET_UP
      if constexpr (std::is_same<T, float>::value && std::is_same<V, c10::BFloat16>::value && D == 32) {
        msda_point_sums_bf16_avx512(c, lp, acc);
        for (int64_t c = 0; c < dim; ++c) out[c] = static_cast<V>(acc[c]);
        continue;
      }
#endif
      for (int64_t k = 0; k < lp; ++k) {
        const int32_t i0 = c.index[0][k], i1 = c.index[1][k], i2 = c.index[2][k], i3 = c.index[3][k];
        if ((i0 & i1 & i2 & i3) < 0) continue;  // every corner outside: the point is outside its level
#ifdef HF_DINO_MSDA_AVX512_SET_UP
        if constexpr (kRowTable) {
          msda_axpy4<T, V, D>(acc, reinterpret_cast<const V*>(c.row[0][k]), reinterpret_cast<const V*>(c.row[1][k]),
                              reinterpret_cast<const V*>(c.row[2][k]), reinterpret_cast<const V*>(c.row[3][k]),
                              c.weight[0][k], c.weight[1][k], c.weight[2][k], c.weight[3][k], dim);
          continue;
        }
#endif
        const V* v0 = i0 >= 0 ? vbase + i0 * token_stride : zeros;
        const V* v1 = i1 >= 0 ? vbase + i1 * token_stride : zeros;
        const V* v2 = i2 >= 0 ? vbase + i2 * token_stride : zeros;
        const V* v3 = i3 >= 0 ? vbase + i3 * token_stride : zeros;
        msda_axpy4<T, V, D>(acc, v0, v1, v2, v3, c.weight[0][k], c.weight[1][k], c.weight[2][k], c.weight[3][k], dim);
      }
    } else {
      msda_for_each_point<T>(p, loc, [&](int64_t k, const MsdaCorners<T>& s, int64_t, int64_t) {
        const T a = att[k];
        const V* v0 = s.valid[0] ? vbase + s.index[0] * token_stride : zeros;
        const V* v1 = s.valid[1] ? vbase + s.index[1] * token_stride : zeros;
        const V* v2 = s.valid[2] ? vbase + s.index[2] * token_stride : zeros;
        const V* v3 = s.valid[3] ? vbase + s.index[3] * token_stride : zeros;
        msda_axpy4<T, V, D>(acc, v0, v1, v2, v3, a * s.weight[0], a * s.weight[1], a * s.weight[2], a * s.weight[3],
                            dim);
      });
    }
    for (int64_t c = 0; c < dim; ++c) out[c] = static_cast<V>(acc[c]);
  }
}

// Gradients of one sampling point: attention weight and location gradients are written, and, when
// `gvbase` is not null, the point's contribution to grad_value is accumulated. Token rows are `value_stride`
// elements apart in `vbase` and `grad_stride` apart in `gvbase`.
template <typename T, typename V, int D>
inline void msda_point_backward(const MsdaCorners<T>& s, T a, int64_t height, int64_t width, const V* vbase,
                                int64_t value_stride, T* gvbase, int64_t grad_stride, const T* g, const V* zeros,
                                int64_t dim, T* gloc, T* gatt) {
  const V* v[4];
  for (int c = 0; c < 4; ++c) v[c] = s.valid[c] ? vbase + s.index[c] * value_stride : zeros;
  T dots[4];
  msda_dot4<T, V, D>(g, v[0], v[1], v[2], v[3], dim, dots);
  *gatt = s.weight[0] * dots[0] + s.weight[1] * dots[1] + s.weight[2] * dots[2] + s.weight[3] * dots[3];
  // d(sample)/d(x_pixel) and d(sample)/d(y_pixel), projected on g; corners outside read as zero.
  const T dx = s.hh * (dots[1] - dots[0]) + s.lh * (dots[3] - dots[2]);
  const T dy = s.hw * (dots[2] - dots[0]) + s.lw * (dots[3] - dots[1]);
  gloc[0] = a * static_cast<T>(width) * dx;
  gloc[1] = a * static_cast<T>(height) * dy;
  if (gvbase != nullptr) {
    for (int c = 0; c < 4; ++c) {
      if (s.valid[c]) msda_axpy<T, D>(gvbase + s.index[c] * grad_stride, g, a * s.weight[c], dim);
    }
  }
}

// Backward, single pass, for the flattened (batch, head) range [begin, end): a task owns grad_value[b, :, h, :].
// The task sums its grad_value rows in `grad_scratch` (tokens x head_dim, contiguous) and then writes them out
// once, so grad_value needs no zero-filling and the scattered updates hit a compact block instead of every
// heads-th row of grad_value. With `value_scratch` (tokens x head_dim) the task first gathers its value rows
// there too (worth it when the queries sample each row several times, as in the encoder); null reads them in
// place. grad_locations and grad_weights must be zero-initialised.
template <typename T, typename V, int D>
void msda_backward_range(const MsdaParams& p, const V* value, const T* locations, const T* weights,
                         const T* grad_output, T* grad_value, T* grad_locations, T* grad_weights, const V* zeros,
                         V* value_scratch, T* grad_scratch, int64_t begin, int64_t end) {
  const int64_t dim = D > 0 ? D : p.head_dim;
  const int64_t token_stride = p.heads * dim;
  const int64_t lp = p.levels * p.points;
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / p.heads;
    const int64_t h = bh % p.heads;
    const V* vrows = value + b * p.tokens * token_stride + h * dim;
    T* gvrows = grad_value + b * p.tokens * token_stride + h * dim;
    const V* vbase = vrows;
    int64_t value_stride = token_stride;
    if (value_scratch != nullptr) {
      for (int64_t t = 0; t < p.tokens; ++t) {
        for (int64_t c = 0; c < dim; ++c) value_scratch[t * dim + c] = vrows[t * token_stride + c];
      }
      vbase = value_scratch;
      value_stride = dim;
    }
    for (int64_t j = 0; j < p.tokens * dim; ++j) grad_scratch[j] = T(0);
    for (int64_t q = 0; q < p.queries; ++q) {
      const int64_t i = (b * p.queries + q) * p.heads + h;
      const T* loc = locations + i * lp * 2;
      const T* att = weights + i * lp;
      msda_for_each_point<T>(p, loc, [&](int64_t k, const MsdaCorners<T>& s, int64_t height, int64_t width) {
        msda_point_backward<T, V, D>(s, att[k], height, width, vbase, value_stride, grad_scratch, dim,
                                     grad_output + i * dim, zeros, dim, grad_locations + (i * lp + k) * 2,
                                     grad_weights + i * lp + k);
      });
    }
    for (int64_t t = 0; t < p.tokens; ++t) {
      for (int64_t c = 0; c < dim; ++c) gvrows[t * token_stride + c] = grad_scratch[t * dim + c];
    }
  }
}

// Backward, split variant (used when there are fewer (batch, head) pairs than threads), part 1: location and
// attention-weight gradients for the flattened (batch, query, head) range [begin, end); reads value only.
template <typename T, typename V, int D>
void msda_backward_sampling_range(const MsdaParams& p, const V* value, const T* locations, const T* weights,
                                  const T* grad_output, T* grad_locations, T* grad_weights, const V* zeros,
                                  int64_t begin, int64_t end) {
  const int64_t dim = D > 0 ? D : p.head_dim;
  const int64_t token_stride = p.heads * dim;
  const int64_t lp = p.levels * p.points;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t h = i % p.heads;
    const int64_t b = i / (p.queries * p.heads);
    const V* vbase = value + b * p.tokens * token_stride + h * dim;
    const T* loc = locations + i * lp * 2;
    const T* att = weights + i * lp;
    msda_for_each_point<T>(p, loc, [&](int64_t k, const MsdaCorners<T>& s, int64_t height, int64_t width) {
      msda_point_backward<T, V, D>(s, att[k], height, width, vbase, token_stride, nullptr, 0, grad_output + i * dim,
                                   zeros, dim, grad_locations + (i * lp + k) * 2, grad_weights + i * lp + k);
    });
  }
}

// Split variant, part 2: grad_value for tasks (batch, head, channel block) in [begin, end); a task owns
// grad_value[b, :, h, c0:c1], so blocks of channels give more race-free tasks than (batch, head) alone.
template <typename T>
void msda_backward_value_range(const MsdaParams& p, const T* locations, const T* weights, const T* grad_output,
                               T* grad_value, int64_t block, int64_t begin, int64_t end) {
  const int64_t dim = p.head_dim;
  const int64_t blocks = (dim + block - 1) / block;
  const int64_t token_stride = p.heads * dim;
  const int64_t lp = p.levels * p.points;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / blocks;
    const int64_t c0 = (task % blocks) * block;
    const int64_t len = (c0 + block < dim ? c0 + block : dim) - c0;
    const int64_t b = bh / p.heads;
    const int64_t h = bh % p.heads;
    T* gvbase = grad_value + b * p.tokens * token_stride + h * dim + c0;
    for (int64_t q = 0; q < p.queries; ++q) {
      const int64_t i = (b * p.queries + q) * p.heads + h;
      const T* g = grad_output + i * dim + c0;
      const T* loc = locations + i * lp * 2;
      const T* att = weights + i * lp;
      msda_for_each_point<T>(p, loc, [&](int64_t k, const MsdaCorners<T>& s, int64_t, int64_t) {
        for (int c = 0; c < 4; ++c) {
          if (s.valid[c]) msda_axpy<T, 0>(gvbase + s.index[c] * token_stride, g, att[k] * s.weight[c], len);
        }
      });
    }
  }
}

// This copy's entry points as static members of one type, so that msda_cpu.cpp can choose a copy at run time and
// hand it on as a template argument (`Loops::template forward<T, V, D>(...)`).
struct MsdaLoops {
  template <typename T, typename V, int D, typename... Args>
  static void forward(const Args&... args) {
    msda_forward_range<T, V, D>(args...);
  }
  template <typename T, typename V, int D, typename... Args>
  static void backward(const Args&... args) {
    msda_backward_range<T, V, D>(args...);
  }
  template <typename T, typename V, int D, typename... Args>
  static void backward_sampling(const Args&... args) {
    msda_backward_sampling_range<T, V, D>(args...);
  }
  template <typename T, typename... Args>
  static void backward_value(const Args&... args) {
    msda_backward_value_range<T>(args...);
  }
  template <typename O, typename... Args>
  static void block_geometry(const Args&... args) {
    msda_block_geometry<O>(args...);
  }
};
