/* Just enough JSON for the guest CLI (guestcli.c). The daemon's answers are printed as they
 * came, or spliced, never rebuilt: the CLI finds a value by walking the text and keeps the
 * span of bytes it occupies. */
#ifndef HUTCH_JSON_H
#define HUTCH_JSON_H

#include <stddef.h>

#include "buf.h"

/* The text of one value: a string with its quotes, a number, an object with its braces… */
struct json_span {
	const char *p;
	size_t n;
};

/* Skips the value at p (whitespace before it too); returns where it ends, NULL if malformed. */
const char *json_skip(const char *p, const char *end);

/* The value of `key` in the object whose text is obj. Returns 0, or -1 when obj is not an
 * object or has no such member. */
int json_get(struct json_span obj, const char *key, struct json_span *out);

/* The array's elements one by one: *at starts at 0; returns 0 with the next element, -1 at
 * the end or on malformed text. */
int json_next(struct json_span arr, size_t *at, struct json_span *out);

/* A string value's bytes (its escapes decoded, \u as UTF-8) appended to out; -1 if v is not
 * a string. */
int json_unescape(struct json_span v, struct buf *out);

/* Appends bytes as a JSON string literal (quotes included). */
void json_quote(struct buf *out, const char *s, size_t n);

#endif
