/* Part of sandbox-listen.o: the wire. A bounds-checked reader over one request
 * payload, a growing reply writer, and the socket I/O of whole frames: receiving
 * n bytes or none, sending a reply or an error reply (docs/protocol.md). Every
 * length from a client is checked here before anything is read.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "sandbox-server.h"

/* ------------------------------------------------------------------ reader / writer */

int sandbox_reader_take(struct sandbox_reader *r, const char *field, size_t n, const uint8_t **ret)
{
	if (r->failed)
		return -1;
	if (n > r->len - r->pos) {
		r->failed = 1;
		r->field = field;
		return -1;
	}
	*ret = r->p + r->pos;
	r->pos += n;
	return 0;
}

int sandbox_reader_uint(struct sandbox_reader *r, const char *field, size_t n, uint64_t *ret)
{
	const uint8_t *b;
	if (sandbox_reader_take(r, field, n, &b) != 0)
		return -1;
	uint64_t v = 0;
	for (size_t i = 0; i < n; i++)
		v |= (uint64_t)b[i] << (8 * i);
	*ret = v;
	return 0;
}

int sandbox_reader_str(struct sandbox_reader *r, const char *field, const char **s, uint16_t *len)
{
	uint64_t n;
	const uint8_t *b;
	if (sandbox_reader_uint(r, field, 2, &n) != 0 || sandbox_reader_take(r, field, n, &b) != 0)
		return -1;
	*s = (const char *)b;
	*len = (uint16_t)n;
	return 0;
}

int sandbox_reader_blob(struct sandbox_reader *r, const char *field, const uint8_t **b, uint32_t *len)
{
	uint64_t n;
	if (sandbox_reader_uint(r, field, 4, &n) != 0 || sandbox_reader_take(r, field, n, b) != 0)
		return -1;
	*len = (uint32_t)n;
	return 0;
}

int sandbox_reader_end(struct sandbox_reader *r, const char *last)
{
	if (!r->failed && r->pos != r->len) {
		r->failed = 2;
		r->field = last;
	}
	return r->failed ? -1 : 0;
}

int sandbox_reader_error(const struct sandbox_reader *r, struct sandbox_error *err)
{
	if (r->failed == 2)
		return sandbox_error_set(err, PBX_E_MALFORMED, "%zu trailing bytes after %s",
					 r->len - r->pos, r->field);
	return sandbox_error_set(err, PBX_E_MALFORMED, "field %s runs past the end of the payload (%zu bytes)",
				 r->field ? r->field : "?", r->len);
}

void sandbox_writer_put(struct sandbox_writer *w, const void *p, size_t n)
{
	if (w->failed)
		return;
	if (n > w->cap - w->len) {
		size_t cap = w->cap ? w->cap : 256;
		while (cap - w->len < n && cap < ((size_t)PBX_MAX_PAYLOAD + PBX_HEADER_SIZE))
			cap *= 2;
		uint8_t *nb = cap - w->len >= n ? realloc(w->buf, cap) : NULL;
		if (!nb) {
			w->failed = 1;
			return;
		}
		w->buf = nb;
		w->cap = cap;
	}
	memcpy(w->buf + w->len, p, n);
	w->len += n;
}

void sandbox_writer_uint(struct sandbox_writer *w, uint64_t v, size_t n)
{
	uint8_t b[8];
	for (size_t i = 0; i < n; i++)
		b[i] = (uint8_t)(v >> (8 * i));
	sandbox_writer_put(w, b, n);
}

void sandbox_writer_str(struct sandbox_writer *w, const char *s)
{
	size_t n = strlen(s);
	if (n > 0xffff)
		n = 0xffff;
	sandbox_writer_uint(w, n, 2);
	sandbox_writer_put(w, s, n);
}

/* ------------------------------------------------------------------ socket I/O */

/* Every read and write of the connection first checks that fd is still it
 * (sandbox_conn_ours): a program that closes every descriptor while a client is
 * served may have reused the number, and its data must not be read or written. */

/* 1 = all n bytes, 0 = orderly EOF before any byte, -1 = error, timeout or EOF inside. */
int sandbox_recv_full(int fd, void *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		if (!sandbox_conn_ours(fd))
			return -1;
		ssize_t r = recv(fd, (uint8_t *)buf + got, n - got, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -1;
		if (r == 0)
			return got == 0 ? 0 : -1;
		got += (size_t)r;
	}
	return 1;
}

int sandbox_recv_skip(int fd, size_t n)
{
	uint8_t buf[4096];
	while (n > 0) {
		size_t k = n < sizeof(buf) ? n : sizeof(buf);
		if (sandbox_recv_full(fd, buf, k) != 1)
			return -1;
		n -= k;
	}
	return 0;
}

static int sandbox_send_full(int fd, const void *buf, size_t n)
{
	size_t done = 0;
	while (done < n) {
		if (!sandbox_conn_ours(fd))
			return -1;
		/* MSG_NOSIGNAL: a vanished client must not SIGPIPE the host. */
		ssize_t w = send(fd, (const uint8_t *)buf + done, n - done, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		done += (size_t)w;
	}
	return 0;
}

/* The frame header is struct pbx_header (wire.h, from wire/constants.toml). */
static void sandbox_header_fill(uint8_t *h, unsigned type, uint32_t seq, uint32_t len)
{
	struct pbx_header hdr = { .magic = PBX_MAGIC, .version = PBX_VERSION,
				  .type = (uint16_t)(type | PBX_REPLY_BIT), .seq = seq, .length = len };
	memcpy(h, &hdr, sizeof(hdr));
}

/* Error reply built on the stack: works when malloc does not. i32 status, str message. */
int sandbox_send_error(int fd, unsigned type, uint32_t seq, const struct sandbox_error *err)
{
	int32_t status = err->code;
	uint16_t sl;
	uint8_t buf[PBX_HEADER_SIZE + sizeof(status) + sizeof(sl) + SANDBOX_ERRMSG];
	size_t n = strnlen(err->msg, SANDBOX_ERRMSG - 1), at = PBX_HEADER_SIZE;
	sl = (uint16_t)n;
	sandbox_header_fill(buf, type, seq, (uint32_t)(sizeof(status) + sizeof(sl) + n));
	memcpy(buf + at, &status, sizeof(status));
	at += sizeof(status);
	memcpy(buf + at, &sl, sizeof(sl));
	at += sizeof(sl);
	memcpy(buf + at, err->msg, n);
	return sandbox_send_full(fd, buf, at + n);
}

int sandbox_send_reply(int fd, unsigned type, uint32_t seq, struct sandbox_writer *w)
{
	sandbox_header_fill(w->buf, type, seq, (uint32_t)(w->len - PBX_HEADER_SIZE));
	return sandbox_send_full(fd, w->buf, w->len);
}
