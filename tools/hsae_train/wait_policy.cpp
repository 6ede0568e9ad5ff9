// SPDX-License-Identifier: Apache-2.0
// hsae-train's OpenMP wait policy: passive unless the user chose one (OMP_WAIT_POLICY or
// GOMP_SPINCOUNT in the environment). libgomp's default spins idle threads for a while at
// the end of every parallel region; on a machine another busy process shares, the spinning
// thread takes the core that the region's slowest thread needs. The demo (1M tokens, 2
// cores) beside one busy process: a median 36.8 s with libgomp's default, 25.4 s passive
// (bench/RESULTS.md, bench/oversubscription.sh).
//
// libgomp reads the environment once, when it is loaded, before main; nothing can change
// the policy afterwards. So hsae-train executes itself again with OMP_WAIT_POLICY=PASSIVE
// set (the same process id, arguments and environment otherwise; before MPI is started).
// Setting the variable from the executable's .preinit_array does not work: glibc installs
// the process's environment again after it, and the variable is lost.
#include <unistd.h>

#include <cstdlib>

#include "wait_policy.hpp"

namespace hsae_train {

void default_wait_policy(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr || std::getenv("GOMP_SPINCOUNT") != nullptr) return;
  if (::setenv("OMP_WAIT_POLICY", "PASSIVE", 1) != 0) return;
  ::execv("/proc/self/exe", argv);
  ::unsetenv("OMP_WAIT_POLICY");  // no /proc: libgomp's default policy, as before
}

}  // namespace hsae_train
