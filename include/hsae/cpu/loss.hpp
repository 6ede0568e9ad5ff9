// SPDX-License-Identifier: Apache-2.0
/// \file cpu/loss.hpp
/// The weighted k-schedule (HierarchicalTopK) loss on the CPU: forward, decoder-side
/// backward, and the sparse encoder backward. Formulas: docs/OBJECTIVE.md.
///
/// Cost. Forward and backward stream over the ranks of each row, keeping one running
/// residual and one running suffix sum (O(D) per row, never a [B, K, D] tensor):
/// forward `r_j = r_{j-1} + v_j e_j`, backward from `r_K` with `S_t = S_{t+1} + g_t`,
/// `dL/dv_t = <e_t, S_t>` and `r_{t-1} = r_t - v_t e_t`. Work is O(B*K*D) for any
/// schedule, the same order as decoding the top-K code; a level's squared error costs
/// one extra O(D) pass only at the scheduled ranks. The decoder gradient
/// `dL/de_f = sum v_t S_t` is staged for a chunk of rows at a time (bounded by
/// `cpu_backend::scratch_bytes`, so memory is flat in K), each v_t S_t streamed to a slot
/// grouped by latent, and then summed per latent, reading the staging front to back.
/// Every reduction runs in index order: results are bitwise identical for any thread
/// count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../error.hpp"
#include "../k_schedule.hpp"
#include "../matrix.hpp"
#include "../model.hpp"
#include "../sparse_code.hpp"
#include "../step_types.hpp"
#include "backend.hpp"
#include "encode.hpp"
#include "latent_pairs.hpp"
#include "streaming.hpp"

HSAE_NAMESPACE_BEGIN

/// Shapes `g` like `m` and zeroes it over the backend's threads, before the backward
/// passes accumulate into it (`sae_gradients::zeros_like` does the same on one thread;
/// the weight gradients are [d_sae, d_model] twice, a visible part of a step).
template <cpu_scalar T, int F>
void zero_gradients(const cpu_backend& be, sae_gradients<T, F>& g, const sae<T, F>& m) {
  g.W_enc.resize(m.W_enc.rows(), m.W_enc.cols());
  g.W_dec.resize(m.W_dec.rows(), m.W_dec.cols());
  g.b_enc.setZero(m.b_enc.size());
  g.b_dec.setZero(m.b_dec.size());
  cpu::detail::parallel_blocks(be, g.W_enc.rows(), 256, [&](std::ptrdiff_t lo, std::ptrdiff_t hi) {
    g.W_enc.middleRows(lo, hi - lo).setZero();
    g.W_dec.middleRows(lo, hi - lo).setZero();
  });
}

/// Buffers reused across calls (no allocation once sizes settle).
template <cpu_scalar T>
struct loss_workspace {
  /// dL/dv [B, code.k()] after a backward call: the gradient w.r.t. each selected
  /// value, whatever the value (the ReLU mask is applied by `encoder_backward`).
  row_matrix<T> grad_values;
  /// x - xhat_K [B, D], the final residual (AuxK's target).
  row_matrix<T> residual;
  /// Per row S_1 (decoder-side b_dec gradient) [B, D].
  row_matrix<T> bias_rows;
  /// Per row and level squared error [B, levels].
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> level_err;
  /// Staged v_t S_t vectors of one chunk of rows, grouped by latent (slot order).
  cpu::detail::staging_buffer<T> staging;
  /// The chunk's pairs grouped by latent: `chunk_offsets[f]..[f+1]` are latent f's slots
  /// (in row order), `slot[(b - b0) * k + t]` is pair (b, t)'s slot (-1: nothing staged).
  std::vector<std::int64_t> chunk_offsets;
  std::vector<std::int64_t> slot;
  /// The pairs of the whole code grouped by latent (the encoder backward's).
  cpu::latent_pairs pairs;
  /// Per-rank weights (normalized_rank_weights) and the level of each rank (-1: none).
  std::vector<double> omega;
  std::vector<int> level_of;
  /// The encoder backward's per-latent sums and the latents they touch.
  vector<T> gsum;
  std::vector<index_t> touched;
};

namespace cpu::detail {

/// A code for the batch `x`: as many rows, values and indices of one shape, every
/// index in [0, d_sae).
template <class T, int F>
void check_code(const sae<T, F>& m, cref<T> x, const sparse_code<T>& code) {
  ::hsae::detail::expects<shape_error>(code.rows() == x.rows(), "the code has ", code.rows(),
                                       " rows but the batch has ", x.rows());
  ::hsae::detail::expects<shape_error>(
      code.indices.rows() == code.values.rows() && code.indices.cols() == code.values.cols(), "the code's values [",
      code.values.rows(), ", ", code.values.cols(), "] and indices [", code.indices.rows(), ", ", code.indices.cols(),
      "] differ in shape");
  ::hsae::detail::expects<shape_error>(
      (code.indices.array() >= 0).all() && (code.indices.array() < m.d_sae()).all(),
      "the code holds a latent index outside [0, d_sae=", m.d_sae(), ")");
}

/// Which arrays of an sae_gradients a function reads or writes.
enum gradient_arrays : unsigned { grad_W_enc = 1, grad_b_enc = 2, grad_W_dec = 4, grad_b_dec = 8, grad_all = 15 };

/// The arrays of `g` named by `which` are shaped like the parameters of `m`.
template <class T, int F>
void check_gradients(const sae<T, F>& m, const sae_gradients<T, F>& g, unsigned which) {
  using ::hsae::detail::expect_shape;
  using ::hsae::detail::expects;
  if (which & grad_W_enc) expect_shape("W_enc gradient", g.W_enc.rows(), g.W_enc.cols(), m.d_sae(), m.d_model());
  if (which & grad_W_dec) expect_shape("W_dec gradient", g.W_dec.rows(), g.W_dec.cols(), m.d_sae(), m.d_model());
  if (which & grad_b_enc)
    expects<shape_error>(g.b_enc.size() == m.d_sae(), "b_enc gradient has shape [", g.b_enc.size(), "], expected [",
                         m.d_sae(), "] (d_sae)");
  if (which & grad_b_dec)
    expects<shape_error>(g.b_dec.size() == m.d_model(), "b_dec gradient has shape [", g.b_dec.size(), "], expected [",
                         m.d_model(), "] (d_model)");
}

template <class T, int F, class S>
void check_loss_inputs(const sae<T, F>& m, cref<T> x, const sparse_code<T>& code, const S& schedule) {
  check_batch(m, x);
  check_code(m, x, code);
  ::hsae::detail::expects<config_error>(schedule.k_max() <= code.k(), "the k-schedule's k_max=", schedule.k_max(),
                                        " exceeds the code's k=", code.k());
  ::hsae::detail::expects<config_error>(schedule.k_max() <= m.d_sae(), "the k-schedule's k_max=", schedule.k_max(),
                                        " exceeds d_sae=", m.d_sae());
}

/// Groups the pairs of rows [b0, b1) that the decoder backward stages (rank < k_max,
/// value not 0) by latent: `offsets[f]..offsets[f+1]` are latent f's slots, in row order,
/// and `slot[(b - b0) * k + t]` is pair (b, t)'s (-1 where nothing is staged). A counting
/// sort, O((b1 - b0) k + d_sae); `offsets` holds d_sae + 1 entries, `slot` (b1 - b0) k.
template <class T>
void group_chunk_pairs(const sparse_code<T>& code, Eigen::Index b0, Eigen::Index b1, int k_max, int d_sae,
                       std::vector<std::int64_t>& offsets, std::vector<std::int64_t>& slot) {
  const int kc = code.k();
  std::fill(offsets.begin(), offsets.begin() + std::ptrdiff_t(d_sae) + 1, std::int64_t(0));
  for (Eigen::Index b = b0; b < b1; ++b)
    for (int t = 0; t < k_max; ++t)
      if (code.values(b, t) != T(0)) ++offsets[std::size_t(code.indices(b, t)) + 1];
  for (std::size_t f = 0; f < std::size_t(d_sae); ++f) offsets[f + 1] += offsets[f];
  // The next free slot of each latent, kept in offsets[f] and restored below.
  for (Eigen::Index b = b0; b < b1; ++b) {
    std::int64_t* const row = slot.data() + std::size_t(b - b0) * std::size_t(kc);
    for (int t = 0; t < kc; ++t)
      row[t] = t < k_max && code.values(b, t) != T(0) ? offsets[std::size_t(code.indices(b, t))]++ : -1;
  }
  for (std::size_t f = std::size_t(d_sae); f > 0; --f) offsets[f] = offsets[f - 1];
  offsets[0] = 0;
}

/// One pass over the rows; `Backward` adds the decoder-side gradients. Unchecked: the
/// caller has checked the batch, the code (`check_loss_inputs`) and, for `Backward`,
/// the decoder-side gradients' shapes (`check_gradients`). The statistics go to `st`,
/// whose vectors keep their capacity: nothing allocates once the shapes settle.
/// `norm_rows` x `norm_cols` (0: the batch's B x D) is the element count the loss is a
/// mean over: a distributed step passes the global batch and d_model while `x` and `m`
/// hold its rows and decoder columns (the loss is a sum over both, docs/DISTRIBUTED.md);
/// `st.loss` is then this part's share.
template <bool Backward, class T, int F, class S>
void schedule_loss_unchecked(const cpu_backend& be, const sae<T, F>& m, cref<T> x, const sparse_code<T>& code,
                             const S& schedule, sae_gradients<T, F>* grads, loss_workspace<T>& ws, loss_stats& st,
                             double norm_rows = 0, double norm_cols = 0) {
  const Eigen::Index B = x.rows();
  const int D = m.d_model(), K = schedule.k_max(), kc = code.k();
  if (norm_rows <= 0) norm_rows = double(B);
  if (norm_cols <= 0) norm_cols = double(D);
  const std::size_t levels = schedule.size();
  normalized_rank_weights(schedule, ws.omega);
  const std::vector<double>& omega = ws.omega;
  ws.level_of.assign(std::size_t(K), -1);
  std::vector<int>& level_of = ws.level_of;
  for (std::size_t l = 0; l < levels; ++l) level_of[std::size_t(schedule.k(l) - 1)] = int(l);
  const double c = 2.0 / (norm_rows * norm_cols);

  ws.level_err.resize(B, Eigen::Index(levels));
  ws.residual.resize(B, D);
  if constexpr (Backward) {
    ws.grad_values.setZero(B, kc);
    ws.bias_rows.resize(B, D);
  }
  const std::size_t per_row = std::size_t(K) * std::size_t(D);
  const Eigen::Index chunk = Backward ? std::max<Eigen::Index>(
                                            1, std::min<Eigen::Index>(B, Eigen::Index(be.scratch_bytes / (per_row * sizeof(T)))))
                                      : B;
  if constexpr (Backward) {
    ws.staging.reserve(std::size_t(chunk) * per_row);
    ws.slot.resize(std::size_t(chunk) * std::size_t(kc));
    ws.chunk_offsets.resize(std::size_t(m.d_sae()) + 1);
  }

  for (Eigen::Index b0 = 0; b0 < B; b0 += chunk) {
    const Eigen::Index b1 = std::min(B, b0 + chunk);
    if constexpr (Backward) group_chunk_pairs(code, b0, b1, K, m.d_sae(), ws.chunk_offsets, ws.slot);
    parallel_for(be, b1 - b0, [&](std::ptrdiff_t rb) {
      const Eigen::Index b = b0 + rb;
      thread_local vector<T> r, s;
      r = m.b_dec - x.row(b).transpose();  // r_0 = xhat_0 - x
      T* const rp = r.data();
      for (int t = 0; t < K; ++t) {
        const T v = code.values(b, t);
        const T* const ep = m.W_dec.row(code.indices(b, t)).data();
        if (t + 2 < K) prefetch_read(m.W_dec.row(code.indices(b, t + 2)).data(), std::size_t(D) * sizeof(T));
        const int level = level_of[std::size_t(t)];
        if (level >= 0) {
          // r_t = r_{t-1} + v_t e_t and ||r_t||^2 in one pass over D.
          T sq = 0;
HSAE_SIMD_SUM(sq)
          for (int d = 0; d < D; ++d) {
            rp[d] += v * ep[d];
            sq += rp[d] * rp[d];
          }
          ws.level_err(b, level) = double(sq);
        } else if (v != T(0)) {
HSAE_SIMD
          for (int d = 0; d < D; ++d) rp[d] += v * ep[d];
        }
      }
      ws.residual.row(b) = -r.transpose();
      if constexpr (Backward) {
        s.setZero(D);
        T* const sp = s.data();
        const std::int64_t* const row_slots = ws.slot.data() + std::size_t(rb) * std::size_t(kc);
        for (int t = K - 1; t >= 0; --t) {
          // One pass over D per rank: S_t = S_{t+1} + g_t, dL/dv_t = <e_t, S_t> and
          // r_{t-1} = r_t - v_t e_t; then v_t S_t streams to the pair's slot.
          const T cw = T(c * omega[std::size_t(t)]);
          const T v = code.values(b, t);
          const T* const ep = m.W_dec.row(code.indices(b, t)).data();
          T dot = 0;
          if (v != T(0)) {
HSAE_SIMD_SUM(dot)
            for (int d = 0; d < D; ++d) {
              const T sd = sp[d] + cw * rp[d];
              sp[d] = sd;
              dot += ep[d] * sd;
              rp[d] -= v * ep[d];
            }
            stream_scaled(ws.staging.data() + std::size_t(row_slots[t]) * std::size_t(D), v, sp, D);
          } else {
HSAE_SIMD_SUM(dot)
            for (int d = 0; d < D; ++d) {
              const T sd = sp[d] + cw * rp[d];
              sp[d] = sd;
              dot += ep[d] * sd;
            }
          }
          ws.grad_values(b, t) = dot;
        }
        ws.bias_rows.row(b) = s.transpose();
        stream_fence();
      }
    });
    if constexpr (Backward) {
      // dL/de_f += sum over this chunk's pairs of latent f of v_t S_t, in row order: the
      // latent's slots are contiguous, so the staging is read once, front to back.
      parallel_for(be, m.d_sae(), [&](std::ptrdiff_t f) {
        const std::int64_t q0 = ws.chunk_offsets[std::size_t(f)], q1 = ws.chunk_offsets[std::size_t(f) + 1];
        if (q0 == q1) return;
        T* const gp = grads->W_dec.row(f).data();
        for (std::int64_t q = q0; q < q1; ++q) {
          const T* const up = ws.staging.data() + std::size_t(q) * std::size_t(D);
HSAE_SIMD
          for (int d = 0; d < D; ++d) gp[d] += up[d];
        }
      });
    }
  }

  st.loss = 0;
  st.rows = B;
  st.d_model = D;
  st.level_k.resize(levels);
  st.level_sse.assign(levels, 0.0);
  for (std::size_t l = 0; l < levels; ++l) st.level_k[l] = schedule.k(l);
  for (Eigen::Index b = 0; b < B; ++b)
    for (std::size_t l = 0; l < levels; ++l) st.level_sse[l] += ws.level_err(b, Eigen::Index(l));
  // The normalised level weights w_l / W, as the backward used them (no overflow of W).
  for (std::size_t l = 0; l < levels; ++l)
    st.loss += omega[std::size_t(schedule.k(l) - 1)] * st.level_sse[l] / (norm_rows * norm_cols);
  if constexpr (Backward) grads->b_dec.noalias() += ws.bias_rows.colwise().sum().transpose();
}

template <bool Backward, class T, int F, class S>
loss_stats schedule_loss_unchecked(const cpu_backend& be, const sae<T, F>& m, cref<T> x, const sparse_code<T>& code,
                                   const S& schedule, sae_gradients<T, F>* grads, loss_workspace<T>& ws) {
  loss_stats st;
  schedule_loss_unchecked<Backward>(be, m, x, code, schedule, grads, ws, st);
  return st;
}

/// The body of `encoder_backward` without its checks: the caller has checked the batch,
/// the code (`check_code`), `grad_values` [B, code.k()] and the W_enc, b_enc and b_dec
/// gradients' shapes. `gsum` and `touched` are scratch (no allocation once sized).
template <class T, int F>
void encoder_backward_unchecked(const cpu_backend& be, const sae<T, F>& m, cref<T> x, const sparse_code<T>& code,
                                cref<T> grad_values, sae_gradients<T, F>& grads, latent_pairs& pairs, vector<T>& gsum,
                                std::vector<index_t>& touched) {
  const int kc = code.k(), D = m.d_model();
  pairs.build(code.indices, m.d_sae());
  gsum.setZero(m.d_sae());
  touched.clear();
  touched.reserve(std::size_t(m.d_sae()));
  parallel_for(be, m.d_sae(), [&](std::ptrdiff_t f) {
    T acc = 0;
    auto g = grads.W_enc.row(f);
    for (std::int64_t q = pairs.begin(index_t(f)); q < pairs.end(index_t(f)); ++q) {
      const std::int64_t p = pairs.pairs[std::size_t(q)];
      const Eigen::Index b = Eigen::Index(p / kc);
      const int t = int(p % kc);
      if (!(code.values(b, t) > T(0))) continue;
      const T gv = grad_values(b, t);
      if (gv == T(0)) continue;
      g.noalias() += gv * x.row(b);
      acc += gv;
    }
    if (acc != T(0)) {
      g.noalias() -= acc * m.b_dec.transpose();
      grads.b_enc[f] += acc;
      gsum[f] = acc;
    }
  });
  for (index_t f = 0; f < m.d_sae(); ++f)
    if (gsum[f] != T(0)) touched.push_back(f);
  parallel_blocks(be, D, 64, [&](std::ptrdiff_t lo, std::ptrdiff_t hi) {
    auto seg = grads.b_dec.segment(lo, hi - lo);
    for (index_t f : touched) seg.noalias() -= gsum[f] * m.W_enc.row(f).segment(lo, hi - lo).transpose();
  });
}

}  // namespace cpu::detail

/// The schedule loss (forward only), with the squared error of every level.
/// \throws hsae::shape_error / hsae::config_error on inconsistent shapes, a code with
///         fewer than k_max columns, or latent indices out of range.
template <cpu_scalar T, int F, k_schedule_like S>
loss_stats hierarchical_loss(const cpu_backend& be, const sae<T, F>& m, cref<T> x, const sparse_code<T>& code,
                             const S& schedule, loss_workspace<T>& ws) {
  cpu::detail::check_loss_inputs(m, x, code, schedule);
  return cpu::detail::schedule_loss_unchecked<false>(be, m, x, code, schedule,
                                                     static_cast<sae_gradients<T, F>*>(nullptr), ws);
}

/// The schedule loss and its decoder-side backward. Adds dL/dW_dec to `grads.W_dec`
/// and the decoder-side dL/db_dec to `grads.b_dec`; leaves dL/dv [B, code.k()] in
/// `ws.grad_values` (zero beyond k_max) and x - xhat_K in `ws.residual`. Follow with
/// `encoder_backward(be, m, x, code, ws.grad_values, grads, ws.pairs)`.
/// \throws as `hierarchical_loss`, and hsae::shape_error if `grads.W_dec` or
///         `grads.b_dec` is not shaped like the model's.
template <cpu_scalar T, int F, k_schedule_like S>
loss_stats hierarchical_loss_backward(const cpu_backend& be, const sae<T, F>& m, cref<T> x,
                                      const sparse_code<T>& code, const S& schedule, sae_gradients<T, F>& grads,
                                      loss_workspace<T>& ws) {
  cpu::detail::check_loss_inputs(m, x, code, schedule);
  ::hsae::detail::check_schedule(schedule);  // before the gradients, as the loss always has
  cpu::detail::check_gradients(m, grads, cpu::detail::grad_W_dec | cpu::detail::grad_b_dec);
  return cpu::detail::schedule_loss_unchecked<true>(be, m, x, code, schedule, &grads, ws);
}

/// Sparse encoder backward: with `dpre_{b,t} = grad_values(b,t)` where
/// `code.values(b,t) > 0` and 0 elsewhere (ReLU and top-k; indices carry no gradient),
/// adds `W_enc[f] += sum dpre (x_b - b_dec)`, `b_enc[f] += sum dpre` and the pre-bias
/// term `b_dec -= sum dpre W_enc[f]`. Only the B*k selected pairs are visited
/// (O(B*k*D), no dense [B,F] x [B,D] product). `pairs` is (re)built from the code.
/// \throws hsae::shape_error on a batch of the wrong width, a code that does not fit
///         the batch or the model, `grad_values` not [B, code.k()], or `grads.W_enc`,
///         `grads.b_enc` or `grads.b_dec` not shaped like the model's.
template <cpu_scalar T, int F>
void encoder_backward(const cpu_backend& be, const sae<T, F>& m, cref<T> x, const sparse_code<T>& code,
                      cref<T> grad_values, sae_gradients<T, F>& grads, cpu::latent_pairs& pairs) {
  cpu::detail::check_batch(m, x);
  cpu::detail::check_code(m, x, code);
  detail::expect_shape("grad_values", grad_values.rows(), grad_values.cols(), code.rows(), code.k());
  cpu::detail::check_gradients(m, grads, cpu::detail::grad_W_enc | cpu::detail::grad_b_enc | cpu::detail::grad_b_dec);
  vector<T> gsum;
  std::vector<index_t> touched;
  cpu::detail::encoder_backward_unchecked(be, m, x, code, grad_values, grads, pairs, gsum, touched);
}

HSAE_NAMESPACE_END
