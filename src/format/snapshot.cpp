// Parses, validates and serializes the internal snapshot table.
#include "qcowfs/format/snapshot.hpp"

#include <algorithm>
#include <cstring>

#include "detail.hpp"
#include "qcowfs/format/error.hpp"

namespace qcowfs::format {

namespace {

using detail::aligned;
using detail::hex;
using detail::inside;
using detail::round_up8;

constexpr size_t kFixedEntrySize = 40;
constexpr uint32_t kMaxExtraData = 1024;     // QEMU's limit as well
constexpr size_t kExtraVmStateEnd = 8;       // extra data bytes holding vm_state_size_large
constexpr size_t kExtraDiskSizeEnd = 16;     // ... and disk_size

std::string entry_name(uint32_t index) { return "snapshot table entry " + std::to_string(index); }

void check_header(const Header& h) {
    if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits)
        fail(EINVAL, "invalid cluster_bits " + std::to_string(h.cluster_bits));
    if (h.nb_snapshots > kMaxSnapshots)
        corrupt("too many snapshots: " + std::to_string(h.nb_snapshots) + " (limit 65536)");
}

/// Bytes [at, at + len) of the table, or EIO naming the entry that reaches past it.
const std::byte* need(std::span<const std::byte> table, uint64_t at, uint64_t len, uint32_t index) {
    if (!inside(at, len, table.size()))
        corrupt(entry_name(index) + " truncated: needs bytes up to " + std::to_string(at + len) + ", table has " +
                std::to_string(table.size()));
    return table.data() + at;
}

void check_l1(const Snapshot& s, const Header& h, uint64_t file_size, uint32_t index) {
    if (s.l1_size > kMaxL1Bytes / 8)
        corrupt(entry_name(index) + ": L1 table of " + std::to_string(s.l1_size) + " entries exceeds the 32 MiB limit");
    if (!aligned(s.l1_table_offset, h.cluster_bits))
        corrupt(entry_name(index) + ": L1 table offset " + hex(s.l1_table_offset) + " is not cluster aligned");
    if (s.l1_size == 0) return;
    if (s.l1_table_offset == 0) corrupt(entry_name(index) + ": L1 table at offset 0 overlaps the header");
    if (!inside(s.l1_table_offset, uint64_t{s.l1_size} * 8, file_size))
        corrupt(entry_name(index) + ": L1 table at " + hex(s.l1_table_offset) + " (" + std::to_string(s.l1_size) +
                " entries) lies beyond the end of the file (" + std::to_string(file_size) + " bytes)");
}

void check_extra_size(uint32_t extra_size, uint32_t index) {
    if (extra_size > kMaxExtraData)
        corrupt(entry_name(index) + ": extra data of " + std::to_string(extra_size) + " bytes (limit 1024)");
}

/// Bytes the entry whose fixed part is at `p` occupies, without padding.
uint64_t entry_bytes(const std::byte* p, uint32_t index) {
    uint32_t extra_size = load_be32(p + 36);
    check_extra_size(extra_size, index);
    return kFixedEntrySize + extra_size + load_be16(p + 12) + load_be16(p + 14);
}

void read_extra(Snapshot& s, const std::byte* extra, uint32_t size, const Header& h) {
    s.extra_data.assign(extra, extra + size);
    if (size >= kExtraVmStateEnd) s.vm_state_size = load_be64(extra);
    s.disk_size = size >= kExtraDiskSizeEnd ? load_be64(extra + 8) : h.size;
}

/// Parses the entry at `at` into `s`; returns where it ends (before any padding).
size_t parse_entry(std::span<const std::byte> table, size_t at, uint32_t index, const Header& h, uint64_t file_size,
                   Snapshot& s) {
    const std::byte* p = need(table, at, kFixedEntrySize, index);
    s.l1_table_offset = load_be64(p);
    s.l1_size = load_be32(p + 8);
    uint16_t id_size = load_be16(p + 12);
    uint16_t name_size = load_be16(p + 14);
    s.date_sec = load_be32(p + 16);
    s.date_nsec = load_be32(p + 20);
    s.vm_clock_nsec = load_be64(p + 24);
    s.vm_state_size = load_be32(p + 32);
    uint32_t extra_size = load_be32(p + 36);
    check_extra_size(extra_size, index);
    check_l1(s, h, file_size, index);
    uint64_t extra_at = at + kFixedEntrySize;
    read_extra(s, need(table, extra_at, extra_size, index), extra_size, h);
    const char* id = reinterpret_cast<const char*>(need(table, extra_at + extra_size, id_size, index));
    s.id.assign(id, id_size);
    const char* name = reinterpret_cast<const char*>(need(table, extra_at + extra_size + id_size, name_size, index));
    s.name.assign(name, name_size);
    return extra_at + extra_size + id_size + name_size;
}


void check_serializable(const Snapshot& s) {
    if (s.id.size() > UINT16_MAX || s.name.size() > UINT16_MAX)
        fail(EINVAL, "snapshot id or name longer than 65535 bytes");
    if (s.extra_data.size() > kMaxExtraData)
        fail(EINVAL, "snapshot extra data of " + std::to_string(s.extra_data.size()) + " bytes (limit 1024)");
}

void append_entry(std::vector<std::byte>& out, const Snapshot& s) {
    check_serializable(s);
    // Extra data always carries vm_state_size_large and disk_size; further bytes are kept as they were.
    std::vector<std::byte> extra(std::max(s.extra_data.size(), kExtraDiskSizeEnd));
    std::copy(s.extra_data.begin(), s.extra_data.end(), extra.begin());
    store_be64(extra.data(), s.vm_state_size);
    store_be64(extra.data() + 8, s.disk_size);
    size_t at = round_up8(out.size());
    out.resize(at + kFixedEntrySize + extra.size() + s.id.size() + s.name.size());
    std::byte* p = out.data() + at;
    store_be64(p, s.l1_table_offset);
    store_be32(p + 8, s.l1_size);
    store_be16(p + 12, static_cast<uint16_t>(s.id.size()));
    store_be16(p + 14, static_cast<uint16_t>(s.name.size()));
    store_be32(p + 16, s.date_sec);
    store_be32(p + 20, s.date_nsec);
    store_be64(p + 24, s.vm_clock_nsec);
    store_be32(p + 32, static_cast<uint32_t>(std::min<uint64_t>(s.vm_state_size, UINT32_MAX)));
    store_be32(p + 36, static_cast<uint32_t>(extra.size()));
    p = std::copy(extra.begin(), extra.end(), p + kFixedEntrySize);
    std::memcpy(p, s.id.data(), s.id.size());
    std::memcpy(p + s.id.size(), s.name.data(), s.name.size());
}

}  // namespace

std::vector<Snapshot> parse_snapshot_table(std::span<const std::byte> table, const Header& header,
                                           uint64_t file_size) {
    check_header(header);
    table = table.first(std::min<size_t>(table.size(), kMaxSnapshotTableBytes));
    std::vector<Snapshot> out;
    out.reserve(std::min<size_t>(header.nb_snapshots, table.size() / kFixedEntrySize));
    size_t at = 0;
    for (uint32_t i = 0; i < header.nb_snapshots; ++i) {  // each entry starts 8-aligned
        Snapshot s;
        at = parse_entry(table, round_up8(at), i, header, file_size, s);
        out.push_back(std::move(s));
    }
    return out;
}

uint64_t snapshot_table_bytes_needed(std::span<const std::byte> table, const Header& header) {
    check_header(header);
    uint64_t at = 0;
    for (uint32_t i = 0; i < header.nb_snapshots; ++i) {
        // Every later entry takes at least its fixed part, 8-aligned.
        const uint64_t later = uint64_t{header.nb_snapshots - 1 - i} * kFixedEntrySize;
        at = round_up8(at);
        if (!inside(at, kFixedEntrySize, table.size())) return at + kFixedEntrySize + later;
        at += entry_bytes(table.data() + at, i);
        if (at > table.size()) return later == 0 ? at : round_up8(at) + later;
    }
    return at;  // QEMU writes no padding after the last entry
}

std::vector<std::byte> serialize_snapshot_table(const std::vector<Snapshot>& snapshots, uint32_t version) {
    if (version != 2 && version != 3)
        fail(EINVAL, "cannot serialize snapshots for qcow2 version " + std::to_string(version));
    if (snapshots.size() > kMaxSnapshots) fail(EINVAL, "too many snapshots: " + std::to_string(snapshots.size()));
    std::vector<std::byte> out;
    for (const Snapshot& s : snapshots) append_entry(out, s);
    if (out.size() > kMaxSnapshotTableBytes) fail(EINVAL, "snapshot table exceeds 64 MiB");
    return out;
}

}  // namespace qcowfs::format
