/* Growable byte queue: bytes live in p[head..len). Consuming from the front only moves
 * `head`; the storage is compacted lazily so that a busy queue does not memmove on every
 * partial write. */
#ifndef HUTCH_BUF_H
#define HUTCH_BUF_H

#include <stddef.h>
#include <stdint.h>

struct buf {
	uint8_t *p;
	size_t head;
	size_t len;
	size_t cap;
};

static inline size_t buf_size(const struct buf *b) { return b->len - b->head; }
static inline uint8_t *buf_data(const struct buf *b) { return b->p + b->head; }

/* Makes room for n more bytes at the end and returns where they go. Aborts on OOM: the
 * agent bounds every queue, so running out of memory means the guest is unusable anyway. */
uint8_t *buf_reserve(struct buf *b, size_t n);
void buf_append(struct buf *b, const void *data, size_t n);
void buf_consume(struct buf *b, size_t n);
/* Keeps only the first n queued bytes. */
void buf_truncate(struct buf *b, size_t n);
void buf_clear(struct buf *b);
void buf_free(struct buf *b);

#endif
