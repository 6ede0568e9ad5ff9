// SPDX-License-Identifier: Apache-2.0
// k-schedules compared on the GPU (the CUDA half of bench/bench_schedules.cpp), and the
// full CUDA train step against the encoder GEMM alone.
//
// BM_cuda_schedule_loss: the schedule loss forward + decoder-side backward under
//   single-K     (K, 1)                         plain TopK
//   all-prefix   (1..K, 1/K each)               HierarchicalTopK (the paper)
//   geometric    (K/8, 1), (K/4, 1), (K/2, 1), (K, 1)
//   Multi-TopK   (K/4, 1), (K, 1/8)
// for K in {16, 32, 64, 128, 256}, at B = 4096, D = 2304, F = 65536, fp32, the same random
// code for every schedule of a K. CUDA-event time of the loss call only; after the run a
// table gives each schedule's time relative to single-K at the same K.
//
// BM_cuda_step<T>: one whole `train_step` (encoder GEMM, top-K, schedule loss and decoder
// backward, sparse encoder backward, dead-latent update, fused Adam; no latent is dead, so
// no AuxK) under the same schedules and K, storage T = float or bfloat16, same shape.
// BM_cuda_encoder_gemm<T>: the encoder's pre-activations alone (cuBLASLt with the
// bias+ReLU epilogue), the step's floor. The tables after the run give step / GEMM
// (target on an H100: <= 1.3x) and each schedule's step relative to single-K.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <hsae/cuda/encode.cuh>
#include <hsae/cuda/loss.cuh>
#include <hsae/cuda/train_step.cuh>
#include <hsae/k_schedule.hpp>

#include "../schedule_kinds.hpp"
#include "cuda_bench_common.cuh"

namespace {

using namespace hsae_bench;  // make_schedule, schedule_kind and its names

constexpr int batch = 4096, d_model = 2304, d_sae = 65536;

/// Median ms per (benchmark, K, schedule), for the ratio table.
std::map<std::tuple<std::string, int, int>, double> g_ms;

/// The model and batch, built once and reused by every case, and one random code per K
/// (shared by that K's schedules).
struct loss_inputs {
  hsae_bench::stream_guard stream;
  hsae::cuda_backend be{stream.s};
  hsae::device_sae<float> model;
  hsae::device_matrix<float> x;
  hsae::device_gradients<> grads;
  hsae::device_loss_workspace ws;
  std::map<int, hsae::device_code> codes;
  loss_inputs() {
    model.upload(be, hsae_bench::random_model(d_model, d_sae, 1));
    hsae::copy_to_device(be, hsae::cref<float>(hsae_bench::random_batch(batch, d_model, 2)), x);
    grads.zeros_like(be, model);
    ws.staging_bytes = std::size_t(1) << 30;
  }
  const hsae::device_code& code(int K) {
    auto& c = codes[K];
    if (c.rows() == 0) hsae_bench::random_code(be, batch, K, d_sae, 3 + std::uint64_t(K), c);
    return c;
  }
  static loss_inputs& get() {
    static loss_inputs in;
    return in;
  }
};

void BM_cuda_schedule_loss(benchmark::State& state) {
  const int K = int(state.range(0)), kind = int(state.range(1));
  loss_inputs& in = loss_inputs::get();
  const hsae::dynamic_k_schedule sched = make_schedule(kind, K);
  const hsae::device_code& code = in.code(K);
  const hsae::device_matrix<float>& cx = in.x;
  hsae::hierarchical_loss_backward(in.be, in.model, cx.view(), code, sched, in.grads, in.ws);  // warm-up
  in.be.synchronize();
  g_ms[{"loss", K, kind}] = timed_loop(state, in.be.stream(), [&] {
    hsae::hierarchical_loss_backward(in.be, in.model, cx.view(), code, sched, in.grads, in.ws);
  });
  state.SetLabel(schedule_kind_name[kind]);
  state.counters["levels"] = double(sched.size());
}

template <class T>
const char* type_name() {
  return std::is_same_v<T, float> ? "float" : "bf16";
}

/// One model, optimizer, tracker, batch and workspace per storage type, reused by every
/// step case (the model trains on as the cases run; its shape, not its values, sets the
/// cost).
template <class T>
struct step_inputs {
  hsae_bench::stream_guard stream;
  hsae::cuda_backend be{stream.s};
  hsae::device_sae<T> model;
  hsae::device_adam<T> opt;
  hsae::device_dead_latent_tracker dead;
  hsae::device_matrix<T> x;
  hsae::device_train_workspace<T> ws;
  hsae::encode_workspace<T> enc;
  hsae::device_matrix<T> pre;
  step_inputs() {
    be.deterministic = false;  // fp32 atomics in the sparse backward: the fast mode
    model.upload(be, hsae_bench::random_model(d_model, d_sae, 1));
    opt = hsae::device_adam<T>(be, model, hsae::adam_options{.warmup_steps = 0});
    // No latent ever counts as dead here, so AuxK stays off and every case does the same work.
    dead = hsae::device_dead_latent_tracker(be, d_sae, std::int64_t(1) << 60);
    hsae::copy_to_device(be, hsae::cref<float>(hsae_bench::random_batch(batch, d_model, 2)), x);
  }
  static step_inputs& get() {
    static step_inputs in;
    return in;
  }
};

template <class T>
void BM_cuda_step(benchmark::State& state) {
  const int K = int(state.range(0)), kind = int(state.range(1));
  step_inputs<T>& in = step_inputs<T>::get();
  const hsae::dynamic_k_schedule sched = make_schedule(kind, K);
  const hsae::device_matrix<T>& cx = in.x;
  auto step = [&] { hsae::train_step(in.be, in.model, in.opt, in.dead, cx.view(), sched, in.ws); };
  step();  // warm-up: sizes the workspace
  (void)hsae::read_step_stats(in.be, in.opt, in.ws);
  const double median = timed_loop(state, in.be.stream(), step);
  (void)hsae::read_step_stats(in.be, in.opt, in.ws);  // throws if a step was rejected
  g_ms[{std::string("step/") + type_name<T>(), K, kind}] = median;
  state.SetLabel(schedule_kind_name[kind]);
  state.SetItemsProcessed(state.iterations() * std::int64_t(batch));
}

template <class T>
void BM_cuda_encoder_gemm(benchmark::State& state) {
  step_inputs<T>& in = step_inputs<T>::get();
  const hsae::device_matrix<T>& cx = in.x;
  auto gemm = [&] { hsae::pre_activations(in.be, std::as_const(in.model), cx.view(), in.pre, in.enc); };
  gemm();
  in.be.synchronize();
  g_ms[{std::string("gemm/") + type_name<T>(), 0, 0}] = timed_loop(state, in.be.stream(), gemm);
  state.counters["TFLOP/s"] = benchmark::Counter(2.0 * batch * d_model * double(d_sae) * double(state.iterations()) * 1e-12,
                                                 benchmark::Counter::kIsRate);
}

void cases(benchmark::internal::Benchmark* b) {
  b->ArgNames({"K", "schedule"})->Unit(benchmark::kMillisecond)->UseManualTime();
  for (int K : {16, 32, 64, 128, 256})
    for (int kind : {single_k, all_prefix, geometric, multi_topk}) b->Args({K, kind});
}

BENCHMARK(BM_cuda_schedule_loss)->Apply(cases);
BENCHMARK(BM_cuda_encoder_gemm<float>)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_cuda_encoder_gemm<__nv_bfloat16>)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_cuda_step<float>)->Apply(cases);
BENCHMARK(BM_cuda_step<__nv_bfloat16>)->Apply(cases);

void print_ratio_table() {
  for (const char* what : {"loss", "step/float", "step/bf16"}) {
    bool any = false;
    for (const auto& [key, ms] : g_ms) any |= std::get<0>(key) == what;
    if (!any) continue;
    const std::string w = what;
    const auto gemm = g_ms.find({"gemm/" + (w == "loss" ? std::string() : w.substr(5)), 0, 0});
    const bool with_gemm = gemm != g_ms.end();
    std::printf("\n%s time relative to single-K (GPU, B=%d, D=%d, F=%d; single-K median in ms", what, batch, d_model,
                d_sae);
    if (with_gemm) std::printf("; encoder GEMM alone %.3f ms", gemm->second);
    std::printf("):\n%6s %12s %12s %12s %12s%s\n", "K", "single-K ms", "all-prefix", "geometric", "Multi-TopK",
                with_gemm ? "   single-K/GEMM all-prefix/GEMM" : "");
    for (int K : {16, 32, 64, 128, 256}) {
      const auto one = g_ms.find({w, K, single_k});
      if (one == g_ms.end()) continue;
      std::printf("%6d %12.3f", K, one->second);
      for (int kind : {all_prefix, geometric, multi_topk}) {
        const auto it = g_ms.find({w, K, kind});
        if (it == g_ms.end()) std::printf(" %12s", "-");
        else std::printf(" %11.3fx", it->second / one->second);
      }
      if (with_gemm) {
        const auto all = g_ms.find({w, K, all_prefix});
        std::printf(" %15.3fx", one->second / gemm->second);
        if (all != g_ms.end()) std::printf(" %15.3fx", all->second / gemm->second);
      }
      std::printf("\n");
    }
  }
}

}  // namespace

int main(int argc, char** argv) { return hsae_bench::run_main(argc, argv, print_ratio_table); }
