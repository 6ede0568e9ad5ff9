// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the tests.
#pragma once

#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <limits>
#include <sstream>
#include <string>
#include <system_error>

#include <hsae/data/synthetic.hpp>
#include <hsae/matrix.hpp>
#include <hsae/model.hpp>
#include <hsae/rng.hpp>

namespace hsae_test {

/// The small synthetic dataset the trainer and checkpoint tests train on: d_model 24,
/// 48 root atoms with one child each, 3 active per row, a little noise.
inline hsae::synthetic_options small_synthetic(std::uint64_t seed) {
  hsae::synthetic_options d;
  d.d_model = 24;
  d.n_atoms = 48;
  d.children_per_atom = 1;
  d.mean_active = 3;
  d.noise_std = 0.01;
  d.seed = seed;
  return d;
}

/// A batch source over the rows of a fixed matrix, in order, cycling; with poison_at >= 0
/// the batch of that call (0-based) gets a NaN in its middle row.
struct cycling_source {
  hsae::row_matrix<float> data;
  int calls = 0;
  int poison_at = -1;
  Eigen::Index pos = 0;
  int d_model() const { return int(data.cols()); }
  void next(Eigen::Index rows, hsae::row_matrix<float>& x) {
    x.resize(rows, data.cols());
    for (Eigen::Index r = 0; r < rows; ++r, ++pos) x.row(r) = data.row(pos % data.rows());
    if (calls++ == poison_at) x(rows / 2, 1) = std::numeric_limits<float>::quiet_NaN();
  }
};

/// Same shape and the same bits (NaN payloads and signed zeros included).
template <class A, class B>
bool bitwise_equal(const A& a, const B& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(typename A::Scalar) * std::size_t(a.size())) == 0;
}

/// prefix + i + suffix (through a stream: GCC 12 reports a false -Wrestrict on
/// `"literal" + std::to_string(i)` once inlined).
inline std::string numbered(const char* prefix, long i, const char* suffix) {
  std::ostringstream os;
  os << prefix << i << suffix;
  return os.str();
}

/// A fresh scratch directory, removed with everything in it at scope exit.
struct temp_dir {
  std::filesystem::path dir;
  temp_dir() {
    static std::atomic<int> counter{0};
    dir = std::filesystem::temp_directory_path() / numbered("hsae_test_", long(::getpid()) * 1000 + counter++, "");
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  std::filesystem::path operator/(const std::string& name) const { return dir / name; }
};

/// The message of the E that `fn` throws; "<no exception>" when it returns, and the
/// message behind "<wrong exception type> " when it throws another std::exception.
template <class E, class Fn>
std::string message_of(Fn&& fn) {
  try {
    fn();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<wrong exception type> ") + e.what();
  }
  return "<no exception>";
}

/// An SAE with N(0, 1) weights and small random biases (decoder rows not normalised).
template <class T = float>
hsae::sae<T> random_sae(int d, int f, std::uint64_t seed) {
  hsae::sae<T> m(d, f);
  hsae::rng g(seed);
  for (Eigen::Index i = 0; i < m.W_enc.size(); ++i) m.W_enc.data()[i] = T(g.normal());
  for (Eigen::Index i = 0; i < m.W_dec.size(); ++i) m.W_dec.data()[i] = T(g.normal());
  for (Eigen::Index i = 0; i < m.b_enc.size(); ++i) m.b_enc(i) = T(0.3 * g.normal());
  for (Eigen::Index i = 0; i < m.b_dec.size(); ++i) m.b_dec(i) = T(0.5 * g.normal());
  return m;
}

}  // namespace hsae_test
