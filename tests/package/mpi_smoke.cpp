// SPDX-License-Identifier: Apache-2.0
// Consumer of the package's mpi component: an MPI session, a communicator over
// MPI_COMM_WORLD and an ordered sum, run as one process (MPI's singleton start).
#include <hsae/comm/mpi.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  hsae::mpi_session session(argc, argv);
  hsae::mpi_communicator world;
  double x[2] = {1.5, -2.0};
  world.all_reduce_sum(x, 2, hsae::reduction::ordered);
  const double expect = world.size();
  std::printf("hsae::mpi: %d rank(s), sum %g %g\n", world.size(), x[0], x[1]);
  return (x[0] == 1.5 * expect && x[1] == -2.0 * expect) ? 0 : 1;
}
