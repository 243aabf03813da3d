/* Internal interface between the parts of sandbox-listen.o:
 *
 *   sandbox-listen.c    the socket, its thread and connection loop, start / stop,
 *                       fork, the request log and debug output; the lock rules
 *   sandbox-messages.c  one request: parsing each message, calling the engine,
 *                       the reply and its log line
 *   sandbox-wire.c      bounds-checked payload reader, reply writer, frame I/O
 *
 * Hidden, and local to sandbox-listen.o after its relocatable link (agent/Makefile).
 * Everything here runs on the agent thread (sandbox-listen.c, "Locks and fork").
 */
#ifndef PATCHBOX_SANDBOX_SERVER_H
#define PATCHBOX_SANDBOX_SERVER_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/un.h>

#include "sandbox-internal.h"

/* The client on the other end of a connection (SO_PEERCRED; -1 if unknown). */
struct sandbox_peer {
	pid_t pid;
	uid_t uid;
};

/* ---- sandbox-wire.c */

/* Bounds-checked little-endian reader over one payload. The first failure is kept
 * (field name, overrun or trailing bytes) and every later read fails too. */
struct sandbox_reader {
	const uint8_t *p;
	size_t len, pos;
	const char *field;
	int failed;
};

int sandbox_reader_take(struct sandbox_reader *r, const char *field, size_t n, const uint8_t **ret);
int sandbox_reader_uint(struct sandbox_reader *r, const char *field, size_t n, uint64_t *ret);
int sandbox_reader_str(struct sandbox_reader *r, const char *field, const char **s, uint16_t *len);
int sandbox_reader_blob(struct sandbox_reader *r, const char *field, const uint8_t **b, uint32_t *len);
/* -1 if a read failed or bytes are left after the field `last`. */
int sandbox_reader_end(struct sandbox_reader *r, const char *last);
/* Sets err to MALFORMED naming the failure; returns -1. */
int sandbox_reader_error(const struct sandbox_reader *r, struct sandbox_error *err);

#define SANDBOX_READ_UINT(r, field, n, dst) \
	({ uint64_t v_ = 0; int rc_ = sandbox_reader_uint((r), (field), (n), &v_); (dst) = v_; rc_; })

/* Reply writer: grows up to a frame's maximum; on failure (failed) every later put
 * is dropped and the caller answers NO_MEMORY. */
struct sandbox_writer {
	uint8_t *buf;
	size_t len, cap;
	int failed;
};

void sandbox_writer_put(struct sandbox_writer *w, const void *p, size_t n);
void sandbox_writer_uint(struct sandbox_writer *w, uint64_t v, size_t n);
void sandbox_writer_str(struct sandbox_writer *w, const char *s);

/* 1 = all n bytes, 0 = orderly EOF before any byte, -1 = error, timeout or EOF inside. */
int sandbox_recv_full(int fd, void *buf, size_t n);
int sandbox_recv_skip(int fd, size_t n);
/* Error reply built on the stack: works when malloc does not. */
int sandbox_send_error(int fd, unsigned type, uint32_t seq, const struct sandbox_error *err);
/* Sends w, whose first PBX_HEADER_SIZE bytes are filled in with the reply header. */
int sandbox_send_reply(int fd, unsigned type, uint32_t seq, struct sandbox_writer *w);

/* ---- sandbox-messages.c */

/* "INFO", "LIST"...; NULL for a type the agent does not know. */
const char *sandbox_msg_name(unsigned type);
/* Answers one request frame of a known type whose payload has been read; -1 if
 * the reply could not be sent (connection to drop). */
int sandbox_request_serve(int fd, const struct sandbox_peer *peer, unsigned type, uint32_t seq,
			  const uint8_t *payload, size_t len);

/* ---- sandbox-listen.c */

/* Set by start before the agent thread exists, cleared by stop after it is joined:
 * the thread only reads them (INFO). */
extern char sandbox_sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
extern char sandbox_log_path[PATH_MAX];	/* "" = logging off */

/* One log line per request; failures never affect serving and are reported once. */
void sandbox_log_write(const struct sandbox_peer *peer, const char *what, const char *patch,
		       const char *result);

#endif
