// SPDX-License-Identifier: Apache-2.0
/// \file distributed/sae_shard.hpp
/// What one rank of a shard group holds of an SAE (docs/DISTRIBUTED.md, "What each rank
/// holds"): the encoder rows of its slice of the latents, the decoder columns of its slice
/// of d_model for every latent, and b_dec whole. `shard_of` cuts a whole model,
/// `gather_model` puts one back together on every rank of the group.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include "../comm/communicator.hpp"
#include "../comm/sharded_topk.hpp"
#include "../config.hpp"
#include "../error.hpp"
#include "../matrix.hpp"
#include "../model.hpp"

HSAE_NAMESPACE_BEGIN

/// One rank's part of an `sae<T>` split over `shards` ranks. Also the shape of its
/// gradients and Adam moments.
template <cpu_scalar T>
struct sae_shard {
  int d_model = 0;
  index_t d_sae = 0;
  /// This rank's latents (encoder rows) and d_model columns (decoder columns).
  latent_range latents, columns;
  row_matrix<T> W_enc;  ///< [latents.count, d_model]
  vector<T> b_enc;      ///< [latents.count]
  /// The decoder columns as a model of width columns.count: dec.W_dec [d_sae,
  /// columns.count] and dec.b_dec (b_dec's columns; kept equal to `b_dec`'s segment).
  /// dec.W_enc and dec.b_enc are empty. The schedule loss runs on it unchanged.
  sae<T> dec;
  vector<T> b_dec;  ///< [d_model], the same on every rank of the group

  /// Zeroed arrays shaped for shard `s` of `shards` of a d_model x d_sae model.
  void resize(int dm, index_t f, int shards, int s) {
    d_model = dm;
    d_sae = f;
    latents = latent_slice(f, shards, s);
    columns = latent_slice(index_t(dm), shards, s);
    W_enc.setZero(latents.count, dm);
    b_enc.setZero(latents.count);
    dec.W_dec.setZero(f, columns.count);
    dec.b_dec.setZero(columns.count);
    b_dec.setZero(dm);
  }
  /// Same shapes as `o`, zeroed.
  void zeros_like(const sae_shard& o) {
    d_model = o.d_model;
    d_sae = o.d_sae;
    latents = o.latents;
    columns = o.columns;
    W_enc.setZero(o.W_enc.rows(), o.W_enc.cols());
    b_enc.setZero(o.b_enc.size());
    dec.W_dec.setZero(o.dec.W_dec.rows(), o.dec.W_dec.cols());
    dec.b_dec.setZero(o.dec.b_dec.size());
    b_dec.setZero(o.b_dec.size());
  }
  /// Copies b_dec's columns into dec.b_dec (after b_dec changed).
  void sync_decoder_bias() { dec.b_dec = b_dec.segment(columns.first, columns.count); }
};

/// Shard `s` of `shards` of the whole model `m`.
/// \throws hsae::config_error unless 0 <= s < shards.
template <cpu_scalar T, int F>
sae_shard<T> shard_of(const sae<T, F>& m, int shards, int s) {
  m.check_shapes();
  sae_shard<T> o;
  o.resize(m.d_model(), m.d_sae(), shards, s);
  o.W_enc = m.W_enc.middleRows(o.latents.first, o.latents.count);
  o.b_enc = m.b_enc.segment(o.latents.first, o.latents.count);
  o.dec.W_dec = m.W_dec.middleCols(o.columns.first, o.columns.count);
  o.b_dec = m.b_dec;
  o.sync_decoder_bias();
  return o;
}

/// The whole model from the shards of `group` (every rank of it calls this; each gets the
/// model). Two all-gathers: the encoder rows and biases, and the decoder columns, each
/// padded to the widest slice.
template <cpu_scalar T, int F = dynamic, communicator Comm>
  requires comm_scalar<T>
void gather_model(Comm& group, const sae_shard<T>& sh, sae<T, F>& out) {
  const int S = group.size();
  const int D = sh.d_model;
  const index_t Fw = sh.d_sae;
  out.resize(D, int(Fw));
  // Encoder: rows of D + 1 values (the row, then b_enc), ceil(F / S) rows per rank.
  const std::size_t er = std::size_t(latent_slice(Fw, S, 0).count), ew = std::size_t(D) + 1;
  std::vector<T> send(er * ew, T(0)), recv(er * ew * std::size_t(S));
  for (index_t f = 0; f < sh.latents.count; ++f) {
    std::copy_n(sh.W_enc.row(f).data(), D, send.data() + std::size_t(f) * ew);
    send[std::size_t(f) * ew + std::size_t(D)] = sh.b_enc[f];
  }
  group.all_gather(send.data(), send.size(), recv.data());
  for (int s = 0; s < S; ++s) {
    const latent_range r = latent_slice(Fw, S, s);
    for (index_t f = 0; f < r.count; ++f) {
      const T* src = recv.data() + (std::size_t(s) * er + std::size_t(f)) * ew;
      std::copy_n(src, D, out.W_enc.row(r.first + f).data());
      out.b_enc[r.first + f] = src[D];
    }
  }
  // Decoder: [F, ceil(D / S)] columns per rank.
  const std::size_t dw = std::size_t(latent_slice(index_t(D), S, 0).count);
  send.assign(std::size_t(Fw) * dw, T(0));
  recv.resize(send.size() * std::size_t(S));
  for (index_t f = 0; f < Fw; ++f)
    std::copy_n(sh.dec.W_dec.row(f).data(), sh.columns.count, send.data() + std::size_t(f) * dw);
  group.all_gather(send.data(), send.size(), recv.data());
  for (int s = 0; s < S; ++s) {
    const latent_range c = latent_slice(index_t(D), S, s);
    for (index_t f = 0; f < Fw; ++f)
      std::copy_n(recv.data() + (std::size_t(s) * std::size_t(Fw) + std::size_t(f)) * dw, c.count,
                  out.W_dec.row(f).data() + c.first);
  }
  out.b_dec = sh.b_dec;
}

HSAE_NAMESPACE_END
