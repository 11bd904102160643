/* The file-tree scan kernel and its cache driven from plain C, without Python: a cache of its
 * own (sms_tree_cache_init), two scans, clear, a scan without a cache, and the process's
 * instance left alone. Prints the cache's (entries, hits) after each step; writes the first
 * scan's records to argv[2]. Usage: tree_cache_check DIR RECORDS_OUT */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "fstree.h"

static int scan(int fd, const char *dir, sms_tree_cache *c, sms_buf *copy)
{
    sms_scan_out o = {0};
    int err = sms_scan_dir(fd, (const uint8_t *)"p", 1, dir, strlen(dir), c, &o);
    if (!err && copy && sms_buf_reserve(copy, o.blob.len) == 0) {
        memcpy(copy->data, o.blob.data, o.blob.len);
        copy->len = o.blob.len;
    }
    sms_scan_free(&o);
    return err;
}

static void show(const char *step, sms_tree_cache *c)
{
    uint64_t entries, hits;
    sms_tree_cache_stats(c, &entries, &hits);
    printf("%s %llu %llu\n", step, (unsigned long long)entries, (unsigned long long)hits);
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    int fd = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return 2;
    sms_tree_cache c;
    sms_tree_cache_init(&c);
    sms_tree_cache_set_min_age(&c, 0);
    sms_buf first = {0}, again = {0};
    if (scan(fd, argv[1], &c, &first))
        return 3;
    show("first", &c);
    if (scan(fd, argv[1], &c, &again))
        return 3;
    show("second", &c);
    printf("same %d\n", first.len == again.len && !memcmp(first.data, again.data, first.len));
    sms_tree_cache_clear(&c);
    show("cleared", &c);
    if (scan(fd, argv[1], NULL, NULL))
        return 3;
    show("uncached", &c);
    show("process", sms_tree_cache_process());
    sms_tree_cache_destroy(&c);
    FILE *out = fopen(argv[2], "wb");
    if (!out || fwrite(first.data, 1, first.len, out) != first.len || fclose(out))
        return 4;
    sms_buf_free(&first);
    sms_buf_free(&again);
    close(fd);
    return 0;
}
