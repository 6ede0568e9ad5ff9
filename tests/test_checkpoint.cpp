// SPDX-License-Identifier: Apache-2.0
// Checkpoints (checkpoint.hpp, trainer::save_checkpoint / resume): a run interrupted
// after a checkpoint and resumed from it ends bitwise identical to an uninterrupted run
// (synthetic, .npy with a shuffle buffer, and an in-memory source restored by replay);
// a process killed while saving leaves the previous checkpoint loadable; foreign,
// truncated and mismatched checkpoints raise hsae errors.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "test_util.hpp"

using namespace hsae;
namespace fs = std::filesystem;

namespace {

synthetic_options data_options(std::uint64_t seed = 21) {
  synthetic_options d;
  d.d_model = 24;
  d.n_atoms = 48;
  d.children_per_atom = 1;
  d.mean_active = 3;
  d.noise_std = 0.01;
  d.seed = seed;
  return d;
}

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
    npy_source_options no;
    no.shuffle_buffer_rows = 999;
    no.read_chunk_rows = 333;
    no.seed = 9;
    const std::vector<fs::path> files{data_dir / "a.npy", data_dir / "b.npy"};
    check_resume_is_bitwise([&] { return npy_source<T>(files, no); });
  }
  SECTION("in-memory source (no state of its own: the pulled rows are replayed)") {
    synthetic_source<T> gen(data_options(6));
    const row_matrix<T> rows = gen.next(3000);
    check_resume_is_bitwise([&] { return matrix_source<T>(rows, 4); });
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
