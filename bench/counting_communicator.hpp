// SPDX-License-Identifier: Apache-2.0
// A communicator that forwards every collective to another one (mpi_communicator in
// bench_distributed) and counts, per message, the bytes this rank sends and receives.
//
// A message is (group, collective, element size, element count): the group is the label
// given to the communicator ("world") or to the sub-communicators its split() makes, named
// in the order of the splits (process_grid splits the world into its shard group, then its
// replica group). The bytes are the collective's payload as docs/DISTRIBUTED.md counts
// them, not what a particular MPI algorithm puts on the wire:
//
// | collective | sent | received |
// |---|---|---|
// | all_gather(n) | n | (P - 1) n |
// | all_reduce_sum(n), ordered (an all-gather, then a sum in rank order) | n | (P - 1) n |
// | all_reduce_sum(n), native (a ring: reduce-scatter + all-gather) | 2 (P - 1) n / P | 2 (P - 1) n / P |
// | reduce_scatter_sum(n), either (n for each of the others) | (P - 1) n | (P - 1) n |
// | broadcast(n) | root: (P - 1) n | others: n |
//
// in elements of the message's size, P the group's size; a group of one moves nothing.
#pragma once

#include <hsae/comm/communicator.hpp>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace hsae_bench {

/// One message's totals since the last reset.
struct message_count {
  std::int64_t calls = 0, sent = 0, received = 0;
};

/// (group, collective, element bytes, elements) -> totals.
using message_key = std::tuple<std::string, std::string, int, std::int64_t>;
using message_table = std::map<message_key, message_count>;

/// Counts shared by a communicator and every communicator split from it.
struct comm_counts {
  message_table messages;
  void reset() { messages.clear(); }
  std::int64_t sent() const {
    std::int64_t s = 0;
    for (const auto& [k, c] : messages) s += c.sent;
    return s;
  }
  std::int64_t received() const {
    std::int64_t s = 0;
    for (const auto& [k, c] : messages) s += c.received;
    return s;
  }
};

template <hsae::communicator Inner>
class counting_communicator {
 public:
  /// Wraps `inner` as group `label`; its splits get the names in `split_labels`, in order
  /// ("split<i>" past the list's end).
  counting_communicator(Inner inner, std::string label, std::vector<std::string> split_labels,
                        std::shared_ptr<comm_counts> counts = std::make_shared<comm_counts>())
      : inner_(std::move(inner)), label_(std::move(label)), split_labels_(std::move(split_labels)),
        counts_(std::move(counts)) {}

  int rank() const { return inner_.rank(); }
  int size() const { return inner_.size(); }
  comm_counts& counts() { return *counts_; }
  const std::shared_ptr<comm_counts>& shared_counts() const { return counts_; }
  Inner& inner() { return inner_; }

  template <hsae::comm_scalar T>
  void all_gather(const T* send, std::size_t n, T* recv) {
    add<T>("all_gather", n, std::int64_t(n), std::int64_t(size() - 1) * std::int64_t(n));
    inner_.all_gather(send, n, recv);
  }
  template <hsae::comm_scalar T>
  void all_reduce_sum(T* data, std::size_t n, hsae::reduction red = hsae::reduction::native) {
    const std::int64_t P = size(), m = std::int64_t(n);
    if (red == hsae::reduction::ordered)
      add<T>("all_reduce_sum ordered", n, m, (P - 1) * m);
    else
      add<T>("all_reduce_sum native", n, 2 * (P - 1) * m / P, 2 * (P - 1) * m / P);
    inner_.all_reduce_sum(data, n, red);
  }
  template <hsae::comm_scalar T>
  void reduce_scatter_sum(const T* send, std::size_t n, T* recv, hsae::reduction red = hsae::reduction::native) {
    const std::int64_t moved = std::int64_t(size() - 1) * std::int64_t(n);
    add<T>(red == hsae::reduction::ordered ? "reduce_scatter_sum ordered" : "reduce_scatter_sum native", n, moved,
           moved);
    inner_.reduce_scatter_sum(send, n, recv, red);
  }
  template <hsae::comm_scalar T>
  void broadcast(T* data, std::size_t n, int root) {
    const std::int64_t m = std::int64_t(n);
    if (rank() == root)
      add<T>("broadcast", n, std::int64_t(size() - 1) * m, 0);
    else
      add<T>("broadcast", n, 0, m);
    inner_.broadcast(data, n, root);
  }
  counting_communicator split(int color, int key) {
    const std::size_t i = splits_++;
    std::string name = i < split_labels_.size() ? split_labels_[i] : "split" + std::to_string(i);
    return counting_communicator(inner_.split(color, key), std::move(name), {}, counts_);
  }
  void barrier() { inner_.barrier(); }

 private:
  template <class T>
  void add(const char* what, std::size_t n, std::int64_t sent, std::int64_t received) {
    if (size() <= 1) sent = received = 0;
    message_count& c = counts_->messages[message_key{label_, what, int(sizeof(T)), std::int64_t(n)}];
    ++c.calls;
    c.sent += sent * std::int64_t(sizeof(T));
    c.received += received * std::int64_t(sizeof(T));
  }

  Inner inner_;
  std::string label_;
  std::vector<std::string> split_labels_;
  std::size_t splits_ = 0;
  std::shared_ptr<comm_counts> counts_;
};

}  // namespace hsae_bench
