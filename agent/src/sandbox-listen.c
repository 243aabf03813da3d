/* Part of sandbox-listen.o: the server. The agent's socket, its thread and the
 * per-connection loop (peer check, framing), start / stop, what a fork leaves,
 * the request log, debug output and the constructor/destructor; the locks and
 * the rules that go with them ("Locks and fork" below). Each request is answered
 * by sandbox-messages.c over sandbox-wire.c.
 *
 * One thread blocks in accept() (no CPU when idle) and serves one client at a
 * time. Nothing in here may stop the host program or the serving thread: no
 * exit/abort, every length checked, every failure becomes an error reply or a
 * dropped connection. Frames and errors follow docs/protocol.md.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "patchbox/sandbox.h"
#include "sandbox-server.h"

#define SANDBOX_TIMEOUT_MS_DEFAULT 5000
#define SANDBOX_PERM_WAIT_MS 1000	/* how long a refused peer may take to send its header */

/* ------------------------------------------------------------------ locks and fork
 *
 * Locks and fork. There are two threads of interest: the *agent thread*, which
 * serves the socket and alone runs the engine, and *host threads*, which may call
 * patchbox_agent_start / patchbox_agent_stop (the constructor is one of them).
 *
 * sandbox_state_lock is a coarse lock over start and stop: whether the agent runs
 * (sandbox_started), its thread, listening socket and owner pid, the socket and log
 * paths, the client timeout, the log fd, and the one-time engine_init called from
 * start. Start and stop run whole under it, so two host threads never start or stop
 * at once. The agent thread never takes it: start writes everything the thread
 * reads before pthread_create, and stop touches it again only after pthread_join,
 * so between the two the thread owns the log fd (opened lazily) and only reads the
 * rest, and stop can join it while holding the lock. sandbox_stopping is the one
 * word both sides touch meanwhile: an atomic, stored with release by stop, loaded
 * with acquire by the thread (pairs with the shutdown() that wakes its accept()).
 *
 * sandbox_client_lock guards sandbox_client_fd only: the connection being served,
 * published by the agent thread so that stop can shutdown() it. The thread clears
 * it under the lock before close(), so stop never shuts down an fd number the host
 * has meanwhile reused. Lock order: state, then client (stop); the thread takes
 * client alone. A request in progress is never cut short: stop waits for it.
 *
 * The engine (patch table, sandbox areas, executable facts: libsandbox.o) has no
 * lock: sandbox_engine_init fills it once, under sandbox_state_lock, before any
 * agent thread exists, and from then on only the agent thread touches it. A later
 * start (after stop, or in a forked child) finds it ready; its new thread runs
 * after the old one was joined (stop) or in a process where it never existed
 * (fork). sandbox_debug_enabled is an atomic any thread may read or write
 * (relaxed: a switch, it orders nothing).
 *
 * fork keeps only the calling thread: the child has no agent thread and nothing
 * serves for it. After the first successful start, sandbox_atfork_child runs in
 * every child: it closes the child's copies of the listening socket, the served
 * connection and the log fd, marks the agent not started and re-initialises both
 * mutexes (another thread may have held one at the fork: the agent thread the
 * client lock, a host thread in start or stop the state lock; a fork racing a
 * start can also leave the child a close-on-exec fd of a socket the handler did
 * not see yet). The socket file stays: it is the parent's, which keeps serving,
 * and the destructor leaves it (sandbox_owner_pid). The child keeps the engine as
 * it was at the fork, applied patches and their redirects included, and may call
 * patchbox_agent_start to serve under its own pid (the membarrier registration is
 * inherited). close() is async-signal-safe; pthread_mutex_init is not on POSIX's
 * list (glibc's only stores the initializer): a risk for a multi-threaded program
 * that forks in a signal handler. A program that daemonizes loses its agent: the
 * daemon has no agent thread.
 *
 * A fork while the agent thread is inside an apply, remove or TEST leaves the child
 * with that request frozen where it was: no thread will finish or roll it back.
 * Linux write-protects the parent's pages during the fork and a store that faults
 * on that blocks the agent thread until the fork is done, so the child's copy
 * should hold the agent's stores up to some point in program order, each atomic
 * store whole (reasoned from the kernel's copy-on-write, not tested). The patch
 * table changes last (a patch enters it after its redirect is published and
 * leaves it after its bytes are restored), so in the child:
 * - apply, before sandbox_redirect_write opened its pages: no code changed; the
 *   extents placed for the patch (or revived for it) stay in use under an id that
 *   no patch holds.
 * - apply, inside sandbox_redirect_write: the pages it opened (the sandbox text and
 *   each target's entry page) stay RWX in the child for good, and the child may
 *   run the patch with only some of its functions redirected (all or nothing holds
 *   in the parent only), through redirects its engine does not list and cannot
 *   remove.
 *   In both cases, if the child starts its agent, its next apply gets the same id
 *   (sandbox_next_id grows only on success) and so owns those extents too: whether
 *   it fails (they are freed at once) or succeeds and is removed later (retired
 *   with it, reclaimed once no thread is inside), sandbox text that a live
 *   redirect jumps into can be handed to another patch and overwritten, and the
 *   child crashes at its next call of that function. Not safe; harmless only for
 *   extents nothing jumps into.
 * - remove: the patch is still listed with its saved bytes; each entry is at one
 *   of remove's steps 1-4, each a valid state (docs/redirect.md, "Remove"); its
 *   entry pages stay RWX. A REMOVE by the child's own agent redoes steps 1-4 from
 *   the saved bytes and ends with the original bytes: safe.
 * - TEST: the same, for the self-test's patch of the agent's own function.
 * The parent is not affected: its agent thread finishes the request.
 */

int sandbox_debug_enabled;

static pthread_mutex_t sandbox_state_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t sandbox_client_lock = PTHREAD_MUTEX_INITIALIZER;
/* Under sandbox_state_lock (the agent thread reads some of them, see above): */
static int sandbox_started;
static int sandbox_stopping;		/* atomic: written by start and stop, read by the thread */
static int sandbox_listen_fd = -1;
static pthread_t sandbox_thread;
static pid_t sandbox_owner_pid;		/* the process that started the agent */
static int sandbox_timeout_ms = SANDBOX_TIMEOUT_MS_DEFAULT;
char sandbox_sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
char sandbox_log_path[PATH_MAX];	/* "" = logging off */
static int sandbox_log_fd = -1;		/* the agent thread's while it runs */
static int sandbox_log_reported;	/* the agent thread's while it runs */
static int sandbox_start_reported;
static int sandbox_atfork_done;
/* Under sandbox_client_lock: */
static int sandbox_client_fd = -1;	/* the connection being served, for stop */

/* ------------------------------------------------------------------ debug */

void sandbox_debug_printf(const char *fmt, ...)
{
	char buf[1024];
	int n = snprintf(buf, sizeof(buf), "patchbox[%d]: ", (int)getpid());
	if (n < 0 || (size_t)n >= sizeof(buf))
		return;
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(buf + n, sizeof(buf) - n - 1, fmt, ap);
	va_end(ap);
	if (m < 0)
		return;
	size_t len = (size_t)n + ((size_t)m < sizeof(buf) - n - 1 ? (size_t)m : sizeof(buf) - n - 2);
	buf[len++] = '\n';
	ssize_t w = write(STDERR_FILENO, buf, len);
	(void)w;
}

static void sandbox_stderr_print(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void sandbox_stderr_print(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	size_t len = (size_t)n < sizeof(buf) - 1 ? (size_t)n : sizeof(buf) - 2;
	buf[len++] = '\n';
	ssize_t w = write(STDERR_FILENO, buf, len);
	(void)w;
}

/* ------------------------------------------------------------------ log */

/* One line per request; failures never affect serving and are reported once. */
void sandbox_log_write(const struct sandbox_peer *peer, const char *what, const char *patch,
		       const char *result)
{
	if (!sandbox_log_path[0])
		return;
	if (sandbox_log_fd < 0) {
		sandbox_log_fd = open(sandbox_log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0600);
		if (sandbox_log_fd < 0) {
			if (!sandbox_log_reported++)
				sandbox_stderr_print("patchbox: cannot open log %s: %s", sandbox_log_path,
						     strerror(errno));
			return;
		}
	}
	struct timespec ts;
	struct tm tm;
	char when[32] = "?";
	clock_gettime(CLOCK_REALTIME, &ts);
	if (gmtime_r(&ts.tv_sec, &tm))
		strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
	char line[1024];
	int n = snprintf(line, sizeof(line), "%s.%03ldZ pid=%d uid=%u %s%s%s %s\n", when,
			 ts.tv_nsec / 1000000, (int)peer->pid, (unsigned)peer->uid, what,
			 patch ? " name=" : "", patch ? patch : "", result);
	if (n < 0)
		return;
	size_t len = (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1;
	line[len - 1] = '\n';
	ssize_t w = write(sandbox_log_fd, line, len);
	if (w != (ssize_t)len && !sandbox_log_reported++)
		sandbox_stderr_print("patchbox: cannot write log %s: %s", sandbox_log_path,
				     w < 0 ? strerror(errno) : "short write");
}

/* Answers a frame-level problem; log it too. */
static int sandbox_frame_error(int fd, const struct sandbox_peer *peer, unsigned type, uint32_t seq,
			       enum pbx_error code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static int sandbox_frame_error(int fd, const struct sandbox_peer *peer, unsigned type, uint32_t seq,
			       enum pbx_error code, const char *fmt, ...)
{
	struct sandbox_error err;
	char detail[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	sandbox_error_set(&err, code, "%s", detail);
	char res[SANDBOX_ERRMSG + 8];
	snprintf(res, sizeof(res), "error: %s", err.msg);
	const char *name = sandbox_msg_name(type);
	char what[32];
	if (!name) {
		snprintf(what, sizeof(what), "FRAME type=0x%x", type & 0xffff);
		name = what;
	}
	sandbox_log_write(peer, name, NULL, res);
	sandbox_debug("frame error: %s", err.msg);
	return sandbox_send_error(fd, type, seq, &err);
}

static void sandbox_client_serve(int fd)
{
	struct ucred cred;
	socklen_t cl = sizeof(cred);
	struct sandbox_peer peer = { -1, (uid_t)-1 };
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0) {
		peer.pid = cred.pid;
		peer.uid = cred.uid;
	}
	if (peer.uid != 0 && peer.uid != geteuid()) {
		/* Echo the first request's type and seq if it arrives quickly. */
		uint8_t h[PBX_HEADER_SIZE];
		unsigned type = 0;
		uint32_t seq = 0, magic;
		struct pollfd pfd = { fd, POLLIN, 0 };
		if (poll(&pfd, 1, SANDBOX_PERM_WAIT_MS) == 1 && recv(fd, h, sizeof(h), MSG_DONTWAIT) == sizeof(h)) {
			memcpy(&magic, h, 4);
			if (magic == PBX_MAGIC) {
				uint16_t t;
				memcpy(&t, h + 6, 2);
				memcpy(&seq, h + 8, 4);
				type = t;
			}
		}
		sandbox_frame_error(fd, &peer, type, seq, PBX_E_PERMISSION, "uid %u (only 0 and %u are served)",
				    (unsigned)peer.uid, (unsigned)geteuid());
		return;
	}
	struct timeval tv = { sandbox_timeout_ms / 1000, (sandbox_timeout_ms % 1000) * 1000 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	for (;;) {
		uint8_t h[PBX_HEADER_SIZE];
		int rc = sandbox_recv_full(fd, h, sizeof(h));
		if (rc != 1) {
			if (rc < 0)
				sandbox_debug("client pid %d dropped (timeout, error or truncated header)", (int)peer.pid);
			return;
		}
		uint32_t magic, seq, len;
		uint16_t ver, type;
		memcpy(&magic, h, 4);
		memcpy(&ver, h + 4, 2);
		memcpy(&type, h + 6, 2);
		memcpy(&seq, h + 8, 4);
		memcpy(&len, h + 12, 4);
		if (magic != PBX_MAGIC) {
			sandbox_frame_error(fd, &peer, type, seq, PBX_E_BAD_MAGIC, "0x%08x", magic);
			return;	/* the stream cannot be resynchronised */
		}
		if (len > PBX_MAX_PAYLOAD) {
			sandbox_frame_error(fd, &peer, type, seq, PBX_E_TOO_LARGE, "%u bytes, maximum %u", len,
					    (unsigned)PBX_MAX_PAYLOAD);
			return;
		}
		if (ver != PBX_VERSION) {
			if (sandbox_recv_skip(fd, len) != 0)
				return;
			if (sandbox_frame_error(fd, &peer, type, seq, PBX_E_BAD_VERSION, "version %u, agent speaks %d",
						ver, PBX_VERSION) != 0)
				return;
			continue;
		}
		if (!sandbox_msg_name(type)) {
			if (sandbox_recv_skip(fd, len) != 0)
				return;
			if (sandbox_frame_error(fd, &peer, type, seq, PBX_E_UNKNOWN_MESSAGE, "type %u", type) != 0)
				return;
			continue;
		}
		uint8_t *payload = malloc(len ? len : 1);
		if (!payload) {
			if (sandbox_recv_skip(fd, len) != 0 ||
			    sandbox_frame_error(fd, &peer, type, seq, PBX_E_NO_MEMORY, "payload of %u bytes", len) != 0)
				return;
			continue;
		}
		if (sandbox_recv_full(fd, payload, len) != 1) {
			/* Closed or stalled inside a frame: dropped without effect. */
			sandbox_debug("client pid %d dropped inside a %s frame", (int)peer.pid, sandbox_msg_name(type));
			free(payload);
			return;
		}
		rc = sandbox_request_serve(fd, &peer, type, seq, payload, len);
		free(payload);
		if (rc != 0)
			return;
	}
}

static void *sandbox_listen_thread(void *arg)
{
	(void)arg;
	sigset_t all;
	/* Host signals go to host threads (also blocked around pthread_create). */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	pthread_setname_np(pthread_self(), "patchbox-agent");
	int lfd = sandbox_listen_fd;
	/* Pairs with the store in patchbox_agent_stop, before its shutdown(). */
	while (!__atomic_load_n(&sandbox_stopping, __ATOMIC_ACQUIRE)) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (__atomic_load_n(&sandbox_stopping, __ATOMIC_ACQUIRE))
				break;
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EBADF || errno == ENOTSOCK || errno == EINVAL) {
				sandbox_stderr_print("patchbox: agent stopped: accept: %s", strerror(errno));
				break;
			}
			/* EMFILE, ENOMEM...: wait instead of spinning. */
			struct timespec ts = { 0, 100 * 1000 * 1000 };
			nanosleep(&ts, NULL);
			continue;
		}
		pthread_mutex_lock(&sandbox_client_lock);
		sandbox_client_fd = fd;
		pthread_mutex_unlock(&sandbox_client_lock);
		sandbox_client_serve(fd);
		pthread_mutex_lock(&sandbox_client_lock);
		sandbox_client_fd = -1;
		pthread_mutex_unlock(&sandbox_client_lock);
		close(fd);
	}
	return NULL;
}

/* ------------------------------------------------------------------ start / stop */

static int sandbox_start_fail(int rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int sandbox_start_fail(int rc, const char *fmt, ...)
{
	if (!sandbox_start_reported++) {
		char buf[768];
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(buf, sizeof(buf), fmt, ap);
		va_end(ap);
		sandbox_stderr_print("patchbox: agent not started: %s", buf);
	}
	return rc;
}

/* Binds path, replacing a stale socket file (nobody accepting on it). */
static int sandbox_socket_bind(int fd, const struct sockaddr_un *addr)
{
	if (bind(fd, (const struct sockaddr *)addr, sizeof(*addr)) == 0)
		return 0;
	if (errno != EADDRINUSE)
		return -errno;
	int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (probe < 0)
		return -errno;
	int rc = connect(probe, (const struct sockaddr *)addr, sizeof(*addr));
	int e = errno;
	close(probe);
	if (rc == 0)
		return -EADDRINUSE;	/* a live agent owns it */
	if (e != ECONNREFUSED)
		return -e;
	if (unlink(addr->sun_path) != 0 && errno != ENOENT)
		return -errno;
	if (bind(fd, (const struct sockaddr *)addr, sizeof(*addr)) != 0)
		return -errno;
	return 0;
}

static void sandbox_atfork_child(void)
{
	/* The child has no agent thread: drop the parent's descriptors and state so
	 * the child neither holds the socket open nor unlinks it at exit. What else the
	 * child keeps, mid-apply too: "Locks and fork" at the top of this file. */
	if (sandbox_listen_fd >= 0)
		close(sandbox_listen_fd);
	if (sandbox_client_fd >= 0)
		close(sandbox_client_fd);
	if (sandbox_log_fd >= 0)
		close(sandbox_log_fd);
	sandbox_listen_fd = sandbox_client_fd = sandbox_log_fd = -1;
	sandbox_started = 0;
	pthread_mutex_init(&sandbox_state_lock, NULL);
	pthread_mutex_init(&sandbox_client_lock, NULL);
}

static int sandbox_agent_start_locked(void)
{
	const char *env = getenv("PATCHBOX_DISABLE");
	if (env && strcmp(env, "1") == 0)
		return -ECANCELED;
	env = getenv("PATCHBOX_DEBUG");
	if (env && strcmp(env, "1") == 0)
		__atomic_store_n(&sandbox_debug_enabled, 1, __ATOMIC_RELAXED);
	env = getenv("PATCHBOX_CLIENT_TIMEOUT_MS");
	sandbox_timeout_ms = SANDBOX_TIMEOUT_MS_DEFAULT;
	if (env && *env) {
		char *end;
		long v = strtol(env, &end, 10);
		if (*end == '\0' && v > 0 && v <= 3600 * 1000)
			sandbox_timeout_ms = (int)v;
	}

	struct sandbox_error err;
	if (sandbox_engine_init(&err) != 0)
		return sandbox_start_fail(-ENOMEM, "%s", err.msg);

	char dir[PATH_MAX];
	env = getenv("PATCHBOX_SOCK_DIR");
	if (env && *env) {
		if (strlen(env) >= sizeof(dir))
			return sandbox_start_fail(-ENAMETOOLONG, "PATCHBOX_SOCK_DIR too long");
		strcpy(dir, env);
	} else {
		const char *exe = sandbox_exe_get()->path;
		const char *slash = strrchr(exe, '/');
		if (!exe[0] || !slash)
			return sandbox_start_fail(-ENOENT, "cannot read /proc/self/exe");
		size_t n = slash == exe ? 1 : (size_t)(slash - exe);
		memcpy(dir, exe, n);
		dir[n] = '\0';
	}
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int n = snprintf(addr.sun_path, sizeof(addr.sun_path), "%s%ssandbox-sock%d", dir,
			 dir[strlen(dir) - 1] == '/' ? "" : "/", (int)getpid());
	if (n < 0 || (size_t)n >= sizeof(addr.sun_path))
		return sandbox_start_fail(-ENAMETOOLONG, "socket path %s/sandbox-sock%d longer than %zu bytes",
					  dir, (int)getpid(), sizeof(addr.sun_path) - 1);

	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return sandbox_start_fail(-errno, "socket: %s", strerror(errno));
	int rc = sandbox_socket_bind(fd, &addr);
	if (rc != 0) {
		close(fd);
		return sandbox_start_fail(rc, "bind %s: %s", addr.sun_path, strerror(-rc));
	}
	/* 0600 before listen(): until then nobody can connect, whatever the umask was. */
	if (chmod(addr.sun_path, 0600) != 0 || listen(fd, 8) != 0) {
		rc = -errno;
		close(fd);
		unlink(addr.sun_path);
		return sandbox_start_fail(rc, "%s: %s", addr.sun_path, strerror(-rc));
	}
	memcpy(sandbox_sock_path, addr.sun_path, sizeof(sandbox_sock_path));

	env = getenv("PATCHBOX_LOG");
	if (env && strcmp(env, "0") == 0)
		sandbox_log_path[0] = '\0';
	else if (env && *env && strlen(env) < sizeof(sandbox_log_path))
		strcpy(sandbox_log_path, env);
	else
		snprintf(sandbox_log_path, sizeof(sandbox_log_path), "%s.log", sandbox_sock_path);
	sandbox_log_reported = 0;
	sandbox_log_fd = -1;

	sandbox_listen_fd = fd;
	/* Read by the new thread, after pthread_create (which orders it anyway). */
	__atomic_store_n(&sandbox_stopping, 0, __ATOMIC_RELEASE);
	sigset_t all, old;
	sigfillset(&all);
	/* The thread inherits this mask: no host signal is ever delivered to it. */
	pthread_sigmask(SIG_BLOCK, &all, &old);
	rc = pthread_create(&sandbox_thread, NULL, sandbox_listen_thread, NULL);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc != 0) {
		close(fd);
		unlink(sandbox_sock_path);
		sandbox_listen_fd = -1;
		sandbox_sock_path[0] = '\0';
		return sandbox_start_fail(-rc, "pthread_create: %s", strerror(rc));
	}
	if (!sandbox_atfork_done++)
		pthread_atfork(NULL, NULL, sandbox_atfork_child);
	sandbox_owner_pid = getpid();
	sandbox_started = 1;
	sandbox_debug("agent listening on %s (log %s)", sandbox_sock_path,
		      sandbox_log_path[0] ? sandbox_log_path : "off");
	return 0;
}

int patchbox_agent_start(void)
{
	pthread_mutex_lock(&sandbox_state_lock);
	int rc = sandbox_started ? 0 : sandbox_agent_start_locked();
	pthread_mutex_unlock(&sandbox_state_lock);
	return rc;
}

void patchbox_agent_stop(void)
{
	pthread_mutex_lock(&sandbox_state_lock);
	if (sandbox_started && sandbox_owner_pid == getpid() && !pthread_equal(pthread_self(), sandbox_thread)) {
		__atomic_store_n(&sandbox_stopping, 1, __ATOMIC_RELEASE);
		/* Wakes accept() (pairs with the stopping check in the thread). */
		shutdown(sandbox_listen_fd, SHUT_RDWR);
		pthread_mutex_lock(&sandbox_client_lock);
		if (sandbox_client_fd >= 0)
			shutdown(sandbox_client_fd, SHUT_RDWR);
		pthread_mutex_unlock(&sandbox_client_lock);
		pthread_join(sandbox_thread, NULL);
		close(sandbox_listen_fd);
		sandbox_listen_fd = -1;
		unlink(sandbox_sock_path);
		sandbox_sock_path[0] = '\0';
		if (sandbox_log_fd >= 0)
			close(sandbox_log_fd);
		sandbox_log_fd = -1;
		sandbox_started = 0;
	}
	pthread_mutex_unlock(&sandbox_state_lock);
}

__attribute__((constructor)) static void sandbox_agent_ctor(void)
{
	patchbox_agent_start();
}

/* At exit the socket file goes; the thread dies with the process. Not in a forked
 * child (sandbox_owner_pid), whose parent still serves on it. */
__attribute__((destructor)) static void sandbox_agent_dtor(void)
{
	if (sandbox_started && sandbox_owner_pid == getpid() && sandbox_sock_path[0])
		unlink(sandbox_sock_path);
}

