/* FILE_WRITE and FILE_READ streams. Writes go to a temporary file beside the target and
 * are renamed over it only once complete and fsynced, so readers never see half a file
 * and a cancelled or failed write leaves nothing behind. */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

static char *field_path(const struct proto_frame *f, uint8_t tag, int *dup)
{
	const struct proto_field *found = NULL;
	*dup = 0;
	for (size_t i = 0; i < f->nfields; i++) {
		if (f->fields[i].tag != tag)
			continue;
		if (found)
			*dup = 1;
		found = &f->fields[i];
	}
	if (!found || found->len == 0 || found->val[0] != '/' || memchr(found->val, 0, found->len))
		return NULL;
	char *s = malloc(found->len + 1);
	if (!s)
		abort();
	memcpy(s, found->val, found->len);
	s[found->len] = 0;
	return s;
}

int mkdir_p(const char *dir)
{
	char *tmp = strdup(dir);
	if (!tmp)
		abort();
	int rc = 0;
	for (char *p = tmp + 1;; p++) {
		if (*p != '/' && *p != 0)
			continue;
		char c = *p;
		*p = 0;
		if (mkdir(tmp, 0755) < 0 && errno != EEXIST) {
			rc = -1;
			break;
		}
		*p = c;
		if (!c)
			break;
	}
	int saved = errno;
	free(tmp);
	errno = saved;
	if (rc == 0) {
		/* EEXIST also covers a file in the way; report that as the OS would. */
		struct stat st;
		if (stat(dir, &st) < 0)
			return -1;
		if (!S_ISDIR(st.st_mode)) {
			errno = ENOTDIR;
			return -1;
		}
	}
	return rc;
}

void file_write_open(const struct proto_frame *f)
{
	uint32_t id = f->stream;
	int dup = 0;
	char *path = field_path(f, FW_PATH, &dup);
	uint32_t mode = 0644;
	int mkdirs = 0, seen_mode = 0, seen_mkdirs = 0;
	for (size_t i = 0; i < f->nfields; i++) {
		const struct proto_field *fl = &f->fields[i];
		if (fl->tag == FW_MODE) {
			dup |= seen_mode++;
			mode = (uint32_t)proto_get_uint(fl->val, 4);
		} else if (fl->tag == FW_MKDIRS) {
			dup |= seen_mkdirs++;
			mkdirs = fl->val[0] == 1;
		}
	}
	if (!path || dup || (mode & ~07777u)) {
		send_error(id, "EINVAL", "file write: %s",
			   !path ? "path must be absolute, non-empty, without NUL bytes"
			   : dup ? "a field is given twice"
				 : "mode has bits beyond 07777");
		free(path);
		return;
	}
	size_t plen = strlen(path);
	if (path[plen - 1] == '/') {
		send_error(id, "EISDIR", "file write %s: is a directory", path);
		free(path);
		return;
	}

	char *d = strdup(path), *b = strdup(path);
	if (!d || !b)
		abort();
	char *dir = dirname(d), *base = basename(b);
	char *tmp = malloc(strlen(dir) + 300);
	if (!tmp)
		abort();
	/* Hidden, recognisable, and short enough that long names still fit NAME_MAX. */
	sprintf(tmp, "%s/.%.200s.hutch-XXXXXX", strcmp(dir, "/") ? dir : "", base);
	struct stat st;
	int fd = -1;
	if (mkdirs && mkdir_p(dir) < 0) {
		send_errno(id, errno, dir);
	} else if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
		send_error(id, "EISDIR", "%s: %s", path, strerror(EISDIR));
	} else if ((fd = mkostemp(tmp, O_CLOEXEC)) < 0) {
		send_errno(id, errno, path);
	} else if (fchmod(fd, mode) < 0) {
		send_errno(id, errno, path);
		close(fd);
		unlink(tmp);
		fd = -1;
	}
	free(d);
	free(b);
	if (fd < 0) {
		free(path);
		free(tmp);
		return;
	}
	struct stream *s = stream_new(id, STREAM_WRITE);
	s->fd = fd;
	s->path = path;
	s->tmp = tmp;
}

void file_discard(struct stream *s)
{
	if (s->fd >= 0)
		close(s->fd);
	s->fd = -1;
	if (s->tmp)
		unlink(s->tmp);
}

static void write_failed(struct stream *s, int err, const char *what)
{
	send_errno(s->id, err, what);
	file_discard(s);
	s->dead = 1;
}

static void write_done(struct stream *s)
{
	struct stat st;
	if (fsync(s->fd) < 0) {
		write_failed(s, errno, s->path);
		return;
	}
	if (fstat(s->fd, &st) < 0) {
		write_failed(s, errno, s->path);
		return;
	}
	if (rename(s->tmp, s->path) < 0) {
		write_failed(s, errno, s->path);
		return;
	}
	free(s->tmp);
	s->tmp = NULL;
	close(s->fd);
	s->fd = -1;
	/* Make the rename itself durable. */
	char *d = strdup(s->path);
	if (d) {
		int dfd = open(dirname(d), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (dfd >= 0) {
			fsync(dfd);
			close(dfd);
		}
		free(d);
	}
	size_t start = proto_begin(&A.out, T_DONE, s->id);
	proto_tlv_u64(&A.out, DONE_SIZE, (uint64_t)st.st_size);
	proto_tlv_u32(&A.out, DONE_MODE, (uint32_t)(st.st_mode & 07777));
	proto_end(&A.out, start);
	s->dead = 1;
}

void file_write_data(struct stream *s, const uint8_t *p, size_t n)
{
	if (n == 0) {
		write_done(s);
		return;
	}
	size_t off = 0;
	while (off < n) {
		ssize_t w = write(s->fd, p + off, n - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			write_failed(s, w < 0 ? errno : ENOSPC, s->path);
			return;
		}
		off += (size_t)w;
	}
	s->size += n;
	consumed(s, n);
}

void file_read_open(const struct proto_frame *f)
{
	uint32_t id = f->stream;
	int dup = 0;
	char *path = field_path(f, FR_PATH, &dup);
	if (!path || dup) {
		send_error(id, "EINVAL", "file read: %s",
			   !path ? "path must be absolute, non-empty, without NUL bytes" : "path given twice");
		free(path);
		return;
	}
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	struct stat st;
	if (fd < 0) {
		send_errno(id, errno, path);
	} else if (fstat(fd, &st) < 0) {
		send_errno(id, errno, path);
	} else if (S_ISDIR(st.st_mode)) {
		send_error(id, "EISDIR", "%s: %s", path, strerror(EISDIR));
	} else if (!S_ISREG(st.st_mode)) {
		/* Devices and FIFOs can block or never end; the event loop reads files
		 * without polling them. */
		send_error(id, "EINVAL", "%s: not a regular file", path);
	} else {
		struct stream *s = stream_new(id, STREAM_READ);
		s->fd = fd;
		s->path = path;
		return;
	}
	if (fd >= 0)
		close(fd);
	free(path);
}

void file_read_pump(struct stream *s)
{
	if (s->dead || s->send_window == 0 || !out_room())
		return;
	size_t max = PROTO_MAX_PAYLOAD;
	if (s->send_window < max)
		max = (size_t)s->send_window;
	size_t start = proto_begin(&A.out, T_DATA, s->id);
	uint8_t *p = buf_reserve(&A.out, max);
	ssize_t n;
	do
		n = read(s->fd, p, max);
	while (n < 0 && errno == EINTR);
	if (n > 0) {
		A.out.len += (size_t)n;
		proto_end(&A.out, start);
		s->send_window -= (uint64_t)n;
		s->size += (uint64_t)n;
		A.busy = 1; /* one chunk per pass keeps the other streams going */
		return;
	}
	buf_truncate(&A.out, start);
	if (n < 0) {
		send_errno(s->id, errno, s->path);
		s->dead = 1;
		return;
	}
	struct stat st;
	uint32_t mode = fstat(s->fd, &st) == 0 ? (uint32_t)(st.st_mode & 07777) : 0;
	start = proto_begin(&A.out, T_DATA, s->id);
	proto_end(&A.out, start);
	start = proto_begin(&A.out, T_DONE, s->id);
	proto_tlv_u64(&A.out, DONE_SIZE, s->size);
	proto_tlv_u32(&A.out, DONE_MODE, mode);
	proto_end(&A.out, start);
	s->dead = 1;
}
