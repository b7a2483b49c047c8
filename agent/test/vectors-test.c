/* Checks every line of spec/agent-protocol-vectors.txt against the agent's codec: valid
 * frames must decode to the exact canonical text and re-encode to the exact bytes; invalid
 * ones must fail with the named error kind. Also feeds prefixes of each vector to make sure
 * the incremental decoder never accepts or rejects too early. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../src/proto.h"

static struct proto_field fields[PROTO_MAX_FIELDS];
static int passed, failed;

static int hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

static void fail(const char *name, const char *why)
{
	printf("FAIL %s: %s\n", name, why);
	failed++;
}

/* Error kinds that are provable from a prefix must already show on that prefix; otherwise a
 * prefix must ask for more bytes. */
static int check_prefixes(const uint8_t *b, size_t n, int expect)
{
	struct proto_frame f = {.fields = fields};
	size_t flen;
	size_t step = n > 4096 ? n / 512 : 1;
	for (size_t k = 0; k < n; k += step) {
		int r = proto_decode(b, k, &f, &flen);
		if (r == PROTO_OK)
			return 0;
		if (r != PROTO_NEED_MORE && r != expect)
			return 0;
		if (expect == PROTO_OK && r != PROTO_NEED_MORE)
			return 0;
	}
	return 1;
}

int main(int argc, char **argv)
{
	const char *path = argc > 1 ? argv[1] : "../spec/agent-protocol-vectors.txt";
	FILE *fp = fopen(path, "r");
	if (!fp) {
		perror(path);
		return 2;
	}
	char *line = NULL;
	size_t cap = 0;
	ssize_t got;
	struct buf canon = {0}, enc = {0};
	while ((got = getline(&line, &cap, fp)) > 0) {
		if (line[got - 1] == '\n')
			line[--got] = 0;
		if (got == 0 || line[0] == '#')
			continue;
		char *name = line;
		char *hex = strchr(name, '\t');
		char *text = hex ? strchr(hex + 1, '\t') : NULL;
		if (!text) {
			fail(name, "malformed vector line");
			continue;
		}
		*hex++ = 0;
		*text++ = 0;
		size_t hlen = strlen(hex);
		if (hlen % 2) {
			fail(name, "odd hex length");
			continue;
		}
		uint8_t *bytes = malloc(hlen / 2 + 1);
		int badhex = 0;
		for (size_t i = 0; i < hlen / 2; i++) {
			int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
			if (hi < 0 || lo < 0)
				badhex = 1;
			bytes[i] = (uint8_t)(hi << 4 | lo);
		}
		if (badhex) {
			fail(name, "bad hex (must be lower-case)");
			free(bytes);
			continue;
		}
		size_t n = hlen / 2, flen = 0;
		struct proto_frame f = {.fields = fields};
		int r = proto_decode(bytes, n, &f, &flen);
		if (name[0] == '!') {
			if (r != PROTO_NEED_MORE && strcmp(proto_result_name(r), text) == 0 &&
			    check_prefixes(bytes, n, r)) {
				passed++;
			} else {
				char why[128];
				snprintf(why, sizeof why, "expected %s, got %s", text, proto_result_name(r));
				fail(name, why);
			}
		} else if (r != PROTO_OK) {
			char why[128];
			snprintf(why, sizeof why, "expected a valid frame, got %s", proto_result_name(r));
			fail(name, why);
		} else if (flen != n) {
			fail(name, "frame length differs from the vector length");
		} else {
			buf_clear(&canon);
			proto_canon(&f, &canon);
			buf_clear(&enc);
			proto_encode(&f, &enc);
			if (buf_size(&canon) != strlen(text) || memcmp(buf_data(&canon), text, strlen(text))) {
				buf_append(&canon, "", 1);
				printf("  want: %.300s\n  got:  %.300s\n", text, (char *)buf_data(&canon));
				fail(name, "canonical text differs");
			} else if (buf_size(&enc) != n || memcmp(buf_data(&enc), bytes, n)) {
				fail(name, "re-encoded bytes differ");
			} else if (!check_prefixes(bytes, n, PROTO_OK)) {
				fail(name, "a prefix of the frame was not reported as incomplete");
			} else {
				passed++;
			}
		}
		free(bytes);
	}
	free(line);
	fclose(fp);
	buf_free(&canon);
	buf_free(&enc);
	printf("vectors: %d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
