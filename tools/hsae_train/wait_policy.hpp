// SPDX-License-Identifier: Apache-2.0
// hsae-train's OpenMP wait policy (wait_policy.cpp): the program's, not hsae_train_core's.
#pragma once

namespace hsae_train {

/// Executes hsae-train again with OMP_WAIT_POLICY=PASSIVE when the environment sets neither
/// OMP_WAIT_POLICY nor GOMP_SPINCOUNT; returns when it does not.
void default_wait_policy(char** argv);

}  // namespace hsae_train
