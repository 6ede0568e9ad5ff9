// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the tests.
#pragma once

#include <cstddef>
#include <cstring>

namespace hsae_test {

/// Same shape and the same bits (NaN payloads and signed zeros included).
template <class A, class B>
bool bitwise_equal(const A& a, const B& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(typename A::Scalar) * std::size_t(a.size())) == 0;
}

}  // namespace hsae_test
