// SPDX-License-Identifier: Apache-2.0
/// \file data/npy.hpp
/// NumPy `.npy` files: a memory-mapped reader (`npy_file`) and an atomic writer
/// (`write_npy`); the binary16 codecs they use are in detail/half.hpp.
///
/// Reading: format versions 1.0, 2.0 and 3.0; dtypes little-endian float16, float32 and
/// float64 (`<f2`, `<f4`, `<f8`; `|` and `=` are read as native little-endian). Any
/// leading shape is flattened to [N, D] with D the last dimension: shape (2, 3, 5) reads
/// as [6, 5], a 1-D array of length D as [1, D]. The data need not be aligned. Every
/// problem (truncated file, bad magic, malformed header, unsupported dtype, Fortran
/// order, size mismatch, ...) raises hsae::io_error naming the file and the problem; bytes
/// quoted from the file (and the file's name) have control characters and invalid UTF-8
/// escaped as \xNN.
///
/// Writing: version 1.0, C order, shape [rows, cols] (or any shape), written to
/// `<path>.tmp.<pid>`, fsync'd, then renamed over `path` (detail::atomic_file), so readers
/// never see a partial file.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../detail/files.hpp"
#include "../detail/half.hpp"
#include "../detail/printable.hpp"
#include "../error.hpp"
#include "../matrix.hpp"

HSAE_NAMESPACE_BEGIN

/// Element types of the .npy files hsae reads and writes.
enum class npy_dtype { f16, f32, f64 };

/// Bytes per element.
constexpr std::size_t npy_itemsize(npy_dtype dt) noexcept {
  return dt == npy_dtype::f16 ? 2 : dt == npy_dtype::f32 ? 4 : 8;
}

/// The NumPy `descr` string written for a dtype ("<f2", "<f4", "<f8").
constexpr const char* npy_descr(npy_dtype dt) noexcept {
  return dt == npy_dtype::f16 ? "<f2" : dt == npy_dtype::f32 ? "<f4" : "<f8";
}

namespace detail {


/// Throws hsae::io_error "hsae: npy file '<where>': <args...>", with control characters and
/// invalid UTF-8 (from the file's header, or its name) escaped as \xNN.
template <class... Args>
[[noreturn]] void throw_npy_error(const std::string& where, Args&&... args) {
  throw io_error(printable_utf8(concat("hsae: npy file '", where, "': ", std::forward<Args>(args)...)));
}

/// A minimal Python-literal value: what a .npy header dict holds.
struct npy_pyval {
  enum kind_t { str, boolean, none, integer, seq } kind = none;
  std::string s;
  bool b = false;
  std::int64_t i = 0;
  std::vector<npy_pyval> items;
};

/// Recursive-descent parser for the header dict: `{'key': value, ...}` with string,
/// True/False/None, integer (optional Python-2 `L` suffix) and tuple/list values;
/// whitespace anywhere, trailing commas, any key order.
class npy_header_parser {
 public:
  npy_header_parser(std::string_view text, const std::string& where) : t_(text), where_(where) {}

  std::vector<std::pair<std::string, npy_pyval>> parse_dict() {
    std::vector<std::pair<std::string, npy_pyval>> out;
    ws();
    expect('{');
    for (;;) {
      ws();
      if (peek() == '}') {
        ++p_;
        break;
      }
      npy_pyval key = value(0);
      if (key.kind != npy_pyval::str) fail("dictionary key is not a string");
      ws();
      expect(':');
      npy_pyval v = value(0);
      for (const auto& kv : out)
        if (kv.first == key.s) fail("duplicate key '" + key.s + "'");
      out.emplace_back(std::move(key.s), std::move(v));
      ws();
      if (peek() == ',') {
        ++p_;
        continue;
      }
      if (peek() == '}') {
        ++p_;
        break;
      }
      fail("expected ',' or '}'");
    }
    ws();
    if (p_ != t_.size()) fail("unexpected text after the closing '}'");
    return out;
  }

 private:
  /// Quotes the header whole when short, else 256 bytes around the offset (a v2/v3
  /// header may be gigabytes long).
  [[noreturn]] void fail(const std::string& what) const {
    constexpr std::size_t quote = 256;
    const std::size_t lo = t_.size() <= quote || p_ <= quote / 2 ? 0 : std::min(p_ - quote / 2, t_.size() - quote);
    const std::string_view shown = t_.substr(lo, quote);
    throw_npy_error(where_, "malformed header: ", what, " at offset ", p_, " in \"", lo > 0 ? "..." : "", shown,
                    lo + shown.size() < t_.size() ? "..." : "", "\"");
  }
  char peek() const { return p_ < t_.size() ? t_[p_] : '\0'; }
  void ws() {
    while (p_ < t_.size() && (t_[p_] == ' ' || t_[p_] == '\t' || t_[p_] == '\n' || t_[p_] == '\r')) ++p_;
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++p_;
  }
  bool word(std::string_view w) {
    if (t_.substr(p_, w.size()) != w) return false;
    const std::size_t end = p_ + w.size();
    if (end < t_.size() && (std::isalnum(static_cast<unsigned char>(t_[end])) || t_[end] == '_')) return false;
    p_ = end;
    return true;
  }

  npy_pyval value(int depth) {
    if (depth > 16) fail("nesting too deep");
    ws();
    npy_pyval v;
    const char c = peek();
    if (c == '\'' || c == '"') {
      ++p_;
      v.kind = npy_pyval::str;
      while (p_ < t_.size() && t_[p_] != c) {
        if (t_[p_] == '\\') fail("escape sequences are not supported");
        v.s += t_[p_++];
      }
      if (p_ >= t_.size()) fail("unterminated string");
      ++p_;
    } else if (c == '(' || c == '[') {
      const char close = c == '(' ? ')' : ']';
      ++p_;
      v.kind = npy_pyval::seq;
      for (;;) {
        ws();
        if (peek() == close) {
          ++p_;
          break;
        }
        v.items.push_back(value(depth + 1));
        ws();
        if (peek() == ',') {
          ++p_;
          continue;
        }
        if (peek() == close) {
          ++p_;
          break;
        }
        fail(std::string("expected ',' or '") + close + "'");
      }
    } else if (c == '-' || c == '+' || (c >= '0' && c <= '9')) {
      v.kind = npy_pyval::integer;
      bool neg = false;
      if (c == '-' || c == '+') {
        neg = c == '-';
        ++p_;
      }
      if (!(peek() >= '0' && peek() <= '9')) fail("expected a digit");
      std::int64_t x = 0;
      while (peek() >= '0' && peek() <= '9') {
        const int dgt = peek() - '0';
        if (x > (std::numeric_limits<std::int64_t>::max() - dgt) / 10) fail("integer too large");
        x = x * 10 + dgt;
        ++p_;
      }
      if (peek() == 'L' || peek() == 'l') ++p_;  // Python 2 long
      v.i = neg ? -x : x;
    } else if (word("True")) {
      v.kind = npy_pyval::boolean;
      v.b = true;
    } else if (word("False")) {
      v.kind = npy_pyval::boolean;
      v.b = false;
    } else if (word("None")) {
      v.kind = npy_pyval::none;
    } else {
      fail("unexpected character");
    }
    return v;
  }

  std::string_view t_;
  const std::string& where_;
  std::size_t p_ = 0;
};

inline std::uint16_t load_u16le(const unsigned char* p) { return std::uint16_t(p[0] | (p[1] << 8)); }
inline std::uint32_t load_u32le(const unsigned char* p) {
  return std::uint32_t(p[0]) | (std::uint32_t(p[1]) << 8) | (std::uint32_t(p[2]) << 16) | (std::uint32_t(p[3]) << 24);
}

}  // namespace detail

/// The parsed and validated preamble and header of a .npy image: what `npy_file`
/// reads, usable on any byte buffer (the fuzzers call it on theirs).
struct npy_header {
  int major = 0, minor = 0;
  npy_dtype dtype = npy_dtype::f32;
  std::vector<std::int64_t> shape;  ///< as stored
  std::int64_t rows = 0;            ///< the leading dimensions flattened
  std::int64_t cols = 0;            ///< the last dimension
  std::size_t data_offset = 0;

  std::string shape_text() const {
    std::string s = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
  }

  /// Parses `bytes` (a whole file: the data size is checked against it).
  /// \throws hsae::io_error naming `where` and the problem.
  static npy_header parse(std::span<const std::byte> bytes, const std::string& where) {
    npy_header h;
    const std::size_t size_ = bytes.size();
    auto fail = [&](auto&&... args) { detail::throw_npy_error(where, std::forward<decltype(args)>(args)...); };
    if (size_ < 10) fail("file too small (", size_, " bytes) for the .npy magic and header");
    const auto* b = reinterpret_cast<const unsigned char*>(bytes.data());
    static constexpr unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
    if (std::memcmp(b, magic, 6) != 0) fail("bad magic (not a .npy file)");
    h.major = b[6];
    h.minor = b[7];
    if (!((h.major == 1 || h.major == 2 || h.major == 3) && h.minor == 0))
      fail("unsupported format version ", h.major, ".", h.minor, " (1.0, 2.0 and 3.0 are supported)");
    std::size_t hlen, hstart;
    if (h.major == 1) {
      hlen = detail::load_u16le(b + 8);
      hstart = 10;
    } else {
      if (size_ < 12) fail("file too small (", size_, " bytes) for a version ", h.major, ".0 header");
      hlen = detail::load_u32le(b + 8);
      hstart = 12;
    }
    if (hlen > size_ - hstart)
      fail("header length ", hlen, " extends beyond the end of the file (", size_, " bytes)");
    h.data_offset = hstart + hlen;
    const std::string_view text(reinterpret_cast<const char*>(b + hstart), hlen);
    const auto dict = detail::npy_header_parser(text, where).parse_dict();

    const detail::npy_pyval* descr = nullptr;
    const detail::npy_pyval* fortran = nullptr;
    const detail::npy_pyval* shape = nullptr;
    for (const auto& [k, v] : dict) {
      if (k == "descr")
        descr = &v;
      else if (k == "fortran_order")
        fortran = &v;
      else if (k == "shape")
        shape = &v;
      else
        fail("malformed header: unexpected key '", k, "'");
    }
    if (descr == nullptr || fortran == nullptr || shape == nullptr)
      fail("malformed header: missing key '",
           descr == nullptr ? "descr" : fortran == nullptr ? "fortran_order" : "shape", "'");

    // dtype
    if (descr->kind != detail::npy_pyval::str)
      fail("unsupported dtype: structured or non-string descr (only float16/32/64 are supported)");
    const std::string& d = descr->s;
    char order = '<';
    std::string_view code = d;
    if (!code.empty() && (code[0] == '<' || code[0] == '>' || code[0] == '|' || code[0] == '=')) {
      order = code[0];
      code.remove_prefix(1);
    }
    if (code == "f2")
      h.dtype = npy_dtype::f16;
    else if (code == "f4")
      h.dtype = npy_dtype::f32;
    else if (code == "f8")
      h.dtype = npy_dtype::f64;
    else
      fail("unknown dtype '", d, "' (supported: '<f2', '<f4', '<f8')");
    if (order == '>') fail("dtype '", d, "': big-endian not supported");

    // shape
    if (shape->kind != detail::npy_pyval::seq) fail("malformed header: 'shape' is not a tuple");
    h.shape.clear();
    for (const auto& e : shape->items) {
      if (e.kind != detail::npy_pyval::integer) fail("malformed header: 'shape' holds a non-integer");
      if (e.i < 0) fail("malformed header: negative dimension ", e.i, " in 'shape'");
      h.shape.push_back(e.i);
    }
    if (h.shape.empty()) fail("0-d (scalar) array: need at least one dimension");
    if (std::find(h.shape.begin(), h.shape.end(), std::int64_t(0)) != h.shape.end())
      fail("shape ", h.shape_text(), " has a zero dimension (empty array)");

    // fortran_order
    if (fortran->kind != detail::npy_pyval::boolean) fail("malformed header: 'fortran_order' is not True/False");
    if (fortran->b && h.shape.size() > 1) fail("fortran_order=True is not supported for shape ", h.shape_text());

    // size
    h.cols = h.shape.back();
    std::int64_t rows = 1;
    constexpr auto big = std::numeric_limits<std::int64_t>::max();
    for (std::size_t i = 0; i + 1 < h.shape.size(); ++i) {
      if (rows > big / h.shape[i]) fail("shape ", h.shape_text(), " is too large");
      rows *= h.shape[i];
    }
    h.rows = rows;
    const auto item = std::int64_t(npy_itemsize(h.dtype));
    if (h.rows > big / h.cols || h.rows * h.cols > big / item) fail("shape ", h.shape_text(), " is too large");
    const std::uint64_t want = std::uint64_t(h.rows * h.cols * item);
    const std::uint64_t have = size_ - h.data_offset;
    if (want != have)
      fail("data size mismatch: shape ", h.shape_text(), " of '", d, "' needs ", want, " bytes but the file has ",
           have, " after the header (", want > have ? "truncated" : "trailing data", ")");
    return h;
  }
};

/// A read-only, memory-mapped .npy file viewed as a row-major [rows, cols] matrix.
/// Move-only; the mapping is released by the destructor (the descriptor is closed as
/// soon as the file is mapped). A path that is not a regular file (a directory, a named
/// pipe, a device) raises hsae::io_error "... not a regular file" at once: the open never
/// waits for a writer.
///
/// The file must not shrink while an npy_file maps it. Replacing it by rename (write_npy,
/// `mv`, any atomic writer) is safe: this npy_file keeps reading the old contents until it
/// is destroyed. Truncating or rewriting it in place (`truncate`, a writer opening it with
/// O_TRUNC) makes the next read of a page past the new end raise SIGBUS, which ends the
/// process: it cannot become an exception (the header checks at open time cannot see a
/// later truncation). Bytes changed in place, same size, may show up in later reads.
class npy_file {
 public:
  explicit npy_file(std::filesystem::path path) : path_(std::move(path)) {
    if constexpr (std::endian::native != std::endian::little) fail("big-endian hosts are not supported");
    map_ = detail::mapped_file(path_, "npy file");  // refuses a FIFO or other non-regular file without waiting
    if (map_.bytes().size() < 10)
      fail("file too small (", map_.bytes().size(), " bytes) for the .npy magic and header");
    ::madvise(const_cast<std::byte*>(map_.bytes().data()), map_.bytes().size(), MADV_SEQUENTIAL);  // advisory only
    parse();
  }

  /// Rows after flattening the leading dimensions.
  std::int64_t rows() const noexcept { return rows_; }
  /// The last dimension.
  std::int64_t cols() const noexcept { return cols_; }
  npy_dtype dtype() const noexcept { return dtype_; }
  const std::filesystem::path& path() const noexcept { return path_; }
  /// The shape as stored in the header.
  const std::vector<std::int64_t>& shape() const noexcept { return shape_; }
  /// Format version, e.g. {1, 0}.
  int major_version() const noexcept { return major_; }
  int minor_version() const noexcept { return minor_; }
  /// Byte offset of the data, and the file size.
  std::size_t data_offset() const noexcept { return data_offset_; }
  std::size_t file_size() const noexcept { return map_.bytes().size(); }
  /// The raw (little-endian, possibly unaligned) element bytes.
  const std::byte* data() const noexcept { return map_.bytes().data() + data_offset_; }

  /// Copies rows [first, first + count) into `out` (count * cols() values, row-major),
  /// converting to T.
  template <cpu_scalar T>
  void read_rows(std::int64_t first, std::int64_t count, T* out) const {
    detail::expects<shape_error>(first >= 0 && count >= 0 && first <= rows_ && count <= rows_ - first,
                                 "npy file '", path_.string(), "': rows [", first, ", ", first + count,
                                 ") out of range [0, ", rows_, ")");
    if (count == 0) return;
    const std::size_t n = std::size_t(count) * std::size_t(cols_);
    const auto* src = reinterpret_cast<const unsigned char*>(data()) +
                      std::size_t(first) * std::size_t(cols_) * npy_itemsize(dtype_);
    detail::decode_floats(dtype_ == npy_dtype::f16   ? detail::float_encoding::f16
                          : dtype_ == npy_dtype::f32 ? detail::float_encoding::f32
                                                     : detail::float_encoding::f64,
                          src, n, out);
  }
  /// Copies row `r` into `out` (cols() values).
  template <cpu_scalar T>
  void read_row(std::int64_t r, T* out) const {
    read_rows(r, 1, out);
  }
  /// Rows [first, first + count) as a new matrix.
  template <cpu_scalar T>
  row_matrix<T> read_rows(std::int64_t first, std::int64_t count) const {
    detail::expects<shape_error>(count >= 0, "npy file '", path_.string(), "': negative row count ", count);
    row_matrix<T> m(count, cols_);
    read_rows(first, count, m.data());
    return m;
  }
  /// The whole file as a [rows, cols] matrix.
  template <cpu_scalar T>
  row_matrix<T> read_all() const {
    return read_rows<T>(0, rows_);
  }

 private:
  template <class... Args>
  [[noreturn]] void fail(Args&&... args) const {
    detail::throw_npy_error(path_.string(), std::forward<Args>(args)...);
  }


  void parse() {
    const npy_header h =
        npy_header::parse(map_.bytes(), path_.string());
    major_ = h.major;
    minor_ = h.minor;
    dtype_ = h.dtype;
    shape_ = h.shape;
    rows_ = h.rows;
    cols_ = h.cols;
    data_offset_ = h.data_offset;
  }

  std::filesystem::path path_;
  detail::mapped_file map_;
  std::size_t data_offset_ = 0;
  std::int64_t rows_ = 0;
  std::int64_t cols_ = 0;
  npy_dtype dtype_ = npy_dtype::f32;
  int major_ = 0;
  int minor_ = 0;
  std::vector<std::int64_t> shape_;
};

// --- Writing -------------------------------------------------------------------------

namespace detail {

/// The version 1.0 preamble and header dict, padded so the data starts on a 64-byte boundary.
inline std::string npy_header_v1(npy_dtype dt, std::span<const std::int64_t> shape) {
  std::string dict = std::string("{'descr': '") + npy_descr(dt) + "', 'fortran_order': False, 'shape': (";
  for (std::size_t i = 0; i < shape.size(); ++i) dict += (i ? ", " : "") + std::to_string(shape[i]);
  dict += shape.size() == 1 ? ",), }" : "), }";
  std::size_t total = 10 + dict.size() + 1;  // + the terminating '\n'
  const std::size_t padded = (total + 63) / 64 * 64;
  dict.append(padded - total, ' ');
  dict += '\n';
  const std::size_t hlen = dict.size();
  expects<io_error>(hlen <= 0xffff, "write_npy: header too long (", hlen, " bytes) for format 1.0");
  std::string out("\x93NUMPY\x01\x00", 8);
  out += char(hlen & 0xff);
  out += char((hlen >> 8) & 0xff);
  return out + dict;
}

}  // namespace detail

/// Writes `data` (row-major, prod(shape) elements) as a version 1.0 .npy file of dtype
/// `dt` with the given shape, atomically (temporary file, fsync, rename). float16
/// output rounds to nearest even; float32 output from double rounds to nearest.
template <cpu_scalar T>
void write_npy(const std::filesystem::path& path, const T* data, std::span<const std::int64_t> shape,
               npy_dtype dt = npy_dtype::f32) {
  std::size_t n = 1;
  for (const std::int64_t s : shape) {
    detail::expects<shape_error>(s >= 0, "write_npy '", path.string(), "': negative dimension ", s);
    n *= std::size_t(s);
  }
  detail::expects<shape_error>(n == 0 || data != nullptr, "write_npy '", path.string(), "': null data");
  const std::string header = detail::npy_header_v1(dt, shape);

  detail::atomic_file out(path, "write_npy");
  out.write(header);

  const std::size_t item = npy_itemsize(dt);
  constexpr std::size_t chunk = std::size_t(1) << 16;  // elements per write
  std::vector<unsigned char> buf(std::min(n, chunk) * item);
  for (std::size_t lo = 0; lo < n; lo += chunk) {
    const std::size_t m = std::min(chunk, n - lo);
    for (std::size_t i = 0; i < m; ++i) {
      const T v = data[lo + i];
      unsigned char* dst = buf.data() + i * item;
      if (dt == npy_dtype::f32) {
        const float f = static_cast<float>(v);
        std::memcpy(dst, &f, 4);
      } else if (dt == npy_dtype::f64) {
        const double x = static_cast<double>(v);
        std::memcpy(dst, &x, 8);
      } else {
        std::uint16_t h;
        if constexpr (std::is_same_v<T, float>)
          h = float_to_half(v);
        else
          h = double_to_half(v);
        std::memcpy(dst, &h, 2);
      }
    }
    out.write(buf.data(), m * item);
  }
  out.commit();
}

/// Writes a [rows, cols] row-major array.
template <cpu_scalar T>
void write_npy(const std::filesystem::path& path, const T* data, std::int64_t rows, std::int64_t cols,
               npy_dtype dt = npy_dtype::f32) {
  const std::int64_t shape[2] = {rows, cols};
  write_npy(path, data, std::span<const std::int64_t>(shape), dt);
}

/// Writes a matrix as a [rows, cols] array.
template <cpu_scalar T>
void write_npy(const std::filesystem::path& path, const row_matrix<T>& m, npy_dtype dt = npy_dtype::f32) {
  write_npy(path, m.data(), std::int64_t(m.rows()), std::int64_t(m.cols()), dt);
}

HSAE_NAMESPACE_END
