/* Content digests of whole files, for consistency checks: one call digests the files of a
 * directory, each read into one reused buffer (no mapping, no allocation per file), so a
 * tree of many small files costs an open, a read or two and a close per file. */
#define _GNU_SOURCE
#include "filehash.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include "xxhash.h"

static int open_quiet(int dir_fd, const char *name)
{
    int flags = O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
    /* a check should not touch atime; O_NOATIME needs the owner or CAP_FOWNER */
    int fd = openat(dir_fd, name, flags | O_NOATIME);
    if (fd < 0 && errno == EPERM)
        fd = openat(dir_fd, name, flags);
    return fd;
}

int sms_hash_file_at(int dir_fd, const char *name, uint8_t *buf, size_t cap, uint8_t out[16], uint64_t *size)
{
    *size = 0;
    int fd = open_quiet(dir_fd, name);
    if (fd < 0)
        return errno == ELOOP ? EINVAL : errno;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int err = errno;
        close(fd);
        return err;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
    }
    XXH3_state_t state;
    int streaming = 0, err = 0;
    size_t have = 0;
    /* up to the size fstat gave, as rsync's checksum does: no read() just to meet the end */
    uint64_t left = (uint64_t)st.st_size;
    while (left > 0) {
        size_t want = cap - have < left ? cap - have : (size_t)left;
        ssize_t n = read(fd, buf + have, want);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        if (n == 0)
            break;
        have += (size_t)n;
        *size += (uint64_t)n;
        left -= (uint64_t)n;
        if (have == cap) { /* a file larger than the buffer: hash as it streams */
            if (!streaming) {
                XXH3_128bits_reset(&state);
                streaming = 1;
            }
            XXH3_128bits_update(&state, buf, have);
            have = 0;
        }
    }
    close(fd);
    if (err)
        return err;
    XXH128_hash_t h;
    if (streaming) {
        XXH3_128bits_update(&state, buf, have);
        h = XXH3_128bits_digest(&state);
    } else {
        h = XXH3_128bits(buf, have);
    }
    XXH128_canonicalFromHash((XXH128_canonical_t *)out, h);
    return 0;
}
