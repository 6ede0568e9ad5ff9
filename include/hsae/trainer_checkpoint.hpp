// SPDX-License-Identifier: Apache-2.0
/// \file trainer_checkpoint.hpp
/// What `trainer` (trainer.hpp) keeps in a checkpoint (checkpoint.hpp): the mapping
/// between a run's state and the checkpoint's entries, used by `trainer::save_checkpoint`
/// and `trainer::resume`.
///
///   tensors   model.{W_enc,b_enc,W_dec,b_dec}, adam.m.*, adam.v.* (the model's shapes,
///             biases as [1, n] rows), held_out (the evaluation rows),
///             dead.tokens_since_fired (one count a latent)
///   metadata  step, tokens, rows_pulled, held_out_pulled (the held-out rows among
///             rows_pulled: eval_rows, or 0 when they came from a separate source), input_scale, d_model, d_sae, k_max, total_tokens,
///             batch_size, adam.steps, adam.last_lr, dead.after_tokens, and schedule: the
///             levels as "(k,weight),(k,weight),..." (weights in %.17g)
///
/// Reading back (`check_checkpoint`) checks every entry against the run before any is
/// used; the source's own entries (source.*) are the source's business (checkpoint.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "checkpoint.hpp"
#include "dead_latents.hpp"
#include "k_schedule.hpp"
#include "matrix.hpp"
#include "model.hpp"

HSAE_NAMESPACE_BEGIN

namespace detail {

/// The options a checkpoint must agree with: the run's length and batching (the lr
/// schedule depends on them) and the init sample's size (trainer_options).
struct checkpoint_run {
  std::int64_t total_tokens = 0;
  std::int64_t batch_size = 0;
  std::int64_t steps = 0;  ///< ceil(total_tokens / batch_size)
  std::int64_t init_rows = 0;
};

/// Where a run stands: steps and tokens trained, rows read from the training source
/// (held-out, init, training), how many of them were held-out rows (0 when a separate
/// source gave those: trainer::fit(source, held_out)), and the input scale.
struct checkpoint_position {
  std::int64_t step = 0;
  std::int64_t tokens = 0;
  std::int64_t rows_pulled = 0;
  std::int64_t held_out_pulled = 0;
  double input_scale = 1;
};

/// The schedule as a checkpoint records it: "(k,weight),(k,weight),...".
template <k_schedule_like S>
std::string schedule_text(const S& schedule) {
  std::string s;
  for (std::size_t l = 0; l < schedule.size(); ++l) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%s(%d,%.17g)", l ? "," : "", int(schedule.k(l)), double(schedule.weight(l)));
    s += buf;
  }
  return s;
}

/// The four parameters (of a model or of a moment) as tensors `prefix`{W_enc,b_enc,W_dec,b_dec}.
template <cpu_scalar T, class W, class V>
void put_params(checkpoint_state<T>& st, const std::string& prefix, const W& W_enc, const V& b_enc, const W& W_dec,
                const V& b_dec) {
  st.matrices[prefix + "W_enc"] = W_enc;
  st.matrices[prefix + "b_enc"] = b_enc.transpose();
  st.matrices[prefix + "W_dec"] = W_dec;
  st.matrices[prefix + "b_dec"] = b_dec.transpose();
}

/// The same read back into parameters already shaped as wanted: each tensor must have
/// that shape and only finite values (hsae::io_error naming the tensor).
template <cpu_scalar T, class W, class V>
void get_params(const checkpoint_state<T>& st, const std::string& prefix, W& W_enc, V& b_enc, W& W_dec, V& b_dec) {
  auto take = [&](const std::string& name, auto& dst, Eigen::Index rows, Eigen::Index cols) {
    const row_matrix<T>& src = st.finite_matrix(prefix + name, rows, cols);
    if constexpr (std::decay_t<decltype(dst)>::ColsAtCompileTime == 1) dst = src.transpose();
    else dst = src;
  };
  take("W_enc", W_enc, W_enc.rows(), W_enc.cols());
  take("b_enc", b_enc, 1, b_enc.size());
  take("W_dec", W_dec, W_dec.rows(), W_dec.cols());
  take("b_dec", b_dec, 1, b_dec.size());
}

/// Writes the entries of a run's state that do not depend on how its parameters are held:
/// `at`, `run`, the schedule, the dead-latent tracker and the held-out rows. A distributed
/// engine adds the rest (its shards) itself; `fill_checkpoint` adds the whole model.
template <cpu_scalar T, k_schedule_like S>
void fill_checkpoint_common(checkpoint_state<T>& st, const checkpoint_position& at, const checkpoint_run& run,
                            const S& schedule, const dead_latent_tracker& tracker, const row_matrix<T>& held_out) {
  st.set("step", at.step);
  st.set("tokens", at.tokens);
  st.set("rows_pulled", at.rows_pulled);
  st.set("held_out_pulled", at.held_out_pulled);
  st.set("input_scale", at.input_scale);
  st.set("k_max", std::int64_t(schedule.k_max()));
  st.set("schedule", schedule_text(schedule));
  st.set("total_tokens", run.total_tokens);
  st.set("batch_size", run.batch_size);
  const auto& since = tracker.tokens_since_fired();
  st.arrays["dead.tokens_since_fired"] = std::vector<double>(since.begin(), since.end());
  st.set("dead.after_tokens", tracker.dead_after_tokens());
  st.matrices["held_out"] = held_out;
}

/// Writes a run's state into `st`: `fill_checkpoint_common`, the model's shapes, the model
/// and the optimizer state (anything with first_moment(), second_moment(), steps() and
/// last_lr(), as Adam's).
template <cpu_scalar T, int F, k_schedule_like S, class Optimizer>
void fill_checkpoint(checkpoint_state<T>& st, const checkpoint_position& at, const checkpoint_run& run,
                     const S& schedule, const sae<T, F>& m, const Optimizer& optim,
                     const dead_latent_tracker& tracker, const row_matrix<T>& held_out) {
  fill_checkpoint_common(st, at, run, schedule, tracker, held_out);
  st.set("d_model", std::int64_t(m.d_model()));
  st.set("d_sae", std::int64_t(m.d_sae()));
  put_params(st, "model.", m.W_enc, m.b_enc, m.W_dec, m.b_dec);
  const auto& m1 = optim.first_moment();
  const auto& m2 = optim.second_moment();
  put_params(st, "adam.m.", m1.W_enc, m1.b_enc, m1.W_dec, m1.b_dec);
  put_params(st, "adam.v.", m2.W_enc, m2.b_enc, m2.W_dec, m2.b_dec);
  st.set("adam.steps", optim.steps());
  st.set("adam.last_lr", optim.last_lr());
}

/// The checkpoint's values, each checked against the run before any is used.
template <cpu_scalar T, int F>
struct restored_run {
  sae<T, F> model;
  sae_gradients<T, F> m1, m2;
  std::vector<std::int64_t> since;
  /// The held-out rows: the checked state's tensor (valid while that state lives).
  const row_matrix<T>* held_out = nullptr;
  double scale = 1, last_lr = 0;
  std::int64_t step = 0, tokens = 0, rows_pulled = 0, held_out_pulled = 0, adam_steps = 0;
};

/// Reads and range-checks the entries `fill_checkpoint_common` writes and the optimizer's
/// counters, for a run of d_model `d` and d_sae `f`, into `r` (all but its parameters).
/// \throws hsae::io_error naming the checkpoint and the entry.
template <cpu_scalar T, int F, k_schedule_like S>
void check_checkpoint_common(const checkpoint_state<T>& st, Eigen::Index d, Eigen::Index f, const S& schedule,
                             const checkpoint_run& run, restored_run<T, F>& r) {
  st.expects(st.get_int("d_model") == d && st.get_int("d_sae") == f, "shapes d_model=", st.get_int("d_model"),
             " d_sae=", st.get_int("d_sae"), " differ from this trainer's model (", d, ", ", f, ")");
  const std::string sched = schedule_text(schedule);
  st.expects(st.text("schedule") == sched, "written under schedule ", st.text("schedule"), ", this trainer has ",
             sched);
  st.expects(st.get_int("total_tokens") == run.total_tokens && st.get_int("batch_size") == run.batch_size,
             "written for total_tokens=", st.get_int("total_tokens"), " batch_size=", st.get_int("batch_size"),
             ", this trainer has ", run.total_tokens, " and ", run.batch_size);
  // Counters: a step trains min(batch_size, what is left) rows.
  r.step = st.get_int("step", 0, run.steps);
  r.tokens = st.get_int("tokens", 0, run.total_tokens);
  const std::int64_t want_tokens = r.step == run.steps ? run.total_tokens : r.step * run.batch_size;
  st.expects(r.tokens == want_tokens, "entry 'tokens' = ", r.tokens, " disagrees with step ", r.step,
             " of batch_size ", run.batch_size, " (expected ", want_tokens, ")");
  r.scale = st.get_double("input_scale");
  st.expects(std::isfinite(r.scale) && r.scale > 0, "entry 'input_scale' = ", r.scale,
             " must be positive and finite");
  const row_matrix<T>& held = st.matrix("held_out");
  if (held.rows() > 0) st.finite_matrix("held_out", held.rows(), d);
  r.held_out = &held;
  // The held-out rows came from the training source (all of them) or from another one
  // (none); checkpoints written before the entry existed took them from the training source.
  const auto held_rows = std::int64_t(held.rows());
  if (st.meta.count("held_out_pulled") != 0) {
    r.held_out_pulled = st.get_int("held_out_pulled", 0, held_rows);
    st.expects(r.held_out_pulled == 0 || r.held_out_pulled == held_rows, "entry 'held_out_pulled' = ",
               r.held_out_pulled, " must be 0 (a separate held-out source) or the ", held_rows,
               " held-out rows (read from the training source)");
  } else {
    r.held_out_pulled = held_rows;
  }
  // Rows pulled: the held-out rows (if from this source), the init sample (at most init_rows), then the training rows.
  r.rows_pulled = st.get_int("rows_pulled", 0, std::numeric_limits<std::int64_t>::max());
  const std::int64_t before_training = r.rows_pulled - r.tokens - r.held_out_pulled;  // no overflow: all >= 0
  st.expects(before_training >= 0 && before_training <= std::max<std::int64_t>(run.init_rows, 0),
             "entry 'rows_pulled' = ", r.rows_pulled, " disagrees with ", r.tokens, " training rows, ",
             r.held_out_pulled, " held-out rows from the training source and init_rows=", run.init_rows);
  r.adam_steps = st.get_int("adam.steps", 0, r.step);
  r.last_lr = st.get_double("adam.last_lr", 0, std::numeric_limits<double>::max());
  // A latent's count of tokens since it fired never exceeds the tokens trained on.
  r.since = st.int_array("dead.tokens_since_fired", 0, r.tokens);
  st.expects(std::int64_t(r.since.size()) == f, "dead-latent counters for ", r.since.size(), " latents, expected ",
             f);
}

/// Reads and range-checks everything a resume restores, for a run of model `cur`'s shapes
/// under `schedule` and `run`; nothing outside the result is touched.
/// \throws hsae::io_error naming the checkpoint and the entry.
template <cpu_scalar T, int F, k_schedule_like S>
restored_run<T, F> check_checkpoint(const checkpoint_state<T>& st, const sae<T, F>& cur, const S& schedule,
                                    const checkpoint_run& run) {
  restored_run<T, F> r;
  check_checkpoint_common(st, cur.d_model(), cur.d_sae(), schedule, run, r);
  r.model = cur;
  r.m1.zeros_like(cur);
  r.m2.zeros_like(cur);
  get_params(st, "model.", r.model.W_enc, r.model.b_enc, r.model.W_dec, r.model.b_dec);
  get_params(st, "adam.m.", r.m1.W_enc, r.m1.b_enc, r.m1.W_dec, r.m1.b_dec);
  get_params(st, "adam.v.", r.m2.W_enc, r.m2.b_enc, r.m2.W_dec, r.m2.b_dec);
  for (const char* name : {"W_enc", "b_enc", "W_dec", "b_dec"}) {
    const row_matrix<T>& v = st.matrix(std::string("adam.v.") + name);
    st.expects((v.array() >= T(0)).all(), "tensor 'adam.v.", name, "' holds a negative second moment");
  }
  return r;
}

}  // namespace detail

HSAE_NAMESPACE_END
