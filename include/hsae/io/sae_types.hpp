// SPDX-License-Identifier: Apache-2.0
/// \file io/sae_types.hpp
/// The vocabulary of SAE directories shared by io/saelens.hpp, io/sparsify.hpp and
/// io/sae_dir.hpp: the two layouts, their file names, the save options and what a load
/// returns.
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

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "../config.hpp"
#include "../k_schedule.hpp"
#include "../matrix.hpp"
#include "../model.hpp"
#include "safetensors.hpp"

HSAE_NAMESPACE_BEGIN

/// The two directory layouts.
enum class sae_file_format { saelens, sparsify };

constexpr std::string_view sae_file_format_name(sae_file_format f) noexcept {
  return f == sae_file_format::saelens ? "SAELens" : "sparsify";
}

/// File names inside an SAE directory.
inline constexpr const char* sae_config_file = "cfg.json";
inline constexpr const char* saelens_weights_file = "sae_weights.safetensors";
inline constexpr const char* sparsify_weights_file = "sae.safetensors";

/// Every file name hsae writes into an SAE directory (of either layout).
inline constexpr std::string_view sae_dir_files[] = {sae_config_file, saelens_weights_file, sparsify_weights_file};

/// How to save.
struct sae_save_options {
  /// Storage dtype of every tensor: F32, F16, BF16 or F64. SAELens' config "dtype" is
  /// set to match (SAELens computes in that dtype unless told otherwise at load).
  safetensors_dtype dtype = safetensors_dtype::f32;
  /// Extra entries for the config's metadata, e.g. {"model_name": "gpt2",
  /// "hook_name": "blocks.8.hook_resid_pre"}. SAELens: merged into "metadata";
  /// sparsify: written as "hsae_metadata". hsae's own keys take precedence.
  nlohmann::json metadata = nlohmann::json::object();
  /// SAELens: the "sae_lens_version" written into the metadata when it holds none (or
  /// one below 6.0, which would make SAELens apply its pre-6.0 config rules).
  std::string sae_lens_version = "6.0.0";
};

/// An SAE read from a SAELens or sparsify directory.
template <cpu_scalar T = float>
struct loaded_sae {
  sae<T> model;
  /// The k of the file's TopK (d_sae for a SAELens "standard" ReLU SAE).
  int k = 0;
  /// hsae's k-schedule when the file carries one. `k` may be below its k_max (a prefix
  /// of a HierarchicalTopK SAE is itself a valid TopK SAE).
  std::optional<dynamic_k_schedule> schedule;
  sae_file_format format = sae_file_format::saelens;
  /// dtype of the stored weights (of W_dec).
  safetensors_dtype storage_dtype = safetensors_dtype::f32;
  /// cfg.json as read.
  nlohmann::json config;
  /// SAELens: the config's metadata (pre-6.0 files: the model/hook keys of the top
  /// level); sparsify: "hsae_metadata" if present. An object, possibly empty.
  nlohmann::json metadata = nlohmann::json::object();
  /// The safetensors `__metadata__`.
  std::map<std::string, std::string> tensor_metadata;
  /// What loading changed to express the file in hsae's model, in words.
  std::vector<std::string> adjustments;
};

HSAE_NAMESPACE_END
