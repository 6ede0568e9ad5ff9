// SPDX-License-Identifier: Apache-2.0
/// \file distributed/engine.hpp
/// The distributed CPU engine: `trainer<T, F, S, distributed_cpu_backend<Comm>>` trains a
/// replicas x shards grid (`process_grid`) with `sharded_train_step`. Every rank runs the
/// same trainer on the same stream: each draws the whole global batch and trains on its
/// replica's rows of it (so the data order, its seed and its checkpointed position are
/// those of one process), and evaluates the same held-out rows.
///
/// The host views the trainer asks for (`model()`, `optimizer()`) are gathered from the
/// shards when asked after a step: a collective, so every rank must ask at the same points
/// (the trainer does: checkpoints, resume, and the caller's export after `fit`). Only the
/// grid's root writes files (`writes_files()`); the others gather and discard.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "../comm/communicator.hpp"
#include "../cpu/backend.hpp"
#include "../dead_latents.hpp"
#include "../k_schedule.hpp"
#include "../matrix.hpp"
#include "../metrics.hpp"
#include "../model.hpp"
#include "../optimizer.hpp"
#include "../step_types.hpp"
#include "../training_engine.hpp"
#include "grid.hpp"
#include "sae_shard.hpp"
#include "train_step.hpp"

HSAE_NAMESPACE_BEGIN

/// The backend of a distributed CPU run: the CPU backend of this rank (its threads) and
/// the grid it belongs to (borrowed: it must outlive the trainer).
template <communicator Comm>
struct distributed_cpu_backend {
  cpu_backend cpu;
  process_grid<Comm>* grid = nullptr;
};

/// The distributed CPU engine (see the file's comment).
template <cpu_scalar T, int F, communicator Comm>
  requires comm_scalar<T>
class training_engine<distributed_cpu_backend<Comm>, T, F> {
 public:
  using backend_type = distributed_cpu_backend<Comm>;
  static constexpr bool borrows_backend = false;
  static constexpr bool prefetch_by_default = false;

  /// \throws hsae::config_error without a grid.
  training_engine(const backend_type& be, sae<T, F> model) : be_(be), full_(std::move(model)) {
    detail::expects<config_error>(be_.grid != nullptr, "distributed_cpu_backend: no process_grid given");
  }

  const backend_type& backend() const { return be_; }
  /// Whether this rank writes the trainer's files (checkpoint, metrics, progress).
  bool writes_files() const { return be_.grid->is_root(); }
  process_grid<Comm>& grid() const { return *be_.grid; }

  template <class InitFn>
  void start(InitFn&& init_model, const adam_options& ao, std::int64_t dead_after_tokens) {
    init_model(full_);
    // Rank 0's initial model everywhere (the ranks' inits agree already when their
    // threads and libraries do; this makes it so whatever they are).
    Comm& w = grid().world();
    if (w.size() > 1) {
      w.broadcast(full_.W_enc.data(), std::size_t(full_.W_enc.size()), 0);
      w.broadcast(full_.b_enc.data(), std::size_t(full_.b_enc.size()), 0);
      w.broadcast(full_.W_dec.data(), std::size_t(full_.W_dec.size()), 0);
      w.broadcast(full_.b_dec.data(), std::size_t(full_.b_dec.size()), 0);
    }
    shard_ = shard_of(full_, grid().shards(), grid().shard());
    opt_ = sharded_adam<T>(shard_, ao);
    dead_ = dead_latent_tracker(full_.d_sae(), dead_after_tokens);
    fresh_ = true;
  }

  void restore(sae<T, F> model, const adam_options& ao, std::int64_t steps, sae_gradients<T, F> m1,
               sae_gradients<T, F> m2, double last_lr, std::int64_t dead_after_tokens,
               std::vector<std::int64_t> tokens_since_fired) {
    full_ = std::move(model);
    const int S = grid().shards(), s = grid().shard();
    shard_ = shard_of(full_, S, s);
    opt_ = sharded_adam<T>(shard_, ao);
    opt_.m1 = shard_of(as_model(std::move(m1)), S, s);
    opt_.m2 = shard_of(as_model(std::move(m2)), S, s);
    opt_.steps = steps;
    opt_.last_lr = last_lr;
    dead_ = dead_latent_tracker(full_.d_sae(), dead_after_tokens);
    dead_.set_tokens_since_fired(std::move(tokens_since_fired));
    fresh_ = true;
  }

  template <k_schedule_like S>
  engine_step step(const row_matrix<T>& x, const S& schedule, const step_options& so) {
    const latent_range rows = grid().rows_of_replica(x.rows());
    engine_step r;
    sharded_train_step(grid(), be_.cpu, shard_, opt_, dead_, cref<T>(x.middleRows(rows.first, rows.count)),
                       std::int64_t(x.rows()), schedule, ws_, r.stats, so);
    r.dead_fraction = dead_.dead_fraction();
    fresh_ = false;
    opt_fresh_ = false;
    return r;
  }

  template <k_schedule_like S>
  evaluation evaluate(cref<T> x, const S& schedule) const {
    return sharded_evaluate(grid(), be_.cpu, shard_, x, schedule, ws_);
  }

  /// The whole model, gathered from the shards if a step ran since the last gather (a
  /// collective: every rank calls it at the same point).
  const sae<T, F>& model() const {
    if (!fresh_) {
      gather_model(grid().shard_group(), shard_, full_);
      fresh_ = true;
    }
    return full_;
  }
  /// Adam's whole state, gathered likewise.
  const adam_state<T, F>& optimizer() const {
    if (!opt_fresh_) {
      const sae<T, F>& m = model();
      adam_state<T, F> a(m, opt_.options);
      sae<T, F> g1, g2;
      gather_model(grid().shard_group(), opt_.m1, g1);
      gather_model(grid().shard_group(), opt_.m2, g2);
      a.set_state(opt_.steps, as_gradients(std::move(g1)), as_gradients(std::move(g2)), opt_.last_lr);
      full_opt_ = std::move(a);
      opt_fresh_ = true;
    }
    return full_opt_;
  }
  const dead_latent_tracker& dead_latents() const { return dead_; }
  const sae_shard<T>& shard() const { return shard_; }

 private:
  static sae<T, F> as_model(sae_gradients<T, F>&& g) {
    sae<T, F> m;
    m.W_enc = std::move(g.W_enc);
    m.b_enc = std::move(g.b_enc);
    m.W_dec = std::move(g.W_dec);
    m.b_dec = std::move(g.b_dec);
    return m;
  }
  static sae_gradients<T, F> as_gradients(sae<T, F>&& m) {
    sae_gradients<T, F> g;
    g.W_enc = std::move(m.W_enc);
    g.b_enc = std::move(m.b_enc);
    g.W_dec = std::move(m.W_dec);
    g.b_dec = std::move(m.b_dec);
    return g;
  }

  backend_type be_;
  mutable sae<T, F> full_;
  mutable bool fresh_ = true;
  mutable adam_state<T, F> full_opt_;
  mutable bool opt_fresh_ = false;
  sae_shard<T> shard_;
  sharded_adam<T> opt_;
  dead_latent_tracker dead_;
  mutable sharded_workspace<T> ws_;
};

static_assert(training_engine_for<training_engine<distributed_cpu_backend<single_process_communicator>, float, dynamic>,
                                  float, dynamic, dynamic_k_schedule>);

HSAE_NAMESPACE_END
