/* The guest API (docs/agent-protocol.md, "Guest API"): a process in the guest connects to
 * a Unix socket the agent listens on, and the agent tunnels that connection to the host as a
 * stream it opens itself (API_OPEN), moving the bytes both ways as DATA under the stream
 * windows (sockstream.c, shared with forwarded ports). The host serves its machines REST API on it, acting for the machine's owner, so
 * nothing in the guest holds a key. The agent never looks at the bytes: HTTP is the host's
 * and the client's business. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent.h"

/* The host refuses more than this many at once too; past it, connections wait in the
 * listen backlog instead of being opened only to be refused. */
#define API_MAX_STREAMS 16

static int listen_fd = -1;
static uint32_t next_id;

static void mkdir_parent(const char *path)
{
	char dir[108];
	snprintf(dir, sizeof dir, "%s", path);
	char *slash = strrchr(dir, '/');
	if (!slash || slash == dir)
		return;
	*slash = 0;
	for (char *p = dir + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = 0;
		mkdir(dir, 0755);
		*p = '/';
	}
	mkdir(dir, 0755);
}

void api_listen(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof sa.sun_path) {
		logmsg("API socket path too long: %s", path);
		return;
	}
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
	mkdir_parent(path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		logmsg("API socket: %s", strerror(errno));
		return;
	}
	/* A socket file of an earlier boot (a persistent /run) would make bind fail. */
	unlink(path);
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 64) < 0) {
		logmsg("API socket %s: %s", path, strerror(errno));
		close(fd);
		return;
	}
	/* Every process of the guest may use it: a machine is one tenant's, and its root could
	 * reach the port anyway. The host decides what a request may do, never this mode. */
	chmod(path, 0666);
	listen_fd = fd;
}

static unsigned open_streams(void)
{
	unsigned n = 0;
	for (struct stream *s = A.streams; s; s = s->next)
		if (s->kind == STREAM_API && !s->dead)
			n++;
	return n;
}

int api_listen_fd(void) { return listen_fd >= 0 && open_streams() < API_MAX_STREAMS ? listen_fd : -1; }

static int id_in_use(uint32_t id)
{
	for (struct stream *s = A.streams; s; s = s->next)
		if (s->id == id)
			return 1;
	return 0;
}

void api_accept(void)
{
	while (open_streams() < API_MAX_STREAMS) {
		int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
		if (fd < 0) {
			if (errno != EAGAIN && errno != EINTR)
				logmsg("API accept: %s", strerror(errno));
			return;
		}
		if (!A.host || !(A.host_features & FEAT_GUEST_API)) {
			/* No host, or one that does not serve the API: the client sees the connection
			 * close without an answer, at once rather than after a timeout. */
			close(fd);
			continue;
		}
		uint32_t id;
		do {
			next_id = (next_id + 1) & ~PROTO_AGENT_STREAM;
			id = PROTO_AGENT_STREAM | next_id;
		} while (id_in_use(id));
		struct stream *s = stream_new(id, STREAM_API);
		s->fd = fd;
		size_t start = proto_begin(&A.out, T_API_OPEN, id);
		proto_end(&A.out, start);
	}
}
