// One open qcow2 image as a file system serves it: its views, its write-back cache and its size.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "qcowfs/cache/data_cache.hpp"
#include "qcowfs/cache/range_lock.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "qcowfs/util/task.hpp"

namespace qcowfs::qcow2 {

struct DiskOptions {
    size_t write_cache_bytes = 64u << 20;  // limit of the data cache of a writable disk
    /// Called under the image's lock with the new size after every change of the disk's size.
    std::function<void(uint64_t size)> on_resize;
};

/// What Disk::fill makes of a range (fallocate's modes).
enum class Fill {
    allocate,    // mode 0: every cluster gets a host cluster, the content stays
    zero,        // FALLOC_FL_ZERO_RANGE: reads as zeros, space the image owns is kept
    punch_hole,  // FALLOC_FL_PUNCH_HOLE: reads as zeros, space is given back
};

/// An open Image with what serving it as one file needs: the active View, the DataCache every
/// write of the active disk goes through (writable disks only), the size lock that orders writes
/// against resizes, the change counter of the periodic write-back, and the resize policy (sizes
/// in whole 512-byte sectors, cached data written back before a shrink).
///
/// Not thread-safe: every call under the image's lock (or on one strand). Calls that
/// change the disk throw EROFS on a disk that is not writable(); I/O failures are the
/// std::system_error of Image and DataCache (EIO for corrupt metadata).
class Disk {
public:
    /// Opens `path` (Image::open). With `options.writable`, a host file that refuses writing
    /// (EACCES, EROFS, EPERM) is opened read-only instead (logged with -d). Throws as Image::open.
    static Task<std::unique_ptr<Disk>> open(std::string path, OpenOptions options, DiskOptions disk_options);

    /// Serves `image`, opened with `writable` (a data cache only if the image accepts writes).
    /// `executor` is the one it was opened on.
    Disk(Executor executor, std::shared_ptr<Image> image, bool writable, DiskOptions options);
    ~Disk();
    Disk(const Disk&) = delete;
    Disk& operator=(const Disk&) = delete;

    Image& image() { return *image_; }
    /// The active disk's size now.
    uint64_t size() const { return image_->size(); }
    /// True if the active disk can be written (it then has a data cache). Never changes; a disk
    /// marked corrupt later still says true, its writes fail.
    bool writable() const { return cache_ != nullptr; }

    /// The active disk (empty `snapshot_id`) or that internal snapshot, for a handle to read.
    /// Throws ENOENT if the image has no such snapshot.
    Task<std::shared_ptr<BlockSource>> view(const std::string& snapshot_id);
    /// The enabled persistent dirty bitmap `name` as a read-only disk (Image::bitmap: ENOENT,
    /// EIO). Reads and seeks of it write the cached data back first, so that its bits show it.
    Task<std::shared_ptr<BlockSource>> bitmap_view(const std::string& name);
    /// Reads `view` (one of this disk's views): the active disk through the cache, so that cached
    /// writes show.
    Task<void> read(BlockSource& view, uint64_t offset, std::span<std::byte> buf);
    /// SEEK_DATA (`want_data`) or SEEK_HOLE on `view` from `pos`: the first offset at or after it
    /// that is data (as qemu-img map says) or a hole; the end of the disk counts as a hole.
    /// nullopt when there is none (ENXIO). Cached writes of the active disk are written back
    /// first, so that the map shows them.
    Task<std::optional<uint64_t>> seek(BlockSource& view, uint64_t pos, bool want_data);

    /// Turns copy-on-read of the active disk on or off (Image::set_copy_on_read: reads copy
    /// what they find in the backing chain into the image, in the background). A disk that is
    /// not writable() never copies; snapshots never do.
    void set_copy_on_read(bool on) { image_->set_copy_on_read(on && writable()); }

    /// Writes `data` at `offset` into the cache. Like a regular file, a write past the end grows
    /// the disk first, to the end of the write. Returns the bytes written: fewer when a shrink
    /// came in between, 0 when it left the whole write past the end (ENOSPC for the caller).
    Task<size_t> write(uint64_t offset, std::span<const std::byte> data);
    /// Makes [offset, offset + length) allocated or zero (see Fill), through the cache (Fill::allocate
    /// copies what the backing chain shows there into the image: Image::allocate). `grow`:
    /// a range past the end grows the disk first; otherwise the part past the end is ignored.
    Task<void> fill(Fill how, uint64_t offset, uint64_t length, bool grow);
    /// Changes the disk's size to `new_size` rounded up to a multiple of 512 bytes (QEMU reads a
    /// qcow2 size in whole sectors; EFBIG if that overflows). Cached data is written back before
    /// a shrink (so a refused shrink loses nothing) and changes past the new end are dropped;
    /// then the image is resized (ENOTSUP: a shrink of an image with internal snapshots).
    /// `grow_only`: leaves a disk that is already at least that big alone. Holds the size lock
    /// exclusively, so no write checks the size against a disk that is changing under it.
    Task<void> resize(uint64_t new_size, bool grow_only = false);

    /// Writes the cached data to the image (not necessarily durable). Nothing without a cache.
    Task<void> write_back();
    /// write_back(), then Image::flush: everything written so far is durable. Nothing without a
    /// cache.
    Task<void> flush();
    /// True if the disk has been changed since the start of the last successful flush() (or
    /// still holds cached data, or copy-on-read has copied into it): what the periodic
    /// write-back flushes.
    bool changed_since_flush() const;
    /// "N bytes of cached writes (guest ranges 0x..+len, ...) are lost: WHY": what is dropped
    /// with a cache whose write-back failed.
    std::string lost_writes(const std::string& why) const;
    /// Image::close: flushes and leaves the image clean. Call write_back() first; cached data
    /// still in the cache is not written.
    Task<void> close();

private:
    bool is_active(const BlockSource& view) const { return &view == static_cast<const BlockSource*>(active_.get()); }
    static bool is_bitmap(const BlockSource& view) { return dynamic_cast<const BitmapView*>(&view) != nullptr; }
    /// EROFS (the image's reason) unless the disk is writable().
    void check_writable() const;

    // Destroyed in reverse order: the cache before the view it writes to, the view before its image.
    std::shared_ptr<Image> image_;
    std::shared_ptr<View> active_;
    std::unique_ptr<cache::DataCache> cache_;  // writable disks only
    /// Writes, zeroing and allocation hold [0,1) shared; a resize holds it exclusive.
    cache::RangeLock size_lock_;
    uint64_t changes_ = 0;          // bumped by every change to the disk since it was opened
    uint64_t flushed_changes_ = 0;  // `changes_` as of the start of the last successful flush
    uint64_t flushed_copied_ = 0;   // Image::copy_stats().copied_bytes as of then
    std::function<void(uint64_t)> on_resize_;
};

}  // namespace qcowfs::qcow2
