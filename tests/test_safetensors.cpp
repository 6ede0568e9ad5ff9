// SPDX-License-Identifier: Apache-2.0
// safetensors reading and writing (io/safetensors.hpp), bfloat16 conversions
// (data/npy.hpp), and the parser's answer to hostile files: every malformed buffer
// raises hsae::io_error naming the file and the problem, and nothing crashes.
#include <catch2/catch.hpp>

#include <time.h>

#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <hsae/data/npy.hpp>
#include <hsae/io/safetensors.hpp>
#include <hsae/rng.hpp>

#include "fifo_util.hpp"
#include "test_util.hpp"

namespace {

using hsae::safetensors_dtype;

hsae::row_matrix<float> random_matrix(Eigen::Index r, Eigen::Index c, std::uint64_t seed) {
  hsae::rng g(seed);
  hsae::row_matrix<float> m(r, c);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = float(g.normal());
  return m;
}

std::vector<std::byte> bytes_of(const std::string& s) {
  std::vector<std::byte> b(s.size());
  std::memcpy(b.data(), s.data(), s.size());
  return b;
}

/// 8-byte little-endian length + header text + data bytes.
std::vector<std::byte> make_file(const std::string& header, std::size_t data_bytes, std::uint64_t declared = ~0ull) {
  const std::uint64_t n = declared == ~0ull ? header.size() : declared;
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[std::size_t(i)] = char((n >> (8 * i)) & 0xff);
  s += header;
  s.append(data_bytes, '\0');
  return bytes_of(s);
}

/// The message of the io_error that parsing `b` raises ("" if it parses).
std::string parse_error(const std::vector<std::byte>& b) {
  try {
    const hsae::safetensors_view v(b, "hostile.safetensors");
    return "";
  } catch (const hsae::io_error& e) {
    return e.what();
  }
}

void write_file(const std::filesystem::path& p, const std::vector<std::byte>& b) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}

}  // namespace

TEST_CASE("bfloat16 conversions round to nearest even and keep specials", "[safetensors][bf16]") {
  // Exact for every bf16 pattern: bf16 -> float -> bf16 is the identity (NaNs stay NaN).
  for (std::uint32_t h = 0; h <= 0xffffu; ++h) {
    const float f = hsae::bfloat16_to_float(std::uint16_t(h));
    const std::uint16_t back = hsae::float_to_bfloat16(f);
    if (std::isnan(f)) {
      REQUIRE(std::isnan(hsae::bfloat16_to_float(back)));
      REQUIRE((back & 0x8000u) == (h & 0x8000u));
    } else {
      REQUIRE(back == h);
      REQUIRE(hsae::double_to_bfloat16(double(f)) == h);
    }
  }
  // Ties go to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7.
  CHECK(hsae::float_to_bfloat16(1.0f + 0x1p-8f) == 0x3f80u);
  CHECK(hsae::float_to_bfloat16(1.0f + 3 * 0x1p-8f) == 0x3f82u);  // halfway, rounds up to even
  CHECK(hsae::float_to_bfloat16(1.0f + 0x1p-8f + 0x1p-20f) == 0x3f81u);
  // Overflow to Inf, signed zero kept.
  CHECK(hsae::float_to_bfloat16(std::numeric_limits<float>::max()) == 0x7f80u);
  CHECK(hsae::float_to_bfloat16(-0.0f) == 0x8000u);
  // double: no double rounding. 1 + 2^-8 + 2^-40 rounds up directly, but to float
  // first it would become the tie 1 + 2^-8 and round down to 1.
  CHECK(hsae::double_to_bfloat16(1.0 + 0x1p-8 + 0x1p-40) == 0x3f81u);
  CHECK(hsae::double_to_bfloat16(1e300) == 0x7f80u);
  CHECK(std::isnan(hsae::bfloat16_to_float(hsae::double_to_bfloat16(std::nan("")))));
}

TEST_CASE("safetensors round trip for F32, F16, BF16 and F64", "[safetensors]") {
  hsae_test::temp_dir tmp;
  const auto m = random_matrix(7, 5, 1);
  const hsae::vector<double> v = random_matrix(1, 9, 2).row(0).transpose().cast<double>();
  for (const auto dt : {safetensors_dtype::f32, safetensors_dtype::f16, safetensors_dtype::bf16,
                        safetensors_dtype::f64}) {
    DYNAMIC_SECTION("dtype " << hsae::safetensors_dtype_name(dt)) {
      const auto path = tmp / "t.safetensors";
      hsae::safetensors_writer w;
      w.add("weights", m, dt).add("bias", v, dt).metadata("format", "pt").metadata("note", "h\"i\n");
      w.write(path);
      const hsae::safetensors_file f(path);
      REQUIRE(f.tensors().size() == 2);
      CHECK(f.metadata().at("format") == "pt");
      CHECK(f.metadata().at("note") == "h\"i\n");
      const auto& info = f.at("weights");
      CHECK(info.dtype == dt);
      CHECK(info.shape == std::vector<std::int64_t>{7, 5});
      CHECK(f.view().data_offset() % 8 == 0);  // header padded: data start aligned
      const auto r = f.read_matrix<float>("weights", 7, 5);
      const auto b = f.read_vector<double>("bias", 9);
      for (Eigen::Index i = 0; i < m.size(); ++i) {
        float want = m.data()[i];
        if (dt == safetensors_dtype::f16) want = hsae::half_to_float(hsae::float_to_half(want));
        if (dt == safetensors_dtype::bf16) want = hsae::bfloat16_to_float(hsae::float_to_bfloat16(want));
        REQUIRE(std::bit_cast<std::uint32_t>(r.data()[i]) == std::bit_cast<std::uint32_t>(want));
      }
      for (Eigen::Index i = 0; i < v.size(); ++i) {
        double want = v(i);
        if (dt == safetensors_dtype::f32) want = double(float(want));
        if (dt == safetensors_dtype::f16) want = hsae::half_to_float(hsae::double_to_half(want));
        if (dt == safetensors_dtype::bf16) want = hsae::bfloat16_to_float(hsae::double_to_bfloat16(want));
        REQUIRE(b(i) == want);
      }
      // The in-memory serialisation is byte for byte the file.
      const auto mem = w.serialize();
      const hsae::detail::mapped_file mf(path, "test");
      REQUIRE(mem.size() == mf.bytes().size());
      REQUIRE(std::memcmp(mem.data(), mf.bytes().data(), mem.size()) == 0);
    }
  }
}

TEST_CASE("safetensors writer: layout, strides and atomic replacement", "[safetensors]") {
  hsae_test::temp_dir tmp;
  const auto big = random_matrix(6, 8, 3);
  // A block with an outer stride: the writer must follow the stride.
  const hsae::vector<float> small = big.row(0).transpose();
  const hsae::row_matrix<double> wide = big.cast<double>();
  hsae::safetensors_writer w;
  w.add("block", big.block(1, 2, 4, 3), safetensors_dtype::f32);
  w.add("half", small, safetensors_dtype::f16);
  w.add("wide", wide, safetensors_dtype::f64);
  CHECK_THROWS_AS(w.add("column", big.col(1)), hsae::shape_error);  // inner stride 6
  const auto bytes = w.serialize();
  const hsae::safetensors_view v(bytes, "mem");
  // Sorted by element size, largest first: F64, F32, F16; each offset a multiple of it.
  REQUIRE(v.tensors().size() == 3);
  CHECK(v.tensors()[0].name == "wide");
  CHECK(v.tensors()[1].name == "block");
  CHECK(v.tensors()[2].name == "half");
  for (const auto& t : v.tensors())
    CHECK((v.data_offset() + t.begin) % std::uint64_t(hsae::safetensors_dtype_bits(t.dtype) / 8) == 0);
  CHECK(v.read_matrix<float>("block") == hsae::row_matrix<float>(big.block(1, 2, 4, 3)));

  // Replacing a file: the old content stays until the rename, no temporary is left.
  const auto path = tmp / "x.safetensors";
  w.write(path);
  hsae::safetensors_writer w2;
  w2.add("only", small);
  w2.write(path);
  CHECK(hsae::safetensors_file(path).tensors().size() == 1);
  int files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(tmp.dir)) ++files;
  CHECK(files == 1);
  // Unwritable destination: io_error naming it.
  try {
    w2.write(tmp / "no_such_dir" / "x.safetensors");
    FAIL("expected an io_error");
  } catch (const hsae::io_error& e) {
    CHECK_THAT(e.what(), Catch::Contains("no_such_dir"));
  }
}

TEST_CASE("safetensors writer rejects bad tensors", "[safetensors]") {
  const hsae::vector<float> v = hsae::vector<float>::Ones(3);
  hsae::safetensors_writer w;
  w.add("a", v);
  CHECK_THROWS_AS(w.add("a", v), hsae::config_error);
  CHECK_THROWS_AS(w.add("__metadata__", v), hsae::config_error);
  CHECK_THROWS_AS(w.add("i", v, safetensors_dtype::i64), hsae::config_error);
  CHECK_THROWS_AS(w.add<float>("neg", v.data(), {2, -1}), hsae::shape_error);
  CHECK_THROWS_AS(w.add<float>("null", nullptr, {2}), hsae::shape_error);
  hsae::safetensors_writer bad;
  bad.add("\xff", v);
  CHECK_THROWS_AS(bad.serialize(), hsae::config_error);  // names must be UTF-8
  // Empty tensors and scalars are valid safetensors.
  w.add<float>("empty", nullptr, {0, 4});
  w.add<float>("scalar", v.data(), {});
  const auto b = w.serialize();
  const hsae::safetensors_view view(b, "mem");
  CHECK(view.at("empty").nbytes() == 0);
  CHECK(view.at("scalar").numel() == 1);
}

TEST_CASE("safetensors reader: files written by hand, as other tools write them", "[safetensors]") {
  // Unpadded header, tensors listed out of data order, an unknown field, a null metadata
  // and an integer dtype: all valid for the safetensors library.
  std::string h = R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12],"extra":1},)"
                  R"("a":{"dtype":"I8","shape":[4],"data_offsets":[0,4]},"__metadata__":null})";
  auto file = make_file(h, 12);
  const float vals[2] = {1.5f, -2.25f};
  std::memcpy(file.data() + 8 + h.size() + 4, vals, 8);
  const hsae::safetensors_view v(file, "hand.safetensors");
  REQUIRE(v.tensors().size() == 2);
  CHECK(v.tensors()[0].name == "a");  // data order
  CHECK(v.metadata().empty());
  const auto b = v.read_vector<float>("b", 2);
  CHECK(b(0) == 1.5f);
  CHECK(b(1) == -2.25f);
  try {
    (void)v.read_vector<float>("a");
    FAIL("expected an io_error");
  } catch (const hsae::io_error& e) {
    CHECK_THAT(e.what(), Catch::Contains("hand.safetensors") && Catch::Contains("I8"));
  }
  CHECK_THROWS_AS(v.read_matrix<float>("b"), hsae::io_error);       // 1-D, not 2-D
  CHECK_THROWS_AS(v.read_vector<float>("b", 3), hsae::io_error);    // wrong length
  CHECK_THROWS_AS(v.read_vector<float>("zzz"), hsae::io_error);     // missing
  // Sub-byte dtypes: 4 F4 values are 2 bytes, 3 are not whole bytes.
  CHECK(parse_error(make_file(R"({"q":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}})", 2)).empty());
  CHECK_THAT(parse_error(make_file(R"({"q":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2)),
             Catch::Contains("whole bytes"));
  // An empty header object is an empty (valid) file.
  CHECK(parse_error(make_file("{}", 0)).empty());
}

TEST_CASE("safetensors reader: zero-size tensors read as empty matrices, copying nothing", "[safetensors]") {
  // Legal files (a dimension 0, data_offsets [x, x]); the destinations have no storage
  // (Eigen's data() is null), so a memcpy of 0 bytes would be undefined behaviour (UBSan
  // reports it in the sanitizer build).
  const std::string h = R"({"e32":{"dtype":"F32","shape":[2,0],"data_offsets":[0,0]},)"
                        R"("e64":{"dtype":"F64","shape":[0,3],"data_offsets":[0,0]},)"
                        R"("v":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
                        R"("h":{"dtype":"BF16","shape":[0,5],"data_offsets":[0,0]},)"
                        R"("x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  const auto file = make_file(h, 4);
  const hsae::safetensors_view v(file, "empty_tensors.safetensors");
  const auto a = v.read_matrix<float>("e32", 2, 0);
  CHECK((a.rows() == 2 && a.cols() == 0));
  const auto b = v.read_matrix<double>("e64", 0, 3);
  CHECK((b.rows() == 0 && b.cols() == 3));
  const auto b2 = v.read_matrix<float>("e64");
  CHECK(b2.size() == 0);
  CHECK(v.read_vector<float>("v", 0).size() == 0);
  CHECK(v.read_vector<double>("v").size() == 0);
  CHECK(v.read_matrix<float>("h", 0, 5).size() == 0);
  std::vector<float> none;
  v.read_to("e32", none.data());  // null destination, nothing to write
  CHECK(none.empty());
  CHECK(v.read_vector<float>("x", 1)(0) == 0.0f);
}

TEST_CASE("safetensors hostile input: every truncation of a valid file is an io_error", "[safetensors][hostile]") {
  hsae::safetensors_writer w;
  const auto m = random_matrix(3, 4, 5);
  const hsae::vector<float> v = m.row(1).transpose();
  w.add("m", m, safetensors_dtype::bf16).add("v", v).metadata("k", "v");
  const auto full = w.serialize();
  REQUIRE(parse_error(full).empty());
  for (std::size_t n = 0; n < full.size(); ++n) {
    const std::vector<std::byte> cut(full.begin(), full.begin() + std::ptrdiff_t(n));
    const std::string err = parse_error(cut);
    INFO("truncated to " << n << " of " << full.size() << " bytes");
    REQUIRE_FALSE(err.empty());
    REQUIRE_THAT(err, Catch::Contains("hostile.safetensors"));
  }
  // Trailing bytes are rejected too (the tensors must cover the data exactly).
  auto longer = full;
  longer.push_back(std::byte{0});
  CHECK_THAT(parse_error(longer), Catch::Contains("trailing"));
}

TEST_CASE("safetensors hostile input: headers", "[safetensors][hostile]") {
  using Catch::Contains;
  const std::string ok = R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  REQUIRE(parse_error(make_file(ok, 16)).empty());
  CHECK_THAT(parse_error(make_file(ok, 16, ok.size() + 100)), Contains("beyond the end of the file"));
  CHECK_THAT(parse_error(make_file(ok, 16, 1ull << 63)), Contains("exceeds the limit"));
  CHECK_THAT(parse_error(make_file(ok, 16, ~0ull - 1)), Contains("exceeds the limit"));
  CHECK_THAT(parse_error(make_file(R"({"t":{"dtype":"F32",)", 0)), Contains("malformed JSON"));
  CHECK_THAT(parse_error(make_file("[1,2]", 0)), Contains("not a JSON object"));
  CHECK_THAT(parse_error(make_file("{\"\xff\":1}", 0)), Contains("malformed JSON"));  // invalid UTF-8
  CHECK_THAT(parse_error(make_file(R"({"t":{"dtype":"F33","shape":[2,2],"data_offsets":[0,16]}})", 16)),
             Contains("unknown dtype 'F33'"));
  CHECK_THAT(parse_error(make_file(R"({"t":{"dtype":7,"shape":[2,2],"data_offsets":[0,16]}})", 16)),
             Contains("'dtype' is not a string"));
  CHECK_THAT(parse_error(make_file(R"({"t":{"shape":[2,2],"data_offsets":[0,16]}})", 16)), Contains("no 'dtype'"));
  CHECK_THAT(parse_error(make_file(R"({"t":{"dtype":"F32","shape":[2,-2],"data_offsets":[0,16]}})", 16)),
             Contains("not a non-negative integer"));
  CHECK_THAT(parse_error(make_file(R"({"t":{"dtype":"F32","shape":[2,2.5],"data_offsets":[0,16]}})", 16)),
             Contains("not a non-negative integer"));
  CHECK_THAT(parse_error(make_file(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0]}})", 16)),
             Contains("pair"));
  CHECK_THAT(parse_error(make_file(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,-16]}})", 16)),
             Contains("data_offsets"));
  CHECK_THAT(parse_error(make_file(R"({"t":[1]})", 0)), Contains("not an object"));
  CHECK_THAT(parse_error(make_file(R"({"__metadata__":{"a":1}})", 0)), Contains("not a string"));
  CHECK_THAT(parse_error(make_file(R"({"__metadata__":[]})", 0)), Contains("'__metadata__' is not an object"));
  // Duplicate names (and duplicate keys anywhere).
  CHECK_THAT(parse_error(make_file(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                   R"("t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                                   4)),
             Contains("key 't' appears twice"));
  CHECK_THAT(parse_error(make_file(R"({"t":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4)),
             Contains("appears twice"));
  // Nesting: 127 levels are fine (as for serde_json in the safetensors library), 128
  // are not, and 100,000 are rejected without recursion.
  auto nested = [](int arrays) {
    return R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":)" + std::string(std::size_t(arrays), '[') +
           std::string(std::size_t(arrays), ']') + "}}";
  };
  CHECK(parse_error(make_file(nested(125), 4)).empty());
  CHECK_THAT(parse_error(make_file(nested(126), 4)), Contains("nested more than 127 levels"));
  CHECK_THAT(parse_error(make_file(nested(100000), 4)), Contains("nested more than 127 levels"));
  // Hostile bytes are quoted printably in the message.
  CHECK_THAT(parse_error(make_file("{\"a\xfe\":1}", 0)), Contains("\\xfe"));
  // C1 controls (valid UTF-8, but U+009B is CSI to some terminals) as well.
  const std::string c1 = parse_error(make_file("{\"t\xc2\x9b[2J\":1}", 0));
  CHECK_THAT(c1, Contains("'t\\xc2\\x9b[2J'"));
  CHECK(c1.find("\xc2\x9b") == std::string::npos);
}

TEST_CASE("safetensors hostile input: what may surround the JSON header", "[safetensors][hostile]") {
  // The safetensors library parses the header with serde_json::from_str: JSON whitespace
  // (space, tab, CR, LF) may pad it on either side, nothing else may.
  using Catch::Contains;
  const std::string ok = R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  REQUIRE(ok.size() == 54);
  CHECK(parse_error(make_file(ok + "      ", 4)).empty());
  CHECK(parse_error(make_file(" \t\r\n" + ok + "\r\n\t ", 4)).empty());
  // A NUL byte ended nlohmann's input: "{...}\0GARBAGE" used to parse.
  const std::string garbage = std::string("\0GARBAGE", 8);
  CHECK_THAT(parse_error(make_file(ok + garbage, 4)),
             Contains("hostile.safetensors") && Contains("malformed header: NUL byte at offset 54 of the JSON text"));
  CHECK_THAT(parse_error(make_file(ok + std::string(1, '\0'), 4)), Contains("NUL byte at offset 54 "));
  CHECK_THAT(parse_error(make_file(ok + "   " + std::string(5, '\0'), 4)), Contains("NUL byte at offset 57 "));
  CHECK_THAT(parse_error(make_file(std::string(1, '\0') + ok, 4)), Contains("NUL byte at offset 0 "));
  CHECK_THAT(parse_error(make_file(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"n":"a)" +
                                       std::string(1, '\0') + "\"}",
                                   4)),
             Contains("NUL byte at offset 60 "));
  // Nor is a UTF-8 byte order mark JSON (nlohmann skipped it).
  CHECK_THAT(parse_error(make_file("\xef\xbb\xbf" + ok, 4)),
             Contains("malformed header: the JSON text starts with a UTF-8 byte order mark"));
  CHECK_THAT(parse_error(make_file(" \xef\xbb\xbf" + ok, 4)), Contains("malformed JSON"));
}

TEST_CASE("safetensors hostile input: shapes and offsets", "[safetensors][hostile]") {
  using Catch::Contains;
  auto two = [](const std::string& a, const std::string& b) {
    return std::string(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":)") + a +
           R"(},"b":{"dtype":"F32","shape":[2],"data_offsets":)" + b + "}}";
  };
  CHECK(parse_error(make_file(two("[0,8]", "[8,16]"), 16)).empty());
  CHECK(parse_error(make_file(two("[8,16]", "[0,8]"), 16)).empty());  // listing order is free
  CHECK_THAT(parse_error(make_file(two("[0,8]", "[4,12]"), 12)), Contains("overlap"));
  CHECK_THAT(parse_error(make_file(two("[0,8]", "[0,8]"), 8)), Contains("overlap"));
  CHECK_THAT(parse_error(make_file(two("[0,8]", "[12,20]"), 20)), Contains("hole of 4 bytes"));
  CHECK_THAT(parse_error(make_file(two("[4,12]", "[12,20]"), 20)), Contains("hole of 4 bytes"));
  CHECK_THAT(parse_error(make_file(two("[0,8]", "[16,8]"), 16)), Contains("end before they begin"));
  CHECK_THAT(parse_error(make_file(two("[0,8]", "[8,20]"), 20)), Contains("needs 8 bytes"));
  CHECK_THAT(parse_error(make_file(two("[0,8]", "[8,16]"), 12)), Contains("truncated"));
  CHECK_THAT(parse_error(make_file(two("[0,8]", "[8,16]"), 20)), Contains("trailing"));
  // Shape products that overflow 64 bits, and offsets far past the file.
  CHECK_THAT(
      parse_error(make_file(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0)),
      Contains("overflows"));
  CHECK_THAT(parse_error(make_file(R"({"t":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0)),
             Contains("overflows"));
  CHECK_THAT(parse_error(make_file(R"({"t":{"dtype":"U8","shape":[2],"data_offsets":[18446744073709551614,)"
                                   R"(18446744073709551615]}})",
                                   0)),
             Contains("hole"));
  CHECK_THAT(parse_error(make_file(R"({"t":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}})", 4)),
             Contains("too large"));
}

TEST_CASE("safetensors_file: errors name the file; NaN tensors read as NaN", "[safetensors][hostile]") {
  hsae_test::temp_dir tmp;
  try {
    hsae::safetensors_file f(tmp / "missing.safetensors");
    FAIL("expected an io_error");
  } catch (const hsae::io_error& e) {
    CHECK_THAT(e.what(), Catch::Contains("missing.safetensors") && Catch::Contains("cannot open"));
  }
  write_file(tmp / "empty.safetensors", {});
  CHECK_THROWS_WITH(hsae::safetensors_file(tmp / "empty.safetensors"),
                    Catch::Contains("empty.safetensors") && Catch::Contains("file too small"));
  CHECK_THROWS_AS(hsae::safetensors_file(tmp.dir), hsae::io_error);  // a directory
  // A NaN-filled tensor is a valid file: the SAE loaders (io/sae_files.hpp) reject it.
  hsae::row_matrix<float> nan = hsae::row_matrix<float>::Constant(2, 2, std::numeric_limits<float>::quiet_NaN());
  hsae::safetensors_writer w;
  w.add("nan", nan, safetensors_dtype::bf16);
  w.write(tmp / "nan.safetensors");
  const auto r = hsae::safetensors_file(tmp / "nan.safetensors").read_matrix<float>("nan");
  CHECK(r.array().isNaN().all());
}

TEST_CASE("safetensors_file: a named pipe is refused at once, not waited on", "[safetensors][hostile]") {
  hsae_test::temp_dir tmp;
  const auto fifo = tmp / "pipe.safetensors";
  const std::string msg =
      hsae_test::fifo_open_message<hsae::io_error>(fifo, [fifo] { hsae::safetensors_file f(fifo); });
  CHECK_THAT(msg, Catch::StartsWith("hsae: safetensors file '") && Catch::Contains("pipe.safetensors") &&
                      Catch::Contains("not a regular file"));
}

TEST_CASE("parse_json_strict: the document nlohmann's parser builds, with the key and depth checks",
          "[safetensors][json]") {
  using Catch::Contains;
  using hsae::detail::parse_json_strict;
  const auto fail = [](const std::string& what) { throw hsae::io_error(what); };
  const std::string doc = " {\"a\": [1, -2, 3.5e3, \"s\", true, false, null, {}, [], {\"x\": {\"y\": [[0]]}}],"
                          " \"b\": {\"c\": 18446744073709551615, \"d\": -9223372036854775808},"
                          " \"\\u00e9\": \"\\ud83d\\ude00\", \"a2\": {\"k\": 1}, \"a3\": {\"k\": 2}}\n";
  const nlohmann::json built = parse_json_strict(doc, 127, /*unique_keys=*/true, fail);
  CHECK(built == nlohmann::json::parse(doc));
  CHECK(built.dump() == nlohmann::json::parse(doc).dump());
  CHECK(parse_json_strict("42", 127, true, fail) == nlohmann::json(42));
  CHECK(parse_json_strict("\"s\"", 127, true, fail) == nlohmann::json("s"));
  // A repeated key: an error with unique_keys (in any object), else the last one wins.
  CHECK(parse_json_strict(R"({"k":1,"k":{"z":[2]}})", 127, false, fail) == nlohmann::json::parse(R"({"k":{"z":[2]}})"));
  CHECK_THROWS_WITH(parse_json_strict(R"({"o":[{"k":1,"j":0,"k":2}]})", 127, true, fail),
                    Contains("key 'k' appears twice"));
  // Depth: max_nesting levels of objects and arrays, not one more.
  CHECK_NOTHROW(parse_json_strict(R"([{"a":[]}])", 3, true, fail));
  CHECK_THROWS_WITH(parse_json_strict(R"([{"a":[{}]}])", 3, true, fail), Contains("nested more than 3 levels deep"));
  // Syntax errors stay nlohmann's exceptions (safetensors_view reports their text).
  CHECK_THROWS_AS(parse_json_strict(R"({"a":})", 127, true, fail), nlohmann::json::exception);
  CHECK_THROWS_AS(parse_json_strict("{} x", 127, true, fail), nlohmann::json::exception);
  CHECK_THROWS_AS(parse_json_strict("", 127, true, fail), nlohmann::json::exception);
  CHECK_THROWS_WITH(parse_json_strict("[1,]", 127, true, fail), Contains("parse_error"));
}

TEST_CASE("safetensors: a header of 200,000 tensors parses in linear time", "[safetensors][hostile][perf]") {
  // Empty tensors (legal): a 11.7 MB header and no data. nlohmann's callback parser, which
  // once did the duplicate-key and depth checks, took minutes here (quadratic in the tensors).
  constexpr int n = 200'000;
  std::string h = "{";
  for (int i = 0; i < n; ++i)
    h += hsae_test::numbered(i ? ",\"t" : "\"t", i, R"(":{"dtype":"F32","shape":[0,8],"data_offsets":[0,0]})");
  h += "}";
  const auto file = make_file(h, 0);
  const auto cpu_seconds = [] {
    timespec ts{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
  };
  const double cpu0 = cpu_seconds();
  const auto t0 = std::chrono::steady_clock::now();
  const hsae::safetensors_view v(file, "many.safetensors");
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double cpu = cpu_seconds() - cpu0;
  std::printf("safetensors: %d tensors, %zu header bytes parsed in %.3f s (%.3f s CPU)\n", n, h.size(), wall, cpu);
  REQUIRE(v.tensors().size() == std::size_t(n));
  CHECK(v.at("t199999").shape == std::vector<std::int64_t>{0, 8});
  CHECK(v.at("t0").nbytes() == 0);
  // The bound is on the thread's CPU time, which a busy machine does not inflate much.
  // Optimised builds take about 0.4 s; Debug + ASan/UBSan builds about 10 s.
#ifdef NDEBUG
  constexpr double limit = 1.0;
#else
  constexpr double limit = 60.0;
#endif
  CHECK(cpu < limit);
}
