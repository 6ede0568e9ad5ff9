// SPDX-License-Identifier: Apache-2.0
/// \file training_engine.hpp
/// The backend-specific part of `trainer` (trainer.hpp): a `training_engine<Backend, T, F>`
/// owns the model, the Adam state, the dead-latent tracker and the step's workspace,
/// runs one step on a host batch, evaluates, and hands the trainer host copies of its
/// state for checkpoints. The trainer (loop, sources, metrics, progress, checkpoint files)
/// is the same for every backend; choosing the engine is choosing the backend:
///
///   trainer<float, dynamic, S>                        CPU (cpu/training_engine.hpp)
///   trainer<float, dynamic, S, cuda_backend>          GPU, fp32 storage (cuda/trainer.cuh)
///   trainer<float, dynamic, S, cuda_with_storage<__nv_bfloat16>>   GPU, bf16 storage
///
/// What an engine provides is the concept `training_engine_for` below; the trainer uses
/// nothing else, and each engine's header checks it with a static_assert. This header
/// includes no backend.
#pragma once

#include <concepts>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "config.hpp"
#include "dead_latents.hpp"
#include "k_schedule.hpp"
#include "matrix.hpp"
#include "metrics.hpp"
#include "model.hpp"
#include "optimizer.hpp"
#include "step_types.hpp"

HSAE_NAMESPACE_BEGIN

struct cpu_backend;  // cpu/backend.hpp; the trainer's default backend

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
                "hsae::trainer: no training engine for this Backend. For cpu_backend include <hsae/trainer.hpp> "
                "(or <hsae/hsae.hpp>); for cuda_backend / cuda_with_storage<Storage> include <hsae/cuda.cuh> too.");
};

/// The engine contract: what `trainer<T, F, S, Backend>` needs of
/// `training_engine<Backend, T, F>`, for a schedule type `S`.
///
///   backend_type                     the handle the trainer's constructor takes
///   borrows_backend                  true: the engine keeps a pointer to the handle (it
///                                    must outlive the trainer); false: it copies it
///   prefetch_by_default              whether prefetch_mode::automatic reads ahead
///   E(const backend_type&, sae<T, F>)  the model as given (not yet on the backend)
///   start(init_fn, adam_options, dead_after_tokens)
///                                    init_fn(sae<T, F>&) initialises the host model
///                                    (on the host); then a fresh optimizer and tracker
///   restore(model, adam_options, steps, m1, m2, last_lr, dead_after_tokens, counters)
///                                    the state of a checkpoint, already validated
///   step(x, schedule, step_options) -> engine_step
///   evaluate(x, schedule) -> evaluation
///   model(), optimizer(), dead_latents()   host views (fresh after a step)
template <class E, class T, int F, class S>
concept training_engine_for =
    std::constructible_from<E, const typename E::backend_type&, sae<T, F>> &&
    std::convertible_to<decltype(E::borrows_backend), bool> &&
    std::convertible_to<decltype(E::prefetch_by_default), bool> &&
    requires(E& e, const E& ce, void (*init_fn)(sae<T, F>&), const adam_options& ao, std::int64_t n,
             const row_matrix<T>& x, cref<T> xv, const S& schedule, const step_options& so) {
      e.start(init_fn, ao, n);
      e.restore(sae<T, F>{}, ao, n, sae_gradients<T, F>{}, sae_gradients<T, F>{}, 0.0, n,
                std::vector<std::int64_t>{});
      { e.step(x, schedule, so) } -> std::same_as<engine_step>;
      { ce.evaluate(xv, schedule) } -> std::same_as<evaluation>;
      { ce.model() } -> std::same_as<const sae<T, F>&>;
      { ce.optimizer() } -> std::convertible_to<const adam_state<T, F>&>;
      { ce.dead_latents() } -> std::same_as<const dead_latent_tracker&>;
    };

HSAE_NAMESPACE_END
