// SPDX-License-Identifier: Apache-2.0
// The MPI communicator (comm/mpi.hpp) under mpirun -np 1, 2, 3 (and 4): every collective
// against hand-computed results for every element type (n = 0, n not a multiple of the
// ranks), the ordered sum bitwise the same on 1, 2 and 3 ranks, split() into the grids of
// docs/DISTRIBUTED.md, and the sharded top-k equal to the single-process top-k bit for bit.
// Every rank runs the same test cases in the same order (their collectives match); the
// exit code is nonzero on every rank when any rank failed.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <hsae/comm/mpi.hpp>
#include <hsae/comm/sharded_topk.hpp>
#include <hsae/cpu/topk.hpp>

#include "../comm_util.hpp"
#include "../test_util.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

using namespace hsae;
using hsae_test::local_topk;
using hsae_test::tie_rows;

namespace {

/// The tests' world: a deadline well above their run time, so a hang fails instead.
mpi_communicator world() { return mpi_communicator(MPI_COMM_WORLD, mpi_options{std::chrono::seconds(30)}); }

/// Rank r's element i in the hand-computed tests: small, exact in every type.
template <class T>
T value_of(int r, std::size_t i) {
  return T(int(r) * 7 + int(i % 11));
}

/// True when every rank of `c` holds the same bytes in v.
template <class T>
bool same_on_every_rank(mpi_communicator& c, const std::vector<T>& v) {
  std::vector<std::uint8_t> all(v.size() * sizeof(T) * std::size_t(c.size()));
  c.all_gather(reinterpret_cast<const std::uint8_t*>(v.data()), v.size() * sizeof(T), all.data());
  for (int r = 1; r < c.size(); ++r)
    if (std::memcmp(all.data(), all.data() + std::size_t(r) * v.size() * sizeof(T), v.size() * sizeof(T)) != 0)
      return false;
  return true;
}

}  // namespace

TEMPLATE_TEST_CASE("mpi_communicator: collectives equal hand-computed results", "[mpi]", float, double, std::int32_t,
                   std::int64_t, std::uint8_t) {
  using T = TestType;
  mpi_communicator c = world();
  const int R = c.size(), me = c.rank();
  for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(5), std::size_t(R + 1), std::size_t(1001)}) {
    INFO("n=" << n << " ranks=" << R);
    std::vector<T> send(n);
    for (std::size_t i = 0; i < n; ++i) send[i] = value_of<T>(me, i);

    std::vector<T> gathered(n * std::size_t(R), T(99));
    c.all_gather(send.data(), n, gathered.data());
    bool ok = true;
    for (int r = 0; r < R; ++r)
      for (std::size_t i = 0; i < n; ++i) ok = ok && gathered[std::size_t(r) * n + i] == value_of<T>(r, i);
    CHECK(ok);

    for (reduction red : {reduction::native, reduction::ordered}) {
      std::vector<T> sum = send;
      c.all_reduce_sum(sum.data(), n, red);
      ok = true;
      for (std::size_t i = 0; i < n; ++i) {
        int expect = 0;
        for (int r = 0; r < R; ++r) expect += int(value_of<T>(r, i));
        ok = ok && sum[i] == T(expect);
      }
      CHECK(ok);

      // reduce_scatter: rank r's send holds R blocks of n; this rank gets the sum of block `me`.
      std::vector<T> blocks(n * std::size_t(R)), mine(n, T(99));
      for (std::size_t j = 0; j < blocks.size(); ++j) blocks[j] = value_of<T>(me, j);
      c.reduce_scatter_sum(blocks.data(), n, mine.data(), red);
      ok = true;
      for (std::size_t i = 0; i < n; ++i) {
        int expect = 0;
        for (int r = 0; r < R; ++r) expect += int(value_of<T>(r, std::size_t(me) * n + i));
        ok = ok && mine[i] == T(expect);
      }
      CHECK(ok);
    }

    for (int root = 0; root < R; ++root) {
      std::vector<T> data = send;
      c.broadcast(data.data(), n, root);
      ok = true;
      for (std::size_t i = 0; i < n; ++i) ok = ok && data[i] == value_of<T>(root, i);
      CHECK(ok);
    }
  }
  c.barrier();
}

TEMPLATE_TEST_CASE("ordered all_reduce_sum is bitwise the same on 1, 2, ... ranks for the same data split", "[mpi]",
                   float, double) {
  using T = TestType;
  mpi_communicator w = world();
  const int W = w.size();
  const std::size_t n = 4096;
  // W parts of wildly different magnitudes, the same on every rank: the association of
  // their sum matters.
  std::vector<std::vector<T>> parts(static_cast<std::size_t>(W), std::vector<T>(n));
  std::mt19937_64 g(17);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int p = 0; p < W; ++p)
    for (std::size_t i = 0; i < n; ++i) parts[std::size_t(p)][i] = T(u(g) * std::pow(10.0, double((p * 5 + int(i)) % 9)));
  std::vector<T> reference(n);
  for (std::size_t i = 0; i < n; ++i) {
    T acc = parts[0][i];
    for (int p = 1; p < W; ++p) acc += parts[std::size_t(p)][i];
    reference[i] = acc;
  }
  if (W >= 3) {  // the data can tell the associations apart
    std::size_t differ = 0;
    for (std::size_t i = 0; i < n; ++i) differ += (parts[0][i] + (parts[1][i] + parts[2][i])) != ((parts[0][i] + parts[1][i]) + parts[2][i]);
    CHECK(differ > 0);
  }
  // Groups of every size m = 1..W: the ranks below m form one group, the others another.
  // Rank 0 of a group of m holds the sum of parts [0, W - m], rank j > 0 holds part W - m + j:
  // the ordered sum is then the left fold of all W parts, whatever the group's size.
  for (int m = 1; m <= W; ++m) {
    const int color = w.rank() < m ? 0 : 1;
    mpi_communicator group = w.split(color, w.rank());
    const int gm = group.size(), j = group.rank();
    INFO("group of " << gm << " ranks, rank " << j);
    std::vector<T> mine;
    if (j == 0) {
      mine = parts[0];
      for (int p = 1; p <= W - gm; ++p)
        for (std::size_t i = 0; i < n; ++i) mine[i] += parts[std::size_t(p)][i];
    } else {
      mine = parts[std::size_t(W - gm + j)];
    }
    group.all_reduce_sum(mine.data(), n, reduction::ordered);
    CHECK(std::memcmp(mine.data(), reference.data(), n * sizeof(T)) == 0);
    CHECK(same_on_every_rank(w, mine));
  }
  // The ordered reduce-scatter is the same left fold, block by block.
  std::vector<T> all(n * std::size_t(W));
  for (int b = 0; b < W; ++b)
    std::memcpy(all.data() + std::size_t(b) * n, parts[std::size_t(w.rank())].data(), n * sizeof(T));
  std::vector<T> block(n);
  w.reduce_scatter_sum(all.data(), n, block.data(), reduction::ordered);
  CHECK(std::memcmp(block.data(), reference.data(), n * sizeof(T)) == 0);
}

TEST_CASE("split: every R x S grid of the world into shard and replica groups", "[mpi]") {
  mpi_communicator w = world();
  const int W = w.size(), me = w.rank();
  for (int R = 1; R <= W; ++R) {
    if (W % R) continue;
    const int S = W / R, r = me / S, s = me % S;
    INFO("grid " << R << " x " << S);
    mpi_communicator shard_group = w.split(r, s), replica_group = w.split(s, r);
    CHECK(shard_group.size() == S);
    CHECK(shard_group.rank() == s);
    CHECK(replica_group.size() == R);
    CHECK(replica_group.rank() == r);
    // The world ranks of the shard group are row r of the grid, in order.
    std::int32_t mine = me;
    std::vector<std::int32_t> row(static_cast<std::size_t>(S));
    shard_group.all_gather(&mine, 1, row.data());
    for (int t = 0; t < S; ++t) CHECK(row[std::size_t(t)] == r * S + t);
    std::int64_t sum = me;
    replica_group.all_reduce_sum(&sum, 1);
    std::int64_t expect = 0;
    for (int q = 0; q < R; ++q) expect += q * S + s;
    CHECK(sum == expect);
    // A split of a split.
    mpi_communicator pairs = shard_group.split(s / 2, s);
    CHECK(pairs.size() == std::min(2, S - (s / 2) * 2));
  }
  // key orders the ranks of the new group: reversed here.
  mpi_communicator reversed = w.split(0, W - me);
  CHECK(reversed.rank() == W - 1 - me);
}

TEMPLATE_TEST_CASE("sharded_topk over the ranks equals topk of the whole rows bit for bit", "[mpi]", float, double) {
  using T = TestType;
  const cpu_backend be{.num_threads = 1};
  mpi_communicator w = world();
  const int S = w.size();
  const Eigen::Index B = 37;
  for (index_t F : {1, 2, 5, 7, 10, 64, 301}) {
    const row_matrix<T> pre = tie_rows<T>(B, F, std::uint64_t(F) * 7 + sizeof(T));
    for (int k : {1, 2, 3, 4, 8, 33}) {
      if (k > F) continue;
      INFO("F=" << F << " S=" << S << " k=" << k);
      sparse_code<T> whole, merged;
      topk<T>(be, pre, k, whole);
      sharded_topk<T>(w, F, local_topk<T>(be, pre, S, w.rank(), k), k, merged);
      CHECK(hsae_test::bitwise_equal(merged.values, whole.values));
      CHECK(merged.indices == whole.indices);
    }
  }
  // The shard groups of a 2 x (W/2) grid (W even): each replica merges its own rows.
  if (S % 2 == 0) {
    const int half = S / 2, r = w.rank() / half, s = w.rank() % half;
    mpi_communicator shard_group = w.split(r, s);
    const row_matrix<T> pre = tie_rows<T>(B, 29, 100 + std::uint64_t(r));
    sparse_code<T> whole, merged;
    topk<T>(be, pre, 6, whole);
    sharded_topk<T>(shard_group, 29, local_topk<T>(be, pre, half, s, 6), 6, merged);
    CHECK(hsae_test::bitwise_equal(merged.values, whole.values));
    CHECK(merged.indices == whole.indices);
  }
}

TEST_CASE("mpi_communicator: refusals name the problem", "[mpi]") {
  mpi_communicator w = world();
  std::int32_t x = 1;
  CHECK_THAT(hsae_test::message_of<config_error>([&] { w.broadcast(&x, 1, w.size()); }),
             Catch::Contains("is not a rank of a group of size"));
  CHECK_THAT(hsae_test::message_of<comm_error>([&] { w.all_reduce_sum(&x, std::size_t(INT_MAX) + 1); }),
             Catch::Contains("all_reduce_sum: 2147483648 elements exceed MPI's int count"));
  CHECK_THAT(hsae_test::message_of<config_error>([&] { (void)w.split(-1, 0); }), Catch::Contains("color -1"));
  // An MPI error is thrown with MPI's own text (errors return instead of aborting).
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  CHECK_THAT(hsae_test::message_of<comm_error>([] { mpi_communicator bad(MPI_COMM_NULL); }),
             Catch::Contains("MPI_Comm_dup failed"));
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
  // Moves keep one owner.
  mpi_communicator moved = std::move(w);
  CHECK(moved.native() != MPI_COMM_NULL);
  CHECK(w.native() == MPI_COMM_NULL);
  moved.barrier();
}

int main(int argc, char** argv) {
  mpi_session session(argc, argv);
  int failed = Catch::Session().run(argc, argv);
  mpi_communicator w = world();
  std::int32_t any = failed ? 1 : 0;
  w.all_reduce_sum(&any, 1);
  if (w.rank() == 0 && any && !failed) std::fprintf(stderr, "test_mpi: another rank failed\n");
  return any ? 1 : 0;
}
