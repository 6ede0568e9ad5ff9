// SPDX-License-Identifier: Apache-2.0
/// \file io/sae_files.hpp
/// SAE directories in the layouts of the two Python tools, so that an SAE trained with
/// hsae opens in them and theirs open in hsae without a converter:
///
///  - **SAELens** (6.x): `cfg.json` + `sae_weights.safetensors`, architecture "topk":
///    `W_enc [d_in, d_sae]` (hsae's W_enc transposed), `b_enc [d_sae]`,
///    `W_dec [d_sae, d_in]`, `b_dec [d_in]`; config keys d_in, d_sae, k, dtype, device,
///    apply_b_dec_to_input, normalize_activations, reshape_activations,
///    rescale_acts_by_decoder_norm, architecture and a free-form "metadata" object.
///  - **sparsify** (EleutherAI, 1.x): `cfg.json` + `sae.safetensors`:
///    `encoder.weight [num_latents, d_in]` (= hsae's W_enc), `encoder.bias [num_latents]`,
///    `W_dec [num_latents, d_in]`, `b_dec [d_in]`; config keys activation,
///    expansion_factor, normalize_decoder, num_latents, k, multi_topk, skip_connection,
///    transcode and d_in.
///
/// All three models compute `ReLU((x - b_dec) W_enc^T + b_enc)`, keep the top k and
/// decode `b_dec + sum v_i W_dec[i]`, so a file means the same function in each tool.
/// A HierarchicalTopK SAE is saved as a TopK SAE with k = K_max, which is exact at
/// inference; its k-schedule is kept as "hsae_k_schedule" (`{"k": [...], "weight":
/// [...]}`) in the config (SAELens: inside "metadata", which SAELens carries through
/// its own load/save; sparsify: top level, ignored by sparsify) and in the safetensors
/// `__metadata__`.
///
/// Loading reproduces what each tool's own loader does with a file (see the README of
/// tests/interop, where the real loaders check it): defaults of missing keys, the
/// SAELens pre-6.0 config rules, conversion of every weight to the config's dtype
/// (SAELens) or to the first tensor's dtype (sparsify), and strict tensor names.
/// Settings that hsae's model expresses exactly are folded into the weights:
/// `apply_b_dec_to_input=false` (b_enc += W_enc b_dec), `rescale_acts_by_decoder_norm`
/// (encoder rows and b_enc scaled by, decoder rows divided by, the decoder row norms),
/// SAELens "standard" (ReLU) SAEs (k = d_sae). What it cannot express (other
/// architectures, run-time input normalisation, transcoders, skip connections, groupmax)
/// raises hsae::io_error naming the file and the setting. Non-finite weights raise
/// hsae::numeric_error naming the file and the tensor.
///
/// Saving replaces the SAE directory as a whole (detail::atomic_dir): a save that fails
/// or is killed at any point leaves either the old SAE or the new one.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../config.hpp"
#include "../detail/files.hpp"
#include "../error.hpp"
#include "../k_schedule.hpp"
#include "../matrix.hpp"
#include "../model.hpp"
#include "../version.hpp"
#include "detail/pep440.hpp"
#include "sae_types.hpp"
#include "safetensors.hpp"

HSAE_NAMESPACE_BEGIN

namespace detail {

// --- Helpers ---------------------------------------------------------------------------

/// Throws hsae::io_error "<prefix><message>": names the file in every parser error.
struct file_error {
  std::string prefix;
  template <class... Args>
  [[noreturn]] void operator()(Args&&... args) const {
    throw io_error(printable_utf8(concat("hsae: ", prefix, std::forward<Args>(args)...)));
  }
};

inline nlohmann::json schedule_to_json(const dynamic_k_schedule& s) {
  nlohmann::json ks = nlohmann::json::array(), ws = nlohmann::json::array();
  for (std::size_t l = 0; l < s.size(); ++l) {
    ks.push_back(s.k(l));
    ws.push_back(s.weight(l));
  }
  return {{"k", ks}, {"weight", ws}};
}

/// Parses {"k": [...], "weight": [...]}. \throws hsae::io_error via `fail`.
inline dynamic_k_schedule schedule_from_json(const nlohmann::json& j, const file_error& fail) {
  if (!j.is_object() || !j.contains("k") || !j.contains("weight") || !j["k"].is_array() || !j["weight"].is_array())
    fail("malformed hsae_k_schedule: expected {\"k\": [...], \"weight\": [...]}");
  const auto& ks = j["k"];
  const auto& ws = j["weight"];
  if (ks.size() != ws.size()) fail("malformed hsae_k_schedule: ", ks.size(), " ks but ", ws.size(), " weights");
  std::vector<schedule_level> lv;
  for (std::size_t i = 0; i < ks.size(); ++i) {
    if (!ks[i].is_number_integer() || ks[i].get<std::int64_t>() < 1 ||
        ks[i].get<std::int64_t>() > std::numeric_limits<int>::max())
      fail("malformed hsae_k_schedule: k ", ks[i].dump(), " is not a positive integer");
    if (!ws[i].is_number()) fail("malformed hsae_k_schedule: weight ", ws[i].dump(), " is not a number");
    lv.push_back({int(ks[i].get<std::int64_t>()), ws[i].get<double>()});
  }
  try {
    return dynamic_k_schedule(std::move(lv));
  } catch (const config_error& e) {
    fail("malformed hsae_k_schedule: ", without_hsae_prefix(e.what()));
  }
}

/// hsae's k-schedule: the `hsae_k_schedule` entry of `cfg` (a JSON object) first, then
/// that of the weights file's metadata; nullopt when neither has one. A schedule whose
/// k_max exceeds the SAE's width (`width_key`=`width`) is refused: its largest prefix
/// would keep more latents than there are.
inline std::optional<dynamic_k_schedule> find_schedule(const nlohmann::json& cfg,
                                                       const std::map<std::string, std::string>& tensor_metadata,
                                                       std::string_view width_key, std::int64_t width,
                                                       const file_error& fail, const file_error& failw) {
  const auto checked = [&](dynamic_k_schedule s, const file_error& where) {
    if (s.k_max() > width) where("hsae_k_schedule has k_max=", s.k_max(), " > ", width_key, "=", width);
    return s;
  };
  if (cfg.contains("hsae_k_schedule")) return checked(schedule_from_json(cfg["hsae_k_schedule"], fail), fail);
  const auto it = tensor_metadata.find("hsae_k_schedule");
  if (it == tensor_metadata.end()) return std::nullopt;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(it->second);
  } catch (const nlohmann::json::exception& e) {
    failw("malformed hsae_k_schedule metadata: ", e.what());
  }
  return checked(schedule_from_json(j, failw), failw);
}

/// Parses a cfg.json: Python's json.load rules (a repeated key keeps its last value),
/// nesting limited to 256 levels.
inline nlohmann::json parse_config_json(std::string_view text, const std::string& where, std::string_view tool) {
  nlohmann::json cfg;
  try {
    cfg = parse_json_strict(text, 256, /*unique_keys=*/false, [&](const std::string& what) {
      throw io_error(printable_utf8(concat("hsae: ", tool, " config '", where, "': malformed JSON: ", what)));
    });
  } catch (const nlohmann::json::exception& e) {
    throw io_error(printable_utf8(concat("hsae: ", tool, " config '", where, "': malformed JSON: ", e.what())));
  }
  if (!cfg.is_object()) throw_error<io_error>(tool, " config '", where, "': not a JSON object");
  return cfg;
}

/// Reads a whole small file (a config) into a string.
inline std::string read_text_file(const std::filesystem::path& path, std::string_view kind) {
  const mapped_file m(path, kind);
  const auto b = m.bytes();
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}

/// Rounds every entry through a narrower dtype, as a tool that converts the weights to
/// that dtype does (F32/F64: unchanged).
template <class Derived>
void round_through(safetensors_dtype dt, Eigen::MatrixBase<Derived>& m) {
  using S = typename Derived::Scalar;
  auto& d = m.derived();
  if (dt == safetensors_dtype::f16)
    d = d.unaryExpr([](S v) { return S(half_to_float(double_to_half(double(v)))); });
  else if (dt == safetensors_dtype::bf16)
    d = d.unaryExpr([](S v) { return S(bfloat16_to_float(double_to_bfloat16(double(v)))); });
  else if (dt == safetensors_dtype::f32 && !std::is_same_v<S, float>)
    d = d.unaryExpr([](S v) { return S(float(v)); });
}

template <class Derived>
void expect_finite_tensor(const std::string& where, std::string_view tool, std::string_view tensor,
                          const Eigen::MatrixBase<Derived>& m) {
  if (all_finite(m)) [[likely]] return;
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j)
      if (!std::isfinite(double(m(i, j))))
        throw_error<numeric_error>(tool, " weights '", where, "': tensor '", tensor,
                                   "' contains a non-finite value (", double(m(i, j)), ") at [", i, ", ", j, "]");
}

/// b_enc += W_enc b_dec (accumulated in double): turns `x W_enc^T + b_enc` into hsae's
/// `(x - b_dec) W_enc^T + b_enc`.
template <cpu_scalar T>
void fold_b_dec_into_b_enc(sae<T>& m) {
  const Eigen::VectorXd shift = m.W_enc.template cast<double>() * m.b_dec.template cast<double>();
  m.b_enc = (m.b_enc.template cast<double>() + shift).template cast<T>();
}

/// Folds per-latent decoder norms: pre-activations scaled by ||W_dec[i]|| and
/// activations divided by it at decode time equal encoder rows and b_enc scaled and
/// decoder rows divided. A zero decoder row is left as is.
template <cpu_scalar T>
void fold_decoder_norms(sae<T>& m) {
  for (Eigen::Index i = 0; i < m.W_dec.rows(); ++i) {
    const double n = m.W_dec.row(i).template cast<double>().norm();
    if (n == 0) continue;
    m.W_enc.row(i) = (m.W_enc.row(i).template cast<double>() * n).template cast<T>();
    m.b_enc(i) = T(double(m.b_enc(i)) * n);
    m.W_dec.row(i) = (m.W_dec.row(i).template cast<double>() / n).template cast<T>();
  }
}

template <cpu_scalar T, int F>
void check_for_save(const sae<T, F>& m, int k, const sae_save_options& opt, std::string_view tool,
                    const std::filesystem::path& dir) {
  m.check_shapes();
  expects<config_error>(k >= 1 && k <= m.d_sae(), "save (", tool, ") '", dir.string(), "': k=", k,
                        " must be in [1, d_sae=", m.d_sae(), "]");
  expects<config_error>(safetensors_dtype_is_float(opt.dtype), "save (", tool, ") '", dir.string(), "': dtype ",
                        safetensors_dtype_name(opt.dtype), " is not one of F32, F16, BF16, F64");
  expects<config_error>(opt.metadata.is_object(), "save (", tool, ") '", dir.string(),
                        "': options.metadata must be a JSON object");
  expect_finite("W_enc", m.W_enc);
  expect_finite("W_dec", m.W_dec);
  expect_finite("b_enc", m.b_enc);
  expect_finite("b_dec", m.b_dec);
}

inline void write_json_file(const std::filesystem::path& path, const nlohmann::json& j, std::string_view kind) {
  atomic_file f(path, kind);
  f.write(j.dump(2) + "\n");
  f.commit();
}

inline std::string saelens_dtype_name(safetensors_dtype dt) {
  switch (dt) {
    case safetensors_dtype::f16: return "float16";
    case safetensors_dtype::bf16: return "bfloat16";
    case safetensors_dtype::f64: return "float64";
    default: return "float32";
  }
}

/// An integer config value.
inline std::int64_t config_int(const nlohmann::json& v, std::string_view key, const file_error& fail) {
  if (v.is_number_integer()) return v.get<std::int64_t>();
  fail("'", key, "' is ", v.dump(), ", not an integer");
}

/// One dimension of a tensor as the config gives it.
struct config_dim {
  std::string_view key;
  std::int64_t value;
};

/// Checks tensor `name` of `view` against the shape the config gives it, before anything
/// of the config's size is allocated (a config may claim any width; the tensors are
/// bounded by the file). A dimension that differs is reported as the config's key with
/// both values; a tensor of another rank as the weights' error.
inline void check_config_shape(const safetensors_view& view, std::string_view name,
                               std::initializer_list<config_dim> dims, const file_error& fail,
                               const file_error& failw) {
  const safetensors_tensor_info& t = view.at(name);
  std::string expected = "[";
  for (const auto& d : dims) expected += (expected.size() > 1 ? ", " : "") + std::to_string(d.value);
  expected += "]";
  if (t.shape.size() != dims.size()) failw("tensor '", name, "' has shape ", t.shape_text(), ", expected ", expected);
  std::size_t i = 0;
  for (const auto& d : dims) {
    if (t.shape[i] != d.value)
      fail(d.key, "=", d.value, " does not match the weights '", view.where(), "': tensor '", name, "' has shape ",
           t.shape_text(), ", expected ", expected, " (", d.key, "=", t.shape[i], ")");
    ++i;
  }
}

inline bool config_bool(const nlohmann::json& v, std::string_view key, const file_error& fail) {
  if (v.is_boolean()) return v.get<bool>();
  fail("'", key, "' is ", v.dump(), ", not true/false");
}

// --- SAELens ---------------------------------------------------------------------------

/// The model/hook keys SAELens moves into the metadata of a pre-6.0 config
/// (LLM_METADATA_KEYS of sae_lens/loading/pretrained_sae_loaders.py).
inline constexpr std::string_view saelens_llm_metadata_keys[] = {
    "model_name",       "hook_name",        "model_class_name", "hook_head_index",
    "model_from_pretrained_kwargs",         "prepend_bos",      "exclude_special_tokens",
    "neuronpedia_id",   "context_size",     "seqpos_slice",     "dataset_path",
    "sae_lens_version", "sae_lens_training_version",            "hook_name_out",
    "hook_head_index_out", "hf_hook_name",  "hf_hook_name_out"};

/// Python's truth value of a JSON value (`if not x`): null, false, 0, "", [] and {} are false.
inline bool python_truthy(const nlohmann::json& v) {
  switch (v.type()) {
    case nlohmann::json::value_t::null: return false;
    case nlohmann::json::value_t::boolean: return v.get<bool>();
    case nlohmann::json::value_t::number_integer: return v.get<std::int64_t>() != 0;
    case nlohmann::json::value_t::number_unsigned: return v.get<std::uint64_t>() != 0;
    case nlohmann::json::value_t::number_float: return v.get<double>() != 0;
    case nlohmann::json::value_t::string: return !v.get_ref<const std::string&>().empty();
    case nlohmann::json::value_t::array:
    case nlohmann::json::value_t::object: return !v.empty();
    default: return true;
  }
}

/// "<value> (<JSON type>)" for a message, the value cut at 60 characters.
inline std::string json_value_and_type(const nlohmann::json& v) {
  std::string d = v.dump();
  if (d.size() > 60) d = d.substr(0, 57) + "...";
  return d + " (" + v.type_name() + ")";
}

/// SAELens' handle_pre_6_0_config, for the keys hsae reads. `activation_fn_kwargs`,
/// where SAELens reads it (activation_fn "topk" or architecture "topk"), must be an
/// object: SAELens raises on anything else.
inline nlohmann::json saelens_pre_6_config(const nlohmann::json& in, const file_error& fail) {
  nlohmann::json c = nlohmann::json::object();
  for (auto it = in.begin(); it != in.end(); ++it) {
    std::string key = it.key();
    if (key == "hook_point") key = "hook_name";
    else if (key == "hook_point_head_index") key = "hook_head_index";
    else if (key == "activation_fn_str") key = "activation_fn";
    c[key] = it.value();
  }
  if (!c.contains("apply_b_dec_to_input")) c["apply_b_dec_to_input"] = true;
  if (!c.contains("activation_fn")) c["activation_fn"] = "relu";
  if (!c.contains("architecture")) c["architecture"] = "standard";
  const bool kwargs_read = c["activation_fn"] == "topk" || c["architecture"] == "topk";
  if (kwargs_read && c.contains("activation_fn_kwargs") && !c["activation_fn_kwargs"].is_object())
    fail("'activation_fn_kwargs' is ", json_value_and_type(c["activation_fn_kwargs"]),
         ", not an object (pre-6.0 config rules)");
  if (c["activation_fn"] == "topk" && c.contains("activation_fn_kwargs") &&
      c["activation_fn_kwargs"].contains("k") && !c["activation_fn_kwargs"]["k"].is_null()) {
    c["architecture"] = "topk";
    c["k"] = c["activation_fn_kwargs"]["k"];
  }
  if (c.contains("normalize_activations") && c["normalize_activations"].is_boolean())
    c["normalize_activations"] = c["normalize_activations"].get<bool>() ? "expected_average_only_in" : "none";
  if (!c.contains("normalize_activations") || c["normalize_activations"].is_null()) c["normalize_activations"] = "none";
  nlohmann::json md = nlohmann::json::object();
  for (const auto k : saelens_llm_metadata_keys)
    if (c.contains(std::string(k))) md[std::string(k)] = c[std::string(k)];
  c["metadata"] = md;
  return c;
}

}  // namespace detail

/// Loads an SAE from a SAELens config text and weights buffer, as
/// `sae_lens.SAE.load_from_disk` does: the parser entry point (a fuzzer calls it on
/// arbitrary bytes). `cfg_where` / `weights_where` name the two files in errors.
/// \throws hsae::io_error (malformed or unsupported file), hsae::numeric_error
///         (non-finite weights).
template <cpu_scalar T = float>
loaded_sae<T> load_saelens_buffers(std::string_view cfg_text, std::span<const std::byte> weights,
                                   const std::string& cfg_where, const std::string& weights_where) {
  const detail::file_error fail{"SAELens config '" + cfg_where + "': "};
  const detail::file_error failw{"SAELens weights '" + weights_where + "': "};
  loaded_sae<T> out;
  out.format = sae_file_format::saelens;
  out.config = detail::parse_config_json(cfg_text, cfg_where, "SAELens");

  // Version rule (handle_config_defaulting): sae_lens_version at the top level, or when
  // that is false in Python's sense (absent, null, "", 0, false, [], {}) in the metadata;
  // false there too, or below 6.0.0rc0, selects the pre-6.0 rules. As in SAELens, a
  // metadata that is not an object (when read) and a version that is true but not a
  // string are errors, not "pre-6.0".
  nlohmann::json cfg = out.config;
  const nlohmann::json* ver = nullptr;
  std::string_view ver_key = "sae_lens_version";
  if (cfg.contains("sae_lens_version") && detail::python_truthy(cfg["sae_lens_version"])) {
    ver = &cfg["sae_lens_version"];
  } else if (cfg.contains("metadata")) {
    const nlohmann::json& md = cfg["metadata"];
    if (!md.is_object())
      fail("'metadata' is ", detail::json_value_and_type(md),
           ", not an object (SAELens reads sae_lens_version from it)");
    if (md.contains("sae_lens_version") && detail::python_truthy(md["sae_lens_version"])) {
      ver = &md["sae_lens_version"];
      ver_key = "metadata.sae_lens_version";
    }
  }
  bool modern = false;
  if (ver != nullptr) {
    if (!ver->is_string()) fail("'", ver_key, "' is ", detail::json_value_and_type(*ver), ", not a version string");
    const auto v = detail::saelens_version_at_least_6(ver->get_ref<const std::string&>());
    if (!v) fail("sae_lens_version '", ver->get_ref<const std::string&>(), "' is not a valid version");
    modern = *v;
  }
  if (!modern) {
    cfg = detail::saelens_pre_6_config(cfg, fail);
    out.adjustments.push_back("applied SAELens' pre-6.0 config rules (sae_lens_version absent or < 6.0)");
  }

  // Architecture.
  if (!cfg.contains("architecture")) fail("missing key 'architecture'");
  if (!cfg["architecture"].is_string()) fail("'architecture' is not a string");
  const std::string arch = cfg["architecture"].get<std::string>();
  static constexpr std::string_view known[] = {"standard", "gated", "topk", "abstopk", "jumprelu",
                                               "transcoder", "skip_transcoder", "jumprelu_transcoder",
                                               "jumprelu_skip_transcoder", "temporal", "matching_pursuit"};
  if (std::find(std::begin(known), std::end(known), arch) == std::end(known))
    fail("unknown architecture '", arch, "'");
  if (arch != "topk" && arch != "standard")
    fail("architecture '", arch, "' is not supported by hsae (supported: topk, standard)");

  // Required and defaulted keys (SAEConfig / TopKSAEConfig dataclass fields).
  for (const char* key : {"d_in", "d_sae"})
    if (!cfg.contains(key)) fail("missing key '", key, "'");
  const std::int64_t d_in = detail::config_int(cfg["d_in"], "d_in", fail);
  const std::int64_t d_sae = detail::config_int(cfg["d_sae"], "d_sae", fail);
  constexpr std::int64_t int_max = std::numeric_limits<int>::max();
  if (d_in < 1 || d_in > int_max) fail("d_in=", d_in, " is out of range [1, ", int_max, "]");
  if (d_sae < 1 || d_sae > int_max) fail("d_sae=", d_sae, " is out of range [1, ", int_max, "]");
  std::int64_t k = d_sae;  // "standard": ReLU keeps everything = top-d_sae
  if (arch == "topk") {
    k = cfg.contains("k") ? detail::config_int(cfg["k"], "k", fail) : 100;  // TopKSAEConfig.k = 100
    if (k < 1 || k > d_sae) fail("k=", k, " must be in [1, d_sae=", d_sae, "]");
  }
  std::string dtype = "float32";
  if (cfg.contains("dtype")) {
    if (!cfg["dtype"].is_string()) fail("'dtype' is not a string");
    dtype = cfg["dtype"].get<std::string>();
  }
  if (dtype.starts_with("torch.")) dtype = dtype.substr(6);
  safetensors_dtype compute;
  if (dtype == "float32") compute = safetensors_dtype::f32;
  else if (dtype == "float64") compute = safetensors_dtype::f64;
  else if (dtype == "float16") compute = safetensors_dtype::f16;
  else if (dtype == "bfloat16") compute = safetensors_dtype::bf16;
  else fail("invalid dtype '", cfg["dtype"].get<std::string>(), "'");
  const bool apply_b_dec =
      cfg.contains("apply_b_dec_to_input") ? detail::config_bool(cfg["apply_b_dec_to_input"], "apply_b_dec_to_input", fail)
                                           : true;
  const bool rescale = arch == "topk" && cfg.contains("rescale_acts_by_decoder_norm")
                           ? detail::config_bool(cfg["rescale_acts_by_decoder_norm"], "rescale_acts_by_decoder_norm", fail)
                           : false;
  std::string norm = "none";
  if (cfg.contains("normalize_activations")) {
    if (!cfg["normalize_activations"].is_string()) fail("'normalize_activations' is not a string");
    norm = cfg["normalize_activations"].get<std::string>();
  }
  if (norm != "none" && norm != "expected_average_only_in" && norm != "constant_norm_rescale" && norm != "layer_norm" &&
      norm != "covariance_whitening")
    fail("invalid normalize_activations '", norm, "'");
  if (norm == "constant_norm_rescale" || norm == "layer_norm")
    fail("normalize_activations='", norm, "' normalises each input at run time, which hsae's model does not express");
  if (norm != "none")
    out.adjustments.push_back("normalize_activations='" + norm +
                              "' does nothing at inference in SAELens' load_from_disk; ignored likewise");
  if (cfg.contains("reshape_activations") && !cfg["reshape_activations"].is_string())
    fail("'reshape_activations' is not a string");
  if (cfg.contains("reshape_activations") && cfg["reshape_activations"] == "hook_z")
    out.adjustments.push_back("reshape_activations='hook_z': inputs are the flattened [n_heads * d_head] rows");
  if (cfg.contains("metadata") && !cfg["metadata"].is_object()) fail("'metadata' is not an object");
  out.metadata = cfg.contains("metadata") ? cfg["metadata"] : nlohmann::json::object();

  // Weights: strict names (load_state_dict), shapes, then the dtype conversion.
  const safetensors_view view(weights, weights_where);
  out.tensor_metadata = view.metadata();
  static constexpr std::string_view names[] = {"W_enc", "b_enc", "W_dec", "b_dec"};
  for (const auto& t : view.tensors()) {
    if (t.name == "scaling_factor") continue;
    if (std::find(std::begin(names), std::end(names), t.name) == std::end(names))
      failw("unexpected tensor '", t.name, "' for architecture '", arch, "' (expected W_enc, b_enc, W_dec, b_dec)");
  }
  for (const auto n : names)
    if (!view.contains(n)) failw("missing tensor '", n, "'");
  if (const auto* sf = view.find("scaling_factor")) {
    const auto s = view.read_vector<double>("scaling_factor");
    if (!(s.array() == 1.0).all())
      failw("tensor 'scaling_factor' is not all ones: a finetuning scaling factor is not supported (",
            sf->shape_text(), ")");
    out.adjustments.push_back("dropped an all-ones 'scaling_factor' tensor, as SAELens does");
  }
  detail::check_config_shape(view, "W_enc", {{"d_in", d_in}, {"d_sae", d_sae}}, fail, failw);
  detail::check_config_shape(view, "W_dec", {{"d_sae", d_sae}, {"d_in", d_in}}, fail, failw);
  detail::check_config_shape(view, "b_enc", {{"d_sae", d_sae}}, fail, failw);
  detail::check_config_shape(view, "b_dec", {{"d_in", d_in}}, fail, failw);
  out.storage_dtype = view.at("W_dec").dtype;
  sae<T>& m = out.model;
  m.resize(int(d_in), int(d_sae));
  {
    const row_matrix<T> w_enc = view.read_matrix<T>("W_enc", d_in, d_sae);  // [d_in, d_sae]
    detail::expect_finite_tensor(weights_where, "SAELens", "W_enc", w_enc);
    m.W_enc = w_enc.transpose();
  }
  m.W_dec = view.read_matrix<T>("W_dec", d_sae, d_in);
  m.b_enc = view.read_vector<T>("b_enc", d_sae);
  m.b_dec = view.read_vector<T>("b_dec", d_in);
  detail::expect_finite_tensor(weights_where, "SAELens", "W_dec", m.W_dec);
  detail::expect_finite_tensor(weights_where, "SAELens", "b_enc", m.b_enc);
  detail::expect_finite_tensor(weights_where, "SAELens", "b_dec", m.b_dec);
  // read_sae_components_from_disk converts every tensor to the config's dtype.
  detail::round_through(compute, m.W_enc);
  detail::round_through(compute, m.W_dec);
  detail::round_through(compute, m.b_enc);
  detail::round_through(compute, m.b_dec);
  detail::expect_finite_tensor(weights_where, "SAELens", "W_enc (converted to " + dtype + ")", m.W_enc);
  detail::expect_finite_tensor(weights_where, "SAELens", "W_dec (converted to " + dtype + ")", m.W_dec);
  detail::expect_finite_tensor(weights_where, "SAELens", "b_enc (converted to " + dtype + ")", m.b_enc);
  detail::expect_finite_tensor(weights_where, "SAELens", "b_dec (converted to " + dtype + ")", m.b_dec);

  // The folds can overflow T (b_enc + W_enc b_dec, encoder rows times the decoder norms):
  // the folded weights are checked again.
  if (!apply_b_dec) {
    detail::fold_b_dec_into_b_enc(m);
    detail::expect_finite_tensor(weights_where, "SAELens",
                                 "b_enc (after folding apply_b_dec_to_input=false: b_enc + W_enc b_dec)", m.b_enc);
    out.adjustments.push_back("apply_b_dec_to_input=false: folded W_enc b_dec into b_enc");
  }
  if (rescale) {
    detail::fold_decoder_norms(m);
    const std::string fold = " (after folding rescale_acts_by_decoder_norm=true: scaled by the decoder row norms)";
    detail::expect_finite_tensor(weights_where, "SAELens", "W_enc" + fold, m.W_enc);
    detail::expect_finite_tensor(weights_where, "SAELens", "b_enc" + fold, m.b_enc);
    detail::expect_finite_tensor(weights_where, "SAELens", "W_dec" + fold, m.W_dec);
    out.adjustments.push_back("rescale_acts_by_decoder_norm=true: folded the decoder row norms into the weights");
  }
  if (arch == "standard") out.adjustments.push_back("architecture 'standard' (ReLU) loaded as TopK with k = d_sae");
  out.k = int(k);

  // hsae's k-schedule: the config's metadata first, then the safetensors metadata.
  out.schedule = detail::find_schedule(out.metadata, out.tensor_metadata, "d_sae", d_sae, fail, failw);
  return out;
}

/// Loads `dir/cfg.json` + `dir/sae_weights.safetensors` (memory-mapped).
/// \throws as load_saelens_buffers; hsae::io_error if a file is missing or unreadable.
template <cpu_scalar T = float>
loaded_sae<T> load_saelens(const std::filesystem::path& dir) {
  const auto cfg_path = dir / sae_config_file;
  const auto w_path = dir / saelens_weights_file;
  const std::string text = detail::read_text_file(cfg_path, "SAELens config");
  const detail::mapped_file w(w_path, "SAELens weights");
  return load_saelens_buffers<T>(text, w.bytes(), cfg_path.string(), w_path.string());
}

/// Loads an SAE from a sparsify config text and weights buffer, as
/// `sparsify.SparseCoder.load_from_disk` does: the parser entry point for fuzzing.
/// \throws hsae::io_error (malformed or unsupported file), hsae::numeric_error
///         (non-finite weights).
template <cpu_scalar T = float>
loaded_sae<T> load_sparsify_buffers(std::string_view cfg_text, std::span<const std::byte> weights,
                                    const std::string& cfg_where, const std::string& weights_where) {
  const detail::file_error fail{"sparsify config '" + cfg_where + "': "};
  const detail::file_error failw{"sparsify weights '" + weights_where + "': "};
  loaded_sae<T> out;
  out.format = sae_file_format::sparsify;
  out.config = detail::parse_config_json(cfg_text, cfg_where, "sparsify");
  const nlohmann::json& cfg = out.config;

  // SparseCoderConfig fields and defaults; d_in is required (cfg_dict.pop("d_in")).
  if (!cfg.contains("d_in")) fail("missing key 'd_in'");
  const std::int64_t d_in = detail::config_int(cfg["d_in"], "d_in", fail);
  std::string activation = "topk";
  if (cfg.contains("activation")) {
    if (!cfg["activation"].is_string()) fail("'activation' is not a string");
    activation = cfg["activation"].get<std::string>();
  }
  const auto int_or = [&](const char* key, std::int64_t def) {
    return cfg.contains(key) ? detail::config_int(cfg[key], key, fail) : def;
  };
  const auto bool_or = [&](const char* key, bool def) {
    return cfg.contains(key) ? detail::config_bool(cfg[key], key, fail) : def;
  };
  const std::int64_t expansion = int_or("expansion_factor", 32);
  const std::int64_t num_latents_cfg = int_or("num_latents", 0);
  const std::int64_t k = int_or("k", 32);
  const bool multi_topk = bool_or("multi_topk", false);
  const bool skip = bool_or("skip_connection", false);
  const bool transcode = bool_or("transcode", false);
  (void)bool_or("normalize_decoder", true);
  constexpr std::int64_t int_max = std::numeric_limits<int>::max();
  if (d_in < 1 || d_in > int_max) fail("d_in=", d_in, " is out of range [1, ", int_max, "]");
  if (activation == "groupmax") fail("activation 'groupmax' is not supported by hsae (only 'topk')");
  if (activation != "topk") fail("unknown activation '", activation, "'");
  if (transcode) fail("transcode=true: transcoders are not supported by hsae");
  if (skip) fail("skip_connection=true: a linear skip connection is not supported by hsae");
  if (num_latents_cfg < 0) fail("num_latents=", num_latents_cfg, " is negative");
  if (num_latents_cfg == 0 && (expansion < 1 || expansion > int_max / d_in))
    fail("expansion_factor=", expansion, " with d_in=", d_in, " gives no valid number of latents");
  const std::int64_t num_latents = num_latents_cfg != 0 ? num_latents_cfg : d_in * expansion;
  if (num_latents > int_max) fail("num_latents=", num_latents, " is too large");
  if (k < 1 || k > num_latents) fail("k=", k, " must be in [1, num_latents=", num_latents, "]");
  if (multi_topk) out.adjustments.push_back("multi_topk=true only changes sparsify's training loss; ignored");
  if (cfg.contains("hsae_metadata")) {
    if (!cfg["hsae_metadata"].is_object()) fail("'hsae_metadata' is not an object");
    out.metadata = cfg["hsae_metadata"];
  }

  // Weights: strict load_model (exact names), the model's dtype taken from the first
  // tensor by name (safe_open keys() are sorted), every tensor converted to it.
  const safetensors_view view(weights, weights_where);
  out.tensor_metadata = view.metadata();
  static constexpr std::string_view names[] = {"W_dec", "b_dec", "encoder.bias", "encoder.weight"};
  for (const auto& t : view.tensors())
    if (std::find(std::begin(names), std::end(names), t.name) == std::end(names))
      failw("unexpected tensor '", t.name, "' (expected encoder.weight, encoder.bias, W_dec, b_dec)");
  for (const auto n : names)
    if (!view.contains(n)) failw("missing tensor '", n, "'");
  std::string first = view.tensors().front().name;
  for (const auto& t : view.tensors()) first = std::min(first, t.name);
  const safetensors_dtype model_dtype = view.at(first).dtype;
  if (!safetensors_dtype_is_float(model_dtype))
    failw("tensor '", first, "' sets the model dtype to ", safetensors_dtype_name(model_dtype),
          "; only F32, F16, BF16 and F64 are supported");
  const std::string_view latents_key = num_latents_cfg != 0 ? "num_latents" : "d_in * expansion_factor";
  detail::check_config_shape(view, "encoder.weight", {{latents_key, num_latents}, {"d_in", d_in}}, fail, failw);
  detail::check_config_shape(view, "encoder.bias", {{latents_key, num_latents}}, fail, failw);
  detail::check_config_shape(view, "W_dec", {{latents_key, num_latents}, {"d_in", d_in}}, fail, failw);
  detail::check_config_shape(view, "b_dec", {{"d_in", d_in}}, fail, failw);
  out.storage_dtype = view.at("W_dec").dtype;
  sae<T>& m = out.model;
  m.resize(int(d_in), int(num_latents));
  m.W_enc = view.read_matrix<T>("encoder.weight", num_latents, d_in);
  m.b_enc = view.read_vector<T>("encoder.bias", num_latents);
  m.W_dec = view.read_matrix<T>("W_dec", num_latents, d_in);
  m.b_dec = view.read_vector<T>("b_dec", d_in);
  detail::expect_finite_tensor(weights_where, "sparsify", "encoder.weight", m.W_enc);
  detail::expect_finite_tensor(weights_where, "sparsify", "encoder.bias", m.b_enc);
  detail::expect_finite_tensor(weights_where, "sparsify", "W_dec", m.W_dec);
  detail::expect_finite_tensor(weights_where, "sparsify", "b_dec", m.b_dec);
  detail::round_through(model_dtype, m.W_enc);
  detail::round_through(model_dtype, m.b_enc);
  detail::round_through(model_dtype, m.W_dec);
  detail::round_through(model_dtype, m.b_dec);
  const std::string conv = std::string(" (converted to ") + std::string(safetensors_dtype_name(model_dtype)) + ")";
  detail::expect_finite_tensor(weights_where, "sparsify", "encoder.weight" + conv, m.W_enc);
  detail::expect_finite_tensor(weights_where, "sparsify", "encoder.bias" + conv, m.b_enc);
  detail::expect_finite_tensor(weights_where, "sparsify", "W_dec" + conv, m.W_dec);
  detail::expect_finite_tensor(weights_where, "sparsify", "b_dec" + conv, m.b_dec);
  out.k = int(k);

  out.schedule = detail::find_schedule(cfg, out.tensor_metadata, "num_latents", num_latents, fail, failw);
  return out;
}

/// Loads `dir/cfg.json` + `dir/sae.safetensors` (memory-mapped).
template <cpu_scalar T = float>
loaded_sae<T> load_sparsify(const std::filesystem::path& dir) {
  const auto cfg_path = dir / sae_config_file;
  const auto w_path = dir / sparsify_weights_file;
  const std::string text = detail::read_text_file(cfg_path, "sparsify config");
  const detail::mapped_file w(w_path, "sparsify weights");
  return load_sparsify_buffers<T>(text, w.bytes(), cfg_path.string(), w_path.string());
}

/// Which layout `dir` holds, by its weights file.
/// \throws hsae::io_error if it holds neither or both.
inline sae_file_format detect_sae_format(const std::filesystem::path& dir) {
  const auto exists = [&](const char* name) {
    std::error_code ec;
    const auto st = std::filesystem::status(dir / name, ec);
    if (ec && st.type() != std::filesystem::file_type::not_found)  // a symlink loop, a permission
      detail::throw_error<io_error>("SAE directory '", dir.string(), "': cannot check '", (dir / name).string(),
                                    "': ", ec.message());
    return std::filesystem::exists(st);
  };
  const bool a = exists(saelens_weights_file);
  const bool b = exists(sparsify_weights_file);
  detail::expects<io_error>(a || b, "SAE directory '", dir.string(), "': neither ", saelens_weights_file, " nor ",
                            sparsify_weights_file, " found");
  detail::expects<io_error>(!(a && b), "SAE directory '", dir.string(), "': holds both ", saelens_weights_file,
                            " and ", sparsify_weights_file, "; load one layout explicitly");
  return a ? sae_file_format::saelens : sae_file_format::sparsify;
}

/// Loads either layout, detected by detect_sae_format.
template <cpu_scalar T = float>
loaded_sae<T> load_sae_dir(const std::filesystem::path& dir) {
  return detect_sae_format(dir) == sae_file_format::saelens ? load_saelens<T>(dir) : load_sparsify<T>(dir);
}

namespace detail {

/// Writes the weights and cfg.json of one layout as a new `dir`, replacing it as a whole
/// (atomic_dir).
inline void write_sae_dir(const std::filesystem::path& dir, std::string_view layout, const safetensors_writer& w,
                          std::string_view weights_file, const nlohmann::json& cfg) {
  atomic_dir out(dir, concat("save (", layout, ")"), {std::begin(sae_dir_files), std::end(sae_dir_files)});
  out.stage([&](const std::filesystem::path& staging) {
    w.write(staging / weights_file);
    write_json_file(staging / sae_config_file, cfg, concat(layout, " config"));
  });
  out.commit();
}

template <cpu_scalar T, int F>
void save_saelens_impl(const std::filesystem::path& dir, const sae<T, F>& m, int k, const dynamic_k_schedule* sched,
                       const sae_save_options& opt) {
  check_for_save(m, k, opt, "SAELens", dir);
  nlohmann::json md = opt.metadata;
  if (!md.contains("sae_lens_version") || !md["sae_lens_version"].is_string() ||
      saelens_version_at_least_6(md["sae_lens_version"].get<std::string>()) != std::optional<bool>(true))
    md["sae_lens_version"] = opt.sae_lens_version;
  if (!md.contains("sae_lens_training_version")) md["sae_lens_training_version"] = opt.sae_lens_version;
  md["hsae_version"] = version_string;
  if (sched != nullptr) md["hsae_k_schedule"] = schedule_to_json(*sched);
  else md.erase("hsae_k_schedule");
  const nlohmann::json cfg = {
      {"architecture", "topk"},
      {"d_in", m.d_model()},
      {"d_sae", m.d_sae()},
      {"dtype", saelens_dtype_name(opt.dtype)},
      {"device", "cpu"},
      {"apply_b_dec_to_input", true},
      {"normalize_activations", "none"},
      {"reshape_activations", "none"},
      {"k", k},
      {"rescale_acts_by_decoder_norm", false},
      {"metadata", md},
  };
  const row_matrix<T> w_enc_t = m.W_enc.transpose();  // SAELens: [d_in, d_sae]
  safetensors_writer w;
  w.add("W_enc", w_enc_t, opt.dtype);
  w.add("W_dec", m.W_dec, opt.dtype);
  w.add("b_enc", m.b_enc, opt.dtype);
  w.add("b_dec", m.b_dec, opt.dtype);
  if (sched != nullptr) w.metadata("hsae_k_schedule", schedule_to_json(*sched).dump());
  write_sae_dir(dir, "SAELens", w, saelens_weights_file, cfg);
}

template <cpu_scalar T, int F>
void save_sparsify_impl(const std::filesystem::path& dir, const sae<T, F>& m, int k, const dynamic_k_schedule* sched,
                        const sae_save_options& opt) {
  check_for_save(m, k, opt, "sparsify", dir);
  nlohmann::json cfg = {
      {"activation", "topk"},
      {"expansion_factor", std::max(1, m.d_sae() / m.d_model())},
      {"normalize_decoder", true},
      {"num_latents", m.d_sae()},
      {"k", k},
      {"multi_topk", false},
      {"skip_connection", false},
      {"transcode", false},
      {"d_in", m.d_model()},
      {"hsae_version", version_string},
  };
  if (sched != nullptr) cfg["hsae_k_schedule"] = schedule_to_json(*sched);
  if (!opt.metadata.empty()) cfg["hsae_metadata"] = opt.metadata;
  safetensors_writer w;
  w.add("encoder.weight", m.W_enc, opt.dtype);
  w.add("encoder.bias", m.b_enc, opt.dtype);
  w.add("W_dec", m.W_dec, opt.dtype);
  w.add("b_dec", m.b_dec, opt.dtype);
  w.metadata("format", "pt");
  if (sched != nullptr) w.metadata("hsae_k_schedule", schedule_to_json(*sched).dump());
  write_sae_dir(dir, "sparsify", w, sparsify_weights_file, cfg);
}

}  // namespace detail

/// Saves a (HierarchicalTopK) SAE in the SAELens layout as a TopK SAE with
/// k = schedule.k_max(), keeping the schedule in the metadata: `dir/cfg.json` and
/// `dir/sae_weights.safetensors`, written as a pair. The directory is replaced as a whole
/// (written beside it as `<dir>.tmp.<pid>`, fsync'd, swapped in; see detail::atomic_dir),
/// so an interrupted or failed save leaves the old SAE or the new one, never new weights
/// beside an old config. The other entries of an existing `dir` (a README, a sparsity
/// file) are kept: the same files, hard-linked into the new directory; a `dir` holding a
/// subdirectory is refused. Needs a writable parent directory; creates `dir` and parents.
/// \throws hsae::config_error (bad k or options), hsae::numeric_error (non-finite
///         weights), hsae::io_error "save (SAELens) '<dir>': ..." (unwritable, no space,
///         a subdirectory; then `dir` is unchanged).
template <cpu_scalar T, int F, k_schedule_like S>
void save_saelens(const std::filesystem::path& dir, const sae<T, F>& m, const S& schedule,
                  const sae_save_options& opt = {}) {
  const auto s = dynamic_k_schedule::from(schedule);
  detail::save_saelens_impl(dir, m, s.k_max(), &s, opt);
}
template <cpu_scalar T, int F>
void save_saelens(const std::filesystem::path& dir, const sae<T, F>& m, const dynamic_k_schedule& schedule,
                  const sae_save_options& opt = {}) {
  detail::save_saelens_impl(dir, m, schedule.k_max(), &schedule, opt);
}
/// Saves a plain TopK SAE (no schedule) in the SAELens layout.
template <cpu_scalar T, int F>
void save_saelens(const std::filesystem::path& dir, const sae<T, F>& m, int k, const sae_save_options& opt = {}) {
  detail::save_saelens_impl(dir, m, k, nullptr, opt);
}

/// Saves a (HierarchicalTopK) SAE in the sparsify layout, k = schedule.k_max():
/// `dir/cfg.json` and `dir/sae.safetensors`, the directory replaced as a whole as by
/// save_saelens.
/// \throws as save_saelens.
template <cpu_scalar T, int F, k_schedule_like S>
void save_sparsify(const std::filesystem::path& dir, const sae<T, F>& m, const S& schedule,
                   const sae_save_options& opt = {}) {
  const auto s = dynamic_k_schedule::from(schedule);
  detail::save_sparsify_impl(dir, m, s.k_max(), &s, opt);
}
template <cpu_scalar T, int F>
void save_sparsify(const std::filesystem::path& dir, const sae<T, F>& m, const dynamic_k_schedule& schedule,
                   const sae_save_options& opt = {}) {
  detail::save_sparsify_impl(dir, m, schedule.k_max(), &schedule, opt);
}
/// Saves a plain TopK SAE (no schedule) in the sparsify layout.
template <cpu_scalar T, int F>
void save_sparsify(const std::filesystem::path& dir, const sae<T, F>& m, int k, const sae_save_options& opt = {}) {
  detail::save_sparsify_impl(dir, m, k, nullptr, opt);
}

/// Saves a loaded SAE in `format`, keeping its k, schedule and metadata. `opt.dtype`
/// applies as given; `opt.metadata` entries override the loaded ones.
template <cpu_scalar T>
void save_sae(const std::filesystem::path& dir, sae_file_format format, const loaded_sae<T>& l,
              sae_save_options opt = {}) {
  nlohmann::json md = l.metadata.is_object() ? l.metadata : nlohmann::json::object();
  if (opt.metadata.is_object())
    for (auto it = opt.metadata.begin(); it != opt.metadata.end(); ++it) md[it.key()] = it.value();
  md.erase("hsae_k_schedule");
  md.erase("hsae_version");
  opt.metadata = std::move(md);
  const dynamic_k_schedule* s = l.schedule ? &*l.schedule : nullptr;
  if (format == sae_file_format::saelens)
    detail::save_saelens_impl(dir, l.model, l.k, s, opt);
  else
    detail::save_sparsify_impl(dir, l.model, l.k, s, opt);
}

/// Converts the SAE directory `src` (either layout) into `dst` in layout `to`, keeping
/// k, schedule and metadata, and the source's storage dtype unless `dtype` is given.
/// Computed in double: exact for the weights that need no folding.
inline void convert_sae_dir(const std::filesystem::path& src, const std::filesystem::path& dst, sae_file_format to,
                            std::optional<safetensors_dtype> dtype = std::nullopt) {
  const auto l = load_sae_dir<double>(src);
  sae_save_options opt;
  opt.dtype = dtype.value_or(l.storage_dtype);
  if (!safetensors_dtype_is_float(opt.dtype)) opt.dtype = safetensors_dtype::f32;
  save_sae(dst, to, l, opt);
}

HSAE_NAMESPACE_END
