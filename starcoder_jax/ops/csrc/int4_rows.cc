// Products of activation rows with a packed 4-bit weight
// (starcoder_jax.ops.int4.Packed4), for XLA:CPU through the XLA FFI.
//
// y[m, o] = sum over groups g of s(o, g) * sum_j v(code(o, g, j)) * x[m, g*G + j]
//
// codes uint8 [O, Ip/2]: within a group the low nibbles of its G/2 bytes are
// its first G/2 inputs and the high nibbles its last G/2. v(c) = c - 8 (int4)
// or NF4_VALUES[c] (nf4). s(o, g): a bfloat16 step (int4), or
// offset + int8 code * float32 step of the block of 256 groups (nf4).
//
// Each chunk of output rows is unpacked in registers and kept in cache
// while every block of 4 rows of x passes over it. Output rows are cut into
// chunks shared by the calling thread and XLA's intra-op pool.

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kScaleBlock = 256;  // nf4: groups per float32 step

constexpr float kNf4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

struct Weight {
  const uint8_t* codes;     // [O, Ip/2]
  const uint16_t* step;     // int4: bfloat16 bits [O, ng]
  const int8_t* absmax;     // nf4: [O, ng]
  const float* block_step;  // nf4: [O, nb]
  float offset;             // nf4
  bool nf4;
  int64_t ng, nb;
};

inline float group_scale(const Weight& w, int64_t o, int64_t g) {
  if (!w.nf4) {
    uint32_t bits = static_cast<uint32_t>(w.step[o * w.ng + g]) << 16;
    float s;
    std::memcpy(&s, &bits, sizeof s);
    return s;
  }
  return w.offset + static_cast<float>(w.absmax[o * w.ng + g]) * w.block_step[o * w.nb + g / kScaleBlock];
}

#ifdef __AVX2__

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// nf4: output rows [o0, o1) for M rows of x, groups of G inputs. The codes
// become floats in registers (two 8-entry permutes and a blend look up the
// 16 NF4 values) and multiply x in float32. A row's sums run in the same
// order whatever M is, so a row gives the same result alone or in a batch.
template <int G, int M>
void nf4_float_rows(const float* x, int64_t ip, const Weight& w, int64_t o0, int64_t o1, float* y, int64_t o_all) {
  static_assert(G % 16 == 0, "a group is whole 8-byte chunks of each nibble half");
  constexpr int kChunks = G / 16;  // 8-value chunks per nibble half
  const __m256 lut_lo = _mm256_loadu_ps(kNf4), lut_hi = _mm256_loadu_ps(kNf4 + 8);
  const __m256i low4 = _mm256_set1_epi32(0xF);
  auto lookup = [&](__m256i c) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, c), _mm256_permutevar8x32_ps(lut_hi, c),
                            _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
  };
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = w.codes + o * (ip / 2);
    __m256 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < w.ng; ++g) {
      const uint8_t* b = row + g * (G / 2);
      const float* xg = x + g * G;
      __m256 lo_sum[M], hi_sum[M];  // two independent chains a row (FMA latency)
      for (int r = 0; r < M; ++r) lo_sum[r] = hi_sum[r] = _mm256_setzero_ps();
      for (int k = 0; k < kChunks; ++k) {
        __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8 * k)));
        __m256 vlo = lookup(_mm256_and_si256(c, low4)), vhi = lookup(_mm256_srli_epi32(c, 4));
        for (int r = 0; r < M; ++r) {
          const float* xr = xg + r * ip;
          lo_sum[r] = _mm256_fmadd_ps(vlo, _mm256_loadu_ps(xr + 8 * k), lo_sum[r]);
          hi_sum[r] = _mm256_fmadd_ps(vhi, _mm256_loadu_ps(xr + G / 2 + 8 * k), hi_sum[r]);
        }
      }
      const __m256 s = _mm256_set1_ps(group_scale(w, o, g));
      for (int r = 0; r < M; ++r) acc[r] = _mm256_fmadd_ps(_mm256_add_ps(lo_sum[r], hi_sum[r]), s, acc[r]);
    }
    for (int r = 0; r < M; ++r) y[r * o_all + o] = hsum(acc[r]);
  }
}

// int4 with int8 activations, as llama.cpp's q4_0 x q8_0: each group of x
// is rounded to int8 by its own scale (xq, xscale [M, ng]) and the codes
// multiply it in 16- and 32-bit integer sums, exact; each group's sum then
// takes off 8 * sum(xq) (codes are c, the values c - 8) and is scaled once.
// Groups of a multiple of 64 inputs (32 bytes: 32 low and 32 high nibbles).
template <int G, int M>
void int4_q8_rows(const int8_t* xq, const float* xscale, const int32_t* xqsum, int64_t ip, const Weight& w,
                  int64_t o0, int64_t o1, float* y, int64_t o_all) {
  static_assert(G % 64 == 0, "32-byte blocks");
  const __m256i low4 = _mm256_set1_epi8(0xF);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = w.codes + o * (ip / 2);
    __m256 acc[M];
    float corr[M] = {};
    for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < w.ng; ++g) {
      const float sw = group_scale(w, o, g);
      __m256i sums[M];
      for (int r = 0; r < M; ++r) sums[r] = _mm256_setzero_si256();
      for (int blk = 0; blk < G / 64; ++blk) {
        // bytes [blk*32, blk*32+32) of the group: low nibbles are inputs
        // blk*32 + [0, 32), high nibbles G/2 + blk*32 + [0, 32)
        __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + g * (G / 2) + 32 * blk));
        __m256i lo = _mm256_and_si256(bytes, low4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
        for (int r = 0; r < M; ++r) {
          const int8_t* xr = xq + r * ip + g * G;
          __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32 * blk));
          __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + G / 2 + 32 * blk));
          // u8 codes (<= 15) x s8 (|x| <= 127): a pair sums to at most 3810, two pairs 7620
          __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
          sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(p, ones));
        }
      }
      for (int r = 0; r < M; ++r) {
        const float s = sw * xscale[r * w.ng + g];
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), _mm256_set1_ps(s), acc[r]);
        corr[r] += s * static_cast<float>(8 * xqsum[r * w.ng + g]);
      }
    }
    for (int r = 0; r < M; ++r) y[r * o_all + o] = hsum(acc[r]) - corr[r];
  }
}

#else  // no AVX2: the same sums, one value at a time

template <int G, int M>
void nf4_float_rows(const float* x, int64_t ip, const Weight& w, int64_t o0, int64_t o1, float* y, int64_t o_all) {
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = w.codes + o * (ip / 2);
    float acc[M] = {};
    for (int64_t g = 0; g < w.ng; ++g) {
      float part[M] = {};
      for (int j = 0; j < G / 2; ++j) {
        uint8_t byte = row[g * (G / 2) + j];
        for (int r = 0; r < M; ++r)
          part[r] += kNf4[byte & 0xF] * x[r * ip + g * G + j] + kNf4[byte >> 4] * x[r * ip + g * G + G / 2 + j];
      }
      float s = group_scale(w, o, g);
      for (int r = 0; r < M; ++r) acc[r] += part[r] * s;
    }
    for (int r = 0; r < M; ++r) y[r * o_all + o] = acc[r];
  }
}

template <int G, int M>
void int4_q8_rows(const int8_t* xq, const float* xscale, const int32_t* xqsum, int64_t ip, const Weight& w,
                  int64_t o0, int64_t o1, float* y, int64_t o_all) {
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = w.codes + o * (ip / 2);
    float acc[M] = {}, corr[M] = {};
    for (int64_t g = 0; g < w.ng; ++g) {
      int32_t sums[M] = {};
      for (int j = 0; j < G / 2; ++j) {
        uint8_t byte = row[g * (G / 2) + j];
        for (int r = 0; r < M; ++r)
          sums[r] += (byte & 0xF) * xq[r * ip + g * G + j] + (byte >> 4) * xq[r * ip + g * G + G / 2 + j];
      }
      const float sw = group_scale(w, o, g);
      for (int r = 0; r < M; ++r) {
        const float s = sw * xscale[r * w.ng + g];
        acc[r] += static_cast<float>(sums[r]) * s;
        corr[r] += s * static_cast<float>(8 * xqsum[r * w.ng + g]);
      }
    }
    for (int r = 0; r < M; ++r) y[r * o_all + o] = acc[r] - corr[r];
  }
}

#endif

// Everything a call's chunks read: x as floats (nf4) or as int8 groups (int4).
struct Call {
  const float* x;
  std::vector<int8_t> xq;       // [M, Ip]
  std::vector<float> xscale;    // [M, ng]
  std::vector<int32_t> xqsum;   // [M, ng]
  int64_t ip, o;
  Weight w;
  float* y;
};

// Output rows [o0, o1) for rows [r0, r0 + M) of x.
using ChunkFn = void (*)(const Call&, int64_t, int64_t, int64_t);

template <int G, int M>
void nf4_chunk(const Call& c, int64_t o0, int64_t o1, int64_t r0) {
  nf4_float_rows<G, M>(c.x + r0 * c.ip, c.ip, c.w, o0, o1, c.y + r0 * c.o, c.o);
}

template <int G, int M>
void int4_chunk(const Call& c, int64_t o0, int64_t o1, int64_t r0) {
  int4_q8_rows<G, M>(c.xq.data() + r0 * c.ip, c.xscale.data() + r0 * c.w.ng, c.xqsum.data() + r0 * c.w.ng, c.ip,
                     c.w, o0, o1, c.y + r0 * c.o, c.o);
}

template <int G>
ChunkFn pick(bool nf4, int64_t m) {
  switch (m) {
    case 1: return nf4 ? nf4_chunk<G, 1> : int4_chunk<G, 1>;
    case 2: return nf4 ? nf4_chunk<G, 2> : int4_chunk<G, 2>;
    case 3: return nf4 ? nf4_chunk<G, 3> : int4_chunk<G, 3>;
    case 4: return nf4 ? nf4_chunk<G, 4> : int4_chunk<G, 4>;
  }
  return nullptr;
}

ChunkFn pick(bool nf4, int64_t group, int64_t m) {
  switch (group) {
    case 64: return pick<64>(nf4, m);
    case 128: return pick<128>(nf4, m);
  }
  return nullptr;
}

// Chunks of output rows, taken by the caller and by pool threads from one
// counter: the caller never waits on a task that has not started, so calls
// running side by side on a small pool cannot stall each other. A chunk's
// weight bytes stay in cache while every block of kRowBlock rows of x
// passes over them; a row's sums do not depend on its block.
struct Work {
  static constexpr int64_t kRowBlock = 4;
  ChunkFn block, rest;  // kRowBlock rows; the last m % kRowBlock
  int64_t m;
  Call call;
  int64_t chunk, n_chunks;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    for (int64_t c; (c = next.fetch_add(1)) < n_chunks;) {
      const int64_t o0 = c * chunk, o1 = std::min(call.o, (c + 1) * chunk);
      int64_t r = 0;
      for (; r + kRowBlock <= m; r += kRowBlock) block(call, o0, o1, r);
      if (r < m) rest(call, o0, o1, r);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Rounds each group of G inputs of each row of x to int8 (absmax / 127).
void quantize_rows(Call& c, int64_t m, int64_t group) {
  c.xq.resize(m * c.ip);
  c.xscale.resize(m * c.w.ng);
  c.xqsum.resize(m * c.w.ng);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < c.w.ng; ++g) {
      const float* xg = c.x + r * c.ip + g * group;
      float amax = 0.0f;
      for (int64_t j = 0; j < group; ++j) amax = std::max(amax, std::fabs(xg[j]));
      const float step = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      for (int64_t j = 0; j < group; ++j) {
        int8_t q = static_cast<int8_t>(std::nearbyint(xg[j] * inv));
        c.xq[r * c.ip + g * group + j] = q;
        sum += q;
      }
      c.xscale[r * c.w.ng + g] = step;
      c.xqsum[r * c.w.ng + g] = sum;
    }
}

ffi::Error product(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes, Weight w,
                   int64_t scale_cols, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), cd = codes.dimensions();
  if (xd.size() != 2 || cd.size() != 2) return ffi::Error::InvalidArgument("4-bit rows: x and codes must be 2-D");
  int64_t m = xd[0], ip = xd[1], o = cd[0];
  if (cd[1] * 2 != ip) return ffi::Error::InvalidArgument("4-bit rows: x's inputs must be twice the code bytes a row");
  if (scale_cols <= 0 || ip % scale_cols) return ffi::Error::InvalidArgument("4-bit rows: inputs are not whole groups");
  int64_t group = ip / scale_cols;
  w.codes = codes.typed_data();
  w.ng = scale_cols;
  if (m == 0 || o == 0) return ffi::Error::Success();
  auto work = std::make_shared<Work>();
  work->m = m;
  work->block = pick(w.nf4, group, Work::kRowBlock);
  work->rest = pick(w.nf4, group, m % Work::kRowBlock);
  if (work->block == nullptr) return ffi::Error::InvalidArgument("4-bit rows: groups must be 64 or 128 inputs");
  Call& c = work->call;
  c.x = x.typed_data();
  c.ip = ip;
  c.o = o;
  c.w = w;
  c.y = y->typed_data();
  if (!w.nf4) quantize_rows(c, m, group);
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // at most 256 KiB of codes a chunk (kept in L2 while x's rows pass), at
  // least 4 chunks a thread, whole cache lines of output (16 rows)
  const int64_t by_cache = (256 << 10) / std::max<int64_t>(1, ip / 2), by_threads = (o + 4 * threads - 1) / (4 * threads);
  work->chunk = std::max<int64_t>(16, (std::min(by_cache, by_threads) + 15) / 16 * 16);
  work->n_chunks = (o + work->chunk - 1) / work->chunk;
  int64_t helpers = std::min(threads, work->n_chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < work->n_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

ffi::Error int4_rows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                     ffi::Buffer<ffi::BF16> step, ffi::ResultBuffer<ffi::F32> y) {
  Weight w{};
  w.step = reinterpret_cast<const uint16_t*>(step.untyped_data());
  w.nf4 = false;
  auto sd = step.dimensions();
  if (sd.size() != 2 || sd[0] != codes.dimensions()[0]) return ffi::Error::InvalidArgument("int4 rows: step must be [O, groups]");
  return product(pool, x, codes, w, sd[1], y);
}

ffi::Error nf4_rows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                    ffi::Buffer<ffi::S8> absmax, ffi::Buffer<ffi::F32> block_step,
                    ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::F32> y) {
  Weight w{};
  w.absmax = absmax.typed_data();
  w.block_step = block_step.typed_data();
  w.offset = offset.typed_data()[0];
  w.nf4 = true;
  auto sd = absmax.dimensions(), bd = block_step.dimensions();
  if (sd.size() != 2 || sd[0] != codes.dimensions()[0]) return ffi::Error::InvalidArgument("nf4 rows: absmax must be [O, groups]");
  if (bd.size() != 2 || bd[0] != sd[0] || bd[1] * kScaleBlock < sd[1])
    return ffi::Error::InvalidArgument("nf4 rows: block steps must be [O, ceil(groups / 256)]");
  w.nb = bd[1];
  return product(pool, x, codes, w, sd[1], y);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StarcoderInt4Rows, int4_rows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(StarcoderNf4Rows, nf4_rows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
