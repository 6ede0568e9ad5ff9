// SPDX-License-Identifier: Apache-2.0
/// \file cuda/detail/auxk.cuh
/// AuxK (Gao et al. 2024) on the GPU, matching cpu/auxk.hpp: the top-k_aux
/// pre-activations among dead latents (a code from the top-k kernel, latent ids) decode
/// the main residual e = x - xhat_K (detached) *without* b_dec; the loss is the squared
/// error over the residual's total variance sum_b ||e_b - mean(e)||^2, times alpha, times
/// min(n_dead / k_aux, 1). Gradients reach the dead latents' decoder rows, their encoder
/// rows and b_enc, and b_dec through the pre-bias.
///
/// Kernels, in stream order (nothing synchronises; device scalars carry tv and the loss):
///  1. column sums of e in double (fixed order) -> mean; one CTA per row:
///     ||e_b - mean||^2 in double; summed in a fixed order -> tv;
///  2. one CTA per row (columns split over threads as in the schedule loss, up to 8 per
///     thread per tile): q = ehat - e = -e + sum_t v_t W_dec[i_t] (v_t != 0), its squared
///     norm, then q *= 2 alpha scale / tv; dL/dv_t = <W_dec[i_t], q> with 8 ranks per
///     block reduction; fast mode adds v_t q into W_dec's gradient with atomics;
///  3. deterministic mode: pairs grouped by latent, one warp per latent adds v_t q_b in
///     pair order; 4. the sparse encoder backward on the AuxK code; 5. loss on device.
/// When tv is not > 0 the kernels add nothing and the loss is 0 (as on the CPU).
/// The dead count is a host value (`n_dead`) or, so that nothing synchronises, a device
/// scalar (`n_dead_device`, e.g. the tracker's count): then a one-thread kernel after the
/// variance forms the scale min(n_dead / k_aux, 1) on the device and sets tv to 0 when
/// nothing is dead, which the kernels above already treat as "add nothing".
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

/// Arguments of the AuxK loss and backward (device pointers unless stated).
template <class T>
struct auxk_args {
  const float* residual = nullptr;  ///< [B, D] x - xhat_K of the main loss
  const T* x = nullptr;             ///< [B, D]
  const float* b_dec = nullptr;     ///< [D]
  const T* W_enc = nullptr;         ///< [F, D]
  const T* W_dec = nullptr;         ///< [F, D]
  const float* values = nullptr;    ///< [B, ka] AuxK code values (descending per row)
  /// [B, ka] AuxK code latents: dead latent ids; a row's slots beyond its dead latents
  /// hold index -1 and value 0 (the top-k's padding) and contribute nothing.
  const index_t* indices = nullptr;
  int B = 0, D = 0, F = 0, ka = 0;
  std::int64_t n_dead = 0;  ///< host value: dead latents (the code was taken over them)
  /// Optional device scalar holding the dead count; when set, `n_dead` is ignored and
  /// the code must have min(k_aux, F) columns (enough for any count).
  const int* n_dead_device = nullptr;
  int k_aux = 0;            ///< host value: resolved k_aux (auxk_options::resolved_k_aux)
  double alpha = 1.0 / 32.0;
  float* grad_values = nullptr;  ///< [B, ka] out: dL_aux/dv
  float* gW_dec = nullptr;       ///< [F, D] accumulated
  float* gW_enc = nullptr;       ///< [F, D] accumulated
  float* gb_enc = nullptr;       ///< [F] accumulated
  float* gb_dec = nullptr;       ///< [D] accumulated
  double* loss = nullptr;        ///< [1] out: the scaled AuxK loss
  bool deterministic = true;
};

namespace auxk_impl {

inline constexpr int items = 8;
inline constexpr int group = 8;
inline constexpr int threads = 512;

/// row_tv[b] = sum_j (e_bj - colsum_j / B)^2 in double.
template <int Dummy = 0>
HSAE_KERNEL void __launch_bounds__(256)
    row_variance_kernel(const float* __restrict__ e, const double* __restrict__ colsum, int B, int D,
                        double* __restrict__ row_tv) {
  __shared__ double smem[33];
  const int b = int(blockIdx.x);
  double v[1] = {0.0};
  for (int j = int(threadIdx.x); j < D; j += int(blockDim.x)) {
    const double d = double(e[std::size_t(b) * std::size_t(D) + std::size_t(j)]) - colsum[j] / double(B);
    v[0] += d * d;
  }
  block_sum_broadcast<1>(v, smem);
  if (threadIdx.x == 0) row_tv[b] = v[0];
}

/// With the dead count on the device: scale = min(n_dead / k_aux, 1), and tv = 0 when
/// nothing is dead (every later kernel then adds nothing and the loss is 0).
template <int Dummy = 0>
HSAE_KERNEL void device_scale_kernel(const int* __restrict__ n_dead, int k_aux, double* __restrict__ tv,
                                     double* __restrict__ scale) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const int n = *n_dead;
  *scale = fmin(double(n) / double(k_aux), 1.0);
  if (n <= 0) *tv = 0.0;
}

template <class T>
struct decode_params {
  auxk_args<T> a;
  const double* tv;
  double scale;
  const double* scale_device;  ///< when not null, the scale (device_scale_kernel's)
  float* q;         ///< [B, D] out
  double* row_err;  ///< [B] out
};

/// One CTA per row: q, its squared norm, scaled q, dL/dv (and atomics in fast mode).
template <class T>
HSAE_KERNEL void __launch_bounds__(threads) decode_kernel(decode_params<T> p) {
  constexpr int I = items, G = group;
  __shared__ float red[2 * 32 * G];
  int parity = 0;
  const auxk_args<T>& a = p.a;
  const int tid = int(threadIdx.x), bs = int(blockDim.x), b = int(blockIdx.x);
  const std::size_t D = std::size_t(a.D), xrow = std::size_t(b) * D;
  const float* vrow = a.values + std::size_t(b) * std::size_t(a.ka);
  const index_t* irow = a.indices + std::size_t(b) * std::size_t(a.ka);
  const double tv = *p.tv;
  if (!(tv > 0)) {  // uniform: nothing to learn from a constant residual
    for (int t = tid; t < a.ka; t += bs) a.grad_values[std::size_t(b) * std::size_t(a.ka) + std::size_t(t)] = 0.f;
    if (tid == 0) p.row_err[b] = 0.0;
    return;
  }
  const double scale = p.scale_device != nullptr ? *p.scale_device : p.scale;
  const float coef = float(2.0 * a.alpha * scale / tv);
  for (int j0 = 0; j0 < a.D; j0 += bs * I) {
    const bool first = j0 == 0;
    float q[I];
#pragma unroll
    for (int i = 0; i < I; ++i) {
      const int j = j0 + tid + i * bs;
      q[i] = j < a.D ? -a.residual[xrow + std::size_t(j)] : 0.f;
    }
    for (int t = 0; t < a.ka; ++t) {
      const float v = vrow[t];
      const index_t f = irow[t];
      if (v == 0.f || f < 0 || f >= a.F) continue;
      const T* e = a.W_dec + std::size_t(f) * D;
#pragma unroll
      for (int i = 0; i < I; ++i) {
        const int j = j0 + tid + i * bs;
        if (j < a.D) q[i] += v * load_float(e, std::size_t(j));
      }
    }
    {
      // Same group width as the rank reductions below: the double buffer's halves
      // must not overlap between consecutive calls.
      float sq[G];
#pragma unroll
      for (int g = 0; g < G; ++g) sq[g] = 0.f;
#pragma unroll
      for (int i = 0; i < I; ++i) sq[0] += q[i] * q[i];
      const float tot = block_sum_to_lanes<G>(sq, red, parity);
      if (tid == 0) p.row_err[b] = first ? double(tot) : p.row_err[b] + double(tot);
    }
#pragma unroll
    for (int i = 0; i < I; ++i) {
      const int j = j0 + tid + i * bs;
      q[i] *= coef;
      if (j < a.D) p.q[xrow + std::size_t(j)] = q[i];
    }
    for (int t0 = 0; t0 < a.ka; t0 += G) {
      float part[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        part[g] = 0.f;
        const int t = t0 + g;
        if (t < a.ka) {
          const float v = vrow[t];
          const index_t f = irow[t];
          if (f >= 0 && f < a.F) {
            const T* e = a.W_dec + std::size_t(f) * D;
#pragma unroll
            for (int i = 0; i < I; ++i) {
              const int j = j0 + tid + i * bs;
              if (j < a.D) {
                part[g] += load_float(e, std::size_t(j)) * q[i];
                if (!a.deterministic && v != 0.f) atomicAdd(a.gW_dec + std::size_t(f) * D + std::size_t(j), v * q[i]);
              }
            }
          }
        }
      }
      const float tot = block_sum_to_lanes<G>(part, red, parity);
      const int t = t0 + tid;
      if (tid < G && t < a.ka) {
        float& dst = a.grad_values[std::size_t(b) * std::size_t(a.ka) + std::size_t(t)];
        dst = first ? tot : dst + tot;
      }
    }
  }
}

/// loss = tv > 0 ? alpha * scale * sse / tv : 0 (scale from `scale_device` when set).
template <int Dummy = 0>
HSAE_KERNEL void finalize_kernel(const double* __restrict__ sse, const double* __restrict__ tv, double alpha,
                                 double scale, const double* __restrict__ scale_device, double* __restrict__ loss) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const double s = scale_device != nullptr ? *scale_device : scale;
  *loss = *tv > 0 ? alpha * s * *sse / *tv : 0.0;
}

/// Zero dL/dv when no AuxK applies.
template <int Dummy = 0>
HSAE_KERNEL void zero_kernel(float* __restrict__ p, std::int64_t n) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) p[i] = 0.f;
}

template <class T>
encoder_backward_args<T> encoder_args(const auxk_args<T>& a) {
  encoder_backward_args<T> e;
  e.x = a.x;
  e.b_dec = a.b_dec;
  e.W_enc = a.W_enc;
  e.values = a.values;
  e.indices = a.indices;
  e.grad_values = a.grad_values;
  e.B = a.B;
  e.D = a.D;
  e.F = a.F;
  e.kc = a.ka;
  e.gW_enc = a.gW_enc;
  e.gb_enc = a.gb_enc;
  e.gb_dec = a.gb_dec;
  e.deterministic = a.deterministic;
  return e;
}

}  // namespace auxk_impl

template <class T>
void check_auxk_args(const auxk_args<T>& a) {
  using ::hsae::detail::expects;
  expects<shape_error>(a.B >= 1 && a.D >= 1 && a.F >= 1 && a.ka >= 1, "auxk: need B, D, F, k >= 1, got B=", a.B,
                       " D=", a.D, " F=", a.F, " k=", a.ka);
  expects<config_error>(a.alpha >= 0, "auxk: alpha must be >= 0, got ", a.alpha);
  expects<config_error>(a.k_aux >= 1, "auxk: k_aux must be >= 1, got ", a.k_aux);
  if (a.n_dead_device != nullptr) {
    expects<shape_error>(a.ka >= std::min(a.k_aux, a.F) && a.ka <= a.k_aux, "auxk: the code has k=", a.ka,
                         " columns; with the dead count on the device it needs min(k_aux, d_sae)=",
                         std::min(a.k_aux, a.F));
  } else {
    expects<config_error>(a.n_dead >= 0 && a.n_dead <= a.F, "auxk: n_dead=", a.n_dead, " outside [0, d_sae=", a.F,
                          "]");
    expects<shape_error>(a.n_dead == 0 || (a.ka >= std::min<std::int64_t>(a.k_aux, a.n_dead) && a.ka <= a.k_aux),
                         "auxk: the code has k=", a.ka,
                         " columns, expected between min(k_aux, n_dead)=", std::min<std::int64_t>(a.k_aux, a.n_dead),
                         " and k_aux=", a.k_aux);
  }
  expects<shape_error>(std::int64_t(a.B) * a.ka <= std::int64_t(INT32_MAX), "auxk: B*k=", std::int64_t(a.B) * a.ka,
                       " pairs exceed 2^31-1");
  expects<config_error>(a.residual && a.x && a.b_dec && a.W_enc && a.W_dec && a.values && a.indices && a.grad_values &&
                            a.gW_dec && a.gW_enc && a.gb_enc && a.gb_dec && a.loss,
                        "auxk: a required device pointer is null");
}

template <class T>
std::size_t auxk_workspace_bytes(const auxk_args<T>& a) {
  grad_workspace_carver c(nullptr);
  c.take<double>(std::size_t(a.D));                    // column sums
  c.take<double>(std::size_t(a.B));                    // row_tv
  c.take<double>(std::size_t(a.B));                    // row_err
  c.take<double>(3);                                   // tv, sse, scale
  c.take<float>(std::size_t(a.B) * std::size_t(a.D));  // q
  if (a.deterministic) {
    c.take_bytes(latent_pairs_workspace_bytes(a.B * a.ka, a.F));
    c.take_bytes(encoder_backward_workspace_bytes(auxk_impl::encoder_args(a), false));
  }
  return c.used();
}

/// The AuxK loss and its gradients (added to gW_dec, gW_enc, gb_enc, gb_dec).
/// `*a.loss` receives the scaled loss (0 when nothing is dead, alpha == 0, or the
/// residual has zero variance). Stream-ordered, no allocation, no synchronisation.
template <class T>
void auxk_loss_backward(const auxk_args<T>& a, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  check_auxk_args(a);
  if ((a.n_dead_device == nullptr && a.n_dead == 0) || a.alpha == 0) {
    HSAE_CUDA_TRY(cudaMemsetAsync(a.loss, 0, sizeof(double), stream));
    const std::int64_t n = std::int64_t(a.B) * a.ka;
    auxk_impl::zero_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(a.grad_values, n);
    check_launch("auxk zero_kernel");
    return;
  }
  const std::size_t need = auxk_workspace_bytes(a);
  ::hsae::detail::expects<config_error>(workspace_bytes >= need, "auxk: workspace of ", workspace_bytes,
                                        " bytes, need ", need);
  grad_workspace_carver c(workspace);
  double* colsum = c.take<double>(std::size_t(a.D));
  double* row_tv = c.take<double>(std::size_t(a.B));
  double* row_err = c.take<double>(std::size_t(a.B));
  double* scalars = c.take<double>(3);
  float* q = c.take<float>(std::size_t(a.B) * std::size_t(a.D));
  double* tv = scalars;
  double* sse = scalars + 1;
  double* scale_device = a.n_dead_device != nullptr ? scalars + 2 : nullptr;
  const double scale = std::min(double(a.n_dead) / double(a.k_aux), 1.0);  // host count only

  column_sum<float, double, double>(a.residual, a.B, a.D, colsum, 1.0, false, stream);
  auxk_impl::row_variance_kernel<<<unsigned(a.B), 256, 0, stream>>>(a.residual, colsum, a.B, a.D, row_tv);
  check_launch("auxk row_variance_kernel");
  vector_sum<double, double>(row_tv, a.B, tv, stream);
  if (scale_device != nullptr) {
    auxk_impl::device_scale_kernel<<<1, 32, 0, stream>>>(a.n_dead_device, a.k_aux, tv, scale_device);
    check_launch("auxk device_scale_kernel");
  }

  auxk_impl::decode_params<T> dp{a, tv, scale, scale_device, q, row_err};
  auxk_impl::decode_kernel<T>
      <<<unsigned(a.B), unsigned(row_block_threads(a.D, auxk_impl::items, auxk_impl::threads)), 0, stream>>>(dp);
  check_launch("auxk decode_kernel");
  vector_sum<double, double>(row_err, a.B, sse, stream);
  auxk_impl::finalize_kernel<<<1, 32, 0, stream>>>(sse, tv, a.alpha, scale, scale_device, a.loss);
  check_launch("auxk finalize_kernel");

  const encoder_backward_args<T> ea = auxk_impl::encoder_args(a);
  if (a.deterministic) {
    const std::size_t pb = latent_pairs_workspace_bytes(a.B * a.ka, a.F);
    const latent_pairs_view lp = build_latent_pairs(a.indices, a.B * a.ka, a.F, c.take_bytes(pb), pb, stream);
    accumulate_by_latent(lp, a.values, a.ka, a.ka, q, false, a.D, a.gW_dec, tv, stream);
    const std::size_t eb = encoder_backward_workspace_bytes(ea, false);
    encoder_backward(ea, &lp, c.take_bytes(eb), eb, stream);
  } else {
    encoder_backward(ea, nullptr, nullptr, 0, stream);
  }
}

HSAE_KERNEL_NAMESPACE_END
}  // namespace cuda::detail

HSAE_NAMESPACE_END
