/* Content digests of whole files: the consistency check's reading kernel (see filehash.c). */
#ifndef SMSREPL_FILEHASH_H
#define SMSREPL_FILEHASH_H

#include <stddef.h>
#include <stdint.h>

/* XXH3-128 (canonical, big-endian: as Python's xxhash.xxh3_128().digest()) of the file `name`
 * relative to dir_fd, read with read() into `buf` (`cap` bytes, reused from file to file).
 * Symlinks are not followed; read up to the size fstat() gives (a file growing meanwhile is
 * digested as it was then). Returns 0, or the errno that stopped it (EISDIR/EINVAL for
 * something that is not a regular file); *size: the bytes read. */
int sms_hash_file_at(int dir_fd, const char *name, uint8_t *buf, size_t cap, uint8_t out[16], uint64_t *size);

#endif
