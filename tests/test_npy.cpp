// SPDX-License-Identifier: Apache-2.0
// .npy reading and writing (data/npy.hpp): float16 conversions, round trips, header
// parsing, hostile files; the batch sources (data/sources.hpp): matrix_source and
// file_source epochs, shuffling, determinism, width and NaN checks.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include "fifo_util.hpp"
#include "test_util.hpp"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <csignal>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using hsae_test::numbered;
using hsae_test::temp_dir;

namespace {

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
  REQUIRE(f.good());
}

template <class V>
std::string raw_bytes(const std::vector<V>& v) {
  std::string s(v.size() * sizeof(V), '\0');
  if (!v.empty()) std::memcpy(s.data(), v.data(), s.size());
  return s;
}

/// A hand-made .npy file: magic, version, header length (u16 for v1, u32 otherwise),
/// the dict padded with spaces to a 64-byte boundary plus '\n' (unless pad = false),
/// then `data` verbatim.
std::string npy_bytes(const std::string& dict, const std::string& data, int major = 1, bool pad = true) {
  const std::size_t pre = major == 1 ? 10 : 12;
  std::string h = dict;
  if (pad) {
    const std::size_t total = pre + h.size() + 1;
    h.append((total + 63) / 64 * 64 - total, ' ');
    h += '\n';
  }
  std::string out("\x93NUMPY", 6);
  out += char(major);
  out += char(0);
  const std::size_t n = h.size();
  out += char(n & 0xff);
  out += char((n >> 8) & 0xff);
  if (major != 1) {
    out += char((n >> 16) & 0xff);
    out += char((n >> 24) & 0xff);
  }
  return out + h + data;
}

using hsae_test::message_of;

/// Reference binary16 -> double, straight from the definition.
double half_reference(std::uint16_t h) {
  const int sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (exp == 0x1f)
    v = mant == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  else if (exp == 0)
    v = std::ldexp(double(mant), -24);
  else
    v = std::ldexp(1.0 + double(mant) / 1024.0, exp - 15);
  return sign ? -v : v;
}

/// Reference round-to-nearest-even of a finite double to binary16 bits, by search over
/// the (monotonic) positive half patterns.
std::uint16_t half_round_reference(double x) {
  const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(x);
  if (a >= 65520.0) return std::uint16_t(sign | 0x7c00);
  // Largest pattern lo with value(lo) <= a.
  std::uint16_t lo = 0, hi = 0x7bff;
  while (lo < hi) {
    const auto mid = std::uint16_t((lo + hi + 1) / 2);
    if (half_reference(mid) <= a)
      lo = mid;
    else
      hi = std::uint16_t(mid - 1);
  }
  const double vlo = half_reference(lo);
  if (vlo == a) return std::uint16_t(sign | lo);
  const auto up = std::uint16_t(lo + 1);  // 0x7c00 (Inf) when lo = 0x7bff: treated as 65536
  const double vup = up == 0x7c00 ? 65536.0 : half_reference(up);
  const double dlo = a - vlo, dup = vup - a;
  std::uint16_t r;
  if (dlo < dup)
    r = lo;
  else if (dup < dlo)
    r = up;
  else
    r = (lo & 1) ? up : lo;
  return std::uint16_t(sign | r);
}

/// Matrix whose row i holds i * 16 + j + 0.25 at column j (exact in float).
hsae::row_matrix<float> ramp(Eigen::Index rows, Eigen::Index cols, float offset = 0) {
  hsae::row_matrix<float> m(rows, cols);
  for (Eigen::Index i = 0; i < rows; ++i)
    for (Eigen::Index j = 0; j < cols; ++j) m(i, j) = offset + float(i * 16 + j) + 0.25f;
  return m;
}

/// Row ids of a batch produced from files of "id rows": column 0 holds the global id,
/// column j holds id + j / 8 (checked).
template <class M>
std::vector<long> ids_of(const M& x) {
  std::vector<long> ids;
  for (Eigen::Index i = 0; i < x.rows(); ++i) {
    const long id = std::lround(double(x(i, 0)));
    for (Eigen::Index j = 0; j < x.cols(); ++j) REQUIRE(double(x(i, j)) == double(id) + double(j) / 8.0);
    ids.push_back(id);
  }
  return ids;
}

hsae::row_matrix<float> id_rows(long first, long n, Eigen::Index d) {
  hsae::row_matrix<float> m(n, d);
  for (long i = 0; i < n; ++i)
    for (Eigen::Index j = 0; j < d; ++j) m(i, j) = float(first + i) + float(j) / 8.0f;
  return m;
}

template <class Src>
std::vector<long> draw_ids(Src& src, long n, Eigen::Index batch) {
  std::vector<long> ids;
  while (long(ids.size()) < n) {
    const auto x = src.next(batch);
    REQUIRE(x.rows() == batch);
    REQUIRE(x.cols() == src.d_model());
    const auto b = ids_of(x);
    ids.insert(ids.end(), b.begin(), b.end());
  }
  ids.resize(std::size_t(n));
  return ids;
}

bool is_permutation_of_range(std::vector<long> v, long n) {
  std::sort(v.begin(), v.end());
  std::vector<long> want(static_cast<std::size_t>(n));
  std::iota(want.begin(), want.end(), 0L);
  return v == want;
}

bool numpy_available() { return std::system("python3 -c 'import numpy' > /dev/null 2>&1") == 0; }

}  // namespace

// --- float16 ---------------------------------------------------------------------------

TEST_CASE("half_to_float: spot values", "[npy][half]") {
  CHECK(hsae::half_to_float(0x3C00) == 1.0f);
  CHECK(hsae::half_to_float(0xBC00) == -1.0f);
  CHECK(hsae::half_to_float(0x4000) == 2.0f);
  CHECK(hsae::half_to_float(0x3555) == Approx(0.333251953125f).epsilon(0));
  CHECK(hsae::half_to_float(0x7BFF) == 65504.0f);
  CHECK(hsae::half_to_float(0xFBFF) == -65504.0f);
  CHECK(hsae::half_to_float(0x0400) == std::ldexp(1.0f, -14));  // smallest normal
  CHECK(hsae::half_to_float(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(hsae::half_to_float(0x03FF) == std::ldexp(1023.0f, -24));  // largest subnormal
  CHECK(hsae::half_to_float(0x8001) == -std::ldexp(1.0f, -24));
  CHECK(hsae::half_to_float(0x0000) == 0.0f);
  CHECK_FALSE(std::signbit(hsae::half_to_float(0x0000)));
  CHECK(hsae::half_to_float(0x8000) == 0.0f);
  CHECK(std::signbit(hsae::half_to_float(0x8000)));
  CHECK(hsae::half_to_float(0x7C00) == std::numeric_limits<float>::infinity());
  CHECK(hsae::half_to_float(0xFC00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(hsae::half_to_float(0x7E00)));
  CHECK(std::isnan(hsae::half_to_float(0x7C01)));
  CHECK(std::isnan(hsae::half_to_float(0xFFFF)));
  STATIC_REQUIRE(hsae::half_to_float(0x3C00) == 1.0f);
  STATIC_REQUIRE(hsae::float_to_half(1.0f) == 0x3C00);

  CHECK(hsae::float_to_half(1.0f) == 0x3C00);
  CHECK(hsae::float_to_half(65504.0f) == 0x7BFF);
  CHECK(hsae::float_to_half(65519.996f) == 0x7BFF);
  CHECK(hsae::float_to_half(65520.0f) == 0x7C00);  // the tie rounds to even: Inf
  CHECK(hsae::float_to_half(1e6f) == 0x7C00);
  CHECK(hsae::float_to_half(-1e6f) == 0xFC00);
  CHECK(hsae::float_to_half(std::ldexp(1.0f, -24)) == 0x0001);
  CHECK(hsae::float_to_half(std::ldexp(1.0f, -25)) == 0x0000);  // tie to even 0
  CHECK(hsae::float_to_half(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  CHECK(hsae::float_to_half(std::ldexp(3.0f, -25)) == 0x0002);  // 1.5 ulp: tie to even 2
  CHECK(hsae::float_to_half(1e-10f) == 0x0000);
  CHECK(hsae::float_to_half(-1e-10f) == 0x8000);
  CHECK(hsae::float_to_half(-0.0f) == 0x8000);
  CHECK(hsae::float_to_half(std::numeric_limits<float>::infinity()) == 0x7C00);
  CHECK(hsae::float_to_half(-std::numeric_limits<float>::infinity()) == 0xFC00);
  const std::uint16_t qn = hsae::float_to_half(std::numeric_limits<float>::quiet_NaN());
  CHECK((qn & 0x7C00) == 0x7C00);
  CHECK((qn & 0x03FF) != 0);
  // A float NaN whose payload lives only in the low bits stays NaN, not Inf.
  const std::uint16_t low = hsae::float_to_half(std::bit_cast<float>(0x7F800001u));
  CHECK((low & 0x7C00) == 0x7C00);
  CHECK((low & 0x03FF) != 0);
  // 1 + 2^-11 is the tie between 1 and 1 + 2^-10: even is 1.
  CHECK(hsae::float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);
  CHECK(hsae::float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);
  // Largest subnormal rounding up into the smallest normal.
  CHECK(hsae::float_to_half(std::ldexp(1023.5f, -24)) == 0x0400);
}

TEST_CASE("half_to_float: all 65536 patterns", "[npy][half]") {
  long nan_count = 0;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto h = std::uint16_t(b);
    const float f = hsae::half_to_float(h);
    const double ref = half_reference(h);
    if (std::isnan(ref)) {
      ++nan_count;
      if (!std::isnan(f)) FAIL("pattern " << b << " should be NaN");
      // NaN stays NaN on the way back, keeping sign and payload.
      const std::uint16_t back = hsae::float_to_half(f);
      if (back != h) FAIL("NaN pattern " << b << " came back as " << back);
      continue;
    }
    if (double(f) != ref || std::signbit(f) != std::signbit(ref))
      FAIL("pattern " << b << ": got " << f << ", expected " << ref);
    const std::uint16_t back = hsae::float_to_half(f);
    if (back != h) FAIL("pattern " << b << " round-trips to " << back);
    // The double path agrees.
    if (hsae::double_to_half(double(f)) != h) FAIL("double_to_half of pattern " << b);
  }
  CHECK(nan_count == 2 * 1023);
}

TEST_CASE("float_to_half / double_to_half: round to nearest even at every boundary", "[npy][half]") {
  // For every pair of adjacent positive halves: the midpoint (a tie), and the floats and
  // doubles just around it; and values just around each half itself.
  long checked = 0;
  for (std::uint32_t b = 0; b < 0x7BFF + 1; ++b) {
    const double v = half_reference(std::uint16_t(b));
    const double up = b == 0x7BFF ? 65536.0 : half_reference(std::uint16_t(b + 1));
    const double mid = (v + up) / 2;  // exact in float and double
    const float fm = float(mid);
    REQUIRE(double(fm) == mid);
    const float fcases[] = {fm, std::nextafter(fm, 0.0f), std::nextafter(fm, 1e30f), float(v),
                            std::nextafter(float(v), 1e30f), std::nextafter(float(v), 0.0f)};
    for (const float f : fcases) {
      for (const float s : {f, -f}) {
        const std::uint16_t got = hsae::float_to_half(s), want = half_round_reference(double(s));
        if (got != want) FAIL("float_to_half(" << double(s) << ") = " << got << ", expected " << want);
        ++checked;
      }
    }
    // Doubles within a float ulp of the tie: rounding through float first would lose them.
    const double tiny = std::ldexp(mid == 0 ? 1.0 : mid, -40);
    const double dcases[] = {mid, mid + tiny, mid - tiny, std::nextafter(mid, 0.0), std::nextafter(mid, 1e300)};
    for (const double d : dcases) {
      for (const double s : {d, -d}) {
        const std::uint16_t got = hsae::double_to_half(s), want = half_round_reference(s);
        if (got != want) FAIL("double_to_half(" << s << ") = " << got << ", expected " << want);
        ++checked;
      }
    }
  }
  // Random floats and doubles over the whole half range and beyond.
  hsae::rng gen(7);
  for (int i = 0; i < 200000; ++i) {
    const double e = -30 + 48 * gen.uniform();
    const double d = (gen.uniform() < 0.5 ? -1 : 1) * std::exp2(e);
    const float f = float(d);
    if (hsae::float_to_half(f) != half_round_reference(double(f))) FAIL("float_to_half(" << f << ")");
    if (hsae::double_to_half(d) != half_round_reference(d)) FAIL("double_to_half(" << d << ")");
    checked += 2;
  }
  CHECK(checked > 600000);
  CHECK(hsae::double_to_half(1e300) == 0x7C00);
  CHECK(hsae::double_to_half(-1e-300) == 0x8000);
  CHECK(hsae::double_to_half(65519.999999) == 0x7BFF);
  CHECK(hsae::double_to_half(65520.0) == 0x7C00);
  CHECK(std::isnan(hsae::half_to_float(hsae::double_to_half(std::numeric_limits<double>::quiet_NaN()))));
}

// --- npy_file / write_npy round trips --------------------------------------------------------

TEST_CASE("write_npy / npy_file round trips", "[npy]") {
  temp_dir tmp;
  const auto m = ramp(37, 11);

  SECTION("f32: exact, read as float and double") {
    hsae::write_npy(tmp / "a.npy", m, hsae::npy_dtype::f32);
    CHECK_FALSE(fs::exists(tmp.dir / numbered("a.npy.tmp.", long(::getpid()), "")));
    const hsae::npy_file f(tmp / "a.npy");
    CHECK(f.rows() == 37);
    CHECK(f.cols() == 11);
    CHECK(f.dtype() == hsae::npy_dtype::f32);
    CHECK(f.major_version() == 1);
    CHECK(f.shape() == std::vector<std::int64_t>{37, 11});
    CHECK(f.path() == tmp / "a.npy");
    CHECK(f.data_offset() % 64 == 0);
    CHECK(f.file_size() == f.data_offset() + 37 * 11 * 4);
    CHECK(f.read_all<float>() == m);
    CHECK(f.read_all<double>() == m.cast<double>());
    std::vector<float> row(11);
    f.read_row(36, row.data());
    for (int j = 0; j < 11; ++j) CHECK(row[std::size_t(j)] == m(36, j));
    const auto block = f.read_rows<float>(5, 3);
    CHECK(block == m.middleRows(5, 3));
    CHECK_THROWS_AS(f.read_rows<float>(35, 3), hsae::shape_error);
    CHECK_THROWS_AS(f.read_rows<float>(-1, 1), hsae::shape_error);
    CHECK(f.read_rows<float>(37, 0).rows() == 0);
  }
  SECTION("f64: exact both ways") {
    hsae::row_matrix<double> d = m.cast<double>();
    d(3, 4) = 1.0 / 3.0;
    hsae::write_npy(tmp / "d.npy", d, hsae::npy_dtype::f64);
    const hsae::npy_file f(tmp / "d.npy");
    CHECK(f.dtype() == hsae::npy_dtype::f64);
    CHECK(f.read_all<double>() == d);
    CHECK(f.read_all<float>() == d.cast<float>());
  }
  SECTION("f16: values round to nearest half") {
    hsae::row_matrix<float> h(4, 5);
    h << 1.0f, -2.5f, 65504.0f, 1e6f, std::ldexp(1.0f, -24),  //
        0.1f, 0.2f, 0.3f, -0.0f, 3.14159f,                     //
        1000.7f, -65519.0f, 1e-9f, 0.5f, 7.0f,                 //
        2049.0f, 2051.0f, 4097.0f, -1.0f / 3.0f, 12345.678f;
    hsae::write_npy(tmp / "h.npy", h, hsae::npy_dtype::f16);
    const hsae::npy_file f(tmp / "h.npy");
    CHECK(f.dtype() == hsae::npy_dtype::f16);
    CHECK(f.file_size() == f.data_offset() + 20 * 2);
    const auto back = f.read_all<float>();
    for (Eigen::Index i = 0; i < h.rows(); ++i)
      for (Eigen::Index j = 0; j < h.cols(); ++j) {
        INFO("entry " << i << ", " << j);
        const float want = hsae::half_to_float(hsae::float_to_half(h(i, j)));
        CHECK(std::bit_cast<std::uint32_t>(back(i, j)) == std::bit_cast<std::uint32_t>(want));
      }
    CHECK(back(0, 3) == std::numeric_limits<float>::infinity());
    CHECK(back(0, 4) == std::ldexp(1.0f, -24));
    CHECK(back(3, 0) == 2048.0f);  // tie to even
    CHECK(back(3, 1) == 2052.0f);  // tie to even
    CHECK(back(3, 2) == 4096.0f);
    CHECK(std::signbit(back(1, 3)));
    // From double: no double rounding.
    hsae::row_matrix<double> dd(1, 2);
    dd << 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40), 1.0 + std::ldexp(1.0, -11);
    hsae::write_npy(tmp / "hd.npy", dd, hsae::npy_dtype::f16);
    const auto bd = hsae::npy_file(tmp / "hd.npy").read_all<double>();
    CHECK(bd(0, 0) == 1.0 + std::ldexp(1.0, -10));
    CHECK(bd(0, 1) == 1.0);
  }
  SECTION("leading shapes flatten to [N, D]") {
    const auto src = ramp(6, 5);
    const std::int64_t shape3[] = {2, 3, 5};
    for (const auto dt : {hsae::npy_dtype::f16, hsae::npy_dtype::f32, hsae::npy_dtype::f64}) {
      INFO("dtype " << hsae::npy_descr(dt));
      hsae::write_npy(tmp / "s.npy", src.data(), std::span<const std::int64_t>(shape3), dt);
      const hsae::npy_file f(tmp / "s.npy");
      CHECK(f.shape() == std::vector<std::int64_t>{2, 3, 5});
      CHECK(f.rows() == 6);
      CHECK(f.cols() == 5);
      CHECK(f.read_all<float>() == src);  // small integers + 0.25: exact in half too
      CHECK(f.read_all<double>() == src.cast<double>());
    }
    // 1-D: one row.
    const std::int64_t shape1[] = {5};
    hsae::write_npy(tmp / "v.npy", src.data(), std::span<const std::int64_t>(shape1), hsae::npy_dtype::f32);
    const hsae::npy_file v(tmp / "v.npy");
    CHECK(v.rows() == 1);
    CHECK(v.cols() == 5);
    CHECK(v.read_all<float>() == src.topRows(1));
    // 4-D.
    const std::int64_t shape4[] = {1, 2, 3, 5};
    hsae::write_npy(tmp / "q.npy", src.data(), std::span<const std::int64_t>(shape4), hsae::npy_dtype::f32);
    CHECK(hsae::npy_file(tmp / "q.npy").read_all<float>() == src);
  }
  SECTION("pointer overload, overwrite in place, move semantics") {
    hsae::write_npy(tmp / "p.npy", m.data(), 37, 11, hsae::npy_dtype::f32);
    const auto m2 = ramp(3, 11, 100.0f);
    hsae::write_npy(tmp / "p.npy", m2);  // default dtype f32, replaces atomically
    hsae::npy_file a(tmp / "p.npy");
    CHECK(a.read_all<float>() == m2);
    hsae::npy_file b(std::move(a));
    CHECK(b.rows() == 3);
    CHECK(b.read_all<float>() == m2);
    hsae::write_npy(tmp / "r.npy", m);
    hsae::npy_file c(tmp / "r.npy");
    c = std::move(b);
    CHECK(c.read_all<float>() == m2);
    std::vector<hsae::npy_file> v;
    for (int i = 0; i < 20; ++i) v.emplace_back(tmp / "r.npy");
    CHECK(v.front().read_all<float>() == m);
    CHECK(v.back().rows() == 37);
  }
  SECTION("write into a missing directory fails with io_error") {
    const auto msg = message_of<hsae::io_error>([&] { hsae::write_npy(tmp / "nope/x.npy", m); });
    CHECK_THAT(msg, Catch::Contains("x.npy") && Catch::Contains("cannot create"));
  }
}

TEST_CASE("npy_file: header variants", "[npy]") {
  temp_dir tmp;
  const std::vector<float> vals{1, 2, 3, 4, 5, 6};
  const auto data = raw_bytes(vals);
  const auto check_2x3 = [&](const fs::path& p) {
    const hsae::npy_file f(p);
    REQUIRE(f.rows() == 2);
    REQUIRE(f.cols() == 3);
    hsae::row_matrix<float> want(2, 3);
    want << 1, 2, 3, 4, 5, 6;
    CHECK(f.read_all<float>() == want);
  };
  SECTION("version 2.0 and 3.0 (u32 header length)") {
    for (const int v : {2, 3}) {
      const auto p = tmp / numbered("v", v, ".npy");
      write_bytes(p, npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", data, v));
      check_2x3(p);
      CHECK(hsae::npy_file(p).major_version() == v);
    }
  }
  SECTION("key order, whitespace, quotes, trailing commas, Python 2 longs, byte-order markers") {
    const std::vector<std::string> dicts{
        "{'shape': (2, 3), 'fortran_order': False, 'descr': '<f4'}",
        "{ 'fortran_order' :False ,'descr':'<f4','shape':( 2 ,3 , ) , }",
        "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": [2, 3]}",
        "{'descr': '|f4', 'fortran_order': False, 'shape': (2L, 3L), }",
        "{'descr': '=f4',\n\t'fortran_order': False,\r\n 'shape': (2, 3)}",
        "{'descr':'<f4','fortran_order':False,'shape':(2,3)}",
        "{'descr': 'f4', 'fortran_order': False, 'shape': (2, 3), }",
    };
    int i = 0;
    for (const auto& d : dicts) {
      INFO(d);
      const auto p = tmp / numbered("k", i++, ".npy");
      write_bytes(p, npy_bytes(d, data));
      check_2x3(p);
    }
  }
  SECTION("unaligned data offset, no trailing newline") {
    const auto p = tmp / "odd.npy";
    write_bytes(p, npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}", data, 1, false));
    const hsae::npy_file f(p);
    CHECK(f.data_offset() % 4 != 0);
    check_2x3(p);
    // float16 and float64 unaligned as well.
    std::vector<std::uint16_t> hv{0x3C00, 0x4000, 0x4200, 0x4400, 0x4500, 0x4600};
    write_bytes(tmp / "odd16.npy",
                npy_bytes("{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3)}", raw_bytes(hv), 1, false));
    check_2x3(tmp / "odd16.npy");
    std::vector<double> dv{1, 2, 3, 4, 5, 6};
    write_bytes(tmp / "odd64.npy",
                npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (6,)}", raw_bytes(dv), 1, false));
    const hsae::npy_file f64(tmp / "odd64.npy");
    CHECK(f64.rows() == 1);
    CHECK(f64.read_all<double>() == Eigen::RowVectorXd::LinSpaced(6, 1, 6));
  }
  SECTION("fortran_order True is fine for 1-D") {
    const auto p = tmp / "f1.npy";
    write_bytes(p, npy_bytes("{'descr': '<f4', 'fortran_order': True, 'shape': (6,), }", data));
    const hsae::npy_file f(p);
    CHECK(f.rows() == 1);
    CHECK(f.cols() == 6);
    CHECK(f.read_all<float>()(0, 5) == 6.0f);
  }
}

TEST_CASE("npy_file: hostile files raise io_error naming the file and the problem", "[npy][errors]") {
  temp_dir tmp;
  const std::string good_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  const auto data = raw_bytes(std::vector<float>{1, 2, 3, 4, 5, 6});
  int counter = 0;
  // Writes `bytes` to a fresh file and returns the exception message of opening it.
  const auto open_msg = [&](const std::string& bytes) {
    const std::string name = numbered("hostile_", counter++, ".npy");
    write_bytes(tmp / name, bytes);
    const std::string msg = message_of<hsae::io_error>([&] { hsae::npy_file f(tmp / name); });
    CHECK_THAT(msg, Catch::StartsWith("hsae: ") && Catch::Contains(name));
    return msg;
  };
  using Catch::Contains;

  // Sanity: the good file opens.
  write_bytes(tmp / "good.npy", npy_bytes(good_dict, data));
  CHECK_NOTHROW(hsae::npy_file(tmp / "good.npy"));

  SECTION("missing file, directory") {
    CHECK_THAT(message_of<hsae::io_error>([&] { hsae::npy_file f(tmp / "missing.npy"); }),
               Contains("missing.npy") && Contains("cannot open"));
    fs::create_directories(tmp / "adir.npy");
    CHECK_THAT(message_of<hsae::io_error>([&] { hsae::npy_file f(tmp / "adir.npy"); }),
               Contains("adir.npy") && Contains("not a regular file"));
  }
  SECTION("too small for the magic") {
    CHECK_THAT(open_msg(""), Contains("too small"));
    CHECK_THAT(open_msg(std::string("\x93NUMPY\x01", 7)), Contains("too small"));
    CHECK_THAT(open_msg(std::string("\x93NUMPY\x01\x00\x00", 9)), Contains("too small"));
    CHECK_THAT(open_msg(std::string("\x93NUMPY\x02\x00\x00\x00\x00", 11)), Contains("too small"));
  }
  SECTION("bad magic") {
    auto b = npy_bytes(good_dict, data);
    b[1] = 'n';
    CHECK_THAT(open_msg(b), Contains("bad magic"));
    CHECK_THAT(open_msg("PK\x03\x04 this is a zip file, not npy"), Contains("bad magic"));
  }
  SECTION("unsupported version") {
    auto b = npy_bytes(good_dict, data);
    b[6] = 4;
    CHECK_THAT(open_msg(b), Contains("unsupported format version") && Contains("4.0"));
    b[6] = 1;
    b[7] = 1;
    CHECK_THAT(open_msg(b), Contains("unsupported format version") && Contains("1.1"));
    b[6] = 0;
    b[7] = 0;
    CHECK_THAT(open_msg(b), Contains("unsupported format version"));
  }
  SECTION("header length beyond the file") {
    auto b = npy_bytes(good_dict, data);
    b[8] = char(0xff);
    b[9] = char(0xff);
    CHECK_THAT(open_msg(b), Contains("header length") && Contains("beyond the end"));
    auto b2 = npy_bytes(good_dict, data, 2);
    b2[11] = 0x7f;
    CHECK_THAT(open_msg(b2), Contains("header length") && Contains("beyond the end"));
    // Header that fits but eats the data: a size mismatch, not a crash.
    CHECK_THAT(open_msg(npy_bytes(good_dict, "", 1)), Contains("truncated"));
  }
  SECTION("malformed header dict") {
    const std::vector<std::string> bad{
        "'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}",    // no '{'
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)",     // no '}'
        "{'descr' '<f4', 'fortran_order': False, 'shape': (2, 3)}",     // no ':'
        "{'descr': '<f4 , 'fortran_order': False, 'shape': (2, 3)}",    // unterminated string
        "{'descr': '<f4', 'fortran_order': False}",                     // missing shape
        "{'descr': '<f4', 'shape': (2, 3)}",                            // missing fortran_order
        "{'fortran_order': False, 'shape': (2, 3)}",                    // missing descr
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 'x')}",  // non-integer dim
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3)}",   // negative dim
        "{'descr': '<f4', 'fortran_order': False, 'shape': 6}",         // not a tuple
        "{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3)}",        // not a bool
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} x",  // trailing garbage
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2 3)}",     // missing comma
        "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}",  // duplicate
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'extra': 1}",      // unknown key
        "{'descr': '<f4', 'fortran_order': Falsey, 'shape': (2, 3)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999, 3)}",
        "",
        "{",
    };
    for (const auto& d : bad) {
      INFO(d);
      CHECK_THAT(open_msg(npy_bytes(d, data)), Contains("malformed header"));
    }
  }
  SECTION("unknown or unsupported dtype") {
    CHECK_THAT(open_msg(npy_bytes("{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }", data)),
               Contains("unknown dtype") && Contains("'<i4'"));
    CHECK_THAT(open_msg(npy_bytes("{'descr': '<c8', 'fortran_order': False, 'shape': (3,), }", data)),
               Contains("unknown dtype") && Contains("'<c8'"));
    CHECK_THAT(open_msg(npy_bytes("{'descr': '<f16', 'fortran_order': False, 'shape': (1,), }", data)),
               Contains("unknown dtype") && Contains("'<f16'"));
    CHECK_THAT(open_msg(npy_bytes("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (6,), }", data)),
               Contains("unsupported dtype"));
  }
  SECTION("big-endian") {
    CHECK_THAT(open_msg(npy_bytes("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", data)),
               Contains("big-endian not supported"));
    CHECK_THAT(open_msg(npy_bytes("{'descr': '>f2', 'fortran_order': False, 'shape': (2, 6), }", data)),
               Contains("big-endian not supported"));
  }
  SECTION("fortran order") {
    CHECK_THAT(open_msg(npy_bytes("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", data)),
               Contains("fortran_order"));
  }
  SECTION("data size: truncated or trailing") {
    CHECK_THAT(open_msg(npy_bytes(good_dict, data.substr(0, 23))),
               Contains("data size mismatch") && Contains("truncated") && Contains("24 bytes"));
    CHECK_THAT(open_msg(npy_bytes(good_dict, data + "x")),
               Contains("data size mismatch") && Contains("trailing data"));
    CHECK_THAT(open_msg(npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", data)),
               Contains("truncated"));
    CHECK_THAT(open_msg(npy_bytes("{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), }", data)),
               Contains("trailing data"));
  }
  SECTION("zero dimension, 0-d, absurdly large shape") {
    CHECK_THAT(open_msg(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }", "")),
               Contains("zero dimension"));
    CHECK_THAT(open_msg(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 0), }", "")),
               Contains("zero dimension"));
    CHECK_THAT(open_msg(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", data.substr(0, 4))),
               Contains("0-d"));
    CHECK_THAT(open_msg(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 2), }",
                                  data)),
               Contains("too large"));
  }
}

TEST_CASE("npy_file: the mapping contract (replace by rename: safe; truncate in place: SIGBUS)", "[npy]") {
  // npy_file memory-maps the file (the choice over pread is measured in bench/bench_io.cpp).
  // Its documented contract, pinned here: a reader keeps the contents of a file replaced by
  // rename, and a file truncated under a reader is a fatal SIGBUS, not an exception.
  temp_dir tmp;
  const auto p = tmp / "mapped.npy";
  const auto m = ramp(4096, 64);  // 1 MiB of data: many pages
  hsae::write_npy(p, m);
  SECTION("replaced by rename") {
    const hsae::npy_file f(p);
    hsae::write_npy(p, ramp(3, 64, 100.0f));  // temporary file + rename
    CHECK(f.read_all<float>() == m);
    CHECK(hsae::npy_file(p).rows() == 3);
  }
  SECTION("truncated in place") {
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {  // the child reads; no Catch assertions here
      const int null_fd = ::open("/dev/null", O_WRONLY);
      if (null_fd >= 0) ::dup2(null_fd, 2);  // a sanitizer's report of the fault, not wanted in the log
      try {
        const hsae::npy_file f(p);
        if (::truncate(p.c_str(), off_t(f.data_offset())) != 0) ::_exit(3);
        std::vector<float> row(64);
        f.read_rows(4095, 1, row.data());  // a page past the new end
        ::_exit(0);                        // no fault: the contract (and the docs) changed
      } catch (...) {
        ::_exit(4);
      }
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    INFO("child status " << status);
    const bool sigbus = WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS;
    const bool sanitizer_reported = WIFEXITED(status) && WEXITSTATUS(status) == 1;  // ASan catches the SIGBUS
    CHECK((sigbus || sanitizer_reported));
  }
}

TEST_CASE("npy_file: bytes quoted from the header are escaped in messages", "[npy][errors]") {
  // An ANSI escape in a header once reached the terminal through the error message.
  temp_dir tmp;
  using Catch::Contains;
  const auto data = raw_bytes(std::vector<float>{1, 2, 3, 4, 5, 6});
  int counter = 0;
  const auto open_msg = [&](const std::string& dict) {
    const std::string name = numbered("esc_", counter++, ".npy");
    write_bytes(tmp / name, npy_bytes(dict, data));
    return message_of<hsae::io_error>([&] { hsae::npy_file f(tmp / name); });
  };
  const auto raw_control = [](const std::string& m) {
    return std::any_of(m.begin(), m.end(), [](char ch) {
      const auto c = static_cast<unsigned char>(ch);
      return c < 0x20 || c == 0x7f;
    });
  };
  // A value quoted by the dtype check.
  const std::string m1 = open_msg("{'descr': '\x1b[2J\x1b[31m<i4\x07', 'fortran_order': False, 'shape': (2, 3), }");
  CHECK_THAT(m1, Contains("unknown dtype '\\x1b[2J\\x1b[31m<i4\\x07'"));
  CHECK_FALSE(raw_control(m1));
  // The whole header text, quoted by the dict parser (its padding newline included).
  const std::string m2 = open_msg("{'descr': '<f4', \x1b]0;title\x07 'fortran_order': False, 'shape': (2, 3), }");
  CHECK_THAT(m2, Contains("malformed header: unexpected character") && Contains("\\x1b]0;title\\x07") &&
                     Contains("\\x0a\""));
  CHECK_FALSE(raw_control(m2));
  // A key: C0 and DEL, a C1 control (U+009B, CSI) and a lone invalid byte.
  const std::string m3 =
      open_msg("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'k\x1b\x7f\xc2\x9b\xff\t\r': 1}");
  CHECK_THAT(m3, Contains("unexpected key 'k\\x1b\\x7f\\xc2\\x9b\\xff\\x09\\x0d'"));
  CHECK_FALSE(raw_control(m3));
  CHECK(m3.find("\xc2\x9b") == std::string::npos);
  // Valid UTF-8 text stays as it is.
  CHECK_THAT(open_msg("{'descr': '<f4\xc3\xa9', 'fortran_order': False, 'shape': (2, 3), }"),
             Contains("unknown dtype '<f4\xc3\xa9'"));
  // A long header (format 2.0: up to 4 GiB) is quoted around the offset, not whole.
  {
    const std::string dict = "{'descr': '<f4', 'fortran_order': False," + std::string(200000, ' ') + "@ 'shape': (2, 3), }";
    write_bytes(tmp / "long.npy", npy_bytes(dict, data, 2));
    const std::string m = message_of<hsae::io_error>([&] { hsae::npy_file f(tmp / "long.npy"); });
    CHECK_THAT(m, Contains("unexpected character at offset 200040 in \"...") && Contains("@ 'shape': (2, 3), }"));
    CHECK(m.size() < 600);
  }
  // The file's name.
  const std::string m4 = message_of<hsae::io_error>([&] { hsae::npy_file f(tmp / "evil\x1b[2J.npy"); });
  CHECK_THAT(m4, Contains("evil\\x1b[2J.npy") && Contains("cannot open"));
  CHECK_FALSE(raw_control(m4));
}

TEST_CASE("npy_file: a named pipe is refused at once, not waited on", "[npy][errors]") {
  temp_dir tmp;
  const fs::path fifo = tmp / "pipe.npy";
  const std::string msg = hsae_test::fifo_open_message<hsae::io_error>(fifo, [fifo] { hsae::npy_file f(fifo); });
  CHECK_THAT(msg, Catch::StartsWith("hsae: npy file '") && Catch::Contains("pipe.npy") &&
                      Catch::Contains("not a regular file"));
}

// --- numpy cross-check (optional) ---------------------------------------------------------

TEST_CASE("npy files agree with numpy (when numpy is installed)", "[npy][numpy]") {
  if (!numpy_available()) {
    WARN("python3 with numpy not importable: skipping the numpy cross-check");
    CHECK_FALSE(numpy_available());
    return;
  }
  temp_dir tmp;
  const std::string d = tmp.dir.string();
  // numpy writes; we read.
  const std::string py_write =
      "import numpy as np\n"
      "d='" + d + "'\n"
      "a=(np.arange(2*3*5, dtype=np.float64).reshape(2,3,5)*0.75-3)\n"
      "np.save(d+'/np32.npy', a.astype(np.float32))\n"
      "np.save(d+'/np16.npy', a.astype(np.float16))\n"
      "np.save(d+'/np64.npy', a)\n"
      "with open(d+'/np32v2.npy','wb') as f: np.lib.format.write_array(f, a.astype(np.float32), version=(2,0))\n"
      "np.save(d+'/npbig.npy', a.astype('>f4'))\n"
      "np.save(d+'/npfort.npy', np.asfortranarray(a[0]))\n"
      "np.save(d+'/npint.npy', np.arange(6, dtype=np.int32))\n";
  {
    std::ofstream(tmp / "w.py") << py_write;
  }
  REQUIRE(std::system(("python3 '" + (tmp / "w.py").string() + "'").c_str()) == 0);
  hsae::row_matrix<double> want(6, 5);
  for (int i = 0; i < 30; ++i) want(i / 5, i % 5) = i * 0.75 - 3;
  for (const char* name : {"np32.npy", "np16.npy", "np64.npy", "np32v2.npy"}) {
    INFO(name);
    const hsae::npy_file f(tmp / name);
    CHECK(f.rows() == 6);
    CHECK(f.cols() == 5);
    CHECK(f.read_all<double>() == want);  // multiples of 0.75 in [-3, 19]: exact in half
  }
  CHECK(hsae::npy_file(tmp / "np32v2.npy").major_version() == 2);
  CHECK_THROWS_WITH(hsae::npy_file(tmp / "npbig.npy"), Catch::Contains("big-endian not supported"));
  CHECK_THROWS_WITH(hsae::npy_file(tmp / "npfort.npy"), Catch::Contains("fortran_order"));
  CHECK_THROWS_WITH(hsae::npy_file(tmp / "npint.npy"), Catch::Contains("unknown dtype"));

  // We write; numpy reads, and checks our float16 rounding (from float and from double)
  // bit for bit against its own.
  hsae::rng gen(3);
  hsae::row_matrix<double> x(64, 33);
  for (Eigen::Index i = 0; i < x.rows(); ++i)
    for (Eigen::Index j = 0; j < x.cols(); ++j)
      x(i, j) = (gen.uniform() < 0.5 ? -1 : 1) * std::exp2(-28 + 46 * gen.uniform());
  x(0, 0) = 65520.0;
  x(0, 1) = 2049.0;
  x(0, 2) = std::ldexp(1.0, -25);
  x(0, 3) = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);  // double-rounding trap
  const hsae::row_matrix<float> xf = x.cast<float>();
  hsae::write_npy(tmp / "ours32.npy", xf, hsae::npy_dtype::f32);
  hsae::write_npy(tmp / "ours16f.npy", xf, hsae::npy_dtype::f16);
  hsae::write_npy(tmp / "ours64.npy", x, hsae::npy_dtype::f64);
  hsae::write_npy(tmp / "ours16d.npy", x, hsae::npy_dtype::f16);
  const std::string py_read =
      "import numpy as np, warnings\n"
      "warnings.simplefilter('ignore')\n"
      "d='" + d + "'\n"
      "a=np.load(d+'/ours32.npy'); h=np.load(d+'/ours16f.npy')\n"
      "b=np.load(d+'/ours64.npy'); g=np.load(d+'/ours16d.npy')\n"
      "assert a.dtype==np.float32 and h.dtype==np.float16 and b.dtype==np.float64 and g.dtype==np.float16\n"
      "assert a.shape==(64,33) and h.shape==(64,33) and b.shape==(64,33) and g.shape==(64,33)\n"
      "assert (a.astype(np.float16).view(np.uint16)==h.view(np.uint16)).all(), 'f16 from float'\n"
      "assert (b.astype(np.float16).view(np.uint16)==g.view(np.uint16)).all(), 'f16 from double'\n"
      "assert (b.astype(np.float32)==a).all()\n";
  {
    std::ofstream(tmp / "r.py") << py_read;
  }
  CHECK(std::system(("python3 '" + (tmp / "r.py").string() + "'").c_str()) == 0);
}

// --- sources ----------------------------------------------------------------------------------

TEST_CASE("batch_source concept", "[sources]") {
  STATIC_REQUIRE(hsae::batch_source<hsae::matrix_source<float>, float>);
  STATIC_REQUIRE(hsae::batch_source<hsae::matrix_source<double>, double>);
  STATIC_REQUIRE(hsae::batch_source<hsae::file_source<float>, float>);
  STATIC_REQUIRE(hsae::batch_source<hsae::file_source<double>, double>);
  STATIC_REQUIRE(hsae::batch_source<hsae::synthetic_source<float>, float>);
  STATIC_REQUIRE_FALSE(hsae::batch_source<hsae::matrix_source<float>, double>);
  STATIC_REQUIRE_FALSE(hsae::batch_source<int, float>);
  STATIC_REQUIRE_FALSE(hsae::batch_source<hsae::npy_file, float>);
}

TEST_CASE("matrix_source: epochs, shuffling, determinism", "[sources]") {
  const long n = 23;
  const auto data = id_rows(0, n, 4);
  SECTION("every row once per epoch, batches straddling epochs") {
    hsae::matrix_source<float> src(data, 5);
    CHECK(src.d_model() == 4);
    CHECK(src.rows_total() == n);
    CHECK(src.epoch() == 0);
    const auto e0 = draw_ids(src, n, 1);
    CHECK(src.epoch() == 1);
    CHECK(src.rows_served() == n);
    CHECK(is_permutation_of_range(e0, n));
    CHECK_FALSE(std::is_sorted(e0.begin(), e0.end()));
    // Batch of 7 (23 is not a multiple): two more epochs plus change.
    const auto more = draw_ids(src, 2 * n + 5, 7);
    CHECK(src.epoch() == 3);
    CHECK(src.rows_served() == n + 8 * 7);  // 8 batches of 7 cover 2n + 5
    CHECK(is_permutation_of_range(std::vector<long>(more.begin(), more.begin() + n), n));
    CHECK(is_permutation_of_range(std::vector<long>(more.begin() + n, more.begin() + 2 * n), n));
    CHECK(std::vector<long>(more.begin(), more.begin() + n) != e0);  // a fresh permutation
  }
  SECTION("no shuffle: in order, wrapping") {
    hsae::matrix_source<float> src(data, 5, false);
    const auto ids = draw_ids(src, 2 * n, 5);
    for (long i = 0; i < 2 * n; ++i) CHECK(ids[std::size_t(i)] == i % n);
    CHECK(src.epoch() == 2);
  }
  SECTION("deterministic for a seed") {
    hsae::matrix_source<float> a(data, 9), b(data, 9), c(data, 10);
    const auto ia = draw_ids(a, 3 * n, 4), ib = draw_ids(b, 3 * n, 4), ic = draw_ids(c, 3 * n, 4);
    CHECK(ia == ib);
    CHECK(ia != ic);
  }
  SECTION("double, zero rows, errors") {
    hsae::matrix_source<double> src(data.cast<double>(), 1);
    hsae::row_matrix<double> x;
    src.next(0, x);
    CHECK(x.rows() == 0);
    CHECK(x.cols() == 4);
    CHECK(src.rows_served() == 0);
    CHECK_THROWS_AS(src.next(-1, x), hsae::config_error);
    CHECK_THROWS_AS(hsae::matrix_source<float>(hsae::row_matrix<float>(0, 4)), hsae::config_error);
  }
}

TEST_CASE("file_source: epochs over several files", "[sources][npy]") {
  temp_dir tmp;
  const Eigen::Index d = 3;
  // Three files, 37 + 50 + 13 = 100 rows; ids 0..99 in stream order.
  hsae::write_npy(tmp / "a.npy", id_rows(0, 37, d), hsae::npy_dtype::f32);
  hsae::write_npy(tmp / "b.npy", id_rows(37, 50, d), hsae::npy_dtype::f32);
  hsae::write_npy(tmp / "c.npy", id_rows(87, 13, d), hsae::npy_dtype::f32);
  const std::vector<fs::path> files{tmp / "a.npy", tmp / "b.npy", tmp / "c.npy"};
  const long n = 100;

  SECTION("sequential: buffer 0 or 1, files in order") {
    for (const std::size_t buf : {std::size_t(0), std::size_t(1)}) {
      for (const std::size_t chunk : {std::size_t(1), std::size_t(6), std::size_t(4096)}) {
        INFO("buffer " << buf << ", chunk " << chunk);
        hsae::file_source_options o;
        o.shuffle_buffer_rows = buf;
        o.shuffle_files = false;
        o.read_chunk_rows = chunk;
        hsae::file_source<float> src(files, o);
        CHECK(src.rows_total() == n);
        CHECK(src.d_model() == d);
        const auto ids = draw_ids(src, 2 * n + 1, 3);  // 3 does not divide 100
        for (long i = 0; i < 2 * n + 1; ++i) REQUIRE(ids[std::size_t(i)] == i % n);
        CHECK(src.epoch() == 2);
        CHECK(src.rows_served() == 3 * 67);
      }
    }
  }
  SECTION("every row exactly once per epoch, any buffer, chunk and file order") {
    for (const std::size_t buf : {std::size_t(0), std::size_t(2), std::size_t(16), std::size_t(99),
                                  std::size_t(100), std::size_t(1) << 16}) {
      for (const std::size_t chunk : {std::size_t(1), std::size_t(7), std::size_t(4096)}) {
        for (const bool shuffle_files : {false, true}) {
          INFO("buffer " << buf << ", chunk " << chunk << ", shuffle_files " << shuffle_files);
          hsae::file_source_options o;
          o.shuffle_buffer_rows = buf;
          o.read_chunk_rows = chunk;
          o.shuffle_files = shuffle_files;
          o.seed = 42;
          hsae::file_source<float> src(files, o);
          const auto ids = draw_ids(src, 3 * n, 8);
          for (int e = 0; e < 3; ++e)
            REQUIRE(is_permutation_of_range(std::vector<long>(ids.begin() + e * n, ids.begin() + (e + 1) * n), n));
          CHECK(src.epoch() == 3);
          if (buf >= 16) CHECK_FALSE(std::is_sorted(ids.begin(), ids.begin() + n));
        }
      }
    }
  }
  SECTION("shuffle_files alone permutes whole files") {
    hsae::file_source_options o;
    o.shuffle_buffer_rows = 0;
    o.shuffle_files = true;
    o.seed = 3;
    hsae::file_source<float> src(files, o);
    bool saw_other_order = false;
    for (int e = 0; e < 8; ++e) {
      const auto ids = draw_ids(src, n, 10);
      // Rows of each file come contiguously and in file order.
      std::vector<long> starts;
      for (long i = 0; i < n; ++i)
        if (i == 0 || ids[std::size_t(i)] != ids[std::size_t(i - 1)] + 1) starts.push_back(ids[std::size_t(i)]);
      // Adjacent files in their original order merge into one run.
      CHECK(starts.size() <= 3);
      CHECK(is_permutation_of_range(ids, n));
      if (starts.front() != 0) saw_other_order = true;
    }
    CHECK(saw_other_order);
  }
  SECTION("deterministic for a seed; different seeds differ") {
    hsae::file_source_options o;
    o.shuffle_buffer_rows = 32;
    o.read_chunk_rows = 5;
    o.seed = 11;
    hsae::file_source<float> a(files, o), b(files, o);
    o.seed = 12;
    hsae::file_source<float> c(files, o);
    const auto ia = draw_ids(a, 3 * n, 9), ib = draw_ids(b, 3 * n, 9), ic = draw_ids(c, 3 * n, 9);
    CHECK(ia == ib);
    CHECK(ia != ic);
    // Batch size does not change the stream.
    hsae::file_source<float> d1(files, o), d2(files, o);
    CHECK(draw_ids(d1, 2 * n, 1) == draw_ids(d2, 2 * n, 20));
  }
  SECTION("double output from float16 and float32 files mixed") {
    hsae::write_npy(tmp / "h.npy", id_rows(100, 20, d), hsae::npy_dtype::f16);  // ids < 2048: exact in half
    hsae::file_source_options o;
    o.shuffle_buffer_rows = 8;
    hsae::file_source<double> src({tmp / "a.npy", tmp / "h.npy"}, o);
    CHECK(src.rows_total() == 57);
    auto ids = draw_ids(src, 57, 4);
    std::sort(ids.begin(), ids.end());
    std::vector<long> want(37);
    std::iota(want.begin(), want.end(), 0L);
    for (long i = 100; i < 120; ++i) want.push_back(i);
    CHECK(ids == want);
    CHECK(src.files().size() == 2);
  }
}

TEST_CASE("file_source: errors", "[sources][npy][errors]") {
  temp_dir tmp;
  hsae::write_npy(tmp / "w3.npy", id_rows(0, 10, 3));
  hsae::write_npy(tmp / "w4.npy", id_rows(0, 10, 4));

  SECTION("no files") {
    CHECK_THROWS_AS(hsae::file_source<float>(std::vector<fs::path>{}), hsae::config_error);
    CHECK_THROWS_WITH(hsae::file_source<float>(std::vector<fs::path>{}), Catch::Contains("no input files"));
  }
  SECTION("bad options") {
    hsae::file_source_options o;
    o.read_chunk_rows = 0;
    CHECK_THROWS_AS(hsae::file_source<float>({tmp / "w3.npy"}, o), hsae::config_error);
  }
  SECTION("mismatched widths name both files and widths") {
    const auto msg = message_of<hsae::io_error>([&] { hsae::file_source<float> s({tmp / "w3.npy", tmp / "w4.npy"}); });
    CHECK_THAT(msg, Catch::Contains("w3.npy") && Catch::Contains("w4.npy") && Catch::Contains("3 columns") &&
                        Catch::Contains("has 4") && Catch::Contains("width mismatch"));
  }
  SECTION("a bad file among good ones") {
    write_bytes(tmp / "junk.npy", "not an npy file at all");
    const auto msg =
        message_of<hsae::io_error>([&] { hsae::file_source<float> s({tmp / "w3.npy", tmp / "junk.npy"}); });
    CHECK_THAT(msg, Catch::Contains("junk.npy") && Catch::Contains("bad magic"));
  }
  SECTION("NaN and Inf are caught with file and row; check_finite = false lets them through") {
    auto bad = id_rows(10, 12, 3);
    bad(5, 2) = std::numeric_limits<float>::quiet_NaN();
    hsae::write_npy(tmp / "nan.npy", bad);
    auto inf = id_rows(10, 12, 3);
    inf(9, 0) = 1e6f;  // overflows float16 to Inf
    hsae::write_npy(tmp / "inf16.npy", inf, hsae::npy_dtype::f16);
    for (const std::size_t buf : {std::size_t(0), std::size_t(64)}) {
      INFO("buffer " << buf);
      hsae::file_source_options o;
      o.shuffle_buffer_rows = buf;
      o.read_chunk_rows = 4;
      {
        hsae::file_source<float> src({tmp / "w3.npy", tmp / "nan.npy"}, o);
        const auto msg = message_of<hsae::numeric_error>([&] {
          for (int i = 0; i < 10; ++i) src.next(5);
        });
        CHECK_THAT(msg, Catch::Contains("nan.npy") && Catch::Contains("row 5") && Catch::Contains("column 2") &&
                            Catch::Contains("non-finite"));
      }
      {
        hsae::file_source<double> src({tmp / "inf16.npy"}, o);
        const auto msg = message_of<hsae::numeric_error>([&] { src.next(12); });
        CHECK_THAT(msg, Catch::Contains("inf16.npy") && Catch::Contains("row 9") && Catch::Contains("inf"));
      }
      o.check_finite = false;
      hsae::file_source<float> src({tmp / "nan.npy"}, o);
      const auto x = src.next(12);
      CHECK_FALSE(x.allFinite());
      CHECK(x.array().isNaN().count() == 1);
    }
  }
  SECTION("negative batch rows") {
    hsae::file_source<float> src({tmp / "w3.npy"});
    hsae::row_matrix<float> x;
    CHECK_THROWS_AS(src.next(-2, x), hsae::config_error);
    src.next(0, x);
    CHECK(x.rows() == 0);
    CHECK(x.cols() == 3);
  }
}

// --- safetensors inputs ---------------------------------------------------------------------

namespace {

/// Writes `m` as the one tensor `name` of a safetensors file (plus `extra` tensors of one row).
void write_st(const fs::path& p, const hsae::row_matrix<float>& m, hsae::safetensors_dtype dt,
              const std::vector<std::string>& extra = {}, const std::string& name = "acts") {
  hsae::safetensors_writer w;
  w.add(name, m, dt);
  const hsae::row_matrix<float> one = m.topRows(1);
  for (const auto& e : extra) w.add(e, one, dt);
  w.write(p);
}

/// `n` rows of the source, as one matrix.
template <class Src>
hsae::row_matrix<float> draw(Src& src, long n) {
  hsae::row_matrix<float> all(n, src.d_model()), x;
  for (long i = 0; i < n; i += 7) {
    src.next(std::min(7L, n - i), x);
    all.middleRows(i, x.rows()) = x;
  }
  return all;
}

}  // namespace

TEST_CASE("file_source: safetensors files stream as the .npy files with the same rows", "[sources][safetensors]") {
  temp_dir tmp;
  const Eigen::Index d = 5;
  const auto a = id_rows(0, 37, d), b = id_rows(37, 50, d);
  hsae::write_npy(tmp / "a.npy", a, hsae::npy_dtype::f32);
  hsae::write_npy(tmp / "b.npy", b, hsae::npy_dtype::f16);
  write_st(tmp / "a.safetensors", a, hsae::safetensors_dtype::f32);
  write_st(tmp / "b.safetensors", b, hsae::safetensors_dtype::f16);
  hsae::file_source_options o;
  o.shuffle_buffer_rows = 16;
  o.read_chunk_rows = 6;
  o.seed = 4;

  SECTION("F32 and F16, alone and mixed with .npy: the same stream bitwise") {
    hsae::file_source<float> npy({tmp / "a.npy", tmp / "b.npy"}, o);
    const auto want = draw(npy, 3 * 87 + 5);
    hsae::file_source<float> st({tmp / "a.safetensors", tmp / "b.safetensors"}, o);
    CHECK(st.rows_total() == 87);
    CHECK(st.d_model() == d);
    CHECK(draw(st, 3 * 87 + 5) == want);
    hsae::file_source<float> mixed({tmp / "a.npy", tmp / "b.safetensors"}, o);
    CHECK(draw(mixed, 3 * 87 + 5) == want);
    CHECK(st.files()[0].format() == hsae::row_file_format::safetensors);
    CHECK(st.files()[0].tensor() == "acts");
    CHECK(mixed.files()[0].format() == hsae::row_file_format::npy);
  }
  SECTION("BF16 reads as its rounded values") {
    write_st(tmp / "a16.safetensors", a, hsae::safetensors_dtype::bf16);
    const auto rounded = hsae::safetensors_file(tmp / "a16.safetensors").read_matrix<float>("acts");
    CHECK(rounded != a);  // 36.125 and the like do not fit bfloat16's 8 bits
    hsae::write_npy(tmp / "a16.npy", rounded, hsae::npy_dtype::f32);
    hsae::file_source<float> npy({tmp / "a16.npy"}, o), st({tmp / "a16.safetensors"}, o);
    CHECK(draw(st, 100) == draw(npy, 100));
  }
  SECTION("leading dimensions are flattened; the format is found by content without an extension") {
    hsae::safetensors_writer w;
    w.add("x", a.data(), {1, 37, d}, hsae::safetensors_dtype::f64);
    w.write(tmp / "a3.bin");
    fs::copy_file(tmp / "a.npy", tmp / "a_npy.dat");
    hsae::file_source<float> npy({tmp / "a.npy"}, o), st({tmp / "a3.bin"}, o), by_content({tmp / "a_npy.dat"}, o);
    CHECK(st.files()[0].format() == hsae::row_file_format::safetensors);
    CHECK(by_content.files()[0].format() == hsae::row_file_format::npy);
    CHECK(st.rows_total() == 37);
    const auto want = draw(npy, 80);
    CHECK(draw(st, 80) == want);
    CHECK(draw(by_content, 80) == want);
  }
  SECTION("a named tensor among several") {
    write_st(tmp / "many.safetensors", a, hsae::safetensors_dtype::f32, {"other", "third"}, "resid");
    hsae::file_source_options named = o;
    named.tensor = "resid";
    hsae::file_source<float> npy({tmp / "a.npy"}, o), st({tmp / "many.safetensors"}, named);
    CHECK(draw(st, 80) == draw(npy, 80));
  }
}

TEST_CASE("file_source: safetensors errors name the file and the tensor", "[sources][safetensors][errors]") {
  temp_dir tmp;
  const auto a = id_rows(0, 10, 3);
  write_st(tmp / "many.safetensors", a, hsae::safetensors_dtype::f32, {"other", "third"}, "resid");
  hsae::write_npy(tmp / "a.npy", a);

  SECTION("several tensors and no name: the names are listed") {
    const auto msg = message_of<hsae::io_error>([&] { hsae::file_source<float> s({tmp / "many.safetensors"}); });
    CHECK_THAT(msg, Catch::Contains("many.safetensors") && Catch::Contains("3 tensors") && Catch::Contains("'resid'") &&
                        Catch::Contains("'other'") && Catch::Contains("'third'") &&
                        Catch::Contains("file_source_options::tensor"));
  }
  SECTION("a missing tensor") {
    hsae::file_source_options o;
    o.tensor = "nope";
    const auto msg =
        message_of<hsae::io_error>([&] { hsae::file_source<float> s({tmp / "many.safetensors"}, o); });
    CHECK_THAT(msg, Catch::Contains("many.safetensors") && Catch::Contains("no tensor named 'nope'") &&
                        Catch::Contains("'resid'"));
  }
  SECTION("a tensor name for an .npy file") {
    hsae::file_source_options o;
    o.tensor = "resid";
    const auto msg = message_of<hsae::config_error>([&] { hsae::file_source<float> s({tmp / "a.npy"}, o); });
    CHECK_THAT(msg, Catch::Contains("a.npy") && Catch::Contains("'resid'"));
  }
  SECTION("an integer dtype, a scalar") {
    // Hand-built files: the writer only writes float dtypes.
    const auto st_bytes = [](const std::string& json, std::size_t data_bytes) {
      std::string h = json;
      while (h.size() % 8 != 0) h += ' ';
      std::string out(8, '\0');
      for (int i = 0; i < 8; ++i) out[std::size_t(i)] = char((h.size() >> (8 * i)) & 0xff);
      out.append(h).append(data_bytes, '\0');
      return out;
    };
    write_bytes(tmp / "int.safetensors", st_bytes(R"({"ids":{"dtype":"I32","shape":[2,3],"data_offsets":[0,24]}})", 24));
    auto msg = message_of<hsae::io_error>([&] { hsae::file_source<float> s({tmp / "int.safetensors"}); });
    CHECK_THAT(msg, Catch::Contains("int.safetensors") && Catch::Contains("'ids'") && Catch::Contains("I32"));
    write_bytes(tmp / "scalar.safetensors", st_bytes(R"({"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})", 4));
    msg = message_of<hsae::io_error>([&] { hsae::file_source<float> s({tmp / "scalar.safetensors"}); });
    CHECK_THAT(msg, Catch::Contains("scalar.safetensors") && Catch::Contains("'s'") && Catch::Contains("0-d"));
    write_bytes(tmp / "empty.safetensors", st_bytes(R"({"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]}})", 0));
    msg = message_of<hsae::io_error>([&] { hsae::file_source<float> s({tmp / "empty.safetensors"}); });
    CHECK_THAT(msg, Catch::Contains("empty.safetensors") && Catch::Contains("no elements"));
    write_bytes(tmp / "garbage.bin", "neither format");
    msg = message_of<hsae::io_error>([&] { hsae::file_source<float> s({tmp / "garbage.bin"}); });
    CHECK_THAT(msg, Catch::Contains("garbage.bin") && Catch::Contains("safetensors"));
  }
  SECTION("NaN: the file, the tensor and the row") {
    auto bad = a;
    bad(7, 1) = std::numeric_limits<float>::quiet_NaN();
    write_st(tmp / "nan.safetensors", bad, hsae::safetensors_dtype::bf16);
    hsae::file_source<float> src({tmp / "nan.safetensors"});
    const auto msg = message_of<hsae::numeric_error>([&] { src.next(10); });
    CHECK_THAT(msg, Catch::Contains("nan.safetensors") && Catch::Contains("tensor 'acts'") &&
                        Catch::Contains("row 7") && Catch::Contains("column 1"));
  }
  SECTION("width mismatch between an .npy and a safetensors file") {
    write_st(tmp / "w4.safetensors", id_rows(0, 4, 4), hsae::safetensors_dtype::f32);
    const auto msg =
        message_of<hsae::io_error>([&] { hsae::file_source<float> s({tmp / "a.npy", tmp / "w4.safetensors"}); });
    CHECK_THAT(msg, Catch::Contains("width mismatch") && Catch::Contains("w4.safetensors") && Catch::Contains("'acts'"));
  }
}

// --- row ranges and chunk shuffling ---------------------------------------------------------

TEST_CASE("file_source: a row range serves only its rows, each once per epoch", "[sources][npy][range]") {
  temp_dir tmp;
  const Eigen::Index d = 3;
  // 37 + 50 + 13 = 100 rows; column 0 holds the global row index.
  hsae::write_npy(tmp / "a.npy", id_rows(0, 37, d), hsae::npy_dtype::f32);
  hsae::write_npy(tmp / "b.npy", id_rows(37, 50, d), hsae::npy_dtype::f32);
  hsae::write_npy(tmp / "c.npy", id_rows(87, 13, d), hsae::npy_dtype::f16);
  const std::vector<fs::path> files{tmp / "a.npy", tmp / "b.npy", tmp / "c.npy"};
  const long n = 100;

  SECTION("training [0, N - H) with shuffling never serves a held-out row") {
    for (const long h : {13L, 20L, 63L}) {
      for (const std::int64_t chunk : {std::int64_t(0), std::int64_t(1), std::int64_t(6), std::int64_t(4096)}) {
        for (const std::size_t buf : {std::size_t(0), std::size_t(9), std::size_t(1) << 16}) {
          INFO("held out " << h << ", chunks of " << chunk << ", buffer " << buf);
          hsae::file_source_options o;
          o.row_end = n - h;
          o.shuffle_chunk_rows = chunk;
          o.shuffle_buffer_rows = buf;
          o.read_chunk_rows = 5;
          o.seed = 17;
          hsae::file_source<float> train(files, o);
          CHECK(train.rows_total() == n - h);
          CHECK(train.row_begin() == 0);
          CHECK(train.row_end() == n - h);
          const auto ids = draw_ids(train, 4 * (n - h), 7);
          for (int e = 0; e < 4; ++e)  // each epoch: every row of [0, N - H) exactly once
            REQUIRE(is_permutation_of_range(
                std::vector<long>(ids.begin() + e * (n - h), ids.begin() + (e + 1) * (n - h)), n - h));
          CHECK(train.epoch() == 4);
          if (buf >= 9) CHECK_FALSE(std::is_sorted(ids.begin(), ids.begin() + (n - h)));
        }
      }
    }
  }
  SECTION("held-out [N - H, N) without a buffer: the last H rows by position, in order") {
    // As docs/DATA.md writes it (designated initialisers compile without warnings).
    hsae::file_source<float> held(files, {.shuffle_buffer_rows = 0, .row_begin = 70});
    hsae::file_source<float> train(files, {.row_end = 70});
    CHECK(train.rows_total() == 70);
    CHECK(held.rows_total() == 30);
    CHECK(held.row_end() == 100);
    const auto ids = draw_ids(held, 65, 4);
    for (long i = 0; i < 65; ++i) REQUIRE(ids[std::size_t(i)] == 70 + i % 30);
  }
  SECTION("a range inside one file, and one across files, any chunk size") {
    for (const auto& [lo, hi] : {std::pair<long, long>{40, 60}, std::pair<long, long>{30, 90}, std::pair<long, long>{99, 100}}) {
      for (const std::int64_t chunk : {std::int64_t(0), std::int64_t(7)}) {
        INFO("rows [" << lo << ", " << hi << "), chunks of " << chunk);
        hsae::file_source_options o;
        o.row_begin = lo;
        o.row_end = hi;
        o.shuffle_chunk_rows = chunk;
        o.shuffle_buffer_rows = 8;
        hsae::file_source<float> src(files, o);
        auto ids = draw_ids(src, 2 * (hi - lo), 3);
        for (int e = 0; e < 2; ++e) {
          std::vector<long> ep(ids.begin() + e * (hi - lo), ids.begin() + (e + 1) * (hi - lo));
          for (long& v : ep) v -= lo;
          REQUIRE(is_permutation_of_range(ep, hi - lo));
        }
      }
    }
  }
  SECTION("bad ranges: config_error naming the field") {
    const auto msg = [&](std::int64_t lo, std::int64_t hi) {
      hsae::file_source_options o;
      o.row_begin = lo;
      o.row_end = hi;
      return message_of<hsae::config_error>([&] { hsae::file_source<float> s(files, o); });
    };
    CHECK_THAT(msg(-1, -1), Catch::Contains("row_begin=-1") && Catch::Contains("100 rows"));
    CHECK_THAT(msg(100, -1), Catch::Contains("row_begin=100"));
    CHECK_THAT(msg(10, 10), Catch::Contains("row_end=10"));
    CHECK_THAT(msg(10, 5), Catch::Contains("row_end=5"));
    CHECK_THAT(msg(0, 101), Catch::Contains("row_end=101") && Catch::Contains("100 rows"));
    CHECK_THAT(msg(0, -2), Catch::Contains("row_end=-2"));
    hsae::file_source_options o;
    o.shuffle_chunk_rows = -1;
    CHECK_THAT(message_of<hsae::config_error>([&] { hsae::file_source<float> s(files, o); }),
               Catch::Contains("shuffle_chunk_rows=-1"));
  }
}

TEST_CASE("file_source: chunk shuffling visits every chunk of every file in a fresh order", "[sources][npy][chunks]") {
  temp_dir tmp;
  const Eigen::Index d = 2;
  hsae::write_npy(tmp / "a.npy", id_rows(0, 37, d), hsae::npy_dtype::f32);
  hsae::write_npy(tmp / "b.npy", id_rows(37, 50, d), hsae::npy_dtype::f32);
  hsae::write_npy(tmp / "c.npy", id_rows(87, 13, d), hsae::npy_dtype::f32);
  const std::vector<fs::path> files{tmp / "a.npy", tmp / "b.npy", tmp / "c.npy"};
  const long n = 100;
  // Chunks of 10 rows start at the files' rows 0, 10, 20, ...: in global rows,
  // a: 0 10 20 30 | b: 37 47 57 67 77 | c: 87 97 (the last of each file shorter).
  const std::vector<long> starts{0, 10, 20, 30, 37, 47, 57, 67, 77, 87, 97};
  const auto file_of = [](long id) { return id < 37 ? 0 : id < 87 ? 1 : 2; };

  SECTION("the chunks, clipped to files and to the range") {
    hsae::file_source_options o;
    o.shuffle_chunk_rows = 10;
    CHECK(hsae::file_source<float>(files, o).chunks() == 11);
    o.row_begin = 5;
    o.row_end = 95;  // a: [5,10) [10,20) [20,30) [30,37); b: 5 chunks; c: [87, 95)
    CHECK(hsae::file_source<float>(files, o).chunks() == 10);
    o.shuffle_chunk_rows = 0;
    CHECK(hsae::file_source<float>(files, o).chunks() == 3);
    o.shuffle_chunk_rows = 1;
    CHECK(hsae::file_source<float>(files, o).chunks() == 90);
  }
  SECTION("without a buffer the stream is the chunks in a random order, interleaving the files") {
    hsae::file_source_options o;
    o.shuffle_buffer_rows = 0;
    o.shuffle_chunk_rows = 10;
    o.read_chunk_rows = 3;
    o.seed = 5;
    hsae::file_source<float> src(files, o);
    std::vector<std::vector<long>> orders;
    int most_file_changes = 0;
    const auto all = draw_ids(src, 6 * n, 9);
    for (int e = 0; e < 6; ++e) {
      const std::vector<long> ids(all.begin() + e * n, all.begin() + (e + 1) * n);
      REQUIRE(is_permutation_of_range(ids, n));
      // Cut at every chunk start: each piece is one whole chunk, in row order.
      std::vector<long> order;
      for (long i = 0; i < n; ++i)
        if (std::find(starts.begin(), starts.end(), ids[std::size_t(i)]) != starts.end()) {
          order.push_back(ids[std::size_t(i)]);
        } else {
          REQUIRE(i > 0);
          REQUIRE(ids[std::size_t(i)] == ids[std::size_t(i - 1)] + 1);
        }
      REQUIRE(order.size() == starts.size());
      int changes = 0;
      for (std::size_t i = 1; i < order.size(); ++i) changes += file_of(order[i]) != file_of(order[i - 1]);
      most_file_changes = std::max(most_file_changes, changes);
      orders.push_back(order);
    }
    CHECK(most_file_changes > 2);  // chunks of the files interleave (whole-file shuffling changes file twice at most)
    std::sort(orders.begin(), orders.end());
    CHECK(std::unique(orders.begin(), orders.end()) - orders.begin() >= 5);  // a fresh order (nearly) every epoch
  }
  SECTION("shuffle_files = false: stream order whatever the chunk size") {
    for (const std::int64_t chunk : {std::int64_t(0), std::int64_t(1), std::int64_t(10)}) {
      hsae::file_source_options o;
      o.shuffle_buffer_rows = 0;
      o.shuffle_files = false;
      o.shuffle_chunk_rows = chunk;
      hsae::file_source<float> src(files, o);
      const auto ids = draw_ids(src, 2 * n, 7);
      for (long i = 0; i < 2 * n; ++i) REQUIRE(ids[std::size_t(i)] == i % n);
    }
  }
  SECTION("with a buffer: every row once per epoch, deterministic for a seed") {
    hsae::file_source_options o;
    o.shuffle_buffer_rows = 16;
    o.shuffle_chunk_rows = 4;
    o.seed = 8;
    hsae::file_source<float> a(files, o), b(files, o);
    const auto ia = draw_ids(a, 3 * n, 7), ib = draw_ids(b, 3 * n, 11);
    CHECK(ia == ib);
    for (int e = 0; e < 3; ++e)
      REQUIRE(is_permutation_of_range(std::vector<long>(ia.begin() + e * n, ia.begin() + (e + 1) * n), n));
  }
}
