// The -p progress line on stderr: bytes done of the total, rate and time left, updated in place.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace qcowfs::stream {

/// Prints "VERB: 1.2 GiB of 2.0 GiB (60%), 350 MiB/s, 0:03 left" to stderr. On a terminal the
/// line is rewritten in place (\r) at most 10 times a second; otherwise a new line is printed at
/// most once every 2 seconds. Disabled: does nothing.
class Progress {
public:
    Progress(bool enabled, std::string verb);
    /// The total in bytes (0: unknown, then only bytes done and the rate are shown).
    void set_total(uint64_t total) { total_ = total; }
    /// Reports `done` bytes; prints when the time has come. `extra` is appended (e.g. "read 1.1 GiB").
    void update(uint64_t done, const std::string& extra = {});
    /// Prints the final line (with a newline) if enabled.
    void finish(uint64_t done, const std::string& extra = {});

private:
    std::string line(uint64_t done, const std::string& extra) const;

    bool enabled_;
    bool tty_;
    std::string verb_;
    uint64_t total_ = 0;
    std::chrono::steady_clock::time_point start_, last_;
    size_t last_len_ = 0;
};

/// True while a progress line has been drawn in place and not ended: an error message must start
/// on a new line.
bool progress_line_open();

/// "1.5 GiB", "12.0 MiB", "512 B".
std::string human_bytes(double bytes);

}  // namespace qcowfs::stream
