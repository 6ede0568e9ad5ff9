// SPDX-License-Identifier: Apache-2.0
// The GPU schedule loss, forward + decoder-side backward (dL/dv, dL/dW_dec, dL/db_dec),
// under the all-prefix schedule (HierarchicalTopK) and the single level (plain TopK) on
// the same code: the cost of the hierarchy. Target (H100): all-prefix <= 1.1x single-K
// at F = 65536, D = 2304, K in {32, 64, 128}.
//
// Arguments: F (d_sae), K (k_max), D (d_model), B (rows), all_prefix (1: levels 1..K,
// 0: the single level K), det (1: deterministic mode, 0: fp32 atomics). Times come from
// CUDA events around the loss call only (manual time). bytes_per_second counts one read
// of x, the code, and K decoder rows per batch row for the forward and for the backward.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <hsae/cuda/loss.cuh>
#include <hsae/k_schedule.hpp>
#include <hsae/model.hpp>
#include <hsae/rng.hpp>
#include <vector>

namespace {

struct stream_guard {
  cudaStream_t s = nullptr;
  stream_guard() { HSAE_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~stream_guard() { (void)cudaStreamDestroy(s); }
};

void BM_loss_backward(benchmark::State& state) {
  const int F = int(state.range(0)), K = int(state.range(1)), D = int(state.range(2)), B = int(state.range(3));
  const bool all_prefix = state.range(4) != 0, det = state.range(5) != 0;
  stream_guard stream;
  hsae::cuda_backend be(stream.s);
  be.deterministic = det;

  // Model: random unit decoder rows (generated on the host once per configuration).
  hsae::sae<float> m(D, F);
  hsae::init(hsae::cpu_backend{}, m, hsae::row_matrix<float>(0, D),
             {.seed = 1, .b_dec = hsae::decoder_bias_init::zero});
  hsae::device_sae<float> dm;
  dm.upload(be, m);
  m = hsae::sae<float>();  // free host memory
  hsae::rng gen(2);
  hsae::row_matrix<float> x(B, D);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = float(gen.normal());
  hsae::device_matrix<float> dx;
  hsae::copy_to_device(be, hsae::cref<float>(x), dx);
  // Code: K distinct random latents per row, values descending.
  hsae::row_matrix<float> values(B, K);
  hsae::index_matrix indices(B, K);
  for (int b = 0; b < B; ++b) {
    std::vector<int> used;
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
  hsae::device_code code;
  hsae::copy_to_device(be, hsae::cref<float>(values), code.values);
  code.indices.resize(be, B, K);
  HSAE_CUDA_TRY(cudaMemcpyAsync(code.indices.data(), indices.data(), std::size_t(indices.size()) * sizeof(int),
                                cudaMemcpyHostToDevice, be.stream()));
  hsae::device_gradients<> g;
  g.zeros_like(be, dm);
  hsae::device_loss_workspace ws;
  ws.staging_bytes = std::size_t(1) << 30;
  const auto schedule = all_prefix ? hsae::dynamic_k_schedule::all_prefixes(K) : hsae::dynamic_k_schedule::top_k(K);
  const hsae::device_matrix<float>& cx = dx;
  hsae::hierarchical_loss_backward(be, dm, cx.view(), code, schedule, g, ws);  // warm-up, sizes the workspace
  be.synchronize();

  cudaEvent_t start, stop;
  HSAE_CUDA_TRY(cudaEventCreate(&start));
  HSAE_CUDA_TRY(cudaEventCreate(&stop));
  for (auto _ : state) {
    HSAE_CUDA_TRY(cudaEventRecord(start, be.stream()));
    hsae::hierarchical_loss_backward(be, dm, cx.view(), code, schedule, g, ws);
    HSAE_CUDA_TRY(cudaEventRecord(stop, be.stream()));
    HSAE_CUDA_TRY(cudaEventSynchronize(stop));
    float ms = 0;
    HSAE_CUDA_TRY(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(double(ms) * 1e-3);
  }
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
  const std::int64_t bytes_per_row = std::int64_t(D) * 4 * 2 + std::int64_t(K) * 8 + 2 * std::int64_t(K) * D * 4;
  state.SetBytesProcessed(state.iterations() * std::int64_t(B) * bytes_per_row);
  state.SetItemsProcessed(state.iterations() * std::int64_t(B));
}

void loss_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"F", "K", "D", "B", "all_prefix", "det"});
  for (int det : {0, 1})
    for (int F : {16384, 65536})
      for (int K : {32, 64, 128})
        for (int all : {0, 1}) b->Args({F, K, 2304, 4096, all, det});
}

}  // namespace

BENCHMARK(BM_loss_backward)->Apply(loss_args)->UseManualTime()->Unit(benchmark::kMillisecond);

int main(int argc, char** argv) {
  if (!hsae::cuda_device_available()) {
    std::puts("no CUDA device");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
