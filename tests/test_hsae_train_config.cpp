// SPDX-License-Identifier: Apache-2.0
// hsae-train (tools/hsae_train): the command line and config file parser, the defaults
// resolved against the data, the input expansion (globs, directories, activations.json,
// safetensors),
// and whole runs on small .npy files: the outputs, a --test set, and a run stopped
// (--max-steps, as on Ctrl-C) and resumed that writes the same weights file byte for byte
// as the uninterrupted run; a checkpoint of another run is refused naming the option.
#include <catch2/catch.hpp>

#include <config.hpp>
#include <driver.hpp>
#include <run.hpp>

#include <hsae/data/npy.hpp>
#include <hsae/data/synthetic.hpp>
#include <hsae/io/safetensors.hpp>
#include <hsae/io/saelens.hpp>
#include <hsae/io/sparsify.hpp>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include "test_util.hpp"

using hsae_train::train_config;
using hsae_train::usage_error;
namespace fs = std::filesystem;

namespace {

train_config parse(std::vector<std::string> args) {
  std::vector<const char*> argv{"hsae-train"};
  for (const auto& a : args) argv.push_back(a.c_str());
  train_config c = hsae_train::parse_command_line(int(argv.size()), argv.data());
  hsae_train::validate(c);
  return c;
}

std::string parse_error(std::vector<std::string> args) {
  return hsae_test::message_of<usage_error>([&] { parse(std::move(args)); });
}

std::string resolve_error(std::vector<std::string> args) {
  return hsae_test::message_of<usage_error>([&] { hsae_train::resolve(parse(std::move(args))); });
}

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream f(p);
  f << s;
}

std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

/// `rows` rows of small synthetic activations (d_model 16) as a float32 .npy file.
void write_rows(const fs::path& p, Eigen::Index rows, std::uint64_t seed) {
  hsae::synthetic_options d;
  d.d_model = 16;
  d.n_atoms = 40;
  d.mean_active = 3;
  d.noise_std = 0.01;
  d.seed = seed;
  hsae::synthetic_source<float> s(d);
  const hsae::row_matrix<float> x = s.next(rows);
  hsae::write_npy(p, x, hsae::npy_dtype::f32);
}

int run_main(std::vector<std::string> args) {
  std::vector<std::string> argv{"hsae-train"};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<const char*> cargv;
  for (const auto& a : argv) cargv.push_back(a.c_str());
  const train_config c = hsae_train::parse_command_line(int(cargv.size()), cargv.data());
  return hsae_train::run(c, nullptr, argv);
}

}  // namespace

TEST_CASE("hsae-train: options on the command line", "[hsae_train]") {
  const train_config c = parse({"a.npy", "--k-max", "64", "--lr=3e-4", "--no-normalize", "--out", "o", "b.npy",
                                "--schedule", "8:1,16:0.5,64:2", "--device", "cpu", "--test", "t1.npy", "t2.npy"});
  CHECK(c.data == std::vector<std::string>{"a.npy", "b.npy"});
  CHECK(c.test == std::vector<std::string>{"t1.npy", "t2.npy"});
  CHECK(c.k_max == 64);
  CHECK(c.lr == 3e-4);
  CHECK_FALSE(c.normalize);
  CHECK(c.was_given("normalize"));
  CHECK_FALSE(c.was_given("d_sae"));
  CHECK(c.schedule == "8:1,16:0.5,64:2");
  CHECK(c.out == "o");

  const train_config s = parse({"--synthetic", "--out", "d", "--no-auxk"});
  CHECK(s.synthetic);
  CHECK_FALSE(s.auxk);
}

TEST_CASE("hsae-train: a bad command line is one message naming the option", "[hsae_train][errors]") {
  using Catch::Contains;
  using Catch::Equals;
  CHECK_THAT(parse_error({"--k-max", "0", "--synthetic", "--out", "o"}),
             Equals("--k-max: 0 is not an integer in [1, 2147483647]"));
  CHECK_THAT(parse_error({"--k-max", "abc"}), Contains("--k-max: 'abc' is not an integer"));
  CHECK_THAT(parse_error({"--k-max"}), Equals("--k-max: needs a value (K)"));
  CHECK_THAT(parse_error({"--lr", "fast"}), Equals("--lr: 'fast' is not a number"));
  CHECK_THAT(parse_error({"--lr", "-1"}), Contains("--lr: -1 is not a number in [0, "));
  CHECK_THAT(parse_error({"--device", "tpu"}), Equals("--device: 'tpu' is not one of cpu | cuda"));
  CHECK_THAT(parse_error({"--dtype", "f64"}), Contains("--dtype: 'f64' is not one of f32 | f16 | bf16"));
  CHECK_THAT(parse_error({"--frobnicate"}), Equals("--frobnicate: unknown option (see --help)"));
  CHECK_THAT(parse_error({"-k", "3"}), Contains("-k: unknown option"));
  CHECK_THAT(parse_error({"--no-lr"}), Contains("--no-lr: unknown option"));
  CHECK_THAT(parse_error({"--resume=yes"}), Equals("--resume: takes no value"));
  CHECK_THAT(parse_error({"--test"}), Equals("--test: needs at least one file"));
  CHECK_THAT(parse_error({"--synthetic", "a.npy", "--out", "o"}), Contains("--synthetic: cannot be combined"));
  CHECK_THAT(parse_error({"--out", "o"}), Contains("--data: no input files"));
  CHECK_THAT(parse_error({"a.npy"}), Equals("--out: required (the output directory)"));
  CHECK_THAT(parse_error({"a.npy", "--out", "o", "--tokens", "64", "--epochs", "4"}),
             Contains("--epochs: give --tokens or --epochs"));
  CHECK_THAT(parse_error({"a.npy", "--out", "o", "--resume"}), Contains("--resume: needs --checkpoint"));
  CHECK_THAT(parse_error({"a.npy", "--out", "o", "--storage", "bf16"}), Contains("--storage: bf16 is a GPU"));
  CHECK_THAT(parse_error({"--synthetic", "--out", "o", "--test", "t.npy"}), Contains("--test: not with --synthetic"));
  CHECK_THAT(parse_error({"--synthetic", "--out", "o", "--epochs", "2"}), Contains("--epochs: the synthetic stream"));
}

TEST_CASE("hsae-train: a JSON config, overridden by the command line", "[hsae_train][config]") {
  hsae_test::temp_dir tmp;
  using Catch::Contains;
  using Catch::Equals;
  const fs::path cfg = tmp / "run.json";
  write_text(cfg, R"({"d_sae": 256, "k_max": 16, "lr": 0.001, "normalize": false, "data": ["x.npy", "y.npy"],
                      "schedule": "topk", "out": "from_file"})");
  const train_config c = parse({"--config", cfg.string(), "--k-max", "8", "--out", "from_cli"});
  CHECK(c.d_sae == 256);
  CHECK(c.k_max == 8);  // the command line wins
  CHECK(c.lr == 0.001);
  CHECK_FALSE(c.normalize);
  CHECK(c.schedule == "topk");
  CHECK(c.out == "from_cli");
  CHECK(c.data == std::vector<std::string>{"x.npy", "y.npy"});
  // Positional files replace the file's list.
  CHECK(parse({"--config", cfg.string(), "z.npy"}).data == std::vector<std::string>{"z.npy"});
  // The config round-trips through to_json.
  const nlohmann::json j = hsae_train::to_json(c);
  CHECK(j["d_sae"] == 256);
  CHECK(j["schedule"] == "topk");
  train_config back;
  hsae_train::apply_json(back, j, "round-trip");
  CHECK(hsae_train::to_json(back) == j);

  const auto with = [&](const std::string& text) {
    write_text(cfg, text);
    return parse_error({"--config", cfg.string()});
  };
  const std::string pre = "config '" + cfg.string() + "': ";
  CHECK_THAT(with(R"({"d_saee": 3})"), Equals(pre + "unknown key \"d_saee\""));
  CHECK_THAT(with(R"({"k-max": 3})"), Contains("(config keys use '_' for '-')"));
  CHECK_THAT(with(R"({"k_max": "64"})"), Equals(pre + "key \"k_max\": \"64\" is not an integer in [1, 2147483647]"));
  CHECK_THAT(with(R"({"k_max": 2.5})"), Contains("key \"k_max\": 2.5 is not an integer"));
  // 2^64 - 1 is refused, not read back as -1 (which means "default" for warmup_steps).
  CHECK_THAT(with(R"({"warmup_steps": 18446744073709551615})"),
             Contains("key \"warmup_steps\": 18446744073709551615 is not an integer"));
  CHECK_THAT(with(R"({"lr": "x"})"), Equals(pre + "key \"lr\": \"x\" is not a number"));
  CHECK_THAT(with(R"({"normalize": 1})"), Equals(pre + "key \"normalize\": 1 is not true or false"));
  CHECK_THAT(with(R"({"data": [1]})"), Contains("key \"data\": [1] is not a list of strings"));
  CHECK_THAT(with(R"({"format": "onnx"})"), Contains("key \"format\": 'onnx' is not one of saelens | sparsify"));
  CHECK_THAT(with(R"({"config": "other.json"})"), Contains("unknown key \"config\""));
  CHECK_THAT(with(R"([1, 2])"), Contains("not a JSON object"));
  CHECK_THAT(with(R"({"k_max": )"), Contains(pre + "not valid JSON"));
  CHECK_THAT(parse_error({"--config", (tmp / "missing.json").string()}), Contains("--config: cannot read"));
}

TEST_CASE("hsae-train: inputs, schedules and defaults resolved against the data", "[hsae_train][resolve]") {
  hsae_test::temp_dir tmp;
  using Catch::Contains;
  using Catch::Equals;
  fs::create_directories(tmp / "acts");
  write_rows(tmp / "acts" / "b.npy", 300, 2);
  write_rows(tmp / "acts" / "a.npy", 500, 1);
  const std::string dir = (tmp / "acts").string(), out = (tmp / "out").string();

  SECTION("globs and directories expand sorted; a glob matching nothing is an error naming it") {
    const auto g = hsae_train::expand_inputs({dir + "/*.npy"}, "--data");
    REQUIRE(g.files.size() == 2);
    CHECK(g.files[0].filename() == "a.npy");
    CHECK(g.rows == 800);
    CHECK(g.d_model == 16);
    const auto d = hsae_train::expand_inputs({dir}, "--data");
    CHECK(d.files == g.files);
    CHECK_THAT(hsae_test::message_of<usage_error>([&] { hsae_train::expand_inputs({dir + "/*.bin"}, "--data"); }),
               Equals("--data: '" + dir + "/*.bin' matches no file"));
    CHECK_THAT(hsae_test::message_of<usage_error>([&] { hsae_train::expand_inputs({dir + "/c.npy"}, "--test"); }),
               Equals("--test: '" + dir + "/c.npy' does not exist"));
    write_text(tmp / "bad.npy", "not an npy file");
    CHECK_THAT(hsae_test::message_of<usage_error>(
                   [&] { hsae_train::expand_inputs({(tmp / "bad.npy").string()}, "--data"); }),
               Contains("--data: hsae: npy file"));
  }
  SECTION("safetensors files: the only tensor, or the one --tensor names") {
    hsae::synthetic_options d;
    d.d_model = 16;
    d.n_atoms = 40;
    hsae::synthetic_source<float> src(d);
    const hsae::row_matrix<float> x = src.next(300), y = src.next(300);
    hsae::safetensors_writer w;
    w.add("activations", x);
    w.write(tmp / "one.safetensors");
    hsae::safetensors_writer w2;
    w2.add("resid", x);
    w2.add("mlp", y, hsae::safetensors_dtype::f16);
    w2.write(tmp / "two.safetensors");
    const auto one = hsae_train::expand_inputs({(tmp / "one.safetensors").string()}, "--data");
    CHECK(one.rows == 300);
    CHECK(one.d_model == 16);
    CHECK(hsae_train::expand_inputs({(tmp / "two.safetensors").string()}, "--data", "mlp").rows == 300);
    CHECK_THAT(hsae_test::message_of<usage_error>(
                   [&] { hsae_train::expand_inputs({(tmp / "two.safetensors").string()}, "--data"); }),
               Contains("--data: ") && Contains("mlp") && Contains("resid"));
    const fs::path o = tmp / "st_out";
    const std::vector<std::string> args{"hsae-train", (tmp / "two.safetensors").string(), "--tensor", "mlp",
                                        "--d-sae", "32", "--k-max", "4", "--batch", "50", "--out", o.string()};
    std::vector<const char*> cargv;
    for (const auto& a : args) cargv.push_back(a.c_str());
    REQUIRE(hsae_train::run(hsae_train::parse_command_line(int(cargv.size()), cargv.data()), nullptr, args) == 0);
    CHECK(hsae::load_saelens<float>(o).model.d_model() == 16);
  }
  SECTION("activations.json lists the shards and names the model and hook") {
    write_text(tmp / "acts" / "activations.json",
               R"({"model_name": "tiny-gpt", "hook_name": "blocks.3.hook_resid_post", "layer": 3, "d_model": 16,
                   "dtype": "float32", "tokens": 500, "shards": [{"file": "a.npy", "rows": 500}]})");
    const auto p = hsae_train::resolve(parse({dir, "--out", out}));
    REQUIRE(p.train.files.size() == 1);
    CHECK(p.train.rows == 500);
    CHECK(p.cfg.model_name == "tiny-gpt");
    CHECK(p.cfg.hook_name == "blocks.3.hook_resid_post");
    CHECK(parse({dir, "--out", out, "--hook-name", "mine"}).hook_name == "mine");
  }
  SECTION("defaults: 16 x d_model, the library's lr rule, one epoch, a quarter of the rows held out at most") {
    const auto p = hsae_train::resolve(parse({dir, "--out", out}));
    CHECK(p.cfg.d_sae == 256);
    CHECK(p.cfg.lr == Approx(2e-4 / std::sqrt(256.0 / 16384.0)));
    CHECK(p.cfg.held_out_rows == 200);  // a quarter of 800 rows
    CHECK(p.eval_rows == 200);
    CHECK(p.train_rows == 600);  // the last 200 rows by position are held out
    CHECK(p.cfg.tokens == 600);  // one epoch of the training rows
    CHECK_THAT(p.held_out_text, Equals("the last 200 rows of the data by position (rows 600..799 of the files in "
                                       "the order given; never trained on)"));
    CHECK(p.cfg.normalize);
    CHECK(p.schedule.size() == 32);
    CHECK(p.resolved["steps"] == 1);
    CHECK(p.resolved["data"].size() == 2);
    const auto q = hsae_train::resolve(parse({dir, "--out", out, "--expansion", "2", "--epochs", "2.5"}));
    CHECK(q.cfg.d_sae == 32);
    CHECK(q.cfg.tokens == 1500);
  }
  SECTION("the resolved config (hsae_train_config.json) is a --config that resolves to itself") {
    const auto p = hsae_train::resolve(parse({dir, "--out", out, "--expansion", "2", "--schedule", "4:1,8:2"}));
    write_text(tmp / "resolved.json", p.resolved.dump());
    const auto q = hsae_train::resolve(parse({"--config", (tmp / "resolved.json").string()}));
    CHECK(q.resolved == p.resolved);
  }
  SECTION("schedules") {
    const auto list = hsae_train::resolve(parse({dir, "--out", out, "--schedule", "8:1,16:0.5,64:2"}));
    CHECK(list.schedule.levels() == std::vector<hsae::schedule_level>{{8, 1.0}, {16, 0.5}, {64, 2.0}});
    CHECK(list.cfg.k_max == 64);
    const auto mt = hsae_train::resolve(parse({dir, "--out", out, "--schedule", "multi-topk", "--k-max", "16"}));
    CHECK(mt.schedule.levels() == std::vector<hsae::schedule_level>{{4, 1.0}, {16, 0.125}});
    CHECK(hsae_train::resolve(parse({dir, "--out", out, "--schedule", "geometric", "--k-max", "12"})).schedule.size() ==
          5);  // 1 2 4 8 12
    CHECK(hsae_train::resolve(parse({dir, "--out", out, "--schedule", "topk"})).schedule.size() == 1);
    CHECK_THAT(resolve_error({dir, "--out", out, "--schedule", "multi-topk", "--k-max", "30"}),
               Contains("--schedule: multi-topk trains k = K/4 and K: --k-max 30 is not a multiple of 4"));
    CHECK_THAT(resolve_error({dir, "--out", out, "--schedule", "8:1,x"}), Contains("--schedule: '8:1,x': 'x' is not"));
    CHECK_THAT(resolve_error({dir, "--out", out, "--schedule", "8:0"}), Contains("the weight in '8:0'"));
    CHECK_THAT(resolve_error({dir, "--out", out, "--schedule", "16,8"}), Contains("--schedule: '16,8': "));
    CHECK_THAT(resolve_error({dir, "--out", out, "--schedule", "8,16", "--k-max", "32"}),
               Contains("--schedule: the list ends at k=16 but --k-max is 32"));
  }
  SECTION("combinations the data rules out") {
    CHECK_THAT(resolve_error({dir, "--out", out, "--d-sae", "64", "--k-max", "100"}),
               Equals("--k-max: 100 is not an integer in [1, 64] (d_sae)"));
    CHECK_THAT(resolve_error({dir, "--out", out, "--d-sae", "64", "--expansion", "2"}),
               Equals("--expansion: 2 x d_model 16 = 32 disagrees with --d-sae 64 (give one of them)"));
    CHECK_THAT(resolve_error({dir, "--out", out, "--decay-steps", "5"}), Contains("--decay-steps: 5 is more than"));
    CHECK_THAT(resolve_error({dir, "--out", out, "--test", (tmp / "none.npy").string()}),
               Contains("--test: '" + (tmp / "none.npy").string() + "' does not exist"));
#if !defined(HSAE_TRAIN_WITH_CUDA)
    CHECK_THAT(resolve_error({dir, "--out", out, "--device", "cuda"}), Contains("built without CUDA"));
#endif
    fs::create_directories(tmp / "out" / "sub");
    CHECK_THAT(resolve_error({dir, "--out", out}), Contains("--out: '" + out + "' holds the subdirectory 'sub'"));
    CHECK_THAT(resolve_error({dir, "--out", (tmp / "o2").string(), "--checkpoint", (tmp / "c.ckpt").string(),
                              "--resume"}),
               Contains("--resume: the checkpoint '" + (tmp / "c.ckpt").string() + "' does not exist"));
    // Held-out rows must not be training rows: a --test file that is also a --data file, or
    // a file given twice.
    fs::remove_all(tmp / "out" / "sub");
    const std::string first = (fs::path(dir) / "a.npy").string();
    CHECK_THAT(resolve_error({dir, "--out", out, "--test", first}),
               Equals("--test: '" + first + "' is also a training file (--data): its rows would be trained on"));
    CHECK_THAT(resolve_error({dir, first, "--out", out}), Contains("' is the same file as '"));
    // A checkpoint is never replaced by a fresh run, nor named like an output.
    write_text(tmp / "old.ckpt", "x");
    CHECK_THAT(resolve_error({dir, "--out", out, "--checkpoint", (tmp / "old.ckpt").string()}),
               Contains("exists: continue its run with --resume"));
    CHECK_THAT(resolve_error({dir, "--out", out, "--checkpoint", (fs::path(out) / "cfg.json").string()}),
               Contains("is the name of one of hsae-train's outputs in --out"));
  }
}

TEST_CASE("hsae-train: the held-out rows (the last H by position) are never in the training stream",
          "[hsae_train][held_out]") {
  hsae_test::temp_dir tmp;
  // Three files of 700, 500 and 800 rows; column 0 holds the row's global index.
  std::int64_t next = 0;
  for (const auto& [name, rows] : std::vector<std::pair<std::string, int>>{{"a.npy", 700}, {"b.npy", 500}, {"c.npy", 800}}) {
    hsae::row_matrix<float> x = hsae::row_matrix<float>::Random(rows, 4);
    for (int r = 0; r < rows; ++r) x(r, 0) = float(next++);
    hsae::write_npy(tmp / name, x, hsae::npy_dtype::f32);
  }
  const std::string glob = (tmp / "*.npy").string();
  const auto p = hsae_train::resolve(
      parse({glob, "--out", (tmp / "o").string(), "--held-out-rows", "300", "--shuffle-chunk", "64",
             "--shuffle-buffer", "256"}));
  REQUIRE(p.eval_rows == 300);
  REQUIRE(p.train_rows == 1700);
  hsae::file_source<float> train(p.train.files, hsae_train::train_source_options(p));
  hsae::file_source<float> held(hsae_train::held_out_files(p), hsae_train::held_out_source_options(p));
  // The held-out source serves rows 1700..1999 in order.
  const hsae::row_matrix<float> h = held.next(300);
  for (int r = 0; r < 300; ++r) REQUIRE(h(r, 0) == float(1700 + r));
  // Three epochs of training rows: each of rows 0..1699 once per epoch, never a held-out one.
  for (int epoch = 0; epoch < 3; ++epoch) {
    const hsae::row_matrix<float> x = train.next(1700);
    std::set<int> seen;
    for (int r = 0; r < 1700; ++r) {
      const int i = int(x(r, 0));
      REQUIRE(i < 1700);
      seen.insert(i);
    }
    CHECK(seen.size() == 1700);
  }
}

TEST_CASE("hsae-train: a run on .npy files writes the SAE and its report; resume is bitwise", "[hsae_train][run]") {
  hsae_test::temp_dir tmp;
  write_rows(tmp / "train_a.npy", 1500, 3);
  write_rows(tmp / "train_b.npy", 1100, 4);
  write_rows(tmp / "test.npy", 400, 5);
  const std::vector<std::string> common{(tmp / "train_*.npy").string(), "--d-sae", "64", "--k-max", "8",
                                        "--batch", "100", "--tokens", "3000", "--shuffle-buffer", "700",
                                        "--log-every", "10", "--hook-name", "blocks.0.hook_resid_post"};
  const auto with = [&](std::vector<std::string> more) {
    std::vector<std::string> a = common;
    a.insert(a.end(), more.begin(), more.end());
    return a;
  };

  const fs::path full = tmp / "full";
  REQUIRE(run_main(with({"--out", full.string()})) == 0);
  for (const char* f : {"cfg.json", "sae_weights.safetensors", "report.md", "metrics.jsonl", "hsae_train_config.json",
                        "fvu_vs_k.csv"})
    CHECK(fs::exists(full / f));
  const auto l = hsae::load_saelens<float>(full);
  CHECK(l.model.d_model() == 16);
  CHECK(l.model.d_sae() == 64);
  CHECK(l.k == 8);
  CHECK(l.metadata["hook_name"] == "blocks.0.hook_resid_post");
  CHECK(l.metadata["d_in"] == 16);
  CHECK(l.metadata["hsae_tokens_trained"] == 3000);
  CHECK(l.metadata["hsae_final_fvu"].size() == 8);
  CHECK(l.metadata["hsae_input_scale"].get<double>() != 1.0);  // normalised by default, folded
  const std::string report = read_bytes(full / "report.md");
  CHECK_THAT(report, Catch::Contains("the last 650 rows of the data by position (rows 1950..2599"));
  CHECK_THAT(report, Catch::Contains("| k | FVU | explained variance | MSE (input units) | L0 |"));

  SECTION("stopped by --max-steps (as on Ctrl-C) and resumed: the same weights file, byte for byte") {
    const fs::path part = tmp / "part", ckpt = tmp / "run.ckpt";
    REQUIRE(run_main(with({"--out", part.string(), "--checkpoint", ckpt.string(), "--max-steps", "13"})) == 0);
    CHECK(fs::exists(ckpt));
    CHECK_FALSE(fs::exists(part / "sae_weights.safetensors"));
    // Another run's options are refused, naming what differs.
    const std::string msg = hsae_test::message_of<hsae::io_error>([&] {
      run_main(with({"--out", part.string(), "--checkpoint", ckpt.string(), "--resume", "--lr", "0.01"}));
    });
    CHECK_THAT(msg, Catch::Contains("it belongs to another run (lr was "));
    // The refused resume left the run's config alone, and it repeats the run from the start.
    const auto saved = nlohmann::json::parse(read_bytes(part / "hsae_train_config.json"));
    CHECK(saved["lr"] != 0.01);
    CHECK(saved["resume"] == false);
    CHECK(saved["max_steps"] == 0);
    // --max-steps at or below the steps done is refused rather than taking one more step.
    CHECK_THAT(hsae_test::message_of<usage_error>([&] {
                 run_main(with({"--out", part.string(), "--checkpoint", ckpt.string(), "--resume", "--max-steps", "13"}));
               }),
               Catch::Contains("--max-steps: 13 steps are done already"));
    REQUIRE(run_main(with({"--out", part.string(), "--checkpoint", ckpt.string(), "--resume"})) == 0);
    CHECK(read_bytes(part / "sae_weights.safetensors") == read_bytes(full / "sae_weights.safetensors"));
  }
  SECTION("--test files are the held-out rows; sparsify layout in bf16") {
    const fs::path o = tmp / "with_test";
    REQUIRE(run_main(with({"--out", o.string(), "--test", (tmp / "test.npy").string(), "--format", "sparsify",
                           "--dtype", "bf16", "--eval-every", "10"})) == 0);
    // Every evaluation (steps 10, 20 and the end) on the 400 test rows.
    std::ifstream m(o / "metrics.jsonl");
    int evals = 0;
    for (std::string line; std::getline(m, line);) {
      const auto j = nlohmann::json::parse(line);
      if (j["type"] == "eval") {
        ++evals;
        CHECK(j["rows"] == 400);
      }
    }
    CHECK(evals == 3);
    const auto s = hsae::load_sparsify<float>(o);
    CHECK(s.storage_dtype == hsae::safetensors_dtype::bf16);
    CHECK_THAT(read_bytes(o / "report.md"), Catch::Contains("400 rows of the --test files (never trained on)"));
  }
}
