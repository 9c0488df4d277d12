// An open qcow2 image: metadata, caches, data file and backing chain, and the views read through it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <list>
#include <map>
#include <set>
#include <memory>
#include <span>
#include <string>
#include <system_error>
#include <optional>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "qcowfs/cache/data_cache.hpp"
#include "qcowfs/cache/range_lock.hpp"
#include "qcowfs/cache/slice_cache.hpp"
#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/header.hpp"
#include "qcowfs/format/snapshot.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/bitmaps.hpp"
#include "qcowfs/qcow2/overlap.hpp"
#include "qcowfs/qcow2/refcount.hpp"
#include "qcowfs/util/async_event.hpp"
#include "qcowfs/util/async_mutex.hpp"
#include "qcowfs/util/task.hpp"

namespace qcowfs::qcow2 {

/// Opens the host file behind a path (the image, its data file, a backing file). Tests pass one
/// that hands out in-memory files.
using FileOpener = std::function<std::unique_ptr<io::File>(const std::string& path, bool writable)>;

struct OpenOptions {
    FileOpener opener;                           // required
    size_t l2_cache_bytes = 4u << 20;            // per image, bounds memory for L2 (and read-only L1) slices
    size_t compressed_cache_bytes = 4u << 20;    // per image, decompressed clusters kept
    unsigned max_backing_depth = 256;
    /// Memory for the reference counters of a refcount rebuild or check (8 bytes per host
    /// cluster); more clusters are counted in several passes over the metadata.
    uint64_t refcount_memory = 32u << 20;
    /// Metadata a rebuild or check of the refcounts may read before the first write (every read
    /// counts at least 4 KiB). Past it, a dirty image is not written (EIO), and a clean image is
    /// written without the check (the overlap check still guards its metadata).
    uint64_t scan_limit = uint64_t{1} << 30;
    /// Copy-on-read: bytes of read data that copies into this image may hold while they wait or
    /// run; a read finding more pending is not copied (Image::set_copy_on_read).
    size_t copy_on_read_pending_bytes = 32u << 20;
    /// Open the image (and its external data file) read-write so that the active disk can be
    /// written. Nothing on disk changes until the first write. Backing files stay read-only.
    bool writable = false;
    /// Called (under the image's lock) with a reason when the image stops accepting writes because
    /// its metadata was found inconsistent (the corrupt bit has been set).
    std::function<void(const std::string& reason)> on_corrupt;
};

/// A run of guest bytes of one allocation status (see BlockSource::map).
struct MapRun {
    bool data = false;  // true: data (qemu-img map's "data"); false: reads as zeros (a hole)
    uint64_t end = 0;   // first byte after the run
};

/// The guest-visible bytes of a disk: a view of a qcow2 image, or a raw backing file.
class BlockSource {
public:
    virtual ~BlockSource() = default;
    /// Virtual size in bytes.
    virtual uint64_t size() const = 0;
    /// Fills `buf` with the disk's bytes at `offset`; bytes at or past size() read as zeros.
    /// Runs under the owning image's lock. Throws std::system_error (EIO for corrupt metadata).
    virtual Task<void> read(uint64_t offset, std::span<std::byte> buf) = 0;
    /// read() for bytes about to be copied into another image (a copy-on-write above this
    /// disk): host files may read them around the page cache (io::File::read_to_copy).
    virtual Task<void> read_to_copy(uint64_t offset, std::span<std::byte> buf) { co_await read(offset, buf); }
    /// The allocation status at `offset` (< size()) and where it ends (offset < end <= size()),
    /// as qemu-img map sees it: data is allocated in this image (normal or compressed clusters,
    /// per subcluster with extended L2) or below it in the backing chain; zero clusters and
    /// unallocated ranges with nothing below are holes. A run may end before the status changes
    /// (at most one L2 table is looked at per call). Runs under the owning image's lock.
    virtual Task<MapRun> map(uint64_t offset) = 0;
};

class Image;

/// EIO for metadata of one image found inconsistent while reading it (Image::corruption): the
/// operation's entry point reports it (Image::signal_corruption) and throws a plain
/// std::system_error in its place.
class ImageCorruption : public std::system_error {
public:
    ImageCorruption(const Image* image, const std::string& reason)
        : std::system_error(std::error_code(EIO, std::generic_category()), reason), image(image) {}
    const Image* image;  // whose metadata
};

/// One point in time of an image: the active disk (readable and, if the image is writable,
/// writable), or an internal snapshot (read-only), each read through its own L1 table. Keeps its
/// Image alive. As a cache::CacheTarget it is what a DataCache writes back to.
class View final : public BlockSource, public cache::CacheTarget {
public:
    /// The active disk of `image`.
    explicit View(std::shared_ptr<Image> image);
    /// A snapshot: read through the L1 table at host offset `l1_offset` with `l1_size` entries
    /// (read in slices through the image's metadata cache), `size` bytes.
    View(std::shared_ptr<Image> image, uint64_t l1_offset, uint32_t l1_size, uint64_t size);
    /// The active disk's current size, or the snapshot's.
    uint64_t size() const override;
    Task<void> read(uint64_t offset, std::span<std::byte> buf) override { return read_for(offset, buf, io::ReadPurpose::use); }
    Task<void> read_to_copy(uint64_t offset, std::span<std::byte> buf) override {
        return read_for(offset, buf, io::ReadPurpose::copy);
    }
    Task<MapRun> map(uint64_t offset) override;
    /// Active disk: Image::write / write_zeroes / flush. Snapshot: EROFS.
    Task<void> write(uint64_t offset, std::span<const std::byte> data) override;
    Task<void> write_zeroes(uint64_t offset, uint64_t length, bool discard) override;
    Task<void> flush() override;
    bool is_active() const { return active_; }
    Image& image() { return *image_; }

private:
    Task<void> read_for(uint64_t offset, std::span<std::byte> buf, io::ReadPurpose purpose);
    std::shared_ptr<Image> image_;
    bool active_ = true;
    uint64_t l1_offset_ = 0;  // snapshots only
    uint32_t l1_size_ = 0;    // snapshots only
    uint64_t size_ = 0;       // snapshots only
};

/// An enabled persistent dirty bitmap of the active disk, seen as a disk of the active disk's size:
/// its bytes where the bitmap marks a chunk dirty, zeros elsewhere; map() reports the dirty chunks
/// as data and the rest as holes. Read-only. The bits include every write the image has taken
/// (Image::write, write_zeroes), not data still in a DataCache.
class BitmapView final : public BlockSource {
public:
    BitmapView(std::shared_ptr<Image> image, std::string name) : image_(std::move(image)), name_(std::move(name)) {}
    uint64_t size() const override;
    Task<void> read(uint64_t offset, std::span<std::byte> buf) override;
    Task<MapRun> map(uint64_t offset) override;

private:
    std::shared_ptr<Image> image_;
    std::string name_;
};

/// What check_host_cluster names in its error message ("L2 table of L1 entry 3"), kept as its
/// parts: the text is built only when there is an error, not on every write.
struct ClusterName {
    const char* what;
    uint64_t number;
    bool as_hex;  // the number as 0x..., else decimal
    std::string str() const { return what + (as_hex ? hex(number) : std::to_string(number)); }
};

/// An open qcow2 image file. All methods run under the image's lock (`ImageLock`; one strand in
/// the unit tests): one thread at a time between two waits.
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
    /// Current virtual size of the active disk.
    uint64_t size() const { return meta_.header.size; }

    // ---- Writing (active disk only; see docs/architecture.md, "How a FUSE write travels" and
    // "Write ordering") -------------------------------------------------------------------------
    // Every call below runs under the image's lock, may wait for I/O, and throws
    // std::system_error: EROFS when the image is not writable (read_only_reason() says why),
    // EIO when metadata is found inconsistent (the image is then marked corrupt and stays
    // read-only), ENOSPC / the host's errno for I/O failures. Data and metadata changes are
    // durable only after flush().

    /// Empty if the active disk can be written; otherwise why not ("opened read-only", "the
    /// image is marked corrupt", "unknown incompatible features 0x40", ...).
    const std::string& read_only_reason() const { return read_only_reason_; }

    /// Takes QEMU's write locks (write and resize held) on the image file and its external data
    /// file; until then an image holds read locks only, whether or not it was opened writable,
    /// so that QEMU can still read it beside qcowfs. Called before a handle that may write is
    /// handed out, and by the first write. Blocking (fcntl), never waits. Throws EBUSY ("Failed to
    /// get "write" lock ...") when another process holds or refuses to share a permission; the
    /// locks are then as they were. Idempotent.
    void lock_for_writing();

    /// Writes `data` at guest `offset`: in place into clusters this image owns alone, else into
    /// newly allocated clusters with the rest of the old content copied in (copy-on-write from
    /// snapshots, backing files, zero, unallocated and compressed clusters). EINVAL past size().
    Task<void> write(uint64_t offset, std::span<const std::byte> data);
    /// Makes [offset, offset + length) read as zeros. Whole clusters get the zero flag (or become
    /// unallocated where nothing shows through); `discard` also releases their host clusters,
    /// otherwise clusters this image owns stay allocated. Partial clusters get zeros written.
    Task<void> write_zeroes(uint64_t offset, uint64_t length, bool discard);
    /// Allocates host clusters for every cluster of the range that has none, content unchanged
    /// (fallocate mode 0): data showing through from the backing chain is copied into this image.
    /// One pass of 1 MiB pieces; clusters already allocated (every subcluster) are skipped.
    Task<void> allocate(uint64_t offset, uint64_t length);
    /// Changes the virtual size. Growing: the new part reads as zeros (the L1 table grows and
    /// moves when needed). Shrinking: clusters past the new end are released; ENOTSUP if the
    /// image has internal snapshots.
    Task<void> resize(uint64_t new_size);
    /// Writes every metadata change in dependency order (docs/architecture.md) and syncs: when
    /// it returns, everything written before the call is on stable storage.
    Task<void> flush();
    /// flush(), then leaves the image clean (dirty bit cleared, bitmaps consistent again where
    /// qcowfs keeps them) and refuses further writes. Safe to call on a read-only image.
    Task<void> close();
    /// The internal snapshot with this ID (loads its L1 table). Throws ENOENT if there is none.
    Task<std::shared_ptr<View>> snapshot(const std::string& id);
    /// The enabled persistent dirty bitmap `name` as a read-only disk (BitmapView). Throws ENOENT
    /// if there is none (or it is disabled), EIO if it was in use when the image was opened
    /// (inconsistent) or the bitmaps cannot be read.
    Task<std::shared_ptr<BitmapView>> bitmap(const std::string& name);

    // ---- Copy-on-read (image_copy_on_read.cpp; docs/architecture.md, "Copy-on-read") ---------
    /// While on, every read of the active disk that finds bytes in the backing chain (below
    /// unallocated clusters or subclusters of this image) starts a copy of them into this image
    /// once the read has its data: a background coroutine of the image that writes what
    /// is still unallocated when it runs, under the range lock, through the write path. Reads are
    /// never delayed or failed by it. Has no effect on an image that cannot be written, has no
    /// backing file, or on snapshots. A copy that fails other than with EROFS logs one line and
    /// stops copy-on-read for the image until it is turned on again.
    void set_copy_on_read(bool on);
    bool copy_on_read() const { return copy_on_read_; }
    /// Returns once no copy started by a read is pending or running (close() waits for them).
    Task<void> copies_done();
    /// What copy-on-read has done since the image was opened (for tests and logs).
    struct CopyStats {
        uint64_t copied_bytes = 0;   // guest bytes written into this image by copies
        uint64_t skipped_bytes = 0;  // backing bytes read but not copied: too much was pending
    };
    const CopyStats& copy_stats() const { return copy_stats_; }

private:
    friend class View;
    friend class BitmapView;
    struct Private {};

public:
    Image(Private, std::string path, OpenOptions options);

private:
    /// An L1 table to map through: the in-memory active table of a writable image (`entries`),
    /// or one on disk read slice by slice through the metadata cache (bounded memory).
    struct L1Table {
        const std::vector<uint64_t>* entries = nullptr;
        uint64_t offset = 0;  // on disk: host offset
        uint32_t size = 0;    // entries
    };

    /// A run of guest bytes with one source: read from a host offset, zeros, backing, compressed.
    struct Extent {
        enum class Kind { none, data, zero, backing, compressed } kind = Kind::none;
        GuestOffset guest;        // the first byte
        uint64_t length = 0;
        HostOffset host;          // data: the first byte; compressed: the compressed bytes' first
        uint64_t compressed_size = 0;
    };

    Task<void> open_impl(unsigned depth, std::vector<std::string> chain);
    Task<std::vector<uint64_t>> read_l1(uint64_t offset, uint32_t entries, const char* what);
    /// EIO unless an L1 table of `entries` at `offset` is at most kMaxL1Bytes and inside the file.
    void check_l1_inside(uint64_t offset, uint32_t entries, const char* what) const;
    Task<void> open_backing(unsigned depth, std::vector<std::string> chain);
    /// Opens a file the image depends on (backing or data file); failures become EIO (ENOTSUP stays).
    std::unique_ptr<io::File> open_dependency(const std::string& path, const char* what, bool writable = false);

    struct ExtentRun;
    /// View::read's body: read_mapped through a snapshot's L1 table (`snapshot`), or through the
    /// active one under a shared range lock (writes hold exclusive ones). Corruption found on the
    /// way is reported (reported()).
    /// `purpose`: copy for a copy-on-write's read of the old data (read_extent).
    Task<void> view_read(const L1Table* snapshot, uint64_t offset, std::span<std::byte> buf,
                         io::ReadPurpose purpose = io::ReadPurpose::use);
    /// A guest range a read took from the backing file.
    struct BackingRead {
        uint64_t offset = 0;
        uint64_t length = 0;
    };
    /// Reads guest range [offset, offset + buf.size()) mapped through `l1`; the range must lie
    /// inside the view's size. Throws ImageCorruption for inconsistent metadata of this image.
    /// `from_backing`: receives the ranges read from the backing file (not past its end).
    /// `purpose`: copy when the bytes are about to be written into another cluster.
    Task<void> read_mapped(const L1Table& l1, uint64_t offset, std::span<std::byte> buf,
                           std::vector<BackingRead>* from_backing = nullptr,
                           io::ReadPurpose purpose = io::ReadPurpose::use);
    /// The L2 table of L1 entry `l1_index` of `l1` for reading: its host offset, 0 if none (also
    /// past the table's end). ImageCorruption for an invalid entry or one into the header.
    Task<HostOffset> l2_table_for_read(const L1Table& l1, uint64_t l1_index);
    /// Adds the extents of [guest, guest + length) that the L2 slice holding `guest`'s entry maps
    /// to `run`; returns how many bytes that was (up to the slice's end).
    Task<uint64_t> read_in_l2_slice(ExtentRun& run, HostOffset l2_table, GuestOffset guest, uint64_t length);
    /// The extent at `guest` (at most `length` bytes) that entry `e` of its cluster maps: to the
    /// end of its subcluster, or of the cluster if compressed.
    Extent extent_in_cluster(const format::L2Entry& e, GuestOffset guest, uint64_t length) const;
    /// Raw entry `index` of `l1` (index < l1.size): from memory, or from its slice in l2_cache_.
    Task<uint64_t> l1_entry(const L1Table& l1, uint64_t index);
    /// The active L1 table: in memory when the image was opened writable, else on disk.
    L1Table active_l1() const;
    /// BlockSource::map through `l1` for a view of `size` bytes (map.cpp).
    Task<MapRun> map_mapped(const L1Table& l1, uint64_t offset, uint64_t size);
    /// View::map's body: map_mapped through a snapshot's L1 table, or through the active one
    /// under a shared range lock; corruption is reported as by view_read.
    Task<MapRun> view_map(const L1Table* snapshot, uint64_t offset, uint64_t size);
    /// The status of [offset, end) of this image's disk as the backing chain sees it.
    Task<MapRun> map_below(uint64_t offset, uint64_t end);
    /// Decodes an L2 entry met while reading or mapping; invalid ones are ImageCorruption naming
    /// the guest offset.
    format::L2Entry decode_l2_for_read(uint64_t raw, uint64_t bitmap, uint64_t guest) const;
    /// Reads one extent into `dst` (dst.size() == extent.length). For `purpose` copy, host data
    /// and backing data are read with read_to_copy (the backing chain passes it down).
    Task<void> read_extent(const Extent& e, std::span<std::byte> dst, io::ReadPurpose purpose);
    /// The decompressed cluster whose compressed data starts at `host` (cached).
    Task<std::shared_ptr<const std::vector<std::byte>>> decompressed(uint64_t host, uint64_t size);

    // ---- Corruption: one path for reads and writes (image_prepare.cpp) ------------------------
    /// Throws ImageCorruption with `reason`: for the read path's synchronous checks, whose
    /// callers' entry points pass it to reported().
    [[noreturn]] void corruption(const std::string& reason) const;
    /// True while corruption stops writes: the active disk is being written (write locks held)
    /// and not yet read-only.
    bool corruption_is_fatal() const;
    /// Reports metadata of this image found inconsistent, from reads and writes alike (QEMU's
    /// qcow2_signal_corruption): if corruption_is_fatal(), sets the corrupt bit on disk (header
    /// write; meta_mutex_ must be held), stops writes (read_only_reason_) and calls on_corrupt,
    /// once; otherwise only answers. Returns the EIO error (a std::system_error) the caller
    /// throws: `std::rethrow_exception(co_await signal_corruption(...))`.
    [[nodiscard]] Task<std::exception_ptr> signal_corruption(std::string reason);
    /// The error an entry point throws for `error`: an ImageCorruption of this image is reported
    /// (signal_corruption, taking meta_mutex_ if it is fatal, so not held by the caller) and
    /// becomes a plain std::system_error; anything else stays as it is.
    [[nodiscard]] Task<std::exception_ptr> reported(std::exception_ptr error);

    // ---- Writing (image_prepare.cpp, image_write.cpp, image_zero.cpp, image_resize.cpp,
    // image_flush.cpp) -----------------------------------------------------------------------
    struct ClusterWrite;
    struct TableWrite;
    /// Sets up refcounts and the range lock after a writable open; records why not otherwise.
    Task<void> init_writing();
    /// Throws EROFS with read_only_reason_ unless the active disk can be written.
    void check_writable() const;
    /// First-write work, once (meta_mutex_ held): rebuild refcounts of a dirty image or check
    /// those of a clean one, check where the L2 tables lie, then claim_header_for_writing().
    Task<void> prepare_write();
    /// prepare_write of a dirty image: rebuilds the refcounts and loads the new ones. EIO (not
    /// corrupt) when the rebuild would pass the scan limit.
    Task<void> rebuild_dirty_refcounts();
    /// prepare_write of a clean image: EIO and the corrupt bit if a cluster in use has a
    /// refcount below its references (within the scan limit).
    Task<void> check_refcounts_cover_references();
    /// Marks bitmaps in use, clears autoclear bits qcowfs does not keep, sets the dirty bit of a
    /// lazy_refcounts image (clears it once rebuilt otherwise); one header write.
    Task<void> claim_header_for_writing();
    /// write() with the range lock held: one L2 table's worth at a time.
    Task<void> write_locked(uint64_t offset, std::span<const std::byte> data);
    /// The part of a write inside one L2 table: plan_table, write_data, link_table.
    Task<void> write_in_table(uint64_t offset, std::span<const std::byte> data);
    /// Sets t.clusters to the guest clusters of [offset, offset + length), inside one L2 table,
    /// each with the bytes the write covers.
    void split_into_clusters(uint64_t offset, uint64_t length, TableWrite& t) const;
    /// Look up and plan (meta_mutex_ held): makes the L2 table ours, plans every cluster, then
    /// allocates the new clusters in one run and assigns them in order.
    Task<void> plan_table(TableWrite& t, uint64_t l1_index);
    /// Plans one guest cluster of a write (meta_mutex_ held): where its data goes, what is
    /// copied from the old content, the new L2 entry, what to free once it is on disk.
    Task<void> plan_cluster(ClusterWrite& w, HostOffset l2_table);
    /// The bytes of the host cluster written (old content + new) and the new subcluster bitmap
    /// of `w`, whose current entry is `e` and whose data goes in place or not (pure).
    void plan_window(ClusterWrite& w, const format::L2Entry& e, bool in_place) const;
    /// Copy and write (no lock; the range lock keeps the clusters ours): one host write per run
    /// of adjacent clusters, the old content around the new data read first where needed.
    Task<void> write_data(const TableWrite& t, uint64_t offset, std::span<const std::byte> data);
    /// Reads the old content of `w`'s window around the written bytes into `base` (byte 0 of
    /// the cluster).
    Task<void> copy_around(const ClusterWrite& w, std::byte* base);
    /// After write_data failed: gives the new clusters back (nothing points at them yet).
    Task<void> release_new(const TableWrite& t);
    /// Link (meta_mutex_ held): points the changed L2 entries at the data and queues the old
    /// clusters for release once that is on disk (rule 4).
    Task<void> link_table(const TableWrite& t);
    /// (raw, bitmap) of an entry that reads as zeros (`zero`; else unallocated), keeping host
    /// cluster `host_offset` as a preallocated zero cluster if `keep`.
    std::pair<uint64_t, uint64_t> zeroed_l2_entry(HostOffset host, bool keep, bool zero) const;
    /// True if every subcluster of `e` has data here (compressed, or allocated in full).
    bool fully_allocated(const format::L2Entry& e) const;
    /// The L2 table for L1 entry `l1_index`, allocated or copied out of a snapshot as needed so
    /// that this image owns it alone (meta_mutex_ held). Returns its host offset.
    Task<HostOffset> l2_for_write(uint64_t l1_index);
    /// Makes whole clusters [first, first + count) of one L2 table read as zeros (meta_mutex_ held).
    /// Returns the guest clusters that need zeros written as data (v2 images where the backing
    /// file reaches). `unmap`: the clusters lie where nothing shows through (past the end of the
    /// disk or of the backing file): they become unallocated and their clusters are released.
    Task<std::vector<uint64_t>> zero_in_table(uint64_t first, uint64_t count, bool discard, bool unmap = false);
    /// After a grow: clusters from guest offset `from` (rounded up) to the end that still have an
    /// L2 table become unallocated (range lock held, takes meta_mutex_ per table).
    Task<void> unmap_from(uint64_t from);
    /// write_zeroes() with the range lock held.
    Task<void> zero_locked(uint64_t offset, uint64_t length, bool discard);
    /// Reads entry `index` of the L2 table at `l2_table` (raw, bitmap).
    Task<std::pair<uint64_t, uint64_t>> load_l2_entry(HostOffset l2_table, uint64_t index);
    /// Decodes an L2 entry found while writing; inconsistent ones mark the image corrupt (EIO).
    Task<format::L2Entry> decode_l2_checked(uint64_t raw, uint64_t bitmap, uint64_t guest);
    /// Stores entry `index` of the L2 table at `l2_table` in the cache (dirty).
    Task<void> store_l2_entry(HostOffset l2_table, uint64_t index, uint64_t raw, uint64_t bitmap);
    /// Host cluster `host`, named by an active table entry, about to be written in place, zeroed
    /// or used as an L2 table: EIO (and the corrupt bit) if it lies in other metadata, past the
    /// end of the file, or has refcount 0, or if the entry has the COPIED flag (`copied`) but the
    /// refcount is not 1 (a snapshot shares it: writing in place would change the snapshot).
    /// `ignore`: MetadataKind bits the cluster may be (an L2 table checked as one). Returns
    /// whether the cluster is the entry's alone (refcount 1), whatever the flag says.
    Task<bool> check_host_cluster(HostOffset host, ClusterName what, bool copied, uint32_t ignore = 0);
    /// Points refcounts_ back at this image: header rewrite on table moves, overlap checks.
    void install_refcount_hooks();
    /// Refcounts::allocate(count), with the overlap check on what it hands out: refcounts that
    /// call a metadata cluster free mark the image corrupt (EIO) before anything is written there.
    Task<HostOffset> allocate_clusters(uint64_t count);
    /// Rebuilds metadata_map_'s fixed areas from the header, snapshots and bitmap areas (after an
    /// L1 or refcount table move). Returns two overlapping structures, or nullopt.
    std::optional<std::string> refresh_metadata_map();
    /// Releases clusters once the L1/L2 change that dropped them is on disk (rule 4).
    void free_later(HostCluster first, uint64_t count);
    /// Clusters a compressed entry's bytes touch, as (first cluster, count).
    std::pair<HostCluster, uint64_t> compressed_clusters(const format::L2Entry& e) const;
    /// Every metadata write in dependency order, then sync (meta_mutex_ held).
    Task<void> flush_locked();
    /// Rewrites the fixed header fields from meta_.header and syncs.
    Task<void> write_header();
    /// The entry of guest offset `guest` in the active L2 table (meta_mutex_ held), nullopt when
    /// its L2 table is not allocated. Inconsistent entries mark the image corrupt (EIO).
    Task<std::optional<format::L2Entry>> active_entry(GuestOffset guest);

    // ---- Copy-on-read (image_copy_on_read.cpp) --------------------------------------------------
    struct CopyRun;
    /// True if reads of the active disk start copies now.
    bool copies_wanted() const;
    /// True while copies already started may write: the image takes writes and none failed.
    bool copies_can_run() const;
    /// After a read of the active disk at `offset` (`buf` its data): claims the subclusters of
    /// `from_backing` that no copy holds yet and starts copy_runs on them with a copy of their
    /// bytes, unless that would pass the pending limit. Does not wait.
    void start_copy(const Executor& executor, uint64_t offset, std::span<const std::byte> buf,
                    const std::vector<BackingRead>& from_backing);
    /// The background copy of one read: copy_range for each run, then gives its claims back.
    Task<void> copy_runs(std::vector<CopyRun> runs, std::vector<std::byte> data);
    /// Copies the parts of [offset, offset + data.size()) where the backing chain has data.
    Task<void> copy_range(uint64_t offset, std::span<const std::byte> data);
    /// Writes `data` (the backing chain's bytes at `offset`) into the subclusters of its range
    /// that are still unallocated here, holding the range lock (exclusive, whole clusters) from
    /// the check to the write: anything written, zeroed or discarded since the read is newer
    /// and stays.
    Task<void> fill_unallocated(uint64_t offset, std::span<const std::byte> data);

    /// The bitmaps: loaded by init_writing for a writable image, else on first use (ENOENT/EIO
    /// as bitmap()).
    Task<DirtyBitmaps*> dirty_bitmaps();
    /// At close (meta_mutex_ held), when the tracked bitmaps were marked in use: writes each
    /// changed bitmap's pages to new clusters, then its new table, then the whole directory in a
    /// new place, syncs, points the bitmaps extension at it (its in_use flags clear), and only then
    /// releases the old clusters (image_bitmaps.cpp; docs/architecture.md, "Persistent bitmaps").
    Task<void> store_bitmaps();
    /// Resize helpers (meta_mutex_ held).
    Task<void> grow_l1(uint64_t entries, uint64_t new_size);
    Task<void> release_beyond(uint64_t new_size);

    std::string path_;
    OpenOptions options_;
    std::unique_ptr<io::File> file_;
    std::unique_ptr<io::File> data_file_;  // external data file, or null (then data is in file_)
    format::ImageMetadata meta_;
    ClusterGeometry geometry_;
    std::vector<uint64_t> l1_;  // the active L1 table (host-endian raw entries); writable opens only
    std::vector<format::Snapshot> snapshots_;
    std::unique_ptr<cache::SliceCache> l2_cache_;
    std::shared_ptr<BlockSource> backing_;  // a RawSource, or the active View of the backing Image
    std::string read_only_reason_;

    // Writing (under the image's lock only). Lock order: range_lock_ ranges, then flush_mutex_, then meta_mutex_,
    // then Refcounts' own mutex; the SliceCache mutexes are leaves.
    std::unique_ptr<Refcounts> refcounts_;        // null unless the image can be written
    std::unique_ptr<cache::RangeLock> range_lock_;  // guest ranges: writes exclusive (whole clusters), reads shared
    AsyncMutex meta_mutex_;   // held from planning to linking of L2 entries, and across flush_locked
    AsyncMutex flush_mutex_;  // one flush() at a time
    bool prepared_ = false;       // prepare_write() has run: metadata may be dirty
    bool write_locked_ = false;   // lock_for_writing() has succeeded
    bool clear_dirty_bit_ = false;  // the dirty bit is ours (lazy refcounts): cleared on close
    std::set<uint64_t> dirty_l1_;   // L1 entries changed in memory, not yet on disk
    std::vector<std::pair<HostCluster, uint64_t>> pending_free_;  // (first cluster, count), rule 4
    uint64_t file_end_ = 0;  // bytes of the image file, counting clusters allocated but not yet written
    /// The largest size the image file was seen to have (l1_entry): an fstat per L1 lookup only
    /// while a slice might reach past the file's end.
    uint64_t file_size_seen_ = 0;
    MetadataMap metadata_map_;  // where metadata lies, for the overlap checks
    std::vector<MetadataMap::Area> bitmap_areas_;  // bitmap directory and tables (fixed while open)
    std::unique_ptr<DirtyBitmaps> bitmaps_;  // null until loaded (dirty_bitmaps)
    std::weak_ptr<View> active_view_;

    // Copy-on-read (under the image's lock only).
    bool copy_on_read_ = false;
    std::string copy_stopped_;              // why copies stopped (a failure), "" while they may run
    std::unordered_set<uint64_t> copying_;  // guest subclusters claimed by a copy not yet done
    size_t copy_pending_bytes_ = 0;         // data held by copies not yet done
    size_t copies_running_ = 0;             // copy_runs coroutines started and not yet done
    std::shared_ptr<AsyncEvent> copies_idle_;  // set when copies_running_ drops to 0 (copies_done)
    CopyStats copy_stats_;

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
    Task<void> read_to_copy(uint64_t offset, std::span<std::byte> buf) override;
    /// The host file's own data and holes (SEEK_DATA / SEEK_HOLE).
    Task<MapRun> map(uint64_t offset) override;

private:
    std::unique_ptr<io::File> file_;
    uint64_t size_;
};

}  // namespace qcowfs::qcow2
