// SPDX-License-Identifier: Apache-2.0
/// \file cpu/evaluate.hpp
/// The metrics of metrics.hpp on the CPU: one encode at k_max and one schedule-loss pass
/// per batch give every level's MSE, FVU and L0.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../error.hpp"
#include "../k_schedule.hpp"
#include "../matrix.hpp"
#include "../metrics.hpp"
#include "../model.hpp"
#include "../sparse_code.hpp"
#include "backend.hpp"
#include "encode.hpp"
#include "loss.hpp"

HSAE_NAMESPACE_BEGIN

/// Metrics of `m` on `x` at every level of `schedule` (one encode at k_max).
template <cpu_scalar T, int F, k_schedule_like S>
evaluation evaluate(const cpu_backend& be, const sae<T, F>& m, cref<T> x, const S& schedule) {
  sparse_code<T> code;
  row_matrix<T> pre;
  loss_workspace<T> lw;
  encode(be, m, x, schedule.k_max(), code, pre);
  metrics_accumulator acc;
  acc.add(x, code, hierarchical_loss(be, m, x, code, schedule, lw));
  return acc.result();
}

/// Metrics of `m` on `rows` rows drawn from `source` (anything with
/// `next(rows, row_matrix<T>&)`), `batch_rows` at a time.
template <cpu_scalar T, int F, k_schedule_like S, class Source>
evaluation evaluate(const cpu_backend& be, const sae<T, F>& m, Source& source, const S& schedule, std::int64_t rows,
                    std::int64_t batch_rows = 4096) {
  detail::expects<config_error>(rows >= 1 && batch_rows >= 1, "evaluate: rows=", rows, " and batch_rows=",
                                batch_rows, " must be >= 1");
  sparse_code<T> code;
  row_matrix<T> pre, x;
  loss_workspace<T> lw;
  metrics_accumulator acc;
  for (std::int64_t done = 0; done < rows;) {
    const std::int64_t b = std::min(batch_rows, rows - done);
    source.next(Eigen::Index(b), x);
    detail::expect_finite("evaluation batch", cref<T>(x));
    encode(be, m, x, schedule.k_max(), code, pre);
    acc.add(cref<T>(x), code, hierarchical_loss(be, m, x, code, schedule, lw));
    done += b;
  }
  return acc.result();
}

HSAE_NAMESPACE_END
