// SPDX-License-Identifier: Apache-2.0
// hsae's side of the interop tests (tests/interop/*.py): writes, reads, encodes and
// converts SAE directories and safetensors files with hsae's own code, so the Python
// tests can hand the results to SAELens, sparsify and safetensors and compare.
//
//   save FORMAT DIR D_IN D_SAE SEED DTYPE SCHEDULE [METADATA_JSON]
//        random SAE (all four tensors non-trivial) saved as FORMAT (saelens|sparsify);
//        SCHEDULE: "plain:K" (TopK, no schedule) or "k1,k2,...[;w1,w2,...]"
//   dump DIR OUT_PREFIX          weights as loaded by hsae: OUT_PREFIX.{W_enc,b_enc,W_dec,b_dec}.npy
//                                (hsae orientation, float32) + OUT_PREFIX.json (k, schedule, ...)
//   encode DIR X.npy OUT_PREFIX [K]
//        sorted top-k code and reconstruction of the rows of X: OUT_PREFIX.{values,
//        indices,dense,recon}.npy (indices as float64) + OUT_PREFIX.json
//   decode DIR VALUES.npy INDICES.npy OUT.npy   b_dec + sum_t v_t W_dec[i_t]
//   convert SRC DST FORMAT [DTYPE]
//   st-check FILE                parse a safetensors file: "ok N" or the error
//   st-write OUT X.npy DTYPE     X as tensor "x" (and its first row as "row0") in DTYPE
//   st-read FILE NAME OUT.npy    tensor NAME converted to float32
//
// Exit status: 0 success, 3 an hsae::error (message on stderr), 2 usage.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <hsae/hsae.hpp>
#include <hsae/io/sae_files.hpp>
#include <hsae/io/safetensors.hpp>

namespace {

[[noreturn]] void usage(const char* msg) {
  std::cerr << "hsae_interop_tool: " << msg << "\n";
  std::exit(2);
}

hsae::sae_file_format parse_format(const std::string& s) {
  if (s == "saelens") return hsae::sae_file_format::saelens;
  if (s == "sparsify") return hsae::sae_file_format::sparsify;
  usage("FORMAT must be saelens or sparsify");
}

hsae::safetensors_dtype parse_dtype(const std::string& s) {
  const auto d = hsae::parse_safetensors_dtype(s);
  if (!d) usage("unknown DTYPE");
  return *d;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) out.push_back(item);
  return out;
}

nlohmann::json describe(const hsae::loaded_sae<float>& l) {
  nlohmann::json j;
  j["k"] = l.k;
  j["d_in"] = l.model.d_model();
  j["d_sae"] = l.model.d_sae();
  j["format"] = std::string(hsae::sae_file_format_name(l.format));
  j["storage_dtype"] = std::string(hsae::safetensors_dtype_name(l.storage_dtype));
  j["schedule"] = l.schedule ? hsae::detail::schedule_to_json(*l.schedule) : nlohmann::json();
  j["metadata"] = l.metadata;
  j["adjustments"] = l.adjustments;
  j["tensor_metadata"] = l.tensor_metadata;
  return j;
}

void write_json(const std::string& path, const nlohmann::json& j) {
  std::ofstream f(path);
  f << j.dump(2) << "\n";
}

int run(int argc, char** argv) {
  if (argc < 2) usage("missing command");
  const std::string cmd = argv[1];
  const hsae::cpu_backend be{};
  if (cmd == "save") {
    if (argc < 9) usage("save FORMAT DIR D_IN D_SAE SEED DTYPE SCHEDULE [METADATA_JSON]");
    const auto fmt = parse_format(argv[2]);
    const std::string dir = argv[3];
    const int d = std::atoi(argv[4]), f = std::atoi(argv[5]);
    const auto seed = std::strtoull(argv[6], nullptr, 10);
    hsae::sae_save_options opt;
    opt.dtype = parse_dtype(argv[7]);
    if (argc > 9) opt.metadata = nlohmann::json::parse(argv[9]);
    hsae::sae<float> m(d, f);
    hsae::init_options io;
    io.seed = seed;
    io.b_dec = hsae::decoder_bias_init::zero;
    hsae::init(be, m, hsae::row_matrix<float>(0, d), io);
    hsae::rng gen(seed + 1000);
    for (Eigen::Index i = 0; i < m.W_enc.size(); ++i) m.W_enc.data()[i] += 0.3f * float(gen.normal());
    for (Eigen::Index i = 0; i < m.b_enc.size(); ++i) m.b_enc(i) = 0.2f * float(gen.normal());
    for (Eigen::Index i = 0; i < m.b_dec.size(); ++i) m.b_dec(i) = 0.5f * float(gen.normal());
    const std::string sched = argv[8];
    if (sched.rfind("plain:", 0) == 0) {
      const int k = std::atoi(sched.c_str() + 6);
      if (fmt == hsae::sae_file_format::saelens) hsae::save_saelens(dir, m, k, opt);
      else hsae::save_sparsify(dir, m, k, opt);
    } else {
      const auto parts = split(sched, ';');
      const auto ks = split(parts[0], ',');
      std::vector<hsae::schedule_level> lv;
      for (std::size_t i = 0; i < ks.size(); ++i) {
        double w = 1.0;
        if (parts.size() > 1) w = std::stod(split(parts[1], ',').at(i));
        lv.push_back({std::stoi(ks[i]), w});
      }
      const hsae::dynamic_k_schedule s(lv);
      if (fmt == hsae::sae_file_format::saelens) hsae::save_saelens(dir, m, s, opt);
      else hsae::save_sparsify(dir, m, s, opt);
    }
    return 0;
  }
  if (cmd == "dump") {
    if (argc != 4) usage("dump DIR OUT_PREFIX");
    const auto l = hsae::load_sae_dir<float>(argv[2]);
    const std::string p = argv[3];
    hsae::write_npy(p + ".W_enc.npy", l.model.W_enc);
    hsae::write_npy(p + ".W_dec.npy", l.model.W_dec);
    hsae::write_npy(p + ".b_enc.npy", l.model.b_enc.data(), 1, l.model.b_enc.size());
    hsae::write_npy(p + ".b_dec.npy", l.model.b_dec.data(), 1, l.model.b_dec.size());
    write_json(p + ".json", describe(l));
    return 0;
  }
  if (cmd == "encode") {
    if (argc < 5) usage("encode DIR X.npy OUT_PREFIX [K]");
    const auto l = hsae::load_sae_dir<float>(argv[2]);
    const auto x = hsae::npy_file(argv[3]).read_all<float>();
    const std::string p = argv[4];
    const int k = argc > 5 ? std::atoi(argv[5]) : l.k;
    const auto code = hsae::encode(be, l.model, x, k);
    const auto recon = hsae::decode(be, l.model, code, k);
    hsae::row_matrix<float> dense = hsae::row_matrix<float>::Zero(x.rows(), l.model.d_sae());
    for (Eigen::Index b = 0; b < x.rows(); ++b)
      for (int t = 0; t < k; ++t) dense(b, code.indices(b, t)) = code.values(b, t);
    const hsae::row_matrix<double> idx = code.indices.cast<double>();
    hsae::write_npy(p + ".values.npy", code.values);
    hsae::write_npy(p + ".indices.npy", idx, hsae::npy_dtype::f64);
    hsae::write_npy(p + ".dense.npy", dense);
    hsae::write_npy(p + ".recon.npy", recon);
    write_json(p + ".json", describe(l));
    return 0;
  }
  if (cmd == "decode") {
    if (argc != 6) usage("decode DIR VALUES.npy INDICES.npy OUT.npy");
    const auto l = hsae::load_sae_dir<float>(argv[2]);
    hsae::sparse_code<float> code;
    code.values = hsae::npy_file(argv[3]).read_all<float>();
    code.indices = hsae::npy_file(argv[4]).read_all<double>().cast<hsae::index_t>();
    hsae::write_npy(argv[5], hsae::decode(be, l.model, code, code.k()));
    return 0;
  }
  if (cmd == "convert") {
    if (argc < 5) usage("convert SRC DST FORMAT [DTYPE]");
    std::optional<hsae::safetensors_dtype> dt;
    if (argc > 5) dt = parse_dtype(argv[5]);
    hsae::convert_sae_dir(argv[2], argv[3], parse_format(argv[4]), dt);
    return 0;
  }
  if (cmd == "st-check") {
    if (argc != 3) usage("st-check FILE");
    const hsae::safetensors_file f(argv[2]);
    std::cout << "ok " << f.tensors().size() << "\n";
    return 0;
  }
  if (cmd == "st-write") {
    if (argc != 5) usage("st-write OUT X.npy DTYPE");
    const auto x = hsae::npy_file(argv[3]).read_all<float>();
    const hsae::vector<float> row0 = x.row(0).transpose();
    hsae::safetensors_writer w;
    w.add("x", x, parse_dtype(argv[4]));
    w.add("row0", row0, parse_dtype(argv[4]));
    w.metadata("writer", "hsae");
    w.write(argv[2]);
    return 0;
  }
  if (cmd == "st-read") {
    if (argc != 5) usage("st-read FILE NAME OUT.npy");
    const hsae::safetensors_file f(argv[2]);
    const auto& t = f.at(argv[3]);
    if (t.shape.size() == 2) {
      hsae::write_npy(argv[4], f.read_matrix<float>(argv[3]));
    } else {
      const auto v = f.read_vector<float>(argv[3]);
      hsae::write_npy(argv[4], v.data(), 1, v.size());
    }
    return 0;
  }
  usage("unknown command");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const hsae::error& e) {
    std::cerr << e.what() << "\n";
    return 3;
  }
}
