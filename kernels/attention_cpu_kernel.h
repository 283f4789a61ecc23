// Softmax attention of bfloat16 queries, keys and values with a head size of 32 (DINO's decoder self-attention:
// 900 queries, 8 heads of 32), for CPUs with AVX-512 BF16. Included by msda_cpu.cpp inside a
// `#pragma GCC target(... avx512bf16)` region; the caller checks the CPU (attention_cpu_supported).
//
// Per (batch, head) the keys are stored as pairs of channels over the keys ([D/2][S16] 32-bit words) and the values
// as pairs of keys over the channels ([S2/2][D]), the layouts of `vdpbf16ps`, which sums the products of two bfloat16
// pairs into a float32 lane. A step takes kRows queries: their float32 scores against every key (16 keys per vector,
// two vectors per step), the softmax in float32 (max subtracted, exp, sum), the probabilities rounded to bfloat16
// for the product with the values, the float32 sums divided by the row's sum and rounded once. This is the
// arithmetic of aten's flash attention for bfloat16 on the CPU (float32 scores and softmax, bfloat16 probabilities),
// at ~half its time for these shapes, where its head size of 32 makes its blocked products inefficient.

constexpr int kAttentionHeadDim = 32;
constexpr int kAttentionRows = 8;  // queries per step: 16 score accumulators, 16 output accumulators

// exp(x) in float32 (Cephes' expf: range reduction by ln 2 in two parts, degree-6 polynomial), ~1 ulp; NaN stays
// NaN, below -87.3 gives ~0 (x is a score minus its row's maximum here, so <= 0).
inline __m512 attention_exp(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.33654f), x);  // the second operand is returned for NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// One (batch, head)'s keys and values in the layouts of `vdpbf16ps` (bfloat16 bits as uint16_t).
struct AttentionHead {
  std::vector<uint32_t> keys;    // [D/2][keys16]: channels (2c, 2c + 1) of key j at [c * keys16 + j]; padding zero
  std::vector<uint32_t> values;  // [keys2 / 2][D]: channel d of keys (2i, 2i + 1) at [i * D + d]; padding zero
  int64_t count = 0, keys16 = 0, keys2 = 0;  // keys; rounded up to 16; rounded up to 2

  // k, v: [count, D] rows at k_stride / v_stride
  void pack(const uint16_t* k, int64_t k_stride, const uint16_t* v, int64_t v_stride, int64_t n) {
    constexpr int D = kAttentionHeadDim;
    count = n;
    keys16 = (n + 15) / 16 * 16;
    keys2 = (n + 1) / 2 * 2;
    keys.assign(D / 2 * keys16, 0);
    values.assign(keys2 / 2 * D, 0);
    for (int64_t j = 0; j < n; ++j) {
      for (int c = 0; c < D / 2; ++c) std::memcpy(&keys[c * keys16 + j], k + j * k_stride + 2 * c, 4);
      for (int d = 0; d < D; ++d) values[(j / 2) * D + d] |= uint32_t(v[j * v_stride + d]) << (16 * (j & 1));
    }
  }
};

// Scratch of one thread: kRows rows of float32 scores and of bfloat16 probability pairs.
struct AttentionScratch {
  std::vector<float> scores;
  std::vector<uint32_t> probabilities;
  explicit AttentionScratch(const AttentionHead& head)
      : scores(kAttentionRows * head.keys16), probabilities(kAttentionRows * head.keys2 / 2) {}
};

// Rows queries (q: [Rows, D] rows at q_stride) -> out: [Rows, D] rows at out_stride.
template <int Rows>
void attention_rows(const uint16_t* q, int64_t q_stride, const AttentionHead& head, AttentionScratch& scratch,
                    float scale, uint16_t* out, int64_t out_stride) {
  constexpr int D = kAttentionHeadDim;
  const int64_t n = head.count, keys16 = head.keys16, pairs = head.keys2 / 2, full = n / 16;
  const __mmask16 tail = __mmask16((1u << (n % 16)) - 1);  // the last partial block's keys (n % 16 > 0)
  float* scores = scratch.scores.data();
  uint32_t* probabilities = scratch.probabilities.data();
  uint32_t query[Rows][D / 2];
  for (int r = 0; r < Rows; ++r) std::memcpy(query[r], q + r * q_stride, 2 * D);
  const __m512 scale_v = _mm512_set1_ps(scale);

  // scores = scale * q k^T, two blocks of 16 keys per step (the padding keys' scores are never read)
  for (int64_t block = 0; block < keys16 / 16; block += 2) {
    const bool two = block + 1 < keys16 / 16;
    __m512 acc[Rows][2];
    for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int c = 0; c < D / 2; ++c) {
      const uint32_t* row = head.keys.data() + c * keys16 + block * 16;
      const __m512bh k0 = (__m512bh)_mm512_loadu_si512(row);
      const __m512bh k1 = two ? (__m512bh)_mm512_loadu_si512(row + 16) : k0;
      for (int r = 0; r < Rows; ++r) {
        const __m512bh qc = (__m512bh)_mm512_set1_epi32(int(query[r][c]));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qc, k0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qc, k1);
      }
    }
    for (int r = 0; r < Rows; ++r) {
      _mm512_storeu_ps(scores + r * keys16 + block * 16, _mm512_mul_ps(acc[r][0], scale_v));
      if (two) _mm512_storeu_ps(scores + r * keys16 + block * 16 + 16, _mm512_mul_ps(acc[r][1], scale_v));
    }
  }

  // softmax in float32; the probabilities rounded to bfloat16 (the padding keys' to zero)
  float inverse_sum[Rows];
  for (int r = 0; r < Rows; ++r) {
    const float* s = scores + r * keys16;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t b = 0; b < full; ++b) m = _mm512_max_ps(_mm512_loadu_ps(s + 16 * b), m);
    if (n % 16) m = _mm512_mask_max_ps(m, tail, _mm512_loadu_ps(s + 16 * full), m);
    const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    uint16_t* p = reinterpret_cast<uint16_t*>(probabilities + r * pairs);
    for (int64_t b = 0; b < keys16 / 16; ++b) {
      __m512 e = attention_exp(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * b), row_max));
      if (b == full) e = _mm512_maskz_mov_ps(tail, e);
      sum = _mm512_add_ps(sum, e);
      const __m256i e16 = (__m256i)_mm512_cvtneps_pbh(e);
      const int64_t left = 2 * pairs - 16 * b;  // probabilities still to store in this row
      if (left >= 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16 * b), e16);
      else _mm256_mask_storeu_epi16(p + 16 * b, __mmask16((1u << left) - 1), e16);
    }
    inverse_sum[r] = 1.0f / _mm512_reduce_add_ps(sum);
  }

  // out = (p v) / sum, one pair of keys per step
  __m512 acc[Rows][D / 16];
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < D / 16; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; ++i) {
    __m512bh v[D / 16];
    for (int c = 0; c < D / 16; ++c) v[c] = (__m512bh)_mm512_loadu_si512(head.values.data() + i * D + 16 * c);
    for (int r = 0; r < Rows; ++r) {
      const __m512bh pr = (__m512bh)_mm512_set1_epi32(int(probabilities[r * pairs + i]));
      for (int c = 0; c < D / 16; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pr, v[c]);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < D / 16; ++c) {
      const __m256i o = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], _mm512_set1_ps(inverse_sum[r])));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_stride + 16 * c), o);
    }
}

// Queries [begin, end) of one (batch, head).
inline void attention_queries(const uint16_t* q, int64_t q_stride, const AttentionHead& head, float scale,
                              uint16_t* out, int64_t out_stride, int64_t begin, int64_t end) {
  AttentionScratch scratch(head);
  int64_t i = begin;
  for (; i + kAttentionRows <= end; i += kAttentionRows)
    attention_rows<kAttentionRows>(q + i * q_stride, q_stride, head, scratch, scale, out + i * out_stride, out_stride);
  for (; i < end; ++i) attention_rows<1>(q + i * q_stride, q_stride, head, scratch, scale, out + i * out_stride, out_stride);
}
