// SPDX-License-Identifier: Apache-2.0
/// \file trainer.hpp
/// The standard training loop over a data source:
///
///   held-out evaluation rows -> init sample (geometric median, optional input scale)
///   -> steps of train_step (encode, schedule loss, AuxK, sparse backward, Adam with
///   warm-up/decay) with dead-latent tracking -> periodic and final evaluation.
///
/// On a terminal it keeps one progress line up to date (step, tokens/s, loss, FVU at
/// k_max, dead %, ETA); elsewhere it prints that line every `log_every_steps`. With
/// `metrics_path` set it writes JSON lines: one "step" record per log interval, one
/// "eval" record per evaluation (every schedule level), and a final "summary"
/// (training_log.hpp). Checkpoints: trainer_checkpoint.hpp.
///
/// A source is anything with `int d_model()` and `void next(Eigen::Index rows,
/// row_matrix<T>& x)` filling the next `rows` rows (synthetic_source, matrix_source,
/// file_source, or your own).
///
/// The backend is the last template parameter (training_engine.hpp): `cpu_backend` by
/// default; `trainer<float, F, S, cuda_backend>` (with <hsae/cuda.cuh>) runs the same loop
/// with the steps and evaluations on the GPU. This header needs no CUDA.
#pragma once

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <future>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "checkpoint.hpp"
#include "cpu/backend.hpp"
#include "cpu/init.hpp"
#include "cpu/training_engine.hpp"
#include "dead_latents.hpp"
#include "detail/files.hpp"
#include "error.hpp"
#include "k_schedule.hpp"
#include "matrix.hpp"
#include "metrics.hpp"
#include "model.hpp"
#include "optimizer.hpp"
#include "trainer_checkpoint.hpp"
#include "training_engine.hpp"
#include "training_log.hpp"

HSAE_NAMESPACE_BEGIN

namespace detail {
/// The spelling of a type, for messages (from the compiler's function signature).
template <class X>
std::string type_name() {
  const std::string_view sig = __PRETTY_FUNCTION__;  // "... [with X = ns::type; ...]" (GCC), "[X = ns::type]" (Clang)
  const std::size_t at = sig.find("X = ");
  if (at == std::string_view::npos) return "a data source";
  const std::string_view rest = sig.substr(at + 4);
  return std::string(rest.substr(0, rest.find_first_of(";]")));
}

/// Refuses a path that cannot become a file: an existing directory or non-regular file,
/// or a parent that is not a writable directory. \throws hsae::config_error.
inline void expect_writable_file(const char* what, const std::filesystem::path& p) {
  std::error_code ec;
  const auto st = std::filesystem::status(p, ec);
  expects<config_error>(!std::filesystem::is_directory(st), what, " '", p.string(), "' is a directory");
  expects<config_error>(!std::filesystem::exists(st) || std::filesystem::is_regular_file(st), what, " '", p.string(),
                        "' exists and is not a regular file");
  const std::filesystem::path dir = p.has_parent_path() ? p.parent_path() : std::filesystem::path(".");
  expects<config_error>(std::filesystem::is_directory(dir, ec), what, " '", p.string(), "': the directory '",
                        dir.string(), "' does not exist");
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    throw_error<config_error>(what, " '", p.string(), "': the directory '", dir.string(), "' is not writable (",
                              errno_text(errno), ")");
}
}  // namespace detail

namespace detail {
/// The host's threads for host work (the init recipe): the CPU engine's own backend, a
/// default `cpu_backend` for the others.
template <class Engine>
cpu_backend host_backend_of(const Engine& e) {
  if constexpr (std::is_same_v<typename Engine::backend_type, cpu_backend>) return e.backend();
  else if constexpr (requires { { e.backend().cpu } -> std::convertible_to<cpu_backend>; }) return e.backend().cpu;
  else return {};
}
/// Engines whose checkpoints are sharded (the distributed engine, `sharded_checkpoints =
/// true`): they write and read their shards' files themselves (save_shards, check_shards,
/// restore_shards); the trainer's file holds the rest.
template <class Engine>
concept shards_checkpoints = bool(Engine::sharded_checkpoints);

/// Whether this process writes the run's files (checkpoints, metrics, progress): always,
/// but on the ranks of a distributed engine other than its root.
template <class Engine>
bool writes_files(const Engine& e) {
  if constexpr (requires { { e.writes_files() } -> std::convertible_to<bool>; }) return e.writes_files();
  else return true;
}
}  // namespace detail

/// What a trainer can read batches from.
template <class S, class T>
concept batch_source = requires(S& s, Eigen::Index rows, row_matrix<T>& x) {
  { s.d_model() } -> std::convertible_to<int>;
  s.next(rows, x);
};

/// Whether `fit` reads the next batch on a second thread while a step runs; automatic:
/// with a GPU backend (whose steps leave the host idle), not on the CPU (where the reader
/// competes with the step's threads for the cores; bench/RESULTS.md has the measurement).
enum class prefetch_mode { automatic, always, never };

struct trainer_options {
  /// Rows per step.
  std::int64_t batch_size = 4096;
  /// Training tokens (rows); the run takes ceil(total_tokens / batch_size) steps.
  std::int64_t total_tokens = 0;
  /// Rows drawn first and kept aside for evaluation (never trained on); 0: no evaluation.
  std::int64_t eval_rows = 16384;
  /// Evaluate every this many steps (0: only at the end).
  std::int64_t eval_every_steps = 0;
  /// Rows drawn for init (geometric median of b_dec, input scale); they are trained on too.
  std::int64_t init_rows = 16384;
  /// Initialise the model from the data (false: continue from the model as given).
  bool initialize = true;
  /// Scale inputs by one factor s so that E||s x||^2 = d_model (estimated on the init
  /// sample); `trainer::export_model()` folds s back into the weights.
  bool normalize_inputs = false;
  init_options init{};
  /// Optimizer settings; total_steps = 0 is set to the run's step count.
  adam_options adam{};
  step_options step{};
  /// A latent is dead after this many tokens without firing.
  std::int64_t dead_after_tokens = 10'000'000;
  /// Read the next batch from the source on a second host thread while the current step
  /// runs (prefetch_mode; the result is the same either way). The source must not be
  /// used elsewhere during `fit`; no batch is read ahead of a checkpoint, so a
  /// checkpoint's source state is that of the rows trained on.
  prefetch_mode prefetch = prefetch_mode::automatic;
  /// Progress line / JSON record interval in steps.
  std::int64_t log_every_steps = 100;
  progress_mode progress = progress_mode::automatic;
  std::FILE* progress_stream = stderr;
  /// JSON-lines metrics file (truncated at the start of fit, appended to after
  /// `resume`); empty: none.
  std::string metrics_path;
  /// Checkpoint file (checkpoint.hpp), written atomically every
  /// `checkpoint_every_steps` steps (0: only at the end of fit); empty: none.
  std::string checkpoint_path;
  std::int64_t checkpoint_every_steps = 0;
  /// A stop request (e.g. set by a SIGINT handler), read once per step, after its batch
  /// is read; null: none. Once it reads true, `fit` takes that step (reading no batch
  /// ahead), writes the checkpoint (when `checkpoint_path` is set) and returns with
  /// `train_summary::interrupted` set and no final evaluation; `resume` from that
  /// checkpoint continues the run exactly. A request during the last step changes nothing.
  const std::atomic<bool>* stop_requested = nullptr;

  /// \throws hsae::config_error naming the first invalid field.
  void validate() const {
    detail::expects<config_error>(batch_size >= 1, "trainer: batch_size must be >= 1, got ", batch_size);
    detail::expects<config_error>(total_tokens >= 1, "trainer: total_tokens must be >= 1, got ", total_tokens);
    detail::expects<config_error>(eval_rows >= 0, "trainer: eval_rows must be >= 0, got ", eval_rows);
    detail::expects<config_error>(eval_every_steps >= 0, "trainer: eval_every_steps must be >= 0, got ",
                                  eval_every_steps);
    detail::expects<config_error>(!initialize || init_rows >= 1, "trainer: init_rows must be >= 1, got ", init_rows);
    detail::expects<config_error>(dead_after_tokens >= 1, "trainer: dead_after_tokens must be >= 1, got ",
                                  dead_after_tokens);
    detail::expects<config_error>(log_every_steps >= 1, "trainer: log_every_steps must be >= 1, got ",
                                  log_every_steps);
    detail::expects<config_error>(checkpoint_every_steps >= 0, "trainer: checkpoint_every_steps must be >= 0, got ",
                                  checkpoint_every_steps);
    adam_options a = adam;
    if (a.total_steps == 0) a.total_steps = steps();
    a.validate();
    step.validate();
  }
  /// ceil(total_tokens / batch_size), without overflow for any valid options.
  std::int64_t steps() const { return total_tokens / batch_size + (total_tokens % batch_size != 0); }
};

class cuda_backend;  // cuda/backend.cuh (include <hsae/cuda.cuh> to train with it)

/// The training loop. \tparam T the host data's precision (the batches sources fill;
/// float or double on the CPU, float for CUDA), \tparam F the dictionary width (or
/// hsae::dynamic), \tparam S the k-schedule, \tparam Backend `cpu_backend` (default),
/// `cuda_backend` or `cuda_with_storage<Storage>` (cuda/trainer.cuh): the constructor takes
/// that backend's handle (`engine_type::backend_type`).
///
/// The arguments can be deduced from the constructor's (see the deduction guide below):
///
///   trainer tr(cpu_backend{}, sae<float>(768, 16384), all_prefixes<64>{}, opt);   // CPU
///   trainer tr(cuda_be, sae<float>(768, 16384), all_prefixes<64>{}, opt);         // GPU
///
/// and `cpu_trainer<S, F, T>` / `cuda_trainer<S, F>` name the type in declarations.
template <cpu_scalar T, int F, k_schedule_like S, class Backend = cpu_backend>
class trainer {
  static_assert(schedule_fits_width<S, F>, "hsae::trainer: the schedule's k_max exceeds the dictionary width F");

 public:
  using engine_type = training_engine<Backend, T, F>;
  static_assert(training_engine_for<engine_type, T, F, S>,
                "hsae::trainer: training_engine<Backend, T, F> does not meet the engine contract "
                "(training_engine_for, training_engine.hpp)");
  using backend_type = typename engine_type::backend_type;

  /// Trains `model` (its shapes fix d_model and d_sae) under `schedule` on `be` (a CPU
  /// backend is copied; a CUDA backend is borrowed and must outlive the trainer).
  /// \throws hsae::config_error on invalid options or k_max > d_sae.
  trainer(const backend_type& be, sae<T, F> model, S schedule, trainer_options opt)
      : engine_(be, std::move(model)), schedule_(std::move(schedule)), opt_(std::move(opt)) {
    engine_.model().check_shapes();
    opt_.validate();
    detail::expects<config_error>(schedule_.k_max() <= engine_.model().d_sae(), "trainer: the schedule's k_max=",
                                  schedule_.k_max(), " exceeds d_sae=", engine_.model().d_sae());
    if (opt_.adam.total_steps == 0) opt_.adam.total_steps = opt_.steps();
    opt_.adam.validate();
    // What fit allocates per request, and where it writes, checked now rather than hours in.
    const auto d = std::int64_t(d_model_);
    expect_fits_memory("batch_size", opt_.batch_size, d);
    expect_fits_memory("eval_rows", opt_.eval_rows, d);
    if (opt_.initialize) expect_fits_memory("init_rows", opt_.init_rows, d);
    if (!opt_.checkpoint_path.empty()) detail::expect_writable_file("trainer: checkpoint_path", opt_.checkpoint_path);
  }
  /// A borrowed (CUDA) backend must outlive the trainer: a temporary one is refused.
  trainer(backend_type&&, sae<T, F>, S, trainer_options)
    requires(engine_type::borrows_backend)
  = delete;

  /// Called after every step with that step's record (logging interval ignored).
  std::function<void(const step_record&)> on_step;
  /// Called after every evaluation.
  std::function<void(std::int64_t step, const evaluation&)> on_eval;

  /// Runs the whole loop on `source`; the eval_rows held-out rows are the first rows it
  /// serves (set aside, never trained on). \throws hsae::shape_error when the source's
  /// width is not d_model, hsae::numeric_error on NaN/Inf in a batch.
  template <batch_source<T> Source>
  train_summary fit(Source& source) {
    return fit_from<Source, Source>(source, nullptr);
  }
  /// The same with the eval_rows held-out rows read from `held_out` (its first eval_rows
  /// rows), not from the training stream: e.g. the last rows of a token-ordered cache by
  /// position (file_source_options::row_begin / row_end; docs/DATA.md). A run resumed
  /// from a checkpoint takes its held-out rows from the checkpoint and reads nothing from
  /// `held_out`; `fit(source)` continues it as well.
  /// \throws as fit(source), hsae::shape_error when held_out's width is not d_model, and
  ///         hsae::config_error when held_out is the training source itself (use fit(source)).
  template <batch_source<T> Source, batch_source<T> HeldOut>
  train_summary fit(Source& source, HeldOut& held_out) {
    if constexpr (std::is_same_v<Source, HeldOut>)
      detail::expects<config_error>(&source != &held_out,
                                    "trainer: fit(source, held_out) got the same object twice; fit(source) takes the "
                                    "held-out rows from the training stream");
    detail::expects<shape_error>(held_out.d_model() == model().d_model(), "trainer: the held-out source's d_model=",
                                 held_out.d_model(), " differs from the model's d_model=", model().d_model());
    return fit_from<Source, HeldOut>(source, &held_out);
  }

 private:
  template <class Source, class HeldOut>
  train_summary fit_from(Source& source, HeldOut* held_out) {
    detail::expects<shape_error>(source.d_model() == model().d_model(), "trainer: the source's d_model=",
                                 source.d_model(), " differs from the model's d_model=", model().d_model());
    detail::training_log log(log_options());
    const auto t0 = clock::now();

    row_matrix<T> x;
    if (!resumed_) {
      start(source, held_out, x);
    }
    resumed_ = false;

    const std::int64_t steps = opt_.steps();
    const auto train_start = clock::now();
    const std::int64_t tokens_at_start = tokens_;
    double final_loss = 0;
    bool interrupted = false;
    // The next batch, read on another thread while a step runs (trainer_options::prefetch).
    // `fetch` is declared after `x_next` so that unwinding joins the reader first.
    const bool prefetching = opt_.prefetch == prefetch_mode::always ||
                             (opt_.prefetch == prefetch_mode::automatic && engine_type::prefetch_by_default);
    row_matrix<T> x_next;
    std::future<void> fetch;
    auto read_batch = [this, &source](std::int64_t rows, row_matrix<T>& dst) {
      pull(source, rows, dst, "a batch");
      if (scale_ != 1.0) dst *= T(scale_);
    };
    for (std::int64_t s = step_; s < steps; ++s) {
      const std::int64_t rows = std::min(opt_.batch_size, opt_.total_tokens - tokens_);
      if (fetch.valid()) {
        fetch.get();  // rethrows what the source threw
        x.swap(x_next);
      } else {
        read_batch(rows, x);
      }
      rows_pulled_ += rows;
      const bool last = s + 1 == steps;
      // A stop request seen now ends the run after this step, which reads nothing ahead.
      const bool stop = !last && opt_.stop_requested != nullptr && opt_.stop_requested->load();
      const bool checkpoint_after =
          !opt_.checkpoint_path.empty() &&
          (last || stop || (opt_.checkpoint_every_steps > 0 && (step_ + 1) % opt_.checkpoint_every_steps == 0));
      if (prefetching && !last && !checkpoint_after) {
        const std::int64_t next_rows = std::min(opt_.batch_size, opt_.total_tokens - tokens_ - rows);
        fetch = std::async(std::launch::async, read_batch, next_rows, std::ref(x_next));
      }
      const engine_step es = engine_.step(x, schedule_, opt_.step);
      ++step_;
      tokens_ += rows;
      final_loss = es.stats.loss;

      const step_record rec = record(es, x, seconds_since(train_start), tokens_ - tokens_at_start);
      if (on_step) on_step(rec);
      log.step(rec, last);
      if (opt_.eval_rows > 0 && opt_.eval_every_steps > 0 && step_ % opt_.eval_every_steps == 0 && !last)
        run_eval(log);
      if (checkpoint_after) save_checkpoint(opt_.checkpoint_path, source);
      if (stop) {
        interrupted = true;
        break;
      }
    }

    train_summary sum;
    sum.steps = step_;
    sum.tokens = tokens_;
    sum.final_loss = final_loss;
    sum.input_scale = scale_;
    const double train_secs = seconds_since(train_start);
    sum.tokens_per_second = train_secs > 0 ? double(tokens_) / train_secs : 0;
    sum.interrupted = interrupted;
    if (interrupted) {
      sum.seconds = seconds_since(t0);
      return sum;  // the metrics file is closed when `log` goes; no summary record
    }
    if (opt_.eval_rows > 0) sum.eval = run_eval(log);
    sum.seconds = seconds_since(t0);
    log.summary(sum);
    return sum;
  }

 public:
  /// Writes a checkpoint of the run (model, optimizer moments and step, dead-latent
  /// counters, held-out rows, input scale, step and token counts, and the source's
  /// state when it can save it; see trainer_checkpoint.hpp and checkpoint.hpp), atomically.
  /// The state comes from the engine's host views: a GPU run's checkpoint holds the fp32
  /// master weights and moments under the same names and dtypes as a CPU run's, so either
  /// backend resumes the other's checkpoints (T = float).
  template <class Source>
  void save_checkpoint(const std::filesystem::path& path, const Source& source) const {
    checkpoint_state<T> st;
    const detail::checkpoint_position at{step_, tokens_, rows_pulled_, held_out_pulled_, scale_};
    if constexpr (detail::shards_checkpoints<engine_type>) {
      // A distributed engine: the ranks write their shards' files, then the root this file
      // (everything else, and the grid), and every rank returns once all are written; no
      // rank gathers the model.
      detail::fill_checkpoint_common(st, at, checkpoint_terms(), schedule_, engine_.dead_latents(), eval_x_);
      if constexpr (requires { source.save_state(st); }) source.save_state(st);
      engine_.save_shards(path, st, [&] { write_checkpoint(path, st); });
    } else {
      detail::fill_checkpoint(st, at, checkpoint_terms(), schedule_, engine_.model(), engine_.optimizer(),
                              engine_.dead_latents(), eval_x_);
      if constexpr (requires { source.save_state(st); }) source.save_state(st);
      write_checkpoint(path, st);
    }
  }

  /// Restores a run from a checkpoint written by `save_checkpoint` (or by `fit` with
  /// `checkpoint_path`); the next `fit(source)` continues it. `source` must be a fresh
  /// source built like the original one: it restores its own state when it can
  /// (synthetic_source, file_source), otherwise the rows the run had pulled are read
  /// again and dropped. On the CPU the continued run is bitwise identical to an
  /// uninterrupted one. The trainer's options must describe the same run (the same
  /// total_tokens and batch_size: the lr schedule depends on them).
  /// Every value read back is checked before use (shapes, finiteness, counts and
  /// positions against this run's options and the source's files); nothing is changed
  /// when a check fails.
  /// \throws hsae::io_error naming the checkpoint and the entry: an unreadable, foreign,
  ///         inconsistent or out-of-range checkpoint.
  template <batch_source<T> Source>
  void resume(const std::filesystem::path& path, Source& source) {
    const checkpoint_state<T> st = read_checkpoint<T>(path);
    // A distributed engine reads its shards' files (engine_.check_shards), all of them
    // checked on every rank before anything changes.
    constexpr bool sharded = detail::shards_checkpoints<engine_type>;
    detail::restored_run<T, F> r;
    if constexpr (sharded) {
      detail::check_checkpoint_common(st, Eigen::Index(d_model_), Eigen::Index(engine_.model().d_sae()), schedule_,
                                      checkpoint_terms(), r);
      engine_.check_shards(path, st, r);
    } else {
      r = detail::check_checkpoint(st, engine_.model(), schedule_, checkpoint_terms());
    }
    if constexpr (requires { source.load_state(st); }) {
      source.load_state(st);
    } else {  // replay: read and drop the rows the run had pulled
      row_matrix<T> skip;
      for (std::int64_t left = r.rows_pulled; left > 0;) {
        const std::int64_t n = std::min<std::int64_t>(left, 1 << 16);
        pull(source, n, skip, "replayed rows");
        left -= n;
      }
    }
    if constexpr (sharded)
      engine_.restore_shards(opt_.adam, r, opt_.dead_after_tokens);
    else
      engine_.restore(std::move(r.model), opt_.adam, r.adam_steps, std::move(r.m1), std::move(r.m2), r.last_lr,
                      opt_.dead_after_tokens, std::move(r.since));
    eval_x_ = *r.held_out;
    scale_ = r.scale;
    step_ = r.step;
    tokens_ = r.tokens;
    rows_pulled_ = r.rows_pulled;
    held_out_pulled_ = r.held_out_pulled;
    resumed_ = true;
  }

  /// Metrics of the current model on the held-out rows (in the trained input units).
  evaluation evaluate_held_out() const { return evaluate_held_out(schedule_); }
  /// The same at the levels of another schedule, e.g. every prefix 1..K of a model
  /// trained as plain TopK (its top-k' code for k' != K). \throws hsae::config_error
  /// when there are no held-out rows or the schedule's k_max exceeds d_sae.
  template <k_schedule_like S2>
  evaluation evaluate_held_out(const S2& schedule) const {
    detail::expects<config_error>(eval_x_.rows() > 0, "trainer: no held-out rows (eval_rows = 0 or fit not run)");
    evaluation e = engine_.evaluate(cref<T>(eval_x_), schedule);
    e.dead_fraction = engine_.dead_latents().dead_fraction();
    return e;
  }
  /// The held-out rows (in the trained input units); empty before fit or with eval_rows = 0.
  const row_matrix<T>& held_out() const { return eval_x_; }

  /// The model as trained (inputs multiplied by input_scale()). With a GPU backend, a host
  /// copy of the fp32 master weights, refreshed (one download) after the steps since the
  /// last call.
  const sae<T, F>& model() const { return engine_.model(); }
  /// The model for unscaled inputs: with s = input_scale(), pre/s on x equals pre on
  /// s x, so b_enc and b_dec are divided by s; the unit decoder rows and the top-k
  /// order are unchanged, and decoded outputs come back in the input's units.
  sae<T, F> export_model() const {
    sae<T, F> m = model();
    if (scale_ != 1.0) {
      m.b_enc /= T(scale_);
      m.b_dec /= T(scale_);
    }
    return m;
  }
  double input_scale() const { return scale_; }
  /// Host views of the tracker and the optimizer (downloaded on demand with a GPU backend).
  const dead_latent_tracker& dead_latents() const { return engine_.dead_latents(); }
  const adam_state<T, F>& optimizer() const { return engine_.optimizer(); }
  /// The engine: the backend-specific state (training_engine.hpp, cuda/trainer.cuh).
  const engine_type& engine() const { return engine_; }
  const S& schedule() const { return schedule_; }
  const trainer_options& options() const { return opt_; }
  std::int64_t steps_done() const { return step_; }
  std::int64_t tokens_done() const { return tokens_; }

 private:
  using clock = std::chrono::steady_clock;
  static double seconds_since(clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); }

  /// sum ||x - mean(x)||^2 of the batch, in double, in one pass and without the two
  /// [B, D] double temporaries a cast-and-centre expression would allocate every step.
  double batch_variance(const row_matrix<T>& x) {
    col_sum_.setZero(x.cols());
    double sq = 0;
    for (Eigen::Index b = 0; b < x.rows(); ++b) {
      const T* r = x.row(b).data();
      for (Eigen::Index d = 0; d < x.cols(); ++d) {
        col_sum_[d] += double(r[d]);
        sq += double(r[d]) * double(r[d]);
      }
    }
    return std::max(sq - col_sum_.squaredNorm() / double(x.rows()), 1e-300);
  }

  /// The record of the step just taken (`es` on batch `x`), `secs` and `tokens` into this fit.
  step_record record(const engine_step& es, const row_matrix<T>& x, double secs, std::int64_t tokens) {
    const step_stats& st = es.stats;
    step_record rec;
    rec.step = step_;
    rec.tokens = tokens_;
    rec.loss = st.loss;
    rec.aux_loss = st.aux_loss;
    rec.fvu_kmax = st.levels.level_sse.back() / batch_variance(x);
    rec.dead_fraction = es.dead_fraction;
    rec.lr = st.lr;
    rec.grad_norm = st.grad_norm;
    rec.elapsed_seconds = secs;
    rec.tokens_per_second = secs > 0 ? double(tokens) / secs : 0;
    return rec;
  }

  /// The progress line and the metrics file of a fit (appended to after `resume`).
  detail::training_log_options log_options() const {
    const bool writes = detail::writes_files(engine_);
    return {.progress = writes ? opt_.progress : progress_mode::never,
            .stream = opt_.progress_stream,
            .metrics_path = writes ? opt_.metrics_path : std::string(),
            .append = resumed_,
            .log_every_steps = opt_.log_every_steps,
            .steps = opt_.steps(),
            .total_tokens = opt_.total_tokens,
            .k_max = schedule_.k_max()};
  }

  evaluation run_eval(detail::training_log& log) {
    evaluation e = evaluate_held_out();
    log.eval(step_, tokens_, e);
    if (on_eval) on_eval(step_, e);
    return e;
  }

  /// The fresh start of fit: held-out rows (from `held_out`, else from `source`), init
  /// sample, init, optimizer, tracker.
  template <class Source, class HeldOut>
  void start(Source& source, HeldOut* held_out, row_matrix<T>& x) {
    step_ = tokens_ = rows_pulled_ = held_out_pulled_ = 0;
    if (opt_.eval_rows > 0) {
      if (held_out != nullptr) {
        pull(*held_out, opt_.eval_rows, eval_x_, "the held-out rows");
      } else {
        pull(source, opt_.eval_rows, eval_x_, "the held-out rows");
        rows_pulled_ += opt_.eval_rows;
        held_out_pulled_ = opt_.eval_rows;
      }
      detail::expect_finite("evaluation rows", cref<T>(eval_x_));
    }
    if (opt_.initialize) {
      pull(source, opt_.init_rows, x, "the init sample");
      rows_pulled_ += opt_.init_rows;
      detail::expect_finite("init sample", cref<T>(x));
      if (opt_.normalize_inputs) {
        const double mean_sq = x.template cast<double>().squaredNorm() / double(x.rows());
        detail::expects<numeric_error>(mean_sq > 0, "trainer: the init sample is all zeros; cannot normalise");
        scale_ = std::sqrt(double(model().d_model()) / mean_sq);
        x *= T(scale_);
      }
    }
    engine_.start(
        [&](sae<T, F>& m) {
          if (opt_.initialize) init(detail::host_backend_of(engine_), m, x, opt_.init);
        },
        opt_.adam, opt_.dead_after_tokens);
    if (opt_.eval_rows > 0 && scale_ != 1.0) eval_x_ *= T(scale_);
  }

  /// What a checkpoint of this run must agree with (trainer_checkpoint.hpp).
  detail::checkpoint_run checkpoint_terms() const {
    return {opt_.total_tokens, opt_.batch_size, opt_.steps(), opt_.init_rows};
  }
  /// Refuses a host buffer of `rows` x `d` values of T larger than the machine's memory.
  static void expect_fits_memory(const char* field, std::int64_t rows, std::int64_t d) {
    const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
    if (pages <= 0 || page <= 0) return;  // unknown: nothing to compare with
    const double mem = double(pages) * double(page);
    const double need = double(rows) * double(d) * double(sizeof(T));
    detail::expects<config_error>(need <= mem, "trainer: ", field, "=", rows, " needs ", need,
                                  " bytes for its rows (d_model=", d, ", ", sizeof(T),
                                  " bytes a value), more than this machine's memory (", mem, " bytes)");
  }

  /// Reads `rows` rows from the source into `dst` and checks that it returned exactly
  /// that many of width d_model (a source that miscounts would corrupt the run's counts).
  /// Runs on the read-ahead thread too: it touches no engine state (a GPU engine's
  /// `model()` downloads the weights).
  template <class Source>
  void pull(Source& source, std::int64_t rows, row_matrix<T>& dst, const char* what) const {
    source.next(Eigen::Index(rows), dst);
    detail::expects<shape_error>(dst.rows() == Eigen::Index(rows) && dst.cols() == d_model_,
                                 "trainer: the data source (", detail::type_name<Source>(), ") returned ", what,
                                 " of shape [", dst.rows(), ", ", dst.cols(), "] when asked for [", rows, ", ",
                                 d_model_, "]");
  }

  engine_type engine_;
  Eigen::Index d_model_ = engine_.model().d_model();  ///< fixed by the model's shapes
  S schedule_;
  trainer_options opt_;
  row_matrix<T> eval_x_;
  Eigen::VectorXd col_sum_;  // batch_variance scratch
  double scale_ = 1.0;
  std::int64_t step_ = 0;
  std::int64_t tokens_ = 0;
  std::int64_t rows_pulled_ = 0;  ///< rows read from the source (held-out, init, training)
  std::int64_t held_out_pulled_ = 0;  ///< of them, held-out rows (0 when read from a held-out source)
  bool resumed_ = false;
};

/// Deduces every argument: T and F from the model, S from the schedule, Backend from the
/// handle (cpu_backend, cuda_backend). cuda_with_storage<Storage> is spelled out, since
/// its handle is a cuda_backend too.
template <class Backend, cpu_scalar T, int F, k_schedule_like S>
trainer(const Backend&, sae<T, F>, S, trainer_options) -> trainer<T, F, S, Backend>;

/// The trainer on the CPU: `cpu_trainer<all_prefixes<64>>` is trainer<float, dynamic,
/// all_prefixes<64>, cpu_backend>.
template <k_schedule_like S, int F = dynamic, cpu_scalar T = float>
using cpu_trainer = trainer<T, F, S, cpu_backend>;

/// The trainer on the GPU with fp32 storage (needs <hsae/cuda.cuh>): `cuda_trainer<S>` is
/// trainer<float, dynamic, S, cuda_backend>.
template <k_schedule_like S, int F = dynamic>
using cuda_trainer = trainer<float, F, S, cuda_backend>;

HSAE_NAMESPACE_END
