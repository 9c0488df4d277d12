// Scanner: walks SOURCE_DIR, probes qcow2 headers (reusing unchanged parses) and builds the Tree.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <functional>
#include <limits>
#include <optional>
#include <set>
#include <span>
#include <utility>

#include "qcowfs/format/bitmaps.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/header.hpp"
#include "qcowfs/format/probe.hpp"
#include "qcowfs/fs/tree.hpp"
#include "qcowfs/util/log.hpp"

namespace qcowfs::fs {

namespace {

constexpr mode_t kWriteBits = S_IWUSR | S_IWGRP | S_IWOTH;
constexpr mode_t kPermissionBits = 0777;
constexpr size_t kNameMax = 255;  // longer names cannot be looked up through the kernel

/// Closes a file descriptor on scope exit.
class FdCloser {
public:
    explicit FdCloser(int fd) : fd_(fd) {}
    FdCloser(const FdCloser&) = delete;
    FdCloser& operator=(const FdCloser&) = delete;
    ~FdCloser() {
        if (fd_ >= 0) ::close(fd_);
    }

private:
    int fd_;
};

std::string join_path(const std::string& dir, std::string_view name) {
    std::string out = dir;
    if (out.empty() || out.back() != '/') out += '/';
    out += name;
    return out;
}

/// Absolute, lexically normal, without a trailing slash (except for "/" itself). No file access,
/// so the excluded mount point is never touched.
std::string normalize_path(const std::string& p) {
    if (p.empty()) return p;
    std::string out = std::filesystem::absolute(std::filesystem::path(p)).lexically_normal().string();
    while (out.size() > 1 && out.back() == '/') out.pop_back();
    return out;
}

bool same_timespec(const timespec& a, const timespec& b) {
    return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec;
}

/// True when the file has not changed since `old` was taken (a parse of it can be reused).
bool same_version(const struct stat& old, const struct stat& now) {
    return old.st_dev == now.st_dev && old.st_ino == now.st_ino && old.st_size == now.st_size &&
           same_timespec(old.st_mtim, now.st_mtim) && same_timespec(old.st_ctim, now.st_ctim);
}

/// Reads up to buf.size() bytes at `offset`; fewer only at end of file. Throws on I/O errors.
size_t read_at(int fd, std::span<std::byte> buf, uint64_t offset) {
    size_t done = 0;
    while (done < buf.size()) {
        ssize_t r = ::pread(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
        if (r < 0) {
            if (errno == EINTR) continue;
            fail(errno, "cannot read the image at offset " + std::to_string(offset + done));
        }
        if (r == 0) break;
        done += static_cast<size_t>(r);
    }
    return done;
}

/// Does the reads `probe` asks for (blocking), until it has all it needs.
void run_probe(int fd, format::ImageProbe& probe) {
    while (auto r = probe.next()) {
        std::vector<std::byte> bytes(r->length);
        bytes.resize(read_at(fd, bytes, r->offset));
        probe.feed(bytes);
    }
}

/// Names of the enabled bitmaps of an image (the bitmap directory, read and validated; an
/// invalid one lists none).
std::vector<std::string> enabled_bitmaps(int fd, const format::ImageMetadata& meta) {
    std::vector<std::string> names;
    const format::BitmapsExtension* ext = format::active_bitmaps(meta);
    if (!ext) return names;
    try {
        struct stat st {};
        if (::fstat(fd, &st) != 0) return names;
        const uint64_t file_size = static_cast<uint64_t>(st.st_size);
        format::check_bitmap_directory_location(*ext, meta.header.cluster_bits, file_size);
        std::vector<std::byte> dir(ext->bitmap_directory_size);
        dir.resize(read_at(fd, dir, ext->bitmap_directory_offset));
        for (auto& e : format::parse_bitmap_directory(dir, meta, file_size))
            if (e.flags & format::kBitmapAuto) names.push_back(std::move(e.name));
    } catch (const std::system_error&) {
        names.clear();
    }
    return names;
}

/// Fills `info` from the probe's findings (header cluster and snapshot table, never more than
/// that), doing the reads it asks for. Returns true when `info` also depends on the external
/// data file (its size counts, or it is missing): such a result is not reused by the next scan.
bool parse_image(int fd, format::ImageProbe& probe, ImageInfo& info) {
    run_probe(fd, probe);
    format::ProbedImage found = probe.take();
    const format::ImageMetadata& meta = found.meta;
    info.virtual_size = meta.header.size;
    if (meta.header.corrupt()) info.read_only_reason = "the image is marked corrupt";
    if (!meta.backing_file.empty()) info.backing_path = format::resolve_relative(info.path, meta.backing_file);
    info.error = format::problem_text(found.problem);

    const bool reads_data_file = found.problem == format::ProbeProblem::none && meta.header.has_external_data_file();
    if (reads_data_file) {
        std::string data_path = format::resolve_relative(info.path, *meta.extensions.data_file);
        struct stat dst {};
        if (::stat(data_path.c_str(), &dst) == 0)
            info.allocated_bytes += static_cast<uint64_t>(dst.st_blocks) * 512;
        else
            info.error = "external data file " + *meta.extensions.data_file + " not found";
    }
    if (!info.error.empty()) return reads_data_file;  // an image that cannot be opened exposes no snapshots

    for (format::Snapshot& s : found.snapshots) {
        // A file size must fit off_t: a snapshot claiming 2^63 bytes or more is not shown (the
        // scan parses a file once per change, so this is said once).
        if (s.disk_size > static_cast<uint64_t>(std::numeric_limits<off_t>::max())) {
            log::error(info.path + ": snapshot " + s.id + " claims a disk size of " + std::to_string(s.disk_size) +
                       " bytes (2^63 or more); it is not shown");
            continue;
        }
        info.snapshots.push_back(SnapshotInfo{std::move(s.id), std::move(s.name), s.disk_size});
    }
    info.bitmaps = enabled_bitmaps(fd, meta);
    return reads_data_file;
}

struct Probed {
    std::shared_ptr<const ImageInfo> info;  // nullptr: not a qcow2 image
    bool cacheable = true;  // false when the result depends on another file (external data file)
};

/// Examines one regular file, open as `fd` (or opened here as the daemon when `fd` < 0, refusing
/// a symlink that was not there at the directory walk). nullopt: unreadable, skip it (and retry
/// next scan). `st` is refreshed from the open file.
std::optional<Probed> probe_file(const io::HostPolicy& policy, const std::string& path, struct stat& st, int fd) {
    if (fd < 0) {
        try {
            fd = io::open_regular(policy, path, false, nullptr);
        } catch (const std::system_error&) {
            return std::nullopt;
        }
    } else {
        fd = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (fd < 0) return std::nullopt;
    }
    FdCloser closer(fd);
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return std::nullopt;

    format::ImageProbe probe(static_cast<uint64_t>(st.st_size));
    std::vector<std::byte> first(probe.next()->length);  // the header: its magic tells an image
    try {
        first.resize(read_at(fd, first, 0));
    } catch (const std::system_error&) {
        return std::nullopt;
    }
    if (!format::has_qcow2_magic(first)) return Probed{};

    auto info = std::make_shared<ImageInfo>();
    info->path = path;
    struct stat link_st {};
    info->path_is_symlink = ::lstat(path.c_str(), &link_st) == 0 && S_ISLNK(link_st.st_mode);
    info->host_stat = st;
    info->allocated_bytes = static_cast<uint64_t>(st.st_blocks) * 512;
    bool reads_data_file = false;
    try {
        probe.feed(first);
        reads_data_file = parse_image(fd, probe, *info);
    } catch (const std::system_error& e) {
        info->error = reason_of(e);
        info->virtual_size = 0;
        info->snapshots.clear();
    } catch (const std::exception& e) {  // a parser bug must not take the whole view down
        info->error = e.what();
        info->virtual_size = 0;
        info->snapshots.clear();
    }
    if (!info->error.empty()) info->read_only_reason = info->error;
    return Probed{std::move(info), !reads_data_file};
}

/// Names in a directory, sorted bytewise. nullopt (errno set) if it cannot be read.
std::optional<std::vector<std::string>> read_dir_names(const std::string& path) {
    DIR* dir = ::opendir(path.c_str());
    if (dir == nullptr) return std::nullopt;
    std::vector<std::string> names;
    for (;;) {
        errno = 0;
        dirent* e = ::readdir(dir);
        if (e == nullptr) break;
        std::string_view n = e->d_name;
        if (n == "." || n == "..") continue;
        names.emplace_back(n);
    }
    int err = errno;
    ::closedir(dir);
    if (err != 0) {
        errno = err;
        return std::nullopt;
    }
    std::sort(names.begin(), names.end());
    return names;
}

struct stat directory_attr(const struct stat& host, bool writes_supported) {
    struct stat a {};
    mode_t perm = host.st_mode & kPermissionBits;
    if (!writes_supported) perm &= ~kWriteBits;
    a.st_mode = S_IFDIR | perm;
    a.st_nlink = 2;
    a.st_uid = host.st_uid;
    a.st_gid = host.st_gid;
    a.st_size = host.st_size;
    a.st_blksize = 4096;
    a.st_atim = host.st_atim;
    a.st_mtim = host.st_mtim;
    a.st_ctim = host.st_ctim;
    return a;
}

struct stat image_attr(const ImageInfo& info, bool writes_supported) {
    const struct stat& host = info.host_stat;
    struct stat a {};
    mode_t perm = host.st_mode & kPermissionBits;
    if (!writes_supported || !info.read_only_reason.empty()) perm &= ~kWriteBits;
    a.st_mode = S_IFREG | perm;
    a.st_nlink = 1;
    a.st_uid = host.st_uid;
    a.st_gid = host.st_gid;
    a.st_size = static_cast<off_t>(info.virtual_size);
    a.st_blocks = static_cast<blkcnt_t>((info.allocated_bytes + 511) / 512);
    a.st_blksize = 4096;
    a.st_atim = host.st_atim;
    a.st_mtim = host.st_mtim;
    a.st_ctim = host.st_ctim;
    return a;
}

struct stat snapshot_attr(const ImageInfo& info, const SnapshotInfo& snap) {
    struct stat a = image_attr(info, false);
    a.st_size = static_cast<off_t>(snap.disk_size);
    a.st_blocks = 0;
    return a;
}

/// Labels of an image's snapshots in the exposed names (index-aligned; "" = not exposable).
std::vector<std::string> snapshot_labels(const std::vector<SnapshotInfo>& snaps) {
    std::map<std::string_view, int> name_count;
    for (const SnapshotInfo& s : snaps) ++name_count[s.name];
    auto usable = [](std::string_view s) {
        return !s.empty() && s.find('/') == std::string_view::npos && s.find('\0') == std::string_view::npos;
    };
    std::vector<std::string> labels;
    labels.reserve(snaps.size());
    for (const SnapshotInfo& s : snaps) {
        if (usable(s.name) && name_count[s.name] == 1)
            labels.push_back(s.name);
        else if (usable(s.id))
            labels.push_back(s.id);
        else
            labels.emplace_back();
    }
    return labels;
}

/// One scan's walk over the host tree. Image probing (and its cache) is supplied by Scanner.
class Walker {
public:
    /// Finds the image info of a regular file: `fd` is the file opened with its symlink owner's
    /// rights, or -1 (open it as the daemon if it must be read).
    using ImageLookup = std::function<std::optional<std::shared_ptr<const ImageInfo>>(const std::string& path,
                                                                                       struct stat& st, int fd)>;

    /// `options.exclude` must already be normalized like the paths the walk builds.
    Walker(Tree& tree, const ScanOptions& options, ImageLookup lookup)
        : tree_(tree), options_(options), policy_(options.policy ? *options.policy : kNoPolicy), lookup_(std::move(lookup)) {}

    /// Marks a directory as entered; false if it was already (a bind mount loop).
    bool enter(const struct stat& st) { return visited_.emplace(st.st_dev, st.st_ino).second; }

    /// Adds directory `path` (already entered, its sorted entries `names`) and all below it.
    NodeKey add_directory(const std::string& path, const struct stat& st, std::string name,
                          const std::vector<std::string>& names) {
        Node dir;
        dir.key = NodeKey{NodeKey::Kind::directory, st.st_dev, st.st_ino, {}};
        dir.name = std::move(name);
        dir.attr = directory_attr(st, options_.writes_supported);
        dir.host_path = path;

        std::vector<Item> items = classify(path, names);
        assign_image_names(items);

        std::set<NodeKey> linked;  // keys already children of this directory
        auto claim = [&](const std::string& exposed, const NodeKey& key) {
            if (exposed.size() > kNameMax || dir.children.count(exposed) != 0) return false;
            dir.children.emplace(exposed, key);
            linked.insert(key);
            return true;
        };
        for (Item& item : items) {
            if (item.image == nullptr) {
                NodeKey key{NodeKey::Kind::directory, item.st.st_dev, item.st.st_ino, {}};
                if (claim(item.host_name, key))
                    add_directory(item.path, item.st, item.host_name, item.sub_names);
                continue;
            }
            const ImageInfo& info = *item.image;
            const uint64_t dev = info.host_stat.st_dev, ino = info.host_stat.st_ino;
            NodeKey key{NodeKey::Kind::image, dev, ino, {}};
            if (claim(item.exposed, key) && tree_.find(key) == nullptr) {
                Node n;
                n.key = key;
                n.name = item.exposed;
                n.attr = image_attr(info, options_.writes_supported);
                n.image = item.image;
                tree_.add(std::move(n));
            }
            std::vector<std::string> labels = snapshot_labels(info.snapshots);
            for (size_t i = 0; i < labels.size(); ++i) {
                if (labels[i].empty()) continue;
                NodeKey skey{NodeKey::Kind::snapshot, dev, ino, info.snapshots[i].id};
                if (linked.count(skey) != 0) continue;  // duplicate snapshot ID in a damaged table
                std::string exposed = snapshot_raw_name(item.exposed, labels[i]);
                if (!claim(exposed, skey) || tree_.find(skey) != nullptr) continue;
                Node n;
                n.key = skey;
                n.name = std::move(exposed);
                n.attr = snapshot_attr(info, info.snapshots[i]);
                n.image = item.image;
                n.snapshot_index = static_cast<int>(i);
                tree_.add(std::move(n));
            }
            // Bitmap files after the snapshots, which keep a name both would take.
            for (const std::string& bitmap : info.bitmaps) {
                NodeKey bkey{NodeKey::Kind::bitmap, dev, ino, bitmap};
                std::string exposed = bitmap_raw_name(item.exposed, bitmap);
                if (exposed.empty() || linked.count(bkey) != 0 || !claim(exposed, bkey) || tree_.find(bkey) != nullptr)
                    continue;
                Node n;
                n.key = bkey;
                n.name = std::move(exposed);
                n.attr = image_attr(info, false);  // read-only, the disk's size
                n.attr.st_blocks = 0;
                n.image = item.image;
                tree_.add(std::move(n));
            }
        }
        NodeKey key = dir.key;
        tree_.add(std::move(dir));
        return key;
    }

private:
    /// A directory entry worth exposing: a readable subdirectory or a qcow2 image.
    struct Item {
        std::string host_name;
        std::string path;
        struct stat st {};
        std::vector<std::string> sub_names;      // subdirectories: their sorted entries
        std::shared_ptr<const ImageInfo> image;  // images; nullptr for subdirectories
        std::string exposed;                     // images: exposed NAME.raw
    };

    std::vector<Item> classify(const std::string& dir_path, const std::vector<std::string>& names) {
        std::vector<Item> items;
        for (const std::string& name : names) {
            Item item;
            item.host_name = name;
            item.path = join_path(dir_path, name);
            if (!options_.exclude.empty() && item.path == options_.exclude) continue;  // never stat the mount point
            if (::lstat(item.path.c_str(), &item.st) != 0) continue;
            int link_fd = -1;
            if (S_ISLNK(item.st.st_mode)) {
                // Symlinks count only when they lead to a regular file that the symlink's owner
                // may read: followed with the owner's rights, never onto the own mount.
                std::optional<io::Credentials> owner;
                if (item.st.st_uid != ::geteuid() && item.st.st_uid != 0)
                    owner = io::credentials_of_user(item.st.st_uid, item.st.st_gid);
                try {
                    link_fd = io::open_regular(policy_, item.path, true, owner ? &*owner : nullptr);
                } catch (const std::system_error&) {
                    continue;
                }
                if (::fstat(link_fd, &item.st) != 0) {
                    ::close(link_fd);
                    continue;
                }
            }
            FdCloser link_closer(link_fd);
            if (S_ISDIR(item.st.st_mode)) {
                auto sub = read_dir_names(item.path);
                if (!sub || !enter(item.st)) continue;
                item.sub_names = std::move(*sub);
            } else if (S_ISREG(item.st.st_mode)) {
                auto image = lookup_(item.path, item.st, link_fd);
                if (!image || *image == nullptr) continue;
                item.image = std::move(*image);
            } else {
                continue;
            }
            items.push_back(std::move(item));
        }
        return items;
    }

    /// NAME.raw for each image. On a clash one image keeps it and the others use their full file
    /// name: first a file whose name needed no stripping (it has no other), then ".qcow2", then
    /// ".qcow", ties by file name ("a.qcow" + "a.qcow2" -> "a.qcow.raw" + "a.raw").
    static void assign_image_names(std::vector<Item>& items) {
        auto rank = [](const std::string& host_name, const std::string& short_name) {
            if (short_name == host_name + ".raw") return 0;                      // nothing stripped
            return host_name.size() == short_name.size() - 4 + 6 ? 1 : 2;  // ".qcow2" : ".qcow"
        };
        std::map<std::string, std::pair<int, const std::string*>> winners;  // short name -> best claim
        for (Item& item : items) {
            if (item.image == nullptr) continue;
            item.exposed = raw_name(item.host_name);
            std::pair<int, const std::string*> claim{rank(item.host_name, item.exposed), &item.host_name};
            auto [it, inserted] = winners.emplace(item.exposed, claim);
            // Items come sorted by file name, so on equal rank the earlier one stays.
            if (!inserted && claim.first < it->second.first) it->second = claim;
        }
        for (Item& item : items) {
            if (item.image != nullptr && winners.at(item.exposed).second != &item.host_name)
                item.exposed = item.host_name + ".raw";
        }
    }

    static inline const io::HostPolicy kNoPolicy{};
    Tree& tree_;
    const ScanOptions& options_;
    const io::HostPolicy& policy_;
    ImageLookup lookup_;
    std::set<std::pair<dev_t, ino_t>> visited_;
};

/// An image that backs another must not change under it: marks every image of `tree` that is the
/// backing file (same device and inode) of another image in it read-only, on copies of their
/// ImageInfo (the cached parse stays as it is: the next scan decides again).
void mark_backing_files(Tree& tree) {
    std::map<std::pair<uint64_t, uint64_t>, std::string> backing;  // (dev, ino) -> an overlay's path
    tree.for_each([&](Node& n) {
        if (n.key.kind != NodeKey::Kind::image || n.image->backing_path.empty()) return;
        struct stat st {};
        if (::stat(n.image->backing_path.c_str(), &st) == 0)
            backing.try_emplace({st.st_dev, st.st_ino}, n.image->path);
    });
    if (backing.empty()) return;
    std::map<std::pair<uint64_t, uint64_t>, std::shared_ptr<const ImageInfo>> marked;
    tree.for_each([&](Node& n) {
        if (n.key.kind == NodeKey::Kind::directory || !n.image->read_only_reason.empty()) return;
        std::pair<uint64_t, uint64_t> id{n.key.dev, n.key.ino};
        auto it = backing.find(id);
        if (it == backing.end()) return;
        auto& copy = marked[id];
        if (!copy) {
            auto info = std::make_shared<ImageInfo>(*n.image);
            info->read_only_reason = "it is the backing file of ";
            info->read_only_reason.append(it->second);
            copy = std::move(info);
        }
        n.image = copy;
        n.attr.st_mode &= ~kWriteBits;
    });
}

}  // namespace

Scanner::Scanner(std::string source_dir, ScanOptions options)
    : source_dir_(normalize_path(source_dir)), options_(std::move(options)) {
    // Absolute paths: the daemon may chdir("/") after the scanner was made.
    options_.exclude = normalize_path(options_.exclude);
}

std::shared_ptr<const Tree> Scanner::scan() {
    const auto started = std::chrono::steady_clock::now();
    struct stat root_st {};
    if (::stat(source_dir_.c_str(), &root_st) != 0) fail(errno, "cannot read source directory " + source_dir_);
    if (!S_ISDIR(root_st.st_mode)) fail(ENOTDIR, "source " + source_dir_ + " is not a directory");
    auto root_names = read_dir_names(source_dir_);
    if (!root_names) fail(errno, "cannot read source directory " + source_dir_);

    std::map<std::pair<uint64_t, uint64_t>, Cached> next_cache;
    static const io::HostPolicy kNoPolicy{};
    const io::HostPolicy& policy = options_.policy ? *options_.policy : kNoPolicy;
    auto lookup = [&](const std::string& path, struct stat& st,
                      int fd) -> std::optional<std::shared_ptr<const ImageInfo>> {
        std::pair<uint64_t, uint64_t> id{st.st_dev, st.st_ino};
        // Another name (symlink, hard link) of a file already examined in this scan.
        if (auto it = next_cache.find(id); it != next_cache.end() && same_version(it->second.st, st))
            return it->second.info;
        // Unchanged since the previous scan, under the same path: reuse without reading.
        if (auto it = cache_.find(id); it != cache_.end() && same_version(it->second.st, st) &&
                                       (it->second.info == nullptr || it->second.info->path == path)) {
            next_cache.insert_or_assign(id, it->second);
            return it->second.info;
        }
        std::optional<Probed> probed = probe_file(policy, path, st, fd);
        if (!probed) return std::nullopt;
        if (probed->cacheable)
            next_cache.insert_or_assign(std::pair<uint64_t, uint64_t>{st.st_dev, st.st_ino},
                                        Cached{st, probed->info});
        return probed->info;
    };

    auto tree = std::make_shared<Tree>();
    Walker walker(*tree, options_, lookup);
    walker.enter(root_st);
    NodeKey root = walker.add_directory(source_dir_, root_st, "", *root_names);
    tree->set_root(root);
    tree->set_scanned_at(started);
    mark_backing_files(*tree);
    cache_ = std::move(next_cache);  // files not seen in this scan are forgotten
    return tree;
}

}  // namespace qcowfs::fs
