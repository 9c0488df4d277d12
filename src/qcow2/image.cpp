// Opening a qcow2 image (header, data file, L1, snapshots, backing chain) and its mapped read path.
#include "qcowfs/qcow2/image.hpp"

#include <algorithm>
#include <bit>
#include <boost/asio/this_coro.hpp>
#include <cstring>

#include "qcowfs/codec/compression.hpp"
#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/probe.hpp"
#include "qcowfs/util/workers.hpp"

namespace qcowfs::qcow2 {
namespace {

void zero(std::span<std::byte> s) { std::memset(s.data(), 0, s.size()); }

/// The errno an image's readers get when a file it depends on (backing or data file) cannot be
/// opened: a missing or broken file makes the image broken (EIO); refusals keep their meaning —
/// ENOTSUP (unsupported), EACCES (not allowed: outside the allowed directories, not a regular
/// file, the user may not read it), EBUSY (locked by QEMU), ESTALE (replaced meanwhile); and a
/// writable open that the host refuses is the caller's to handle (it may open read-only).
int dependency_errno(int code, bool writable) {
    if (code == ENOTSUP || code == EACCES || code == EBUSY || code == ESTALE) return code;
    if (writable && (code == EROFS || code == EPERM)) return code;
    return EIO;
}

/// Header, extensions, backing name and snapshot table of `file`, read as format::ImageProbe asks.
Task<format::ProbedImage> probe(io::File& file) {
    format::ImageProbe probe(file.size());
    while (auto r = probe.next()) {
        std::vector<std::byte> bytes(r->length);
        bytes.resize(co_await file.read_at(r->offset, bytes));
        probe.feed(bytes);
    }
    co_return probe.take();
}

}  // namespace

// ---- RawSource -------------------------------------------------------------------------------

RawSource::RawSource(std::unique_ptr<io::File> file) : file_(std::move(file)), size_(file_->size()) {}

Task<void> RawSource::read(uint64_t offset, std::span<std::byte> buf) {
    size_t n = offset < size_ ? co_await file_->read_at(offset, buf.first(std::min<uint64_t>(buf.size(), size_ - offset))) : 0;
    zero(buf.subspan(n));
}

Task<void> RawSource::read_to_copy(uint64_t offset, std::span<std::byte> buf) {
    size_t n = offset < size_ ? co_await file_->read_to_copy(offset, buf.first(std::min<uint64_t>(buf.size(), size_ - offset)))
                              : 0;
    zero(buf.subspan(n));
}

// ---- View ------------------------------------------------------------------------------------

View::View(std::shared_ptr<Image> image) : image_(std::move(image)) {}

View::View(std::shared_ptr<Image> image, uint64_t l1_offset, uint32_t l1_size, uint64_t size)
    : image_(std::move(image)), active_(false), l1_offset_(l1_offset), l1_size_(l1_size), size_(size) {}

uint64_t View::size() const { return active_ ? image_->size() : size_; }

Task<void> View::read_for(uint64_t offset, std::span<std::byte> buf, io::ReadPurpose purpose) {
    uint64_t size = this->size();
    if (offset >= size) {
        zero(buf);
        co_return;
    }
    if (buf.size() > size - offset) {
        zero(buf.subspan(size - offset));
        buf = buf.first(size - offset);
    }
    if (active_) {
        co_await image_->view_read(nullptr, offset, buf, purpose);
    } else {
        const Image::L1Table l1{nullptr, l1_offset_, l1_size_};
        co_await image_->view_read(&l1, offset, buf, purpose);
    }
}

Task<void> View::write(uint64_t offset, std::span<const std::byte> data) {
    if (!active_) fail(EROFS, "snapshots are read-only");
    co_await image_->write(offset, data);
}

Task<void> View::write_zeroes(uint64_t offset, uint64_t length, bool discard) {
    if (!active_) fail(EROFS, "snapshots are read-only");
    co_await image_->write_zeroes(offset, length, discard);
}

Task<void> View::flush() {
    if (!active_) co_return;
    co_await image_->flush();
}

// ---- Image: open -----------------------------------------------------------------------------

Image::Image(Private, std::string path, OpenOptions options) : path_(std::move(path)), options_(std::move(options)) {}

Task<std::shared_ptr<Image>> Image::open(std::string path, OpenOptions options) {
    auto image = std::make_shared<Image>(Private{}, std::move(path), std::move(options));
    co_await image->open_impl(0, {});
    co_return image;
}

Task<void> Image::open_impl(unsigned depth, std::vector<std::string> chain) {
    file_ = options_.opener(path_, options_.writable);
    format::ProbedImage probed = co_await probe(*file_);
    format::check_openable(probed.problem);
    meta_ = std::move(probed.meta);
    snapshots_ = std::move(probed.snapshots);
    geometry_ = meta_.header.geometry();

    if (meta_.header.has_external_data_file())
        data_file_ = open_dependency(format::resolve_relative(path_, *meta_.extensions.data_file),
                                     "external data file", options_.writable);

    // Only a writable image keeps its active L1 table in memory (the write path changes it);
    // every other L1 table is read slice by slice through the metadata cache.
    if (options_.writable)
        l1_ = co_await read_l1(meta_.header.l1_table_offset, meta_.header.l1_size, "L1 table");
    else
        check_l1_inside(meta_.header.l1_table_offset, meta_.header.l1_size, "L1 table");

    size_t slice = std::min<uint64_t>(geometry_.cluster_size(), 4096);
    l2_cache_ = std::make_unique<cache::SliceCache>(*file_, slice, options_.l2_cache_bytes);

    chain.push_back(path_);
    if (!meta_.backing_file.empty()) co_await open_backing(depth, std::move(chain));
    co_await init_writing();
}

Task<std::vector<uint64_t>> Image::read_l1(uint64_t offset, uint32_t entries, const char* what) {
    uint64_t bytes = uint64_t{entries} * 8;
    if (bytes > format::kMaxL1Bytes) corrupt(std::string(what) + " has too many entries (" + std::to_string(entries) + ")");
    std::vector<std::byte> raw(bytes);
    if (co_await file_->read_at(offset, raw) != bytes)
        corrupt(std::string(what) + " at " + hex(offset) + " lies beyond the end of the file");
    std::vector<uint64_t> l1(entries);
    for (uint32_t i = 0; i < entries; ++i) l1[i] = format::load_be64(raw.data() + 8 * i);
    co_return l1;
}

void Image::check_l1_inside(uint64_t offset, uint32_t entries, const char* what) const {
    uint64_t bytes = uint64_t{entries} * 8;
    if (bytes > format::kMaxL1Bytes) corrupt(std::string(what) + " has too many entries (" + std::to_string(entries) + ")");
    uint64_t file_size = file_->size();
    if (offset > file_size || bytes > file_size - offset)
        corrupt(std::string(what) + " at " + hex(offset) + " lies beyond the end of the file");
}

Image::L1Table Image::active_l1() const {
    if (options_.writable) return L1Table{&l1_, 0, static_cast<uint32_t>(l1_.size())};
    return L1Table{nullptr, meta_.header.l1_table_offset, meta_.header.l1_size};
}

Task<uint64_t> Image::l1_entry(const L1Table& l1, uint64_t index) {
    if (l1.entries) co_return (*l1.entries)[index];
    const size_t slice_bytes = l2_cache_->slice_bytes();
    uint64_t byte = l1.offset + index * 8;
    const uint64_t slice_end = byte / slice_bytes * slice_bytes + slice_bytes;
    // Files only grow under us (a truncation from outside fails the slice's read with EIO, as
    // it fails any read of the cut metadata), so a size seen once still holds.
    if (slice_end > file_size_seen_) file_size_seen_ = std::max(file_size_seen_, file_->size());
    if (slice_end > file_size_seen_) {
        // The file ends inside this slice (checked at open: not inside the table): read the entry alone.
        std::byte raw[8];
        if (co_await file_->read_at(byte, raw) != 8) corruption("L1 entry at " + hex(byte) + " lies beyond the end of the file");
        co_return format::load_be64(raw);
    }
    auto slice = co_await l2_cache_->get(byte / slice_bytes * slice_bytes);
    co_return format::load_be64(slice->bytes.data() + byte % slice_bytes);
}

Task<void> Image::open_backing(unsigned depth, std::vector<std::string> chain) {
    if (depth + 1 > options_.max_backing_depth)
        corrupt("backing chain is deeper than " + std::to_string(options_.max_backing_depth) + " images");
    std::string path = format::resolve_relative(path_, meta_.backing_file);
    if (std::find(chain.begin(), chain.end(), path) != chain.end())
        corrupt("backing chain loops back to " + path);

    std::string fmt = meta_.extensions.backing_format.value_or("");
    if (fmt.empty()) {
        // No backing format extension: probe, as QEMU does.
        auto probe = open_dependency(path, "backing file");
        std::vector<std::byte> magic(4);
        magic.resize(co_await probe->read_at(0, magic));
        fmt = format::has_qcow2_magic(magic) ? "qcow2" : "raw";
    }
    if (fmt == "raw") {
        backing_ = std::make_shared<RawSource>(open_dependency(path, "backing file"));
    } else if (fmt == "qcow2") {
        OpenOptions backing_options = options_;
        backing_options.writable = false;  // backing files are never written
        auto backing = std::make_shared<Image>(Private{}, path, std::move(backing_options));
        try {
            co_await backing->open_impl(depth + 1, std::move(chain));
        } catch (const std::system_error& e) {
            fail(dependency_errno(errno_of(e), false), "backing file " + path + ": " + reason_of(e));
        }
        backing_ = backing->active();  // the view keeps the backing Image alive
    } else {
        fail(ENOTSUP, "backing file format '" + fmt + "' is not supported");
    }
}

std::unique_ptr<io::File> Image::open_dependency(const std::string& path, const char* what, bool writable) {
    try {
        return options_.opener(path, writable);
    } catch (const std::system_error& e) {
        fail(dependency_errno(errno_of(e), writable), std::string(what) + " " + path + ": " + reason_of(e) + " (" +
                                                          e.code().message() + ")");
    }
}

std::shared_ptr<View> Image::active() {
    if (auto v = active_view_.lock()) return v;
    auto v = std::make_shared<View>(shared_from_this());
    active_view_ = v;
    return v;
}

Task<std::shared_ptr<View>> Image::snapshot(const std::string& id) {
    for (const auto& s : snapshots_) {
        if (s.id != id) continue;
        check_l1_inside(s.l1_table_offset, s.l1_size, "snapshot L1 table");
        if (s.l1_size < geometry_.l1_entries_for(s.disk_size))
            corrupt("snapshot " + s.id + " has an L1 table too small for its disk size");
        co_return std::make_shared<View>(shared_from_this(), s.l1_table_offset, s.l1_size, s.disk_size);
    }
    fail(ENOENT, "no snapshot with ID " + id);
}

// ---- Image: reading --------------------------------------------------------------------------

/// The extents of one read, merged into runs that are read at once: adjacent zero or backing
/// extents, and data extents adjacent on the host too.
struct Image::ExtentRun {
    Image& image;
    GuestOffset offset;  // of buf[0]
    std::span<std::byte> buf;
    std::vector<BackingRead>* from_backing;  // null: not recorded
    io::ReadPurpose purpose;
    Extent cur{};  // being accumulated

    /// Appends `piece` to the current run if it continues it (or starts the first run).
    bool merge(const Extent& piece) {
        if (cur.kind == Extent::Kind::none) {
            cur = piece;
            return true;
        }
        bool continues = cur.kind == piece.kind && cur.guest + cur.length == piece.guest &&
                         (piece.kind == Extent::Kind::zero || piece.kind == Extent::Kind::backing ||
                          (piece.kind == Extent::Kind::data && cur.host + cur.length == piece.host));
        if (continues) cur.length += piece.length;
        return continues;
    }
    /// Reads the current run, then starts a new one with `piece`.
    Task<void> restart(const Extent& piece) {
        note_backing();
        co_await image.read_extent(cur, buf.subspan(cur.guest - offset, cur.length), purpose);
        cur = piece;
    }
    /// Reads the current run.
    Task<void> finish() {
        if (cur.kind != Extent::Kind::none) {
            note_backing();
            co_await image.read_extent(cur, buf.subspan(cur.guest - offset, cur.length), purpose);
        }
        cur = Extent{};
    }
    /// Records the current run in `from_backing` if it is read from the backing file.
    void note_backing() const {
        if (!from_backing || cur.kind != Extent::Kind::backing || !image.backing_) return;
        // Past the backing file's end the bytes are zeros, not backing data.
        const uint64_t end = std::min((cur.guest + cur.length).value, image.backing_->size());
        if (end > cur.guest.value) from_backing->push_back({cur.guest.value, end - cur.guest.value});
    }
};

Task<void> Image::view_read(const L1Table* snapshot, uint64_t offset, std::span<std::byte> buf,
                            io::ReadPurpose purpose) {
    std::exception_ptr error;
    try {
        if (snapshot) {
            co_await read_mapped(*snapshot, offset, buf, nullptr, purpose);
        } else if (!range_lock_) {
            co_await read_mapped(active_l1(), offset, buf, nullptr, purpose);
        } else {
            std::vector<BackingRead> from_backing;
            {
                // Shared: writes hold exclusive ranges while their clusters change.
                auto guard = co_await range_lock_->lock(offset, buf.size(), cache::RangeLock::Mode::shared);
                co_await read_mapped(active_l1(), offset, buf, copies_wanted() ? &from_backing : nullptr, purpose);
            }
            // Copy-on-read: the copy runs after this read has returned its data.
            if (!from_backing.empty()) start_copy(co_await asio::this_coro::executor, offset, buf, from_backing);
        }
        co_return;
    } catch (...) {
        error = std::current_exception();
    }
    std::rethrow_exception(co_await reported(error));
}

Task<HostOffset> Image::l2_table_for_read(const L1Table& l1, uint64_t l1_index) {
    if (l1_index >= l1.size) co_return HostOffset{};
    const uint64_t raw = co_await l1_entry(l1, l1_index);
    HostOffset l2_table;
    try {
        l2_table = format::decode_l1(raw, geometry_.cluster_bits).l2_table();
    } catch (const std::system_error& e) {
        corruption("L1 entry " + std::to_string(l1_index) + ": " + reason_of(e));
    }
    if (l2_table && geometry_.host_cluster(l2_table) == HostCluster{0})
        corruption("L1 entry " + std::to_string(l1_index) + " points into the image header");
    co_return l2_table;
}

Task<void> Image::read_mapped(const L1Table& l1, uint64_t offset, std::span<std::byte> buf,
                              std::vector<BackingRead>* from_backing, io::ReadPurpose purpose) {
    const ClusterGeometry& g = geometry_;
    ExtentRun run{*this, GuestOffset{offset}, buf, from_backing, purpose};
    uint64_t done = 0;
    while (done < buf.size()) {
        const GuestOffset guest{offset + done};
        const HostOffset l2_table = co_await l2_table_for_read(l1, g.l1_index(guest));
        if (l2_table) {
            done += co_await read_in_l2_slice(run, l2_table, guest, buf.size() - done);
            continue;
        }
        const uint64_t n = std::min(buf.size() - done, g.remaining_in_l2_table(guest));
        const Extent piece{Extent::Kind::backing, guest, n, HostOffset{}, 0};
        if (!run.merge(piece)) co_await run.restart(piece);
        done += n;
    }
    co_await run.finish();
}

Task<uint64_t> Image::read_in_l2_slice(ExtentRun& run, HostOffset l2_table, GuestOffset guest, uint64_t length) {
    const ClusterGeometry& g = geometry_;
    const size_t slice_bytes = l2_cache_->slice_bytes();
    const uint32_t entry_size = g.l2_entry_size();
    const SlicePosition at = slice_of(g.l2_entry_byte(guest), slice_bytes);
    auto slice = co_await l2_cache_->get((l2_table + at.slice_start).value);
    uint64_t done = 0;
    // The entries of this slice while the request lasts, each a piece per subcluster (one
    // "subcluster" per cluster without extended L2; one piece for a compressed cluster).
    for (uint64_t pos = at.in_slice; pos < slice_bytes && done < length; pos += entry_size) {
        const std::byte* p = slice->bytes.data() + pos;
        const uint64_t bitmap = g.extended_l2 ? format::load_be64(p + 8) : 0;
        const format::L2Entry e = decode_l2_for_read(format::load_be64(p), bitmap, (guest + done).value);
        const uint64_t cluster_left = g.remaining_in_cluster(guest + done);
        for (uint64_t in_entry = 0; done < length && in_entry < cluster_left;) {
            const Extent piece = extent_in_cluster(e, guest + done, length - done);
            if (!run.merge(piece)) co_await run.restart(piece);
            done += piece.length;
            in_entry += piece.length;
        }
    }
    co_return done;
}

Image::Extent Image::extent_in_cluster(const format::L2Entry& e, GuestOffset guest, uint64_t length) const {
    const ClusterGeometry& g = geometry_;
    const uint64_t in_cluster = g.offset_in_cluster(guest.value);
    if (e.compressed)
        return Extent{Extent::Kind::compressed, guest, std::min(length, g.remaining_in_cluster(guest)), e.host(),
                      e.compressed_size};
    const uint32_t sc = g.subcluster_index(guest);
    const uint64_t sc_end = uint64_t{sc + 1} << g.subcluster_bits();
    Extent piece{Extent::Kind::none, guest, std::min(length, sc_end - in_cluster), HostOffset{}, 0};
    switch (format::subcluster_type(e, sc, g)) {
        case format::SubclusterType::normal:
            piece.kind = Extent::Kind::data;
            piece.host = e.host() + in_cluster;
            break;
        case format::SubclusterType::zero_plain:
        case format::SubclusterType::zero_alloc:
            piece.kind = Extent::Kind::zero;
            break;
        case format::SubclusterType::unallocated_plain:
        case format::SubclusterType::unallocated_alloc:
            piece.kind = Extent::Kind::backing;
            break;
        case format::SubclusterType::compressed:
            corruption("inconsistent compressed entry for guest offset " + hex(guest.value));
    }
    return piece;
}

Task<void> Image::read_extent(const Extent& e, std::span<std::byte> dst, io::ReadPurpose purpose) {
    const bool to_copy = purpose == io::ReadPurpose::copy;
    switch (e.kind) {
        case Extent::Kind::none:
        case Extent::Kind::zero:
            zero(dst);
            break;
        case Extent::Kind::backing:
            if (backing_ && to_copy)
                co_await backing_->read_to_copy(e.guest.value, dst);
            else if (backing_)
                co_await backing_->read(e.guest.value, dst);
            else
                zero(dst);
            break;
        case Extent::Kind::data: {
            io::File& f = data_file_ ? *data_file_ : *file_;
            size_t n = 0;  // not `co_await (c ? a : b)`: g++ 12 resumes a destroyed frame after it
            if (to_copy)
                n = co_await f.read_to_copy(e.host.value, dst);
            else
                n = co_await f.read_at(e.host.value, dst);
            if (n < dst.size() && !data_file_) {
                // A cluster the writer never finished may end early (its tail reads as zeros, as in
                // QEMU), but a cluster that starts past the end of the file means the image was
                // truncated: say so instead of inventing zeros.
                uint64_t cluster = geometry_.cluster_size();
                uint64_t first_missing = (e.host.value + n + cluster - 1) / cluster * cluster;
                if (first_missing < e.host.value + dst.size())
                    corruption("data cluster at " + hex(first_missing) + " for guest offset " +
                            hex(e.guest.value + (first_missing - e.host.value)) + " lies beyond the end of the file (" +
                            std::to_string(file_->size()) + " bytes): the image is truncated");
            }
            zero(dst.subspan(n));
            break;
        }
        case Extent::Kind::compressed: {
            auto cluster = co_await decompressed(e.host.value, e.compressed_size);
            std::memcpy(dst.data(), cluster->data() + geometry_.offset_in_cluster(e.guest.value), dst.size());
            break;
        }
    }
}

Task<std::shared_ptr<const std::vector<std::byte>>> Image::decompressed(uint64_t host, uint64_t size) {
    if (auto it = compressed_.find(host); it != compressed_.end()) {
        compressed_lru_.splice(compressed_lru_.begin(), compressed_lru_, it->second.second);
        co_return it->second.first;
    }
    const uint64_t cluster = geometry_.cluster_size();
    if (host < cluster) corruption("compressed cluster at " + hex(host) + " overlaps the image header");
    if (size > 2 * cluster + 512) corruption("compressed cluster at " + hex(host) + " claims " + std::to_string(size) + " bytes");
    std::vector<std::byte> input(size);
    input.resize(co_await file_->read_at(host, input));
    if (input.empty()) corruption("compressed cluster at " + hex(host) + " lies beyond the end of the file");
    auto out = std::make_shared<std::vector<std::byte>>(cluster);
    // Decompression touches no image state: it runs with the image's lock let go, so the image's
    // other requests go on meanwhile.
    const auto type = meta_.header.compression_type;
    std::string failure = unlocked([&] {
        try {
            codec::decompress_cluster(type, input, *out);
        } catch (const std::system_error& e) {
            return reason_of(e);
        }
        return std::string();
    });
    if (!failure.empty()) corruption("compressed cluster at " + hex(host) + ": " + failure);
    // Another request may have decompressed the same cluster meanwhile (here or while the
    // compressed bytes were read): keep the one already cached.
    if (auto it = compressed_.find(host); it != compressed_.end()) co_return it->second.first;

    size_t capacity = std::max<size_t>(2, options_.compressed_cache_bytes / cluster);
    while (compressed_.size() >= capacity) {
        compressed_.erase(compressed_lru_.back());
        compressed_lru_.pop_back();
    }
    compressed_lru_.push_front(host);
    compressed_.emplace(host, std::make_pair(out, compressed_lru_.begin()));
    co_return out;
}

}  // namespace qcowfs::qcow2
