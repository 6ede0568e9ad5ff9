// SPDX-License-Identifier: Apache-2.0
/// \file comm/communicator.hpp
/// The communicator concept of distributed training (docs/DISTRIBUTED.md, "Communicator")
/// and its trivial implementation, `single_process_communicator`.
///
/// A communicator is a group of `size()` ranks; this process is rank `rank()`. Its
/// collectives are blocking and must be called by every rank of the group, in the same
/// order, with the same counts:
///
/// | call | buffers | result |
/// |---|---|---|
/// | `all_gather(send, n, recv)` | send n, recv size() n | recv[r n, (r + 1) n) = rank r's send |
/// | `all_reduce_sum(data, n [, reduction])` | data n | data = sum over ranks of data |
/// | `reduce_scatter_sum(send, n, recv [, reduction])` | send size() n, recv n | recv = sum over ranks of their send[rank() n, (rank() + 1) n) |
/// | `broadcast(data, n, root)` | data n | data = root's data |
/// | `split(color, key)` | | the ranks of equal color as a new communicator, ranked by (key, old rank) |
/// | `barrier()` | | returns when every rank has called it |
///
/// Send and receive buffers must not overlap. `n` may be 0 (the pointers are then not
/// read). The element types are `comm_scalar`: float, double, int32, int64, uint8.
/// `reduction::ordered` makes a sum independent of the library's algorithm: every rank
/// adds the contributions in rank order, (((x_0 + x_1) + x_2) + ...), so the result is
/// bitwise the same on every rank and in every run on the same grid ("Reduction order").
#pragma once

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../config.hpp"
#include "../error.hpp"

HSAE_NAMESPACE_BEGIN

/// The element types a communicator moves and sums.
template <class T>
concept comm_scalar = std::same_as<T, float> || std::same_as<T, double> || std::same_as<T, std::int32_t> ||
                      std::same_as<T, std::int64_t> || std::same_as<T, std::uint8_t>;

/// How a sum over ranks is associated: `native` lets the library choose (fastest; may
/// round differently between grids, algorithms and runs), `ordered` adds in rank order
/// after gathering every contribution (bitwise reproducible; moves size() times the data
/// of a ring all-reduce to every rank). Integer sums are exact either way.
enum class reduction { native, ordered };

namespace detail {

/// The concept's requirements for one element type T.
template <class C, class T>
concept communicator_for = requires(C& c, const C& cc, T* data, const T* send, std::size_t n, int i, reduction red) {
  c.all_gather(send, n, data);
  c.all_reduce_sum(data, n);
  c.all_reduce_sum(data, n, red);
  c.reduce_scatter_sum(send, n, data);
  c.reduce_scatter_sum(send, n, data, red);
  c.broadcast(data, n, i);
};

}  // namespace detail

/// A group of ranks with the collectives distributed training needs (this file's table),
/// for every `comm_scalar`. `split` returns the same type (sub-groups: the shard and
/// replica groups of docs/DISTRIBUTED.md).
template <class C>
concept communicator =
    std::movable<C> && requires(C& c, const C& cc, int i) {
      { cc.rank() } -> std::convertible_to<int>;
      { cc.size() } -> std::convertible_to<int>;
      { c.split(i, i) } -> std::same_as<C>;
      c.barrier();
    } && detail::communicator_for<C, float> && detail::communicator_for<C, double> &&
    detail::communicator_for<C, std::int32_t> && detail::communicator_for<C, std::int64_t> &&
    detail::communicator_for<C, std::uint8_t>;

/// The group of one: every collective is the identity (a copy where the result goes to
/// another buffer). Today's single-process code path, and the reference of the tests.
class single_process_communicator {
 public:
  int rank() const noexcept { return 0; }
  int size() const noexcept { return 1; }

  template <comm_scalar T>
  void all_gather(const T* send, std::size_t n, T* recv) {
    if (n) std::memmove(recv, send, n * sizeof(T));
  }
  template <comm_scalar T>
  void all_reduce_sum(T*, std::size_t, reduction = reduction::native) {}
  template <comm_scalar T>
  void reduce_scatter_sum(const T* send, std::size_t n, T* recv, reduction = reduction::native) {
    if (n) std::memmove(recv, send, n * sizeof(T));
  }
  /// \throws hsae::config_error unless root == 0.
  template <comm_scalar T>
  void broadcast(T*, std::size_t, int root) {
    detail::expects<config_error>(root == 0, "broadcast: root ", root, " is not a rank of a group of size 1");
  }
  /// Every color gives the group of one again.
  single_process_communicator split(int, int) const { return {}; }
  void barrier() {}
};

static_assert(communicator<single_process_communicator>);

HSAE_NAMESPACE_END
