// Probing an image: the reads and checks that find its header, extensions, backing name and snapshots (pure, no I/O).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "qcowfs/format/header.hpp"
#include "qcowfs/format/snapshot.hpp"

namespace qcowfs::format {

/// Why an image whose metadata parses cannot be opened by qcowfs. The directory still lists it
/// (with its size); opening it fails with the problem's errno.
enum class ProbeProblem {
    none,
    encrypted,          // ENOTSUP: crypt_method set (AES or LUKS)
    unnamed_data_file,  // EIO: the external data file bit without a data file name
};

/// The reason text of `p` ("" for none), as the scanner lists it and the open reports it.
std::string problem_text(ProbeProblem p);
/// Throws std::system_error for `p` (ENOTSUP or EIO, with problem_text); returns for none.
void check_openable(ProbeProblem p);

/// What probing found.
struct ProbedImage {
    ImageMetadata meta;
    std::vector<Snapshot> snapshots;  // not read (empty) when `problem` is set
    ProbeProblem problem = ProbeProblem::none;
};

/// Bytes of the image file to read next: [offset, offset + length).
struct ProbeRead {
    uint64_t offset = 0;
    uint64_t length = 0;
};

/// The one probe of an image's metadata, shared by the image open (awaitable reads) and the
/// directory scan (blocking reads). It does no I/O: it says which bytes it needs and checks
/// what it is given.
///
///     ImageProbe probe(file_size);
///     while (auto r = probe.next()) probe.feed(read(r->offset, r->length));
///     ProbedImage found = probe.take();
///
/// Reads, in order: the first kHeaderProbeBytes (the fixed header), the rest of cluster 0 when
/// the cluster is larger (extensions and backing name), then the snapshot table in as few reads
/// as snapshot_table_bytes_needed allows (each at least doubles what was read, from 64 KiB).
/// Checks: parse_header, parse_metadata, parse_snapshot_table; ProbeProblem for what parses but
/// cannot be opened (then the snapshot table is not read).
class ImageProbe {
public:
    explicit ImageProbe(uint64_t file_size);

    /// The read to do next; nullopt once the probe is complete (then take()).
    std::optional<ProbeRead> next() const;
    /// The bytes read for next(): all of them, fewer only where the file ends. Throws
    /// std::system_error: EIO for metadata that breaks the specification, ENOTSUP for valid but
    /// unsupported images (version 1, unknown incompatible features, compression types).
    void feed(std::span<const std::byte> bytes);
    /// The result, once next() is nullopt.
    ProbedImage take() { return std::move(found_); }

private:
    enum class Step { header, cluster0, snapshots, done };

    void after_header(bool short_read);
    void after_cluster0();
    void after_snapshots(bool short_read);
    void plan_snapshot_read(uint64_t needed);

    uint64_t file_size_;
    Step step_ = Step::header;
    ProbeRead want_;
    std::vector<std::byte> bytes_;  // cluster 0 so far, then the snapshot table so far
    uint64_t table_available_ = 0;  // snapshot table bytes the file (and the format's limit) allow
    ProbedImage found_;
};

/// A backing or data file name from the header, resolved against the directory of `image_path`
/// as QEMU does: absolute names stay, a relative one replaces the image's own file name
/// ("dir/a.qcow2" + "b" = "dir/b"; "a.qcow2" + "b" = "b").
std::string resolve_relative(const std::string& image_path, const std::string& name);

}  // namespace qcowfs::format
