// SPDX-License-Identifier: Apache-2.0
/// \file matrix.hpp
/// Eigen vocabulary used across the CPU API: row-major matrices and non-owning views.
/// Users pass their own memory with `Eigen::Map` (no copy); every entry point accepts
/// `cref<T>` (= `Eigen::Ref<const row_matrix<T>>`), which binds to matrices, maps and
/// row blocks alike.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <type_traits>

#include "config.hpp"
#include "error.hpp"

HSAE_NAMESPACE_BEGIN

/// Row-major dynamic matrix: a batch [rows, width] or a weight matrix [d_sae, d_model].
template <class T, int Rows = Eigen::Dynamic>
using row_matrix = Eigen::Matrix<T, Rows, Eigen::Dynamic, Eigen::RowMajor>;
/// Column vector (biases).
template <class T>
using vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
/// Read-only view of a row-major matrix (unit inner stride, any outer stride). `T` is
/// not deduced from it (`std::type_identity_t`), so a function taking `sae<T, F>` and
/// `cref<T>` accepts any matrix, map or block of the model's scalar type.
template <class T>
using cref = Eigen::Ref<const row_matrix<std::type_identity_t<T>>>;
/// Writable view of a row-major matrix.
template <class T>
using mref = Eigen::Ref<row_matrix<std::type_identity_t<T>>>;
/// Read-only view of a vector.
template <class T>
using cvref = Eigen::Ref<const vector<std::type_identity_t<T>>>;
/// Latent indices, [rows, k] row-major.
using index_matrix = Eigen::Matrix<index_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Supported storage precisions on the CPU.
template <class T>
concept cpu_scalar = std::same_as<T, float> || std::same_as<T, double>;

namespace detail {

inline void expect_shape(const char* what, Eigen::Index rows, Eigen::Index cols, Eigen::Index want_rows,
                         Eigen::Index want_cols) {
  expects<shape_error>(rows == want_rows && cols == want_cols, what, " has shape [", rows, ", ", cols,
                       "], expected [", want_rows, ", ", want_cols, "]");
}

/// Throws hsae::numeric_error naming `what` and the first non-finite entry.
/// True when every entry is finite: one pass over the exponent bits (vectorises;
/// Eigen's allFinite makes two floating-point passes).
template <class Derived>
bool all_finite(const Eigen::MatrixBase<Derived>& m) {
  using S = typename Derived::Scalar;
  if constexpr ((std::is_same_v<S, float> || std::is_same_v<S, double>) &&
                bool(Derived::Flags & Eigen::RowMajorBit) && bool(Derived::Flags & Eigen::DirectAccessBit) &&
                Derived::InnerStrideAtCompileTime == 1) {
    using U = std::conditional_t<std::is_same_v<S, float>, std::uint32_t, std::uint64_t>;
    constexpr U exp_mask = std::is_same_v<S, float> ? U(0x7f800000u) : U(0x7ff0000000000000ull);
    const auto& d = m.derived();
    for (Eigen::Index i = 0; i < d.rows(); ++i) {
      const S* p = d.data() + i * d.outerStride();
      bool bad = false;
      for (Eigen::Index j = 0; j < d.cols(); ++j) bad |= (std::bit_cast<U>(p[j]) & exp_mask) == exp_mask;
      if (bad) return false;
    }
    return true;
  } else {
    return m.allFinite();
  }
}

template <class Derived>
void expect_finite(const char* what, const Eigen::MatrixBase<Derived>& m) {
  if (all_finite(m)) [[likely]] return;
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j)
      if (!std::isfinite(double(m(i, j))))
        throw numeric_error(concat("hsae: ", what, " contains a non-finite value (", double(m(i, j)), ") at [", i,
                                   ", ", j, "]"));
}

}  // namespace detail

HSAE_NAMESPACE_END
