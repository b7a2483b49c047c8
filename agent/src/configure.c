/* CONFIGURE: the one way the host configures a guest after a boot or a restore
 * (docs/agent-protocol.md, CONFIGURE): grow / to its disk, mount volumes, and give the machine
 * its own identity. Every clone of a snapshot wakes up with the same hostname, the same kernel
 * RNG state and a clock stuck at snapshot time; the host sends each one its own hostname,
 * machine id, entropy and the current time, and its network address when it has a NIC.
 *
 * The request is validated as a whole first, so a bad request changes nothing. Only the
 * guest's init (PID 1) applies it; anywhere else (--connect in host tests) the agent must not
 * touch the machine it runs on, so it validates and answers without applying anything. The
 * operation is synchronous: DONE or ERROR goes out before the next frame is read. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "bootparam.h"

/* From <linux/random.h>, which musl does not ship. */
#ifndef RNDADDENTROPY
#define RNDADDENTROPY _IOW('R', 0x03, int[2])
#endif
#ifndef RNDRESEEDCRNG
#define RNDRESEEDCRNG _IO('R', 0x07)
#endif

#define HOSTNAME_MAX 64
#define ENTROPY_MAX 512
#define MACHINE_ID_LEN 32
#define VOLUMES_MAX 8

#define HOSTNAME_FILE "/etc/hostname"
#define MACHINE_ID_FILE "/etc/machine-id"

struct config {
	const struct proto_field *hostname, *time_ns, *entropy, *machine_id, *grow_root, *net;
	struct volume volumes[VOLUMES_MAX];
	size_t nvolumes;
	struct net_config net_config;
};

static int hostname_char(uint8_t c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
	       c == '-';
}

static int lower_hex(uint8_t c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

/* Returns NULL if the request is valid, else why not. The decoder has already checked that
 * time_ns is exactly 8 bytes. */
static const char *validate(const struct proto_frame *f, struct config *c)
{
	memset(c, 0, sizeof *c);
	for (size_t i = 0; i < f->nfields; i++) {
		const struct proto_field *fl = &f->fields[i];
		const struct proto_field **slot;
		switch (fl->tag) {
		case CFG_HOSTNAME: slot = &c->hostname; break;
		case CFG_TIME_NS: slot = &c->time_ns; break;
		case CFG_ENTROPY: slot = &c->entropy; break;
		case CFG_MACHINE_ID: slot = &c->machine_id; break;
		case CFG_GROW_ROOT: slot = &c->grow_root; break;
		case CFG_NET: slot = &c->net; break;
		case CFG_VOLUME:
			if (c->nvolumes == VOLUMES_MAX)
				return "more than 8 volumes";
			if (parse_volume(fl->val, fl->len, &c->volumes[c->nvolumes]) < 0)
				return "a volume must be TAG NUL PATH NUL ro|rw: a 1-31 byte tag of "
				       "[A-Za-z0-9_-], an absolute normalised path of at most 255 bytes, not /";
			for (size_t k = 0; k < c->nvolumes; k++)
				if (strcmp(c->volumes[k].path, c->volumes[c->nvolumes].path) == 0)
					return "two volumes at the same path";
			c->nvolumes++;
			continue;
		default: continue; /* unknown tags are skipped (forward compatibility) */
		}
		if (*slot)
			return "a field is given twice";
		*slot = fl;
	}
	if (c->hostname) {
		if (c->hostname->len < 1 || c->hostname->len > HOSTNAME_MAX)
			return "hostname must be 1 to 64 bytes";
		for (uint32_t i = 0; i < c->hostname->len; i++)
			if (!hostname_char(c->hostname->val[i]))
				return "hostname may only contain A-Z, a-z, 0-9, '.' and '-'";
	}
	if (c->net) {
		const char *bad = parse_net(c->net->val, c->net->len, &c->net_config);
		if (bad)
			return bad;
	}
	if (c->grow_root && c->grow_root->val[0] > 1)
		return "grow_root must be 0 or 1";
	if (c->entropy && (c->entropy->len < 1 || c->entropy->len > ENTROPY_MAX))
		return "entropy must be 1 to 512 bytes";
	if (c->machine_id) {
		int ok = c->machine_id->len == MACHINE_ID_LEN;
		for (uint32_t i = 0; ok && i < c->machine_id->len; i++)
			ok = lower_hex(c->machine_id->val[i]);
		if (!ok)
			return "machine_id must be 32 lower-case hex digits";
	}
	return NULL;
}

/* Replaces `path` with `data`: a temporary file beside it, renamed over it, so a reader sees
 * the old file or the new one. No fsync: these files matter only while the machine runs (its
 * disk lives and dies with it), and four fsyncs through an emulated disk cost a restored
 * machine ~20 ms of its start. Returns -1 with errno set on failure, leaving the old file and
 * no temporary behind. */
int write_atomic(const char *path, const void *data, size_t n, mode_t mode)
{
	const char *slash = strrchr(path, '/');
	char tmp[256];
	snprintf(tmp, sizeof tmp, "%.*s/.%s.hutch-XXXXXX", (int)(slash - path), path, slash + 1);
	int fd = mkostemp(tmp, O_CLOEXEC);
	if (fd < 0)
		return -1;
	const uint8_t *p = data;
	size_t off = 0;
	while (off < n) {
		ssize_t w = write(fd, p + off, n - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			if (w == 0)
				errno = ENOSPC;
			goto fail;
		}
		off += (size_t)w;
	}
	if (fchmod(fd, mode) < 0)
		goto fail;
	if (close(fd) < 0) {
		fd = -1;
		goto fail;
	}
	fd = -1;
	if (rename(tmp, path) < 0)
		goto fail;
	return 0;
fail: {
	int saved = errno;
	if (fd >= 0)
		close(fd);
	unlink(tmp);
	errno = saved;
	return -1;
}
}

/* Mixes the bytes into the kernel's pool, credited at 8 bits a byte (the host drew them from
 * its own CSPRNG), then forces the CRNG to reseed from the pool at once: without that, the
 * next getrandom() output could still come from the state every clone shares. */
static int add_entropy(const uint8_t *p, uint32_t n, const char **what)
{
	struct {
		int entropy_count;
		int buf_size;
		uint32_t buf[ENTROPY_MAX / 4];
	} info;
	info.entropy_count = (int)n * 8;
	info.buf_size = (int)n;
	memcpy(info.buf, p, n);
	*what = "/dev/urandom";
	int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0)
		return -1;
	int rc = 0;
	if (ioctl(fd, RNDADDENTROPY, &info) < 0) {
		*what = "RNDADDENTROPY";
		rc = -1;
	} else if (ioctl(fd, RNDRESEEDCRNG) < 0) {
		*what = "RNDRESEEDCRNG";
		rc = -1;
	}
	int saved = errno;
	close(fd);
	explicit_bzero(&info, sizeof info);
	errno = saved;
	return rc;
}

/* Applies the request in the documented order; on a failure, sends ERROR and returns -1
 * (what was applied before it stays applied). */
static int apply(uint32_t id, const struct config *c)
{
	if (c->hostname) {
		char name[HOSTNAME_MAX + 1];
		uint32_t n = c->hostname->len;
		memcpy(name, c->hostname->val, n);
		if (sethostname(name, n) < 0) {
			send_errno(id, errno, "sethostname");
			return -1;
		}
		name[n] = '\n';
		if (write_atomic(HOSTNAME_FILE, name, n + 1, 0644) < 0) {
			send_errno(id, errno, HOSTNAME_FILE);
			return -1;
		}
	}
	if (c->machine_id) {
		char line[MACHINE_ID_LEN + 1];
		memcpy(line, c->machine_id->val, MACHINE_ID_LEN);
		line[MACHINE_ID_LEN] = '\n';
		if (write_atomic(MACHINE_ID_FILE, line, sizeof line, 0444) < 0) {
			send_errno(id, errno, MACHINE_ID_FILE);
			return -1;
		}
	}
	if (c->entropy) {
		const char *what;
		if (add_entropy(c->entropy->val, c->entropy->len, &what) < 0) {
			send_errno(id, errno, what);
			return -1;
		}
	}
	for (size_t i = 0; i < c->nvolumes; i++) {
		const char *what;
		if (mount_volume(&c->volumes[i], &what) < 0) {
			char ctx[VOL_PATH_MAX + 64];
			snprintf(ctx, sizeof ctx, "%s %s on %s", what, c->volumes[i].tag, c->volumes[i].path);
			send_errno(id, errno, ctx);
			return -1;
		}
	}
	if (c->net) {
		const char *what;
		if (apply_net(&c->net_config, &what) < 0) {
			char ctx[64];
			snprintf(ctx, sizeof ctx, "net: %s", what);
			send_errno(id, errno, ctx);
			return -1;
		}
	}
	if (c->time_ns) {
		uint64_t ns = proto_get_uint(c->time_ns->val, 8);
		struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u)};
		if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
			send_errno(id, errno, "clock_settime");
			return -1;
		}
	}
	return 0;
}

void configure_open(const struct proto_frame *f)
{
	struct config c;
	const char *bad = validate(f, &c);
	if (bad) {
		send_error(f->stream, "EINVAL", "configure: %s", bad);
		return;
	}
	if (A.pid1) {
		/* First, so that mount points and the files written land on the grown / and the
		 * time set last stays fresh. A no-op costing one superblock read when / already
		 * fills its disk; failures are logged, never answered. */
		if (c.grow_root && c.grow_root->val[0])
			grow_root();
		if (apply(f->stream, &c) < 0)
			return;
	}
	size_t start = proto_begin(&A.out, T_DONE, f->stream);
	proto_end(&A.out, start);
}
