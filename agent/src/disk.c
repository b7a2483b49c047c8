/* Attachable disks (docs/agent-protocol.md, "Disks"): the host hot-plugs an ext4 disk as a
 * SCSI device (virtio-scsi, target T, LUN 0) and sends DISK_MOUNT; before it unplugs one it
 * sends DISK_UNMOUNT, and the agent lets the guest kernel release the device first.
 *
 * Each request is done by a short-lived child and reported through a pipe. The agent is one
 * poll() loop, and nothing here has a non-blocking form: the disk shows up some time after the
 * hot-plug (the kernel scans SCSI asynchronously: up to 10 s, polled every 10 ms), mount(2) of
 * an ext4 may replay its journal, syncfs(2) writes back whatever the guest left dirty, and
 * umount2(2) too. Any of these can take seconds on a big or slow disk; in a child they never
 * hold up the other streams. The child shares the agent's mount namespace, so its mount is the
 * guest's, and it answers with one fixed-size record (a single atomic pipe write) before
 * _exit; it is reaped like any orphan. CANCEL abandons the answer, not the work: a mount that
 * was under way may still complete (the host unmounts it, as after any mount).
 *
 * Only the guest's init does this. An agent that is not PID 1 (--connect in the host's tests)
 * checks the request the same way, then answers EOPNOTSUPP: on a test host, SCSI target T is
 * some real disk of that host. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "bootparam.h"

#define SCSI_DEVICES "/sys/bus/scsi/devices"
#define DISK_WAIT_MS 10000
#define DISK_POLL_MS 10

/* What the child reports: errno 0 and the size, or an errno and what failed. Well under
 * PIPE_BUF, so it is written and read whole. */
struct disk_result {
	int32_t err;
	uint64_t size;
	char msg[480];
};

static void fail(struct disk_result *res, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void fail(struct disk_result *res, int err, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(res->msg, sizeof res->msg, fmt, ap);
	va_end(ap);
	res->err = err ? err : EIO;
}

/* The SCSI device at H:0:target:0 (any host adapter H) with its block device: its sysfs
 * directory and the block device's name (sda …). 0, or -1 while there is none. */
static int find_disk(unsigned target, char *dir, size_t dircap, char *name, size_t namecap)
{
	DIR *d = opendir(SCSI_DEVICES);
	if (!d)
		return -1;
	int found = -1;
	struct dirent *e;
	while (found < 0 && (e = readdir(d))) {
		unsigned h, c, t, l;
		int end = 0;
		/* Entries are H:C:T:L devices, plus hostN and targetH:C:T, which do not parse. */
		if (sscanf(e->d_name, "%u:%u:%u:%u%n", &h, &c, &t, &l, &end) != 4 || e->d_name[end] || c != 0 ||
		    t != target || l != 0)
			continue;
		char blockdir[PATH_MAX];
		snprintf(blockdir, sizeof blockdir, "%s/%s/block", SCSI_DEVICES, e->d_name);
		DIR *b = opendir(blockdir); /* absent until sd has probed the disk */
		if (!b)
			continue;
		struct dirent *be;
		while ((be = readdir(b))) {
			if (be->d_name[0] == '.')
				continue;
			snprintf(dir, dircap, "%s/%s", SCSI_DEVICES, e->d_name);
			snprintf(name, namecap, "%s", be->d_name);
			found = 0;
			break;
		}
		closedir(b);
	}
	closedir(d);
	return found;
}

/* Reads a small sysfs attribute as a NUL-terminated line. 0, or -1 with errno. */
static int read_attr(const char *path, char *buf, size_t cap)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, cap - 1);
	int saved = errno;
	close(fd);
	if (n < 0) {
		errno = saved;
		return -1;
	}
	buf[n] = 0;
	buf[strcspn(buf, "\n")] = 0;
	return 0;
}

/* The block device's number and size in bytes. Read from the SCSI device's own block/NAME,
 * the same sysfs object as /sys/class/block/NAME, so one tree says everything about the disk. */
static int disk_dev(const char *dir, const char *name, dev_t *dev, uint64_t *size, struct disk_result *res)
{
	char path[PATH_MAX], line[64];
	unsigned maj, min;
	unsigned long long sectors;
	snprintf(path, sizeof path, "%s/block/%s/dev", dir, name);
	if (read_attr(path, line, sizeof line) < 0 || sscanf(line, "%u:%u", &maj, &min) != 2) {
		fail(res, errno, "%s: cannot read the device number", path);
		return -1;
	}
	snprintf(path, sizeof path, "%s/block/%s/size", dir, name);
	if (read_attr(path, line, sizeof line) < 0 || sscanf(line, "%llu", &sectors) != 1) {
		fail(res, errno, "%s: cannot read the size", path);
		return -1;
	}
	*dev = makedev(maj, min);
	*size = (uint64_t)sectors * 512; /* sysfs counts 512-byte sectors whatever the disk's own */
	return 0;
}

/* /dev/NAME as the disk's block device. devtmpfs makes it by itself, maybe a moment after the
 * disk appears; without devtmpfs nobody does, and a node left by an earlier disk of that name
 * may have another number. */
static int dev_node(const char *name, dev_t dev, char *node, size_t cap, struct disk_result *res)
{
	snprintf(node, cap, "/dev/%s", name);
	for (int tries = 0; tries < 2; tries++) {
		struct stat st;
		if (stat(node, &st) == 0) {
			if (S_ISBLK(st.st_mode) && st.st_rdev == dev)
				return 0;
			if (!S_ISBLK(st.st_mode)) {
				fail(res, EEXIST, "%s exists and is not a block device", node);
				return -1;
			}
			if (unlink(node) < 0 && errno != ENOENT) {
				fail(res, errno, "remove the stale %s: %s", node, strerror(errno));
				return -1;
			}
		} else if (errno != ENOENT) {
			fail(res, errno, "stat %s: %s", node, strerror(errno));
			return -1;
		}
		/* EEXIST: devtmpfs made it meanwhile; the next round checks it. */
		if (mknod(node, S_IFBLK | 0600, dev) == 0)
			return 0;
		if (errno != EEXIST) {
			fail(res, errno, "mknod %s: %s", node, strerror(errno));
			return -1;
		}
	}
	fail(res, EEXIST, "%s keeps changing under the agent", node);
	return -1;
}

/* Undoes mountinfo's octal escapes (\040 for a space …) in place. */
static void unescape(char *s)
{
	char *o = s;
	for (; *s; s++) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' && s[3] >= '0' &&
		    s[3] <= '7') {
			*o++ = (char)((s[1] - '0') << 6 | (s[2] - '0') << 3 | (s[3] - '0'));
			s += 3;
		} else {
			*o++ = *s;
		}
	}
	*o = 0;
}

/* Whether something is mounted at `path` (resolved, as the kernel shows it). mountinfo, not a
 * st_dev comparison with the parent: a bind mount of the parent's own filesystem has the same
 * st_dev and is still a mount point. */
static int is_mount_point(const char *path)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	if (!f)
		return 0;
	char *line = NULL;
	size_t cap = 0;
	int found = 0;
	while (!found && getline(&line, &cap, f) > 0) {
		/* id parent major:minor root MOUNTPOINT … */
		char *save = NULL, *tok = strtok_r(line, " ", &save);
		for (int i = 0; tok && i < 4; i++)
			tok = strtok_r(NULL, " ", &save);
		if (!tok)
			continue;
		unescape(tok);
		found = strcmp(tok, path) == 0;
	}
	free(line);
	fclose(f);
	return found;
}

/* The kernel does not scan the disk bus at boot (scsi_mod.scan=manual): a disk plugged in
 * before the boot (a cold start with disks attached) is found by asking for its target.
 * Asking for one that is there already, or for a hot-plugged one, changes nothing. */
static void scan_target(unsigned target)
{
	DIR *d = opendir("/sys/class/scsi_host");
	if (!d)
		return;
	struct dirent *e;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char path[PATH_MAX], line[32];
		snprintf(path, sizeof path, "/sys/class/scsi_host/%s/scan", e->d_name);
		int fd = open(path, O_WRONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		int n = snprintf(line, sizeof line, "0 %u 0", target);
		if (write(fd, line, (size_t)n) < 0)
			logmsg("scan of SCSI target %u on %s: %s", target, e->d_name, strerror(errno));
		close(fd);
	}
	closedir(d);
}

static void do_mount(const struct disk_request *r, struct disk_result *res)
{
	char dir[PATH_MAX], name[NAME_MAX + 1], node[PATH_MAX], real[PATH_MAX];
	int64_t deadline = now_ms() + DISK_WAIT_MS;
	if (find_disk(r->target, dir, sizeof dir, name, sizeof name) < 0)
		scan_target(r->target);
	while (find_disk(r->target, dir, sizeof dir, name, sizeof name) < 0) {
		if (now_ms() >= deadline) {
			fail(res, ETIMEDOUT, "no disk at SCSI target %u after %d s", r->target, DISK_WAIT_MS / 1000);
			return;
		}
		struct timespec ts = {.tv_sec = 0, .tv_nsec = DISK_POLL_MS * 1000000L};
		nanosleep(&ts, NULL);
	}
	dev_t dev;
	/* The disk's sysfs entry comes before sd has read its capacity: until then it is 0 bytes
	 * and opening it fails with ENXIO, so wait for a size as for the device itself. */
	for (;;) {
		if (disk_dev(dir, name, &dev, &res->size, res) < 0)
			return;
		if (res->size > 0)
			break;
		if (now_ms() >= deadline) {
			fail(res, ETIMEDOUT, "the disk at SCSI target %u still has no size after %d s", r->target,
			     DISK_WAIT_MS / 1000);
			return;
		}
		struct timespec ts = {.tv_sec = 0, .tv_nsec = DISK_POLL_MS * 1000000L};
		nanosleep(&ts, NULL);
	}
	if (dev_node(name, dev, node, sizeof node, res) < 0)
		return;
	if (mkdir_p(r->path) < 0) {
		if (errno == ENOTDIR)
			fail(res, ENOTDIR, "%s or one of its parents exists and is not a directory", r->path);
		else
			fail(res, errno, "mkdir %s: %s", r->path, strerror(errno));
		return;
	}
	if (!realpath(r->path, real)) {
		fail(res, errno, "resolve %s: %s", r->path, strerror(errno));
		return;
	}
	/* Mounting over a mount would hide it (a volume, an earlier disk) and leave two to undo. */
	if (is_mount_point(real)) {
		fail(res, EBUSY, "something is mounted at %s already", r->path);
		return;
	}
	/* noload: a reader never replays the journal, so a disk another machine has open
	 * read-write, or one not cleanly unmounted, is never written by mounting it read-only. */
	/* ENXIO/ENODEV: the block device is registered but not yet open-able (the end of sd's
	 * probe races the first open under load); it settles within the same deadline. */
	while (mount(node, r->path, "ext4", r->read_only ? MS_RDONLY : 0, r->read_only ? "noload" : NULL) < 0) {
		int e = errno;
		if ((e == ENXIO || e == ENODEV) && now_ms() < deadline) {
			struct timespec ts = {.tv_sec = 0, .tv_nsec = DISK_POLL_MS * 1000000L};
			nanosleep(&ts, NULL);
			continue;
		}
		fail(res, e, "mount %s (SCSI target %u) on %s: %s", node, r->target, r->path, strerror(e));
		return;
	}
	logmsg("mounted %s (SCSI target %u, %llu bytes) on %s%s", node, r->target, (unsigned long long)res->size,
	       r->path, r->read_only ? " read-only" : "");
}

static void do_unmount(const struct disk_request *r, struct disk_result *res)
{
	char dir[PATH_MAX], name[NAME_MAX + 1], real[PATH_MAX];
	if (!realpath(r->path, real) || !is_mount_point(real)) {
		fail(res, EINVAL, "%s is not a mount point", r->path);
		return;
	}
	/* Only the disk the host names: a wrong target must not unmount a volume or another disk,
	 * nor have a disk deleted that is still mounted elsewhere. */
	dev_t dev;
	uint64_t size;
	if (find_disk(r->target, dir, sizeof dir, name, sizeof name) < 0) {
		fail(res, ENODEV, "no disk at SCSI target %u", r->target);
		return;
	}
	struct stat st;
	if (disk_dev(dir, name, &dev, &size, res) < 0)
		return;
	if (stat(real, &st) < 0 || st.st_dev != dev) {
		fail(res, EINVAL, "%s is not the disk at SCSI target %u (/dev/%s)", r->path, r->target, name);
		return;
	}
	/* Written back before the umount so that a failure says so and leaves everything as it
	 * was; the descriptor is closed first, or it would keep the filesystem busy. */
	int fd = open(real, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 || syncfs(fd) < 0) {
		fail(res, errno, "syncfs %s: %s", r->path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	close(fd);
	if (umount2(real, 0) < 0) {
		if (errno == EBUSY)
			fail(res, EBUSY, "files are open under %s", r->path);
		else
			fail(res, errno, "umount %s: %s", r->path, strerror(errno));
		return;
	}
	/* Let the guest kernel release the device before the host pulls it: sd flushes its cache
	 * and the SCSI layer forgets the target, instead of finding it gone. The filesystem is off
	 * the disk already, so a failure here costs nothing but a log line. */
	char del[PATH_MAX + 8];
	snprintf(del, sizeof del, "%s/delete", dir);
	fd = open(del, O_WRONLY | O_CLOEXEC);
	if ((fd < 0 || write(fd, "1", 1) != 1) && errno != ENOENT)
		logmsg("delete SCSI device %s: %s", dir, strerror(errno));
	if (fd >= 0)
		close(fd);
	logmsg("unmounted %s (SCSI target %u, /dev/%s)", r->path, r->target, name);
}

/* The worker never execs, so close-on-exec does not apply: it would hold on to the agent's
 * other descriptors for as long as it works, and an exec's stdin would not see the host's end
 * of input, nor a forwarded port's server its close, until the worker is done. It keeps stdio
 * (the console, for its log lines) and the result pipe, moved to RESULT_FD. */
#define RESULT_FD 3
static void keep_only_result_fd(int fd)
{
	if (fd != RESULT_FD && dup2(fd, RESULT_FD) < 0)
		_exit(1);
	if (syscall(SYS_close_range, RESULT_FD + 1, ~0u, 0) == 0)
		return;
	long max = sysconf(_SC_OPEN_MAX); /* close_range is Linux 5.9 */
	for (long i = RESULT_FD + 1; i < (max > 0 && max < 65536 ? max : 65536); i++)
		close((int)i);
}

static int busy_with(const struct disk_request *r)
{
	for (struct stream *s = A.streams; s; s = s->next)
		if (s->kind == STREAM_DISK && !s->dead && (s->disk_target == r->target || strcmp(s->path, r->path) == 0))
			return 1;
	return 0;
}

void disk_open(const struct proto_frame *f)
{
	int unmount = f->type == T_DISK_UNMOUNT;
	const char *op = unmount ? "disk unmount" : "disk mount";
	struct disk_request r;
	const char *bad = parse_disk_request(f->fields, f->nfields, unmount, &r);
	if (bad) {
		send_error(f->stream, "EINVAL", "%s: %s", op, bad);
		return;
	}
	if (!A.pid1) {
		send_error(f->stream, "EOPNOTSUPP", "%s: only the guest's init attaches disks", op);
		return;
	}
	/* Two children on one disk or one path would race (check, then mount); the host does one
	 * at a time, so this only catches its mistakes. */
	if (busy_with(&r)) {
		send_error(f->stream, "EBUSY", "%s: another disk request for target %u or %s is under way", op,
			   r.target, r.path);
		return;
	}
	int p[2];
	if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0) {
		send_errno(f->stream, errno, op);
		return;
	}
	pid_t pid = fork();
	if (pid < 0) {
		int e = errno;
		close(p[0]);
		close(p[1]);
		send_errno(f->stream, e, op);
		return;
	}
	if (pid == 0) {
		keep_only_result_fd(p[1]);
		struct disk_result res;
		memset(&res, 0, sizeof res);
		if (unmount)
			do_unmount(&r, &res);
		else
			do_mount(&r, &res);
		if (write(RESULT_FD, &res, sizeof res) != (ssize_t)sizeof res)
			_exit(1); /* the agent reads a short record as the worker's failure */
		_exit(0);
	}
	close(p[1]);
	struct stream *s = stream_new(f->stream, STREAM_DISK);
	s->fd = p[0];
	s->pid = pid;
	s->disk_target = r.target;
	s->disk_unmount = unmount;
	s->path = strdup(r.path);
	if (!s->path) {
		logmsg("out of memory");
		abort();
	}
}

int disk_pollfds(struct stream *s, struct pollfd *pfd)
{
	if (s->fd < 0)
		return 0;
	pfd[0] = (struct pollfd){.fd = s->fd, .events = POLLIN};
	return 1;
}

void disk_ready(struct stream *s, const struct pollfd *pfd, int n)
{
	if (n < 1 || !pfd[0].revents)
		return;
	struct disk_result res;
	ssize_t got = read(s->fd, &res, sizeof res);
	if (got < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	const char *op = s->disk_unmount ? "disk unmount" : "disk mount";
	if (got != (ssize_t)sizeof res) {
		send_error(s->id, "EIO", "%s: the worker process died without an answer", op);
	} else if (res.err) {
		res.msg[sizeof res.msg - 1] = 0;
		send_error(s->id, errno_name(res.err), "%s: %s", op, res.msg);
	} else {
		size_t start = proto_begin(&A.out, T_DONE, s->id);
		if (!s->disk_unmount)
			proto_tlv_u64(&A.out, DONE_SIZE, res.size);
		proto_end(&A.out, start);
	}
	s->dead = 1;
}
