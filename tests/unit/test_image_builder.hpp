// Builds small qcow2 images in memory for engine tests, entry by entry, with the format/ encoders.
#pragma once

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/header.hpp"
#include "qcowfs/format/snapshot.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/image.hpp"

namespace qcowfs::test {

/// A v3 image with 4 KiB clusters (or as configured): cluster 0 header, 1 L1, 2.. L2 tables, then
/// data. Refcounts are not maintained: the read path does not use them.
struct ImageBuilder {
    uint32_t cluster_bits = 12;
    bool extended_l2 = false;
    uint64_t size = 1 << 20;
    format::CompressionType compression = format::CompressionType::zlib;
    std::string backing_file;
    std::string backing_format;
    std::vector<std::byte> file;
    std::map<uint64_t, uint64_t> l2_tables;  // l1 index -> host offset
    uint64_t next_free = 0;
    uint64_t l1_offset = 0;
    uint64_t refcount_table = 0;
    uint32_t l1_entries = 0;
    std::vector<format::Snapshot> snapshots;

    ClusterGeometry geometry() const { return ClusterGeometry{cluster_bits, extended_l2}; }
    uint64_t cluster() const { return uint64_t{1} << cluster_bits; }

    void start() {
        l1_entries = static_cast<uint32_t>(std::max<uint64_t>(1, geometry().l1_entries_for(size)));
        l1_offset = cluster();
        uint64_t l1_clusters = (l1_entries * 8 + cluster() - 1) / cluster();
        next_free = l1_offset + l1_clusters * cluster();
        file.assign(next_free, std::byte{0});
        // A refcount table of one cluster pointing at nothing: enough for the parser's checks.
        refcount_table = alloc_cluster();
    }
    uint64_t alloc_cluster() {
        uint64_t off = next_free;
        next_free += cluster();
        file.resize(next_free);
        return off;
    }
    void put64(uint64_t off, uint64_t v) { format::store_be64(file.data() + off, v); }
    uint64_t l2_table(uint64_t l1_index) {
        auto it = l2_tables.find(l1_index);
        if (it != l2_tables.end()) return it->second;
        uint64_t off = alloc_cluster();
        l2_tables[l1_index] = off;
        put64(l1_offset + 8 * l1_index, format::encode_l1({off, true}));
        return off;
    }
    uint64_t entry_offset(uint64_t guest) {
        auto g = geometry();
        return l2_table(g.l1_index(GuestOffset{guest})) + g.l2_index(GuestOffset{guest}) * g.l2_entry_size();
    }
    /// Maps the cluster containing `guest` to a new host cluster filled with `fill` bytes.
    uint64_t data(uint64_t guest, uint8_t fill, uint64_t bitmap = 0xffffffffu) {
        uint64_t e = entry_offset(guest);  // allocates the L2 table first, if needed
        uint64_t host = alloc_cluster();
        std::memset(file.data() + host, fill, cluster());
        put64(e, format::encode_l2_standard(host, true, false));
        if (extended_l2) put64(e + 8, bitmap);
        return host;
    }
    void zero(uint64_t guest) {
        uint64_t e = entry_offset(guest);
        if (extended_l2)
            put64(e + 8, 0xffffffff00000000ULL);
        else
            put64(e, format::encode_l2_standard(0, false, true));
    }
    void raw_entry(uint64_t guest, uint64_t value, uint64_t bitmap = 0) {
        uint64_t e = entry_offset(guest);
        put64(e, value);
        if (extended_l2) put64(e + 8, bitmap);
    }
    void compressed(uint64_t guest, const std::vector<std::byte>& content, size_t padding = 0);

    /// Adds an internal snapshot that freezes the current L1 table (copied to a new place).
    void snapshot(const std::string& id, const std::string& name, uint64_t disk_size) {
        uint64_t bytes = uint64_t{l1_entries} * 8;
        uint64_t clusters = (bytes + cluster() - 1) / cluster();
        uint64_t off = next_free;
        for (uint64_t i = 0; i < clusters; ++i) alloc_cluster();
        std::memcpy(file.data() + off, file.data() + l1_offset, bytes);
        format::Snapshot s;
        s.l1_table_offset = off;
        s.l1_size = l1_entries;
        s.id = id;
        s.name = name;
        s.disk_size = disk_size;
        snapshots.push_back(s);
    }

    /// Writes the header (and snapshot table) and returns the finished file.
    std::vector<std::byte> finish() {
        format::ImageMetadata m;
        auto& h = m.header;
        h.version = 3;
        h.cluster_bits = cluster_bits;
        h.size = size;
        h.l1_size = l1_entries;
        h.l1_table_offset = l1_offset;
        h.compression_type = compression;
        if (compression != format::CompressionType::zlib) h.incompatible_features |= format::kIncompatCompressionType;
        if (extended_l2) h.incompatible_features |= format::kIncompatExtendedL2;
        h.header_length = 112;
        h.refcount_table_offset = refcount_table;
        h.refcount_table_clusters = 1;
        if (!snapshots.empty()) {
            auto table = format::serialize_snapshot_table(snapshots, 3);
            h.snapshots_offset = next_free;
            h.nb_snapshots = static_cast<uint32_t>(snapshots.size());
            while (next_free < h.snapshots_offset + table.size()) alloc_cluster();
            std::memcpy(file.data() + h.snapshots_offset, table.data(), table.size());
        }
        if (!backing_file.empty()) {
            m.backing_file = backing_file;
            if (!backing_format.empty()) m.extensions.backing_format = backing_format;
        }
        auto cluster0 = format::serialize_metadata(m);
        std::memcpy(file.data(), cluster0.data(), std::min<size_t>(cluster0.size(), cluster()));
        return file;
    }
};

/// In-memory files by path for Image::open.
struct MemFiles {
    std::map<std::string, std::vector<std::byte>> files;
    std::map<std::string, io::MemFile*> opened;  // last opened MemFile per path (for fault injection)
    qcow2::FileOpener opener() {
        return [this](const std::string& path, bool) -> std::unique_ptr<io::File> {
            auto it = files.find(path);
            if (it == files.end()) fail(ENOENT, "cannot open " + path);
            auto f = std::make_unique<io::MemFile>(path, it->second);
            opened[path] = f.get();
            return f;
        };
    }
};

/// Runs a coroutine to completion on a fresh io_context and returns its result (or rethrows).
template <class T>
T run(asio::io_context& io, Task<T> task) {
    auto future = asio::co_spawn(io, std::move(task), asio::use_future);
    io.restart();
    io.run();
    return future.get();
}

inline std::vector<std::byte> bytes_of(uint8_t fill, size_t n) { return std::vector<std::byte>(n, std::byte{fill}); }

}  // namespace qcowfs::test
