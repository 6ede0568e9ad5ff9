// SPDX-License-Identifier: Apache-2.0
/// \file cuda.cuh
/// Umbrella header of hsae's CUDA backend (needs nvcc; link hsae::cuda). The CPU
/// umbrella, hsae/hsae.hpp, never includes CUDA. With this header,
/// `trainer<float, F, S, cuda_backend>` trains on the GPU (cuda/trainer.cuh).
#pragma once

#include "cuda/auxk.cuh"
#include "cuda/backend.cuh"
#include "cuda/dead_latents.cuh"
#include "cuda/encode.cuh"
#include "cuda/error.cuh"
#include "cuda/loss.cuh"
#include "cuda/memory.cuh"
#include "cuda/model.cuh"
#include "cuda/optimizer.cuh"
#include "cuda/topk.cuh"
#include "cuda/train_step.cuh"
#include "cuda/trainer.cuh"
