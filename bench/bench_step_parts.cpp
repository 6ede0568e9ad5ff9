// SPDX-License-Identifier: Apache-2.0
// The CPU training step taken apart, each part against its floor, in one run: the memory
// bandwidth (a STREAM-like triad over the backend's threads, best of 5) is measured first,
// and every part's counters give the bytes it cannot avoid, the floor those bytes take at
// that bandwidth, and the part's time as a multiple of it. The GEMM's floor is FLOPs; its
// counter is GFLOP/s. The big shape, B=4096 D=768 F=16384, K=64, all prefixes, default
// encoder GEMM (oneDNN fp32 where built; HSAE_BENCH_GEMM=0|1|2 as bench_step's "gemm").
// HSAE_BENCH_SMALL=1 runs the small shape and a 4 MiB triad (the smoke entry).
//
// Floor bytes per part (T = 4 bytes; "touched" = latents some row of the batch selected,
// counted on the fixture's batch):
//   bias, ReLU, top-k       pre read and written in place          2 B F T
//   zero gradients          W_enc and W_dec gradients written      2 F D T
//   loss + decoder backward x read, the touched W_dec rows read, their gradient rows
//                           read and written, the residual written (B + 3 touched + B) D T
//   encoder backward        x read, the touched W_enc gradient rows read and written
//                                                                 (B + 2 touched) D T
//   Adam                    W_enc, W_dec: parameter, gradient, both moments read;
//                           parameter and moments written          2 F D 7 T
// The floors assume each array crosses memory once; a part above its floor re-reads or
// stages. The two sparse passes also report their algorithm's bytes (algo_MB, algo_ms):
//   loss + decoder backward   each (row, rank) gathers its decoder row and stages v_t S_t,
//                             written and read again: (3 B K + 2 B + 2 touched) D T
//   encoder backward          each pair reads its row of x: (B K + 2 touched) D T
#include <benchmark/benchmark.h>
#include <hsae/hsae.hpp>

#include "bench_common.hpp"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <vector>

namespace {

using namespace hsae_bench;
using schedule = hsae::all_prefixes<64>;

/// Bytes per second of a triad a = b + s c over three arrays of 64 Mi floats (768 MiB),
/// counted as STREAM does (three arrays, no write-allocate), on be's threads: best of 5.
double triad_bandwidth(const hsae::cpu_backend& be) {
  static const double bw = [&] {
    const std::ptrdiff_t n = std::ptrdiff_t(std::getenv("HSAE_BENCH_SMALL") != nullptr ? 1 : 64) << 20;
    std::vector<float> a(std::size_t(n), 0.f), b(std::size_t(n), 1.f), c(std::size_t(n), 2.f);
    double best = 0;
    for (int rep = 0; rep < 5; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      hsae::cpu::detail::parallel_blocks(be, n, std::ptrdiff_t(1) << 16, [&](std::ptrdiff_t lo, std::ptrdiff_t hi) {
        for (std::ptrdiff_t i = lo; i < hi; ++i) a[std::size_t(i)] = b[std::size_t(i)] + 0.5f * c[std::size_t(i)];
      });
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, 3.0 * double(n) * sizeof(float) / s);
    }
    benchmark::DoNotOptimize(a.data());
    return best;
  }();
  return bw;
}

/// The big shape; HSAE_BENCH_SMALL=1 (the smoke entry) the small one.
const shape& S() {
  static const shape& s = std::getenv("HSAE_BENCH_SMALL") != nullptr ? small : big;
  return s;
}

struct parts_fixture : fixture {
  std::int64_t touched = 0;
  hsae::step_stats st;
  schedule sched;

  parts_fixture() : fixture(S()) {
    if (const char* g = std::getenv("HSAE_BENCH_GEMM")) {
      const int id = std::atoi(g);
      be.gemm = id == 0 ? hsae::cpu_gemm::eigen : id == 1 ? hsae::cpu_gemm::onednn : hsae::cpu_gemm::automatic;
      be.encoder_precision = id == 2 ? hsae::gemm_precision::bf16 : hsae::gemm_precision::fp32;
    }
    hsae::train_step(be, model, opt, dead, x, sched, ws, st);  // sizes every buffer
    std::vector<char> seen(std::size_t(model.d_sae()), 0);
    for (Eigen::Index i = 0; i < ws.code.indices.size(); ++i) seen[std::size_t(ws.code.indices.data()[i])] = 1;
    touched = std::count(seen.begin(), seen.end(), char(1));
  }
};

parts_fixture& shared() {
  static parts_fixture f;
  return f;
}

/// Counters of a part with `floor_bytes` it cannot avoid.
void set_floor(benchmark::State& state, double floor_bytes) {
  const double bw = triad_bandwidth(shared().be);
  state.counters["floor_MB"] = floor_bytes * 1e-6;
  state.counters["floor_ms"] = floor_bytes / bw * 1e3;
  state.counters["GB/s"] = benchmark::Counter(floor_bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["triad_GB/s"] = bw * 1e-9;
}

constexpr double T_bytes = sizeof(T);

/// Counters of what the part's algorithm moves (gathers and staging included), beside the
/// floor: the time that many bytes take at the triad bandwidth.
void set_algorithm_bytes(benchmark::State& state, double bytes) {
  state.counters["algo_MB"] = bytes * 1e-6;
  state.counters["algo_ms"] = bytes / triad_bandwidth(shared().be) * 1e3;
}

void BM_triad(benchmark::State& state) {
  const double bw = triad_bandwidth(shared().be);
  for (auto _ : state) benchmark::DoNotOptimize(bw);
  state.counters["triad_GB/s"] = bw * 1e-9;
  state.SetLabel(std::to_string(shared().be.threads()) + " threads");
}

void BM_part_encoder_gemm(benchmark::State& state) {
  auto& f = shared();
  for (auto _ : state) {
    hsae::cpu::detail::encoder_gemm(f.be, f.model, f.x, f.ws.pre);
    benchmark::DoNotOptimize(f.ws.pre.data());
  }
  set_counters(state, S());
  state.SetLabel(hsae::encoder_gemm_info<T>(f.be));
}

void BM_part_bias_relu_topk(benchmark::State& state) {
  auto& f = shared();
  for (auto _ : state) hsae::cpu::detail::bias_relu_topk(f.be, f.model, f.sched.k_max(), f.ws.code, f.ws.pre);
  set_floor(state, 2.0 * S().B * S().F * T_bytes);
  // Leave the code of the encoded batch for the parts after it.
  hsae::cpu::detail::encode_unchecked(f.be, f.model, f.x, f.sched.k_max(), f.ws.code, f.ws.pre);
}

void BM_part_zero_gradients(benchmark::State& state) {
  auto& f = shared();
  for (auto _ : state) hsae::zero_gradients(f.be, f.ws.grads, f.model);
  set_floor(state, 2.0 * S().F * S().D * T_bytes);
}

void BM_part_loss_decoder_backward(benchmark::State& state) {
  auto& f = shared();
  for (auto _ : state)
    hsae::cpu::detail::schedule_loss_unchecked<true>(f.be, f.model, f.x, f.ws.code, f.sched, &f.ws.grads, f.ws.loss,
                                                     f.st.levels);
  set_floor(state, (2.0 * S().B + 3.0 * double(f.touched)) * S().D * T_bytes);
  // This algorithm's bytes: every (row, rank) gathers its decoder row and stages v_t S_t
  // (written, then read by the per-latent sum), plus the floor's gradient rows, x, residual.
  const double BK = double(S().B) * f.sched.k_max();
  set_algorithm_bytes(state, (3.0 * BK + 2.0 * S().B + 2.0 * double(f.touched)) * S().D * T_bytes);
  state.counters["touched"] = double(f.touched);
}

void BM_part_encoder_backward(benchmark::State& state) {
  auto& f = shared();
  for (auto _ : state)
    hsae::cpu::detail::encoder_backward_unchecked(f.be, f.model, f.x, f.ws.code, f.ws.loss.grad_values, f.ws.grads,
                                                  f.ws.loss.pairs, f.ws.loss.gsum, f.ws.loss.touched);
  set_floor(state, (double(S().B) + 2.0 * double(f.touched)) * S().D * T_bytes);
  // This algorithm's bytes: each (row, rank) pair reads its row of x (from cache when the
  // batch fits), and the gradient rows are read and written once.
  set_algorithm_bytes(state, (double(S().B) * f.sched.k_max() + 2.0 * double(f.touched)) * S().D * T_bytes);
}

void BM_part_adam(benchmark::State& state) {
  auto& f = shared();
  for (auto _ : state) benchmark::DoNotOptimize(f.opt.step(f.be, f.model, f.ws.grads));
  set_floor(state, 2.0 * S().F * S().D * 7 * T_bytes);
}

void BM_whole_step(benchmark::State& state) {
  auto& f = shared();
  for (auto _ : state) hsae::train_step(f.be, f.model, f.opt, f.dead, f.x, f.sched, f.ws, f.st);
  set_counters(state, S());
  state.SetLabel(hsae::encoder_gemm_info<T>(f.be));
}

void opts(benchmark::internal::Benchmark* b) { b->Unit(benchmark::kMillisecond)->UseRealTime(); }

}  // namespace

BENCHMARK(BM_triad)->Iterations(1);
BENCHMARK(BM_part_encoder_gemm)->Apply(opts);
BENCHMARK(BM_part_bias_relu_topk)->Apply(opts);
BENCHMARK(BM_part_zero_gradients)->Apply(opts);
BENCHMARK(BM_part_loss_decoder_backward)->Apply(opts);
BENCHMARK(BM_part_encoder_backward)->Apply(opts);
BENCHMARK(BM_part_adam)->Apply(opts);
BENCHMARK(BM_whole_step)->Apply(opts);

BENCHMARK_MAIN();
