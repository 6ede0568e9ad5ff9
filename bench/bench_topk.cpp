// SPDX-License-Identifier: Apache-2.0
// Per-row sorted top-k on the CPU, one thread: hsae's threshold filter against the
// standard-library baselines, on random rows and on the adversarial ascending rows.
// Reported: time per row and the row read rate (bytes_per_second = 4 n per row).
#include <benchmark/benchmark.h>
#include <hsae/hsae.hpp>

#include <algorithm>
#include <numeric>
#include <vector>

namespace {

enum input_kind { random_rows = 0, ascending_rows = 1, relu_rows = 2 };

std::vector<float> make_rows(int rows, int n, int kind) {
  hsae::rng gen(42);
  std::vector<float> x(std::size_t(rows) * std::size_t(n));
  for (auto& v : x) v = float(gen.normal());
  for (int r = 0; r < rows; ++r) {
    float* row = x.data() + std::size_t(r) * std::size_t(n);
    if (kind == ascending_rows) std::sort(row, row + n);
    if (kind == relu_rows)
      for (int i = 0; i < n; ++i) row[i] = std::max(row[i], 0.0f);
  }
  return x;
}

constexpr int kRows = 64;  // 64 rows x 256 KiB at n = 65536: well beyond L2

void BM_hsae_filter(benchmark::State& state) {
  const int n = int(state.range(0)), k = int(state.range(1));
  const auto x = make_rows(kRows, n, int(state.range(2)));
  hsae::cpu::row_selector<float> sel;
  std::vector<float> vals(static_cast<std::size_t>(k));
  std::vector<hsae::index_t> idx(static_cast<std::size_t>(k));
  int r = 0;
  for (auto _ : state) {
    sel.select(x.data() + std::size_t(r) * std::size_t(n), n, k, vals.data(), idx.data());
    benchmark::DoNotOptimize(idx.data());
    r = (r + 1) % kRows;
  }
  state.SetItemsProcessed(state.iterations());
  state.SetBytesProcessed(state.iterations() * std::int64_t(n) * 4);
}

// Standard-library baselines over (value, index) pairs, with hsae's ordering
// (descending value, ties to the lower index).
enum baseline { nth_element_then_sort, partial_sort };

template <baseline How>
void BM_baseline(benchmark::State& state) {
  const int n = int(state.range(0)), k = int(state.range(1));
  const auto x = make_rows(kRows, n, int(state.range(2)));
  std::vector<std::pair<float, int>> buf(static_cast<std::size_t>(n));
  const auto better = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  int r = 0;
  for (auto _ : state) {
    const float* row = x.data() + std::size_t(r) * std::size_t(n);
    for (int i = 0; i < n; ++i) buf[std::size_t(i)] = {row[i], i};
    if constexpr (How == nth_element_then_sort) {
      std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), better);
      std::sort(buf.begin(), buf.begin() + k, better);
    } else {
      std::partial_sort(buf.begin(), buf.begin() + k, buf.end(), better);
    }
    benchmark::DoNotOptimize(buf.data());
    r = (r + 1) % kRows;
  }
  state.SetItemsProcessed(state.iterations());
  state.SetBytesProcessed(state.iterations() * std::int64_t(n) * 4);
}
void BM_nth_element_pairs(benchmark::State& state) { BM_baseline<nth_element_then_sort>(state); }
void BM_partial_sort_pairs(benchmark::State& state) { BM_baseline<partial_sort>(state); }

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "k", "input"});
  for (int input : {random_rows, relu_rows, ascending_rows})
    for (int n : {16384, 65536})
      for (int k : {32, 64, 256}) b->Args({n, k, input});
}

}  // namespace

BENCHMARK(BM_hsae_filter)->Apply(shapes);
BENCHMARK(BM_nth_element_pairs)->Apply(shapes);
BENCHMARK(BM_partial_sort_pairs)->Apply(shapes);

BENCHMARK_MAIN();
