#include "json.h"

#include <string.h>

static const char *ws(const char *p, const char *end)
{
	while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return p;
}

static const char *skip_string(const char *p, const char *end)
{
	for (p++; p < end; p++) {
		if (*p == '\\')
			p++;
		else if (*p == '"')
			return p + 1;
	}
	return NULL;
}

const char *json_skip(const char *p, const char *end)
{
	p = ws(p, end);
	if (p >= end)
		return NULL;
	if (*p == '"')
		return skip_string(p, end);
	if (*p != '{' && *p != '[') {
		/* A number or a literal: up to the next delimiter. */
		const char *q = p;
		while (q < end && !strchr(",]} \t\r\n", *q))
			q++;
		return q > p ? q : NULL;
	}
	/* An object or an array: count brackets, strings skipped whole (they may hold any). */
	int depth = 0;
	while (p < end) {
		if (*p == '"') {
			p = skip_string(p, end);
			if (!p)
				return NULL;
			continue;
		}
		if (*p == '{' || *p == '[')
			depth++;
		else if ((*p == '}' || *p == ']') && --depth == 0)
			return p + 1;
		p++;
	}
	return NULL;
}

int json_get(struct json_span obj, const char *key, struct json_span *out)
{
	const char *end = obj.p + obj.n;
	const char *p = ws(obj.p, end);
	size_t klen = strlen(key);
	if (p >= end || *p != '{')
		return -1;
	p++;
	for (;;) {
		p = ws(p, end);
		if (p >= end || *p != '"')
			return -1;
		const char *k = p;
		p = skip_string(p, end);
		if (!p)
			return -1;
		/* Keys the daemon sends have no escapes: compare the raw text. */
		int match = (size_t)(p - k) == klen + 2 && memcmp(k + 1, key, klen) == 0;
		p = ws(p, end);
		if (p >= end || *p != ':')
			return -1;
		const char *v = ws(p + 1, end);
		const char *ve = json_skip(v, end);
		if (!ve)
			return -1;
		if (match) {
			out->p = v;
			out->n = (size_t)(ve - v);
			return 0;
		}
		p = ws(ve, end);
		if (p >= end || *p != ',')
			return -1;
		p++;
	}
}

int json_next(struct json_span arr, size_t *at, struct json_span *out)
{
	const char *end = arr.p + arr.n;
	const char *p = arr.p + *at;
	if (*at == 0) {
		p = ws(p, end);
		if (p >= end || *p != '[')
			return -1;
		p++;
	} else {
		p = ws(p, end);
		if (p >= end || *p != ',')
			return -1;
		p++;
	}
	p = ws(p, end);
	if (p >= end || *p == ']')
		return -1;
	const char *e = json_skip(p, end);
	if (!e)
		return -1;
	out->p = p;
	out->n = (size_t)(e - p);
	*at = (size_t)(e - arr.p);
	return 0;
}

static int hex4(const char *p, unsigned *v)
{
	*v = 0;
	for (int i = 0; i < 4; i++) {
		char c = p[i];
		unsigned d = c >= '0' && c <= '9' ? (unsigned)(c - '0')
			     : c >= 'a' && c <= 'f' ? (unsigned)(c - 'a' + 10)
			     : c >= 'A' && c <= 'F' ? (unsigned)(c - 'A' + 10)
						    : 16u;
		if (d > 15)
			return -1;
		*v = *v << 4 | d;
	}
	return 0;
}

static void put_utf8(struct buf *out, unsigned cp)
{
	uint8_t b[4];
	size_t n;
	if (cp < 0x80) {
		b[0] = (uint8_t)cp;
		n = 1;
	} else if (cp < 0x800) {
		b[0] = (uint8_t)(0xc0 | cp >> 6);
		b[1] = (uint8_t)(0x80 | (cp & 0x3f));
		n = 2;
	} else if (cp < 0x10000) {
		b[0] = (uint8_t)(0xe0 | cp >> 12);
		b[1] = (uint8_t)(0x80 | (cp >> 6 & 0x3f));
		b[2] = (uint8_t)(0x80 | (cp & 0x3f));
		n = 3;
	} else {
		b[0] = (uint8_t)(0xf0 | cp >> 18);
		b[1] = (uint8_t)(0x80 | (cp >> 12 & 0x3f));
		b[2] = (uint8_t)(0x80 | (cp >> 6 & 0x3f));
		b[3] = (uint8_t)(0x80 | (cp & 0x3f));
		n = 4;
	}
	buf_append(out, b, n);
}

int json_unescape(struct json_span v, struct buf *out)
{
	if (v.n < 2 || v.p[0] != '"' || v.p[v.n - 1] != '"')
		return -1;
	const char *p = v.p + 1, *end = v.p + v.n - 1;
	while (p < end) {
		const char *q = p;
		while (q < end && *q != '\\')
			q++;
		buf_append(out, p, (size_t)(q - p));
		if (q >= end)
			break;
		if (q + 1 >= end)
			return -1;
		char c = q[1];
		p = q + 2;
		switch (c) {
		case 'n': buf_append(out, "\n", 1); break;
		case 't': buf_append(out, "\t", 1); break;
		case 'r': buf_append(out, "\r", 1); break;
		case 'b': buf_append(out, "\b", 1); break;
		case 'f': buf_append(out, "\f", 1); break;
		case 'u': {
			unsigned cp, lo;
			if (end - p < 4 || hex4(p, &cp) < 0)
				return -1;
			p += 4;
			/* A surrogate pair is one code point; a lone surrogate becomes U+FFFD. */
			if (cp >= 0xd800 && cp < 0xdc00 && end - p >= 6 && p[0] == '\\' && p[1] == 'u' &&
			    hex4(p + 2, &lo) == 0 && lo >= 0xdc00 && lo < 0xe000) {
				cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
				p += 6;
			} else if (cp >= 0xd800 && cp < 0xe000) {
				cp = 0xfffd;
			}
			put_utf8(out, cp);
			break;
		}
		default: buf_append(out, &c, 1); break; /* \" \\ \/ */
		}
	}
	return 0;
}

void json_quote(struct buf *out, const char *s, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	buf_append(out, "\"", 1);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\') {
			char e[2] = {'\\', (char)c};
			buf_append(out, e, 2);
		} else if (c < 0x20) {
			char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
			buf_append(out, e, 6);
		} else {
			buf_append(out, &c, 1);
		}
	}
	buf_append(out, "\"", 1);
}
