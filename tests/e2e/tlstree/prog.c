/* Worker threads each count in their own thread-local variables (counters.c, and the
 * library liblcount.so, dlopened at start); on "report" every worker copies its own
 * counters and its own count of calls at a point between two calls, and the main thread
 * prints them: "c0,c1,c2,c3,c4,calls,l0,l1,l2,lib_calls" per thread, separated by " ". */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "counters.h"

#define NTHREADS 4

__thread long ext_count;

static void (*lib_step)(void);
static void (*lib_snapshot)(long out[3]);

struct slot {
	long tls[NCOUNTERS], calls;
	long lib[3], lib_calls;
};
static struct slot slots[NTHREADS];
static atomic_int generation, answered;

static void *worker(void *arg)
{
	int id = (int)(long)arg, seen_gen = 0;
	long calls = 0, lib_calls = 0;
	for (;;) {
		int gen = atomic_load(&generation);
		if (gen != seen_gen) {
			snapshot(slots[id].tls);
			lib_snapshot(slots[id].lib);
			slots[id].calls = calls;
			slots[id].lib_calls = lib_calls;
			seen_gen = gen;
			atomic_fetch_add(&answered, 1); /* pairs with the load in main */
		}
		/* Thread i calls i+1 times a round: every thread's counts differ. */
		for (int k = 0; k <= id; k++) {
			step();
			calls++;
			lib_step();
			lib_calls++;
		}
		usleep(200);
	}
	return NULL;
}

int main(void)
{
	char line[64];
	pthread_t t;
	setvbuf(stdout, NULL, _IOLBF, 0);
	void *lib = dlopen("liblcount.so", RTLD_NOW);
	if (!lib) {
		fprintf(stderr, "%s\n", dlerror());
		return 1;
	}
	lib_step = (void (*)(void))dlsym(lib, "lib_step");
	lib_snapshot = (void (*)(long *))dlsym(lib, "lib_snapshot");
	for (long i = 0; i < NTHREADS; i++)
		pthread_create(&t, NULL, worker, (void *)i);
	printf("ready %d\n", getpid());
	while (fgets(line, sizeof line, stdin)) {
		if (strncmp(line, "report", 6) != 0) {
			printf("?\n");
			continue;
		}
		atomic_store(&answered, 0);
		atomic_fetch_add(&generation, 1);
		while (atomic_load(&answered) < NTHREADS) /* pairs with the add in worker */
			usleep(100);
		for (int i = 0; i < NTHREADS; i++) {
			const struct slot *s = &slots[i];
			printf("%s%ld,%ld,%ld,%ld,%ld,%ld,%ld,%ld,%ld,%ld", i ? " " : "", s->tls[0],
			       s->tls[1], s->tls[2], s->tls[3], s->tls[4], s->calls, s->lib[0], s->lib[1],
			       s->lib[2], s->lib_calls);
		}
		printf("\n");
	}
	return 0;
}
