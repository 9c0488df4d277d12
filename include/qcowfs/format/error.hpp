// The one error convention of qcowfs: std::system_error carrying an errno value and a reason.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <string>
#include <system_error>

namespace qcowfs {

/// Throws std::system_error(errno_value, generic_category, what). Used by every layer; the FUSE
/// boundary turns code().value() into the errno of the reply and logs what().
[[noreturn]] inline void fail(int errno_value, const std::string& what) {
    throw std::system_error(std::error_code(errno_value, std::generic_category()), what);
}

/// `v` as "0x..." for error messages (offsets and raw entries read best in hex).
inline std::string hex(uint64_t v) {
    char buf[24];
    std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
    return buf;
}

/// Metadata that violates the qcow2 specification: reads of the image return EIO.
[[noreturn]] inline void corrupt(const std::string& what) { fail(EIO, what); }

/// The errno of an exception caught at a boundary (EIO when it carries none).
inline int errno_of(const std::system_error& e) {
    return e.code().category() == std::generic_category() || e.code().category() == std::system_category()
               ? e.code().value()
               : EIO;
}

/// Text of a system_error without the ": <strerror>" suffix the standard library appends.
inline std::string reason_of(const std::system_error& e) {
    std::string w = e.what();
    std::string suffix = ": " + e.code().message();
    if (w.size() >= suffix.size() && w.compare(w.size() - suffix.size(), suffix.size(), suffix) == 0)
        w.resize(w.size() - suffix.size());
    return w;
}

/// Text of a system_error for a log line: its reason and the errno's own words,
/// "write of /x at 4096 failed (No space left on device)".
inline std::string describe(const std::system_error& e) { return reason_of(e) + " (" + e.code().message() + ")"; }

}  // namespace qcowfs
