#include "proto.h"

#include <stdio.h>
#include <string.h>

static uint32_t get_u32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

uint64_t proto_get_uint(const uint8_t *p, uint32_t size)
{
	uint64_t v = 0;
	for (uint32_t i = 0; i < size; i++)
		v = v << 8 | p[i];
	return v;
}

int proto_payload_kind(uint8_t type)
{
	switch (type) {
	case T_POWEROFF:
	case T_RESET:
	case T_CANCEL:
		return PK_EMPTY;
	case T_PING:
	case T_PONG:
	case T_STDIN:
	case T_STDOUT:
	case T_STDERR:
	case T_DATA:
		return PK_BYTES;
	case T_STARTED:
	case T_CREDIT:
		return PK_U32;
	case T_SIGNAL:
		return PK_U8;
	case T_RESIZE:
		return PK_SIZE;
	case T_EXEC:
	case T_EXIT:
	case T_ERROR:
	case T_FILE_WRITE:
	case T_FILE_READ:
	case T_DONE:
	case T_CONFIGURE:
	case T_HELLO:
	case T_UNSUPPORTED:
	case T_API_OPEN:
	case T_PORT_OPEN:
	case T_DISK_MOUNT:
	case T_DISK_UNMOUNT:
		return PK_TLV;
	default:
		return -1;
	}
}

const char *proto_type_name(uint8_t type)
{
	switch (type) {
	case T_PING: return "PING";
	case T_PONG: return "PONG";
	case T_POWEROFF: return "POWEROFF";
	case T_RESET: return "RESET";
	case T_HELLO: return "HELLO";
	case T_UNSUPPORTED: return "UNSUPPORTED";
	case T_EXEC: return "EXEC";
	case T_STARTED: return "STARTED";
	case T_STDIN: return "STDIN";
	case T_STDOUT: return "STDOUT";
	case T_STDERR: return "STDERR";
	case T_SIGNAL: return "SIGNAL";
	case T_RESIZE: return "RESIZE";
	case T_EXIT: return "EXIT";
	case T_ERROR: return "ERROR";
	case T_CREDIT: return "CREDIT";
	case T_FILE_WRITE: return "FILE_WRITE";
	case T_FILE_READ: return "FILE_READ";
	case T_DATA: return "DATA";
	case T_DONE: return "DONE";
	case T_CANCEL: return "CANCEL";
	case T_CONFIGURE: return "CONFIGURE";
	case T_API_OPEN: return "API_OPEN";
	case T_PORT_OPEN: return "PORT_OPEN";
	case T_DISK_MOUNT: return "DISK_MOUNT";
	case T_DISK_UNMOUNT: return "DISK_UNMOUNT";
	default: return "?";
	}
}

const char *proto_result_name(int r)
{
	switch (r) {
	case PROTO_OK: return "ok";
	case PROTO_NEED_MORE: return "need-more";
	case PROTO_TOO_SMALL: return "too-small";
	case PROTO_TOO_LARGE: return "too-large";
	case PROTO_BAD_TYPE: return "bad-type";
	case PROTO_TRUNCATED: return "truncated";
	case PROTO_BAD_LENGTH: return "bad-length";
	default: return "?";
	}
}

int proto_tag_info(uint8_t type, uint8_t tag, const char **key, uint32_t *size)
{
	static const struct {
		uint8_t type, tag;
		const char *key;
		uint32_t size;
	} tags[] = {
		{T_EXEC, EXEC_ARG, "arg", 0},
		{T_EXEC, EXEC_ENV, "env", 0},
		{T_EXEC, EXEC_CWD, "cwd", 0},
		{T_EXEC, EXEC_PTY, "pty", 4},
		{T_EXEC, EXEC_TIMEOUT, "timeout_ms", 4},
		{T_EXEC, EXEC_STDIN, "stdin", 1},
		{T_EXIT, EXIT_CODE, "code", 4},
		{T_EXIT, EXIT_SIGNAL, "signal", 4},
		{T_EXIT, EXIT_TIMED_OUT, "timed_out", 1},
		{T_ERROR, ERROR_CODE, "code", 0},
		{T_ERROR, ERROR_MESSAGE, "message", 0},
		{T_FILE_WRITE, FW_PATH, "path", 0},
		{T_FILE_WRITE, FW_MODE, "mode", 4},
		{T_FILE_WRITE, FW_MKDIRS, "mkdirs", 1},
		{T_FILE_READ, FR_PATH, "path", 0},
		{T_DONE, DONE_SIZE, "size", 8},
		{T_DONE, DONE_MODE, "mode", 4},
		{T_CONFIGURE, CFG_HOSTNAME, "hostname", 0},
		{T_CONFIGURE, CFG_TIME_NS, "time_ns", 8},
		{T_CONFIGURE, CFG_ENTROPY, "entropy", 0},
		{T_CONFIGURE, CFG_MACHINE_ID, "machine_id", 0},
		{T_CONFIGURE, CFG_VOLUME, "volume", 0},
		{T_CONFIGURE, CFG_GROW_ROOT, "grow_root", 1},
		{T_CONFIGURE, CFG_NET, "net", 0},
		{T_HELLO, HELLO_VERSION, "version", 4},
		{T_HELLO, HELLO_FEATURES, "features", 8},
		{T_UNSUPPORTED, UNSUP_TYPE, "type", 1},
		{T_UNSUPPORTED, UNSUP_STREAM, "stream", 4},
		{T_PORT_OPEN, PORT_PORT, "port", 2},
		{T_DISK_MOUNT, DM_TARGET, "target", 2},
		{T_DISK_MOUNT, DM_PATH, "path", 0},
		{T_DISK_MOUNT, DM_READ_ONLY, "read_only", 1},
		{T_DISK_UNMOUNT, DU_PATH, "path", 0},
		{T_DISK_UNMOUNT, DU_TARGET, "target", 2},
	};
	for (size_t i = 0; i < sizeof tags / sizeof tags[0]; i++) {
		if (tags[i].type == type && tags[i].tag == tag) {
			if (key)
				*key = tags[i].key;
			if (size)
				*size = tags[i].size;
			return 1;
		}
	}
	return 0;
}

int proto_decode(const uint8_t *buf, size_t n, struct proto_frame *f, size_t *frame_len)
{
	if (n < 4)
		return PROTO_NEED_MORE;
	uint32_t len = get_u32(buf);
	if (len < PROTO_MIN_LEN)
		return PROTO_TOO_SMALL;
	if (len > PROTO_MAX_LEN)
		return PROTO_TOO_LARGE;
	if (n < 4 + (size_t)len)
		return PROTO_NEED_MORE;

	f->type = buf[4];
	f->stream = get_u32(buf + 5);
	f->payload = buf + PROTO_HEADER;
	f->payload_len = len - 5;
	f->u32 = 0;
	f->cols = f->rows = 0;
	f->nfields = 0;
	*frame_len = 4 + (size_t)len;
	/* Framed by its length like any other, so the reader can skip it whole. */
	int kind = proto_payload_kind(f->type);
	if (kind < 0)
		return PROTO_BAD_TYPE;

	const uint8_t *p = f->payload;
	uint32_t plen = f->payload_len;
	/* Fixed-size values must be exactly their size (docs/agent-protocol.md): both sides
	 * reject the same frames, so a peer cannot smuggle bytes one side ignores. */
	switch (kind) {
	case PK_EMPTY:
		return plen ? PROTO_BAD_LENGTH : PROTO_OK;
	case PK_BYTES:
		if ((f->type == T_PING || f->type == T_PONG) && plen > 64)
			return PROTO_TOO_LARGE;
		return PROTO_OK;
	case PK_U32:
		if (plen < 4)
			return PROTO_TRUNCATED;
		if (plen > 4)
			return PROTO_BAD_LENGTH;
		f->u32 = get_u32(p);
		return PROTO_OK;
	case PK_U8:
		if (plen < 1)
			return PROTO_TRUNCATED;
		if (plen > 1)
			return PROTO_BAD_LENGTH;
		f->u32 = p[0];
		return PROTO_OK;
	case PK_SIZE:
		if (plen < 4)
			return PROTO_TRUNCATED;
		if (plen > 4)
			return PROTO_BAD_LENGTH;
		f->cols = (uint16_t)(p[0] << 8 | p[1]);
		f->rows = (uint16_t)(p[2] << 8 | p[3]);
		return PROTO_OK;
	}

	uint32_t off = 0;
	while (off < plen) {
		if (plen - off < 5)
			return PROTO_TRUNCATED;
		uint8_t tag = p[off];
		uint32_t vlen = get_u32(p + off + 1);
		off += 5;
		if (vlen > plen - off)
			return PROTO_TRUNCATED;
		uint32_t size;
		if (proto_tag_info(f->type, tag, NULL, &size) && size && vlen != size)
			return vlen < size ? PROTO_TRUNCATED : PROTO_BAD_LENGTH;
		f->fields[f->nfields].tag = tag;
		f->fields[f->nfields].len = vlen;
		f->fields[f->nfields].val = p + off;
		f->nfields++;
		off += vlen;
	}
	return PROTO_OK;
}

static void put_str(struct buf *out, const char *s) { buf_append(out, s, strlen(s)); }

static void put_uint(struct buf *out, uint64_t v)
{
	char tmp[24];
	int n = snprintf(tmp, sizeof tmp, "%llu", (unsigned long long)v);
	buf_append(out, tmp, (size_t)n);
}

static void put_quoted(struct buf *out, const char *key, const uint8_t *p, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	buf_append(out, " ", 1);
	put_str(out, key);
	buf_append(out, "=\"", 2);
	for (size_t i = 0; i < n; i++) {
		uint8_t c = p[i];
		if (c >= 0x20 && c <= 0x7e && c != '"' && c != '\\') {
			buf_append(out, &c, 1);
		} else {
			char e[4] = {'\\', 'x', hex[c >> 4], hex[c & 15]};
			buf_append(out, e, 4);
		}
	}
	buf_append(out, "\"", 1);
}

static void put_kv(struct buf *out, const char *key, uint64_t v)
{
	buf_append(out, " ", 1);
	put_str(out, key);
	buf_append(out, "=", 1);
	put_uint(out, v);
}

void proto_canon(const struct proto_frame *f, struct buf *out)
{
	put_str(out, proto_type_name(f->type));
	put_str(out, " stream=");
	put_uint(out, f->stream);
	switch (proto_payload_kind(f->type)) {
	case PK_EMPTY:
		return;
	case PK_BYTES:
		put_quoted(out, (f->type == T_PING || f->type == T_PONG) ? "nonce" : "data",
			   f->payload, f->payload_len);
		return;
	case PK_U32:
		put_kv(out, f->type == T_STARTED ? "pid" : "bytes", f->u32);
		return;
	case PK_U8:
		put_kv(out, "signal", f->u32);
		return;
	case PK_SIZE:
		put_kv(out, "cols", f->cols);
		put_kv(out, "rows", f->rows);
		return;
	}
	for (size_t i = 0; i < f->nfields; i++) {
		const struct proto_field *fl = &f->fields[i];
		const char *key;
		uint32_t size;
		if (!proto_tag_info(f->type, fl->tag, &key, &size)) {
			put_kv(out, "unknown", fl->tag);
		} else if (size == 0) {
			put_quoted(out, key, fl->val, fl->len);
		} else if (f->type == T_EXEC && fl->tag == EXEC_PTY) {
			put_kv(out, "pty", proto_get_uint(fl->val, 2));
			buf_append(out, "x", 1);
			put_uint(out, proto_get_uint(fl->val + 2, 2));
		} else {
			put_kv(out, key, proto_get_uint(fl->val, size));
		}
	}
}

size_t proto_begin(struct buf *b, uint8_t type, uint32_t stream)
{
	size_t start = buf_size(b);
	proto_put_u32(b, 0);
	proto_put_u8(b, type);
	proto_put_u32(b, stream);
	return start;
}

void proto_end(struct buf *b, size_t start)
{
	uint32_t len = (uint32_t)(buf_size(b) - start - 4);
	uint8_t *p = buf_data(b) + start;
	p[0] = (uint8_t)(len >> 24);
	p[1] = (uint8_t)(len >> 16);
	p[2] = (uint8_t)(len >> 8);
	p[3] = (uint8_t)len;
}

void proto_put_u8(struct buf *b, uint8_t v) { buf_append(b, &v, 1); }

void proto_put_u16(struct buf *b, uint16_t v)
{
	uint8_t p[2] = {(uint8_t)(v >> 8), (uint8_t)v};
	buf_append(b, p, 2);
}

void proto_put_u32(struct buf *b, uint32_t v)
{
	uint8_t p[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
	buf_append(b, p, 4);
}

void proto_put_u64(struct buf *b, uint64_t v)
{
	proto_put_u32(b, (uint32_t)(v >> 32));
	proto_put_u32(b, (uint32_t)v);
}

void proto_tlv_bytes(struct buf *b, uint8_t tag, const void *p, size_t n)
{
	proto_put_u8(b, tag);
	proto_put_u32(b, (uint32_t)n);
	buf_append(b, p, n);
}

void proto_tlv_str(struct buf *b, uint8_t tag, const char *s) { proto_tlv_bytes(b, tag, s, strlen(s)); }

void proto_tlv_u8(struct buf *b, uint8_t tag, uint8_t v)
{
	proto_put_u8(b, tag);
	proto_put_u32(b, 1);
	proto_put_u8(b, v);
}

void proto_tlv_u32(struct buf *b, uint8_t tag, uint32_t v)
{
	proto_put_u8(b, tag);
	proto_put_u32(b, 4);
	proto_put_u32(b, v);
}

void proto_tlv_u64(struct buf *b, uint8_t tag, uint64_t v)
{
	proto_put_u8(b, tag);
	proto_put_u32(b, 8);
	proto_put_u64(b, v);
}

void proto_encode(const struct proto_frame *f, struct buf *out)
{
	size_t start = proto_begin(out, f->type, f->stream);
	switch (proto_payload_kind(f->type)) {
	case PK_EMPTY:
		break;
	case PK_BYTES:
		buf_append(out, f->payload, f->payload_len);
		break;
	case PK_U32:
		proto_put_u32(out, f->u32);
		break;
	case PK_U8:
		proto_put_u8(out, (uint8_t)f->u32);
		break;
	case PK_SIZE:
		proto_put_u16(out, f->cols);
		proto_put_u16(out, f->rows);
		break;
	case PK_TLV:
		for (size_t i = 0; i < f->nfields; i++) {
			const struct proto_field *fl = &f->fields[i];
			uint32_t size;
			if (!proto_tag_info(f->type, fl->tag, NULL, &size) || size == 0) {
				proto_tlv_bytes(out, fl->tag, fl->val, fl->len);
			} else if (f->type == T_EXEC && fl->tag == EXEC_PTY) {
				proto_put_u8(out, fl->tag);
				proto_put_u32(out, 4);
				proto_put_u16(out, (uint16_t)proto_get_uint(fl->val, 2));
				proto_put_u16(out, (uint16_t)proto_get_uint(fl->val + 2, 2));
			} else if (size == 2) {
				proto_put_u8(out, fl->tag);
				proto_put_u32(out, 2);
				proto_put_u16(out, (uint16_t)proto_get_uint(fl->val, 2));
			} else if (size == 1) {
				proto_tlv_u8(out, fl->tag, (uint8_t)proto_get_uint(fl->val, 1));
			} else if (size == 4) {
				proto_tlv_u32(out, fl->tag, (uint32_t)proto_get_uint(fl->val, 4));
			} else {
				proto_tlv_u64(out, fl->tag, proto_get_uint(fl->val, 8));
			}
		}
		break;
	}
	proto_end(out, start);
}
