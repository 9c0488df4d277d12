// Plain POSIX I/O for qcowfs-stream: whole-buffer reads and writes, temp files, what a descriptor is.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace qcowfs::stream {

/// Reads until `out` is full or end of file; returns the bytes read (less than out.size() only at
/// end of file). Retries EINTR. Throws std::system_error naming `what` on a read error.
size_t read_full(int fd, std::span<std::byte> out, const char* what);
/// Writes all of `data` at the current position (pipes, terminals, files). Throws on error.
void write_all(int fd, std::span<const std::byte> data, const char* what);
/// Positioned variants; pread_all treats a short read (end of file) as an error.
void pwrite_all(int fd, std::span<const std::byte> data, uint64_t offset, const char* what);
void pread_all(int fd, std::span<std::byte> out, uint64_t offset, const char* what);

/// Creates an anonymous read-write file in `dir` (O_TMPFILE, or mkstemp + unlink): it vanishes
/// when closed or when the process dies. Throws std::system_error naming the directory.
int open_temp_file(const std::string& dir, const char* tag);
/// The spill directory default: $TMPDIR, else /tmp.
std::string default_temp_dir();

enum class FdKind { regular, block_device, other };  // other: pipe, socket, terminal, ...
FdKind fd_kind(int fd);
/// When `fd` is a pipe, asks the kernel for a pipe buffer of `bytes` (capped by
/// /proc/sys/fs/pipe-max-size for unprivileged users); a refusal is not an error. A large buffer
/// lets the writer on the other end run ahead with fewer wake-ups.
void grow_pipe(int fd, size_t bytes);
/// Size of a regular file or block device.
uint64_t fd_size(int fd);

/// True when every byte of `data` is zero.
bool all_zero(std::span<const std::byte> data);

/// Parses "256M", "1G", "4096", "64k" (binary units). Throws std::invalid_argument.
uint64_t parse_size(const std::string& text);

}  // namespace qcowfs::stream
