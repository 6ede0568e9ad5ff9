// SPDX-License-Identifier: Apache-2.0
/// \file hsae.hpp
/// Umbrella header: everything of hsae's CPU API.
///
///   hsae::sae<T, F>                 model (model.hpp); init + geometric median (cpu/init.hpp)
///   hsae::k_schedule<Ks...>, ...    k-schedules (k_schedule.hpp)
///   step_options, step_stats, ...   what a step takes and reports (step_types.hpp)
///   hsae::encode / decode           cpu/encode.hpp, sorted top-k (hsae::topk) in cpu/topk.hpp
///   hsae::hierarchical_loss[...]    cpu/loss.hpp, AuxK in cpu/auxk.hpp
///   hsae::adam<T, F>                cpu/optimizer.hpp (options and state: optimizer.hpp)
///   hsae::train_step                cpu/train_step.hpp
///   hsae::evaluate                  cpu/evaluate.hpp (metrics: metrics.hpp)
///   hsae::trainer                   trainer.hpp (engine contract: training_engine.hpp; the
///                                   CPU engine in cpu/, the GPU's in hsae/cuda.cuh)
///   hsae::npy_file, write_npy       data/npy.hpp (memory-mapped .npy reading, atomic writing)
///   hsae::file_source, matrix_source data/sources.hpp (batch sources, batch_source concept)
///   hsae::row_file                  data/row_file.hpp (an .npy file or safetensors tensor as rows)
///   hsae::safetensors_file, ...     io/safetensors.hpp (memory-mapped reading, atomic writing)
///   hsae::save_saelens, load_sparsify, convert_sae_dir, ...
///                                   io/sae_files.hpp (SAELens and sparsify SAE directories:
///                                   io/saelens.hpp, io/sparsify.hpp, io/sae_dir.hpp, their
///                                   vocabulary io/sae_types.hpp)
#pragma once

#include "checkpoint.hpp"
#include "config.hpp"
#include "cpu/auxk.hpp"
#include "cpu/backend.hpp"
#include "cpu/encode.hpp"
#include "cpu/evaluate.hpp"
#include "cpu/init.hpp"
#include "cpu/latent_pairs.hpp"
#include "cpu/loss.hpp"
#include "cpu/optimizer.hpp"
#include "cpu/topk.hpp"
#include "cpu/train_step.hpp"
#include "cpu/training_engine.hpp"
#include "data/npy.hpp"
#include "data/sources.hpp"
#include "data/synthetic.hpp"
#include "dead_latents.hpp"
#include "error.hpp"
#include "io/sae_files.hpp"
#include "io/safetensors.hpp"
#include "k_schedule.hpp"
#include "matrix.hpp"
#include "metrics.hpp"
#include "model.hpp"
#include "optimizer.hpp"
#include "pareto.hpp"
#include "rng.hpp"
#include "sparse_code.hpp"
#include "step_types.hpp"
#include "trainer.hpp"
#include "trainer_checkpoint.hpp"
#include "training_engine.hpp"
#include "training_log.hpp"
#include "version.hpp"
