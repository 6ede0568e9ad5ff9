// SPDX-License-Identifier: Apache-2.0
// Consumer of the build-tree package: the headers it compiles against carry the version
// that find_package(hsae) reported for the package.
#include <hsae/hsae.hpp>

#include <cstdio>
#include <cstring>

int main() {
  std::printf("hsae %s from the package (version file: %s)\n", hsae::version_string, HSAE_CONSUMER_PACKAGE_VERSION);
  return std::strcmp(hsae::version_string, HSAE_CONSUMER_PACKAGE_VERSION) == 0 ? 0 : 1;
}
