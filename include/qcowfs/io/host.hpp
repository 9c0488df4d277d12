// Host file policy: which files qcowfs may open as image, backing or data file, and as whom.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qcowfs/io/file.hpp"

namespace qcowfs::io {

/// The user a request comes from: the host's access rules are applied with these ids.
struct Credentials {
    uid_t uid = 0;
    gid_t gid = 0;
    std::vector<gid_t> groups;  // supplementary groups
};

/// Where image, backing and data files may be, and what qcowfs never opens.
struct HostPolicy {
    /// Canonical directories (no symlinks, no trailing slash) that backing and data files must
    /// lie in once every symlink is resolved: SOURCE_DIR and each -o allow_dir. "/" allows all.
    std::vector<std::string> allowed_dirs;
    /// Canonical path of qcowfs's own mount point: nothing at or below it is ever opened, and no
    /// path walk steps onto it (that would be a request to this very daemon).
    std::string own_mount;
    /// st_dev of the mounted file system once known (0: not yet); files on it are refused.
    uint64_t own_dev = 0;
    /// Take and check QEMU's image locks (false with -o force_share).
    bool locking = true;
};

/// What a host file is: enough to recognise it again.
struct FileIdentity {
    uint64_t dev = 0;
    uint64_t ino = 0;
    bool operator==(const FileIdentity&) const = default;
};

enum class FileRole { image, backing, data_file };

/// A host file an open image depends on, as named, with the identity it had when opened.
struct HostFile {
    std::string path;           // the path it was opened by
    FileRole role = FileRole::image;
    bool follow_final = true;   // the final component may be a symlink
    FileIdentity identity;
};

/// A request to open a host file for an image.
struct HostOpen {
    std::string path;
    FileRole role = FileRole::image;
    bool writable = false;
    /// Images: whether the scan found a symlink at `path` (else a final symlink is refused).
    bool follow_final = true;
    /// Images: the identity the scan saw; a different file at `path` is refused (ESTALE).
    std::optional<FileIdentity> expect;
    /// The user the open is made for: before the daemon opens (and so reads) anything, the file
    /// must be one this user may read (check_user_access rules); nullptr: no such check.
    const Credentials* on_behalf_of = nullptr;
};

/// Opens a file for an image under `policy`, as the daemon itself: the path is walked one
/// component at a time (at most 40 symlinks, never onto the own mount), the result must be a
/// regular file (checked before anything is read: FIFOs, devices, sockets and directories are
/// refused without blocking), backing and data files must lie in an allowed directory, and an
/// image must be the file the scan saw. The file takes QEMU's read locks unless the policy says
/// otherwise. Blocking (path lookups, fcntl); never waits for another process.
/// Throws std::system_error: EACCES for a refusal by policy (the reason names the path and why),
/// ESTALE when an image was replaced since the scan, EBUSY for a lock conflict, or the errno of
/// the failing system call.
/// `identity` receives what was opened.
std::unique_ptr<File> open_host_file(const Executor& executor, const HostPolicy& policy, const HostOpen& request,
                                     FileIdentity* identity = nullptr);

/// Checks that `user` may read every file of `files` on the host, and write those of role
/// image or data file when `write`: each path is walked again with the user's rights (directory
/// search permission on the way included, symlinks as the user would follow them) and must reach
/// the same file (device and inode) that is open. As root, the walk runs with the user's file
/// system ids (setfsuid/setfsgid/setgroups on this thread only), so the host's own rules, ACLs
/// included, decide; an unprivileged daemon compares permission bits instead (ACLs not applied).
/// Blocking. Throws std::system_error(EACCES) naming the first file refused and why; ESTALE if
/// the image (role image) is not at its path any more, or another file is (it moved since the
/// scan: the caller may look again).
void check_user_access(const HostPolicy& policy, const Credentials& user, const std::vector<HostFile>& files,
                       bool write);

/// Opens `path` for reading as `as` would (nullptr: as the daemon; O_NOATIME where allowed, so a
/// probe does not touch the file's access time) under the walk rules of
/// open_host_file (no own mount, regular files only, a final symlink only if `follow_final`),
/// without locks or directory restrictions: the scanner probes image headers with it, as the
/// owner of the symlink that led there. Returns an owned descriptor (O_RDONLY|O_NONBLOCK).
/// Blocking. Throws std::system_error.
int open_regular(const HostPolicy& policy, const std::string& path, bool follow_final, const Credentials* as);

/// The credentials of host user `uid` (primary group `gid`, supplementary groups from the group
/// database), for acting on their behalf.
Credentials credentials_of_user(uid_t uid, gid_t gid);

/// Whether `user` needs checking at all: false for the daemon's own user and, when the daemon is
/// root, for root.
bool needs_access_check(const Credentials& user);

/// Changes attributes of the image file `file` (which must still be the file it identifies):
/// mode (if `mode`), owner (uid/gid, -1 = unchanged), times (if `times`, UTIME_NOW/UTIME_OMIT
/// allowed), acting on the descriptor of that file, never on a path, with `user`'s rights.
/// Blocking. Throws std::system_error with the errno of the refusal.
void change_attributes(const HostPolicy& policy, const Credentials& user, const HostFile& file,
                       std::optional<mode_t> mode, uid_t uid, gid_t gid, const struct timespec* times);

/// The current attributes of `file` if it is still the file it identifies; nullopt otherwise.
std::optional<struct stat> stat_host_file(const HostPolicy& policy, const HostFile& file);

}  // namespace qcowfs::io
