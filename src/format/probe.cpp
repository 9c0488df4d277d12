// The one probe of an image's metadata: which bytes to read next, and the checks on what was read.
#include "qcowfs/format/probe.hpp"

#include <algorithm>

#include "qcowfs/format/error.hpp"

namespace qcowfs::format {

namespace {

/// The first read of a snapshot table: most tables are smaller, so one read is enough.
constexpr uint64_t kSnapshotTableFirstRead = 64 * 1024;

ProbeProblem problem_of(const ImageMetadata& m) {
    if (m.header.crypt_method != 0 || m.extensions.has_crypto_header) return ProbeProblem::encrypted;
    if (m.header.has_external_data_file() && (!m.extensions.data_file || m.extensions.data_file->empty()))
        return ProbeProblem::unnamed_data_file;
    return ProbeProblem::none;
}

}  // namespace

std::string problem_text(ProbeProblem p) {
    switch (p) {
        case ProbeProblem::none: return "";
        case ProbeProblem::encrypted: return "encryption is not supported";
        case ProbeProblem::unnamed_data_file:
            return "the external data file bit is set but the image names no data file";
    }
    return "";
}

void check_openable(ProbeProblem p) {
    if (p == ProbeProblem::encrypted) fail(ENOTSUP, problem_text(p));
    if (p != ProbeProblem::none) corrupt(problem_text(p));
}

ImageProbe::ImageProbe(uint64_t file_size)
    : file_size_(file_size), want_{0, std::min<uint64_t>(kHeaderProbeBytes, file_size)} {}

std::optional<ProbeRead> ImageProbe::next() const {
    if (step_ == Step::done) return std::nullopt;
    return want_;
}

void ImageProbe::feed(std::span<const std::byte> bytes) {
    if (step_ == Step::done) fail(EINVAL, "the image probe is complete: nothing more to read");
    const bool short_read = bytes.size() < want_.length;
    bytes = bytes.first(std::min<uint64_t>(bytes.size(), want_.length));
    bytes_.insert(bytes_.end(), bytes.begin(), bytes.end());
    switch (step_) {
        case Step::header: after_header(short_read); break;
        case Step::cluster0: after_cluster0(); break;
        case Step::snapshots: after_snapshots(short_read); break;
        case Step::done: break;
    }
}

void ImageProbe::after_header(bool short_read) {
    const Header h = parse_header(bytes_, file_size_);
    const uint64_t cluster0 = std::min(h.cluster_size(), file_size_);
    if (bytes_.size() >= cluster0 || short_read) {
        bytes_.resize(std::min<uint64_t>(bytes_.size(), cluster0));
        after_cluster0();
        return;
    }
    step_ = Step::cluster0;
    want_ = ProbeRead{bytes_.size(), cluster0 - bytes_.size()};
}

void ImageProbe::after_cluster0() {
    found_.meta = parse_metadata(bytes_, file_size_);
    found_.problem = problem_of(found_.meta);
    const Header& h = found_.meta.header;
    bytes_.clear();
    if (found_.problem != ProbeProblem::none || h.nb_snapshots == 0) {
        step_ = Step::done;
        return;
    }
    // parse_header has checked that the table's fixed parts lie inside the file.
    const uint64_t to_end = file_size_ - std::min(file_size_, h.snapshots_offset);
    table_available_ = std::min<uint64_t>(kMaxSnapshotTableBytes, to_end);
    step_ = Step::snapshots;
    plan_snapshot_read(snapshot_table_bytes_needed({}, h));
}

void ImageProbe::after_snapshots(bool short_read) {
    const Header& h = found_.meta.header;
    const uint64_t needed = snapshot_table_bytes_needed(bytes_, h);
    if (needed <= bytes_.size() || short_read || bytes_.size() >= table_available_) {
        // Short of `needed` only when the file (or the format's limit) ends first: the parse says
        // which entry is cut off.
        found_.snapshots = parse_snapshot_table(std::span(bytes_).first(std::min<uint64_t>(needed, bytes_.size())), h,
                                                file_size_);
        bytes_.clear();
        bytes_.shrink_to_fit();
        step_ = Step::done;
        return;
    }
    plan_snapshot_read(needed);
}

void ImageProbe::plan_snapshot_read(uint64_t needed) {
    // At least doubling: a table of large entries (long names, extra data) takes few reads even
    // though `needed` counts the entries not yet seen at their minimum size.
    const uint64_t have = bytes_.size();
    const uint64_t total = std::min(table_available_, std::max({needed, 2 * have, kSnapshotTableFirstRead}));
    want_ = ProbeRead{found_.meta.header.snapshots_offset + have, total - have};
}

std::string resolve_relative(const std::string& image_path, const std::string& name) {
    if (name.empty() || name.front() == '/') return name;
    auto slash = image_path.rfind('/');
    if (slash == std::string::npos) return name;
    return image_path.substr(0, slash + 1) + name;
}

}  // namespace qcowfs::format
