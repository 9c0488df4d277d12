/* The benchmark's FUSE ceiling: shows one host file as MOUNTPOINT/disk.raw and passes every read,
 * write, flush and lseek straight to it with pread/pwrite/fdatasync/lseek. No image format, no
 * caching of its own: the fastest a plain multi-threaded libfuse daemon serves a file, which is what
 * qcowfs and qemu-storage-daemon are measured against. side.py compiles and runs it:
 *
 *   gcc -O2 -o ceiling ceiling.c $(pkg-config --cflags --libs fuse3)
 *   ceiling HOSTFILE MOUNTPOINT [FUSE options]     (multi-threaded, use -f to stay in the foreground)
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *host_path;
static const char *const name = "/disk.raw";

static void *pt_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
    /* 1 MiB requests (the kernel's max_pages limit), no attribute or data caching beyond the
     * kernel defaults the others get too. */
    conn->max_write = 1 << 20;
    conn->max_readahead = 1 << 20;
    cfg->use_ino = 1;
    return NULL;
}

static int pt_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
    if (strcmp(path, "/") == 0) {
        memset(st, 0, sizeof(*st));
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
        st->st_ino = 1;
        return 0;
    }
    if (fi ? fstat((int)fi->fh, st) : (strcmp(path, name) == 0 ? stat(host_path, st) : (errno = ENOENT, -1)))
        return -errno;
    st->st_ino = 2;
    return 0;
}

static int pt_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off, struct fuse_file_info *fi,
                      enum fuse_readdir_flags flags)
{
    (void)off, (void)fi, (void)flags;
    if (strcmp(path, "/") != 0)
        return -ENOTDIR;
    fill(buf, ".", NULL, 0, 0);
    fill(buf, "..", NULL, 0, 0);
    fill(buf, name + 1, NULL, 0, 0);
    return 0;
}

static int pt_open(const char *path, struct fuse_file_info *fi)
{
    if (strcmp(path, name) != 0)
        return -ENOENT;
    /* O_DIRECT is the kernel's business on the FUSE side; the host file is read through the page
     * cache, as qcowfs and qemu-storage-daemon (cache=writeback) read theirs. */
    int fd = open(host_path, (fi->flags & O_ACCMODE) == O_RDONLY ? O_RDONLY : O_RDWR);
    if (fd < 0)
        return -errno;
    fi->fh = (uint64_t)fd;
    return 0;
}

/* pread or pwrite all of [off, off + size), retrying short transfers and EINTR; a read stops at
 * the end of the file. Returns the bytes moved or -errno. */
static int transfer(int fd, char *buf, size_t size, off_t off, int writing)
{
    size_t done = 0;
    while (done < size) {
        ssize_t n = writing ? pwrite(fd, buf + done, size - done, off + (off_t)done)
                            : pread(fd, buf + done, size - done, off + (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            break;
        done += (size_t)n;
    }
    return (int)done;
}

static int pt_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)path;
    return transfer((int)fi->fh, buf, size, off, 0);
}

static int pt_write(const char *path, const char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)path;
    return transfer((int)fi->fh, (char *)buf, size, off, 1);
}

static int pt_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
    (void)path;
    return (datasync ? fdatasync((int)fi->fh) : fsync((int)fi->fh)) ? -errno : 0;
}

static int pt_flush(const char *path, struct fuse_file_info *fi)
{
    (void)path, (void)fi;
    return 0;
}

static int pt_release(const char *path, struct fuse_file_info *fi)
{
    (void)path;
    close((int)fi->fh);
    return 0;
}

static off_t pt_lseek(const char *path, off_t off, int whence, struct fuse_file_info *fi)
{
    (void)path;
    off_t r = lseek((int)fi->fh, off, whence);
    return r < 0 ? -errno : r;
}

static int pt_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
    (void)path;
    int r = fi ? ftruncate((int)fi->fh, size) : truncate(host_path, size);
    return r ? -errno : 0;
}

static const struct fuse_operations ops = {
    .init = pt_init,
    .getattr = pt_getattr,
    .readdir = pt_readdir,
    .open = pt_open,
    .read = pt_read,
    .write = pt_write,
    .fsync = pt_fsync,
    .flush = pt_flush,
    .release = pt_release,
    .lseek = pt_lseek,
    .truncate = pt_truncate,
};

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s HOSTFILE MOUNTPOINT [FUSE options]\n", argv[0]);
        return 2;
    }
    host_path = realpath(argv[1], NULL);
    if (!host_path) {
        perror(argv[1]);
        return 1;
    }
    /* fuse_main sees argv without HOSTFILE. */
    argv[1] = argv[0];
    return fuse_main(argc - 1, argv + 1, &ops, NULL);
}
