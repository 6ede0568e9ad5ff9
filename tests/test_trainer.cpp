// SPDX-License-Identifier: Apache-2.0
// The trainer loop, its JSON-lines metrics and progress line, the evaluation metrics
// (against a naive per-k decode), input normalisation and the trainer's errors.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include <cstdio>
#include <fstream>
#include <limits>
#include <cmath>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "test_util.hpp"

using namespace hsae;

namespace {

synthetic_options small_data(std::uint64_t seed = 5) { return hsae_test::small_synthetic(seed); }

trainer_options small_run() {
  trainer_options o;
  o.batch_size = 256;
  o.total_tokens = 256 * 60;
  o.eval_rows = 1024;
  o.init_rows = 1024;
  o.adam.lr = 3e-3;
  o.adam.warmup_steps = 5;
  o.log_every_steps = 10;
  o.progress = progress_mode::never;
  return o;
}

using fixed_source = hsae_test::cycling_source;

}  // namespace

TEST_CASE("metrics: FVU, MSE and L0 of every level equal a naive per-k decode", "[metrics]") {
  const cpu_backend be;
  synthetic_source<double> src(small_data());
  sae<double> m(24, 96);
  const row_matrix<double> x = src.next(300);
  init(be, m, x);
  m.b_enc.setConstant(-0.6);  // some rows get fewer than K positives: L0 < k
  const auto sched = dynamic_k_schedule{{1, 1.0}, {3, 2.0}, {8, 0.5}};
  const evaluation e = evaluate(be, m, cref<double>(x), sched);

  const sparse_code<double> code = encode(be, m, x, 8);
  const Eigen::RowVectorXd mean = x.colwise().mean();
  const double total = (x.rowwise() - mean).squaredNorm();
  REQUIRE(e.rows == 300);
  REQUIRE(e.total_variance == Approx(total).epsilon(1e-10));
  REQUIRE(e.levels.size() == 3);
  bool some_short = false;
  for (const int k : {1, 3, 8}) {
    row_matrix<double> xhat;
    decode(be, m, code, k, xhat);
    const double sse = (x - xhat).squaredNorm();
    const double l0 = (code.values.leftCols(k).array() != 0.0).cast<double>().sum() / 300.0;
    const level_metrics& l = e.at(k);
    CHECK(l.k == k);
    CHECK(l.mse == Approx(sse / (300.0 * 24)).epsilon(1e-10));
    CHECK(l.fvu == Approx(sse / total).epsilon(1e-10));
    CHECK(l.explained_variance() == Approx(1 - sse / total).epsilon(1e-10));
    CHECK(l.l0 == Approx(l0).epsilon(1e-12));
    some_short |= l0 < k;
  }
  CHECK(some_short);
  REQUIRE_THROWS_AS(e.at(2), config_error);
}

TEST_CASE("metrics: batches accumulate to the metrics of their union", "[metrics]") {
  const cpu_backend be;
  synthetic_source<float> src(small_data(9));
  sae<float> m(24, 64);
  const row_matrix<float> x = src.next(500);
  init(be, m, x);
  const all_prefixes<4> sched;
  const evaluation whole = evaluate(be, m, cref<float>(x), sched);

  fixed_source fs{x};
  const evaluation parts = evaluate(be, m, fs, sched, 500, 128);  // 128+128+128+116 rows
  REQUIRE(parts.rows == 500);
  for (std::size_t l = 0; l < 4; ++l) {
    CHECK(parts.levels[l].fvu == Approx(whole.levels[l].fvu).epsilon(1e-6));
    CHECK(parts.levels[l].mse == Approx(whole.levels[l].mse).epsilon(1e-6));
    CHECK(parts.levels[l].l0 == Approx(whole.levels[l].l0).epsilon(1e-12));
  }
  metrics_accumulator empty;
  REQUIRE_THROWS_AS(empty.result(), shape_error);
}

TEST_CASE("trainer: the loss falls, FVU improves and every level is evaluated", "[trainer]") {
  const cpu_backend be;
  synthetic_source<float> src(small_data());
  trainer_options o = small_run();
  std::vector<step_record> records;
  std::vector<std::int64_t> eval_steps;
  o.eval_every_steps = 20;
  trainer<float, dynamic, all_prefixes<6>> tr(be, sae<float>(24, 96), all_prefixes<6>{}, o);
  tr.on_step = [&](const step_record& r) { records.push_back(r); };
  tr.on_eval = [&](std::int64_t step, const evaluation&) { eval_steps.push_back(step); };
  const train_summary s = tr.fit(src);

  REQUIRE(records.size() == 60);
  REQUIRE(s.steps == 60);
  REQUIRE(s.tokens == 256 * 60);
  CHECK(records.back().loss < 0.7 * records.front().loss);
  CHECK(records.back().fvu_kmax < records.front().fvu_kmax);
  CHECK(records.back().tokens == 256 * 60);
  REQUIRE(eval_steps == std::vector<std::int64_t>{20, 40, 60});
  REQUIRE(s.eval.levels.size() == 6);
  for (std::size_t l = 1; l < 6; ++l) CHECK(s.eval.levels[l].fvu < s.eval.levels[l - 1].fvu);
  CHECK(s.eval.last().fvu < 0.5);
  CHECK(s.eval.dead_fraction >= 0.0);
  // lr warm-up then linear schedule reached the optimizer.
  CHECK(records[0].lr == Approx(3e-3 / 5));
  CHECK(records[10].lr == Approx(3e-3));
}

TEST_CASE("trainer: deduced arguments and the aliases; a compile-time width trains as the dynamic one", "[trainer]") {
  const cpu_backend be;
  const trainer_options o = small_run();
  trainer deduced(be, sae<float>(24, 96), all_prefixes<6>{}, o);
  STATIC_REQUIRE(std::is_same_v<decltype(deduced), trainer<float, dynamic, all_prefixes<6>, cpu_backend>>);
  STATIC_REQUIRE(std::is_same_v<cpu_trainer<all_prefixes<6>>, decltype(deduced)>);
  STATIC_REQUIRE(std::is_same_v<cpu_trainer<k_schedule<8, 16>, 64, double>, trainer<double, 64, k_schedule<8, 16>>>);
  STATIC_REQUIRE(std::is_same_v<cuda_trainer<top_k<32>>, trainer<float, dynamic, top_k<32>, cuda_backend>>);

  trainer fixed(be, sae<float, 96>(24), all_prefixes<6>{}, o);
  STATIC_REQUIRE(std::is_same_v<decltype(fixed), trainer<float, 96, all_prefixes<6>>>);
  STATIC_REQUIRE(std::remove_cvref_t<decltype(fixed.model().W_dec)>::RowsAtCompileTime == 96);
  STATIC_REQUIRE(std::remove_cvref_t<decltype(deduced.model().W_dec)>::RowsAtCompileTime == Eigen::Dynamic);
  synthetic_source<float> a(small_data()), b(small_data());
  const train_summary sd = deduced.fit(a);
  const train_summary sf = fixed.fit(b);
  CHECK(sf.eval.last().fvu == sd.eval.last().fvu);  // the same arithmetic, bit for bit
  CHECK(fixed.model().W_dec == deduced.model().W_dec);
  CHECK(fixed.model().b_dec == deduced.model().b_dec);
  // A fixed width refuses a model of another width when it is made, not when it trains.
  CHECK_THAT(hsae_test::message_of<config_error>([] { (void)sae<float, 96>(24, 95); }),
             Catch::Contains("d_sae=95 differs from the compile-time dictionary width F=96"));
}

TEST_CASE("trainer: training from .npy files equals training from the same rows in memory", "[trainer][npy]") {
  // Two float32 files holding the rows in order, read without shuffling, must give the
  // same batches as the in-memory matrix read in order: the models are bitwise equal.
  // A float16 copy trains like the half-rounded matrix. Both runs cross epoch ends.
  const cpu_backend be;
  synthetic_source<float> src(small_data(11));
  const row_matrix<float> rows = src.next(5000);
  hsae_test::temp_dir tmp;
  const row_matrix<float> first = rows.topRows(3000), second = rows.bottomRows(2000);
  write_npy(tmp / "a.npy", first, npy_dtype::f32);
  write_npy(tmp / "b.npy", second, npy_dtype::f32);
  write_npy(tmp / "h.npy", rows, npy_dtype::f16);

  file_source_options in_order;
  in_order.shuffle_buffer_rows = 0;
  in_order.shuffle_files = false;
  in_order.read_chunk_rows = 777;  // chunks that straddle batches and files

  auto train = [&](auto& source) {
    trainer<float, dynamic, all_prefixes<6>> tr(be, sae<float>(24, 96), all_prefixes<6>{}, small_run());
    const train_summary s = tr.fit(source);
    return std::pair{tr.model(), s};
  };
  matrix_source<float> mem(rows, 1, /*shuffle=*/false);
  file_source<float> files({tmp / "a.npy", tmp / "b.npy"}, in_order);
  const auto [m_mem, s_mem] = train(mem);
  const auto [m_npy, s_npy] = train(files);
  CHECK(files.epoch() >= 3);
  CHECK(hsae_test::bitwise_equal(m_mem.W_enc, m_npy.W_enc));
  CHECK(hsae_test::bitwise_equal(m_mem.W_dec, m_npy.W_dec));
  CHECK(hsae_test::bitwise_equal(m_mem.b_dec, m_npy.b_dec));
  CHECK(s_mem.eval.last().fvu == s_npy.eval.last().fvu);
  CHECK(s_npy.eval.last().fvu < 0.5);

  row_matrix<float> rounded = rows.unaryExpr([](float v) { return half_to_float(float_to_half(v)); });
  matrix_source<float> mem_half(rounded, 1, false);
  file_source<float> half_file({tmp / "h.npy"}, in_order);
  const auto [m_half_mem, s_half_mem] = train(mem_half);
  const auto [m_half, s_half] = train(half_file);
  CHECK(hsae_test::bitwise_equal(m_half_mem.W_dec, m_half.W_dec));
  CHECK(s_half.eval.last().fvu == s_half_mem.eval.last().fvu);

  // Shuffled (buffer + file order) still trains to the same quality.
  file_source_options shuffled;
  shuffled.shuffle_buffer_rows = 1024;
  file_source<float> mixed({tmp / "a.npy", tmp / "b.npy"}, shuffled);
  const auto [m_mixed, s_mixed] = train(mixed);
  CHECK(!hsae_test::bitwise_equal(m_mixed.W_dec, m_npy.W_dec));
  CHECK(s_mixed.eval.last().fvu < 0.5);
}

TEST_CASE("trainer: a partial last batch trains exactly total_tokens", "[trainer]") {
  const cpu_backend be;
  synthetic_source<float> src(small_data());
  trainer_options o = small_run();
  o.total_tokens = 1000;  // 3 full batches of 256 and one of 232
  o.eval_rows = 0;
  trainer<float, dynamic, top_k<4>> tr(be, sae<float>(24, 32), top_k<4>{}, o);
  const train_summary s = tr.fit(src);
  CHECK(s.steps == 4);
  CHECK(s.tokens == 1000);
  CHECK(s.eval.levels.empty());
  REQUIRE_THROWS_AS(tr.evaluate_held_out(), config_error);
}

TEST_CASE("trainer: reading the next batch during a step changes nothing", "[trainer]") {
  const cpu_backend be;
  auto run = [&](bool prefetch, std::vector<double>& losses) {
    synthetic_source<float> src(small_data(11));
    trainer_options o = small_run();
    o.total_tokens = 256 * 12 + 100;  // a partial last batch, read ahead like the others
    o.normalize_inputs = true;        // the reader also applies the input scale
    o.prefetch = prefetch ? prefetch_mode::always : prefetch_mode::never;
    trainer<float, dynamic, all_prefixes<4>> tr(be, sae<float>(24, 48), all_prefixes<4>{}, o);
    tr.on_step = [&](const step_record& r) { losses.push_back(r.loss); };
    const train_summary s = tr.fit(src);
    CHECK(s.tokens == o.total_tokens);
    return std::make_pair(tr.model(), src.position());
  };
  std::vector<double> with, without;
  const auto [m_with, served_with] = run(true, with);
  const auto [m_without, served_without] = run(false, without);
  REQUIRE(with.size() == 13);
  CHECK(with == without);
  CHECK(served_with == served_without);  // nothing read beyond the last batch
  CHECK(hsae_test::bitwise_equal(m_with.W_enc, m_without.W_enc));
  CHECK(hsae_test::bitwise_equal(m_with.W_dec, m_without.W_dec));
  CHECK(hsae_test::bitwise_equal(m_with.b_enc, m_without.b_enc));
}

namespace {

/// cycling_source that throws hsae::io_error on its `fail_at`-th call (0-based).
struct failing_source : hsae_test::cycling_source {
  int fail_at = -1;
  void next(Eigen::Index rows, row_matrix<float>& x) {
    if (calls == fail_at) {
      ++calls;
      throw io_error("failing_source: read error");
    }
    cycling_source::next(rows, x);
  }
};

}  // namespace

TEST_CASE("trainer: a source error read ahead surfaces when that batch is due", "[trainer][errors]") {
  const cpu_backend be;
  synthetic_source<float> src(small_data());
  for (bool prefetch : {true, false}) {
    INFO("prefetch " << prefetch);
    failing_source bad;
    bad.data = src.next(300);
    bad.fail_at = 5;  // eval rows, init rows, then training batches 1-3 train; the 4th fails
    trainer_options o = small_run();
    o.prefetch = prefetch ? prefetch_mode::always : prefetch_mode::never;
    trainer<float, dynamic, top_k<4>> tr(be, sae<float>(24, 32), top_k<4>{}, o);
    REQUIRE_THROWS_WITH(tr.fit(bad), Catch::Contains("read error"));
    CHECK(tr.steps_done() == 3);
    CHECK(bad.calls == 6);  // nothing was read after the failure
  }
}

TEST_CASE("trainer: JSON-lines metrics and the progress line", "[trainer]") {
  const cpu_backend be;
  synthetic_source<float> src(small_data());
  trainer_options o = small_run();
  const std::string path = "test_trainer_metrics.jsonl";
  o.metrics_path = path;
  o.progress = progress_mode::automatic;  // a file is not a terminal: one line per log interval
  std::FILE* log = std::tmpfile();
  REQUIRE(log != nullptr);
  o.progress_stream = log;
  const auto sched = dynamic_k_schedule::subset({2, 4, 8});
  trainer<float, dynamic, dynamic_k_schedule> tr(be, sae<float>(24, 64), sched, o);
  tr.fit(src);

  std::ifstream in(path);
  std::string line;
  int steps = 0, evals = 0, summaries = 0;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);  // every line is one JSON object
    const std::string type = j.at("type");
    if (type == "step") {
      ++steps;
      CHECK(j.at("step").get<int>() % 10 == 0);
      CHECK(j.at("loss").get<double>() > 0);
      CHECK(j.contains("fvu_kmax"));
      CHECK(j.contains("dead_fraction"));
      CHECK(j.contains("tokens_per_second"));
    } else if (type == "eval") {
      ++evals;
      REQUIRE(j.at("levels").size() == 3);
      CHECK(j.at("levels")[2].at("k").get<int>() == 8);
      CHECK(j.at("levels")[2].at("fvu").get<double>() < j.at("levels")[0].at("fvu").get<double>());
    } else if (type == "summary") {
      ++summaries;
      CHECK(j.at("tokens").get<std::int64_t>() == 256 * 60);
    }
  }
  CHECK(steps == 6);
  CHECK(evals == 1);
  CHECK(summaries == 1);
  std::remove(path.c_str());

  std::rewind(log);
  std::string text;
  char buf[512];
  while (std::fgets(buf, sizeof buf, log)) text += buf;
  std::fclose(log);
  CHECK(text.find("step 10/60") != std::string::npos);
  CHECK(text.find("step 60/60") != std::string::npos);
  CHECK(text.find("tok/s") != std::string::npos);
  CHECK(text.find("FVU@8") != std::string::npos);
  CHECK(text.find("dead") != std::string::npos);
  CHECK(text.find("ETA") != std::string::npos);
  CHECK(text.find('\r') == std::string::npos);
}

TEST_CASE("trainer: a fit that threw leaves no metrics file open: the next fit writes it afresh", "[trainer][errors]") {
  const cpu_backend be;
  synthetic_source<float> src(small_data());
  trainer_options o = small_run();
  o.total_tokens = 256 * 12;
  o.log_every_steps = 1;
  const std::string path = "test_trainer_refit.jsonl";
  o.metrics_path = path;
  trainer<float, dynamic, top_k<4>> tr(be, sae<float>(24, 32), top_k<4>{}, o);

  fixed_source poisoned{src.next(300)};
  poisoned.poison_at = 4;  // eval rows, init rows, then steps: the 3rd training batch
  REQUIRE_THROWS_AS(tr.fit(poisoned), numeric_error);
  REQUIRE(tr.steps_done() == 2);

  // The thrown fit's file was left open: this fit then refused it ("cannot open the metrics file").
  train_summary s;
  REQUIRE_NOTHROW(s = tr.fit(src));
  CHECK(s.steps == 12);

  std::ifstream in(path);
  std::string line;
  std::vector<std::int64_t> steps;
  int summaries = 0;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j.at("type") == "step") steps.push_back(j.at("step").get<std::int64_t>());
    if (j.at("type") == "summary") ++summaries;
  }
  in.close();
  std::remove(path.c_str());
  // Truncated at the new start: steps 1..12 once each (not the thrown fit's 1 and 2 before them).
  REQUIRE(steps.size() == 12);
  for (std::size_t i = 0; i < steps.size(); ++i) CHECK(steps[i] == std::int64_t(i) + 1);
  CHECK(summaries == 1);
}

TEST_CASE("trainer: input normalisation is folded back by export_model", "[trainer]") {
  const cpu_backend be;
  synthetic_options d = small_data();
  synthetic_source<double> src(d);
  const row_matrix<double> probe = src.next(256);  // init_rows = 1024: four whole cycles
  fixed_source scaled{row_matrix<float>((probe * 40.0).cast<float>())};  // activations far from unit scale
  trainer_options o = small_run();
  o.normalize_inputs = true;
  o.total_tokens = 256 * 5;
  o.eval_rows = 0;
  trainer<float, dynamic, all_prefixes<4>> tr(be, sae<float>(24, 48), all_prefixes<4>{}, o);
  tr.fit(scaled);
  const double s = tr.input_scale();
  const double mean_sq = scaled.data.cast<double>().squaredNorm() / double(scaled.data.rows());
  CHECK(s * s * mean_sq == Approx(24.0).epsilon(1e-4));

  const row_matrix<float> x = scaled.data;
  const row_matrix<float> xs = x * float(s);
  const sparse_code<float> code_s = encode(be, tr.model(), xs, 4);
  const sae<float> exported = tr.export_model();
  const sparse_code<float> code = encode(be, exported, x, 4);
  row_matrix<float> rec_s, rec;
  decode(be, tr.model(), code_s, 4, rec_s);
  decode(be, exported, code, 4, rec);
  CHECK((code.indices.array() == code_s.indices.array()).all());
  CHECK((rec - rec_s / float(s)).cwiseAbs().maxCoeff() < 1e-3 * x.cwiseAbs().maxCoeff());
}

TEST_CASE("trainer: in_input_units gives the held-out MSE of the exported model on the raw rows", "[trainer]") {
  const cpu_backend be;
  synthetic_source<double> src(small_data());
  const row_matrix<double> probe = src.next(512);
  fixed_source scaled{row_matrix<float>((probe * 40.0).cast<float>())};
  trainer_options o = small_run();
  o.normalize_inputs = true;
  o.total_tokens = 256 * 5;
  o.eval_rows = 200;
  trainer tr(be, sae<float>(24, 48), all_prefixes<4>{}, o);
  const train_summary sum = tr.fit(scaled);
  REQUIRE(sum.input_scale < 0.1);  // far from 1: the units differ by 1/s^2 > 100
  const evaluation user = sum.eval.in_input_units(sum.input_scale);
  const row_matrix<float> raw = tr.held_out() / float(sum.input_scale);
  const evaluation direct = evaluate(be, tr.export_model(), cref<float>(raw), all_prefixes<4>{});
  REQUIRE(user.levels.size() == direct.levels.size());
  CHECK(user.total_variance == Approx(direct.total_variance).epsilon(1e-4));
  for (std::size_t l = 0; l < user.levels.size(); ++l) {
    CHECK(user.levels[l].mse == Approx(direct.levels[l].mse).epsilon(2e-3));
    CHECK(user.levels[l].fvu == sum.eval.levels[l].fvu);
    CHECK(user.levels[l].mse * sum.input_scale * sum.input_scale == Approx(sum.eval.levels[l].mse));
  }
  CHECK_THROWS_AS(sum.eval.in_input_units(0.0), config_error);
  CHECK_THROWS_AS(sum.eval.in_input_units(std::nan("")), config_error);
}

TEST_CASE("trainer: bad settings and bad data raise hsae errors", "[trainer][errors]") {
  const cpu_backend be;
  synthetic_source<float> src(small_data());

  trainer_options o = small_run();
  o.total_tokens = 0;
  REQUIRE_THROWS_WITH((trainer<float, dynamic, top_k<4>>(be, sae<float>(24, 32), top_k<4>{}, o)),
                      Catch::Contains("total_tokens"));
  o = small_run();
  o.batch_size = 0;
  REQUIRE_THROWS_WITH((trainer<float, dynamic, top_k<4>>(be, sae<float>(24, 32), top_k<4>{}, o)),
                      Catch::Contains("batch_size"));
  o = small_run();
  REQUIRE_THROWS_WITH((trainer<float, dynamic, top_k<64>>(be, sae<float>(24, 32), top_k<64>{}, o)),
                      Catch::Contains("exceeds d_sae"));

  trainer<float, dynamic, top_k<4>> wrong_width(be, sae<float>(16, 32), top_k<4>{}, small_run());
  REQUIRE_THROWS_WITH(wrong_width.fit(src), Catch::Contains("d_model=24") && Catch::Contains("d_model=16"));

  fixed_source poisoned{src.next(300)};
  poisoned.poison_at = 4;  // eval rows, init rows, then steps: the 3rd training batch
  trainer<float, dynamic, top_k<4>> tr(be, sae<float>(24, 32), top_k<4>{}, small_run());
  REQUIRE_THROWS_AS(tr.fit(poisoned), numeric_error);
  CHECK(tr.steps_done() == 2);

  trainer_options bad_path = small_run();
  bad_path.metrics_path = "/nonexistent-dir/metrics.jsonl";
  trainer<float, dynamic, top_k<4>> tp(be, sae<float>(24, 32), top_k<4>{}, bad_path);
  REQUIRE_THROWS_AS(tp.fit(src), io_error);
}

namespace {
/// A source that serves `extra` rows more (or fewer, when negative) than asked from call
/// `wrong_at` on, or rows `width_delta` columns too wide.
struct miscounting_source {
  synthetic_source<float> inner{small_data()};
  int calls = 0, wrong_at = 0;
  Eigen::Index extra = 0, width_delta = 0;
  int d_model() const { return 24; }
  void next(Eigen::Index rows, row_matrix<float>& x) {
    const bool wrong = calls++ >= wrong_at;
    inner.next(std::max<Eigen::Index>(0, rows + (wrong ? extra : 0)), x);
    if (wrong && width_delta != 0) x.conservativeResize(x.rows(), x.cols() + width_delta);
  }
};

using hsae_test::message_of;
}  // namespace

TEST_CASE("trainer: options are checked at construction, not hours into a run", "[trainer][errors]") {
  const cpu_backend be;
  using tr_t = trainer<float, dynamic, top_k<4>>;
  SECTION("total_tokens near INT64_MAX: the step count does not overflow") {
    trainer_options o = small_run();
    o.total_tokens = std::numeric_limits<std::int64_t>::max();
    o.batch_size = 4096;
    CHECK(o.steps() == std::numeric_limits<std::int64_t>::max() / 4096 + 1);
    o.batch_size = 1;
    CHECK(o.steps() == std::numeric_limits<std::int64_t>::max());
    o.batch_size = std::numeric_limits<std::int64_t>::max();
    CHECK(o.steps() == 1);
  }
  SECTION("a held-out, init or batch buffer larger than memory") {
    for (const char* field : {"eval_rows", "init_rows", "batch_size"}) {
      trainer_options o = small_run();
      const std::int64_t huge = std::int64_t(1) << 40;  // 2^40 rows of 24 floats: 96 TiB
      if (std::string(field) == "eval_rows") o.eval_rows = huge;
      if (std::string(field) == "init_rows") o.init_rows = huge;
      if (std::string(field) == "batch_size") o.batch_size = o.total_tokens = huge;
      INFO(field);
      CHECK_THROWS_AS(tr_t(be, sae<float>(24, 32), top_k<4>{}, o), config_error);
      CHECK_THAT(message_of<hsae::error>([&] { tr_t(be, sae<float>(24, 32), top_k<4>{}, o); }),
                 Catch::Contains(std::string(field) + "=1099511627776") && Catch::Contains("more than this machine"));
    }
  }
  SECTION("AuxK settings (used only once a latent dies)") {
    for (const double alpha : {std::nan(""), HUGE_VAL, -1.0}) {
      trainer_options o = small_run();
      o.step.auxk.alpha = alpha;
      CHECK_THAT(message_of<hsae::error>([&] { tr_t(be, sae<float>(24, 32), top_k<4>{}, o); }),
                 Catch::Contains("auxk_options.alpha must be finite and >= 0"));
    }
  }
  SECTION("a checkpoint path that cannot be written") {
    hsae_test::temp_dir tmp;
    trainer_options o = small_run();
    o.checkpoint_path = tmp.dir.string();  // a directory
    CHECK_THAT(message_of<hsae::error>([&] { tr_t(be, sae<float>(24, 32), top_k<4>{}, o); }),
               Catch::Contains("checkpoint_path") && Catch::Contains("is a directory"));
    o.checkpoint_path = (tmp / "no-such-dir" / "run.ckpt").string();
    CHECK_THAT(message_of<hsae::error>([&] { tr_t(be, sae<float>(24, 32), top_k<4>{}, o); }),
               Catch::Contains("checkpoint_path") && Catch::Contains("does not exist"));
    o.checkpoint_path = (tmp / "run.ckpt").string();
    CHECK_NOTHROW(tr_t(be, sae<float>(24, 32), top_k<4>{}, o));
  }
}

TEST_CASE("trainer: a source that returns more or fewer rows than asked is refused", "[trainer][errors]") {
  const cpu_backend be;
  struct wrong_case {
    int wrong_at;
    Eigen::Index extra, width_delta;
    const char* what;
  };
  // Calls: 0 held-out rows, 1 init sample, 2.. batches.
  for (const wrong_case c : {wrong_case{0, -1, 0, "the held-out rows of shape [1023, 24]"},
                             wrong_case{1, 5, 0, "the init sample of shape [1029, 24]"},
                             wrong_case{3, -17, 0, "a batch of shape [239, 24]"},
                             wrong_case{3, 1, 0, "a batch of shape [257, 24]"},
                             wrong_case{2, 0, 3, "a batch of shape [256, 27]"}}) {
    INFO(c.what);
    miscounting_source src;
    src.wrong_at = c.wrong_at;
    src.extra = c.extra;
    src.width_delta = c.width_delta;
    trainer<float, dynamic, top_k<4>> tr(be, sae<float>(24, 32), top_k<4>{}, small_run());
    CHECK_THROWS_AS(tr.fit(src), shape_error);
    src = miscounting_source{};
    src.wrong_at = c.wrong_at;
    src.extra = c.extra;
    src.width_delta = c.width_delta;
    trainer<float, dynamic, top_k<4>> tr2(be, sae<float>(24, 32), top_k<4>{}, small_run());
    CHECK_THAT(message_of<hsae::error>([&] { tr2.fit(src); }),
               Catch::Contains("the data source (") && Catch::Contains("miscounting_source") &&
                   Catch::Contains(std::string("returned ") + c.what));
  }
}

TEST_CASE("adam and the dead-latent tracker refuse restored state out of range", "[optimizer][errors]") {
  sae<float> m(8, 16);
  adam<float> opt(m, adam_options{});
  sae_gradients<float> m1, m2;
  m1.zeros_like(m);
  m2.zeros_like(m);
  const auto max = std::numeric_limits<std::int64_t>::max();
  CHECK_THROWS_WITH(opt.set_state(max, m1, m2), Catch::Contains("adam state: step count 9223372036854775807"));
  CHECK_THROWS_WITH(opt.set_state(-1, m1, m2), Catch::Contains("adam state: step count -1"));
  CHECK_THROWS_WITH(opt.set_state(3, m1, m2, std::nan("")), Catch::Contains("last learning rate nan"));
  sae_gradients<float> neg = m2;
  neg.b_dec[2] = -1;
  CHECK_THROWS_WITH(opt.set_state(3, m1, neg), Catch::Contains("second moments hold a negative value"));
  sae_gradients<float> nan1 = m1;
  nan1.W_enc(1, 1) = std::nanf("");
  CHECK_THROWS_WITH(opt.set_state(3, nan1, m2), Catch::Contains("first moments hold NaN or Inf"));
  sae_gradients<float> narrow;
  narrow.zeros_like(sae<float>(8, 15));
  CHECK_THROWS_WITH(opt.set_state(3, narrow, m2), Catch::Contains("first moments do not match"));
  // The last representable step: set, then one more step is refused instead of overflowing.
  opt.set_state(max - 1, m1, m2);
  const cpu_backend be;
  sae_gradients<float> g;
  g.zeros_like(m);
  CHECK_NOTHROW(opt.step(be, m, g));
  CHECK(opt.steps() == max);
  CHECK_THROWS_WITH(opt.step(be, m, g), Catch::Contains("step count 9223372036854775807 cannot grow further"));

  dead_latent_tracker dead(16, 100);
  std::vector<std::int64_t> counters(16, 0);
  counters[4] = -5;
  CHECK_THROWS_WITH(dead.set_tokens_since_fired(counters), Catch::Contains("counter of latent 4 is negative (-5)"));
}
