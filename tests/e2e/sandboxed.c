/* A server that forks children which sandbox themselves before their agent binds, as
 * OpenSSH's pre-authentication child does (sandbox-seccomp-filter.c, ssh_sandbox_child):
 * RLIMIT_NOFILE 1, no_new_privs, and a seccomp filter on the forking thread that denies
 * socket(); the agent's thread, started by its fork handler before the filter, then
 * cannot open a descriptor and never listens. Linked with the agent.
 * stdin: "answer N" prints answer(N); "fork MS" forks a sandboxed child, prints
 * "forked PID", and the child prints "child PID answer(4)" after MS ms, then exits.
 */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) int answer(int x) { return x * 10 + @ADD@; }

static void sandbox(void)
{
	struct rlimit one = { 1, 1 };
	struct sock_filter filter[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_socket, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EACCES),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { sizeof(filter) / sizeof(filter[0]), filter };
	if (setrlimit(RLIMIT_NOFILE, &one) || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) ||
	    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
		_exit(2);
}

int main(void)
{
	char line[128];
	signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", (int)getpid());
	while (fgets(line, sizeof(line), stdin)) {
		int n = 0;
		if (sscanf(line, "answer %d", &n) == 1) {
			printf("%d\n", answer(n));
		} else if (sscanf(line, "fork %d", &n) == 1) {
			pid_t pid = fork();
			if (pid == 0) {
				sandbox();
				struct timespec ts = { n / 1000, (long)(n % 1000) * 1000000 };
				while (nanosleep(&ts, &ts) && errno == EINTR)
					;
				char out[64];
				int len = snprintf(out, sizeof(out), "child %d %d\n", (int)getpid(), answer(4));
				if (write(1, out, (size_t)len) < 0)
					_exit(3);
				_exit(0);
			}
			printf("forked %d\n", (int)pid);
		}
	}
	return 0;
}
