// SPDX-License-Identifier: Apache-2.0
/// \file io/saelens.hpp
/// SAE directories in the layout of **SAELens** (6.x): `cfg.json` +
/// `sae_weights.safetensors`, architecture "topk": `W_enc [d_in, d_sae]` (hsae's W_enc
/// transposed), `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`; config keys d_in,
/// d_sae, k, dtype, device, apply_b_dec_to_input, normalize_activations,
/// reshape_activations, rescale_acts_by_decoder_norm, architecture and a free-form
/// "metadata" object. Loading applies SAELens' own rules (its pre-6.0 config translation
/// included) and folds apply_b_dec_to_input=false and rescale_acts_by_decoder_norm into
/// the weights; io/sae_types.hpp says what a file means and what loading and saving keep.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "../config.hpp"
#include "../detail/files.hpp"
#include "../k_schedule.hpp"
#include "../matrix.hpp"
#include "../model.hpp"
#include "../version.hpp"
#include "detail/pep440.hpp"
#include "detail/sae_common.hpp"
#include "sae_types.hpp"
#include "safetensors.hpp"

HSAE_NAMESPACE_BEGIN

namespace detail {

inline std::string saelens_dtype_name(safetensors_dtype dt) {
  switch (dt) {
    case safetensors_dtype::f16: return "float16";
    case safetensors_dtype::bf16: return "bfloat16";
    case safetensors_dtype::f64: return "float64";
    default: return "float32";
  }
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

namespace detail {

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

HSAE_NAMESPACE_END
