/* The pure parts of the boot parameters; see bootparam.h. */
#include <string.h>

#include "bootparam.h"

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

const char *parse_disk_request(const struct proto_field *f, size_t n, int unmount, struct disk_request *r)
{
	const struct proto_field *target = NULL, *path = NULL, *ro = NULL;
	memset(r, 0, sizeof *r);
	for (size_t i = 0; i < n; i++) {
		const struct proto_field **slot;
		uint8_t tag = f[i].tag;
		if (tag == (unmount ? DU_TARGET : DM_TARGET))
			slot = &target;
		else if (tag == (unmount ? DU_PATH : DM_PATH))
			slot = &path;
		else if (!unmount && tag == DM_READ_ONLY)
			slot = &ro;
		else
			continue; /* unknown tags are for newer agents */
		if (*slot)
			return "a field is given twice";
		*slot = &f[i];
	}
	if (!target)
		return "a SCSI target is required";
	r->target = (unsigned)target->val[0] << 8 | target->val[1];
	if (r->target > DISK_TARGET_MAX)
		return "the SCSI target must be 0 to 255";
	if (!path)
		return "a mount path is required";
	/* The same rules as a volume's path: a normalised absolute path, so that the one the host
	 * asked for is the one mountinfo will show and the one DISK_UNMOUNT names. */
	if (path->len < 2 || path->len > VOL_PATH_MAX || memchr(path->val, 0, path->len))
		return "the path must be 2 to 255 bytes, without NUL";
	memcpy(r->path, path->val, path->len);
	if (!path_ok(r->path))
		return "the path must be absolute and normalised (no empty, . or .. components, no trailing /), not /";
	if (ro && ro->val[0] > 1)
		return "read_only must be 0 or 1";
	r->read_only = ro && ro->val[0];
	return NULL;
}

static int tag_char(uint8_t c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
	       c == '-';
}

int parse_volume(const uint8_t *p, size_t n, struct volume *v)
{
	memset(v, 0, sizeof *v);
	size_t i = 0, t = 0;
	for (; i < n && p[i] != 0; i++, t++) {
		if (t >= VOL_TAG_MAX || !tag_char(p[i]))
			return -1;
		v->tag[t] = (char)p[i];
	}
	if (t == 0 || i == n)
		return -1;
	size_t k = 0;
	for (i++; i < n && p[i] != 0; i++, k++) {
		if (k >= VOL_PATH_MAX)
			return -1;
		v->path[k] = (char)p[i];
	}
	if (i == n || !path_ok(v->path))
		return -1;
	i++;
	if (n - i != 2 || p[i] != 'r' || (p[i + 1] != 'o' && p[i + 1] != 'w'))
		return -1;
	v->readonly = p[i + 1] == 'o';
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
