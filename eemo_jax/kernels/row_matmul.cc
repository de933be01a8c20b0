// Few-row fp32 matmuls for XLA:CPU decode steps: y (M, N) = x (M, K) @ w, with w stored (K, N)
// (`RowMatmul`) or (N, K) (`RowMatmulTransposed`, x @ w.T: a tied embedding as the output head).
//
// Why: a decode step multiplies a handful of rows by every weight of the model once, so it runs at the
// speed weights stream from memory. XLA:CPU's dot streams a (K, N) weight with M = 4 rows at about two
// thirds of the speed of these kernels, which read every weight exactly once, front to back, and keep the
// M partial rows in registers or in the core's own cache (figures in benchmarks/README.md).
//
// Work split: `RowMatmul` splits K over the threads (each thread streams whole contiguous rows of w, the
// pattern the hardware prefetchers follow best) and sums the per-thread partial products at the end;
// `RowMatmulTransposed` splits N (each output is one contiguous dot product). The threads are XLA's own
// intra-op pool: the calling thread claims parts like any other, so it never waits on a part no thread has
// started, and the kernel cannot deadlock when XLA runs several of them at once.
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

using Fn = void (*)(ffi::ThreadPool&, const float*, const float*, float*, int64_t, int64_t);

template <int... Ms>
constexpr std::array<Fn, sizeof...(Ms)> Table(bool transposed, std::integer_sequence<int, Ms...>) {
  return transposed ? std::array<Fn, sizeof...(Ms)>{&MatmulNK<Ms + 1>...}
                    : std::array<Fn, sizeof...(Ms)>{&MatmulKN<Ms + 1>...};
}

template <bool kTransposed>
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("row_matmul: the weight must be 2-D");
  const int64_t K = kTransposed ? wd[1] : wd[0];
  const int64_t N = kTransposed ? wd[0] : wd[1];
  const auto xd = x.dimensions();
  if (K == 0 || xd.size() == 0 || xd[xd.size() - 1] != K)
    return ffi::Error::InvalidArgument("row_matmul: x's last axis must match the weight's (non-empty) input axis");
  const int64_t M = static_cast<int64_t>(x.element_count()) / K;
  if (M < 1 || M > kMaxRows) return ffi::Error::InvalidArgument("row_matmul: 1 to 16 rows only");
  static const auto by_rows = Table(kTransposed, std::make_integer_sequence<int, kMaxRows>{});
  by_rows[M - 1](pool, x.typed_data(), w.typed_data(), y->typed_data(), K, N);
  return ffi::Error::Success();
}

// Both handlers take the same operands: (x, w) -> y, fp32, on XLA's intra-op thread pool.
auto Binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowMatmul, Matmul<false>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RowMatmulTransposed, Matmul<true>, Binding());
