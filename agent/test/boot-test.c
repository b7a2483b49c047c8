/* Unit tests of the boot parameters' pure parts (src/bootparam.c): CONFIGURE's volume field,
 * the fields of DISK_MOUNT and DISK_UNMOUNT, and the ext4 superblock arithmetic behind growing
 * the root filesystem. With an argument, the
 * superblock checks also run on that file, a real image made by mkfs.ext4 (run-tests.py makes
 * one). Prints `boot: N passed, M failed`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../src/bootparam.h"

static int passed, failed;

static void check(int cond, const char *what)
{
	if (cond) {
		passed++;
	} else {
		failed++;
		printf("FAIL boot: %s\n", what);
	}
}

/* Parses "TAG|PATH|MODE" with '|' standing for NUL, so cases read like the wire. */
static int pv(const char *spec, struct volume *v)
{
	uint8_t b[700];
	size_t n = strlen(spec);
	for (size_t i = 0; i < n; i++)
		b[i] = spec[i] == '|' ? 0 : (uint8_t)spec[i];
	return parse_volume(b, n, v);
}

static void t_volumes(void)
{
	struct volume v;
	check(pv("vol0|/data|rw", &v) == 0 && strcmp(v.tag, "vol0") == 0 && strcmp(v.path, "/data") == 0 &&
		      !v.readonly,
	      "rw volume");
	check(pv("a_B-9|/mnt/my dir,x:y|ro", &v) == 0 && strcmp(v.path, "/mnt/my dir,x:y") == 0 && v.readonly,
	      "ro volume with a space, a comma and a colon");
	static const char *bad[] = {
		"",			/* empty */
		"|/d|rw",		/* no tag */
		"vol0",			/* no path */
		"vol0|/data",		/* no mode */
		"vol0|/data|",		/* empty mode */
		"vol0|/data|rx",	/* bad mode */
		"vol0|/data|rw|",	/* trailing byte */
		"vol0|/data|rwx",	/* trailing byte */
		"vol0||rw",		/* empty path */
		"vol0|/|rw",		/* "/" */
		"vol0|data|rw",		/* relative */
		"vol0|/..|rw",		/* "/.." */
		"vol0|/a/./b|rw",	/* "/a/./b" */
		"vol0|/a//b|rw",	/* "/a//b" */
		"vol0|/a/|rw",		/* "/a/" */
		"vo l|/d|rw",		/* bad tag byte */
		"v/l|/d|rw",		/* bad tag byte */
		"abcdefghijabcdefghijabcdefghij12|/d|rw", /* 32-byte tag */
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		char what[96];
		snprintf(what, sizeof what, "rejects %s", bad[i]);
		check(pv(bad[i], &v) < 0, what);
	}
	check(pv("abcdefghijabcdefghijabcdefghij1|/d|rw", &v) == 0, "31-byte tag");
	/* the longest path: "/" + 254 x "a"; one more byte is too long */
	char arg[600] = "t|/";
	for (int i = 0; i < 254; i++)
		strcat(arg, "a");
	check(pv(strcat(arg, "|rw"), &v) == 0 && strlen(v.path) == 255, "255-byte path");
	arg[strlen(arg) - 3] = 0;
	check(pv(strcat(arg, "a|rw"), &v) < 0, "256-byte path");
}

/* A disk request's fields as the decoder hands them over; sizes as the decoder allows. */
static struct proto_field fl[8];
static size_t nfl;
static uint8_t vals[8][2];

static void add(uint8_t tag, const void *val, uint32_t len)
{
	fl[nfl++] = (struct proto_field){.tag = tag, .len = len, .val = val};
}

static void add_u16(uint8_t tag, unsigned v)
{
	vals[nfl][0] = (uint8_t)(v >> 8), vals[nfl][1] = (uint8_t)v;
	add(tag, vals[nfl], 2);
}

static void add_u8(uint8_t tag, unsigned v)
{
	vals[nfl][0] = (uint8_t)v;
	add(tag, vals[nfl], 1);
}

static void t_disk_requests(void)
{
	struct disk_request r;
	nfl = 0;
	add_u16(DM_TARGET, 3);
	add(DM_PATH, "/mnt/data", 9);
	check(!parse_disk_request(fl, nfl, 0, &r) && r.target == 3 && !strcmp(r.path, "/mnt/data") && !r.read_only,
	      "mount: target and path, read_only defaults to 0");
	add_u8(DM_READ_ONLY, 1);
	add(9, "later", 5);
	check(!parse_disk_request(fl, nfl, 0, &r) && r.read_only, "mount: read_only 1, an unknown tag skipped");
	nfl = 0;
	add(DU_PATH, "/mnt/data", 9);
	add_u16(DU_TARGET, 255);
	check(!parse_disk_request(fl, nfl, 1, &r) && r.target == 255 && !strcmp(r.path, "/mnt/data"),
	      "unmount: path and target (tags in the unmount order)");
	check(parse_disk_request(fl, nfl, 0, &r) != NULL, "unmount's tags do not make a mount");
	nfl = 0;
	add_u16(DU_TARGET, 1);
	add(DU_PATH, "/d", 2);
	add_u8(DM_READ_ONLY, 1); /* tag 3 means nothing to an unmount: skipped */
	check(!parse_disk_request(fl, nfl, 1, &r) && !strcmp(r.path, "/d"), "unmount: 2-byte path, tag 3 skipped");

	static const struct {
		const char *what, *path;
		unsigned target, ro;
		int no_target, no_path, twice;
	} bad[] = {
		{"no target", "/d", 0, 0, 1, 0, 0},
		{"no path", NULL, 1, 0, 0, 1, 0},
		{"target 256", "/d", 256, 0, 0, 0, 0},
		{"target 65535", "/d", 65535, 0, 0, 0, 0},
		{"read_only 2", "/d", 1, 2, 0, 0, 0},
		{"target twice", "/d", 1, 0, 0, 0, 1},
		{"empty path", "", 1, 0, 0, 0, 0},
		{"/", "/", 1, 0, 0, 0, 0},
		{"relative", "mnt/d", 1, 0, 0, 0, 0},
		{"/..", "/..", 1, 0, 0, 0, 0},
		{"/a/..", "/a/..", 1, 0, 0, 0, 0},
		{"/a/../b", "/a/../b", 1, 0, 0, 0, 0},
		{"/a/./b", "/a/./b", 1, 0, 0, 0, 0},
		{"/a//b", "/a//b", 1, 0, 0, 0, 0},
		{"trailing /", "/a/", 1, 0, 0, 0, 0},
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		nfl = 0;
		if (!bad[i].no_target)
			add_u16(DM_TARGET, bad[i].target);
		if (bad[i].twice)
			add_u16(DM_TARGET, bad[i].target);
		if (!bad[i].no_path)
			add(DM_PATH, bad[i].path, (uint32_t)strlen(bad[i].path));
		if (bad[i].ro)
			add_u8(DM_READ_ONLY, bad[i].ro);
		char what[96];
		snprintf(what, sizeof what, "mount rejects %s", bad[i].what);
		check(parse_disk_request(fl, nfl, 0, &r) != NULL, what);
	}
	nfl = 0;
	add_u16(DM_TARGET, 1);
	add(DM_PATH, "/a\0b", 4);
	check(parse_disk_request(fl, nfl, 0, &r) != NULL, "mount rejects a path with NUL");
	nfl = 0;
	add(DU_PATH, "/a", 2);
	add(DU_PATH, "/b", 2);
	add_u16(DU_TARGET, 1);
	check(parse_disk_request(fl, nfl, 1, &r) != NULL, "unmount rejects two paths");
	/* "/" + 254 x "a" is the longest; one more byte is too long */
	static char longp[300];
	longp[0] = '/';
	memset(longp + 1, 'a', 255);
	nfl = 0;
	add_u16(DM_TARGET, 1);
	add(DM_PATH, longp, 255);
	check(!parse_disk_request(fl, nfl, 0, &r) && strlen(r.path) == 255, "mount takes a 255-byte path");
	fl[1].len = 256;
	check(parse_disk_request(fl, nfl, 0, &r) != NULL, "mount rejects a 256-byte path");
}

static void put32(uint8_t *p, uint32_t x)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(x >> (8 * i));
}

static void t_superblock(void)
{
	uint8_t sb[1024] = {0};
	uint32_t bs;
	uint64_t n;
	check(ext4_sb_blocks(sb, &bs, &n) < 0, "no magic");
	sb[0x38] = 0x53, sb[0x39] = 0xef;
	put32(sb + 0x18, 2);
	put32(sb + 0x04, 524288);
	put32(sb + 0x150, 7); /* ignored without INCOMPAT_64BIT */
	check(ext4_sb_blocks(sb, &bs, &n) == 0 && bs == 4096 && n == 524288, "32-bit count");
	put32(sb + 0x60, 0x80 | 0x40);
	check(ext4_sb_blocks(sb, &bs, &n) == 0 && n == (7ull << 32 | 524288), "64-bit count");
	put32(sb + 0x18, 40);
	check(ext4_sb_blocks(sb, &bs, &n) < 0, "absurd block size");

	uint64_t gib = 1ull << 30;
	check(grow_target(8 * gib, 4096, 524288) == 2097152, "2 GiB fs on an 8 GiB disk");
	check(grow_target(2 * gib, 4096, 524288) == 0, "already full size");
	check(grow_target(2 * gib + 4095, 4096, 524288) == 0, "less than a block more");
	check(grow_target(1 * gib, 4096, 524288) == 0, "never shrink");
	check(grow_target(8 * gib, 0, 0) == 0, "no block size");
}

static void t_image(const char *path, unsigned long long want_blocks)
{
	FILE *f = fopen(path, "rb");
	uint8_t sb[1024];
	int ok = f && fseek(f, 1024, SEEK_SET) == 0 && fread(sb, 1, sizeof sb, f) == sizeof sb;
	if (f)
		fclose(f);
	check(ok, "read the image's superblock");
	uint32_t bs = 0;
	uint64_t n = 0;
	check(ok && ext4_sb_blocks(sb, &bs, &n) == 0 && bs == 4096 && n == want_blocks, "mkfs.ext4 image's block count");
}

int main(int argc, char **argv)
{
	t_volumes();
	t_disk_requests();
	t_superblock();
	if (argc == 3)
		t_image(argv[1], strtoull(argv[2], NULL, 10));
	printf("boot: %d passed, %d failed\n", passed, failed);
	return failed != 0;
}
