// SPDX-License-Identifier: Apache-2.0
/// \file distributed/grid.hpp
/// The ranks of a distributed run as a grid of `replicas` x `shards` (docs/DISTRIBUTED.md):
/// world rank w is shard w mod S of replica w / S. The *shard group* of a replica (its S
/// ranks) splits one model by latents and decoder columns; the *replica group* of a shard
/// (its R ranks) holds the same slice of the model and sums its gradients.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../comm/communicator.hpp"
#include "../comm/sharded_topk.hpp"
#include "../config.hpp"
#include "../error.hpp"

HSAE_NAMESPACE_BEGIN

/// How `sharded_train_step` sums the replicas' gradients over a replica group
/// (docs/DISTRIBUTED.md, "Data parallel"). A replica's gradient is nonzero only on the
/// latents its code touched (its rows' top-K and AuxK codes):
/// - `dense`: one all-reduce of the whole gradient of the shard (2 F D / S values);
/// - `sparse`: the touched latent ids and their gradient rows are all-gathered (padded to
///   the largest replica's count) and summed in replica order: O(B K D / S) values;
/// - `automatic` (the default): `sparse` when its gathered bytes are below the dense
///   all-reduce's (decided from the replicas' counts, the same on every rank of the group).
/// With `reduction::ordered` both sums give the same bits (tested); b_dec's gradient (D
/// values) is always all-reduced densely.
enum class dp_reduction { automatic, dense, sparse };

/// A `replicas` x `shards` grid over the ranks of a communicator.
template <communicator Comm>
class process_grid {
 public:
  /// Splits `world` (every rank passes the same `shards`) into shard and replica groups.
  /// `red` is how the step sums over ranks: `reduction::ordered` (the default) gives the
  /// same bits on every rank and in every run on this grid; `native` uses the library's
  /// all-reduce. `dp` is how replicas sum their gradients (`dp_reduction`; every rank
  /// passes the same). \throws hsae::config_error unless shards >= 1 divides world.size().
  process_grid(Comm world, int shards, reduction red = reduction::ordered, dp_reduction dp = dp_reduction::automatic)
      : world_(std::move(world)),
        shards_(checked_shards(world_, shards)),
        red_(red),
        dp_(dp),
        replicas_(world_.size() / shards_),
        replica_(world_.rank() / shards_),
        shard_(world_.rank() % shards_),
        shard_group_(world_.split(replica_, shard_)),
        replica_group_(world_.split(shard_, replica_)) {}

  int replicas() const { return replicas_; }
  int shards() const { return shards_; }
  int replica() const { return replica_; }
  int shard() const { return shard_; }
  int rank() const { return world_.rank(); }
  int size() const { return world_.size(); }
  /// Rank 0 of the world: the one that writes files and prints.
  bool is_root() const { return world_.rank() == 0; }
  reduction sums() const { return red_; }
  /// How the replicas' gradients are summed (`dp_reduction`).
  dp_reduction data_parallel() const { return dp_; }
  /// Changes it for the following steps; every rank of the grid must change it alike.
  void set_data_parallel(dp_reduction dp) { dp_ = dp; }
  Comm& world() { return world_; }
  Comm& shard_group() { return shard_group_; }
  Comm& replica_group() { return replica_group_; }

  /// Rows [first, first + count) of a global batch of `rows` that this replica trains on
  /// (contiguous, as even as possible).
  latent_range rows_of_replica(std::int64_t rows) const {
    return latent_slice(index_t(rows), replicas_, replica_);
  }

  /// Refuses a configuration that differs between ranks: every rank passes the same
  /// named fields (name, value as text); their digests are all-gathered and the first
  /// field that differs is named, with the ranks that disagree with rank 0.
  /// \throws hsae::config_error on a mismatch (on every rank: each sees every digest).
  void check_same(const std::vector<std::pair<std::string, std::string>>& fields) {
    const std::size_t n = fields.size();
    std::vector<std::int64_t> mine(n + 1), all((n + 1) * std::size_t(world_.size()));
    mine[0] = std::int64_t(n);
    for (std::size_t i = 0; i < n; ++i) mine[i + 1] = digest(fields[i].first + '\0' + fields[i].second);
    world_.all_gather(mine.data(), n + 1, all.data());
    for (int r = 1; r < world_.size(); ++r)
      detail::expects<config_error>(all[std::size_t(r) * (n + 1)] == std::int64_t(n), "distributed run: rank ", r,
                                    " checks ", all[std::size_t(r) * (n + 1)], " configuration fields, rank 0 ", n,
                                    " (different programs or versions?)");
    for (std::size_t i = 0; i < n; ++i) {
      std::string differ;
      for (int r = 1; r < world_.size(); ++r)
        if (all[std::size_t(r) * (n + 1) + i + 1] != all[i + 1]) differ += (differ.empty() ? "" : ", ") + std::to_string(r);
      detail::expects<config_error>(differ.empty(), "distributed run: '", fields[i].first, "' differs between ranks: rank ",
                                    world_.rank(), " has '", fields[i].second, "'; ranks ", differ,
                                    " disagree with rank 0 (every rank must be started with the same configuration)");
    }
  }

 private:
  static std::int64_t digest(const std::string& s) {  // FNV-1a, 64 bits
    std::uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return std::int64_t(h);
  }

  static int checked_shards(const Comm& world, int shards) {
    detail::expects<config_error>(shards >= 1 && world.size() % shards == 0, "process_grid: ", world.size(),
                                  " ranks cannot form a grid of ", shards,
                                  " shards (shards must divide the number of ranks)");
    return shards;
  }

  Comm world_;
  int shards_;
  reduction red_;
  dp_reduction dp_;
  int replicas_, replica_, shard_;
  Comm shard_group_, replica_group_;
};

HSAE_NAMESPACE_END
