// SPDX-License-Identifier: Apache-2.0
// The distributed CPU step (sharded_train_step) under mpirun: time per step and the bytes
// each rank sends and receives per step, by message, for the grids the rank count allows
// with one kind of parallelism each: shards = ranks (one replica) and replicas = ranks
// (one shard), the latter with the dense and the sparse data-parallel sum.
//
// A plain timed main, not Google Benchmark: its adaptive iteration counts would differ
// between ranks and deadlock the collectives. Every rank runs the same fixed number of
// steps; the time is the slowest rank's mean over the timed steps. The bytes are counted
// by hsae_bench::counting_communicator (the payload of each collective, see its table)
// and checked against docs/DISTRIBUTED.md's formulas: the program fails if they differ.
//
//   mpirun -np 3 bench_distributed [--D=256] [--F=8192] [--B=1024] [--K=32] [--steps=5]
//                                  [--warmup=2] [--dead-after=TOKENS] [--smoke]
//
// B is the global batch (each replica trains on its rows); the schedule is all prefixes
// to K; --dead-after (default 10M tokens: no AuxK) small makes AuxK run; --smoke is a
// tiny shape and one timed step (the ctest entry).
#include <hsae/comm/mpi.hpp>
#include <hsae/cpu/init.hpp>
#include <hsae/data/synthetic.hpp>
#include <hsae/distributed/train_step.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "counting_communicator.hpp"

namespace {

using T = float;
using counted = hsae_bench::counting_communicator<hsae::mpi_communicator>;

struct settings {
  int D = 256, F = 8192, K = 32;
  std::int64_t B = 1024;
  int steps = 5, warmup = 2;
  std::int64_t dead_after = 10'000'000;
};

settings parse(int argc, char** argv) {
  settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&](const char* key) -> const char* {
      const std::size_t n = std::strlen(key);
      return a.compare(0, n, key) == 0 ? a.c_str() + n : nullptr;
    };
    if (a == "--smoke") {
      s.D = 32;
      s.F = 512;
      s.B = 96;
      s.K = 8;
      s.steps = 1;
      s.warmup = 1;
    } else if (const char* v = val("--D=")) s.D = std::atoi(v);
    else if (const char* v2 = val("--F=")) s.F = std::atoi(v2);
    else if (const char* v3 = val("--B=")) s.B = std::atoll(v3);
    else if (const char* v4 = val("--K=")) s.K = std::atoi(v4);
    else if (const char* v5 = val("--steps=")) s.steps = std::atoi(v5);
    else if (const char* v6 = val("--warmup=")) s.warmup = std::atoi(v6);
    else if (const char* v7 = val("--dead-after=")) s.dead_after = std::atoll(v7);
    else
      hsae::detail::throw_error<hsae::config_error>("bench_distributed: unknown argument '", a, "'");
  }
  hsae::detail::expects<hsae::config_error>(s.steps >= 1 && s.warmup >= 0 && s.K >= 1 && s.K <= s.F && s.B >= 1,
                                            "bench_distributed: bad settings");
  return s;
}

const char* name_of(hsae::dp_reduction d) {
  switch (d) {
    case hsae::dp_reduction::dense: return "dense";
    case hsae::dp_reduction::sparse: return "sparse";
    default: return "automatic";
  }
}

/// Fails the job (every rank: each checks the same thing on its own counts) when a
/// counted byte total differs from the formula.
void expect_bytes(const char* what, std::int64_t got, std::int64_t want) {
  hsae::detail::expects<hsae::comm_error>(got == want, "bench_distributed: ", what, ": counted ", got,
                                          " bytes received, the formula gives ", want);
}

struct result {
  double ms = 0;  // slowest rank's mean per step
  hsae_bench::message_table per_step;  // this rank's, per step
  std::int64_t sent = 0, received = 0;  // this rank's, per step
  std::int64_t max_sent = 0, max_received = 0;  // over the ranks
  hsae::dp_reduction_info dp;  // the last step's
  std::int64_t dp_bytes_expected = 0;  // dp_reduction_info's bytes of the method used, summed over the timed steps
  double aux_steps = 0;
};

/// Trains `s.warmup + s.steps` steps on a grid of `shards` shards and measures the last ones.
result run_grid(hsae::mpi_communicator& control, int shards, hsae::dp_reduction dp, const settings& s,
                const hsae::sae<T>& m0, const std::vector<hsae::row_matrix<T>>& batches, int threads) {
  counted world(hsae::mpi_communicator(control.native()), "world", {"shard", "replica"});
  hsae::process_grid<counted> grid(std::move(world), shards, hsae::reduction::ordered, dp);
  hsae::cpu_backend be;
  be.num_threads = threads;
  hsae::sae_shard<T> sh = hsae::shard_of(m0, grid.shards(), grid.shard());
  hsae::adam_options ao;
  ao.lr = 1e-4;
  ao.warmup_steps = 0;
  hsae::sharded_adam<T> opt(sh, ao);
  hsae::dead_latent_tracker dead(s.F, s.dead_after);
  hsae::sharded_workspace<T> ws;
  const auto schedule = hsae::dynamic_k_schedule::all_prefixes(s.K);
  const hsae::latent_range rows = grid.rows_of_replica(s.B);
  result r;
  double seconds = 0;
  for (int i = 0; i < s.warmup + s.steps; ++i) {
    if (i == s.warmup) {
      grid.world().counts().reset();
      control.barrier();
    }
    const auto& x = batches[std::size_t(i) % batches.size()];
    hsae::step_stats st;
    const auto t0 = std::chrono::steady_clock::now();
    hsae::sharded_train_step(grid, be, sh, opt, dead, hsae::cref<T>(x.middleRows(rows.first, rows.count)), s.B,
                             schedule, ws, st);
    const auto t1 = std::chrono::steady_clock::now();
    if (i >= s.warmup) {
      seconds += std::chrono::duration<double>(t1 - t0).count();
      r.aux_steps += st.aux_loss > 0 ? 1 : 0;
      r.dp_bytes_expected += ws.dp.used == hsae::dp_reduction::sparse ? ws.dp.sparse_bytes : ws.dp.dense_bytes;
    }
  }
  double worst = seconds / s.steps;
  std::vector<double> all(std::size_t(control.size()));
  control.all_gather(&worst, 1, all.data());
  r.ms = 1e3 * *std::max_element(all.begin(), all.end());
  const hsae_bench::message_table& total = grid.world().counts().messages;  // over the timed steps
  for (auto [k, c] : total) {
    c.calls /= s.steps;
    c.sent /= s.steps;
    c.received /= s.steps;
    r.per_step[k] = c;
    r.sent += c.sent;
    r.received += c.received;
  }
  std::int64_t mine[2] = {r.sent, r.received};
  std::vector<std::int64_t> every(2 * std::size_t(control.size()));
  control.all_gather(mine, 2, every.data());
  for (int q = 0; q < control.size(); ++q) {
    r.max_sent = std::max(r.max_sent, every[2 * std::size_t(q)]);
    r.max_received = std::max(r.max_received, every[2 * std::size_t(q) + 1]);
  }
  r.dp = ws.dp;

  // docs/DISTRIBUTED.md's formulas against the counts (this rank's, per step: the totals
  // over the timed steps divided exactly; B_r is its replica's rows).
  const std::int64_t S = grid.shards(), R = grid.replicas(), Br = rows.count, K = s.K;
  auto received = [&](const char* group, const char* op, int bytes, std::int64_t n) {
    const auto it = total.find(hsae_bench::message_key{group, op, bytes, n});
    return it == total.end() ? std::int64_t(0) : it->second.received / s.steps;
  };
  if (S > 1) {
    expect_bytes("top-K all-gather, (S - 1) B_r K 8", received("shard", "all_gather", 1, Br * K * 8),
                 (S - 1) * Br * K * 8);
    // the value gradients [B_r, K] (AuxK's, [B_r, k_aux], differ in count: k_aux != K here)
    expect_bytes("value gradients, (S - 1) B_r K 4", received("shard", "all_reduce_sum ordered", 4, Br * K),
                 (S - 1) * Br * K * 4);
    // the projection's dots and squared norms of every row (2 F), the renormalisation's norms (F)
    expect_bytes("decoder dots and norms, (S - 1) 2 F 4",
                 received("shard", "all_reduce_sum ordered", 4, 2 * std::int64_t(s.F)), (S - 1) * 2 * s.F * 4);
    expect_bytes("decoder norms, (S - 1) F 4", received("shard", "all_reduce_sum ordered", 4, s.F),
                 (S - 1) * s.F * 4);
  }
  if (R > 1) {
    // The data-parallel sum: the replica group's all-gathers (sparse) or its ordered fp32
    // all-reduces but b_dec's (dense); the group's other sums are fp64 or native.
    std::int64_t dp_bytes = 0;
    for (const auto& [k, c] : total) {
      const auto& [group, op, bytes, count] = k;
      if (group == "replica" &&
          (op == "all_gather" || (op == "all_reduce_sum ordered" && bytes == 4 && count != s.D)))
        dp_bytes += c.received;
    }
    const bool sparse = r.dp.used == hsae::dp_reduction::sparse;
    expect_bytes(sparse ? "sparse data-parallel sum, (R - 1) (16 + 4 U_max + 4 V_max)"
                        : "dense data-parallel sum, (R - 1) (F_s (D + 1) + F D_s) 4",
                 dp_bytes, r.dp_bytes_expected);
    expect_bytes("b_dec gradient, (R - 1) D 4", received("replica", "all_reduce_sum ordered", 4, s.D),
                 (R - 1) * s.D * 4);
  }
  return r;
}

void print(const char* grid, const char* dp, const result& r, int ranks) {
  std::printf("\n## %s, data-parallel sum: %s: %.1f ms/step (slowest rank), AuxK in %.0f of the timed steps\n", grid,
              dp, r.ms, r.aux_steps);
  std::printf("rank 0 per step: sent %lld B, received %lld B; the most of any of the %d ranks: sent %lld B, received "
              "%lld B\n",
              (long long)r.sent, (long long)r.received, ranks, (long long)r.max_sent, (long long)r.max_received);
  if (r.dp.touched_max > 0)
    std::printf("dp: used %s; last step: touched latents U = %lld (max over replicas %lld of F), V_max = %lld values; received "
                "dense %lld B (what it would be), sparse %lld B\n",
                name_of(r.dp.used), (long long)r.dp.touched, (long long)r.dp.touched_max, (long long)r.dp.values_max,
                (long long)r.dp.dense_bytes, (long long)r.dp.sparse_bytes);
  else if (r.dp.dense_bytes > 0)
    std::printf("dp: used dense (the touched latents are not counted then); received %lld B\n",
                (long long)r.dp.dense_bytes);
  std::printf("| group | collective | elem B | elements | calls/step | sent B/step | received B/step |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|\n");
  for (const auto& [k, c] : r.per_step)
    if (c.sent || c.received)
      std::printf("| %s | %s | %d | %lld | %lld | %lld | %lld |\n", std::get<0>(k).c_str(), std::get<1>(k).c_str(),
                  std::get<2>(k), (long long)std::get<3>(k), (long long)c.calls, (long long)c.sent,
                  (long long)c.received);
}

}  // namespace

int main(int argc, char** argv) {
  return hsae::mpi_run(argc, argv, [&](hsae::mpi_communicator& control) {
    const settings s = parse(argc, argv);
    const int n = control.size();
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    const int threads = int(std::max(1u, cores / unsigned(n)));
    // Every rank draws the same global batches; rank 0's initialised model is broadcast.
    hsae::synthetic_options so;
    so.d_model = s.D;
    so.n_atoms = 4 * s.D;
    so.mean_active = 16;
    so.seed = 7;
    hsae::cpu_backend be;
    be.num_threads = threads;
    hsae::synthetic_source<T> src(so, be);
    std::vector<hsae::row_matrix<T>> batches;
    for (int i = 0; i < std::min(s.warmup + s.steps, 4); ++i) batches.push_back(src.next(Eigen::Index(s.B)));
    hsae::sae<T> m0(s.D, s.F);
    if (control.rank() == 0) hsae::init(be, m0, hsae::cref<T>(batches[0]));
    control.broadcast(m0.W_enc.data(), std::size_t(m0.W_enc.size()), 0);
    control.broadcast(m0.W_dec.data(), std::size_t(m0.W_dec.size()), 0);
    control.broadcast(m0.b_enc.data(), std::size_t(m0.b_enc.size()), 0);
    control.broadcast(m0.b_dec.data(), std::size_t(m0.b_dec.size()), 0);
    if (control.rank() == 0)
      std::printf("# bench_distributed: %d rank(s) on %u core(s), %d thread(s) a rank%s; D=%d F=%d B=%lld "
                  "all prefixes to K=%d, fp32, reduction::ordered; %d warm-up + %d timed steps; dead after %lld "
                  "tokens\n",
                  n, cores, threads, unsigned(n) > cores ? " (OVERSUBSCRIBED: more ranks than cores)" : "", s.D, s.F,
                  (long long)s.B, s.K, s.warmup, s.steps, (long long)s.dead_after);
    char label[96];
    // One replica, `n` shards.
    {
      const result r = run_grid(control, n, hsae::dp_reduction::automatic, s, m0, batches, threads);
      std::snprintf(label, sizeof label, "1 replica x %d shards", n);
      if (control.rank() == 0) print(label, "-", r, n);
    }
    // `n` replicas, one shard: dense, then sparse (same model bits; tests/mpi checks that).
    if (n > 1)
      for (const auto dp : {hsae::dp_reduction::dense, hsae::dp_reduction::sparse}) {
        const result r = run_grid(control, 1, dp, s, m0, batches, threads);
        std::snprintf(label, sizeof label, "%d replicas x 1 shard", n);
        if (control.rank() == 0) print(label, name_of(dp), r, n);
      }
    if (control.rank() == 0) std::fflush(stdout);
    return 0;
  });
}
