// SPDX-License-Identifier: Apache-2.0
/// \file io/sae_files.hpp
/// SAE directories in the layouts of the two Python tools, so that an SAE trained with
/// hsae opens in them and theirs open in hsae without a converter. Includes:
///
///   io/sae_types.hpp   sae_file_format, file names, sae_save_options, loaded_sae
///                      (and what a file means in either tool)
///   io/saelens.hpp     load_saelens(_buffers), save_saelens
///   io/sparsify.hpp    load_sparsify(_buffers), save_sparsify
///   io/sae_dir.hpp     detect_sae_format, load_sae_dir, save_sae, convert_sae_dir
///   io/detail/         pep440.hpp (SAELens' version rule), sae_common.hpp (what both
///                      layouts' readers and writers share)
#pragma once

#include "sae_dir.hpp"
#include "saelens.hpp"
#include "sae_types.hpp"
#include "sparsify.hpp"
