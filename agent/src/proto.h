/* Frame and TLV codec for the host <-> agent protocol (docs/agent-protocol.md), plus the
 * canonical text used by spec/agent-protocol-vectors.txt. Pure functions over byte
 * buffers: no I/O, so the vector test exercises exactly what the agent runs. */
#ifndef HUTCH_PROTO_H
#define HUTCH_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

#define PROTO_HEADER 9u /* len u32 + type u8 + stream u32 */
#define PROTO_MAX_PAYLOAD 65536u
#define PROTO_MIN_LEN 5u
#define PROTO_MAX_LEN (5u + PROTO_MAX_PAYLOAD)
#define PROTO_MAX_FRAME (4u + PROTO_MAX_LEN)
#define PROTO_WINDOW 262144u
#define PROTO_MAX_NONCE 64u
/* Every TLV field takes at least 5 bytes, so this bounds the fields of any payload. */
#define PROTO_MAX_FIELDS (PROTO_MAX_PAYLOAD / 5u + 1u)

enum proto_type {
	T_PING = 0x01,
	T_PONG = 0x02,
	T_POWEROFF = 0x03,
	T_RESET = 0x04,
	T_HELLO = 0x06,
	T_UNSUPPORTED = 0x07,
	T_EXEC = 0x10,
	T_STARTED = 0x11,
	T_STDIN = 0x12,
	T_STDOUT = 0x13,
	T_STDERR = 0x14,
	T_SIGNAL = 0x15,
	T_RESIZE = 0x16,
	T_EXIT = 0x17,
	T_ERROR = 0x18,
	T_CREDIT = 0x19,
	T_FILE_WRITE = 0x20,
	T_FILE_READ = 0x21,
	T_DATA = 0x22,
	T_DONE = 0x23,
	T_CANCEL = 0x24,
	T_CONFIGURE = 0x25,
	T_API_OPEN = 0x28,
	T_PORT_OPEN = 0x29,
	T_DISK_MOUNT = 0x2A,
	T_DISK_UNMOUNT = 0x2B,
};

/* TLV tags, named per frame type. */
enum {
	EXEC_ARG = 1, EXEC_ENV = 2, EXEC_CWD = 3, EXEC_PTY = 4, EXEC_TIMEOUT = 5, EXEC_STDIN = 6,
	EXIT_CODE = 1, EXIT_SIGNAL = 2, EXIT_TIMED_OUT = 3,
	ERROR_CODE = 1, ERROR_MESSAGE = 2,
	FW_PATH = 1, FW_MODE = 2, FW_MKDIRS = 3,
	FR_PATH = 1,
	DONE_SIZE = 1, DONE_MODE = 2,
	CFG_HOSTNAME = 1, CFG_TIME_NS = 2, CFG_ENTROPY = 3, CFG_MACHINE_ID = 4, CFG_VOLUME = 5,
	CFG_GROW_ROOT = 6, CFG_NET = 7,
	HELLO_VERSION = 1, HELLO_FEATURES = 2,
	UNSUP_TYPE = 1, UNSUP_STREAM = 2,
	PORT_PORT = 1,
	DM_TARGET = 1, DM_PATH = 2, DM_READ_ONLY = 3,
	DU_PATH = 1, DU_TARGET = 2,
};

/* Protocol version and feature bits (docs/agent-protocol.md, "Versions and features"); the
 * host's copy is src/guest/protocol.ts. Bits are never reused. */
#define PROTO_VERSION 3u
#define FEAT_EXEC (1ull << 0)
#define FEAT_FILES (1ull << 1)
#define FEAT_RESET (1ull << 2)
#define FEAT_CONFIGURE (1ull << 3)
#define FEAT_CONFIGURE_VOLUMES (1ull << 4)
#define FEAT_CONFIGURE_GROW_ROOT (1ull << 5)
#define FEAT_UNSUPPORTED (1ull << 6)
#define FEAT_GUEST_API (1ull << 7)
#define FEAT_PORT_FORWARD (1ull << 8)
#define FEAT_NET (1ull << 9)
#define FEAT_DISKS (1ull << 10)
#define AGENT_FEATURES                                                                        \
	(FEAT_EXEC | FEAT_FILES | FEAT_RESET | FEAT_CONFIGURE | FEAT_CONFIGURE_VOLUMES |        \
	 FEAT_CONFIGURE_GROW_ROOT | FEAT_UNSUPPORTED | FEAT_GUEST_API | FEAT_PORT_FORWARD |      \
	 FEAT_NET | FEAT_DISKS)

/* Streams the agent opens (API_OPEN) have this bit set in their id, the host's never: the
 * two sides allocate ids without coordinating and can never collide. */
#define PROTO_AGENT_STREAM 0x80000000u

enum proto_result {
	PROTO_OK = 0,
	PROTO_NEED_MORE, /* not an error: the frame is not complete yet */
	PROTO_TOO_SMALL,
	PROTO_TOO_LARGE,
	PROTO_BAD_TYPE,
	PROTO_TRUNCATED,
	PROTO_BAD_LENGTH,
};

struct proto_field {
	uint8_t tag;
	uint32_t len;
	const uint8_t *val;
};

/* A decoded frame. Pointers refer into the decoded buffer; nothing is copied. */
struct proto_frame {
	uint8_t type;
	uint32_t stream;
	const uint8_t *payload;
	uint32_t payload_len;
	/* Fixed-size payloads: STARTED pid / CREDIT bytes in u32, SIGNAL in u32 too. */
	uint32_t u32;
	uint16_t cols, rows; /* RESIZE */
	/* TLV payloads; `fields` must point at PROTO_MAX_FIELDS entries. */
	struct proto_field *fields;
	size_t nfields;
};

enum proto_payload_kind { PK_EMPTY, PK_BYTES, PK_U32, PK_U8, PK_SIZE, PK_TLV };

/* Returns the payload kind of a known type, or -1 for an unknown one. */
int proto_payload_kind(uint8_t type);
const char *proto_type_name(uint8_t type);
const char *proto_result_name(int r);

/* A known TLV tag of `type`: its key for the canonical text and the exact size of its value
 * (0 = variable-length bytes). Returns 0 for an unknown tag. `*size` 4 for "pty" means
 * two u16. */
int proto_tag_info(uint8_t type, uint8_t tag, const char **key, uint32_t *size);

/* Decodes the frame at the start of buf[0..n). On PROTO_OK, *frame_len is its length
 * including the len field. Length errors are reported as soon as the 4 length bytes are in,
 * so a bogus len is rejected before its payload arrives. An unknown type is PROTO_BAD_TYPE
 * once the whole frame is in, with f->type, f->stream and *frame_len set: the reader skips
 * the frame and answers UNSUPPORTED. */
int proto_decode(const uint8_t *buf, size_t n, struct proto_frame *f, size_t *frame_len);

/* Reads a fixed-size big-endian value of 1, 2, 4 or 8 bytes. */
uint64_t proto_get_uint(const uint8_t *p, uint32_t size);

/* Appends the canonical text of f to out (no trailing newline, no NUL). */
void proto_canon(const struct proto_frame *f, struct buf *out);

/* Frame building: begin, append payload pieces, end (which patches len). Callers keep
 * payloads within PROTO_MAX_PAYLOAD. */
size_t proto_begin(struct buf *b, uint8_t type, uint32_t stream);
void proto_end(struct buf *b, size_t start);
void proto_put_u8(struct buf *b, uint8_t v);
void proto_put_u16(struct buf *b, uint16_t v);
void proto_put_u32(struct buf *b, uint32_t v);
void proto_put_u64(struct buf *b, uint64_t v);
void proto_tlv_bytes(struct buf *b, uint8_t tag, const void *p, size_t n);
void proto_tlv_str(struct buf *b, uint8_t tag, const char *s);
void proto_tlv_u8(struct buf *b, uint8_t tag, uint8_t v);
void proto_tlv_u32(struct buf *b, uint8_t tag, uint32_t v);
void proto_tlv_u64(struct buf *b, uint8_t tag, uint64_t v);

/* Re-encodes a decoded frame from its typed values (the vector test's round trip). */
void proto_encode(const struct proto_frame *f, struct buf *out);

#endif
