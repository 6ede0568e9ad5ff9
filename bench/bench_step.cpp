// SPDX-License-Identifier: Apache-2.0
// The full CPU training step against the encoder GEMM alone, and under a single-K
// schedule against the all-prefix schedule, side by side in one run.
//
// Shapes: "big" is B=4096, D=768, F=16384 (the target shape); "small" is a
// smoke shape. Counts per step at the big shape, K=64:
//   encoder GEMM          2*B*D*F       = 103.1 GFLOP (the floor of the step)
//   top-k read of pre     4*B*F bytes   = 268 MB
//   loss + decoder grad   ~6*B*K*D FLOP = 1.2 GFLOP (streaming, never [B,K,D])
//   sparse encoder grad   ~4*B*K*D FLOP = 0.8 GFLOP
//   Adam                  F*D*2 params, ~28 bytes each read+written = 0.7 GB
// Counters: GFLOP/s of the GEMM FLOPs (so step/GEMM time ratio = GEMM-rate ratio),
// workspace MiB (all buffers a step keeps between calls, model and optimizer excluded).
// The GEMM and the step run with each encoder GEMM (argument "gemm", cpu/gemm.hpp):
// 0 Eigen fp32, 1 oneDNN fp32, 2 bf16 operands (oneDNN's bf16 matmul where the CPU has
// one, else the emulation); oneDNN cases skip in a build without it.
#include <benchmark/benchmark.h>
#include <hsae/hsae.hpp>

#include "bench_common.hpp"

namespace {

using namespace hsae_bench;

// pre = (x - b_dec) W_enc^T alone: the floor every step pays.
void BM_encoder_gemm(benchmark::State& state) {
  const shape& s = shape_of(state.range(0));
  fixture f(s);
  if (!use_gemm(state, f.be, state.range(1))) return;
  hsae::row_matrix<T> pre;
  hsae::cpu::detail::encoder_gemm(f.be, f.model, f.x, pre);  // make the plan
  for (auto _ : state) {
    hsae::cpu::detail::encoder_gemm(f.be, f.model, f.x, pre);
    benchmark::DoNotOptimize(pre.data());
  }
  set_counters(state, s);
}

template <class Schedule>
void BM_train_step(benchmark::State& state) {
  const shape& s = shape_of(state.range(0));
  fixture f(s);
  if (!use_gemm(state, f.be, state.range(1))) return;
  const Schedule sched;
  hsae::train_step(f.be, f.model, f.opt, f.dead, f.x, sched, f.ws);  // warm the workspace
  for (auto _ : state) {
    const hsae::step_stats st = hsae::train_step(f.be, f.model, f.opt, f.dead, f.x, sched, f.ws);
    benchmark::DoNotOptimize(st.loss);
  }
  set_counters(state, s, workspace_bytes(f.ws));
}

// Loss forward + backward alone (encode done once outside the loop).
template <class Schedule>
void BM_loss_backward(benchmark::State& state) {
  const shape& s = shape_of(state.range(0));
  fixture f(s);
  if (!use_gemm(state, f.be, state.range(1))) return;
  const Schedule sched;
  hsae::encode(f.be, f.model, f.x, sched.k_max(), f.ws.code, f.ws.pre);
  hsae::zero_gradients(f.be, f.ws.grads, f.model);
  for (auto _ : state) {
    const hsae::loss_stats ls = hsae::hierarchical_loss_backward(f.be, f.model, f.x, f.ws.code, sched, f.ws.grads,
                                                                 f.ws.loss);
    hsae::encoder_backward(f.be, f.model, f.x, f.ws.code, f.ws.loss.grad_values, f.ws.grads, f.ws.loss.pairs);
    benchmark::DoNotOptimize(ls.loss);
  }
  set_counters(state, s, workspace_bytes(f.ws));
}

// The default encoder GEMM only (oneDNN fp32 where built, else Eigen).
void big_and_small(benchmark::internal::Benchmark* b) {
  b->ArgNames({"shape", "gemm"})->Unit(benchmark::kMillisecond)->UseRealTime();
  for (int shape_id : {0, 1}) b->Args({shape_id, hsae::onednn_built() ? 1 : 0});
}
void with_gemms(benchmark::internal::Benchmark* b) {
  b->ArgNames({"shape", "gemm"})->Unit(benchmark::kMillisecond)->UseRealTime();
  for (int shape_id : {0, 1})
    for (int g : {0, 1, 2}) b->Args({shape_id, g});
}

}  // namespace

BENCHMARK(BM_encoder_gemm)->Apply(with_gemms);
BENCHMARK_TEMPLATE(BM_train_step, hsae::top_k<64>)->Apply(with_gemms);
BENCHMARK_TEMPLATE(BM_train_step, hsae::all_prefixes<64>)->Apply(with_gemms);
BENCHMARK_TEMPLATE(BM_train_step, hsae::top_k<32>)->Apply(big_and_small);
BENCHMARK_TEMPLATE(BM_train_step, hsae::all_prefixes<32>)->Apply(big_and_small);
BENCHMARK_TEMPLATE(BM_train_step, hsae::all_prefixes<256>)->Apply(big_and_small);
BENCHMARK_TEMPLATE(BM_loss_backward, hsae::top_k<64>)->Apply(big_and_small);
BENCHMARK_TEMPLATE(BM_loss_backward, hsae::all_prefixes<64>)->Apply(big_and_small);

BENCHMARK_MAIN();
