/* Real target for the end-to-end tests. Reads "NAME ARG" lines on stdin, calls the
 * function through a table of pointers (so every call goes through the function's entry)
 * and prints the result. The tests compile a patched copy of this file where the markers
 * @NAME@ are replaced, and extract replacement functions from it. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <sys/prctl.h>
#include <unistd.h>

#ifndef PR_SET_MDWE
#define PR_SET_MDWE 65
#define PR_MDWE_REFUSE_EXEC_GAIN (1UL << 0)
#endif

long counter;                                   /* global read and written by bump */
static int calls_seen;                          /* static variable in this file */
static char fmt_buf[64];
int park_fds[2];                                /* a patched park() may block reading [0] */

__attribute__((noinline)) static int scale(int x)      /* static helper in the binary */
{
	__asm__ volatile("");
	return x * 10 + calls_seen;
}

__attribute__((noinline)) int use_helper(int x)
{
	calls_seen += 0;
	return @USE_HELPER@;
}

__attribute__((noinline)) int bump(int x)
{
	counter += @BUMP_STEP@;
	calls_seen++;
	return (int)counter + x * 0;
}

__attribute__((noinline)) const char *greet(int x)
{
	(void)x;
	return "@GREETING@";
}

__attribute__((noinline)) const char *fmt(int x)
{
	snprintf(fmt_buf, sizeof fmt_buf, "@FMT@", x);
	return fmt_buf;
}

__attribute__((noinline)) const char *pick(int x)
{
	@PICK@
}

__attribute__((noinline)) int pair_a(int x) { return x + @PAIR_A@; }
__attribute__((noinline)) int pair_b(int x) { return x * @PAIR_B@; }
__attribute__((noinline)) int stacked(int x) { return x + @STACKED@; }
__attribute__((noinline)) int park(int x) { @PARK@ }

@EXTRA@

struct entry { const char *name; int (*num)(int); const char *(*str)(int); };
static const struct entry table[] = {
	{ "use_helper", use_helper, NULL }, { "bump", bump, NULL },
	{ "greet", NULL, greet }, { "fmt", NULL, fmt },
	{ "pair_a", pair_a, NULL }, { "pair_b", pair_b, NULL },
	{ "stacked", stacked, NULL }, { "pick", NULL, pick }, { "park", park, NULL },
};

/* "title 0": rewrites the argv and environment strings as a process title, the way
 * setproctitle() does in Redis, nginx, PostgreSQL and sshd: the environment is
 * copied to the heap first (getenv keeps working), then the whole contiguous block
 * from argv[0] to the end of the last environment string becomes the title and
 * zeros. /proc/PID/cmdline and /proc/PID/environ then read that block. */
extern char **environ;
static char **main_argv;
static int main_argc;

static int title_set(void)
{
	char *start = main_argv[0], *end = start;
	for (int i = 0; i < main_argc; i++)
		if (main_argv[i] == end)
			end = main_argv[i] + strlen(main_argv[i]) + 1;
	size_t n = 0;
	while (environ[n])
		n++;
	char **copy = calloc(n + 1, sizeof(*copy));
	if (!copy)
		return -1;
	for (size_t i = 0; i < n; i++) {
		if (environ[i] == end)
			end = environ[i] + strlen(environ[i]) + 1;
		copy[i] = strdup(environ[i]);
	}
	environ = copy;
	memset(start, 0, (size_t)(end - start));
	snprintf(start, (size_t)(end - start), "target: serving (title set)");
	return (int)(end - start);
}

/* "spawn N": a thread calls park(N); "wake 0": one byte into park_fds; "join 0": its result. */
static pthread_t parked_thread;
static int parked_arg, parked_result;

static void *parked_main(void *arg)
{
	(void)arg;
	parked_result = park(parked_arg);
	return NULL;
}

int main(int argc, char **argv)
{
	char line[256], name[64];
	int arg;

	main_argc = argc;
	main_argv = argv;
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (pipe(park_fds) != 0)
		return 2;
	/* W^X as systemd's MemoryDenyWriteExecute=yes enforces it: no mapping may become
	 * writable and executable, so the agent's mprotect(rwx) is refused. */
	if (getenv("TARGET_MDWE") && prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0) {
		perror("prctl(PR_SET_MDWE)");
		return 3;
	}
	printf("ready %d\n", (int)getpid());
	while (fgets(line, sizeof line, stdin)) {
		if (sscanf(line, "%63s %d", name, &arg) != 2) {
			printf("bad input\n");
			continue;
		}
		if (strcmp(name, "spawn") == 0) {
			parked_arg = arg;
			printf(pthread_create(&parked_thread, NULL, parked_main, NULL) ? "failed\n" : "spawned\n");
			continue;
		}
		if (strcmp(name, "wake") == 0) {
			printf(write(park_fds[1], "w", 1) == 1 ? "woken\n" : "failed\n");
			continue;
		}
		if (strcmp(name, "title") == 0) {
			int n = title_set();
			printf(n > 0 ? "titled %d\n" : "failed\n", n);
			continue;
		}
		if (strcmp(name, "nodump") == 0) {	/* as ssh-agent keeps same-uid debuggers away */
			printf(prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0 ? "nodump\n" : "failed\n");
			continue;
		}
		if (strcmp(name, "dropto") == 0) {	/* a daemon dropping root for its own user */
			int ok = setgroups(0, NULL) == 0 && setresgid(arg, arg, arg) == 0 &&
				 setresuid(arg, arg, arg) == 0;
			printf(ok ? "dropped\n" : "failed\n");
			continue;
		}
		if (strcmp(name, "closefds") == 0) {	/* a daemon closing what it inherited */
			for (int fd = 3; fd < 1024; fd++)
				if (fd != park_fds[0] && fd != park_fds[1])
					close(fd);
			printf("closed\n");
			continue;
		}
		if (strcmp(name, "ids") == 0) {
			uid_t ru, eu, su;
			gid_t rg, eg, sg;
			getresuid(&ru, &eu, &su);
			getresgid(&rg, &eg, &sg);
			printf("uid %u %u %u gid %u %u %u\n", ru, eu, su, rg, eg, sg);
			continue;
		}
		if (strcmp(name, "join") == 0) {
			pthread_join(parked_thread, NULL);
			printf("%d\n", parked_result);
			continue;
		}
		size_t i;
		for (i = 0; i < sizeof table / sizeof table[0]; i++) {
			if (strcmp(table[i].name, name) == 0) {
				if (table[i].num)
					printf("%d\n", table[i].num(arg));
				else
					printf("%s\n", table[i].str(arg));
				break;
			}
		}
		if (i == sizeof table / sizeof table[0])
			printf("unknown %s\n", name);
	}
	return 0;
}
