// The directory view: an immutable snapshot of SOURCE_DIR's images, made by Scanner, served by FUSE.
#pragma once

#include <sys/stat.h>

#include <chrono>
#include <compare>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "qcowfs/io/host.hpp"

namespace qcowfs::fs {

/// Identity of an exposed object that survives renames and rescans: a directory or image file is
/// known by its host (st_dev, st_ino); a snapshot view by its image plus the snapshot's unique ID;
/// a bitmap file by its image plus the bitmap's name (unique in an image).
struct NodeKey {
    enum class Kind : uint8_t { directory, image, snapshot, bitmap };
    Kind kind = Kind::directory;
    uint64_t dev = 0;
    uint64_t ino = 0;
    std::string snapshot_id;  // Kind::snapshot: the snapshot's ID; Kind::bitmap: the bitmap's name
    auto operator<=>(const NodeKey&) const = default;
};

struct SnapshotInfo {
    std::string id;
    std::string name;
    uint64_t disk_size = 0;  // virtual size of the snapshot's disk
};

/// What the scanner learned about one image file (from its header and snapshot table only).
struct ImageInfo {
    std::string path;          // host path of the image file (as found under SOURCE_DIR)
    bool path_is_symlink = false;  // `path` itself is a symlink (opens follow it; else they refuse one)
    struct stat host_stat {};  // stat of the image file (symlinks followed)
    uint64_t virtual_size = 0;
    uint64_t allocated_bytes = 0;  // host_stat.st_blocks * 512, plus the external data file's
    /// Non-empty when the image is listed but cannot be opened, e.g. "encryption is not
    /// supported", "unknown incompatible feature bits 0x40", or the header parse error.
    std::string error;
    std::string backing_path;  // resolved host path of the backing file, "" if none
    /// Empty when the image may be opened for writing; otherwise why not: the `error`, "the image
    /// is marked corrupt", "unknown incompatible feature bits 0x40", "it is the backing file of
    /// OTHER". Set by the scanner; open() for writing answers EROFS when it is non-empty.
    std::string read_only_reason;
    std::vector<SnapshotInfo> snapshots;
    /// Names of the enabled (auto) persistent dirty bitmaps, in directory order; none when the
    /// directory cannot be read (the image then refuses writes for that reason when opened).
    std::vector<std::string> bitmaps;
};

/// One entry of the view: a directory, an image's NAME.raw, a snapshot's NAME@SNAP.raw, or an
/// enabled bitmap's NAME@bitmap-BITMAP.raw.
struct Node {
    NodeKey key;
    std::string name;                         // exposed name inside its parent ("" for the root)
    struct stat attr {};                      // attributes to expose (st_ino is set by the FUSE layer)
    std::shared_ptr<const ImageInfo> image;   // image and snapshot nodes
    int snapshot_index = -1;                  // snapshot nodes: index into image->snapshots
    std::map<std::string, NodeKey, std::less<>> children;  // directories: exposed name -> child
    std::string host_path;  // directories: the host directory the scan read (attr has its times)
};

/// An immutable snapshot of the view. Thread-safe to read from many threads.
class Tree {
public:
    /// The root directory node (SOURCE_DIR itself).
    const Node& root() const;
    /// The node with this identity, or nullptr if it is not in this snapshot.
    const Node* find(const NodeKey& key) const;
    /// The child `name` of directory `dir`, or nullptr.
    const Node* child(const NodeKey& dir, std::string_view name) const;
    /// Number of nodes (for tests and logs).
    size_t size() const { return nodes_.size(); }
    /// When the scan that made this tree started: it shows nothing that changed later.
    std::chrono::steady_clock::time_point scanned_at() const { return scanned_at_; }

    // Construction (used by Scanner and tests).
    void add(Node node);
    /// Calls `fn` on every node, in key order, to adjust it while the tree is being built.
    template <class Fn>
    void for_each(Fn&& fn) {
        for (auto& [key, node] : nodes_) fn(node);
    }
    void set_root(NodeKey key) { root_ = std::move(key); }
    void set_scanned_at(std::chrono::steady_clock::time_point t) { scanned_at_ = t; }

private:
    NodeKey root_;
    std::map<NodeKey, Node> nodes_;
    std::chrono::steady_clock::time_point scanned_at_{};
};

struct ScanOptions {
    /// The host file rules (own mount, walk limits) every probe follows; nullptr: none beyond the
    /// walk's own. Must outlive the Scanner.
    const io::HostPolicy* policy = nullptr;
    /// Host path excluded from the scan (the mount point, when it lies inside SOURCE_DIR).
    std::string exclude;
    /// False for a read-only mount (-o ro): no exposed file or directory carries write bits.
    /// True: images keep the host file's write bits unless ImageInfo::read_only_reason is set.
    bool writes_supported = false;
};

/// Walks SOURCE_DIR recursively and builds a Tree. Every regular file (symlinks to regular files
/// followed when the symlink's owner may read the file, and then read with that owner's rights,
/// so a symlink planted in a shared directory shows nothing its owner could not read; symlinked
/// directories not descended; nothing on qcowfs's own mount) whose first four bytes are the qcow2 magic
/// becomes NAME.raw (NAME = file name without a trailing ".qcow2" or ".qcow"). When several files
/// would get one name, the short name goes first to a file without either suffix, then to the
/// ".qcow2" one, then to the ".qcow" one; the others keep their full file name ("a.qcow" beside
/// "a.qcow2" gives "a.qcow.raw"). Each internal snapshot appears as
/// NAME@SNAP.raw (SNAP = snapshot name; its ID when the name is empty, contains '/' or clashes),
/// and each enabled persistent dirty bitmap as NAME@bitmap-BITMAP.raw (read-only, the disk's size;
/// not shown when its name contains '/' or NUL, is too long, or the name is taken already).
/// Every subdirectory is mirrored. Attributes follow the host file: owner, group, times and
/// permission bits (write bits removed unless writes are supported and the image is writable:
/// no error, no corrupt bit, no unknown incompatible feature, and not the backing file of another
/// image in the tree, compared by device and inode; snapshots never have write bits);
/// st_size is the virtual size and st_blocks the image's allocated 512-byte blocks.
/// Headers of files unchanged since the previous scan (same dev, ino, size, mtime, ctime) are not
/// read again. Blocking: runs on the scanner thread, never on a thread that serves requests.
class Scanner {
public:
    Scanner(std::string source_dir, ScanOptions options);
    /// Scans now. Throws std::system_error only if SOURCE_DIR itself cannot be read; problems with
    /// single files are recorded in their ImageInfo::error or skip the file.
    std::shared_ptr<const Tree> scan();

private:
    struct Cached {
        struct stat st {};
        std::shared_ptr<const ImageInfo> info;  // nullptr: not a qcow2 image
    };
    std::string source_dir_;
    ScanOptions options_;
    std::map<std::pair<uint64_t, uint64_t>, Cached> cache_;  // (dev, ino) -> last parse
};

/// Exposed name of an image file: "vm1.qcow2" -> "vm1.raw", "disk.img" -> "disk.img.raw".
std::string raw_name(std::string_view file_name);
/// Base name without ".raw" for snapshots: image_base + "@" + snapshot + ".raw".
std::string snapshot_raw_name(std::string_view image_raw_name, std::string_view snapshot_label);
/// The file of a persistent dirty bitmap: image_base + "@bitmap-" + bitmap + ".raw"; "" when the
/// bitmap's name cannot be part of a file name (contains '/' or NUL).
std::string bitmap_raw_name(std::string_view image_raw_name, std::string_view bitmap_name);

}  // namespace qcowfs::fs
