// SPDX-License-Identifier: Apache-2.0
/// \file cuda/detail/topk.cuh
/// Sorted segmented (per-row) top-k on the GPU: one CTA per row, one read of the row
/// (docs/TOPK.md), optionally a second top-k over dead latents (AuxK) taken in the
/// same read.
///
/// Order (identical to cpu/topk.hpp): values descending; equal values rank by the lower
/// index first; -0.0 equals +0.0; NaN ranks below every number. Every element becomes
/// the 64-bit composite key `(ordered_key(v) << 32) | (0xFFFFFFFF - i)`, so one unsigned
/// comparison implements the whole rule and all keys of a row are distinct.
///
/// Per row:
///  1. Streaming filter. The row is read once, 16-byte vector loads (4 fp32 or 8
///     half/bf16 per load), two loads per thread in flight. A key is appended to the
///     shared-memory candidate buffer (`Cap` keys) when it exceeds the running
///     threshold `tau` (initially 0: everything passes). Appends are warp-aggregated
///     (one shared atomic per warp and step).
///  2. Compaction, when the buffer could overflow on the next step: radix select of the
///     k largest keys in the buffer (8-bit digits from the top, warp-aggregated shared
///     histograms, early exit as soon as the digit's bucket is exactly what is still
///     needed), winners moved to the front, `tau` = the k-th largest key so far. Later
///     keys must beat it strictly; since keys are distinct this is exactly the tie rule.
///  3. Adversarial guard: after 8 compactions, when at least 4 buffers' worth of the row
///     remain (an ascending row passes every element), one extra read of the rest of
///     the row builds an 11-bit histogram of the keys still above `tau` (plus the
///     buffer) and raises `tau` to the lower edge of the bucket holding the row's k-th
///     key. So a row is read at most twice, never once per digit; what stays hard (a
///     row whose k-th bucket is itself huge) costs O(n) shared-memory work, no re-reads.
///  4. Final: compaction to exactly k, bitonic sort of the k keys (padded with zero keys
///     to a power of two) descending in shared memory, values gathered from the row.
///
/// AuxK: with a dead-latent bitmask the same pass feeds a second buffer (`CapAux`) with
/// the keys of dead latents only, selected and sorted the same way into separate
/// outputs. Slots beyond the number of dead latents hold index -1 and value 0.
///
/// Configurations (k_max -> threads, buffer): k <= 256: 256 threads, 4096 keys (32 KiB);
/// k <= 1024: 512, 8192 (64 KiB); k <= 4096: 512, 16384 (128 KiB; 12288 with AuxK).
/// AuxK buffers: 4096 / 8192 / 6144 keys; k_aux <= 2048. All fit sm_80's 163 KiB.
///
/// Determinism: the selected sets and the output order are fully determined by the data
/// (the append order inside the buffer varies run to run; nothing observable depends on it).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include "../../config.hpp"
#include "../../detail/ordered_key.hpp"
#include "../error.cuh"
#include "types.cuh"

HSAE_NAMESPACE_BEGIN

namespace cuda::detail {
HSAE_KERNEL_NAMESPACE_BEGIN

/// Largest k the GPU top-k supports, and largest k_aux.
inline constexpr int topk_max_k = 4096;
inline constexpr int topk_max_k_aux = 2048;

/// Composite key of value v at index i (see the file comment).
__device__ __forceinline__ std::uint64_t composite_key(float v, std::uint32_t i) {
  return (std::uint64_t(::hsae::detail::ordered_key(v)) << 32) | std::uint64_t(0xFFFFFFFFu - i);
}
__device__ __forceinline__ std::uint32_t composite_index(std::uint64_t c) {
  return 0xFFFFFFFFu - std::uint32_t(c & 0xFFFFFFFFull);
}

/// A kernel configuration: threads per CTA, candidate buffer capacity (keys), AuxK
/// buffer capacity (0: no AuxK), and the largest k it serves.
template <int Block, int Cap, int CapAux, int KMax>
struct topk_config {
  static constexpr int block = Block;
  static constexpr int cap = Cap;
  static constexpr int cap_aux = CapAux;
  static constexpr int k_max = KMax;
  static_assert(Block % 32 == 0 && Block >= 256, "top-k: the block must be whole warps and >= 256 (histogram bins)");
  static_assert(Cap % Block == 0 && CapAux % Block == 0, "top-k: buffers must be a multiple of the block");
  // A step appends at most Block * 8 keys (16-bit types); a compaction leaves k.
  static_assert(Cap - Block * 8 >= KMax, "top-k: buffer too small for k_max plus one step");
  static_assert(CapAux == 0 || CapAux - Block * 8 >= topk_max_k_aux, "top-k: AuxK buffer too small");
  // The final bitonic sort pads k keys to a power of two inside the buffer.
  static_assert((KMax & (KMax - 1)) == 0 && KMax <= Cap, "top-k: k_max must be a power of two <= Cap");
  static_assert(CapAux == 0 || (topk_max_k_aux & (topk_max_k_aux - 1)) == 0, "top-k: k_aux max must be a power of two");
  static constexpr std::size_t smem_bytes = std::size_t(Cap + CapAux) * sizeof(std::uint64_t);
};

using topk_config_256 = topk_config<256, 4096, 0, 256>;
using topk_config_256_aux = topk_config<256, 4096, 4096, 256>;
using topk_config_1024 = topk_config<512, 8192, 0, 1024>;
using topk_config_1024_aux = topk_config<512, 8192, 8192, 1024>;
using topk_config_4096 = topk_config<512, 16384, 0, 4096>;
using topk_config_4096_aux = topk_config<512, 12288, 6144, 4096>;

/// Kernel arguments. `in` is [rows, n] with row stride `ld` elements; outputs [rows, k]
/// and [rows, k_aux], row-major. `dead_mask`: bit (i % 32) of word i / 32 set when
/// latent i is dead ([ceil(n / 32)] words); nullptr disables AuxK.
template <class T>
struct topk_args {
  const T* in = nullptr;
  std::int64_t ld = 0;
  int n = 0;
  int k = 0;
  float* values = nullptr;
  index_t* indices = nullptr;
  const std::uint32_t* dead_mask = nullptr;
  int k_aux = 0;
  float* aux_values = nullptr;
  index_t* aux_indices = nullptr;
};

/// Per-buffer state in shared memory.
struct topk_buffer_state {
  unsigned count;
  unsigned long long tau;
};

template <int Block>
struct topk_scratch {
  static constexpr int guard_bins = 2048;  // 11-bit digit of the value key
  unsigned hist[guard_bins];               // compaction uses the first 256
  typename cub::BlockScan<unsigned, Block>::TempStorage scan;
  unsigned sel_digit;
  unsigned sel_above;
  unsigned sel_count;
  unsigned warp_counts[Block / 32];
  unsigned long long kmin;
};

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x & 31u; }

/// hist[digit] += 1 for every lane with `take`, one shared atomic per distinct digit in
/// the warp (ReLU'd rows put half their keys in one bin). All 32 lanes must call it;
/// lanes without `take` pass a digit no taking lane uses.
__device__ __forceinline__ void warp_aggregated_increment(unsigned* hist, unsigned digit, bool take) {
  const unsigned peers = __match_any_sync(0xFFFFFFFFu, digit);
  if (take && lane_id() == unsigned(__ffs(int(peers)) - 1)) atomicAdd(&hist[digit], unsigned(__popc(int(peers))));
}

/// Finds the bin d (scanning from the top) with above(d) < remaining <= above(d) +
/// hist[d], where above(d) = sum of bins > d; writes d, above(d), hist[d] to `sc`.
/// Requires 1 <= remaining <= sum(hist). Call with all threads; sync before reading.
template <int Block, int Bins>
__device__ void find_bucket(const unsigned* hist, unsigned remaining, topk_scratch<Block>& sc) {
  constexpr int per = (Bins + Block - 1) / Block;
  const unsigned tid = threadIdx.x;
  unsigned local[per];
  unsigned sum = 0;
#pragma unroll
  for (int j = 0; j < per; ++j) {
    const unsigned r = tid * per + unsigned(j);  // rank from the top: bin Bins-1-r
    local[j] = r < unsigned(Bins) ? hist[unsigned(Bins) - 1u - r] : 0u;
    sum += local[j];
  }
  unsigned above = 0;
  cub::BlockScan<unsigned, Block>(sc.scan).ExclusiveSum(sum, above);
#pragma unroll
  for (int j = 0; j < per; ++j) {
    const unsigned r = tid * per + unsigned(j);
    if (r < unsigned(Bins) && above < remaining && remaining <= above + local[j]) {
      sc.sel_digit = unsigned(Bins) - 1u - r;
      sc.sel_above = above;
      sc.sel_count = local[j];
    }
    above += local[j];
  }
}

/// Keeps the k largest of buf[0, count) (distinct keys, k <= count <= Cap) in buf[0, k)
/// (in their buffer order); st.count = k, st.tau = max(st.tau, k-th largest). All
/// threads call it with the same `count`, after a barrier; it ends with a barrier.
/// Works from shared memory (no per-thread copy of the buffer) and is not inlined: it
/// runs rarely, and one body per kernel keeps registers and compile time down.
template <int Block>
__device__ __noinline__ void compact(std::uint64_t* buf, unsigned count, unsigned k, topk_buffer_state& st,
                                     topk_scratch<Block>& sc) {
  const unsigned tid = threadIdx.x, lane = lane_id(), warp = tid / 32u;
  // Radix select, 8-bit digits from the top. Invariant: exactly k - remaining keys lie
  // strictly above the current prefix's range, `remaining` of the k lie inside it.
  std::uint64_t prefix = 0, mask = 0;
  unsigned remaining = k;
  for (int shift = 56;; shift -= 8) {
    if (tid < 256u) sc.hist[tid] = 0u;
    __syncthreads();
    for (unsigned base = 0; base < count; base += Block) {  // uniform trip count
      const unsigned i = base + tid;
      const std::uint64_t key = i < count ? buf[i] : 0ull;
      const bool take = i < count && (key & mask) == prefix;
      warp_aggregated_increment(sc.hist, take ? unsigned(key >> shift) & 255u : 256u, take);
    }
    __syncthreads();
    find_bucket<Block, 256>(sc.hist, remaining, sc);
    __syncthreads();
    const unsigned d = sc.sel_digit, above = sc.sel_above, in_bucket = sc.sel_count;
    prefix |= std::uint64_t(d) << shift;
    mask |= std::uint64_t(255u) << shift;
    remaining -= above;
    // The whole bucket is needed: the winners are exactly the keys >= prefix (its lower
    // bits are zero). With distinct keys this holds at the latest at shift 0.
    if (in_bucket == remaining || shift == 0) break;
  }
  // Stable in-place partition, one chunk of Block keys at a time: a winner moves to
  // position (winners before it) <= its own position, and every position below the
  // chunk's end has been read before the chunk's barrier, so nothing unread is
  // overwritten.
  std::uint64_t local_min = ~0ull;
  unsigned out = 0;  // winners so far; identical in every thread
  for (unsigned base = 0; base < count; base += Block) {
    const unsigned i = base + tid;
    const std::uint64_t key = i < count ? buf[i] : 0ull;
    const bool win = i < count && key >= prefix;
    const unsigned m = __ballot_sync(0xFFFFFFFFu, win);
    if (lane == 0) sc.warp_counts[warp] = unsigned(__popc(int(m)));
    __syncthreads();
    unsigned before = out, total = 0;
#pragma unroll
    for (unsigned w = 0; w < unsigned(Block / 32); ++w) {
      const unsigned c = sc.warp_counts[w];
      before += w < warp ? c : 0u;
      total += c;
    }
    if (win) {
      buf[before + unsigned(__popc(int(m & ((1u << lane) - 1u))))] = key;
      local_min = key < local_min ? key : local_min;
    }
    out += total;
    __syncthreads();
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const std::uint64_t o = __shfl_xor_sync(0xFFFFFFFFu, local_min, off);
    local_min = o < local_min ? o : local_min;
  }
  if (tid == 0) sc.kmin = ~0ull;
  __syncthreads();
  if (lane == 0 && local_min != ~0ull) atomicMin(&sc.kmin, static_cast<unsigned long long>(local_min));
  __syncthreads();
  if (tid == 0) {
    st.count = out;  // == k
    if (sc.kmin > st.tau) st.tau = sc.kmin;
  }
  __syncthreads();
}

/// Appends the keys of c[] that exceed tau to buf (warp-aggregated slot reservation).
/// All 32 lanes must call it. The caller guarantees room for Block * N keys.
template <int N>
__device__ __forceinline__ void append(const std::uint64_t (&c)[N], std::uint64_t tau, std::uint64_t* buf,
                                       unsigned* count) {
  unsigned mine = 0;
#pragma unroll
  for (int j = 0; j < N; ++j) mine += c[j] > tau ? 1u : 0u;
  const unsigned lane = lane_id();
  unsigned incl = mine;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned t = __shfl_up_sync(0xFFFFFFFFu, incl, unsigned(off));
    if (lane >= unsigned(off)) incl += t;
  }
  const unsigned total = __shfl_sync(0xFFFFFFFFu, incl, 31);
  unsigned base = 0;
  if (lane == 31u && total != 0u) base = atomicAdd(count, total);
  base = __shfl_sync(0xFFFFFFFFu, base, 31);
  unsigned pos = base + incl - mine;
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (c[j] > tau) buf[pos++] = c[j];
}

/// Sorts s[0, n2) descending (n2 a power of two) with a bitonic network; ends synced.
template <int Block>
__device__ void bitonic_sort_descending(std::uint64_t* s, unsigned n2) {
  for (unsigned size = 2; size <= n2; size <<= 1) {
    for (unsigned stride = size >> 1; stride > 0; stride >>= 1) {
      for (unsigned i = threadIdx.x; i < n2 / 2; i += Block) {
        const unsigned lo = 2u * i - (i & (stride - 1u));
        const unsigned hi = lo + stride;
        const bool descending = (lo & size) == 0u;
        const std::uint64_t a = s[lo], b = s[hi];
        if ((a < b) == descending && a != b) {
          s[lo] = b;
          s[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

__host__ __device__ constexpr unsigned next_pow2(unsigned v) {
  unsigned p = 1;
  while (p < v) p <<= 1;
  return p;
}

/// Element j (of 16 / sizeof(T)) of a 16-byte vector, as float.
template <class T>
__device__ __forceinline__ float vector_lane(const uint4& raw, int j) {
  const unsigned w = (j >> (sizeof(T) == 4 ? 0 : 1)) == 0   ? raw.x
                     : (j >> (sizeof(T) == 4 ? 0 : 1)) == 1 ? raw.y
                     : (j >> (sizeof(T) == 4 ? 0 : 1)) == 2 ? raw.z
                                                            : raw.w;
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(w);
  } else {
    const auto bits = static_cast<unsigned short>((j & 1) ? (w >> 16) : (w & 0xFFFFu));
    if constexpr (std::is_same_v<T, __half>) return __half2float(__ushort_as_half(bits));
    else return __bfloat162float(__ushort_as_bfloat16(bits));
  }
}

__device__ __forceinline__ bool is_dead(const std::uint32_t* mask, unsigned i) {
  return ((__ldg(mask + (i >> 5)) >> (i & 31u)) & 1u) != 0u;
}

/// Adversarial guard: one extra read of vectors [v0, nvec) of the row. Histograms the
/// top 11 bits of the keys above tau there plus the buffer's keys (>= k of them after a
/// compaction), finds the bucket of the row's k-th key, and raises tau to just below
/// that bucket. Every key of the final top-k is in that bucket or above, so none is
/// lost; keys already buffered below the new tau are dropped by later compactions.
template <class T, int Block>
__device__ __noinline__ void raise_threshold_guard(const std::uint64_t* buf, const uint4* xv, unsigned head,
                                                   unsigned v0, unsigned nvec, unsigned k, topk_buffer_state& st,
                                                   topk_scratch<Block>& sc) {
  constexpr int vec = 16 / int(sizeof(T));
  constexpr unsigned bins = unsigned(topk_scratch<Block>::guard_bins);
  const unsigned tid = threadIdx.x;
  __syncthreads();
  const unsigned count = st.count;
  const std::uint64_t tau = st.tau;
  for (unsigned i = tid; i < bins; i += Block) sc.hist[i] = 0u;
  __syncthreads();
  for (unsigned b = 0; b < count; b += Block) {  // uniform trip count
    const unsigned i = b + tid;
    const bool take = i < count;
    warp_aggregated_increment(sc.hist, take ? unsigned(buf[i] >> 53) : bins, take);
  }
  for (unsigned b = v0; b < nvec; b += Block) {
    const unsigned vi = b + tid;
    const bool valid = vi < nvec;
    uint4 raw = make_uint4(0u, 0u, 0u, 0u);
    if (valid) raw = __ldg(xv + vi);
#pragma unroll
    for (int j = 0; j < vec; ++j) {
      const std::uint64_t c =
          valid ? composite_key(vector_lane<T>(raw, j), head + vi * unsigned(vec) + unsigned(j)) : 0ull;
      const bool take = c > tau;
      warp_aggregated_increment(sc.hist, take ? unsigned(c >> 53) : bins, take);
    }
  }
  __syncthreads();
  find_bucket<Block, int(bins)>(sc.hist, k, sc);
  __syncthreads();
  if (tid == 0 && sc.sel_digit > 0u) {
    const std::uint64_t lower = std::uint64_t(sc.sel_digit) << 53;
    if (lower - 1ull > st.tau) st.tau = lower - 1ull;
  }
  __syncthreads();
}

/// Sorts and writes one buffer's result: buf[0, min(count, k)) after the final
/// compaction; slots beyond `count` get index -1, value 0.
template <class T, int Block>
__device__ void finish_selection(std::uint64_t* buf, unsigned k, topk_buffer_state& st, topk_scratch<Block>& sc,
                                 const T* x, float* values, index_t* indices) {
  __syncthreads();
  const unsigned count = st.count;
  __syncthreads();
  if (count > k) compact<Block>(buf, count, k, st, sc);
  const unsigned have = count < k ? count : k;
  const unsigned n2 = next_pow2(k);
  for (unsigned i = have + threadIdx.x; i < n2; i += Block) buf[i] = 0ull;  // zero keys sort last
  __syncthreads();
  bitonic_sort_descending<Block>(buf, n2);
  for (unsigned t = threadIdx.x; t < k; t += Block) {
    if (t < have) {
      const std::uint32_t i = composite_index(buf[t]);
      values[t] = storage_traits<T>::to_float(x[i]);
      indices[t] = index_t(i);
    } else {
      values[t] = 0.0f;
      indices[t] = -1;
    }
  }
}

/// A row split at 16-byte boundaries: `head` scalar elements, `nvec` 16-byte vectors
/// (`xv`, elements head .. body_end), then `tail` (< 16 / sizeof(T)) scalar elements.
template <class T>
struct topk_row_split {
  unsigned head, nvec, body_end, tail;
  const uint4* xv;
  __device__ topk_row_split(const T* x, unsigned n) {
    constexpr unsigned vec = 16u / unsigned(sizeof(T));
    const auto addr = reinterpret_cast<std::uintptr_t>(x);
    head = unsigned(((16u - unsigned(addr % 16u)) % 16u) / sizeof(T));
    head = head < n ? head : n;
    nvec = (n - head) / vec;
    body_end = head + nvec * vec;
    tail = n - body_end;
    xv = reinterpret_cast<const uint4*>(x + head);
  }
};

/// Sorts and writes row `row`'s selection (and, WithAux, its AuxK selection) to a's outputs.
template <class T, int Block, bool WithAux>
__device__ void finish_row(const topk_args<T>& a, std::int64_t row, const T* x, std::uint64_t* buf, std::uint64_t* abuf,
                           topk_buffer_state& st, topk_buffer_state& ast, topk_scratch<Block>& sc) {
  const unsigned k = unsigned(a.k), k_aux = unsigned(a.k_aux);
  finish_selection<T, Block>(buf, k, st, sc, x, a.values + row * std::int64_t(k), a.indices + row * std::int64_t(k));
  if constexpr (WithAux) {
    __syncthreads();
    finish_selection<T, Block>(abuf, k_aux, ast, sc, x, a.aux_values + row * std::int64_t(k_aux),
                               a.aux_indices + row * std::int64_t(k_aux));
  }
}

/// Both buffers empty with tau = 0 (every real key is > 0: its inverted index is
/// nonzero); thread 0 writes, then a barrier.
__device__ __forceinline__ void reset_buffers(topk_buffer_state& st, topk_buffer_state& ast) {
  if (threadIdx.x == 0) {
    st.count = 0u;
    st.tau = 0ull;
    ast.count = 0u;
    ast.tau = 0ull;
  }
  __syncthreads();
}

/// One CTA per row; dynamic shared memory Config::smem_bytes.
template <class T, class Config>
HSAE_KERNEL void __launch_bounds__(Config::block) topk_kernel(topk_args<T> a) {
  constexpr int block = Config::block;
  constexpr int cap = Config::cap;
  constexpr int cap_aux = Config::cap_aux;
  constexpr bool with_aux = cap_aux > 0;
  constexpr int vec = 16 / int(sizeof(T));
  constexpr unsigned step_keys = unsigned(block * vec);
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
  const topk_row_split<T> rs(x, n);
  const unsigned head = rs.head, nvec = rs.nvec, body_end = rs.body_end, tail = rs.tail;
  const uint4* const xv = rs.xv;

  int compactions = 0;
  // One step: every thread offers up to `vec` keys.
  auto step = [&](const std::uint64_t (&c)[vec], const std::uint64_t (&ca)[vec]) {
    __syncthreads();
    const unsigned count = st.count;
    const unsigned acount = with_aux ? ast.count : 0u;
    __syncthreads();
    if (count + step_keys > unsigned(cap)) {
      compact<block>(buf, count, k, st, sc);
      ++compactions;
    }
    if constexpr (with_aux) {
      if (acount + step_keys > unsigned(cap_aux)) compact<block>(abuf, acount, k_aux, ast, sc);
    }
    append(c, st.tau, buf, &st.count);
    if constexpr (with_aux) append(ca, ast.tau, abuf, &ast.count);
  };
  auto offer = [&](float v, unsigned i, bool valid, std::uint64_t& c, std::uint64_t& ca) {
    c = valid ? composite_key(v, i) : 0ull;
    if constexpr (with_aux) ca = (valid && is_dead(a.dead_mask, i)) ? c : 0ull;
    else ca = 0ull;
  };

  {  // head and tail elements, one step
    std::uint64_t c[vec], ca[vec];
#pragma unroll
    for (int j = 0; j < vec; ++j) c[j] = ca[j] = 0ull;
    if (tid < head) offer(storage_traits<T>::to_float(x[tid]), tid, true, c[0], ca[0]);
    if (tid < tail) offer(storage_traits<T>::to_float(x[body_end + tid]), body_end + tid, true, c[1], ca[1]);
    step(c, ca);
  }

  // Body: one 16-byte vector per thread and step, the next one prefetched.
  bool guarded = false;
  uint4 next = make_uint4(0u, 0u, 0u, 0u);
  if (tid < nvec) next = __ldg(xv + tid);
  for (unsigned v0 = 0; v0 < nvec; v0 += block) {
    if (!guarded && compactions >= guard_after && std::uint64_t(nvec - v0) * unsigned(vec) >= 4ull * cap) {
      guarded = true;
      raise_threshold_guard<T, block>(buf, xv, head, v0, nvec, k, st, sc);
    }
    const unsigned vi = v0 + tid;
    const uint4 cur = next;
    if (vi + block < nvec) next = __ldg(xv + vi + block);
    std::uint64_t c[vec], ca[vec];
#pragma unroll
    for (int j = 0; j < vec; ++j)
      offer(vector_lane<T>(cur, j), head + vi * unsigned(vec) + unsigned(j), vi < nvec, c[j], ca[j]);
    step(c, ca);
  }

  finish_row<T, block, with_aux>(a, row, x, buf, abuf, st, ast, sc);
}

/// The streaming kernel's configurations by k range and AuxK (the tiled kernel has its
/// own set, detail/topk_tiled.cuh), for `topk_rows_with`.
struct topk_streaming_configs {
  using k256 = topk_config_256;
  using k256_aux = topk_config_256_aux;
  using k1024 = topk_config_1024;
  using k1024_aux = topk_config_1024_aux;
  using k4096 = topk_config_4096;
  using k4096_aux = topk_config_4096_aux;
  template <class T, class Config>
  static auto kernel() {
    return &topk_kernel<T, Config>;
  }
  static constexpr bool max_shared_carveout = false;
};

template <class Configs, class T, class Config>
void launch_topk(const topk_args<T>& a, int rows, cudaStream_t stream) {
  auto* kernel = Configs::template kernel<T, Config>();
  HSAE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Config::smem_bytes)));
  if constexpr (Configs::max_shared_carveout)
    HSAE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                       int(cudaSharedmemCarveoutMaxShared)));
  kernel<<<unsigned(rows), unsigned(Config::block), Config::smem_bytes, stream>>>(a);
  HSAE_CUDA_CHECK_LAUNCH();
}

/// Row-wise sorted top-k of `a.in` [rows, n] (see topk_args; AuxK when a.dead_mask is
/// set) with the kernel whose configurations are `Configs`, picked by k. Requires 1 <= k
/// <= min(n, topk_max_k) and, with AuxK, 1 <= k_aux <= min(n, topk_max_k_aux); n <=
/// 2^31 - 1. Needs no workspace. Asynchronous on `stream`.
template <class Configs, class T>
void topk_rows_with(const topk_args<T>& a, int rows, cudaStream_t stream) {
  if (rows <= 0) return;
  const bool aux = a.dead_mask != nullptr;
  if (a.k <= Configs::k256::k_max) {
    if (aux) launch_topk<Configs, T, typename Configs::k256_aux>(a, rows, stream);
    else launch_topk<Configs, T, typename Configs::k256>(a, rows, stream);
  } else if (a.k <= Configs::k1024::k_max) {
    if (aux) launch_topk<Configs, T, typename Configs::k1024_aux>(a, rows, stream);
    else launch_topk<Configs, T, typename Configs::k1024>(a, rows, stream);
  } else {
    if (aux) launch_topk<Configs, T, typename Configs::k4096_aux>(a, rows, stream);
    else launch_topk<Configs, T, typename Configs::k4096>(a, rows, stream);
  }
}

/// `topk_rows_with` the streaming kernel.
template <class T>
void topk_rows(const topk_args<T>& a, int rows, cudaStream_t stream) {
  topk_rows_with<topk_streaming_configs>(a, rows, stream);
}

HSAE_KERNEL_NAMESPACE_END
}  // namespace cuda::detail

HSAE_NAMESPACE_END
