// SPDX-License-Identifier: Apache-2.0
// The communicator layer without MPI (comm/communicator.hpp, comm/sharded_topk.hpp): the
// single-process communicator, latent slices, and the merge of shards' local top-ks, which
// must equal the single-process top-k bit for bit (the MPI tests in mpi/ run the same
// merge across processes).
#include <catch2/catch.hpp>
#include <hsae/comm/communicator.hpp>
#include <hsae/comm/sharded_topk.hpp>
#include <hsae/cpu/topk.hpp>

#include "comm_util.hpp"
#include "test_util.hpp"

#include <cstdint>
#include <vector>

using namespace hsae;
using hsae_test::local_topk;
using hsae_test::tie_rows;

// The concept asks for every collective: a type without split (or without one element
// type's sum) is not a communicator.
struct no_split {
  int rank() const { return 0; }
  int size() const { return 1; }
  template <comm_scalar T> void all_gather(const T*, std::size_t, T*) {}
  template <comm_scalar T> void all_reduce_sum(T*, std::size_t, reduction = reduction::native) {}
  template <comm_scalar T> void reduce_scatter_sum(const T*, std::size_t, T*, reduction = reduction::native) {}
  template <comm_scalar T> void broadcast(T*, std::size_t, int) {}
  void barrier() {}
};
struct float_only : no_split {
  float_only split(int, int) { return {}; }
  void all_reduce_sum(float*, std::size_t, reduction = reduction::native) {}
};
struct with_split : no_split {
  with_split split(int, int) { return {}; }
};
static_assert(!communicator<no_split>);
static_assert(!communicator<float_only>);
static_assert(communicator<with_split>);
static_assert(communicator<single_process_communicator>);

TEST_CASE("latent_slice: contiguous, as even as possible, the first F mod S one longer", "[comm]") {
  CHECK(latent_slice(10, 3, 0) == latent_range{0, 4});
  CHECK(latent_slice(10, 3, 1) == latent_range{4, 3});
  CHECK(latent_slice(10, 3, 2) == latent_range{7, 3});
  CHECK(latent_slice(2, 3, 2) == latent_range{2, 0});
  CHECK(latent_slice(0, 1, 0) == latent_range{0, 0});
  for (index_t F : {1, 5, 64, 97, 1000})
    for (int S = 1; S <= 9; ++S) {
      index_t next = 0;
      for (int s = 0; s < S; ++s) {
        const latent_range r = latent_slice(F, S, s);
        CHECK(r.first == next);
        CHECK((r.count == F / S || r.count == F / S + 1));
        CHECK((r.count == F / S + 1) == (s < F % S));
        next = r.first + r.count;
      }
      CHECK(next == F);
    }
  CHECK_THAT(hsae_test::message_of<config_error>([] { (void)latent_slice(10, 3, 3); }),
             Catch::Contains("slice 3 of 10 latents over 3 shards"));
  CHECK_THAT(hsae_test::message_of<config_error>([] { (void)latent_slice(10, 0, 0); }),
             Catch::Contains("over 0 shards"));
}

TEST_CASE("single_process_communicator: every collective is the identity", "[comm]") {
  single_process_communicator c;
  CHECK(c.rank() == 0);
  CHECK(c.size() == 1);
  const std::vector<double> send{1.5, -2.0, 3.25};
  std::vector<double> recv(3, 0.0);
  c.all_gather(send.data(), send.size(), recv.data());
  CHECK(recv == send);
  std::vector<std::int64_t> data{4, 5, -6};
  c.all_reduce_sum(data.data(), data.size(), reduction::ordered);
  CHECK(data == std::vector<std::int64_t>{4, 5, -6});
  std::vector<std::uint8_t> bytes{1, 2}, out(2, 0);
  c.reduce_scatter_sum(bytes.data(), bytes.size(), out.data());
  CHECK(out == bytes);
  c.broadcast(data.data(), data.size(), 0);
  CHECK(data == std::vector<std::int64_t>{4, 5, -6});
  CHECK_THAT(hsae_test::message_of<config_error>([&] { c.broadcast(data.data(), data.size(), 1); }),
             Catch::Contains("root 1 is not a rank of a group of size 1"));
  single_process_communicator sub = c.split(3, 7);
  CHECK(sub.size() == 1);
  c.all_gather<float>(nullptr, 0, nullptr);  // n = 0 reads nothing
  c.barrier();
}

TEMPLATE_TEST_CASE("merge_topk_lists of S shards' local top-ks equals topk of the whole rows, bit for bit",
                   "[comm]", float, double) {
  using T = TestType;
  const cpu_backend be;
  const Eigen::Index B = 41;
  for (index_t F : {1, 7, 10, 64, 300}) {
    const row_matrix<T> pre = tie_rows<T>(B, F, std::uint64_t(F) * 31 + sizeof(T));
    for (int S : {1, 2, 3, 4, 7, 12}) {
      for (int k : {1, 2, 3, 5, 8, 33}) {
        if (k > F) continue;
        INFO("F=" << F << " S=" << S << " k=" << k);
        sparse_code<T> whole;
        topk<T>(be, pre, k, whole);
        // The slots an all-gather would deliver: shard s, row b, entry t at ((s B) + b) k + t.
        std::vector<T> values(std::size_t(S) * std::size_t(B) * std::size_t(k), T(0));
        std::vector<index_t> indices(values.size(), 0);
        std::vector<int> counts(static_cast<std::size_t>(S));
        for (int s = 0; s < S; ++s) {
          const sparse_code<T> local = local_topk<T>(be, pre, S, s, k);
          counts[std::size_t(s)] = local.k();
          for (Eigen::Index b = 0; b < B; ++b)
            for (int t = 0; t < local.k(); ++t) {
              const std::size_t at = (std::size_t(s) * std::size_t(B) + std::size_t(b)) * std::size_t(k) + std::size_t(t);
              values[at] = local.values(b, t);
              indices[at] = local.indices(b, t);
            }
        }
        sparse_code<T> merged;
        merge_topk_lists<T>(values.data(), indices.data(), B, S, counts.data(), k, merged);
        CHECK(hsae_test::bitwise_equal(merged.values, whole.values));
        CHECK(merged.indices == whole.indices);
      }
    }
  }
}

TEST_CASE("sharded_topk over the single-process communicator is topk", "[comm]") {
  using T = float;
  const cpu_backend be;
  single_process_communicator c;
  const row_matrix<T> pre = tie_rows<T>(23, 50, 5);
  sparse_code<T> whole, merged;
  topk<T>(be, pre, 6, whole);
  sharded_topk<T>(c, 50, local_topk<T>(be, pre, 1, 0, 6), 6, merged);
  CHECK(hsae_test::bitwise_equal(merged.values, whole.values));
  CHECK(merged.indices == whole.indices);

  // No rows: an empty [0, k] code.
  sparse_code<T> none, out;
  none.resize(0, 6);
  sharded_topk<T>(c, 50, none, 6, out);
  CHECK(out.rows() == 0);
  CHECK(out.k() == 6);
}

TEST_CASE("sharded_topk refuses a local top-k of the wrong shape, outside the slice, or k > d_sae", "[comm]") {
  using T = float;
  const cpu_backend be;
  single_process_communicator c;
  const row_matrix<T> pre = tie_rows<T>(4, 10, 9);
  sparse_code<T> local = local_topk<T>(be, pre, 1, 0, 3), out;
  CHECK_THAT(hsae_test::message_of<shape_error>([&] { sharded_topk<T>(c, 10, local, 4, out); }),
             Catch::Contains("expects its local top-k as [4, 4]"));
  CHECK_THAT(hsae_test::message_of<config_error>([&] { sharded_topk<T>(c, 2, local, 3, out); }),
             Catch::Contains("k=3 must be in [1, 2]"));
  local.indices(1, 2) = 10;
  CHECK_THAT(hsae_test::message_of<shape_error>([&] { sharded_topk<T>(c, 10, local, 3, out); }),
             Catch::Contains("names latent 10 (row 1, entry 2)"));
}
