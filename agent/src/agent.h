/* State shared by the agent's event loop (agent.c), exec streams (exec.c), file streams
 * (files.c), socket streams (sockstream.c: api.c, port.c), CONFIGURE (configure.c), disks
 * (disk.c) and PID 1 duties (init.c). The agent is
 * single-threaded: everything runs from one poll() loop, so none of this needs locking. */
#ifndef HUTCH_AGENT_H
#define HUTCH_AGENT_H

#include <stdint.h>
#include <poll.h>
#include <sys/types.h>

#include "buf.h"
#include "proto.h"

/* Child output is read only while less than this is queued toward the host... */
#define OUT_SOFT (256u * 1024u)
/* ...and host input is read only while less than this is (control frames can exceed the
 * soft limit, so a host that never reads cannot make us queue without bound). */
#define OUT_HARD (1024u * 1024u)
/* Consumed host bytes are credited back in batches of at least this much. With a 256 KiB
 * window the host always keeps 224 KiB of room, so batching never stalls it. */
#define CREDIT_BATCH 32768u

enum stream_kind { STREAM_EXEC, STREAM_WRITE, STREAM_READ, STREAM_API, STREAM_PORT, STREAM_DISK };

/* Forwarded ports open at once (port.c); the host is answered EMFILE past it. */
#define PORT_MAX_STREAMS 64

struct stream {
	struct stream *next;
	uint32_t id;
	enum stream_kind kind;
	int dead; /* terminal frame sent or cancelled; freed at the end of the loop pass */
	uint64_t send_window; /* payload bytes we may still send (the host grants more) */
	uint64_t recv_window; /* payload bytes the host may still send us */
	uint32_t uncredited;  /* consumed host bytes not yet credited back */

	/* exec */
	pid_t pid;
	int reaped, status, timed_out, pty;
	int out_fd, err_fd; /* in PTY mode out_fd is the master and carries stdin too */
	int in_fd;          /* stdin pipe (non-PTY only) */
	int stdin_open;     /* host input still goes somewhere */
	int stdin_eof;      /* host ended input: close once in_buf drains */
	long out_drain, err_drain; /* after the exit grace period: bytes left to forward, else -1 */
	struct buf in_buf;
	int64_t deadline; /* timeout (ms, monotonic), 0 = none */
	int64_t grace;    /* when to stop waiting for the pipes after the exit, 0 = not yet */

	/* files; socket streams (API, port) keep their socket in fd and the host's bytes in in_buf */
	int fd;
	char *path, *tmp;
	uint64_t size;

	/* socket streams (API, port) */
	int eof_sent; /* the socket's end of input went to the host as an empty DATA */
	int host_eof; /* the host's empty DATA arrived: shut the socket's write side once drained */

	/* port: connecting until PORT_OPEN is answered (deadline: give up then) */
	int connecting, tried_v6;
	uint16_t port;

	/* disk: the worker's pid and its result pipe in fd, the request's path in path */
	unsigned disk_target;
	int disk_unmount;
};

struct agent {
	int pid1;
	const char *connect_path; /* --connect: Unix socket instead of virtio-serial */
	const char *port_path;    /* --port: explicit device */
	int fd;                   /* transport, -1 when not open */
	int host;                 /* a host is at the other end */
	int synced;               /* 0: discard input until a PING header */
	/* What the host announced in HELLO (0, 0: none yet, a host of protocol 1). Nothing
	 * depends on it today; a frame the host may not know must wait for its feature bit. */
	uint32_t host_version;
	uint64_t host_features;
	struct buf in, out;
	size_t out_frame_left; /* unsent bytes of the frame at the head of `out` */
	struct stream *streams;
	int busy; /* some stream can make progress without waiting: poll without sleeping */
};

extern struct agent A;

int64_t now_ms(void);
void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
const char *errno_name(int e);

/* Whether stream data may be queued toward the host right now. */
int out_room(void);
struct stream *stream_new(uint32_t id, enum stream_kind kind);
void stream_close_fds(struct stream *s);
void send_error(uint32_t stream, const char *code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
void send_errno(uint32_t stream, int err, const char *what);
/* Records that n host bytes were consumed and sends CREDIT when a batch is due. */
void consumed(struct stream *s, size_t n);

/* exec.c */
void exec_open(const struct proto_frame *f);
void exec_stdin(struct stream *s, const uint8_t *p, size_t n);
void exec_signal(struct stream *s, int sig);
void exec_resize(struct stream *s, uint16_t cols, uint16_t rows);
void exec_kill(struct stream *s);
int exec_reaped(pid_t pid, int status);
int64_t exec_timers(struct stream *s, int64_t now);
/* Poll integration: fds the stream waits on, and what to do when they are ready. */
int exec_pollfds(struct stream *s, struct pollfd *pfd);
void exec_ready(struct stream *s, const struct pollfd *pfd, int n);
/* In a forked child: undo the agent's signal dispositions before exec. */
void reset_child_signals(void);

/* files.c */
void file_write_open(const struct proto_frame *f);
void file_write_data(struct stream *s, const uint8_t *p, size_t n);
void file_read_open(const struct proto_frame *f);
void file_read_pump(struct stream *s);
void file_discard(struct stream *s);
/* mkdir -p, each directory made 0755; -1 with errno (ENOTDIR when dir or a parent is a file). */
int mkdir_p(const char *dir);

/* api.c: the guest API socket and the streams it opens toward the host. */
void api_listen(const char *path);
/* The listening socket while a connection may be accepted now, else -1. */
int api_listen_fd(void);
void api_accept(void);

/* sockstream.c: the DATA pump of API and port streams. */
void sock_data(struct stream *s, const uint8_t *p, size_t n);
int sock_pollfds(struct stream *s, struct pollfd *pfd);
void sock_ready(struct stream *s, const struct pollfd *pfd, int n);

/* port.c: PORT_OPEN, the host's connection to a TCP port of the guest. */
void port_open(const struct proto_frame *f);
int64_t port_timers(struct stream *s, int64_t now);
int port_pollfds(struct stream *s, struct pollfd *pfd);
void port_ready(struct stream *s, const struct pollfd *pfd, int n);

/* disk.c: DISK_MOUNT and DISK_UNMOUNT, each done by a child that answers through a pipe. */
void disk_open(const struct proto_frame *f);
int disk_pollfds(struct stream *s, struct pollfd *pfd);
void disk_ready(struct stream *s, const struct pollfd *pfd, int n);

/* guestcli.c: the agent binary run as `hutch`. */
int guest_cli(int argc, char **argv);

/* configure.c */
void configure_open(const struct proto_frame *f);
/* Replaces path with data through a temporary file renamed over it; -1 with errno. */
int write_atomic(const char *path, const void *data, size_t n, mode_t mode);

/* net.c: CONFIGURE's net field, 15 bytes (docs/agent-protocol.md, "Network"). Addresses in
 * host byte order. parse_net returns NULL if valid, else why not; apply_net returns -1 with
 * errno and *what, the step that failed. */
#define NET_FIELD_LEN 15u
struct net_config {
	uint32_t addr, gateway, dns;
	uint8_t prefix;
	uint16_t mtu;
};
const char *parse_net(const uint8_t *p, uint32_t n, struct net_config *c);
int apply_net(const struct net_config *c, const char **what);

/* init.c */
void init_setup(void);
/* Whether this binary is where images put the agent (/sbin or /.hutch): a real guest, not an
 * agent run as PID 1 of a namespace on some host, whose /usr and /run are the host's. */
int in_guest_image(void);
/* boot.c: remember root= of the kernel command line; grow the root ext4 on it to fill its
 * disk; mount one volume (-1 with errno and *what, the step that failed). Both on CONFIGURE's
 * request. */
struct volume;
void set_root_device(const char *dev);
void grow_root(void);
int mount_volume(const struct volume *v, const char **what);
int64_t console_tick(int64_t now);
int console_reaped(pid_t pid);
_Noreturn void power_off(void);

#endif
