// SPDX-License-Identifier: Apache-2.0
/// \file cpu/training_engine.hpp
/// The CPU training engine (training_engine.hpp): `trainer<T, F, S>` with the default
/// backend runs `train_step` (cpu/train_step.hpp) on the host model in place and
/// evaluates with cpu/evaluate.hpp.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "../dead_latents.hpp"
#include "../k_schedule.hpp"
#include "../matrix.hpp"
#include "../metrics.hpp"
#include "../model.hpp"
#include "../optimizer.hpp"
#include "../step_types.hpp"
#include "../training_engine.hpp"
#include "backend.hpp"
#include "evaluate.hpp"
#include "optimizer.hpp"
#include "train_step.hpp"

HSAE_NAMESPACE_BEGIN

/// The CPU engine: `train_step` (cpu/train_step.hpp) on the host model, in place.
template <cpu_scalar T, int F>
class training_engine<cpu_backend, T, F> {
 public:
  using backend_type = cpu_backend;
  static constexpr bool borrows_backend = false;  ///< the trainer copies the CPU backend
  /// prefetch_mode::automatic: the reader would compete with the step's threads.
  static constexpr bool prefetch_by_default = false;

  training_engine(const cpu_backend& be, sae<T, F> model) : be_(be), model_(std::move(model)) {}

  const cpu_backend& backend() const { return be_; }

  template <class InitFn>
  void start(InitFn&& init_model, const adam_options& ao, std::int64_t dead_after_tokens) {
    init_model(model_);
    opt_ = adam<T, F>(model_, ao);
    dead_ = dead_latent_tracker(model_.d_sae(), dead_after_tokens);
  }

  void restore(sae<T, F> model, const adam_options& ao, std::int64_t steps, sae_gradients<T, F> m1,
               sae_gradients<T, F> m2, double last_lr, std::int64_t dead_after_tokens,
               std::vector<std::int64_t> tokens_since_fired) {
    model_ = std::move(model);
    opt_ = adam<T, F>(model_, ao);
    opt_.set_state(steps, std::move(m1), std::move(m2), last_lr);
    dead_ = dead_latent_tracker(model_.d_sae(), dead_after_tokens);
    dead_.set_tokens_since_fired(std::move(tokens_since_fired));
  }

  template <k_schedule_like S>
  engine_step step(const row_matrix<T>& x, const S& schedule, const step_options& so) {
    engine_step r;
    r.stats = train_step(be_, model_, opt_, dead_, x, schedule, ws_, so);
    r.dead_fraction = dead_.dead_fraction();
    return r;
  }

  template <k_schedule_like S>
  evaluation evaluate(cref<T> x, const S& schedule) const {
    return ::hsae::evaluate(be_, model_, x, schedule);
  }

  const sae<T, F>& model() const { return model_; }
  const adam<T, F>& optimizer() const { return opt_; }
  const dead_latent_tracker& dead_latents() const { return dead_; }

 private:
  cpu_backend be_;
  sae<T, F> model_;
  adam<T, F> opt_;
  dead_latent_tracker dead_;
  train_workspace<T, F> ws_;
};

static_assert(training_engine_for<training_engine<cpu_backend, float, dynamic>, float, dynamic, dynamic_k_schedule>);
static_assert(training_engine_for<training_engine<cpu_backend, double, 64>, double, 64, k_schedule<8, 16>>);

HSAE_NAMESPACE_END
