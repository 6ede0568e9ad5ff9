// SPDX-License-Identifier: Apache-2.0
/// \file data/sources.hpp
/// Activation batch sources: endless streams of rows [rows, d_model] that the trainer
/// consumes through the duck-typed interface `d_model()` and `next(rows, x)` (the
/// `hsae::batch_source<S, T>` concept of trainer.hpp); synthetic_source
/// (data/synthetic.hpp) is one too.
///
/// - matrix_source<T>: an in-memory matrix, a fresh random permutation per epoch.
/// - file_source<T>: one or more .npy or safetensors files (memory-mapped, data/row_file.hpp)
///   as one stream, through a shuffle buffer. The files must not be truncated or rewritten
///   in place while the source lives (a read past the new end is a fatal SIGBUS); replacing
///   them by rename is safe (see npy_file).
///
/// Both wrap around at the end of their data and count epochs; within an epoch every
/// row is served exactly once. Both are deterministic for a given seed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../matrix.hpp"
#include "../rng.hpp"
#include "row_file.hpp"

HSAE_NAMESPACE_BEGIN

namespace detail {

/// Fisher-Yates shuffle driven by hsae::rng (std::shuffle's algorithm is unspecified).
template <class V>
void rng_shuffle(V& v, rng& gen) {
  for (std::size_t i = v.size(); i > 1; --i) {
    const auto j = std::size_t(gen.below(i));
    std::swap(v[i - 1], v[j]);
  }
}

inline void expect_batch_rows(const char* who, Eigen::Index rows) {
  expects<config_error>(rows >= 0, who, ": batch rows=", rows, " must be >= 0");
}

}  // namespace detail

/// Rows of an in-memory matrix, in a fresh random permutation each epoch (or in order
/// with shuffle = false). Batches may straddle epochs.
template <cpu_scalar T>
class matrix_source {
 public:
  explicit matrix_source(row_matrix<T> data, std::uint64_t seed = 1, bool shuffle = true)
      : data_(std::move(data)), gen_(seed), shuffle_(shuffle) {
    detail::expects<config_error>(data_.rows() > 0 && data_.cols() > 0, "matrix_source: data has shape [",
                                  data_.rows(), ", ", data_.cols(), "], need at least one row and one column");
    perm_.resize(std::size_t(data_.rows()));
    start_epoch();
  }

  int d_model() const { return int(data_.cols()); }
  std::int64_t rows_total() const { return std::int64_t(data_.rows()); }
  /// Completed epochs.
  std::int64_t epoch() const { return epoch_; }
  /// Rows served since construction (the stream position).
  std::int64_t rows_served() const { return served_; }
  const row_matrix<T>& data() const { return data_; }

  void next(Eigen::Index rows, row_matrix<T>& x) {
    detail::expect_batch_rows("matrix_source", rows);
    x.resize(rows, data_.cols());
    for (Eigen::Index r = 0; r < rows; ++r) {
      x.row(r) = data_.row(perm_[pos_]);
      ++served_;
      if (++pos_ == perm_.size()) {
        ++epoch_;
        start_epoch();
      }
    }
  }
  row_matrix<T> next(Eigen::Index rows) {
    row_matrix<T> x;
    next(rows, x);
    return x;
  }

 private:
  void start_epoch() {
    for (std::size_t i = 0; i < perm_.size(); ++i) perm_[i] = Eigen::Index(i);
    if (shuffle_) detail::rng_shuffle(perm_, gen_);
    pos_ = 0;
  }

  row_matrix<T> data_;
  rng gen_;
  bool shuffle_;
  std::vector<Eigen::Index> perm_;
  std::size_t pos_ = 0;
  std::int64_t epoch_ = 0;
  std::int64_t served_ = 0;
};

struct file_source_options {
  /// Rows held by the shuffle buffer (memory: shuffle_buffer_rows * d_model * sizeof(T));
  /// 0 or 1: rows are served in stream order. Capped at the total row count.
  std::size_t shuffle_buffer_rows = std::size_t(1) << 16;
  std::uint64_t seed = 1;
  /// Visit the files in a fresh random order each epoch (else in the order given).
  bool shuffle_files = true;
  /// Rows read (and converted, and checked) from a file at a time.
  std::size_t read_chunk_rows = 4096;
  /// Reject NaN/Inf with hsae::numeric_error naming the file and row.
  bool check_finite = true;
  /// The tensor read from each safetensors file; empty: the file's only tensor (a file
  /// with several raises hsae::io_error listing their names). Must be empty for .npy files.
  std::string tensor;
};

/// Several activation files (.npy, or one tensor of each safetensors file; same last
/// dimension) as one endless stream of rows.
///
/// Each epoch streams the files (in order, or shuffled per epoch) in contiguous chunks
/// into a shuffle buffer; each served row is taken from a random slot of the buffer,
/// which is refilled with the next streamed row. At the end of an epoch's stream the
/// buffer drains, so every row is served exactly once per epoch and epochs never mix.
template <cpu_scalar T>
class file_source {
 public:
  explicit file_source(const std::vector<std::filesystem::path>& files, const file_source_options& opt = {})
      : opt_(opt), gen_(opt.seed) {
    detail::expects<config_error>(!files.empty(), "file_source: no input files");
    detail::expects<config_error>(opt_.read_chunk_rows >= 1, "file_source: read_chunk_rows=", opt_.read_chunk_rows,
                                  " must be >= 1");
    files_.reserve(files.size());
    for (const auto& p : files) {
      files_.emplace_back(p, opt_.tensor);
      const row_file& f = files_.back();
      if (f.cols() != files_.front().cols())
        detail::throw_error<io_error>("file_source: width mismatch: ", files_.front().describe(), " has ",
                                      files_.front().cols(), " columns but ", f.describe(), " has ", f.cols());
      total_ += f.rows();
    }
    detail::expects<config_error>(files_.front().cols() <= std::int64_t(std::numeric_limits<int>::max()),
                                  "file_source: width ", files_.front().cols(), " too large");
    d_ = Eigen::Index(files_.front().cols());
    const auto want = std::int64_t(std::min<std::size_t>(opt_.shuffle_buffer_rows, std::size_t(total_)));
    cap_ = opt_.shuffle_buffer_rows <= 1 ? 0 : std::size_t(want);
    order_.resize(files_.size());
    start_epoch();
  }

  int d_model() const { return int(d_); }
  /// Rows over all files (one epoch).
  std::int64_t rows_total() const { return total_; }
  /// Completed epochs.
  std::int64_t epoch() const { return epoch_; }
  /// Rows served since construction (the stream position).
  std::int64_t rows_served() const { return served_; }
  const std::vector<row_file>& files() const { return files_; }
  const file_source_options& options() const { return opt_; }

  /// Checkpoint support (checkpoint.hpp): the stream position (file order, file, row,
  /// read chunk), the shuffle buffer's rows and the RNG. Restoring re-reads one chunk.
  /// \throws hsae::io_error on load when the files, their row counts or the buffer
  ///         size differ from those the checkpoint was written with.
  template <class State>
  void save_state(State& st) const {
    st.set("source.kind", std::string("files"));
    st.set("source.files", std::int64_t(files_.size()));
    for (std::size_t i = 0; i < files_.size(); ++i) {
      st.set("source.file" + std::to_string(i), files_[i].path().string());
      st.set("source.file" + std::to_string(i) + ".rows", std::int64_t(files_[i].rows()));
    }
    st.set("source.capacity", std::int64_t(cap_));
    st.set_rng("source.rng", gen_);
    st.arrays["source.order"] = std::vector<double>(order_.begin(), order_.end());
    st.set("source.file_pos", std::int64_t(file_pos_));
    st.set("source.row_in_file", row_in_file_);
    st.set("source.chunk_rows", chunk_rows_);
    st.set("source.chunk_pos", chunk_pos_);
    st.set("source.fill", std::int64_t(fill_));
    st.set("source.epoch_served", epoch_served_);
    st.set("source.epoch", epoch_);
    st.set("source.served", served_);
    st.matrices["source.buffer"] = buf_.topRows(Eigen::Index(fill_));
  }
  /// Every restored index and count is checked against these files before it is used:
  /// the file order must be a permutation, the position must lie inside the files and
  /// agree with the rows served, the buffer must hold `fill` finite rows of this width.
  template <class State>
  void load_state(const State& st) {
    // "npy": written by this source before it was renamed from npy_source.
    st.expects(st.text("source.kind") == "files" || st.text("source.kind") == "npy", "the data source was '",
               st.text("source.kind"), "', not a file_source");
    bool same = st.get_int("source.files") == std::int64_t(files_.size()) &&
                st.get_int("source.capacity") == std::int64_t(cap_);
    for (std::size_t i = 0; same && i < files_.size(); ++i)
      same = st.text("source.file" + std::to_string(i)) == files_[i].path().string() &&
             st.get_int("source.file" + std::to_string(i) + ".rows") == files_[i].rows();
    st.expects(same, "the file_source was written for other files (or another shuffle buffer size) than the ones given");

    // The file order: a permutation of the file indices.
    const auto n_files = std::int64_t(files_.size());
    const std::vector<std::int64_t> order = st.int_array("source.order", 0, n_files - 1);
    st.expects(order.size() == files_.size(), "tensor 'source.order' has ", order.size(), " entries, expected ",
               files_.size());
    std::vector<char> seen(files_.size(), 0);
    for (const std::int64_t f : order) {
      st.expects(!seen[std::size_t(f)], "tensor 'source.order' names file ", f, " twice (not a permutation)");
      seen[std::size_t(f)] = 1;
    }
    // The stream position: file, row in it, the chunk read last and how much of it is served.
    const auto file_pos = std::size_t(st.get_int("source.file_pos", 0, n_files));
    const std::int64_t file_rows = file_pos < files_.size() ? files_[std::size_t(order[file_pos])].rows() : 0;
    const std::int64_t row_in_file = st.get_int("source.row_in_file", 0, file_rows);
    // A chunk fully served may be left over from the previous file; one partly served
    // holds rows [row_in_file - chunk_rows, row_in_file) of the current file.
    const std::int64_t chunk_rows = st.get_int("source.chunk_rows", 0, std::numeric_limits<std::int64_t>::max());
    const std::int64_t chunk_pos = st.get_int("source.chunk_pos", 0, chunk_rows);
    if (chunk_pos < chunk_rows)
      st.expects(file_pos < files_.size() && chunk_rows <= row_in_file, "entries 'source.chunk_rows' = ", chunk_rows,
                 " and 'source.chunk_pos' = ", chunk_pos, " name a partly served chunk beyond row ", row_in_file,
                 " of file ", file_pos < files_.size() ? std::int64_t(order[file_pos]) : -1);
    const auto fill = std::size_t(st.get_int("source.fill", 0, std::int64_t(cap_)));
    // Rows streamed this epoch, and so served: the buffer holds the streamed rows not yet served.
    std::int64_t streamed = row_in_file - (chunk_rows - chunk_pos);
    for (std::size_t i = 0; i < file_pos; ++i) streamed += files_[std::size_t(order[i])].rows();
    const std::int64_t epoch_served = st.get_int("source.epoch_served", 0, total_ - 1);
    st.expects(epoch_served == streamed - std::int64_t(fill), "entry 'source.epoch_served' = ", epoch_served,
               " disagrees with the stream position (", streamed, " rows streamed this epoch, ", fill,
               " of them in the shuffle buffer)");
    const std::int64_t epoch = st.get_int("source.epoch", 0, std::numeric_limits<std::int64_t>::max() / total_ - 1);
    const std::int64_t served = st.get_int("source.served", 0, std::numeric_limits<std::int64_t>::max());
    st.expects(served == epoch * total_ + epoch_served, "entry 'source.served' = ", served,
               " disagrees with epoch ", epoch, " of ", total_, " rows and ", epoch_served, " rows into it");
    const row_matrix<T>& buffer = st.matrix("source.buffer");
    st.expects(buffer.rows() == Eigen::Index(fill) && (fill == 0 || buffer.cols() == d_), "tensor 'source.buffer' has shape [",
               buffer.rows(), ", ", buffer.cols(), "], expected [", fill, ", ", d_, "]");
    if (opt_.check_finite && fill > 0 && !detail::all_finite(buffer))
      st.fail("tensor 'source.buffer' holds NaN or Inf (the source refuses non-finite rows)");
    rng gen;
    st.get_rng("source.rng", gen);

    // All checked: commit.
    gen_ = gen;
    for (std::size_t i = 0; i < order.size(); ++i) order_[i] = std::size_t(order[i]);
    file_pos_ = file_pos;
    row_in_file_ = row_in_file;
    chunk_rows_ = chunk_rows;
    chunk_pos_ = chunk_pos;
    epoch_served_ = epoch_served;
    epoch_ = epoch;
    served_ = served;
    fill_ = fill;
    if (cap_ > 0) {
      buf_.resize(Eigen::Index(cap_), d_);
      buf_.topRows(Eigen::Index(fill_)) = buffer;
    }
    if (chunk_pos_ < chunk_rows_) {  // a chunk partly served: rows [row_in_file - chunk_rows, row_in_file) of this file
      const row_file& f = files_[order_[file_pos_]];
      chunk_.resize(chunk_rows_, d_);
      f.read_rows(row_in_file_ - chunk_rows_, chunk_rows_, chunk_.data());
      if (opt_.check_finite) check_chunk(f, row_in_file_ - chunk_rows_);
    }
  }

  void next(Eigen::Index rows, row_matrix<T>& x) {
    detail::expect_batch_rows("file_source", rows);
    x.resize(rows, d_);
    for (Eigen::Index r = 0; r < rows; ++r) next_row(x.row(r).data());
  }
  row_matrix<T> next(Eigen::Index rows) {
    row_matrix<T> x;
    next(rows, x);
    return x;
  }

 private:
  void start_epoch() {
    for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = i;
    if (opt_.shuffle_files) detail::rng_shuffle(order_, gen_);
    file_pos_ = 0;
    row_in_file_ = 0;
    chunk_rows_ = chunk_pos_ = 0;
    epoch_served_ = 0;
  }

  /// Copies the next row of this epoch's stream into dst; false once the epoch's stream is exhausted.
  bool stream_row(T* dst) {
    if (chunk_pos_ == chunk_rows_) {
      while (file_pos_ < order_.size() && row_in_file_ == files_[order_[file_pos_]].rows()) {
        ++file_pos_;
        row_in_file_ = 0;
      }
      if (file_pos_ == order_.size()) return false;
      const row_file& f = files_[order_[file_pos_]];
      const std::int64_t n = std::min<std::int64_t>(std::int64_t(opt_.read_chunk_rows), f.rows() - row_in_file_);
      chunk_.resize(n, d_);
      f.read_rows(row_in_file_, n, chunk_.data());
      if (opt_.check_finite) check_chunk(f, row_in_file_);
      row_in_file_ += n;
      chunk_rows_ = n;
      chunk_pos_ = 0;
    }
    std::memcpy(dst, chunk_.row(chunk_pos_).data(), sizeof(T) * std::size_t(d_));
    ++chunk_pos_;
    return true;
  }

  void check_chunk(const row_file& f, std::int64_t first) const {
    if (detail::all_finite(chunk_)) [[likely]] return;
    for (Eigen::Index i = 0; i < chunk_.rows(); ++i)
      for (Eigen::Index j = 0; j < chunk_.cols(); ++j)
        if (!std::isfinite(chunk_(i, j)))
          detail::throw_error<numeric_error>("file_source: non-finite value (", double(chunk_(i, j)), ") in ",
                                             f.describe(), " at row ", first + i, ", column ", j);
  }

  void next_row(T* dst) {
    if (cap_ == 0) {
      const bool ok = stream_row(dst);
      (void)ok;  // the epoch ends (below) before its stream runs out
    } else {
      if (fill_ == 0) {  // start of an epoch: fill the buffer
        if (buf_.rows() == 0) buf_.resize(Eigen::Index(cap_), d_);
        while (fill_ < cap_ && stream_row(buf_.row(Eigen::Index(fill_)).data())) ++fill_;
      }
      const auto k = Eigen::Index(gen_.below(fill_));
      T* slot = buf_.row(k).data();
      std::memcpy(dst, slot, sizeof(T) * std::size_t(d_));
      if (!stream_row(slot)) {  // stream exhausted: drain, moving the last row into the hole
        --fill_;
        if (Eigen::Index(fill_) != k)
          std::memcpy(slot, buf_.row(Eigen::Index(fill_)).data(), sizeof(T) * std::size_t(d_));
      }
    }
    ++served_;
    if (++epoch_served_ == total_) {
      ++epoch_;
      start_epoch();
    }
  }

  file_source_options opt_;
  rng gen_;
  std::vector<row_file> files_;
  std::int64_t total_ = 0;
  Eigen::Index d_ = 0;
  std::size_t cap_ = 0;
  std::vector<std::size_t> order_;
  std::size_t file_pos_ = 0;
  std::int64_t row_in_file_ = 0;
  row_matrix<T> chunk_;
  std::int64_t chunk_rows_ = 0;
  std::int64_t chunk_pos_ = 0;
  row_matrix<T> buf_;
  std::size_t fill_ = 0;
  std::int64_t epoch_served_ = 0;
  std::int64_t epoch_ = 0;
  std::int64_t served_ = 0;
};

HSAE_NAMESPACE_END
