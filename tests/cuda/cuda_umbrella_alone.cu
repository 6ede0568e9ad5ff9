// SPDX-License-Identifier: Apache-2.0
// The CUDA umbrella on its own: this translation unit includes nothing but
// <hsae/cuda.cuh>, so it builds only if the CUDA backend needs no CPU backend header
// (docs/ARCHITECTURE.md; the `layering` test checks that no cpu/ header is even reached).
// Building it is the test: it is compiled with the GPU tests, never run.
#include <hsae/cuda.cuh>

// The engine's non-template members, and the vocabulary it shares with the CPU side.
template class hsae::training_engine<hsae::cuda_backend, float, hsae::dynamic>;
template class hsae::adam_state<float, hsae::dynamic>;
static_assert(hsae::training_engine_for<hsae::training_engine<hsae::cuda_backend, float, 128>, float, 128,
                                        hsae::all_prefixes<8>>);
