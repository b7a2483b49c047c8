/* Boot and CONFIGURE parameters (docs/agent-protocol.md): the pure parts, so that the
 * host can unit-test them (test/boot-test.c); boot.c does the syscalls. */
#ifndef HUTCH_BOOTPARAM_H
#define HUTCH_BOOTPARAM_H

#include <stddef.h>
#include <stdint.h>

#include "proto.h"

#define VOL_TAG_MAX 31
#define VOL_PATH_MAX 255

struct volume {
	char tag[VOL_TAG_MAX + 1];
	char path[VOL_PATH_MAX + 1];
	int readonly;
};

/* Parses CONFIGURE's volume field, `TAG NUL PATH NUL MODE`. 0, or -1 if anything is off:
 * a bad tag, a path that is not absolute, is `/`, holds `.` or `..` components or `//`, or is
 * too long, a mode other than ro/rw, a missing NUL, trailing bytes. */
int parse_volume(const uint8_t *p, size_t n, struct volume *v);

/* DISK_MOUNT and DISK_UNMOUNT (docs/agent-protocol.md, "Disks"), as the agent reads them. */
#define DISK_TARGET_MAX 255
struct disk_request {
	unsigned target; /* SCSI target id */
	char path[VOL_PATH_MAX + 1];
	int read_only; /* DISK_MOUNT only */
};

/* Checks the fields of a DISK_MOUNT (unmount = 0) or DISK_UNMOUNT (unmount = 1) and fills r.
 * NULL if the request is valid, else why not (the agent's ERROR EINVAL): a missing or repeated
 * target or path, a target over 255, a path that is not absolute, is `/`, holds NUL, `.` or
 * `..` components or `//`, ends in `/` or is over 255 bytes, a read_only other than 0 or 1.
 * The decoder has already checked the sizes of target and read_only. */
const char *parse_disk_request(const struct proto_field *f, size_t n, int unmount, struct disk_request *r);

/* From the first 1024 bytes of an ext4 superblock (device offset 1024): the block size and
 * the block count. 0, or -1 if the magic is wrong. */
int ext4_sb_blocks(const uint8_t sb[1024], uint32_t *block_size, uint64_t *blocks);

/* The block count to grow to, or 0 when the filesystem already fills the device (or is
 * larger: never shrink). */
uint64_t grow_target(uint64_t dev_bytes, uint32_t block_size, uint64_t fs_blocks);

#endif
