// attend_rows and its block helpers, compiled once per instruction set level:
// paged_attention_cpu.cpp includes this file inside a namespace of its own for each level, with
// ROWS_TARGET set to that level's target attribute (empty for the baseline). The compiler then
// vectorises the same loops for each level, and the caller picks one at run time from the
// CPU's features. No include guard: it is meant to be included more than once.
//
// Expects `Shape` and <algorithm>, <cmath>, <cstdint>, <cstring>, <limits>, <vector> before it.

// e^x for the softmax loops, written so that the compiler vectorises it at the level's width
// (glibc's exp is a call per element): range reduction by ln 2 in two parts, a degree-6
// polynomial on [-ln2/2, ln2/2] (Cephes' expf coefficients: within 2 ulp of the true value over
// the normal range) and 2^n built from its exponent bits in two factors (so that the result may
// be subnormal). IEEE semantics kept: e^-inf = 0, e^inf = inf, NaN stays NaN, and results past
// float32's range are 0 and inf, as exp's. float64 (the reference dtype) takes std::exp.
ROWS_TARGET inline double exp_lanes(double x) { return std::exp(x); }

ROWS_TARGET inline float exp_lanes(float x) {
  const bool nan = x != x;
  float c = nan ? 0.f : x;
  c = c < -104.f ? -104.f : c;  // below: e^c under half the smallest subnormal, rounds to 0
  c = c > 89.f ? 89.f : c;      // above: e^c past the largest float, rounds to inf
  const float n = (c * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(c / ln 2)
  const float r = (c - n * 0.693359375f) - n * -2.12194440e-4f;  // c - n ln2 (ln2 in 2 parts)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t k = static_cast<int32_t>(n), half = k / 2;  // k in [-150, 129]
  const int32_t a_bits = (half + 127) << 23, b_bits = (k - half + 127) << 23;
  float a, b;
  std::memcpy(&a, &a_bits, sizeof a);
  std::memcpy(&b, &b_bits, sizeof b);
  return nan ? x : p * a * b;
}

// out[i] = exp_lanes(x[i]) for i < n, vectorised at the level (for tests).
ROWS_TARGET inline void exp_all(const float* x, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = exp_lanes(x[i]);
}

// Asks for the KV head's rows of a block ahead of their use (the blocks of a sequence are
// scattered over the pool: the hardware prefetcher cannot guess the next one), into L2 only
// (locality 1): a whole block asked into L1 at once evicts the tile in use (measured slower).
template <typename T>
ROWS_TARGET inline void prefetch_block(const T* base, int64_t n, int64_t row, int64_t D) {
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; d += line) __builtin_prefetch(base + j * row + d, 0, 1);
}

// The KV head's rows of the block holding a sequence's token t0 (`off`: the head's offset in
// a row), the next block's rows asked for ahead.
template <typename T>
ROWS_TARGET inline const T* block_at(const T* cache, const int32_t* table, int64_t t0,
                                     int64_t L, int64_t bs, int64_t row, int64_t off,
                                     int64_t D) {
  if (t0 + bs < L)
    prefetch_block(cache + table[t0 / bs + 1] * bs * row + off, std::min(bs, L - t0 - bs), row,
                   D);
  return cache + table[t0 / bs] * bs * row + off;
}

// A part of the attention for R query rows of one KV head over the tokens [begin, end) of one
// block table (begin a block boundary), unnormalised: acc[r] = sum_t exp(s_rt - m[r]) v_t and
// l[r] = sum_t exp(s_rt - m[r]), s_rt the scaled score of row r and token t. The rows are the
// query heads of one sequence (its own tokens), or of every sequence of a group (the blocks
// they share). Block by block (each read from memory once, then from cache by the R rows),
// online softmax per row. DT: the head dimension when known at compile time (a row's
// accumulator then lives in registers for a block), else 0. `scratch`: the calling thread's.
template <typename T, int DT>
ROWS_TARGET void attend_rows(const T* const* qr, T* const* acc, T* m, T* l, int64_t R,
                             const T* kc, const T* vc, const int32_t* table, int64_t begin,
                             int64_t end, const Shape& sh, T scale, int64_t kvh,
                             std::vector<T>& scratch) {
  const int64_t D = DT ? DT : sh.D, bs = sh.block_size;
  const int64_t row = sh.KVH * D;  // elements between consecutive tokens of one KV head
  if (static_cast<int64_t>(scratch.size()) < bs) scratch.resize(bs);
  T* sc = scratch.data();
  for (int64_t r = 0; r < R; ++r) {
    m[r] = std::numeric_limits<T>::lowest();
    l[r] = T(0);
    for (int64_t d = 0; d < D; ++d) acc[r][d] = 0;
  }
  for (int64_t t0 = begin; t0 < end; t0 += bs) {
    const int64_t n = std::min(bs, end - t0);
    const T* kb = block_at(kc, table, t0, end, bs, row, kvh * D, D);
    const T* vb = block_at(vc, table, t0, end, bs, row, kvh * D, D);
    for (int64_t r = 0; r < R; ++r) {
      const T* qg = qr[r];
      T top = m[r];
      for (int64_t j = 0; j < n; ++j) {
        const T* kr = kb + j * row;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * kr[d];
        sc[j] = dot * scale;
        top = std::max(top, sc[j]);
      }
      const T alpha = exp_lanes(m[r] - top);  // rescale to the new maximum
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        sc[j] = exp_lanes(sc[j] - top);
        sum += sc[j];
      }
      l[r] = l[r] * alpha + sum;
      m[r] = top;
      T* og = acc[r];
      T local[DT ? DT : 1];
      T* a = DT ? local : og;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] = og[d] * alpha;
      for (int64_t j = 0; j < n; ++j) {
        const T p = sc[j];
        const T* vr = vb + j * row;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += p * vr[d];
      }
      if (DT) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) og[d] = a[d];
      }
    }
  }
}
