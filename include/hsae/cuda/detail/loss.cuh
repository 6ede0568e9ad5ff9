// SPDX-License-Identifier: Apache-2.0
/// \file cuda/detail/loss.cuh
/// The weighted k-schedule (HierarchicalTopK) loss on the GPU: forward, decoder-side
/// backward, and the decoder gradient. Formulas: docs/OBJECTIVE.md; CPU reference:
/// cpu/loss.hpp (same recurrences, same skip rules).
///
/// Kernel design. One CTA per batch row; the row's D columns are split over the
/// threads, each thread owning up to `loss_items` = 8 columns (j = tid + i * blockDim)
/// held in registers; blockDim = 32 * ceil(D / 256) up to 512, so one tile covers
/// D <= 4096, and wider rows are walked tile by tile (per-rank partial results are added
/// across tiles in tile order). Never a [B, K, D] tensor:
///  - forward, t = 1..K: r += v_t e_t (skipped when v_t == 0); at a scheduled rank each
///    thread adds its share of ||r||^2;
///  - backward, t = K..1: S += c omega_t r (when omega_t > 0); dL/dv_t = <e_t, S>;
///    the decoder gradient gets v_t S; r -= v_t e_t. S ends as S_1 (the decoder-side
///    b_dec gradient of the row).
/// The updates of r and S are elementwise, so the block reductions (level squared
/// errors, dL/dv) never stall the recurrence: partials of `loss_group` = 8 consecutive
/// ranks are reduced together (one __syncthreads per 8 ranks, double-buffered shared
/// memory; groups without a scheduled rank skip the forward reduction).
///
/// Decoder gradient dL/de_f = sum_{(b,t): i=f} v_t S_{b,t}:
///  - fast mode: fp32 atomicAdd of v_t S_t into W_dec's gradient row from the backward
///    loop (and of S_1 into b_dec's gradient);
///  - deterministic mode: v_t S_t is staged for a chunk of rows ([rows, K, D] fp32, at
///    most `staging_bytes`, at least one row: memory flat in K, like the CPU's
///    `scratch_bytes`), the chunk's pairs are grouped by latent (stable radix sort), and
///    one warp per latent adds its staged vectors in pair order; S_1 rows go to a [B, D]
///    buffer summed over rows in a fixed order. Bitwise identical run to run.
/// Per-row level squared errors go to a [B, levels] double buffer summed in a fixed
/// order; the loss is formed on the device (nothing synchronises).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../../config.hpp"
#include "../error.cuh"
#include "sparse_backward.cuh"
#include "types.cuh"

HSAE_NAMESPACE_BEGIN

namespace cuda::detail {
HSAE_KERNEL_NAMESPACE_BEGIN

inline constexpr int loss_items = 8;      ///< columns per thread per tile
inline constexpr int loss_group = 8;      ///< ranks per batched block reduction
inline constexpr int loss_threads = 512;  ///< most threads per CTA (a tile: 4096 columns)

/// Arguments of the schedule loss (all pointers are device memory).
template <class T>
struct schedule_loss_args {
  const T* x = nullptr;              ///< [B, D] batch (storage precision)
  const float* b_dec = nullptr;      ///< [D]
  const T* W_dec = nullptr;          ///< [F, D] decoder rows (storage precision)
  const float* values = nullptr;     ///< [B, kc] code values, descending per row
  const index_t* indices = nullptr;  ///< [B, kc] code latents in [0, F)
  const double* omega = nullptr;     ///< [K] normalised rank weights (normalized_rank_weights)
  const int* level_of = nullptr;     ///< [K] level index of rank t+1, or -1
  int B = 0, D = 0, F = 0, K = 0, kc = 0, levels = 0;
  float* residual = nullptr;    ///< [B, D] out: x - xhat_K
  double* level_sse = nullptr;  ///< [levels] out: sum_b ||x_b - xhat_{b,k_l}||^2
  double* loss = nullptr;       ///< [1] out (optional): the schedule loss
  bool backward = false;
  float* grad_values = nullptr;  ///< [B, kc] out (backward): dL/dv, zero beyond K
  float* gW_dec = nullptr;       ///< [F, D] accumulated (backward)
  float* gb_dec = nullptr;       ///< [D] accumulated (backward), decoder side
  bool deterministic = true;
  /// Bound on the deterministic decoder-gradient staging buffer (bytes).
  std::size_t staging_bytes = std::size_t(64) << 20;
};

namespace loss_impl {

template <class T>
struct kernel_params {
  schedule_loss_args<T> a;
  int row0;           ///< first batch row of this launch
  float* bias_rows;   ///< [B, D] per-row S_1 (deterministic) or null (atomics)
  float* staging;     ///< [rows, K, D] v_t S_t (deterministic) or null (atomics)
  double* level_err;  ///< [B, levels]
};

template <class T>
HSAE_KERNEL void __launch_bounds__(loss_threads) schedule_loss_kernel(kernel_params<T> p) {
  constexpr int I = loss_items, G = loss_group;
  __shared__ float red[2 * 32 * G];
  int parity = 0;
  const schedule_loss_args<T>& a = p.a;
  const int tid = int(threadIdx.x), bs = int(blockDim.x);
  const int b = p.row0 + int(blockIdx.x);
  const std::size_t D = std::size_t(a.D), xrow = std::size_t(b) * D;
  const float* vrow = a.values + std::size_t(b) * std::size_t(a.kc);
  const index_t* irow = a.indices + std::size_t(b) * std::size_t(a.kc);
  const double c = 2.0 / (double(a.B) * double(a.D));

  for (int j0 = 0; j0 < a.D; j0 += bs * I) {
    const bool first = j0 == 0;
    float r[I];
#pragma unroll
    for (int i = 0; i < I; ++i) {
      const int j = j0 + tid + i * bs;
      r[i] = j < a.D ? a.b_dec[j] - load_float(a.x, xrow + std::size_t(j)) : 0.f;  // r_0 = xhat_0 - x
    }
    // Forward: r_t = r_{t-1} + v_t e_t; level squared errors at scheduled ranks.
    for (int t0 = 0; t0 < a.K; t0 += G) {
      float part[G];
      bool any_level = false;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        part[g] = 0.f;
        const int t = t0 + g;
        if (t < a.K) {
          const float v = vrow[t];
          const index_t f = irow[t];
          const bool level = a.level_of[t] >= 0;
          any_level |= level;
          if (v != 0.f && f >= 0 && f < a.F) {
            const T* e = a.W_dec + std::size_t(f) * D;
#pragma unroll
            for (int i = 0; i < I; ++i) {
              const int j = j0 + tid + i * bs;
              if (j < a.D) r[i] += v * load_float(e, std::size_t(j));
            }
          }
          if (level) {
#pragma unroll
            for (int i = 0; i < I; ++i) part[g] += r[i] * r[i];
          }
        }
      }
      if (any_level) {  // uniform over the CTA: depends on t only
        const float tot = block_sum_to_lanes<G>(part, red, parity);
        const int t = t0 + tid;
        if (tid < G && t < a.K) {
          const int l = a.level_of[t];
          if (l >= 0) {
            double& dst = p.level_err[std::size_t(b) * std::size_t(a.levels) + std::size_t(l)];
            dst = first ? double(tot) : dst + double(tot);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < I; ++i) {
      const int j = j0 + tid + i * bs;
      if (j < a.D) a.residual[xrow + std::size_t(j)] = -r[i];
    }
    if (!a.backward) continue;

    // Backward: S_t = S_{t+1} + c omega_t r_t; dL/dv_t = <e_t, S_t>; r_{t-1} = r_t - v_t e_t.
    float S[I];
#pragma unroll
    for (int i = 0; i < I; ++i) S[i] = 0.f;
    for (int th = a.K - 1; th >= 0; th -= G) {
      float part[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        part[g] = 0.f;
        const int t = th - g;
        if (t >= 0) {
          const double om = a.omega[t];
          if (om > 0) {
            const float coef = float(c * om);
#pragma unroll
            for (int i = 0; i < I; ++i) S[i] += coef * r[i];
          }
          const float v = vrow[t];
          const index_t f = irow[t];
          if (f >= 0 && f < a.F) {
            const T* e = a.W_dec + std::size_t(f) * D;
            float ev[I];
#pragma unroll
            for (int i = 0; i < I; ++i) {
              const int j = j0 + tid + i * bs;
              ev[i] = j < a.D ? load_float(e, std::size_t(j)) : 0.f;
              part[g] += ev[i] * S[i];
            }
            if (v != 0.f) {
#pragma unroll
              for (int i = 0; i < I; ++i) {
                const int j = j0 + tid + i * bs;
                if (j < a.D) {
                  const float u = v * S[i];
                  if (p.staging != nullptr)
                    p.staging[(std::size_t(b - p.row0) * std::size_t(a.K) + std::size_t(t)) * D + std::size_t(j)] = u;
                  else
                    atomicAdd(a.gW_dec + std::size_t(f) * D + std::size_t(j), u);
                  r[i] -= v * ev[i];
                }
              }
            }
          }
        }
      }
      const float tot = block_sum_to_lanes<G>(part, red, parity);
      const int t = th - tid;
      if (tid < G && t >= 0) {
        float& dst = a.grad_values[std::size_t(b) * std::size_t(a.kc) + std::size_t(t)];
        dst = first ? tot : dst + tot;
      }
    }
#pragma unroll
    for (int i = 0; i < I; ++i) {
      const int j = j0 + tid + i * bs;
      if (j < a.D) {
        if (p.bias_rows != nullptr)
          p.bias_rows[xrow + std::size_t(j)] = S[i];
        else
          atomicAdd(a.gb_dec + j, S[i]);
      }
    }
  }
  if (a.backward)
    for (int t = a.K + tid; t < a.kc; t += bs) a.grad_values[std::size_t(b) * std::size_t(a.kc) + std::size_t(t)] = 0.f;
}

/// loss = sum_t omega_t * level_sse[level_of[t]] / (B * D), in rank order.
template <int Dummy = 0>
HSAE_KERNEL void finalize_kernel(const double* __restrict__ omega, const int* __restrict__ level_of, int K,
                                 const double* __restrict__ level_sse, double BD, double* __restrict__ loss) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double s = 0;
  for (int t = 0; t < K; ++t) {
    const int l = level_of[t];
    if (l >= 0) s += omega[t] * level_sse[l] / BD;
  }
  *loss = s;
}

/// Rows per chunk of the deterministic staging buffer.
inline int staging_rows(int B, int K, int D, std::size_t staging_bytes) {
  const std::size_t per_row = std::size_t(K) * std::size_t(D) * sizeof(float);
  const std::size_t rows = per_row == 0 ? std::size_t(B) : staging_bytes / per_row;
  return int(std::clamp<std::size_t>(rows, 1, std::size_t(std::max(B, 1))));
}

}  // namespace loss_impl

/// Validates the sizes of the arguments (not the device data).
template <class T>
void check_schedule_loss_args(const schedule_loss_args<T>& a) {
  using ::hsae::detail::expects;
  expects<shape_error>(a.B >= 1 && a.D >= 1 && a.F >= 1, "schedule_loss: need B, D, F >= 1, got B=", a.B, " D=", a.D,
                       " F=", a.F);
  expects<config_error>(a.K >= 1 && a.K <= a.kc, "schedule_loss: k_max=", a.K, " must be in [1, code k=", a.kc, "]");
  expects<config_error>(a.K <= a.F, "schedule_loss: k_max=", a.K, " exceeds d_sae=", a.F);
  expects<config_error>(a.levels >= 1 && a.levels <= a.K, "schedule_loss: ", a.levels, " levels for k_max=", a.K);
  expects<shape_error>(std::int64_t(a.B) * a.kc <= std::int64_t(INT32_MAX),
                       "schedule_loss: B*k=", std::int64_t(a.B) * a.kc, " pairs exceed 2^31-1");
  expects<config_error>(
      a.x && a.b_dec && a.W_dec && a.values && a.indices && a.omega && a.level_of && a.residual && a.level_sse,
      "schedule_loss: a required device pointer is null");
  expects<config_error>(!a.backward || (a.grad_values && a.gW_dec && a.gb_dec),
                        "schedule_loss: the backward needs grad_values, gW_dec and gb_dec");
}

/// Workspace bytes of schedule_loss for these arguments.
template <class T>
std::size_t schedule_loss_workspace_bytes(const schedule_loss_args<T>& a) {
  grad_workspace_carver c(nullptr);
  c.take<double>(std::size_t(a.B) * std::size_t(a.levels));
  if (a.backward && a.deterministic) {
    const int rows = loss_impl::staging_rows(a.B, a.K, a.D, a.staging_bytes);
    c.take<float>(std::size_t(a.B) * std::size_t(a.D));
    c.take<float>(std::size_t(rows) * std::size_t(a.K) * std::size_t(a.D));
    c.take_bytes(latent_pairs_workspace_bytes(rows * a.kc, a.F));
  }
  return c.used();
}

/// The schedule loss (forward, optional backward). Stream-ordered, no allocation, no
/// synchronisation. \throws hsae::config_error / hsae::shape_error on inconsistent sizes
/// or a short workspace, hsae::cuda_error on a launch failure.
template <class T>
void schedule_loss(const schedule_loss_args<T>& a, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  check_schedule_loss_args(a);
  const std::size_t need = schedule_loss_workspace_bytes(a);
  ::hsae::detail::expects<config_error>(workspace_bytes >= need, "schedule_loss: workspace of ", workspace_bytes,
                                        " bytes, need ", need);
  grad_workspace_carver c(workspace);
  loss_impl::kernel_params<T> p{a, 0, nullptr, nullptr, nullptr};
  p.level_err = c.take<double>(std::size_t(a.B) * std::size_t(a.levels));
  const int threads = row_block_threads(a.D, loss_items, loss_threads);
  if (a.backward && a.deterministic) {
    const int rows = loss_impl::staging_rows(a.B, a.K, a.D, a.staging_bytes);
    p.bias_rows = c.take<float>(std::size_t(a.B) * std::size_t(a.D));
    p.staging = c.take<float>(std::size_t(rows) * std::size_t(a.K) * std::size_t(a.D));
    const std::size_t pb = latent_pairs_workspace_bytes(rows * a.kc, a.F);
    void* pairs_ws = c.take_bytes(pb);
    for (int b0 = 0; b0 < a.B; b0 += rows) {
      const int n = std::min(rows, a.B - b0);
      p.row0 = b0;
      loss_impl::schedule_loss_kernel<T><<<unsigned(n), unsigned(threads), 0, stream>>>(p);
      check_launch("schedule_loss_kernel");
      const latent_pairs_view lp =
          build_latent_pairs(a.indices + std::size_t(b0) * std::size_t(a.kc), n * a.kc, a.F, pairs_ws, pb, stream);
      accumulate_by_latent(lp, a.values + std::size_t(b0) * std::size_t(a.kc), a.kc, a.K, p.staging, true, a.D,
                           a.gW_dec, nullptr, stream);
    }
    column_sum<float, float, float>(p.bias_rows, a.B, a.D, a.gb_dec, 1.f, true, stream);
  } else {
    loss_impl::schedule_loss_kernel<T><<<unsigned(a.B), unsigned(threads), 0, stream>>>(p);
    check_launch("schedule_loss_kernel");
  }
  column_sum<double, double, double>(p.level_err, a.B, a.levels, a.level_sse, 1.0, false, stream);
  if (a.loss != nullptr) {
    loss_impl::finalize_kernel<<<1, 32, 0, stream>>>(a.omega, a.level_of, a.K, a.level_sse, double(a.B) * double(a.D),
                                                     a.loss);
    check_launch("schedule_loss finalize_kernel");
  }
}

HSAE_KERNEL_NAMESPACE_END
}  // namespace cuda::detail

HSAE_NAMESPACE_END
