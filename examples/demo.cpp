// SPDX-License-Identifier: Apache-2.0
// The demo: train one HierarchicalTopK SAE on synthetic activations with a known,
// hierarchical dictionary (power-law feature frequencies; every parent feature has
// children that only fire with it), then report, for every k of the schedule, how well
// that single model reconstructs held-out data using only its top-k latents, and how
// well it recovered the true features.
//
// The held-out rows are the first rows of the synthetic stream, which never repeats, so
// they are never trained on. `--dump-npy FILE ROWS` writes ROWS rows of the synthetic
// data as a .npy file and exits: input for hsae-train (tools/hsae_train), the program
// that trains on activation files.
//
//   hsae_demo [--tokens N] [--d-sae F] [--batch B] [--threads T] [--metrics FILE] [--seed S]
//             [--dump-npy FILE ROWS]
#include <hsae/hsae.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

[[noreturn]] void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--tokens N] [--d-sae F] [--batch B] [--threads T] [--metrics FILE] [--seed S]\n"
               "          [--dump-npy FILE ROWS]\n"
               "  --tokens   training tokens (default 4000000)\n"
               "  --d-sae    dictionary width (default 2048)\n"
               "  --batch    rows per step (default 2048)\n"
               "  --threads  CPU threads (default: all)\n"
               "  --metrics  write JSON-lines metrics to FILE\n"
               "  --seed     data and init seed (default 1)\n"
               "  --dump-npy write ROWS rows of the synthetic data to FILE (.npy, float32) and exit\n",
               argv0);
  std::exit(2);
}

std::int64_t parse_int(const char* s, const char* argv0) {
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (!end || *end != '\0' || v < 0) usage(argv0);
  return v;
}

/// Prints the held-out sparsity-fidelity table of a trained model.
void print_table(const hsae::evaluation& ev) {
  std::printf("\nsparsity-fidelity on %lld held-out rows (the first rows of the synthetic stream, which never "
              "repeats: never trained on): one model, the top-k prefix of its code at every k\n",
              (long long)ev.rows);
  std::printf("%5s %9s %10s %11s %7s\n", "k", "FVU", "expl.var", "MSE", "L0");
  for (const auto& l : ev.levels)
    std::printf("%5d %9.4f %9.2f%% %11.3e %7.2f\n", l.k, l.fvu, 100.0 * l.explained_variance(), l.mse, l.l0);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace hsae;
  using T = float;
  constexpr int K = 32;
  using schedule = all_prefixes<K>;  // the paper's objective: the mean MSE of every prefix 1..K

  std::int64_t tokens = 4'000'000, d_sae = 2048, batch = 2048, threads = 0, seed = 1, dump_rows = 0;
  std::string metrics, dump_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) usage(argv[0]);
    if (a == "--tokens") tokens = parse_int(argv[++i], argv[0]);
    else if (a == "--d-sae") d_sae = parse_int(argv[++i], argv[0]);
    else if (a == "--batch") batch = parse_int(argv[++i], argv[0]);
    else if (a == "--threads") threads = parse_int(argv[++i], argv[0]);
    else if (a == "--metrics") metrics = argv[++i];
    else if (a == "--seed") seed = parse_int(argv[++i], argv[0]);
    else if (a == "--dump-npy") {
      if (i + 2 >= argc) usage(argv[0]);
      dump_path = argv[++i];
      dump_rows = parse_int(argv[++i], argv[0]);
    } else usage(argv[0]);
  }

  try {
    cpu_backend be;
    be.num_threads = int(threads);

    const synthetic_options data = synthetic_options::demo(std::uint64_t(seed));
    synthetic_source<T> src(data, be);

    if (!dump_path.empty()) {
      const row_matrix<T> rows = src.next(Eigen::Index(dump_rows));
      const std::int64_t shape[2] = {std::int64_t(rows.rows()), std::int64_t(rows.cols())};
      write_npy(dump_path, rows.data(), shape);
      std::printf("wrote %lld synthetic rows of d_model=%d to %s\n", (long long)rows.rows(), data.d_model,
                  dump_path.c_str());
      return 0;
    }

    trainer_options opt;
    opt.batch_size = batch;
    opt.total_tokens = tokens;
    opt.eval_rows = 16384;
    opt.init_rows = 8192;
    opt.init.seed = std::uint64_t(seed);
    opt.adam.lr = 1e-3;
    opt.adam.warmup_steps = 100;
    opt.adam.decay_steps = opt.steps() / 5;
    opt.dead_after_tokens = 500'000;
    opt.log_every_steps = 100;
    opt.metrics_path = metrics;

    std::printf("hsae %s demo: HierarchicalTopK SAE, all prefixes 1..%d\n", version_string, K);

    std::printf("data: synthetic, d_model=%d, %d true features (%d parents x %d children each), "
                "power-law frequencies, %.1f active parents per row on average\n",
                data.d_model, data.total_atoms(), data.n_atoms, data.children_per_atom, data.mean_active);
    std::printf("model: d_sae=%lld, batch %lld, %lld tokens (%lld steps), %d threads\n\n", (long long)d_sae,
                (long long)batch, (long long)tokens, (long long)opt.steps(), be.threads());
    std::fflush(stdout);

    trainer tr(be, sae<T>(data.d_model, int(d_sae)), schedule{}, opt);
    const train_summary sum = tr.fit(src);

    std::printf("\ntrained in %.1f s (%.0f tokens/s)\n", sum.seconds, sum.tokens_per_second);
    print_table(sum.eval);

    const std::vector<double> best = best_cosines<T>(be, tr.model().W_dec, src.atoms());
    double parents = 0, children = 0;
    int parents_found = 0, children_found = 0;
    for (int j = 0; j < data.total_atoms(); ++j) {
      const bool root = src.parent(j) < 0;
      (root ? parents : children) += best[std::size_t(j)];
      (root ? parents_found : children_found) += best[std::size_t(j)] > 0.9;
    }
    const int n_children = data.total_atoms() - data.n_atoms;
    std::printf("\ndictionary recovery (best cosine of each true feature with a decoder row):\n");
    std::printf("  parents : mean %.3f, %d of %d above 0.9\n", parents / data.n_atoms, parents_found, data.n_atoms);
    std::printf("  children: mean %.3f, %d of %d above 0.9\n", children / n_children, children_found, n_children);
    std::printf("  all     : mean max cosine %.3f\n", (parents + children) / data.total_atoms());
    std::printf("dead latents: %.1f%% of %lld\n", 100.0 * tr.dead_latents().dead_fraction(), (long long)d_sae);
    if (!metrics.empty()) std::printf("metrics: %s (JSON lines)\n", metrics.c_str());
    return 0;
  } catch (const hsae::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
