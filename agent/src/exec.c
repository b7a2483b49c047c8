/* EXEC streams: spawning children, moving their stdin/stdout/stderr under the stream
 * windows, and reporting how they ended. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "agent.h"

/* How long to wait for the pipes after the child exited, in case a background process
 * holds them open (docs/agent-protocol.md, Exec step 4). */
#define EXIT_GRACE_MS 200

extern char **environ;

static const char *const default_env[] = {
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"USER=root",
	"LANG=C.UTF-8",
};

/* What the child reports through its close-on-exec pipe when it cannot exec. */
struct child_failure {
	int stage; /* 0 exec, 1 chdir, 2 terminal/stdio setup */
	int err;
};

void reset_child_signals(void)
{
	static const int sigs[] = {SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGQUIT,
				   SIGTSTP, SIGTTIN, SIGTTOU, SIGCHLD, SIGUSR1, SIGUSR2};
	/* Ignored dispositions survive exec, and children must not inherit PID 1's. */
	for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
		signal(sigs[i], SIG_DFL);
	sigset_t all;
	sigemptyset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);
}

static char *dup_field(const struct proto_field *fl)
{
	char *s = malloc(fl->len + 1);
	if (!s)
		abort();
	memcpy(s, fl->val, fl->len);
	s[fl->len] = 0;
	return s;
}

static int has_nul(const struct proto_field *fl) { return memchr(fl->val, 0, fl->len) != NULL; }

static void free_vec(char **v)
{
	if (!v)
		return;
	for (char **p = v; *p; p++)
		free(*p);
	free(v);
}

/* Defaults, then each override in order: K=V replaces an earlier K. */
static char **build_env(const struct proto_frame *f, int pty)
{
	size_t cap = sizeof default_env / sizeof default_env[0] + 2 + f->nfields;
	char **env = calloc(cap, sizeof *env);
	size_t n = 0;
	if (!env)
		abort();
	for (size_t i = 0; i < sizeof default_env / sizeof default_env[0]; i++)
		env[n++] = strdup(default_env[i]);
	if (pty)
		env[n++] = strdup("TERM=xterm-256color");
	for (size_t i = 0; i < f->nfields; i++) {
		if (f->fields[i].tag != EXEC_ENV)
			continue;
		char *kv = dup_field(&f->fields[i]);
		size_t klen = (size_t)(strchr(kv, '=') - kv) + 1;
		size_t j;
		for (j = 0; j < n; j++)
			if (strncmp(env[j], kv, klen) == 0)
				break;
		if (j < n)
			free(env[j]);
		else
			n++;
		env[j] = kv;
	}
	env[n] = NULL;
	return env;
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static _Noreturn void child(int report, char **argv, char **envp, const char *cwd, int pty_mode,
			    const char *slave, int in_fd, int out_fd, int err_fd)
{
	struct child_failure cf = {2, 0};
	reset_child_signals();
	setsid();
	if (pty_mode) {
		int t = open(slave, O_RDWR);
		if (t < 0 || ioctl(t, TIOCSCTTY, 0) < 0)
			goto fail;
		in_fd = out_fd = err_fd = t;
	}
	/* The agent keeps fds 0-2 open, so these never alias the targets mid-way. */
	if (dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0)
		goto fail;
	if (cwd) {
		cf.stage = 1;
		if (chdir(cwd) < 0)
			goto fail;
	} else if (chdir("/root") < 0 && chdir("/") < 0) {
		cf.stage = 1;
		goto fail;
	}
	cf.stage = 0;
	/* execvp searches the PATH of `environ`, which must be the child's own. */
	environ = envp;
	execvp(argv[0], argv);
fail:
	cf.err = errno;
	if (write(report, &cf, sizeof cf) < 0) {
		/* nothing left to tell anyone */
	}
	_exit(127);
}

void exec_open(const struct proto_frame *f)
{
	uint32_t id = f->stream;
	size_t nargs = 0;
	const struct proto_field *cwd = NULL, *pty = NULL, *timeout = NULL, *stdinf = NULL;
	for (size_t i = 0; i < f->nfields; i++) {
		const struct proto_field *fl = &f->fields[i];
		const struct proto_field **slot = NULL;
		switch (fl->tag) {
		case EXEC_ARG:
			if (has_nul(fl)) {
				send_error(id, "EINVAL", "exec: arg contains a NUL byte");
				return;
			}
			nargs++;
			continue;
		case EXEC_ENV:
			if (has_nul(fl) || !memchr(fl->val, '=', fl->len) || fl->val[0] == '=') {
				send_error(id, "EINVAL", "exec: env must be KEY=VALUE without NUL bytes");
				return;
			}
			continue;
		case EXEC_CWD: slot = &cwd; break;
		case EXEC_PTY: slot = &pty; break;
		case EXEC_TIMEOUT: slot = &timeout; break;
		case EXEC_STDIN: slot = &stdinf; break;
		default:
			continue; /* unknown tags are for newer agents */
		}
		if (*slot) {
			send_error(id, "EINVAL", "exec: field %u given twice", fl->tag);
			return;
		}
		*slot = fl;
	}
	if (nargs == 0) {
		send_error(id, "EINVAL", "exec: no arg");
		return;
	}
	if (cwd && (has_nul(cwd) || cwd->len == 0)) {
		send_error(id, "EINVAL", "exec: bad cwd");
		return;
	}
	int want_stdin = stdinf ? stdinf->val[0] : 0;
	if (want_stdin > 1) {
		send_error(id, "EINVAL", "exec: stdin must be 0 or 1");
		return;
	}

	char **argv = calloc(nargs + 1, sizeof *argv);
	if (!argv)
		abort();
	for (size_t i = 0, k = 0; i < f->nfields; i++)
		if (f->fields[i].tag == EXEC_ARG)
			argv[k++] = dup_field(&f->fields[i]);
	char **envp = build_env(f, pty != NULL);
	char *cwd_s = cwd ? dup_field(cwd) : NULL;

	int report[2] = {-1, -1}, inp[2] = {-1, -1}, outp[2] = {-1, -1}, errp[2] = {-1, -1};
	int master = -1, devnull = -1;
	char slave[128] = "";
	const char *what = "pipe";
	if (pipe2(report, O_CLOEXEC) < 0)
		goto sys_fail;
	if (pty) {
		what = "open pty";
		master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0)
			goto sys_fail;
		const char *name = ptsname(master);
		if (!name)
			goto sys_fail;
		snprintf(slave, sizeof slave, "%s", name);
		struct winsize ws = {.ws_col = (unsigned short)proto_get_uint(pty->val, 2),
				     .ws_row = (unsigned short)proto_get_uint(pty->val + 2, 2)};
		ioctl(master, TIOCSWINSZ, &ws);
	} else {
		if (pipe2(outp, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0)
			goto sys_fail;
		if (want_stdin) {
			if (pipe2(inp, O_CLOEXEC) < 0)
				goto sys_fail;
		} else {
			what = "open /dev/null";
			devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
			if (devnull < 0)
				goto sys_fail;
		}
	}

	what = "fork";
	pid_t pid = fork();
	if (pid < 0)
		goto sys_fail;
	if (pid == 0)
		child(report[1], argv, envp, cwd_s, pty != NULL, slave, want_stdin ? inp[0] : devnull,
		      outp[1], errp[1]);

	close(report[1]);
	report[1] = -1;
	if (devnull >= 0)
		close(devnull);
	if (inp[0] >= 0)
		close(inp[0]);
	if (outp[1] >= 0)
		close(outp[1]);
	if (errp[1] >= 0)
		close(errp[1]);

	/* Blocks only until the child has exec'd (the pipe closes) or failed: a handful of
	 * syscalls, and it lets ENOENT come back as ERROR rather than as exit code 127. */
	struct child_failure cf;
	ssize_t got;
	do
		got = read(report[0], &cf, sizeof cf);
	while (got < 0 && errno == EINTR);
	close(report[0]);
	if (got == (ssize_t)sizeof cf) {
		int st;
		while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
		}
		int fds[] = {master, inp[1], outp[0], errp[0]};
		for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++)
			if (fds[i] >= 0)
				close(fds[i]);
		if (cf.stage == 0)
			send_error(id, errno_name(cf.err), "exec %s: %s", argv[0], strerror(cf.err));
		else if (cf.stage == 1)
			send_error(id, errno_name(cf.err), "chdir %s: %s", cwd_s ? cwd_s : "/",
				   strerror(cf.err));
		else
			send_error(id, errno_name(cf.err), "set up the child's terminal: %s",
				   strerror(cf.err));
		goto out;
	}

	struct stream *s = stream_new(id, STREAM_EXEC);
	s->pid = pid;
	s->pty = pty != NULL;
	if (pty) {
		s->out_fd = master;
		s->stdin_open = 1;
		set_nonblock(master);
	} else {
		s->out_fd = outp[0];
		s->err_fd = errp[0];
		s->in_fd = inp[1];
		s->stdin_open = want_stdin;
		set_nonblock(outp[0]);
		set_nonblock(errp[0]);
		if (inp[1] >= 0)
			set_nonblock(inp[1]);
	}
	uint32_t ms = timeout ? (uint32_t)proto_get_uint(timeout->val, 4) : 0;
	if (ms)
		s->deadline = now_ms() + ms;
	size_t start = proto_begin(&A.out, T_STARTED, id);
	proto_put_u32(&A.out, (uint32_t)pid);
	proto_end(&A.out, start);
	goto out;

sys_fail:
	send_errno(id, errno, what);
	{
		int fds[] = {report[0], report[1], inp[0], inp[1], outp[0], outp[1],
			     errp[0],   errp[1],   master, devnull};
		for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++)
			if (fds[i] >= 0)
				close(fds[i]);
	}
out:
	free_vec(argv);
	free_vec(envp);
	free(cwd_s);
}

/* ---- running streams ---- */

static void send_exit(struct stream *s)
{
	size_t start = proto_begin(&A.out, T_EXIT, s->id);
	if (WIFSIGNALED(s->status))
		proto_tlv_u32(&A.out, EXIT_SIGNAL, (uint32_t)WTERMSIG(s->status));
	else
		proto_tlv_u32(&A.out, EXIT_CODE, (uint32_t)WEXITSTATUS(s->status));
	if (s->timed_out)
		proto_tlv_u8(&A.out, EXIT_TIMED_OUT, 1);
	proto_end(&A.out, start);
}

static void maybe_exit(struct stream *s)
{
	if (s->dead || !s->reaped || s->out_fd >= 0 || s->err_fd >= 0)
		return;
	send_exit(s);
	stream_close_fds(s);
	s->dead = 1;
}

/* Host input that can no longer reach the child still counts as consumed, or the host's
 * window would shrink for nothing. */
static void stdin_drop(struct stream *s)
{
	consumed(s, buf_size(&s->in_buf));
	buf_clear(&s->in_buf);
	s->stdin_open = 0;
	if (s->in_fd >= 0)
		close(s->in_fd);
	s->in_fd = -1;
}

static void stdin_finish(struct stream *s)
{
	if (s->pty && s->out_fd >= 0) {
		/* A terminal has no separate input to close: end of input is the EOF
		 * character, as if the user typed ^D. */
		if (write(s->out_fd, "\x04", 1) < 0) {
			/* the terminal is gone; so is the reader */
		}
	}
	stdin_drop(s);
}

static void stdin_flush(struct stream *s)
{
	int fd = s->pty ? s->out_fd : s->in_fd;
	while (buf_size(&s->in_buf) > 0) {
		ssize_t n = write(fd, buf_data(&s->in_buf), buf_size(&s->in_buf));
		if (n > 0) {
			buf_consume(&s->in_buf, (size_t)n);
			consumed(s, (size_t)n);
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && errno == EAGAIN) {
			return;
		} else {
			stdin_drop(s); /* EPIPE: the child closed its stdin */
			return;
		}
	}
	if (s->stdin_eof && s->stdin_open)
		stdin_finish(s);
}

void exec_stdin(struct stream *s, const uint8_t *p, size_t n)
{
	if (!s->stdin_open) {
		consumed(s, n);
		return;
	}
	if (n == 0) {
		s->stdin_eof = 1;
		if (buf_size(&s->in_buf) == 0)
			stdin_finish(s);
		return;
	}
	buf_append(&s->in_buf, p, n);
	stdin_flush(s);
}

void exec_signal(struct stream *s, int sig)
{
	/* Invalid numbers fail with EINVAL, which is all they deserve. */
	kill(-s->pid, sig);
}

void exec_resize(struct stream *s, uint16_t cols, uint16_t rows)
{
	if (!s->pty || s->out_fd < 0)
		return;
	struct winsize ws = {.ws_col = cols, .ws_row = rows};
	ioctl(s->out_fd, TIOCSWINSZ, &ws);
}

void exec_kill(struct stream *s)
{
	if (s->pid > 0 && !(s->reaped && s->out_fd < 0 && s->err_fd < 0))
		kill(-s->pid, SIGKILL);
	stream_close_fds(s);
}

int exec_reaped(pid_t pid, int status)
{
	for (struct stream *s = A.streams; s; s = s->next) {
		if (s->kind != STREAM_EXEC || s->pid != pid || s->reaped)
			continue;
		s->reaped = 1;
		s->status = status;
		s->deadline = 0;
		s->grace = now_ms() + EXIT_GRACE_MS;
		maybe_exit(s);
		return 1;
	}
	return 0;
}

static void close_output(struct stream *s, int is_err)
{
	int *fdp = is_err ? &s->err_fd : &s->out_fd;
	if (*fdp >= 0)
		close(*fdp);
	*fdp = -1;
	if (s->pty)
		stdin_drop(s);
}

/* After the grace period only what is already in a pipe is forwarded: a background
 * process that keeps writing must not keep the stream open forever. */
static void start_drain(struct stream *s, int is_err)
{
	int fd = is_err ? s->err_fd : s->out_fd;
	if (fd < 0)
		return;
	int avail = 0;
	if (ioctl(fd, FIONREAD, &avail) < 0 || avail <= 0)
		close_output(s, is_err);
	else if (is_err)
		s->err_drain = avail;
	else
		s->out_drain = avail;
}

int64_t exec_timers(struct stream *s, int64_t now)
{
	int64_t next = 0;
	if (s->deadline) {
		if (now >= s->deadline) {
			kill(-s->pid, SIGKILL);
			s->timed_out = 1;
			s->deadline = 0;
		} else {
			next = s->deadline;
		}
	}
	if (s->grace > 0) {
		if (now >= s->grace) {
			s->grace = -1;
			start_drain(s, 0);
			start_drain(s, 1);
			maybe_exit(s);
		} else if (!next || s->grace < next) {
			next = s->grace;
		}
	}
	return next;
}

static int may_read(const struct stream *s) { return out_room() && s->send_window > 0; }

int exec_pollfds(struct stream *s, struct pollfd *pfd)
{
	int k = 0;
	int rd = may_read(s);
	int want_in = s->stdin_open && buf_size(&s->in_buf) > 0;
	if (s->out_fd >= 0) {
		short ev = rd ? POLLIN : 0;
		if (s->pty && want_in)
			ev |= POLLOUT;
		if (ev)
			pfd[k++] = (struct pollfd){.fd = s->out_fd, .events = ev};
	}
	if (s->err_fd >= 0 && rd)
		pfd[k++] = (struct pollfd){.fd = s->err_fd, .events = POLLIN};
	if (s->in_fd >= 0 && want_in)
		pfd[k++] = (struct pollfd){.fd = s->in_fd, .events = POLLOUT};
	return k;
}

static void read_output(struct stream *s, int is_err)
{
	int fd = is_err ? s->err_fd : s->out_fd;
	long *drain = is_err ? &s->err_drain : &s->out_drain;
	size_t max = PROTO_MAX_PAYLOAD;
	if (s->send_window < max)
		max = (size_t)s->send_window;
	if (*drain >= 0 && (size_t)*drain < max)
		max = (size_t)*drain;
	if (max == 0 || !out_room())
		return;
	size_t start = proto_begin(&A.out, is_err ? T_STDERR : T_STDOUT, s->id);
	uint8_t *p = buf_reserve(&A.out, max);
	ssize_t n = read(fd, p, max);
	if (n > 0) {
		A.out.len += (size_t)n;
		proto_end(&A.out, start);
		s->send_window -= (uint64_t)n;
		if (*drain >= 0 && (*drain -= n) == 0)
			close_output(s, is_err);
	} else {
		buf_truncate(&A.out, start);
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		/* EOF, or EIO from a PTY master once every slave fd is closed. */
		close_output(s, is_err);
	}
	maybe_exit(s);
}

void exec_ready(struct stream *s, const struct pollfd *pfd, int n)
{
	for (int i = 0; i < n && !s->dead; i++) {
		short re = pfd[i].revents;
		if (!re)
			continue;
		if (pfd[i].fd == s->out_fd) {
			if (s->pty && (re & POLLOUT))
				stdin_flush(s);
			if (re & (POLLIN | POLLHUP | POLLERR)) {
				if (pfd[i].events & POLLIN)
					read_output(s, 0);
				else if (s->pty)
					stdin_drop(s); /* hung-up terminal: stop asking to write */
			}
		} else if (pfd[i].fd == s->err_fd) {
			read_output(s, 1);
		} else if (pfd[i].fd == s->in_fd) {
			stdin_flush(s);
		}
	}
}
