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
#include <cstdint>

#include <hsae/cuda/loss.cuh>
#include <hsae/k_schedule.hpp>

#include "cuda_bench_common.cuh"

namespace {

void BM_loss_backward(benchmark::State& state) {
  const int F = int(state.range(0)), K = int(state.range(1)), D = int(state.range(2)), B = int(state.range(3));
  const bool all_prefix = state.range(4) != 0, det = state.range(5) != 0;
  hsae_bench::stream_guard stream;
  hsae::cuda_backend be(stream.s);
  be.deterministic = det;

  hsae::device_sae<float> dm;
  dm.upload(be, hsae_bench::random_model(D, F, 1));
  hsae::device_matrix<float> dx;
  hsae::copy_to_device(be, hsae::cref<float>(hsae_bench::random_batch(B, D, 2)), dx);
  hsae::device_code code;
  hsae_bench::random_code(be, B, K, F, 3, code);
  hsae::device_gradients<> g;
  g.zeros_like(be, dm);
  hsae::device_loss_workspace ws;
  ws.staging_bytes = std::size_t(1) << 30;
  const auto schedule = all_prefix ? hsae::dynamic_k_schedule::all_prefixes(K) : hsae::dynamic_k_schedule::top_k(K);
  const hsae::device_matrix<float>& cx = dx;
  hsae::hierarchical_loss_backward(be, dm, cx.view(), code, schedule, g, ws);  // warm-up, sizes the workspace
  be.synchronize();

  hsae_bench::timed_loop(state, be.stream(),
                         [&] { hsae::hierarchical_loss_backward(be, dm, cx.view(), code, schedule, g, ws); });
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

int main(int argc, char** argv) { return hsae_bench::run_main(argc, argv, [] {}); }
