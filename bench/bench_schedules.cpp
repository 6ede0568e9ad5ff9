// SPDX-License-Identifier: Apache-2.0
// Microbenchmarks comparing k-schedules on the CPU: the loss forward+backward (with the
// sparse encoder backward) and the full train step under
//   single-K     (K, 1)                          plain TopK
//   all-prefix   (1, 1), (2, 1), ..., (K, 1)     HierarchicalTopK as in the paper
//   geometric    (K/8, 1), (K/4, 1), (K/2, 1), (K, 1)
//   Multi-TopK   (K/4, 1), (K, 1/8)              Gao et al.'s (k, 4k) with k = K/4
// for K in {16, 32, 64, 128, 256}, each reported with its time ratio to the single-K
// case of the same K (counter `vs_single_K`), measured in the same run. At the end a
// table of the ratios is printed.
//
// Shape 0 is B=4096, D=768, F=16384 (the trainer issue's); shape 1 a smoke shape.
// Schedules are run-time `dynamic_k_schedule`s (the compile-time ones run the same code).
#include <benchmark/benchmark.h>
#include <hsae/hsae.hpp>

#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <tuple>

#include "bench_common.hpp"
#include "schedule_kinds.hpp"

namespace {

using namespace hsae_bench;

// (what, shape, K, kind) -> mean ms per iteration, filled as the cases run.
std::map<std::tuple<std::string, int, int, int>, double> g_ms;

const fixture& shared_fixture(int shape_id) {
  static std::map<int, fixture> f;
  auto it = f.find(shape_id);
  if (it == f.end()) it = f.try_emplace(shape_id, shape_of(shape_id)).first;
  return it->second;
}

template <class Body>
void timed(benchmark::State& state, const std::string& what, int shape_id, int K, int kind, Body&& body) {
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) body();
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / double(state.iterations());
  g_ms[{what, shape_id, K, kind}] = ms;
  // Cases are registered single-K first for every K, so its time is known here.
  if (const auto s = g_ms.find({what, shape_id, K, single_k}); s != g_ms.end())
    state.counters["vs_single_K"] = ms / s->second;
  state.SetLabel(schedule_kind_name[kind]);
}

void BM_schedule_loss(benchmark::State& state) {
  const int shape_id = int(state.range(0)), K = int(state.range(1)), kind = int(state.range(2));
  const fixture& base = shared_fixture(shape_id);
  const hsae::dynamic_k_schedule sched = make_schedule(kind, K);
  hsae::train_workspace<T> ws;
  hsae::encode(base.be, base.model, base.x, K, ws.code, ws.pre);
  hsae::zero_gradients(base.be, ws.grads, base.model);
  auto body = [&] {
    const hsae::loss_stats ls =
        hsae::hierarchical_loss_backward(base.be, base.model, base.x, ws.code, sched, ws.grads, ws.loss);
    hsae::encoder_backward(base.be, base.model, base.x, ws.code, ws.loss.grad_values, ws.grads, ws.loss.pairs);
    benchmark::DoNotOptimize(ls.loss);
  };
  body();  // warm the workspace (first-touch of the staging buffer is not part of a step)
  timed(state, "loss", shape_id, K, kind, body);
}

void BM_schedule_step(benchmark::State& state) {
  const int shape_id = int(state.range(0)), K = int(state.range(1)), kind = int(state.range(2));
  const fixture& base = shared_fixture(shape_id);
  const hsae::dynamic_k_schedule sched = make_schedule(kind, K);
  hsae::sae<T> model = base.model;  // every case starts from the same model
  hsae::adam<T> opt(model, hsae::adam_options{.lr = 1e-4, .warmup_steps = 0});
  hsae::dead_latent_tracker dead(model.d_sae());
  hsae::train_workspace<T> ws;
  hsae::train_step(base.be, model, opt, dead, base.x, sched, ws);  // warm the workspace
  timed(state, "step", shape_id, K, kind, [&] {
    const hsae::step_stats st = hsae::train_step(base.be, model, opt, dead, base.x, sched, ws);
    benchmark::DoNotOptimize(st.loss);
  });
  set_counters(state, shape_of(shape_id), workspace_bytes(ws));
}

void cases(benchmark::internal::Benchmark* b) {
  b->ArgNames({"shape", "K", "schedule"})->Unit(benchmark::kMillisecond)->UseRealTime();
  for (int shape_id : {0, 1})
    for (int K : {16, 32, 64, 128, 256})
      for (int kind : {single_k, all_prefix, geometric, multi_topk}) b->Args({shape_id, K, kind});
}

BENCHMARK(BM_schedule_loss)->Apply(cases);
BENCHMARK(BM_schedule_step)->Apply(cases);

void print_ratio_table() {
  for (const char* what : {"loss", "step"})
    for (int shape_id : {0, 1}) {
      bool any = false;
      for (const auto& [key, ms] : g_ms) any |= std::get<0>(key) == what && std::get<1>(key) == shape_id;
      if (!any) continue;
      const shape& s = shape_of(shape_id);
      std::printf("\n%s time relative to single-K (B=%d, D=%d, F=%d; single-K in ms):\n", what, s.B, s.D, s.F);
      std::printf("%6s %12s %12s %12s %12s\n", "K", "single-K ms", "all-prefix", "geometric", "Multi-TopK");
      for (int K : {16, 32, 64, 128, 256}) {
        const auto one = g_ms.find({what, shape_id, K, single_k});
        if (one == g_ms.end()) continue;
        std::printf("%6d %12.2f", K, one->second);
        for (int kind : {all_prefix, geometric, multi_topk}) {
          const auto it = g_ms.find({what, shape_id, K, kind});
          if (it == g_ms.end()) std::printf(" %12s", "-");
          else std::printf(" %11.3fx", it->second / one->second);
        }
        std::printf("\n");
      }
    }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  print_ratio_table();
  benchmark::Shutdown();
  return 0;
}
