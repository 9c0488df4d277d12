// Progress line formatting and rate limiting.
#include "stream/progress.hpp"

#include <unistd.h>

#include <cstdio>

namespace qcowfs::stream {

namespace {
bool g_line_open = false;  // main thread only
}

bool progress_line_open() { return g_line_open; }

std::string human_bytes(double bytes) {
    static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    int u = 0;
    while (bytes >= 1024 && u < 5) {
        bytes /= 1024;
        ++u;
    }
    char buf[32];
    std::snprintf(buf, sizeof buf, u ? "%.1f %s" : "%.0f %s", bytes, units[u]);
    return buf;
}

Progress::Progress(bool enabled, std::string verb)
    : enabled_(enabled), tty_(::isatty(STDERR_FILENO)), verb_(std::move(verb)),
      start_(std::chrono::steady_clock::now()), last_(start_) {}

std::string Progress::line(uint64_t done, const std::string& extra) const {
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    double rate = secs > 0 ? done / secs : 0;
    std::string s = verb_ + ": " + human_bytes(static_cast<double>(done));
    if (total_) {
        char pct[16];
        std::snprintf(pct, sizeof pct, " (%.0f%%)", 100.0 * static_cast<double>(done) / static_cast<double>(total_));
        s += " of " + human_bytes(static_cast<double>(total_)) + pct;
    }
    s += ", " + human_bytes(rate) + "/s";
    if (total_ && rate > 0 && done < total_) {
        auto left = static_cast<unsigned long long>((total_ - done) / rate + 0.5);
        char buf[48];
        std::snprintf(buf, sizeof buf, ", %llu:%02llu left", left / 60, left % 60);
        s += buf;
    }
    if (!extra.empty()) s += ", " + extra;
    return s;
}

void Progress::update(uint64_t done, const std::string& extra) {
    if (!enabled_) return;
    auto now = std::chrono::steady_clock::now();
    if (now - last_ < (tty_ ? std::chrono::milliseconds(100) : std::chrono::milliseconds(2000))) return;
    last_ = now;
    std::string s = line(done, extra);
    if (tty_) {
        size_t len = s.size();
        if (len < last_len_) s.append(last_len_ - len, ' ');
        last_len_ = len;
        std::fprintf(stderr, "\r%s", s.c_str());
        g_line_open = true;
    } else {
        std::fprintf(stderr, "%s\n", s.c_str());
    }
    std::fflush(stderr);
}

void Progress::finish(uint64_t done, const std::string& extra) {
    if (!enabled_) return;
    std::string s = line(done, extra);
    if (tty_ && s.size() < last_len_) s.append(last_len_ - s.size(), ' ');
    std::fprintf(stderr, tty_ ? "\r%s\n" : "%s\n", s.c_str());
    g_line_open = false;
    std::fflush(stderr);
}

}  // namespace qcowfs::stream
