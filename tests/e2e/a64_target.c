/* aarch64 target for tests/e2e/test_aarch64.py: cross-built with the aarch64 agent
 * objects linked in (or libsandbox.so), run under qemu-aarch64. Reads commands on stdin:
 *
 *   call N     prints answer(N) (42 for 41 as built; the tests' patch returns 4242)
 *   hot N      starts N threads calling answer(41) through a pointer in a loop
 *   hotfar N   the same with far_answer(41)
 *   counts     stops them and prints "old A new B other C" (results seen by them: 42 or
 *              43 as built, 4242 patched)
 *   addr       prints the run-time address of answer
 *   entry      prints the 24 bytes from answer-16 in hex (the patchable entry)
 *   far N      prints far_answer(N) (N + 2), a function the tests link 512 MiB away
 *              from the rest (section farcode), out of a B's reach of the sandbox
 *   farentry   prints the 24 bytes from far_answer-16 in hex
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((noinline)) int answer(int x)
{
	__asm__ volatile("");
	return x + 1;
}

__attribute__((noinline, section("farcode"))) int far_answer(int x)
{
	__asm__ volatile("");
	return x + 2;
}

int (*volatile answer_ptr)(int) = answer;
int (*volatile far_ptr)(int) = far_answer;
static int (*volatile hot_fn)(int);
static int hot_old;
static long n_old, n_new, n_other;
static volatile int stop;
static pthread_t threads[8];
static int nthreads;

static void *hot(void *arg)
{
	long old = 0, new = 0, other = 0;
	(void)arg;
	while (!stop) {
		int r = hot_fn(41);
		if (r == hot_old)
			old++;
		else if (r == 4242)
			new++;
		else
			other++;
	}
	__atomic_add_fetch(&n_old, old, __ATOMIC_RELAXED);
	__atomic_add_fetch(&n_new, new, __ATOMIC_RELAXED);
	__atomic_add_fetch(&n_other, other, __ATOMIC_RELAXED);
	return NULL;
}

int main(void)
{
	char line[128];
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", getpid());
	while (fgets(line, sizeof(line), stdin)) {
		if (strncmp(line, "call ", 5) == 0) {
			printf("%d\n", answer_ptr(atoi(line + 5)));
		} else if (strncmp(line, "hot ", 4) == 0 || strncmp(line, "hotfar ", 7) == 0) {
			int far = line[3] == 'f', n = atoi(line + (far ? 7 : 4));
			hot_fn = far ? far_ptr : answer_ptr;
			hot_old = far ? 43 : 42;
			for (int i = 0; i < n && nthreads < 8; i++)
				pthread_create(&threads[nthreads++], NULL, hot, NULL);
			printf("hot %d\n", nthreads);
		} else if (strncmp(line, "counts", 6) == 0) {
			stop = 1;
			for (int i = 0; i < nthreads; i++)
				pthread_join(threads[i], NULL);
			printf("old %ld new %ld other %ld\n", n_old, n_new, n_other);
		} else if (strncmp(line, "addr", 4) == 0) {
			printf("%p\n", (void *)answer);
		} else if (strncmp(line, "far ", 4) == 0) {
			printf("%d\n", far_ptr(atoi(line + 4)));
		} else if (strncmp(line, "entry", 5) == 0 || strncmp(line, "farentry", 8) == 0) {
			const unsigned char *p = (const unsigned char *)(line[0] == 'f' ? far_answer : answer) - 16;
			for (int i = 0; i < 24; i++)
				printf("%02x", p[i]);
			printf("\n");
		}
	}
	return 0;
}
