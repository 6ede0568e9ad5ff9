// SPDX-License-Identifier: Apache-2.0
// hsae-train's run (run.hpp): inputs, defaults, the CPU path and the outputs.
#include "run.hpp"

#include <glob.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <map>
#include <sstream>

#include <hsae/data/row_file.hpp>
#include <hsae/detail/files.hpp>
#include <hsae/io/saelens.hpp>
#include <hsae/io/sparsify.hpp>
#include <hsae/version.hpp>

#include "driver.hpp"

namespace fs = std::filesystem;

namespace hsae_train {

namespace {

template <class... Args>
[[noreturn]] void fail(Args&&... args) {
  std::ostringstream s;
  (s << ... << args);
  throw usage_error(s.str());
}

std::string quote(const std::string& s) { return "'" + s + "'"; }

bool has_glob_chars(const std::string& s) { return s.find_first_of("*?[") != std::string::npos; }

/// What hsae-train writes into --out (the checkpoint must not take one of these names).
constexpr const char* output_files[] = {"cfg.json",       "sae_weights.safetensors", "sae.safetensors",
                                        "report.md",      "metrics.jsonl",           "hsae_train_config.json",
                                        "fvu_vs_k.csv",   "fvu_vs_k.gp",             "fvu_vs_k.png"};

/// The identity of an existing file (device, inode), to find one file given twice.
std::pair<dev_t, ino_t> file_id(const fs::path& f) {
  struct ::stat st {};
  if (::stat(f.c_str(), &st) != 0) return {0, 0};
  return {st.st_dev, st.st_ino};
}

/// The files of a directory input: its activations.json shards, else its .npy files.
std::vector<fs::path> directory_files(const fs::path& dir, const std::string& option, nlohmann::json& info) {
  std::vector<fs::path> files;
  const fs::path meta = dir / "activations.json";
  if (fs::exists(meta)) {
    std::ifstream f(meta);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(f);
    } catch (const nlohmann::json::exception& e) {
      fail(option, ": ", quote(meta.string()), " is not valid JSON");
    }
    if (!j.is_object() || !j.contains("shards") || !j["shards"].is_array())
      fail(option, ": ", quote(meta.string()), " has no \"shards\" list");
    for (const auto& s : j["shards"]) {
      if (!s.is_object() || !s.contains("file") || !s["file"].is_string())
        fail(option, ": ", quote(meta.string()), ": a shard without a \"file\" name");
      files.push_back(dir / s["file"].get<std::string>());
    }
    if (files.empty()) fail(option, ": ", quote(meta.string()), " lists no shards");
    if (info.is_null()) info = j;
    return files;
  }
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".npy") files.push_back(e.path());
  if (files.empty())  // no .npy file: its .safetensors files
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_regular_file() && e.path().extension() == ".safetensors") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  if (files.empty())
    fail(option, ": the directory ", quote(dir.string()), " holds no activations.json, .npy or .safetensors file");
  return files;
}

std::int64_t parse_int(const std::string& s, bool& ok) {
  std::int64_t v = 0;
  const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  ok = !s.empty() && r.ec == std::errc{} && r.ptr == s.data() + s.size();
  return v;
}

}  // namespace

bool built_with_cuda() {
#if defined(HSAE_TRAIN_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

file_set expand_inputs(const std::vector<std::string>& entries, const std::string& option, const std::string& tensor) {
  file_set out;
  std::vector<fs::path> files;
  for (const std::string& e : entries) {
    if (has_glob_chars(e) && !fs::exists(e)) {
      glob_t g{};
      const int rc = ::glob(e.c_str(), 0, nullptr, &g);
      if (rc == GLOB_NOMATCH || (rc == 0 && g.gl_pathc == 0)) {
        ::globfree(&g);
        fail(option, ": ", quote(e), " matches no file");
      }
      if (rc != 0) {
        ::globfree(&g);
        fail(option, ": cannot expand ", quote(e));
      }
      std::vector<fs::path> m;
      for (std::size_t i = 0; i < g.gl_pathc; ++i) m.emplace_back(g.gl_pathv[i]);
      ::globfree(&g);
      std::sort(m.begin(), m.end());
      for (auto& p : m) {
        if (fs::is_directory(p)) {
          auto d = directory_files(p, option, out.activations);
          files.insert(files.end(), d.begin(), d.end());
        } else {
          files.push_back(p);
        }
      }
      continue;
    }
    std::error_code ec;
    const auto st = fs::status(e, ec);
    if (!fs::exists(st)) fail(option, ": ", quote(e), " does not exist");
    if (fs::is_directory(st)) {
      auto d = directory_files(e, option, out.activations);
      files.insert(files.end(), d.begin(), d.end());
    } else {
      files.emplace_back(e);
    }
  }
  // A file given twice (two globs, a directory and one of its files) would be read twice
  // per epoch, and with the held-out rows by position, its held-out rows trained on.
  std::map<std::pair<dev_t, ino_t>, fs::path> seen;
  for (const auto& f : files) {
    const auto [it, fresh] = seen.emplace(file_id(f), f);
    if (!fresh)
      fail(option, ": ", quote(f.string()), " is the same file as ", quote(it->second.string()), " (given twice)");
  }
  out.ids.reserve(seen.size());
  for (const auto& [id, f] : seen) out.ids.push_back(id);
  for (const auto& f : files) {
    const std::string s = f.string();
    try {
      const hsae::row_file n(f, tensor);
      if (n.cols() > std::numeric_limits<int>::max())
        fail(option, ": ", quote(s), " has ", n.cols(), " columns, more than hsae's limit ",
             std::numeric_limits<int>::max());
      if (out.d_model == 0) out.d_model = int(n.cols());
      else if (n.cols() != out.d_model)
        fail(option, ": ", quote(s), " has ", n.cols(), " columns, but ", quote(files.front().string()), " has ",
             out.d_model);
      out.rows += n.rows();
    } catch (const hsae::error& err) {
      fail(option, ": ", err.what());
    }
  }
  out.files = std::move(files);
  return out;
}

hsae::dynamic_k_schedule parse_schedule(const std::string& text, std::int64_t k_max, bool k_max_given) {
  try {
    const int k = int(k_max);
    if (text == "all") return hsae::dynamic_k_schedule::all_prefixes(k);
    if (text == "topk") return hsae::dynamic_k_schedule::top_k(k);
    if (text == "geometric") return hsae::dynamic_k_schedule::geometric(1, k);
    if (text == "multi-topk") {
      if (k % 4 != 0) fail("--schedule: multi-topk trains k = K/4 and K: --k-max ", k, " is not a multiple of 4");
      return hsae::dynamic_k_schedule::multi_topk(k / 4);
    }
    // An explicit list: k[:weight],...
    std::vector<hsae::schedule_level> levels;
    std::size_t pos = 0;
    while (pos <= text.size()) {
      const std::size_t comma = std::min(text.find(',', pos), text.size());
      const std::string item = text.substr(pos, comma - pos);
      const std::size_t colon = item.find(':');
      bool ok = false;
      const std::int64_t lk = parse_int(item.substr(0, colon), ok);
      if (!ok || lk < 1 || lk > std::numeric_limits<int>::max())
        fail("--schedule: ", quote(text), ": ", quote(item),
             " is not k or k:weight (all | topk | multi-topk | geometric | a list like 8:1,16:0.5,64:2)");
      double w = 1.0;
      if (colon != std::string::npos) {
        const std::string ws = item.substr(colon + 1);
        const auto r = std::from_chars(ws.data(), ws.data() + ws.size(), w);
        if (ws.empty() || r.ec != std::errc{} || r.ptr != ws.data() + ws.size() || !(w > 0) || !std::isfinite(w))
          fail("--schedule: ", quote(text), ": the weight in ", quote(item), " is not a positive number");
      }
      levels.push_back({int(lk), w});
      pos = comma + 1;
    }
    hsae::dynamic_k_schedule s(std::move(levels));
    if (k_max_given && s.k_max() != k_max)
      fail("--schedule: the list ends at k=", s.k_max(), " but --k-max is ", k_max);
    return s;
  } catch (const hsae::config_error& e) {
    fail("--schedule: ", quote(text), ": ", e.what());
  }
}

run_plan resolve(const train_config& in) {
  validate(in);
  run_plan p;
  train_config& c = p.cfg;
  c = in;
  if (c.device == "cuda" && !built_with_cuda())
    fail("--device: cuda: this hsae-train was built without CUDA (configure with -DHSAE_CUDA=ON)");

  // Data.
  if (c.synthetic) {
    p.d_model = hsae::synthetic_options::demo().d_model;
    p.eval_rows = c.held_out_rows;
    p.held_out_text = "the first " + std::to_string(p.eval_rows) +
                      " rows of the synthetic stream (drawn before training, never repeated: the stream is endless)";
  } else {
    p.train = expand_inputs(c.data, "--data", c.tensor);
    p.d_model = p.train.d_model;
    if (!c.test.empty()) {
      p.test = expand_inputs(c.test, "--test", c.tensor);
      if (p.test.d_model != p.d_model)
        fail("--test: the test files have ", p.test.d_model, " columns, the training files ", p.d_model);
      for (const auto& f : p.test.files)
        if (std::find(p.train.ids.begin(), p.train.ids.end(), file_id(f)) != p.train.ids.end())
          fail("--test: ", quote(f.string()), " is also a training file (--data): its rows would be trained on");
    }
    if (p.train.rows < 8) fail("--data: only ", p.train.rows, " rows");
    if (!p.train.activations.is_null()) {
      const auto& a = p.train.activations;
      if (!c.was_given("model_name") && a.contains("model_name") && a["model_name"].is_string())
        c.model_name = a["model_name"].get<std::string>();
      if (!c.was_given("hook_name") && a.contains("hook_name") && a["hook_name"].is_string())
        c.hook_name = a["hook_name"].get<std::string>();
    }
    if (p.test.files.empty()) {
      // The held-out rows by position: the last H rows of the files in the order given,
      // never trained on (the training source ends before them).
      const std::int64_t cap = p.train.rows / 4;
      c.held_out_rows = std::max<std::int64_t>(1, std::min(c.held_out_rows, cap));
      p.eval_rows = c.held_out_rows;
      p.train_rows = p.train.rows - p.eval_rows;
      p.held_out_text = "the last " + std::to_string(p.eval_rows) + " rows of the data by position (rows " +
                        std::to_string(p.train_rows) + ".." + std::to_string(p.train.rows - 1) +
                        " of the files in the order given; never trained on)";
    } else {
      p.eval_rows = p.test.rows;
      p.train_rows = p.train.rows;
      p.held_out_text = std::to_string(p.test.rows) + " rows of the --test files (never trained on)";
    }
  }

  // Model.
  if (c.expansion > 0) {
    const std::int64_t w = std::max<std::int64_t>(1, std::llround(c.expansion * double(p.d_model)));
    if (w > (1 << 30)) fail("--expansion: ", c.expansion, " x d_model ", p.d_model, " is too wide");
    if (c.d_sae > 0 && c.d_sae != w)
      fail("--expansion: ", c.expansion, " x d_model ", p.d_model, " = ", w, " disagrees with --d-sae ", c.d_sae,
           " (give one of them)");
    c.d_sae = w;
  }
  if (c.d_sae == 0) c.d_sae = 16 * std::int64_t(p.d_model);
  c.expansion = double(c.d_sae) / double(p.d_model);
  if (c.k_max > c.d_sae) fail("--k-max: ", c.k_max, " is not an integer in [1, ", c.d_sae, "] (d_sae)");
  p.schedule = parse_schedule(c.schedule, c.k_max, c.was_given("k_max"));
  c.k_max = p.schedule.k_max();
  if (c.k_max > c.d_sae) fail("--schedule: its k_max ", c.k_max, " exceeds d_sae ", c.d_sae);

  // Training length.
  if (c.batch == 0) c.batch = c.synthetic ? 2048 : 4096;
  if (c.tokens == 0) {
    if (c.synthetic) c.tokens = 4'000'000;
    else {
      const double e = c.epochs > 0 ? c.epochs : 1.0;
      const double t = e * double(p.train_rows);
      if (!(t < 9.2e18)) fail("--epochs: ", c.epochs, " epochs of ", p.train_rows, " rows exceed 2^63 tokens");
      c.tokens = std::max<std::int64_t>(1, std::llround(t));
    }
  }
  c.epochs = c.synthetic ? 0.0 : double(c.tokens) / double(p.train_rows);
  const std::int64_t steps = c.tokens / c.batch + (c.tokens % c.batch != 0);
  if (c.warmup_steps < 0) c.warmup_steps = std::min<std::int64_t>(1000, steps / 10);
  if (c.decay_steps < 0) c.decay_steps = steps / 5;
  if (c.decay_steps > steps) fail("--decay-steps: ", c.decay_steps, " is more than the run's ", steps, " steps");
  if (c.dead_tokens == 0) c.dead_tokens = std::min<std::int64_t>(10'000'000, std::max<std::int64_t>(1, c.tokens / 8));
  if (c.init_rows == 0)
    c.init_rows = c.synthetic ? 8192 : std::max<std::int64_t>(1, std::min<std::int64_t>(16384, p.train_rows / 4));
  if (!c.was_given("normalize")) c.normalize = !c.synthetic;
  if (c.auxk_k == 0) c.auxk_k = std::max(1, std::min(512, p.d_model / 2));
  if (c.max_steps > steps) fail("--max-steps: ", c.max_steps, " is more than the run's ", steps, " steps");

  hsae::trainer_options& o = p.topt;
  o.batch_size = c.batch;
  o.total_tokens = c.tokens;
  o.eval_rows = p.eval_rows;
  o.eval_every_steps = c.eval_every;
  o.init_rows = c.init_rows;
  o.normalize_inputs = c.normalize;
  o.init.seed = std::uint64_t(c.seed);
  o.adam.lr = c.lr;
  o.adam.warmup_steps = c.warmup_steps;
  o.adam.decay_steps = c.decay_steps;
  o.adam.final_lr_fraction = c.final_lr_fraction;
  o.adam.max_grad_norm = c.max_grad_norm;
  o.step.use_auxk = c.auxk;
  o.step.auxk.k_aux = int(c.auxk_k);
  o.step.auxk.alpha = c.auxk_coef;
  o.dead_after_tokens = c.dead_tokens;
  o.log_every_steps = c.log_every;
  o.checkpoint_every_steps = c.checkpoint_every;
  if (c.lr == 0) c.lr = o.adam.peak_lr(int(c.d_sae));  // the rule's value, recorded
  o.adam.lr = c.lr;
  try {
    hsae::trainer_options v = o;
    v.adam.total_steps = steps;
    v.validate();
  } catch (const hsae::config_error& e) {
    fail("options: ", e.what());
  }

  // Outputs.
  p.out = c.out;
  if (!c.print_config) {
    std::error_code ec;
    const auto st = fs::status(p.out, ec);
    if (fs::exists(st) && !fs::is_directory(st)) fail("--out: ", quote(c.out), " exists and is not a directory");
    if (fs::is_directory(st))
      for (const auto& e : fs::directory_iterator(p.out))
        if (e.is_directory())
          fail("--out: ", quote(c.out), " holds the subdirectory ", quote(e.path().filename().string()),
               " (the SAE is written into --out, which must hold files only)");
    // The SAE directory is replaced as a whole (io/sae_types.hpp): through a sibling
    // staging directory, so --out's parent must be writable and on the same file system.
    const fs::path parent = fs::absolute(p.out).lexically_normal().parent_path();
    fs::create_directories(parent, ec);
    if (::access(parent.c_str(), W_OK | X_OK) != 0)
      fail("--out: the SAE is saved through a temporary directory beside ", quote(c.out), ", but ",
           quote(parent.string()), " is not writable; give a directory inside a writable one");
    if (fs::is_directory(st) && file_id(p.out).first != file_id(parent).first)
      fail("--out: ", quote(c.out), " is a mount point; the SAE is saved through a temporary directory beside it, "
           "on the same file system: give a directory inside it");
  }
  if (!c.checkpoint.empty()) {
    p.checkpoint = c.checkpoint;
    std::error_code ec;
    const fs::path outabs = fs::absolute(p.out).lexically_normal();
    if (fs::is_directory(p.checkpoint, ec) || c.checkpoint.ends_with("/") ||
        fs::absolute(p.checkpoint).lexically_normal() == outabs)
      p.checkpoint /= "hsae_checkpoint.safetensors";
    const fs::path parent = fs::absolute(p.checkpoint).lexically_normal().parent_path();
    if (parent != outabs && parent.string().rfind(outabs.string() + "/", 0) == 0)
      fail("--checkpoint: ", quote(p.checkpoint.string()), " lies in a subdirectory of --out (put it in --out itself "
           "or elsewhere)");
    if (parent == outabs)
      for (const char* name : output_files)
        if (p.checkpoint.filename() == name)
          fail("--checkpoint: ", quote(p.checkpoint.string()), " is the name of one of hsae-train's outputs in --out");
    if (c.resume && !fs::exists(p.checkpoint))
      fail("--resume: the checkpoint ", quote(p.checkpoint.string()), " does not exist");
    if (!c.resume && !c.print_config && fs::exists(p.checkpoint))
      fail("--checkpoint: ", quote(p.checkpoint.string()),
           " exists: continue its run with --resume, or remove it (or give another path) to start afresh");
    if (!c.print_config) {
      fs::create_directories(parent, ec);
      if (::access(parent.c_str(), W_OK | X_OK) != 0)
        fail("--checkpoint: cannot write into ", quote(parent.string()));
    }
  }

  p.resolved = to_json(c);
  p.resolved.erase("data");
  p.resolved.erase("test");
  nlohmann::json files = nlohmann::json::array(), tests = nlohmann::json::array();
  for (const auto& f : p.train.files) files.push_back(f.string());
  for (const auto& f : p.test.files) tests.push_back(f.string());
  p.resolved["data"] = files;
  p.resolved["test"] = tests;
  p.resolved["d_model"] = p.d_model;
  p.resolved["steps"] = steps;
  p.resolved["epochs"] = 0.0;  // --tokens holds the length; the epochs it makes:
  p.resolved["epochs_trained"] = c.epochs;
  p.resolved["hsae_version"] = hsae::version_string;
  // What a resumed run must share with the checkpoint's run.
  p.run_identity = p.resolved;
  for (const char* k : {"out", "format", "dtype", "model_name", "hook_name", "checkpoint", "checkpoint_every",
                        "resume", "max_steps", "threads", "cpu_gemm", "encoder_precision", "shards", "rank_timeout", "log_every", "eval_every", "device", "storage",
                        "deterministic", "hsae_version", "epochs", "epochs_trained"})
    p.run_identity.erase(k);
  return p;
}

launch_info& launch_state() {
  static launch_info l;
  return l;
}
const launch_info& launch() { return launch_state(); }

namespace {
/// The first of `names` set in the environment, as an integer (0 when none is).
long env_int(std::initializer_list<const char*> names, const char** which = nullptr) {
  for (const char* n : names)
    if (const char* v = std::getenv(n); v != nullptr && *v != 0) {
      if (which != nullptr) *which = n;
      return std::strtol(v, nullptr, 10);
    }
  return 0;
}
}  // namespace

/// The ranks an MPI launcher started (0 when none did): Open MPI, MPICH/Hydra and Slurm's
/// PMI, PMIx, MVAPICH.
long mpi_launch_size() {
  return env_int({"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE"});
}

/// Refuses a launch this build cannot join: torchrun-style variables without an MPI
/// launcher, or an MPI launch of several ranks without MPI in this build.
void check_launch(bool built_with_mpi) {
  const long mpi = mpi_launch_size();
  const char* which = nullptr;
  const long ws = env_int({"WORLD_SIZE"}, &which);
  if (mpi == 0 && ws > 1)
    throw usage_error("started as one of WORLD_SIZE=" + std::to_string(ws) +
                      " ranks (torchrun-style variables) but not by an MPI launcher: hsae-train's ranks talk over "
                      "MPI; start it with mpirun -np " + std::to_string(ws) + " hsae-train ...");
  if (mpi > 1 && !built_with_mpi)
    throw usage_error("started by an MPI launcher as one of " + std::to_string(mpi) +
                      " ranks, but this hsae-train was built without MPI (install libopenmpi-dev and reconfigure; "
                      "HSAE_MPI)");
}

#if !defined(HSAE_TRAIN_WITH_MPI)
void launch_begin(int&, char**&) { check_launch(false); }
void launch_end() {}
int launch_fail(int code) { return code; }
run_result train_distributed(const run_plan&, const std::atomic<bool>*) {
  fail("--shards: this hsae-train was built without MPI (install libopenmpi-dev and reconfigure; HSAE_MPI)");
}
#endif

hsae::cpu_backend cpu_backend_of(const train_config& c) {
  hsae::cpu_backend be;
  be.num_threads = int(c.threads);
  be.gemm = c.cpu_gemm == "eigen" ? hsae::cpu_gemm::eigen
            : c.cpu_gemm == "onednn" ? hsae::cpu_gemm::onednn
                                     : hsae::cpu_gemm::automatic;
  be.encoder_precision = c.encoder_precision == "bf16" ? hsae::gemm_precision::bf16 : hsae::gemm_precision::fp32;
  try {
    (void)hsae::resolve_encoder_gemm<float>(be);
  } catch (const hsae::config_error& e) {
    fail("--cpu-gemm: ", e.what());
  }
  return be;
}

run_result train_cpu(const run_plan& p, const std::atomic<bool>* stop) {
  if (launch().mpi) return train_distributed(p, stop);
  if (p.cfg.shards > 1)
    fail("--shards: ", p.cfg.shards, " shards need as many ranks (or a multiple): start hsae-train under mpirun, "
         "e.g. mpirun -np ", p.cfg.shards, " hsae-train --shards ", p.cfg.shards, " ...");
  return train_with<hsae::cpu_backend>(cpu_backend_of(p.cfg), p, stop);
}

#if !defined(HSAE_TRAIN_WITH_CUDA)
run_result train_cuda(const run_plan&, const std::atomic<bool>*) {
  fail("--device: cuda: this hsae-train was built without CUDA (configure with -DHSAE_CUDA=ON)");
}
#endif

namespace {

std::string schedule_text(const hsae::dynamic_k_schedule& s) {
  std::ostringstream o;
  bool uniform = true;
  for (std::size_t l = 0; l < s.size(); ++l) uniform = uniform && s.weight(l) == s.weight(0);
  if (uniform && s.size() == std::size_t(s.k_max())) {
    o << "all prefixes 1.." << s.k_max();
    return o.str();
  }
  for (std::size_t l = 0; l < s.size(); ++l) o << (l ? "," : "") << s.k(l) << ":" << s.weight(l);
  return o.str();
}

hsae::safetensors_dtype dtype_of(const std::string& s) {
  if (s == "f16") return hsae::safetensors_dtype::f16;
  if (s == "bf16") return hsae::safetensors_dtype::bf16;
  return hsae::safetensors_dtype::f32;
}

/// The table rows (k, FVU, explained variance, MSE in the user's units, L0).
std::string table_text(const hsae::evaluation& e, double scale, bool markdown) {
  std::ostringstream o;
  char buf[256];
  if (markdown) {
    o << "| k | FVU | explained variance | MSE (input units) | L0 |\n|---:|---:|---:|---:|---:|\n";
  } else {
    std::snprintf(buf, sizeof buf, "%6s %9s %10s %12s %7s\n", "k", "FVU", "expl.var", "MSE", "L0");
    o << buf;
  }
  for (const auto& l : e.in_input_units(scale).levels) {
    const double mse = l.mse;
    if (markdown)
      std::snprintf(buf, sizeof buf, "| %d | %.4f | %.2f%% | %.4e | %.2f |\n", l.k, l.fvu,
                    100.0 * l.explained_variance(), mse, l.l0);
    else
      std::snprintf(buf, sizeof buf, "%6d %9.4f %9.2f%% %12.4e %7.2f\n", l.k, l.fvu, 100.0 * l.explained_variance(),
                    mse, l.l0);
    o << buf;
  }
  return o.str();
}

void write_text(const fs::path& path, const std::string& text) {
  hsae::detail::write_file_atomically(path, text, "hsae-train: output");
}

std::string shell_quote(const std::string& s) {
  if (!s.empty() && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./=:,+@%") ==
                        std::string::npos)
    return s;
  std::string o = "'";
  for (char ch : s) o += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return o + "'";
}

/// `s` inside a double-quoted gnuplot string: backslashes and double quotes escaped.
std::string gnuplot_text(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '\\' || ch == '"') o += '\\';
    o += ch;
  }
  return o;
}

/// FVU against k: CSV, gnuplot script, and the PNG when gnuplot is installed; the title
/// says which rows (`rows_text`) were evaluated.
std::string write_plot(const fs::path& out, const hsae::evaluation& e, const std::string& rows_text) {
  std::ostringstream csv;
  csv << "k,fvu,l0\n";
  for (const auto& l : e.levels) csv << l.k << "," << l.fvu << "," << l.l0 << "\n";
  write_text(out / "fvu_vs_k.csv", csv.str());
  std::ostringstream gp;
  gp << "set terminal pngcairo size 1100,650 noenhanced\n"
     << "set output '" << (out / "fvu_vs_k.png").string() << "'\n"
     << "set datafile separator ','\n"
     << "set title \"FVU against k (one model, its top-k prefix at each k)\\non " << gnuplot_text(rows_text) << "\" font \",10\"\n"
     << "set xlabel 'k'\nset ylabel 'FVU (held-out rows)'\n"
     << "set logscale y\nset grid\nset key off\n"
     << "plot '" << (out / "fvu_vs_k.csv").string() << "' skip 1 using 1:2 with linespoints lw 3 pt 7 ps 0.6\n";
  write_text(out / "fvu_vs_k.gp", gp.str());
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0)
    return "gnuplot not found: the plot script is in " + (out / "fvu_vs_k.gp").string() +
           " (apt-get install gnuplot-nox)";
  if (std::system(("gnuplot " + shell_quote((out / "fvu_vs_k.gp").string())).c_str()) != 0)
    return "gnuplot failed on " + (out / "fvu_vs_k.gp").string() + " (no PNG)";
  return "";
}

}  // namespace

void write_run_config(const run_plan& p) {
  nlohmann::json j = p.resolved;
  j["resume"] = false;
  j["max_steps"] = 0;
  write_text(p.out / "hsae_train_config.json", j.dump(2) + "\n");
}

int run(const train_config& c, const std::atomic<bool>* stop, const std::vector<std::string>& argv) {
  const run_plan p = resolve(c);
  if (c.print_config) {
    std::printf("%s\n", p.resolved.dump(2).c_str());
    return 0;
  }
  const train_config& r = p.cfg;
  fs::create_directories(p.out);
  if (::access(p.out.c_str(), W_OK | X_OK) != 0) fail("--out: ", quote(r.out), " is not writable");


  const std::int64_t steps = p.resolved["steps"].get<std::int64_t>();
  std::printf("hsae-train %s: HierarchicalTopK SAE, schedule %s\n", hsae::version_string,
              schedule_text(p.schedule).c_str());
  if (r.synthetic)
    std::printf("data: synthetic (as hsae_demo), d_model=%d\n", p.d_model);
  else
    std::printf("data: %zu file(s), %lld rows of d_model=%d%s%s\n", p.train.files.size(),
                (long long)p.train.rows, p.d_model, r.model_name.empty() ? "" : (", model " + r.model_name).c_str(),
                r.hook_name.empty() ? "" : (", hook " + r.hook_name).c_str());
  std::printf("held out: %s\n", p.held_out_text.c_str());
  std::printf("model: d_model=%d, d_sae=%lld (%.3gx), k_max=%lld; lr %.4g%s, batch %lld, %lld tokens (%lld steps",
              p.d_model, (long long)r.d_sae, r.expansion, (long long)r.k_max, r.lr,
              c.lr == 0 ? " (the default rule 2e-4/sqrt(d_sae/16384))" : "", (long long)r.batch, (long long)r.tokens,
              (long long)steps);
  if (!r.synthetic) std::printf(", %.2f epochs", r.epochs);
  std::printf("), device %s\n", r.device.c_str());
  if (r.device == "cpu") std::printf("encoder GEMM: %s\n", hsae::encoder_gemm_info<float>(cpu_backend_of(c)).c_str());
  if (r.resume) std::printf("resuming from %s\n", p.checkpoint.string().c_str());
  std::printf("\n");
  std::fflush(stdout);

  const run_result res = r.device == "cuda" ? train_cuda(p, stop) : train_cpu(p, stop);

  if (res.interrupted) {
    if (::isatty(::fileno(stderr))) std::fprintf(stderr, "\n");
    std::string cmd = "hsae-train";
    bool has_resume = false;
    for (std::size_t i = 1; i < argv.size(); ++i) {
      if (argv[i] == "--max-steps" && i + 1 < argv.size()) {
        ++i;
        continue;
      }
      if (argv[i].rfind("--max-steps=", 0) == 0) continue;
      has_resume = has_resume || argv[i] == "--resume";
      cmd += " " + shell_quote(argv[i]);
    }
    if (!has_resume) cmd += " --resume";
    const char* why = res.stopped_by_max_steps ? "stopped (--max-steps)" : "interrupted";
    if (p.checkpoint.empty())
      std::printf("%s at step %lld of %lld; no --checkpoint was given, so the run cannot be resumed\n", why,
                  (long long)res.steps, (long long)steps);
    else
      std::printf("%s at step %lld of %lld; checkpoint %s; resume with:\n  %s\n", why, (long long)res.steps,
                  (long long)steps, p.checkpoint.string().c_str(), cmd.c_str());
    return res.stopped_by_max_steps ? 0 : 130;
  }

  if (launch().rank != 0) return 0;  // the root writes the outputs

  // The SAE, for the user's inputs (the input scale folded into the biases).
  hsae::sae_save_options so;
  so.dtype = dtype_of(r.dtype);
  nlohmann::json md = nlohmann::json::object();
  if (!r.model_name.empty()) md["model_name"] = r.model_name;
  if (!r.hook_name.empty()) md["hook_name"] = r.hook_name;
  md["d_in"] = p.d_model;
  md["hsae_tokens_trained"] = res.tokens;
  md["hsae_input_scale"] = res.input_scale;
  md["hsae_input_normalization"] =
      res.input_scale != 1.0 ? "trained on inputs times hsae_input_scale; folded into b_enc and b_dec, so the SAE "
                               "takes the raw activations"
                             : "none";
  nlohmann::json fvu = nlohmann::json::object();
  for (const auto& l : res.eval.levels) fvu[std::to_string(l.k)] = l.fvu;
  md["hsae_final_fvu"] = fvu;
  md["hsae_dead_fraction"] = res.dead_fraction;
  md["hsae_eval_rows"] = p.held_out_text;
  if (!p.train.activations.is_null()) {
    const auto& a = p.train.activations;
    if (a.contains("layer")) md["hsae_layer"] = a["layer"];
    if (a.contains("dtype")) md["hsae_activation_dtype"] = a["dtype"];
  }
  so.metadata = md;
  if (r.format == "sparsify") hsae::save_sparsify(p.out, res.model, p.schedule, so);
  else hsae::save_saelens(p.out, res.model, p.schedule, so);

  const std::string plot_note = write_plot(p.out, res.eval, p.held_out_text);

  // report.md
  std::ostringstream rep;
  rep << "# hsae-train report\n\n"
      << "hsae " << hsae::version_string << ", HierarchicalTopK SAE saved in the " << r.format << " layout ("
      << r.dtype << ") in this directory.\n\n"
      << "## Run\n\n"
      << "- data: ";
  if (r.synthetic) rep << "synthetic (hsae_demo's hierarchical data), d_model " << p.d_model << "\n";
  else {
    rep << p.train.files.size() << " file(s), " << p.train.rows << " rows, d_model " << p.d_model;
    if (!r.model_name.empty()) rep << ", model `" << r.model_name << "`";
    if (!r.hook_name.empty()) rep << ", hook `" << r.hook_name << "`";
    rep << "\n";
    for (const auto& f : p.train.files) rep << "  - `" << f.string() << "`\n";
  }
  rep << "- evaluated on: " << p.held_out_text << "\n"
      << "- d_sae " << r.d_sae << " (" << r.expansion << " x d_model), k_max " << r.k_max << ", schedule "
      << schedule_text(p.schedule) << "\n"
      << "- " << res.tokens << " tokens in " << res.steps << " steps of " << r.batch << " rows";
  if (!r.synthetic) rep << " (" << r.epochs << " epochs)";
  rep << "; lr " << r.lr << ", warm-up " << r.warmup_steps << " steps, decay over the last " << r.decay_steps
      << " steps to " << r.final_lr_fraction << " x lr\n"
      << "- AuxK " << (r.auxk ? "on (k_aux " + std::to_string(r.auxk_k) + ")" : std::string("off"))
      << ", dead after " << r.dead_tokens << " tokens without firing, seed " << r.seed << ", device " << r.device
      << "\n"
      << "- input scale " << res.input_scale
      << (res.input_scale != 1.0 ? " (inputs were multiplied by it in training; folded into the saved biases)"
                                 : "")
      << "\n"
      << "- trained in " << res.seconds << " s (" << std::llround(res.tokens_per_second) << " tokens/s)\n\n"
      << "## Sparsity-fidelity on " << p.held_out_text << "\n\n"
      << "One model; at each k its top-k prefix. MSE is per element in the input's units (the trained units "
         "divided by the input scale squared).\n\n"
      << table_text(res.eval, res.input_scale, true) << "\n"
      << "Dead latents: " << 100.0 * res.dead_fraction << "% of " << r.d_sae << ".\n\n"
      << "Files: `cfg.json` + `" << (r.format == "sparsify" ? "sae.safetensors" : "sae_weights.safetensors")
      << "` (the SAE), `metrics.jsonl`, `hsae_train_config.json`, `fvu_vs_k.csv`, `fvu_vs_k.png`.\n";
  if (!plot_note.empty()) rep << "\nNote: " << plot_note << "\n";
  write_text(p.out / "report.md", rep.str());

  std::printf("\ntrained %lld tokens in %.1f s (%.0f tokens/s)\n", (long long)res.tokens, res.seconds,
              res.tokens_per_second);
  std::printf("\nsparsity-fidelity on %s\n(one model, its top-k prefix at every k; MSE in the input's units)\n",
              p.held_out_text.c_str());
  std::printf("%s", table_text(res.eval, res.input_scale, false).c_str());
  std::printf("dead latents: %.1f%% of %lld\n", 100.0 * res.dead_fraction, (long long)r.d_sae);
  if (!plot_note.empty()) std::printf("%s\n", plot_note.c_str());
  std::printf("\nwrote %s: the SAE (%s), report.md, metrics.jsonl, hsae_train_config.json%s\n", r.out.c_str(),
              r.format.c_str(), plot_note.empty() ? ", fvu_vs_k.png" : "");
  return 0;
}

}  // namespace hsae_train
