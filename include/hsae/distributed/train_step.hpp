// SPDX-License-Identifier: Apache-2.0
/// \file distributed/train_step.hpp
/// The training step of a replicas x shards grid on the CPU (docs/DISTRIBUTED.md, "One
/// step"): encode the rank's latents, the exact global top-K (`sharded_topk`), the
/// schedule loss on the rank's decoder columns, one all-reduce of the B K value
/// gradients, the encoder backward of the rank's latents, AuxK merged the same way,
/// the data-parallel sum over replicas, and Adam with the decoder constraint whose
/// row dot products and norms are summed over the shard group.
///
/// On a grid of one rank every sum is the single process's: `sharded_train_step` equals
/// `train_step` bit for bit (tests/mpi). On more ranks the sums over d_model, latents
/// and rows are associated by blocks, so the result equals the single process to
/// rounding; with `reduction::ordered` it is bitwise the same on every rank and in every
/// run on the same grid.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../comm/communicator.hpp"
#include "../comm/sharded_topk.hpp"
#include "../cpu/backend.hpp"
#include "../cpu/latent_pairs.hpp"
#include "../cpu/loss.hpp"
#include "../cpu/optimizer.hpp"
#include "../cpu/topk.hpp"
#include "../dead_latents.hpp"
#include "../error.hpp"
#include "../k_schedule.hpp"
#include "../matrix.hpp"
#include "../metrics.hpp"
#include "../optimizer.hpp"
#include "../sparse_code.hpp"
#include "../step_types.hpp"
#include "grid.hpp"
#include "sae_shard.hpp"

HSAE_NAMESPACE_BEGIN

/// What the data-parallel sum of the last `sharded_train_step` did (`sharded_workspace::dp`;
/// all zero on a grid of one replica). The byte counts are what this rank receives by
/// each method: `dense_bytes` for the all-reduce of the shard's W_enc, b_enc and W_dec
/// gradients (the ordered sum's all-gather, (R - 1) n sizeof(T), or a ring all-reduce's
/// 2 (R - 1) / R n sizeof(T) with `reduction::native`); `sparse_bytes` for the sparse
/// gathers, (R - 1) (16 + 4 U_max + V_max sizeof(T)), known only when the touched latents
/// were counted (`dp_reduction::sparse` or `automatic`). b_dec's all-reduce is in neither.
struct dp_reduction_info {
  dp_reduction used = dp_reduction::dense;  ///< `dense` or `sparse`, never `automatic`
  std::int64_t touched = 0;      ///< latents this replica touched (U)
  std::int64_t touched_max = 0;  ///< U_max: the most over the replica group
  std::int64_t values_max = 0;   ///< V_max: the most gradient values a replica sends
  std::int64_t dense_bytes = 0, sparse_bytes = 0;
};

/// Adam's state for one shard: the moments have the shard's shapes (b_dec's whole, the
/// same on every rank of the group).
template <cpu_scalar T>
struct sharded_adam {
  adam_options options;
  sae_shard<T> m1, m2;
  std::int64_t steps = 0;
  double last_lr = 0;

  sharded_adam() = default;
  /// \throws hsae::config_error if `opt` is invalid.
  sharded_adam(const sae_shard<T>& shard, adam_options opt) : options(opt) {
    options.validate();
    m1.zeros_like(shard);
    m2.zeros_like(shard);
  }
};

/// Everything one sharded step reads and writes besides the shard and its optimizer.
template <cpu_scalar T>
struct sharded_workspace {
  row_matrix<T> pre, xcols;
  sparse_code<T> local, code, aux_local, aux_code;
  sharded_topk_workspace topk;
  sae_shard<T> grads;
  sae_gradients<T> dec_grads;  ///< the decoder columns' gradients (the loss writes them)
  loss_workspace<T> loss;
  cpu::latent_pairs pairs;
  vector<T> gsum;
  std::vector<index_t> dead, my_dead;
  std::vector<int> counts;
  std::vector<std::int32_t> fired;
  std::vector<T> per_latent;  ///< [2 F]: projection dots and squared norms, then norms
  std::vector<double> rows_d;
  vector<double> cols_d;
  row_matrix<T> q, aux_grad;
  // The data-parallel sum (step 10).
  std::vector<std::uint8_t> touched;  ///< [F]: latents this replica's codes touched
  std::vector<std::int32_t> dp_ids, dp_all_ids;
  std::vector<std::int64_t> dp_counts;
  std::vector<T> dp_send, dp_recv;
  dp_reduction_info dp;  ///< what the last step's data-parallel sum did
};

namespace distributed::detail {

/// The sparse encoder backward of the shard's latents (cpu::detail::encoder_backward_unchecked
/// restricted to them): adds to g.W_enc, g.b_enc, and subtracts the pre-bias term from
/// `g.b_dec` (the whole d_model vector; the caller sums it over the group).
template <class T>
void encoder_backward(const cpu_backend& be, const sae_shard<T>& sh, cref<T> x, const sparse_code<T>& code,
                      cref<T> grad_values, sae_shard<T>& g, cpu::latent_pairs& pairs, vector<T>& gsum) {
  const int kc = code.k(), D = sh.d_model;
  const index_t first = sh.latents.first, n = sh.latents.count;
  pairs.build(code.indices, int(sh.d_sae));
  gsum.setZero(n);
  cpu::detail::parallel_for(be, n, [&](std::ptrdiff_t lf) {
    const index_t f = first + index_t(lf);
    T acc = 0;
    auto gr = g.W_enc.row(lf);
    for (std::int64_t q = pairs.begin(f); q < pairs.end(f); ++q) {
      const std::int64_t p = pairs.pairs[std::size_t(q)];
      const Eigen::Index b = Eigen::Index(p / kc);
      const int t = int(p % kc);
      if (!(code.values(b, t) > T(0))) continue;
      const T gv = grad_values(b, t);
      if (gv == T(0)) continue;
      gr.noalias() += gv * x.row(b);
      acc += gv;
    }
    if (acc != T(0)) {
      gr.noalias() -= acc * sh.b_dec.transpose();
      g.b_enc[lf] += acc;
      gsum[lf] = acc;
    }
  });
  cpu::detail::parallel_blocks(be, D, 64, [&](std::ptrdiff_t lo, std::ptrdiff_t hi) {
    auto seg = g.b_dec.segment(lo, hi - lo);
    for (index_t lf = 0; lf < n; ++lf)
      if (gsum[lf] != T(0)) seg.noalias() -= gsum[lf] * sh.W_enc.row(lf).segment(lo, hi - lo).transpose();
  });
}

template <class T, communicator Comm>
void all_reduce(Comm& c, T* data, std::size_t n, reduction red) {
  if (c.size() > 1) c.all_reduce_sum(data, n, red);
}

/// Steps 1-3: the ReLU'd pre-activations of the shard's latents (ws.pre [B, latents]) and
/// the exact global top-K of every row (ws.code, the same on every rank of the group).
template <class T, communicator Comm>
void encode(Comm& group, const cpu_backend& be, const sae_shard<T>& sh, cref<T> x, int K, sharded_workspace<T>& ws) {
  const Eigen::Index B = x.rows();
  cpu::detail::encoder_gemm(be, x, sh.b_dec, sh.W_enc, ws.pre);  // the single-process GEMM on the shard's rows
  const int kl = int(std::min<index_t>(K, sh.latents.count));
  ws.local.resize(B, kl);
  cpu::detail::reserve_thread_selectors<T>(be, sh.latents.count, index_t(std::max(kl, 1)), [] {});
  cpu::detail::parallel_for<true>(be, B, [&](std::ptrdiff_t b) {
    auto r = ws.pre.row(b);
    r = (r + sh.b_enc.transpose()).cwiseMax(T(0));
    if (kl == 0) return;
    cpu::detail::thread_selector<T>().select(r.data(), index_t(r.size()), index_t(kl), ws.local.values.row(b).data(),
                                             ws.local.indices.row(b).data());
    for (int t = 0; t < kl; ++t) ws.local.indices(b, t) += sh.latents.first;
  });
  sharded_topk(group, sh.d_sae, ws.local, K, ws.code, ws.topk);
}

/// Bytes a rank receives in an all-reduce of n values of `bytes` each over R ranks: the
/// ordered sum's all-gather, or a ring's reduce-scatter and all-gather.
inline std::int64_t all_reduce_received_bytes(std::int64_t n, std::int64_t bytes, int R, reduction red) {
  if (R <= 1) return 0;
  return red == reduction::ordered ? (R - 1) * n * bytes : 2 * (R - 1) * n * bytes / R;
}

/// Step 10: sums the gradients of the shard (ws.grads) over the replica group.
///
/// Sparse: a replica's gradient is zero outside the latents its codes touched (every
/// W_dec and W_enc row, b_enc entry the loss, AuxK and encoder backward write is the
/// latent of a nonzero code value). Each rank sends the sorted ids of those latents, then
/// their W_dec rows [U, columns] followed by the W_enc rows and b_enc of the ones in its
/// slice (a contiguous run of the sorted ids) [U_enc, D + 1], padded to the group's
/// largest counts (one all-gather of the counts first: equal-count all-gathers only).
/// Each rank then zeroes its touched rows (the whole gradient is then zero) and adds
/// every replica's rows in replica order.
///
/// Equality with the dense ordered all-reduce, bit for bit: that one computes
/// ((g_0 + g_1) + g_2) + ... per element; this one (((0 + g_0) + g_1) + ...) leaving out
/// the replicas that did not touch the element, whose g_r is +0. Adding +0 changes no
/// value but -0, and 0 + g_0 == g_0 but for -0; the gradients are sums accumulated from
/// +0 (never -0 in round-to-nearest: x + y is -0 only when both are), so no -0 occurs.
template <class T, communicator Comm>
void data_parallel_sum(process_grid<Comm>& grid, const cpu_backend& be, const sparse_code<T>& code,
                       const sparse_code<T>* aux_code, sharded_workspace<T>& ws) {
  const reduction red = grid.sums();
  Comm& rg = grid.replica_group();
  sae_shard<T>& g = ws.grads;
  const int R = rg.size(), D = g.d_model;
  const index_t Fw = g.d_sae, first = g.latents.first, Fs = g.latents.count;
  const std::int64_t C = g.columns.count;
  const std::int64_t n_dense = std::int64_t(Fs) * (D + 1) + std::int64_t(Fw) * C;
  dp_reduction_info& info = ws.dp;
  info.dense_bytes = all_reduce_received_bytes(n_dense, std::int64_t(sizeof(T)), R, red);
  const dp_reduction mode = grid.data_parallel();

  bool sparse = mode != dp_reduction::dense;
  std::int64_t U = 0, Ue = 0, V = 0, lo = 0;
  if (sparse) {
    // The touched latents, sorted; those of this slice are the run [lo, lo + Ue).
    ws.touched.assign(std::size_t(Fw), 0);
    auto mark = [&](const sparse_code<T>& c) {
      for (Eigen::Index b = 0; b < c.rows(); ++b)
        for (int t = 0; t < c.k(); ++t)
          if (c.values(b, t) != T(0)) ws.touched[std::size_t(c.indices(b, t))] = 1;
    };
    mark(code);
    if (aux_code) mark(*aux_code);
    ws.dp_ids.clear();
    for (index_t f = 0; f < Fw; ++f)
      if (ws.touched[std::size_t(f)]) ws.dp_ids.push_back(f);
    U = std::int64_t(ws.dp_ids.size());
    lo = std::lower_bound(ws.dp_ids.begin(), ws.dp_ids.end(), first) - ws.dp_ids.begin();
    Ue = (std::lower_bound(ws.dp_ids.begin(), ws.dp_ids.end(), first + Fs) - ws.dp_ids.begin()) - lo;
    V = U * C + Ue * (D + 1);
    const std::int64_t mine[2] = {U, V};
    ws.dp_counts.resize(2 * std::size_t(R));
    rg.all_gather(mine, 2, ws.dp_counts.data());
    for (int r = 0; r < R; ++r) {
      info.touched_max = std::max(info.touched_max, ws.dp_counts[2 * std::size_t(r)]);
      info.values_max = std::max(info.values_max, ws.dp_counts[2 * std::size_t(r) + 1]);
    }
    info.touched = U;
    info.sparse_bytes =
        std::int64_t(R - 1) * (16 + 4 * info.touched_max + info.values_max * std::int64_t(sizeof(T)));
    // The same decision on every rank of the group: it depends on the gathered counts only.
    if (mode == dp_reduction::automatic) sparse = info.sparse_bytes < info.dense_bytes;
  }

  if (!sparse) {
    info.used = dp_reduction::dense;
    all_reduce(rg, g.W_enc.data(), std::size_t(g.W_enc.size()), red);
    all_reduce(rg, g.b_enc.data(), std::size_t(g.b_enc.size()), red);
    all_reduce(rg, g.dec.W_dec.data(), std::size_t(g.dec.W_dec.size()), red);
    all_reduce(rg, g.b_dec.data(), std::size_t(D), red);
    return;
  }
  info.used = dp_reduction::sparse;
  const std::int64_t Umax = info.touched_max, Vmax = info.values_max;
  // Pack this replica's rows, then zero them: the whole gradient is zero afterwards.
  ws.dp_ids.resize(std::size_t(Umax), 0);
  ws.dp_send.assign(std::size_t(Vmax), T(0));
  cpu::detail::parallel_for(be, U, [&](std::ptrdiff_t u) {
    auto row = g.dec.W_dec.row(ws.dp_ids[std::size_t(u)]);
    std::copy_n(row.data(), C, ws.dp_send.data() + u * C);
    row.setZero();
  });
  cpu::detail::parallel_for(be, Ue, [&](std::ptrdiff_t e) {
    const index_t lf = ws.dp_ids[std::size_t(lo + e)] - first;
    T* dst = ws.dp_send.data() + U * C + e * (D + 1);
    std::copy_n(g.W_enc.row(lf).data(), D, dst);
    dst[D] = g.b_enc[lf];
    g.W_enc.row(lf).setZero();
    g.b_enc[lf] = T(0);
  });
  ws.dp_all_ids.resize(std::size_t(R * Umax));
  ws.dp_recv.resize(std::size_t(R * Vmax));
  rg.all_gather(ws.dp_ids.data(), std::size_t(Umax), ws.dp_all_ids.data());
  rg.all_gather(ws.dp_send.data(), std::size_t(Vmax), ws.dp_recv.data());
  // Every replica's rows, added in replica order (within a replica the ids are distinct).
  for (int r = 0; r < R; ++r) {
    const std::int64_t Ur = ws.dp_counts[2 * std::size_t(r)];
    const std::int32_t* ids = ws.dp_all_ids.data() + std::size_t(r) * std::size_t(Umax);
    const T* vals = ws.dp_recv.data() + std::size_t(r) * std::size_t(Vmax);
    const std::int64_t lr = std::lower_bound(ids, ids + Ur, first) - ids;
    const std::int64_t Uer = (std::lower_bound(ids, ids + Ur, first + Fs) - ids) - lr;
    cpu::detail::parallel_for(be, Ur, [&](std::ptrdiff_t u) {
      g.dec.W_dec.row(ids[u]) += Eigen::Map<const vector<T>>(vals + u * C, C).transpose();
    });
    cpu::detail::parallel_for(be, Uer, [&](std::ptrdiff_t e) {
      const index_t lf = ids[lr + e] - first;
      const T* src = vals + Ur * C + e * (D + 1);
      g.W_enc.row(lf) += Eigen::Map<const vector<T>>(src, D).transpose();
      g.b_enc[lf] += src[D];
    });
  }
  all_reduce(rg, g.b_dec.data(), std::size_t(D), red);
}

}  // namespace distributed::detail

/// One training step of a replicas x shards grid. Every rank of the grid calls it with its
/// own shard, the same global batch size `global_rows` and the rows of its replica `x`
/// ([rows_of_replica(global_rows).count, d_model]; the ranks of a shard group pass the same
/// rows). `dead` is the whole model's tracker, the same on every rank (the step keeps it
/// so). `st` gets the global batch's statistics, the same on every rank.
/// \throws as train_step: hsae::shape_error on a batch of the wrong shape,
///         hsae::config_error if K > d_sae or `so` is invalid, hsae::numeric_error on
///         NaN/Inf in the batch (checked on every rank before anything changes) or a
///         non-finite gradient norm.
template <cpu_scalar T, communicator Comm, k_schedule_like S>
  requires comm_scalar<T>
void sharded_train_step(process_grid<Comm>& grid, const cpu_backend& be, sae_shard<T>& sh, sharded_adam<T>& opt,
                        dead_latent_tracker& dead, cref<T> x, std::int64_t global_rows, const S& schedule,
                        sharded_workspace<T>& ws, step_stats& st, const step_options& so = {}) {
  namespace dd = distributed::detail;
  so.validate();
  const reduction red = grid.sums();
  Comm& sg = grid.shard_group();
  Comm& rg = grid.replica_group();
  const int D = sh.d_model, K = schedule.k_max();
  const index_t Fw = sh.d_sae;
  const latent_range rows = grid.rows_of_replica(global_rows);
  detail::expect_shape("training batch of this replica", x.rows(), x.cols(), rows.count, D);
  detail::expects<config_error>(K >= 1 && K <= Fw, "k_max=", K, " must be in [1, d_sae=", Fw, "]");
  if (so.check_finite) {
    // Each rank checks its rows; the flag is summed so that every rank throws together.
    std::int32_t bad = x.allFinite() ? 0 : 1;
    dd::all_reduce(grid.world(), &bad, 1, reduction::native);
    if (bad) detail::expect_finite("training batch", x);
    detail::expects<numeric_error>(bad == 0, "training batch: another rank's rows contain NaN or Inf (", bad,
                                   " rank(s)); nothing was changed");
  }
  const std::int64_t n_dead = dead.num_dead();
  const bool aux = so.use_auxk && n_dead > 0 && so.auxk.alpha != 0;
  const Eigen::Index B = x.rows();

  // 1-3. Encode the shard's latents, the exact global top-K.
  dd::encode(sg, be, sh, x, K, ws);

  // 4. The schedule loss on the decoder columns.
  ws.xcols = x.middleCols(sh.columns.first, sh.columns.count);
  ws.dec_grads.W_dec.resize(Fw, sh.columns.count);
  cpu::detail::parallel_blocks(be, Fw, 256, [&](std::ptrdiff_t lo, std::ptrdiff_t hi) {
    ws.dec_grads.W_dec.middleRows(lo, hi - lo).setZero();
  });
  ws.dec_grads.b_dec.setZero(sh.columns.count);
  cpu::detail::schedule_loss_unchecked<true>(be, sh.dec, cref<T>(ws.xcols), ws.code, schedule, &ws.dec_grads,
                                             ws.loss, st.levels, double(global_rows), double(D));
  // 5. The value gradients of every column.
  dd::all_reduce(sg, ws.loss.grad_values.data(), std::size_t(ws.loss.grad_values.size()), red);

  // The encoder side's gradients, zeroed over the threads. The decoder columns' are
  // ws.dec_grads (swapped in below), zeroed once, before the loss.
  sae_shard<T>& gz = ws.grads;
  gz.d_model = sh.d_model;
  gz.d_sae = sh.d_sae;
  gz.latents = sh.latents;
  gz.columns = sh.columns;
  gz.W_enc.resize(sh.latents.count, D);
  cpu::detail::parallel_blocks(be, sh.latents.count, 256, [&](std::ptrdiff_t lo, std::ptrdiff_t hi) {
    gz.W_enc.middleRows(lo, hi - lo).setZero();
  });
  gz.b_enc.setZero(sh.latents.count);
  gz.dec.b_dec.setZero(sh.columns.count);
  gz.b_dec.setZero(D);
  gz.b_dec.segment(sh.columns.first, sh.columns.count) = ws.dec_grads.b_dec;

  // 7. AuxK over the dead latents, merged like the main top-K.
  st.aux_loss = 0;
  bool aux_ran = false;  // ws.aux_code holds this step's AuxK code
  if (aux) {
    const int k_aux = so.auxk.resolved_k_aux(D);
    const int k = int(std::min<std::int64_t>(k_aux, n_dead));
    const double scale = std::min(double(n_dead) / double(k_aux), 1.0);
    const auto& res = ws.loss.residual;  // [B, columns]: x - xhat_K on this rank's columns
    const Eigen::Index C = sh.columns.count;
    vector<double>& mean = ws.cols_d;  // the column sums, then their mean
    mean.noalias() = res.template cast<double>().colwise().sum().transpose();
    dd::all_reduce(rg, mean.data(), std::size_t(C), red);
    mean /= double(global_rows);
    ws.rows_d.assign(std::size_t(B), 0.0);
    cpu::detail::parallel_for(be, B, [&](std::ptrdiff_t b) {
      ws.rows_d[std::size_t(b)] = (res.row(b).template cast<double>() - mean.transpose()).squaredNorm();
    });
    dd::all_reduce(sg, ws.rows_d.data(), std::size_t(B), red);
    double tv = 0;
    for (double e : ws.rows_d) tv += e;
    dd::all_reduce(rg, &tv, 1, red);
    if (tv > 0) {
      aux_ran = true;
      dead.dead_latents(ws.dead);
      ws.my_dead.clear();
      for (index_t f : ws.dead)
        if (f >= sh.latents.first && f < sh.latents.first + sh.latents.count) ws.my_dead.push_back(f);
      ws.counts.assign(std::size_t(grid.shards()), 0);
      int sl = 0;  // the dead list ascends: walk the slices along it
      for (index_t f : ws.dead) {
        for (latent_range r = latent_slice(Fw, grid.shards(), sl); f >= r.first + r.count;)
          r = latent_slice(Fw, grid.shards(), ++sl);
        ++ws.counts[std::size_t(sl)];
      }
      for (int& c : ws.counts) c = std::min(c, k);
      const int kmine = ws.counts[std::size_t(grid.shard())];
      const auto nm = std::int64_t(ws.my_dead.size());
      ws.aux_local.resize(B, kmine);
      if (kmine > 0) {
        cpu::detail::reserve_thread_selectors<T>(be, index_t(nm), index_t(kmine), [] {});
        static thread_local std::vector<T> gathered;
        cpu::detail::parallel_for<true>(be, B, [&](std::ptrdiff_t b) {
          gathered.resize(std::size_t(nm));
          for (std::int64_t j = 0; j < nm; ++j)
            gathered[std::size_t(j)] = ws.pre(b, ws.my_dead[std::size_t(j)] - sh.latents.first);
          cpu::detail::thread_selector<T>().select(gathered.data(), index_t(nm), index_t(kmine),
                                                   ws.aux_local.values.row(b).data(),
                                                   ws.aux_local.indices.row(b).data());
          for (int t = 0; t < kmine; ++t)
            ws.aux_local.indices(b, t) = ws.my_dead[std::size_t(ws.aux_local.indices(b, t))];
        });
      }
      gather_topk(sg, ws.aux_local, k, ws.counts.data(), sh.latents, ws.aux_code, ws.topk);
      const double coef = 2.0 * so.auxk.alpha * scale / tv;
      ws.q.resize(B, C);
      cpu::detail::parallel_for(be, B, [&](std::ptrdiff_t b) {
        auto q = ws.q.row(b);
        q = -res.row(b);
        for (int t = 0; t < k; ++t) {
          const T v = ws.aux_code.values(b, t);
          if (v != T(0)) q.noalias() += v * sh.dec.W_dec.row(ws.aux_code.indices(b, t));
        }
        ws.rows_d[std::size_t(b)] = double(q.squaredNorm());
        q *= T(coef);
      });
      dd::all_reduce(sg, ws.rows_d.data(), std::size_t(B), red);
      double sse = 0;
      for (double e : ws.rows_d) sse += e;
      dd::all_reduce(rg, &sse, 1, red);
      ws.aux_grad.resize(B, k);
      cpu::detail::parallel_for(be, B, [&](std::ptrdiff_t b) {
        for (int t = 0; t < k; ++t)
          ws.aux_grad(b, t) = sh.dec.W_dec.row(ws.aux_code.indices(b, t)).dot(ws.q.row(b));
      });
      dd::all_reduce(sg, ws.aux_grad.data(), std::size_t(ws.aux_grad.size()), red);
      ws.pairs.build(ws.aux_code.indices, int(Fw));
      cpu::detail::parallel_for(be, Fw, [&](std::ptrdiff_t f) {
        auto g = ws.dec_grads.W_dec.row(f);
        for (std::int64_t p0 = ws.pairs.begin(index_t(f)); p0 < ws.pairs.end(index_t(f)); ++p0) {
          const std::int64_t p = ws.pairs.pairs[std::size_t(p0)];
          const T v = ws.aux_code.values(Eigen::Index(p / k), int(p % k));
          if (v != T(0)) g.noalias() += v * ws.q.row(Eigen::Index(p / k));
        }
      });
      dd::encoder_backward(be, sh, x, ws.aux_code, cref<T>(ws.aux_grad), ws.grads, ws.pairs, ws.gsum);
      st.aux_loss = so.auxk.alpha * scale * sse / tv;
    }
  }

  // 6. The encoder backward of the shard's latents; b_dec's gradient summed over the group.
  dd::encoder_backward(be, sh, x, ws.code, cref<T>(ws.loss.grad_values), ws.grads, ws.pairs, ws.gsum);
  dd::all_reduce(sg, ws.grads.b_dec.data(), std::size_t(D), red);
  ws.grads.dec.W_dec.swap(ws.dec_grads.W_dec);

  // 10. Data parallel: the replicas' gradients summed, dense or sparse (grid.data_parallel()).
  ws.dp = {};
  if (grid.replicas() > 1) dd::data_parallel_sum(grid, be, ws.code, aux_ran ? &ws.aux_code : nullptr, ws);

  // Statistics of the global batch.
  const std::size_t levels = st.levels.level_sse.size();
  dd::all_reduce(sg, st.levels.level_sse.data(), levels, red);
  dd::all_reduce(rg, st.levels.level_sse.data(), levels, red);
  st.levels.rows = global_rows;
  st.levels.d_model = D;
  st.levels.loss = 0;
  for (std::size_t l = 0; l < levels; ++l)
    st.levels.loss += ws.loss.omega[std::size_t(schedule.k(l) - 1)] * st.levels.level_sse[l] /
                      (double(global_rows) * double(D));
  st.loss = st.levels.loss;
  st.dead = n_dead;

  // Dead latents: every replica's firings.
  ws.fired.assign(std::size_t(Fw), 0);
  for (Eigen::Index b = 0; b < B; ++b)
    for (int t = 0; t < ws.code.k(); ++t)
      if (ws.code.values(b, t) > T(0)) ws.fired[std::size_t(ws.code.indices(b, t))] = 1;
  dd::all_reduce(rg, ws.fired.data(), ws.fired.size(), reduction::native);
  dead.update_fired(global_rows, ws.fired.data());

  // 8-9. Adam with the decoder constraint.
  const adam_options& ao = opt.options;
  sae_shard<T>& g = ws.grads;
  ws.per_latent.resize(2 * std::size_t(Fw));
  T* const dots = ws.per_latent.data();
  T* const n2s = dots + Fw;
  if (ao.project_decoder_gradient) {
    cpu::detail::parallel_for(be, Fw, [&](std::ptrdiff_t f) {
      const auto e = sh.dec.W_dec.row(f);
      dots[f] = g.dec.W_dec.row(f).dot(e);
      n2s[f] = e.squaredNorm();
    });
    dd::all_reduce(sg, dots, 2 * std::size_t(Fw), red);
    cpu::detail::parallel_for(be, Fw, [&](std::ptrdiff_t f) {
      if (n2s[f] > T(0)) g.dec.W_dec.row(f) -= (dots[f] / n2s[f]) * sh.dec.W_dec.row(f);
    });
  }
  // The global gradient norm: each rank's own rows and, once, b_dec.
  double norm2 = double(g.b_enc.squaredNorm()) + (grid.shard() == 0 ? double(g.b_dec.squaredNorm()) : 0.0);
  {
    std::vector<double>& r = ws.rows_d;
    r.resize(std::size_t(Fw));
    cpu::detail::parallel_for(be, Fw, [&](std::ptrdiff_t f) {
      const index_t lf = index_t(f) - sh.latents.first;
      r[std::size_t(f)] = (lf >= 0 && lf < sh.latents.count ? double(g.W_enc.row(lf).squaredNorm()) : 0.0) +
                          double(g.dec.W_dec.row(f).squaredNorm());
    });
    for (double v : r) norm2 += v;
  }
  dd::all_reduce(sg, &norm2, 1, red);
  const double norm = std::sqrt(norm2);
  detail::expects<numeric_error>(std::isfinite(norm), "adam: the gradient norm is not finite (", norm,
                                 "); the step was not applied");
  double clip = 1.0;
  if (ao.max_grad_norm > 0 && norm > ao.max_grad_norm) clip = ao.max_grad_norm / norm;
  detail::expects<config_error>(opt.steps < std::numeric_limits<std::int64_t>::max(), "adam: step count ", opt.steps,
                                " cannot grow further");
  const double lr = ao.lr_at(opt.steps, int(Fw));
  ++opt.steps;
  const cpu::detail::adam_rule<T> update(ao, opt.steps, lr, clip);
  cpu::detail::parallel_for(be, sh.latents.count, [&](std::ptrdiff_t f) {
    update(sh.W_enc.row(f).array(), g.W_enc.row(f).array(), opt.m1.W_enc.row(f).array(),
           opt.m2.W_enc.row(f).array());
  });
  cpu::detail::parallel_for(be, Fw, [&](std::ptrdiff_t f) {
    update(sh.dec.W_dec.row(f).array(), g.dec.W_dec.row(f).array(), opt.m1.dec.W_dec.row(f).array(),
           opt.m2.dec.W_dec.row(f).array());
    if (ao.normalize_decoder) n2s[f] = sh.dec.W_dec.row(f).squaredNorm();
  });
  if (ao.normalize_decoder) {
    dd::all_reduce(sg, n2s, std::size_t(Fw), red);
    cpu::detail::parallel_for(be, Fw, [&](std::ptrdiff_t f) {
      const T n = std::sqrt(n2s[f]);
      if (n > T(0)) sh.dec.W_dec.row(f) /= n;
    });
  }
  update(sh.b_enc.array(), g.b_enc.array(), opt.m1.b_enc.array(), opt.m2.b_enc.array());
  update(sh.b_dec.array(), g.b_dec.array(), opt.m1.b_dec.array(), opt.m2.b_dec.array());
  sh.sync_decoder_bias();
  opt.last_lr = lr;
  st.grad_norm = norm;
  st.lr = lr;
}

/// The metrics of the sharded model on `x` (every rank of the grid passes the same rows;
/// each shard group evaluates all of them): the same as `evaluate` on the gathered model,
/// to rounding (the squared errors are summed over the groups' column blocks).
template <cpu_scalar T, communicator Comm, k_schedule_like S>
  requires comm_scalar<T>
evaluation sharded_evaluate(process_grid<Comm>& grid, const cpu_backend& be, const sae_shard<T>& sh, cref<T> x,
                            const S& schedule, sharded_workspace<T>& ws) {
  detail::expect_shape("evaluation batch", x.rows(), x.cols(), x.rows(), sh.d_model);
  const int K = schedule.k_max();
  detail::expects<config_error>(K >= 1 && K <= sh.d_sae, "k_max=", K, " must be in [1, d_sae=", sh.d_sae, "]");
  distributed::detail::encode(grid.shard_group(), be, sh, x, K, ws);
  ws.xcols = x.middleCols(sh.columns.first, sh.columns.count);
  loss_stats st;
  cpu::detail::schedule_loss_unchecked<false>(be, sh.dec, cref<T>(ws.xcols), ws.code, schedule,
                                              static_cast<sae_gradients<T>*>(nullptr), ws.loss, st,
                                              double(x.rows()), double(sh.d_model));
  distributed::detail::all_reduce(grid.shard_group(), st.level_sse.data(), st.level_sse.size(), grid.sums());
  st.d_model = sh.d_model;
  metrics_accumulator acc;
  acc.add(x, ws.code, st);
  return acc.result();
}

HSAE_NAMESPACE_END
