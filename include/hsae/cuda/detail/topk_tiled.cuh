// SPDX-License-Identifier: Apache-2.0
/// \file cuda/detail/topk_tiled.cuh
/// The tiled variant of the per-row top-k (detail/topk.cuh): the same result, bit for
/// bit (same composite keys, same compaction, guard and final sort), with a cheaper
/// streaming filter. It is selected with `cuda_topk_kernel::tiled` (cuda/topk.cuh); why
/// it is not the default is said there.
///
/// Why: the streaming kernel spends about 50 instructions per key (a 64-bit composite key
/// per element, two block barriers and a warp scan per 16-byte vector), so it is bound by
/// instructions, not by HBM reads, and more so for bf16 (docs/TOPK.md; measured ratios to
/// the read floor in bench/RESULTS.md).
/// Here a key costs a float comparison in the common case:
///  - Tiles of 16 keys per thread (4 16-byte loads for fp32, 2 for half/bf16), the next
///    tile's loads issued before the current tile is filtered.
///  - Float thresholds: with t the float whose ordered key is the upper half of `tau`,
///    `v < t` implies key(v, i) < tau and `v > t` implies key(v, i) > tau (proof at
///    `threshold_value`), so a key costs two float comparisons. The 64-bit key is built
///    only to break the rest (v == t, NaN, and everything while t is NaN: before the
///    first compaction when tau is not seeded) and for the keys that enter the buffer.
///  - Survivors take slots with one shared atomic per warp; one block barrier per tile
///    (`__syncthreads_or`: did any key find the buffer full?). On overflow the buffer is
///    compacted to k (raising tau) and the keys that found no slot are offered again.
///  - For k <= twice the block size, tau is seeded before the first key is offered, from
///    the two largest first-tile values of each thread (`seed_threshold`), so the buffer
///    does not fill with the row's first Cap keys and the full-buffer compaction that
///    would follow.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../../config.hpp"
#include "../error.cuh"
#include "topk.cuh"
#include "types.cuh"

HSAE_NAMESPACE_BEGIN

namespace cuda::detail {
HSAE_KERNEL_NAMESPACE_BEGIN

/// A topk_config plus the __launch_bounds__ minimum of resident CTAs per SM. A thread
/// holds a tile in flight (16 registers) besides the tile it filters; at 64 registers
/// (4 x 256 threads per SM) ptxas spills the prefetched tile to local memory, and the
/// store then waits for the load, so the small configurations ask for 3 CTAs (85
/// registers): 24 warps, 48 KiB of loads in flight per SM. k <= 1024 uses 256 threads
/// (3 CTAs fit the H100's shared memory; the compaction over 8192 keys is rare).
template <class Config, int MinBlocks>
struct topk_tiled_config : Config {
  static constexpr int min_blocks = MinBlocks;
};

using topk_tiled_config_256 = topk_tiled_config<topk_config_256, 3>;
using topk_tiled_config_256_aux = topk_tiled_config<topk_config_256_aux, 2>;
using topk_tiled_config_1024 = topk_tiled_config<topk_config<256, 8192, 0, 1024>, 3>;
using topk_tiled_config_1024_aux = topk_tiled_config<topk_config_1024_aux, 1>;
using topk_tiled_config_4096 = topk_tiled_config<topk_config_4096, 1>;
using topk_tiled_config_4096_aux = topk_tiled_config<topk_config_4096_aux, 1>;

/// The float t whose ordered key is the upper 32 bits of `tau`, or a NaN when that is not
/// the ordered key of a number (tau = 0 before the seed or the first compaction, a seed
/// below every real key, or a guard bound).
/// Soundness, for non-NaN v and t, with u the upper half of tau: ordered_key is
/// non-decreasing in v and strictly increasing except that -0.0 and +0.0 share a key,
/// and ordered_key(t) = u except for t = -0 (u = 0x7FFFFFFF, between the keys of the
/// negatives, <= 0x7FFFFFFE, and of zero, 0x80000000).
///  - v < t gives ordered_key(v) < u: for t != +-0 directly; for t = +-0, v < 0.
///  - v > t gives ordered_key(v) > u: for t != -0 directly (v > t excludes v == +-0 when
///    t == +-0); for t = -0, v > 0.
/// So the upper half of key(v, i) is below, resp. above, tau's. A NaN v or t compares
/// false both ways and is decided on the 64-bit key.
__device__ __forceinline__ float threshold_value(std::uint64_t tau) {
  const unsigned u = unsigned(tau >> 32);
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u);
}

/// Uniform (identical in every thread) filter state: thresholds as keys and as floats,
/// and the number of main-buffer compactions so far.
struct tiled_thresholds {
  std::uint64_t tau, atau;
  float tau_f, atau_f;
  int compactions;
};

/// Writes this thread's pending keys (bit j of `pend`: key(j) pending) to buf at slots
/// reserved from `*count` (one shared atomic per warp). Keys whose slot falls at or
/// beyond Cap stay pending: the buffer is full, the caller compacts and retries. All 32
/// lanes must call it.
template <int Cap, int E, class Key>
__device__ __forceinline__ void reserve_and_write(const Key& key, unsigned& pend, std::uint64_t* buf,
                                                  unsigned* count) {
  const unsigned lane = lane_id();
  const unsigned mine = unsigned(__popc(int(pend)));
  unsigned incl = mine;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned t = __shfl_up_sync(0xFFFFFFFFu, incl, unsigned(off));
    if (lane >= unsigned(off)) incl += t;
  }
  const unsigned total = __shfl_sync(0xFFFFFFFFu, incl, 31);
  unsigned base = 0;
  if (lane == 31u && total != 0u) base = atomicAdd(count, total);
  unsigned pos = __shfl_sync(0xFFFFFFFFu, base, 31) + incl - mine;
#pragma unroll
  for (int j = 0; j < E; ++j) {
    if ((pend >> j) & 1u) {
      if (pos < unsigned(Cap)) {
        buf[pos] = key(j);
        pend &= ~(1u << j);
      }
      ++pos;
    }
  }
}

/// Offers this thread's E values (v[j] at row index index(j), present when bit j of
/// `valid` is set; bit j of dead_bits(): latent index(j) is dead, called only when some
/// key may enter the AuxK buffer) to the candidate buffer and, with AuxK, to the
/// dead-latent buffer. All threads call it with the same `th`; it leaves
/// `th` uniform. One block barrier unless a buffer overflows.
template <int Block, int Cap, int CapAux, int E, class Index, class DeadBits>
__device__ __forceinline__ void offer_tile(const float (&v)[E], unsigned valid, const Index& index,
                                           const DeadBits& dead_bits,
                                           std::uint64_t* buf, std::uint64_t* abuf, unsigned k, unsigned k_aux,
                                           topk_buffer_state& st, topk_buffer_state& ast, topk_scratch<Block>& sc,
                                           tiled_thresholds& th) {
  constexpr bool with_aux = CapAux > 0;
  static_assert(E <= 32, "offer_tile: at most 32 keys per thread");
  // Three classes per key against t = threshold_value(tau): v < t is out, v > t is in
  // (its key's upper half is above tau's; see threshold_value), anything else (v == t,
  // a NaN on either side) is decided on the 64-bit key.
  unsigned pend = 0, apend = 0;
  {
    unsigned above = 0, not_below = 0, a_above = 0, a_not_below = 0;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      if (v[j] > th.tau_f) above |= 1u << j;
      if (!(v[j] < th.tau_f)) not_below |= 1u << j;
      if constexpr (with_aux) {
        if (v[j] > th.atau_f) a_above |= 1u << j;
        if (!(v[j] < th.atau_f)) a_not_below |= 1u << j;
      }
    }
    pend = above & valid;
    const unsigned exact = not_below & ~above & valid;
    if (exact != 0u) {
#pragma unroll
      for (int j = 0; j < E; ++j)
        if (((exact >> j) & 1u) && composite_key(v[j], index(j)) > th.tau) pend |= 1u << j;
    }
    if constexpr (with_aux) {
      // Until the AuxK buffer first overflows its threshold is NaN and every key is a
      // candidate: the dead bits come from one or two mask words per vector, not a
      // load per key.
      unsigned a_cand = a_not_below & valid;
      if (a_cand != 0u) a_cand &= dead_bits();
      if (a_cand != 0u) {
        apend = a_cand & a_above;
        const unsigned a_exact = a_cand & ~a_above;
        if (a_exact != 0u) {
#pragma unroll
          for (int j = 0; j < E; ++j)
            if (((a_exact >> j) & 1u) && composite_key(v[j], index(j)) > th.atau) apend |= 1u << j;
        }
      }
    }
  }
  auto key = [&](int j) { return composite_key(v[j], index(j)); };
  for (;;) {
    if (__any_sync(0xFFFFFFFFu, pend != 0u)) reserve_and_write<Cap, E>(key, pend, buf, &st.count);
    if constexpr (with_aux) {
      if (__any_sync(0xFFFFFFFFu, apend != 0u)) reserve_and_write<CapAux, E>(key, apend, abuf, &ast.count);
    }
    if (!__syncthreads_or(int((pend | apend) != 0u))) return;
    // A buffer overflowed: its count went past its capacity (the slots beyond were not
    // written). Both counts are read before a compaction rewrites either.
    const unsigned count = st.count;
    const unsigned acount = with_aux ? ast.count : 0u;
    if (count > unsigned(Cap)) {
      compact<Block>(buf, unsigned(Cap), k, st, sc);  // ends with a barrier
      ++th.compactions;
      th.tau = st.tau;
      th.tau_f = threshold_value(th.tau);
#pragma unroll
      for (int j = 0; j < E; ++j)
        if (((pend >> j) & 1u) && key(j) <= th.tau) pend &= ~(1u << j);
    }
    if constexpr (with_aux) {
      if (acount > unsigned(CapAux)) {
        compact<Block>(abuf, unsigned(CapAux), k_aux, ast, sc);
        th.atau = ast.tau;
        th.atau_f = threshold_value(th.atau);
#pragma unroll
        for (int j = 0; j < E; ++j)
          if (((apend >> j) & 1u) && key(j) <= th.atau) apend &= ~(1u << j);
      }
    }
  }
}

/// Seeds the threshold from the first tile (k <= 2 Block), so that it filters before the
/// buffer ever fills: without it the first Cap keys of a row all enter the buffer and the
/// first compaction runs over a full buffer (at F = 16384 that is a quarter of the row).
/// Thread i contributes two stand-in keys, (m1_i << 32) | 2i and (m2_i << 32) | 2i + 1,
/// m1_i >= m2_i the two largest ordered keys among its first-tile values (0: none, or
/// NaN); a compaction of these 2 Block keys to k sets tau to the k-th largest. That is a
/// valid lower bound: every winning stand-in with a nonzero upper half stands for its own
/// element of the row (a thread's two largest are two elements), whose real key has the
/// same upper half and an inverted index >= 2^31 > 2i + 1, so k distinct real keys exceed
/// tau and the row's k-th largest key does too; a winner with upper half 0 makes tau <
/// 2^31, below every real key. The stand-ins then leave the buffer (count = 0). All threads
/// call it; it ends with a barrier and leaves `th` uniform. (CPU model of the kernel with
/// this step: exact on 15500 rows of 14 patterns; at n = 16384, N(0,1), k = 32..256 the
/// buffer takes 127-1136 keys per row instead of 4191-4868, with no overflow compaction.)
template <class T, int Block, int Loads>
__device__ __forceinline__ void seed_threshold(const uint4 (&tile)[Loads], unsigned nvec, unsigned k,
                                               std::uint64_t* buf, topk_buffer_state& st, topk_scratch<Block>& sc,
                                               tiled_thresholds& th) {
  constexpr int vec = 16 / int(sizeof(T));
  const unsigned tid = threadIdx.x;
  std::uint32_t m1 = 0, m2 = 0;
#pragma unroll
  for (int t = 0; t < Loads; ++t) {
    if (unsigned(t) * Block + tid < nvec) {
#pragma unroll
      for (int j = 0; j < vec; ++j) {
        const std::uint32_t key = ::hsae::detail::ordered_key(vector_lane<T>(tile[t], j));
        if (key > m1) {
          m2 = m1;
          m1 = key;
        } else if (key > m2) {
          m2 = key;
        }
      }
    }
  }
  buf[2 * tid] = (std::uint64_t(m1) << 32) | std::uint64_t(2 * tid);
  buf[2 * tid + 1] = (std::uint64_t(m2) << 32) | std::uint64_t(2 * tid + 1);
  __syncthreads();
  compact<Block>(buf, unsigned(2 * Block), k, st, sc);  // ends with a barrier
  if (tid == 0) st.count = 0u;
  th.tau = st.tau;
  th.tau_f = threshold_value(th.tau);
  __syncthreads();
}

/// One CTA per row; dynamic shared memory Config::smem_bytes.
template <class T, class Config>
HSAE_KERNEL void __launch_bounds__(Config::block, Config::min_blocks) topk_tiled_kernel(topk_args<T> a) {
  constexpr int block = Config::block;
  constexpr int cap = Config::cap;
  constexpr int cap_aux = Config::cap_aux;
  constexpr bool with_aux = cap_aux > 0;
  constexpr int vec = 16 / int(sizeof(T));
  constexpr int per_thread = 16;           // keys per thread and tile
  constexpr int loads = per_thread / vec;  // 16-byte loads per thread and tile
  constexpr unsigned tile_vecs = unsigned(block * loads);
  constexpr int guard_after = 8;  // compactions before the adversarial guard

  extern __shared__ unsigned long long topk_smem[];
  std::uint64_t* const buf = reinterpret_cast<std::uint64_t*>(topk_smem);
  std::uint64_t* const abuf = buf + cap;
  __shared__ topk_scratch<block> sc;
  __shared__ topk_buffer_state st, ast;

  const unsigned tid = threadIdx.x;
  const std::int64_t row = blockIdx.x;
  const T* const x = a.in + row * a.ld;
  const unsigned n = unsigned(a.n), k = unsigned(a.k), k_aux = unsigned(a.k_aux);
  reset_buffers(st, ast);
  tiled_thresholds th;
  th.tau = th.atau = 0ull;
  th.tau_f = th.atau_f = threshold_value(0ull);  // a NaN: nothing is rejected until tau is set
  th.compactions = 0;

  const topk_row_split<T> rs(x, n);
  const unsigned head = rs.head, nvec = rs.nvec, body_end = rs.body_end, tail = rs.tail;
  const uint4* const xv = rs.xv;

  // The first tile, loaded before anything else: it also seeds the threshold.
  uint4 next[loads];
#pragma unroll
  for (int t = 0; t < loads; ++t) {
    const unsigned vi = unsigned(t) * block + tid;
    next[t] = vi < nvec ? __ldg(xv + vi) : make_uint4(0u, 0u, 0u, 0u);
  }
  static_assert(cap >= 2 * block, "top-k tiled: the seed's stand-in keys must fit the buffer");
  if (k <= 2u * unsigned(block)) seed_threshold<T, block, loads>(next, nvec, k, buf, st, sc, th);

  {  // head and tail elements: at most one of each per thread
    const unsigned ih = tid, it = body_end + tid;
    const unsigned valid = (tid < head ? 1u : 0u) | (tid < tail ? 2u : 0u);
    const float v[2] = {(valid & 1u) ? storage_traits<T>::to_float(x[ih]) : 0.0f,
                        (valid & 2u) ? storage_traits<T>::to_float(x[it]) : 0.0f};
    auto index = [&](int j) { return j == 0 ? ih : it; };
    auto dead_bits = [&] {
      return ((valid & 1u) && is_dead(a.dead_mask, ih) ? 1u : 0u) | ((valid & 2u) && is_dead(a.dead_mask, it) ? 2u : 0u);
    };
    offer_tile<block, cap, cap_aux, 2>(v, valid, index, dead_bits, buf, abuf, k, k_aux, st, ast, sc, th);
  }

  // Body: tiles of `loads` 16-byte vectors per thread (vector t * block + tid of the tile:
  // coalesced), the next tile's loads issued before this one is filtered.
  bool guarded = false;
  for (unsigned v0 = 0; v0 < nvec; v0 += tile_vecs) {  // uniform trip count
    if (!guarded && th.compactions >= guard_after && std::uint64_t(nvec - v0) * unsigned(vec) >= 4ull * cap) {
      guarded = true;
      raise_threshold_guard<T, block>(buf, xv, head, v0, nvec, k, st, sc);  // ends with a barrier
      th.tau = st.tau;
      th.tau_f = threshold_value(th.tau);
    }
    uint4 cur[loads];
    unsigned valid = 0;
#pragma unroll
    for (int t = 0; t < loads; ++t) {
      cur[t] = next[t];
      if (v0 + unsigned(t) * block + tid < nvec) valid |= ((1u << vec) - 1u) << (t * vec);
      const unsigned vi = v0 + tile_vecs + unsigned(t) * block + tid;
      if (vi < nvec) next[t] = __ldg(xv + vi);
    }
    float v[per_thread];
#pragma unroll
    for (int j = 0; j < per_thread; ++j) v[j] = vector_lane<T>(cur[j / vec], j % vec);
    auto index = [&](int j) {
      return head + (v0 + unsigned(j / vec) * block + tid) * unsigned(vec) + unsigned(j % vec);
    };
    auto dead_bits = [&] {  // bits of this tile's valid keys whose latent is dead
      unsigned bits = 0;
#pragma unroll
      for (int t = 0; t < loads; ++t) {
        if ((valid >> (t * vec)) & 1u) {
          const unsigned i0 = index(t * vec);  // the vector's vec indices span <= 2 words
          const unsigned lo = __ldg(a.dead_mask + (i0 >> 5));
          const unsigned hi = __ldg(a.dead_mask + ((i0 + unsigned(vec) - 1u) >> 5));
          bits |= (__funnelshift_r(lo, hi, i0 & 31u) & ((1u << vec) - 1u)) << (t * vec);
        }
      }
      return bits;
    };
    offer_tile<block, cap, cap_aux, per_thread>(v, valid, index, dead_bits, buf, abuf, k, k_aux, st, ast, sc, th);
  }

  finish_row<T, block, with_aux>(a, row, x, buf, abuf, st, ast, sc);
}

/// The tiled kernel's configurations, for `topk_rows_with`. Three CTAs of the k <= 1024
/// configuration (64 KiB buffer) fit an H100 SM only with the largest shared-memory
/// carveout, which its launches therefore ask for.
struct topk_tiled_configs {
  using k256 = topk_tiled_config_256;
  using k256_aux = topk_tiled_config_256_aux;
  using k1024 = topk_tiled_config_1024;
  using k1024_aux = topk_tiled_config_1024_aux;
  using k4096 = topk_tiled_config_4096;
  using k4096_aux = topk_tiled_config_4096_aux;
  template <class T, class Config>
  static auto kernel() {
    return &topk_tiled_kernel<T, Config>;
  }
  static constexpr bool max_shared_carveout = true;
};

/// topk_rows (detail/topk.cuh) with the tiled kernel: same requirements, same result.
template <class T>
void topk_rows_tiled(const topk_args<T>& a, int rows, cudaStream_t stream) {
  topk_rows_with<topk_tiled_configs>(a, rows, stream);
}

HSAE_KERNEL_NAMESPACE_END
}  // namespace cuda::detail

HSAE_NAMESPACE_END
