// SPDX-License-Identifier: Apache-2.0
// Quickstart: train a HierarchicalTopK SAE on synthetic activations drawn from a known
// dictionary, then print the sparsity-fidelity table (FVU, MSE and L0 at every k of a
// ladder, all from the one model) and how well the true atoms were recovered.
//
//   ./00_quickstart [steps]
#include <hsae/hsae.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  using namespace hsae;
  using T = float;
  constexpr int K = 32;                  // k_max: the model serves every k <= 32
  using schedule = all_prefixes<K>;      // the paper's objective: every prefix 1..K
  const int steps = argc > 1 ? std::atoi(argv[1]) : 1500;
  const int batch = 512;

  const cpu_backend be;
  synthetic_options data;
  data.d_model = 64;
  data.n_atoms = 256;
  data.mean_active = 8;
  data.zipf_exponent = 0.6;
  data.noise_std = 0.01;
  data.seed = 1;
  synthetic_source<T> src(data);

  sae<T> model(data.d_model, 512);
  init(be, model, src.next(2048), {.seed = 0});
  adam_options ao;
  ao.lr = 2e-3;
  ao.warmup_steps = 100;
  ao.total_steps = steps;
  ao.decay_steps = steps / 5;
  adam<T> opt(model, ao);
  dead_latent_tracker dead(model.d_sae(), std::int64_t(batch) * 200);
  train_workspace<T> ws;
  row_matrix<T> x;

  std::printf("hsae %s | HierarchicalTopK, all prefixes 1..%d | d_model=%d d_sae=%d | batch %d, %d steps\n",
              version_string, K, model.d_model(), model.d_sae(), batch, steps);
  const auto t0 = std::chrono::steady_clock::now();
  for (int step = 0; step < steps; ++step) {
    src.next(batch, x);
    const step_stats st = train_step(be, model, opt, dead, x, schedule{}, ws);
    if (step % 250 == 0 || step + 1 == steps) {
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("step %5d | loss %.5f | aux %.4f | MSE@%d %.5f | dead %5.1f%% | lr %.2e | %6.0f tok/s\n", step,
                  st.loss, st.aux_loss, K, st.levels.mse(st.levels.level_sse.size() - 1),
                  100.0 * double(st.dead) / model.d_sae(), st.lr, double(step + 1) * batch / secs);
    }
  }

  // Evaluation on fresh data: one encode at K, every k is a prefix of the same code.
  const row_matrix<T> xe = src.next(8192);
  sparse_code<T> code;
  row_matrix<T> pre;
  encode(be, model, xe, K, code, pre);
  const auto ladder = dynamic_k_schedule::subset({1, 2, 4, 8, 16, 32});
  loss_workspace<T> lw;
  const loss_stats ev = hierarchical_loss(be, model, xe, code, ladder, lw);
  const double total_var = (xe.rowwise() - xe.colwise().mean()).squaredNorm();

  std::printf("\nsparsity-fidelity on %lld held-out rows (one model, every k a prefix of its top-%d code)\n",
              (long long)xe.rows(), K);
  std::printf("%6s %10s %10s %10s %8s\n", "k", "FVU", "expl.var", "MSE", "L0");
  for (std::size_t l = 0; l < ladder.size(); ++l) {
    const int k = ladder.k(l);
    const double l0 = (code.values.leftCols(k).array() > T(0)).template cast<double>().sum() / double(xe.rows());
    const double fvu = ev.level_sse[l] / total_var;
    std::printf("%6d %10.4f %10.4f %10.6f %8.2f\n", k, fvu, 1.0 - fvu, ev.mse(l), l0);
  }
  std::printf("\ndictionary recovery: mean max cosine similarity to the %d true atoms = %.4f\n", data.n_atoms,
              mean_max_cosine<T>(be, model.W_dec, src.atoms()));
  std::printf("dead latents: %lld of %d\n", (long long)dead.num_dead(), model.d_sae());
  return 0;
}
