// SPDX-License-Identifier: Apache-2.0
/// \file cuda/optimizer.cuh
/// Adam with the SAE decoder constraint on the GPU, the counterpart of cpu/optimizer.hpp
/// (same options, same learning-rate schedule, same arithmetic in fp32). Kernel design:
/// cuda/detail/adam.cuh.
///
/// One difference from the CPU: a step cannot throw when the gradient norm is not
/// finite without synchronising. Instead the step leaves the model and the moments
/// unchanged on the device, and `check_last_step` (which synchronises) throws the CPU's
/// hsae::numeric_error and takes the step back from the step count.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../config.hpp"
#include "../error.hpp"
#include "../optimizer.hpp"
#include "backend.cuh"
#include "detail/adam.cuh"
#include "memory.cuh"
#include "model.cuh"

HSAE_NAMESPACE_BEGIN

/// Adam state for one `device_sae<T, F>`: fp32 first and second moments of every
/// parameter, on the device.
template <class T = float, int F = dynamic>
requires cuda_storage<T>
class device_adam {
 public:
  device_adam() = default;
  /// Zero moments shaped like `m`. Asynchronous.
  /// \throws hsae::config_error if `opt` is invalid.
  device_adam(const cuda_backend& be, const device_sae<T, F>& m, adam_options opt) : opt_(opt) {
    opt_.validate();
    m_.zeros_like(be, m);
    v_.zeros_like(be, m);
    norm_.resize(be, 1);
    HSAE_CUDA_TRY(cudaMemsetAsync(norm_.data(), 0, sizeof(double), be.stream()));
  }

  /// One step: optional decoder-gradient projection (written back into `g`, as on the
  /// CPU), the global gradient norm (after projection; optional clipping), Adam on every
  /// parameter, decoder rows renormalised, storage copies of W_enc / W_dec refreshed.
  /// Asynchronous; the gradient norm lands in `norm_device()`.
  ///
  /// \param reject  optional device flag read when the step runs: nonzero means the step
  ///                 changes nothing (model, moments, storage copies), as a non-finite
  ///                 gradient norm does. `train_step` passes its finite check of the batch;
  ///                 whoever sets it reports the rejection and calls `discard_last_step`.
  /// \throws hsae::shape_error if the gradients or the state do not match the model.
  void step(const cuda_backend& be, device_sae<T, F>& m, device_gradients<F>& g, const int* reject = nullptr) {
    using ::hsae::detail::expect_shape;
    using ::hsae::detail::expects;
    m.check_shapes();
    const int Fw = m.d_sae(), D = m.d_model();
    expect_shape("W_enc gradient", g.W_enc.rows(), g.W_enc.cols(), Fw, D);
    expect_shape("W_dec gradient", g.W_dec.rows(), g.W_dec.cols(), Fw, D);
    expect_shape("Adam state", m_.W_enc.rows(), m_.W_enc.cols(), Fw, D);
    expects<shape_error>(g.b_enc.size() == std::size_t(Fw) && g.b_dec.size() == std::size_t(D),
                         "bias gradients do not match the model");
    const double lr = opt_.lr_at(t_, Fw);
    ++t_;
    const double bc1 = 1.0 - std::pow(opt_.beta1, double(t_));
    const double bc2 = 1.0 - std::pow(opt_.beta2, double(t_));
    cuda::detail::adam_step_constants h;
    h.beta1 = float(opt_.beta1);
    h.beta2 = float(opt_.beta2);
    h.eps = float(opt_.eps);
    h.step_size = float(lr / bc1);
    h.inv_sqrt_bc2 = float(1.0 / std::sqrt(bc2));
    h.max_grad_norm = opt_.max_grad_norm;
    h.project_decoder_gradient = opt_.project_decoder_gradient;
    h.normalize_decoder = opt_.normalize_decoder;

    cuda::detail::adam_args<T> a;
    a.F = Fw;
    a.D = D;
    a.W_enc = m.W_enc.data();
    a.W_dec = m.W_dec.data();
    a.b_enc = m.b_enc.data();
    a.b_dec = m.b_dec.data();
    if constexpr (!std::is_same_v<T, float>) {
      a.W_enc_s = m.W_enc_s.data();
      a.W_dec_s = m.W_dec_s.data();
    }
    a.gW_enc = g.W_enc.data();
    a.gW_dec = g.W_dec.data();
    a.gb_enc = g.b_enc.data();
    a.gb_dec = g.b_dec.data();
    a.mW_enc = m_.W_enc.data();
    a.vW_enc = v_.W_enc.data();
    a.mW_dec = m_.W_dec.data();
    a.vW_dec = v_.W_dec.data();
    a.mb_enc = m_.b_enc.data();
    a.vb_enc = v_.b_enc.data();
    a.mb_dec = m_.b_dec.data();
    a.vb_dec = v_.b_dec.data();
    a.norm = norm_.data();
    a.reject = reject;
    const std::size_t bytes = cuda::detail::adam_workspace_bytes(Fw);
    if (bytes > scratch_.size()) scratch_.resize(be, bytes);
    cuda::detail::adam_step(a, h, scratch_.data(), bytes, be.stream());
    prev_lr_ = last_lr_;
    last_lr_ = lr;
    discarded_ = false;
  }

  /// The gradient norm of the last step (before clipping). Synchronises be.stream().
  double last_norm(const cuda_backend& be) const {
    double n = 0;
    HSAE_CUDA_TRY(cudaMemcpyAsync(&n, norm_.data(), sizeof(double), cudaMemcpyDeviceToHost, be.stream()));
    be.synchronize();
    return n;
  }
  /// Synchronises; if the last step's gradient norm was not finite (the step was not
  /// applied), takes it back from the step count and throws hsae::numeric_error.
  /// Returns the norm otherwise.
  double check_last_step(const cuda_backend& be) {
    const double n = last_norm(be);
    if (!std::isfinite(n) && t_ > 0) {
      discard_last_step();
      ::hsae::detail::throw_error<numeric_error>("adam: the gradient norm is not finite (", n,
                                                 "); the step was not applied");
    }
    return n;
  }
  /// Takes the last step back from the step count and restores the previous learning
  /// rate (`last_lr`), for a step that was not applied on the device (non-finite norm or
  /// a set `reject` flag). The caller knows it was not applied; nothing synchronises.
  /// Acts once per step: later calls before the next step (e.g. `check_last_step` after
  /// `read_step_stats` reported the same step) change nothing.
  void discard_last_step() {
    if (t_ > 0 && !discarded_) {
      --t_;
      last_lr_ = prev_lr_;
      discarded_ = true;
    }
  }
  /// Device scalar holding the last gradient norm.
  const double* norm_device() const { return norm_.data(); }

  /// Restores a checkpointed state (host moments, as the CPU `adam` keeps them; the step
  /// count and the last learning rate as `adam::set_state`). Asynchronous.
  /// \throws hsae::shape_error if the moments do not match the state.
  template <int G>
  void set_state(const cuda_backend& be, std::int64_t steps, const sae_gradients<float, G>& m1,
                 const sae_gradients<float, G>& m2, double last_lr = 0) {
    upload_moment(be, m1, m_);
    upload_moment(be, m2, v_);
    t_ = steps;
    last_lr_ = prev_lr_ = last_lr;
    discarded_ = false;
  }
  /// Copies the moments to the host. Synchronises be.stream().
  template <int G>
  void get_state(const cuda_backend& be, sae_gradients<float, G>& m1, sae_gradients<float, G>& m2) const {
    download_moment(be, m_, m1);
    download_moment(be, v_, m2);
  }

  std::int64_t steps() const { return t_; }
  double last_lr() const { return last_lr_; }
  const adam_options& options() const { return opt_; }
  const device_gradients<F>& first_moment() const { return m_; }
  const device_gradients<F>& second_moment() const { return v_; }

 private:
  template <int G>
  static void upload_moment(const cuda_backend& be, const sae_gradients<float, G>& h, device_gradients<F>& d) {
    ::hsae::detail::expect_shape("moment W_enc", h.W_enc.rows(), h.W_enc.cols(), d.W_enc.rows(), d.W_enc.cols());
    ::hsae::detail::expect_shape("moment W_dec", h.W_dec.rows(), h.W_dec.cols(), d.W_dec.rows(), d.W_dec.cols());
    ::hsae::detail::expects<shape_error>(
        std::size_t(h.b_enc.size()) == d.b_enc.size() && std::size_t(h.b_dec.size()) == d.b_dec.size(),
        "moment biases do not match the state");
    copy_to_device(be, cref<float>(h.W_enc), d.W_enc);
    copy_to_device(be, cref<float>(h.W_dec), d.W_dec);
    copy_to_device(be, cvref<float>(h.b_enc), d.b_enc);
    copy_to_device(be, cvref<float>(h.b_dec), d.b_dec);
  }
  template <int G>
  static void download_moment(const cuda_backend& be, const device_gradients<F>& d, sae_gradients<float, G>& h) {
    row_matrix<float> w;
    copy_to_host(be, d.W_enc, w);
    h.W_enc = w;
    copy_to_host(be, d.W_dec, w);
    h.W_dec = w;
    vector<float> b;
    copy_to_host(be, d.b_enc, b);
    h.b_enc = b;
    copy_to_host(be, d.b_dec, b);
    h.b_dec = b;
  }

  adam_options opt_{};
  device_gradients<F> m_, v_;
  device_buffer<double> norm_;
  device_buffer<unsigned char> scratch_;
  std::int64_t t_ = 0;
  double last_lr_ = 0;
  double prev_lr_ = 0;     ///< last_lr_ before the last step (discard_last_step)
  bool discarded_ = false;  ///< the last step was taken back already
};

HSAE_NAMESPACE_END
