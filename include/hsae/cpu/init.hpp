// SPDX-License-Identifier: Apache-2.0
/// \file cpu/init.hpp
/// The initialisation recipe of docs/OBJECTIVE.md on the host (`init`), with its pieces:
/// the geometric median of a sample (b_dec) and unit-norm decoder rows. Every backend
/// initialises here: the GPU trainer initialises the host model, then uploads it.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../matrix.hpp"
#include "../model.hpp"
#include "../rng.hpp"
#include "backend.hpp"

HSAE_NAMESPACE_BEGIN

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
