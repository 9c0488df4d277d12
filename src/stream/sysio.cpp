// POSIX helpers for qcowfs-stream; every failure is a std::system_error carrying errno.
#include "stream/sysio.hpp"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "qcowfs/format/error.hpp"

namespace qcowfs::stream {

size_t read_full(int fd, std::span<std::byte> out, const char* what) {
    size_t got = 0;
    while (got < out.size()) {
        ssize_t n = ::read(fd, out.data() + got, out.size() - got);
        if (n < 0) {
            if (errno == EINTR) continue;
            fail(errno, std::string("cannot read ") + what);
        }
        if (n == 0) break;
        got += static_cast<size_t>(n);
    }
    return got;
}

void write_all(int fd, std::span<const std::byte> data, const char* what) {
    while (!data.empty()) {
        ssize_t n = ::write(fd, data.data(), data.size());
        if (n < 0) {
            if (errno == EINTR) continue;
            fail(errno, std::string("cannot write ") + what);
        }
        data = data.subspan(static_cast<size_t>(n));
    }
}

void pwrite_all(int fd, std::span<const std::byte> data, uint64_t offset, const char* what) {
    while (!data.empty()) {
        ssize_t n = ::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset));
        if (n < 0) {
            if (errno == EINTR) continue;
            fail(errno, std::string("cannot write ") + what + " at offset " + hex(offset));
        }
        data = data.subspan(static_cast<size_t>(n));
        offset += static_cast<uint64_t>(n);
    }
}

void pread_all(int fd, std::span<std::byte> out, uint64_t offset, const char* what) {
    while (!out.empty()) {
        ssize_t n = ::pread(fd, out.data(), out.size(), static_cast<off_t>(offset));
        if (n < 0) {
            if (errno == EINTR) continue;
            fail(errno, std::string("cannot read ") + what + " at offset " + hex(offset));
        }
        if (n == 0) fail(EIO, std::string("unexpected end of ") + what + " at offset " + hex(offset));
        out = out.subspan(static_cast<size_t>(n));
        offset += static_cast<uint64_t>(n);
    }
}

int open_temp_file(const std::string& dir, const char* tag) {
    int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd >= 0) return fd;
    std::string pattern = dir + "/qcowfs-stream-" + tag + ".XXXXXX";
    fd = ::mkostemp(pattern.data(), O_CLOEXEC);
    if (fd < 0) fail(errno, "cannot create a temporary file in " + dir);
    ::unlink(pattern.c_str());
    return fd;
}

std::string default_temp_dir() {
    const char* t = std::getenv("TMPDIR");
    return t && *t ? t : "/tmp";
}

FdKind fd_kind(int fd) {
    struct stat st{};
    if (::fstat(fd, &st) != 0) return FdKind::other;
    if (S_ISREG(st.st_mode)) return FdKind::regular;
    if (S_ISBLK(st.st_mode)) return FdKind::block_device;
    return FdKind::other;
}

void grow_pipe(int fd, size_t bytes) {
    struct stat st{};
    if (::fstat(fd, &st) != 0 || !S_ISFIFO(st.st_mode)) return;
    for (size_t want = bytes; want >= (64u << 10); want /= 2)
        if (::fcntl(fd, F_SETPIPE_SZ, static_cast<int>(want)) >= 0) return;
}

uint64_t fd_size(int fd) {
    struct stat st{};
    if (::fstat(fd, &st) != 0) fail(errno, "cannot stat input");
    if (S_ISBLK(st.st_mode)) {
        uint64_t bytes = 0;
        if (::ioctl(fd, BLKGETSIZE64, &bytes) != 0) fail(errno, "cannot get the size of the block device");
        return bytes;
    }
    return static_cast<uint64_t>(st.st_size);
}

bool all_zero(std::span<const std::byte> data) {
    // Byte 0 is zero and every byte equals its successor: memcmp is vectorised, a loop is not.
    if (data.empty()) return true;
    return data[0] == std::byte{0} && std::memcmp(data.data(), data.data() + 1, data.size() - 1) == 0;
}

uint64_t parse_size(const std::string& text) {
    size_t used = 0;
    unsigned long long v = std::stoull(text, &used, 10);
    std::string unit = text.substr(used);
    uint64_t mult = 1;
    if (unit.empty() || unit == "B" || unit == "b") mult = 1;
    else if (unit == "K" || unit == "k" || unit == "KiB") mult = 1ull << 10;
    else if (unit == "M" || unit == "m" || unit == "MiB") mult = 1ull << 20;
    else if (unit == "G" || unit == "g" || unit == "GiB") mult = 1ull << 30;
    else if (unit == "T" || unit == "t" || unit == "TiB") mult = 1ull << 40;
    else throw std::invalid_argument("bad size unit in '" + text + "'");
    if (v > UINT64_MAX / mult) throw std::invalid_argument("size too large: '" + text + "'");
    return v * mult;
}

}  // namespace qcowfs::stream
