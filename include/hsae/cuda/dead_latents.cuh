// SPDX-License-Identifier: Apache-2.0
/// \file cuda/dead_latents.cuh
/// Dead-latent tracking on the GPU, the counterpart of dead_latents.hpp: per-latent
/// tokens-since-fired counters, and after every update the dead-latent bitmask (for the
/// top-k's AuxK selection) and the ascending list of dead latents with their count, all
/// on the device. Kernel design: cuda/detail/dead_latents.cuh.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../config.hpp"
#include "../dead_latents.hpp"
#include "../error.hpp"
#include "backend.cuh"
#include "detail/dead_latents.cuh"
#include "memory.cuh"
#include "model.cuh"

HSAE_NAMESPACE_BEGIN

class device_dead_latent_tracker {
 public:
  device_dead_latent_tracker() = default;
  /// Every counter at 0 (nothing dead). Asynchronous.
  /// \throws hsae::config_error on d_sae < 1 or dead_after_tokens < 1.
  device_dead_latent_tracker(const cuda_backend& be, int d_sae, std::int64_t dead_after_tokens = 10'000'000)
      : d_sae_(d_sae), dead_after_(dead_after_tokens) {
    ::hsae::detail::expects<config_error>(d_sae >= 1, "device_dead_latent_tracker: d_sae must be >= 1, got ", d_sae);
    ::hsae::detail::expects<config_error>(
        dead_after_tokens >= 1, "device_dead_latent_tracker: dead_after_tokens must be >= 1, got ", dead_after_tokens);
    since_.resize(be, std::size_t(d_sae));
    mask_.resize(be, std::size_t((d_sae + 31) / 32));
    list_.resize(be, std::size_t(d_sae));
    count_.resize(be, 1);
    max_dev_.resize(be, 1);
    since_.zero(be);
    refresh(be);
    identity_ = next_identity();
  }

  /// Counts the code's rows as seen tokens; latents with a positive value among the
  /// first `k` ranks (all ranks when k < 0) fired and restart their count. Then rebuilds
  /// the mask, list and count. Asynchronous.
  /// \param reject  optional device flag read when the update runs: nonzero leaves the
  ///                 counters unchanged (`train_step` passes its finite check of the batch).
  void update(const cuda_backend& be, const device_code& code, int k = -1, const int* reject = nullptr) {
    check_ready();
    ::hsae::detail::expects<shape_error>(
        code.indices.rows() == code.values.rows() && code.indices.cols() == code.values.cols(),
        "dead latents: the code's values and indices differ in shape");
    const int kk = k < 0 ? code.k() : std::min(k, code.k());
    const std::size_t bytes = cuda::detail::dead_latents_workspace_bytes(d_sae_);
    cuda::detail::update_dead_latents(state(), code.values.data(), code.indices.data(), code.rows(), code.k(), kk,
                                      scratch(be, bytes), bytes, be.stream(), reject);
    max_since_ += std::int64_t(code.rows());
    rows_counted_ += std::int64_t(code.rows());
  }

  /// False when no latent can be dead, known on the host without synchronising: every
  /// counter is at most a host bound, the largest counter last observed (uploaded, or
  /// read back with a step's statistics: `observe`) plus the tokens counted since. Early
  /// in a run, and whenever every latent has fired within the last dead_after_tokens
  /// tokens before the last observation, this is false, and `train_step` skips AuxK's
  /// selection and backward altogether.
  bool may_have_dead() const { return max_since_ >= dead_after_; }

  /// The largest counter after the last update, on the device ([1]; what `observe` takes).
  const unsigned long long* max_since_device() const { return max_dev_.data(); }
  /// What identifies the current counters and how many rows updates have counted on them:
  /// a step records this after its update, and `observe` uses it to know how many rows
  /// were counted after the observed value (and to ignore a value from other counters).
  struct position {
    std::uint64_t identity = 0;
    std::int64_t rows_counted = 0;
  };
  position where() const { return {identity_, rows_counted_}; }
  /// Tightens the host bound with `largest`, the value of *max_since_device() right after
  /// the update at `at` (read back by read_step_stats).
  void observe(std::uint64_t largest, position at) {
    if (at.identity != identity_ || at.rows_counted > rows_counted_) return;  // other counters
    const std::int64_t bound = std::int64_t(largest) + (rows_counted_ - at.rows_counted);
    max_since_ = std::min(max_since_, bound);
  }

  /// Bit (f % 32) of word f / 32 is set when latent f is dead; [ceil(d_sae / 32)] words
  /// (the `dead_mask` argument of `topk_with_auxk`).
  const device_buffer<std::uint32_t>& dead_mask() const { return mask_; }
  /// Dead latents, ascending; the first `*num_dead_device()` entries are valid.
  const int* dead_list() const { return list_.data(); }
  const int* num_dead_device() const { return count_.data(); }

  /// Number of dead latents. Synchronises be.stream().
  std::int64_t num_dead(const cuda_backend& be) const {
    check_ready();
    int n = 0;
    HSAE_CUDA_TRY(cudaMemcpyAsync(&n, count_.data(), sizeof(int), cudaMemcpyDeviceToHost, be.stream()));
    be.synchronize();
    return n;
  }
  /// Dead latents in ascending order. Synchronises be.stream().
  std::vector<index_t> dead_latents(const cuda_backend& be) const {
    const std::int64_t n = num_dead(be);
    std::vector<index_t> out(static_cast<std::size_t>(n));
    if (n > 0) {
      HSAE_CUDA_TRY(
          cudaMemcpyAsync(out.data(), list_.data(), std::size_t(n) * sizeof(int), cudaMemcpyDeviceToHost, be.stream()));
      be.synchronize();
    }
    return out;
  }
  /// Tokens since each latent last fired. Synchronises be.stream().
  std::vector<std::int64_t> tokens_since_fired(const cuda_backend& be) const {
    check_ready();
    std::vector<std::int64_t> out(static_cast<std::size_t>(d_sae_));
    HSAE_CUDA_TRY(cudaMemcpyAsync(out.data(), since_.data(), out.size() * sizeof(std::int64_t), cudaMemcpyDeviceToHost,
                                  be.stream()));
    be.synchronize();
    return out;
  }
  /// Sets the counters (checkpoints) and rebuilds the mask and list. The host vector may
  /// be reused when the call returns.
  /// \throws hsae::shape_error unless there are d_sae counters.
  void set_tokens_since_fired(const cuda_backend& be, const std::vector<std::int64_t>& s) {
    check_ready();
    ::hsae::detail::expects<shape_error>(s.size() == std::size_t(d_sae_), "device_dead_latent_tracker: ", s.size(),
                                         " counters given, expected d_sae=", d_sae_);
    HSAE_CUDA_TRY(
        cudaMemcpyAsync(since_.data(), s.data(), s.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice, be.stream()));
    // Pageable source: cudaMemcpyAsync returns once `s` is staged.
    refresh(be);
    max_since_ = s.empty() ? 0 : *std::max_element(s.begin(), s.end());
    identity_ = next_identity();  // observations of the previous counters no longer apply
  }
  /// Copies a host tracker's counters (its dead_after_tokens must match).
  void upload(const cuda_backend& be, const dead_latent_tracker& host) {
    ::hsae::detail::expects<config_error>(host.dead_after_tokens() == dead_after_,
                                          "device_dead_latent_tracker: dead_after_tokens differ (host ",
                                          host.dead_after_tokens(), ", device ", dead_after_, ")");
    set_tokens_since_fired(be, host.tokens_since_fired());
  }
  /// Copies the counters into a host tracker of the same width. Synchronises.
  void download(const cuda_backend& be, dead_latent_tracker& host) const {
    host.set_tokens_since_fired(tokens_since_fired(be));
  }

  int d_sae() const { return d_sae_; }
  std::int64_t dead_after_tokens() const { return dead_after_; }

 private:
  void check_ready() const {
    ::hsae::detail::expects<config_error>(d_sae_ >= 1, "device_dead_latent_tracker: not constructed with a width");
  }
  cuda::detail::dead_latent_state state() {
    return {since_.data(), mask_.data(), list_.data(), count_.data(), max_dev_.data(), d_sae_, dead_after_};
  }
  static std::uint64_t next_identity() {
    static std::atomic<std::uint64_t> n{0};
    return ++n;
  }
  void* scratch(const cuda_backend& be, std::size_t bytes) {
    if (bytes > scratch_.size()) scratch_.resize(be, bytes);
    return scratch_.data();
  }
  void refresh(const cuda_backend& be) {
    const std::size_t bytes = cuda::detail::dead_latents_workspace_bytes(d_sae_);
    cuda::detail::update_dead_latents(state(), nullptr, nullptr, 0, 0, 0, scratch(be, bytes), bytes, be.stream());
  }

  int d_sae_ = 0;
  std::int64_t dead_after_ = 10'000'000;
  std::int64_t max_since_ = 0;     ///< host upper bound on every counter (may_have_dead)
  std::int64_t rows_counted_ = 0;  ///< rows counted by updates on the current counters
  std::uint64_t identity_ = 0;     ///< changes whenever the counters are replaced
  device_buffer<std::int64_t> since_;
  device_buffer<std::uint32_t> mask_;
  device_buffer<int> list_;
  device_buffer<int> count_;
  device_buffer<unsigned long long> max_dev_;
  device_buffer<unsigned char> scratch_;  ///< workspace of the update (grows only)
};

HSAE_NAMESPACE_END
