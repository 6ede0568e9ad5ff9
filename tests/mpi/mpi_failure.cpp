// SPDX-License-Identifier: Apache-2.0
// A job in which rank 1 fails while the other ranks wait in collectives (docs/DISTRIBUTED.md,
// "Failure"); run by tests/mpi/expect_failure.cmake, which requires that mpirun ends
// nonzero, soon, with the expected message. Modes (argv[1]):
//   throw    rank 1 throws inside the scope of an mpi_session: the session aborts the job;
//   run      rank 1 throws out of mpi_run's body: its message, then MPI_Abort;
//   exit     rank 1 exits with status 3 (std::_Exit, no MPI_Finalize): the launcher ends the job;
//   quit     rank 1 exits with status 0 without MPI_Finalize: the launcher ends the job;
//   stall    rank 1 sleeps: the others' watchdog (deadline 1 s) aborts the job.
#include <hsae/comm/mpi.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

namespace {

/// What the healthy ranks do: collectives until the job is ended (30 s at most).
int wait_in_collectives(hsae::mpi_communicator& c) {
  std::int64_t x[4] = {1, 2, 3, 4};
  for (int i = 0; i < 3000; ++i) {
    c.all_reduce_sum(x, 4);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::fprintf(stderr, "mpi_failure: rank %d was never stopped\n", c.rank());
  return 0;
}

void fail_as(const std::string& mode, hsae::mpi_communicator& c) {
  c.barrier();  // every rank is up
  if (mode == "throw" || mode == "run")
    hsae::detail::throw_error<hsae::config_error>("rank ", c.rank(), " gives up (mpi_failure ", mode, ")");
  if (mode == "exit") std::_Exit(3);
  if (mode == "quit") std::_Exit(0);
  if (mode == "stall") std::this_thread::sleep_for(std::chrono::seconds(60));
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode != "throw" && mode != "run" && mode != "exit" && mode != "quit" && mode != "stall") {
    std::fprintf(stderr, "usage: mpi_failure throw|run|exit|quit|stall\n");
    return 2;
  }
  const hsae::mpi_options options{mode == "stall" ? std::chrono::milliseconds(1000) : std::chrono::milliseconds(60000)};
  if (mode == "run") {
    return hsae::mpi_run(argc, argv, [&](hsae::mpi_communicator& world) {
      if (world.rank() == 1) fail_as(mode, world);
      else {
        world.barrier();
        return wait_in_collectives(world);
      }
      return 0;
    }, options);
  }
  try {
    hsae::mpi_session session(argc, argv);
    hsae::mpi_communicator world(MPI_COMM_WORLD, options);
    if (world.rank() == 1) {
      fail_as(mode, world);
      return 0;
    }
    world.barrier();
    return wait_in_collectives(world);
  } catch (const std::exception& e) {
    // Not reached on rank 1 in mode throw: the session's destructor aborts the job first.
    std::fprintf(stderr, "mpi_failure: caught %s\n", e.what());
    return 1;
  }
}
