// SPDX-License-Identifier: Apache-2.0
/// \file cuda/train_step.cuh
/// `train_step` on the GPU: the CUDA counterpart of cpu/train_step.hpp, composing the same
/// pieces in the same way (check the batch, optional finite check, encode with sorted
/// top-K and, when latents may be dead, AuxK's selection over the dead latents in the
/// same read of the pre-activations, schedule loss forward and decoder backward, AuxK
/// backward, sparse encoder backward, dead-latent update, fused constrained Adam).
/// Same name and argument order as the CPU function: generic code calls
/// `train_step(be, model, opt, dead, x, schedule, ws, options)` for either backend.
///
/// Asynchronous: the step is enqueued on `be.stream()` and nothing synchronises. The
/// statistics that live on the device (loss, per-level errors, AuxK loss, gradient norm,
/// dead counts) are gathered into one small block of device memory; `read_step_stats`
/// copies it to the host with one copy (and synchronises), like `read_loss_stats`.
///
/// Differences from the CPU step, all consequences of not synchronising:
///  - A batch holding NaN/Inf (with `check_finite`) cannot throw before anything changes.
///    The finite check is a device reduction whose flag the optimizer and the dead-latent
///    update read on the device: the step then changes nothing (model, moments, storage
///    copies, dead counters), and `read_step_stats` throws the CPU's hsae::numeric_error
///    naming the entry and takes the step back from the optimizer's step count. A step
///    whose gradient norm is not finite is reported the same way (as `check_last_step`);
///    its model and moments are unchanged, and its dead-latent update is applied, as on
///    the CPU (whose update runs before the optimizer throws).
///  - The dead count is not known on the host. AuxK's selection and backward run when the
///    tracker's host-side bound says latents may be dead (`may_have_dead`); the backward
///    then reads the count on the device, so a step with no dead latent adds nothing and
///    reports an AuxK loss of 0, as the CPU. The bound is the largest counter plus the
///    rows counted since; `read_step_stats` with the tracker tightens it from the largest
///    counter the step recorded, so a run whose latents all keep firing skips AuxK.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../k_schedule.hpp"
#include "../step_types.hpp"
#include "auxk.cuh"
#include "backend.cuh"
#include "dead_latents.cuh"
#include "detail/train_step.cuh"
#include "detail/types.cuh"
#include "encode.cuh"
#include "loss.cuh"
#include "memory.cuh"
#include "model.cuh"
#include "optimizer.cuh"
#include "topk.cuh"

HSAE_NAMESPACE_BEGIN

/// Everything one CUDA step reads and writes besides the model, optimizer and tracker;
/// reuse it across steps so that nothing is allocated once the shapes settle.
template <class T = float, int F = dynamic>
  requires cuda_storage<T>
struct device_train_workspace {
  device_matrix<T> pre;  ///< [B, d_sae] pre-activations (AuxK's selection reads them)
  device_code code;      ///< [B, K] sorted top-K
  device_code aux_code;  ///< [B, min(k_aux, d_sae)] AuxK selection (when it ran)
  device_gradients<F> grads;
  encode_workspace<T> enc;
  device_loss_workspace loss;
  device_auxk_workspace aux;
  /// The step's record (cuda::detail::step_record followed by the level errors).
  device_buffer<unsigned char> record;

  /// What the host knows of the last step, for `read_step_stats` (set by train_step).
  struct pending_step {
    bool valid = false;      ///< a step has been enqueued
    bool aux_ran = false;    ///< AuxK's selection and backward ran
    double lr = 0;           ///< the step's learning rate
    std::int64_t rows = 0;   ///< B
    int d_model = 0;         ///< D
    std::vector<int> level_k;
    device_dead_latent_tracker::position dead_at;  ///< the tracker after the step's update
  } pending;
};

/// The CPU's step_stats plus what the GPU step also records.
struct device_step_stats : step_stats {
  std::int64_t dead_after_update = 0;        ///< dead latents after this step's update
  std::int64_t max_tokens_since_fired = 0;  ///< the largest dead-latent counter after it
};

namespace cuda::detail {

template <class T, int F, class S>
void check_train_step(const device_sae<T, F>& m, const device_dead_latent_tracker& dead,
                      device_matrix_view<const T> x, const S& schedule, const step_options& so) {
  using ::hsae::detail::expects;
  so.validate();
  m.check_shapes();
  expects<shape_error>(x.cols == m.d_model(), "batch has width ", x.cols, ", expected d_model=", m.d_model(),
                       " (batch shape [", x.rows, ", ", x.cols, "])");
  expects<shape_error>(x.rows >= 1, "batch is empty");
  expects<shape_error>(x.data != nullptr, "cuda train_step: the batch pointer is null");
  const int K = schedule.k_max();
  expects<config_error>(K <= m.d_sae(), "k_max=", K, " exceeds d_sae=", m.d_sae());
  expects<config_error>(K <= cuda_topk_max_k, "k_max=", K, " exceeds the GPU top-k's maximum ", cuda_topk_max_k);
  expects<shape_error>(dead.d_sae() == m.d_sae(), "cuda train_step: the dead-latent tracker has ", dead.d_sae(),
                       " latents, the model d_sae=", m.d_sae());
  if (so.use_auxk) {
    const int ka = std::min(so.auxk.resolved_k_aux(m.d_model()), m.d_sae());
    // alpha = 0 never runs AuxK (as on the CPU), so any k_aux is accepted then.
    expects<config_error>(so.auxk.alpha == 0 || ka <= cuda_topk_max_k_aux, "auxk: k_aux=", ka, " exceeds the GPU top-k's AuxK maximum ",
                          cuda_topk_max_k_aux);
  }
}

}  // namespace cuda::detail

/// One training step on the device batch `x [B, d_model]` (storage type T) under
/// `schedule` (k_max = K), enqueued on be.stream(); read its statistics with
/// `read_step_stats`. `x` must stay valid until the step has run on the stream.
/// A rejected step (NaN/Inf batch, non-finite gradient norm) changes nothing on the
/// device, but only `read_step_stats` takes it back from the optimizer's step count: a
/// loop that skips reading some steps' statistics should check the batches itself (or
/// read every step) if they can hold NaN/Inf, else the learning-rate schedule runs one
/// step ahead per unread rejected step.
/// Determinism: with `be.deterministic` (the default) the step is bitwise reproducible
/// run to run on one device (cuBLAS's GEMM for a fixed algorithm; no float atomics).
/// \throws hsae::shape_error on a batch of the wrong width or an empty batch,
///         hsae::config_error if K > d_sae, K > cuda_topk_max_k, an invalid `so`
///         (step_options::validate: e.g. an AuxK alpha that is negative, NaN or Inf),
///         or min(k_aux, d_sae) > cuda_topk_max_k_aux. A non-finite batch is reported by
///         `read_step_stats` (see the file comment).
template <class T, int F, k_schedule_like S>
void train_step(const cuda_backend& be, device_sae<T, F>& m, device_adam<T, F>& opt, device_dead_latent_tracker& dead,
                device_matrix_view<const std::type_identity_t<T>> x, const S& schedule,
                device_train_workspace<T, F>& ws, const step_options& so = {}) {
  static_assert(schedule_fits_width<S, F>, "hsae::train_step: the schedule's k_max exceeds the dictionary width F");
  cuda::detail::check_train_step(m, dead, x, schedule, so);
  const int K = schedule.k_max();
  const std::size_t levels = schedule.size();
  const std::size_t n = std::size_t(x.rows) * std::size_t(x.cols);

  ws.pending.valid = false;  // until this step is fully enqueued (a throw leaves no record to read)
  ws.record.resize(be, cuda::detail::step_record_bytes(levels));
  auto* rec = reinterpret_cast<cuda::detail::step_record*>(ws.record.data());
  HSAE_CUDA_TRY(cudaMemsetAsync(rec, 0, sizeof(cuda::detail::step_record), be.stream()));
  if (so.check_finite) cuda::detail::finite_check(x.data, n, rec, be.stream());

  // AuxK runs when latents may be dead; the backward reads the exact count on the device.
  const bool aux = so.use_auxk && so.auxk.alpha > 0 && dead.may_have_dead();
  cuda::detail::pre_activations(be, m, x, ws.pre, ws.enc);
  if (aux) {
    const int ka = std::min(so.auxk.resolved_k_aux(m.d_model()), m.d_sae());
    topk_with_auxk(be, std::as_const(ws.pre).view(), K, dead.dead_mask(), ka, ws.code, ws.aux_code);
  } else {
    topk(be, std::as_const(ws.pre).view(), K, ws.code);
  }
  ws.grads.zeros_like(be, m);
  hierarchical_loss_backward(be, m, x, ws.code, schedule, ws.grads, ws.loss);
  if (aux)
    auxk_backward(be, m, x, ws.aux_code, std::as_const(ws.loss.residual).view(), std::as_const(dead), so.auxk,
                  ws.grads, ws.aux);
  encoder_backward(be, m, x, ws.code, std::as_const(ws.loss.grad_values).view(), ws.grads, ws.loss.scratch);
  opt.step(be, m, ws.grads, &rec->reject);
  HSAE_CUDA_TRY(cudaMemcpyAsync(&rec->dead_before, dead.num_dead_device(), sizeof(int), cudaMemcpyDeviceToDevice,
                                be.stream()));
  dead.update(be, ws.code, -1, &rec->reject);

  cuda::detail::step_record_sources<T> src;
  src.loss = ws.loss.loss.data();
  src.level_sse = ws.loss.level_sse.data();
  src.levels = int(levels);
  src.aux_loss = aux ? ws.aux.loss.data() : nullptr;
  src.grad_norm = opt.norm_device();
  src.dead_after = dead.num_dead_device();
  src.max_since = dead.max_since_device();
  src.x = x.data;
  src.n = n;
  cuda::detail::gather_step_record(src, rec, be.stream());

  auto& p = ws.pending;
  p.valid = true;
  p.aux_ran = aux;
  p.lr = opt.last_lr();
  p.rows = x.rows;
  p.d_model = x.cols;
  p.level_k.resize(levels);
  for (std::size_t l = 0; l < levels; ++l) p.level_k[l] = int(schedule.k(l));
  p.dead_at = dead.where();
}

/// The statistics of the last `train_step` on `ws`, as the CPU step returns them (loss,
/// AuxK loss, gradient norm, learning rate, dead latents before the update, per-level
/// squared errors) plus the dead count after the update: one device-to-host copy of a
/// few dozen bytes. Synchronises be.stream().
/// \throws hsae::numeric_error when the step was rejected: the batch held NaN/Inf
///         (message names the first such entry, as the CPU's) or the gradient norm was not
///         finite. The step changed nothing on the device and is taken back from `opt`'s
///         step count and last lr (`device_adam::discard_last_step`, once per step). Call
///         it before the next step on `opt`. hsae::config_error when no step has run on
///         `ws`.
template <class T, int F>
device_step_stats read_step_stats(const cuda_backend& be, device_adam<T, F>& opt, device_train_workspace<T, F>& ws) {
  auto& p = ws.pending;
  ::hsae::detail::expects<config_error>(p.valid, "read_step_stats: no train_step has run on this workspace");
  const std::size_t levels = p.level_k.size();
  std::vector<unsigned char> bytes(cuda::detail::step_record_bytes(levels));
  HSAE_CUDA_TRY(cudaMemcpyAsync(bytes.data(), ws.record.data(), bytes.size(), cudaMemcpyDeviceToHost, be.stream()));
  be.synchronize();
  cuda::detail::step_record rec;
  std::memcpy(&rec, bytes.data(), sizeof rec);

  const bool bad_batch = rec.reject != 0;
  if (bad_batch || !std::isfinite(rec.grad_norm)) {
    opt.discard_last_step();  // once per step, however often this is called
    if (bad_batch) {
      const std::uint64_t flat = std::uint64_t(p.rows) * std::uint64_t(p.d_model) - rec.bad_key;
      ::hsae::detail::throw_error<numeric_error>("training batch contains a non-finite value (", double(rec.bad_value),
                                                 ") at [", flat / std::uint64_t(p.d_model), ", ",
                                                 flat % std::uint64_t(p.d_model), "]; the step was not applied");
    }
    ::hsae::detail::throw_error<numeric_error>("adam: the gradient norm is not finite (", rec.grad_norm,
                                               "); the step was not applied");
  }

  device_step_stats st;
  st.loss = rec.loss;
  st.aux_loss = p.aux_ran ? rec.aux_loss : 0.0;
  st.grad_norm = rec.grad_norm;
  st.lr = p.lr;
  st.dead = rec.dead_before;
  st.dead_after_update = rec.dead_after;
  st.max_tokens_since_fired = std::int64_t(rec.max_since);
  st.levels.loss = rec.loss;
  st.levels.level_k = p.level_k;
  st.levels.level_sse.resize(levels);
  if (levels > 0) std::memcpy(st.levels.level_sse.data(), bytes.data() + sizeof rec, levels * sizeof(double));
  st.levels.rows = p.rows;
  st.levels.d_model = p.d_model;
  return st;
}

/// `read_step_stats`, and tightens `dead`'s host bound on its counters from the largest
/// counter the step recorded (device_dead_latent_tracker::observe), so that AuxK's
/// selection is skipped while no latent can be dead. Pass the tracker the step used;
/// counters replaced since (a restore) are recognised and left alone.
template <class T, int F>
device_step_stats read_step_stats(const cuda_backend& be, device_adam<T, F>& opt, device_dead_latent_tracker& dead,
                                  device_train_workspace<T, F>& ws) {
  device_step_stats st = read_step_stats(be, opt, ws);  // throws on a rejected step: nothing to observe
  dead.observe(std::uint64_t(st.max_tokens_since_fired), ws.pending.dead_at);
  return st;
}

HSAE_NAMESPACE_END
