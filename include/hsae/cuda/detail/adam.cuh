// SPDX-License-Identifier: Apache-2.0
/// \file cuda/detail/adam.cuh
/// Adam with the SAE decoder constraint on the GPU, matching cpu/optimizer.hpp: project each
/// decoder row's gradient off the row (g -= (<g,e> / ||e||^2) e), global gradient norm
/// (after projection; optional clipping), Adam with bias correction, decoder rows
/// renormalised to unit norm, storage copies (fp16/bf16) written in the same pass.
///
/// Passes (one CTA per latent row; columns split over the threads, up to 8 per thread
/// kept in registers):
///  1. `gradient_norm`: reads the decoder row and both gradient rows; writes the projected
///     decoder gradient back (as the CPU does) and each row's squared norm (double).
///     A single 1024-thread CTA then forms the global norm in a fixed order, the clip
///     factor, and a finite flag (all on the device; nothing synchronises).
///  2. `update`: the fused pass over the weights: per row, Adam on W_enc (and its storage
///     copy); Adam on W_dec with the new values kept in registers while the row's norm is
///     reduced, then scaled and written with the storage copy. b_enc and b_dec: plain
///     elementwise Adam. When the gradient norm is not finite nothing is changed (the CPU
///     throws instead; the public wrapper reports it on request), nor when the optional
///     device flag `reject` is nonzero (the train step's finite check of the batch).
/// The learning-rate schedule and bias corrections are computed on the host.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../../config.hpp"
#include "../error.cuh"
#include "sparse_backward.cuh"
#include "types.cuh"

HSAE_NAMESPACE_BEGIN

namespace cuda::detail {
HSAE_KERNEL_NAMESPACE_BEGIN

/// Per-step constants, computed on the host exactly as cpu/optimizer.hpp does.
struct adam_step_constants {
  float beta1 = 0.9f, beta2 = 0.999f, eps = 6.25e-10f;
  float step_size = 0;     ///< float(lr / (1 - beta1^t))
  float inv_sqrt_bc2 = 1;  ///< float(1 / sqrt(1 - beta2^t))
  double max_grad_norm = 0;
  bool project_decoder_gradient = true;
  bool normalize_decoder = true;
};

/// Parameters, gradients and moments of one step (device pointers).
template <class T>
struct adam_args {
  int F = 0, D = 0;
  float *W_enc = nullptr, *W_dec = nullptr, *b_enc = nullptr, *b_dec = nullptr;  ///< fp32 masters
  T* W_enc_s = nullptr;                                                          ///< [F, D] storage copy, or null
  T* W_dec_s = nullptr;                                                          ///< [F, D] storage copy, or null
  float *gW_enc = nullptr, *gW_dec = nullptr, *gb_enc = nullptr, *gb_dec = nullptr;
  float *mW_enc = nullptr, *vW_enc = nullptr, *mW_dec = nullptr, *vW_dec = nullptr;
  float *mb_enc = nullptr, *vb_enc = nullptr, *mb_dec = nullptr, *vb_dec = nullptr;
  double* norm = nullptr;  ///< [1] out: global gradient norm (after projection, before clipping)
  /// [1] optional: when not null and nonzero at run time, the step changes nothing.
  const int* reject = nullptr;
};

namespace adam_impl {

inline constexpr int cache = 8;  ///< decoder columns per thread held in registers

/// One Adam element update (cpu/optimizer.hpp's expression order).
__device__ __forceinline__ float element(float w, float g, float& m, float& v, const adam_step_constants& h, float gs) {
  m = h.beta1 * m + ((1.f - h.beta1) * gs) * g;
  const float gg = gs * g;
  v = h.beta2 * v + (1.f - h.beta2) * (gg * gg);
  return w - (h.step_size * m) / (sqrtf(v) * h.inv_sqrt_bc2 + h.eps);
}

template <class T>
__device__ __forceinline__ void store_storage(T* p, std::size_t i, float w) {
  if constexpr (!std::is_same_v<T, float>)
    p[i] = storage_traits<T>::from_float(w);
  else
    p[i] = w;
}

/// Pass 1: projection (written back) and row_sq[f] = ||gW_enc[f]||^2 + ||gW_dec[f]||^2.
template <class T>
HSAE_KERNEL void __launch_bounds__(256) row_norm_kernel(adam_args<T> a, bool project, double* __restrict__ row_sq) {
  __shared__ float smem[33 * 2];
  const std::int64_t f = blockIdx.x;
  const std::size_t D = std::size_t(a.D), base = std::size_t(f) * D;
  float* g = a.gW_dec + base;
  const float* e = a.W_dec + base;
  float coef = 0.f;
  bool apply = false;
  if (project) {
    float s[2] = {0.f, 0.f};  // <g, e>, ||e||^2
    for (int j = int(threadIdx.x); j < a.D; j += int(blockDim.x)) {
      s[0] += g[j] * e[j];
      s[1] += e[j] * e[j];
    }
    block_sum_broadcast<2>(s, smem);
    apply = s[1] > 0.f;
    if (apply) coef = s[0] / s[1];
  }
  float s[2] = {0.f, 0.f};  // ||g_enc||^2, ||g_dec||^2 (projected)
  for (int j = int(threadIdx.x); j < a.D; j += int(blockDim.x)) {
    float gd = g[j];
    if (apply) {
      gd -= coef * e[j];
      g[j] = gd;
    }
    const float ge = a.gW_enc[base + std::size_t(j)];
    s[0] += ge * ge;
    s[1] += gd * gd;
  }
  block_sum_broadcast<2>(s, smem);
  if (threadIdx.x == 0) row_sq[f] = double(s[0]) + double(s[1]);
}

/// Global norm, clip factor and finite flag; one CTA of 1024 threads.
template <int Dummy = 0>
HSAE_KERNEL void __launch_bounds__(1024)
    norm_kernel(const double* __restrict__ row_sq, int F, const float* __restrict__ gb_enc,
                const float* __restrict__ gb_dec, int D, double max_grad_norm, const int* __restrict__ reject,
                double* __restrict__ norm, float* __restrict__ clip, int* __restrict__ ok) {
  __shared__ float fs[33 * 2];
  __shared__ double ds[33];
  float bs[2] = {0.f, 0.f};
  for (int i = int(threadIdx.x); i < F; i += 1024) bs[0] += gb_enc[i] * gb_enc[i];
  for (int i = int(threadIdx.x); i < D; i += 1024) bs[1] += gb_dec[i] * gb_dec[i];
  block_sum_broadcast<2>(bs, fs);
  double rs[1] = {0.0};
  for (int i = int(threadIdx.x); i < F; i += 1024) rs[0] += row_sq[i];
  block_sum_broadcast<1>(rs, ds);
  if (threadIdx.x == 0) {
    const double n = sqrt(double(bs[0]) + double(bs[1]) + rs[0]);
    *norm = n;
    const bool finite = isfinite(n);
    *ok = (finite && (reject == nullptr || *reject == 0)) ? 1 : 0;
    *clip = (finite && max_grad_norm > 0 && n > max_grad_norm) ? float(max_grad_norm / n) : 1.f;
  }
}

/// Pass 2: the fused update of one latent's W_enc and W_dec rows.
template <class T>
HSAE_KERNEL void __launch_bounds__(1024) row_update_kernel(adam_args<T> a, adam_step_constants h,
                                                           const float* __restrict__ clip, const int* __restrict__ ok) {
  __shared__ float smem[33];
  if (*ok == 0) return;
  const float gs = *clip;
  const int tid = int(threadIdx.x), bs = int(blockDim.x);
  const std::size_t D = std::size_t(a.D), base = std::size_t(blockIdx.x) * D;
  for (int j = tid; j < a.D; j += bs) {
    const std::size_t i = base + std::size_t(j);
    const float w = element(a.W_enc[i], a.gW_enc[i], a.mW_enc[i], a.vW_enc[i], h, gs);
    a.W_enc[i] = w;
    if (a.W_enc_s != nullptr) store_storage(a.W_enc_s, i, w);
  }
  float wc[cache];
  float sq[1] = {0.f};
#pragma unroll
  for (int c = 0; c < cache; ++c) {
    const int j = tid + c * bs;
    wc[c] = 0.f;
    if (j < a.D) {
      const std::size_t i = base + std::size_t(j);
      wc[c] = element(a.W_dec[i], a.gW_dec[i], a.mW_dec[i], a.vW_dec[i], h, gs);
      sq[0] += wc[c] * wc[c];
    }
  }
  for (int j = tid + cache * bs; j < a.D; j += bs) {  // beyond the register cache: write, re-read below
    const std::size_t i = base + std::size_t(j);
    const float w = element(a.W_dec[i], a.gW_dec[i], a.mW_dec[i], a.vW_dec[i], h, gs);
    a.W_dec[i] = w;
    sq[0] += w * w;
  }
  float n = 0.f;
  if (h.normalize_decoder) {
    block_sum_broadcast<1>(sq, smem);
    n = sqrtf(sq[0]);
  }
  const bool scale = h.normalize_decoder && n > 0.f;
#pragma unroll
  for (int c = 0; c < cache; ++c) {
    const int j = tid + c * bs;
    if (j < a.D) {
      const std::size_t i = base + std::size_t(j);
      const float w = scale ? wc[c] / n : wc[c];
      a.W_dec[i] = w;
      if (a.W_dec_s != nullptr) store_storage(a.W_dec_s, i, w);
    }
  }
  for (int j = tid + cache * bs; j < a.D; j += bs) {
    const std::size_t i = base + std::size_t(j);
    const float w = scale ? a.W_dec[i] / n : a.W_dec[i];
    a.W_dec[i] = w;
    if (a.W_dec_s != nullptr) store_storage(a.W_dec_s, i, w);
  }
}

/// Plain Adam on a vector (b_enc, b_dec).
template <int Dummy = 0>
HSAE_KERNEL void vector_update_kernel(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                                      float* __restrict__ v, int n, adam_step_constants h,
                                      const float* __restrict__ clip, const int* __restrict__ ok) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || *ok == 0) return;
  w[i] = element(w[i], g[i], m[i], v[i], h, *clip);
}

}  // namespace adam_impl

/// Workspace of adam_step: row norms [F] double, clip factor, finite flag.
inline std::size_t adam_workspace_bytes(int F) {
  grad_workspace_carver c(nullptr);
  c.take<double>(std::size_t(F));
  c.take<float>(1);
  c.take<int>(1);
  return c.used();
}

/// One constrained Adam step (both passes). Stream-ordered, no allocation, no
/// synchronisation; `*a.norm` receives the gradient norm.
template <class T>
void adam_step(const adam_args<T>& a, const adam_step_constants& h, void* workspace, std::size_t workspace_bytes,
               cudaStream_t stream) {
  using ::hsae::detail::expects;
  expects<shape_error>(a.F >= 1 && a.D >= 1, "adam_step: need F, D >= 1, got F=", a.F, " D=", a.D);
  expects<config_error>(a.W_enc && a.W_dec && a.b_enc && a.b_dec && a.gW_enc && a.gW_dec && a.gb_enc && a.gb_dec &&
                            a.mW_enc && a.vW_enc && a.mW_dec && a.vW_dec && a.mb_enc && a.vb_enc && a.mb_dec &&
                            a.vb_dec && a.norm,
                        "adam_step: a required device pointer is null");
  expects<config_error>(workspace_bytes >= adam_workspace_bytes(a.F), "adam_step: workspace of ", workspace_bytes,
                        " bytes, need ", adam_workspace_bytes(a.F));
  grad_workspace_carver c(workspace);
  double* row_sq = c.take<double>(std::size_t(a.F));
  float* clip = c.take<float>(1);
  int* ok = c.take<int>(1);
  const unsigned threads_norm = unsigned(std::min(256, row_block_threads(a.D, 1)));
  adam_impl::row_norm_kernel<T><<<unsigned(a.F), threads_norm, 0, stream>>>(a, h.project_decoder_gradient, row_sq);
  check_launch("adam row_norm_kernel");
  adam_impl::norm_kernel<<<1, 1024, 0, stream>>>(row_sq, a.F, a.gb_enc, a.gb_dec, a.D, h.max_grad_norm, a.reject,
                                                 a.norm, clip, ok);
  check_launch("adam norm_kernel");
  adam_impl::row_update_kernel<T>
      <<<unsigned(a.F), unsigned(row_block_threads(a.D, adam_impl::cache)), 0, stream>>>(a, h, clip, ok);
  check_launch("adam row_update_kernel");
  adam_impl::vector_update_kernel<<<unsigned((a.F + 255) / 256), 256, 0, stream>>>(a.b_enc, a.gb_enc, a.mb_enc,
                                                                                   a.vb_enc, a.F, h, clip, ok);
  check_launch("adam vector_update_kernel (b_enc)");
  adam_impl::vector_update_kernel<<<unsigned((a.D + 255) / 256), 256, 0, stream>>>(a.b_dec, a.gb_dec, a.mb_dec,
                                                                                   a.vb_dec, a.D, h, clip, ok);
  check_launch("adam vector_update_kernel (b_dec)");
}

HSAE_KERNEL_NAMESPACE_END
}  // namespace cuda::detail

HSAE_NAMESPACE_END
