/* Part of sandbox-listen.o: who may change this process's code, and whose choices the
 * agent obeys (docs/security.md).
 *
 * The rule: a peer may change a process's code only if the kernel would let it ptrace
 * that process. The socket file (0600, owned by the process's effective uid) keeps
 * everyone else off the socket; sandbox_peer_admit then applies what the kernel's
 * __ptrace_may_access (kernel/ptrace.c, PTRACE_MODE_ATTACH_REALCREDS) and Yama
 * (security/yama/yama_lsm.c) would:
 *
 *   - a peer with CAP_SYS_PTRACE (SO_PEERCRED uid 0 and the capability in its
 *     effective set) is admitted, unless Yama's ptrace_scope is 3;
 *   - any other peer needs its real and effective uid equal to this process's real,
 *     effective and saved uid, the same for gids, this process dumpable
 *     (PR_GET_DUMPABLE 1: not setuid/setgid/file-capability, not PR_SET_DUMPABLE 0,
 *     no credential change), and, under Yama ptrace_scope 1, to be an ancestor of
 *     this process; ptrace_scope 2 admits CAP_SYS_PTRACE only, 3 nobody.
 *
 * The peer's ids and capabilities are read from /proc/<pid>/status. The pid is the
 * one SO_PEERCRED recorded at connect; a peer that passed its connection on and exited
 * could have its pid reused, so the status is cross-checked against SO_PEERCRED's
 * uid and gid and, where the kernel has SO_PEERPIDFD (Linux 6.5), the peer is proved
 * still alive after the read (pidfd_send_signal 0), so the status was its own.
 *
 * The environment: a process started setuid, setgid or with file capabilities
 * (AT_SECURE), or whose real and effective ids differ, runs with the caller's
 * environment and raised privileges. There every PATCHBOX_* variable is ignored, as
 * the dynamic loader ignores LD_* (sandbox_getenv).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sandbox-server.h"

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
/* Tests build an agent that reads a file of theirs (this kernel may have no Yama). */
#ifndef SANDBOX_YAMA_PATH
#define SANDBOX_YAMA_PATH "/proc/sys/kernel/yama/ptrace_scope"
#endif
#define SANDBOX_CAP_SYS_PTRACE 19
#define SANDBOX_ANCESTRY_MAX 4096	/* parents walked for Yama's scope 1 */

int sandbox_privileged(void)
{
	uid_t ru, eu, su;
	gid_t rg, eg, sg;
	if (getauxval(AT_SECURE))
		return 1;
	if (getresuid(&ru, &eu, &su) != 0 || getresgid(&rg, &eg, &sg) != 0)
		return 1;
	return ru != eu || rg != eg;
}

const char *sandbox_getenv(const char *name)
{
	return sandbox_privileged() ? NULL : getenv(name);
}

/* Reads a small /proc file into buf (NUL-terminated); its length or -errno. */
static ssize_t sandbox_proc_read(const char *path, char *buf, size_t cap)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return -errno;
	size_t got = 0;
	while (got < cap - 1) {
		ssize_t n = read(fd, buf + got, cap - 1 - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	close(fd);
	buf[got] = '\0';
	return (ssize_t)got;
}

/* Yama's ptrace_scope: 0..3, or 0 where the kernel has no Yama. */
static int sandbox_yama_scope(void)
{
	char buf[16];
	if (sandbox_proc_read(SANDBOX_YAMA_PATH, buf, sizeof(buf)) <= 0)
		return 0;
	int v = atoi(buf);
	return v < 0 ? 3 : v > 3 ? 3 : v;	/* an unknown scope counts as the strictest */
}

/* What /proc/<pid>/status says of a peer's credentials. */
struct sandbox_peer_status {
	unsigned long uid[4], gid[4];	/* real, effective, saved, filesystem */
	unsigned long long cap_eff;
};

static int sandbox_status_ids(const char *text, const char *key, unsigned long ret[4])
{
	const char *p = strstr(text, key);
	if (!p)
		return -1;
	p += strlen(key);
	for (int i = 0; i < 4; i++) {
		char *end;
		ret[i] = strtoul(p, &end, 10);
		if (end == p)
			return -1;
		p = end;
	}
	return 0;
}

static int sandbox_peer_status_read(pid_t pid, struct sandbox_peer_status *ret)
{
	char path[64], text[4096];
	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	if (pid <= 0 || sandbox_proc_read(path, text, sizeof(text)) <= 0)
		return -1;
	const char *cap = strstr(text, "\nCapEff:");
	if (sandbox_status_ids(text, "\nUid:", ret->uid) != 0 ||
	    sandbox_status_ids(text, "\nGid:", ret->gid) != 0 || !cap)
		return -1;
	ret->cap_eff = strtoull(cap + 8, NULL, 16);
	return 0;
}

/* 1 if tracer is an ancestor of this process (Yama scope 1), walking parents up. */
static int sandbox_is_ancestor(pid_t tracer)
{
	pid_t p = getppid();
	for (int i = 0; i < SANDBOX_ANCESTRY_MAX && p > 0; i++) {
		if (p == tracer)
			return 1;
		char path[64], text[512];
		snprintf(path, sizeof(path), "/proc/%d/stat", (int)p);
		if (sandbox_proc_read(path, text, sizeof(text)) <= 0)
			return 0;
		/* pid (comm) state ppid ...: comm may hold spaces and parentheses. */
		const char *close_paren = strrchr(text, ')');
		int ppid;
		char state;
		if (!close_paren || sscanf(close_paren + 1, " %c %d", &state, &ppid) != 2)
			return 0;
		p = ppid;
	}
	return 0;
}

int sandbox_peer_creds(int fd, struct sandbox_peer *ret)
{
	struct ucred cred;
	socklen_t cl = sizeof(cred);
	ret->pid = -1;
	ret->uid = (uid_t)-1;
	ret->gid = (gid_t)-1;
	ret->pidfd = -1;
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) != 0)
		return -errno;
	ret->pid = cred.pid;
	ret->uid = cred.uid;
	ret->gid = cred.gid;
	int pidfd;
	socklen_t pl = sizeof(pidfd);
	if (getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &pl) == 0)
		ret->pidfd = pidfd;	/* closed by sandbox_peer_release */
	return 0;
}

void sandbox_peer_release(struct sandbox_peer *peer)
{
	if (peer->pidfd >= 0)
		close(peer->pidfd);	/* made by SO_PEERPIDFD a moment ago: ours */
	peer->pidfd = -1;
}

int sandbox_peer_admit(const struct sandbox_peer *peer, char *why, size_t cap)
{
	int scope = sandbox_yama_scope();
	if (scope == 3) {
		snprintf(why, cap, "Yama ptrace_scope is 3: no process may change another's code");
		return -1;
	}
	if (peer->pid < 0 || peer->uid == (uid_t)-1) {
		snprintf(why, cap, "the peer's credentials are unknown (SO_PEERCRED)");
		return -1;
	}
	struct sandbox_peer_status st;
	int known = sandbox_peer_status_read(peer->pid, &st) == 0;
	if (known && (st.uid[1] != peer->uid || st.gid[1] != peer->gid))
		known = 0;	/* not the process that connected (its pid reused) */
	/* Exited while we read (ESRCH): the status may be another's. EPERM (a peer we may
	 * not signal) still says it is alive. */
	if (known && peer->pidfd >= 0 && syscall(SYS_pidfd_send_signal, peer->pidfd, 0, NULL, 0) != 0 &&
	    errno == ESRCH)
		known = 0;
	if (known && (st.cap_eff >> SANDBOX_CAP_SYS_PTRACE) & 1)
		return 0;	/* CAP_SYS_PTRACE: the kernel asks nothing more */
	/* A root peer whose pid this namespace cannot see (pid 0: an outer PID namespace)
	 * counts as the root it is in this user namespace. */
	if (peer->uid == 0 && peer->pid == 0)
		return 0;
	if (scope == 2) {
		snprintf(why, cap, "Yama ptrace_scope is 2: only CAP_SYS_PTRACE may change this process's code "
			 "(peer uid %u)", (unsigned)peer->uid);
		return -1;
	}
	if (!known) {
		snprintf(why, cap, "cannot read the credentials of peer pid %d (/proc/%d/status)", (int)peer->pid,
			 (int)peer->pid);
		return -1;
	}
	uid_t ru, eu, su;
	gid_t rg, eg, sg;
	if (getresuid(&ru, &eu, &su) != 0 || getresgid(&rg, &eg, &sg) != 0) {
		snprintf(why, cap, "cannot read this process's credentials");
		return -1;
	}
	/* __ptrace_may_access: the caller's real uid (REALCREDS) equal to the target's
	 * real, effective and saved uid; the same for gids. The effective ids too: the
	 * socket was reached with them. */
	unsigned long pu = st.uid[0], pg = st.gid[0];
	if (pu != st.uid[1] || pg != st.gid[1] || pu != ru || pu != eu || pu != su || pg != rg ||
	    pg != eg || pg != sg) {
		snprintf(why, cap, "peer uid %lu/%lu gid %lu/%lu (real/effective) may not ptrace this process "
			 "(uid %u/%u/%u gid %u/%u/%u real/effective/saved)", st.uid[0], st.uid[1], st.gid[0],
			 st.gid[1], (unsigned)ru, (unsigned)eu, (unsigned)su, (unsigned)rg, (unsigned)eg,
			 (unsigned)sg);
		return -1;
	}
	if (sandbox_privileged() || prctl(PR_GET_DUMPABLE) != 1) {
		snprintf(why, cap, "this process is not dumpable (setuid, setgid, file capabilities, a credential "
			 "change or PR_SET_DUMPABLE 0): only root (CAP_SYS_PTRACE) may change its code");
		return -1;
	}
	if (scope == 1 && !sandbox_is_ancestor(peer->pid)) {
		snprintf(why, cap, "Yama ptrace_scope is 1: peer pid %d is not an ancestor of this process",
			 (int)peer->pid);
		return -1;
	}
	return 0;
}

/* 0 if a directory with status st may be trusted (see sandbox_dir_walk); else -1. */
static int sandbox_dir_ok(const struct stat *st, const char *path, int sticky_ok, int root_only, char *why,
			  size_t cap)
{
	uid_t me = geteuid();
	if (!S_ISDIR(st->st_mode)) {
		snprintf(why, cap, "%.200s is not a directory", path);
		return -1;
	}
	if (st->st_uid != 0 && (root_only || st->st_uid != me)) {
		snprintf(why, cap, "%.200s is owned by uid %u (only root%s may own it: its owner could replace "
			 "what is in it)", path, (unsigned)st->st_uid, root_only ? "" : " or this process's user");
		return -1;
	}
	if ((st->st_mode & (S_IWGRP | S_IWOTH)) && !(sticky_ok && (st->st_mode & S_ISVTX))) {
		snprintf(why, cap, "%.200s has mode %04o: writable by others%s", path,
			 (unsigned)(st->st_mode & 07777), sticky_ok ? " and not sticky" : "");
		return -1;
	}
	return 0;
}

int sandbox_dir_walk(const char *path, int final_sticky_ok, int root_only, char *why, size_t cap)
{
	char part[PATH_MAX];
	size_t len = strlen(path);
	if (len == 0 || len >= sizeof(part) || path[0] != '/') {
		snprintf(why, cap, "%.200s is not an absolute path", path);
		return -EINVAL;
	}
	int fd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	struct stat st;
	const char *p = path;
	for (;;) {
		while (*p == '/')
			p++;
		int last = !*p;
		/* The prefix walked so far (fd's path), for messages. */
		size_t done = (size_t)(p - path);
		while (done > 1 && path[done - 1] == '/')
			done--;
		memcpy(part, path, done);
		part[done] = '\0';
		if (fstat(fd, &st) != 0) {
			int e = errno;
			close(fd);
			return -e;
		}
		/* Ancestors may be sticky (/tmp); the directory itself only if allowed. */
		if (sandbox_dir_ok(&st, part, last ? final_sticky_ok : 1, root_only, why, cap) != 0) {
			close(fd);
			return -EPERM;
		}
		if (last)
			return fd;
		const char *end = strchr(p, '/');
		size_t n = end ? (size_t)(end - p) : strlen(p);
		char name[NAME_MAX + 1];
		if (n > NAME_MAX) {
			close(fd);
			return -ENAMETOOLONG;
		}
		memcpy(name, p, n);
		name[n] = '\0';
		p += n;
		int next = openat(fd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		int e = errno;
		close(fd);
		if (next < 0) {
			if (e == ELOOP || e == ENOTDIR)
				snprintf(why, cap, "%.*s is a symbolic link or not a directory", (int)(p - path), path);
			else
				snprintf(why, cap, "%.*s: %s", (int)(p - path), path, strerror(e));
			return -e;
		}
		fd = next;
	}
}
