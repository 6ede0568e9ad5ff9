// SPDX-License-Identifier: Apache-2.0
// SAELens and sparsify SAE directories (io/sae_files.hpp): layout of what hsae writes,
// round trips, the loaders' rules (defaults, pre-6.0 SAELens configs, folded settings),
// conversion, and hostile files. The real Python loaders check the same files in
// tests/interop (ctest -L interop).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <hsae/cpu/encode.hpp>
#include <hsae/io/sae_files.hpp>
#include <hsae/rng.hpp>

#include "test_util.hpp"

namespace {

using hsae::safetensors_dtype;
using hsae::sae_file_format;
using json = nlohmann::json;

using hsae_test::random_sae;

hsae::row_matrix<float> random_batch(int b, int d, std::uint64_t seed) {
  hsae::rng g(seed);
  hsae::row_matrix<float> x(b, d);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = float(1.5 * g.normal() + 0.2);
  return x;
}

json read_json(const std::filesystem::path& p) {
  std::ifstream f(p);
  return json::parse(f);
}

void write_text(const std::filesystem::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
}

std::string read_bytes(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

template <class T>
T rounded(T v, safetensors_dtype dt) {
  if (dt == safetensors_dtype::f16) return T(hsae::half_to_float(hsae::double_to_half(double(v))));
  if (dt == safetensors_dtype::bf16) return T(hsae::bfloat16_to_float(hsae::double_to_bfloat16(double(v))));
  if (dt == safetensors_dtype::f32) return T(float(v));
  return v;
}

template <class A, class B>
void require_rounded_equal(const A& got, const B& want, safetensors_dtype dt) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  for (Eigen::Index i = 0; i < got.rows(); ++i)
    for (Eigen::Index j = 0; j < got.cols(); ++j) REQUIRE(got(i, j) == rounded(want(i, j), dt));
}

/// The message of the hsae::error the call throws ("" if none).
template <class Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const hsae::error& e) {
    return e.what();
  }
  return "";
}

/// Writes a SAELens directory by hand: `cfg` as cfg.json and the given tensors.
struct saelens_dir {
  hsae::row_matrix<float> W_enc, W_dec;  // SAELens orientation: W_enc [d_in, d_sae]
  hsae::vector<float> b_enc, b_dec;
  void write(const std::filesystem::path& dir, const json& cfg) const {
    std::filesystem::create_directories(dir);
    hsae::safetensors_writer w;
    w.add("W_enc", W_enc).add("W_dec", W_dec).add("b_enc", b_enc).add("b_dec", b_dec);
    w.write(dir / hsae::saelens_weights_file);
    write_text(dir / hsae::sae_config_file, cfg.dump());
  }
};

saelens_dir random_saelens(int d, int f, std::uint64_t seed) {
  const auto m = random_sae(d, f, seed);
  return {m.W_enc.transpose(), m.W_dec, m.b_enc, m.b_dec};
}

json saelens_cfg(int d, int f, int k) {
  return {{"architecture", "topk"}, {"d_in", d},    {"d_sae", f},
          {"k", k},                 {"dtype", "float32"}, {"metadata", {{"sae_lens_version", "6.54.12"}}}};
}

}  // namespace

TEST_CASE("SAELens layout: what hsae writes", "[sae_files]") {
  hsae_test::temp_dir tmp;
  const auto m = random_sae(6, 20, 1);
  hsae::sae_save_options opt;
  opt.metadata = {{"model_name", "gpt2"}, {"hook_name", "blocks.1.hook_resid_pre"}};
  hsae::save_saelens(tmp.dir, m, hsae::k_schedule<2, 4, 8>{}, opt);

  const json cfg = read_json(tmp / "cfg.json");
  // Every field of SAELens 6's TopKSAEConfig, and nothing else at the top level.
  std::vector<std::string> keys;
  for (auto it = cfg.begin(); it != cfg.end(); ++it) keys.push_back(it.key());
  CHECK(keys == std::vector<std::string>{"apply_b_dec_to_input", "architecture", "d_in", "d_sae", "device", "dtype",
                                         "k", "metadata", "normalize_activations", "rescale_acts_by_decoder_norm",
                                         "reshape_activations"});
  CHECK(cfg["architecture"] == "topk");
  CHECK(cfg["k"] == 8);
  CHECK(cfg["d_in"] == 6);
  CHECK(cfg["d_sae"] == 20);
  CHECK(cfg["dtype"] == "float32");
  CHECK(cfg["apply_b_dec_to_input"] == true);
  CHECK(cfg["rescale_acts_by_decoder_norm"] == false);
  CHECK(cfg["normalize_activations"] == "none");
  CHECK(cfg["metadata"]["sae_lens_version"] == "6.0.0");
  CHECK(cfg["metadata"]["model_name"] == "gpt2");
  CHECK(cfg["metadata"]["hsae_k_schedule"] == json{{"k", {2, 4, 8}}, {"weight", {1.0, 1.0, 1.0}}});

  const hsae::safetensors_file w(tmp / "sae_weights.safetensors");
  REQUIRE(w.tensors().size() == 4);
  CHECK(w.at("W_enc").shape == std::vector<std::int64_t>{6, 20});  // transposed
  CHECK(w.at("W_dec").shape == std::vector<std::int64_t>{20, 6});
  CHECK(w.at("b_enc").shape == std::vector<std::int64_t>{20});
  CHECK(w.at("b_dec").shape == std::vector<std::int64_t>{6});
  CHECK(w.read_matrix<float>("W_enc") == hsae::row_matrix<float>(m.W_enc.transpose()));
  CHECK(w.read_matrix<float>("W_dec") == m.W_dec);
  CHECK(json::parse(w.metadata().at("hsae_k_schedule")) == cfg["metadata"]["hsae_k_schedule"]);
}

TEST_CASE("sparsify layout: what hsae writes", "[sae_files]") {
  hsae_test::temp_dir tmp;
  const auto m = random_sae(6, 20, 2);
  hsae::save_sparsify(tmp.dir, m, 5);
  const json cfg = read_json(tmp / "cfg.json");
  // The fields of sparsify's SparseCoderConfig plus d_in, as SparseCoder.save_to_disk writes.
  for (const char* key : {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                          "skip_connection", "transcode", "d_in"})
    CHECK(cfg.contains(key));
  CHECK(cfg["activation"] == "topk");
  CHECK(cfg["num_latents"] == 20);
  CHECK(cfg["k"] == 5);
  CHECK(cfg["d_in"] == 6);
  CHECK(cfg["transcode"] == false);
  CHECK_FALSE(cfg.contains("hsae_k_schedule"));  // plain TopK
  const hsae::safetensors_file w(tmp / "sae.safetensors");
  REQUIRE(w.tensors().size() == 4);
  CHECK(w.at("encoder.weight").shape == std::vector<std::int64_t>{20, 6});  // = hsae's W_enc
  CHECK(w.at("encoder.bias").shape == std::vector<std::int64_t>{20});
  CHECK(w.at("W_dec").shape == std::vector<std::int64_t>{20, 6});
  CHECK(w.at("b_dec").shape == std::vector<std::int64_t>{6});
  CHECK(w.read_matrix<float>("encoder.weight") == m.W_enc);
  CHECK(w.metadata().at("format") == "pt");
}

TEST_CASE("save and load round trip in both layouts and all dtypes", "[sae_files]") {
  hsae_test::temp_dir tmp;
  const auto m = random_sae(8, 24, 3);
  const auto sched = hsae::dynamic_k_schedule({{2, 1.0}, {6, 0.5}});
  const auto x = random_batch(16, 8, 4);
  const hsae::cpu_backend be{};
  for (const auto fmt : {sae_file_format::saelens, sae_file_format::sparsify}) {
    for (const auto dt : {safetensors_dtype::f32, safetensors_dtype::f16, safetensors_dtype::bf16,
                          safetensors_dtype::f64}) {
      DYNAMIC_SECTION(hsae::sae_file_format_name(fmt) << " " << hsae::safetensors_dtype_name(dt)) {
        const auto dir = tmp / "sae";
        hsae::sae_save_options opt;
        opt.dtype = dt;
        opt.metadata = {{"hook_name", "h"}};
        if (fmt == sae_file_format::saelens) hsae::save_saelens(dir, m, sched, opt);
        else hsae::save_sparsify(dir, m, sched, opt);
        CHECK(hsae::detect_sae_format(dir) == fmt);
        const auto l = hsae::load_sae_dir<float>(dir);
        CHECK(l.format == fmt);
        CHECK(l.k == 6);
        REQUIRE(l.schedule.has_value());
        CHECK(*l.schedule == sched);
        CHECK(l.storage_dtype == dt);
        CHECK(l.metadata["hook_name"] == "h");
        CHECK(l.adjustments.empty());
        require_rounded_equal(l.model.W_enc, m.W_enc, dt == safetensors_dtype::f64 ? safetensors_dtype::f32 : dt);
        require_rounded_equal(l.model.W_dec, m.W_dec, dt == safetensors_dtype::f64 ? safetensors_dtype::f32 : dt);
        require_rounded_equal(l.model.b_enc, m.b_enc, dt == safetensors_dtype::f64 ? safetensors_dtype::f32 : dt);
        require_rounded_equal(l.model.b_dec, m.b_dec, dt == safetensors_dtype::f64 ? safetensors_dtype::f32 : dt);
        if (dt == safetensors_dtype::f32) {
          // Bitwise the same model: the same code and reconstruction.
          const auto c0 = hsae::encode(be, m, x, 6);
          const auto c1 = hsae::encode(be, l.model, x, l.k);
          CHECK(hsae_test::bitwise_equal(c0.values, c1.values));
          CHECK(c0.indices == c1.indices);
          CHECK(hsae_test::bitwise_equal(hsae::decode(be, m, c0, 6), hsae::decode(be, l.model, c1, 6)));
        }
      }
    }
  }
}

TEST_CASE("double models keep every bit through F64 files; fixed widths and compile-time schedules save", "[sae_files]") {
  hsae_test::temp_dir tmp;
  const auto m = random_sae<double>(5, 12, 5);
  hsae::sae_save_options opt;
  opt.dtype = safetensors_dtype::f64;
  hsae::save_sparsify(tmp / "d", m, hsae::all_prefixes<4>{}, opt);
  const auto l = hsae::load_sparsify<double>(tmp / "d");
  CHECK(hsae_test::bitwise_equal(l.model.W_enc, m.W_enc));
  CHECK(hsae_test::bitwise_equal(l.model.W_dec, m.W_dec));
  CHECK(l.schedule->size() == 4);
  CHECK(l.k == 4);

  hsae::sae<float, 16> fixed(4);
  fixed.W_dec.setOnes();
  fixed.W_enc.setOnes();
  hsae::save_saelens(tmp / "f", fixed, hsae::multi_topk<2>{});
  const auto lf = hsae::load_saelens(tmp / "f");
  CHECK(lf.model.d_sae() == 16);
  CHECK(lf.k == 8);
  CHECK(*lf.schedule == hsae::dynamic_k_schedule::multi_topk(2));
}

TEST_CASE("saving refuses bad k, dtypes, metadata and non-finite weights", "[sae_files]") {
  hsae_test::temp_dir tmp;
  auto m = random_sae(4, 10, 6);
  CHECK_THROWS_AS(hsae::save_saelens(tmp / "a", m, 11), hsae::config_error);
  CHECK_THROWS_AS(hsae::save_sparsify(tmp / "a", m, 0), hsae::config_error);
  hsae::sae_save_options opt;
  opt.dtype = safetensors_dtype::i32;
  CHECK_THROWS_AS(hsae::save_saelens(tmp / "a", m, 3, opt), hsae::config_error);
  opt = {};
  opt.metadata = json::array();
  CHECK_THROWS_AS(hsae::save_saelens(tmp / "a", m, 3, opt), hsae::config_error);
  m.b_enc(3) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(hsae::save_sparsify(tmp / "a", m, 3), hsae::numeric_error);
  CHECK_FALSE(std::filesystem::exists(tmp / "a" / "sae.safetensors"));
}

TEST_CASE("SAELens rules: folded settings compute what SAELens computes", "[sae_files]") {
  // SAELens' TopKSAE.encode: h = (x - b_dec * apply_b_dec_to_input) W_enc + b_enc,
  // h *= ||W_dec[i]|| if rescale_acts_by_decoder_norm, then top-k and ReLU; decode:
  // acts / ||W_dec[i]|| (if rescaled) @ W_dec + b_dec. Reproduced here in double.
  hsae_test::temp_dir tmp;
  const int d = 7, f = 30, k = 5;
  auto s = random_saelens(d, f, 7);
  for (Eigen::Index i = 0; i < f; ++i) s.W_dec.row(i) *= float(0.2 + 0.1 * double(i));  // varied norms
  const auto x = random_batch(12, d, 8);
  const hsae::cpu_backend be{};
  for (const bool apply : {true, false}) {
    for (const bool rescale : {false, true}) {
      DYNAMIC_SECTION("apply_b_dec_to_input=" << apply << " rescale=" << rescale) {
        json cfg = saelens_cfg(d, f, k);
        cfg["apply_b_dec_to_input"] = apply;
        cfg["rescale_acts_by_decoder_norm"] = rescale;
        s.write(tmp / "s", cfg);
        const auto l = hsae::load_saelens(tmp / "s");
        CHECK(l.adjustments.size() == std::size_t(!apply) + std::size_t(rescale));
        const auto code = hsae::encode(be, l.model, x, l.k);
        const auto recon = hsae::decode(be, l.model, code, l.k);
        const Eigen::MatrixXd We = s.W_enc.cast<double>(), Wd = s.W_dec.cast<double>();
        const Eigen::VectorXd norms = Wd.rowwise().norm();
        for (Eigen::Index b = 0; b < x.rows(); ++b) {
          Eigen::RowVectorXd xin = x.row(b).cast<double>();
          if (apply) xin -= s.b_dec.cast<double>().transpose();
          Eigen::RowVectorXd h = xin * We + s.b_enc.cast<double>().transpose();
          if (rescale) h = h.cwiseProduct(norms.transpose());
          std::vector<std::pair<double, int>> order;
          for (int i = 0; i < f; ++i) order.emplace_back(h(i), i);
          std::sort(order.begin(), order.end(), [](auto a, auto c) { return a.first > c.first; });
          Eigen::RowVectorXd out = s.b_dec.cast<double>().transpose();
          for (int t = 0; t < k; ++t) {
            const double v = std::max(order[std::size_t(t)].first, 0.0);
            const int i = order[std::size_t(t)].second;
            REQUIRE(code.indices(b, t) == i);
            REQUIRE(code.values(b, t) == Approx(v).margin(1e-4).epsilon(1e-5));
            out += (rescale ? v / norms(i) : v) * Wd.row(i);
          }
          for (int j = 0; j < d; ++j) REQUIRE(recon(b, j) == Approx(out(j)).margin(1e-4).epsilon(1e-5));
        }
      }
    }
  }
}

TEST_CASE("SAELens rules: defaults, dtypes, architectures and the pre-6.0 config", "[sae_files]") {
  hsae_test::temp_dir tmp;
  auto s = random_saelens(6, 120, 9);
  SECTION("k defaults to 100 and dtype to float32") {
    json cfg = saelens_cfg(6, 120, 1);
    cfg.erase("k");
    cfg.erase("dtype");
    s.write(tmp / "s", cfg);
    const auto l = hsae::load_saelens(tmp / "s");
    CHECK(l.k == 100);
    CHECK_FALSE(l.schedule.has_value());
  }
  SECTION("the config's dtype rounds the weights, as SAELens converts them") {
    json cfg = saelens_cfg(6, 120, 10);
    cfg["dtype"] = "torch.bfloat16";
    s.write(tmp / "s", cfg);
    const auto l = hsae::load_saelens(tmp / "s");
    CHECK(l.storage_dtype == safetensors_dtype::f32);
    require_rounded_equal(l.model.W_dec, s.W_dec, safetensors_dtype::bf16);
  }
  SECTION("a standard (ReLU) SAE is TopK with k = d_sae") {
    json cfg = saelens_cfg(6, 120, 10);
    cfg["architecture"] = "standard";
    s.write(tmp / "s", cfg);
    CHECK(hsae::load_saelens(tmp / "s").k == 120);
  }
  SECTION("other architectures are named") {
    json cfg = saelens_cfg(6, 120, 10);
    cfg["architecture"] = "jumprelu";
    s.write(tmp / "s", cfg);
    CHECK_THAT(error_of([&] { hsae::load_saelens(tmp / "s"); }),
               Catch::Contains("cfg.json") && Catch::Contains("'jumprelu' is not supported"));
    cfg["architecture"] = "jumprelu_v2";
    s.write(tmp / "s", cfg);
    CHECK_THAT(error_of([&] { hsae::load_saelens(tmp / "s"); }), Catch::Contains("unknown architecture"));
  }
  SECTION("pre-6.0: renamed keys, topk from activation_fn_kwargs, metadata from the top level") {
    const json old = {{"d_in", 6},
                      {"d_sae", 120},
                      {"activation_fn_str", "topk"},
                      {"activation_fn_kwargs", {{"k", 7}}},
                      {"hook_point", "blocks.4.hook_resid_post"},
                      {"model_name", "pythia"},
                      {"normalize_activations", false},
                      {"sae_lens_version", "3.0.0"}};
    s.write(tmp / "s", old);
    const auto l = hsae::load_saelens(tmp / "s");
    CHECK(l.k == 7);
    CHECK(l.metadata["hook_name"] == "blocks.4.hook_resid_post");
    CHECK(l.metadata["model_name"] == "pythia");
    CHECK_THAT(l.adjustments.at(0), Catch::Contains("pre-6.0"));
    // Without sae_lens_version and without activation_fn: a standard SAE.
    json bare = {{"d_in", 6}, {"d_sae", 120}};
    s.write(tmp / "s", bare);
    CHECK(hsae::load_saelens(tmp / "s").k == 120);
  }
  SECTION("run-time normalisation is refused, inference no-ops are accepted") {
    json cfg = saelens_cfg(6, 120, 10);
    cfg["normalize_activations"] = "layer_norm";
    s.write(tmp / "s", cfg);
    CHECK_THAT(error_of([&] { hsae::load_saelens(tmp / "s"); }), Catch::Contains("layer_norm"));
    cfg["normalize_activations"] = "expected_average_only_in";
    s.write(tmp / "s", cfg);
    CHECK(hsae::load_saelens(tmp / "s").adjustments.size() == 1);
    cfg["normalize_activations"] = "sometimes";
    s.write(tmp / "s", cfg);
    CHECK_THAT(error_of([&] { hsae::load_saelens(tmp / "s"); }), Catch::Contains("invalid normalize_activations"));
  }
}

TEST_CASE("SAELens version rule: PEP 440 comparison with 6.0.0rc0", "[sae_files]") {
  using hsae::detail::saelens_version_at_least_6;
  for (const char* v : {"6.0.0", "6.0.0-rc.0", "6.0.0rc1", "6.54.12", "v6.1", "6", "7.0.0.dev3", "6.0.0.post1",
                        "6.0.1a1", "1!2.0", "6.0.0+local.1"})
    CHECK(saelens_version_at_least_6(v) == std::optional<bool>(true));
  for (const char* v : {"5.9.1", "3.0.0", "6.0.0a1", "6.0.0b2", "6.0.0.dev1", "0.1"})
    CHECK(saelens_version_at_least_6(v) == std::optional<bool>(false));
  for (const char* v : {"", "six", "6.0.0-", "6..0", "6.0.0+", "6.0 beta x"})
    CHECK_FALSE(saelens_version_at_least_6(v).has_value());
}

TEST_CASE("sparsify rules: defaults and refused settings", "[sae_files]") {
  hsae_test::temp_dir tmp;
  const auto m = random_sae(4, 12, 10);
  hsae::save_sparsify(tmp / "s", m, 3);
  json cfg = read_json(tmp / "s" / "cfg.json");
  SECTION("num_latents 0 means d_in * expansion_factor; k defaults to 32") {
    cfg.erase("num_latents");
    cfg["expansion_factor"] = 3;
    cfg.erase("k");
    write_text(tmp / "s" / "cfg.json", cfg.dump());
    CHECK_THAT(error_of([&] { hsae::load_sparsify(tmp / "s"); }), Catch::Contains("k=32 must be in [1, num_latents=12]"));
    cfg["k"] = 4;
    write_text(tmp / "s" / "cfg.json", cfg.dump());
    CHECK(hsae::load_sparsify(tmp / "s").model.d_sae() == 12);
  }
  SECTION("what hsae cannot express is named") {
    for (const auto& [key, value, what] : {std::tuple{"activation", json("groupmax"), "groupmax"},
                                           std::tuple{"transcode", json(true), "transcode"},
                                           std::tuple{"skip_connection", json(true), "skip_connection"},
                                           std::tuple{"activation", json("relu"), "unknown activation"}}) {
      json c = cfg;
      c[key] = value;
      write_text(tmp / "s" / "cfg.json", c.dump());
      CHECK_THAT(error_of([&] { hsae::load_sparsify(tmp / "s"); }),
                 Catch::Contains("cfg.json") && Catch::Contains(what));
    }
  }
  SECTION("the model dtype is the first tensor's (by name), as sparsify takes it") {
    hsae::safetensors_writer w;
    w.add("W_dec", m.W_dec, safetensors_dtype::bf16)
        .add("b_dec", m.b_dec)
        .add("encoder.bias", m.b_enc)
        .add("encoder.weight", m.W_enc);
    w.write(tmp / "s" / "sae.safetensors");
    const auto l = hsae::load_sparsify(tmp / "s");
    require_rounded_equal(l.model.W_enc, m.W_enc, safetensors_dtype::bf16);  // converted to W_dec's BF16
    CHECK(l.storage_dtype == safetensors_dtype::bf16);
  }
}

TEST_CASE("conversion keeps the function, the schedule and the metadata", "[sae_files]") {
  hsae_test::temp_dir tmp;
  auto s = random_saelens(5, 16, 11);
  json cfg = saelens_cfg(5, 16, 4);
  cfg["apply_b_dec_to_input"] = false;
  cfg["metadata"]["hook_name"] = "h";
  cfg["metadata"]["hsae_k_schedule"] = {{"k", {1, 4}}, {"weight", {2.0, 1.0}}};
  s.write(tmp / "a", cfg);
  hsae::convert_sae_dir(tmp / "a", tmp / "b", sae_file_format::sparsify);
  hsae::convert_sae_dir(tmp / "b", tmp / "c", sae_file_format::saelens, safetensors_dtype::f64);
  const auto a = hsae::load_sae_dir<double>(tmp / "a");
  const auto c = hsae::load_sae_dir<double>(tmp / "c");
  CHECK(c.format == sae_file_format::saelens);
  CHECK(c.storage_dtype == safetensors_dtype::f64);
  CHECK(*c.schedule == *a.schedule);
  CHECK(c.metadata["hook_name"] == "h");
  CHECK(c.adjustments.empty());  // the fold happened once, at the first load
  CHECK((c.model.b_enc - a.model.b_enc).cwiseAbs().maxCoeff() < 1e-6);
  CHECK(c.model.W_enc == a.model.W_enc);
  CHECK(error_of([&] { hsae::detect_sae_format(tmp.dir); }).find("neither") != std::string::npos);
}

TEST_CASE("hostile SAE files: errors name the file and the problem", "[sae_files][hostile]") {
  hsae_test::temp_dir tmp;
  const auto m = random_sae(4, 10, 12);
  hsae::save_saelens(tmp / "s", m, 3);
  hsae::save_sparsify(tmp / "p", m, 3);
  const std::string s_cfg = read_bytes(tmp / "s" / "cfg.json"), s_w = read_bytes(tmp / "s" / "sae_weights.safetensors");
  const std::string p_cfg = read_bytes(tmp / "p" / "cfg.json"), p_w = read_bytes(tmp / "p" / "sae.safetensors");
  auto as_bytes = [](const std::string& s) {
    return std::span<const std::byte>(reinterpret_cast<const std::byte*>(s.data()), s.size());
  };
  auto saelens = [&](const std::string& cfg, const std::string& w) {
    return error_of([&] { hsae::load_saelens_buffers(cfg, as_bytes(w), "C.json", "W.safetensors"); });
  };
  auto sparsify = [&](const std::string& cfg, const std::string& w) {
    return error_of([&] { hsae::load_sparsify_buffers(cfg, as_bytes(w), "C.json", "W.safetensors"); });
  };
  REQUIRE(saelens(s_cfg, s_w).empty());
  REQUIRE(sparsify(p_cfg, p_w).empty());

  SECTION("every truncation of either file") {
    for (std::size_t n = 0; n < s_w.size(); ++n) REQUIRE_THAT(saelens(s_cfg, s_w.substr(0, n)), Catch::Contains("W.safetensors"));
    for (std::size_t n = 0; n < p_w.size(); ++n) REQUIRE_THAT(sparsify(p_cfg, p_w.substr(0, n)), Catch::Contains("W.safetensors"));
    for (std::size_t n = 0; n + 2 < s_cfg.size(); ++n) REQUIRE_THAT(saelens(s_cfg.substr(0, n), s_w), Catch::Contains("C.json"));
    for (std::size_t n = 0; n + 2 < p_cfg.size(); ++n) REQUIRE_THAT(sparsify(p_cfg.substr(0, n), p_w), Catch::Contains("C.json"));
  }
  SECTION("config keys and types") {
    using Catch::Contains;
    auto edit = [&](const std::string& text, auto&& fn) {
      json j = json::parse(text);
      fn(j);
      return j.dump();
    };
    CHECK_THAT(saelens("{", s_w), Contains("malformed JSON"));
    CHECK_THAT(saelens("[]", s_w), Contains("not a JSON object"));
    CHECK_THAT(saelens(std::string(300, '[') + std::string(300, ']'), s_w), Contains("nested more than 256 levels"));
    CHECK(saelens(edit(s_cfg, [](json& j) { j["metadata"]["deep"] = json::parse("[[[[[[1]]]]]]"); }), s_w).empty());
    CHECK_THAT(saelens(edit(s_cfg, [](json& j) { j.erase("d_in"); }), s_w), Contains("missing key 'd_in'"));
    CHECK_THAT(saelens(edit(s_cfg, [](json& j) { j["d_sae"] = "10"; }), s_w), Contains("'d_sae' is \"10\""));
    CHECK_THAT(saelens(edit(s_cfg, [](json& j) { j["d_sae"] = -10; }), s_w), Contains("out of range"));
    CHECK_THAT(saelens(edit(s_cfg, [](json& j) { j["k"] = 11; }), s_w), Contains("k=11 must be in [1, d_sae=10]"));
    CHECK_THAT(saelens(edit(s_cfg, [](json& j) { j["dtype"] = "int8"; }), s_w), Contains("invalid dtype 'int8'"));
    CHECK_THAT(saelens(edit(s_cfg, [](json& j) { j["apply_b_dec_to_input"] = "yes"; }), s_w), Contains("true/false"));
    CHECK_THAT(saelens(edit(s_cfg, [](json& j) { j["metadata"]["sae_lens_version"] = "v?"; }), s_w),
               Contains("not a valid version"));
    CHECK_THAT(saelens(edit(s_cfg, [](json& j) { j["metadata"]["hsae_k_schedule"] = {{"k", {3, 2}}, {"weight", {1, 1}}}; }), s_w),
               Contains("hsae_k_schedule") && Contains("not strictly increasing"));
    CHECK_THAT(sparsify(edit(p_cfg, [](json& j) { j.erase("d_in"); }), p_w), Contains("missing key 'd_in'"));
    CHECK_THAT(sparsify(edit(p_cfg, [](json& j) { j["num_latents"] = 11; }), p_w),
               Contains("'encoder.weight' has shape [10, 4], expected [11, 4]"));
    CHECK_THAT(sparsify(edit(p_cfg, [](json& j) { j["hsae_k_schedule"] = 5; }), p_w), Contains("malformed hsae_k_schedule"));
  }
  SECTION("tensors: names, shapes, orientation, dtypes, values") {
    using Catch::Contains;
    const hsae::row_matrix<float> wt = m.W_enc;  // hsae orientation: wrong for SAELens
    const hsae::row_matrix<float> W_enc_t = m.W_enc.transpose();
    hsae::row_matrix<float> nan_dec = m.W_dec;
    nan_dec(2, 1) = std::numeric_limits<float>::quiet_NaN();
    auto file = [](auto&&... add) {
      hsae::safetensors_writer w;
      (add(w), ...);
      const auto b = w.serialize();
      return std::string(reinterpret_cast<const char*>(b.data()), b.size());
    };
    auto t = [](const char* name, const auto& v, safetensors_dtype dt = safetensors_dtype::f32) {
      return [name, &v, dt](hsae::safetensors_writer& w) { w.add(name, v, dt); };
    };
    CHECK_THAT(saelens(s_cfg, file(t("W_enc", W_enc_t), t("W_dec", m.W_dec), t("b_enc", m.b_enc))),
               Contains("W.safetensors") && Contains("missing tensor 'b_dec'"));
    CHECK_THAT(saelens(s_cfg, file(t("W_enc", W_enc_t), t("W_dec", m.W_dec), t("b_enc", m.b_enc), t("b_dec", m.b_dec),
                                   t("threshold", m.b_enc))),
               Contains("unexpected tensor 'threshold'"));
    CHECK_THAT(saelens(s_cfg, file(t("W_enc", wt), t("W_dec", m.W_dec), t("b_enc", m.b_enc), t("b_dec", m.b_dec))),
               Contains("'W_enc' has shape [10, 4], expected [4, 10]"));
    const std::string nan_file = file(t("W_enc", W_enc_t), t("W_dec", nan_dec), t("b_enc", m.b_enc), t("b_dec", m.b_dec));
    CHECK_THAT(saelens(s_cfg, nan_file),
               Contains("W.safetensors") && Contains("'W_dec' contains a non-finite value (nan) at [2, 1]"));
    CHECK_THROWS_AS(hsae::load_saelens_buffers(s_cfg, as_bytes(nan_file), "C", "W"), hsae::numeric_error);
    const hsae::vector<float> twos = hsae::vector<float>::Constant(10, 2.0f);
    CHECK_THAT(saelens(s_cfg, file(t("W_enc", W_enc_t), t("W_dec", m.W_dec), t("b_enc", m.b_enc), t("b_dec", m.b_dec),
                                   t("scaling_factor", twos))),
               Contains("scaling_factor"));
    // f16 overflow: the value is finite in the file's F32 but not once converted as the
    // config says.
    hsae::row_matrix<float> big = m.W_dec;
    big(0, 0) = 1e6f;
    std::string cfg16 = s_cfg;
    {
      json j = json::parse(s_cfg);
      j["dtype"] = "float16";
      cfg16 = j.dump();
    }
    CHECK_THAT(saelens(cfg16, file(t("W_enc", W_enc_t), t("W_dec", big), t("b_enc", m.b_enc), t("b_dec", m.b_dec))),
               Contains("W_dec (converted to float16)"));
  }
  SECTION("missing files") {
    CHECK_THAT(error_of([&] { hsae::load_saelens(tmp / "p"); }), Catch::Contains("sae_weights.safetensors"));
    std::filesystem::remove(tmp / "s" / "cfg.json");
    CHECK_THAT(error_of([&] { hsae::load_saelens(tmp / "s"); }),
               Catch::Contains("cfg.json") && Catch::Contains("cannot open"));
  }
}
