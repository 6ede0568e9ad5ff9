// SPDX-License-Identifier: Apache-2.0
/// \file cpu/auxk.hpp
/// AuxK (Gao et al. 2024) as docs/OBJECTIVE.md defines it: the top-k_aux pre-activations
/// among dead latents reconstruct the main residual e = x - xhat_K (detached), decoded
/// *without* b_dec; the loss is that reconstruction's squared error over the residual's
/// total variance sum_b ||e_b - mean(e)||^2, times alpha, times min(n_dead / k_aux, 1).
/// Its gradient reaches dead latents only (their encoder and decoder rows, b_enc),
/// plus b_dec through the pre-bias.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../error.hpp"
#include "../matrix.hpp"
#include "../model.hpp"
#include "../sparse_code.hpp"
#include "../step_types.hpp"
#include "backend.hpp"
#include "latent_pairs.hpp"
#include "loss.hpp"
#include "topk.hpp"

HSAE_NAMESPACE_BEGIN

template <cpu_scalar T>
struct auxk_workspace {
  /// The AuxK code: per row the top-k pre-activations among dead latents (latent ids).
  sparse_code<T> code;
  row_matrix<T> grad_values;
  /// dLoss/d(ehat) per row [B, D].
  row_matrix<T> q;
  std::vector<double> row_err;
  cpu::latent_pairs pairs;
  /// The residual's column mean [D].
  vector<double> mean;
  /// The encoder backward's scratch (cpu::detail::encoder_backward_unchecked).
  vector<T> gsum;
  std::vector<index_t> touched;
};

namespace cpu::detail {

/// The dead-latent list `auxk_backward` takes: ascending ids in [0, d_sae). O(n_dead).
template <class T, int F>
void check_dead_list(const sae<T, F>& m, const std::vector<index_t>& dead) {
  for (std::size_t j = 0; j < dead.size(); ++j)
    ::hsae::detail::expects<config_error>(dead[j] >= 0 && dead[j] < m.d_sae() && (j == 0 || dead[j] > dead[j - 1]),
                                          "auxk: the dead-latent list must be ascending ids in [0, d_sae)");
}

/// The body of `auxk_backward` without its checks: the caller has checked `opt`, the
/// batch, `pre`, `residual`, every array of `grads` and, unless it is empty or alpha is
/// 0, the dead-latent list (`check_dead_list`).
template <class T, int F>
double auxk_backward_unchecked(const cpu_backend& be, const sae<T, F>& m, cref<T> x, cref<T> pre, cref<T> residual,
                               const std::vector<index_t>& dead, const auxk_options& opt, sae_gradients<T, F>& grads,
                               auxk_workspace<T>& ws) {
  const int k_aux = opt.resolved_k_aux(m.d_model());
  const auto n_dead = std::int64_t(dead.size());
  if (n_dead == 0 || opt.alpha == 0) return 0.0;
  const Eigen::Index B = x.rows();
  const int D = m.d_model();
  const int k = int(std::min<std::int64_t>(k_aux, n_dead));
  const double scale = std::min(double(n_dead) / double(k_aux), 1.0);

  ws.mean.resize(D);
  ws.mean.noalias() = residual.template cast<double>().colwise().mean().transpose();
  const vector<double>& mean = ws.mean;
  ws.row_err.assign(std::size_t(B), 0.0);
  parallel_for(be, B, [&](std::ptrdiff_t b) {
    ws.row_err[std::size_t(b)] = (residual.row(b).template cast<double>() - mean.transpose()).squaredNorm();
  });
  double tv = 0;
  for (double e : ws.row_err) tv += e;
  if (!(tv > 0)) return 0.0;

  ws.code.resize(B, k);
  ws.q.resize(B, D);
  const double coef = 2.0 * opt.alpha * scale / tv;
  // Per thread, sized for any dead count (<= d_sae): no allocation when the count
  // changes from step to step.
  static thread_local std::vector<T> gathered;
  reserve_thread_selectors<T>(be, index_t(m.d_sae()), index_t(k_aux),
                              [&] { gathered.reserve(std::size_t(m.d_sae())); });
  parallel_for<true>(be, B, [&](std::ptrdiff_t b) {
    row_selector<T>& sel = thread_selector<T>();
    gathered.resize(std::size_t(n_dead));
    for (std::int64_t j = 0; j < n_dead; ++j) gathered[std::size_t(j)] = pre(b, dead[std::size_t(j)]);
    sel.select(gathered.data(), index_t(n_dead), index_t(k), ws.code.values.row(b).data(),
               ws.code.indices.row(b).data());
    auto q = ws.q.row(b);
    q = -residual.row(b);
    for (int t = 0; t < k; ++t) {
      index_t& i = ws.code.indices(b, t);
      i = dead[std::size_t(i)];
      const T v = ws.code.values(b, t);
      if (v != T(0)) q.noalias() += v * m.W_dec.row(i);
    }
    ws.row_err[std::size_t(b)] = double(q.squaredNorm());  // ||ehat - e||^2
    q *= T(coef);
  });
  double sse = 0;
  for (double e : ws.row_err) sse += e;

  ws.grad_values.resize(B, k);
  parallel_for(be, B, [&](std::ptrdiff_t b) {
    for (int t = 0; t < k; ++t) ws.grad_values(b, t) = m.W_dec.row(ws.code.indices(b, t)).dot(ws.q.row(b));
  });
  ws.pairs.build(ws.code.indices, m.d_sae());
  parallel_for(be, m.d_sae(), [&](std::ptrdiff_t f) {
    auto g = grads.W_dec.row(f);
    for (std::int64_t q = ws.pairs.begin(index_t(f)); q < ws.pairs.end(index_t(f)); ++q) {
      const std::int64_t p = ws.pairs.pairs[std::size_t(q)];
      const T v = ws.code.values(Eigen::Index(p / k), int(p % k));
      if (v != T(0)) g.noalias() += v * ws.q.row(Eigen::Index(p / k));
    }
  });
  encoder_backward_unchecked(be, m, x, ws.code, ws.grad_values, grads, ws.pairs, ws.gsum, ws.touched);
  return opt.alpha * scale * sse / tv;
}

}  // namespace cpu::detail

/// Adds the AuxK loss's gradients to `grads` and returns the loss (already scaled by
/// alpha and the dead-count factor; 0 with no dead latents or a zero-variance residual).
///
/// \param pre       ReLU'd pre-activations [B, d_sae] of this batch (from `encode`).
/// \param residual  x - xhat_K [B, d_model] (`loss_workspace::residual`).
/// \param dead      dead latents, ascending (`dead_latent_tracker::dead_latents()`).
/// \throws hsae::shape_error if x, pre, residual or any array of `grads` does not fit
///         the model, hsae::config_error on invalid options or dead-latent ids.
template <cpu_scalar T, int F>
double auxk_backward(const cpu_backend& be, const sae<T, F>& m, cref<T> x, cref<T> pre, cref<T> residual,
                     const std::vector<index_t>& dead, const auxk_options& opt, sae_gradients<T, F>& grads,
                     auxk_workspace<T>& ws) {
  opt.validate();
  cpu::detail::check_batch(m, x);
  detail::expect_shape("pre-activations", pre.rows(), pre.cols(), x.rows(), m.d_sae());
  detail::expect_shape("residual", residual.rows(), residual.cols(), x.rows(), m.d_model());
  cpu::detail::check_gradients(m, grads, cpu::detail::grad_all);
  if (!dead.empty() && opt.alpha != 0) cpu::detail::check_dead_list(m, dead);
  return cpu::detail::auxk_backward_unchecked(be, m, x, pre, residual, dead, opt, grads, ws);
}

HSAE_NAMESPACE_END
