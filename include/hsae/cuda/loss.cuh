// SPDX-License-Identifier: Apache-2.0
/// \file cuda/loss.cuh
/// The weighted k-schedule (HierarchicalTopK) loss on the GPU: forward, decoder-side
/// backward and the sparse encoder backward, the CUDA counterparts of cpu/loss.hpp.
/// Kernel design and determinism: cuda/detail/loss.cuh and cuda/detail/sparse_backward.cuh.
///
/// Everything is enqueued on `be.stream()`; nothing synchronises except the functions
/// whose names say `read_`. Workspaces grow on first use and are reused afterwards (no
/// allocation once shapes settle). With `be.deterministic` (the default) every gradient
/// is bitwise identical run to run; otherwise fp32 atomics are used.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../k_schedule.hpp"
#include "../step_types.hpp"
#include "backend.cuh"
#include "detail/loss.cuh"
#include "detail/sparse_backward.cuh"
#include "memory.cuh"
#include "model.cuh"

HSAE_NAMESPACE_BEGIN

/// A growable device scratch area for the kernels' workspaces (stream-ordered reuse:
/// consecutive calls on one stream may share it).
class device_scratch {
 public:
  /// At least `bytes` of scratch; reallocates only when growing.
  void* get(const cuda_backend& be, std::size_t bytes) {
    if (bytes > buf_.size()) buf_.resize(be, bytes);
    return buf_.data();
  }
  std::size_t size() const { return buf_.size(); }

 private:
  device_buffer<unsigned char> buf_;
};

/// A k-schedule on the device: the normalised per-rank weights `omega [K]`
/// (normalized_rank_weights) and each rank's level (or -1). Re-uploads only when the
/// schedule changes.
class device_k_schedule {
 public:
  device_k_schedule() = default;
  template <k_schedule_like S>
  device_k_schedule(const cuda_backend& be, const S& s) {
    assign(be, s);
  }

  /// Uploads `s` unless it equals the schedule already held. Asynchronous.
  template <k_schedule_like S>
  void assign(const cuda_backend& be, const S& s) {
    std::vector<int> ks(s.size());
    std::vector<double> ws(s.size());
    for (std::size_t l = 0; l < s.size(); ++l) {
      ks[l] = int(s.k(l));
      ws[l] = double(s.weight(l));
    }
    if (ks == ks_ && ws == ws_ && !omega_.empty()) return;
    const std::vector<double> omega = normalized_rank_weights<double>(s);
    std::vector<int> level_of(std::size_t(s.k_max()), -1);
    for (std::size_t l = 0; l < s.size(); ++l) level_of[std::size_t(ks[l] - 1)] = int(l);
    omega_.resize(be, omega.size());
    level_of_.resize(be, level_of.size());
    HSAE_CUDA_TRY(cudaMemcpyAsync(omega_.data(), omega.data(), omega.size() * sizeof(double), cudaMemcpyHostToDevice,
                                  be.stream()));
    HSAE_CUDA_TRY(cudaMemcpyAsync(level_of_.data(), level_of.data(), level_of.size() * sizeof(int),
                                  cudaMemcpyHostToDevice, be.stream()));
    ks_ = std::move(ks);
    ws_ = std::move(ws);
  }

  std::size_t size() const { return ks_.size(); }
  int k(std::size_t l) const { return ks_[l]; }
  double weight(std::size_t l) const { return ws_[l]; }
  int k_max() const { return ks_.empty() ? 0 : ks_.back(); }
  const double* omega() const { return omega_.data(); }
  const int* level_of() const { return level_of_.data(); }

 private:
  std::vector<int> ks_;
  std::vector<double> ws_;
  device_buffer<double> omega_;
  device_buffer<int> level_of_;
};

/// Buffers of the loss, reused across calls.
struct device_loss_workspace {
  /// dL/dv [B, code.k()] after a backward call (zero beyond k_max; the ReLU mask is
  /// applied by `encoder_backward`).
  device_matrix<float> grad_values;
  /// x - xhat_K [B, D] (AuxK's target).
  device_matrix<float> residual;
  /// Per schedule level: sum_b ||x_b - xhat_{b,k_l}||^2 [levels], and the loss [1].
  device_buffer<double> level_sse;
  device_buffer<double> loss;
  device_k_schedule schedule;
  device_scratch scratch;
  /// Bound on the deterministic decoder-gradient staging (like cpu_backend::scratch_bytes).
  std::size_t staging_bytes = std::size_t(64) << 20;
};

namespace cuda::detail {

template <class T, int F>
void check_loss_shapes(const device_sae<T, F>& m, device_matrix_view<const std::type_identity_t<T>> x,
                       const device_code& code, int k_max) {
  using ::hsae::detail::expects;
  m.check_shapes();
  expects<shape_error>(x.cols == m.d_model(), "the batch has width ", x.cols, ", expected d_model=", m.d_model());
  expects<shape_error>(x.rows >= 1, "the batch is empty");
  expects<shape_error>(code.rows() == x.rows, "the code has ", code.rows(), " rows but the batch has ", x.rows);
  expects<shape_error>(code.indices.rows() == code.values.rows() && code.indices.cols() == code.values.cols(),
                       "the code's values [", code.values.rows(), ", ", code.values.cols(), "] and indices [",
                       code.indices.rows(), ", ", code.indices.cols(), "] differ in shape");
  expects<config_error>(k_max <= code.k(), "the k-schedule's k_max=", k_max, " exceeds the code's k=", code.k());
  expects<config_error>(k_max <= m.d_sae(), "the k-schedule's k_max=", k_max, " exceeds d_sae=", m.d_sae());
}

/// `grads.b_enc` [d_sae] and `grads.b_dec` [d_model], as the model's biases.
template <class T, int F>
void check_bias_gradients(const device_sae<T, F>& m, const device_gradients<F>& grads) {
  using ::hsae::detail::expects;
  expects<shape_error>(grads.b_enc.size() == std::size_t(m.d_sae()), "b_enc gradient has shape [", grads.b_enc.size(),
                       "], expected [", m.d_sae(), "] (d_sae)");
  expects<shape_error>(grads.b_dec.size() == std::size_t(m.d_model()), "b_dec gradient has shape [",
                       grads.b_dec.size(), "], expected [", m.d_model(), "] (d_model)");
}

template <class T, int F, class S>
void run_schedule_loss(const cuda_backend& be, const device_sae<T, F>& m,
                       device_matrix_view<const std::type_identity_t<T>> x, const device_code& code, const S& schedule,
                       device_gradients<F>* grads, device_loss_workspace& ws) {
  check_loss_shapes(m, x, code, schedule.k_max());
  const int B = x.rows, D = m.d_model(), kc = code.k();
  ws.schedule.assign(be, schedule);
  ws.residual.resize(be, B, D);
  ws.level_sse.resize(be, schedule.size());
  ws.loss.resize(be, 1);
  schedule_loss_args<T> a;
  a.x = x.data;
  a.b_dec = m.b_dec.data();
  a.W_dec = m.dec_storage();
  a.values = code.values.data();
  a.indices = code.indices.data();
  a.omega = ws.schedule.omega();
  a.level_of = ws.schedule.level_of();
  a.B = B;
  a.D = D;
  a.F = m.d_sae();
  a.K = schedule.k_max();
  a.kc = kc;
  a.levels = int(schedule.size());
  a.residual = ws.residual.data();
  a.level_sse = ws.level_sse.data();
  a.loss = ws.loss.data();
  a.deterministic = be.deterministic;
  a.staging_bytes = ws.staging_bytes;
  if (grads != nullptr) {
    ::hsae::detail::expect_shape("W_dec gradient", grads->W_dec.rows(), grads->W_dec.cols(), m.d_sae(), D);
    ::hsae::detail::expects<shape_error>(grads->b_dec.size() == std::size_t(D), "b_dec gradient has shape [",
                                         grads->b_dec.size(), "], expected [", D, "] (d_model)");
    ws.grad_values.resize(be, B, kc);
    a.backward = true;
    a.grad_values = ws.grad_values.data();
    a.gW_dec = grads->W_dec.data();
    a.gb_dec = grads->b_dec.data();
  }
  const std::size_t bytes = schedule_loss_workspace_bytes(a);
  schedule_loss(a, ws.scratch.get(be, bytes), bytes, be.stream());
}

}  // namespace cuda::detail

/// The schedule loss (forward only): per-level squared errors into `ws.level_sse`, the
/// loss into `ws.loss`, x - xhat_K into `ws.residual`. Asynchronous; read the results
/// with `read_loss_stats`.
/// \throws hsae::shape_error / hsae::config_error on inconsistent shapes or a code with
///         fewer than k_max columns. Latent indices must lie in [0, d_sae) (as the
///         top-k writes them; entries outside are ignored, never read out of bounds).
template <class T, int F, k_schedule_like S>
void hierarchical_loss(const cuda_backend& be, const device_sae<T, F>& m,
                       device_matrix_view<const std::type_identity_t<T>> x, const device_code& code, const S& schedule,
                       device_loss_workspace& ws) {
  cuda::detail::run_schedule_loss(be, m, x, code, schedule, static_cast<device_gradients<F>*>(nullptr), ws);
}

/// The schedule loss and its decoder-side backward: adds dL/dW_dec to `grads.W_dec` and
/// the decoder-side dL/db_dec to `grads.b_dec`; leaves dL/dv [B, code.k()] in
/// `ws.grad_values` (zero beyond k_max) and x - xhat_K in `ws.residual`. Follow with
/// `encoder_backward(be, m, x, code, ws.grad_values.view(), grads, ws.scratch)`.
template <class T, int F, k_schedule_like S>
void hierarchical_loss_backward(const cuda_backend& be, const device_sae<T, F>& m,
                                device_matrix_view<const std::type_identity_t<T>> x, const device_code& code,
                                const S& schedule, device_gradients<F>& grads, device_loss_workspace& ws) {
  cuda::detail::run_schedule_loss(be, m, x, code, schedule, &grads, ws);
}

/// Sparse encoder backward: with `dpre_{b,t} = grad_values(b,t)` where
/// `code.values(b,t) > 0` and 0 elsewhere, adds `W_enc[f] += sum dpre (x_b - b_dec)`,
/// `b_enc[f] += sum dpre` and `b_dec -= sum dpre W_enc[f]` (W_enc as the GEMM read it:
/// the storage copy). Only the B*k selected pairs are visited.
template <class T, int F>
void encoder_backward(const cuda_backend& be, const device_sae<T, F>& m,
                      device_matrix_view<const std::type_identity_t<T>> x, const device_code& code,
                      device_matrix_view<const float> grad_values, device_gradients<F>& grads,
                      device_scratch& scratch) {
  using ::hsae::detail::expects;
  cuda::detail::check_loss_shapes(m, x, code, 1);
  ::hsae::detail::expect_shape("grad_values", grad_values.rows, grad_values.cols, code.rows(), code.k());
  ::hsae::detail::expect_shape("W_enc gradient", grads.W_enc.rows(), grads.W_enc.cols(), m.d_sae(), m.d_model());
  cuda::detail::check_bias_gradients(m, grads);
  expects<shape_error>(std::int64_t(code.rows()) * code.k() <= std::int64_t(INT32_MAX),
                       "B*k=", std::int64_t(code.rows()) * code.k(), " pairs exceed 2^31-1");
  cuda::detail::encoder_backward_args<T> a;
  a.x = x.data;
  a.b_dec = m.b_dec.data();
  a.W_enc = m.enc_storage();
  a.values = code.values.data();
  a.indices = code.indices.data();
  a.grad_values = grad_values.data;
  a.B = x.rows;
  a.D = m.d_model();
  a.F = m.d_sae();
  a.kc = code.k();
  a.gW_enc = grads.W_enc.data();
  a.gb_enc = grads.b_enc.data();
  a.gb_dec = grads.b_dec.data();
  a.deterministic = be.deterministic;
  const std::size_t bytes = cuda::detail::encoder_backward_workspace_bytes(a);
  cuda::detail::encoder_backward(a, nullptr, scratch.get(be, bytes), bytes, be.stream());
}

/// Copies the loss results of the last call to the host, as the CPU's `loss_stats`.
/// Synchronises be.stream().
inline loss_stats read_loss_stats(const cuda_backend& be, const device_loss_workspace& ws) {
  loss_stats st;
  const std::size_t levels = ws.schedule.size();
  st.level_k.resize(levels);
  st.level_sse.assign(levels, 0.0);
  for (std::size_t l = 0; l < levels; ++l) st.level_k[l] = ws.schedule.k(l);
  st.rows = ws.residual.rows();
  st.d_model = ws.residual.cols();
  if (levels > 0) {
    HSAE_CUDA_TRY(cudaMemcpyAsync(st.level_sse.data(), ws.level_sse.data(), levels * sizeof(double),
                                  cudaMemcpyDeviceToHost, be.stream()));
    HSAE_CUDA_TRY(cudaMemcpyAsync(&st.loss, ws.loss.data(), sizeof(double), cudaMemcpyDeviceToHost, be.stream()));
  }
  be.synchronize();
  return st;
}

HSAE_NAMESPACE_END
