/* Internal interface between the parts of sandbox-listen.o:
 *
 *   sandbox-listen.c    the agent thread and connection loop, start / stop, fork,
 *                       the request log and debug output; the lock rules
 *   sandbox-sock.c      the socket file (directory, binding, stale sweep) and the
 *                       agent's descriptors (moved high, identity-checked)
 *   sandbox-messages.c  one request: parsing each message, calling the engine,
 *                       the reply and its log line
 *   sandbox-wire.c      bounds-checked payload reader, reply writer, frame I/O
 *   sandbox-store.c     the patches installed for this build, applied at start
 *   sandbox-trust.c     who may change this process's code; whose environment counts
 *
 * Hidden, and local to sandbox-listen.o after its relocatable link (agent/Makefile).
 * Everything here runs on the agent thread (sandbox-listen.c, "Locks and fork").
 */
#ifndef PATCHBOX_SANDBOX_SERVER_H
#define PATCHBOX_SANDBOX_SERVER_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>

#include "sandbox-internal.h"

/* The client on the other end of a connection (SO_PEERCRED; -1 if unknown). */
struct sandbox_peer {
	pid_t pid;
	uid_t uid;
	gid_t gid;
	int pidfd;	/* SO_PEERPIDFD, -1 where the kernel has none */
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

/* Parses an apply body (as APPLY carries it) and applies it; the patch name read so
 * far goes to name. 0, or -1 with err. For the store (sandbox-store.c). */
int sandbox_body_apply(const uint8_t *body, size_t len, char *name, size_t name_cap,
		       struct sandbox_error *err);

/* ---- sandbox-store.c */

/* Applies the patches installed in the store for this executable's build, in install
 * order, logging each (docs/host.md "The patch store"). Before the agent thread serves. */
void sandbox_store_apply(void);

/* ---- sandbox-trust.c (docs/security.md) */

/* 1 if this process runs with raised privileges: AT_SECURE (setuid, setgid, file
 * capabilities) or real and effective ids that differ. Its environment is then the
 * caller's: every PATCHBOX_* variable is ignored. */
int sandbox_privileged(void);
/* getenv(name), or NULL in a privileged process. */
const char *sandbox_getenv(const char *name);
/* The peer of connection fd (SO_PEERCRED, SO_PEERPIDFD); 0 or -errno. */
int sandbox_peer_creds(int fd, struct sandbox_peer *ret);
/* Closes the peer's pidfd. */
void sandbox_peer_release(struct sandbox_peer *peer);
/* 0 if peer may change this process's code: the kernel would let it ptrace this
 * process. Else -1, the reason in why. */
int sandbox_peer_admit(const struct sandbox_peer *peer, char *why, size_t cap);
/* Opens absolute path (O_PATH) one component at a time from /, never through a
 * link (openat O_NOFOLLOW), each checked with fstat: owned by root or the effective
 * uid (root only: root_only), writable by group or others only if sticky (the last
 * directory only if final_sticky_ok). Whatever can rename or replace a component
 * could redirect what the agent does there; this proves nobody but root or this
 * process's user can. The descriptor, or -errno with the reason in why (-ENOENT: a
 * component does not exist; -ELOOP/-ENOTDIR: a link; -EPERM: untrusted). */
int sandbox_dir_walk(const char *path, int final_sticky_ok, int root_only, char *why, size_t cap);

/* ---- sandbox-sock.c */

/* A descriptor of the agent and what it referred to when the agent made it. */
struct sandbox_fd {
	int fd;			/* -1: none */
	dev_t dev;
	ino_t ino;
};

/* Takes fd, the result of the call just made (-1: -errno of that call), as the
 * agent's: moved to a high number (high != 0), identity recorded. */
int sandbox_fd_own(struct sandbox_fd *f, int fd, int high);
/* 1 if f still refers to what the agent made (the program may have closed it). */
int sandbox_fd_ours(const struct sandbox_fd *f);
/* Closes f if it is still ours; forgets it either way. Async-signal-safe. */
void sandbox_fd_close(struct sandbox_fd *f);

/* The socket: its directory, name, the address bound and the listening socket. */
struct sandbox_sock {
	char dir[PATH_MAX];	/* the directory, absolute (from /proc/self/fd) */
	struct sandbox_fd dirfd;	/* O_PATH */
	char name[32];		/* sandbox-sock<pid> */
	char addr[sizeof(((struct sockaddr_un *)0)->sun_path)];	/* as bound */
	struct sandbox_fd lfd;	/* listening */
	int bound;		/* dir/name is this agent's file */
	char why[256];		/* why the directory or a file in it was refused, "" if not */
	int quiet;		/* nothing changed in the directory for a while before the bind */
	int abstract;		/* bound in the abstract namespace (addr "@patchbox/..."), no file */
};

/* Opens dir (O_PATH) as the socket directory; s->dirfd must be none (or forgotten).
 * A directory others could write (sandbox_dir_trusted) is refused: -EPERM, s->why. */
int sandbox_sock_dir_open(struct sandbox_sock *s, const char *dir);
/* Creates or opens name in the socket directory for appending, as ret (high): never
 * through a link, never a file of another owner, a hard link or writable by others
 * (a planted one at our name is removed and the file created anew). 0 or -errno,
 * s->why saying what was wrong. */
int sandbox_sock_file_open(struct sandbox_sock *s, const char *name, struct sandbox_fd *ret);
/* Binds and listens on sandbox-sock<pid>, replacing a stale file, mode 0600; sets
 * quiet if the directory had not changed for SANDBOX_SWEEP_QUIET_S before. */
int sandbox_sock_bind(struct sandbox_sock *s, pid_t pid);
/* Binds and listens on the abstract address @patchbox/sandbox-sock<pid> (no file):
 * where the directory refuses this process (a worker that dropped privileges, a
 * directory it may not trust). Who is served is the peer rule's alone. 0 or -errno. */
int sandbox_sock_bind_abstract(struct sandbox_sock *s, pid_t pid);
/* 0 if the socket is bound and both descriptors are ours (the directory's reopened
 * if that suffices), -1 if it must be bound anew. */
int sandbox_sock_check(struct sandbox_sock *s);
/* Removes the file if this agent bound it (the listening socket stays open). */
void sandbox_sock_unbind(struct sandbox_sock *s);
/* dir/name into ret; -ENAMETOOLONG if it does not fit. */
int sandbox_sock_path_get(const struct sandbox_sock *s, const char *name, char *ret, size_t len);
/* Removes stale sockets of other pids in the directory; returns how many. */
int sandbox_sock_sweep(const struct sandbox_sock *s, pid_t self);
/* The same for the one name of pid (and its log): a forked child's parent's. */
int sandbox_sock_sweep_pid(const struct sandbox_sock *s, pid_t pid, pid_t self);

/* ---- sandbox-listen.c */

/* The socket's real path (INFO socket) and the log's: written by start and by the
 * agent thread when it binds, read by the thread (INFO); "" when none. */
extern char sandbox_sock_path[PATH_MAX];
extern char sandbox_log_path[PATH_MAX];	/* "" = logging off */

/* 1 if fd is still the connection being served (checked before each read and write
 * of it: a program may close every descriptor while a client is served). */
int sandbox_conn_ours(int fd);

/* One log line per request; failures never affect serving and are reported once. */
void sandbox_log_write(const struct sandbox_peer *peer, const char *what, const char *patch,
		       const char *result);

#endif
