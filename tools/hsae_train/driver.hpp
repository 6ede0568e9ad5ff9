// SPDX-License-Identifier: Apache-2.0
/// \file tools/hsae_train/driver.hpp
/// The training of hsae-train on any backend: builds the sources (synthetic, or files with
/// the held-out rows by position or from --test) the same way for a fresh run and a resume,
/// tags the checkpoint with the run's identity
/// (a resumed run must be the same run), trains, evaluates the test files. Included by
/// run.cpp (cpu_backend) and run_cuda.cu (cuda_backend, cuda_with_storage<...>).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>

#include <nlohmann/json.hpp>

#include <hsae/data/sources.hpp>
#include <hsae/data/synthetic.hpp>
#include <hsae/trainer.hpp>

#include "run.hpp"

namespace hsae_train {

/// The source of the training rows wrapped so that a checkpoint records the run it
/// belongs to ("hsae_train.run": the resolved options that define the run) and a resume
/// refuses a checkpoint of another run, naming the options that differ.
template <class Inner>
class tagged_source {
 public:
  tagged_source(Inner& inner, const nlohmann::json& run) : inner_(inner), run_(run) {}
  int d_model() const { return inner_.d_model(); }
  void next(Eigen::Index rows, hsae::row_matrix<float>& x) { inner_.next(rows, x); }

  template <class State>
  void save_state(State& st) const {
    inner_.save_state(st);
    st.set("hsae_train.run", run_.dump());
  }
  template <class State>
  void load_state(const State& st) {
    const auto it = st.meta.find("hsae_train.run");
    st.expects(it != st.meta.end(), "not written by hsae-train (no entry 'hsae_train.run'); cannot --resume it");
    nlohmann::json saved;
    try {
      saved = nlohmann::json::parse(it->second);
    } catch (const nlohmann::json::exception&) {
      st.fail("entry 'hsae_train.run' is not JSON");
    }
    std::string diff;
    for (auto i = run_.begin(); i != run_.end(); ++i) {
      const nlohmann::json there = saved.is_object() && saved.contains(i.key()) ? saved[i.key()] : nlohmann::json();
      if (there != i.value()) {
        std::string a = there.dump(), b = i.value().dump();
        if (a.size() > 80) a = a.substr(0, 77) + "...";
        if (b.size() > 80) b = b.substr(0, 77) + "...";
        diff += (diff.empty() ? "" : "; ") + i.key() + " was " + a + ", now " + b;
      }
    }
    st.expects(diff.empty(), "it belongs to another run (", diff,
               "); resume with the options of that run (its hsae_train_config.json), or start afresh without "
               "--resume");
    inner_.load_state(st);
  }

 private:
  Inner& inner_;
  const nlohmann::json& run_;
};

/// The training rows of files: with --test all rows of --data, else all but the last
/// eval_rows rows by position (row_end = N - H), shuffled in chunks through the buffer.
inline hsae::file_source_options train_source_options(const run_plan& p) {
  hsae::file_source_options o;
  o.seed = std::uint64_t(p.cfg.seed);
  o.shuffle_buffer_rows = std::size_t(p.cfg.shuffle_buffer);
  o.shuffle_chunk_rows = p.cfg.shuffle_chunk;
  o.tensor = p.cfg.tensor;
  if (p.test.files.empty()) o.row_end = p.train_rows;
  return o;
}
/// The held-out rows, read in order: the --test files, or the last eval_rows rows of the
/// data by position (row_begin = N - H), which the training source leaves out.
inline hsae::file_source_options held_out_source_options(const run_plan& p) {
  hsae::file_source_options o;
  o.shuffle_buffer_rows = 0;
  o.shuffle_files = false;
  o.tensor = p.cfg.tensor;
  if (p.test.files.empty()) o.row_begin = p.train_rows;
  return o;
}
inline const std::vector<std::filesystem::path>& held_out_files(const run_plan& p) {
  return p.test.files.empty() ? p.train.files : p.test.files;
}

/// Trains on backend handle `be` (trainer's Backend parameter `Backend`).
/// `any_rank`, in a distributed run, combines each rank's stop request (Ctrl-C reaches the
/// ranks at different steps) so that every rank stops after the same step.
template <class Backend, class Handle>
run_result train_with(const Handle& be, const run_plan& p, const std::atomic<bool>* stop,
                      const std::function<bool(bool)>& any_rank = {}) {
  using trainer_t = hsae::trainer<float, hsae::dynamic, hsae::dynamic_k_schedule, Backend>;
  hsae::trainer_options o = p.topt;
  o.metrics_path = (p.out / "metrics.jsonl").string();
  o.checkpoint_path = p.checkpoint.empty() ? std::string() : p.checkpoint.string();
  // --max-steps stops as a stop request would; so does Ctrl-C (`stop`).
  std::atomic<bool> stop_now{false};
  o.stop_requested = &stop_now;
  trainer_t tr(be, hsae::sae<float>(p.d_model, int(p.cfg.d_sae)), p.schedule, o);
  bool by_max_steps = false;
  tr.on_step = [&](const hsae::step_record& r) {
    if (p.cfg.max_steps > 0 && r.step + 1 >= p.cfg.max_steps && !stop_now) {
      stop_now = true;
      by_max_steps = true;
    }
    bool requested = stop != nullptr && stop->load();
    if (any_rank) requested = any_rank(requested);
    if (requested && !stop_now) stop_now = true;
  };

  // `held`: the source of the held-out rows, or null (the first rows of the stream).
  auto train = [&](auto& inner, auto* held) {
    tagged_source<std::decay_t<decltype(inner)>> src(inner, p.run_identity);
    if (p.cfg.resume) tr.resume(p.checkpoint, src);
    if (p.cfg.max_steps > 0 && tr.steps_done() >= p.cfg.max_steps)
      throw usage_error("--max-steps: " + std::to_string(p.cfg.max_steps) + " steps are done already (the checkpoint is at step " +
                        std::to_string(tr.steps_done()) + "); give a larger value or leave it out");
    if (launch().rank == 0) write_run_config(p);
    if (p.cfg.max_steps > 0 && tr.steps_done() + 1 >= p.cfg.max_steps) {
      stop_now = true;
      by_max_steps = true;
    }
    if (held != nullptr) return tr.fit(src, *held);
    return tr.fit(src);
  };
  hsae::train_summary sum;
  if (p.cfg.synthetic) {
    hsae::cpu_backend host;
    host.num_threads = int(p.cfg.threads);
    hsae::synthetic_source<float> s(hsae::synthetic_options::demo(std::uint64_t(p.cfg.seed)), host);
    sum = train(s, static_cast<hsae::synthetic_source<float>*>(nullptr));
  } else {
    const hsae::file_source_options no = train_source_options(p), ho = held_out_source_options(p);
    hsae::file_source<float> s(p.train.files, no);
    hsae::file_source<float> held(held_out_files(p), ho);
    sum = train(s, &held);
  }

  run_result r;
  r.interrupted = sum.interrupted;
  r.stopped_by_max_steps = sum.interrupted && by_max_steps;
  r.steps = sum.steps;
  r.tokens = sum.tokens;
  r.seconds = sum.seconds;
  r.tokens_per_second = sum.tokens_per_second;
  r.input_scale = tr.input_scale();
  r.dead_fraction = tr.dead_latents().dead_fraction();
  if (sum.interrupted) return r;
  r.eval = sum.eval;
  r.model = tr.export_model();
  return r;
}

}  // namespace hsae_train
