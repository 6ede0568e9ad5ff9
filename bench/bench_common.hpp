// SPDX-License-Identifier: Apache-2.0
// What the CPU step benchmarks share: the shapes, a fixture (model initialised on
// synthetic rows, one batch, optimizer, dead-latent tracker, workspace), the
// workspace size and the counters.
#pragma once

#include <benchmark/benchmark.h>
#include <hsae/hsae.hpp>

#include <cstdint>
#include <cstdlib>

namespace hsae_bench {

using T = float;

struct shape {
  int B, D, F;
};
/// The trainer issue's target shape, and a smoke shape.
constexpr shape big{4096, 768, 16384};
constexpr shape small{256, 64, 1024};

inline const shape& shape_of(std::int64_t id) { return id == 0 ? big : small; }

struct fixture {
  hsae::cpu_backend be;
  hsae::sae<T> model;
  hsae::row_matrix<T> x;
  hsae::adam<T> opt;
  hsae::dead_latent_tracker dead;
  hsae::train_workspace<T> ws;

  explicit fixture(const shape& s) {
    if (const char* e = std::getenv("HSAE_BENCH_SCRATCH_MB")) be.scratch_bytes = std::size_t(std::atoll(e)) << 20;
    hsae::synthetic_options so;
    so.d_model = s.D;
    so.n_atoms = 4 * s.D;
    so.mean_active = 16;
    so.seed = 7;
    hsae::synthetic_source<T> src(so, be);
    model = hsae::sae<T>(s.D, s.F);
    x = src.next(s.B);
    hsae::init(be, model, x);
    opt = hsae::adam<T>(model, hsae::adam_options{.lr = 1e-4, .warmup_steps = 0});
    dead = hsae::dead_latent_tracker(s.F);
  }
};

template <class V>
inline std::size_t bytes(const V& v) {
  return std::size_t(v.size()) * sizeof(typename V::value_type);
}
template <class T_>
inline std::size_t bytes(const hsae::row_matrix<T_>& m) {
  return std::size_t(m.size()) * sizeof(T_);
}

inline std::size_t workspace_bytes(const hsae::train_workspace<T>& ws) {
  std::size_t n = bytes(ws.pre) + bytes(ws.code.values) + std::size_t(ws.code.indices.size()) * 4;
  n += bytes(ws.loss.grad_values) + bytes(ws.loss.residual) + bytes(ws.loss.bias_rows) +
       std::size_t(ws.loss.level_err.size()) * 8 + ws.loss.staging.capacity() * sizeof(T) + bytes(ws.loss.pairs.offsets) +
       bytes(ws.loss.pairs.pairs) + bytes(ws.loss.chunk_offsets) + bytes(ws.loss.slot);
  n += bytes(ws.aux.code.values) + std::size_t(ws.aux.code.indices.size()) * 4 + bytes(ws.aux.grad_values) +
       bytes(ws.aux.q) + bytes(ws.aux.row_err) + bytes(ws.aux.pairs.offsets) + bytes(ws.aux.pairs.pairs);
  return n;
}

/// Sets `be`'s encoder GEMM from a benchmark argument: 0 Eigen fp32, 1 oneDNN fp32, 2 bf16
/// operands (the default library). False (the case skipped, with the reason) for oneDNN in
/// a build without it. The label names the GEMM that runs.
inline bool use_gemm(benchmark::State& state, hsae::cpu_backend& be, std::int64_t id) {
  if (id == 1 && !hsae::onednn_built()) {
    state.SkipWithError("built without oneDNN (HSAE_ONEDNN)");
    return false;
  }
  be.gemm = id == 0 ? hsae::cpu_gemm::eigen : id == 1 ? hsae::cpu_gemm::onednn : hsae::cpu_gemm::automatic;
  be.encoder_precision = id == 2 ? hsae::gemm_precision::bf16 : hsae::gemm_precision::fp32;
  state.SetLabel(hsae::encoder_gemm_info<T>(be));
  return true;
}

inline void set_counters(benchmark::State& state, const shape& s, std::size_t ws_bytes = 0) {
  const double gemm_flops = 2.0 * s.B * s.D * s.F;
  state.counters["GEMM_GFLOPs"] =
      benchmark::Counter(gemm_flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] = benchmark::Counter(double(s.B), benchmark::Counter::kIsIterationInvariantRate);
  if (ws_bytes) state.counters["workspace_MiB"] = double(ws_bytes) / double(1 << 20);
}


}  // namespace hsae_bench
