// Fused causal grouped-query attention for XLA's CPU backend (an XLA FFI custom call).
//
// What and why: on CPU, XLA runs attention as separate ops over whole [B, K, G, T, S] score tensors
// (score matmul, masked max, exp, sum, divide, value matmul, and as many again in the backward pass),
// each a pass through main memory. Here one task per (row b, KV head k) keeps a block of 64 queries'
// scores in cache from the score product to the value product, and the backward pass recomputes them
// from the saved log-sum-exp (as flash attention does) instead of storing probabilities.
//
// Dimension legend (the project's): B batch, T queries, S keys, N query heads, K KV heads, G = N / K
// query heads per KV head, H head dim. Layouts are the model's token-major ones:
//   q, o, dq: [B, T, N, H]   k, v, dk, dv: [B, S, K, H]   valid: [B, S] (bool)   lse: [B, N, T]
// Query t sits at position t + S - T; key s is visible to it when s <= t + S - T and valid[b, s].
// Scores are scaled by 1/sqrt(H). A query with no visible key gets a zero output and lse = +inf.
//
// Portable C++17 with GCC/Clang vector extensions: 16-float vectors compile to AVX-512, AVX2 halves or
// NEON quarters, whatever -march=native offers. lm2_jax/kernels/build.py compiles this file.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kVec = 16;        // floats per vector
constexpr int kBlock = 64;      // queries whose scores stay in cache together
constexpr int kLanes = kBlock / kVec;
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned loads and stores
typedef int32_t i16v __attribute__((vector_size(64)));

inline v16 Load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void Store(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
inline v16 Splat(float x) { return v16{} + x; }

// e^x for x <= 0 (softmax arguments), 0 below -87 (where float underflows) and for -inf.
// 2^(x log2 e) = 2^n 2^f with n = round(x log2 e), |f| <= 1/2; 2^f = e^(f ln 2) by its degree-6 Taylor
// polynomial (relative error < 2e-7).
inline v16 Exp(v16 x) {
  const v16 lo = Splat(-87.0f);
  v16 xc = x < lo ? lo : x;
  v16 y = xc * 1.44269504088896341f;
  const v16 magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  v16 n = (y + magic) - magic;
  v16 f = (y - n) * 0.693147180559945309f;
  v16 p = Splat(1.0f / 720);
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  v16 out = p * scale;
  return x < lo ? v16{} : out;
}

// C[m, n] (+)= A[m, kd] B[kd, n]: B and C row-major with leading dimensions ldb, ldc, n a multiple of
// kVec; A's element (i, p) at a[i * ars + p * acs], so A^T is the same call with the strides swapped.
// Tiles of MR rows x NV vectors accumulate in registers over the whole kd.
template <int MR, int NV>
inline void Tile(int64_t kd, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
                 float* c, int64_t ldc, bool accumulate) {
  v16 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? Load(c + r * ldc + v * kVec) : v16{};
  for (int64_t p = 0; p < kd; ++p) {
    v16 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Load(b + p * ldb + v * kVec);
    for (int r = 0; r < MR; ++r) {
      v16 av = Splat(a[r * ars + p * acs]);
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) Store(c + r * ldc + v * kVec, acc[r][v]);
}

template <int NV>
void Columns(int64_t m, int64_t kd, const float* a, int64_t ars, int64_t acs, const float* b,
             int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int kRows = NV <= 2 ? 8 : 4;  // 16 accumulators either way
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows)
    Tile<kRows, NV>(kd, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, accumulate);
  for (; i < m; ++i) Tile<1, NV>(kd, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, accumulate);
}

void Gemm(int64_t m, int64_t n, int64_t kd, const float* a, int64_t ars, int64_t acs, const float* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 4 * kVec <= n; j += 4 * kVec)
    Columns<4>(m, kd, a, ars, acs, b + j, ldb, c + j, ldc, accumulate);
  switch ((n - j) / kVec) {
    case 3: Columns<3>(m, kd, a, ars, acs, b + j, ldb, c + j, ldc, accumulate); break;
    case 2: Columns<2>(m, kd, a, ars, acs, b + j, ldb, c + j, ldc, accumulate); break;
    case 1: Columns<1>(m, kd, a, ars, acs, b + j, ldb, c + j, ldc, accumulate); break;
    default: break;
  }
}

struct Dims {
  int64_t b, t, s, n, k, g, h;
  int64_t ldq, ldk;  // row strides of q/o/dq ([.., N, H]: N * H) and of k/v/dk/dv (K * H)
  float scale;
};

Dims GetDims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  Dims d;
  d.b = qd[0], d.t = qd[1], d.n = qd[2], d.h = qd[3], d.s = kd[1], d.k = kd[2];
  d.g = d.k > 0 ? d.n / d.k : 0;
  d.ldq = d.n * d.h, d.ldk = d.k * d.h;
  d.scale = 1.0f / std::sqrt(static_cast<float>(d.h));
  return d;
}

ffi::Error Check(const Dims& d) {
  if (d.k <= 0 || d.n % d.k)
    return ffi::Error::InvalidArgument("query heads must be a multiple of KV heads");
  if (d.s < d.t) return ffi::Error::InvalidArgument("fewer keys than queries");
  if (d.h % kVec) return ffi::Error::InvalidArgument("head dim must be a multiple of 16");
  return ffi::Error::Success();
}

// Rows [t0, t0 + rows) of head n of a [B, T, N, H] tensor, times mult, transposed into [H, kBlock]
// (columns past rows zero).
void PackTransposed(const Dims& d, const float* src, int64_t b, int64_t n, int64_t t0, int64_t rows,
                    float mult, float* dst) {
  if (rows < kBlock) std::fill(dst, dst + d.h * kBlock, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = src + (b * d.t + t0 + r) * d.ldq + n * d.h;
    for (int64_t x = 0; x < d.h; ++x) dst[x * kBlock + r] = row[x] * mult;
  }
}

// Keys visible to the block's last query: [0, Width); query t0 + r sees key s when s - Shift <= r.
inline int64_t Width(const Dims& d, int64_t t0, int64_t rows) {
  return std::min(d.s, t0 + rows + d.s - d.t);
}
inline int64_t Shift(const Dims& d, int64_t t0) { return t0 + d.s - d.t; }

// The block's keys in groups by the first query vector that sees them: f(s_begin, s_end, j) with j = 0
// for the keys every query sees, then the keys on the diagonal, which vectors j.. see. Products over
// keys x queries skip the vectors before j (all masked): 15% of the work of a 256-token segment.
template <typename F>
inline void KeyGroups(int64_t width, int64_t shift, F f) {
  const int64_t full = std::min(width, shift + 1);
  if (full > 0) f(int64_t{0}, full, 0);
  for (int j = 0; j < kLanes; ++j) {
    const int64_t lo = std::max(full, shift + j * kVec), hi = std::min(width, shift + (j + 1) * kVec);
    if (lo < hi) f(lo, hi, j);
  }
}

// The block's queries in vectors: f(r_begin, r_count, keys) with keys the number of keys they see.
template <typename F>
inline void QueryGroups(int64_t rows, int64_t width, int64_t shift, F f) {
  for (int64_t r0 = 0; r0 < rows; r0 += kVec) {
    const int64_t count = std::min<int64_t>(kVec, rows - r0);
    f(r0, count, std::min(width, shift + r0 + count));
  }
}

// Lane indices 0..kBlock-1 as kLanes vectors.
struct Lanes {
  i16v v[kLanes];
  Lanes() {
    for (int l = 0; l < kLanes; ++l)
      for (int i = 0; i < kVec; ++i) v[l][i] = l * kVec + i;
  }
};

// Runs task(i) for i in [0, count) on the caller and up to the pool's threads. Helpers that start after
// the work is gone return at once; the caller waits only for work that was taken.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, F task) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, count, task]() {
    int64_t i;
    while ((i = shared->next.fetch_add(1)) < count) {
      task(i);
      if (shared->done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    auto copy = work;
    pool.Schedule(std::move(copy));
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == count; });
}

// Forward: per (b, k) task, per query head of the group, per block of kBlock queries:
//   S^T [width, kBlock] = K Q^T (scaled Q), column softmax (over keys, vectorised across queries),
//   O [rows, H] = P V written straight into o, then divided by each query's sum.
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> valid, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse) {
  const Dims d = GetDims(q, k);
  if (ffi::Error e = Check(d); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* vm = valid.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, d.b * d.k, [&, d](int64_t task) {
    const int64_t b = task / d.k, kh = task % d.k;
    const float* keys = kp + b * d.s * d.ldk + kh * d.h;
    const float* values = vp + b * d.s * d.ldk + kh * d.h;
    const bool* ok = vm + b * d.s;
    const Lanes lanes;
    std::vector<float> qt(d.h * kBlock), pt(d.s * kBlock);
    for (int64_t g = 0; g < d.g; ++g) {
      const int64_t n = kh * d.g + g;
      for (int64_t t0 = 0; t0 < d.t; t0 += kBlock) {
        const int64_t rows = std::min<int64_t>(kBlock, d.t - t0), width = Width(d, t0, rows);
        const int32_t shift = static_cast<int32_t>(Shift(d, t0));
        PackTransposed(d, qp, b, n, t0, rows, d.scale, qt.data());
        KeyGroups(width, shift, [&](int64_t lo, int64_t hi, int j) {
          Gemm(hi - lo, kBlock - j * kVec, d.h, keys + lo * d.ldk, d.ldk, 1, qt.data() + j * kVec, kBlock,
               pt.data() + lo * kBlock + j * kVec, kBlock, false);
        });
        v16 m[kLanes], sum[kLanes];
        for (int l = 0; l < kLanes; ++l) m[l] = Splat(-INFINITY), sum[l] = v16{};
        for (int64_t s = 0; s < width; ++s) {
          if (!ok[s]) continue;
          const int32_t first = static_cast<int32_t>(s) - shift;  // first query lane that sees s
          for (int l = 0; l < kLanes; ++l) {
            v16 x = Load(pt.data() + s * kBlock + l * kVec);
            x = lanes.v[l] >= first ? x : Splat(-INFINITY);
            m[l] = x > m[l] ? x : m[l];
          }
        }
        for (int64_t s = 0; s < width; ++s) {
          const int32_t first = ok[s] ? static_cast<int32_t>(s) - shift : kBlock;
          for (int l = 0; l < kLanes; ++l) {
            float* at = pt.data() + s * kBlock + l * kVec;
            v16 e = Exp(lanes.v[l] >= first ? Load(at) - m[l] : Splat(-INFINITY));
            Store(at, e);
            sum[l] += e;
          }
        }
        float inv[kBlock];
        for (int64_t r = 0; r < rows; ++r) {
          const float mr = m[r / kVec][r % kVec], sr = sum[r / kVec][r % kVec];
          const bool empty = mr == -INFINITY;  // no visible key: output 0, lse +inf
          inv[r] = empty ? 0.0f : 1.0f / sr;
          lp[(b * d.n + n) * d.t + t0 + r] = empty ? INFINITY : mr + std::log(sr);
        }
        float* out = op + (b * d.t + t0) * d.ldq + n * d.h;
        QueryGroups(rows, width, shift, [&](int64_t r0, int64_t count, int64_t seen) {
          Gemm(count, d.h, seen, pt.data() + r0, 1, kBlock, values, d.ldk, out + r0 * d.ldq, d.ldq, false);
        });
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t x = 0; x < d.h; ++x) out[r * d.ldq + x] *= inv[r];
      }
    }
  });
  return ffi::Error::Success();
}

// Backward, the same tasks and blocks: P^T = e^(S^T - lse) recomputed, dP^T = V dO^T,
// dS^T = P^T (dP^T - delta) / sqrt(H) with delta = rowsum(dO O); dV += P^T dO, dK += dS^T Q (both
// accumulated in the task's own rows of dv, dk), dQ = dS K.
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::F32> o,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  const Dims d = GetDims(q, k);
  if (ffi::Error e = Check(d); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *opp = o.typed_data(), *lp = lse.typed_data(), *dop = dout.typed_data();
  const bool* vm = valid.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor(pool, d.b * d.k, [&, d](int64_t task) {
    const int64_t b = task / d.k, kh = task % d.k;
    const int64_t base = b * d.s * d.ldk + kh * d.h;
    const float *keys = kp + base, *values = vp + base;
    float *dkeys = dkp + base, *dvalues = dvp + base;
    const bool* ok = vm + b * d.s;
    for (int64_t s = 0; s < d.s; ++s) {
      std::fill(dkeys + s * d.ldk, dkeys + s * d.ldk + d.h, 0.0f);
      std::fill(dvalues + s * d.ldk, dvalues + s * d.ldk + d.h, 0.0f);
    }
    const Lanes lanes;
    std::vector<float> qt(d.h * kBlock), dot(d.h * kBlock), pt(d.s * kBlock), dst(d.s * kBlock);
    for (int64_t g = 0; g < d.g; ++g) {
      const int64_t n = kh * d.g + g;
      for (int64_t t0 = 0; t0 < d.t; t0 += kBlock) {
        const int64_t rows = std::min<int64_t>(kBlock, d.t - t0), width = Width(d, t0, rows);
        const int32_t shift = static_cast<int32_t>(Shift(d, t0));
        const int64_t at = (b * d.t + t0) * d.ldq + n * d.h;  // row t0 of head n
        PackTransposed(d, qp, b, n, t0, rows, d.scale, qt.data());
        PackTransposed(d, dop, b, n, t0, rows, 1.0f, dot.data());
        alignas(64) float delta[kBlock], l[kBlock];
        for (int64_t r = 0; r < kBlock; ++r) {  // lanes past the block's rows: no probability
          delta[r] = 0.0f;
          l[r] = INFINITY;
        }
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t x = 0; x < d.h; ++x) delta[r] += opp[at + r * d.ldq + x] * dop[at + r * d.ldq + x];
          l[r] = lp[(b * d.n + n) * d.t + t0 + r];
        }
        KeyGroups(width, shift, [&](int64_t lo, int64_t hi, int j) {
          const int64_t cols = kBlock - j * kVec, c = lo * kBlock + j * kVec;
          Gemm(hi - lo, cols, d.h, keys + lo * d.ldk, d.ldk, 1, qt.data() + j * kVec, kBlock, pt.data() + c,
               kBlock, false);
          Gemm(hi - lo, cols, d.h, values + lo * d.ldk, d.ldk, 1, dot.data() + j * kVec, kBlock,
               dst.data() + c, kBlock, false);
        });
        for (int64_t s = 0; s < width; ++s) {
          const int32_t first = ok[s] ? static_cast<int32_t>(s) - shift : kBlock;
          for (int ln = 0; ln < kLanes; ++ln) {
            float *pa = pt.data() + s * kBlock + ln * kVec, *da = dst.data() + s * kBlock + ln * kVec;
            v16 p = Exp(lanes.v[ln] >= first ? Load(pa) - Load(l + ln * kVec) : Splat(-INFINITY));
            Store(pa, p);
            // Masked lanes may hold stale scores: select, not multiply by p = 0.
            v16 ds = p * (Load(da) - Load(delta + ln * kVec)) * d.scale;
            Store(da, lanes.v[ln] >= first ? ds : v16{});
          }
        }
        KeyGroups(width, shift, [&](int64_t lo, int64_t hi, int j) {
          const int64_t r0 = j * kVec;  // the queries before it do not see these keys
          if (r0 >= rows) return;
          Gemm(hi - lo, d.h, rows - r0, pt.data() + lo * kBlock + r0, kBlock, 1, dop + at + r0 * d.ldq,
               d.ldq, dvalues + lo * d.ldk, d.ldk, true);
          Gemm(hi - lo, d.h, rows - r0, dst.data() + lo * kBlock + r0, kBlock, 1, qp + at + r0 * d.ldq,
               d.ldq, dkeys + lo * d.ldk, d.ldk, true);
        });
        QueryGroups(rows, width, shift, [&](int64_t r0, int64_t count, int64_t seen) {
          Gemm(count, d.h, seen, dst.data() + r0, 1, kBlock, keys, d.ldk, dqp + at + r0 * d.ldq, d.ldq,
               false);
        });
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// Both calls take (q, k, v, valid) first.
static auto AttentionOperands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::PRED>>();
}

// (q, k, v, valid) -> (o, lse).
XLA_FFI_DEFINE_HANDLER_SYMBOL(Lm2CausalAttentionFwd, Forward,
                              AttentionOperands().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

// (q, k, v, valid, o, lse, do) -> (dq, dk, dv).
XLA_FFI_DEFINE_HANDLER_SYMBOL(Lm2CausalAttentionBwd, Backward,
                              AttentionOperands()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
