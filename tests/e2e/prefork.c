/* A pre-forking daemon for the end-to-end tests, linked with the agent: the layout of
 * the usual web server. The master runs as root and keeps root; it opens one listening
 * Unix socket per process, then forks two workers that change to nobody (setgroups,
 * setresgid, setresuid) right after fork and serve their own socket:
 *
 *   prefork RUNDIR [MODE]
 *
 *   RUNDIR/master.sock, RUNDIR/worker1.sock, RUNDIR/worker2.sock
 *       one request per connection, "N\n", answered "PID answer(N)\n"
 *   MODE  "" (both workers keep the agent they got at fork) or
 *         "w2-stopped" (worker 2 stops its agent before it drops root, as a program
 *         that disables it in its workers would: it runs the build without an agent)
 *
 * Prints "ready MASTER WORKER1 WORKER2" on stdout once the workers run; the master ends
 * (and SIGTERMs the workers) when its stdin closes. The workers die with the master
 * (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

void patchbox_agent_stop(void);

#define NOBODY 65534

__attribute__((noinline)) int answer(int x)
{
	return @ANSWER@;
}

static int listen_at(const char *dir, const char *name)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	if (snprintf(a.sun_path, sizeof(a.sun_path), "%s/%s", dir, name) >= (int)sizeof(a.sun_path))
		exit(2);
	unlink(a.sun_path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(fd, 16) != 0) {
		perror(name);
		exit(2);
	}
	return fd;
}

static void serve_one(int lfd)
{
	int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	if (c < 0)
		return;
	char buf[32] = { 0 }, out[64];
	if (read(c, buf, sizeof(buf) - 1) > 0) {
		int n = snprintf(out, sizeof(out), "%d %d\n", (int)getpid(), answer(atoi(buf)));
		if (write(c, out, (size_t)n) != n)
			perror("write");
	}
	close(c);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	const char *mode = argc > 2 ? argv[2] : "";
	int lfd[3] = { listen_at(argv[1], "master.sock"), listen_at(argv[1], "worker1.sock"),
		       listen_at(argv[1], "worker2.sock") };
	pid_t workers[2];
	for (int i = 0; i < 2; i++) {
		workers[i] = fork();
		if (workers[i] < 0)
			return 2;
		if (workers[i] == 0) {
			pid_t master = getppid();
			if (i == 1 && strcmp(mode, "w2-stopped") == 0)
				patchbox_agent_stop();
			/* Root's work is done: the worker serves as nobody from here. */
			if (setgroups(0, NULL) != 0 || setresgid(NOBODY, NOBODY, NOBODY) != 0 ||
			    setresuid(NOBODY, NOBODY, NOBODY) != 0)
				_exit(3);
			/* After the change: a credential change clears the parent-death signal. */
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			if (getppid() != master)
				_exit(0);	/* the master died meanwhile */
			for (;;)
				serve_one(lfd[1 + i]);
		}
	}
	close(lfd[1]);
	close(lfd[2]);
	printf("ready %d %d %d\n", (int)getpid(), (int)workers[0], (int)workers[1]);
	fflush(stdout);
	struct pollfd p[2] = { { 0, POLLIN, 0 }, { lfd[0], POLLIN, 0 } };
	for (;;) {
		if (poll(p, 2, -1) < 0)
			continue;
		if (p[0].revents) {
			char c;
			if (read(0, &c, 1) <= 0)
				break;
		}
		if (p[1].revents & POLLIN)
			serve_one(lfd[0]);
	}
	for (int i = 0; i < 2; i++) {
		kill(workers[i], SIGTERM);
		waitpid(workers[i], NULL, 0);
	}
	return 0;
}
