// Internal snapshot table entries: parse, validate and serialize (pure, no I/O).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "qcowfs/format/header.hpp"

namespace qcowfs::format {

struct Snapshot {
    uint64_t l1_table_offset = 0;
    uint32_t l1_size = 0;  // entries
    std::string id;
    std::string name;
    uint32_t date_sec = 0;
    uint32_t date_nsec = 0;
    uint64_t vm_clock_nsec = 0;
    uint64_t vm_state_size = 0;  // the 64-bit field when present in extra data, else the 32-bit one
    uint64_t disk_size = 0;      // virtual disk size at snapshot time (header.size if not recorded)
    std::vector<std::byte> extra_data;  // as on disk, kept for round-trips
};

/// Parses `header.nb_snapshots` entries from the snapshot table bytes (read from
/// header.snapshots_offset; pass at least the whole table, at most kMaxSnapshotTableBytes).
/// Validates each entry: L1 offset cluster-aligned and inside `file_size`, l1_size within
/// kMaxL1Bytes / 8, name and id lengths inside the buffer, extra data length sane.
/// Throws std::system_error(EIO) naming the bad entry.
std::vector<Snapshot> parse_snapshot_table(std::span<const std::byte> table, const Header& header,
                                           uint64_t file_size);

/// How many bytes of the table to read, given its first bytes `table` (any prefix, even empty):
/// when the prefix holds all `header.nb_snapshots` entries, the exact size of the table (<=
/// table.size(); there is no padding after the last entry); otherwise a lower bound on it, larger
/// than table.size() (the entries not yet seen count their 40-byte fixed part). Each entry's
/// size comes from its fixed part; only its extra data length is validated here
/// (parse_snapshot_table checks the rest). Throws std::system_error(EIO) for an entry with
/// too much extra data or too many snapshots.
uint64_t snapshot_table_bytes_needed(std::span<const std::byte> table, const Header& header);

/// Serializes snapshots into a table (each entry starts 8-aligned; as QEMU writes it, there is no
/// padding after the last entry, so the result has snapshot_table_bytes_needed() bytes).
std::vector<std::byte> serialize_snapshot_table(const std::vector<Snapshot>& snapshots, uint32_t version);

}  // namespace qcowfs::format
