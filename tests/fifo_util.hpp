// SPDX-License-Identifier: Apache-2.0
// Opening a named pipe (FIFO) with a reader that must refuse it at once, without a test
// that hangs when the reader blocks in open() instead.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <exception>
#include <filesystem>
#include <future>
#include <string>

#include <catch2/catch.hpp>

#include "test_util.hpp"

namespace hsae_test {

/// Makes a FIFO at `fifo`, runs `open_it` (a reader constructed on that path) on another
/// thread and returns the message of the `E` it throws ("<no exception>" or
/// "<wrong exception type> ..." otherwise). If the reader is still blocked after
/// `seconds`, the FIFO's write end is opened once to release it, and the test fails.
template <class E, class F>
std::string fifo_open_message(const std::filesystem::path& fifo, F open_it, int seconds = 5) {
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  auto opening = std::async(std::launch::async, [open_it]() { return message_of<E>(open_it); });
  if (opening.wait_for(std::chrono::seconds(seconds)) != std::future_status::ready) {
    // A blocked open() of the read end returns once a writer appears: open and close one.
    const int w = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (w >= 0) ::close(w);
    const std::string late = opening.get();
    FAIL("opening the FIFO '" << fifo.string() << "' blocked for " << seconds << " s (then: " << late << ")");
  }
  return opening.get();
}

}  // namespace hsae_test
