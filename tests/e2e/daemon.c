/* A classic daemon for the end-to-end tests, linked with the agent.
 *
 *   daemon RUNDIR MODE
 *
 * forks, setsid, forks again, chdir("/"), closes every descriptor up to the limit,
 * points 0-2 at /dev/null, then serves lines on the Unix socket RUNDIR/service.sock
 * and writes its pid to RUNDIR/daemon.pid. MODE says when the descriptors go:
 *   early  right after the second fork (before the agent's delayed bind)
 *   late   600 ms later (the agent has bound and listens: it must notice and rebind)
 *   reuse  as late, then the service socket is dup2'ed onto the 64 numbers below
 *          min(limit, 1024): the agent's old numbers now name the daemon's own socket
 *   daemon3  glibc's daemon(0, 0) instead: one fork, the parent _exits (no destructor:
 *          its socket is left for the daemon's agent to sweep), stdio on /dev/null
 * Requests, one per connection, answered with one line:
 *   answer N   answer(N)                      (the function the tests patch)
 *   spawn 0    fork + execv /bin/true, waited for; answers the child's pid
 *   worker N   fork; the child lives N ms then exit(0); answers the child's pid
 */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) int answer(int x)
{
	return @ANSWER@;
}

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };
	nanosleep(&ts, NULL);
}

static int fd_limit(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur > 65536)
		return 65536;
	return (int)rl.rlim_cur;
}

static void close_every_fd(void)
{
	int limit = fd_limit();
	for (int fd = 0; fd < limit; fd++)
		close(fd);
	int null = open("/dev/null", O_RDWR);
	dup2(null, 0);
	dup2(null, 1);
	dup2(null, 2);
	if (null > 2)
		close(null);
}

static int serve_socket(const char *rundir)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	snprintf(a.sun_path, sizeof(a.sun_path), "%s/service.sock", rundir);
	unlink(a.sun_path);
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(s, 16) != 0)
		_exit(3);
	return s;
}

static void write_pidfile(const char *rundir)
{
	char tmp[4096], path[4096], buf[32];
	snprintf(tmp, sizeof(tmp), "%s/daemon.pid.tmp", rundir);
	snprintf(path, sizeof(path), "%s/daemon.pid", rundir);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	int n = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
	if (fd < 0 || write(fd, buf, n) != n || close(fd) != 0 || rename(tmp, path) != 0)
		_exit(4);
}

static int handle(const char *line)
{
	char cmd[32];
	int arg;
	if (sscanf(line, "%31s %d", cmd, &arg) != 2)
		return -1;
	if (strcmp(cmd, "answer") == 0)
		return answer(arg);
	if (strcmp(cmd, "spawn") == 0) {
		pid_t child = fork();
		if (child == 0) {
			char *argv[] = { "true", NULL };
			execv("/bin/true", argv);
			_exit(127);
		}
		if (child > 0)
			waitpid(child, NULL, 0);
		return (int)child;
	}
	if (strcmp(cmd, "worker") == 0) {
		pid_t child = fork();
		if (child == 0) {
			sleep_ms(arg);
			exit(0);	/* a normal exit: the child's destructors run */
		}
		return (int)child;
	}
	return -1;
}

static int serve(const char *rundir, int s);

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	const char *rundir = argv[1], *mode = argv[2];
	if (strcmp(mode, "daemon3") == 0) {
		if (daemon(0, 0) != 0)
			return 1;
		signal(SIGCHLD, SIG_IGN);
		return serve(rundir, serve_socket(rundir));
	}
	pid_t pid = fork();
	if (pid < 0)
		return 1;
	if (pid > 0)
		exit(0);
	setsid();
	pid = fork();
	if (pid < 0)
		exit(1);
	if (pid > 0)
		exit(0);
	if (chdir("/") != 0)
		_exit(1);
	signal(SIGCHLD, SIG_IGN);	/* workers are reaped by the kernel */
	int s;
	if (strcmp(mode, "early") == 0) {
		close_every_fd();
		s = serve_socket(rundir);
	} else {
		sleep_ms(600);
		close_every_fd();
		s = serve_socket(rundir);
		if (strcmp(mode, "reuse") == 0) {
			/* The top 64 numbers below min(limit, 1024), where the agent keeps its own. */
			int top = fd_limit() < 1024 ? fd_limit() : 1024;
			for (int fd = top - 64; fd < top; fd++)
				if (fd > 2 && fd != s)
					dup2(s, fd);
		}
	}
	return serve(rundir, s);
}

static int serve(const char *rundir, int s)
{
	write_pidfile(rundir);
	for (;;) {
		int c = accept(s, NULL, NULL);
		if (c < 0)
			continue;
		char line[128];
		ssize_t n = read(c, line, sizeof(line) - 1);
		if (n > 0) {
			line[n] = '\0';
			char out[32];
			int len = snprintf(out, sizeof(out), "%d\n", handle(line));
			if (write(c, out, len) != len)
				(void)0;
		}
		close(c);
	}
}
