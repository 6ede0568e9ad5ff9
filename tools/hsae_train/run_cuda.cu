// SPDX-License-Identifier: Apache-2.0
// hsae-train's CUDA path (run.hpp: train_cuda): the trainer on cuda_backend, or on
// cuda_with_storage<__half / __nv_bfloat16> for --storage f16 / bf16. Built only with
// CUDA (HSAE_CUDA); the fp32 master weights, moments and checkpoints are the CPU path's.
#include <hsae/cuda.cuh>

#include "driver.hpp"

namespace hsae_train {

run_result train_cuda(const run_plan& p, const std::atomic<bool>* stop) {
  if (!hsae::cuda_device_available())
    throw hsae::config_error("--device cuda: no usable CUDA device (none found, or the driver is "
                             "older than this build's CUDA runtime)");
  cudaStream_t stream = nullptr;
  HSAE_CUDA_TRY(cudaStreamCreate(&stream));
  struct stream_guard {
    cudaStream_t s;
    ~stream_guard() { cudaStreamDestroy(s); }
  } guard{stream};
  hsae::cuda_backend be(stream);
  be.deterministic = p.cfg.deterministic;
  if (p.cfg.storage == "f16") return train_with<hsae::cuda_with_storage<__half>>(be, p, stop);
  if (p.cfg.storage == "bf16") return train_with<hsae::cuda_with_storage<__nv_bfloat16>>(be, p, stop);
  return train_with<hsae::cuda_backend>(be, p, stop);
}

}  // namespace hsae_train
