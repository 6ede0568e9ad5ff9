// SPDX-License-Identifier: Apache-2.0
// Consumer of the installed package: trains a small SAE with hsae::train_step and checks
// that the loss falls by at least 30 % in 400 steps.
#include <hsae/hsae.hpp>

#include <cstdio>

int main() {
  using namespace hsae;
  using T = float;
  const cpu_backend be;
  synthetic_options data;
  data.d_model = 16;
  data.n_atoms = 64;
  data.mean_active = 4;
  data.seed = 3;
  synthetic_source<T> src(data);

  sae<T> model(data.d_model, 128);
  row_matrix<T> x;
  src.next(256, x);
  init(be, model, x);

  adam<T> opt(model, adam_options{.lr = 2e-3});
  dead_latent_tracker dead(model.d_sae());
  train_workspace<T> ws;
  const all_prefixes<8> schedule;
  double first = 0, last = 0;
  for (int step = 0; step < 400; ++step) {
    src.next(256, x);
    const step_stats st = train_step(be, model, opt, dead, x, schedule, ws);
    if (step == 0) first = st.loss;
    last = st.loss;
  }
  std::printf("hsae %s from the installed package: loss %.4g -> %.4g\n", version_string, first, last);
  return last < 0.7 * first ? 0 : 1;
}
