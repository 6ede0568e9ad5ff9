// SPDX-License-Identifier: Apache-2.0
/// \file cuda/auxk.cuh
/// AuxK (Gao et al. 2024) on the GPU, the counterpart of cpu/auxk.hpp. The CPU function
/// selects the top-k_aux pre-activations among dead latents itself; here that code comes
/// from the GPU top-k (its AuxK output over the dead-latent mask of a
/// `device_dead_latent_tracker`), and this header turns it into the loss and gradients.
/// Kernel design: cuda/detail/auxk.cuh.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../config.hpp"
#include "../error.hpp"
#include "../step_types.hpp"
#include "backend.cuh"
#include "dead_latents.cuh"
#include "detail/auxk.cuh"
#include "loss.cuh"
#include "memory.cuh"
#include "model.cuh"

HSAE_NAMESPACE_BEGIN

/// Buffers of `auxk_backward`, reused across calls.
struct device_auxk_workspace {
  /// dL_aux/dv [B, k] of the AuxK code.
  device_matrix<float> grad_values;
  /// The scaled AuxK loss [1].
  device_buffer<double> loss;
  device_scratch scratch;
};

namespace cuda::detail {

template <class T, int F>
void run_auxk_backward(const cuda_backend& be, const device_sae<T, F>& m,
                       device_matrix_view<const std::type_identity_t<T>> x, const device_code& aux_code,
                       device_matrix_view<const float> residual, std::int64_t n_dead, const int* n_dead_device,
                       const auxk_options& opt, device_gradients<F>& grads, device_auxk_workspace& ws) {
  using ::hsae::detail::expects;
  opt.validate();
  m.check_shapes();
  const int D = m.d_model();
  expects<shape_error>(x.cols == D && x.rows >= 1, "the batch has shape [", x.rows, ", ", x.cols,
                       "], expected [B >= 1, d_model=", D, "]");
  ::hsae::detail::expect_shape("residual", residual.rows, residual.cols, x.rows, D);
  expects<shape_error>(aux_code.rows() == x.rows, "the AuxK code has ", aux_code.rows(), " rows but the batch has ",
                       x.rows);
  expects<shape_error>(
      aux_code.indices.rows() == aux_code.values.rows() && aux_code.indices.cols() == aux_code.values.cols(),
      "the AuxK code's values and indices differ in shape");
  ::hsae::detail::expect_shape("W_dec gradient", grads.W_dec.rows(), grads.W_dec.cols(), m.d_sae(), D);
  ::hsae::detail::expect_shape("W_enc gradient", grads.W_enc.rows(), grads.W_enc.cols(), m.d_sae(), D);
  check_bias_gradients(m, grads);
  ws.grad_values.resize(be, x.rows, aux_code.k());
  ws.loss.resize(be, 1);
  cuda::detail::auxk_args<T> a;
  a.residual = residual.data;
  a.x = x.data;
  a.b_dec = m.b_dec.data();
  a.W_enc = m.enc_storage();
  a.W_dec = m.dec_storage();
  a.values = aux_code.values.data();
  a.indices = aux_code.indices.data();
  a.B = x.rows;
  a.D = D;
  a.F = m.d_sae();
  a.ka = aux_code.k();
  a.n_dead = n_dead;
  a.n_dead_device = n_dead_device;
  a.k_aux = opt.resolved_k_aux(D);
  a.alpha = opt.alpha;
  a.grad_values = ws.grad_values.data();
  a.gW_dec = grads.W_dec.data();
  a.gW_enc = grads.W_enc.data();
  a.gb_enc = grads.b_enc.data();
  a.gb_dec = grads.b_dec.data();
  a.loss = ws.loss.data();
  a.deterministic = be.deterministic;
  const std::size_t bytes = cuda::detail::auxk_workspace_bytes(a);
  cuda::detail::auxk_loss_backward(a, ws.scratch.get(be, bytes), bytes, be.stream());
}

}  // namespace cuda::detail

/// Adds the AuxK loss's gradients to `grads` and writes the loss (scaled by alpha and
/// min(n_dead / k_aux, 1); 0 with no dead latents, alpha == 0, or a zero-variance
/// residual) to `ws.loss`. Asynchronous; `read_auxk_loss` fetches the value.
///
/// \param aux_code  per row the top-k pre-activations among the dead latents, descending,
///                  indices = latent ids; k between min(k_aux, n_dead) and k_aux, a row's
///                  slots beyond the dead latents holding index -1 and value 0.
/// \param residual  x - xhat_K [B, d_model] (`device_loss_workspace::residual`).
/// \param n_dead    the number of dead latents the code was selected from (host value,
///                  e.g. `device_dead_latent_tracker::num_dead`).
/// \throws hsae::shape_error / hsae::config_error on inconsistent shapes or options.
template <class T, int F>
void auxk_backward(const cuda_backend& be, const device_sae<T, F>& m,
                   device_matrix_view<const std::type_identity_t<T>> x, const device_code& aux_code,
                   device_matrix_view<const float> residual, std::int64_t n_dead, const auxk_options& opt,
                   device_gradients<F>& grads, device_auxk_workspace& ws) {
  cuda::detail::run_auxk_backward(be, m, x, aux_code, residual, n_dead, nullptr, opt, grads, ws);
}

/// As above with the dead count read on the device from `dead` (its count after its last
/// update), so that nothing synchronises: `aux_code` is the AuxK output of
/// `topk_with_auxk` over `dead.dead_mask()` with k_aux' = min(k_aux, d_sae) columns
/// (enough for any dead count; slots beyond a row's dead latents hold -1 / 0). With no
/// dead latent at run time the loss is 0 and nothing is added, as on the CPU.
/// \throws as above, and hsae::shape_error unless the code has min(k_aux, d_sae) columns
///         and the tracker's width is d_sae.
template <class T, int F>
void auxk_backward(const cuda_backend& be, const device_sae<T, F>& m,
                   device_matrix_view<const std::type_identity_t<T>> x, const device_code& aux_code,
                   device_matrix_view<const float> residual, const device_dead_latent_tracker& dead,
                   const auxk_options& opt, device_gradients<F>& grads, device_auxk_workspace& ws) {
  ::hsae::detail::expects<shape_error>(dead.d_sae() == m.d_sae(), "auxk: the dead-latent tracker has ", dead.d_sae(),
                                       " latents, the model d_sae=", m.d_sae());
  cuda::detail::run_auxk_backward(be, m, x, aux_code, residual, 0, dead.num_dead_device(), opt, grads, ws);
}

/// The AuxK loss of the last `auxk_backward` call. Synchronises be.stream().
inline double read_auxk_loss(const cuda_backend& be, const device_auxk_workspace& ws) {
  ::hsae::detail::expects<config_error>(ws.loss.size() == 1, "read_auxk_loss: auxk_backward has not run");
  double v = 0;
  HSAE_CUDA_TRY(cudaMemcpyAsync(&v, ws.loss.data(), sizeof(double), cudaMemcpyDeviceToHost, be.stream()));
  be.synchronize();
  return v;
}

HSAE_NAMESPACE_END
