/* A stream that carries a socket's bytes both ways as DATA, under the stream windows: the
 * guest API's connections (api.c, opened by the agent) and forwarded ports (port.c, opened by
 * the host) differ only in how the socket comes to be, so the pump is written once. An empty
 * DATA ends one direction: the host's shuts down the socket's writing side once what came
 * before it is written; the socket's end of file goes to the host as ours. The stream is over
 * when both have passed, or at ERROR (a failed write or read), or at the host's CANCEL. */
#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

#include "agent.h"

/* Both directions have ended: the stream is over for the host too, which has sent its empty
 * DATA and received ours. */
static void maybe_done(struct stream *s)
{
	if (s->eof_sent && s->host_eof && buf_size(&s->in_buf) == 0)
		s->dead = 1;
}

static void fail(struct stream *s, int err, const char *what)
{
	send_errno(s->id, err, what);
	s->dead = 1;
}

static void flush(struct stream *s)
{
	/* A port still connecting has nowhere to write yet; the bytes wait in in_buf. */
	if (s->connecting)
		return;
	while (buf_size(&s->in_buf) > 0) {
		ssize_t n = write(s->fd, buf_data(&s->in_buf), buf_size(&s->in_buf));
		if (n > 0) {
			buf_consume(&s->in_buf, (size_t)n);
			consumed(s, (size_t)n);
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && errno == EAGAIN) {
			return;
		} else {
			/* The peer went away before everything was written. */
			fail(s, n < 0 ? errno : EPIPE, "write to the socket");
			return;
		}
	}
	if (s->host_eof) {
		shutdown(s->fd, SHUT_WR);
		maybe_done(s);
	}
}

void sock_data(struct stream *s, const uint8_t *p, size_t n)
{
	if (s->host_eof) {
		consumed(s, n); /* nothing may follow the end; dropped like input to a closed stdin */
		return;
	}
	if (n == 0)
		s->host_eof = 1;
	else
		buf_append(&s->in_buf, p, n);
	flush(s);
}

static void read_socket(struct stream *s)
{
	size_t max = PROTO_MAX_PAYLOAD;
	if (s->send_window < max)
		max = (size_t)s->send_window;
	if (max == 0 || !out_room())
		return;
	size_t start = proto_begin(&A.out, T_DATA, s->id);
	uint8_t *p = buf_reserve(&A.out, max);
	ssize_t n = read(s->fd, p, max);
	if (n > 0) {
		A.out.len += (size_t)n;
		proto_end(&A.out, start);
		s->send_window -= (uint64_t)n;
		return;
	}
	buf_truncate(&A.out, start);
	if (n == 0 || errno == ECONNRESET) {
		start = proto_begin(&A.out, T_DATA, s->id);
		proto_end(&A.out, start);
		s->eof_sent = 1;
		maybe_done(s);
	} else if (errno != EAGAIN && errno != EINTR) {
		fail(s, errno, "read from the socket");
	}
}

int sock_pollfds(struct stream *s, struct pollfd *pfd)
{
	short ev = 0;
	if (!s->eof_sent && s->send_window > 0 && out_room())
		ev |= POLLIN;
	if (buf_size(&s->in_buf) > 0)
		ev |= POLLOUT;
	if (!ev || s->fd < 0)
		return 0;
	pfd[0] = (struct pollfd){.fd = s->fd, .events = ev};
	return 1;
}

void sock_ready(struct stream *s, const struct pollfd *pfd, int n)
{
	if (n < 1 || !pfd[0].revents)
		return;
	if (pfd[0].revents & POLLOUT)
		flush(s);
	if (!s->dead && (pfd[0].events & POLLIN) && (pfd[0].revents & (POLLIN | POLLHUP | POLLERR)))
		read_socket(s);
}
