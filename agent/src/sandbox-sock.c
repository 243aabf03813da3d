/* Part of sandbox-listen.o: the socket file and the agent's descriptors.
 *
 * Where the socket lies (docs/protocol.md, "Socket and discovery"): the directory
 * (PATCHBOX_SOCK_DIR, else the executable's) is opened once as an O_PATH
 * descriptor, and sandbox-sock<pid> is bound by its full path when that fits in
 * sun_path (107 bytes), else as /proc/self/fd/<dirfd>/sandbox-sock<pid>, which
 * Linux resolves through the descriptor: the file is created in the directory
 * whatever the length of its path. /proc/net/unix lists the address as bound,
 * with the socket's inode; that is what the client reads to find it.
 *
 * Descriptors: every descriptor the agent keeps (the directory, the listening
 * socket, the connection being served, the log) is moved to a high number
 * (sandbox_fd_own) and its identity (st_dev, st_ino) remembered. A program that
 * closes every descriptor (a daemon) or reuses a number must never make the agent
 * accept on, read, write or close a descriptor that is not its own any more:
 * sandbox_fd_ours() is checked before each use, sandbox_fd_close() closes only
 * what is still ours (fstat and close: async-signal-safe, usable in a fork child).
 * Short-lived descriptors (a probe, the directory listing of a sweep) are checked
 * the same way before they are closed.
 *
 * Stale sockets: sandbox-sock<N> files left by processes killed before their
 * destructor ran. sandbox_sock_sweep removes one only when all of these hold: no
 * process N exists (kill(N, 0) fails with ESRCH), the file is a socket owned by this
 * agent's effective uid, a connect() to it is refused (nobody listens), and, checked
 * again after that probe, process N still does not exist and the name still is the
 * file probed (a process that took pid N meanwhile binds only after it exists). A
 * live agent passes none of these. Its log sandbox-sock<N>.log goes too when it is
 * empty (the agent opens its log as it starts serving, so a process never asked
 * anything leaves an empty one); a log with lines is never touched.
 *
 * Only a quiet directory is swept: one whose mtime (an entry added or removed) is
 * older than SANDBOX_SWEEP_QUIET_S when the agent binds. Thousands of agents starting
 * together (a fleet, a fork-heavy server) would each read and probe every entry, a
 * quadratic storm; within such a burst the directory is never quiet, so only the first
 * agent sweeps, and stale files left meanwhile go at the next quiet start (or with
 * `patchbox ps`, which sweeps from Python). A forked child's agent always looks at
 * its parent's name (sandbox_sock_sweep_pid): a daemon whose first process exits
 * without its destructor (glibc's daemon() calls _exit) leaves that one file, and its
 * child binds within a fraction of a second, before the directory is quiet.
 *
 * The abstract fallback: where the directory refuses the process (a worker that
 * dropped to a user who may not write the root-owned directory; a directory it may not
 * trust), the agent listens on @patchbox/sandbox-sock<pid> in the abstract namespace
 * instead: no file, nothing to plant or sweep; anyone in the network namespace may
 * connect, and the peer rule (sandbox-trust.c) alone decides who is served. After a
 * credential change the process is not dumpable: root only.
 *
 * Files in the directory (docs/security.md, "The socket directory"): the directory
 * must be owned by root or the effective uid and writable by nobody else unless it is
 * sticky (sandbox_dir_trusted): then nobody but its owner (trusted) can replace what
 * the agent made, and in a sticky one nobody can replace a file of ours. Every file is
 * reached through the directory's descriptor, never followed through a link: the log
 * is opened with O_NOFOLLOW and checked (a regular file of ours, one link, not
 * writable by others); the socket's mode is set on an O_PATH descriptor of the very
 * file checked to be our socket; a planted link or file at our own name is removed.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <stddef.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "sandbox-server.h"

#define SANDBOX_FD_SPAN 32		/* numbers kept free below the high limit for the agent */
#define SANDBOX_SWEEP_MAX 4096		/* directory entries examined by one sweep */
#define SANDBOX_SOCK_PREFIX "sandbox-sock"
#define SANDBOX_ABSTRACT_PREFIX "patchbox/"	/* @patchbox/sandbox-sock<pid> */
#define SANDBOX_SWEEP_QUIET_S 2		/* a directory changed more recently is not swept */

/* ------------------------------------------------------------------ descriptors */

/* Lowest number for the agent's descriptors: SPAN below the descriptor limit,
 * capped at 1024 (a descriptor at a million would make the kernel size the
 * program's descriptor table for it), half the limit when that is small. */
static int sandbox_fd_base(void)
{
	struct rlimit rl;
	rlim_t cap = 1024;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < cap)
		cap = rl.rlim_cur;
	return cap >= 4 * SANDBOX_FD_SPAN ? (int)cap - SANDBOX_FD_SPAN : (int)cap / 2;
}

int sandbox_fd_own(struct sandbox_fd *f, int fd, int high)
{
	f->fd = -1;
	if (fd < 0)	/* fd is the result of the call just made: errno is its reason */
		return errno ? -errno : -EBADF;
	int base = high ? sandbox_fd_base() : 0;
	if (fd < base) {
		int moved = fcntl(fd, F_DUPFD_CLOEXEC, base);
		if (moved >= 0) {
			close(fd);	/* made a moment ago, ours */
			fd = moved;
		}	/* else keep the low number (small limit): its identity still guards it */
	}
	struct stat st;
	if (fstat(fd, &st) != 0) {
		int e = errno;
		close(fd);
		return -e;
	}
	f->fd = fd;
	f->dev = st.st_dev;
	f->ino = st.st_ino;
	return 0;
}

int sandbox_fd_ours(const struct sandbox_fd *f)
{
	struct stat st;
	return f->fd >= 0 && fstat(f->fd, &st) == 0 && st.st_dev == f->dev && st.st_ino == f->ino;
}

void sandbox_fd_close(struct sandbox_fd *f)
{
	if (sandbox_fd_ours(f))
		close(f->fd);
	f->fd = -1;
}

/* ------------------------------------------------------------------ the directory */

int sandbox_sock_dir_open(struct sandbox_sock *s, const char *dir)
{
	char want[PATH_MAX];
	if (!dir[0] || strlen(dir) >= sizeof(want))
		return -ENAMETOOLONG;
	strcpy(want, dir);	/* dir may be s->dir itself */
	s->why[0] = '\0';
	struct sandbox_fd first;
	int rc = sandbox_fd_own(&first, open(want, O_PATH | O_DIRECTORY | O_CLOEXEC), 0);
	if (rc != 0)
		return rc;
	/* The directory's absolute path, as this process sees it: a relative
	 * PATCHBOX_SOCK_DIR or a symlink would name another place to the client. */
	char link[32];
	snprintf(link, sizeof(link), "/proc/self/fd/%d", first.fd);
	ssize_t n = readlink(link, s->dir, sizeof(s->dir) - 1);
	if (n > 0 && s->dir[0] == '/' && (size_t)n < sizeof(s->dir) - 1) {
		s->dir[n] = '\0';
	} else {
		strcpy(s->dir, want);	/* no /proc: the path as given */
	}
	sandbox_fd_close(&first);
	/* Everything the agent does there (bind, connect, files) goes through names in
	 * this directory: it and every directory above it must be out of others'
	 * reach (docs/security.md). The walk never follows a link; it must arrive where
	 * the path first led. */
	int fd = sandbox_dir_walk(s->dir, 1, 0, s->why, sizeof(s->why));
	rc = fd < 0 ? fd : sandbox_fd_own(&s->dirfd, fd, 1);
	if (rc != 0) {
		if (!s->why[0])
			snprintf(s->why, sizeof(s->why), "%.200s: %s", s->dir, strerror(-rc));
		return rc == -ENOENT ? rc : -EPERM;
	}
	if (s->dirfd.dev != first.dev || s->dirfd.ino != first.ino) {
		snprintf(s->why, sizeof(s->why), "%.200s was replaced while it was opened", s->dir);
		sandbox_fd_close(&s->dirfd);
		return -EPERM;
	}
	return 0;
}

/* 0 if the directory's path still leads, through trusted directories only, to the
 * directory of dirfd; else -EPERM, s->why saying why. */
static int sandbox_sock_dir_recheck(struct sandbox_sock *s)
{
	struct sandbox_fd d;
	int fd = sandbox_dir_walk(s->dir, 1, 0, s->why, sizeof(s->why));
	if (fd < 0 || sandbox_fd_own(&d, fd, 0) != 0)
		return -EPERM;
	int rc = 0;
	if (d.dev != s->dirfd.dev || d.ino != s->dirfd.ino) {
		snprintf(s->why, sizeof(s->why), "%.200s is not the directory it was any more", s->dir);
		rc = -EPERM;
	}
	sandbox_fd_close(&d);
	return rc;
}

/* The descriptor of the directory, reopened by its path when the program closed it. */
static int sandbox_sock_dir_check(struct sandbox_sock *s)
{
	if (sandbox_fd_ours(&s->dirfd))
		return 0;
	s->dirfd.fd = -1;	/* not ours any more: forgotten, never closed */
	return sandbox_sock_dir_open(s, s->dir);
}

/* name in the directory as a socket address: its full path when that fits, else
 * through the directory's descriptor. */
static int sandbox_sock_addr(const struct sandbox_sock *s, const char *name, struct sockaddr_un *a)
{
	memset(a, 0, sizeof(*a));
	a->sun_family = AF_UNIX;
	size_t dl = strlen(s->dir);
	const char *sep = dl && s->dir[dl - 1] == '/' ? "" : "/";
	int n = snprintf(a->sun_path, sizeof(a->sun_path), "%s%s%s", s->dir, sep, name);
	if (n > 0 && (size_t)n < sizeof(a->sun_path))
		return 0;
	n = snprintf(a->sun_path, sizeof(a->sun_path), "/proc/self/fd/%d/%s", s->dirfd.fd, name);
	return n > 0 && (size_t)n < sizeof(a->sun_path) ? 0 : -ENAMETOOLONG;
}

int sandbox_sock_path_get(const struct sandbox_sock *s, const char *name, char *ret, size_t len)
{
	size_t dl = strlen(s->dir);
	int n = snprintf(ret, len, "%s%s%s", s->dir, dl && s->dir[dl - 1] == '/' ? "" : "/", name);
	return n >= 0 && (size_t)n < len ? 0 : -ENAMETOOLONG;
}

/* 1: something accepts connections at name (a live agent; a full backlog counts),
 * 0: refused (nobody listens: stale), -errno: cannot tell. */
static int sandbox_sock_probe(const struct sandbox_sock *s, const char *name)
{
	struct sockaddr_un a;
	struct sandbox_fd p;
	int rc = sandbox_sock_addr(s, name, &a);
	if (rc != 0)
		return rc;
	rc = sandbox_fd_own(&p, socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0), 0);
	if (rc != 0)
		return rc;
	rc = connect(p.fd, (const struct sockaddr *)&a, sizeof(a)) == 0 ? 0 : errno;
	sandbox_fd_close(&p);
	if (rc == 0 || rc == EAGAIN || rc == EINPROGRESS)
		return 1;
	return rc == ECONNREFUSED ? 0 : -rc;
}

/* ------------------------------------------------------------------ files */

/* 0 if st is a file the agent may keep writing: regular, ours, one link, not
 * writable by group or others. */
static int sandbox_file_ours(const struct stat *st)
{
	return S_ISREG(st->st_mode) && st->st_uid == geteuid() && st->st_nlink == 1 &&
			       !(st->st_mode & (S_IWGRP | S_IWOTH))
		       ? 0
		       : -1;
}

int sandbox_sock_file_open(struct sandbox_sock *s, const char *name, struct sandbox_fd *ret)
{
	/* O_NONBLOCK: a FIFO planted at the name must not block the open. */
	const int flags = O_WRONLY | O_APPEND | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW | O_NONBLOCK;
	s->why[0] = '\0';
	for (int attempt = 0; attempt < 2; attempt++) {
		int rc = sandbox_fd_own(ret, openat(s->dirfd.fd, name, flags | O_CREAT | O_EXCL, 0600), 1);
		if (rc == 0)
			return 0;
		if (rc != -EEXIST)
			return rc;
		struct stat st;
		rc = sandbox_fd_own(ret, openat(s->dirfd.fd, name, flags), 1);
		if (rc == 0 && fstat(ret->fd, &st) == 0 && sandbox_file_ours(&st) == 0) {
			int fl = fcntl(ret->fd, F_GETFL);
			if (fl >= 0)
				fcntl(ret->fd, F_SETFL, fl & ~O_NONBLOCK);
			return 0;
		}
		if (rc == 0)
			sandbox_fd_close(ret);
		/* A link, a FIFO, a file of another owner or a hard link at our own name:
		 * planted, not ours. Removed (the name is ours), then created anew. */
		if (fstatat(s->dirfd.fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0)
			snprintf(s->why, sizeof(s->why), "%s was not ours (mode %06o uid %u, %u links): replaced",
				 name, (unsigned)st.st_mode, (unsigned)st.st_uid, (unsigned)st.st_nlink);
		if (unlinkat(s->dirfd.fd, name, 0) != 0 && errno != ENOENT) {
			snprintf(s->why, sizeof(s->why), "%s is not ours and cannot be removed: %s", name,
				 strerror(errno));
			return -EPERM;
		}
	}
	return -EEXIST;
}

/* ------------------------------------------------------------------ the socket */

/* Mode 0600 on the socket file just bound, through an O_PATH descriptor of the name
 * checked to be a socket of ours: a link planted in between is never followed. */
static int sandbox_sock_chmod(const struct sandbox_sock *s)
{
	struct sandbox_fd f;
	int rc = sandbox_fd_own(&f, openat(s->dirfd.fd, s->name, O_PATH | O_NOFOLLOW | O_CLOEXEC), 0);
	if (rc != 0)
		return rc;
	struct stat st;
	char path[48];
	if (fstat(f.fd, &st) != 0 || !S_ISSOCK(st.st_mode) || st.st_uid != geteuid())
		rc = -EPERM;
	else if (snprintf(path, sizeof(path), "/proc/self/fd/%d", f.fd), chmod(path, 0600) != 0)
		rc = -errno;
	sandbox_fd_close(&f);
	return rc;
}

int sandbox_sock_bind(struct sandbox_sock *s, pid_t pid)
{
	struct sockaddr_un a;
	int rc = sandbox_sock_dir_check(s);
	if (rc != 0)
		return rc;
	if ((rc = sandbox_sock_dir_recheck(s)) != 0)	/* modes may have changed since */
		return rc;
	struct stat dst;
	struct timespec now;
	s->quiet = fstat(s->dirfd.fd, &dst) == 0 && clock_gettime(CLOCK_REALTIME, &now) == 0 &&
		   now.tv_sec - dst.st_mtim.tv_sec >= SANDBOX_SWEEP_QUIET_S;
	snprintf(s->name, sizeof(s->name), SANDBOX_SOCK_PREFIX "%d", (int)pid);
	if ((rc = sandbox_sock_addr(s, s->name, &a)) != 0)
		return rc;
	struct sandbox_fd l;
	rc = sandbox_fd_own(&l, socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0), 1);
	if (rc != 0)
		return rc;
	rc = bind(l.fd, (const struct sockaddr *)&a, sizeof(a)) == 0 ? 0 : -errno;
	if (rc == -EADDRINUSE) {
		/* A file at our name. Not a socket of ours (a planted link or file, a
		 * socket of another owner): removed, the name is ours. A socket of ours:
		 * replaced only if nobody listens on it (stale); probed by connect() only
		 * as a socket, never through a link. */
		struct stat st;
		int live = 0;
		if (fstatat(s->dirfd.fd, s->name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISSOCK(st.st_mode) &&
		    st.st_uid == geteuid())
			live = sandbox_sock_probe(s, s->name);
		if (live == 0 && unlinkat(s->dirfd.fd, s->name, 0) != 0 && errno != ENOENT)
			rc = -errno;
		else if (live == 0)
			rc = bind(l.fd, (const struct sockaddr *)&a, sizeof(a)) == 0 ? 0 : -errno;
		else if (live < 0)
			rc = live;
	}
	/* 0600 before listen(): until then nobody can connect, whatever the umask was. */
	if (rc == 0) {
		rc = sandbox_sock_chmod(s);
		if (rc == 0 && listen(l.fd, 8) != 0)
			rc = -errno;
		if (rc != 0)
			unlinkat(s->dirfd.fd, s->name, 0);	/* bound a moment ago: ours */
	}
	if (rc != 0) {
		sandbox_fd_close(&l);
		return rc;
	}
	s->lfd = l;
	memcpy(s->addr, a.sun_path, sizeof(s->addr));
	s->bound = 1;
	return 0;
}

int sandbox_sock_bind_abstract(struct sandbox_sock *s, pid_t pid)
{
	struct sockaddr_un a;
	memset(&a, 0, sizeof(a));
	a.sun_family = AF_UNIX;
	snprintf(s->name, sizeof(s->name), SANDBOX_SOCK_PREFIX "%d", (int)pid);
	/* sun_path[0] = '\0': the abstract namespace of the process's network namespace. */
	int n = snprintf(a.sun_path + 1, sizeof(a.sun_path) - 1, SANDBOX_ABSTRACT_PREFIX "%s", s->name);
	socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
	struct sandbox_fd l;
	int rc = sandbox_fd_own(&l, socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0), 1);
	if (rc != 0)
		return rc;
	if (bind(l.fd, (const struct sockaddr *)&a, len) != 0 || listen(l.fd, 8) != 0) {
		rc = -errno;	/* EADDRINUSE: squatted; a client checks SO_PEERCRED anyway */
		sandbox_fd_close(&l);
		return rc;
	}
	s->lfd = l;
	snprintf(s->addr, sizeof(s->addr), "@" SANDBOX_ABSTRACT_PREFIX "%s", s->name);
	s->abstract = 1;
	s->bound = 1;
	return 0;
}

int sandbox_sock_check(struct sandbox_sock *s)
{
	if (!s->bound)
		return -1;
	if (!sandbox_fd_ours(&s->lfd))
		return -1;
	if (s->abstract)
		return 0;	/* no file, no directory: the listening socket is all */
	if (sandbox_fd_ours(&s->dirfd)) {
		/* The file must still be there: a sweep racing a pid's reuse, or anyone
		 * who may write the directory, could have removed it; bound anew then. */
		struct stat st;
		return fstatat(s->dirfd.fd, s->name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISSOCK(st.st_mode) &&
				       st.st_uid == geteuid()
			       ? 0
			       : -1;
	}
	/* The listening socket is ours, the directory's descriptor is not: reopen it.
	 * A plain address does not depend on it; the /proc/self/fd form holds its
	 * number, which must come back the same or the socket be bound anew. */
	int old = s->dirfd.fd;
	if (sandbox_sock_dir_check(s) != 0)
		return strncmp(s->addr, "/proc/self/fd/", 14) == 0 ? -1 : 0;
	if (strncmp(s->addr, "/proc/self/fd/", 14) != 0 || s->dirfd.fd == old)
		return 0;
	return -1;
}

void sandbox_sock_unbind(struct sandbox_sock *s)
{
	if (s->bound && !s->abstract) {
		if (sandbox_fd_ours(&s->dirfd)) {
			unlinkat(s->dirfd.fd, s->name, 0);
		} else {
			char path[PATH_MAX];
			if (sandbox_sock_path_get(s, s->name, path, sizeof(path)) == 0)
				unlink(path);
		}
	}
	s->bound = 0;
	s->abstract = 0;
}

/* ------------------------------------------------------------------ stale sockets */

/* The pid in "sandbox-sock<digits>" (nothing after the digits), else -1. */
/* The N of sandbox-sock<N> (log: 0), or of sandbox-sock<N>.log (log: 1); else -1. */
static long sandbox_sock_name_pid(const char *name, int *log)
{
	size_t pl = sizeof(SANDBOX_SOCK_PREFIX) - 1, n = strlen(name);
	*log = n > 4 && strcmp(name + n - 4, ".log") == 0;
	if (*log)
		n -= 4;
	if (strncmp(name, SANDBOX_SOCK_PREFIX, pl) != 0 || n == pl || n - pl > 9)
		return -1;
	long v = 0;
	for (const char *p = name + pl; p < name + n; p++) {
		if (*p < '0' || *p > '9')
			return -1;
		v = v * 10 + (*p - '0');
	}
	return v > 0 ? v : -1;
}

/* 1 if name (sandbox-sock<N> or its .log) was stale and is removed (the rule above). */
static int sandbox_sock_sweep_name(const struct sandbox_sock *s, const char *name, pid_t self)
{
	int log;
	long pid = sandbox_sock_name_pid(name, &log);
	if (pid < 0 || pid == (long)self)
		return 0;
	if (kill((pid_t)pid, 0) == 0 || errno != ESRCH)
		return 0;	/* a process N exists (or we may not signal it) */
	struct stat st, again;
	if (fstatat(s->dirfd.fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 || st.st_uid != geteuid())
		return 0;	/* only files of this agent's user: never another's */
	if (log)	/* a dead agent's log that never got a line: nothing to keep */
		return S_ISREG(st.st_mode) && st.st_size == 0 && unlinkat(s->dirfd.fd, name, 0) == 0;
	if (!S_ISSOCK(st.st_mode))
		return 0;
	if (sandbox_sock_probe(s, name) != 0)
		return 0;	/* accepted (alive) or cannot tell */
	/* Checked again after the probe: a process that took pid N exists before it
	 * binds, and a new file at the name has another inode. */
	if ((kill((pid_t)pid, 0) == 0 || errno != ESRCH) ||
	    fstatat(s->dirfd.fd, name, &again, AT_SYMLINK_NOFOLLOW) != 0 || again.st_dev != st.st_dev ||
	    again.st_ino != st.st_ino)
		return 0;
	return unlinkat(s->dirfd.fd, name, 0) == 0;
}

int sandbox_sock_sweep_pid(const struct sandbox_sock *s, pid_t pid, pid_t self)
{
	char name[sizeof(s->name) + 4];
	if (pid <= 0 || !sandbox_fd_ours(&s->dirfd))
		return 0;
	snprintf(name, sizeof(name), SANDBOX_SOCK_PREFIX "%d", (int)pid);
	int removed = sandbox_sock_sweep_name(s, name, self);
	snprintf(name, sizeof(name), SANDBOX_SOCK_PREFIX "%d.log", (int)pid);
	return removed + sandbox_sock_sweep_name(s, name, self);
}

int sandbox_sock_sweep(const struct sandbox_sock *s, pid_t self)
{
	struct sandbox_fd d;
	if (!sandbox_fd_ours(&s->dirfd) ||
	    sandbox_fd_own(&d, openat(s->dirfd.fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC), 0) != 0)
		return 0;
	/* getdents64 on our own descriptor, not a DIR *: closedir would close a
	 * number the program may have reused meanwhile. */
	char buf[4096] __attribute__((aligned(8)));
	int removed = 0, seen = 0;
	for (;;) {
		if (!sandbox_fd_ours(&d))
			break;
		ssize_t n = getdents64(d.fd, buf, sizeof(buf));
		if (n <= 0)
			break;
		for (ssize_t off = 0; off < n && seen < SANDBOX_SWEEP_MAX; seen++) {
			struct dirent64 *de = (struct dirent64 *)(buf + off);
			off += de->d_reclen;
			removed += sandbox_sock_sweep_name(s, de->d_name, self);
		}
		if (seen >= SANDBOX_SWEEP_MAX)
			break;
	}
	sandbox_fd_close(&d);
	return removed;
}
