/* `hutch` inside a machine: the agent binary run under that name (init.c links
 * /usr/local/bin/hutch to it) is a small client of the machines API. It sends one HTTP/1.1
 * request on the agent's API socket, which the agent tunnels to the host (api.c), and the
 * host answers as the machine's owner: nothing in the guest holds a key or a token. With
 * --json it prints the documents the host's `hutch` prints for the same commands
 * (src/cli/main.ts): the daemon's answer as it came, spliced at most. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent.h"
#include "json.h"

#define DEFAULT_SOCKET "/run/hutch/api.sock"
/* The server's longest TTL (src/engine/flows/context.ts): asked for with persistence, which a
 * server that does not allow it replaces by this, so an agent's task outlives its machine's
 * default minute. The host CLI asks the same. */
#define LONGEST_TTL "900"
/* The server's longest exec timeout: an agent's task takes minutes. */
#define EXEC_TIMEOUT_MS "3600000"

static const char usage_text[] =
	"usage: hutch COMMAND [--json]   (inside a machine, acting as its owner)\n"
	"  hutch new [--name N] [--template T] [--ttl S] [--persistent]\n"
	"  hutch list|ls\n"
	"  hutch get ID\n"
	"  hutch exec [--timeout MS] ID 'SHELL COMMAND'   or   hutch exec ID -- CMD [ARG...]\n"
	"  hutch fork ID [--name N] [--ttl S]\n"
	"  hutch destroy|rm ID...\n"
	"ID is a machine's id or name. With --json every answer is one JSON document on stdout,\n"
	"errors included ({\"code\",\"message\"}, exit code 1; USAGE, exit code 2).\n";

static int json_mode;

struct opts {
	const char *name, *template, *ttl, *timeout;
	int persistent;
	char **pos;
	int npos;
	char **trail;
	int ntrail;
};

/* The agent closes a connection the host refused, maybe before reading the request: a plain
 * write would then kill the CLI with SIGPIPE (it runs before the agent's SIG_IGN) instead of
 * letting it say UNAVAILABLE. Stdout keeps the default, so `hutch ls | head` ends quietly. */
static void send_or_write_all(int fd, const void *p, size_t n, int to_socket)
{
	const char *c = p;
	while (n > 0) {
		ssize_t k = to_socket ? send(fd, c, n, MSG_NOSIGNAL) : write(fd, c, n);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return;
		c += k;
		n -= (size_t)k;
	}
}

static void write_all(int fd, const void *p, size_t n) { send_or_write_all(fd, p, n, 0); }

static void put(int fd, const char *s) { write_all(fd, s, strlen(s)); }

/* Fails the way the host CLI does: the document on stdout with --json, a line on stderr. */
__attribute__((format(printf, 3, 4))) static _Noreturn void die(int status, const char *code,
								const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (json_mode) {
		struct buf b = {0};
		buf_append(&b, "{\"code\":", 8);
		json_quote(&b, code, strlen(code));
		buf_append(&b, ",\"message\":", 11);
		json_quote(&b, msg, strlen(msg));
		buf_append(&b, "}\n", 2);
		write_all(1, buf_data(&b), buf_size(&b));
	}
	put(2, "hutch: ");
	if (strcmp(code, "USAGE") != 0) {
		put(2, code);
		put(2, ": ");
	}
	put(2, msg);
	put(2, status == 2 ? "\n\n" : "\n");
	if (status == 2 && !json_mode)
		put(2, usage_text);
	exit(status);
}

/* ---- one request ---- */

struct resp {
	int status;
	struct buf raw;
	struct buf chunks; /* the body of a chunked answer, decoded */
	struct json_span body;
};

static const char *socket_path(void)
{
	const char *p = getenv("HUTCH_API_SOCKET");
	return p && *p ? p : DEFAULT_SOCKET;
}

/* Finds a header's value (case-insensitive name) in head[0..n); NULL if absent. */
static const char *header(const char *head, size_t n, const char *name, size_t *len)
{
	size_t k = strlen(name);
	for (const char *p = head; p < head + n;) {
		const char *eol = memchr(p, '\n', (size_t)(head + n - p));
		if (!eol)
			eol = head + n;
		if ((size_t)(eol - p) > k && p[k] == ':' && strncasecmp(p, name, k) == 0) {
			const char *v = p + k + 1;
			while (v < eol && (*v == ' ' || *v == '\t'))
				v++;
			const char *e = eol;
			while (e > v && (e[-1] == '\r' || e[-1] == ' '))
				e--;
			*len = (size_t)(e - v);
			return v;
		}
		p = eol + 1;
	}
	return NULL;
}

static int dechunk(const char *p, const char *end, struct buf *out)
{
	for (;;) {
		char *after;
		unsigned long size = strtoul(p, &after, 16);
		if (after == p)
			return -1;
		const char *data = memchr(after, '\n', (size_t)(end - after));
		if (!data)
			return -1;
		data++;
		if (size == 0)
			return 0;
		if ((size_t)(end - data) < size + 2)
			return -1;
		buf_append(out, data, size);
		p = data + size + 2; /* CRLF after the chunk */
	}
}

static void call(const char *method, const char *path, const struct buf *body, struct resp *r)
{
	memset(r, 0, sizeof *r);
	const char *sock = socket_path();
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", sock);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		die(1, "UNREACHABLE", "cannot reach the hutch agent at %s (%s)", sock, strerror(errno));

	char head[512];
	int n = snprintf(head, sizeof head,
			 "%s %s HTTP/1.1\r\nHost: hutch\r\nUser-Agent: hutch-guest\r\nConnection: close\r\n",
			 method, path);
	struct buf req = {0};
	buf_append(&req, head, (size_t)n);
	if (body) {
		n = snprintf(head, sizeof head, "Content-Type: application/json\r\nContent-Length: %zu\r\n",
			     buf_size(body));
		buf_append(&req, head, (size_t)n);
	}
	buf_append(&req, "\r\n", 2);
	if (body)
		buf_append(&req, buf_data(body), buf_size(body));
	send_or_write_all(fd, buf_data(&req), buf_size(&req), 1);
	buf_free(&req);

	/* The host closes once it has answered (Connection: close): read to the end. */
	for (;;) {
		uint8_t *p = buf_reserve(&r->raw, 65536);
		ssize_t k = read(fd, p, 65536);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			break;
		r->raw.len += (size_t)k;
	}
	close(fd);
	const char *raw = (const char *)buf_data(&r->raw);
	size_t len = buf_size(&r->raw);
	if (len == 0)
		die(1, "UNAVAILABLE", "the host closed the API connection without an answer");
	const char *sep = memmem(raw, len, "\r\n\r\n", 4);
	if (!sep || sscanf(raw, "HTTP/1.%*d %d", &r->status) != 1)
		die(1, "BAD_RESPONSE", "the host's answer is not HTTP");
	const char *start = sep + 4, *end = raw + len;
	size_t vlen;
	const char *te = header(raw, (size_t)(sep - raw), "transfer-encoding", &vlen);
	if (te && vlen == 7 && strncasecmp(te, "chunked", 7) == 0) {
		if (dechunk(start, end, &r->chunks) < 0)
			die(1, "BAD_RESPONSE", "the host's answer was cut short");
		r->body.p = (const char *)buf_data(&r->chunks);
		r->body.n = buf_size(&r->chunks);
	} else {
		r->body.p = start;
		r->body.n = (size_t)(end - start);
	}
}

/* A string member as a C string (decoded), or NULL. */
static char *get_string(struct json_span obj, const char *key)
{
	struct json_span v;
	struct buf b = {0};
	if (json_get(obj, key, &v) < 0 || json_unescape(v, &b) < 0) {
		buf_free(&b);
		return NULL;
	}
	buf_append(&b, "", 1);
	return (char *)buf_data(&b);
}

/* An error answer: the daemon's {"code","message"} as it came, and the line on stderr. */
static void check(const struct resp *r, int want)
{
	if (r->status == want)
		return;
	char *code = get_string(r->body, "code"), *msg = get_string(r->body, "message");
	if (!code || !msg) {
		char status[16];
		snprintf(status, sizeof status, "HTTP_%d", r->status);
		die(1, status, "%.*s", (int)(r->body.n > 300 ? 300 : r->body.n), r->body.p);
	}
	if (json_mode) {
		write_all(1, r->body.p, r->body.n);
		put(1, "\n");
	}
	put(2, "hutch: ");
	put(2, code);
	put(2, ": ");
	put(2, msg);
	put(2, "\n");
	exit(1);
}

static void print_body(const struct resp *r)
{
	write_all(1, r->body.p, r->body.n);
	put(1, "\n");
}

/* ---- arguments ---- */

static void parse(int argc, char **argv, struct opts *o)
{
	memset(o, 0, sizeof *o);
	o->pos = calloc((size_t)argc + 1, sizeof *o->pos);
	if (!o->pos)
		abort();
	for (int i = 0; i < argc; i++) {
		char *a = argv[i];
		if (strcmp(a, "--") == 0) {
			o->trail = argv + i + 1;
			o->ntrail = argc - i - 1;
			return;
		}
		if (strncmp(a, "--", 2) != 0 || !a[2]) {
			o->pos[o->npos++] = a;
			continue;
		}
		char *name = a + 2, *val = strchr(name, '=');
		size_t nlen = val ? (size_t)(val - name) : strlen(name);
		if (val)
			val++;
		if (nlen == 4 && strncmp(name, "json", 4) == 0 && !val) {
			json_mode = 1;
			continue;
		}
		if (nlen == 10 && strncmp(name, "persistent", 10) == 0 && !val) {
			o->persistent = 1;
			continue;
		}
		const char **slot = nlen == 4 && strncmp(name, "name", 4) == 0       ? &o->name
				    : nlen == 8 && strncmp(name, "template", 8) == 0 ? &o->template
				    : nlen == 3 && strncmp(name, "ttl", 3) == 0      ? &o->ttl
				    : nlen == 7 && strncmp(name, "timeout", 7) == 0  ? &o->timeout
										     : NULL;
		if (!slot)
			die(2, "USAGE", "unknown option %s", a);
		if (!val) {
			if (i + 1 >= argc)
				die(2, "USAGE", "option --%.*s needs a value", (int)nlen, name);
			val = argv[++i];
		}
		*slot = val;
	}
}

static const char *whole_number(const char *flag, const char *v)
{
	if (!v)
		return NULL;
	const char *p = v + (*v == '-');
	if (!*p || strspn(p, "0123456789") != strlen(p) || strlen(p) > 9)
		die(2, "USAGE", "--%s must be a whole number, got \"%s\"", flag, v);
	return v;
}

/* /v1/machines/ID[/rest], the id percent-encoded. */
static void machine_path(char *out, size_t cap, const char *id, const char *rest)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t n = (size_t)snprintf(out, cap, "/v1/machines/");
	for (const unsigned char *p = (const unsigned char *)id; *p && n + 4 < cap; p++) {
		if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
		    strchr("-._~", *p)) {
			out[n++] = (char)*p;
		} else {
			out[n++] = '%';
			out[n++] = hex[*p >> 4];
			out[n++] = hex[*p & 15];
		}
	}
	out[n] = 0;
	if (rest)
		snprintf(out + n, cap - n, "/%s", rest);
}

static void add_field(struct buf *b, const char *key, const char *str, const char *raw)
{
	buf_append(b, buf_size(b) > 1 ? "," : "", buf_size(b) > 1 ? 1 : 0);
	json_quote(b, key, strlen(key));
	buf_append(b, ":", 1);
	if (str)
		json_quote(b, str, strlen(str));
	else
		buf_append(b, raw, strlen(raw));
}

/* ---- commands ---- */

static void machine_line(struct json_span m)
{
	char *id = get_string(m, "id"), *name = get_string(m, "name"), *status = get_string(m, "status"),
	     *template = get_string(m, "template");
	char line[512];
	snprintf(line, sizeof line, "%s\t%s\t%s\t%s\n", id ? id : "?", name ? name : "-",
		 status ? status : "?", template ? template : "?");
	put(1, line);
	free(id);
	free(name);
	free(status);
	free(template);
}

static int cmd_new(const struct opts *o)
{
	if (o->npos || o->ntrail)
		die(2, "USAGE", "usage: hutch new [--name N] [--template T] [--ttl S] [--persistent]");
	struct buf b = {0};
	buf_append(&b, "{", 1);
	add_field(&b, "template", o->template ? o->template : "python", NULL);
	if (o->name)
		add_field(&b, "name", o->name, NULL);
	if (o->ttl)
		add_field(&b, "ttl_seconds", NULL, whole_number("ttl", o->ttl));
	if (o->persistent)
		add_field(&b, "persistent", NULL, "true");
	if (!o->ttl && !o->persistent) {
		add_field(&b, "persistent", NULL, "true");
		add_field(&b, "ttl_seconds", NULL, LONGEST_TTL);
	}
	buf_append(&b, "}", 1);
	struct resp r;
	call("POST", "/v1/machines", &b, &r);
	check(&r, 201);
	if (json_mode) {
		print_body(&r);
	} else {
		char *id = get_string(r.body, "id");
		put(1, id ? id : "?");
		put(1, "\n");
	}
	return 0;
}

static int cmd_list(const struct opts *o)
{
	if (o->npos || o->ntrail)
		die(2, "USAGE", "usage: hutch list");
	struct resp r;
	call("GET", "/v1/machines", NULL, &r);
	check(&r, 200);
	struct json_span arr, m;
	if (json_get(r.body, "machines", &arr) < 0)
		die(1, "BAD_RESPONSE", "the host's list has no machines");
	if (json_mode) {
		/* The host CLI prints the array itself. */
		write_all(1, arr.p, arr.n);
		put(1, "\n");
		return 0;
	}
	for (size_t at = 0; json_next(arr, &at, &m) == 0;)
		machine_line(m);
	return 0;
}

static int cmd_get(const struct opts *o)
{
	if (o->npos != 1 || o->ntrail)
		die(2, "USAGE", "usage: hutch get ID");
	char path[512];
	machine_path(path, sizeof path, o->pos[0], NULL);
	struct resp r;
	call("GET", path, NULL, &r);
	check(&r, 200);
	if (json_mode)
		print_body(&r);
	else
		machine_line(r.body);
	return 0;
}

static int cmd_fork(const struct opts *o)
{
	if (o->npos != 1 || o->ntrail)
		die(2, "USAGE", "usage: hutch fork ID [--name N] [--ttl S]");
	char path[512];
	machine_path(path, sizeof path, o->pos[0], "branch");
	struct buf b = {0};
	buf_append(&b, "{", 1);
	if (o->name)
		add_field(&b, "name", o->name, NULL);
	if (o->ttl)
		add_field(&b, "ttl_seconds", NULL, whole_number("ttl", o->ttl));
	buf_append(&b, "}", 1);
	struct resp r;
	call("POST", path, &b, &r);
	check(&r, 201);
	if (json_mode) {
		print_body(&r);
	} else {
		char *id = get_string(r.body, "id");
		put(1, id ? id : "?");
		put(1, "\n");
	}
	return 0;
}

static int cmd_destroy(const struct opts *o)
{
	if (o->npos == 0 || o->ntrail)
		die(2, "USAGE", "usage: hutch destroy ID...");
	struct buf done = {0};
	buf_append(&done, "{\"removed\":[", 12);
	for (int i = 0; i < o->npos; i++) {
		char path[512];
		machine_path(path, sizeof path, o->pos[i], NULL);
		struct resp r;
		call("DELETE", path, NULL, &r);
		check(&r, 204);
		if (i)
			buf_append(&done, ",", 1);
		json_quote(&done, o->pos[i], strlen(o->pos[i]));
		if (!json_mode) {
			put(1, o->pos[i]);
			put(1, "\n");
		}
	}
	buf_append(&done, "]}\n", 3);
	if (json_mode)
		write_all(1, buf_data(&done), buf_size(&done));
	return 0;
}

/* The inside of a JSON string's text (without its quotes); empty when v is not a string. */
static struct json_span inner(struct json_span v)
{
	if (v.n < 2 || v.p[0] != '"')
		return (struct json_span){v.p, 0};
	return (struct json_span){v.p + 1, v.n - 2};
}

static int cmd_exec(const struct opts *o)
{
	if (o->npos < 1 || (o->ntrail == 0 && o->npos < 2))
		die(2, "USAGE", "usage: hutch exec ID 'SHELL COMMAND'  or  hutch exec ID -- CMD [ARG...]");
	char path[512];
	machine_path(path, sizeof path, o->pos[0], "exec");
	struct buf b = {0};
	buf_append(&b, "{\"cmd\":", 7);
	char **argv = o->ntrail ? o->trail : o->pos + 1;
	int argc = o->ntrail ? o->ntrail : o->npos - 1;
	if (o->ntrail == 0 && argc == 1) {
		/* One argument is a shell command line, like the host CLI's. */
		json_quote(&b, argv[0], strlen(argv[0]));
	} else {
		buf_append(&b, "[", 1);
		for (int i = 0; i < argc; i++) {
			if (i)
				buf_append(&b, ",", 1);
			json_quote(&b, argv[i], strlen(argv[i]));
		}
		buf_append(&b, "]", 1);
	}
	add_field(&b, "timeout_ms", NULL, o->timeout ? whole_number("timeout", o->timeout) : EXEC_TIMEOUT_MS);
	buf_append(&b, "}", 1);
	struct resp r;
	call("POST", path, &b, &r);
	check(&r, 200);

	struct json_span out, err, code, sig, timed;
	if (json_get(r.body, "stdout", &out) < 0 || json_get(r.body, "stderr", &err) < 0 ||
	    json_get(r.body, "exit_code", &code) < 0)
		die(1, "BAD_RESPONSE", "the host's exec answer has no stdout, stderr or exit_code");
	if (json_mode) {
		/* {"output": stdout then stderr, …the answer's members}: the two strings' escaped
		 * texts put end to end are the escaped text of the two put end to end. */
		struct json_span o1 = inner(out), o2 = inner(err);
		const char *rest = r.body.p, *end = r.body.p + r.body.n;
		while (rest < end && *rest != '{')
			rest++;
		put(1, "{\"output\":\"");
		write_all(1, o1.p, o1.n);
		write_all(1, o2.p, o2.n);
		put(1, "\",");
		write_all(1, rest + 1, (size_t)(end - rest - 1));
		put(1, "\n");
	} else {
		struct buf text = {0};
		json_unescape(out, &text);
		write_all(1, buf_data(&text), buf_size(&text));
		buf_clear(&text);
		json_unescape(err, &text);
		write_all(2, buf_data(&text), buf_size(&text));
		buf_free(&text);
		if (json_get(r.body, "timed_out", &timed) == 0 && timed.n == 4 && memcmp(timed.p, "true", 4) == 0)
			put(2, "hutch: command timed out\n");
	}
	if (code.n && code.p[0] != 'n')
		return atoi(code.p) & 0xff;
	int s = json_get(r.body, "signal", &sig) == 0 && sig.n && sig.p[0] != 'n' ? atoi(sig.p) : 9;
	return (128 + s) & 0xff;
}

int guest_cli(int argc, char **argv)
{
	/* --json is known before anything can fail, so even a usage error is a document. */
	for (int i = 1; i < argc && strcmp(argv[i], "--") != 0; i++)
		if (strcmp(argv[i], "--json") == 0)
			json_mode = 1;
	if (argc < 2 || strcmp(argv[1], "help") == 0 || strcmp(argv[1], "--help") == 0 ||
	    strcmp(argv[1], "-h") == 0) {
		put(1, usage_text);
		return argc < 2 ? 2 : 0;
	}
	const char *cmd = argv[1];
	struct opts o;
	parse(argc - 2, argv + 2, &o);
	if (strcmp(cmd, "new") == 0)
		return cmd_new(&o);
	if (strcmp(cmd, "list") == 0 || strcmp(cmd, "ls") == 0)
		return cmd_list(&o);
	if (strcmp(cmd, "get") == 0)
		return cmd_get(&o);
	if (strcmp(cmd, "exec") == 0)
		return cmd_exec(&o);
	if (strcmp(cmd, "fork") == 0)
		return cmd_fork(&o);
	if (strcmp(cmd, "destroy") == 0 || strcmp(cmd, "rm") == 0)
		return cmd_destroy(&o);
	die(2, "USAGE", "unknown command \"%s\"", cmd);
}
