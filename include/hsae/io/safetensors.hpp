// SPDX-License-Identifier: Apache-2.0
/// \file io/safetensors.hpp
/// safetensors files: a parser over a byte buffer (`safetensors_view`, the entry point a
/// fuzzer calls), a memory-mapped reader (`safetensors_file`) and an atomic writer
/// (`safetensors_writer`).
///
/// The format: 8 bytes little-endian `N`, then `N` bytes of UTF-8 JSON, then the data.
/// The JSON maps tensor names to `{"dtype": "F32", "shape": [2, 3], "data_offsets":
/// [begin, end]}` (offsets relative to the start of the data) and may hold
/// `"__metadata__"`, a map of strings to strings.
///
/// Validation follows the safetensors library (0.8.0) and adds two checks of its own:
///  - N at most 100,000,000 ("header too large") and 8 + N within the file;
///  - the header is valid JSON (UTF-8 checked, at most 127 levels deep), padded with JSON
///    whitespace only (no NUL byte, no byte order mark), an object; `__metadata__` is null or an
///    object of strings; each tensor an object with a known `dtype` (the 22 codes of
///    safetensors 0.8: BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0,
///    F8_E4M3FNUZ, F8_E5M2FNUZ, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64),
///    a `shape` of non-negative integers and two non-negative integer `data_offsets`;
///    fields it does not know are ignored, as serde does;
///  - sorted by offsets, the tensors tile the data exactly: the first starts at 0, each
///    starts where the previous ended (no hole, no overlap), end >= begin, end - begin is
///    the byte size of shape x dtype (no overflow, whole bytes for the sub-byte dtypes),
///    and the last ends at the end of the file;
///  - hsae only: a name (or any object key) given twice is an error (safetensors keeps
///    the last one).
/// Every problem raises hsae::io_error "safetensors file '<where>': <problem>"; nothing
/// is read outside the buffer.
///
/// Reading converts F32, F16, BF16 and F64 to float or double (other dtypes parse but do
/// not convert). The data need not be aligned. Writing sorts the tensors by element size
/// (largest first) then name, pads the header with spaces to a multiple of 8 bytes, so
/// every tensor starts at a multiple of its element size from an 8-aligned data start.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "../config.hpp"
#include "../detail/files.hpp"
#include "../detail/half.hpp"
#include "../detail/printable.hpp"
#include "../error.hpp"
#include "../matrix.hpp"

HSAE_NAMESPACE_BEGIN

/// The element types of the safetensors format (0.8.0), in the library's order.
enum class safetensors_dtype : std::uint8_t {
  boolean, f4, f6_e2m3, f6_e3m2, u8, i8, f8_e5m2, f8_e4m3, f8_e8m0, f8_e4m3fnuz, f8_e5m2fnuz,
  i16, u16, f16, bf16, i32, u32, f32, c64, f64, i64, u64
};

namespace detail {
struct safetensors_dtype_entry {
  std::string_view name;
  int bits;
};
inline constexpr std::array<safetensors_dtype_entry, 22> safetensors_dtypes{{
    {"BOOL", 8},  {"F4", 4},           {"F6_E2M3", 6},      {"F6_E3M2", 6}, {"U8", 8},   {"I8", 8},
    {"F8_E5M2", 8}, {"F8_E4M3", 8},    {"F8_E8M0", 8},      {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8},
    {"I16", 16},  {"U16", 16},         {"F16", 16},         {"BF16", 16},   {"I32", 32}, {"U32", 32},
    {"F32", 32},  {"C64", 64},         {"F64", 64},         {"I64", 64},    {"U64", 64},
}};
}  // namespace detail

/// The format's code for a dtype, e.g. "BF16".
constexpr std::string_view safetensors_dtype_name(safetensors_dtype dt) noexcept {
  return detail::safetensors_dtypes[std::size_t(dt)].name;
}
/// Bits per element (4 for F4, 6 for the F6 types).
constexpr int safetensors_dtype_bits(safetensors_dtype dt) noexcept {
  return detail::safetensors_dtypes[std::size_t(dt)].bits;
}
/// The dtype of a format code ("F32", ...), or nullopt for an unknown code.
constexpr std::optional<safetensors_dtype> parse_safetensors_dtype(std::string_view code) noexcept {
  for (std::size_t i = 0; i < detail::safetensors_dtypes.size(); ++i)
    if (detail::safetensors_dtypes[i].name == code) return safetensors_dtype(i);
  return std::nullopt;
}
/// True for the dtypes hsae converts to and from float: F32, F16, BF16, F64.
constexpr bool safetensors_dtype_is_float(safetensors_dtype dt) noexcept {
  return dt == safetensors_dtype::f32 || dt == safetensors_dtype::f16 || dt == safetensors_dtype::bf16 ||
         dt == safetensors_dtype::f64;
}

/// One tensor of a safetensors header. `begin`/`end` are byte offsets relative to the
/// start of the data section.
struct safetensors_tensor_info {
  std::string name;
  safetensors_dtype dtype = safetensors_dtype::f32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;

  /// Product of the shape (1 for a scalar).
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (const auto s : shape) n *= s;
    return n;
  }
  std::uint64_t nbytes() const { return end - begin; }
  /// "[2, 3]"
  std::string shape_text() const {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }
};

namespace detail {

/// Header size limit of the safetensors library (MAX_HEADER_SIZE).
inline constexpr std::uint64_t safetensors_max_header = 100'000'000;

inline std::uint64_t load_u64le(const std::byte* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | std::uint64_t(std::to_integer<unsigned>(p[i]));
  return v;
}

/// Nesting limit of the safetensors library's JSON parser (serde_json: 127 levels).
inline constexpr int safetensors_max_nesting = 127;

/// A SAX handler for nlohmann::json::sax_parse that builds the document (as the library's
/// own DOM parser does) and rejects, as the events arrive, nesting deeper than
/// `max_nesting` levels and, if `unique_keys`, a key given twice in one object (otherwise
/// the last one wins). Each event costs O(log n) in the size of the object it lands in, so
/// a header of many tensors parses in O(n log n); nlohmann's callback parser, which these
/// checks once used, rescans the parent object at every object end (quadratic).
/// `fail(description)` must throw; syntax errors are rethrown as nlohmann::json::exception.
template <class Fail>
class strict_json_builder {
 public:
  using json = nlohmann::json;

  strict_json_builder(json& root, int max_nesting, bool unique_keys, Fail& fail)
      : root_(root), max_nesting_(max_nesting), unique_keys_(unique_keys), fail_(fail) {}

  bool null() { return add(json(nullptr)); }
  bool boolean(bool v) { return add(json(v)); }
  bool number_integer(json::number_integer_t v) { return add(json(v)); }
  bool number_unsigned(json::number_unsigned_t v) { return add(json(v)); }
  bool number_float(json::number_float_t v, const json::string_t& /*text*/) { return add(json(v)); }
  bool string(json::string_t& v) { return add(json(std::move(v))); }
  bool binary(json::binary_t& v) { return add(json::binary(std::move(v))); }  // not produced by JSON text

  bool start_object(std::size_t /*elements*/) { return open(json::value_t::object); }
  bool key(json::string_t& k) {
    // One lookup: the slot of the value that follows (a null until then).
    auto& obj = stack_.back()->get_ref<json::object_t&>();
    const auto [it, fresh] = obj.try_emplace(std::move(k));
    if (!fresh && unique_keys_) fail_(concat("key '", it->first, "' appears twice"));
    slot_ = &it->second;  // map nodes do not move: the address holds until the value arrives
    return true;
  }
  bool end_object() {
    stack_.pop_back();
    return true;
  }
  bool start_array(std::size_t /*elements*/) { return open(json::value_t::array); }
  bool end_array() {
    stack_.pop_back();
    return true;
  }

  [[noreturn]] bool parse_error(std::size_t /*position*/, const std::string& /*last_token*/,
                                const nlohmann::json::exception& e) {
    throw e;  // what() keeps nlohmann's message ("[json.exception.parse_error.101] ...")
  }

 private:
  /// Places `v` in the innermost open container (or as the root); returns its address.
  json* place(json&& v) {
    if (stack_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    json& parent = *stack_.back();
    if (parent.is_array()) {
      auto& a = parent.get_ref<json::array_t&>();
      a.push_back(std::move(v));
      return &a.back();
    }
    *slot_ = std::move(v);  // a repeated key (without unique_keys): the last one wins
    return slot_;
  }
  bool add(json&& v) {
    place(std::move(v));
    return true;
  }
  bool open(json::value_t t) {
    if (stack_.size() >= std::size_t(max_nesting_)) fail_(concat("nested more than ", max_nesting_, " levels deep"));
    // Only the innermost open container grows, so the addresses of the open ones hold.
    stack_.push_back(place(json(t)));
    return true;
  }

  json& root_;
  int max_nesting_;
  bool unique_keys_;
  Fail& fail_;
  std::vector<json*> stack_;  // the open containers, outermost first
  json* slot_ = nullptr;      // in an object: where the value of the last key goes
};

/// Parses JSON text, rejecting nesting deeper than `max_nesting` levels (which bounds
/// the work a hostile text can cause) and, if `unique_keys`, a key that appears twice in
/// one object (otherwise the last one wins, as in Python's json module). Linear in the
/// text (up to a log factor), through strict_json_builder.
/// A NUL byte anywhere and a leading UTF-8 byte order mark are refused, as serde_json (the
/// safetensors library's parser) and Python's json module refuse them: nlohmann's lexer
/// would end the input at a NUL (so "{...}\0GARBAGE" would parse) and skip the mark.
/// \throws nlohmann::json::exception on malformed JSON; `fail(description)` must throw
///         on a NUL byte, a byte order mark, a duplicate key or too deep nesting.
template <class Fail>
nlohmann::json parse_json_strict(std::string_view text, int max_nesting, bool unique_keys, Fail&& fail) {
  if (const auto nul = text.find('\0'); nul != std::string_view::npos)
    fail(concat("NUL byte at offset ", nul, " of the JSON text (JSON allows none; pad with spaces)"));
  if (text.starts_with("\xef\xbb\xbf")) fail("the JSON text starts with a UTF-8 byte order mark (JSON allows none)");
  nlohmann::json root;
  strict_json_builder<std::remove_reference_t<Fail>> sax(root, max_nesting, unique_keys, fail);
  nlohmann::json::sax_parse(text.begin(), text.end(), &sax, nlohmann::json::input_format_t::json, /*strict=*/true,
                            /*ignore_comments=*/false);
  return root;
}

/// Converts `n` elements of `dt` at `src` (unaligned little-endian bytes) to T
/// (detail::decode_floats). Callers check safetensors_dtype_is_float first.
template <class T>
void convert_elements(safetensors_dtype dt, const std::byte* src, std::size_t n, T* out) {
  switch (dt) {
    case safetensors_dtype::f32: return decode_floats(float_encoding::f32, src, n, out);
    case safetensors_dtype::f64: return decode_floats(float_encoding::f64, src, n, out);
    case safetensors_dtype::f16: return decode_floats(float_encoding::f16, src, n, out);
    case safetensors_dtype::bf16: return decode_floats(float_encoding::bf16, src, n, out);
    default: return;
  }
}

}  // namespace detail

/// A parsed safetensors buffer. Non-owning: the bytes must outlive the view. This is
/// the parser's entry point for fuzzing: any byte buffer either parses or throws
/// hsae::io_error.
class safetensors_view {
 public:
  safetensors_view() = default;
  /// Parses and validates `bytes`; `where` names the file in error messages.
  /// \throws hsae::io_error naming `where` and the problem.
  safetensors_view(std::span<const std::byte> bytes, std::string where)
      : bytes_(bytes), where_(std::move(where)) {
    parse();
  }

  /// The tensors in data order (sorted by offsets).
  const std::vector<safetensors_tensor_info>& tensors() const noexcept { return tensors_; }
  /// The `__metadata__` map (empty if absent).
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  /// The name used in error messages.
  const std::string& where() const noexcept { return where_; }
  /// Byte offset of the data section in the buffer (8 + header length).
  std::size_t data_offset() const noexcept { return data_offset_; }

  bool contains(std::string_view name) const { return index_.find(std::string(name)) != index_.end(); }
  /// The tensor named `name`, or nullptr.
  const safetensors_tensor_info* find(std::string_view name) const {
    const auto it = index_.find(std::string(name));
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  /// \throws hsae::io_error if there is no tensor `name`.
  const safetensors_tensor_info& at(std::string_view name) const {
    const auto* t = find(name);
    if (t == nullptr) fail("no tensor named '", name, "'");
    return *t;
  }
  /// The raw bytes of a tensor.
  std::span<const std::byte> bytes(const safetensors_tensor_info& t) const {
    return bytes_.subspan(data_offset_ + std::size_t(t.begin), std::size_t(t.nbytes()));
  }

  /// Converts all elements of `name` (any shape, row-major) into `out` (numel values; `out`
  /// may be null for a tensor of no elements).
  /// \throws hsae::io_error if the tensor is missing or its dtype is not F32/F16/BF16/F64.
  template <cpu_scalar T>
  void read_to(std::string_view name, T* out) const {
    const auto& t = at(name);
    if (!safetensors_dtype_is_float(t.dtype))
      fail("tensor '", t.name, "' has dtype ", safetensors_dtype_name(t.dtype),
           "; only F32, F16, BF16 and F64 convert to floating point");
    detail::convert_elements(t.dtype, bytes(t).data(), std::size_t(t.numel()), out);
  }

  /// A 2-D tensor as a [rows, cols] matrix; `rows`/`cols` >= 0 are checked.
  /// \throws hsae::io_error if missing, not 2-D, of another shape, or not a float dtype.
  template <cpu_scalar T>
  row_matrix<T> read_matrix(std::string_view name, std::int64_t rows = -1, std::int64_t cols = -1) const {
    const auto& t = at(name);
    if (t.shape.size() != 2 || (rows >= 0 && t.shape[0] != rows) || (cols >= 0 && t.shape[1] != cols))
      fail("tensor '", t.name, "' has shape ", t.shape_text(), ", expected [", rows >= 0 ? std::to_string(rows) : "*",
           ", ", cols >= 0 ? std::to_string(cols) : "*", "]");
    row_matrix<T> m(t.shape[0], t.shape[1]);
    read_to(name, m.data());
    return m;
  }

  /// A 1-D tensor as a vector; `size` >= 0 is checked.
  /// \throws hsae::io_error if missing, not 1-D, of another length, or not a float dtype.
  template <cpu_scalar T>
  vector<T> read_vector(std::string_view name, std::int64_t size = -1) const {
    const auto& t = at(name);
    if (t.shape.size() != 1 || (size >= 0 && t.shape[0] != size))
      fail("tensor '", t.name, "' has shape ", t.shape_text(), ", expected [",
           size >= 0 ? std::to_string(size) : "*", "]");
    vector<T> v(t.shape[0]);
    read_to(name, v.data());
    return v;
  }

 private:
  template <class... Args>
  [[noreturn]] void fail(Args&&... args) const {
    throw io_error(detail::printable_utf8(
        detail::concat("hsae: safetensors file '", where_, "': ", std::forward<Args>(args)...)));
  }

  static std::uint64_t as_uint(const nlohmann::json& j, bool& ok) {
    if (j.is_number_unsigned()) return j.get<std::uint64_t>();
    if (j.is_number_integer() && j.get<std::int64_t>() >= 0) return std::uint64_t(j.get<std::int64_t>());
    ok = false;
    return 0;
  }

  void parse() {
    if constexpr (std::endian::native != std::endian::little) fail("big-endian hosts are not supported");
    const std::size_t size = bytes_.size();
    if (size < 8) fail("file too small (", size, " bytes) for the 8-byte header length");
    const std::uint64_t n = detail::load_u64le(bytes_.data());
    if (n > detail::safetensors_max_header)
      fail("header length ", n, " exceeds the limit of ", detail::safetensors_max_header, " bytes");
    if (n > size - 8)
      fail("header length ", n, " extends beyond the end of the file (", size, " bytes)");
    data_offset_ = 8 + std::size_t(n);
    const std::string_view text(reinterpret_cast<const char*>(bytes_.data()) + 8, std::size_t(n));

    nlohmann::json header;
    try {
      header = detail::parse_json_strict(text, detail::safetensors_max_nesting, /*unique_keys=*/true,
                                         [&](const std::string& what) { fail("malformed header: ", what); });
    } catch (const nlohmann::json::exception& e) {
      fail("malformed JSON header: ", e.what());
    }
    if (!header.is_object()) fail("malformed header: not a JSON object");

    tensors_.reserve(header.size());
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const nlohmann::json& v = it.value();
      if (name == "__metadata__") {
        if (v.is_null()) continue;
        if (!v.is_object()) fail("malformed header: '__metadata__' is not an object");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string()) fail("malformed header: '__metadata__' value of '", m.key(), "' is not a string");
          metadata_.emplace(m.key(), m.value().get<std::string>());
        }
        continue;
      }
      tensors_.push_back(parse_tensor(name, v));
    }

    // Data order: a stable sort by offsets, of positions (each tensor then moves once).
    // tensors_ arrive in name order (the JSON object is a sorted map), so rank[k], the data
    // position of the k-th name, lets index_ be filled in key order at the end (O(n)).
    const std::size_t count = tensors_.size();
    std::vector<std::size_t> order(count), rank(count);
    for (std::size_t i = 0; i < count; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t i, std::size_t j) {
      const auto &a = tensors_[i], &b = tensors_[j];
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    {
      std::vector<safetensors_tensor_info> sorted;
      sorted.reserve(count);
      for (std::size_t p = 0; p < count; ++p) {
        sorted.push_back(std::move(tensors_[order[p]]));
        rank[order[p]] = p;
      }
      tensors_ = std::move(sorted);
    }
    std::uint64_t expected = 0;
    const std::string* prev = nullptr;
    for (const auto& t : tensors_) {
      if (t.end < t.begin)
        fail("tensor '", t.name, "': data_offsets [", t.begin, ", ", t.end, "] end before they begin");
      if (t.begin < expected)
        fail("tensor '", t.name, "': data_offsets [", t.begin, ", ", t.end, "] overlap tensor '", *prev,
             "' (which ends at ", expected, ")");
      if (t.begin > expected)
        fail("tensor '", t.name, "': data_offsets [", t.begin, ", ", t.end, "] leave a hole of ", t.begin - expected,
             " bytes after offset ", expected);
      const std::uint64_t need = byte_size(t);
      if (t.end - t.begin != need)
        fail("tensor '", t.name, "': shape ", t.shape_text(), " of ", safetensors_dtype_name(t.dtype), " needs ", need,
             " bytes but data_offsets [", t.begin, ", ", t.end, "] span ", t.end - t.begin);
      expected = t.end;
      prev = &t.name;
    }
    const std::uint64_t have = size - data_offset_;
    if (expected != have)
      fail("the tensors cover ", expected, " bytes of data but the file holds ", have, " after the header (",
           expected > have ? "truncated" : "trailing bytes", ")");
    for (std::size_t k = 0; k < count; ++k) index_.emplace_hint(index_.end(), tensors_[rank[k]].name, rank[k]);
  }

  safetensors_tensor_info parse_tensor(const std::string& name, const nlohmann::json& v) const {
    if (!v.is_object()) fail("malformed header: entry '", name, "' is not an object");
    safetensors_tensor_info t;
    t.name = name;
    const auto dt = v.find("dtype");
    const auto sh = v.find("shape");
    const auto off = v.find("data_offsets");
    if (dt == v.end()) fail("malformed header: tensor '", name, "' has no 'dtype'");
    if (sh == v.end()) fail("malformed header: tensor '", name, "' has no 'shape'");
    if (off == v.end()) fail("malformed header: tensor '", name, "' has no 'data_offsets'");
    if (!dt->is_string()) fail("malformed header: tensor '", name, "': 'dtype' is not a string");
    const auto code = parse_safetensors_dtype(dt->get_ref<const std::string&>());
    if (!code) fail("tensor '", name, "': unknown dtype '", dt->get_ref<const std::string&>(), "'");
    t.dtype = *code;
    if (!sh->is_array()) fail("malformed header: tensor '", name, "': 'shape' is not an array");
    for (const auto& d : *sh) {
      bool ok = true;
      const std::uint64_t x = as_uint(d, ok);
      if (!ok) fail("malformed header: tensor '", name, "': 'shape' holds ", d.dump(), ", not a non-negative integer");
      if (x > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
        fail("tensor '", name, "': dimension ", x, " is too large");
      t.shape.push_back(std::int64_t(x));
    }
    if (!off->is_array() || off->size() != 2)
      fail("malformed header: tensor '", name, "': 'data_offsets' is not a pair [begin, end]");
    bool ok = true;
    t.begin = as_uint((*off)[0], ok);
    t.end = as_uint((*off)[1], ok);
    if (!ok) fail("malformed header: tensor '", name, "': 'data_offsets' ", off->dump(), " are not non-negative integers");
    return t;
  }

  /// Bytes of shape x dtype. \throws hsae::io_error on overflow or a sub-byte remainder.
  std::uint64_t byte_size(const safetensors_tensor_info& t) const {
    std::uint64_t n = 1;
    for (const auto s : t.shape) {
      if (s != 0 && n > std::numeric_limits<std::uint64_t>::max() / std::uint64_t(s))
        fail("tensor '", t.name, "': shape ", t.shape_text(), " overflows");
      n *= std::uint64_t(s);
    }
    const auto bits = std::uint64_t(safetensors_dtype_bits(t.dtype));
    if (n > std::numeric_limits<std::uint64_t>::max() / bits)
      fail("tensor '", t.name, "': shape ", t.shape_text(), " of ", safetensors_dtype_name(t.dtype), " overflows");
    if ((n * bits) % 8 != 0)
      fail("tensor '", t.name, "': shape ", t.shape_text(), " of ", safetensors_dtype_name(t.dtype),
           " does not fill whole bytes");
    return n * bits / 8;
  }

  std::span<const std::byte> bytes_;
  std::string where_;
  std::size_t data_offset_ = 0;
  std::vector<safetensors_tensor_info> tensors_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// A memory-mapped, validated safetensors file. Move-only; every accessor of
/// `safetensors_view` is available through `view()` and forwarded below.
/// Mapping contract (as npy_file's): replacing the file by rename while it is open is
/// safe (the mapping keeps the old contents); truncating it in place is not (a read past
/// the new end is a SIGBUS that ends the process). hsae's own writers always rename.
class safetensors_file {
 public:
  /// \throws hsae::io_error naming the file and the problem; a path that is not a regular
  ///         file (a directory, a named pipe, a device) is refused at once, without waiting
  ///         for a writer.
  explicit safetensors_file(std::filesystem::path path)
      : path_(std::move(path)), map_(path_, "safetensors file"), view_(map_.bytes(), path_.string()) {}

  const std::filesystem::path& path() const noexcept { return path_; }
  const safetensors_view& view() const noexcept { return view_; }
  const std::vector<safetensors_tensor_info>& tensors() const noexcept { return view_.tensors(); }
  const std::map<std::string, std::string>& metadata() const noexcept { return view_.metadata(); }
  bool contains(std::string_view name) const { return view_.contains(name); }
  const safetensors_tensor_info* find(std::string_view name) const { return view_.find(name); }
  const safetensors_tensor_info& at(std::string_view name) const { return view_.at(name); }
  std::span<const std::byte> bytes(const safetensors_tensor_info& t) const { return view_.bytes(t); }
  template <cpu_scalar T>
  void read_to(std::string_view name, T* out) const {
    view_.read_to(name, out);
  }
  template <cpu_scalar T = float>
  row_matrix<T> read_matrix(std::string_view name, std::int64_t rows = -1, std::int64_t cols = -1) const {
    return view_.read_matrix<T>(name, rows, cols);
  }
  template <cpu_scalar T = float>
  vector<T> read_vector(std::string_view name, std::int64_t size = -1) const {
    return view_.read_vector<T>(name, size);
  }

 private:
  std::filesystem::path path_;
  detail::mapped_file map_;
  safetensors_view view_;
};

/// Collects tensors (by pointer: the data must outlive `write`/`serialize`) and
/// metadata, then writes a safetensors file atomically or serialises it to memory.
///
///     hsae::safetensors_writer w;
///     w.add("W_dec", model.W_dec, hsae::safetensors_dtype::bf16).add("b_dec", model.b_dec);
///     w.metadata("format", "pt");
///     w.write(dir / "sae.safetensors");
class safetensors_writer {
 public:
  /// Adds a tensor of any shape from `numel(shape)` contiguous row-major values.
  /// \throws hsae::config_error on a duplicate or reserved name or a dtype other than
  ///         F32/F16/BF16/F64, hsae::shape_error on a negative dimension or null data.
  template <cpu_scalar T>
  safetensors_writer& add(std::string name, const T* data, std::vector<std::int64_t> shape,
                          safetensors_dtype dtype = safetensors_dtype::f32) {
    std::int64_t n = 1;
    for (const auto s : shape) {
      detail::expects<shape_error>(s >= 0, "safetensors_writer: tensor '", name, "' has negative dimension ", s);
      n *= s;
    }
    entry e = make_entry(std::move(name), std::move(shape), dtype);
    detail::expects<shape_error>(n == 0 || data != nullptr, "safetensors_writer: tensor '", e.name, "' has null data");
    e.src = data;
    e.rows = 1;
    e.cols = n;
    e.stride = n;
    entries_.push_back(std::move(e));
    return *this;
  }
  /// Adds a matrix as a [rows, cols] tensor, or a column vector as a [n] tensor. Takes
  /// anything with row-major data in memory: `row_matrix`, `vector`, `Eigen::Map`, row
  /// blocks (the outer stride is followed). An expression (e.g. `.transpose()`) does
  /// not compile: evaluate it into a variable that outlives the write. A plain matrix
  /// passed as a temporary is refused for the same reason.
  /// \throws as the pointer overload, and hsae::shape_error on a non-unit inner stride.
  template <class Derived>
    requires std::is_class_v<Derived>
  safetensors_writer& add(std::string name, const Eigen::DenseBase<Derived>& m,
                          safetensors_dtype dtype = safetensors_dtype::f32) {
    using S = typename Derived::Scalar;
    static_assert(cpu_scalar<S>, "hsae::safetensors_writer::add: elements must be float or double");
    static_assert(bool(Derived::Flags & Eigen::DirectAccessBit),
                  "hsae::safetensors_writer::add: needs data in memory (a matrix, Map or block), not an "
                  "expression; evaluate it into a variable that outlives write()");
    constexpr bool is_vector = Derived::ColsAtCompileTime == 1;
    static_assert(is_vector || bool(Derived::Flags & Eigen::RowMajorBit) || Derived::RowsAtCompileTime == 1,
                  "hsae::safetensors_writer::add: matrices must be row-major (hsae::row_matrix)");
    const Derived& d = m.derived();
    detail::expects<shape_error>(d.innerStride() == 1, "safetensors_writer: tensor '", name,
                                 "' has inner stride ", d.innerStride(), "; a unit stride is required");
    std::vector<std::int64_t> shape;
    if (is_vector)
      shape = {std::int64_t(d.rows())};
    else
      shape = {std::int64_t(d.rows()), std::int64_t(d.cols())};
    entry e = make_entry(std::move(name), std::move(shape), dtype);
    e.src = static_cast<const S*>(d.data());
    e.rows = is_vector ? 1 : d.rows();
    e.cols = is_vector ? d.rows() : d.cols();
    e.stride = is_vector || d.rows() <= 1 ? e.cols : d.outerStride();
    entries_.push_back(std::move(e));
    return *this;
  }
  /// A temporary matrix would dangle before write(): refused at compile time.
  template <class Derived>
    requires std::is_class_v<Derived> && std::is_base_of_v<Eigen::PlainObjectBase<Derived>, Derived>
  safetensors_writer& add(std::string name, Derived&& m, safetensors_dtype dtype = safetensors_dtype::f32) = delete;
  /// Sets a `__metadata__` entry.
  safetensors_writer& metadata(std::string key, std::string value) {
    metadata_[std::move(key)] = std::move(value);
    return *this;
  }

  /// The header bytes: 8-byte length, then the JSON padded with spaces to a multiple of 8.
  std::string header() const {
    nlohmann::json h = nlohmann::json::object();
    if (!metadata_.empty()) h["__metadata__"] = metadata_;
    std::uint64_t off = 0;
    for (const entry* e : ordered()) {
      const std::uint64_t nb = std::uint64_t(e->rows * e->cols) * std::uint64_t(safetensors_dtype_bits(e->dtype) / 8);
      h[e->name] = {{"dtype", std::string(safetensors_dtype_name(e->dtype))},
                    {"shape", e->shape},
                    {"data_offsets", {off, off + nb}}};
      off += nb;
    }
    std::string json;
    try {
      json = h.dump();
    } catch (const nlohmann::json::exception& e) {
      detail::throw_error<config_error>("safetensors_writer: a tensor name or metadata entry is not valid UTF-8 (",
                                        detail::printable_utf8(e.what()), ")");
    }
    json.append((8 - json.size() % 8) % 8, ' ');
    std::string out(8, '\0');
    std::uint64_t n = json.size();
    for (int i = 0; i < 8; ++i) out[std::size_t(i)] = char((n >> (8 * i)) & 0xffu);
    return out + json;
  }

  /// The whole file in memory.
  std::vector<std::byte> serialize() const {
    const std::string h = header();
    std::vector<std::byte> out(h.size());
    std::memcpy(out.data(), h.data(), h.size());
    for (const entry* e : ordered())
      emit(*e, [&](const void* p, std::size_t n) {
        const auto* b = static_cast<const std::byte*>(p);
        out.insert(out.end(), b, b + n);
      });
    return out;
  }

  /// Writes the file atomically (temporary file, fsync, rename, directory fsync).
  /// \throws hsae::io_error naming the file on a failing system call.
  void write(const std::filesystem::path& path) const {
    detail::atomic_file f(path, "safetensors file");
    f.write(header());
    for (const entry* e : ordered()) emit(*e, [&](const void* p, std::size_t n) { f.write(p, n); });
    f.commit();
  }

 private:
  struct entry {
    std::string name;
    std::vector<std::int64_t> shape;
    safetensors_dtype dtype;
    std::variant<const float*, const double*> src;
    Eigen::Index rows = 0, cols = 0, stride = 0;
  };

  entry make_entry(std::string name, std::vector<std::int64_t> shape, safetensors_dtype dtype) const {
    detail::expects<config_error>(name != "__metadata__", "safetensors_writer: '__metadata__' is reserved");
    detail::expects<config_error>(
        safetensors_dtype_is_float(dtype), "safetensors_writer: tensor '", name, "': dtype ",
        safetensors_dtype_name(dtype), " is not writable (F32, F16, BF16 and F64 are)");
    for (const auto& e : entries_)
      detail::expects<config_error>(e.name != name, "safetensors_writer: tensor '", name, "' added twice");
    return entry{std::move(name), std::move(shape), dtype, static_cast<const float*>(nullptr)};
  }

  std::vector<const entry*> ordered() const {
    std::vector<const entry*> v;
    for (const auto& e : entries_) v.push_back(&e);
    std::sort(v.begin(), v.end(), [](const entry* a, const entry* b) {
      const int ba = safetensors_dtype_bits(a->dtype), bb = safetensors_dtype_bits(b->dtype);
      return ba != bb ? ba > bb : a->name < b->name;
    });
    return v;
  }

  /// Converts one tensor row by row into the file's dtype and hands out chunks.
  template <class Sink>
  static void emit(const entry& e, Sink&& sink) {
    std::visit(
        [&](auto* src) {
          using T = std::remove_const_t<std::remove_pointer_t<decltype(src)>>;
          const std::size_t item = std::size_t(safetensors_dtype_bits(e.dtype) / 8);
          std::vector<unsigned char> buf;
          for (Eigen::Index r = 0; r < e.rows; ++r) {
            const T* row = src + r * e.stride;
            constexpr Eigen::Index chunk = Eigen::Index(1) << 15;
            for (Eigen::Index lo = 0; lo < e.cols; lo += chunk) {
              const Eigen::Index m = std::min(chunk, e.cols - lo);
              buf.resize(std::size_t(m) * item);
              for (Eigen::Index i = 0; i < m; ++i) {
                const T v = row[lo + i];
                unsigned char* dst = buf.data() + std::size_t(i) * item;
                switch (e.dtype) {
                  case safetensors_dtype::f32: {
                    const float f = static_cast<float>(v);
                    std::memcpy(dst, &f, 4);
                    break;
                  }
                  case safetensors_dtype::f64: {
                    const double d = static_cast<double>(v);
                    std::memcpy(dst, &d, 8);
                    break;
                  }
                  case safetensors_dtype::f16: {
                    std::uint16_t h;
                    if constexpr (std::is_same_v<T, float>)
                      h = float_to_half(v);
                    else
                      h = double_to_half(v);
                    std::memcpy(dst, &h, 2);
                    break;
                  }
                  default: {  // bf16
                    std::uint16_t h;
                    if constexpr (std::is_same_v<T, float>)
                      h = float_to_bfloat16(v);
                    else
                      h = double_to_bfloat16(v);
                    std::memcpy(dst, &h, 2);
                    break;
                  }
                }
              }
              sink(buf.data(), buf.size());
            }
          }
        },
        e.src);
  }

  std::vector<entry> entries_;
  std::map<std::string, std::string> metadata_;
};

HSAE_NAMESPACE_END
