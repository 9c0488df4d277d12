// Shared helpers of the libFuzzer targets: property checks that abort with a reason, errno tests.
#pragma once

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <system_error>

#include "qcowfs/format/error.hpp"

namespace qcowfs::fuzz {

/// A property of the code under test does not hold: prints why and aborts, so libFuzzer keeps
/// the input as a crash.
[[noreturn]] inline void violated(const std::string& what) {
    std::fprintf(stderr, "fuzz property violated: %s\n", what.c_str());
    std::fflush(stderr);
    std::abort();
}

/// Checks a property; the message (often built from numbers) is only made when it fails.
#define FUZZ_EXPECT(condition, message)                                 \
    do {                                                                \
        if (!(condition)) ::qcowfs::fuzz::violated(message);            \
    } while (0)

/// A std::system_error from the code under test must carry one of `allowed` errno values:
/// anything else (EINVAL escaping from a layer below, a stray errno) is a finding.
inline void expect_errno(const std::system_error& e, std::initializer_list<int> allowed, const std::string& during) {
    int code = errno_of(e);
    for (int a : allowed)
        if (code == a) return;
    violated(during + " failed with errno " + std::to_string(code) + ": " + e.what());
}

}  // namespace qcowfs::fuzz
