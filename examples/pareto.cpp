// SPDX-License-Identifier: Apache-2.0
// The paper's claim on your data: one HierarchicalTopK SAE trained at K against plain
// TopK SAEs trained separately at each k of a list (same tokens per model), and
// against the TopK SAE trained at K read at smaller k ("truncated"). Every model is
// evaluated on the same held-out rows at every k in 1..K.
//
// Writes, into --out (default ./pareto):
//   pareto.csv   one row per (model, k): L0, FVU, MSE
//   pareto.md    the comparison table at the listed k
//   pareto.png   FVU against L0, one curve per model (gnuplot; skipped with a note
//                when gnuplot is not installed, --no-plot skips it always)
//
//   hsae_pareto [--k-max K] [--ks 4,8,16] [--tokens N] [--d-sae F] [--batch B]
//               [--threads T] [--seed S] [--out DIR] [--npy FILE]... [--no-plot]
#include <hsae/hsae.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

[[noreturn]] void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--k-max K] [--ks 4,8,16] [--tokens N] [--d-sae F] [--batch B] [--threads T]\n"
               "          [--seed S] [--out DIR] [--npy FILE]... [--no-plot]\n"
               "  --k-max    K of the HierarchicalTopK model (default 32)\n"
               "  --ks       k of the separately trained TopK SAEs (default K/8,K/4,K/2; K is always added)\n"
               "  --tokens   training tokens per model (default 2000000)\n"
               "  --d-sae    dictionary width (default 2048)\n"
               "  --batch    rows per step (default 2048)\n"
               "  --threads  CPU threads (default: all)\n"
               "  --seed     data and init seed (default 1)\n"
               "  --out      output directory (default ./pareto)\n"
               "  --npy      train on activations from .npy files instead of the synthetic data\n"
               "  --no-plot  do not call gnuplot\n",
               argv0);
  std::exit(2);
}

std::int64_t parse_int(const char* s, const char* argv0) {
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (!end || *end != '\0' || v < 0) usage(argv0);
  return v;
}

std::vector<int> parse_list(const std::string& s, const char* argv0) {
  std::vector<int> v;
  std::size_t pos = 0;
  while (pos <= s.size()) {
    const std::size_t comma = std::min(s.find(',', pos), s.size());
    v.push_back(int(parse_int(s.substr(pos, comma - pos).c_str(), argv0)));
    pos = comma + 1;
  }
  return v;
}

/// FVU against L0: the hierarchical model and the TopK SAE trained at K (truncated)
/// as curves over k = 1..K; each separately trained TopK SAE as a point at its own k
/// (the CSV columns: model,hierarchical,trained_k,k,l0,fvu,mse).
void write_plot_script(const std::filesystem::path& script, const std::filesystem::path& csv,
                       const std::filesystem::path& png, const hsae::pareto_result& r) {
  std::ofstream f(script);
  f << "set terminal pngcairo size 900,600 noenhanced\n"
    << "set output '" << png.string() << "'\n"
    << "set datafile separator ','\n"
    << "set title 'Sparsity-fidelity: HierarchicalTopK vs TopK (" << r.tokens_per_model << " tokens per model)'\n"
    << "set xlabel 'L0 (active latents per row)'\nset ylabel 'FVU on " << r.held_out_rows << " held-out rows'\n"
    << "set logscale y\nset grid\nset key top right\n";
  const std::string file = "'" + csv.string() + "' skip 1 using ";
  f << "plot " << file << "($2 == 1 ? $5 : 1/0):6 with linespoints lw 3 pt 7 ps 0.6 title 'HierarchicalTopK K="
    << r.k_max << " (one model, every k)', \\\n     " << file << "(($2 == 0 && $3 == " << r.k_max
    << ") ? $5 : 1/0):6 with linespoints lw 2 dt 2 pt 6 ps 0.6 title 'TopK K=" << r.k_max
    << " truncated to k', \\\n     " << file
    << "(($2 == 0 && $3 == $4) ? $5 : 1/0):6 with points pt 5 ps 1.6 lc rgb 'black' "
       "title 'TopK trained at each k'\n";
}

}  // namespace

int main(int argc, char** argv) {
  using namespace hsae;
  using T = float;
  std::int64_t k_max = 32, tokens = 2'000'000, d_sae = 2048, batch = 2048, threads = 0, seed = 1;
  std::string ks_text, out = "pareto";
  std::vector<std::filesystem::path> npy_files;
  bool plot = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--no-plot") {
      plot = false;
      continue;
    }
    if (i + 1 >= argc) usage(argv[0]);
    if (a == "--k-max") k_max = parse_int(argv[++i], argv[0]);
    else if (a == "--ks") ks_text = argv[++i];
    else if (a == "--tokens") tokens = parse_int(argv[++i], argv[0]);
    else if (a == "--d-sae") d_sae = parse_int(argv[++i], argv[0]);
    else if (a == "--batch") batch = parse_int(argv[++i], argv[0]);
    else if (a == "--threads") threads = parse_int(argv[++i], argv[0]);
    else if (a == "--seed") seed = parse_int(argv[++i], argv[0]);
    else if (a == "--out") out = argv[++i];
    else if (a == "--npy") npy_files.emplace_back(argv[++i]);
    else usage(argv[0]);
  }

  try {
    cpu_backend be;
    be.num_threads = int(threads);

    pareto_options o;
    o.d_sae = int(d_sae);
    o.k_max = int(k_max);
    o.ks = ks_text.empty() ? std::vector<int>{int(k_max / 8), int(k_max / 4), int(k_max / 2)}
                           : parse_list(ks_text, argv[0]);
    o.ks.erase(std::remove(o.ks.begin(), o.ks.end(), 0), o.ks.end());
    o.train.batch_size = batch;
    o.train.total_tokens = tokens;
    o.train.eval_rows = 16384;
    o.train.init_rows = 8192;
    o.train.init.seed = std::uint64_t(seed);
    o.train.adam.lr = 1e-3;
    o.train.adam.warmup_steps = 100;
    o.train.adam.decay_steps = o.train.steps() / 5;
    o.train.dead_after_tokens = 500'000;
    o.train.progress = progress_mode::never;

    const synthetic_options data = synthetic_options::demo(std::uint64_t(seed));

    const std::vector<int> levels = o.levels();
    std::printf("hsae %s: HierarchicalTopK K=%d against TopK at k =", version_string, o.k_max);
    for (int k : levels) std::printf(" %d", k);
    std::printf("\n%lld tokens per model, d_sae=%d, %d threads, data: %s\n\n", (long long)tokens, o.d_sae,
                be.threads(),
                npy_files.empty() ? "synthetic hierarchical (as hsae_demo)" : ".npy activations");
    std::fflush(stdout);
    auto report = [](const pareto_model& m) {
      std::printf("  trained %-24s in %6.1f s: FVU at its k %.4f\n", m.name.c_str(), m.seconds, m.at(m.trained_k).fvu);
      std::fflush(stdout);
    };

    pareto_result res;
    if (npy_files.empty()) {
      // An endless stream that never repeats: its first eval_rows rows are never trained on.
      o.held_out_note = "the first rows of the synthetic stream, which never repeats: never trained on";
      res = pareto_study<T>(be, [&] { return synthetic_source<T>(data, be); }, o, report);
    } else {
      // Files repeat each epoch: the held-out rows are the last eval_rows rows of the
      // files (in the order given) by position, outside the training source's range.
      file_source_options train;
      train.seed = std::uint64_t(seed);
      const std::int64_t n = file_source<T>(npy_files, train).rows_total();
      o.train.eval_rows = std::min<std::int64_t>(o.train.eval_rows, n / 4);
      o.train.init_rows = std::max<std::int64_t>(1, std::min<std::int64_t>(o.train.init_rows, n / 4));
      detail::expects<config_error>(o.train.eval_rows >= 1, "hsae_pareto: the files hold ", n,
                                    " rows, too few to hold any out");
      train.row_end = n - o.train.eval_rows;
      file_source_options held = train;
      held.row_begin = n - o.train.eval_rows;
      held.row_end = -1;
      held.shuffle_buffer_rows = 0;
      o.train.normalize_inputs = true;
      o.held_out_note = detail::concat("the last ", o.train.eval_rows, " of the ", n,
                                       " rows of the files by position, never trained on");
      res = pareto_study<T>(
          be, [&] { return file_source<T>(npy_files, train); }, [&] { return file_source<T>(npy_files, held); }, o,
          report);
    }

    std::filesystem::create_directories(out);
    const std::filesystem::path dir(out), csv = dir / "pareto.csv", md = dir / "pareto.md", png = dir / "pareto.png";
    write_pareto_csv(csv, res);
    const std::string table = pareto_markdown(res);
    detail::write_file_atomically(md, detail::concat("# HierarchicalTopK K=", o.k_max, " vs TopK SAEs\n\n", table),
                                  "hsae_pareto: table");
    std::printf("\n%s\n", table.c_str());
    std::printf("wrote %s and %s\n", csv.string().c_str(), md.string().c_str());
    if (plot) {
      const std::filesystem::path script = dir / "pareto.gp";
      write_plot_script(script, csv, png, res);
      if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
        std::printf("gnuplot not found: plot script left in %s (apt-get install gnuplot-nox)\n",
                    script.string().c_str());
      } else if (std::system(("gnuplot '" + script.string() + "'").c_str()) != 0) {
        std::fprintf(stderr, "gnuplot failed on %s\n", script.string().c_str());
        return 1;
      } else {
        std::printf("wrote %s\n", png.string().c_str());
      }
    }
    return 0;
  } catch (const hsae::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
