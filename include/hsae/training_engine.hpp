// SPDX-License-Identifier: Apache-2.0
/// \file training_engine.hpp
/// The backend-specific part of `trainer` (trainer.hpp): a `training_engine<Backend, T, F>`
/// owns the model, the Adam state, the dead-latent tracker and the step's workspace,
/// runs one step on a host batch, evaluates, and hands the trainer host copies of its
/// state for checkpoints. The trainer (loop, sources, metrics, progress, checkpoint files)
/// is the same for every backend; choosing the engine is choosing the backend:
///
///   trainer<float, dynamic, S>                        CPU (this file)
///   trainer<float, dynamic, S, cuda_backend>          GPU, fp32 storage (cuda/trainer.cuh)
///   trainer<float, dynamic, S, cuda_with_storage<__nv_bfloat16>>   GPU, bf16 storage
///
/// What an engine provides (the trainer uses nothing else):
///   using backend_type;                      the handle the trainer's constructor takes
///   engine(const backend_type&, sae<T, F>)   the model as given (not yet on the backend)
///   const cpu_backend& host_backend()        for host work (init, geometric median)
///   void start(init_fn, adam_options, dead_after_tokens)
///                                            init_fn(sae<T, F>&) initialises the host model,
///                                            then a fresh optimizer and tracker
///   void restore(model, adam_options, steps, m1, m2, last_lr, dead_after_tokens, counters)
///   engine_step step(const row_matrix<T>& x, schedule, step_options)
///   evaluation evaluate(cref<T> x, schedule) const
///   const sae<T, F>& model() const;  const adam<T, F>& optimizer() const;
///   const dead_latent_tracker& dead_latents() const      (host views; fresh after a step)
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/backend.hpp"
#include "dead_latents.hpp"
#include "error.hpp"
#include "k_schedule.hpp"
#include "matrix.hpp"
#include "metrics.hpp"
#include "model.hpp"
#include "optimizer.hpp"
#include "train_step.hpp"

HSAE_NAMESPACE_BEGIN

/// What one engine step reports to the trainer.
struct engine_step {
  step_stats stats;
  /// Dead latents / d_sae after this step's update.
  double dead_fraction = 0;
};

namespace detail {
template <class>
inline constexpr bool no_engine_for = false;
}  // namespace detail

/// The backend-specific half of `trainer`; specialised per backend. The primary template
/// is only reached for a backend without an engine.
template <class Backend, cpu_scalar T, int F>
class training_engine {
  static_assert(detail::no_engine_for<Backend>,
                "hsae::trainer: no training engine for this Backend. Use cpu_backend (default), or include "
                "<hsae/cuda.cuh> for cuda_backend / cuda_with_storage<Storage>.");
};

/// The CPU engine: `train_step` (train_step.hpp) on the host model, in place.
template <cpu_scalar T, int F>
class training_engine<cpu_backend, T, F> {
 public:
  using backend_type = cpu_backend;
  static constexpr bool borrows_backend = false;  ///< the trainer copies the CPU backend
  /// prefetch_mode::automatic: the reader would compete with the step's threads.
  static constexpr bool prefetch_by_default = false;

  training_engine(const cpu_backend& be, sae<T, F> model) : be_(be), model_(std::move(model)) {}

  const cpu_backend& host_backend() const { return be_; }

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

HSAE_NAMESPACE_END
