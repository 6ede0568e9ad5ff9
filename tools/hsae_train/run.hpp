// SPDX-License-Identifier: Apache-2.0
/// \file tools/hsae_train/run.hpp
/// hsae-train's run: the inputs expanded (globs, activations.json directories), every
/// default resolved against the data (`resolve`, a `run_plan`), the training on the chosen
/// backend (driver.hpp; the CUDA one in run_cuda.cu), and the outputs (`run`).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <hsae/cpu/backend.hpp>
#include <hsae/k_schedule.hpp>
#include <hsae/metrics.hpp>
#include <hsae/model.hpp>
#include <hsae/trainer.hpp>

#include "config.hpp"

namespace hsae_train {

/// Whether this build has the CUDA path.
bool built_with_cuda();

/// The input files of one list (--data or --test), expanded.
struct file_set {
  std::vector<std::filesystem::path> files;
  std::int64_t rows = 0;
  int d_model = 0;
  /// activations.json of a directory input (the first one), or null.
  nlohmann::json activations;
  /// (device, inode) of each file, to refuse a test file that is also a training file.
  std::vector<std::pair<dev_t, ino_t>> ids;
};

/// Expands --data / --test entries: globs (sorted, each must match), directories (their
/// activations.json shards, else their .npy files, else their .safetensors files, sorted),
/// files (.npy, or the tensor `tensor` of .safetensors files: data/row_file.hpp); opens
/// each file's header for its rows and width. `option` names the list in errors ("--data").
/// \throws usage_error naming the option and the entry.
file_set expand_inputs(const std::vector<std::string>& entries, const std::string& option,
                       const std::string& tensor = {});

/// A schedule from --schedule and --k-max. \throws usage_error naming --schedule.
hsae::dynamic_k_schedule parse_schedule(const std::string& text, std::int64_t k_max, bool k_max_given);

/// Everything a run needs, every default resolved.
struct run_plan {
  train_config cfg;  ///< resolved: no "default" sentinels left
  file_set train, test;
  int d_model = 0;
  /// Rows of the data the training stream may use (files: all rows but the held-out ones).
  std::int64_t train_rows = 0;
  /// Held-out rows: the trainer's eval_rows (with --test: all rows of the test files; else
  /// the last eval_rows rows of the data by position, which the training source leaves out).
  std::int64_t eval_rows = 0;
  hsae::dynamic_k_schedule schedule{{1, 1.0}};
  hsae::trainer_options topt;  ///< without metrics path, stop flag or progress stream
  std::filesystem::path out, checkpoint;
  /// Which rows the evaluation uses, in words (printed and in report.md).
  std::string held_out_text;
  /// The resolved config (hsae_train_config.json), and the part a checkpoint must match.
  nlohmann::json resolved, run_identity;
};

/// Resolves `c` against its data. \throws usage_error naming the option.
run_plan resolve(const train_config& c);

/// Writes OUT/hsae_train_config.json (atomically): the resolved config as a `--config` that
/// repeats the run from the start (resume and max_steps cleared). Called once training
/// starts, after a resume's checks passed, so a refused resume leaves the run's file alone.
void write_run_config(const run_plan& p);

/// What training returns.
struct run_result {
  hsae::sae<float> model;  ///< export_model(): for the user's (unscaled) inputs
  hsae::evaluation eval;   ///< on the held-out rows, in the trained (scaled) units
  double input_scale = 1;
  double dead_fraction = 0;
  std::int64_t steps = 0, tokens = 0;
  double seconds = 0, tokens_per_second = 0;
  bool interrupted = false;
  bool stopped_by_max_steps = false;
};

/// The CUDA path (run_cuda.cu; throws usage_error when built without CUDA).
run_result train_cuda(const run_plan& p, const std::atomic<bool>* stop);
/// The CPU backend a configuration asks for: --threads, --cpu-gemm, --encoder-precision
/// (throws usage_error for oneDNN in a build without it).
hsae::cpu_backend cpu_backend_of(const train_config& c);
/// The CPU path.
run_result train_cpu(const run_plan& p, const std::atomic<bool>* stop);

/// This process's place in a distributed launch: rank 0 of 1 without one.
struct launch_info {
  int rank = 0, size = 1;
  int local_size = 1;  ///< ranks on this machine
  bool mpi = false;    ///< MPI is running (launch_begin started it)
};
const launch_info& launch();
/// The same, writable (launch_begin sets it).
launch_info& launch_state();
/// Starts MPI when the process was started by an MPI launcher (mpirun, srun: their
/// environment variables) and this build has MPI; silences stdout on ranks other than 0.
/// \throws usage_error when launched as one of several ranks by a launcher this build
///         cannot join (no MPI, or torchrun-style variables without an MPI launcher).
void launch_begin(int& argc, char**& argv);
/// Ends MPI (MPI_Finalize) after a run that every rank finished.
void launch_end();
/// After an error: with MPI running on several ranks, ends every rank (MPI_Abort with
/// `code`: the others would wait in their next collective); otherwise returns `code`.
int launch_fail(int code);
/// The ranks an MPI launcher started, from its environment variables (0: none).
long mpi_launch_size();
/// \throws usage_error on a launch this build cannot join (see launch_begin).
void check_launch(bool built_with_mpi);
/// The distributed CPU path (run_mpi.cpp): a grid of launch().size / shards replicas.
run_result train_distributed(const run_plan& p, const std::atomic<bool>* stop);

/// The whole program after parsing: resolve, train, write the outputs. Returns the exit
/// status (0, or 130 when interrupted). \throws usage_error, hsae::error.
int run(const train_config& c, const std::atomic<bool>* stop, const std::vector<std::string>& argv);

}  // namespace hsae_train
