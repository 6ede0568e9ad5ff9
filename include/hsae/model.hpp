// SPDX-License-Identifier: Apache-2.0
/// \file model.hpp
/// The SAE parameters, their gradients, and the initialisation recipe of docs/OBJECTIVE.md.
///
/// Layout (docs/OBJECTIVE.md notation): `W_enc [F, D]` (row f = latent f's encoder vector),
/// `b_enc [F]`, `W_dec [F, D]` (row f = atom e_f, unit L2 norm), `b_dec [D]`.
/// Forward: `pre = ReLU((x - b_dec) W_enc^T + b_enc)`, sorted top-k, and
/// `x_hat = b_dec + sum_t v_t W_dec[i_t]` (see cpu/encode.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "config.hpp"
#include "cpu/backend.hpp"
#include "error.hpp"
#include "matrix.hpp"
#include "rng.hpp"

HSAE_NAMESPACE_BEGIN

/// The parameters of one sparse autoencoder.
///
/// \tparam T  storage and arithmetic precision on the CPU (float or double).
/// \tparam F  dictionary width d_sae fixed at compile time, or hsae::dynamic. A fixed
///            width becomes the compile-time row count of the weight matrices.
template <cpu_scalar T, int F = dynamic>
struct sae {
  static_assert(F == dynamic || F >= 1, "hsae::sae: the dictionary width F must be >= 1 or hsae::dynamic");
  using scalar = T;
  static constexpr int static_d_sae = F;
  /// [F, D] row-major.
  using weight_matrix = row_matrix<T, F>;

  weight_matrix W_enc;
  vector<T> b_enc;
  weight_matrix W_dec;
  vector<T> b_dec;

  sae() = default;
  /// Zero-initialised parameters; see `init` for the training recipe.
  /// \throws hsae::config_error on a non-positive width, or d_sae != F for a fixed F.
  explicit sae(int d_model, int d_sae = F) { resize(d_model, d_sae); }

  void resize(int d_model, int d_sae = F) {
    detail::expects<config_error>(d_model >= 1, "d_model must be >= 1, got ", d_model);
    detail::expects<config_error>(d_sae >= 1, "d_sae must be >= 1, got ", d_sae);
    detail::expects<config_error>(F == dynamic || d_sae == F, "d_sae=", d_sae,
                                  " differs from the compile-time dictionary width F=", F);
    W_enc.setZero(d_sae, d_model);
    W_dec.setZero(d_sae, d_model);
    b_enc.setZero(d_sae);
    b_dec.setZero(d_model);
  }

  int d_model() const { return int(W_dec.cols()); }
  int d_sae() const {
    if constexpr (F != dynamic) return F;
    else return int(W_dec.rows());
  }

  /// \throws hsae::shape_error if the four tensors do not agree.
  void check_shapes() const {
    const auto f = W_dec.rows(), d = W_dec.cols();
    detail::expect_shape("W_enc", W_enc.rows(), W_enc.cols(), f, d);
    detail::expects<shape_error>(b_enc.size() == f, "b_enc has ", b_enc.size(), " entries, expected d_sae=", f);
    detail::expects<shape_error>(b_dec.size() == d, "b_dec has ", b_dec.size(), " entries, expected d_model=", d);
  }
};

/// Gradients of the loss with respect to every parameter of an `sae<T, F>`.
template <cpu_scalar T, int F = dynamic>
struct sae_gradients {
  typename sae<T, F>::weight_matrix W_enc;
  vector<T> b_enc;
  typename sae<T, F>::weight_matrix W_dec;
  vector<T> b_dec;

  /// Shapes like `m`, every entry zero.
  void zeros_like(const sae<T, F>& m, const cpu_backend& be = {}) {
    W_enc.resize(m.W_enc.rows(), m.W_enc.cols());
    W_dec.resize(m.W_dec.rows(), m.W_dec.cols());
    b_enc.setZero(m.b_enc.size());
    b_dec.setZero(m.b_dec.size());
    cpu::detail::parallel_blocks(be, W_enc.rows(), 256, [&](std::ptrdiff_t lo, std::ptrdiff_t hi) {
      W_enc.middleRows(lo, hi - lo).setZero();
      W_dec.middleRows(lo, hi - lo).setZero();
    });
  }
};

/// How `init` chooses b_dec.
enum class decoder_bias_init { geometric_median, mean, zero };

struct init_options {
  std::uint64_t seed = 0;
  decoder_bias_init b_dec = decoder_bias_init::geometric_median;
  /// Weiszfeld iterations and relative tolerance for the geometric median.
  int median_max_iter = 100;
  double median_tol = 1e-7;
};

/// Geometric median of the rows of `points` [N, D] by Weiszfeld's algorithm, computed
/// in double from the mean as starting point. Stops after `max_iter` iterations or
/// when the update moves less than `tol` times the typical spread. A point that
/// coincides with the estimate is skipped in that iteration (the usual safeguard).
/// \throws hsae::shape_error on an empty sample, hsae::numeric_error on non-finite data.
template <cpu_scalar T>
vector<T> geometric_median(const cpu_backend& be, cref<T> points, int max_iter = 100, double tol = 1e-7) {
  const auto n = points.rows(), d = points.cols();
  detail::expects<shape_error>(n >= 1 && d >= 1, "geometric_median: the sample is empty ([", n, ", ", d, "])");
  detail::expect_finite("geometric_median sample", points);
  const Eigen::MatrixXd p = points.template cast<double>();
  Eigen::VectorXd y = p.colwise().mean().transpose();
  const double spread = std::sqrt((p.rowwise() - y.transpose()).rowwise().squaredNorm().mean()) + 1e-300;
  std::vector<double> w(static_cast<std::size_t>(n));
  for (int it = 0; it < max_iter; ++it) {
    cpu::detail::parallel_for(be, n, [&](std::ptrdiff_t i) {
      const double dist = (p.row(i).transpose() - y).norm();
      w[std::size_t(i)] = dist > 1e-12 * spread ? 1.0 / dist : 0.0;
    });
    double wsum = 0;
    Eigen::VectorXd num = Eigen::VectorXd::Zero(d);
    for (Eigen::Index i = 0; i < n; ++i) {  // fixed order: deterministic
      wsum += w[std::size_t(i)];
      num.noalias() += w[std::size_t(i)] * p.row(i).transpose();
    }
    if (wsum == 0) break;
    const Eigen::VectorXd next = num / wsum;
    const double move = (next - y).norm();
    y = next;
    if (move <= tol * spread) break;
  }
  return y.cast<T>();
}

/// Scales every decoder row to unit L2 norm (a zero row is left as is).
template <cpu_scalar T, int F>
void normalize_decoder_rows(const cpu_backend& be, sae<T, F>& m) {
  cpu::detail::parallel_for(be, m.W_dec.rows(), [&](std::ptrdiff_t f) {
    const T n = m.W_dec.row(f).norm();
    if (n > T(0)) m.W_dec.row(f) /= n;
  });
}

/// The initialisation recipe of docs/OBJECTIVE.md: decoder rows drawn N(0, 1) and scaled to
/// unit norm, `W_enc = W_dec`, `b_enc = 0`, and `b_dec` the geometric median (or mean,
/// or zero) of `sample` [N, d_model]. Deterministic for a given seed on every platform.
/// \throws hsae::shape_error if the sample width is not d_model (or it is empty when
///         b_dec needs it), hsae::numeric_error if it holds NaN/Inf.
template <cpu_scalar T, int F>
void init(const cpu_backend& be, sae<T, F>& m, cref<T> sample, const init_options& opt = {}) {
  m.check_shapes();
  rng gen(opt.seed);
  for (Eigen::Index f = 0; f < m.W_dec.rows(); ++f)
    for (Eigen::Index j = 0; j < m.W_dec.cols(); ++j) m.W_dec(f, j) = T(gen.normal());
  normalize_decoder_rows(be, m);
  m.W_enc = m.W_dec;
  m.b_enc.setZero();
  if (opt.b_dec == decoder_bias_init::zero) {
    m.b_dec.setZero();
    return;
  }
  detail::expects<shape_error>(sample.cols() == m.d_model(), "init: the sample has width ", sample.cols(),
                               ", expected d_model=", m.d_model());
  detail::expects<shape_error>(sample.rows() >= 1, "init: the sample for b_dec is empty");
  detail::expect_finite("init sample", sample);
  if (opt.b_dec == decoder_bias_init::mean)
    m.b_dec = sample.template cast<double>().colwise().mean().transpose().template cast<T>();
  else
    m.b_dec = geometric_median<T>(be, sample, opt.median_max_iter, opt.median_tol);
}

HSAE_NAMESPACE_END
