// SPDX-License-Identifier: Apache-2.0
// hsae-train under mpirun (built when MPI is found, HSAE_MPI): MPI's start and end, and the
// distributed CPU path, a grid of ranks / shards data replicas x shards latent shards
// (docs/DISTRIBUTED.md) trained by the trainer with the distributed engine.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <hsae/comm/mpi.hpp>
#include <hsae/distributed/engine.hpp>

#include "driver.hpp"
#include "run.hpp"

namespace hsae_train {

namespace {
std::unique_ptr<hsae::mpi_session> session;
}  // namespace

void launch_begin(int& argc, char**& argv) {
  check_launch(true);
  if (mpi_launch_size() == 0) return;  // a plain process: no MPI
  session = std::make_unique<hsae::mpi_session>(argc, argv);
  launch_info& l = launch_state();
  l.mpi = true;
  MPI_Comm_rank(MPI_COMM_WORLD, &l.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &l.size);
  MPI_Comm local = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, l.rank, MPI_INFO_NULL, &local);
  if (local != MPI_COMM_NULL) {
    MPI_Comm_size(local, &l.local_size);
    MPI_Comm_free(&local);
  }
  if (l.rank != 0) std::freopen("/dev/null", "w", stdout);  // rank 0 prints the run
}

void launch_end() {
  session.reset();  // MPI_Finalize
}

int launch_fail(int code) {
  int live = 0, done = 0;
  MPI_Initialized(&live);
  if (live) MPI_Finalized(&done);
  if (live && !done && launch().size > 1) {
    std::fflush(stdout);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
  }
  return code;
}

run_result train_distributed(const run_plan& p, const std::atomic<bool>* stop) {
  const launch_info& l = launch();
  const int shards = int(p.cfg.shards);
  if (l.size % shards != 0)
    throw usage_error("--shards: " + std::to_string(shards) + " shards do not divide the " + std::to_string(l.size) +
                      " ranks mpirun started (the ranks form ranks/shards data replicas x shards)");
  hsae::mpi_options mo;
  mo.deadline = std::chrono::seconds(p.cfg.rank_timeout);
  hsae::process_grid<hsae::mpi_communicator> grid(hsae::mpi_communicator(MPI_COMM_WORLD, mo), shards,
                                                  hsae::reduction::ordered);
  // Every rank must run the same configuration: each resolved key is compared.
  std::vector<std::pair<std::string, std::string>> fields;
  for (auto it = p.resolved.begin(); it != p.resolved.end(); ++it)
    if (it.key() != "threads" && it.key() != "cpu_gemm") fields.emplace_back(it.key(), it.value().dump());
  grid.check_same(fields);

  hsae::cpu_backend cpu = cpu_backend_of(p.cfg);
  if (cpu.num_threads == 0)  // the machine's cores shared by its ranks
    cpu.num_threads = std::max(1, int(std::thread::hardware_concurrency()) / std::max(1, l.local_size));
  if (l.rank == 0)
    std::printf("distributed: %d ranks as %d data replica(s) x %d latent shard(s), %d thread(s) per rank\n\n", l.size,
                grid.replicas(), grid.shards(), cpu.num_threads);
  std::fflush(stdout);
  using backend = hsae::distributed_cpu_backend<hsae::mpi_communicator>;
  auto any_rank = [&grid](bool mine) {
    std::int32_t n = mine ? 1 : 0;
    grid.world().all_reduce_sum(&n, 1);
    return n > 0;
  };
  return train_with<backend>(backend{cpu, &grid}, p, stop, any_rank);
}

}  // namespace hsae_train
