// Few-row fp32 matmuls for XLA:CPU decode steps: y (M, N) = x (M, K) @ w, with w stored (K, N)
// (`RowMatmul`), (N, K) (`RowMatmulTransposed`, x @ w.T: a tied embedding as the output head), or packed in
// 64-column tiles (`RowMatmulTiles`, packed by `RowMatmulPackTiles`); the first two also take leading batch
// axes (a decode step's attention against its KV cache).
//
// Why: a decode step multiplies a handful of rows by every weight of the model once, so it runs at the
// speed weights stream from memory. XLA:CPU's dot streams a (K, N) weight with M = 4 rows at 18 GB/s on the
// dev VM; `RowMatmul` at 26, and the packed weights at 43 (figures in benchmarks/README.md). In a decode loop
// the weights are packed once per call (the pack is a loop-invariant custom call, which XLA hoists), and
// every step streams the packed copy.
//
// Work split: `RowMatmul` splits K over the threads (each thread streams whole contiguous rows of w) and sums
// the per-thread partial products at the end; `RowMatmulTransposed` splits N (each output is one contiguous
// dot product); `RowMatmulTiles` splits the tiles (each thread one contiguous range); batched calls split
// the batch. The threads are XLA's own intra-op pool: the calling thread claims parts like any other, so it
// never waits on a part no thread has started, and the kernel cannot deadlock when XLA runs several at once.
//
// Numerics: fp32 accumulation in a fixed order for a given thread count (deterministic run to run); the
// summation order differs from XLA's dot, as any two matmul libraries' do.

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 floats in whatever vector registers the target has (one zmm with AVX-512, two ymm with AVX2, four
// NEON q registers); aligned(4) makes loads and stores through it unaligned-safe.
typedef float Vec __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;
constexpr int kMaxRows = 16;  // more rows than this is a matmul XLA's own kernels do well
constexpr int kRowsPerPass = 8;  // rows of w folded into the partial rows per pass over them

inline Vec Load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }

// acc (M, N) += x[:, k0:k1] @ w[k0:k1, :]  (w row-major (K, N)); acc starts at zero.
template <int M>
void RowsOfW(const float* x, const float* w, float* acc, int64_t K, int64_t N, int64_t k0, int64_t k1) {
  std::memset(acc, 0, sizeof(float) * M * N);
  for (int64_t k = k0; k < k1; k += kRowsPerPass) {
    const int rows = static_cast<int>(std::min<int64_t>(kRowsPerPass, k1 - k));
    float xk[M][kRowsPerPass];
    for (int r = 0; r < M; ++r)
      for (int i = 0; i < kRowsPerPass; ++i) xk[r][i] = i < rows ? x[r * K + k + i] : 0.f;
    const float* wk = w + k * N;
    int64_t j = 0;
    for (; j + kLanes <= N; j += kLanes) {
      Vec a[M];
      for (int r = 0; r < M; ++r) a[r] = Load(acc + r * N + j);
      for (int i = 0; i < rows; ++i) {
        const Vec wv = Load(wk + i * N + j);
        for (int r = 0; r < M; ++r) a[r] += xk[r][i] * wv;
      }
      for (int r = 0; r < M; ++r) Store(acc + r * N + j, a[r]);
    }
    for (; j < N; ++j)
      for (int i = 0; i < rows; ++i)
        for (int r = 0; r < M; ++r) acc[r * N + j] += xk[r][i] * wk[i * N + j];
  }
}

// y[:, n0:n1] = x @ w[n0:n1, :].T  (w row-major (N, K)); every output is one dot over a contiguous row.
template <int M>
void RowsOfWT(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = w + n * K;
    Vec a[M];
    for (int r = 0; r < M; ++r) a[r] = Vec{};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
      const Vec wv = Load(wn + k);
      for (int r = 0; r < M; ++r) a[r] += Load(x + r * K + k) * wv;
    }
    for (int r = 0; r < M; ++r) {
      float s = 0.f;
      for (int l = 0; l < kLanes; ++l) s += a[r][l];
      for (int64_t t = k; t < K; ++t) s += x[r * K + t] * wn[t];
      y[r * N + n] = s;
    }
  }
}

// y[:, 64t:64t+64] for the rows r0..r0+G of x, from the weight packed in column tiles: tile t is w[:, 64t:64t+64]
// stored contiguously (K, 64). A tile is one sequential stream, the partial rows stay in registers (G x 4
// vectors), and a thread's tiles are one contiguous range: 47-55 against 24-32 GB/s for `RowsOfW` on the
// `small` decoder's shapes inside its decode step (benchmarks/README.md).
constexpr int kTile = 64;
constexpr int kTileRows = 4;  // rows per pass over a tile: 16 accumulators of the 32 AVX-512 registers

template <int G>
void TileRows(const float* x, const float* tile, float* y, int64_t K, int64_t N) {
  constexpr int V = kTile / kLanes;
  Vec a[G][V];
  for (int r = 0; r < G; ++r)
    for (int v = 0; v < V; ++v) a[r][v] = Vec{};
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = tile + k * kTile;
    for (int v = 0; v < V; ++v) {
      const Vec wv = Load(wk + v * kLanes);
      for (int r = 0; r < G; ++r) a[r][v] += x[r * K + k] * wv;
    }
  }
  for (int r = 0; r < G; ++r)
    for (int v = 0; v < V; ++v) Store(y + r * N + v * kLanes, a[r][v]);
}

// Parts claimed through one counter; the counters outlive the call for a pool task that starts late.
struct Claims {
  std::atomic<int> next{0};
  std::atomic<int> done{0};
};

template <typename Part>
void RunParts(ffi::ThreadPool& pool, int parts, Part part) {
  auto claims = std::make_shared<Claims>();
  auto work = [claims, parts, part] {
    for (int p; (p = claims->next.fetch_add(1, std::memory_order_relaxed)) < parts;) {
      part(p);
      claims->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int p = 1; p < parts; ++p) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (claims->done.load(std::memory_order_acquire) < parts) {
  }
}

// Below this many bytes of weights one thread streams the weight faster than two can start on it.
constexpr int64_t kOneThreadBytes = 128 << 10;

int Threads(ffi::ThreadPool& pool, int64_t weight_bytes) {
  return weight_bytes < kOneThreadBytes ? 1 : std::clamp(static_cast<int>(pool.num_threads()), 1, 16);
}

// One part per pool thread. Finer parts (64-512 KB of weights each, claimed as threads come free) and
// software prefetches were measured slower on the `small` decoder's shapes (benchmarks/README.md).
int64_t PartLength(int64_t length, int threads, int64_t multiple) {
  const int64_t part = std::max<int64_t>((length + threads - 1) / threads, 1);
  return (part + multiple - 1) / multiple * multiple;
}

template <int M>
void MatmulKN(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t K, int64_t N) {
  // Part 0 accumulates into y itself; the others into scratch, added to y at the end.
  const int64_t chunk = PartLength(K, Threads(pool, K * N * 4), kRowsPerPass);
  const int parts = static_cast<int>((K + chunk - 1) / chunk);
  thread_local std::vector<float> scratch;
  scratch.resize(std::max<size_t>(scratch.size(), static_cast<size_t>(parts - 1) * M * N));
  float* partial = scratch.data();
  RunParts(pool, parts, [=](int p) {
    float* acc = p == 0 ? y : partial + static_cast<size_t>(p - 1) * M * N;
    RowsOfW<M>(x, w, acc, K, N, p * chunk, std::min(K, (p + 1) * chunk));
  });
  for (int p = 1; p < parts; ++p) {
    const float* src = partial + static_cast<size_t>(p - 1) * M * N;
    for (int64_t i = 0; i < M * N; ++i) y[i] += src[i];
  }
}

template <int M>
void MatmulNK(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t K, int64_t N) {
  const int64_t chunk = PartLength(N, Threads(pool, K * N * 4), 1);
  const int parts = static_cast<int>((N + chunk - 1) / chunk);
  RunParts(pool, parts, [=](int p) { RowsOfWT<M>(x, w, y, K, N, p * chunk, std::min(N, (p + 1) * chunk)); });
}

void MatmulTiles(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t M, int64_t K,
                 int64_t tiles) {
  const int64_t N = tiles * kTile;
  const int64_t chunk = PartLength(tiles, Threads(pool, K * N * 4), 1);
  const int parts = static_cast<int>((tiles + chunk - 1) / chunk);
  RunParts(pool, parts, [=](int p) {
    for (int64_t t = p * chunk; t < std::min(tiles, (p + 1) * chunk); ++t) {
      const float* tile = w + t * K * kTile;
      // More rows than a pass takes: further passes re-read the tile, from the core's cache when it fits.
      for (int64_t r = 0; r < M; r += kTileRows) {
        const float* xr = x + r * K;
        float* yr = y + r * N + t * kTile;
        switch (std::min<int64_t>(kTileRows, M - r)) {
          case 1: TileRows<1>(xr, tile, yr, K, N); break;
          case 2: TileRows<2>(xr, tile, yr, K, N); break;
          case 3: TileRows<3>(xr, tile, yr, K, N); break;
          default: TileRows<4>(xr, tile, yr, K, N); break;
        }
      }
    }
  });
}

// Batched: B independent products, y[b] (M, N) = x[b] (M, K) @ w[b], one batch entry per part-step (a decode
// step's attention: batch x kv heads entries of single-query scores against K and probabilities times V).
template <int M, bool kTransposed>
void MatmulBatched(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t B, int64_t K,
                   int64_t N) {
  const int64_t chunk = PartLength(B, Threads(pool, B * K * N * 4), 1);
  const int parts = static_cast<int>((B + chunk - 1) / chunk);
  RunParts(pool, parts, [=](int p) {
    for (int64_t b = p * chunk; b < std::min(B, (p + 1) * chunk); ++b) {
      const float* xb = x + b * M * K;
      const float* wb = w + b * K * N;
      float* yb = y + b * M * N;
      if constexpr (kTransposed) RowsOfWT<M>(xb, wb, yb, K, N, 0, N);
      else RowsOfW<M>(xb, wb, yb, K, N, 0, K);
    }
  });
}

using Fn = void (*)(ffi::ThreadPool&, const float*, const float*, float*, int64_t, int64_t, int64_t);

// One entry per row count: B == 1 is the plain product, split over K or N; B > 1 splits the batch.
template <int M, bool kTransposed>
void Multiply(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t B, int64_t K, int64_t N) {
  if (B > 1) MatmulBatched<M, kTransposed>(pool, x, w, y, B, K, N);
  else if constexpr (kTransposed) MatmulNK<M>(pool, x, w, y, K, N);
  else MatmulKN<M>(pool, x, w, y, K, N);
}

template <bool kTransposed, int... Ms>
constexpr std::array<Fn, sizeof...(Ms)> Table(std::integer_sequence<int, Ms...>) {
  return {&Multiply<Ms + 1, kTransposed>...};
}

// w (K, N) or (N, K) as `kTransposed` says, x (..., K): the leading axes are the rows. With leading batch
// axes, w (*batch, K, N) or (*batch, N, K) and x (*batch, ..., K): each batch entry its own product.
template <bool kTransposed>
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  const auto xd = x.dimensions();
  const size_t rank = wd.size();
  if (rank < 2) return ffi::Error::InvalidArgument("row_matmul: the weight must have at least 2 axes");
  const int64_t K = kTransposed ? wd[rank - 1] : wd[rank - 2];
  const int64_t N = kTransposed ? wd[rank - 2] : wd[rank - 1];
  bool batch_matches = xd.size() > rank - 2;
  int64_t B = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    B *= wd[i];
    batch_matches = batch_matches && xd[i] == wd[i];
  }
  if (K == 0 || B == 0 || xd.size() == 0 || xd[xd.size() - 1] != K || !batch_matches)
    return ffi::Error::InvalidArgument(
        "row_matmul: x's last axis must match the weight's (non-empty) input axis, and its first the batch axes");
  const int64_t M = static_cast<int64_t>(x.element_count()) / (B * K);
  if (M < 1 || M > kMaxRows) return ffi::Error::InvalidArgument("row_matmul: 1 to 16 rows only");
  static const auto by_rows = Table<kTransposed>(std::make_integer_sequence<int, kMaxRows>{});
  by_rows[M - 1](pool, x.typed_data(), w.typed_data(), y->typed_data(), B, K, N);
  return ffi::Error::Success();
}

// x (..., K) and w packed as (tiles, K, 64) -> y (..., tiles * 64).
ffi::Error MatmulTiled(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  const auto xd = x.dimensions();
  if (wd.size() != 3 || wd[2] != kTile || xd.size() == 0 || wd[1] == 0 || xd[xd.size() - 1] != wd[1])
    return ffi::Error::InvalidArgument("row_matmul tiles: w must be (tiles, K, 64) with K = x's last axis");
  const int64_t M = static_cast<int64_t>(x.element_count()) / wd[1];
  if (M < 1 || M > kMaxRows) return ffi::Error::InvalidArgument("row_matmul: 1 to 16 rows only");
  MatmulTiles(pool, x.typed_data(), w.typed_data(), y->typed_data(), M, wd[1], wd[0]);
  return ffi::Error::Success();
}

// Asks Linux to back [p, p + bytes) with 2 MB pages when it is first written (transparent huge pages in
// "madvise" mode, the common default). The range is widened to whole 2 MB pages, which may reach into XLA's
// neighbouring temporaries: the advice changes only the page size, never the contents. Streaming a packed
// weight from 2 MB pages skips most TLB misses (71-79 against 45-52 GB/s in C on the dev VM); memory that was
// already written keeps its pages, so only a process's first decode call places them.
void AdviseHugePages(void* p, size_t bytes) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes + kHuge - 1) & ~(kHuge - 1);
  if (bytes >= kHuge) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice: failure is harmless
#endif
}

// w (K, N) -> (N / 64, K, 64), the layout `MatmulTiles` streams. A custom call rather than XLA's transpose:
// XLA hoists a custom call whose operand does not change out of a loop, and does not hoist a transpose
// ("not worth hoisting" on its own), so inside a decode loop the weights are packed once, not every step.
ffi::Error PackTiles(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  const auto wd = w.dimensions();
  if (wd.size() != 2 || wd[1] % kTile != 0)
    return ffi::Error::InvalidArgument("row_matmul pack: w must be 2-D with a multiple of 64 columns");
  const int64_t K = wd[0], N = wd[1], tiles = N / kTile;
  const float* src = w.typed_data();
  float* dst = out->typed_data();
  AdviseHugePages(dst, K * N * sizeof(float));
  // Blocks of 4 rows: each part reads its rows of w in order and writes 1 KB runs into every tile (`small`'s
  // 166 MB in 11.9 ms; blocks of 1, 2, 8, 16 or 64 rows took 12.7-17.2 ms, in a noisy phase of the VM).
  constexpr int64_t kBlock = 4;
  const int64_t chunk = PartLength(K, Threads(pool, K * N * 4), kBlock);
  const int parts = static_cast<int>((K + chunk - 1) / chunk);
  RunParts(pool, parts, [=](int p) {
    for (int64_t k0 = p * chunk; k0 < std::min(K, (p + 1) * chunk); k0 += kBlock) {
      const int64_t k1 = std::min({K, k0 + kBlock, (p + 1) * chunk});
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t k = k0; k < k1; ++k)
          std::memcpy(dst + (t * K + k) * kTile, src + k * N + t * kTile, sizeof(float) * kTile);
    }
  });
  return ffi::Error::Success();
}

// The matmul handlers take the same operands: (x, w) -> y, fp32, on XLA's intra-op thread pool.
auto Binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowMatmul, Matmul<false>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RowMatmulTransposed, Matmul<true>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RowMatmulTiles, MatmulTiled, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RowMatmulPackTiles, PackTiles,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
