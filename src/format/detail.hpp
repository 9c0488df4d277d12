// Private helpers of format/: hex text for error messages and overflow-safe range checks.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

#include "qcowfs/format/error.hpp"

namespace qcowfs::format::detail {

using qcowfs::hex;

/// True if [offset, offset + length) lies inside [0, limit); never overflows.
inline bool inside(uint64_t offset, uint64_t length, uint64_t limit) {
    return length <= limit && offset <= limit - length;
}

/// True if `v` is a multiple of 2^bits (bits < 64).
inline bool aligned(uint64_t v, uint32_t bits) { return (v & ((uint64_t{1} << bits) - 1)) == 0; }

/// `v` rounded up to a multiple of 8 (v well below 2^64).
inline uint64_t round_up8(uint64_t v) { return (v + 7) & ~uint64_t{7}; }

}  // namespace qcowfs::format::detail
