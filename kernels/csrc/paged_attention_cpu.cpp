// Paged decode attention on CPU, reading keys and values in place from their blocks.
//
// One query per sequence (a decode step): q [S, H, D], caches [num_blocks, block_size, KVH, D],
// block tables [S, W] int32, context lengths [S] int32 (the query's own key included), all
// contiguous; out [S, H, D]. Sequence s attends to its first lens[s] tokens, token t living in
// block tables[s, t / block_size] at offset t % block_size; head h reads KV head h / (H / KVH).
// Same semantics as kernels/paged_attention_ref.py (the reference the tests compare with).
//
// Why: the torch path gathers each sequence's blocks into a dense batch in every layer of every
// step (a copy of every key and value it then reads again), which makes a CPU decode step
// memory-bound on copies. Here each (sequence, KV head) pair streams its blocks once: the
// H / KVH query heads of the KV head share each key and value row while it is in cache, and the
// sequences of a group, handled one after another, find their shared prompt blocks in cache.
// Softmax is online per block (running maximum and sum), accumulated in the inputs' type
// (float32 or float64). Work is split over `threads` OpenMP threads by (sequence, KV head)
// pairs in order. OpenMP, not threads of its own: torch's CPU wheels load libgomp.so.1, which
// this module then shares, so the kernel runs on torch's intra-op threads instead of competing
// with them while they spin after torch's last parallel region. There is no masking and no
// infinity (the running maximum starts at the lowest finite value), so the fast-math build
// meets no infinity to mishandle.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
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

// Asks for the KV head's rows of a block ahead of their use (the blocks of a sequence are
// scattered over the pool: the hardware prefetcher cannot guess the next one).
template <typename T>
inline void prefetch_block(const T* base, int64_t n, int64_t row, int64_t D) {
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; d += line) __builtin_prefetch(base + j * row + d);
}

// One (sequence, KV head) pair: block by block (each read from memory once, then from cache
// by the G query heads), online softmax per head. DT: the head dimension when known at
// compile time (the accumulator of a head then lives in registers for a block), else 0.
template <typename T, int DT>
void attend_pair(const T* q, const T* kc, const T* vc, T* out, const int32_t* tables,
                 const int32_t* lens, const Shape& sh, T scale, int64_t s, int64_t kvh) {
  const int64_t G = sh.H / sh.KVH, D = DT ? DT : sh.D, bs = sh.block_size;
  const int64_t row = sh.KVH * D;  // elements between consecutive tokens of one KV head
  const int64_t L = lens[s];
  const int32_t* table = tables + s * sh.width;
  const T* qs = q + (s * sh.H + kvh * G) * D;
  T* os = out + (s * sh.H + kvh * G) * D;  // the accumulators, [G, D]
  std::vector<T> sc(bs), m(G, std::numeric_limits<T>::lowest()), l(G, T(0));
  for (int64_t i = 0; i < G * D; ++i) os[i] = 0;
  for (int64_t t0 = 0; t0 < L; t0 += bs) {
    const int64_t n = std::min(bs, L - t0);
    const T* kb = kc + table[t0 / bs] * bs * row + kvh * D;
    const T* vb = vc + table[t0 / bs] * bs * row + kvh * D;
    if (t0 + bs < L) {
      const int64_t next = table[t0 / bs + 1] * bs * row + kvh * D;
      const int64_t n2 = std::min(bs, L - t0 - bs);
      prefetch_block(kc + next, n2, row, D);
      prefetch_block(vc + next, n2, row, D);
    }
    for (int64_t g = 0; g < G; ++g) {
      const T* qg = qs + g * D;
      T top = m[g];
      for (int64_t j = 0; j < n; ++j) {
        const T* kr = kb + j * row;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * kr[d];
        sc[j] = dot * scale;
        top = std::max(top, sc[j]);
      }
      const T alpha = std::exp(m[g] - top);  // rescale to the new maximum
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        sc[j] = std::exp(sc[j] - top);
        sum += sc[j];
      }
      l[g] = l[g] * alpha + sum;
      m[g] = top;
      T* og = os + g * D;
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
  for (int64_t g = 0; g < G; ++g) {
    const T inv = l[g] > 0 ? T(1) / l[g] : T(0);
    for (int64_t d = 0; d < D; ++d) os[g * D + d] *= inv;
  }
}

template <typename T>
void decode_impl(uintptr_t q, uintptr_t kc, uintptr_t vc, uintptr_t out, uintptr_t tables,
                 uintptr_t lens, const Shape& sh, double scale, int64_t threads) {
  const int64_t pairs = sh.S * sh.KVH;
  auto pair = sh.D == 64 ? attend_pair<T, 64> : sh.D == 128 ? attend_pair<T, 128>
                                                           : attend_pair<T, 0>;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min(threads, pairs)));
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < pairs; ++i)
    pair(reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(kc),
         reinterpret_cast<const T*>(vc), reinterpret_cast<T*>(out),
         reinterpret_cast<const int32_t*>(tables), reinterpret_cast<const int32_t*>(lens), sh,
         static_cast<T>(scale), i / sh.KVH, i % sh.KVH);
}

void decode(int64_t itemsize, uintptr_t q, uintptr_t kc, uintptr_t vc, uintptr_t out,
            uintptr_t tables, uintptr_t lens, int64_t S, int64_t H, int64_t KVH, int64_t D,
            int64_t block_size, int64_t width, int64_t num_blocks, double scale,
            int64_t threads) {
  if (KVH < 1 || H % KVH || D < 1 || block_size < 1 || width < 1 || S < 0 || num_blocks < 1)
    throw std::invalid_argument("paged decode: bad shape");
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
    decode_impl<float>(q, kc, vc, out, tables, lens, sh, scale, threads);
  else if (itemsize == 8)
    decode_impl<double>(q, kc, vc, out, tables, lens, sh, scale, threads);
  else
    throw std::invalid_argument("paged decode: float32 or float64 only");
}

}  // namespace

PYBIND11_MODULE(_paged_attention_cpu, m) {
  m.doc() = "Paged decode attention on CPU, keys and values read in place (see the source).";
  m.def("decode", &decode, py::arg("itemsize"), py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("out"), py::arg("tables"), py::arg("lens"), py::arg("S"),
        py::arg("H"), py::arg("KVH"), py::arg("D"), py::arg("block_size"), py::arg("width"),
        py::arg("num_blocks"), py::arg("scale"), py::arg("threads"));
}
