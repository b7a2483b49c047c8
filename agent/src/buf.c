#include "buf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

uint8_t *buf_reserve(struct buf *b, size_t n)
{
	if (b->cap - b->len >= n)
		return b->p + b->len;
	/* Reclaim the consumed prefix before growing. */
	if (b->head > 0) {
		memmove(b->p, b->p + b->head, b->len - b->head);
		b->len -= b->head;
		b->head = 0;
		if (b->cap - b->len >= n)
			return b->p + b->len;
	}
	size_t cap = b->cap ? b->cap : 4096;
	while (cap - b->len < n)
		cap *= 2;
	uint8_t *p = realloc(b->p, cap);
	if (!p) {
		fputs("hutch-agent: out of memory\n", stderr);
		abort();
	}
	b->p = p;
	b->cap = cap;
	return b->p + b->len;
}

void buf_append(struct buf *b, const void *data, size_t n)
{
	if (n == 0)
		return;
	memcpy(buf_reserve(b, n), data, n);
	b->len += n;
}

void buf_consume(struct buf *b, size_t n)
{
	b->head += n;
	if (b->head >= b->len)
		b->head = b->len = 0;
}

void buf_truncate(struct buf *b, size_t n)
{
	if (n < buf_size(b))
		b->len = b->head + n;
}

void buf_clear(struct buf *b) { b->head = b->len = 0; }

void buf_free(struct buf *b)
{
	free(b->p);
	b->p = NULL;
	b->head = b->len = b->cap = 0;
}
