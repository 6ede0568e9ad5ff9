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
/// Both wrap around at the end of their data (file_source: of its row range) and count
/// epochs; within an epoch every row is served exactly once. Both are deterministic for a
/// given seed.
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
  /// 0 or 1: rows are served in stream order. Capped at the rows in the range.
  std::size_t shuffle_buffer_rows = std::size_t(1) << 16;
  std::uint64_t seed = 1;
  /// Visit the chunks (see shuffle_chunk_rows) in a fresh random order each epoch; false:
  /// in stream order (the files as given, each from its first row to its last).
  bool shuffle_files = true;
  /// The unit of the per-epoch shuffle: contiguous runs of this many rows of one file
  /// (starting at the file's rows 0, C, 2C, ...; clipped to the file's end and to the row
  /// range). With shuffle_files, each epoch streams all chunks of all files in a fresh
  /// random permutation into the shuffle buffer, so a buffer of B rows mixes rows from
  /// about B / shuffle_chunk_rows places of the data set: a token-ordered cache (documents
  /// or topics in runs) is mixed globally. Each chunk is read contiguously. 0: every file
  /// (clipped to the row range) is one chunk. The default buffer holds 64 default chunks,
  /// measured to mix a sorted cache as well as a shuffled copy (docs/DATA.md).
  std::int64_t shuffle_chunk_rows = 1024;
  /// The global rows served: [row_begin, row_end) of the files concatenated in the order
  /// given (not the shuffled order); row_end = -1: to the end. A held-out split by position:
  /// training {.row_end = N - H}, evaluation {.row_begin = N - H, .shuffle_buffer_rows = 0}.
  std::int64_t row_begin = 0;
  std::int64_t row_end = -1;
  /// Rows read (and converted, and checked) from a file at a time.
  std::size_t read_chunk_rows = 4096;
  /// Reject NaN/Inf with hsae::numeric_error naming the file and row.
  bool check_finite = true;
  /// The tensor read from each safetensors file; empty: the file's only tensor (a file
  /// with several raises hsae::io_error listing their names). Must be empty for .npy files.
  std::string tensor{};
};

/// Several activation files (.npy, or one tensor of each safetensors file; same last
/// dimension) as one endless stream of rows, optionally restricted to a range of rows.
///
/// The rows in the range are cut into chunks (file_source_options::shuffle_chunk_rows).
/// Each epoch streams the chunks (in order, or in a fresh random permutation across all
/// files) in reads of read_chunk_rows rows into a shuffle buffer; each served row is
/// taken from a random slot of the buffer, which is refilled with the next streamed row.
/// At the end of an epoch's stream the buffer drains, so every row of the range is served
/// exactly once per epoch and epochs never mix.
template <cpu_scalar T>
class file_source {
 public:
  explicit file_source(const std::vector<std::filesystem::path>& files, const file_source_options& opt = {})
      : opt_(opt), gen_(opt.seed) {
    detail::expects<config_error>(!files.empty(), "file_source: no input files");
    detail::expects<config_error>(opt_.read_chunk_rows >= 1, "file_source: read_chunk_rows=", opt_.read_chunk_rows,
                                  " must be >= 1");
    detail::expects<config_error>(opt_.shuffle_chunk_rows >= 0, "file_source: shuffle_chunk_rows=",
                                  opt_.shuffle_chunk_rows, " must be >= 0 (0: whole files)");
    files_.reserve(files.size());
    std::int64_t all = 0;
    for (const auto& p : files) {
      files_.emplace_back(p, opt_.tensor);
      const row_file& f = files_.back();
      if (f.cols() != files_.front().cols())
        detail::throw_error<io_error>("file_source: width mismatch: ", files_.front().describe(), " has ",
                                      files_.front().cols(), " columns but ", f.describe(), " has ", f.cols());
      detail::expects<io_error>(f.rows() <= std::numeric_limits<std::int64_t>::max() - all,
                                "file_source: more than 2^63 rows in all");
      all += f.rows();
    }
    detail::expects<config_error>(files_.front().cols() <= std::int64_t(std::numeric_limits<int>::max()),
                                  "file_source: width ", files_.front().cols(), " too large");
    d_ = Eigen::Index(files_.front().cols());
    detail::expects<config_error>(opt_.row_begin >= 0 && opt_.row_begin < all, "file_source: row_begin=",
                                  opt_.row_begin, " must lie in [0, ", all, ") (the files hold ", all, " rows)");
    detail::expects<config_error>(opt_.row_end == -1 || (opt_.row_end > opt_.row_begin && opt_.row_end <= all),
                                  "file_source: row_end=", opt_.row_end, " must be -1 (the end) or lie in (row_begin=",
                                  opt_.row_begin, ", ", all, "] (the files hold ", all, " rows)");
    begin_ = opt_.row_begin;
    end_ = opt_.row_end == -1 ? all : opt_.row_end;
    total_ = end_ - begin_;
    make_chunks();
    const auto want = std::int64_t(std::min<std::size_t>(opt_.shuffle_buffer_rows, std::size_t(total_)));
    cap_ = opt_.shuffle_buffer_rows <= 1 ? 0 : std::size_t(want);
    order_.resize(chunks_.size());
    start_epoch();
  }

  int d_model() const { return int(d_); }
  /// Rows in the range (one epoch).
  std::int64_t rows_total() const { return total_; }
  /// The range of global rows served, [row_begin, row_end) (row_end resolved).
  std::int64_t row_begin() const { return begin_; }
  std::int64_t row_end() const { return end_; }
  /// Chunks the range is cut into (the units of the per-epoch shuffle).
  std::size_t chunks() const { return chunks_.size(); }
  /// Completed epochs.
  std::int64_t epoch() const { return epoch_; }
  /// Rows served since construction (the stream position).
  std::int64_t rows_served() const { return served_; }
  const std::vector<row_file>& files() const { return files_; }
  const file_source_options& options() const { return opt_; }

  /// Checkpoint support (checkpoint.hpp): the stream position (chunk order, chunk, row,
  /// read chunk), the shuffle buffer's rows and the RNG. Restoring re-reads one read chunk.
  /// \throws hsae::io_error on load when the files, their row counts, the tensor, the row
  ///         range, the chunk size or the buffer size differ from those the checkpoint was
  ///         written with.
  template <class State>
  void save_state(State& st) const {
    st.set("source.kind", std::string("files"));
    st.set("source.files", std::int64_t(files_.size()));
    for (std::size_t i = 0; i < files_.size(); ++i) {
      st.set("source.file" + std::to_string(i), files_[i].path().string());
      st.set("source.file" + std::to_string(i) + ".rows", std::int64_t(files_[i].rows()));
    }
    st.set("source.tensor", opt_.tensor);
    st.set("source.row_begin", begin_);
    st.set("source.row_end", end_);
    st.set("source.shuffle_chunk_rows", opt_.shuffle_chunk_rows);
    st.set("source.chunks", std::int64_t(chunks_.size()));
    st.set("source.capacity", std::int64_t(cap_));
    st.set_rng("source.rng", gen_);
    st.arrays["source.order"] = std::vector<double>(order_.begin(), order_.end());
    st.set("source.file_pos", std::int64_t(pos_));
    st.set("source.row_in_file", row_in_file_);
    st.set("source.chunk_rows", read_rows_);
    st.set("source.chunk_pos", read_pos_);
    st.set("source.fill", std::int64_t(fill_));
    st.set("source.epoch_served", epoch_served_);
    st.set("source.epoch", epoch_);
    st.set("source.served", served_);
    st.matrices["source.buffer"] = buf_.topRows(Eigen::Index(fill_));
  }
  /// Every restored index and count is checked against these files before it is used:
  /// the chunk order must be a permutation, the position must lie inside the current
  /// chunk and agree with the rows served, the buffer must hold `fill` finite rows of this
  /// width. A checkpoint of kind "npy" (written before npy_source became file_source: the
  /// entries 'source.order' and 'source.file_pos' then count whole files) resumes on a
  /// source whose chunks are its whole files (shuffle_chunk_rows = 0, no row range).
  template <class State>
  void load_state(const State& st) {
    const std::string& kind = st.text("source.kind");
    const bool legacy = kind == "npy";
    st.expects(kind == "files" || legacy, "the data source was '", kind, "', not a file_source");
    bool same = st.get_int("source.files") == std::int64_t(files_.size()) &&
                st.get_int("source.capacity") == std::int64_t(cap_);
    for (std::size_t i = 0; same && i < files_.size(); ++i)
      same = st.text("source.file" + std::to_string(i)) == files_[i].path().string() &&
             st.get_int("source.file" + std::to_string(i) + ".rows") == files_[i].rows();
    st.expects(same, "the file_source was written for other files (or another shuffle buffer size) than the ones given");
    if (legacy) {
      bool whole_files = chunks_.size() == files_.size();
      for (std::size_t i = 0; whole_files && i < chunks_.size(); ++i)
        whole_files = chunks_[i].begin == 0 && chunks_[i].end == files_[i].rows();
      st.expects(whole_files, "the checkpoint was written by an npy_source, which shuffled whole files: resume it "
                              "with file_source_options::shuffle_chunk_rows = 0 and no row range");
    } else {
      st.expects(st.text("source.tensor") == opt_.tensor, "the file_source was written for tensor '",
                 st.text("source.tensor"), "', not '", opt_.tensor, "'");
      st.expects(st.get_int("source.row_begin") == begin_ && st.get_int("source.row_end") == end_,
                 "the file_source was written for rows [", st.get_int("source.row_begin"), ", ",
                 st.get_int("source.row_end"), "), not [", begin_, ", ", end_, ")");
      st.expects(st.get_int("source.shuffle_chunk_rows") == opt_.shuffle_chunk_rows &&
                     st.get_int("source.chunks") == std::int64_t(chunks_.size()),
                 "the file_source was written with shuffle_chunk_rows = ", st.get_int("source.shuffle_chunk_rows"),
                 " (", st.get_int("source.chunks"), " chunks), not ", opt_.shuffle_chunk_rows, " (", chunks_.size(),
                 " chunks)");
    }

    // The chunk order: a permutation of the chunk indices.
    const auto n_chunks = std::int64_t(chunks_.size());
    const std::vector<std::int64_t> order = st.int_array("source.order", 0, n_chunks - 1);
    st.expects(order.size() == chunks_.size(), "tensor 'source.order' has ", order.size(), " entries, expected ",
               chunks_.size());
    std::vector<char> seen(chunks_.size(), 0);
    for (const std::int64_t c : order) {
      st.expects(!seen[std::size_t(c)], "tensor 'source.order' names ", legacy ? "file " : "chunk ", c,
                 " twice (not a permutation)");
      seen[std::size_t(c)] = 1;
    }
    // The stream position: chunk, row of its file, the read chunk read last and how much of it is served.
    const auto pos = std::size_t(st.get_int("source.file_pos", 0, n_chunks));
    const chunk* cur = pos < chunks_.size() ? &chunks_[std::size_t(order[pos])] : nullptr;
    const std::int64_t row_in_file =
        cur != nullptr ? st.get_int("source.row_in_file", cur->begin, cur->end) : st.get_int("source.row_in_file", 0, 0);
    // A read chunk fully served may be left over from the previous chunk; one partly
    // served holds rows [row_in_file - chunk_rows, row_in_file) of the current chunk.
    const std::int64_t read_rows = st.get_int("source.chunk_rows", 0, std::numeric_limits<std::int64_t>::max());
    const std::int64_t read_pos = st.get_int("source.chunk_pos", 0, read_rows);
    if (read_pos < read_rows)
      st.expects(cur != nullptr && read_rows <= row_in_file - cur->begin, "entries 'source.chunk_rows' = ", read_rows,
                 " and 'source.chunk_pos' = ", read_pos, " name a partly served chunk beyond row ", row_in_file,
                 " of ", cur != nullptr ? "file " : "the end of the epoch",
                 cur != nullptr ? std::int64_t(cur->file) : std::int64_t(-1));
    const auto fill = std::size_t(st.get_int("source.fill", 0, std::int64_t(cap_)));
    // Rows streamed this epoch, and so served: the buffer holds the streamed rows not yet served.
    std::int64_t streamed = cur != nullptr ? row_in_file - cur->begin - (read_rows - read_pos) : 0;
    for (std::size_t i = 0; i < pos; ++i) streamed += chunks_[std::size_t(order[i])].rows();
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
    pos_ = pos;
    row_in_file_ = row_in_file;
    read_rows_ = read_rows;
    read_pos_ = read_pos;
    epoch_served_ = epoch_served;
    epoch_ = epoch;
    served_ = served;
    fill_ = fill;
    if (cap_ > 0) {
      buf_.resize(Eigen::Index(cap_), d_);
      buf_.topRows(Eigen::Index(fill_)) = buffer;
    }
    if (read_pos_ < read_rows_) {  // a read chunk partly served: rows [row_in_file - read_rows, row_in_file)
      const row_file& f = files_[cur->file];
      read_.resize(read_rows_, d_);
      f.read_rows(row_in_file_ - read_rows_, read_rows_, read_.data());
      if (opt_.check_finite) check_read(f, row_in_file_ - read_rows_);
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
  /// Rows [begin, end) of file `file`.
  struct chunk {
    std::size_t file;
    std::int64_t begin, end;
    std::int64_t rows() const { return end - begin; }
  };

  /// Cuts [begin_, end_) of the concatenated files into chunks, in stream order.
  void make_chunks() {
    std::int64_t offset = 0;  // global row of the file's row 0
    for (std::size_t i = 0; i < files_.size(); ++i) {
      const std::int64_t rows = files_[i].rows();
      const std::int64_t lo = std::max<std::int64_t>(begin_ - offset, 0);
      const std::int64_t hi = std::min<std::int64_t>(end_ - offset, rows);
      offset += rows;
      if (lo >= hi) continue;
      if (opt_.shuffle_chunk_rows == 0) {
        chunks_.push_back({i, lo, hi});
        continue;
      }
      const std::int64_t c = opt_.shuffle_chunk_rows;
      for (std::int64_t b = lo; b < hi;) {
        const std::int64_t e = (b / c < (hi - 1) / c) ? (b / c + 1) * c : hi;  // the next multiple of c, or hi
        chunks_.push_back({i, b, e});
        b = e;
      }
    }
  }

  void start_epoch() {
    for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = i;
    if (opt_.shuffle_files) detail::rng_shuffle(order_, gen_);
    pos_ = 0;
    row_in_file_ = chunks_[order_[0]].begin;
    read_rows_ = read_pos_ = 0;
    epoch_served_ = 0;
  }

  /// Copies the next row of this epoch's stream into dst; false once the epoch's stream is exhausted.
  bool stream_row(T* dst) {
    if (read_pos_ == read_rows_) {
      while (pos_ < order_.size() && row_in_file_ == chunks_[order_[pos_]].end) {
        ++pos_;
        row_in_file_ = pos_ < order_.size() ? chunks_[order_[pos_]].begin : 0;
      }
      if (pos_ == order_.size()) return false;
      const chunk& c = chunks_[order_[pos_]];
      const row_file& f = files_[c.file];
      const std::int64_t n = std::min<std::int64_t>(std::int64_t(opt_.read_chunk_rows), c.end - row_in_file_);
      read_.resize(n, d_);
      f.read_rows(row_in_file_, n, read_.data());
      if (opt_.check_finite) check_read(f, row_in_file_);
      row_in_file_ += n;
      read_rows_ = n;
      read_pos_ = 0;
    }
    std::memcpy(dst, read_.row(read_pos_).data(), sizeof(T) * std::size_t(d_));
    ++read_pos_;
    return true;
  }

  void check_read(const row_file& f, std::int64_t first) const {
    if (detail::all_finite(read_)) [[likely]] return;
    for (Eigen::Index i = 0; i < read_.rows(); ++i)
      for (Eigen::Index j = 0; j < read_.cols(); ++j)
        if (!std::isfinite(read_(i, j)))
          detail::throw_error<numeric_error>("file_source: non-finite value (", double(read_(i, j)), ") in ",
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
  std::int64_t begin_ = 0, end_ = 0;
  std::int64_t total_ = 0;
  Eigen::Index d_ = 0;
  std::size_t cap_ = 0;
  std::vector<chunk> chunks_;
  std::vector<std::size_t> order_;  ///< this epoch's chunk order
  std::size_t pos_ = 0;             ///< position in order_ of the chunk streamed
  std::int64_t row_in_file_ = 0;    ///< the next row of its file to read
  row_matrix<T> read_;              ///< the rows read last, [read_rows_, d]
  std::int64_t read_rows_ = 0;
  std::int64_t read_pos_ = 0;
  row_matrix<T> buf_;
  std::size_t fill_ = 0;
  std::int64_t epoch_served_ = 0;
  std::int64_t epoch_ = 0;
  std::int64_t served_ = 0;
};

HSAE_NAMESPACE_END
