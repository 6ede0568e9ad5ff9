// SPDX-License-Identifier: Apache-2.0
// Checkpoints (checkpoint.hpp, trainer::save_checkpoint / resume): a run interrupted
// after a checkpoint and resumed from it ends bitwise identical to an uninterrupted run
// (synthetic, .npy with a shuffle buffer, and an in-memory source restored by replay);
// a process killed while saving leaves the previous checkpoint loadable; foreign,
// truncated and mismatched checkpoints raise hsae errors; a stop request
// (trainer_options::stop_requested) ends fit with a checkpoint that resumes bitwise.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "test_util.hpp"

using namespace hsae;
namespace fs = std::filesystem;

namespace {

synthetic_options data_options(std::uint64_t seed = 21) { return hsae_test::small_synthetic(seed); }

trainer_options run_options(const fs::path& ckpt = {}) {
  trainer_options o;
  o.batch_size = 200;
  o.total_tokens = 200 * 45;
  o.eval_rows = 500;
  o.init_rows = 700;
  o.adam.lr = 3e-3;
  o.adam.warmup_steps = 5;
  o.adam.decay_steps = 10;
  o.dead_after_tokens = 2000;  // some latents die: AuxK and the counters take part
  o.progress = progress_mode::never;
  o.checkpoint_path = ckpt.string();
  o.checkpoint_every_steps = ckpt.empty() ? 0 : 15;
  // Batches read ahead on a second thread (the GPU default): never past a checkpoint,
  // so the source state saved with it is that of the rows trained on.
  o.prefetch = prefetch_mode::always;
  return o;
}

struct interrupted : std::runtime_error {
  interrupted() : std::runtime_error("interrupted") {}
};

using schedule = all_prefixes<6>;
using T = float;

/// Runs to the end, or "crashes" (throws) at step `crash_at` after the checkpoints
/// before it were written; returns the trainer.
template <class Source>
trainer<T, dynamic, schedule> run(Source& src, const trainer_options& o, std::int64_t crash_at = -1) {
  cpu_backend be;
  trainer<T, dynamic, schedule> tr(be, sae<T>(24, 96), schedule{}, o);
  tr.on_step = [&](const step_record& r) {
    if (r.step == crash_at) throw interrupted();
  };
  tr.fit(src);
  return tr;
}

template <class MakeSource>
void check_resume_is_bitwise(MakeSource&& make_source) {
  hsae_test::temp_dir tmp;
  const fs::path ckpt = tmp / "run.ckpt";

  auto src_full = make_source();
  const auto full = run(src_full, run_options());

  auto src_crash = make_source();
  CHECK_THROWS_AS(run(src_crash, run_options(ckpt), 37), interrupted);  // checkpoints at 15 and 30
  REQUIRE(fs::exists(ckpt));

  cpu_backend be;
  trainer<T, dynamic, schedule> resumed(be, sae<T>(24, 96), schedule{}, run_options(ckpt));
  auto src_resume = make_source();
  resumed.resume(ckpt, src_resume);
  CHECK(resumed.steps_done() == 30);
  const train_summary s = resumed.fit(src_resume);
  CHECK(s.steps == 45);
  CHECK(s.tokens == 200 * 45);
  CHECK(hsae_test::bitwise_equal(resumed.model().W_enc, full.model().W_enc));
  CHECK(hsae_test::bitwise_equal(resumed.model().W_dec, full.model().W_dec));
  CHECK(hsae_test::bitwise_equal(resumed.model().b_enc, full.model().b_enc));
  CHECK(hsae_test::bitwise_equal(resumed.model().b_dec, full.model().b_dec));
  CHECK(resumed.dead_latents().tokens_since_fired() == full.dead_latents().tokens_since_fired());
  CHECK(resumed.optimizer().steps() == full.optimizer().steps());
  CHECK(resumed.evaluate_held_out().last().fvu == full.evaluate_held_out().last().fvu);
}

}  // namespace

TEST_CASE("checkpoint: a resumed run is bitwise identical to an uninterrupted one", "[checkpoint]") {
  SECTION("synthetic source (restores its position)") {
    const synthetic_options d = data_options();
    check_resume_is_bitwise([&] { return synthetic_source<T>(d); });
  }
  SECTION("npy source with a shuffle buffer (restores buffer, file order, RNG)") {
    hsae_test::temp_dir data_dir;
    synthetic_source<T> gen(data_options(5));
    const row_matrix<T> a = gen.next(2300), b = gen.next(1700);
    write_npy(data_dir / "a.npy", a, npy_dtype::f32);
    write_npy(data_dir / "b.npy", b, npy_dtype::f16);
    file_source_options no;
    no.shuffle_buffer_rows = 999;
    no.read_chunk_rows = 333;
    no.seed = 9;
    const std::vector<fs::path> files{data_dir / "a.npy", data_dir / "b.npy"};
    check_resume_is_bitwise([&] { return file_source<T>(files, no); });
  }
  SECTION("npy source over a row range with chunk shuffling (restores the chunk order and position)") {
    hsae_test::temp_dir data_dir;
    synthetic_source<T> gen(data_options(5));
    write_npy(data_dir / "a.npy", gen.next(2300), npy_dtype::f32);
    write_npy(data_dir / "b.npy", gen.next(1700), npy_dtype::f16);
    file_source_options no;
    no.shuffle_buffer_rows = 400;
    no.read_chunk_rows = 77;
    no.shuffle_chunk_rows = 250;
    no.row_begin = 130;
    no.row_end = 3610;
    no.seed = 9;
    const std::vector<fs::path> files{data_dir / "a.npy", data_dir / "b.npy"};
    check_resume_is_bitwise([&] { return file_source<T>(files, no); });
  }
  SECTION("in-memory source (no state of its own: the pulled rows are replayed)") {
    synthetic_source<T> gen(data_options(6));
    const row_matrix<T> rows = gen.next(3000);
    check_resume_is_bitwise([&] { return matrix_source<T>(rows, 4); });
  }
}

TEST_CASE("checkpoint: a stop request ends fit with a checkpoint that resumes bitwise", "[checkpoint][stop]") {
  hsae_test::temp_dir tmp;
  const fs::path ckpt = tmp / "stop.ckpt";
  const synthetic_options d = data_options();
  synthetic_source<T> src_full(d);
  const auto full = run(src_full, run_options());

  std::atomic<bool> stop{false};
  trainer_options o = run_options(ckpt);
  o.stop_requested = &stop;
  o.metrics_path = (tmp / "metrics.jsonl").string();
  cpu_backend be;
  synthetic_source<T> src_stop(d);
  {
    trainer<T, dynamic, schedule> tr(be, sae<T>(24, 96), schedule{}, o);
    tr.on_step = [&](const step_record& r) {
      if (r.step == 20) stop = true;  // seen before step 21, which runs and ends the fit
    };
    const train_summary s = tr.fit(src_stop);
    CHECK(s.interrupted);
    CHECK(s.steps == 21);
    CHECK(s.tokens == 21 * 200);
    CHECK(s.eval.levels.empty());  // no final evaluation
    CHECK(tr.steps_done() == 21);
  }
  REQUIRE(fs::exists(ckpt));
  stop = false;
  trainer<T, dynamic, schedule> resumed(be, sae<T>(24, 96), schedule{}, o);
  synthetic_source<T> src_resume(d);
  resumed.resume(ckpt, src_resume);
  CHECK(resumed.steps_done() == 21);
  const train_summary s = resumed.fit(src_resume);
  CHECK_FALSE(s.interrupted);
  CHECK(s.steps == 45);
  CHECK(hsae_test::bitwise_equal(resumed.model().W_enc, full.model().W_enc));
  CHECK(hsae_test::bitwise_equal(resumed.model().W_dec, full.model().W_dec));
  CHECK(hsae_test::bitwise_equal(resumed.model().b_enc, full.model().b_enc));
  CHECK(hsae_test::bitwise_equal(resumed.model().b_dec, full.model().b_dec));
  CHECK(resumed.optimizer().steps() == full.optimizer().steps());

  SECTION("a request set before the first step stops after it; one during the last step changes nothing") {
    std::atomic<bool> early{true};
    trainer_options o2 = run_options();
    o2.stop_requested = &early;
    synthetic_source<T> s2(d);
    trainer<T, dynamic, schedule> t2(be, sae<T>(24, 96), schedule{}, o2);
    CHECK(t2.fit(s2).steps == 1);
    std::atomic<bool> late{false};
    trainer_options o3 = run_options();
    o3.stop_requested = &late;
    synthetic_source<T> s3(d);
    trainer<T, dynamic, schedule> t3(be, sae<T>(24, 96), schedule{}, o3);
    t3.on_step = [&](const step_record& r) {
      if (r.step == 44) late = true;  // step 45 is the last
    };
    const train_summary s3sum = t3.fit(s3);
    CHECK_FALSE(s3sum.interrupted);
    CHECK(s3sum.steps == 45);
    CHECK_FALSE(s3sum.eval.levels.empty());
  }
}

TEST_CASE("checkpoint: a process killed while saving leaves the previous checkpoint loadable",
          "[checkpoint][atomic]") {
  hsae_test::temp_dir tmp;
  const fs::path ckpt = tmp / "big.ckpt";
  cpu_backend be;
  be.num_threads = 1;  // the child below must not need OpenMP threads after fork()
  synthetic_source<T> src(data_options());
  trainer_options o = run_options();
  o.total_tokens = 400;
  o.adam.warmup_steps = 0;
  o.adam.decay_steps = 0;
  o.eval_rows = 100;
  o.init_rows = 200;
  // A wide dictionary so that one save takes a while: six [16384, 24] tensors (model
  // and both Adam moments), ~10 MB per file, each save fsync'ed.
  constexpr int wide = 16384;
  trainer<T, dynamic, schedule> tr(be, sae<T>(24, wide), schedule{}, o);
  tr.fit(src);
  tr.save_checkpoint(ckpt, src);
  const std::uintmax_t size = fs::file_size(ckpt);

  int killed_mid_write = 0;
  for (int round = 0; round < 6; ++round) {
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      // Save over and over until killed.
      for (;;) tr.save_checkpoint(ckpt, src);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(3 + 7 * round));
    bool tmp_seen = false;
    for (const auto& e : fs::directory_iterator(tmp.dir)) tmp_seen |= e.path() != ckpt;
    killed_mid_write += tmp_seen;
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    CHECK(WIFSIGNALED(status));
    // Whatever the moment of the kill, the checkpoint file is a whole one.
    CHECK(fs::file_size(ckpt) == size);
    trainer<T, dynamic, schedule> back(be, sae<T>(24, wide), schedule{}, o);
    synthetic_source<T> src2(data_options());
    REQUIRE_NOTHROW(back.resume(ckpt, src2));
    CHECK(hsae_test::bitwise_equal(back.model().W_dec, tr.model().W_dec));
  }
  // The kills did land during writes (a temporary file existed) at least once.
  CHECK(killed_mid_write > 0);
}

TEST_CASE("checkpoint: foreign, truncated and mismatched checkpoints raise hsae errors", "[checkpoint][errors]") {
  hsae_test::temp_dir tmp;
  const fs::path ckpt = tmp / "c.ckpt";
  cpu_backend be;
  synthetic_source<T> src(data_options());
  trainer_options o = run_options(ckpt);
  o.total_tokens = 600;
  o.adam.warmup_steps = 0;
  o.adam.decay_steps = 0;
  trainer<T, dynamic, schedule> tr(be, sae<T>(24, 96), schedule{}, o);
  tr.fit(src);
  REQUIRE(fs::exists(ckpt));

  auto fresh = [&](auto sched, trainer_options opt, int d_sae = 96) {
    return trainer<T, dynamic, decltype(sched)>(be, sae<T>(24, d_sae), sched, opt);
  };
  SECTION("another schedule, width, run length or data stream") {
    synthetic_source<T> s2(data_options());
    auto other_schedule = fresh(top_k<6>{}, o);
    CHECK_THROWS_AS(other_schedule.resume(ckpt, s2), io_error);
    auto other_width = fresh(schedule{}, o, 128);
    CHECK_THROWS_AS(other_width.resume(ckpt, s2), io_error);
    trainer_options longer = o;
    longer.total_tokens = 1200;
    auto other_length = fresh(schedule{}, longer);
    CHECK_THROWS_AS(other_length.resume(ckpt, s2), io_error);
    synthetic_source<T> other_stream(data_options(99));
    auto same = fresh(schedule{}, o);
    CHECK_THROWS_AS(same.resume(ckpt, other_stream), io_error);
  }
  SECTION("another precision") {
    synthetic_source<double> s2(data_options());
    trainer<double, dynamic, schedule> d(be, sae<double>(24, 96), schedule{}, o);
    CHECK_THROWS_AS(d.resume(ckpt, s2), io_error);
  }
  SECTION("a safetensors file that is not a checkpoint, and truncated checkpoints") {
    synthetic_source<T> s2(data_options());
    const row_matrix<float> m = row_matrix<float>::Ones(2, 3);
    safetensors_writer w;
    w.add("x", m);
    w.write(tmp / "plain.safetensors");
    auto t1 = fresh(schedule{}, o);
    CHECK_THROWS_AS(t1.resume(tmp / "plain.safetensors", s2), io_error);
    std::ifstream in(ckpt, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (std::size_t cut : {std::size_t(0), std::size_t(7), std::size_t(100), bytes.size() / 2, bytes.size() - 1}) {
      {
        std::ofstream out(tmp / "cut.ckpt", std::ios::binary | std::ios::trunc);
        out.write(bytes.data(), std::streamsize(cut));
      }
      auto t2 = fresh(schedule{}, o);
      CHECK_THROWS_AS(t2.resume(tmp / "cut.ckpt", s2), io_error);
    }
    auto t3 = fresh(schedule{}, o);
    CHECK_THROWS_AS(t3.resume(tmp / "missing.ckpt", s2), io_error);
  }
}

// --- Hostile checkpoints ----------------------------------------------------------------
// A checkpoint is input: each case below edits one entry of a real checkpoint (written
// mid-run, with a partly served read chunk and a partly filled shuffle buffer) and checks
// that resume refuses it with an hsae::io_error naming the checkpoint and the entry,
// before anything is used as an index or a count (under ASan the first four of these
// were heap overflows, a SEGV and a memcpy from null).

namespace {

using Catch::Matchers::Contains;
using hsae_test::message_of;

struct hostile_fixture {
  hsae_test::temp_dir tmp;
  std::vector<fs::path> files;
  file_source_options no;
  fs::path good = tmp / "good.ckpt";
  fs::path bad = tmp / "bad.ckpt";

  hostile_fixture() {
    synthetic_source<T> gen(data_options(5));
    write_npy(tmp / "a.npy", gen.next(2300), npy_dtype::f32);
    write_npy(tmp / "b.npy", gen.next(1700), npy_dtype::f32);
    files = {tmp / "a.npy", tmp / "b.npy"};
    no.shuffle_buffer_rows = 999;
    no.read_chunk_rows = 333;
    no.shuffle_chunk_rows = 1000;  // chunks of a.npy: 1000, 1000, 300 rows; of b.npy: 1000, 700
    no.seed = 9;
    auto src = file_source<T>(files, no);
    CHECK_THROWS_AS(run(src, run_options(good), 17), interrupted);  // the checkpoint of step 15
  }
  /// The good checkpoint with `edit` applied, written to `bad`.
  template <class Edit>
  void write_edited(Edit&& edit) {
    checkpoint_state<T> st = read_checkpoint<T>(good);
    edit(st);
    write_checkpoint(bad, st);
  }
  /// resume(bad) on a fresh trainer and source.
  void resume_bad() {
    cpu_backend be;
    trainer<T, dynamic, schedule> tr(be, sae<T>(24, 96), schedule{}, run_options(bad));
    auto src = file_source<T>(files, no);
    tr.resume(bad, src);
  }
};

}  // namespace

TEST_CASE("checkpoint: the good checkpoint of the hostile cases resumes", "[checkpoint][hostile]") {
  hostile_fixture fx;
  fx.write_edited([](checkpoint_state<T>&) {});
  REQUIRE_NOTHROW(fx.resume_bad());
  // The state it restores is a partly served chunk inside a partly filled buffer: the
  // cases below start from the state the memory-safety bugs needed.
  const checkpoint_state<T> st = read_checkpoint<T>(fx.good);
  CHECK(st.get_int("source.chunk_pos") < st.get_int("source.chunk_rows"));
  CHECK(st.get_int("source.fill") > 0);
  CHECK(st.text("source.kind") == "files");
}

TEST_CASE("checkpoint: a checkpoint of an npy_source (before the rename) resumes on whole-file chunks",
          "[checkpoint]") {
  // Such checkpoints name the kind "npy" and lack the entries of the row range and chunks;
  // their file order and position read as chunk order and position when chunks are files.
  hsae_test::temp_dir tmp;
  synthetic_source<T> gen(data_options(5));
  write_npy(tmp / "a.npy", gen.next(2300), npy_dtype::f32);
  write_npy(tmp / "b.npy", gen.next(1700), npy_dtype::f32);
  const std::vector<fs::path> files{tmp / "a.npy", tmp / "b.npy"};
  file_source_options no;
  no.shuffle_buffer_rows = 999;
  no.read_chunk_rows = 333;
  no.shuffle_chunk_rows = 0;
  auto src = file_source<T>(files, no);
  CHECK_THROWS_AS(run(src, run_options(tmp / "good.ckpt"), 17), interrupted);
  checkpoint_state<T> st = read_checkpoint<T>(tmp / "good.ckpt");
  st.set("source.kind", std::string("npy"));
  for (const char* k : {"source.tensor", "source.row_begin", "source.row_end", "source.shuffle_chunk_rows", "source.chunks"})
    st.meta.erase(k);
  write_checkpoint(tmp / "old.ckpt", st);
  cpu_backend be;
  trainer<T, dynamic, schedule> resumed(be, sae<T>(24, 96), schedule{}, run_options());
  auto src2 = file_source<T>(files, no);
  resumed.resume(tmp / "old.ckpt", src2);
  resumed.fit(src2);
  auto src3 = file_source<T>(files, no);
  const auto fresh = run(src3, run_options());
  CHECK(hsae_test::bitwise_equal(resumed.model().W_dec, fresh.model().W_dec));
}

TEST_CASE("checkpoint: file_source state from a hostile checkpoint is refused", "[checkpoint][hostile]") {
  hostile_fixture fx;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  struct edit_case {
    const char* name;
    std::function<void(checkpoint_state<T>&)> edit;
    const char* message;
  };
  const std::vector<edit_case> cases = {
      {"order names a chunk that does not exist", [](auto& st) { st.arrays["source.order"] = {0, 1, 2, 3, 5}; },
       "tensor 'source.order' holds 5 at index 4, not a whole number in [0, 4]"},
      {"order repeats a chunk", [](auto& st) { st.arrays["source.order"] = {1, 0, 2, 1, 4}; },
       "tensor 'source.order' names chunk 1 twice"},
      {"order holds NaN", [&](auto& st) { st.arrays["source.order"] = {nan, 0, 1, 2, 3}; },
       "tensor 'source.order' holds nan"},
      {"order holds a negative index", [](auto& st) { st.arrays["source.order"] = {-1, 0, 1, 2, 3}; },
       "tensor 'source.order' holds -1"},
      {"order holds a fraction", [](auto& st) { st.arrays["source.order"] = {0.5, 1, 2, 3, 4}; },
       "tensor 'source.order' holds 0.5"},
      {"order of the wrong length", [](auto& st) { st.arrays["source.order"] = {0, 1}; },
       "tensor 'source.order' has 2 entries, expected 5"},
      {"another row range", [](auto& st) { st.set("source.row_begin", std::int64_t(10)); },
       "the file_source was written for rows [10, 4000), not [0, 4000)"},
      {"another chunk size", [](auto& st) { st.set("source.shuffle_chunk_rows", std::int64_t(4096)); },
       "written with shuffle_chunk_rows = 4096 (5 chunks), not 1000 (5 chunks)"},
      {"another chunk count", [](auto& st) { st.set("source.chunks", std::int64_t(-3)); },
       "(-3 chunks), not 1000 (5 chunks)"},
      {"another tensor", [](auto& st) { st.set("source.tensor", std::string("resid")); },
       "written for tensor 'resid', not ''"},
      {"an npy_source checkpoint for chunks smaller than the files",
       [](auto& st) { st.set("source.kind", std::string("npy")); },
       "written by an npy_source, which shuffled whole files"},
      {"huge epoch_served", [](auto& st) { st.meta["source.epoch_served"] = "4611686018427387904"; },
       "entry 'source.epoch_served' = 4611686018427387904 is out of range [0, 3999]"},
      {"epoch_served off the stream position", [](auto& st) { st.meta["source.epoch_served"] = "5"; },
       "entry 'source.epoch_served' = 5 disagrees with the stream position"},
      {"huge file_pos", [](auto& st) { st.meta["source.file_pos"] = "9223372036854775807"; },
       "entry 'source.file_pos' = 9223372036854775807 is out of range [0, 5]"},
      {"negative chunk_rows", [](auto& st) { st.meta["source.chunk_rows"] = "-7"; },
       "entry 'source.chunk_rows' = -7 is out of range"},
      {"chunk beyond the rows read", [](auto& st) { st.meta["source.chunk_rows"] = "100000"; },
       "name a partly served chunk beyond row"},
      {"row_in_file beyond the file", [](auto& st) { st.meta["source.row_in_file"] = "100000"; },
       "entry 'source.row_in_file' = 100000 is out of range"},
      {"fill beyond the buffer", [](auto& st) { st.meta["source.fill"] = "5000"; },
       "entry 'source.fill' = 5000 is out of range [0, 999]"},
      {"buffer of the wrong width",
       [](auto& st) { st.matrices["source.buffer"] = row_matrix<T>::Zero(st.get_int("source.fill"), 17); },
       "tensor 'source.buffer' has shape"},
      {"buffer holding NaN", [&](auto& st) { st.matrices["source.buffer"](0, 0) = T(nan); },
       "tensor 'source.buffer' holds NaN or Inf"},
      {"served off epoch and epoch_served", [](auto& st) { st.meta["source.served"] = "1"; },
       "entry 'source.served' = 1 disagrees with epoch 1 of 4000 rows"},
      {"negative epoch", [](auto& st) { st.meta["source.epoch"] = "-1"; }, "entry 'source.epoch' = -1 is out of range"},
      {"all-zero generator state",
       [](auto& st) {
         for (int i = 0; i < 4; ++i) st.set(hsae_test::numbered("source.rng.s", i, ""), std::uint64_t(0));
       },
       "entry 'source.rng' is an all-zero generator state"},
      {"NaN generator spare", [](auto& st) { st.set("source.rng.spare", std::numeric_limits<double>::quiet_NaN()); },
       "entry 'source.rng.spare' = nan is not finite"},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    fx.write_edited(c.edit);
    CHECK_THAT(message_of<io_error>([&] { fx.resume_bad(); }),
               Contains("checkpoint '" + fx.bad.string() + "'") && Contains(c.message));
  }
}

TEST_CASE("checkpoint: trainer state from a hostile checkpoint is refused", "[checkpoint][hostile]") {
  hostile_fixture fx;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  struct edit_case {
    const char* name;
    std::function<void(checkpoint_state<T>&)> edit;
    const char* message;
  };
  auto scale = [](double v) { return [v](checkpoint_state<T>& st) { st.set("input_scale", v); }; };
  const std::vector<edit_case> cases = {
      {"input_scale 0", scale(0.0), "entry 'input_scale' = 0 must be positive and finite"},
      {"input_scale negative", scale(-2.0), "entry 'input_scale' = -2 must be positive and finite"},
      {"input_scale NaN", scale(nan), "entry 'input_scale' = nan must be positive and finite"},
      {"input_scale Inf", scale(inf), "entry 'input_scale' = inf must be positive and finite"},
      {"held-out rows with NaN", [&](auto& st) { st.matrices["held_out"](3, 4) = T(nan); },
       "tensor 'held_out' holds a non-finite value (nan) at [3, 4]"},
      {"held-out rows of the wrong width", [](auto& st) { st.matrices["held_out"] = row_matrix<T>::Ones(500, 17); },
       "tensor 'held_out' has shape [500, 17], expected [500, 24]"},
      {"negative step", [](auto& st) { st.meta["step"] = "-3"; }, "entry 'step' = -3 is out of range [0, 45]"},
      {"absurd step", [](auto& st) { st.meta["step"] = "9223372036854775807"; }, "entry 'step' = 9223372036854775807"},
      {"tokens off the step count", [](auto& st) { st.meta["tokens"] = "2999"; },
       "entry 'tokens' = 2999 disagrees with step 15"},
      {"negative tokens", [](auto& st) { st.meta["tokens"] = "-200"; }, "entry 'tokens' = -200 is out of range"},
      {"absurd rows_pulled", [](auto& st) { st.meta["rows_pulled"] = "1000000000000000"; },
       "entry 'rows_pulled' = 1000000000000000 disagrees"},
      {"negative dead counter", [](auto& st) { st.arrays["dead.tokens_since_fired"][7] = -1; },
       "tensor 'dead.tokens_since_fired' holds -1 at index 7, not a whole number in [0, 3000]"},
      {"NaN dead counter", [&](auto& st) { st.arrays["dead.tokens_since_fired"][0] = nan; },
       "tensor 'dead.tokens_since_fired' holds nan at index 0"},
      {"1e30 dead counter", [](auto& st) { st.arrays["dead.tokens_since_fired"][2] = 1e30; },
       "tensor 'dead.tokens_since_fired' holds 1e+30 at index 2"},
      {"dead counter beyond the tokens trained", [](auto& st) { st.arrays["dead.tokens_since_fired"][2] = 3001; },
       "tensor 'dead.tokens_since_fired' holds 3001 at index 2"},
      {"dead counters for another width", [](auto& st) { st.arrays["dead.tokens_since_fired"].resize(95); },
       "dead-latent counters for 95 latents, expected 96"},
      {"adam.steps INT64_MAX", [](auto& st) { st.meta["adam.steps"] = "9223372036854775807"; },
       "entry 'adam.steps' = 9223372036854775807 is out of range [0, 15]"},
      {"negative adam.steps", [](auto& st) { st.meta["adam.steps"] = "-1"; }, "entry 'adam.steps' = -1"},
      {"NaN learning rate", [&](auto& st) { st.set("adam.last_lr", nan); }, "entry 'adam.last_lr' = nan is not finite"},
      {"negative learning rate", [](auto& st) { st.set("adam.last_lr", -1e-3); }, "entry 'adam.last_lr' = -0.001"},
      {"NaN weight", [&](auto& st) { st.matrices["model.W_dec"](5, 1) = T(nan); },
       "tensor 'model.W_dec' holds a non-finite value (nan) at [5, 1]"},
      {"Inf bias", [&](auto& st) { st.matrices["model.b_enc"](0, 9) = T(inf); },
       "tensor 'model.b_enc' holds a non-finite value (inf) at [0, 9]"},
      {"NaN first moment", [&](auto& st) { st.matrices["adam.m.W_enc"](1, 1) = T(nan); },
       "tensor 'adam.m.W_enc' holds a non-finite value"},
      {"negative second moment", [](auto& st) { st.matrices["adam.v.b_dec"](0, 3) = T(-1); },
       "tensor 'adam.v.b_dec' holds a negative second moment"},
      {"weights of another shape", [](auto& st) { st.matrices["model.W_enc"] = row_matrix<T>::Zero(96, 23); },
       "tensor 'model.W_enc' has shape [96, 23], expected [96, 24]"},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    fx.write_edited(c.edit);
    CHECK_THAT(message_of<io_error>([&] { fx.resume_bad(); }),
               Contains("checkpoint '" + fx.bad.string() + "'") && Contains(c.message));
  }
}

TEST_CASE("checkpoint: a refused checkpoint leaves the trainer and the source as they were",
          "[checkpoint][hostile]") {
  hostile_fixture fx;
  fx.write_edited([](auto& st) { st.arrays["dead.tokens_since_fired"][0] = -1; });
  cpu_backend be;
  trainer<T, dynamic, schedule> tr(be, sae<T>(24, 96), schedule{}, run_options());
  auto src = file_source<T>(fx.files, fx.no);
  CHECK_THROWS_AS(tr.resume(fx.bad, src), io_error);
  CHECK(src.rows_served() == 0);
  CHECK(tr.steps_done() == 0);
  // The untouched pair trains like fresh ones.
  auto src2 = file_source<T>(fx.files, fx.no);
  const auto fresh = run(src2, run_options());
  tr.fit(src);
  CHECK(hsae_test::bitwise_equal(tr.model().W_dec, fresh.model().W_dec));
}

TEST_CASE("checkpoint: a file_source saved after any step resumes (buffer sizes, file and epoch boundaries)",
          "[checkpoint][hostile]") {
  // The resume checks hold the source to exact invariants (stream position, rows in the
  // buffer, rows served): every state a run passes through must satisfy them.
  hsae_test::temp_dir tmp;
  synthetic_source<T> gen(data_options(5));
  write_npy(tmp / "a.npy", gen.next(700), npy_dtype::f32);
  write_npy(tmp / "b.npy", gen.next(500), npy_dtype::f32);
  struct config {
    std::size_t buffer;
    bool two_files, shuffle_files;
    std::int64_t chunk = 0, row_begin = 0, row_end = -1;
  };
  for (const config c : {config{0, true, true}, config{1, true, false}, config{150, true, true},
                         config{5000, true, true}, config{150, false, false}, config{0, false, false},
                         config{150, true, true, 64}, config{1, true, false, 64, 100, 1150},
                         config{0, true, true, 45, 650, 1200}, config{5000, false, true, 33, 10, 690}}) {
    INFO("shuffle buffer " << c.buffer << ", files " << (c.two_files ? 2 : 1) << ", shuffled " << c.shuffle_files
                           << ", chunks of " << c.chunk << ", rows [" << c.row_begin << ", " << c.row_end << ")");
    file_source_options no;
    no.shuffle_buffer_rows = c.buffer;
    no.read_chunk_rows = 97;  // read chunks that straddle batches and end mid-file (and mid-chunk)
    no.shuffle_files = c.shuffle_files;
    no.shuffle_chunk_rows = c.chunk;
    no.row_begin = c.row_begin;
    no.row_end = c.row_end;
    no.seed = 3;
    const std::vector<fs::path> files =
        c.two_files ? std::vector<fs::path>{tmp / "a.npy", tmp / "b.npy"} : std::vector<fs::path>{tmp / "a.npy"};
    trainer_options o = run_options();
    o.batch_size = 100;
    o.total_tokens = 100 * 30;  // with 150 held-out and 130 init rows: 2.7 epochs of 2 files, 4.7 of one
    o.eval_rows = 150;
    o.init_rows = 130;
    o.prefetch = prefetch_mode::never;  // the source is saved from on_step
    cpu_backend be;
    trainer<T, dynamic, schedule> full(be, sae<T>(24, 96), schedule{}, o);
    auto src = file_source<T>(files, no);
    full.on_step = [&](const step_record& r) {
      full.save_checkpoint(tmp / hsae_test::numbered("s", long(r.step), ".ckpt"), src);
    };
    full.fit(src);
    for (int s = 1; s <= 30; ++s) {
      INFO("checkpoint after step " << s);
      trainer<T, dynamic, schedule> tr(be, sae<T>(24, 96), schedule{}, o);
      auto src2 = file_source<T>(files, no);
      REQUIRE_NOTHROW(tr.resume(tmp / hsae_test::numbered("s", s, ".ckpt"), src2));
      if (s % 7 == 0) {  // and continues exactly
        tr.fit(src2);
        CHECK(hsae_test::bitwise_equal(tr.model().W_dec, full.model().W_dec));
      }
    }
  }
}

// --- a separate held-out source: trainer::fit(source, held_out) ------------------------------

namespace {

/// A cache of 6000 rows in one file: training reads rows [0, 5000), evaluation the last
/// 1000 by position.
struct held_out_fixture {
  hsae_test::temp_dir tmp;
  std::vector<fs::path> files;
  row_matrix<T> all;
  file_source_options train_opt, held_opt;

  held_out_fixture() {
    synthetic_source<T> gen(data_options(8));
    all = gen.next(6000);
    write_npy(tmp / "cache.npy", all, npy_dtype::f32);
    files = {tmp / "cache.npy"};
    train_opt.shuffle_buffer_rows = 700;
    train_opt.shuffle_chunk_rows = 100;
    train_opt.row_end = 5000;
    train_opt.seed = 4;
    held_opt.row_begin = 5000;
    held_opt.shuffle_buffer_rows = 0;
  }
  file_source<T> train() const { return file_source<T>(files, train_opt); }
  file_source<T> held() const { return file_source<T>(files, held_opt); }
};

/// fit(train, held) to the end, or throws `interrupted` at step `crash_at`.
trainer<T, dynamic, schedule> run_held(file_source<T>& train, file_source<T>& held, const trainer_options& o,
                                       std::int64_t crash_at = -1) {
  cpu_backend be;
  trainer<T, dynamic, schedule> tr(be, sae<T>(24, 96), schedule{}, o);
  tr.on_step = [&](const step_record& r) {
    if (r.step == crash_at) throw interrupted();
  };
  tr.fit(train, held);
  return tr;
}

/// run_options with an init sample smaller than the held-out set, so that the rows pulled
/// tell whether the held-out rows came from the training source.
trainer_options held_options(const fs::path& ckpt = {}) {
  trainer_options o = run_options(ckpt);
  o.init_rows = 300;
  return o;
}

}  // namespace

TEST_CASE("trainer: fit(source, held_out) evaluates the held-out source's first eval_rows rows",
          "[checkpoint][held_out]") {
  held_out_fixture fx;
  auto train = fx.train();
  auto held = fx.held();
  const trainer_options o = held_options();  // eval_rows 500, init_rows 300, 45 steps of 200
  cpu_backend be;
  trainer<T, dynamic, schedule> tr(be, sae<T>(24, 96), schedule{}, o);
  const train_summary s = tr.fit(train, held);
  // The held-out rows: global rows [5000, 5500) of the cache, bitwise.
  const row_matrix<T> want = fx.all.middleRows(5000, 500);
  CHECK(hsae_test::bitwise_equal(tr.held_out(), want));
  CHECK(held.rows_served() == 500);
  // The training source served the init sample and the training rows only.
  CHECK(train.rows_served() == 300 + 200 * 45);
  const evaluation e = evaluate(be, tr.model(), cref<T>(want), schedule{});
  REQUIRE(s.eval.levels.size() == e.levels.size());
  for (std::size_t l = 0; l < e.levels.size(); ++l) {
    CHECK(s.eval.levels[l].fvu == e.levels[l].fvu);
    CHECK(s.eval.levels[l].mse == e.levels[l].mse);
  }
  // The same object twice is refused.
  trainer<T, dynamic, schedule> twice(be, sae<T>(24, 96), schedule{}, o);
  CHECK_THAT(hsae_test::message_of<config_error>([&] { twice.fit(train, train); }),
             Catch::Contains("got the same object twice"));
  // fit(source) on the same data would have evaluated on training-stream rows instead.
  auto train2 = fx.train();
  const auto plain = run(train2, o);
  CHECK_FALSE(hsae_test::bitwise_equal(plain.held_out(), want));
}

TEST_CASE("checkpoint: a run with a separate held-out source resumes bitwise", "[checkpoint][held_out]") {
  held_out_fixture fx;
  const fs::path ckpt = fx.tmp / "run.ckpt";
  auto train_full = fx.train();
  auto held_full = fx.held();
  const auto full = run_held(train_full, held_full, held_options());

  auto train_crash = fx.train();
  auto held_crash = fx.held();
  CHECK_THROWS_AS(run_held(train_crash, held_crash, held_options(ckpt), 37), interrupted);  // checkpoints at 15, 30
  const checkpoint_state<T> st = read_checkpoint<T>(ckpt);
  CHECK(st.get_int("held_out_pulled") == 0);
  CHECK(st.get_int("rows_pulled") == 300 + 200 * 30);

  SECTION("continued with fit(source): the held-out rows come from the checkpoint") {
    cpu_backend be;
    trainer<T, dynamic, schedule> resumed(be, sae<T>(24, 96), schedule{}, held_options(ckpt));
    auto train = fx.train();
    resumed.resume(ckpt, train);
    CHECK(resumed.steps_done() == 30);
    resumed.fit(train);
    CHECK(hsae_test::bitwise_equal(resumed.model().W_enc, full.model().W_enc));
    CHECK(hsae_test::bitwise_equal(resumed.model().W_dec, full.model().W_dec));
    CHECK(hsae_test::bitwise_equal(resumed.model().b_dec, full.model().b_dec));
    CHECK(hsae_test::bitwise_equal(resumed.held_out(), full.held_out()));
    CHECK(resumed.evaluate_held_out().last().fvu == full.evaluate_held_out().last().fvu);
  }
  SECTION("a source without state of its own replays only the training source's rows") {
    // The same data through matrix_source (no save_state: resume re-reads rows_pulled rows).
    const row_matrix<T> train_rows = fx.all.topRows(5000);
    matrix_source<T> m_full(train_rows, 6);
    file_source<T> held_a = fx.held();
    cpu_backend be;
    trainer<T, dynamic, schedule> a(be, sae<T>(24, 96), schedule{}, held_options());
    a.fit(m_full, held_a);
    matrix_source<T> m_crash(train_rows, 6);
    file_source<T> held_b = fx.held();
    trainer<T, dynamic, schedule> b(be, sae<T>(24, 96), schedule{}, held_options(fx.tmp / "m.ckpt"));
    b.on_step = [](const step_record& r) {
      if (r.step == 20) throw interrupted();
    };
    CHECK_THROWS_AS(b.fit(m_crash, held_b), interrupted);
    trainer<T, dynamic, schedule> c(be, sae<T>(24, 96), schedule{}, held_options(fx.tmp / "m.ckpt"));
    matrix_source<T> m_resume(train_rows, 6);
    c.resume(fx.tmp / "m.ckpt", m_resume);
    c.fit(m_resume);
    CHECK(hsae_test::bitwise_equal(c.model().W_dec, a.model().W_dec));
  }
  SECTION("a hostile held_out_pulled is refused") {
    const auto refused = [&](const std::function<void(checkpoint_state<T>&)>& edit) {
      checkpoint_state<T> bad = read_checkpoint<T>(ckpt);
      edit(bad);
      write_checkpoint(fx.tmp / "bad.ckpt", bad);
      cpu_backend be;
      trainer<T, dynamic, schedule> tr(be, sae<T>(24, 96), schedule{}, held_options());
      auto train = fx.train();
      return hsae_test::message_of<io_error>([&] { tr.resume(fx.tmp / "bad.ckpt", train); });
    };
    CHECK_THAT(refused([](auto& s) { s.set("held_out_pulled", std::int64_t(3)); }),
               Catch::Contains("entry 'held_out_pulled' = 3 must be 0"));
    CHECK_THAT(refused([](auto& s) { s.set("held_out_pulled", std::int64_t(-1)); }),
               Catch::Contains("entry 'held_out_pulled' = -1 is out of range [0, 500]"));
    CHECK_THAT(refused([](auto& s) { s.set("held_out_pulled", std::int64_t(1) << 62); }),
               Catch::Contains("entry 'held_out_pulled' = 4611686018427387904 is out of range"));
    // All 500 from the training source: then rows_pulled is 500 short.
    CHECK_THAT(refused([](auto& s) { s.set("held_out_pulled", std::int64_t(500)); }),
               Catch::Contains("entry 'rows_pulled' = 6300 disagrees"));
    // A checkpoint without the entry (written before it existed) took them from the training source.
    CHECK_THAT(refused([](auto& s) { s.meta.erase("held_out_pulled"); }),
               Catch::Contains("entry 'rows_pulled' = 6300 disagrees"));
  }
}
