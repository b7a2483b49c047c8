/* The pure parts of the boot parameters; see bootparam.h. */
#include <string.h>

#include "bootparam.h"

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int path_ok(const char *p)
{
	if (p[0] != '/' || p[1] == 0)
		return 0;
	for (const char *s = p + 1;;) {
		const char *e = strchr(s, '/');
		size_t n = e ? (size_t)(e - s) : strlen(s);
		if (n == 0 || (n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.'))
			return 0;
		if (!e)
			return 1;
		s = e + 1;
	}
}

int parse_volume(const char *val, struct volume *v)
{
	memset(v, 0, sizeof *v);
	size_t t = 0;
	for (; val[t] && val[t] != ':'; t++) {
		char c = val[t];
		if (t >= VOL_TAG_MAX || !((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
					  (c >= '0' && c <= '9') || c == '_' || c == '-'))
			return -1;
		v->tag[t] = c;
	}
	if (t == 0 || val[t] != ':')
		return -1;
	const char *h = val + t + 1;
	size_t n = 0;
	for (; h[2 * n] && h[2 * n] != ':'; n++) {
		int hi = hexval(h[2 * n]), lo = hi < 0 ? -1 : hexval(h[2 * n + 1]);
		if (hi < 0 || lo < 0 || n >= VOL_PATH_MAX || (hi == 0 && lo == 0))
			return -1;
		v->path[n] = (char)(hi << 4 | lo);
	}
	if (h[2 * n] != ':' || !path_ok(v->path))
		return -1;
	const char *mode = h + 2 * n + 1;
	if (strcmp(mode, "ro") == 0)
		v->readonly = 1;
	else if (strcmp(mode, "rw") != 0)
		return -1;
	return 0;
}

static uint32_t le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int ext4_sb_blocks(const uint8_t sb[1024], uint32_t *block_size, uint64_t *blocks)
{
	if (sb[0x38] != 0x53 || sb[0x39] != 0xef) /* s_magic 0xEF53 */
		return -1;
	uint32_t log = le32(sb + 0x18); /* s_log_block_size: 1024 << log */
	if (log > 6)
		return -1;
	*block_size = 1024u << log;
	*blocks = le32(sb + 0x04); /* s_blocks_count_lo */
	if (le32(sb + 0x60) & 0x80) /* s_feature_incompat & INCOMPAT_64BIT */
		*blocks |= (uint64_t)le32(sb + 0x150) << 32; /* s_blocks_count_hi */
	return 0;
}

uint64_t grow_target(uint64_t dev_bytes, uint32_t block_size, uint64_t fs_blocks)
{
	uint64_t dev_blocks = block_size ? dev_bytes / block_size : 0;
	return dev_blocks > fs_blocks ? dev_blocks : 0;
}
