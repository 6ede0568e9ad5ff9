// SPDX-License-Identifier: Apache-2.0
// Shared pieces of the GPU benchmarks: a stream, CUDA-event timing, and random models,
// batches and codes built on the host once per configuration.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <vector>

#include <hsae/cpu/init.hpp>
#include <hsae/cuda/backend.cuh>
#include <hsae/cuda/memory.cuh>
#include <hsae/cuda/model.cuh>
#include <hsae/model.hpp>
#include <hsae/rng.hpp>

namespace hsae_bench {

struct stream_guard {
  cudaStream_t s = nullptr;
  stream_guard() { HSAE_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~stream_guard() { (void)cudaStreamDestroy(s); }
  stream_guard(const stream_guard&) = delete;
  stream_guard& operator=(const stream_guard&) = delete;
};

/// Times what `fn` enqueues on `stream` with two CUDA events; seconds.
class event_timer {
 public:
  event_timer() {
    HSAE_CUDA_TRY(cudaEventCreate(&start_));
    HSAE_CUDA_TRY(cudaEventCreate(&stop_));
  }
  ~event_timer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }
  event_timer(const event_timer&) = delete;
  event_timer& operator=(const event_timer&) = delete;
  template <class Fn>
  double time(cudaStream_t stream, Fn&& fn) {
    HSAE_CUDA_TRY(cudaEventRecord(start_, stream));
    fn();
    HSAE_CUDA_TRY(cudaEventRecord(stop_, stream));
    HSAE_CUDA_TRY(cudaEventSynchronize(stop_));
    float ms = 0;
    HSAE_CUDA_TRY(cudaEventElapsedTime(&ms, start_, stop_));
    return double(ms) * 1e-3;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

/// The benchmark loop: times each call of `fn` (work enqueued on `stream`) with CUDA
/// events as the iteration's manual time; returns the median in ms.
template <class Fn>
double timed_loop(benchmark::State& state, cudaStream_t stream, Fn&& fn) {
  event_timer timer;
  std::vector<double> ms;
  for (auto _ : state) {
    const double s = timer.time(stream, fn);
    state.SetIterationTime(s);
    ms.push_back(s * 1e3);
  }
  if (ms.empty()) return 0;
  std::nth_element(ms.begin(), ms.begin() + std::ptrdiff_t(ms.size() / 2), ms.end());
  return ms[ms.size() / 2];
}

/// A host SAE [D, F] with random unit decoder rows and zero decoder bias.
inline hsae::sae<float> random_model(int D, int F, std::uint64_t seed) {
  hsae::sae<float> m(D, F);
  hsae::init(hsae::cpu_backend{}, m, hsae::row_matrix<float>(0, D),
             {.seed = seed, .b_dec = hsae::decoder_bias_init::zero});
  return m;
}

/// B rows of N(0, 1), as float on the host.
inline hsae::row_matrix<float> random_batch(int B, int D, std::uint64_t seed) {
  hsae::rng gen(seed);
  hsae::row_matrix<float> x(B, D);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = float(gen.normal());
  return x;
}

/// A code of K distinct random latents (of F) per row with descending values
/// (K - t) / K, uploaded into `code`.
inline void random_code(const hsae::cuda_backend& be, int B, int K, int F, std::uint64_t seed,
                        hsae::device_code& code) {
  hsae::rng gen(seed);
  hsae::row_matrix<float> values(B, K);
  hsae::index_matrix indices(B, K);
  std::vector<int> used;
  for (int b = 0; b < B; ++b) {
    used.clear();
    for (int t = 0; t < K; ++t) {
      int f;
      bool dup;
      do {
        f = int(gen.below(std::uint64_t(F)));
        dup = false;
        for (int u : used) dup |= u == f;
      } while (dup);
      used.push_back(f);
      indices(b, t) = f;
      values(b, t) = float(K - t) / float(K);
    }
  }
  hsae::copy_to_device(be, hsae::cref<float>(values), code.values);
  code.indices.resize(be, B, K);
  HSAE_CUDA_TRY(cudaMemcpyAsync(code.indices.data(), indices.data(), std::size_t(indices.size()) * sizeof(int),
                                cudaMemcpyHostToDevice, be.stream()));
}

/// The benchmarks' main: "no CUDA device" and exit 0 without one; `after` runs once the
/// benchmarks are done (summary tables).
template <class After>
int run_main(int argc, char** argv, After&& after) {
  if (!hsae::cuda_device_available()) {
    std::puts("no CUDA device");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  after();
  benchmark::Shutdown();
  return 0;
}

}  // namespace hsae_bench
