// SPDX-License-Identifier: Apache-2.0
// hsae-train's option table and parsers (config.hpp).
#include "config.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>
#include <variant>

namespace hsae_train {

namespace {

constexpr std::int64_t int_max = std::numeric_limits<std::int64_t>::max();

struct int_field {
  std::int64_t train_config::*p;
  std::int64_t lo, hi;
};
struct real_field {
  double train_config::*p;
  double lo, hi;
  bool lo_open = false;  ///< (lo, hi] rather than [lo, hi]
};
struct text_field {
  std::string train_config::*p;
  std::vector<std::string> choices;  ///< empty: any text
};
struct flag_field {
  bool train_config::*p;
};
struct list_field {
  std::vector<std::string> train_config::*p;
};
using field = std::variant<int_field, real_field, text_field, flag_field, list_field>;

struct option_entry {
  option_info info;
  field f;
  bool file_key = true;  ///< allowed in a config file (not --config, --help, ...)
};

const std::vector<option_entry>& table() {
  using c = train_config;
  static const std::vector<option_entry> t = {
      // Inputs.
      {{"data", "FILE...", "activation files: .npy, globs ('acts/*.npy', quoted), directories holding "
                           "activations.json or .npy files, .safetensors; also as positional arguments",
        "inputs"}, list_field{&c::data}},
      {{"test", "FILE...", "held-out files (same forms), read whole and evaluated at every evaluation; the "
                           "training rows are then all of --data",
        "inputs"}, list_field{&c::test}},
      {{"tensor", "NAME", "the tensor of .safetensors inputs (default: the only one)", "inputs"},
       text_field{&c::tensor, {}}},
      {{"synthetic", "", "train on the built-in synthetic data of hsae_demo (no files)", "inputs"},
       flag_field{&c::synthetic}},
      {{"held-out-rows", "H", "without --test: the last H rows of the data by position are held out, never "
                              "trained on (default 16384, at most a quarter of the data)",
        "inputs"}, int_field{&c::held_out_rows, 1, int_max}},
      {{"init-rows", "N", "rows for the initialisation (geometric median of b_dec, input scale); default 16384 "
                          "(8192 with --synthetic)",
        "inputs"}, int_field{&c::init_rows, 0, int_max}},
      // Model.
      {{"d-sae", "F", "dictionary width (0, default: 16 x d_model)", "model"}, int_field{&c::d_sae, 0, 1 << 30}},
      {{"expansion", "X", "dictionary width as a multiple of d_model (0: --d-sae, or 16)", "model"},
       real_field{&c::expansion, 0, 1 << 20}},
      {{"k-max", "K", "largest k: the SAE's TopK at inference (default 32)", "model"},
       int_field{&c::k_max, 1, std::numeric_limits<int>::max()}},
      {{"schedule", "S", "all (every prefix 1..K, default) | topk | multi-topk (k=K/4 and K) | geometric "
                         "(1,2,4..K) | a list k:weight,... e.g. 8:1,16:0.5,64:2",
        "model"}, text_field{&c::schedule, {}}},
      // Optimisation.
      {{"lr", "LR", "peak learning rate (default: 2e-4 / sqrt(d_sae / 16384))", "training"},
       real_field{&c::lr, 0, 1e3}},
      {{"warmup-steps", "N", "linear warm-up steps (-1, default: min(1000, steps / 10))", "training"},
       int_field{&c::warmup_steps, -1, int_max}},
      {{"decay-steps", "N", "last steps with a linear decay of the lr (-1, default: steps / 5)", "training"},
       int_field{&c::decay_steps, -1, int_max}},
      {{"final-lr-fraction", "F", "lr at the end of the decay, as a fraction of the peak (default 0)", "training"},
       real_field{&c::final_lr_fraction, 0, 1}},
      {{"max-grad-norm", "G", "clip the gradient norm (default 0: no clipping)", "training"},
       real_field{&c::max_grad_norm, 0, 1e30}},
      {{"batch", "B", "rows per step (0, default: 4096; 2048 with --synthetic)", "training"},
       int_field{&c::batch, 0, std::numeric_limits<int>::max()}},
      {{"tokens", "N", "training tokens (0, default: one epoch; 4000000 with --synthetic)", "training"},
       int_field{&c::tokens, 0, int_max}},
      {{"epochs", "E", "training tokens as epochs of the training rows (instead of --tokens; 0: default)", "training"},
       real_field{&c::epochs, 0, 1e9}},
      {{"auxk-k", "N", "dead latents each row may use in AuxK (0, default: min(512, d_model / 2))", "training"},
       int_field{&c::auxk_k, 0, std::numeric_limits<int>::max()}},
      {{"auxk-coef", "A", "weight of the AuxK loss (default 1/32)", "training"}, real_field{&c::auxk_coef, 0, 1e6}},
      {{"auxk", "", "the AuxK loss that revives dead latents (default on; --no-auxk)", "training"},
       flag_field{&c::auxk}},
      {{"dead-tokens", "N", "a latent is dead after N tokens without firing (0, default: min(10M, tokens / 8))",
        "training"}, int_field{&c::dead_tokens, 0, int_max}},
      {{"seed", "S", "seed of the data order, the initialisation and the synthetic data (default 1)", "training"},
       int_field{&c::seed, 0, int_max}},
      {{"threads", "T", "CPU threads (default: all; hsae's own loops do not depend on it, nor did oneDNN's GEMM in "
                     "measurements; Eigen's GEMM does at large shapes)", "training"},
       int_field{&c::threads, 0, 4096}},
      {{"shards", "S", "under mpirun: split each model over S ranks by latents (exact top-k); the N ranks "
                       "form N/S data replicas x S shards (default 1: data parallel only; docs/DISTRIBUTED.md)",
        "training"}, int_field{&c::shards, 1, 4096}},
      {{"rank-timeout", "SEC", "under mpirun: end every rank when one waits longer than SEC seconds in a "
                               "collective (a dead or stuck rank; default 600)",
        "training"}, int_field{&c::rank_timeout, 1, 1 << 30}},
      {{"eval-every", "N", "evaluate on the held-out rows every N steps (default 0: at the end)", "training"},
       int_field{&c::eval_every, 0, int_max}},
      {{"device", "D", "cpu (default) | cuda (when built with CUDA)", "training"},
       text_field{&c::device, {"cpu", "cuda"}}},
      {{"storage", "P", "device storage precision on the GPU: f32 (default) | f16 | bf16", "training"},
       text_field{&c::storage, {"f32", "f16", "bf16"}}},
      {{"cpu-gemm", "L", "the CPU encoder GEMM: auto (default: oneDNN where hsae was built with it, else Eigen) "
                         "| eigen | onednn",
        "training"}, text_field{&c::cpu_gemm, {"auto", "eigen", "onednn"}}},
      {{"encoder-precision", "P", "operands of the CPU encoder GEMM: f32 (default) | bf16 (fp32 weights, fp32 "
                                  "accumulation; oneDNN's bf16 matmul on CPUs with AVX512-BF16 or AMX, else emulated)",
        "training"}, text_field{&c::encoder_precision, {"f32", "bf16"}}},
      {{"deterministic", "", "bitwise reproducible GPU runs (default on; the CPU always is)", "training"},
       flag_field{&c::deterministic}},
      {{"normalize", "", "scale inputs to E||x||^2 = d_model, folded into the saved SAE (default on for files, "
                         "off with --synthetic)",
        "training"}, flag_field{&c::normalize}},
      {{"shuffle-buffer", "N", "rows of the shuffle buffer (default 65536; 0: stream order)", "training"},
       int_field{&c::shuffle_buffer, 0, int_max}},
      {{"shuffle-chunk", "N", "rows of the contiguous chunks shuffled across all files each epoch (default: "
                              "file_source's, 1024; 0: whole files; docs/DATA.md)",
        "training"}, int_field{&c::shuffle_chunk, 0, int_max}},
      {{"log-every", "N", "progress line / metrics record every N steps (default 100)", "training"},
       int_field{&c::log_every, 1, int_max}},
      // Outputs.
      {{"out", "DIR", "output directory: the SAE, metrics.jsonl, report.md, fvu_vs_k.png, "
                      "hsae_train_config.json (required)",
        "outputs"}, text_field{&c::out, {}}},
      {{"format", "F", "saelens (default) | sparsify", "outputs"}, text_field{&c::format, {"saelens", "sparsify"}}},
      {{"dtype", "T", "dtype of the saved weights: f32 (default) | f16 | bf16", "outputs"},
       text_field{&c::dtype, {"f32", "f16", "bf16"}}},
      {{"model-name", "NAME", "the model the activations come from (metadata; default from activations.json)",
        "outputs"}, text_field{&c::model_name, {}}},
      {{"hook-name", "NAME", "the hook / layer name (metadata; default from activations.json)", "outputs"},
       text_field{&c::hook_name, {}}},
      {{"checkpoint", "PATH", "checkpoint file (a directory: PATH/hsae_checkpoint.safetensors), written at the "
                              "end, every --checkpoint-every steps and on Ctrl-C",
        "outputs"}, text_field{&c::checkpoint, {}}},
      {{"checkpoint-every", "N", "steps between checkpoints (default 0: at the end and on Ctrl-C)", "outputs"},
       int_field{&c::checkpoint_every, 0, int_max}},
      {{"resume", "", "continue the run of --checkpoint (same options required)", "outputs"},
       flag_field{&c::resume}},
      {{"max-steps", "N", "stop after N steps as on Ctrl-C (checkpoint, exit 0); 0: run to the end", "outputs"},
       int_field{&c::max_steps, 0, int_max}},
      // Command line only.
      {{"config", "FILE", "read options from a JSON file (keys as the long options, '_' for '-'); the command "
                          "line overrides it",
        "other"}, text_field{&c::config, {}}, false},
      {{"print-config", "", "print the resolved config as JSON and exit", "other"}, flag_field{&c::print_config},
       false},
      {{"help", "", "this text", "other"}, flag_field{&c::help}, false},
      {{"version", "", "print the version", "other"}, flag_field{&c::version}, false},
  };
  return t;
}

std::string key_of(std::string_view name) {
  std::string k(name);
  std::replace(k.begin(), k.end(), '-', '_');
  return k;
}

const option_entry* find_option(std::string_view name) {
  for (const auto& e : table())
    if (name == e.info.name) return &e;
  return nullptr;
}

template <class... Args>
[[noreturn]] void fail(Args&&... args) {
  std::ostringstream s;
  (s << ... << args);
  throw usage_error(s.str());
}

std::string quote(std::string_view s) { return "'" + std::string(s) + "'"; }

std::string format_real(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

/// `where` names the value in messages: "--k-max" or "config 'f.json': key \"k_max\"".
void set_int(train_config& c, const int_field& f, std::int64_t v, const std::string& where, const std::string& text) {
  if (v < f.lo || v > f.hi) fail(where, ": ", text, " is not an integer in [", f.lo, ", ", f.hi, "]");
  c.*f.p = v;
}
void set_real(train_config& c, const real_field& f, double v, const std::string& where, const std::string& text) {
  const bool ok = std::isfinite(v) && (f.lo_open ? v > f.lo : v >= f.lo) && v <= f.hi;
  if (!ok)
    fail(where, ": ", text, " is not a number in ", f.lo_open ? "(" : "[", format_real(f.lo), ", ",
         format_real(f.hi), "]");
  c.*f.p = v;
}
void set_text(train_config& c, const text_field& f, const std::string& v, const std::string& where) {
  if (!f.choices.empty() && std::find(f.choices.begin(), f.choices.end(), v) == f.choices.end()) {
    std::string list;
    for (const auto& ch : f.choices) list += (list.empty() ? "" : " | ") + ch;
    fail(where, ": ", quote(v), " is not one of ", list);
  }
  c.*f.p = v;
}

/// A command-line value for an option that takes one.
void set_from_text(train_config& c, const option_entry& e, const std::string& v) {
  const std::string where = std::string("--") + e.info.name;
  std::visit(
      [&](const auto& f) {
        using F = std::decay_t<decltype(f)>;
        if constexpr (std::is_same_v<F, int_field>) {
          std::int64_t x = 0;
          const auto r = std::from_chars(v.data(), v.data() + v.size(), x);
          if (v.empty() || r.ec != std::errc{} || r.ptr != v.data() + v.size())
            fail(where, ": ", quote(v), " is not an integer in [", f.lo, ", ", f.hi, "]");
          set_int(c, f, x, where, v);
        } else if constexpr (std::is_same_v<F, real_field>) {
          double x = 0;
          const auto r = std::from_chars(v.data(), v.data() + v.size(), x);
          if (v.empty() || r.ec != std::errc{} || r.ptr != v.data() + v.size())
            fail(where, ": ", quote(v), " is not a number");
          set_real(c, f, x, where, v);
        } else if constexpr (std::is_same_v<F, text_field>) {
          set_text(c, f, v, where);
        } else if constexpr (std::is_same_v<F, list_field>) {
          (c.*f.p).push_back(v);
        } else {
          fail(where, ": takes no value");
        }
      },
      e.f);
  c.given.insert(key_of(e.info.name));
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("--config: cannot read ", quote(path));
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

}  // namespace

const std::vector<option_info>& options() {
  static const std::vector<option_info> v = [] {
    std::vector<option_info> o;
    for (const auto& e : table()) o.push_back(e.info);
    return o;
  }();
  return v;
}

void apply_json(train_config& c, const nlohmann::json& j, const std::string& file) {
  const std::string pre = "config " + quote(file);
  if (!j.is_object()) fail(pre, ": not a JSON object (keys as the long options, e.g. {\"k_max\": 64})");
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const nlohmann::json& v = it.value();
    const option_entry* e = nullptr;
    for (const auto& t : table())
      if (key_of(t.info.name) == key) e = &t;
    // What hsae_train_config.json adds for the reader: ignored, so that file can be a --config.
    if (key == "d_model" || key == "steps" || key == "epochs_trained" || key == "hsae_version") continue;
    if (e == nullptr || !e->file_key) {
      std::string hint;
      if (key.find('-') != std::string::npos) hint = " (config keys use '_' for '-')";
      fail(pre, ": unknown key \"", key, "\"", hint);
    }
    const std::string where = pre + ": key \"" + key + "\"";
    const std::string shown = v.dump();
    std::visit(
        [&](const auto& f) {
          using F = std::decay_t<decltype(f)>;
          if constexpr (std::is_same_v<F, int_field>) {
            // nlohmann's is_number_integer() holds for unsigned values too: test those first,
            // so that 2^64 - 1 is not read back as -1.
            if (v.is_number_unsigned() && v.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
              fail(where, ": ", shown, " is not an integer in [", f.lo, ", ", f.hi, "]");
            else if (v.is_number_integer()) set_int(c, f, v.get<std::int64_t>(), where, shown);
            else if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() &&
                     std::abs(v.get<double>()) < 9e15)
              set_int(c, f, std::int64_t(v.get<double>()), where, shown);
            else fail(where, ": ", shown, " is not an integer in [", f.lo, ", ", f.hi, "]");
          } else if constexpr (std::is_same_v<F, real_field>) {
            if (!v.is_number()) fail(where, ": ", shown, " is not a number");
            set_real(c, f, v.get<double>(), where, shown);
          } else if constexpr (std::is_same_v<F, text_field>) {
            if (!v.is_string()) fail(where, ": ", shown, " is not a string");
            set_text(c, f, v.get<std::string>(), where);
          } else if constexpr (std::is_same_v<F, flag_field>) {
            if (!v.is_boolean()) fail(where, ": ", shown, " is not true or false");
            c.*f.p = v.get<bool>();
          } else {
            std::vector<std::string> list;
            if (v.is_string()) list.push_back(v.get<std::string>());
            else if (v.is_array()) {
              for (const auto& x : v) {
                if (!x.is_string()) fail(where, ": ", shown, " is not a list of strings");
                list.push_back(x.get<std::string>());
              }
            } else fail(where, ": ", shown, " is not a list of strings");
            c.*f.p = std::move(list);
          }
        },
        e->f);
    c.given.insert(key);
  }
}

train_config parse_command_line(int argc, const char* const* argv) {
  train_config c;
  // The config file first: the command line overrides it.
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    std::string path;
    if (a == "--config") {
      if (i + 1 >= argc) fail("--config: needs a file");
      path = argv[i + 1];
    } else if (a.rfind("--config=", 0) == 0) {
      path = a.substr(9);
    } else {
      continue;
    }
    if (!c.config.empty()) fail("--config: given twice");
    c.config = path;
    const std::string text = read_file(path);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      std::string m = e.what();
      std::replace(m.begin(), m.end(), '\n', ' ');
      fail("config ", quote(path), ": not valid JSON: ", m);
    }
    apply_json(c, j, path);
  }
  // Lists given on the command line replace the file's.
  bool data_cleared = false, test_cleared = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.size() < 2 || a[0] != '-') {  // positional: data
      if (!data_cleared) c.data.clear(), data_cleared = true;
      c.data.push_back(a);
      c.given.insert("data");
      continue;
    }
    if (a == "--") {
      for (++i; i < argc; ++i) {
        if (!data_cleared) c.data.clear(), data_cleared = true;
        c.data.push_back(argv[i]);
        c.given.insert("data");
      }
      break;
    }
    if (a.rfind("--", 0) != 0) fail(a, ": unknown option (options are long: --name; see --help)");
    std::string name = a.substr(2), value;
    bool has_value = false;
    if (const auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const option_entry* e = find_option(name);
    bool negated = false;
    if (e == nullptr && name.rfind("no-", 0) == 0) {
      e = find_option(name.substr(3));
      negated = e != nullptr && std::holds_alternative<flag_field>(e->f) && e->file_key;
      if (!negated) e = nullptr;
    }
    if (e == nullptr) fail("--", name, ": unknown option (see --help)");
    if (name == "config") {
      if (!has_value) ++i;
      continue;  // read above
    }
    if (const auto* flag = std::get_if<flag_field>(&e->f)) {
      if (has_value) fail("--", name, ": takes no value");
      c.*flag->p = !negated;
      c.given.insert(key_of(e->info.name));
      continue;
    }
    if (const auto* list = std::get_if<list_field>(&e->f)) {
      bool& cleared = list->p == &train_config::data ? data_cleared : test_cleared;
      if (!cleared) (c.*list->p).clear(), cleared = true;
      std::size_t n = 0;
      if (has_value) {
        set_from_text(c, *e, value);
        ++n;
      }
      while (i + 1 < argc && !(argv[i + 1][0] == '-' && argv[i + 1][1] != '\0')) {
        set_from_text(c, *e, argv[++i]);
        ++n;
      }
      if (n == 0) fail("--", name, ": needs at least one file");
      continue;
    }
    if (!has_value) {
      if (i + 1 >= argc) fail("--", name, ": needs a value (", e->info.arg, ")");
      value = argv[++i];
    }
    set_from_text(c, *e, value);
  }
  return c;
}

void validate(const train_config& c) {
  if (c.help || c.version) return;
  if (c.synthetic && !c.data.empty()) fail("--synthetic: cannot be combined with data files (", quote(c.data[0]), ")");
  if (c.synthetic && !c.test.empty()) fail("--test: not with --synthetic (its held-out rows are its own)");
  if (c.synthetic && !c.tensor.empty()) fail("--tensor: not with --synthetic");
  if (!c.synthetic && c.data.empty()) fail("--data: no input files (give .npy files, a directory, or --synthetic)");
  if (c.tokens > 0 && c.epochs > 0) fail("--epochs: give --tokens or --epochs, not both");
  if (c.synthetic && c.epochs > 0) fail("--epochs: the synthetic stream is endless; use --tokens");
  if (c.device != "cuda" && c.was_given("storage") && c.storage != "f32")
    fail("--storage: ", c.storage, " is a GPU storage precision (needs --device cuda)");
  if (c.device == "cuda" && c.was_given("cpu_gemm"))
    fail("--cpu-gemm: chooses the CPU encoder GEMM (--device cpu); the GPU's is cuBLAS");
  if (c.device == "cuda" && c.was_given("encoder_precision") && c.encoder_precision != "f32")
    fail("--encoder-precision: ", c.encoder_precision, " is the CPU encoder's (--device cpu); on the GPU use --storage");
  if (c.shards > 1 && c.device == "cuda")
    fail("--shards: distributed runs train on the CPU (--device cpu); hsae-train has no multi-GPU path yet");
  if (!c.print_config && c.out.empty()) fail("--out: required (the output directory)");
  if (c.resume && c.checkpoint.empty()) fail("--resume: needs --checkpoint PATH (the run's checkpoint)");
  if (c.checkpoint_every > 0 && c.checkpoint.empty()) fail("--checkpoint-every: needs --checkpoint PATH");
  if (c.auxk_k > 0 && !c.auxk && c.was_given("auxk_k")) fail("--auxk-k: AuxK is off (--no-auxk)");
}

nlohmann::json to_json(const train_config& c) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& e : table()) {
    if (!e.file_key) continue;
    const std::string key = key_of(e.info.name);
    std::visit([&](const auto& f) { j[key] = c.*f.p; }, e.f);
  }
  return j;
}

std::string help_text() {
  std::ostringstream s;
  s << "usage: hsae-train [options] FILE...          train on activation files\n"
       "       hsae-train --synthetic --out DIR       train on the built-in synthetic data\n\n"
       "Trains a HierarchicalTopK sparse autoencoder and writes it to --out (SAELens layout,\n"
       "or sparsify), with metrics.jsonl, report.md and fvu_vs_k.png. Every option can be\n"
       "given in a JSON file (--config) under its name with '_' for '-'.\n";
  std::string group;
  for (const auto& e : table()) {
    if (group != e.info.group) {
      group = e.info.group;
      s << "\n" << group << ":\n";
    }
    std::string lhs = std::string("  --") + e.info.name;
    if (std::holds_alternative<flag_field>(e.f) && e.file_key) lhs = std::string("  --[no-]") + e.info.name;
    if (*e.info.arg) lhs += std::string(" ") + e.info.arg;
    s << lhs;
    if (lhs.size() < 28) s << std::string(28 - lhs.size(), ' ');
    else s << "\n" << std::string(28, ' ');
    // The help wrapped at 100 columns.
    std::istringstream words(e.info.help);
    std::string w;
    std::size_t col = 28;
    bool first = true;
    while (words >> w) {
      if (!first && col + 1 + w.size() > 100) {
        s << "\n" << std::string(28, ' ');
        col = 28;
        first = true;
      }
      if (!first) s << ' ', ++col;
      s << w;
      col += w.size();
      first = false;
    }
    s << "\n";
  }
  s << "\nexit status: 0 done, 1 error during the run, 2 bad command line or config, 130 interrupted\n";
  return s.str();
}

}  // namespace hsae_train
