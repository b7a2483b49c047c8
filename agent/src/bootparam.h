/* Boot parameters (docs/agent-protocol.md, "Boot parameters"): the pure parts, so that the
 * host can unit-test them (test/boot-test.c); boot.c does the syscalls. */
#ifndef HUTCH_BOOTPARAM_H
#define HUTCH_BOOTPARAM_H

#include <stddef.h>
#include <stdint.h>

#define VOL_TAG_MAX 31
#define VOL_PATH_MAX 255

struct volume {
	char tag[VOL_TAG_MAX + 1];
	char path[VOL_PATH_MAX + 1];
	int readonly;
};

/* Parses the value of `hutch.vol=<tag>:<hex path>:<ro|rw>`. 0, or -1 if anything is off:
 * a bad tag, odd or non-hex digits, a path that is not absolute, is `/`, holds NUL, `.` or
 * `..` components or `//`, or is too long, a mode other than ro/rw, trailing bytes. */
int parse_volume(const char *val, struct volume *v);

/* From the first 1024 bytes of an ext4 superblock (device offset 1024): the block size and
 * the block count. 0, or -1 if the magic is wrong. */
int ext4_sb_blocks(const uint8_t sb[1024], uint32_t *block_size, uint64_t *blocks);

/* The block count to grow to, or 0 when the filesystem already fills the device (or is
 * larger: never shrink). */
uint64_t grow_target(uint64_t dev_bytes, uint32_t block_size, uint64_t fs_blocks);

#endif
