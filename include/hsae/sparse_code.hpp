// SPDX-License-Identifier: Apache-2.0
/// \file sparse_code.hpp
/// The output of an encoder: per row, the top-k latents sorted by value, descending.
#pragma once

#include "config.hpp"
#include "matrix.hpp"

HSAE_NAMESPACE_BEGIN

/// `values [rows, k]` (descending per row; zeros when fewer than k latents are
/// positive) and `indices [rows, k]` (distinct latents per row). The top-j prefix of a
/// row is its top-j code for every j <= k.
template <cpu_scalar T>
struct sparse_code {
  row_matrix<T> values;
  index_matrix indices;

  Eigen::Index rows() const { return values.rows(); }
  int k() const { return int(values.cols()); }
  void resize(Eigen::Index rows, int k) {
    values.resize(rows, k);
    indices.resize(rows, k);
  }
};

HSAE_NAMESPACE_END
