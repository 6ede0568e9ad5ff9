// SPDX-License-Identifier: Apache-2.0
/// \file io/sae_dir.hpp
/// SAE directories of either layout: which one a directory holds (detect_sae_format),
/// loading it (load_sae_dir), saving a loaded SAE in a chosen layout (save_sae) and
/// converting a directory from one layout to the other (convert_sae_dir).
#pragma once

#include <filesystem>
#include <optional>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

#include "../config.hpp"
#include "../error.hpp"
#include "../k_schedule.hpp"
#include "../matrix.hpp"
#include "saelens.hpp"
#include "sae_types.hpp"
#include "safetensors.hpp"
#include "sparsify.hpp"

HSAE_NAMESPACE_BEGIN

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
