// SPDX-License-Identifier: Apache-2.0
/// \file cuda/detail/sparse_backward.cuh
/// Sparse gradients of the B*k selected (row, rank) pairs of a code, and the small
/// deterministic reductions the other gradient kernels share.
///
/// Two modes (`cuda_backend::deterministic`):
///  - fast: one CTA per batch row adds every pair's contribution to its latent's
///    gradient row with fp32 `atomicAdd` (summation order varies run to run);
///  - deterministic: the pairs are grouped by latent with a stable
///    `cub::DeviceRadixSort::SortPairs` on (latent, pair id) and CSR offsets found by a
///    binary search per latent; then one warp per latent walks its pairs in pair-id
///    order, the lanes splitting D (lane j owns columns j, j+32, ...). Each output element
///    is written by one lane in a fixed order: bitwise identical run to run. Memory:
///    `latent_pairs_workspace_bytes(n, F)` = 4 n int32 + (F+1) int32 + CUB's radix-sort
///    scratch, for n = B*k pairs.
///
/// The pre-bias term of b_dec, `-sum_f gsum_f W_enc[f]` with `gsum_f = sum dpre` over
/// latent f's pairs, is formed in deterministic mode from fixed blocks of latents
/// (only latents with gsum_f != 0 read their W_enc row) whose partial D-vectors are then
/// summed in block order; in fast mode each CTA (one batch row) accumulates
/// `sum_t dpre_t W_enc[i_t]` in registers and adds it with one atomicAdd per column.
///
/// Everything here takes raw device pointers and a stream; nothing allocates. Public
/// entry points (cuda/loss.cuh, cuda/auxk.cuh) validate shapes and call these.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <type_traits>

#include "../../config.hpp"
#include "../error.cuh"
#include "types.cuh"

HSAE_NAMESPACE_BEGIN

namespace cuda::detail {
HSAE_KERNEL_NAMESPACE_BEGIN

// ---------------------------------------------------------------------------------------
// Workspace carving (CUB's two-phase style: the size query runs the same carving on a
// null base).

/// Hands out 256-byte aligned pieces of one caller-provided workspace.
class grad_workspace_carver {
 public:
  explicit grad_workspace_carver(void* base) : base_(static_cast<char*>(base)) {}
  template <class U>
  U* take(std::size_t count) {
    U* p = base_ != nullptr ? reinterpret_cast<U*>(base_ + used_) : nullptr;
    used_ += (count * sizeof(U) + 255) / 256 * 256;
    return p;
  }
  void* take_bytes(std::size_t bytes) { return take<unsigned char>(bytes); }
  std::size_t used() const { return used_; }

 private:
  char* base_;
  std::size_t used_ = 0;
};

/// Launch-error check after a kernel launch.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) [[unlikely]]
    ::hsae::detail::throw_error<cuda_error>("launching ", kernel, " failed: ", cudaGetErrorString(err));
}

/// Element type conversions on load and store (fp32, fp16 and bf16 storage).
template <class T>
__device__ __forceinline__ float load_float(const T* p, std::size_t i) {
  if constexpr (std::is_same_v<T, float>)
    return p[i];
  else
    return storage_traits<T>::to_float(p[i]);
}

// ---------------------------------------------------------------------------------------
// Deterministic reductions. blockDim.x must be a multiple of 32 (at most 1024).

/// Sums G per-thread partials over the CTA. The result for g is returned in thread
/// g (threadIdx.x < G); other threads get 0. Fixed shuffle tree inside each warp, then
/// warps summed in index order: deterministic. `smem` holds 2 * 32 * G values and is used
/// double-buffered through `parity`, so one __syncthreads per call suffices; every thread
/// of the CTA must make the same sequence of calls with the same `parity` variable, and
/// every call sharing `smem` must use the same G (so that the two halves never overlap).
template <int G, class Acc>
__device__ __forceinline__ Acc block_sum_to_lanes(const Acc (&part)[G], Acc* smem, int& parity) {
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5, warps = int(blockDim.x) >> 5;
  Acc* buf = smem + parity * 32 * G;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    Acc v = part[g];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) buf[warp * G + g] = v;
  }
  __syncthreads();
  Acc total = Acc(0);
  if (int(threadIdx.x) < G)
    for (int w = 0; w < warps; ++w) total += buf[w * G + int(threadIdx.x)];
  parity ^= 1;
  return total;
}

/// Like block_sum_to_lanes, but every thread receives all G totals (in `v`, replacing
/// its partials). `smem` holds 33 * G values. Two __syncthreads.
template <int G, class Acc>
__device__ __forceinline__ void block_sum_broadcast(Acc (&v)[G], Acc* smem) {
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5, warps = int(blockDim.x) >> 5;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    Acc x = v[g];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
    if (lane == 0) smem[warp * G + g] = x;
  }
  __syncthreads();
  if (int(threadIdx.x) < G) {
    Acc total = Acc(0);
    for (int w = 0; w < warps; ++w) total += smem[w * G + int(threadIdx.x)];
    smem[32 * G + int(threadIdx.x)] = total;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < G; ++g) v[g] = smem[32 * G + g];
  // The partial area is written again only after the next call's first barrier has
  // been passed by everyone, i.e. after these reads: no third barrier needed.
}

/// Threads per CTA for a row kernel in which each thread owns up to `items` columns of a
/// D-wide row: a multiple of 32 in [32, max_threads] (wider rows take several tiles).
inline int row_block_threads(int D, int items, int max_threads = 1024) {
  const long long need = (static_cast<long long>(D) + items - 1) / items;
  const long long t = std::clamp<long long>((need + 31) / 32 * 32, 32, max_threads);
  return int(t);
}

/// out[j] (+)= alpha * sum_{r < n} rows[r * D + j], for j < D. One CTA per 32 columns,
/// 16 warps striding over the rows, warp partials added in index order: deterministic.
template <class In, class Acc, class Out>
HSAE_KERNEL void __launch_bounds__(512) column_sum_kernel(const In* __restrict__ rows, std::int64_t n, int D,
                                                          Out* __restrict__ out, Acc alpha, bool accumulate) {
  __shared__ Acc part[16][32];
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const std::int64_t j = std::int64_t(blockIdx.x) * 32 + lane;
  Acc acc = Acc(0);
  if (j < D)
    for (std::int64_t r = warp; r < n; r += 16) acc += Acc(rows[r * D + j]);
  part[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && j < D) {
    Acc s = Acc(0);
    for (int w = 0; w < 16; ++w) s += part[w][lane];
    out[j] = accumulate ? Out(Acc(out[j]) + alpha * s) : Out(alpha * s);
  }
}

/// Launches column_sum_kernel (no-op when D == 0).
template <class In, class Acc, class Out>
void column_sum(const In* rows, std::int64_t n, int D, Out* out, Acc alpha, bool accumulate, cudaStream_t stream) {
  if (D <= 0) return;
  column_sum_kernel<In, Acc, Out><<<unsigned((D + 31) / 32), 512, 0, stream>>>(rows, n, D, out, alpha, accumulate);
  check_launch("column_sum_kernel");
}

/// *out = sum_{i < n} in[i] in Acc: one CTA of 1024 threads, thread-strided partials and
/// a fixed tree: deterministic.
template <class In, class Acc>
HSAE_KERNEL void __launch_bounds__(1024)
    vector_sum_kernel(const In* __restrict__ in, std::int64_t n, Acc* __restrict__ out) {
  __shared__ Acc smem[33];
  Acc v[1] = {Acc(0)};
  for (std::int64_t i = threadIdx.x; i < n; i += 1024) v[0] += Acc(in[i]);
  block_sum_broadcast<1>(v, smem);
  if (threadIdx.x == 0) *out = v[0];
}

template <class In, class Acc>
void vector_sum(const In* in, std::int64_t n, Acc* out, cudaStream_t stream) {
  vector_sum_kernel<In, Acc><<<1, 1024, 0, stream>>>(in, n, out);
  check_launch("vector_sum_kernel");
}

// ---------------------------------------------------------------------------------------
// Pairs grouped by latent (deterministic mode).

/// CSR view of n pairs grouped by latent: latent f owns `pairs[offsets[f] .. offsets[f+1])`,
/// ascending pair ids `b * k + t` (local to the code the pairs were built from).
struct latent_pairs_view {
  const int* offsets = nullptr;  ///< [F + 1]
  const int* pairs = nullptr;    ///< [n]
  int n = 0;
  int F = 0;
};

namespace pairs_impl {

/// Radix-sort key bits: enough for every valid latent and the sentinel F.
inline int key_bits(int F) { return std::max(1, int(std::bit_width(unsigned(F)))); }

inline std::size_t sort_temp_bytes(int n, int F) {
  std::size_t bytes = 0;
  HSAE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const std::uint32_t*>(nullptr),
                                                static_cast<std::uint32_t*>(nullptr), static_cast<const int*>(nullptr),
                                                static_cast<int*>(nullptr), n, 0, key_bits(F)));
  return bytes;
}

/// keys[p] = indices[p] when it is a latent in [0, F), else the sentinel F (an AuxK slot
/// beyond the dead latents holds -1); ids[p] = p.
template <int Dummy = 0>
HSAE_KERNEL void keys_kernel(const index_t* __restrict__ indices, int n, int F, std::uint32_t* __restrict__ keys,
                             int* __restrict__ ids) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const index_t f = indices[i];
  keys[i] = (f >= 0 && f < F) ? std::uint32_t(f) : std::uint32_t(F);
  ids[i] = int(i);
}

/// offsets[f] = first position q with keys[q] >= f (lower bound), for f in [0, F]; pairs
/// with the sentinel key F lie beyond offsets[F] and belong to no latent.
template <int Dummy = 0>
HSAE_KERNEL void offsets_kernel(const std::uint32_t* __restrict__ keys, int n, int F, int* __restrict__ offsets) {
  const std::int64_t f = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (f > F) return;
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (std::int64_t(keys[mid]) < f)
      lo = mid + 1;
    else
      hi = mid;
  }
  offsets[f] = lo;
}

}  // namespace pairs_impl

/// Workspace of build_latent_pairs for n pairs over F latents.
inline std::size_t latent_pairs_workspace_bytes(int n, int F) {
  grad_workspace_carver c(nullptr);
  c.take<std::uint32_t>(std::size_t(n));
  c.take<std::uint32_t>(std::size_t(n));
  c.take<int>(std::size_t(n));
  c.take<int>(std::size_t(n));
  c.take<int>(std::size_t(F) + 1);
  c.take_bytes(pairs_impl::sort_temp_bytes(n, F));
  return c.used();
}

/// Groups the pairs of `indices [n]` by latent, stably (pair id = position). Entries
/// outside [0, F) belong to no latent. Returns a view into `workspace`.
inline latent_pairs_view build_latent_pairs(const index_t* indices, int n, int F, void* workspace,
                                            std::size_t workspace_bytes, cudaStream_t stream) {
  ::hsae::detail::expects<config_error>(workspace_bytes >= latent_pairs_workspace_bytes(n, F),
                                        "build_latent_pairs: workspace of ", workspace_bytes, " bytes, need ",
                                        latent_pairs_workspace_bytes(n, F));
  grad_workspace_carver c(workspace);
  auto* keys_in = c.take<std::uint32_t>(std::size_t(n));
  auto* keys_out = c.take<std::uint32_t>(std::size_t(n));
  auto* vals_in = c.take<int>(std::size_t(n));
  auto* vals_out = c.take<int>(std::size_t(n));
  auto* offsets = c.take<int>(std::size_t(F) + 1);
  std::size_t temp_bytes = pairs_impl::sort_temp_bytes(n, F);
  void* temp = c.take_bytes(temp_bytes);
  if (n > 0) {
    pairs_impl::keys_kernel<<<unsigned((std::int64_t(n) + 255) / 256), 256, 0, stream>>>(indices, n, F, keys_in, vals_in);
    check_launch("keys_kernel");
    HSAE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, static_cast<const std::uint32_t*>(keys_in),
                                                  keys_out, static_cast<const int*>(vals_in), vals_out, n, 0,
                                                  pairs_impl::key_bits(F), stream));
  }
  pairs_impl::offsets_kernel<<<unsigned((std::int64_t(F) + 1 + 255) / 256), 256, 0, stream>>>(keys_out, n, F, offsets);
  check_launch("offsets_kernel");
  return latent_pairs_view{offsets, vals_out, n, F};
}

/// One warp per latent f: `out[f, :] += sum over f's pairs p = b * kc + t (pair order) of
/// factor * src[row, :]`, skipping pairs with t >= k_limit or values[p] == 0.
///  - staged (loss): row = b * k_limit + t, factor 1 (src holds v_t S_t per pair);
///  - not staged (AuxK): row = b, factor values[p] (src holds q_b per row).
/// `gate`: when not null and `!(*gate > 0)` nothing is added.
template <int Dummy = 0>
HSAE_KERNEL void accumulate_by_latent_kernel(latent_pairs_view lp, const float* __restrict__ values, int kc,
                                             int k_limit, const float* __restrict__ src, bool staged, int D,
                                             float* __restrict__ out, const double* __restrict__ gate) {
  if (gate != nullptr && !(*gate > 0)) return;
  const int lane = int(threadIdx.x) & 31;
  const std::int64_t f = std::int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (f >= lp.F) return;
  const int beg = lp.offsets[f], end = lp.offsets[f + 1];
  if (beg == end) return;
  float* row = out + std::size_t(f) * std::size_t(D);
  for (int j = lane; j < D; j += 32) {
    float acc = row[j];
    for (int q = beg; q < end; ++q) {
      const int p = lp.pairs[q];
      const int b = p / kc, t = p - b * kc;
      if (t >= k_limit) continue;
      const float v = values[p];
      if (v == 0.f) continue;
      if (staged)
        acc += src[(std::size_t(b) * std::size_t(k_limit) + std::size_t(t)) * std::size_t(D) + std::size_t(j)];
      else
        acc += v * src[std::size_t(b) * std::size_t(D) + std::size_t(j)];
    }
    row[j] = acc;
  }
}

inline void accumulate_by_latent(const latent_pairs_view& lp, const float* values, int kc, int k_limit,
                                 const float* src, bool staged, int D, float* out, const double* gate,
                                 cudaStream_t stream) {
  constexpr int warps = 8;
  accumulate_by_latent_kernel<<<unsigned((std::int64_t(lp.F) + warps - 1) / warps), warps * 32, 0, stream>>>(
      lp, values, kc, k_limit, src, staged, D, out, gate);
  check_launch("accumulate_by_latent_kernel");
}

// ---------------------------------------------------------------------------------------
// Sparse encoder backward.

/// Inputs and outputs of the sparse encoder backward (all device pointers).
/// With `dpre_{b,t} = grad_values[b,t]` where `values[b,t] > 0`, else 0:
///   gW_enc[f] += sum dpre (x_b - b_dec),  gb_enc[f] += sum dpre,
///   gb_dec    -= sum dpre W_enc[f]         (the pre-bias term).
template <class T>
struct encoder_backward_args {
  const T* x = nullptr;                ///< [B, D] storage precision
  const float* b_dec = nullptr;        ///< [D]
  const T* W_enc = nullptr;            ///< [F, D] (the copy the encoder GEMM read)
  const float* values = nullptr;       ///< [B, kc] code values
  const index_t* indices = nullptr;    ///< [B, kc] code latents
  const float* grad_values = nullptr;  ///< [B, kc] dL/dv
  int B = 0, D = 0, F = 0, kc = 0;
  float* gW_enc = nullptr;  ///< [F, D] accumulated
  float* gb_enc = nullptr;  ///< [F] accumulated
  float* gb_dec = nullptr;  ///< [D] accumulated
  bool deterministic = true;
};

namespace encoder_impl {

/// Latents per block of the deterministic pre-bias term: at most 256 blocks.
inline int latent_block(int F) { return std::max(256, (F + 255) / 256); }
inline int latent_blocks(int F) { return (F + latent_block(F) - 1) / latent_block(F); }

/// Deterministic: one warp per latent, pairs in pair-id order. Also writes gsum[f].
template <class T>
HSAE_KERNEL void accumulate_kernel(latent_pairs_view lp, encoder_backward_args<T> a, float* __restrict__ gsum) {
  const int lane = int(threadIdx.x) & 31;
  const std::int64_t f = std::int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (f >= lp.F) return;
  const int beg = lp.offsets[f], end = lp.offsets[f + 1];
  // The scalar sum of dpre, computed identically by every lane.
  float accb = 0.f;
  for (int q = beg; q < end; ++q) {
    const int p = lp.pairs[q];
    if (!(a.values[p] > 0.f)) continue;
    accb += a.grad_values[p];
  }
  if (lane == 0) gsum[f] = accb;
  if (beg == end) return;
  const std::size_t D = std::size_t(a.D);
  float* row = a.gW_enc + std::size_t(f) * D;
  for (int j = lane; j < a.D; j += 32) {
    float acc = row[j];
    for (int q = beg; q < end; ++q) {
      const int p = lp.pairs[q];
      if (!(a.values[p] > 0.f)) continue;
      const float gv = a.grad_values[p];
      if (gv == 0.f) continue;
      const int b = p / a.kc;
      acc += gv * load_float(a.x, std::size_t(b) * D + std::size_t(j));
    }
    if (accb != 0.f) acc -= accb * a.b_dec[j];
    row[j] = acc;
  }
  if (lane == 0 && accb != 0.f) a.gb_enc[f] += accb;
}

/// partial[blk, j] = sum over latents f of block blk (ascending) with gsum[f] != 0 of
/// gsum[f] * W_enc[f, j].
template <class T>
HSAE_KERNEL void prebias_partial_kernel(const float* __restrict__ gsum, const T* __restrict__ W_enc, int F, int D,
                                        int block, float* __restrict__ partial) {
  const std::int64_t j = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int blk = int(blockIdx.y);
  const int f0 = blk * block, f1 = min(F, f0 + block);
  float acc = 0.f;
  if (j < D)
    for (int f = f0; f < f1; ++f) {
      const float g = gsum[f];
      if (g != 0.f) acc += g * load_float(W_enc, std::size_t(f) * std::size_t(D) + std::size_t(j));
    }
  if (j < D) partial[std::size_t(blk) * std::size_t(D) + std::size_t(j)] = acc;
}

/// Fast mode: one CTA per batch row, atomics into the gradients.
template <class T>
HSAE_KERNEL void atomic_kernel(encoder_backward_args<T> a) {
  const int b = int(blockIdx.x);
  const std::size_t D = std::size_t(a.D), kc = std::size_t(a.kc);
  const float* v = a.values + std::size_t(b) * kc;
  const float* gv = a.grad_values + std::size_t(b) * kc;
  const index_t* idx = a.indices + std::size_t(b) * kc;
  for (int j = int(threadIdx.x); j < a.D; j += int(blockDim.x)) {
    const float xj = load_float(a.x, std::size_t(b) * D + std::size_t(j)) - a.b_dec[j];
    float u = 0.f;
    for (int t = 0; t < a.kc; ++t) {
      const index_t f = idx[t];
      if (!(v[t] > 0.f) || gv[t] == 0.f || f < 0 || f >= a.F) continue;
      atomicAdd(a.gW_enc + std::size_t(f) * D + std::size_t(j), gv[t] * xj);
      u += gv[t] * load_float(a.W_enc, std::size_t(f) * D + std::size_t(j));
    }
    if (u != 0.f) atomicAdd(a.gb_dec + j, -u);
  }
  if (threadIdx.x == 0)
    for (int t = 0; t < a.kc; ++t) {
      const index_t f = idx[t];
      if (!(v[t] > 0.f) || gv[t] == 0.f || f < 0 || f >= a.F) continue;
      atomicAdd(a.gb_enc + f, gv[t]);
    }
}

}  // namespace encoder_impl

/// Workspace of encoder_backward; `with_pairs`: false when the caller passes pairs it
/// already built from the same indices.
template <class T>
std::size_t encoder_backward_workspace_bytes(const encoder_backward_args<T>& a, bool with_pairs = true) {
  if (!a.deterministic) return 0;
  grad_workspace_carver c(nullptr);
  if (with_pairs) c.take_bytes(latent_pairs_workspace_bytes(a.B * a.kc, a.F));
  c.take<float>(std::size_t(a.F));
  c.take<float>(std::size_t(encoder_impl::latent_blocks(a.F)) * std::size_t(a.D));
  return c.used();
}

/// The sparse encoder backward (O(B*kc*D) work; never a dense [B,F]x[B,D] product).
/// `pairs`: optional pairs already grouped from `a.indices` (deterministic mode only).
template <class T>
void encoder_backward(const encoder_backward_args<T>& a, const latent_pairs_view* pairs, void* workspace,
                      std::size_t workspace_bytes, cudaStream_t stream) {
  if (a.B == 0 || a.kc == 0) return;
  if (!a.deterministic) {
    encoder_impl::atomic_kernel<T><<<unsigned(a.B), 256, 0, stream>>>(a);
    check_launch("encoder_backward atomic_kernel");
    return;
  }
  const bool with_pairs = pairs == nullptr;
  ::hsae::detail::expects<config_error>(workspace_bytes >= encoder_backward_workspace_bytes(a, with_pairs),
                                        "encoder_backward: workspace of ", workspace_bytes, " bytes, need ",
                                        encoder_backward_workspace_bytes(a, with_pairs));
  grad_workspace_carver c(workspace);
  latent_pairs_view lp;
  if (with_pairs) {
    const std::size_t pb = latent_pairs_workspace_bytes(a.B * a.kc, a.F);
    lp = build_latent_pairs(a.indices, a.B * a.kc, a.F, c.take_bytes(pb), pb, stream);
  } else {
    lp = *pairs;
  }
  float* gsum = c.take<float>(std::size_t(a.F));
  const int blocks = encoder_impl::latent_blocks(a.F);
  float* partial = c.take<float>(std::size_t(blocks) * std::size_t(a.D));
  constexpr int warps = 8;
  encoder_impl::accumulate_kernel<T>
      <<<unsigned((std::int64_t(a.F) + warps - 1) / warps), warps * 32, 0, stream>>>(lp, a, gsum);
  check_launch("encoder_backward accumulate_kernel");
  const dim3 grid(unsigned((a.D + 255) / 256), unsigned(blocks));
  encoder_impl::prebias_partial_kernel<T>
      <<<grid, 256, 0, stream>>>(gsum, a.W_enc, a.F, a.D, encoder_impl::latent_block(a.F), partial);
  check_launch("encoder_backward prebias_partial_kernel");
  column_sum<float, float, float>(partial, blocks, a.D, a.gb_dec, -1.f, true, stream);
}

HSAE_KERNEL_NAMESPACE_END
}  // namespace cuda::detail

HSAE_NAMESPACE_END
