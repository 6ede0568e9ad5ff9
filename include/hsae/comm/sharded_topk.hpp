// SPDX-License-Identifier: Apache-2.0
/// \file comm/sharded_topk.hpp
/// The exact global sorted top-K of latent-sharded encoding (docs/DISTRIBUTED.md, steps
/// 1-3): every rank of a shard group holds the pre-activations of its own slice of the
/// latents, takes its local sorted top-K with `topk` (cpu/topk.hpp or cuda/topk.cuh) and
/// offsets the indices by its slice's first latent; `sharded_topk` all-gathers the local
/// lists and merges them into the global top-K, the same on every rank.
///
/// The merge ranks by the single-process top-k's total order: value descending by
/// `detail::ordered_key` (-0.0 equals +0.0, NaN below -inf), then global index ascending.
/// Under a total order the global top-K is contained in the union of the local top-Ks,
/// so the result equals `topk` over the whole row bit for bit (values copied, never
/// recomputed), ties, NaN and -0.0 included.
///
/// A shard narrower than K contributes all its latents: its local list holds
/// min(K, slice width) entries. Every rank computes each shard's count from
/// `latent_slice`, so the lists travel in fixed slots of K entries (one all-gather of
/// equal counts); the unused tail of a narrow shard's slot is never read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../config.hpp"
#include "../detail/ordered_key.hpp"
#include "../error.hpp"
#include "../matrix.hpp"
#include "../sparse_code.hpp"
#include "communicator.hpp"

HSAE_NAMESPACE_BEGIN

/// A contiguous range of latents [first, first + count).
struct latent_range {
  index_t first = 0;
  index_t count = 0;
  friend bool operator==(const latent_range&, const latent_range&) = default;
};

/// Slice `s` of `d_sae` latents split over `shards` ranks: contiguous and as even as
/// possible, the first d_sae mod shards slices one latent longer. A slice is empty when
/// shards > d_sae.
/// \throws hsae::config_error unless d_sae >= 0, shards >= 1 and 0 <= s < shards.
inline latent_range latent_slice(index_t d_sae, int shards, int s) {
  detail::expects<config_error>(d_sae >= 0 && shards >= 1 && s >= 0 && s < shards, "latent_slice: slice ", s,
                                " of ", d_sae, " latents over ", shards, " shards is out of range");
  const index_t base = d_sae / shards, extra = d_sae % shards;
  return {index_t(s) * base + std::min<index_t>(index_t(s), extra), base + (index_t(s) < extra ? 1 : 0)};
}

namespace detail {

/// a ranks before b in the top-k order (value descending by key, then index ascending).
template <cpu_scalar T>
inline bool topk_before(T va, index_t ia, T vb, index_t ib) {
  const auto ka = ordered_key(va), kb = ordered_key(vb);
  return ka > kb || (ka == kb && ia < ib);
}

}  // namespace detail

/// Merges `shards` sorted lists per row into the sorted top-`k`. `values` / `indices`
/// hold the lists in slots: shard s, row b, entry t at [(s rows + b) k + t], with
/// `counts[s]` valid entries per row (each list sorted in the top-k order, indices
/// distinct across shards); `out` is resized to [rows, k]. Cost O(rows k shards).
/// \throws hsae::config_error when the counts add up to fewer than k.
template <cpu_scalar T>
void merge_topk_lists(const T* values, const index_t* indices, Eigen::Index rows, int shards, const int* counts,
                      int k, sparse_code<T>& out) {
  std::int64_t total = 0;
  for (int s = 0; s < shards; ++s) total += counts[s];
  detail::expects<config_error>(k >= 1 && total >= k, "merge_topk_lists: k=", k, " needs at least k entries per row, the ",
                                shards, " lists hold ", total);
  out.resize(rows, k);
  std::vector<int> head(std::size_t(shards), 0);
  const std::size_t slot = std::size_t(k);
  for (Eigen::Index b = 0; b < rows; ++b) {
    std::fill(head.begin(), head.end(), 0);
    for (int t = 0; t < k; ++t) {
      int best = -1;
      T bv{};
      index_t bi = 0;
      for (int s = 0; s < shards; ++s) {
        if (head[std::size_t(s)] >= counts[s]) continue;
        const std::size_t at = (std::size_t(s) * std::size_t(rows) + std::size_t(b)) * slot + std::size_t(head[std::size_t(s)]);
        if (best < 0 || detail::topk_before(values[at], indices[at], bv, bi)) {
          best = s;
          bv = values[at];
          bi = indices[at];
        }
      }
      ++head[std::size_t(best)];
      out.values(b, t) = bv;
      out.indices(b, t) = bi;
    }
  }
}

/// Reusable buffers of `sharded_topk` (the gathered bytes), so that a step does not
/// allocate once the shapes settle.
struct sharded_topk_workspace {
  std::vector<std::uint8_t> send, recv;
  std::vector<char> unpacked;
  std::vector<int> counts;
};

/// The merged sorted top-`k` of per-rank sorted lists: rank s contributes `counts[s]`
/// entries per row (every rank passes the same counts; they add up to at least k), with
/// global indices inside `mine` (this rank's latents). `local` is [B, counts[rank]].
/// `out` ([B, k]) is the same on every rank. One all-gather of B k (sizeof(T) + 4) bytes
/// per rank. `sharded_topk` is this with the counts of `latent_slice`; AuxK's top-k among
/// dead latents passes each shard's dead count.
/// \throws hsae::shape_error when `local` is not [B, counts[rank]] or names a latent
///         outside `mine`, hsae::config_error when the counts add up to fewer than k.
template <cpu_scalar T, communicator Comm>
void gather_topk(Comm& comm, const sparse_code<T>& local, int k, const int* counts, latent_range mine,
                 sparse_code<T>& out, sharded_topk_workspace& ws) {
  const int S = comm.size(), me = comm.rank();
  const int kc = counts[me];
  const Eigen::Index B = local.values.rows();
  detail::expects<shape_error>(local.values.cols() == kc && local.indices.rows() == B && local.indices.cols() == kc,
                               "sharded_topk: rank ", me, " holds latents [", mine.first, ", ",
                               mine.first + mine.count, ") and expects its local top-k as [", B, ", ", kc,
                               "], got values [", local.values.rows(), ", ", local.values.cols(),
                               "] and indices [", local.indices.rows(), ", ", local.indices.cols(), "]");
  // Pack: values [B, k] then indices [B, k], in slots of k (the unused tail zeroed).
  const std::size_t per = std::size_t(B) * std::size_t(k);
  const std::size_t bytes = per * (sizeof(T) + sizeof(index_t));
  ws.send.assign(bytes, 0);
  for (Eigen::Index b = 0; b < B; ++b)
    for (int t = 0; t < kc; ++t) {
      const index_t i = local.indices(b, t);
      detail::expects<shape_error>(i >= mine.first && i < mine.first + mine.count, "sharded_topk: rank ", me,
                                   " holds latents [", mine.first, ", ", mine.first + mine.count,
                                   "), but its local top-k names latent ", i, " (row ", b, ", entry ", t,
                                   "); add the slice's first latent to topk's indices");
      const T v = local.values(b, t);
      std::memcpy(ws.send.data() + (std::size_t(b) * std::size_t(k) + std::size_t(t)) * sizeof(T), &v, sizeof(T));
      std::memcpy(ws.send.data() + per * sizeof(T) + (std::size_t(b) * std::size_t(k) + std::size_t(t)) * sizeof(index_t),
                  &i, sizeof(index_t));
    }
  ws.recv.resize(bytes * std::size_t(S));
  comm.all_gather(ws.send.data(), bytes, ws.recv.data());
  // Unpack into [S][B][k] values and indices (aligned) for the merge.
  ws.unpacked.resize(per * std::size_t(S) * (sizeof(T) + sizeof(index_t)) + alignof(T));
  T* values = reinterpret_cast<T*>(ws.unpacked.data());
  index_t* indices = reinterpret_cast<index_t*>(values + per * std::size_t(S));
  for (int s = 0; s < S; ++s) {
    const std::uint8_t* src = ws.recv.data() + std::size_t(s) * bytes;
    std::memcpy(values + std::size_t(s) * per, src, per * sizeof(T));
    std::memcpy(indices + std::size_t(s) * per, src + per * sizeof(T), per * sizeof(index_t));
  }
  merge_topk_lists<T>(values, indices, B, S, counts, k, out);
}

/// The global sorted top-`k` of the rows whose latents are split over `comm`'s ranks by
/// `latent_slice(d_sae, comm.size(), rank)`. `local` is this rank's local top-k:
/// [B, min(k, slice width)], sorted, with global latent indices (its slice's first
/// latent added to `topk`'s). Every rank must pass the same B, k and d_sae. `out`
/// (resized to [B, k]) is the same on every rank and equals the single-process `topk`
/// of the whole rows bit for bit. One all-gather of B k (sizeof(T) + 4) bytes per rank.
/// \throws hsae::config_error unless 1 <= k <= d_sae, hsae::shape_error when `local`
///         does not have min(k, slice width) columns, or an index is outside the slice.
template <cpu_scalar T, communicator Comm>
void sharded_topk(Comm& comm, index_t d_sae, const sparse_code<T>& local, int k, sparse_code<T>& out,
                  sharded_topk_workspace& ws) {
  const int S = comm.size();
  detail::expects<config_error>(k >= 1 && k <= d_sae, "sharded_topk: k=", k, " must be in [1, ", d_sae,
                                "] (d_sae)");
  ws.counts.resize(static_cast<std::size_t>(S));
  for (int s = 0; s < S; ++s)
    ws.counts[std::size_t(s)] = int(std::min<index_t>(index_t(k), latent_slice(d_sae, S, s).count));
  const latent_range mine = latent_slice(d_sae, S, comm.rank());
  gather_topk(comm, local, k, ws.counts.data(), mine, out, ws);
}

/// `sharded_topk` with its own workspace (allocates per call).
template <cpu_scalar T, communicator Comm>
void sharded_topk(Comm& comm, index_t d_sae, const sparse_code<T>& local, int k, sparse_code<T>& out) {
  sharded_topk_workspace ws;
  sharded_topk(comm, d_sae, local, k, out, ws);
}

HSAE_NAMESPACE_END
