/* A program whose thread forks in a loop while patches are applied and removed, for
 * the end-to-end tests (linked with the agent). Each child inspects its own copy of
 * the code and _exits with what it saw, so a fork that caught an apply or a remove
 * half done shows up:
 *   - fa and fb (patched together, one patch) each either byte-identical to the
 *     original [f-6, f+2) or fully redirected (e9 rel32 at f-6 and eb f8 at f);
 *   - both in the same state (an apply is all or nothing);
 *   - no mapping writable and executable, the pages of fa and fb not writable.
 * Only async-signal-safe calls in the child (memcmp, open, read, _exit).
 * stdin: "start 0" starts forking, "stop 0" stops and prints the tally, "call N"
 * prints fa(N) fb(N).
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) int fa(int x) { return x + @A@; }
__attribute__((noinline)) int fb(int x) { return x * @B@; }

enum { ORIGINAL = 0, REDIRECTED = 1, HALF = 10, MIXED = 11, WX = 12, WRITABLE = 13, NOMAPS = 14 };

static uint8_t orig_a[8], orig_b[8];
static volatile int forking;
static pthread_t forker;
static long tally[16], forks;

static int entry_state(const uint8_t *at, const uint8_t *orig)
{
	if (memcmp(at, orig, 8) == 0)
		return ORIGINAL;
	if (at[0] == 0xe9 && at[6] == 0xeb && at[7] == 0xf8)
		return REDIRECTED;
	return HALF;
}

static char maps[1 << 18];

/* In the child: no mapping w+x; the pages holding [f-6, f+2) of fa and fb not writable. */
static int maps_check(void)
{
	int fd = open("/proc/self/maps", O_RDONLY);
	if (fd < 0)
		return NOMAPS;
	size_t len = 0;
	ssize_t n;
	while (len < sizeof(maps) - 1 && (n = read(fd, maps + len, sizeof(maps) - 1 - len)) > 0)
		len += (size_t)n;
	close(fd);
	maps[len] = '\0';
	uintptr_t a = (uintptr_t)fa - 6, b = (uintptr_t)fb - 6;
	for (char *line = maps; *line;) {
		char *next = strchr(line, '\n');
		uintptr_t lo = 0, hi = 0;
		char *p = line;
		while (*p && *p != '-')
			lo = lo * 16 + (uintptr_t)(*p <= '9' ? *p - '0' : *p - 'a' + 10), p++;
		if (*p == '-')
			p++;
		while (*p && *p != ' ')
			hi = hi * 16 + (uintptr_t)(*p <= '9' ? *p - '0' : *p - 'a' + 10), p++;
		const char *perms = *p == ' ' ? p + 1 : "----";
		if (perms[1] == 'w' && perms[2] == 'x')
			return WX;
		if (perms[1] == 'w' && ((a + 8 > lo && a < hi) || (b + 8 > lo && b < hi)))
			return WRITABLE;
		if (!next)
			break;
		line = next + 1;
	}
	return 0;
}

static int child_check(void)
{
	int sa = entry_state((const uint8_t *)fa - 6, orig_a);
	int sb = entry_state((const uint8_t *)fb - 6, orig_b);
	if (sa == HALF || sb == HALF)
		return HALF;
	if (sa != sb)
		return MIXED;
	int m = maps_check();
	return m ? m : sa;
}

static void *fork_loop(void *arg)
{
	(void)arg;
	while (__atomic_load_n(&forking, __ATOMIC_ACQUIRE)) {
		pid_t pid = fork();
		if (pid == 0)
			_exit(child_check());
		if (pid < 0)
			continue;
		int st;
		if (waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) < 16)
			tally[WEXITSTATUS(st)]++;
		else
			tally[15]++;
		forks++;
	}
	return NULL;
}

int main(void)
{
	char line[64], cmd[32];
	int arg;
	setvbuf(stdout, NULL, _IOLBF, 0);
	memcpy(orig_a, (const uint8_t *)fa - 6, 8);
	memcpy(orig_b, (const uint8_t *)fb - 6, 8);
	printf("ready %d\n", (int)getpid());
	while (fgets(line, sizeof(line), stdin)) {
		if (sscanf(line, "%31s %d", cmd, &arg) != 2)
			continue;
		if (strcmp(cmd, "start") == 0) {
			__atomic_store_n(&forking, 1, __ATOMIC_RELEASE);
			printf(pthread_create(&forker, NULL, fork_loop, NULL) ? "failed\n" : "started\n");
		} else if (strcmp(cmd, "stop") == 0) {
			__atomic_store_n(&forking, 0, __ATOMIC_RELEASE);
			pthread_join(forker, NULL);
			printf("forks=%ld original=%ld redirected=%ld half=%ld mixed=%ld wx=%ld writable=%ld "
			       "nomaps=%ld other=%ld\n", forks, tally[ORIGINAL], tally[REDIRECTED], tally[HALF],
			       tally[MIXED], tally[WX], tally[WRITABLE], tally[NOMAPS], tally[15]);
		} else if (strcmp(cmd, "call") == 0) {
			printf("%d %d\n", fa(arg), fb(arg));
		}
	}
	return 0;
}
