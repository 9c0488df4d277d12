// Private helpers of format/: hex text for error messages and overflow-safe range checks.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace qcowfs::format::detail {

/// `v` as "0x..." for error messages.
inline std::string hex(uint64_t v) {
    char buf[24];
    std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
    return buf;
}

/// True if [offset, offset + length) lies inside [0, limit); never overflows.
inline bool inside(uint64_t offset, uint64_t length, uint64_t limit) {
    return length <= limit && offset <= limit - length;
}

/// True if `v` is a multiple of 2^bits (bits < 64).
inline bool aligned(uint64_t v, uint32_t bits) { return (v & ((uint64_t{1} << bits) - 1)) == 0; }

/// `v` rounded up to a multiple of 8 (v well below 2^64).
inline uint64_t round_up8(uint64_t v) { return (v + 7) & ~uint64_t{7}; }

}  // namespace qcowfs::format::detail
