// Paged decode attention on CPU, reading keys and values in place from their blocks.
//
// One query per sequence (a decode step): q [S, H, D], caches [num_blocks, block_size, KVH, D],
// block tables [S, W] int32, context lengths [S] int32 (the query's own key included), all
// contiguous; out [S, H, D]. Sequence s attends to its first lens[s] tokens, token t living in
// block tables[s, t / block_size] at offset t % block_size; head h reads KV head h / (H / KVH).
// Same semantics as mapo_fast/kernels/paged_attention_ref.py (the reference the tests compare with).
//
// Why: the torch path gathers each sequence's blocks into a dense batch in every layer of every
// step (a copy of every key and value it then reads again), which makes a CPU decode step
// memory-bound on copies. Here blocks are read in place, as a cascade (decode_impl): the
// leading blocks a group of sequences shares (the samples of one prompt after a fork) are
// attended once by the query heads of all of them, each key and value row read from memory once
// for the group and then from cache; each sequence's own blocks are attended by its H / KVH
// query heads of the KV head; the two parts merge by their maxima and sums. Softmax is online
// per block (running maximum and sum), accumulated in the inputs' type (float32 or float64);
// the AVX-512 path (float32, head dimension 64 or 128) computes a part's scores first, then its
// softmax, then its values' weighted sum (see there). OpenMP, not threads of its own: torch's
// CPU wheels load libgomp.so.1, which this module then shares, so the kernel runs on torch's
// intra-op threads instead of competing with them while they spin after torch's last parallel
// region.
//
// Portable by construction: the module is compiled for the baseline of its architecture (no
// -march, no -ffast-math: IEEE semantics for infinities and NaNs kept), and the row loops are
// compiled again for AVX2 + FMA and AVX-512 on x86-64 through target attributes; `decode` runs
// the level it is given, `best_isa()` names the highest this CPU (and its OS) supports, so one
// build runs on any CPU of the architecture.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MAPO_X86 1
// GCC 12 warns that its own unmasked AVX-512 intrinsics read an uninitialised operand where they
// are inlined into a function with a target attribute (a false positive of the header's): the
// header's lines only are exempted
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#define MAPO_X86 0
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

struct Shape {
  int64_t S, H, KVH, D, block_size, width, num_blocks;
};

// Whether sequence s's length and table entries lie within the table and the pool.
bool in_bounds(const int32_t* tables, const int32_t* lens, const Shape& sh, int64_t s) {
  const int64_t L = lens[s];
  if (L < 1 || L > sh.width * sh.block_size) return false;
  for (int64_t b = 0; b < (L + sh.block_size - 1) / sh.block_size; ++b) {
    const int64_t blk = tables[s * sh.width + b];
    if (blk < 0 || blk >= sh.num_blocks) return false;
  }
  return true;
}

// The instruction set levels of the row loops (`decode`'s `isa`): the baseline, then the x86-64
// levels compiled through target attributes.
enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2 };

// The row loops at the baseline, and (x86-64) at AVX2 + FMA.
namespace generic {
#define ROWS_TARGET
#include "paged_attention_cpu_rows.h"
#undef ROWS_TARGET
}  // namespace generic

#if MAPO_X86
namespace avx2 {
#define ROWS_TARGET __attribute__((target("avx2,fma")))
#include "paged_attention_cpu_rows.h"
#undef ROWS_TARGET
}  // namespace avx2
#endif

#if MAPO_X86
#define AVX512_TARGET __attribute__((target("avx512f")))

// The AVX-512 path (float32, head dimension 64 or 128, run where the CPU has AVX-512F; else,
// and for float64 or other head sizes, attend_rows). Scores of 16
// tokens at a time: each token's dot product is left in 16 lanes, then the 16 vectors are
// summed into one vector of 16 scores by a transposing tree (unpack, then 128-bit block
// shuffles: 45 instructions where 16 separate horizontal sums take about 130).

// exp_lanes (paged_attention_cpu_rows.h) on 16 lanes: the same reduction and polynomial, with
// 2^n applied by scalef (which gives 0 and inf past float32's range itself). Clamping first
// keeps n finite; the ordered comparisons are false for NaN, which so stays NaN.
AVX512_TARGET inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-104.f), hi = _mm512_set1_ps(89.f);
  __m512 c = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), x, lo);
  c = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(c, hi, _CMP_GT_OQ), c, hi);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), c);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// out[i] = exp16(x[i]) for the lanes in `live` (the others neither read nor written).
AVX512_TARGET void avx512_store_exp(const float* x, float* out, __mmask16 live) {
  _mm512_mask_storeu_ps(out, live, exp16(_mm512_maskz_loadu_ps(live, x)));
}

// r[j] = the sum of the 16 lanes of a[j], j = 0..15.
AVX512_TARGET inline __m512 sum16(const __m512* a) {
  __m512 t[8], w[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: a[2i] at 0 and 2, a[2i+1] at 1 and 3
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: a[4i .. 4i+3], one partial sum each
    const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
    w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // across the four 128-bit lanes: w[i]'s lanes summed, into 128-bit lane i
  const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x44),
                                   _mm512_shuffle_f32x4(w[0], w[1], 0xEE));
  const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x44),
                                   _mm512_shuffle_f32x4(w[2], w[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88),
                       _mm512_shuffle_f32x4(y01, y23, 0xDD));
}

// attend_rows' contract for float32 and a head dimension DT of 16 * C, in three passes over
// the range instead of an online softmax (no rescaling per tile): every score of the R rows
// (tile by tile, the tile's keys read once from memory for all rows), then each row's
// maximum, exponentials and sum over the whole range, then the weighted sums of values (tile
// by tile, each tile's values read once for all rows). `scratch` (the calling thread's) grows
// to R * (end - begin) floats, rounded up to 16 per row.
template <int DT>
AVX512_TARGET void attend_rows_avx512(const float* const* qr, float* const* acc, float* m, float* l,
                        int64_t R, const float* kc, const float* vc, const int32_t* table,
                        int64_t begin, int64_t end, const Shape& sh, float scale, int64_t kvh,
                        std::vector<float>& scratch) {
  constexpr int C = DT / 16;
  const int64_t bs = sh.block_size, row = sh.KVH * DT;
  const int64_t stride = (end - begin + 15) / 16 * 16;  // a row of scores, padded to tiles
  alignas(64) static const float zeros[DT] = {};
  if (static_cast<int64_t>(scratch.size()) < R * stride) scratch.resize(R * stride);
  float* sc = scratch.data();
  // pass 1: scores, 16 tokens at a time (a tile never crosses a block)
  for (int64_t t0 = begin; t0 < end; t0 += bs) {
    const int64_t nb = std::min(bs, end - t0);
    const float* kb = generic::block_at(kc, table, t0, end, bs, row, kvh * DT, DT);
    for (int64_t j0 = 0; j0 < nb; j0 += 16) {
      const int n = static_cast<int>(std::min<int64_t>(16, nb - j0));
      const float* kr[16];
      for (int j = 0; j < 16; ++j) kr[j] = j < n ? kb + (j0 + j) * row : zeros;
      for (int64_t r = 0; r < R; ++r) {
        __m512 qv[C], a[16];
        for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(qr[r] + 16 * c);
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) {  // rows past the tile read zeros: no branch
          a[j] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr[j]));
#pragma GCC unroll 8
          for (int c = 1; c < C; ++c)
            a[j] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kr[j] + 16 * c), a[j]);
        }
        // a tile's scores are contiguous in the row; the padding past the range is never read
        _mm512_mask_storeu_ps(sc + r * stride + (t0 - begin) + j0,
                              static_cast<__mmask16>((1u << n) - 1u),
                              _mm512_mul_ps(sum16(a), _mm512_set1_ps(scale)));
      }
    }
  }
  // pass 2: each row's softmax numerators, maximum and sum
  const int64_t len = end - begin;
  for (int64_t r = 0; r < R; ++r) {
    float* s = sc + r * stride;
    float top = std::numeric_limits<float>::lowest();
#pragma omp simd reduction(max : top)
    for (int64_t t = 0; t < len; ++t) top = std::max(top, s[t]);
    __m512 sums = _mm512_setzero_ps();
    const __m512 tops = _mm512_set1_ps(top);
    for (int64_t t = 0; t < len; t += 16) {  // the row's padding is scratch: a full last tile
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), tops));
      const __mmask16 live = static_cast<__mmask16>(len - t >= 16 ? 0xFFFFu
                                                                  : (1u << (len - t)) - 1u);
      _mm512_mask_storeu_ps(s + t, live, e);
      sums = _mm512_mask_add_ps(sums, live, sums, e);
    }
    const float sum = _mm512_reduce_add_ps(sums);
    m[r] = top;
    l[r] = sum;
  }
  // pass 3: the weighted sums of values, tile by tile: a tile's values are read from memory
  // once for all R rows (row by row over the whole range would read them R times), each row's
  // accumulator loaded and stored around the tile
  for (int64_t r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc[r] + 16 * c, _mm512_setzero_ps());
  for (int64_t t0 = begin; t0 < end; t0 += bs) {
    const int64_t nb = std::min(bs, end - t0);
    const float* vb = generic::block_at(vc, table, t0, end, bs, row, kvh * DT, DT);
    for (int64_t j0 = 0; j0 < nb; j0 += 16) {
      const int64_t n = std::min<int64_t>(16, nb - j0);
      for (int64_t r = 0; r < R; ++r) {
        const float* p = sc + r * stride + (t0 - begin) + j0;
        __m512 a[C];
        for (int c = 0; c < C; ++c) a[c] = _mm512_loadu_ps(acc[r] + 16 * c);
        for (int64_t j = 0; j < n; ++j) {
          const __m512 pj = _mm512_set1_ps(p[j]);
          const float* vr = vb + (j0 + j) * row;
#pragma GCC unroll 8
          for (int c = 0; c < C; ++c)
            a[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr + 16 * c), a[c]);
        }
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc[r] + 16 * c, a[c]);
      }
    }
  }
}
#endif

// For each sequence, how many leading blocks it shares with every other sequence whose table
// starts with the same block (0 where none does), and the groups (two or more sequences) that
// share any: the samples of a group after a fork, whose prompt blocks are attended once for
// all of them (the cascade). Only blocks wholly before every member's last token count (those
// are complete and, being shared, never written). Same rule as paged_attention_ref's
// shared_prefixes (without its minimum saving: here a shared part costs no extra call).
std::vector<std::vector<int64_t>> shared_groups(const int32_t* tables, const int32_t* lens,
                                                const Shape& sh, std::vector<int64_t>& shared) {
  std::vector<std::vector<int64_t>> groups;
  std::vector<int64_t> head_of(sh.S, -1);  // the group (index into groups) of each sequence
  for (int64_t s = 0; s < sh.S; ++s) {
    for (size_t g = 0; g < groups.size() && head_of[s] < 0; ++g)
      if (tables[groups[g][0] * sh.width] == tables[s * sh.width]) head_of[s] = g;
    if (head_of[s] < 0) {
      head_of[s] = static_cast<int64_t>(groups.size());
      groups.emplace_back();
    }
    groups[head_of[s]].push_back(s);
  }
  std::vector<std::vector<int64_t>> out;
  for (auto& rows : groups) {
    if (rows.size() < 2) continue;
    int64_t limit = std::numeric_limits<int64_t>::max();
    for (int64_t r : rows) limit = std::min<int64_t>(limit, (lens[r] - 1) / sh.block_size);
    const int32_t* first = tables + rows[0] * sh.width;
    int64_t p = 0;
    for (; p < limit; ++p) {
      bool same = true;
      for (int64_t r : rows) same = same && tables[r * sh.width + p] == first[p];
      if (!same) break;
    }
    if (p == 0) continue;
    for (int64_t r : rows) shared[r] = p;
    out.push_back(std::move(rows));
  }
  return out;
}

template <typename T>
using RowsFn = void (*)(const T* const*, T* const*, T*, T*, int64_t, const T*, const T*,
                        const int32_t*, int64_t, int64_t, const Shape&, T, int64_t,
                        std::vector<T>&);

// The highest level this CPU and its OS support (AVX-512F needs the OS to save its registers:
// the compiler's check covers that).
Isa best_isa() {
#if MAPO_X86
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return Isa::generic;
  return __builtin_cpu_supports("avx512f") ? Isa::avx512 : Isa::avx2;
#endif
  return Isa::generic;
}

template <typename T, int DT>
RowsFn<T> rows_at(Isa isa) {
#if MAPO_X86
  if (isa != Isa::generic) return avx2::attend_rows<T, DT>;
#endif
  (void)isa;
  return generic::attend_rows<T, DT>;
}

// The path for T, the head dimension and the level: AVX-512 for float32 and 64 or 128, else the
// row loops at the level (with the head dimension fixed at compile time for 64 and 128).
template <typename T>
RowsFn<T> rows_fn(int64_t D, Isa isa) {
#if MAPO_X86
  if constexpr (std::is_same<T, float>::value) {
    if (isa == Isa::avx512 && D == 64) return attend_rows_avx512<64>;
    if (isa == Isa::avx512 && D == 128) return attend_rows_avx512<128>;
  }
#endif
  return D == 64 ? rows_at<T, 64>(isa) : D == 128 ? rows_at<T, 128>(isa) : rows_at<T, 0>(isa);
}

// The decode step as a cascade. Phase 1: for each group and KV head, the shared blocks are
// attended once by the query heads of all the group's sequences (their keys and values read
// from memory once, not once per sample), into `part` (unnormalised, with each row's maximum
// and sum). Phase 2: for each (sequence, KV head) pair, its own blocks, then the merge with its
// group's part by their maxima, and the normalisation. Work is split over `threads` OpenMP
// threads, by items in order within each phase (each item computed alone: any thread count
// gives the same bits).
template <typename T>
void decode_impl(const T* q, const T* kc, const T* vc, T* out, const int32_t* tables,
                 const int32_t* lens, const Shape& sh, T scale, int64_t threads, Isa isa) {
  const int64_t G = sh.H / sh.KVH, D = sh.D, pairs = sh.S * sh.KVH;
  std::vector<int64_t> shared(sh.S, 0);
  const auto groups = shared_groups(tables, lens, sh, shared);
  std::vector<T> part(groups.empty() ? 0 : sh.S * sh.H * D), pm(sh.S * sh.H), pl(sh.S * sh.H);
  const RowsFn<T> rows = rows_fn<T>(D, isa);
  const int64_t items = static_cast<int64_t>(groups.size()) * sh.KVH;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min(threads, pairs)));
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> scratch, m, l;  // per thread, grown to the largest part it meets
    std::vector<const T*> qr;
    std::vector<T*> acc;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < items; ++i) {  // phase 1: each group's shared blocks, once
      const auto& members = groups[i / sh.KVH];
      const int64_t kvh = i % sh.KVH, R = static_cast<int64_t>(members.size()) * G;
      qr.resize(R);
      acc.resize(R);
      m.resize(R);
      l.resize(R);
      for (size_t k = 0; k < members.size(); ++k)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = members[k] * sh.H + kvh * G + g;  // the row of (sequence, head)
          qr[k * G + g] = q + h * D;
          acc[k * G + g] = part.data() + h * D;
        }
      rows(qr.data(), acc.data(), m.data(), l.data(), R, kc, vc, tables + members[0] * sh.width,
           0, shared[members[0]] * sh.block_size, sh, scale, kvh, scratch);
      for (size_t k = 0; k < members.size(); ++k)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = members[k] * sh.H + kvh * G + g;
          pm[h] = m[k * G + g];
          pl[h] = l[k * G + g];
        }
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < pairs; ++i) {  // phase 2: each pair's own blocks, merged
      const int64_t s = i / sh.KVH, kvh = i % sh.KVH, h0 = s * sh.H + kvh * G;
      qr.resize(G);
      acc.resize(G);
      m.resize(G);
      l.resize(G);
      for (int64_t g = 0; g < G; ++g) {
        qr[g] = q + (h0 + g) * D;
        acc[g] = out + (h0 + g) * D;
      }
      rows(qr.data(), acc.data(), m.data(), l.data(), G, kc, vc, tables + s * sh.width,
           shared[s] * sh.block_size, lens[s], sh, scale, kvh, scratch);
      for (int64_t g = 0; g < G; ++g) {
        T* o = acc[g];
        if (!shared[s]) {
          const T inv = l[g] > 0 ? T(1) / l[g] : T(0);
          for (int64_t d = 0; d < D; ++d) o[d] *= inv;
          continue;
        }
        const int64_t h = h0 + g;  // merge with the group's part: both scaled to the larger max
        const T top = std::max(m[g], pm[h]);
        const T wa = std::exp(m[g] - top), wb = std::exp(pm[h] - top);
        const T inv = T(1) / (l[g] * wa + pl[h] * wb);
        const T* p = part.data() + h * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = (o[d] * wa + p[d] * wb) * inv;
      }
    }
  }
}

void decode(int64_t itemsize, uintptr_t q, uintptr_t kc, uintptr_t vc, uintptr_t out,
            uintptr_t tables, uintptr_t lens, int64_t S, int64_t H, int64_t KVH, int64_t D,
            int64_t block_size, int64_t width, int64_t num_blocks, double scale,
            int64_t threads, int64_t isa) {
  if (KVH < 1 || H % KVH || D < 1 || block_size < 1 || width < 1 || S < 0 || num_blocks < 1)
    throw std::invalid_argument("paged decode: bad shape");
  if (itemsize != 4 && itemsize != 8)
    throw std::invalid_argument("paged decode: float32 or float64 only");
  // a level above the CPU's would stop the process with an illegal instruction
  if (isa < 0 || isa > static_cast<int64_t>(best_isa()))
    throw std::invalid_argument("paged decode: `isa` " + std::to_string(isa) +
                                " is not in [0, " +
                                std::to_string(static_cast<int>(best_isa())) +
                                "] (the levels this CPU supports)");
  const Shape sh{S, H, KVH, D, block_size, width, num_blocks};
  // checked before any read: a bad table must not read outside the pool
  for (int64_t s = 0; s < S; ++s)
    if (!in_bounds(reinterpret_cast<const int32_t*>(tables),
                   reinterpret_cast<const int32_t*>(lens), sh, s))
      throw std::invalid_argument("paged decode: sequence " + std::to_string(s) +
                                  ": context length outside [1, width * block_size] or a "
                                  "block outside the pool");
  py::gil_scoped_release release;
  if (itemsize == 4)
    decode_impl<float>(reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(kc),
                       reinterpret_cast<const float*>(vc), reinterpret_cast<float*>(out),
                       reinterpret_cast<const int32_t*>(tables),
                       reinterpret_cast<const int32_t*>(lens), sh, static_cast<float>(scale),
                       threads, static_cast<Isa>(isa));
  else
    decode_impl<double>(reinterpret_cast<const double*>(q), reinterpret_cast<const double*>(kc),
                        reinterpret_cast<const double*>(vc), reinterpret_cast<double*>(out),
                        reinterpret_cast<const int32_t*>(tables),
                        reinterpret_cast<const int32_t*>(lens), sh, scale, threads,
                        static_cast<Isa>(isa));
}

// shared_groups' per-sequence counts, for tests and callers that want to know what the kernel
// shares: tables [S, width] int32 and lens [S] int32, contiguous, lengths in [1, width *
// block_size].
std::vector<int64_t> shared_blocks(uintptr_t tables, uintptr_t lens, int64_t S, int64_t width,
                                   int64_t block_size) {
  if (S < 0 || width < 1 || block_size < 1)
    throw std::invalid_argument("shared blocks: bad shape");
  const Shape sh{S, 1, 1, 1, block_size, width, std::numeric_limits<int64_t>::max()};
  for (int64_t s = 0; s < S; ++s) {
    const int64_t L = reinterpret_cast<const int32_t*>(lens)[s];
    if (L < 1 || L > width * block_size)
      throw std::invalid_argument("shared blocks: sequence " + std::to_string(s) +
                                  ": context length outside [1, width * block_size]");
  }
  std::vector<int64_t> shared(S, 0);
  shared_groups(reinterpret_cast<const int32_t*>(tables), reinterpret_cast<const int32_t*>(lens),
                sh, shared);
  return shared;
}

// The softmax's exponential at a level, over n contiguous float32 values (out may be x): for
// tests of its accuracy and of its infinities and NaNs against the float64 exp.
void exp_f32(uintptr_t x, uintptr_t out, int64_t n, int64_t isa) {
  if (n < 0) throw std::invalid_argument("exp: `n` must be >= 0, got " + std::to_string(n));
  if (isa < 0 || isa > static_cast<int64_t>(best_isa()))
    throw std::invalid_argument("exp: `isa` " + std::to_string(isa) + " is not in [0, " +
                                std::to_string(static_cast<int>(best_isa())) + "]");
  const float* in = reinterpret_cast<const float*>(x);
  float* o = reinterpret_cast<float*>(out);
  py::gil_scoped_release release;
#if MAPO_X86
  if (static_cast<Isa>(isa) == Isa::avx512) {
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 live = static_cast<__mmask16>(n - i >= 16 ? 0xFFFFu
                                                                : (1u << (n - i)) - 1u);
      avx512_store_exp(in + i, o + i, live);
    }
    return;
  }
  if (static_cast<Isa>(isa) == Isa::avx2) {
    avx2::exp_all(in, o, n);
    return;
  }
#endif
  generic::exp_all(in, o, n);
}

}  // namespace

PYBIND11_MODULE(_paged_attention_cpu, m) {
  m.doc() = "Paged decode attention on CPU, keys and values read in place (see the source).";
  m.def("decode", &decode, py::arg("itemsize"), py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("out"), py::arg("tables"), py::arg("lens"), py::arg("S"),
        py::arg("H"), py::arg("KVH"), py::arg("D"), py::arg("block_size"), py::arg("width"),
        py::arg("num_blocks"), py::arg("scale"), py::arg("threads"), py::arg("isa"));
  m.def("exp_f32", &exp_f32, py::arg("x"), py::arg("out"), py::arg("n"), py::arg("isa"));
  m.def("best_isa", [] { return static_cast<int>(best_isa()); },
        "The highest row-loop level this CPU supports: 0 generic, 1 AVX2 + FMA, 2 AVX-512F.");
  m.def("shared_blocks", &shared_blocks, py::arg("tables"), py::arg("lens"), py::arg("S"),
        py::arg("width"), py::arg("block_size"));
}
