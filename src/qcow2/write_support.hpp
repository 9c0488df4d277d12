// Small helpers the write path's files share (private to src/qcow2/).
#pragma once

#include "qcowfs/format/entries.hpp"

namespace qcowfs::qcow2 {

/// The entry has a host cluster of its own (normal or preallocated zero; not compressed).
inline bool has_host(const format::L2Entry& e) { return !e.compressed && (e.host_offset != 0 || e.copied); }

}  // namespace qcowfs::qcow2
