/* Part of sandbox-listen.o: the server. The agent thread and the per-connection
 * loop (peer check, framing), start / stop, what a fork leaves and starts, the
 * request log, debug output and the constructor/destructor; the locks and the
 * rules that go with them ("Locks and fork" below). The socket file and the
 * agent's descriptors are sandbox-sock.c's; each request is answered by
 * sandbox-messages.c over sandbox-wire.c.
 *
 * One thread waits in poll() on the listening socket (no CPU when idle; it wakes
 * once a second to check that its descriptors are still its own) and serves one
 * client at a time. Nothing in here may stop the host program or the serving
 * thread: no exit/abort, every length checked, every failure becomes an error
 * reply or a dropped connection. Frames and errors follow docs/protocol.md.
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
#define SANDBOX_CHECK_MS 1000		/* the thread checks its descriptors at least this often */
#define SANDBOX_FORK_DELAY_MS_DEFAULT 200 /* a forked child binds its socket after this */
#define SANDBOX_FORK_WAIT_MS 2000	/* longest a fork waits for the agent's locks */
#define SANDBOX_RETRY_MAX_MS 60000	/* longest pause between two binds that failed */

/* ------------------------------------------------------------------ locks and fork
 *
 * Locks and fork. There are two threads of interest: the *agent thread*, which
 * serves the socket and alone runs the engine, and *host threads*, which may call
 * patchbox_agent_start / patchbox_agent_stop (the constructor is one of them) and
 * fork. Three locks, always taken in this order: state, sock, engine.
 *
 * sandbox_state_lock is a coarse lock over start and stop: whether an agent
 * thread runs (sandbox_started), its handle and the pid that made it, the
 * settings read at start (socket directory, client timeout, fork delay, log
 * setting), the one-time engine_init and atfork registration. Start and stop run
 * whole under it. The agent thread never takes it: start writes what the thread
 * reads before pthread_create, and stop touches it again only after
 * pthread_join, so stop can join while holding it. sandbox_stopping is the one
 * word both sides touch meanwhile: an atomic, stored with release by stop,
 * loaded with acquire by the thread (pairs with the shutdown() that wakes its
 * poll()).
 *
 * sandbox_sock_lock guards the socket (sandbox_sock: the directory's descriptor,
 * the listening socket, the name, whether the file is ours), the connection being
 * served (sandbox_client, for stop's shutdown), sandbox_owner_pid (whose file the
 * socket is) and sandbox_exiting (the destructor ran: bind nothing more). The
 * agent thread takes it around each bind (start, a rebind after the program
 * closed its descriptors, a forked child's first) and to publish and clear the
 * connection; stop to shut both down and to unbind; the destructor to unlink. It
 * is never held across a blocking call (poll, accept, serving a client). The
 * agent thread alone writes the socket while it runs, so it reads it unlocked.
 *
 * The engine lock (sandbox-engine.c) is held by the agent thread from before the
 * first change an APPLY, REMOVE or TEST makes to after the last (placement, pages
 * made writable, redirects published, pages r-x again, patch table updated); it
 * is not held while imports are resolved with dlsym (the loader's lock may be held
 * by a thread that forks from a library constructor). The engine's state has no
 * other lock: only the agent thread touches it. sandbox_debug_enabled is an
 * atomic any thread may read or write (relaxed: a switch, it orders nothing).
 *
 * The agent thread's own, untouched by others while it runs: the log descriptor,
 * sandbox_sock_path and sandbox_log_path (written at each bind, read by INFO).
 *
 * fork keeps only the calling thread. The agent registers pthread_atfork handlers
 * at its first start:
 * - prepare takes the three locks in order, each until one deadline
 *   (SANDBOX_FORK_WAIT_MS): a fork waits for an apply, remove or self-test in
 *   progress to end, for a bind, a start or a stop, never longer. glibc runs the
 *   prepare handlers before it takes its own locks (posix/fork.c since 2.34: the
 *   prepare handlers, then _IO_list_lock and __malloc_fork_lock_parent; the same
 *   order in Debian's 2.36 libc.so.6), so the agent thread can finish an apply
 *   that allocates while the forking thread waits. Prepare handlers run in reverse
 *   order of registration: the agent allocates once before it registers, so a
 *   replacement allocator (jemalloc, tcmalloc) is initialised and has registered
 *   its own handler (which locks its arenas) first, to run after the agent's.
 * - parent releases what prepare took.
 * - child resets the three locks (the forking thread held them; the child's
 *   thread has another id), closes the child's copies of the listening socket,
 *   the served connection and the log if they are still the agent's (the socket
 *   file stays: it is the parent's, and sandbox_owner_pid keeps the destructor
 *   from unlinking it) and keeps the directory's descriptor. If prepare took all
 *   three locks, no change was in progress: the child's code is as the parent's
 *   was between two requests (each redirect whole, every page r-x) and its engine
 *   lists exactly the patches it holds. The handler then starts a fresh agent
 *   thread, which waits PATCHBOX_FORK_DELAY_MS (default 200) and then binds
 *   sandbox-sock<childpid>: a child that execs or exits before leaves nothing
 *   behind (exec ends the thread; exit runs the destructor, which sets
 *   sandbox_exiting). If prepare missed a lock (a stuck agent, a fork from a
 *   signal handler that interrupted start), the child gets no agent, said once
 *   on stderr. vfork and posix_spawn run no handlers: nothing happens.
 * Starting a thread in a child handler: POSIX allows only async-signal-safe calls
 * in the child of a multi-threaded process. glibc, which the agent requires (it
 * uses its _NP mutex initialisers and pthread_mutex_clocklock), re-initialises
 * before it runs the child handlers what pthread_create needs: malloc's locks
 * (__malloc_fork_unlock_child), the loader's (dl_load_lock, dl_load_tls_lock) and
 * the thread stack cache (reclaim_stacks); the child has one thread. The rest of
 * the handler is async-signal-safe (fstat, close, stores). The other ways (a
 * signal handler or timer in the host, a thread started lazily by some later
 * call) would touch the host or never run.
 */

int sandbox_debug_enabled;

static pthread_mutex_t sandbox_state_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t sandbox_sock_lock = PTHREAD_MUTEX_INITIALIZER;
/* Under sandbox_state_lock (the agent thread reads some of them, see above): */
static int sandbox_started;		/* an agent thread runs (maybe still waiting to bind) */
static int sandbox_stopping;		/* atomic: written by start and stop, read by the thread */
static pthread_t sandbox_thread;
static pid_t sandbox_thread_pid;	/* the process whose thread sandbox_thread is */
static int sandbox_thread_delay_ms;	/* the thread waits this long before it binds */
static int sandbox_timeout_ms = SANDBOX_TIMEOUT_MS_DEFAULT;
static int sandbox_fork_delay_ms = SANDBOX_FORK_DELAY_MS_DEFAULT;
static char sandbox_log_setting[PATH_MAX];	/* PATCHBOX_LOG: "" beside the socket, "0" off */
static int sandbox_start_reported;
static int sandbox_atfork_done;
/* Which locks prepare took, for parent and child: the forking thread's own (two
 * threads may fork at once, one of them waiting in prepare). */
static __thread int sandbox_fork_locked;
/* Under sandbox_sock_lock: */
static struct sandbox_sock sandbox_sock = { .dirfd = { -1, 0, 0 }, .lfd = { -1, 0, 0 } };
static struct sandbox_fd sandbox_client = { -1, 0, 0 };	/* the connection being served */
static pid_t sandbox_owner_pid;		/* the process whose file sandbox_sock is */
static int sandbox_exiting;		/* the destructor ran */
/* The agent thread's (see above): */
char sandbox_sock_path[PATH_MAX];
char sandbox_log_path[PATH_MAX];	/* "" = logging off */
static int sandbox_log_beside;		/* the log is <socket name>.log in the socket directory */
static struct sandbox_fd sandbox_log_fd = { -1, 0, 0 };
static int sandbox_log_reported;
static int sandbox_abstract_reported;	/* the fallback to the abstract namespace, said once */
static int sandbox_sweep_pending;	/* a bind succeeded: open the log, sweep the directory */
static pid_t sandbox_parent_sock_pid;	/* a forked child's: the parent's socket, looked at once */
static struct sandbox_fd sandbox_conn = { -1, 0, 0 };	/* sandbox_client_serve's connection */

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

/* Opens the log if it is not open (or not ours any more); 0, or -1 reported once.
 * Called as the agent starts serving, so that the first request (a fleet-wide
 * `apply --all` among thousands of processes) does not pay for creating the file. */
static int sandbox_log_open(void)
{
	if (!sandbox_log_path[0])
		return -1;
	if (sandbox_log_fd.fd >= 0 && !sandbox_fd_ours(&sandbox_log_fd))
		sandbox_log_fd.fd = -1;	/* not ours any more: forgotten, never closed */
	if (sandbox_log_fd.fd >= 0)
		return 0;
	const int flags = O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY;
	char name[sizeof(sandbox_sock.name) + 4];
	snprintf(name, sizeof(name), "%s.log", sandbox_sock.name);
	int rc = sandbox_log_beside && sandbox_fd_ours(&sandbox_sock.dirfd)
			 ? sandbox_sock_file_open(&sandbox_sock, name, &sandbox_log_fd)
			 : sandbox_fd_own(&sandbox_log_fd, open(sandbox_log_path, flags, 0600), 1);
	if (rc != 0) {
		if (!sandbox_log_reported++)
			sandbox_stderr_print("patchbox: cannot open log %s: %s", sandbox_log_path,
					     rc == -EPERM && sandbox_sock.why[0] ? sandbox_sock.why : strerror(-rc));
		return -1;
	}
	if (sandbox_sock.why[0] && !sandbox_log_reported++)	/* a planted file was replaced */
		sandbox_stderr_print("patchbox: log %s: %s", sandbox_log_path, sandbox_sock.why);
	return 0;
}

/* At exit: a log beside the socket that never got a line is removed with it. */
static void sandbox_log_drop_empty(void)
{
	struct stat st, named;
	if (!sandbox_log_beside || !sandbox_fd_ours(&sandbox_log_fd) || fstat(sandbox_log_fd.fd, &st) != 0 ||
	    st.st_size != 0 || !sandbox_fd_ours(&sandbox_sock.dirfd))
		return;
	char name[sizeof(sandbox_sock.name) + 4];
	snprintf(name, sizeof(name), "%s.log", sandbox_sock.name);
	/* Only the file we opened: the name must still be it. */
	if (fstatat(sandbox_sock.dirfd.fd, name, &named, AT_SYMLINK_NOFOLLOW) == 0 && named.st_dev == st.st_dev &&
	    named.st_ino == st.st_ino)
		unlinkat(sandbox_sock.dirfd.fd, name, 0);
}

/* One line per request; failures never affect serving and are reported once. The
 * descriptor is checked before each write: a program that closed it (a daemon
 * closing every descriptor) gets it reopened, never written to. */
void sandbox_log_write(const struct sandbox_peer *peer, const char *what, const char *patch,
		       const char *result)
{
	if (!sandbox_log_path[0])
		return;
	if (sandbox_log_open() != 0)
		return;
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
	if (!sandbox_fd_ours(&sandbox_log_fd))
		return;
	ssize_t w = write(sandbox_log_fd.fd, line, len);
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

int sandbox_conn_ours(int fd)
{
	return fd == sandbox_conn.fd && sandbox_fd_ours(&sandbox_conn);
}

/* Serves the requests of one admitted peer until it closes, stalls or errs. */
static void sandbox_client_loop(int fd, const struct sandbox_peer *peer);

static void sandbox_client_serve(int fd)
{
	struct stat st;
	if (fstat(fd, &st) != 0)
		return;
	sandbox_conn = (struct sandbox_fd){ fd, st.st_dev, st.st_ino };
	struct sandbox_peer peer;
	char why[SANDBOX_ERRMSG - 64];
	sandbox_peer_creds(fd, &peer);
	/* The kernel's ptrace rule, asked at every connection: the process's
	 * dumpability and ids may have changed since the last (sandbox-trust.c). */
	int admitted = sandbox_peer_admit(&peer, why, sizeof(why)) == 0;
	sandbox_peer_release(&peer);
	if (!admitted) {
		/* Echo the first request's type and seq if it arrives quickly. */
		struct pbx_header h;
		unsigned type = 0;
		uint32_t seq = 0;
		struct pollfd pfd = { fd, POLLIN, 0 };
		if (poll(&pfd, 1, SANDBOX_PERM_WAIT_MS) == 1 && sandbox_conn_ours(fd) &&
		    recv(fd, &h, sizeof(h), MSG_DONTWAIT) == sizeof(h) && h.magic == PBX_MAGIC) {
			type = h.type;
			seq = h.seq;
		}
		sandbox_frame_error(fd, &peer, type, seq, PBX_E_PERMISSION, "%s", why);
		return;
	}
	sandbox_client_loop(fd, &peer);
}

static void sandbox_client_loop(int fd, const struct sandbox_peer *peer)
{
	struct timeval tv = { sandbox_timeout_ms / 1000, (sandbox_timeout_ms % 1000) * 1000 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	for (;;) {
		struct pbx_header h;	/* wire.h, from wire/constants.toml */
		int rc = sandbox_recv_full(fd, &h, sizeof(h));
		if (rc != 1) {
			if (rc < 0)
				sandbox_debug("client pid %d dropped (timeout, error or truncated header)", (int)peer->pid);
			return;
		}
		uint32_t magic = h.magic, seq = h.seq, len = h.length;
		uint16_t ver = h.version, type = h.type;
		if (magic != PBX_MAGIC) {
			sandbox_frame_error(fd, peer, type, seq, PBX_E_BAD_MAGIC, "0x%08x", magic);
			return;	/* the stream cannot be resynchronised */
		}
		if (len > PBX_MAX_PAYLOAD) {
			sandbox_frame_error(fd, peer, type, seq, PBX_E_TOO_LARGE, "%u bytes, maximum %u", len,
					    (unsigned)PBX_MAX_PAYLOAD);
			return;
		}
		if (ver != PBX_VERSION) {
			if (sandbox_recv_skip(fd, len) != 0)
				return;
			if (sandbox_frame_error(fd, peer, type, seq, PBX_E_BAD_VERSION, "version %u, agent speaks %d",
						ver, PBX_VERSION) != 0)
				return;
			continue;
		}
		if (!sandbox_msg_name(type)) {
			if (sandbox_recv_skip(fd, len) != 0)
				return;
			if (sandbox_frame_error(fd, peer, type, seq, PBX_E_UNKNOWN_MESSAGE, "type %u", type) != 0)
				return;
			continue;
		}
		uint8_t *payload = malloc(len ? len : 1);
		if (!payload) {
			if (sandbox_recv_skip(fd, len) != 0 ||
			    sandbox_frame_error(fd, peer, type, seq, PBX_E_NO_MEMORY, "payload of %u bytes", len) != 0)
				return;
			continue;
		}
		if (sandbox_recv_full(fd, payload, len) != 1) {
			/* Closed or stalled inside a frame: dropped without effect. */
			sandbox_debug("client pid %d dropped inside a %s frame", (int)peer->pid, sandbox_msg_name(type));
			free(payload);
			return;
		}
		rc = sandbox_request_serve(fd, peer, type, seq, payload, len);
		free(payload);
		if (rc != 0)
			return;
	}
}

/* ------------------------------------------------------------------ the socket */

/* Binds sandbox-sock<pid> anew: at start, in a forked child, and after the program
 * closed the agent's descriptors. Under sandbox_sock_lock; 0 or -errno. */
static int sandbox_sock_setup_locked(void)
{
	if (sandbox_exiting)
		return -ECANCELED;
	if (sandbox_sock.bound && sandbox_owner_pid == getpid() && sandbox_fd_ours(&sandbox_sock.lfd)) {
		/* Ours, but its address names a descriptor number that changed. */
		sandbox_sock_unbind(&sandbox_sock);
		sandbox_fd_close(&sandbox_sock.lfd);
	}
	sandbox_sock.bound = 0;		/* a file left at our name is replaced if stale */
	sandbox_sock.abstract = 0;
	sandbox_sock.lfd.fd = -1;	/* closed above or not ours: forgotten */
	int rc = sandbox_sock_bind(&sandbox_sock, getpid());
	if (rc != 0 && rc != -ECANCELED) {
		/* The directory refuses us: the abstract namespace instead (sandbox-sock.c). */
		char why[sizeof(sandbox_sock.why)];
		snprintf(why, sizeof(why), "%s", rc == -EPERM && sandbox_sock.why[0] ? sandbox_sock.why : strerror(-rc));
		if (sandbox_sock_bind_abstract(&sandbox_sock, getpid()) != 0)
			return rc;
		if (!sandbox_abstract_reported++)
			sandbox_stderr_print("patchbox: agent socket sandbox-sock%d in %s: %s; listening on %s "
					     "instead", (int)getpid(), sandbox_sock.dir, why, sandbox_sock.addr);
	} else if (rc != 0) {
		return rc;
	}
	sandbox_owner_pid = getpid();
	if (sandbox_sock.abstract ||
	    sandbox_sock_path_get(&sandbox_sock, sandbox_sock.name, sandbox_sock_path, sizeof(sandbox_sock_path)))
		snprintf(sandbox_sock_path, sizeof(sandbox_sock_path), "%s", sandbox_sock.addr);
	if (sandbox_log_beside && sandbox_sock.abstract) {
		sandbox_fd_close(&sandbox_log_fd);
		sandbox_log_path[0] = '\0';	/* no directory of ours to log into */
	} else if (sandbox_log_beside) {
		sandbox_fd_close(&sandbox_log_fd);	/* an older name's (a child's parent) */
		if (snprintf(sandbox_log_path, sizeof(sandbox_log_path), "%.*s.log", PATH_MAX - 5,
			     sandbox_sock_path) < 0)
			sandbox_log_path[0] = '\0';
	}
	sandbox_sweep_pending = 1;
	return 0;
}

/* Sleeps ms in short steps; -1 as soon as stop asks the thread to end. */
static int sandbox_wait_ms(int ms)
{
	for (int left = ms; left > 0; left -= 10) {
		if (__atomic_load_n(&sandbox_stopping, __ATOMIC_ACQUIRE))
			return -1;
		struct timespec ts = { 0, (left < 10 ? left : 10) * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	return __atomic_load_n(&sandbox_stopping, __ATOMIC_ACQUIRE) ? -1 : 0;
}

/* ------------------------------------------------------------------ the agent thread */

static void *sandbox_listen_thread(void *arg)
{
	(void)arg;
	sigset_t all;
	/* Host signals go to host threads (also blocked around pthread_create). */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	pthread_setname_np(pthread_self(), "patchbox-agent");
	/* A forked child's thread binds late: a child that execs or exits at once
	 * leaves no socket file. */
	if (sandbox_thread_delay_ms > 0 && sandbox_wait_ms(sandbox_thread_delay_ms) != 0)
		return NULL;
	int retry_ms = 0, reported = 0;
	/* Pairs with the store in patchbox_agent_stop, before its shutdown(). */
	while (!__atomic_load_n(&sandbox_stopping, __ATOMIC_ACQUIRE)) {
		/* The socket, bound anew if the program closed or reused its descriptors. */
		pthread_mutex_lock(&sandbox_sock_lock);
		int rc = sandbox_sock_check(&sandbox_sock) == 0 ? 0 : sandbox_sock_setup_locked();
		pthread_mutex_unlock(&sandbox_sock_lock);
		if (rc == -ECANCELED)
			break;	/* the process is exiting */
		if (rc != 0) {
			if (!reported++)
				sandbox_stderr_print("patchbox: agent socket sandbox-sock%d in %s: %s (retrying)",
						     (int)getpid(), sandbox_sock.dir,
						     rc == -EPERM && sandbox_sock.why[0] ? sandbox_sock.why : strerror(-rc));
			retry_ms = retry_ms ? retry_ms * 2 : SANDBOX_CHECK_MS;
			if (retry_ms > SANDBOX_RETRY_MAX_MS)
				retry_ms = SANDBOX_RETRY_MAX_MS;
			if (sandbox_wait_ms(retry_ms) != 0)
				break;
			continue;
		}
		retry_ms = reported = 0;
		if (sandbox_sweep_pending) {
			sandbox_log_open();
			sandbox_sweep_pending = 0;
			int n = 0;
			if (sandbox_parent_sock_pid)
				n += sandbox_sock_sweep_pid(&sandbox_sock, sandbox_parent_sock_pid, getpid());
			sandbox_parent_sock_pid = 0;
			/* Only a quiet directory: no storm of sweeps (sandbox-sock.c). */
			if (sandbox_sock.quiet)
				n += sandbox_sock_sweep(&sandbox_sock, getpid());
			if (n)
				sandbox_debug("removed %d stale socket%s in %s", n, n > 1 ? "s" : "", sandbox_sock.dir);
		}

		if (__atomic_load_n(&sandbox_stopping, __ATOMIC_ACQUIRE))
			break;	/* stop's shutdown() may have hit the socket just replaced */
		struct pollfd pfd = { sandbox_sock.lfd.fd, POLLIN, 0 };
		int n = poll(&pfd, 1, SANDBOX_CHECK_MS);
		if (__atomic_load_n(&sandbox_stopping, __ATOMIC_ACQUIRE))
			break;
		if (n <= 0 || !sandbox_fd_ours(&sandbox_sock.lfd))
			continue;	/* timeout, or not ours any more: checked again above */
		struct sandbox_fd c;
		rc = sandbox_fd_own(&c, accept4(sandbox_sock.lfd.fd, NULL, NULL, SOCK_CLOEXEC), 1);
		if (rc != 0) {
			if (rc == -EAGAIN || rc == -EINTR || rc == -ECONNABORTED)
				continue;
			if (rc == -EBADF || rc == -ENOTSOCK || rc == -EINVAL) {
				/* Not a listening socket of ours: bind anew. */
				pthread_mutex_lock(&sandbox_sock_lock);
				sandbox_sock.lfd.fd = -1;
				pthread_mutex_unlock(&sandbox_sock_lock);
			}
			/* EMFILE, ENOMEM...: wait instead of spinning. */
			struct timespec ts = { 0, 100 * 1000 * 1000 };
			nanosleep(&ts, NULL);
			continue;
		}
		pthread_mutex_lock(&sandbox_sock_lock);
		sandbox_client = c;
		pthread_mutex_unlock(&sandbox_sock_lock);
		sandbox_client_serve(c.fd);
		pthread_mutex_lock(&sandbox_sock_lock);
		sandbox_fd_close(&sandbox_client);
		pthread_mutex_unlock(&sandbox_sock_lock);
	}
	return NULL;
}

/* Starts the agent thread (signals blocked in it); 0 or the pthread_create error. */
static int sandbox_thread_create(int delay_ms)
{
	sandbox_thread_delay_ms = delay_ms;
	/* Read by the new thread, after pthread_create (which orders it anyway). */
	__atomic_store_n(&sandbox_stopping, 0, __ATOMIC_RELEASE);
	sigset_t all, old;
	sigfillset(&all);
	/* The thread inherits this mask: no host signal is ever delivered to it. */
	pthread_sigmask(SIG_BLOCK, &all, &old);
	int rc = pthread_create(&sandbox_thread, NULL, sandbox_listen_thread, NULL);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc == 0) {
		sandbox_thread_pid = getpid();
		sandbox_started = 1;
	}
	return rc;
}

/* ------------------------------------------------------------------ fork */

static void sandbox_atfork_prepare(void)
{
	struct timespec deadline;
	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_sec += SANDBOX_FORK_WAIT_MS / 1000;
	deadline.tv_nsec += (long)(SANDBOX_FORK_WAIT_MS % 1000) * 1000000;
	if (deadline.tv_nsec >= 1000000000) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000;
	}
	int got = 0;
	if (pthread_mutex_clocklock(&sandbox_state_lock, CLOCK_MONOTONIC, &deadline) == 0)
		got |= 1;
	if (pthread_mutex_clocklock(&sandbox_sock_lock, CLOCK_MONOTONIC, &deadline) == 0)
		got |= 2;
	if (sandbox_engine_fork(SANDBOX_FORK_PREPARE, &deadline) == 0)
		got |= 4;
	sandbox_fork_locked = got;
}

static void sandbox_atfork_parent(void)
{
	int got = sandbox_fork_locked;
	sandbox_fork_locked = 0;
	if (got & 4)
		sandbox_engine_fork(SANDBOX_FORK_PARENT, NULL);
	if (got & 2)
		pthread_mutex_unlock(&sandbox_sock_lock);
	if (got & 1)
		pthread_mutex_unlock(&sandbox_state_lock);
}

static void sandbox_atfork_child(void)
{
	/* What the child keeps and why a thread may start here: "Locks and fork". */
	static const pthread_mutex_t init = PTHREAD_MUTEX_INITIALIZER;
	int got = sandbox_fork_locked;
	sandbox_fork_locked = 0;
	memcpy(&sandbox_state_lock, &init, sizeof(init));
	memcpy(&sandbox_sock_lock, &init, sizeof(init));
	sandbox_engine_fork(SANDBOX_FORK_CHILD, NULL);
	if (!sandbox_started)
		return;
	sandbox_started = 0;
	sandbox_fd_close(&sandbox_sock.lfd);
	sandbox_fd_close(&sandbox_client);
	sandbox_fd_close(&sandbox_log_fd);
	sandbox_sock.bound = 0;
	sandbox_parent_sock_pid = sandbox_owner_pid;	/* if it dies without its destructor */
	sandbox_owner_pid = 0;
	sandbox_sock_path[0] = '\0';
	if (!sandbox_fd_ours(&sandbox_sock.dirfd))
		sandbox_sock.dirfd.fd = -1;	/* reopened by path when the child binds */
	if (got != 7) {
		sandbox_fd_close(&sandbox_sock.dirfd);
		sandbox_stderr_print("patchbox[%d]: no agent in this forked child: the parent's agent was busy "
				     "past %d ms at the fork", (int)getpid(), SANDBOX_FORK_WAIT_MS);
		return;
	}
	if (sandbox_thread_create(sandbox_fork_delay_ms) != 0)
		sandbox_fd_close(&sandbox_sock.dirfd);
}

/* ------------------------------------------------------------------ start / stop */

static int sandbox_start_fail(int rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int sandbox_start_fail(int rc, const char *fmt, ...)
{
	if (!sandbox_start_reported++) {
		char buf[PATH_MAX + 256];
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(buf, sizeof(buf), fmt, ap);
		va_end(ap);
		sandbox_stderr_print("patchbox: agent not started: %s", buf);
	}
	return rc;
}

/* A non-negative number of milliseconds from the environment, else def. */
static int sandbox_env_ms(const char *name, int def, long max)
{
	const char *env = sandbox_getenv(name);
	if (!env || !*env)
		return def;
	char *end;
	long v = strtol(env, &end, 10);
	return *end == '\0' && v >= 0 && v <= max ? (int)v : def;
}

static int sandbox_agent_start_locked(void)
{
	const char *env = sandbox_getenv("PATCHBOX_DISABLE");
	if (env && strcmp(env, "1") == 0)
		return -ECANCELED;
	env = sandbox_getenv("PATCHBOX_DEBUG");
	if (env && strcmp(env, "1") == 0)
		__atomic_store_n(&sandbox_debug_enabled, 1, __ATOMIC_RELAXED);
	sandbox_timeout_ms = sandbox_env_ms("PATCHBOX_CLIENT_TIMEOUT_MS", SANDBOX_TIMEOUT_MS_DEFAULT, 3600 * 1000);
	if (sandbox_timeout_ms == 0)
		sandbox_timeout_ms = SANDBOX_TIMEOUT_MS_DEFAULT;
	sandbox_fork_delay_ms = sandbox_env_ms("PATCHBOX_FORK_DELAY_MS", SANDBOX_FORK_DELAY_MS_DEFAULT, 3600 * 1000);
	env = sandbox_getenv("PATCHBOX_LOG");
	snprintf(sandbox_log_setting, sizeof(sandbox_log_setting), "%s", env && strlen(env) < PATH_MAX ? env : "");

	struct sandbox_error err;
	if (sandbox_engine_init(&err) != 0)
		return sandbox_start_fail(-ENOMEM, "%s", err.msg);

	char dir[PATH_MAX];
	env = sandbox_getenv("PATCHBOX_SOCK_DIR");
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
	sandbox_log_beside = !sandbox_log_setting[0];
	if (strcmp(sandbox_log_setting, "0") == 0)
		sandbox_log_path[0] = '\0';
	else if (sandbox_log_setting[0])
		strcpy(sandbox_log_path, sandbox_log_setting);
	sandbox_log_reported = 0;

	pthread_mutex_lock(&sandbox_sock_lock);
	int rc = sandbox_sock_dir_open(&sandbox_sock, dir);
	/* A directory this process may not trust (another user's: a root daemon pointed
	 * at its own user's directory) is left untouched: the socket goes to the abstract
	 * namespace instead (sandbox_sock_setup_locked; docs/security.md). */
	if (rc != 0 && rc != -EPERM) {
		pthread_mutex_unlock(&sandbox_sock_lock);
		return sandbox_start_fail(rc, "socket directory %s: %s", dir,
					  sandbox_sock.why[0] ? sandbox_sock.why : strerror(-rc));
	}
	rc = sandbox_sock_setup_locked();
	if (rc == -EPERM || rc == -EADDRINUSE) {
		/* Not even the abstract name (squatted?): the agent thread retries. */
		sandbox_fd_close(&sandbox_sock.dirfd);
	} else if (rc != 0) {
		sandbox_fd_close(&sandbox_sock.dirfd);
		pthread_mutex_unlock(&sandbox_sock_lock);
		return sandbox_start_fail(rc, "bind %s/sandbox-sock%d: %s", sandbox_sock.dir, (int)getpid(),
					  strerror(-rc));
	}
	pthread_mutex_unlock(&sandbox_sock_lock);

	/* The store after the bind, before serving: a process `install --apply` does not
	 * list (no socket yet) reads the store after the patch file is in place
	 * (docs/host.md, "A process that starts while an install is in progress"). */
	sandbox_store_apply();

	rc = sandbox_thread_create(0);
	if (rc != 0) {
		pthread_mutex_lock(&sandbox_sock_lock);
		sandbox_sock_unbind(&sandbox_sock);
		sandbox_fd_close(&sandbox_sock.lfd);
		sandbox_fd_close(&sandbox_sock.dirfd);
		sandbox_sock_path[0] = '\0';
		pthread_mutex_unlock(&sandbox_sock_lock);
		return sandbox_start_fail(-rc, "pthread_create: %s", strerror(rc));
	}
	if (!sandbox_atfork_done++) {
		/* A replacement allocator registers its fork handlers when it first
		 * runs: make that happen before ours ("Locks and fork"). Through a
		 * volatile, or the compiler drops the unused malloc/free pair. */
		void *volatile first = malloc(1);
		free(first);
		pthread_atfork(sandbox_atfork_prepare, sandbox_atfork_parent, sandbox_atfork_child);
	}
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
	if (sandbox_started && sandbox_thread_pid == getpid() && !pthread_equal(pthread_self(), sandbox_thread)) {
		__atomic_store_n(&sandbox_stopping, 1, __ATOMIC_RELEASE);
		/* Wakes poll() (pairs with the stopping check in the thread); the thread
		 * also looks at the flag at least every SANDBOX_CHECK_MS. */
		pthread_mutex_lock(&sandbox_sock_lock);
		if (sandbox_fd_ours(&sandbox_sock.lfd))
			shutdown(sandbox_sock.lfd.fd, SHUT_RDWR);
		if (sandbox_fd_ours(&sandbox_client))
			shutdown(sandbox_client.fd, SHUT_RDWR);
		pthread_mutex_unlock(&sandbox_sock_lock);
		pthread_join(sandbox_thread, NULL);
		pthread_mutex_lock(&sandbox_sock_lock);
		if (sandbox_owner_pid == getpid()) {
			sandbox_log_drop_empty();
			sandbox_sock_unbind(&sandbox_sock);
		}
		sandbox_fd_close(&sandbox_sock.lfd);
		sandbox_fd_close(&sandbox_sock.dirfd);
		sandbox_sock.bound = 0;
		sandbox_owner_pid = 0;
		sandbox_sock_path[0] = '\0';
		pthread_mutex_unlock(&sandbox_sock_lock);
		sandbox_fd_close(&sandbox_log_fd);
		sandbox_started = 0;
	}
	pthread_mutex_unlock(&sandbox_state_lock);
}

__attribute__((constructor)) static void sandbox_agent_ctor(void)
{
	patchbox_agent_start();
}

/* At exit the socket file goes; the thread dies with the process. Only the file of
 * this process (sandbox_owner_pid): a forked child leaves its parent's. A thread
 * still waiting to bind binds nothing after this (sandbox_exiting). */
__attribute__((destructor)) static void sandbox_agent_dtor(void)
{
	pthread_mutex_lock(&sandbox_sock_lock);
	sandbox_exiting = 1;
	if (sandbox_sock.bound && sandbox_owner_pid == getpid()) {
		sandbox_log_drop_empty();
		sandbox_sock_unbind(&sandbox_sock);
	}
	pthread_mutex_unlock(&sandbox_sock_lock);
}
