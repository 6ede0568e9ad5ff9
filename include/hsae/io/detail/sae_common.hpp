// SPDX-License-Identifier: Apache-2.0
/// \file io/detail/sae_common.hpp
/// What the SAELens and sparsify readers and writers (io/saelens.hpp, io/sparsify.hpp)
/// share: errors naming the file, cfg.json parsing and its typed values, config shapes
/// checked against the weights, hsae's k-schedule in JSON, the dtype rounding and
/// finiteness checks of loading, and the checks and atomic directory write of saving.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../../config.hpp"
#include "../../detail/files.hpp"
#include "../../detail/half.hpp"
#include "../../detail/printable.hpp"
#include "../../error.hpp"
#include "../../k_schedule.hpp"
#include "../../matrix.hpp"
#include "../../model.hpp"
#include "../safetensors.hpp"
#include "../sae_types.hpp"

HSAE_NAMESPACE_BEGIN

namespace detail {

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

}  // namespace detail

HSAE_NAMESPACE_END
