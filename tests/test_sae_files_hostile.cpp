// SPDX-License-Identifier: Apache-2.0
// SAE directories (io/sae_files.hpp) against hostile input and interrupted saves: config
// shapes checked against the tensors before anything is allocated, folds that overflow,
// schedules wider than the SAE, SAELens metadata of the wrong JSON type, symlink loops and
// unwritable destinations, saves that fail (or the process dies) at every step, and the
// temporaries a killed writer leaves. Every message is checked for a single "hsae: ".
#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include <hsae/io/sae_files.hpp>
#include <hsae/rng.hpp>

#include "test_util.hpp"

namespace {

namespace fs = std::filesystem;
using hsae::safetensors_dtype;
using json = nlohmann::json;
using Catch::Contains;
using Catch::StartsWith;

using hsae_test::random_sae;

std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

std::span<const std::byte> as_bytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

/// The message of the hsae::error `fn` throws, "" if none; fails the test on any other
/// exception and on a doubled "hsae: " prefix.
template <class Fn>
std::string error_of(Fn&& fn) {
  std::string what;
  try {
    fn();
  } catch (const hsae::error& e) {
    what = e.what();
  }
  CHECK_THAT(what, !Contains("hsae: hsae:"));
  return what;
}

/// A safetensors file in memory from (name, tensor) pairs, all F32.
struct tensors {
  hsae::safetensors_writer w;
  template <class M>
  tensors& add(const char* name, const M& m) {
    w.add(name, m);
    return *this;
  }
  std::string bytes() const {
    const auto b = w.serialize();
    return std::string(reinterpret_cast<const char*>(b.data()), b.size());
  }
};

/// A SAELens file pair in memory: the hsae model `m` in SAELens orientation and `cfg`.
struct saelens_files {
  hsae::row_matrix<float> W_enc_t;
  hsae::sae<float> m;
  std::string weights;
  explicit saelens_files(const hsae::sae<float>& model) : W_enc_t(model.W_enc.transpose()), m(model) {
    weights = tensors{}.add("W_enc", W_enc_t).add("W_dec", m.W_dec).add("b_enc", m.b_enc).add("b_dec", m.b_dec).bytes();
  }
};

json saelens_cfg(int d, int f, int k) {
  return {{"architecture", "topk"}, {"d_in", d},           {"d_sae", f},
          {"k", k},                 {"dtype", "float32"},  {"metadata", {{"sae_lens_version", "6.54.12"}}}};
}

json sparsify_cfg(int d, int f, int k) {
  return {{"activation", "topk"}, {"d_in", d}, {"num_latents", f}, {"k", k}};
}

std::string saelens_error(const json& cfg, const std::string& weights) {
  return error_of([&] { hsae::load_saelens_buffers(cfg.dump(), as_bytes(weights), "C.json", "W.safetensors"); });
}

std::string sparsify_error(const json& cfg, const std::string& weights) {
  return error_of([&] { hsae::load_sparsify_buffers(cfg.dump(), as_bytes(weights), "C.json", "W.safetensors"); });
}

std::string sparsify_weights(const hsae::sae<float>& m) {
  return tensors{}
      .add("encoder.weight", m.W_enc)
      .add("encoder.bias", m.b_enc)
      .add("W_dec", m.W_dec)
      .add("b_dec", m.b_dec)
      .bytes();
}

}  // namespace

TEST_CASE("schedule errors from cfg.json carry one 'hsae: ' prefix", "[sae_files][hostile]") {
  const saelens_files f(random_sae(4, 10, 1));
  json cfg = saelens_cfg(4, 10, 3);
  cfg["metadata"]["hsae_k_schedule"] = {{"k", {3, 2}}, {"weight", {1, 1}}};
  const std::string e = saelens_error(cfg, f.weights);
  CHECK_THAT(e, Contains("hsae: SAELens config 'C.json': malformed hsae_k_schedule: ") &&
                    Contains("not strictly increasing"));
  CHECK(e.find("hsae: ", 1) == std::string::npos);
  json scfg = sparsify_cfg(4, 10, 3);
  scfg["hsae_k_schedule"] = {{"k", {1, 2}}, {"weight", {1, -1}}};
  const std::string es = sparsify_error(scfg, sparsify_weights(f.m));
  CHECK_THAT(es, StartsWith("hsae: sparsify config 'C.json': malformed hsae_k_schedule: "));
  CHECK(es.find("hsae: ", 1) == std::string::npos);
}

TEST_CASE("a stored k-schedule wider than the SAE is refused", "[sae_files][hostile]") {
  const saelens_files f(random_sae(4, 10, 2));
  const json wide = {{"k", {2, 12}}, {"weight", {1, 1}}};
  SECTION("SAELens: in the config's metadata") {
    json cfg = saelens_cfg(4, 10, 3);
    cfg["metadata"]["hsae_k_schedule"] = wide;
    CHECK_THAT(saelens_error(cfg, f.weights),
               StartsWith("hsae: SAELens config 'C.json': ") && Contains("hsae_k_schedule has k_max=12 > d_sae=10"));
    cfg["metadata"]["hsae_k_schedule"] = {{"k", {2, 10}}, {"weight", {1, 1}}};  // k_max = d_sae: fine
    CHECK(saelens_error(cfg, f.weights).empty());
  }
  SECTION("SAELens: in the weights' __metadata__") {
    hsae::safetensors_writer w;
    w.add("W_enc", f.W_enc_t).add("W_dec", f.m.W_dec).add("b_enc", f.m.b_enc).add("b_dec", f.m.b_dec);
    w.metadata("hsae_k_schedule", wide.dump());
    const auto b = w.serialize();
    const std::string weights(reinterpret_cast<const char*>(b.data()), b.size());
    CHECK_THAT(saelens_error(saelens_cfg(4, 10, 3), weights),
               StartsWith("hsae: SAELens weights 'W.safetensors': ") &&
                   Contains("hsae_k_schedule has k_max=12 > d_sae=10"));
  }
  SECTION("sparsify") {
    json cfg = sparsify_cfg(4, 10, 3);
    cfg["hsae_k_schedule"] = wide;
    CHECK_THAT(sparsify_error(cfg, sparsify_weights(f.m)),
               StartsWith("hsae: sparsify config 'C.json': ") &&
                   Contains("hsae_k_schedule has k_max=12 > num_latents=10"));
  }
}

TEST_CASE("a config's widths are checked against the tensors before anything is allocated", "[sae_files][hostile]") {
  constexpr std::int64_t huge = std::numeric_limits<int>::max();
  const saelens_files f(random_sae(4, 10, 3));
  SECTION("SAELens d_sae") {
    json cfg = saelens_cfg(4, 10, 3);
    cfg["d_sae"] = huge;
    CHECK_THAT(saelens_error(cfg, f.weights),
               StartsWith("hsae: SAELens config 'C.json': d_sae=2147483647 does not match the weights 'W.safetensors': "
                          "tensor 'W_enc' has shape [4, 10], expected [4, 2147483647] (d_sae=10)"));
    CHECK_THROWS_AS(hsae::load_saelens_buffers(cfg.dump(), as_bytes(f.weights), "C", "W"), hsae::io_error);
  }
  SECTION("SAELens d_in and d_sae") {
    json cfg = saelens_cfg(4, 10, 3);
    cfg["d_in"] = huge;
    cfg["d_sae"] = huge;
    CHECK_THAT(saelens_error(cfg, f.weights), Contains("'C.json'") && Contains("d_in=2147483647 does not match") &&
                                                  Contains("'W.safetensors'") && Contains("(d_in=4)"));
  }
  SECTION("SAELens: a vector of another length") {
    const hsae::vector<float> short_b_enc = f.m.b_enc.head(9);
    const std::string w = tensors{}
                              .add("W_enc", f.W_enc_t)
                              .add("W_dec", f.m.W_dec)
                              .add("b_enc", short_b_enc)
                              .add("b_dec", f.m.b_dec)
                              .bytes();
    CHECK_THAT(saelens_error(saelens_cfg(4, 10, 3), w),
               Contains("d_sae=10 does not match the weights 'W.safetensors': tensor 'b_enc' has shape [9], "
                        "expected [10] (d_sae=9)"));
  }
  SECTION("SAELens: a tensor of another rank") {
    const std::string w = tensors{}
                              .add("W_enc", f.W_enc_t)
                              .add("W_dec", f.m.W_dec)
                              .add("b_enc", f.W_enc_t)
                              .add("b_dec", f.m.b_dec)
                              .bytes();
    CHECK_THAT(saelens_error(saelens_cfg(4, 10, 3), w),
               StartsWith("hsae: SAELens weights 'W.safetensors': tensor 'b_enc' has shape [4, 10], expected [10]"));
  }
  SECTION("sparsify num_latents and expansion_factor") {
    const std::string w = sparsify_weights(f.m);
    json cfg = sparsify_cfg(4, 10, 3);
    cfg["num_latents"] = huge;
    CHECK_THAT(sparsify_error(cfg, w),
               StartsWith("hsae: sparsify config 'C.json': num_latents=2147483647 does not match the weights "
                          "'W.safetensors': tensor 'encoder.weight' has shape [10, 4], expected [2147483647, 4] "
                          "(num_latents=10)"));
    cfg.erase("num_latents");
    cfg["expansion_factor"] = huge / 4;
    CHECK_THAT(sparsify_error(cfg, w), Contains("d_in * expansion_factor=2147483644 does not match") &&
                                           Contains("(d_in * expansion_factor=10)"));
  }
}

TEST_CASE("weights that overflow once a setting is folded in are refused", "[sae_files][hostile]") {
  hsae::sae<float> m = random_sae(4, 10, 4);
  SECTION("apply_b_dec_to_input=false: b_enc + W_enc b_dec") {
    m.W_enc.row(3).setConstant(1e30f);
    m.b_dec.setConstant(1e30f);
    const saelens_files f(m);
    json cfg = saelens_cfg(4, 10, 3);
    REQUIRE(saelens_error(cfg, f.weights).empty());  // finite as stored
    cfg["apply_b_dec_to_input"] = false;
    const std::string e = saelens_error(cfg, f.weights);
    CHECK_THAT(e, StartsWith("hsae: SAELens weights 'W.safetensors': tensor 'b_enc (after folding "
                             "apply_b_dec_to_input=false: b_enc + W_enc b_dec)' contains a non-finite value (inf) "
                             "at [3, 0]"));
    CHECK_THROWS_AS(hsae::load_saelens_buffers(cfg.dump(), as_bytes(f.weights), "C", "W"), hsae::numeric_error);
  }
  SECTION("rescale_acts_by_decoder_norm=true: encoder rows times the decoder row norms") {
    m.W_dec.row(2) << 1e20f, 0.f, 0.f, 0.f;
    m.W_enc(2, 1) = 1e20f;
    const saelens_files f(m);
    json cfg = saelens_cfg(4, 10, 3);
    REQUIRE(saelens_error(cfg, f.weights).empty());
    cfg["rescale_acts_by_decoder_norm"] = true;
    CHECK_THAT(saelens_error(cfg, f.weights),
               StartsWith("hsae: SAELens weights 'W.safetensors': tensor 'W_enc (after folding "
                          "rescale_acts_by_decoder_norm=true: scaled by the decoder row norms)' contains a non-finite "
                          "value (inf) at [2, 1]"));
  }
  SECTION("rescale_acts_by_decoder_norm=true in double: a decoder norm that overflows") {
    hsae::sae<double> md = random_sae<double>(4, 10, 5);
    md.W_dec.row(1).setConstant(1e300);
    const hsae::row_matrix<double> W_enc_t = md.W_enc.transpose();
    hsae::safetensors_writer w;
    w.add("W_enc", W_enc_t, safetensors_dtype::f64)
        .add("W_dec", md.W_dec, safetensors_dtype::f64)
        .add("b_enc", md.b_enc, safetensors_dtype::f64)
        .add("b_dec", md.b_dec, safetensors_dtype::f64);
    const auto b = w.serialize();
    json cfg = saelens_cfg(4, 10, 3);
    cfg["dtype"] = "float64";
    cfg["rescale_acts_by_decoder_norm"] = true;
    const std::string e = error_of([&] {
      hsae::load_saelens_buffers<double>(cfg.dump(), std::span<const std::byte>(b), "C.json", "W.safetensors");
    });
    CHECK_THAT(e, Contains("'W.safetensors'") && Contains("after folding rescale_acts_by_decoder_norm=true") &&
                      Contains("non-finite"));
  }
}

TEST_CASE("SAELens version metadata of the wrong JSON type is refused, as SAELens refuses it", "[sae_files][hostile]") {
  const saelens_files f(random_sae(4, 10, 6));
  const auto load = [&](const json& cfg) {
    return hsae::load_saelens_buffers(cfg.dump(), as_bytes(f.weights), "C.json", "W.safetensors");
  };
  const auto pre6 = [&](const json& cfg) {
    const auto l = load(cfg);
    return std::any_of(l.adjustments.begin(), l.adjustments.end(),
                       [](const std::string& a) { return a.find("pre-6.0") != std::string::npos; });
  };
  const json base = saelens_cfg(4, 10, 3);
  SECTION("a true value that is not a string: Version() raises in SAELens") {
    json cfg = base;
    cfg["sae_lens_version"] = 6;
    CHECK_THAT(saelens_error(cfg, f.weights),
               StartsWith("hsae: SAELens config 'C.json': 'sae_lens_version' is 6 (number), not a version string"));
    cfg["sae_lens_version"] = json::array({"6.0.0"});
    CHECK_THAT(saelens_error(cfg, f.weights),
               Contains("'sae_lens_version' is [\"6.0.0\"] (array), not a version string"));
    cfg["sae_lens_version"] = true;
    CHECK_THAT(saelens_error(cfg, f.weights), Contains("'sae_lens_version' is true (boolean)"));
    cfg = base;
    cfg["metadata"]["sae_lens_version"] = 6.5;
    CHECK_THAT(saelens_error(cfg, f.weights),
               Contains("'metadata.sae_lens_version' is 6.5 (number), not a version string"));
    cfg["metadata"]["sae_lens_version"] = {{"major", 6}};
    CHECK_THAT(saelens_error(cfg, f.weights), Contains("'metadata.sae_lens_version' is {\"major\":6} (object)"));
  }
  SECTION("a metadata that is not an object, when SAELens reads the version from it") {
    for (const json& md : {json("x"), json(nullptr), json::array({1, 2}), json(5)}) {
      json cfg = base;
      cfg["metadata"] = md;
      CHECK_THAT(saelens_error(cfg, f.weights),
                 StartsWith("hsae: SAELens config 'C.json': 'metadata' is " + md.dump() + " (" + md.type_name() +
                            "), not an object"));
    }
    json cfg = base;
    cfg["metadata"] = std::string(100, 'm');
    CHECK_THAT(saelens_error(cfg, f.weights), Contains("'metadata' is \"mmm") && Contains("m... (string)"));
  }
  SECTION("false values (Python's sense) fall through to the metadata or to the pre-6.0 rules, as in SAELens") {
    for (const json& falsy : {json(nullptr), json(0), json(false), json(""), json::array(), json::object()}) {
      json cfg = base;
      cfg["sae_lens_version"] = falsy;
      CHECK_FALSE(pre6(cfg));  // the metadata's 6.54.12
      cfg["metadata"]["sae_lens_version"] = falsy;
      CHECK(pre6(cfg));
    }
  }
  SECTION("pre-6.0 activation_fn_kwargs that is not an object") {
    const json old = {{"d_in", 4},          {"d_sae", 10},        {"dtype", "float32"}, {"activation_fn", "topk"},
                      {"sae_lens_version", "3.0.0"}};
    json cfg = old;
    cfg["activation_fn_kwargs"] = {{"k", 3}};
    CHECK(load(cfg).k == 3);
    cfg["activation_fn_kwargs"] = "k=3";
    CHECK_THAT(saelens_error(cfg, f.weights),
               StartsWith("hsae: SAELens config 'C.json': 'activation_fn_kwargs' is \"k=3\" (string), not an object"));
    cfg["activation_fn_kwargs"] = nullptr;
    CHECK_THAT(saelens_error(cfg, f.weights), Contains("'activation_fn_kwargs' is null (null), not an object"));
    cfg["activation_fn"] = "relu";  // not read: SAELens ignores it too
    CHECK(load(cfg).k == 10);
  }
}

TEST_CASE("symlink loops and unusable destinations raise hsae::io_error with the path and the OS reason",
          "[sae_files][hostile]") {
  hsae_test::temp_dir tmp;
  const auto m = random_sae(4, 10, 7);
  SECTION("a weights symlink loop") {
    const fs::path dir = tmp / "loop";
    hsae::save_saelens(dir, m, 3);
    fs::remove(dir / hsae::saelens_weights_file);
    fs::create_symlink("other", dir / hsae::saelens_weights_file);
    fs::create_symlink(hsae::saelens_weights_file, dir / "other");
    const std::string w = (dir / hsae::saelens_weights_file).string();
    for (const std::string& e : {error_of([&] { hsae::detect_sae_format(dir); }),
                                 error_of([&] { hsae::load_sae_dir(dir); }),
                                 error_of([&] { hsae::load_saelens(dir); }),
                                 error_of([&] {
                                   hsae::convert_sae_dir(dir, tmp / "out", hsae::sae_file_format::sparsify);
                                 })})
      CHECK_THAT(e, Contains("'" + w + "'") && Contains("Too many levels of symbolic links"));
    CHECK_THROWS_AS(hsae::load_sae_dir(dir), hsae::io_error);
    // The directory itself a loop.
    fs::create_symlink("dloop", tmp / "dloop");
    CHECK_THAT(error_of([&] { hsae::load_sae_dir(tmp / "dloop"); }),
               Contains((tmp / "dloop").string()) && Contains("Too many levels of symbolic links"));
  }
  SECTION("saving through a regular file or onto one") {
    const fs::path file = tmp / "file";
    { std::ofstream(file) << "x"; }
    const hsae::dynamic_k_schedule s({{1, 1.0}, {3, 1.0}});
    const auto l = [&] {
      hsae::save_saelens(tmp / "ok", m, s);
      return hsae::load_saelens(tmp / "ok");
    }();
    for (const fs::path& dir : {file / "sae", file / "a" / "b", file}) {
      const std::string d = "'" + dir.string() + "'";
      const std::string reason = "Not a directory";
      CHECK_THAT(error_of([&] { hsae::save_saelens(dir, m, 3); }), Contains(d) && Contains(reason));
      CHECK_THAT(error_of([&] { hsae::save_saelens(dir, m, s); }), Contains(d) && Contains(reason));
      CHECK_THAT(error_of([&] { hsae::save_sparsify(dir, m, 3); }), Contains(d) && Contains(reason));
      CHECK_THAT(error_of([&] { hsae::save_sparsify(dir, m, hsae::k_schedule<1, 3>{}); }),
                 Contains(d) && Contains(reason));
      CHECK_THAT(error_of([&] { hsae::save_sae(dir, hsae::sae_file_format::sparsify, l); }),
                 Contains(d) && Contains(reason));
      CHECK_THAT(error_of([&] { hsae::convert_sae_dir(tmp / "ok", dir, hsae::sae_file_format::sparsify); }),
                 Contains(d) && Contains(reason));
      CHECK_THROWS_AS(hsae::save_saelens(dir, m, 3), hsae::io_error);
    }
    CHECK(read_bytes(file) == "x");
  }
  SECTION("saving into a symlink loop or an empty path") {
    fs::create_symlink("dloop", tmp / "dloop");
    CHECK_THAT(error_of([&] { hsae::save_saelens(tmp / "dloop", m, 3); }),
               StartsWith("hsae: save (SAELens) '" + (tmp / "dloop").string() + "': ") &&
                   Contains("Too many levels of symbolic links"));
    CHECK_THAT(error_of([&] { hsae::save_sparsify(tmp / "dloop" / "sae", m, 3); }),
               Contains("Too many levels of symbolic links"));
    CHECK_THAT(error_of([&] { hsae::save_sparsify("", m, 3); }), StartsWith("hsae: save (sparsify) '': "));
  }
}

namespace {

/// The pid of a process that has exited and been reaped.
pid_t dead_pid() {
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) ::_exit(0);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(::kill(child, 0) == -1);
  return child;
}

std::set<std::string> names_in(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

}  // namespace

TEST_CASE("the next atomic write to a path removes the temporaries of writers that died, only theirs",
          "[sae_files][hostile]") {
  hsae_test::temp_dir tmp;
  const pid_t dead = dead_pid(), live = ::getppid();
  REQUIRE(::kill(live, 0) == 0);
  const fs::path ckpt = tmp / "run.ckpt";
  const std::string d = std::to_string(dead), l = std::to_string(live);
  const std::vector<std::string> kept = {"run.ckpt.tmp." + l,        "run.ckpt.tmp.0" + d,  "run.ckpt.tmp.x" + d,
                                         "run.ckpt.tmp." + d + "x",  "other.tmp." + d,      "run.ckpt.tmp.",
                                         "run.ckpt.tmp.99999999999", "run.ckpt.old." + d};
  for (const auto& n : kept) std::ofstream(tmp / n) << "keep";
  std::ofstream(tmp / ("run.ckpt.tmp." + d)) << "stale";
  fs::create_directory(tmp / ("run.ckpt.tmp.1" + d));  // not a file: not ours to remove
  hsae::safetensors_writer w;
  const hsae::vector<float> v = hsae::vector<float>::Ones(3);
  w.add("v", v);
  w.write(ckpt);
  std::set<std::string> want(kept.begin(), kept.end());
  want.insert("run.ckpt");
  want.insert("run.ckpt.tmp.1" + d);
  CHECK(names_in(tmp.dir) == want);
  CHECK(read_bytes(tmp / ("run.ckpt.tmp." + l)) == "keep");
}

// --- Directory saves: whole or not at all ----------------------------------------------

namespace {

using hsae::sae_file_format;
using hsae::detail::fs_op;

/// What the test seam does: count the operations, fail the `fail_at`-th with `err`, end
/// the process at the `crash_at`-th, refuse RENAME_EXCHANGE (the two-rename fallback).
struct fault_plan {
  int calls = 0;
  int fail_at = -1;
  int fail_count = 1;
  int crash_at = -1;
  int err = ENOSPC;
  bool no_exchange = false;
};
fault_plan plan;

int fault_hook(fs_op op, const char*) noexcept {
  if (op == fs_op::exchange && plan.no_exchange) return EINVAL;
  const int n = plan.calls++;
  if (n == plan.crash_at) ::_exit(42);
  return n >= plan.fail_at && n < plan.fail_at + plan.fail_count ? plan.err : 0;
}

struct hooked {
  hooked() { hsae::detail::fs_fault_hook().store(&fault_hook); }
  ~hooked() { hsae::detail::fs_fault_hook().store(nullptr); }
  hooked(const hooked&) = delete;
  hooked& operator=(const hooked&) = delete;
};

void save(sae_file_format f, const fs::path& dir, const hsae::sae<float>& m, int k) {
  if (f == sae_file_format::saelens)
    hsae::save_saelens(dir, m, k);
  else
    hsae::save_sparsify(dir, m, k);
}

/// 0 if `dir` holds exactly `a` (weights and k), 1 if exactly `b`, -1 otherwise (or unloadable).
int which(sae_file_format f, const fs::path& dir, const hsae::sae<float>& a, int ka, const hsae::sae<float>& b,
          int kb) {
  try {
    const auto l = f == sae_file_format::saelens ? hsae::load_saelens(dir) : hsae::load_sparsify(dir);
    const auto is = [&](const hsae::sae<float>& m, int k) {
      return l.k == k && hsae_test::bitwise_equal(l.model.W_enc, m.W_enc) &&
             hsae_test::bitwise_equal(l.model.W_dec, m.W_dec) && hsae_test::bitwise_equal(l.model.b_enc, m.b_enc) &&
             hsae_test::bitwise_equal(l.model.b_dec, m.b_dec);
    };
    return is(a, ka) ? 0 : is(b, kb) ? 1 : -1;
  } catch (const hsae::error&) {
    return -1;
  }
}

const char* weights_name(sae_file_format f) {
  return f == sae_file_format::saelens ? hsae::saelens_weights_file : hsae::sparsify_weights_file;
}

/// An SAE directory holding `old` (k 3) and two files of the user's (a README and a
/// symlink), or nothing (`existing` false), in a fresh parent directory.
struct sae_dir_fixture {
  hsae_test::temp_dir tmp;
  fs::path dir = tmp / "sae";
  sae_file_format f;
  bool existing;
  hsae::sae<float> old_sae = random_sae(4, 10, 21), new_sae = random_sae(4, 12, 22);
  static constexpr int old_k = 3, new_k = 5;
  sae_dir_fixture(sae_file_format fmt, bool exists) : f(fmt), existing(exists) { reset(); }
  void reset() {
    std::error_code ec;
    fs::remove_all(dir, ec);
    if (!existing) return;
    save(f, dir, old_sae, old_k);
    std::ofstream(dir / "README.md") << "mine";
    fs::create_symlink("README.md", dir / "link");
  }
  void save_new() const { save(f, dir, new_sae, new_k); }
  int state() const { return which(f, dir, old_sae, old_k, new_sae, new_k); }
  /// Nothing but `dir` in the parent, and in `dir` exactly the SAE's files and the user's.
  void check_clean(bool saved) const {
    const bool present = existing || saved;
    CHECK(names_in(tmp.dir) == (present ? std::set<std::string>{"sae"} : std::set<std::string>{}));
    if (!present) return;
    std::set<std::string> want = {hsae::sae_config_file, weights_name(f)};
    if (existing) {
      want.insert({"README.md", "link"});
      CHECK(read_bytes(dir / "README.md") == "mine");
      CHECK(fs::read_symlink(dir / "link") == "README.md");
    }
    CHECK(names_in(dir) == want);
  }
};

}  // namespace

TEST_CASE("a directory save that fails at any step leaves the old SAE or the new one, whole, and no temporaries",
          "[sae_files][hostile][atomic_dir]") {
  for (const sae_file_format f : {sae_file_format::saelens, sae_file_format::sparsify})
    for (const bool existing : {true, false})
      for (const bool no_exchange : {false, true}) {
        if (!existing && no_exchange) continue;  // a new directory is one rename either way
        INFO(hsae::sae_file_format_name(f) << (existing ? ", replacing" : ", new directory")
                                           << (no_exchange ? ", two renames" : ", exchange"));
        sae_dir_fixture fx(f, existing);
        plan = fault_plan{};
        plan.no_exchange = no_exchange;
        {
          hooked h;
          fx.save_new();
        }
        const int total = plan.calls;
        REQUIRE(total >= 10);
        REQUIRE(fx.state() == 1);
        fx.check_clean(true);
        int failed = 0;
        for (int i = 0; i < total; ++i) {
          INFO("operation " << i << " of " << total << " fails with ENOSPC");
          fx.reset();
          plan = fault_plan{};
          plan.no_exchange = no_exchange;
          plan.fail_at = i;
          std::string e;
          {
            hooked h;
            e = error_of([&] { fx.save_new(); });
          }
          REQUIRE(plan.calls > i);
          if (!e.empty()) {  // a failure before the swap: nothing changed
            ++failed;
            CHECK_THAT(e, StartsWith("hsae: save (" + std::string(hsae::sae_file_format_name(f)) + ") '" +
                                     fx.dir.string() + "': ") &&
                              Contains("No space left on device"));
            CHECK(fx.state() == (existing ? 0 : -1));
            CHECK(fs::exists(fx.dir) == existing);
          } else {  // a best-effort fsync of a directory after its rename
            CHECK(fx.state() == 1);
          }
          fx.check_clean(e.empty());
        }
        CHECK(failed >= total - 4);
      }
}

TEST_CASE("a two-rename directory save whose rename and rename back both fail is rolled forward by the next save",
          "[sae_files][hostile][atomic_dir]") {
  sae_dir_fixture fx(sae_file_format::saelens, true);
  plan = fault_plan{};
  plan.no_exchange = true;
  {
    hooked h;
    fx.save_new();
  }
  const int total = plan.calls;
  int stranded = 0;
  for (int i = 0; i + 1 < total; ++i) {
    INFO("operations " << i << " and " << i + 1 << " of " << total << " fail");
    fx.reset();
    plan = fault_plan{};
    plan.no_exchange = true;
    plan.fail_at = i;
    plan.fail_count = 2;
    std::string e;
    {
      hooked h;
      e = error_of([&] { fx.save_new(); });
    }
    if (fs::exists(fx.dir)) {
      CHECK(fx.state() == (e.empty() ? 1 : 0));
      fx.check_clean(true);
      continue;
    }
    ++stranded;  // no directory: the complete new one and the old one beside it
    CHECK_THAT(e, Contains("and so did the rename back of") && Contains("the next save to it renames"));
    const std::string pid = std::to_string(::getpid());
    CHECK(names_in(fx.tmp.dir) == std::set<std::string>{"sae.tmp." + pid, "sae.old." + pid});
    hsae::detail::recover_directory_save(fx.dir, hsae::sae_dir_files);  // what the next save does first
    CHECK(fx.state() == 1);
    fx.check_clean(true);
    fx.reset();
    // ... and the next save itself.
    {
      plan = fault_plan{};
      plan.no_exchange = true;
      plan.fail_at = i;
      plan.fail_count = 2;
      hooked h;
      error_of([&] { fx.save_new(); });
    }
    REQUIRE_FALSE(fs::exists(fx.dir));
    save(fx.f, fx.dir, fx.old_sae, fx.old_k);
    CHECK(fx.state() == 0);
    fx.check_clean(true);
  }
  CHECK(stranded == 1);
}

TEST_CASE("a directory save killed at any step leaves the old SAE or the new one; the next save recovers",
          "[sae_files][hostile][atomic_dir]") {
  for (const bool no_exchange : {false, true}) {
    INFO((no_exchange ? "two renames" : "exchange"));
    sae_dir_fixture fx(sae_file_format::saelens, true);
    plan = fault_plan{};
    plan.no_exchange = no_exchange;
    {
      hooked h;
      fx.save_new();
    }
    const int total = plan.calls;
    int between_renames = 0;
    for (int i = 0; i <= total; ++i) {
      INFO("killed at operation " << i << " of " << total);
      fx.reset();
      const pid_t child = ::fork();
      REQUIRE(child >= 0);
      if (child == 0) {
        plan = fault_plan{};
        plan.no_exchange = no_exchange;
        plan.crash_at = i;
        hsae::detail::fs_fault_hook().store(&fault_hook);
        try {
          fx.save_new();
        } catch (...) {
          ::_exit(1);
        }
        ::_exit(0);
      }
      int status = 0;
      REQUIRE(::waitpid(child, &status, 0) == child);
      REQUIRE(WIFEXITED(status));
      CHECK(WEXITSTATUS(status) == (i < total ? 42 : 0));
      const std::string tmp_name = "sae.tmp." + std::to_string(child), old_name = "sae.old." + std::to_string(child);
      if (fs::exists(fx.dir)) {
        const int s = fx.state();
        CHECK((s == 0 || s == 1));
      } else {  // between the two renames of the fallback
        ++between_renames;
        CHECK(no_exchange);
        CHECK(names_in(fx.tmp.dir) == std::set<std::string>{tmp_name, old_name});
      }
      const bool was_missing = !fs::exists(fx.dir);
      hsae::detail::recover_directory_save(fx.dir, hsae::sae_dir_files);
      const int s = fx.state();
      CHECK((s == 0 || s == 1));
      if (was_missing) CHECK(s == 1);  // rolled forward: the new directory was complete
      fx.check_clean(true);
    }
    CHECK(between_renames == (no_exchange ? 1 : 0));
    // A killed save, then the next save: it recovers and leaves nothing behind.
    fx.reset();
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      plan = fault_plan{};
      plan.crash_at = total / 2;
      hsae::detail::fs_fault_hook().store(&fault_hook);
      fx.save_new();
      ::_exit(0);
    }
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    CHECK(names_in(fx.tmp.dir).size() == 2);  // the directory and the dead writer's staging directory
    fx.save_new();
    CHECK(fx.state() == 1);
    fx.check_clean(true);
  }
}

TEST_CASE("a directory save keeps the user's files, the directory's mode, a symlink to it and the working directory",
          "[sae_files][hostile][atomic_dir]") {
  sae_dir_fixture fx(sae_file_format::saelens, true);
  struct stat before {};
  REQUIRE(::stat((fx.dir / "README.md").c_str(), &before) == 0);
  fs::permissions(fx.dir, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec);
  SECTION("the user's files are the same files, the mode is kept") {
    fx.save_new();
    CHECK(fx.state() == 1);
    fx.check_clean(true);
    struct stat after {};
    REQUIRE(::stat((fx.dir / "README.md").c_str(), &after) == 0);
    CHECK(after.st_ino == before.st_ino);
    CHECK(after.st_nlink == 1);
    CHECK((fs::status(fx.dir).permissions() & fs::perms::all) ==
          (fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec));
    // The other layout's weights are hsae's to replace: a sparsify save over a SAELens
    // directory leaves a sparsify directory (both weights files: no loader accepts it).
    save(sae_file_format::sparsify, fx.dir, fx.old_sae, 3);
    CHECK_FALSE(fs::exists(fx.dir / hsae::saelens_weights_file));
    CHECK(fs::exists(fx.dir / hsae::sparsify_weights_file));
    CHECK(hsae::detect_sae_format(fx.dir) == sae_file_format::sparsify);
    CHECK(fs::exists(fx.dir / "README.md"));
  }
  SECTION("a staging name taken by a link is refused, and nothing is deleted through it") {
    const fs::path victim = fx.tmp / "victim";
    fs::create_directory(victim);
    std::ofstream(victim / hsae::sae_config_file) << "{}";
    fs::create_directory_symlink(victim, fx.tmp / ("sae.tmp." + std::to_string(::getpid())));
    CHECK_THAT(error_of([&] { fx.save_new(); }), Contains("is taken by something that is not a directory"));
    CHECK(read_bytes(victim / hsae::sae_config_file) == "{}");
    CHECK(fx.state() == 0);
    fs::remove(fx.tmp / ("sae.tmp." + std::to_string(::getpid())));
  }
  SECTION("a subdirectory is refused, nothing changes") {
    fs::create_directory(fx.dir / "sub");
    std::ofstream(fx.dir / "sub" / "data") << "x";
    CHECK_THAT(error_of([&] { fx.save_new(); }),
               StartsWith("hsae: save (SAELens) '" + fx.dir.string() + "': holds the subdirectory 'sub'"));
    CHECK(fx.state() == 0);
    CHECK(names_in(fx.tmp.dir) == std::set<std::string>{"sae"});
    CHECK(read_bytes(fx.dir / "sub" / "data") == "x");
  }
  SECTION("a symlink to the directory stays a symlink") {
    fs::create_directory_symlink("sae", fx.tmp / "alias");
    save(sae_file_format::saelens, fx.tmp / "alias", fx.new_sae, fx.new_k);
    CHECK(fs::is_symlink(fx.tmp / "alias"));
    CHECK(fx.state() == 1);
    CHECK(names_in(fx.tmp.dir) == std::set<std::string>{"alias", "sae"});
  }
  SECTION("saving into the working directory") {
    const fs::path cwd = fs::current_path();
    fs::current_path(fx.dir);
    save(sae_file_format::saelens, ".", fx.new_sae, fx.new_k);
    const fs::path now = fs::current_path();
    const int s = which(sae_file_format::saelens, ".", fx.old_sae, fx.old_k, fx.new_sae, fx.new_k);
    fs::current_path(cwd);
    CHECK(now == fx.dir);
    CHECK(s == 1);
    fx.check_clean(true);
  }
}

TEST_CASE("the next directory save removes the temporary directories of writers that died, only what is theirs",
          "[sae_files][hostile][atomic_dir]") {
  sae_dir_fixture fx(sae_file_format::saelens, true);
  const std::string dead = std::to_string(dead_pid()), live = std::to_string(::getppid());
  const auto staged = [&](const std::string& name) {
    const fs::path d = fx.tmp / name;
    fs::create_directory(d);
    std::ofstream(d / hsae::sae_config_file) << "{}";
    std::ofstream(d / (std::string(hsae::saelens_weights_file) + ".tmp." + dead)) << "half";
    fs::create_hard_link(fx.dir / "README.md", d / "README.md");
    return d;
  };
  staged("sae.tmp." + dead);                          // a dead writer's: removed
  const fs::path live_dir = staged("sae.tmp." + live);  // a live one's: kept
  const fs::path with_user_file = staged("sae.old." + std::to_string(dead_pid()));
  std::ofstream(with_user_file / "notes.txt") << "not ours";  // kept, and its directory
  std::ofstream(with_user_file / "README.md.bak") << "not ours either";
  fx.save_new();
  CHECK(fx.state() == 1);
  CHECK(names_in(fx.tmp.dir) == std::set<std::string>{"sae", live_dir.filename().string(),
                                                      with_user_file.filename().string()});
  CHECK(names_in(live_dir).size() == 3);
  CHECK(names_in(with_user_file) == std::set<std::string>{"notes.txt", "README.md.bak"});
  CHECK(read_bytes(fx.dir / "README.md") == "mine");

  // Stale temporaries of the per-file protocol inside the directory: not carried over.
  std::ofstream(fx.dir / ("cfg.json.tmp." + dead)) << "x";
  std::ofstream(fx.dir / ("cfg.json.tmp." + live)) << "x";
  fx.save_new();
  CHECK_FALSE(fs::exists(fx.dir / ("cfg.json.tmp." + dead)));
  CHECK(fs::exists(fx.dir / ("cfg.json.tmp." + live)));
}

TEST_CASE("directory saves on a file system that fills up (tmpfs, where mounting is allowed)",
          "[sae_files][hostile][atomic_dir][tmpfs]") {
  hsae_test::temp_dir tmp;
  const fs::path mnt = tmp / "mnt";
  fs::create_directory(mnt);
  const std::string mount = "mount -t tmpfs -o size=256k tmpfs '" + mnt.string() + "' 2>/dev/null";
  if (::getuid() != 0 || std::system(mount.c_str()) != 0) {
    WARN("mounting a tmpfs is not allowed here: the fault-injection tests above cover the same steps");
    return;
  }
  struct unmount {
    fs::path p;
    ~unmount() { (void)std::system(("umount '" + p.string() + "'").c_str()); }
  } guard{mnt};
  const auto old_sae = random_sae(16, 256, 31), new_sae = random_sae(16, 320, 32);  // 33 KB and 41 KB of weights
  const fs::path dir = mnt / "sae";
  int failed = 0, saved = 0;
  for (int free_kb = 0; free_kb <= 112; free_kb += 4) {
    INFO(free_kb << " KiB free");
    std::error_code ec;
    fs::remove_all(dir, ec);
    fs::remove(mnt / "filler", ec);
    hsae::save_saelens(dir, old_sae, 8);
    std::ofstream(dir / "README.md") << "mine";
    // Fill the file system up to `free_kb`.
    const auto space = fs::space(mnt);
    const std::uintmax_t fill = space.available > std::uintmax_t(free_kb) * 1024 ? space.available - free_kb * 1024 : 0;
    {
      std::ofstream f(mnt / "filler", std::ios::binary);
      const std::string block(4096, 'x');
      for (std::uintmax_t n = 0; n + 4096 <= fill; n += 4096) f << block;
    }
    const std::string e = error_of([&] { hsae::save_saelens(dir, new_sae, 16); });
    const int s = which(sae_file_format::saelens, dir, old_sae, 8, new_sae, 16);
    if (e.empty()) {
      ++saved;
      CHECK(s == 1);
    } else {
      ++failed;
      CHECK_THAT(e, Contains("No space left on device"));
      CHECK(s == 0);
    }
    CHECK(names_in(mnt) == std::set<std::string>{"filler", "sae"});
    CHECK(names_in(dir) == std::set<std::string>{"README.md", "cfg.json", "sae_weights.safetensors"});
  }
  CHECK(failed > 0);
  CHECK(saved > 0);
}

TEST_CASE("a cfg.json with a NUL byte or a byte order mark is refused, as Python's json refuses it",
          "[sae_files][hostile]") {
  hsae_test::temp_dir tmp;
  const fs::path dir = tmp / "sae";
  hsae::save_saelens(dir, random_sae(4, 10, 7), 3);
  const std::string cfg = read_bytes(dir / hsae::sae_config_file);
  const std::string cases[] = {cfg + std::string("\0GARBAGE", 8), "\xef\xbb\xbf" + cfg};
  const char* messages[] = {"malformed JSON: NUL byte at offset",
                            "malformed JSON: the JSON text starts with a UTF-8 byte order mark"};
  for (int i = 0; i < 2; ++i) {
    { std::ofstream(dir / hsae::sae_config_file, std::ios::binary | std::ios::trunc) << cases[i]; }
    CHECK_THAT(error_of([&] { hsae::load_saelens(dir); }),
               StartsWith("hsae: SAELens config '") && Contains(messages[i]));
  }
}
