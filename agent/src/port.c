/* Forwarded ports (docs/agent-protocol.md, "Port forwarding"): the host opens a stream with
 * PORT_OPEN to reach a TCP port in the guest, say for a web preview of a server that listens
 * on 127.0.0.1 only. The agent connects to 127.0.0.1:PORT, and when that is refused to
 * [::1]:PORT, without ever blocking its loop (non-blocking connect, then poll), answers
 * PORT_OPEN once connected or ERROR with the errno, and from then on the stream is the
 * socket's bytes both ways (sockstream.c), exactly like a guest API connection. */
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "agent.h"

/* A loopback connect is answered at once unless the listener's backlog is full (its SYNs
 * are dropped and retried for minutes): give up well before the host would. */
#define CONNECT_TIMEOUT_MS 10000

static unsigned open_ports(void)
{
	unsigned n = 0;
	for (struct stream *s = A.streams; s; s = s->next)
		if (s->kind == STREAM_PORT && !s->dead)
			n++;
	return n;
}

static void finish_failed(struct stream *s, int err)
{
	send_error(s->id, errno_name(err), "connect to port %u: %s", s->port, strerror(err));
	s->dead = 1;
}

static void connected(struct stream *s)
{
	s->connecting = 0;
	size_t start = proto_begin(&A.out, T_PORT_OPEN, s->id);
	proto_end(&A.out, start);
}

static void try_connect(struct stream *s, int v6);

/* A refusal on 127.0.0.1 tries ::1 (a server bound to [::1] or to :: with IPV6_V6ONLY); a
 * failure there is reported as the refusal it follows, the more telling of the two (a guest
 * without IPv6 answers EADDRNOTAVAIL or EAFNOSUPPORT). */
static void connect_failed(struct stream *s, int err)
{
	if (s->fd >= 0)
		close(s->fd);
	s->fd = -1;
	if (!s->tried_v6 && err == ECONNREFUSED) {
		try_connect(s, 1);
		return;
	}
	if (s->tried_v6 && err != ECONNREFUSED && err != ETIMEDOUT)
		err = ECONNREFUSED;
	finish_failed(s, err);
}

static void try_connect(struct stream *s, int v6)
{
	s->tried_v6 = v6;
	s->connecting = 1;
	int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		connect_failed(s, errno);
		return;
	}
	s->fd = fd;
	int r;
	if (v6) {
		struct sockaddr_in6 sa = {.sin6_family = AF_INET6, .sin6_port = htons(s->port),
					  .sin6_addr = IN6ADDR_LOOPBACK_INIT};
		r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
	} else {
		struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(s->port),
					 .sin_addr = {htonl(INADDR_LOOPBACK)}};
		r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
	}
	if (r == 0)
		connected(s);
	else if (errno != EINPROGRESS && errno != EINTR)
		connect_failed(s, errno);
	/* else: in progress, finished by port_ready when the socket turns writable */
}

void port_open(const struct proto_frame *f)
{
	const struct proto_field *port = NULL;
	for (size_t i = 0; i < f->nfields; i++) {
		if (f->fields[i].tag != PORT_PORT)
			continue; /* unknown tags are for newer agents */
		if (port) {
			send_error(f->stream, "EINVAL", "port: the port is given twice");
			return;
		}
		port = &f->fields[i];
	}
	uint16_t n = port ? (uint16_t)proto_get_uint(port->val, 2) : 0;
	if (n == 0) {
		send_error(f->stream, "EINVAL", "port: a port of 1 to 65535 is required");
		return;
	}
	/* Each takes a socket and up to a window of buffers: past the cap the host is refused,
	 * and nothing already open is disturbed. */
	if (open_ports() >= PORT_MAX_STREAMS) {
		send_error(f->stream, "EMFILE", "port: %u forwarded connections are open already",
			   PORT_MAX_STREAMS);
		return;
	}
	struct stream *s = stream_new(f->stream, STREAM_PORT);
	s->port = n;
	s->deadline = now_ms() + CONNECT_TIMEOUT_MS;
	try_connect(s, 0);
}

int64_t port_timers(struct stream *s, int64_t now)
{
	if (!s->connecting)
		return 0;
	if (now < s->deadline)
		return s->deadline;
	connect_failed(s, ETIMEDOUT);
	return 0;
}

int port_pollfds(struct stream *s, struct pollfd *pfd)
{
	if (!s->connecting)
		return sock_pollfds(s, pfd);
	if (s->fd < 0)
		return 0;
	pfd[0] = (struct pollfd){.fd = s->fd, .events = POLLOUT};
	return 1;
}

void port_ready(struct stream *s, const struct pollfd *pfd, int n)
{
	if (!s->connecting) {
		sock_ready(s, pfd, n);
		return;
	}
	if (n < 1 || !pfd[0].revents)
		return;
	int err = 0;
	socklen_t len = sizeof err;
	if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		err = errno;
	if (err)
		connect_failed(s, err);
	else
		connected(s);
}
