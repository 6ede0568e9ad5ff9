// SPDX-License-Identifier: Apache-2.0
// hsae-train: trains a HierarchicalTopK SAE on activation files (or the built-in synthetic
// data) and writes it in the SAELens or sparsify layout with a report. Options: --help and
// tools/hsae_train/README.md. Exit status: 0 done, 1 an error during the run, 2 a bad
// command line or config, 130 interrupted (Ctrl-C; 143 after SIGTERM; resume with --resume).
// Under mpirun it trains a distributed grid (--shards); an error on one rank ends every rank.
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include <hsae/error.hpp>
#include <hsae/version.hpp>

#include "config.hpp"
#include "run.hpp"
#include "wait_policy.hpp"

namespace {

std::atomic<bool> stop_requested{false};
std::atomic<long long> first_signal_ns{0};

long long now_ns() {
  timespec t{};
  ::clock_gettime(CLOCK_MONOTONIC, &t);  // async-signal-safe
  return (long long)t.tv_sec * 1'000'000'000 + t.tv_nsec;
}

/// The first SIGINT/SIGTERM asks the trainer to stop (checkpoint, exit 130); another one
/// half a second later or more ends the process at once. (Copies of one signal, as
/// `timeout` sends to the process and its group, arrive together and count once.)
std::atomic<int> first_signal{0};
static_assert(std::atomic<long long>::is_always_lock_free && std::atomic<int>::is_always_lock_free &&
              std::atomic<bool>::is_always_lock_free);  // used in a signal handler

extern "C" void on_signal(int sig) {
  const long long t = now_ns();
  long long first = 0;
  if (first_signal_ns.compare_exchange_strong(first, t)) {
    first_signal.store(sig);
    stop_requested.store(true);
    return;
  }
  if (t - first > 500'000'000) ::_exit(128 + sig);
}

/// "rank R of N: " in a distributed run, else nothing.
std::string rank_prefix() {
  const hsae_train::launch_info& l = hsae_train::launch();
  return l.size > 1 ? "rank " + std::to_string(l.rank) + " of " + std::to_string(l.size) + ": " : std::string();
}

}  // namespace

int main(int argc, char** argv) {
  using namespace hsae_train;
  default_wait_policy(argv);  // may execute the program again, before anything has run
  const std::vector<std::string> args(argv, argv + argc);
  try {
    const train_config c = parse_command_line(argc, argv);
    if (c.help) {
      std::printf("%s", help_text().c_str());
      return 0;
    }
    if (c.version) {
      std::printf("hsae-train %s (%s)\n", hsae::version_string, built_with_cuda() ? "CPU and CUDA" : "CPU only");
      return 0;
    }
    launch_begin(argc, argv);  // MPI, under mpirun
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    const int rc = run(c, &stop_requested, args);
    launch_end();
    return rc == 130 && first_signal.load() == SIGTERM ? 128 + SIGTERM : rc;  // 143 after SIGTERM
  } catch (const usage_error& e) {
    std::fprintf(stderr, "hsae-train: %s%s\n", rank_prefix().c_str(), e.what());
    return launch_fail(2);
  } catch (const hsae::error& e) {
    std::fprintf(stderr, "hsae-train: %s%s\n", rank_prefix().c_str(), e.what());
    return launch_fail(1);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hsae-train: %s%s\n", rank_prefix().c_str(), e.what());
    return launch_fail(1);
  }
}
