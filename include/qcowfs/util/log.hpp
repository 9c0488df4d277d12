// Process-wide logging: one line per event, to stderr, a file, or syslog.
#pragma once

#include <string>

namespace qcowfs::log {

enum class Sink { stderr_stream, file, syslog };

/// Chooses where lines go. For Sink::file, `path` is opened for appending. Throws
/// std::system_error if the file cannot be opened. Call before starting threads.
void configure(Sink sink, const std::string& path = {});
/// Enables per-request debug lines (the -d option).
void set_debug(bool on);
bool debug_enabled();

void info(const std::string& line);
void error(const std::string& line);
void debug(const std::string& line);

}  // namespace qcowfs::log
