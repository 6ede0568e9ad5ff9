// SPDX-License-Identifier: Apache-2.0
// The k-schedules the schedule benchmarks compare (bench_schedules on the CPU,
// bench_cuda_schedules on the GPU), built at run time for a given K:
//   single-K     (K, 1)                         plain TopK
//   all-prefix   (1..K, 1/K each)               HierarchicalTopK (the paper)
//   geometric    (K/8, 1), (K/4, 1), (K/2, 1), (K, 1)
//   Multi-TopK   (K/4, 1), (K, 1/8)
#pragma once

#include <algorithm>

#include <hsae/k_schedule.hpp>

namespace hsae_bench {

enum schedule_kind : int { single_k = 0, all_prefix = 1, geometric = 2, multi_topk = 3 };
inline constexpr const char* schedule_kind_name[] = {"single-K", "all-prefix", "geometric", "Multi-TopK"};
inline constexpr int schedule_kinds[] = {single_k, all_prefix, geometric, multi_topk};

inline hsae::dynamic_k_schedule make_schedule(int kind, int K) {
  switch (kind) {
    case single_k: return hsae::dynamic_k_schedule::top_k(K);
    case all_prefix: return hsae::dynamic_k_schedule::all_prefixes(K);
    case geometric: return hsae::dynamic_k_schedule::geometric(std::max(1, K / 8), K);
    default: return hsae::dynamic_k_schedule({{K / 4, 1.0}, {K, 0.125}});
  }
}

}  // namespace hsae_bench
