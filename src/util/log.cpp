// Process-wide logging: timestamps each line and writes it whole under a mutex.
#include "qcowfs/util/log.hpp"

#include <syslog.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <system_error>

namespace qcowfs::log {
namespace {

std::mutex mutex;  // guards sink, file
Sink sink = Sink::stderr_stream;
FILE* file = nullptr;
std::atomic<bool> debug_on{false};

void write(int priority, const char* level, const std::string& line) {
    std::lock_guard lock(mutex);
    if (sink == Sink::syslog) {
        ::syslog(priority, "%s", line.c_str());
        return;
    }
    FILE* out = sink == Sink::file && file ? file : stderr;
    auto now = std::chrono::system_clock::now();
    std::time_t t = std::chrono::system_clock::to_time_t(now);
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
    std::tm tm{};
    localtime_r(&t, &tm);
    char stamp[32];
    std::strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &tm);
    std::fprintf(out, "%s.%03d qcowfs %s: %s\n", stamp, static_cast<int>(ms), level, line.c_str());
    std::fflush(out);
}

}  // namespace

void configure(Sink s, const std::string& path) {
    std::lock_guard lock(mutex);
    if (s == Sink::file) {
        FILE* f = std::fopen(path.c_str(), "ae");
        if (!f) throw std::system_error(errno, std::generic_category(), "cannot open log file " + path);
        if (file) std::fclose(file);
        file = f;
    }
    if (s == Sink::syslog) ::openlog("qcowfs", LOG_PID, LOG_DAEMON);
    sink = s;
}

void set_debug(bool on) { debug_on = on; }
bool debug_enabled() { return debug_on; }

void info(const std::string& line) { write(LOG_INFO, "info", line); }
void error(const std::string& line) { write(LOG_ERR, "error", line); }
void debug(const std::string& line) {
    if (debug_on) write(LOG_DEBUG, "debug", line);
}

}  // namespace qcowfs::log
