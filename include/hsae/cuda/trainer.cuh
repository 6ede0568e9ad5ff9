// SPDX-License-Identifier: Apache-2.0
/// \file cuda/trainer.cuh
/// `trainer` on the GPU: the CUDA training engine (training_engine.hpp). With this header
/// (or hsae/cuda.cuh) and the loop, hsae/trainer.hpp, the trainer takes a CUDA backend:
///
///   cuda_backend be(stream);
///   trainer<float, dynamic, all_prefixes<64>, cuda_backend> tr(be, sae<float>(768, 16384), {}, opt);
///   tr.fit(source);                                     // same loop, metrics, checkpoints
///
/// Backend parameter and device storage precision:
///   cuda_backend                        fp32 storage (= cuda_with_storage<float>)
///   cuda_with_storage<__half>           half storage copies of x, W_enc, W_dec and the
///   cuda_with_storage<__nv_bfloat16>    pre-activations (bfloat16 likewise)
/// In every case the master weights, gradients, Adam moments and all accumulation are
/// fp32 (device_sae), and the host side is float: T = float (sources fill float batches;
/// checkpoints hold fp32 masters, so a GPU checkpoint resumes on the CPU and back).
///
/// Per step the engine copies the host batch to one reused device buffer (and converts it
/// to the storage type on the device), runs `train_step` (cuda/train_step.cuh), and reads
/// the step's statistics with one small device-to-host copy, which synchronises once per
/// step (the trainer reports every step). Evaluation runs on the device in chunks. The
/// host views the trainer needs (model, optimizer, tracker) are downloaded on demand.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../dead_latents.hpp"
#include "../error.hpp"
#include "../k_schedule.hpp"
#include "../matrix.hpp"
#include "../metrics.hpp"
#include "../model.hpp"
#include "../optimizer.hpp"
#include "../sparse_code.hpp"
#include "../step_types.hpp"
#include "../training_engine.hpp"
#include "backend.cuh"
#include "dead_latents.cuh"
#include "detail/types.cuh"
#include "encode.cuh"
#include "loss.cuh"
#include "memory.cuh"
#include "model.cuh"
#include "optimizer.cuh"
#include "train_step.cuh"

HSAE_NAMESPACE_BEGIN

/// The trainer's Backend parameter for the CUDA backend with device storage `Storage`
/// (float, __half, __nv_bfloat16); the trainer's constructor takes a `cuda_backend`.
/// `cuda_backend` itself means `cuda_with_storage<float>`.
template <class Storage>
  requires cuda_storage<Storage>
struct cuda_with_storage {
  using storage_type = Storage;
};

namespace cuda::detail {

/// The CUDA engine; `training_engine<cuda_backend, ...>` and
/// `training_engine<cuda_with_storage<Storage>, ...>` derive from it.
template <class Storage, cpu_scalar T, int F>
class cuda_training_engine {
  static_assert(std::is_same_v<T, float>,
                "hsae::trainer with a CUDA backend trains from float host batches: use T = float (the device keeps "
                "fp32 master weights; choose the storage precision with cuda_with_storage<Storage>)");

 public:
  using backend_type = cuda_backend;
  static constexpr bool borrows_backend = true;  ///< the trainer keeps a pointer to it
  /// prefetch_mode::automatic: the host waits for each step, so the next batch is read then.
  static constexpr bool prefetch_by_default = true;
  using storage_type = Storage;

  /// Rows per chunk of `evaluate` at most (and fewer when [rows, d_sae] pre-activations
  /// would exceed `eval_chunk_bytes`).
  std::int64_t eval_chunk_rows = 4096;
  std::size_t eval_chunk_bytes = std::size_t(256) << 20;

  cuda_training_engine(const cuda_backend& be, sae<float, F> model) : be_(&be), host_model_(std::move(model)) {}

  const cuda_backend& backend() const { return *be_; }

  template <class InitFn>
  void start(InitFn&& init_model, const adam_options& ao, std::int64_t dead_after_tokens) {
    if (model_stale_) (void)model();  // a second fit continues from the trained weights
    started_ = false;                 // until everything below has succeeded
    init_model(host_model_);
    m_.upload(*be_, host_model_);
    opt_ = device_adam<Storage, F>(*be_, m_, ao);
    dead_ = device_dead_latent_tracker(*be_, host_model_.d_sae(), dead_after_tokens);
    host_opt_ = adam_state<float, F>(host_model_, ao);
    host_dead_ = dead_latent_tracker(host_model_.d_sae(), dead_after_tokens);
    ao_ = ao;
    model_stale_ = opt_stale_ = dead_stale_ = false;
    started_ = true;
  }

  void restore(sae<float, F> model, const adam_options& ao, std::int64_t steps, sae_gradients<float, F> m1,
               sae_gradients<float, F> m2, double last_lr, std::int64_t dead_after_tokens,
               std::vector<std::int64_t> tokens_since_fired) {
    started_ = false;  // until everything below has succeeded
    host_model_ = std::move(model);
    m_.upload(*be_, host_model_);
    opt_ = device_adam<Storage, F>(*be_, m_, ao);
    opt_.set_state(*be_, steps, m1, m2, last_lr);
    dead_ = device_dead_latent_tracker(*be_, host_model_.d_sae(), dead_after_tokens);
    dead_.set_tokens_since_fired(*be_, tokens_since_fired);
    host_opt_ = adam_state<float, F>(host_model_, ao);
    host_opt_.set_state(steps, std::move(m1), std::move(m2), last_lr);
    host_dead_ = dead_latent_tracker(host_model_.d_sae(), dead_after_tokens);
    host_dead_.set_tokens_since_fired(std::move(tokens_since_fired));
    ao_ = ao;
    model_stale_ = opt_stale_ = dead_stale_ = false;
    started_ = true;
  }

  /// One step on the host batch `x` (copied to the device, converted to the storage type
  /// there). \throws as train_step / read_step_stats (a NaN/Inf batch: hsae::numeric_error,
  /// nothing changed).
  template <k_schedule_like S>
  engine_step step(const row_matrix<float>& x, const S& schedule, const step_options& so) {
    ::hsae::detail::expects<config_error>(started_, "cuda trainer engine: step before start or restore");
    step_options opts = so;
    if constexpr (std::is_same_v<Storage, __half>) {
      // The device check would see the batch after its conversion to half, where values
      // beyond +-65504 have become inf: check the rows as the user gave them instead.
      if (opts.check_finite) {
        ::hsae::detail::expect_finite("training batch", x);
        expect_half_range(cref<float>(x));
        opts.check_finite = false;
      }
    }
    const device_matrix_view<const Storage> xd = upload_batch(cref<float>(x));
    model_stale_ = opt_stale_ = dead_stale_ = true;  // before: a throw after enqueueing leaves them stale too
    train_step(*be_, m_, opt_, dead_, xd, schedule, ws_, opts);
    const device_step_stats st = read_step_stats(*be_, opt_, dead_, ws_);
    engine_step r;
    r.stats = st;
    r.dead_fraction = double(st.dead_after_update) / double(host_model_.d_sae());
    return r;
  }

  /// Metrics of the device model on `x` at every level of `schedule`: per chunk, encode and
  /// the schedule loss on the device, then the code's values and the per-level errors to
  /// the host (metrics_accumulator, as `hsae::evaluate`). Synchronises.
  template <k_schedule_like S>
  evaluation evaluate(cref<float> x, const S& schedule) const {
    ::hsae::detail::expects<config_error>(started_, "cuda trainer engine: evaluate before start or restore");
    ::hsae::detail::expects<config_error>(schedule.k_max() <= host_model_.d_sae(), "evaluate: k_max=",
                                          schedule.k_max(), " exceeds d_sae=", host_model_.d_sae());
    const std::int64_t by_bytes =
        std::int64_t(eval_chunk_bytes / (std::size_t(host_model_.d_sae()) * sizeof(Storage) + 1));
    const std::int64_t chunk = std::max<std::int64_t>(1, std::min(eval_chunk_rows, by_bytes));
    metrics_accumulator acc;
    sparse_code<float> code;
    for (Eigen::Index r0 = 0; r0 < x.rows(); r0 += Eigen::Index(chunk)) {
      const Eigen::Index rows = std::min<Eigen::Index>(Eigen::Index(chunk), x.rows() - r0);
      const cref<float> part = x.middleRows(r0, rows);
      if constexpr (std::is_same_v<Storage, __half>) expect_half_range(part, "evaluation rows", r0);
      const device_matrix_view<const Storage> xd = upload_batch(part);
      encode(*be_, m_, xd, schedule.k_max(), eval_code_, eval_pre_, ws_.enc);
      hierarchical_loss(*be_, m_, xd, eval_code_, schedule, eval_loss_);
      const loss_stats ls = read_loss_stats(*be_, eval_loss_);
      copy_to_host(*be_, eval_code_.values, code.values);
      code.indices.resize(code.values.rows(), code.values.cols());  // metrics read the values only
      acc.add(part, code, ls);
    }
    return acc.result();
  }

  /// Host copy of the fp32 master weights (one download after steps).
  const sae<float, F>& model() const {
    if (model_stale_) {
      m_.download(*be_, host_model_);
      model_stale_ = false;
    }
    return host_model_;
  }
  /// Host copy of the optimizer: moments, step count and last learning rate.
  const adam_state<float, F>& optimizer() const {
    if (opt_stale_) {
      sae_gradients<float, F> m1, m2;
      opt_.get_state(*be_, m1, m2);
      host_opt_ = adam_state<float, F>(model(), ao_);
      host_opt_.set_state(opt_.steps(), std::move(m1), std::move(m2), opt_.last_lr());
      opt_stale_ = false;
    }
    return host_opt_;
  }
  /// Host copy of the dead-latent counters.
  const dead_latent_tracker& dead_latents() const {
    if (dead_stale_) {
      dead_.download(*be_, host_dead_);
      dead_stale_ = false;
    }
    return host_dead_;
  }

  /// The device state (for callers that go on with it on the GPU).
  const device_sae<Storage, F>& device_model() const { return m_; }
  const device_adam<Storage, F>& device_optimizer() const { return opt_; }
  const device_dead_latent_tracker& device_dead_latents() const { return dead_; }

 private:
  /// \throws hsae::numeric_error naming the first entry of `x` that half storage cannot
  ///         hold (|v| > 65504 would become inf); `row0` is added to the row shown.
  static void expect_half_range(cref<float> x, const char* what = "training batch", Eigen::Index row0 = 0) {
    for (Eigen::Index r = 0; r < x.rows(); ++r)
      for (Eigen::Index c = 0; c < x.cols(); ++c)
        if (std::fabs(x(r, c)) > 65504.0f)
          ::hsae::detail::throw_error<numeric_error>(what, ": the value ", x(r, c), " at [", row0 + r, ", ", c,
                                              "] exceeds the range of half storage (65504); scale the data or "
                                              "use float or bfloat16 storage");
  }

  /// Copies `x` into the reused device batch (fp32), then converts it on the device to
  /// Storage. The host rows may be reused when this returns (pageable copies are staged).
  device_matrix_view<const Storage> upload_batch(cref<float> x) const {
    copy_to_device(*be_, x, x_f32_);
    if constexpr (std::is_same_v<Storage, float>) {
      return std::as_const(x_f32_).view();
    } else {
      x_s_.resize(*be_, x_f32_.rows(), x_f32_.cols());
      convert(x_f32_.data(), x_s_.data(), x_f32_.size(), be_->stream());
      return std::as_const(x_s_).view();
    }
  }

  const cuda_backend* be_;
  device_sae<Storage, F> m_;
  device_adam<Storage, F> opt_;
  device_dead_latent_tracker dead_;
  adam_options ao_{};
  bool started_ = false;
  // Scratch reused by steps and evaluations (mutable: evaluate is const for the trainer).
  mutable device_train_workspace<Storage, F> ws_;
  mutable device_matrix<float> x_f32_;
  mutable device_matrix<Storage> x_s_;
  mutable device_matrix<Storage> eval_pre_;
  mutable device_code eval_code_;
  mutable device_loss_workspace eval_loss_;
  // Host views, refreshed on demand.
  mutable sae<float, F> host_model_;
  mutable adam_state<float, F> host_opt_;
  mutable dead_latent_tracker host_dead_;
  mutable bool model_stale_ = false, opt_stale_ = false, dead_stale_ = false;
};

}  // namespace cuda::detail

/// The CUDA engine with fp32 storage: `trainer<float, F, S, cuda_backend>`.
template <cpu_scalar T, int F>
class training_engine<cuda_backend, T, F> : public cuda::detail::cuda_training_engine<float, T, F> {
 public:
  using cuda::detail::cuda_training_engine<float, T, F>::cuda_training_engine;
};

/// The CUDA engine with `Storage` storage: `trainer<float, F, S, cuda_with_storage<Storage>>`.
template <class Storage, cpu_scalar T, int F>
class training_engine<cuda_with_storage<Storage>, T, F> : public cuda::detail::cuda_training_engine<Storage, T, F> {
 public:
  using cuda::detail::cuda_training_engine<Storage, T, F>::cuda_training_engine;
};

static_assert(training_engine_for<training_engine<cuda_backend, float, dynamic>, float, dynamic, dynamic_k_schedule>);
static_assert(training_engine_for<training_engine<cuda_with_storage<__nv_bfloat16>, float, 64>, float, 64,
                                  k_schedule<8, 16>>);

HSAE_NAMESPACE_END
