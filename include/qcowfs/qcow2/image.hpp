// An open qcow2 image: metadata, caches, data file and backing chain, and the views read through it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "qcowfs/cache/slice_cache.hpp"
#include "qcowfs/format/header.hpp"
#include "qcowfs/format/snapshot.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/util/task.hpp"

namespace qcowfs::qcow2 {

/// Opens the host file behind a path (the image, its data file, a backing file). Tests pass one
/// that hands out in-memory files.
using FileOpener = std::function<std::unique_ptr<io::File>(const std::string& path, bool writable)>;

struct OpenOptions {
    FileOpener opener;                           // required
    size_t l2_cache_bytes = 4u << 20;            // per image, bounds memory for L2 slices
    size_t compressed_cache_bytes = 4u << 20;    // per image, decompressed clusters kept
    unsigned max_backing_depth = 256;
};

/// The guest-visible bytes of a disk: a view of a qcow2 image, or a raw backing file.
class BlockSource {
public:
    virtual ~BlockSource() = default;
    /// Virtual size in bytes.
    virtual uint64_t size() const = 0;
    /// Fills `buf` with the disk's bytes at `offset`; bytes at or past size() read as zeros.
    /// Runs on the owning image's strand. Throws std::system_error (EIO for corrupt metadata).
    virtual Task<void> read(uint64_t offset, std::span<std::byte> buf) = 0;
};

class Image;

/// One point in time of an image: the active disk, or an internal snapshot (read-only), each
/// read through its own L1 table. Keeps its Image alive.
class View final : public BlockSource {
public:
    /// `l1` is shared with the Image for the active disk, so there is one copy and one truth.
    View(std::shared_ptr<Image> image, std::shared_ptr<const std::vector<uint64_t>> l1, uint64_t size);
    uint64_t size() const override { return size_; }
    Task<void> read(uint64_t offset, std::span<std::byte> buf) override;
    Image& image() { return *image_; }

private:
    std::shared_ptr<Image> image_;
    std::shared_ptr<const std::vector<uint64_t>> l1_;  // host-endian raw L1 entries
    uint64_t size_;
};

/// An open qcow2 image file. All methods run on one strand (the caller's); nothing is locked.
class Image : public std::enable_shared_from_this<Image> {
public:
    /// Opens `path` and, recursively, its data file and backing chain. Validates the header,
    /// extensions, L1 and snapshot tables before anything is read through them.
    /// Throws std::system_error: ENOENT etc. from opening files, ENOTSUP for encryption or
    /// unknown incompatible features or unsupported backing formats, EIO for corrupt metadata.
    static Task<std::shared_ptr<Image>> open(std::string path, OpenOptions options);

    const std::string& path() const { return path_; }
    const format::ImageMetadata& metadata() const { return meta_; }
    const format::Header& header() const { return meta_.header; }
    const std::vector<format::Snapshot>& snapshots() const { return snapshots_; }

    /// The active disk.
    std::shared_ptr<View> active();
    /// The internal snapshot with this ID (loads its L1 table). Throws ENOENT if there is none.
    Task<std::shared_ptr<View>> snapshot(const std::string& id);

    const cache::SliceCache& l2_cache() const { return *l2_cache_; }

private:
    friend class View;
    struct Private {};

public:
    Image(Private, std::string path, OpenOptions options);

private:
    /// A run of guest bytes with one source: read from a host offset, zeros, backing, compressed.
    struct Extent {
        enum class Kind { none, data, zero, backing, compressed } kind = Kind::none;
        uint64_t guest = 0;       // guest offset of the first byte
        uint64_t length = 0;
        uint64_t host = 0;        // data: host offset of the first byte; compressed: descriptor offset
        uint64_t compressed_size = 0;
    };

    Task<void> open_impl(unsigned depth, std::vector<std::string> chain);
    Task<std::vector<uint64_t>> read_l1(uint64_t offset, uint32_t entries, const char* what);
    Task<void> read_snapshot_table();
    Task<void> open_backing(unsigned depth, std::vector<std::string> chain);
    /// Opens a file the image depends on (backing or data file); failures become EIO (ENOTSUP stays).
    std::unique_ptr<io::File> open_dependency(const std::string& path, const char* what);

    /// Reads guest range [offset, offset + buf.size()) mapped through `l1`; the range must lie
    /// inside the view's size.
    Task<void> read_mapped(const std::vector<uint64_t>& l1, uint64_t offset, std::span<std::byte> buf);
    /// Reads one extent into `dst` (dst.size() == extent.length).
    Task<void> read_extent(const Extent& e, std::span<std::byte> dst);
    /// The decompressed cluster whose compressed data starts at `host` (cached).
    Task<std::shared_ptr<const std::vector<std::byte>>> decompressed(uint64_t host, uint64_t size);

    std::string path_;
    OpenOptions options_;
    std::unique_ptr<io::File> file_;
    std::unique_ptr<io::File> data_file_;  // external data file, or null (then data is in file_)
    format::ImageMetadata meta_;
    ClusterGeometry geometry_;
    std::shared_ptr<std::vector<uint64_t>> l1_;  // the active L1 table, shared with the active View
    std::vector<format::Snapshot> snapshots_;
    std::unique_ptr<cache::SliceCache> l2_cache_;
    std::shared_ptr<BlockSource> backing_;  // a RawSource, or the active View of the backing Image
    std::weak_ptr<View> active_view_;

    // Decompressed cluster cache: host offset -> cluster, LRU order in compressed_lru_.
    std::unordered_map<uint64_t, std::pair<std::shared_ptr<const std::vector<std::byte>>, std::list<uint64_t>::iterator>>
        compressed_;
    std::list<uint64_t> compressed_lru_;
};

/// A raw file used as a backing file: bytes past its end read as zeros.
class RawSource final : public BlockSource {
public:
    explicit RawSource(std::unique_ptr<io::File> file);
    uint64_t size() const override { return size_; }
    Task<void> read(uint64_t offset, std::span<std::byte> buf) override;

private:
    std::unique_ptr<io::File> file_;
    uint64_t size_;
};

/// Resolves a backing or data file name against the directory of `image_path`.
std::string resolve_relative(const std::string& image_path, const std::string& name);

}  // namespace qcowfs::qcow2
