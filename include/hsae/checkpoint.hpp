// SPDX-License-Identifier: Apache-2.0
/// \file checkpoint.hpp
/// Training checkpoints: everything a run needs to continue exactly where it stopped.
///
/// A checkpoint is one safetensors file (so any safetensors reader can inspect it):
///   tensors   model.{W_enc,b_enc,W_dec,b_dec}, adam.m.*, adam.v.* (the model's dtype:
///             F32 for float, F64 for double: bit-exact), dead.tokens_since_fired (F64,
///             exact below 2^53), held_out (the evaluation rows), and source.* (the data
///             source's buffers, when it saves its state);
///   metadata  format "hsae.checkpoint" version 1, step, tokens, rows pulled from the
///             source, input scale, Adam step and last lr (exact: hex floats), the
///             schedule, the shapes, and source.* (the source's position, RNG state, ...).
/// Files are written atomically (temporary file, fsync, rename, directory fsync): a crash
/// during a save leaves the previous checkpoint in place.
///
/// Sources take part through two optional members (the trainer falls back to replaying
/// the rows it pulled, which is exact for any deterministic source):
///   void save_state(checkpoint_state<T>&) const;   void load_state(const checkpoint_state<T>&);
/// synthetic_source and file_source implement them (O(1) and O(buffer) to restore).
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <system_error>
#include <type_traits>
#include <vector>

#include "error.hpp"
#include "io/safetensors.hpp"
#include "matrix.hpp"
#include "rng.hpp"

HSAE_NAMESPACE_BEGIN

/// Named scalars (as text) and arrays that a component saves into a checkpoint.
///
/// A checkpoint is input like any file: every value read back is checked before it is
/// used (the range-checked accessors below), and every problem raises hsae::io_error
/// naming the checkpoint (`where`), the entry and the value.
template <cpu_scalar T>
struct checkpoint_state {
  std::map<std::string, std::string> meta;
  std::map<std::string, row_matrix<T>> matrices;
  std::map<std::string, std::vector<double>> arrays;  ///< integers exact below 2^53
  /// The file the state was read from (read_checkpoint sets it); messages name it.
  std::string where;

  void set(const std::string& key, std::int64_t v) { meta[key] = std::to_string(v); }
  void set(const std::string& key, std::uint64_t v) { meta[key] = std::to_string(v); }
  void set(const std::string& key, double v) {
    char buf[64];
    const auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::hex);
    meta[key] = std::string(buf, r.ptr);
  }
  void set(const std::string& key, std::string v) { meta[key] = std::move(v); }

  /// Throws hsae::io_error "checkpoint '<where>': <args...>".
  template <class... Args>
  [[noreturn]] void fail(Args&&... args) const {
    if (where.empty()) detail::throw_error<io_error>("checkpoint: ", std::forward<Args>(args)...);
    detail::throw_error<io_error>("checkpoint '", where, "': ", std::forward<Args>(args)...);
  }
  template <class... Args>
  void expects(bool cond, Args&&... args) const {
    if (!cond) [[unlikely]] fail(std::forward<Args>(args)...);
  }

  /// \throws hsae::io_error naming the key when it is missing or malformed.
  const std::string& text(const std::string& key) const {
    const auto it = meta.find(key);
    if (it == meta.end()) fail("missing entry '", key, "'");
    return it->second;
  }
  std::int64_t get_int(const std::string& key) const { return parse<std::int64_t>(key); }
  /// The integer entry `key`, which must lie in [lo, hi].
  std::int64_t get_int(const std::string& key, std::int64_t lo, std::int64_t hi) const {
    const std::int64_t v = get_int(key);
    expects(v >= lo && v <= hi, "entry '", key, "' = ", v, " is out of range [", lo, ", ", hi, "]");
    return v;
  }
  std::uint64_t get_uint(const std::string& key) const { return parse<std::uint64_t>(key); }
  double get_double(const std::string& key) const {
    const std::string& s = text(key);
    double v = 0;
    const auto r = std::from_chars(s.data(), s.data() + s.size(), v, std::chars_format::hex);
    if (r.ec != std::errc{} || r.ptr != s.data() + s.size()) fail("entry '", key, "' is not a number: '", s, "'");
    return v;
  }
  /// The number `key`, which must be finite and lie in [lo, hi].
  double get_double(const std::string& key, double lo, double hi) const {
    const double v = get_double(key);
    expects(std::isfinite(v), "entry '", key, "' = ", v, " is not finite");
    expects(v >= lo && v <= hi, "entry '", key, "' = ", v, " is out of range [", lo, ", ", hi, "]");
    return v;
  }
  const row_matrix<T>& matrix(const std::string& key) const {
    const auto it = matrices.find(key);
    if (it == matrices.end()) fail("missing tensor '", key, "'");
    return it->second;
  }
  /// The tensor `key` with shape [rows, cols] and only finite values.
  const row_matrix<T>& finite_matrix(const std::string& key, Eigen::Index rows, Eigen::Index cols) const {
    const row_matrix<T>& m = matrix(key);
    expects(m.rows() == rows && m.cols() == cols, "tensor '", key, "' has shape [", m.rows(), ", ", m.cols(),
            "], expected [", rows, ", ", cols, "]");
    expect_finite(key, m.data(), std::size_t(m.size()), m.cols());
    return m;
  }
  const std::vector<double>& array(const std::string& key) const {
    const auto it = arrays.find(key);
    if (it == arrays.end()) fail("missing tensor '", key, "'");
    return it->second;
  }
  /// The array `key` as integers: every element must be a whole number in [lo, hi]
  /// (NaN, fractions and values beyond int64 are refused before any conversion).
  std::vector<std::int64_t> int_array(const std::string& key, std::int64_t lo, std::int64_t hi) const {
    const std::vector<double>& a = array(key);
    std::vector<std::int64_t> out(a.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      const double v = a[i];
      // [lo, hi] as doubles: every int64 in range converts, and v within it converts back exactly.
      expects(v == std::floor(v) && v >= double(lo) && v <= double(hi) && v < 0x1p63, "tensor '", key,
              "' holds ", v, " at index ", i, ", not a whole number in [", lo, ", ", hi, "]");
      out[i] = std::int64_t(v);
      expects(out[i] >= lo && out[i] <= hi, "tensor '", key, "' holds ", v, " at index ", i,
              ", not a whole number in [", lo, ", ", hi, "]");
    }
    return out;
  }

  void set_rng(const std::string& key, const rng& g) {
    const rng::state_type s = g.state();
    for (int i = 0; i < 4; ++i) set(key + ".s" + std::to_string(i), std::uint64_t(s.s[std::size_t(i)]));
    set(key + ".has_spare", std::int64_t(s.has_spare));
    set(key + ".spare", s.spare);
  }
  void get_rng(const std::string& key, rng& g) const {
    rng::state_type s{};
    bool zero = true;
    for (int i = 0; i < 4; ++i) {
      s.s[std::size_t(i)] = get_uint(key + ".s" + std::to_string(i));
      zero = zero && s.s[std::size_t(i)] == 0;
    }
    expects(!zero, "entry '", key, "' is an all-zero generator state (xoshiro256 never leaves it)");
    s.has_spare = get_int(key + ".has_spare", 0, 1) != 0;
    s.spare = get_double(key + ".spare", -std::numeric_limits<double>::max(), std::numeric_limits<double>::max());
    g.set_state(s);
  }

 private:
  template <class I>
  I parse(const std::string& key) const {
    const std::string& s = text(key);
    I v{};
    const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
    if (r.ec != std::errc{} || r.ptr != s.data() + s.size()) fail("entry '", key, "' is not an integer: '", s, "'");
    return v;
  }
  template <class V>
  void expect_finite(const std::string& key, const V* p, std::size_t n, Eigen::Index cols) const {
    for (std::size_t i = 0; i < n; ++i)
      if (!std::isfinite(p[i])) [[unlikely]]
        fail("tensor '", key, "' holds a non-finite value (", double(p[i]), ") at [", Eigen::Index(i) / cols, ", ",
             Eigen::Index(i) % cols, "]");
  }
};

inline constexpr const char* checkpoint_format = "hsae.checkpoint";
inline constexpr int checkpoint_version = 1;

/// Writes `st` as a checkpoint file, atomically.
template <cpu_scalar T>
void write_checkpoint(const std::filesystem::path& path, const checkpoint_state<T>& st) {
  constexpr safetensors_dtype dt = std::is_same_v<T, double> ? safetensors_dtype::f64 : safetensors_dtype::f32;
  safetensors_writer w;
  w.metadata("format", checkpoint_format);
  w.metadata("version", std::to_string(checkpoint_version));
  for (const auto& [k, v] : st.meta) w.metadata(k, v);
  for (const auto& [k, m] : st.matrices) w.add(k, m.data(), {std::int64_t(m.rows()), std::int64_t(m.cols())}, dt);
  for (const auto& [k, a] : st.arrays) w.add(k, a.data(), {std::int64_t(a.size())}, safetensors_dtype::f64);
  w.write(path);
}

/// Reads a checkpoint written by `write_checkpoint<T>`.
/// \throws hsae::io_error naming the file: not a checkpoint, another version, or
///         another precision (a float checkpoint does not resume a double model).
template <cpu_scalar T>
checkpoint_state<T> read_checkpoint(const std::filesystem::path& path) {
  constexpr safetensors_dtype dt = std::is_same_v<T, double> ? safetensors_dtype::f64 : safetensors_dtype::f32;
  const safetensors_file f(path);
  checkpoint_state<T> st;
  st.where = path.string();
  st.meta = f.metadata();
  const auto fmt = st.meta.find("format");
  detail::expects<io_error>(fmt != st.meta.end() && fmt->second == checkpoint_format, "checkpoint '",
                            path.string(), "': not an hsae checkpoint (metadata 'format' is not '",
                            checkpoint_format, "')");
  const auto ver = st.meta.find("version");
  detail::expects<io_error>(ver != st.meta.end() && ver->second == std::to_string(checkpoint_version),
                            "checkpoint '", path.string(), "': unsupported version '",
                            ver == st.meta.end() ? std::string("none") : ver->second, "' (this build reads ",
                            checkpoint_version, ")");
  for (const auto& t : f.tensors()) {
    if (t.shape.size() == 1 && t.dtype == safetensors_dtype::f64) {
      st.arrays[t.name] = std::vector<double>(std::size_t(t.shape[0]));
      f.read_to(t.name, st.arrays[t.name].data());
    } else {
      detail::expects<io_error>(t.dtype == dt, "checkpoint '", path.string(), "': tensor '", t.name, "' is ",
                                safetensors_dtype_name(t.dtype), " but this model's precision is ",
                                safetensors_dtype_name(dt));
      detail::expects<io_error>(t.shape.size() == 2, "checkpoint '", path.string(), "': tensor '", t.name,
                                "' has ", t.shape.size(), " dimensions, expected 2");
      st.matrices[t.name] = f.read_matrix<T>(t.name, t.shape[0], t.shape[1]);
    }
  }
  return st;
}

HSAE_NAMESPACE_END
