// SPDX-License-Identifier: Apache-2.0
/// \file tools/hsae_train/config.hpp
/// hsae-train's settings: the option table (one entry per long option; the JSON config
/// file uses the same names with '_' for '-'), parsing of the command line and of the
/// config file into a `train_config` (the command line overrides the file), the checks
/// that need no data, and the config as JSON.
///
/// Every problem is a `usage_error` whose message names the option (`--k-max: ...`) or
/// the config key (`config 'run.json': key "k_max": ...`); hsae-train prints it as one
/// line and exits with status 2.
#pragma once

#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include <hsae/data/sources.hpp>

namespace hsae_train {

/// A bad command line or config: one line naming the option or key.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Everything a run is given. Values 0 (or -1 where 0 is meaningful) mean "the default",
/// resolved once the data is known (run.hpp: resolve).
struct train_config {
  // Inputs.
  std::vector<std::string> data;  ///< .npy files, globs, directories, .safetensors files
  std::vector<std::string> test;  ///< held-out files, evaluated at the end
  std::string tensor;             ///< safetensors tensor name (empty: the only tensor)
  bool synthetic = false;         ///< the demo's synthetic data instead of files
  std::int64_t held_out_rows = 16384;
  std::int64_t init_rows = 0;  ///< 0: 16384 (files, at most a quarter of the rows), 8192 (synthetic)
  // Model.
  std::int64_t d_sae = 0;  ///< 0: expansion * d_model
  double expansion = 0;    ///< 0: 16
  std::int64_t k_max = 32;
  std::string schedule = "all";
  // Optimisation.
  double lr = 0;  ///< 0: adam_options' rule 2e-4 / sqrt(d_sae / 2^14)
  std::int64_t warmup_steps = -1;  ///< -1: min(1000, steps / 10)
  std::int64_t decay_steps = -1;   ///< -1: steps / 5
  double final_lr_fraction = 0;
  double max_grad_norm = 0;
  std::int64_t batch = 0;   ///< 0: 4096 (files), 2048 (synthetic)
  std::int64_t tokens = 0;  ///< 0: one epoch of the training rows (files), 4M (synthetic)
  double epochs = 0;
  std::int64_t auxk_k = 0;  ///< 0: min(512, d_model / 2)
  double auxk_coef = 1.0 / 32.0;
  bool auxk = true;
  std::int64_t dead_tokens = 0;  ///< 0: min(10M, tokens / 8)
  std::int64_t seed = 1;
  std::int64_t threads = 0;
  std::int64_t shards = 1;         ///< latent shards of a distributed run (mpirun)
  std::int64_t rank_timeout = 600;  ///< seconds a rank waits in a collective before the job ends
  std::int64_t eval_every = 0;
  std::string device = "cpu";
  std::string storage = "f32";
  std::string cpu_gemm = "auto";            ///< the CPU encoder GEMM: auto | eigen | onednn
  std::string encoder_precision = "f32";   ///< the CPU encoder GEMM's operands: f32 | bf16
  bool deterministic = true;
  bool normalize = true;  ///< default: on for files, off for --synthetic
  std::int64_t shuffle_buffer = 65536;
  std::int64_t shuffle_chunk = hsae::file_source_options{}.shuffle_chunk_rows;  ///< the library default
  std::int64_t log_every = 100;
  // Outputs.
  std::string model_name;
  std::string hook_name;
  std::string format = "saelens";
  std::string dtype = "f32";
  std::string out;
  std::string checkpoint;
  std::int64_t checkpoint_every = 0;
  bool resume = false;
  std::int64_t max_steps = 0;  ///< stop (as on Ctrl-C) after this many steps of the run; 0: none
  // Command line only.
  std::string config;
  bool print_config = false;
  bool help = false;
  bool version = false;

  /// The JSON keys set explicitly (by the config file or the command line).
  std::set<std::string> given;
  bool was_given(std::string_view key) const { return given.count(std::string(key)) != 0; }
};

/// One long option. `key` is the JSON key (the option name with '_' for '-').
struct option_info {
  const char* name;  ///< without the leading "--"
  const char* arg;   ///< the argument's placeholder in --help ("" for a flag)
  const char* help;
  const char* group;
};
/// The option table, in --help order.
const std::vector<option_info>& options();

/// Parses argv[1..argc) over the config file it names (--config), the file first.
/// \throws usage_error naming the option or key.
train_config parse_command_line(int argc, const char* const* argv);
/// Applies the keys of a config object (as read from a file named `where`) to `c`.
/// \throws usage_error naming the key: unknown keys, wrong types, values out of range.
void apply_json(train_config& c, const nlohmann::json& j, const std::string& where);
/// Checks what needs no data (ranges, names, combinations). \throws usage_error.
void validate(const train_config& c);
/// The config as JSON, every key (the format of --config files).
nlohmann::json to_json(const train_config& c);
/// --help text.
std::string help_text();

}  // namespace hsae_train
