// Test helpers for tests that use real files and qemu-img: temporary directories, shell commands,
// whole-file reads and writes.
#pragma once

#include <doctest/doctest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "qcowfs/format/error.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/image.hpp"

namespace qcowfs::test {

namespace host {

/// True if qemu-img and qemu-io can be run (tests that need them return early otherwise).
inline bool have_qemu() {
    return std::system("qemu-img --version >/dev/null 2>&1 && qemu-io --version >/dev/null 2>&1") == 0;
}

/// A fresh directory under /tmp, removed with everything in it at the end of the scope.
struct TempDir {
    std::string path;
    explicit TempDir(const std::string& tag = "test") {
        std::string name = "/tmp/qcowfs-" + tag + "-XXXXXX";
        REQUIRE(::mkdtemp(name.data()) != nullptr);
        path = name;
    }
    ~TempDir() { std::filesystem::remove_all(path); }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    std::string operator/(const std::string& name) const {
        std::string p = path;
        p.append("/").append(name);
        return p;
    }
};

/// Runs a shell command; its output (stdout and stderr) goes to `out` if given, else is
/// discarded. Returns the exit status (-1 if it did not exit normally).
inline int sh(const std::string& cmd, std::string* out = nullptr) {
    std::string full = cmd;
    full.append(" 2>&1");
    FILE* p = ::popen(full.c_str(), "r");
    REQUIRE(p != nullptr);
    char buf[4096];
    size_t n;
    std::string text;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
    int status = ::pclose(p);
    if (out) *out = text;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

inline std::vector<std::byte> read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::byte> out(data.size());
    std::memcpy(out.data(), data.data(), data.size());
    return out;
}

inline void write_file(const std::string& path, const std::vector<std::byte>& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    REQUIRE(out.good());
}

}  // namespace host

/// Wraps a file: yields before each operation (so coroutines interleave) and, once armed, lets
/// only `ops_left` more writes, flushes, discards, allocates or truncates through; later ones fail, as if the power went.
class PowerCutFile final : public io::File {
public:
    explicit PowerCutFile(io::File& inner) : inner_(inner) {}
    Task<size_t> read_at(uint64_t offset, std::span<std::byte> buf) override {
        if (yield_) co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
        co_return co_await inner_.read_at(offset, buf);
    }
    Task<void> write_at(uint64_t offset, std::span<const std::byte> buf) override {
        step();
        co_await inner_.write_at(offset, buf);
    }
    Task<void> flush() override {
        step();
        co_await inner_.flush();
    }
    Task<void> discard(uint64_t offset, uint64_t length) override {
        step();
        co_await inner_.discard(offset, length);
    }
    Task<void> allocate(uint64_t offset, uint64_t length) override {
        step();
        co_await inner_.allocate(offset, length);
    }
    Task<void> truncate(uint64_t size) override {
        step();
        co_await inner_.truncate(size);
    }
    uint64_t size() override { return inner_.size(); }
    const std::string& name() const override { return inner_.name(); }

    bool yield_ = false;
    long ops_left = -1;  // -1: unlimited
    long ops = 0;        // writes and flushes seen

private:
    void step() {
        ++ops;
        if (ops_left == 0) fail(EIO, "simulated power cut");
        if (ops_left > 0) --ops_left;
    }
    io::File& inner_;
};

/// Runs `body` (it may fail at the power cut), tells how many writes and flushes `cut` saw,
/// then cuts the power: what `mem` holds afterwards.
template <class Body>
std::vector<std::byte> after_power_cut(io::MemFile& mem, const PowerCutFile& cut, long* ops_seen, Body body) {
    try {
        body();
    } catch (const std::system_error&) {
    }
    if (ops_seen) *ops_seen = cut.ops;
    mem.crash();
    return mem.content();
}

/// Options that open an image writable over `mem` through a PowerCutFile, which `cut` then
/// points at (both must outlive the image).
inline qcow2::OpenOptions power_cut_options(io::MemFile& mem, PowerCutFile*& cut) {
    qcow2::OpenOptions o;
    o.writable = true;
    o.opener = [&mem, &cut](const std::string&, bool) {
        auto f = std::make_unique<PowerCutFile>(mem);
        cut = f.get();
        return f;
    };
    return o;
}

}  // namespace qcowfs::test
