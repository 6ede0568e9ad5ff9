// SPDX-License-Identifier: Apache-2.0
/// \file io/sparsify.hpp
/// SAE directories in the layout of **sparsify** (EleutherAI, 1.x): `cfg.json` +
/// `sae.safetensors`: `encoder.weight [num_latents, d_in]` (= hsae's W_enc),
/// `encoder.bias [num_latents]`, `W_dec [num_latents, d_in]`, `b_dec [d_in]`; config keys
/// activation, expansion_factor, normalize_decoder, num_latents, k, multi_topk,
/// skip_connection, transcode and d_in. io/sae_types.hpp says what a file means and what
/// loading and saving keep.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <iterator>
#include <limits>
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
#include "detail/sae_common.hpp"
#include "sae_types.hpp"
#include "safetensors.hpp"

HSAE_NAMESPACE_BEGIN

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

namespace detail {

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

HSAE_NAMESPACE_END
