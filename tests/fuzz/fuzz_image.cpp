// libFuzzer target: qcow2::Image over in-memory files — open, read the whole disk and every
// snapshot, write, close, reopen, read back, and check the refcounts with the verify code.
//
// The input is the image file (seeds: tests/fuzz/corpus/). Other files it names are in memory
// too: a name ending in .qcow2 is a tiny empty qcow2 image, anything else (raw backing file,
// external data file) a 64 KiB raw file with a byte pattern. Properties checked:
//   - open, read, write and close fail only with std::system_error and an expected errno
//     (EIO for damaged metadata, ENOTSUP for unsupported features, EROFS for refused writes,
//     ENOSPC when a file would grow past 64 MiB, the fuzzer's disk);
//   - after a write that succeeded and a close, the image opens again, reads the written bytes
//     back, reads every other range it read before the write unchanged (snapshots included; not
//     checked with an external data file, whose clusters may alias undetectably),
//     is neither dirty nor corrupt, and no used cluster has a refcount below its references.
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fuzz_support.hpp"
#include "qcowfs/format/header.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "qcowfs/qcow2/rebuild.hpp"
#include "qcowfs/qcow2/refcount.hpp"

using namespace qcowfs;
using fuzz::expect_errno;

namespace {

const std::string kImagePath = "/fuzz/image.qcow2";
constexpr uint64_t kReadBudget = 2 << 20;  // guest bytes read per view
constexpr uint64_t kChunk = 64 << 10;       // bytes per read request
constexpr size_t kMaxSnapshots = 4;         // snapshot views read per input

/// Forwards to a MemFile that outlives the Image holding this handle (so the bytes can be
/// reopened and inspected after the image is closed). The host disk is small: a file may not
/// grow past kMaxHostFile (ENOSPC, as a full disk), since a MemFile holds every byte up to its
/// end while a real file would be sparse (a data cluster at 3 GiB of a raw data file is legal).
class SharedFile final : public io::File {
public:
    static constexpr uint64_t kMaxHostFile = 64 << 20;

    explicit SharedFile(std::shared_ptr<io::MemFile> f) : f_(std::move(f)) {}
    Task<size_t> read_at(uint64_t o, std::span<std::byte> b) override { co_return co_await f_->read_at(o, b); }
    Task<void> write_at(uint64_t o, std::span<const std::byte> b) override {
        check_room(o, b.size());
        co_await f_->write_at(o, b);
    }
    Task<void> flush() override { co_await f_->flush(); }
    Task<void> discard(uint64_t o, uint64_t n) override { co_await f_->discard(o, n); }
    Task<void> allocate(uint64_t o, uint64_t n) override {
        check_room(o, n);
        co_await f_->allocate(o, n);
    }
    Task<void> truncate(uint64_t s) override {
        check_room(s, 0);
        co_await f_->truncate(s);
    }
    uint64_t size() override { return f_->size(); }
    const std::string& name() const override { return f_->name(); }

private:
    void check_room(uint64_t offset, uint64_t length) {
        if (offset > kMaxHostFile || length > kMaxHostFile - offset)
            fail(ENOSPC, "the fuzzer's host disk is full (" + name() + " would exceed 64 MiB)");
    }
    std::shared_ptr<io::MemFile> f_;
};

/// A valid, empty qcow2 image of 64 KiB with 512-byte clusters (for backing files named *.qcow2).
std::vector<std::byte> tiny_qcow2() {
    format::ImageMetadata m;
    m.header.cluster_bits = 9;
    m.header.size = 64 << 10;
    m.header.l1_size = 1;
    m.header.l1_table_offset = 512;
    m.header.refcount_table_offset = 1024;
    m.header.refcount_table_clusters = 1;
    auto bytes = format::serialize_metadata(m);
    bytes.resize(1536);
    return bytes;
}

/// The in-memory host: the image and whatever it names, created on first open.
struct Host {
    std::vector<std::byte> image;
    std::map<std::string, std::shared_ptr<io::MemFile>> files;

    std::shared_ptr<io::MemFile> file(const std::string& path) {
        auto& f = files[path];
        if (f) return f;
        if (path == kImagePath) {
            f = std::make_shared<io::MemFile>(path, image);
        } else if (path.size() >= 6 && path.compare(path.size() - 6, 6, ".qcow2") == 0) {
            f = std::make_shared<io::MemFile>(path, tiny_qcow2());
        } else {
            std::vector<std::byte> raw(64 << 10);
            for (size_t i = 0; i < raw.size(); ++i) raw[i] = std::byte(uint8_t(i * 31 + 7));
            f = std::make_shared<io::MemFile>(path, std::move(raw));
        }
        return f;
    }
    qcow2::OpenOptions options(bool writable) {
        qcow2::OpenOptions o;
        o.opener = [this](const std::string& path, bool) -> std::unique_ptr<io::File> {
            return std::make_unique<SharedFile>(file(path));
        };
        o.writable = writable;
        o.l2_cache_bytes = 64 << 10;
        o.compressed_cache_bytes = 64 << 10;
        o.max_backing_depth = 8;
        return o;
    }
};

template <class T>
T run(asio::io_context& io, Task<T> task) {
    auto future = asio::co_spawn(io, std::move(task), asio::use_future);
    io.restart();
    io.run();
    return future.get();
}

std::shared_ptr<qcow2::Image> open(asio::io_context& io, Host& host, bool writable) {
    return run(io, qcow2::Image::open(kImagePath, host.options(writable)));
}

/// Guest ranges worth reading in a view: the start of the disk, and what each L1 entry of `l1`
/// (raw entries read from the image bytes) maps, up to kReadBudget bytes; chunk-aligned.
std::vector<uint64_t> chunks_to_read(const std::vector<std::byte>& file, uint64_t l1_offset, uint32_t l1_size,
                                     uint64_t disk_size, const ClusterGeometry& g) {
    std::vector<uint64_t> out;
    uint64_t budget = kReadBudget;
    auto add_range = [&](uint64_t from, uint64_t to) {
        to = std::min(to, disk_size);
        for (uint64_t at = from / kChunk * kChunk; at < to && budget > 0; at += kChunk) {
            if (!out.empty() && out.back() >= at) continue;
            out.push_back(at);
            budget -= std::min(budget, kChunk);
        }
    };
    add_range(0, 256 << 10);
    const uint64_t coverage = g.cluster_size() * g.l2_entries();
    for (uint32_t i = 0; i < l1_size && budget > 0; ++i) {
        uint64_t at = l1_offset + 8 * uint64_t{i};
        if (at + 8 > file.size()) break;
        if (format::load_be64(file.data() + at) == 0) continue;
        add_range(i * coverage, (i + 1) * coverage);
    }
    return out;
}

/// What a view read: chunk offset -> bytes (absent: the read failed with EIO).
using Reads = std::map<uint64_t, std::vector<std::byte>>;

Reads read_view(asio::io_context& io, qcow2::BlockSource& view, const std::vector<uint64_t>& chunks) {
    Reads reads;
    for (uint64_t at : chunks) {
        std::vector<std::byte> buf(kChunk);
        try {
            run(io, [&]() -> Task<int> {
                co_await view.read(at, buf);
                co_return 0;
            }());
            reads[at] = std::move(buf);
        } catch (const std::system_error& e) {
            expect_errno(e, {EIO}, "read at " + std::to_string(at));
        }
    }
    // One unaligned read across the end of the disk: clipped, and zeros past it.
    if (view.size() > 0) {
        std::vector<std::byte> tail(777, std::byte{0xee});
        try {
            run(io, [&]() -> Task<int> {
                co_await view.read(view.size() - 1, tail);
                co_return 0;
            }());
            for (size_t i = 1; i < tail.size(); ++i) FUZZ_EXPECT(tail[i] == std::byte{0}, "bytes past the end are not zeros");
        } catch (const std::system_error& e) {
            expect_errno(e, {EIO}, "read at the end");
        }
    }
    return reads;
}

struct Snapshot {
    std::string id;
    std::vector<uint64_t> chunks;
    Reads reads;
};

/// Everything a read-only open shows: active disk and the first snapshots.
struct Seen {
    uint64_t size = 0;
    std::vector<uint64_t> chunks;
    Reads active;
    std::vector<Snapshot> snapshots;
};

std::optional<Seen> read_everything(asio::io_context& io, Host& host) {
    std::shared_ptr<qcow2::Image> image;
    try {
        image = open(io, host, false);
    } catch (const std::system_error& e) {
        expect_errno(e, {EIO, ENOTSUP}, "read-only open");
        return std::nullopt;
    }
    Seen seen;
    const auto& h = image->header();
    auto file = host.file(kImagePath)->content();
    seen.size = image->size();
    seen.chunks = chunks_to_read(file, h.l1_table_offset, h.l1_size, seen.size, h.geometry());
    seen.active = read_view(io, *image->active(), seen.chunks);
    for (const auto& s : image->snapshots()) {
        if (seen.snapshots.size() == kMaxSnapshots) break;
        std::shared_ptr<qcow2::View> view;
        try {
            view = run(io, image->snapshot(s.id));
        } catch (const std::system_error& e) {
            expect_errno(e, {EIO}, "opening snapshot " + s.id);
            continue;
        }
        Snapshot snap{s.id, chunks_to_read(file, s.l1_table_offset, s.l1_size, view->size(), h.geometry()), {}};
        snap.reads = read_view(io, *view, snap.chunks);
        seen.snapshots.push_back(std::move(snap));
    }
    return seen;
}

/// Where the write goes and what it writes, chosen from the input's bytes.
struct Write {
    uint64_t offset = 0;
    std::vector<std::byte> data;
};

Write choose_write(const uint8_t* data, size_t size, uint64_t disk_size, uint64_t cluster_size) {
    uint64_t hash = 1469598103934665603ULL;
    for (size_t i = 0; i < size; ++i) hash = (hash ^ data[i]) * 1099511628211ULL;
    Write w;
    uint64_t span = std::min<uint64_t>(disk_size, 512 << 10);
    w.offset = hash % span;
    uint64_t len = 1 + (hash >> 32) % (2 * std::min<uint64_t>(cluster_size, 64 << 10));
    w.data.resize(std::min(len, disk_size - w.offset));
    for (size_t i = 0; i < w.data.size(); ++i) w.data[i] = std::byte(uint8_t(0xa5 ^ i));
    return w;
}

/// Writes `w` through a writable open and closes the image. True if the write and close succeeded.
bool write_and_close(asio::io_context& io, Host& host, const Write& w) {
    std::shared_ptr<qcow2::Image> image;
    try {
        image = open(io, host, true);
    } catch (const std::system_error& e) {
        expect_errno(e, {EIO, ENOTSUP}, "writable open");
        return false;
    }
    try {
        run(io, [&]() -> Task<int> {
            co_await image->write(w.offset, w.data);
            co_await image->flush();
            co_await image->close();
            co_return 0;
        }());
        return true;
    } catch (const std::system_error& e) {
        expect_errno(e, {EIO, EROFS, ENOTSUP, ENOSPC}, "write");
    }
    // Whatever failed, the image must still be closable and then open (or fail) cleanly.
    try {
        run(io, [&]() -> Task<int> {
            co_await image->close();
            co_return 0;
        }());
    } catch (const std::system_error& e) {
        expect_errno(e, {EIO, EROFS, ENOSPC}, "close after a failed write");
    }
    return false;
}

void compare(const Reads& before, const Reads& after, const Write* w, const std::string& what) {
    for (const auto& [at, bytes] : before) {
        auto it = after.find(at);
        FUZZ_EXPECT(it != after.end(), what + ": chunk at " + std::to_string(at) + " read before the write, fails after");
        for (size_t i = 0; i < bytes.size(); ++i) {
            uint64_t guest = at + i;
            if (w && guest >= w->offset && guest < w->offset + w->data.size()) continue;
            FUZZ_EXPECT(it->second[i] == bytes[i], what + ": byte at " + std::to_string(guest) + " changed by the write");
        }
    }
}

/// The reopened image after a successful write: written bytes back, nothing else changed, clean
/// header, refcounts cover every reference.
void verify_after_write(asio::io_context& io, Host& host, const Seen& seen, const Write& w) {
    std::shared_ptr<qcow2::Image> image;
    try {
        image = open(io, host, false);
    } catch (const std::system_error& e) {
        fuzz::violated(std::string("image written successfully does not open again: ") + e.what());
    }
    const auto& h = image->header();
    FUZZ_EXPECT(!h.dirty(), "image is dirty after close");
    FUZZ_EXPECT(!h.corrupt(), "image marked corrupt though the write succeeded");
    FUZZ_EXPECT(image->size() == seen.size, "disk size changed by a write inside it");

    std::vector<std::byte> back(w.data.size());
    try {
        run(io, [&]() -> Task<int> {
            co_await image->active()->read(w.offset, back);
            co_return 0;
        }());
    } catch (const std::system_error& e) {
        fuzz::violated(std::string("written range does not read back: ") + e.what());
    }
    FUZZ_EXPECT(back == w.data, "written bytes do not read back");
    // An external data file has no refcounts: two L2 entries naming one data cluster cannot be
    // told from a consistent image before the write (QEMU writes through such an alias too), so
    // there the rest of the disk may change. Everywhere else a write changes only its range.
    Reads active_after = read_view(io, *image->active(), seen.chunks);
    if (!h.has_external_data_file()) compare(seen.active, active_after, &w, "active disk");
    for (const auto& s : seen.snapshots) {
        std::shared_ptr<qcow2::View> view;
        try {
            view = run(io, image->snapshot(s.id));
        } catch (const std::system_error& e) {
            fuzz::violated("snapshot " + s.id + " does not open after the write: " + e.what());
        }
        compare(s.reads, read_view(io, *view, s.chunks), nullptr, "snapshot " + s.id);
    }

    // The verify code: every cluster's refcount at least its references.
    auto file = host.file(kImagePath);
    try {
        auto under = run(io, [&]() -> Task<std::optional<std::pair<uint64_t, uint64_t>>> {
            qcow2::Refcounts refcounts(*file, h, 1 << 20);
            co_await refcounts.load();
            std::optional<std::pair<uint64_t, uint64_t>> found;
            co_await qcow2::count_references(
                *file, image->metadata(), image->snapshots(), qcow2::ScanLimits{}, refcounts.block_entries(),
                [&](uint64_t first, std::vector<uint64_t>& counts, bool last) -> Task<void> {
                    if (!found) found = co_await refcounts.find_undercounted(first, counts, last);
                });
            co_return found;
        }());
        FUZZ_EXPECT(!under, "cluster " + std::to_string(under->first) + " has refcount " +
                                std::to_string(under->second) + ", below its references, after the write");
    } catch (const std::system_error& e) {
        fuzz::violated(std::string("refcount check of the written image failed: ") + e.what());
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    asio::io_context io;
    Host host;
    host.image.assign(reinterpret_cast<const std::byte*>(data), reinterpret_cast<const std::byte*>(data) + size);

    std::optional<Seen> seen = read_everything(io, host);
    if (!seen || seen->size == 0) return 0;

    // A fresh host for the write: the same input, untouched data and backing files.
    Host written;
    written.image = host.image;
    Write w = choose_write(data, size, seen->size, uint64_t{1} << format::parse_header(host.image, size).cluster_bits);
    if (!write_and_close(io, written, w)) {
        // Nothing lost, never crash: a failed write leaves an image that opens and reads cleanly or
        // fails with EIO.
        read_everything(io, written);
        return 0;
    }
    verify_after_write(io, written, *seen, w);
    return 0;
}
