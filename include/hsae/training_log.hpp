// SPDX-License-Identifier: Apache-2.0
/// \file training_log.hpp
/// What `trainer::fit` (trainer.hpp) reports while it runs, and the records it reports.
///
/// The progress line: on a terminal one line kept up to date in place (step, tokens/s,
/// loss, FVU at k_max, dead %, ETA), redrawn at most every 0.2 s and at the last step;
/// elsewhere that line once per log interval. The metrics file: JSON lines, one "step"
/// record per log interval (and at the last step), one "eval" record per evaluation
/// (every schedule level), and a final "summary".
#pragma once

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "error.hpp"
#include "metrics.hpp"

HSAE_NAMESPACE_BEGIN

/// Where the progress line goes: automatic (a terminal gets the line updated in place,
/// anything else one line per log interval), always (updated in place), never.
enum class progress_mode { automatic, always, never };

/// What one logged step reported (also passed to `trainer::on_step`).
struct step_record {
  std::int64_t step = 0;    ///< steps done (1-based after the step)
  std::int64_t tokens = 0;  ///< tokens trained on so far
  double loss = 0;          ///< schedule loss of this batch
  double aux_loss = 0;
  double fvu_kmax = 0;  ///< this batch's FVU at k_max
  double dead_fraction = 0;
  double lr = 0;
  double grad_norm = 0;
  double tokens_per_second = 0;
  double elapsed_seconds = 0;
};

/// The end of a run.
struct train_summary {
  std::int64_t steps = 0;
  std::int64_t tokens = 0;
  double seconds = 0;
  double tokens_per_second = 0;
  double final_loss = 0;
  double input_scale = 1;
  /// Final evaluation on the held-out rows (levels empty when eval_rows = 0, or when
  /// the run was interrupted).
  evaluation eval;
  /// The run stopped early on trainer_options::stop_requested (steps < the run's steps).
  bool interrupted = false;
};

namespace detail {

/// The settings of a `training_log` (from trainer_options, the run and the schedule).
struct training_log_options {
  progress_mode progress = progress_mode::automatic;
  std::FILE* stream = nullptr;  ///< the progress line's stream; null: none
  std::string metrics_path;     ///< the JSON-lines file; empty: none
  bool append = false;          ///< append to the metrics file (a resumed run) rather than truncate it
  std::int64_t log_every_steps = 100;
  std::int64_t steps = 0;         ///< the run's step count ("step s/steps")
  std::int64_t total_tokens = 0;  ///< the run's tokens (the ETA)
  int k_max = 0;                  ///< the schedule's k_max ("FVU@k_max")
};

/// The progress line and the metrics file of one `fit`: opened when constructed, closed
/// by `summary` (or when destroyed).
class training_log {
 public:
  /// Opens the metrics file. \throws hsae::io_error when it cannot be opened.
  explicit training_log(training_log_options o) : o_(std::move(o)) {
    tty_ = o_.progress == progress_mode::always ||
           (o_.progress == progress_mode::automatic && o_.stream && ::isatty(::fileno(o_.stream)));
    quiet_ = o_.progress == progress_mode::never || !o_.stream;
    if (o_.metrics_path.empty()) return;
    metrics_.open(o_.metrics_path, std::ios::out | (o_.append ? std::ios::app : std::ios::trunc));
    expects<io_error>(metrics_.good(), "trainer: cannot open the metrics file '", o_.metrics_path, "'");
  }

  /// After a step (`last`: the run's last): its "step" record every log_every_steps steps
  /// and at the last, and the progress line.
  void step(const step_record& r, bool last) {
    const bool logged = r.step % o_.log_every_steps == 0 || last;
    if (logged) write(step_json(r));
    if (quiet_) return;
    if (tty_ && (last || seconds_since(last_draw_) > 0.2)) {
      std::fprintf(o_.stream, "\r%s\x1b[K%s", progress_line(r).c_str(), last ? "\n" : "");
      std::fflush(o_.stream);
      last_draw_ = clock::now();
    } else if (!tty_ && logged) {
      std::fprintf(o_.stream, "%s\n", progress_line(r).c_str());
    }
  }

  /// An evaluation after `step` steps and `tokens` tokens: its "eval" record.
  void eval(std::int64_t step, std::int64_t tokens, const evaluation& e) {
    nlohmann::json levels = nlohmann::json::array();
    for (const auto& l : e.levels) levels.push_back({{"k", l.k}, {"fvu", l.fvu}, {"mse", l.mse}, {"l0", l.l0}});
    write({{"type", "eval"},
           {"step", step},
           {"tokens", tokens},
           {"rows", e.rows},
           {"dead_fraction", e.dead_fraction},
           {"levels", std::move(levels)}});
  }

  /// The end of the run: the "summary" record; closes the metrics file.
  void summary(const train_summary& sum) {
    write({{"type", "summary"},
           {"steps", sum.steps},
           {"tokens", sum.tokens},
           {"seconds", sum.seconds},
           {"tokens_per_second", sum.tokens_per_second},
           {"final_loss", sum.final_loss},
           {"input_scale", sum.input_scale}});
    metrics_.close();
  }

 private:
  using clock = std::chrono::steady_clock;
  static double seconds_since(clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); }

  std::string progress_line(const step_record& r) const {
    const double eta = r.tokens_per_second > 0 ? double(o_.total_tokens - r.tokens) / r.tokens_per_second : 0;
    const long eta_s = long(std::lround(eta));
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "step %lld/%lld | %.0f tok/s | loss %.5f | FVU@%d %.4f | dead %.1f%% | ETA %ld:%02ld",
                  (long long)r.step, (long long)o_.steps, r.tokens_per_second, r.loss, o_.k_max, r.fvu_kmax,
                  100.0 * r.dead_fraction, eta_s / 60, eta_s % 60);
    return buf;
  }

  static nlohmann::json step_json(const step_record& r) {
    return {{"type", "step"},       {"step", r.step},           {"tokens", r.tokens},
            {"loss", r.loss},       {"aux_loss", r.aux_loss},   {"fvu_kmax", r.fvu_kmax},
            {"dead_fraction", r.dead_fraction}, {"lr", r.lr},   {"grad_norm", r.grad_norm},
            {"tokens_per_second", r.tokens_per_second},         {"elapsed_seconds", r.elapsed_seconds}};
  }

  void write(const nlohmann::json& j) {
    if (!metrics_.is_open()) return;
    metrics_ << j.dump() << '\n';
    metrics_.flush();
    expects<io_error>(metrics_.good(), "trainer: writing the metrics file '", o_.metrics_path, "' failed");
  }

  training_log_options o_;
  bool tty_ = false;
  bool quiet_ = true;
  /// The last redraw of the line in place (a second back: the first step draws).
  clock::time_point last_draw_ = clock::now() - std::chrono::seconds(1);
  std::ofstream metrics_;
};

}  // namespace detail

HSAE_NAMESPACE_END
