// SPDX-License-Identifier: Apache-2.0
/// \file data/row_file.hpp
/// One activation file viewed as rows [N, D]: a .npy array (data/npy.hpp) or one tensor
/// of a safetensors file (io/safetensors.hpp), memory-mapped either way. file_source
/// (data/sources.hpp) reads its files through it.
///
/// The format is chosen by extension (".npy", ".safetensors"), else by content (the .npy
/// magic, else safetensors). Any leading shape is flattened: a tensor [..., D] reads as
/// [prod(...), D], a 1-D tensor [D] as [1, D]. safetensors dtypes F32, F16, BF16 and F64
/// convert to float or double (detail::decode_floats, as for .npy). This header reuses the
/// two parsers; it parses nothing itself.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "../config.hpp"
#include "../detail/files.hpp"
#include "../detail/printable.hpp"
#include "../error.hpp"
#include "../io/safetensors.hpp"
#include "npy.hpp"

HSAE_NAMESPACE_BEGIN

/// The container format of a row_file.
enum class row_file_format { npy, safetensors };

/// A read-only, memory-mapped activation file as a row-major [rows, cols] matrix: a .npy
/// file, or the tensor `tensor` of a safetensors file (empty: the file's only tensor).
/// Move-only. The same rules as npy_file hold for files changed while mapped (replace by
/// rename; never truncate in place).
///
/// \throws hsae::io_error naming the file (and the tensor) on any problem: a file neither
///         format parses, a safetensors file with several tensors and no name given (the
///         message lists the names), a missing tensor, a dtype other than F32/F16/BF16/F64,
///         a 0-d or empty tensor; hsae::config_error when a tensor name is given for an
///         .npy file.
class row_file {
 public:
  explicit row_file(std::filesystem::path path, const std::string& tensor = {}) : path_(std::move(path)) {
    if (is_safetensors(path_)) {
      st_ = std::make_unique<const safetensors_file>(path_);
      pick_tensor(tensor);
    } else {
      detail::expects<config_error>(tensor.empty(), "file_source: a tensor name ('", detail::printable_utf8(tensor),
                                    "') was given, but '", detail::printable_utf8(path_.string()),
                                    "' is an .npy file (it holds one array)");
      npy_.emplace(path_);
      rows_ = npy_->rows();
      cols_ = npy_->cols();
      encoding_ = npy_->dtype() == npy_dtype::f16   ? detail::float_encoding::f16
                  : npy_->dtype() == npy_dtype::f32 ? detail::float_encoding::f32
                                                    : detail::float_encoding::f64;
      item_ = npy_itemsize(npy_->dtype());
      data_ = reinterpret_cast<const unsigned char*>(npy_->data());
    }
  }

  row_file_format format() const noexcept { return st_ ? row_file_format::safetensors : row_file_format::npy; }
  const std::filesystem::path& path() const noexcept { return path_; }
  /// The safetensors tensor read (empty for an .npy file).
  const std::string& tensor() const noexcept { return tensor_; }
  /// Rows after flattening the leading dimensions.
  std::int64_t rows() const noexcept { return rows_; }
  /// The last dimension.
  std::int64_t cols() const noexcept { return cols_; }
  /// "'<path>'" or "'<path>' tensor '<name>'", for messages (escaped as printable UTF-8).
  std::string describe() const {
    return detail::printable_utf8(st_ ? detail::concat("'", path_.string(), "' tensor '", tensor_, "'")
                                      : detail::concat("'", path_.string(), "'"));
  }

  /// Copies rows [first, first + count) into `out` (count * cols() values, row-major),
  /// converting to T.
  template <cpu_scalar T>
  void read_rows(std::int64_t first, std::int64_t count, T* out) const {
    detail::expects<shape_error>(first >= 0 && count >= 0 && first <= rows_ && count <= rows_ - first, "file ",
                                 describe(), ": rows [", first, ", ", first + count, ") out of range [0, ", rows_,
                                 ")");
    const std::size_t n = std::size_t(count) * std::size_t(cols_);
    detail::decode_floats(encoding_, data_ + std::size_t(first) * std::size_t(cols_) * item_, n, out);
  }
  /// Rows [first, first + count) as a new matrix.
  template <cpu_scalar T>
  row_matrix<T> read_rows(std::int64_t first, std::int64_t count) const {
    detail::expects<shape_error>(count >= 0, "file ", describe(), ": negative row count ", count);
    row_matrix<T> m(count, cols_);
    read_rows(first, count, m.data());
    return m;
  }

  /// True if `path` is read as safetensors: by extension, else by content (anything not
  /// starting with the .npy magic).
  static bool is_safetensors(const std::filesystem::path& path) {
    const auto ext = path.extension();
    if (ext == ".safetensors") return true;
    if (ext == ".npy") return false;
    const detail::mapped_file m(path, "activation file");  // refuses a FIFO without waiting
    static constexpr unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
    return !(m.bytes().size() >= 6 && std::memcmp(m.bytes().data(), magic, 6) == 0);
  }

 private:
  template <class... Args>
  [[noreturn]] void fail(Args&&... args) const {
    throw io_error(detail::printable_utf8(detail::concat("hsae: safetensors file '", path_.string(), "': ",
                                                         std::forward<Args>(args)...)));
  }

  /// "'a', 'b', 'c'" (at most 20 names, then "and N more").
  std::string tensor_names() const {
    std::string s;
    const auto& ts = st_->tensors();
    for (std::size_t i = 0; i < ts.size() && i < 20; ++i) s.append(i ? ", '" : "'").append(ts[i].name).append("'");
    if (ts.size() > 20) s.append(detail::concat(" and ", ts.size() - 20, " more"));
    return s;
  }

  void pick_tensor(const std::string& name) {
    const auto& ts = st_->tensors();
    if (ts.empty()) fail("holds no tensor");
    const safetensors_tensor_info* t = nullptr;
    if (name.empty()) {
      if (ts.size() != 1)
        fail("holds ", ts.size(), " tensors (", tensor_names(),
             "); name the one to read (file_source_options::tensor)");
      t = &ts.front();
    } else {
      t = st_->find(name);
      if (t == nullptr) fail("no tensor named '", name, "' (the file holds ", tensor_names(), ")");
    }
    tensor_ = t->name;
    switch (t->dtype) {
      case safetensors_dtype::f32: encoding_ = detail::float_encoding::f32; break;
      case safetensors_dtype::f16: encoding_ = detail::float_encoding::f16; break;
      case safetensors_dtype::bf16: encoding_ = detail::float_encoding::bf16; break;
      case safetensors_dtype::f64: encoding_ = detail::float_encoding::f64; break;
      default:
        fail("tensor '", t->name, "' has dtype ", safetensors_dtype_name(t->dtype),
             "; activations must be F32, F16, BF16 or F64");
    }
    if (t->shape.empty()) fail("tensor '", t->name, "' is 0-d (a scalar): need shape [N, D] or [..., D]");
    for (const std::int64_t s : t->shape)
      if (s == 0) fail("tensor '", t->name, "' has shape ", t->shape_text(), " (no elements)");
    // No zero dimension: the product is the element count, which the parser checked
    // against the file's bytes (so it does not overflow).
    std::int64_t rows = 1;
    for (std::size_t i = 0; i + 1 < t->shape.size(); ++i) rows *= t->shape[i];
    rows_ = rows;
    cols_ = t->shape.back();
    item_ = std::size_t(safetensors_dtype_bits(t->dtype) / 8);
    data_ = reinterpret_cast<const unsigned char*>(st_->bytes(*t).data());
  }

  std::filesystem::path path_;
  std::optional<npy_file> npy_;
  std::unique_ptr<const safetensors_file> st_;
  std::string tensor_;
  std::int64_t rows_ = 0;
  std::int64_t cols_ = 0;
  detail::float_encoding encoding_ = detail::float_encoding::f32;
  std::size_t item_ = 4;
  const unsigned char* data_ = nullptr;
};

HSAE_NAMESPACE_END
