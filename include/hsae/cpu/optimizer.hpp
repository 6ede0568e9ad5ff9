// SPDX-License-Identifier: Apache-2.0
/// \file cpu/optimizer.hpp
/// Adam with the SAE decoder constraint (docs/OBJECTIVE.md) on the CPU: before the update
/// each decoder row's gradient loses its component along the row, after it each row is
/// scaled back to unit norm. Learning rate: linear warm-up, then optional linear decay
/// (adam_options); optional global-norm gradient clipping.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../matrix.hpp"
#include "../model.hpp"
#include "../optimizer.hpp"
#include "backend.hpp"

HSAE_NAMESPACE_BEGIN

/// Removes from each decoder row's gradient its component along the row:
/// `g_f -= <g_f, e_f> e_f` (exact for unit rows; the row's norm is used otherwise).
template <cpu_scalar T, int F>
void project_decoder_gradient(const cpu_backend& be, const sae<T, F>& m, sae_gradients<T, F>& g) {
  cpu::detail::parallel_for(be, m.W_dec.rows(), [&](std::ptrdiff_t f) {
    const auto e = m.W_dec.row(f);
    const T n2 = e.squaredNorm();
    if (n2 > T(0)) g.W_dec.row(f) -= (g.W_dec.row(f).dot(e) / n2) * e;
  });
}

/// Global L2 norm of all gradients (summed per row, then in index order: deterministic).
/// `rows` is scratch (resized; no allocation once it has the capacity).
template <cpu_scalar T, int F>
double gradient_norm(const cpu_backend& be, const sae_gradients<T, F>& g, std::vector<double>& rows) {
  rows.resize(std::size_t(g.W_enc.rows()));
  cpu::detail::parallel_for(be, g.W_enc.rows(), [&](std::ptrdiff_t f) {
    rows[std::size_t(f)] = double(g.W_enc.row(f).squaredNorm()) + double(g.W_dec.row(f).squaredNorm());
  });
  double s = double(g.b_enc.squaredNorm()) + double(g.b_dec.squaredNorm());
  for (double r : rows) s += r;
  return std::sqrt(s);
}

template <cpu_scalar T, int F>
double gradient_norm(const cpu_backend& be, const sae_gradients<T, F>& g) {
  std::vector<double> rows;
  return gradient_norm(be, g, rows);
}

namespace cpu::detail {

/// Adam's update of step `t` (counted from 1) at learning rate `lr`, the gradient scaled by
/// `clip`: `w -= lr * (m / bc1) / (sqrt(v / bc2) + eps)` on arrays of weights, gradients and
/// moments (Eigen array expressions, updated in place). `adam::step` and the distributed
/// step use this one rule.
template <class T>
struct adam_rule {
  T b1, b2, eps, gs, step_size, inv_sqrt_bc2;

  adam_rule(const adam_options& o, std::int64_t t, double lr, double clip)
      : b1(T(o.beta1)), b2(T(o.beta2)), eps(T(o.eps)), gs(T(clip)) {
    const double bc1 = 1.0 - std::pow(o.beta1, double(t));
    const double bc2 = 1.0 - std::pow(o.beta2, double(t));
    step_size = T(lr / bc1);
    inv_sqrt_bc2 = T(1.0 / std::sqrt(bc2));
  }
  template <class W, class G, class M, class V>
  void operator()(W w, G gr, M mm, V vv) const {
    mm = b1 * mm + (T(1) - b1) * gs * gr;
    vv = b2 * vv + (T(1) - b2) * (gs * gr).square();
    w -= step_size * mm / (vv.sqrt() * inv_sqrt_bc2 + eps);
  }
};

}  // namespace cpu::detail

/// Adam on the CPU for one `sae<T, F>`: the state (`adam_state`) and the update.
template <cpu_scalar T, int F = dynamic>
class adam : public adam_state<T, F> {
 public:
  adam() = default;
  /// Zero moments shaped like `m`. \throws hsae::config_error if `opt` is invalid.
  adam(const sae<T, F>& m, adam_options opt) : adam_state<T, F>(m, opt) {}

  /// One step: optional decoder-gradient projection, optional global-norm clipping,
  /// the Adam update of every parameter, then decoder row renormalisation; the W_enc
  /// and W_dec rows of a latent are updated in one pass. `g` is modified (projected,
  /// clipped). Returns the gradient norm before clipping (after projection).
  /// \throws hsae::shape_error if the gradients do not match the model,
  ///         hsae::numeric_error if the gradient norm is not finite.
  double step(const cpu_backend& be, sae<T, F>& m, sae_gradients<T, F>& g) {
    detail::expect_shape("W_enc gradient", g.W_enc.rows(), g.W_enc.cols(), m.W_enc.rows(), m.W_enc.cols());
    detail::expect_shape("W_dec gradient", g.W_dec.rows(), g.W_dec.cols(), m.W_dec.rows(), m.W_dec.cols());
    detail::expect_shape("Adam state", m_.W_enc.rows(), m_.W_enc.cols(), m.W_enc.rows(), m.W_enc.cols());
    detail::expects<shape_error>(g.b_enc.size() == m.b_enc.size() && g.b_dec.size() == m.b_dec.size(),
                                 "bias gradients do not match the model");
    if (opt_.project_decoder_gradient) project_decoder_gradient(be, m, g);
    const double norm = gradient_norm(be, g, norm_rows_);
    detail::expects<numeric_error>(std::isfinite(norm), "adam: the gradient norm is not finite (", norm,
                                   "); the step was not applied");
    double clip = 1.0;
    if (opt_.max_grad_norm > 0 && norm > opt_.max_grad_norm) clip = opt_.max_grad_norm / norm;

    detail::expects<config_error>(t_ < std::numeric_limits<std::int64_t>::max(), "adam: step count ", t_,
                                  " cannot grow further");
    const double lr = opt_.lr_at(t_, m.d_sae());
    ++t_;
    const cpu::detail::adam_rule<T> update(opt_, t_, lr, clip);
    cpu::detail::parallel_for(be, m.W_dec.rows(), [&](std::ptrdiff_t f) {
      update(m.W_enc.row(f).array(), g.W_enc.row(f).array(), m_.W_enc.row(f).array(), v_.W_enc.row(f).array());
      update(m.W_dec.row(f).array(), g.W_dec.row(f).array(), m_.W_dec.row(f).array(), v_.W_dec.row(f).array());
      if (opt_.normalize_decoder) {
        const T n = m.W_dec.row(f).norm();
        if (n > T(0)) m.W_dec.row(f) /= n;
      }
    });
    update(m.b_enc.array(), g.b_enc.array(), m_.b_enc.array(), v_.b_enc.array());
    update(m.b_dec.array(), g.b_dec.array(), m_.b_dec.array(), v_.b_dec.array());
    last_lr_ = lr;
    return norm;
  }

 private:
  using adam_state<T, F>::opt_;
  using adam_state<T, F>::m_;
  using adam_state<T, F>::v_;
  using adam_state<T, F>::t_;
  using adam_state<T, F>::last_lr_;
  /// gradient_norm's per-latent partials, kept so that a step does not allocate.
  std::vector<double> norm_rows_;
};

HSAE_NAMESPACE_END
