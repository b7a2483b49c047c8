/* hutch-agent: serves the host <-> agent protocol (docs/agent-protocol.md) over the
 * virtio-serial port org.hutch.agent.0, or over a Unix socket with --connect for testing.
 * When it runs as PID 1 it is also the guest's init (init.c). Run under the name `hutch` it
 * is the guest's client of the machines API instead (guestcli.c). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

#define PORT_NAME "org.hutch.agent.0"
#define API_SOCKET "/run/hutch/api.sock"
#define RETRY_MS 10
#define PORT_SEARCH_MS 100

struct agent A = {.fd = -1};

static struct proto_field fields[PROTO_MAX_FIELDS];
static int sig_pipe[2] = {-1, -1};
static int64_t next_try;
static int port_missing_logged;

int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void logmsg(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	/* One write per line so that lines from the agent and the console shell don't interleave
	 * mid-line on the serial console. */
	if (write(2, "hutch-agent: ", 13) < 0 || write(2, line, (size_t)n) < 0)
		return;
}

const char *errno_name(int e)
{
	static const struct {
		int e;
		const char *name;
	} names[] = {
		{EPERM, "EPERM"}, {ENOENT, "ENOENT"}, {ESRCH, "ESRCH"}, {EINTR, "EINTR"},
		{EIO, "EIO"}, {ENXIO, "ENXIO"}, {E2BIG, "E2BIG"}, {ENOEXEC, "ENOEXEC"},
		{EBADF, "EBADF"}, {ECHILD, "ECHILD"}, {EAGAIN, "EAGAIN"}, {ENOMEM, "ENOMEM"},
		{EACCES, "EACCES"}, {EFAULT, "EFAULT"}, {EBUSY, "EBUSY"}, {EEXIST, "EEXIST"},
		{EXDEV, "EXDEV"}, {ENODEV, "ENODEV"}, {ENOTDIR, "ENOTDIR"}, {EISDIR, "EISDIR"},
		{EINVAL, "EINVAL"}, {ENFILE, "ENFILE"}, {EMFILE, "EMFILE"}, {ENOTTY, "ENOTTY"},
		{ETXTBSY, "ETXTBSY"}, {EFBIG, "EFBIG"}, {ENOSPC, "ENOSPC"}, {ESPIPE, "ESPIPE"},
		{EROFS, "EROFS"}, {EMLINK, "EMLINK"}, {EPIPE, "EPIPE"}, {ENAMETOOLONG, "ENAMETOOLONG"},
		{ENOTEMPTY, "ENOTEMPTY"}, {ELOOP, "ELOOP"}, {EDQUOT, "EDQUOT"}, {ECANCELED, "ECANCELED"},
		{EOVERFLOW, "EOVERFLOW"}, {ENOSYS, "ENOSYS"}, {EOPNOTSUPP, "EOPNOTSUPP"},
		{ECONNREFUSED, "ECONNREFUSED"}, {ECONNRESET, "ECONNRESET"}, {ETIMEDOUT, "ETIMEDOUT"},
		{ECONNABORTED, "ECONNABORTED"}, {ENOTCONN, "ENOTCONN"}, {EADDRNOTAVAIL, "EADDRNOTAVAIL"},
		{EADDRINUSE, "EADDRINUSE"}, {EAFNOSUPPORT, "EAFNOSUPPORT"}, {ENETDOWN, "ENETDOWN"},
		{ENETUNREACH, "ENETUNREACH"}, {EHOSTUNREACH, "EHOSTUNREACH"},
	};
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
		if (names[i].e == e)
			return names[i].name;
	return "EIO";
}

/* ---- output toward the host ---- */

int out_room(void) { return A.host && buf_size(&A.out) < OUT_SOFT; }

void send_error(uint32_t stream, const char *code, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	size_t start = proto_begin(&A.out, T_ERROR, stream);
	proto_tlv_str(&A.out, ERROR_CODE, code);
	proto_tlv_str(&A.out, ERROR_MESSAGE, msg);
	proto_end(&A.out, start);
}

void send_errno(uint32_t stream, int err, const char *what)
{
	send_error(stream, errno_name(err), "%s: %s", what, strerror(err));
}

static void send_credit(struct stream *s)
{
	size_t start = proto_begin(&A.out, T_CREDIT, s->id);
	proto_put_u32(&A.out, s->uncredited);
	proto_end(&A.out, start);
	s->recv_window += s->uncredited;
	s->uncredited = 0;
}

void consumed(struct stream *s, size_t n)
{
	s->uncredited += (uint32_t)n;
	if (s->uncredited >= CREDIT_BATCH)
		send_credit(s);
}

/* Drops sent bytes from the queue, remembering how much of the current frame is still
 * unsent so that a reset can keep the frame stream well-formed. */
static void out_advance(size_t n)
{
	while (n > 0) {
		if (A.out_frame_left == 0) {
			const uint8_t *p = buf_data(&A.out);
			A.out_frame_left = 4 + ((size_t)p[0] << 24 | (size_t)p[1] << 16 | (size_t)p[2] << 8 | p[3]);
		}
		size_t k = n < A.out_frame_left ? n : A.out_frame_left;
		buf_consume(&A.out, k);
		A.out_frame_left -= k;
		n -= k;
	}
}

static void host_gone(void);

static void flush_out(void)
{
	while (A.fd >= 0 && A.host && buf_size(&A.out) > 0) {
		ssize_t n = write(A.fd, buf_data(&A.out), buf_size(&A.out));
		if (n > 0) {
			out_advance((size_t)n);
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && errno == EAGAIN) {
			return;
		} else {
			logmsg("write to host: %s", n < 0 ? strerror(errno) : "nothing written");
			host_gone();
			return;
		}
	}
}

/* ---- streams ---- */

struct stream *stream_new(uint32_t id, enum stream_kind kind)
{
	struct stream *s = calloc(1, sizeof *s);
	if (!s) {
		logmsg("out of memory");
		abort();
	}
	s->id = id;
	s->kind = kind;
	s->send_window = PROTO_WINDOW;
	s->recv_window = PROTO_WINDOW;
	s->out_fd = s->err_fd = s->in_fd = s->fd = -1;
	s->out_drain = s->err_drain = -1;
	s->next = A.streams;
	A.streams = s;
	return s;
}

static struct stream *stream_find(uint32_t id)
{
	for (struct stream *s = A.streams; s; s = s->next)
		if (s->id == id && !s->dead)
			return s;
	return NULL;
}

void stream_close_fds(struct stream *s)
{
	if (s->out_fd >= 0)
		close(s->out_fd);
	if (s->err_fd >= 0)
		close(s->err_fd);
	if (s->in_fd >= 0)
		close(s->in_fd);
	if (s->fd >= 0)
		close(s->fd);
	s->out_fd = s->err_fd = s->in_fd = s->fd = -1;
}

static void stream_free(struct stream *s)
{
	stream_close_fds(s);
	buf_free(&s->in_buf);
	free(s->path);
	free(s->tmp);
	free(s);
}

static void sweep_streams(void)
{
	for (struct stream **pp = &A.streams; *pp;) {
		struct stream *s = *pp;
		if (s->dead) {
			*pp = s->next;
			stream_free(s);
		} else {
			pp = &s->next;
		}
	}
}

/* Forgets every stream: the next host starts clean, and nothing it did not ask for keeps
 * running. */
static void reset_streams(void)
{
	/* API clients lose their connection when their stream is freed. */
	for (struct stream *s = A.streams; s; s = s->next) {
		if (s->kind == STREAM_EXEC)
			exec_kill(s);
		else if (s->kind == STREAM_WRITE)
			file_discard(s);
		s->dead = 1;
	}
	/* Dead streams are freed by the loop's sweep: the loop may still hold pointers to
	 * them in this pass. */
}

/* ---- transport ---- */

static void host_connected(void)
{
	A.host = 1;
	A.synced = 0;
	A.host_version = 0;
	A.host_features = 0;
	buf_clear(&A.in);
	logmsg("host connected");
}

static void transport_close(void)
{
	if (A.fd >= 0)
		close(A.fd);
	A.fd = -1;
}

static void host_gone(void)
{
	if (A.host)
		logmsg("host disconnected");
	reset_streams();
	buf_clear(&A.out);
	buf_clear(&A.in);
	A.out_frame_left = 0;
	A.host = 0;
	A.synced = 0;
	/* A Unix socket is per connection; a virtio-serial port stays open across hosts. */
	if (A.connect_path)
		transport_close();
}

/* The host broke the protocol: the byte stream can no longer be trusted, so start over as
 * on a new connection and look for the host's next PING. Only the frame already being
 * written is kept, so that what the host receives stays a sequence of whole frames. */
static void violation(const char *what)
{
	logmsg("protocol violation from host: %s; resynchronising", what);
	reset_streams();
	buf_truncate(&A.out, A.out_frame_left);
	A.synced = 0;
}

static int find_port(char *path, size_t cap)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d)
		return -1;
	struct dirent *e;
	int found = -1;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char namefile[512], name[64];
		snprintf(namefile, sizeof namefile, "/sys/class/virtio-ports/%s/name", e->d_name);
		int fd = open(namefile, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, name, sizeof name - 1);
		close(fd);
		if (n <= 0)
			continue;
		name[n] = 0;
		name[strcspn(name, "\n")] = 0;
		if (strcmp(name, PORT_NAME) == 0) {
			snprintf(path, cap, "/dev/%s", e->d_name);
			found = 0;
			break;
		}
	}
	closedir(d);
	return found;
}

static void transport_open(int64_t now)
{
	if (A.connect_path) {
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (fd < 0)
			return;
		struct sockaddr_un sa = {.sun_family = AF_UNIX};
		snprintf(sa.sun_path, sizeof sa.sun_path, "%s", A.connect_path);
		/* connect() on a Unix socket completes or fails at once; EAGAIN means the
		 * listener's backlog is full, which is worth another try like any failure. */
		if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
			close(fd);
			return;
		}
		A.fd = fd;
		host_connected();
		return;
	}
	char path[300];
	if (A.port_path) {
		snprintf(path, sizeof path, "%s", A.port_path);
	} else if (find_port(path, sizeof path) < 0) {
		if (!port_missing_logged)
			logmsg("no virtio-serial port named %s yet; waiting", PORT_NAME);
		port_missing_logged = 1;
		next_try = now + PORT_SEARCH_MS;
		return;
	}
	A.fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
	if (A.fd < 0) {
		logmsg("open %s: %s", path, strerror(errno));
		next_try = now + PORT_SEARCH_MS;
		return;
	}
	logmsg("serving %s", path);
}

static void handle_frame(const struct proto_frame *f);

static void send_unsupported(uint8_t type, uint32_t stream)
{
	logmsg("frame type 0x%02x from the host is not supported; skipped", type);
	size_t start = proto_begin(&A.out, T_UNSUPPORTED, 0);
	proto_tlv_u8(&A.out, UNSUP_TYPE, type);
	if (stream)
		proto_tlv_u32(&A.out, UNSUP_STREAM, stream);
	proto_end(&A.out, start);
}

/* Returns the offset of the first plausible PING header in the input, or -1. */
static long find_ping(void)
{
	const uint8_t *p = buf_data(&A.in);
	size_t n = buf_size(&A.in);
	for (size_t i = 0; i + PROTO_HEADER <= n; i++) {
		uint32_t len = (uint32_t)p[i] << 24 | (uint32_t)p[i + 1] << 16 | (uint32_t)p[i + 2] << 8 | p[i + 3];
		if (len >= 5 && len <= 5 + PROTO_MAX_NONCE && p[i + 4] == T_PING && p[i + 5] == 0 &&
		    p[i + 6] == 0 && p[i + 7] == 0 && p[i + 8] == 0)
			return (long)i;
	}
	return -1;
}

static void process_input(void)
{
	while (A.host && buf_size(&A.in) > 0) {
		if (!A.synced) {
			long at = find_ping();
			if (at < 0) {
				/* Keep a tail that may be the start of a PING header. */
				if (buf_size(&A.in) >= PROTO_HEADER)
					buf_consume(&A.in, buf_size(&A.in) - (PROTO_HEADER - 1));
				return;
			}
			buf_consume(&A.in, (size_t)at);
			A.synced = 1;
		}
		struct proto_frame f = {.fields = fields};
		size_t flen;
		int r = proto_decode(buf_data(&A.in), buf_size(&A.in), &f, &flen);
		if (r == PROTO_NEED_MORE)
			return;
		if (r == PROTO_BAD_TYPE) {
			/* A newer host's frame: skip it whole (its len framed it) and say so, rather
			 * than take the host for broken. The host sends such frames only by mistake
			 * (it checks our features first), so the stream of a request stays unopened. */
			send_unsupported(f.type, f.stream);
			buf_consume(&A.in, flen);
			continue;
		}
		if (r != PROTO_OK) {
			violation(proto_result_name(r));
			buf_consume(&A.in, 1);
			continue;
		}
		handle_frame(&f);
		/* A violation inside handle_frame already resynchronises from this frame on;
		 * skipping it is right either way. A disconnect cleared the input. */
		if (buf_size(&A.in) >= flen)
			buf_consume(&A.in, flen);
	}
}

static void port_read(void)
{
	for (int rounds = 0; rounds < 16 && A.fd >= 0; rounds++) {
		if (A.host && buf_size(&A.out) >= OUT_HARD)
			return;
		uint8_t *p = buf_reserve(&A.in, 65536);
		ssize_t n = read(A.fd, p, 65536);
		if (n > 0) {
			if (!A.host)
				host_connected();
			A.in.len += (size_t)n;
			process_input();
		} else if (n == 0) {
			if (A.host || A.connect_path)
				host_gone();
			return;
		} else if (errno == EINTR) {
			continue;
		} else if (errno == EAGAIN) {
			/* On virtio-serial, "would block" rather than EOF means a host is there. */
			if (!A.host)
				host_connected();
			return;
		} else {
			logmsg("read from host: %s", strerror(errno));
			host_gone();
			transport_close();
			return;
		}
	}
}

/* ---- frame dispatch ---- */

static void do_poweroff(void)
{
	logmsg("power off requested");
	reset_streams();
	if (!A.pid1)
		exit(0);
	power_off();
}

static void handle_frame(const struct proto_frame *f)
{
	int conn_level = f->type == T_PING || f->type == T_POWEROFF || f->type == T_RESET ||
			 f->type == T_HELLO || f->type == T_UNSUPPORTED;
	if (conn_level != (f->stream == 0)) {
		violation("frame on the wrong stream");
		return;
	}
	struct stream *s = NULL;
	switch (f->type) {
	case T_PING: {
		if (f->payload_len > PROTO_MAX_NONCE) {
			violation("PING nonce longer than 64 bytes");
			return;
		}
		size_t start = proto_begin(&A.out, T_PONG, 0);
		buf_append(&A.out, f->payload, f->payload_len);
		proto_end(&A.out, start);
		return;
	}
	case T_HELLO: {
		/* The host's version and features; the answer is ours. Unknown fields are skipped
		 * like in every TLV payload. */
		for (size_t i = 0; i < f->nfields; i++) {
			const struct proto_field *fl = &f->fields[i];
			if (fl->tag == HELLO_VERSION && fl->len == 4)
				A.host_version = (uint32_t)proto_get_uint(fl->val, 4);
			else if (fl->tag == HELLO_FEATURES && fl->len == 8)
				A.host_features = proto_get_uint(fl->val, 8);
		}
		size_t start = proto_begin(&A.out, T_HELLO, 0);
		proto_tlv_u32(&A.out, HELLO_VERSION, PROTO_VERSION);
		proto_tlv_u64(&A.out, HELLO_FEATURES, AGENT_FEATURES);
		proto_end(&A.out, start);
		return;
	}
	case T_UNSUPPORTED:
		/* We never send the host a frame it did not announce, so this is for the console:
		 * whatever it refers to has no stream to end. */
		logmsg("the host does not support a frame we sent");
		return;
	case T_POWEROFF:
		flush_out();
		do_poweroff();
		return;
	case T_RESET:
		/* A new host after a restore, a branch or a daemon restart: whatever streams the
		 * saved machine had belong to a host that is gone. Keep only the rest of a frame
		 * that is half written, so the byte stream stays framed. */
		reset_streams();
		buf_truncate(&A.out, A.out_frame_left);
		return;
	case T_EXEC:
	case T_FILE_WRITE:
	case T_FILE_READ:
	case T_CONFIGURE:
	case T_PORT_OPEN:
	case T_DISK_MOUNT:
	case T_DISK_UNMOUNT:
		if (stream_find(f->stream)) {
			violation("stream id reused");
			return;
		}
		if (f->type == T_EXEC)
			exec_open(f);
		else if (f->type == T_FILE_WRITE)
			file_write_open(f);
		else if (f->type == T_FILE_READ)
			file_read_open(f);
		else if (f->type == T_PORT_OPEN)
			port_open(f);
		else if (f->type == T_DISK_MOUNT || f->type == T_DISK_UNMOUNT)
			disk_open(f);
		else
			configure_open(f); /* answered at once: no stream outlives the frame */
		return;
	case T_STDIN:
	case T_SIGNAL:
	case T_RESIZE:
	case T_CREDIT:
	case T_DATA:
	case T_CANCEL:
		s = stream_find(f->stream);
		if (!s)
			return; /* the stream ended while this frame was in flight */
		break;
	default:
		violation("agent-to-host frame type sent by the host");
		return;
	}

	if (f->type == T_CREDIT) {
		s->send_window += f->u32;
		return;
	}
	if (f->type == T_CANCEL) {
		if (s->kind == STREAM_EXEC)
			exec_kill(s);
		else if (s->kind == STREAM_WRITE)
			file_discard(s);
		s->dead = 1;
		return;
	}
	if (f->type == T_STDIN || f->type == T_DATA) {
		if ((f->type == T_STDIN) != (s->kind == STREAM_EXEC) || s->kind == STREAM_READ ||
		    s->kind == STREAM_DISK) {
			violation("data frame of the wrong kind for its stream");
			return;
		}
		if (f->payload_len > s->recv_window) {
			violation("host overran the stream's window");
			return;
		}
		s->recv_window -= f->payload_len;
		if (s->kind == STREAM_EXEC)
			exec_stdin(s, f->payload, f->payload_len);
		else if (s->kind == STREAM_API || s->kind == STREAM_PORT)
			sock_data(s, f->payload, f->payload_len);
		else
			file_write_data(s, f->payload, f->payload_len);
		return;
	}
	if (s->kind != STREAM_EXEC) {
		violation("SIGNAL/RESIZE on a stream that is not an exec");
		return;
	}
	if (f->type == T_SIGNAL)
		exec_signal(s, (int)f->u32);
	else
		exec_resize(s, f->cols, f->rows);
}

/* ---- children ---- */

static void on_sigchld(int sig)
{
	(void)sig;
	int saved = errno;
	if (write(sig_pipe[1], "c", 1) < 0) {
		/* Full pipe: a wake-up is already pending. */
	}
	errno = saved;
}

static void reap(void)
{
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		if (exec_reaped(pid, status))
			continue;
		if (A.pid1)
			console_reaped(pid);
		/* Anything else is an orphan reparented to PID 1, or a child of a forgotten
		 * stream: reaping it is all there is to do. */
	}
}

/* ---- main loop ---- */

static void ensure_std_fds(void)
{
	for (int fd = 0; fd < 3; fd++) {
		if (fcntl(fd, F_GETFD) >= 0)
			continue;
		int n = open(A.pid1 ? "/dev/console" : "/dev/null", O_RDWR | O_NOCTTY);
		if (n < 0)
			n = open("/dev/null", O_RDWR);
		if (n >= 0 && n != fd) {
			dup2(n, fd);
			close(n);
		}
	}
}

static void usage(void)
{
	fputs("usage: hutch-agent [--connect UNIX_SOCKET | --port DEVICE] [--api-socket PATH]\n", stderr);
	exit(2);
}

static void loop(void)
{
	struct pollfd *pfd = NULL;
	struct stream **owner = NULL;
	size_t cap = 0;
	for (;;) {
		int64_t now = now_ms();
		int64_t wake = now + 60000;
		A.busy = 0;

		if ((A.fd < 0 || !A.host) && now >= next_try) {
			next_try = now + RETRY_MS;
			if (A.fd < 0)
				transport_open(now);
			if (A.fd >= 0 && !A.host)
				port_read(); /* virtio-serial says "no host" only by EOF on read */
		}
		if (A.pid1) {
			int64_t t = console_tick(now);
			if (t && t < wake)
				wake = t;
		}
		size_t nstreams = 0;
		for (struct stream *s = A.streams; s; s = s->next) {
			nstreams++;
			if (s->dead)
				continue;
			if (s->kind == STREAM_EXEC) {
				int64_t t = exec_timers(s, now);
				if (t && t < wake)
					wake = t;
			} else if (s->kind == STREAM_READ) {
				file_read_pump(s);
			} else if (s->kind == STREAM_PORT) {
				int64_t t = port_timers(s, now);
				if (t && t < wake)
					wake = t;
			}
		}
		sweep_streams();
		flush_out();

		size_t need = 3 + 3 * nstreams;
		if (need > cap) {
			cap = need * 2;
			pfd = realloc(pfd, cap * sizeof *pfd);
			owner = realloc(owner, cap * sizeof *owner);
			if (!pfd || !owner) {
				logmsg("out of memory");
				abort();
			}
		}
		size_t n = 0;
		pfd[n] = (struct pollfd){.fd = sig_pipe[0], .events = POLLIN};
		owner[n++] = NULL;
		int port_slot = -1;
		if (A.fd >= 0 && A.host) {
			short ev = 0;
			if (buf_size(&A.out) < OUT_HARD)
				ev |= POLLIN;
			if (buf_size(&A.out) > 0)
				ev |= POLLOUT;
			port_slot = (int)n;
			pfd[n] = (struct pollfd){.fd = A.fd, .events = ev};
			owner[n++] = NULL;
		}
		int api_slot = -1;
		int lfd = A.host ? api_listen_fd() : -1;
		if (lfd >= 0) {
			api_slot = (int)n;
			pfd[n] = (struct pollfd){.fd = lfd, .events = POLLIN};
			owner[n++] = NULL;
		}
		for (struct stream *s = A.streams; s; s = s->next) {
			if (s->kind != STREAM_EXEC && s->kind != STREAM_API && s->kind != STREAM_PORT &&
			    s->kind != STREAM_DISK)
				continue;
			if (s->dead)
				continue;
			int k = s->kind == STREAM_EXEC  ? exec_pollfds(s, pfd + n)
				: s->kind == STREAM_PORT ? port_pollfds(s, pfd + n)
				: s->kind == STREAM_DISK ? disk_pollfds(s, pfd + n)
							 : sock_pollfds(s, pfd + n);
			for (int i = 0; i < k; i++)
				owner[n + (size_t)i] = s;
			n += (size_t)k;
		}

		/* Decided only now: any step above may have lost the host. */
		if ((A.fd < 0 || !A.host) && next_try < wake)
			wake = next_try;
		int timeout = 0;
		if (!A.busy) {
			int64_t d = wake - now_ms();
			timeout = d < 0 ? 0 : d > 60000 ? 60000 : (int)d;
		}
		int r = poll(pfd, n, timeout);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			logmsg("poll: %s", strerror(errno));
			continue;
		}
		if (pfd[0].revents) {
			char tmp[64];
			while (read(sig_pipe[0], tmp, sizeof tmp) > 0) {
			}
			reap();
		}
		if (port_slot >= 0 && A.fd >= 0 && A.host) {
			short re = pfd[port_slot].revents;
			if (re & POLLOUT)
				flush_out();
			if (re & (POLLIN | POLLHUP | POLLERR))
				port_read();
		}
		if (api_slot >= 0 && (pfd[api_slot].revents & POLLIN) && A.host)
			api_accept();
		/* A reset above may have freed nothing yet (streams are only marked dead), so
		 * the owner pointers stay valid until the sweep. */
		size_t i = 0;
		while (i < n) {
			struct stream *s = owner[i];
			if (!s) {
				i++;
				continue;
			}
			size_t j = i;
			while (j < n && owner[j] == s)
				j++;
			if (!s->dead && s->kind == STREAM_EXEC)
				exec_ready(s, pfd + i, (int)(j - i));
			else if (!s->dead && s->kind == STREAM_PORT)
				port_ready(s, pfd + i, (int)(j - i));
			else if (!s->dead && s->kind == STREAM_DISK)
				disk_ready(s, pfd + i, (int)(j - i));
			else if (!s->dead)
				sock_ready(s, pfd + i, (int)(j - i));
			i = j;
		}
		sweep_streams();
	}
}

int main(int argc, char **argv)
{
	const char *base = argc > 0 ? strrchr(argv[0], '/') : NULL;
	base = base ? base + 1 : argc > 0 ? argv[0] : "";
	if (getpid() != 1 && strcmp(base, "hutch") == 0)
		return guest_cli(argc, argv);

	const char *api_socket = NULL;
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--connect") == 0 && i + 1 < argc)
			A.connect_path = argv[++i];
		else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc)
			A.port_path = argv[++i];
		else if (strcmp(argv[i], "--api-socket") == 0 && i + 1 < argc)
			api_socket = argv[++i];
		else
			usage();
	}
	A.pid1 = getpid() == 1 && !A.connect_path;
	if (A.pid1)
		init_setup();
	ensure_std_fds();

	signal(SIGPIPE, SIG_IGN);
	if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
		logmsg("pipe: %s", strerror(errno));
		if (A.pid1)
			power_off();
		return 1;
	}
	struct sigaction sa = {.sa_handler = on_sigchld, .sa_flags = SA_RESTART | SA_NOCLDSTOP};
	sigemptyset(&sa.sa_mask);
	sigaction(SIGCHLD, &sa, NULL);

	/* The guest's init serves the API socket; an agent run for tests only when asked to. */
	if (api_socket || (A.pid1 && in_guest_image()))
		api_listen(api_socket ? api_socket : API_SOCKET);

	loop();
	/* not reached */
	if (A.pid1)
		power_off();
	return 1;
}
