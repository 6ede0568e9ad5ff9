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
/// grid's root writes files (`writes_files()`).
///
/// Checkpoints are sharded: the trainer's file at `path` holds what every rank shares (the
/// step, the data position, the held-out rows, the dead-latent counters, the grid), and
/// the ranks of replica 0 each write their shard's parameters and Adam moments to
/// `shard_checkpoint_file(path, s, S)`. No rank gathers the model for a checkpoint; a resume
/// needs the same number of shards (any number of replicas) and checks every file's step.
/// `gather_checkpoint_model` puts a sharded checkpoint's model together in one process.
#pragma once

#include <cstdint>
#include <exception>
#include <filesystem>
#include <string>
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
#include "../trainer_checkpoint.hpp"
#include "../training_engine.hpp"
#include "grid.hpp"
#include "sae_shard.hpp"
#include "train_step.hpp"

HSAE_NAMESPACE_BEGIN

/// The file of shard `s` of `shards` beside a distributed run's checkpoint `path`.
inline std::filesystem::path shard_checkpoint_file(const std::filesystem::path& path, int s, int shards) {
  return path.string() + ".shard-" + std::to_string(s) + "-of-" + std::to_string(shards);
}

namespace distributed::detail {

/// Reads and checks shard `s` of `S` of the checkpoint whose common state is `st`: the same
/// step, the shard's coordinates, the shapes of a d_model x d_sae model's shard `s`, finite
/// values and non-negative second moments. \throws hsae::io_error naming the file.
template <cpu_scalar T>
void read_shard_checkpoint(const std::filesystem::path& path, const checkpoint_state<T>& st, int s, int S,
                           sae_shard<T>& model, sae_shard<T>& m1, sae_shard<T>& m2) {
  const std::int64_t d = st.get_int("d_model"), f = st.get_int("d_sae");
  const checkpoint_state<T> sh = read_checkpoint<T>(shard_checkpoint_file(path, s, S));
  sh.expects(sh.get_int("grid.shard") == s && sh.get_int("grid.shards") == S, "holds shard ",
             sh.get_int("grid.shard"), " of ", sh.get_int("grid.shards"), ", expected shard ", s, " of ", S);
  sh.expects(sh.text("step") == st.text("step"), "is at step ", sh.text("step"), " but '", path.string(),
             "' at step ", st.text("step"), " (a checkpoint interrupted while written?)");
  for (sae_shard<T>* p : {&model, &m1, &m2}) p->resize(int(d), index_t(f), S, s);
  ::hsae::detail::get_params(sh, "model.", model.W_enc, model.b_enc, model.dec.W_dec, model.b_dec);
  ::hsae::detail::get_params(sh, "adam.m.", m1.W_enc, m1.b_enc, m1.dec.W_dec, m1.b_dec);
  ::hsae::detail::get_params(sh, "adam.v.", m2.W_enc, m2.b_enc, m2.dec.W_dec, m2.b_dec);
  for (const char* name : {"W_enc", "b_enc", "W_dec", "b_dec"})
    sh.expects((sh.matrix(std::string("adam.v.") + name).array() >= T(0)).all(), "tensor 'adam.v.", name,
               "' holds a negative second moment");
  for (sae_shard<T>* p : {&model, &m1, &m2}) p->sync_decoder_bias();
}

}  // namespace distributed::detail

/// The whole model of a distributed run's checkpoint, put together from its shard files in
/// this process (no MPI): for export (`save_saelens`) of a run that was stopped.
/// \throws hsae::io_error naming the file: not a distributed checkpoint, a missing or
///         inconsistent shard file.
template <cpu_scalar T>
sae<T> gather_checkpoint_model(const std::filesystem::path& path) {
  const checkpoint_state<T> st = read_checkpoint<T>(path);
  st.expects(st.meta.count("grid.shards") != 0, "is not a distributed run's checkpoint (no entry 'grid.shards')");
  const int S = int(st.get_int("grid.shards", 1, 1 << 20));
  const std::int64_t d = st.get_int("d_model", 1, 1 << 30), f = st.get_int("d_sae", 1, 1 << 30);
  sae<T> out(static_cast<int>(d), static_cast<int>(f));
  for (int s = 0; s < S; ++s) {
    sae_shard<T> m, m1, m2;
    distributed::detail::read_shard_checkpoint(path, st, s, S, m, m1, m2);
    out.W_enc.middleRows(m.latents.first, m.latents.count) = m.W_enc;
    out.b_enc.segment(m.latents.first, m.latents.count) = m.b_enc;
    out.W_dec.middleCols(m.columns.first, m.columns.count) = m.dec.W_dec;
    out.b_dec = m.b_dec;
  }
  return out;
}

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
  /// The trainer's checkpoints go through save_shards / check_shards / restore_shards.
  static constexpr bool sharded_checkpoints = true;

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
    opt_.m1 = shard_of(move_params<sae<T, F>>(std::move(m1)), S, s);
    opt_.m2 = shard_of(move_params<sae<T, F>>(std::move(m2)), S, s);
    opt_.steps = steps;
    opt_.last_lr = last_lr;
    dead_ = dead_latent_tracker(full_.d_sae(), dead_after_tokens);
    dead_.set_tokens_since_fired(std::move(tokens_since_fired));
    fresh_ = true;
  }

  /// The trainer's checkpoint: the shapes, Adam's counters and the grid into `st`; each
  /// rank of replica 0 writes its shard (atomically), then the root calls `write_common`
  /// (which writes `st` to `path`). Collective: it returns when every file is written, and
  /// a rank that fails to write makes every rank throw.
  template <class WriteCommon>
  void save_shards(const std::filesystem::path& path, checkpoint_state<T>& st, WriteCommon&& write_common) const {
    const int S = grid().shards(), s = grid().shard();
    st.set("d_model", std::int64_t(shard_.d_model));
    st.set("d_sae", std::int64_t(shard_.d_sae));
    st.set("adam.steps", opt_.steps);
    st.set("adam.last_lr", opt_.last_lr);
    st.set("grid.shards", std::int64_t(S));
    st.set("grid.replicas", std::int64_t(grid().replicas()));
    if (grid().replica() == 0) {
      try {
        checkpoint_state<T> sh;
        sh.meta["step"] = st.text("step");
        sh.set("grid.shard", std::int64_t(s));
        sh.set("grid.shards", std::int64_t(S));
        ::hsae::detail::put_params(sh, "model.", shard_.W_enc, shard_.b_enc, shard_.dec.W_dec, shard_.b_dec);
        ::hsae::detail::put_params(sh, "adam.m.", opt_.m1.W_enc, opt_.m1.b_enc, opt_.m1.dec.W_dec, opt_.m1.b_dec);
        ::hsae::detail::put_params(sh, "adam.v.", opt_.m2.W_enc, opt_.m2.b_enc, opt_.m2.dec.W_dec, opt_.m2.b_dec);
        write_checkpoint(shard_checkpoint_file(path, s, S), sh);
      } catch (...) {
        err_ = std::current_exception();
      }
    }
    agree_or_throw(err_, "write their shard of the checkpoint '" + path.string() + "'");
    if (writes_files()) {
      try {
        write_common();
      } catch (...) {
        err_ = std::current_exception();
      }
    }
    agree_or_throw(err_, "write the checkpoint '" + path.string() + "'");
  }

  /// Reads and checks this rank's shard file of the checkpoint whose common state `st` the
  /// trainer has checked (`r`); nothing changes until `restore_shards`. Collective: when a
  /// rank's file is missing or bad, every rank throws.
  void check_shards(const std::filesystem::path& path, const checkpoint_state<T>& st,
                    const ::hsae::detail::restored_run<T, F>&) {
    try {
      st.expects(st.meta.count("grid.shards") != 0,
                 "was written by one process, not by a distributed run (no entry 'grid.shards'); resume it in one "
                 "process");
      const std::int64_t saved = st.get_int("grid.shards", 1, std::int64_t(1) << 20);
      st.expects(saved == grid().shards(), "was written by a grid of ", saved, " latent shards, this run has ",
                 grid().shards(), "; resume with the same number of shards (any number of data replicas)");
      distributed::detail::read_shard_checkpoint(path, st, grid().shard(), grid().shards(), pending_, pending_m1_,
                                                 pending_m2_);
    } catch (...) {
      err_ = std::current_exception();
    }
    agree_or_throw(err_, "read their shard of the checkpoint '" + path.string() + "'");
  }

  /// Takes the state `check_shards` read and the common state `r`.
  void restore_shards(const adam_options& ao, ::hsae::detail::restored_run<T, F>& r, std::int64_t dead_after_tokens) {
    shard_ = std::move(pending_);
    opt_ = sharded_adam<T>(shard_, ao);
    opt_.m1 = std::move(pending_m1_);
    opt_.m2 = std::move(pending_m2_);
    opt_.steps = r.adam_steps;
    opt_.last_lr = r.last_lr;
    dead_ = dead_latent_tracker(int(shard_.d_sae), dead_after_tokens);
    dead_.set_tokens_since_fired(std::move(r.since));
    fresh_ = false;
    opt_fresh_ = false;
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
      a.set_state(opt_.steps, move_params<sae_gradients<T, F>>(std::move(g1)), move_params<sae_gradients<T, F>>(std::move(g2)), opt_.last_lr);
      full_opt_ = std::move(a);
      opt_fresh_ = true;
    }
    return full_opt_;
  }
  const dead_latent_tracker& dead_latents() const { return dead_; }
  const sae_shard<T>& shard() const { return shard_; }

 private:
  /// The four arrays of a model or its gradients, moved into the other type.
  template <class To, class From>
  static To move_params(From&& from) {
    To to;
    to.W_enc = std::move(from.W_enc);
    to.b_enc = std::move(from.b_enc);
    to.W_dec = std::move(from.W_dec);
    to.b_dec = std::move(from.b_dec);
    return to;
  }

  /// Every rank learns whether any failed: this rank's exception (`err`) is rethrown here;
  /// the others throw an io_error saying how many ranks could not `what`.
  void agree_or_throw(std::exception_ptr& err, const std::string& what) const {
    std::int32_t bad = err ? 1 : 0;
    grid().world().all_reduce_sum(&bad, 1);
    if (err) std::rethrow_exception(std::exchange(err, nullptr));
    ::hsae::detail::expects<io_error>(bad == 0, bad, " other rank(s) could not ", what,
                                      " (their messages name the files)");
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
  sae_shard<T> pending_, pending_m1_, pending_m2_;  ///< read by check_shards
  mutable std::exception_ptr err_;                  ///< a collective file operation's failure here
};

static_assert(training_engine_for<training_engine<distributed_cpu_backend<single_process_communicator>, float, dynamic>,
                                  float, dynamic, dynamic_k_schedule>);

HSAE_NAMESPACE_END
