// SPDX-License-Identifier: Apache-2.0
/// \file cpu/train_step.hpp
/// `train_step` composes the pieces the standard way: check the batch, encode (GEMM,
/// bias, ReLU, sorted top-K), schedule loss forward and decoder backward, AuxK over
/// dead latents, sparse encoder backward, dead-latent update, and the constrained Adam
/// step. Downstream trainers that want another composition call the same pieces.
#pragma once

#include <cstdint>
#include <vector>

#include "../dead_latents.hpp"
#include "../error.hpp"
#include "../k_schedule.hpp"
#include "../matrix.hpp"
#include "../model.hpp"
#include "../step_types.hpp"
#include "auxk.hpp"
#include "backend.hpp"
#include "encode.hpp"
#include "loss.hpp"
#include "optimizer.hpp"

HSAE_NAMESPACE_BEGIN

/// Everything one step reads and writes besides the model and optimizer; reuse it
/// across steps so that nothing is allocated once the shapes settle.
template <cpu_scalar T, int F = dynamic>
struct train_workspace {
  row_matrix<T> pre;
  sparse_code<T> code;
  sae_gradients<T, F> grads;
  loss_workspace<T> loss;
  auxk_workspace<T> aux;
  /// The dead latents of this step (when AuxK runs).
  std::vector<index_t> dead;
};

/// One training step on the batch `x [B, d_model]` under `schedule` (k_max = K).
/// Everything is checked once, up front, before anything runs; the pieces then run
/// their unchecked bodies (cpu::detail::*_unchecked), so a step makes one shape check
/// of the batch and no scan of the codes it builds itself.
/// Writes the statistics into `st` (its vectors keep their capacity): with `ws` and `st`
/// reused, a step of settled shapes allocates nothing (tests/test_no_alloc.cpp).
/// \throws hsae::shape_error on a batch of the wrong width, hsae::config_error if
///         K > d_sae or `so` is invalid (step_options::validate, checked on every
///         step, dead latents or not), hsae::numeric_error if the batch holds NaN/Inf
///         (nothing is changed then).
template <cpu_scalar T, int F, k_schedule_like S>
void train_step(const cpu_backend& be, sae<T, F>& m, adam<T, F>& opt, dead_latent_tracker& dead, cref<T> x,
                const S& schedule, train_workspace<T, F>& ws, step_stats& st, const step_options& so = {}) {
  static_assert(schedule_fits_width<S, F>, "hsae::train_step: the schedule's k_max exceeds the dictionary width F");
  so.validate();
  cpu::detail::check_batch(m, x);
  const int K = schedule.k_max();
  detail::expects<config_error>(K <= m.d_sae(), "k_max=", K, " exceeds d_sae=", m.d_sae());
  if (so.check_finite) detail::expect_finite("training batch", x);
  detail::expects<config_error>(K >= 1, "k=", K, " must be in [1, d_sae=", m.d_sae(), "]");  // as encode's
  const std::int64_t n_dead = dead.num_dead();
  const bool aux = so.use_auxk && n_dead > 0;
  std::vector<index_t>& dead_list = ws.dead;
  dead_list.clear();
  if (aux) dead.dead_latents(dead_list);
  if (aux && so.auxk.alpha != 0) cpu::detail::check_dead_list(m, dead_list);

  // Unchecked from here: the code comes from encode (k = K columns, indices in
  // [0, d_sae)), the gradients from zero_gradients, pre and the residual from the
  // passes that size them.
  cpu::detail::encode_unchecked(be, m, x, K, ws.code, ws.pre);
  zero_gradients(be, ws.grads, m);
  cpu::detail::schedule_loss_unchecked<true>(be, m, x, ws.code, schedule, &ws.grads, ws.loss, st.levels);
  st.loss = st.levels.loss;
  st.dead = n_dead;
  st.aux_loss = 0;
  if (aux)
    st.aux_loss = cpu::detail::auxk_backward_unchecked(be, m, x, ws.pre, ws.loss.residual, dead_list, so.auxk,
                                                       ws.grads, ws.aux);
  cpu::detail::encoder_backward_unchecked(be, m, x, ws.code, ws.loss.grad_values, ws.grads, ws.loss.pairs,
                                          ws.loss.gsum, ws.loss.touched);
  dead.update(ws.code);
  st.grad_norm = opt.step(be, m, ws.grads);
  st.lr = opt.last_lr();
}

/// The loss and raw gradients of the batch `x [B, d_model]` under `schedule`, for
/// trainers that compose their own step: encode (top-K, K = k_max), the schedule loss
/// with its decoder backward, and the encoder backward, into `ws.grads` (zeroed first).
/// No AuxK, no dead-latent update, no optimizer: `opt.step(be, m, ws.grads)` after it is
/// train_step with `use_auxk = false`, bit for bit (tests/test_determinism.cpp). `ws.code`
/// holds the batch's code for a caller's own dead-latent tracking. Checked once, as
/// train_step; with `ws` and `st` reused it allocates nothing once the shapes settle.
/// \throws hsae::shape_error on a batch of the wrong width, hsae::config_error if K is
///         not in [1, d_sae], hsae::numeric_error if `check_finite` and the batch holds
///         NaN/Inf (nothing is written then).
template <cpu_scalar T, int F, k_schedule_like S>
void loss_and_gradients(const cpu_backend& be, const sae<T, F>& m, cref<T> x, const S& schedule,
                        train_workspace<T, F>& ws, loss_stats& st, bool check_finite = true) {
  static_assert(schedule_fits_width<S, F>,
                "hsae::loss_and_gradients: the schedule's k_max exceeds the dictionary width F");
  cpu::detail::check_batch(m, x);
  const int K = schedule.k_max();
  detail::expects<config_error>(K >= 1 && K <= m.d_sae(), "k_max=", K, " must be in [1, d_sae=", m.d_sae(), "]");
  if (check_finite) detail::expect_finite("training batch", x);
  cpu::detail::encode_unchecked(be, m, x, K, ws.code, ws.pre);
  zero_gradients(be, ws.grads, m);
  cpu::detail::schedule_loss_unchecked<true>(be, m, x, ws.code, schedule, &ws.grads, ws.loss, st);
  cpu::detail::encoder_backward_unchecked(be, m, x, ws.code, ws.loss.grad_values, ws.grads, ws.loss.pairs,
                                          ws.loss.gsum, ws.loss.touched);
}

/// `loss_and_gradients` returning its statistics (a new `loss_stats` each call).
template <cpu_scalar T, int F, k_schedule_like S>
loss_stats loss_and_gradients(const cpu_backend& be, const sae<T, F>& m, cref<T> x, const S& schedule,
                              train_workspace<T, F>& ws, bool check_finite = true) {
  loss_stats st;
  loss_and_gradients(be, m, x, schedule, ws, st, check_finite);
  return st;
}

/// `train_step` returning its statistics: the same step; a new `step_stats` holds
/// them, so each call allocates its two per-level vectors (`levels.level_k`,
/// `levels.level_sse`). Loops that must not allocate pass a `step_stats` to reuse.
template <cpu_scalar T, int F, k_schedule_like S>
step_stats train_step(const cpu_backend& be, sae<T, F>& m, adam<T, F>& opt, dead_latent_tracker& dead, cref<T> x,
                      const S& schedule, train_workspace<T, F>& ws, const step_options& so = {}) {
  step_stats st;
  train_step(be, m, opt, dead, x, schedule, ws, st, so);
  return st;
}

HSAE_NAMESPACE_END
