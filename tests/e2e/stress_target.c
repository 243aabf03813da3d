/* Stress target (tests/e2e/test_stress.py, benchmarks/stress_cycles.py): NTHREADS threads
 * call work() through a function pointer in a tight loop and check every result is the
 * old (x*3+1) or the new (x*5+1) one; one more thread is parked inside work() (sleeping
 * mid-function) until "stop" on stdin. Then prints
 *   calls N old A new B bad M parked R
 * (R: the parked call's result) and exits 0. @K@ is 3 in the program, 5 in the patch. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define NTHREADS 8
#define PARK_ARG (-7)

atomic_int release_parked, parked_inside, stop_all;

__attribute__((noinline)) int work(int x)
{
	if (x == PARK_ARG) {
		atomic_store(&parked_inside, 1);
		while (!atomic_load(&release_parked))
			usleep(1000);
		x = -x;
	}
	return x * @K@ + 1;
}

int (*volatile work_ptr)(int) = work;

struct counts { unsigned long calls, old, new, bad; } counts[NTHREADS];
static int parked_result;

static void *caller(void *arg)
{
	struct counts *c = arg, local = { 0 };
	for (unsigned i = 0; !atomic_load_explicit(&stop_all, memory_order_relaxed); i++) {
		int x = (int)(i & 0xffff);
		int r = work_ptr(x);
		local.calls++;
		if (r == x * 3 + 1)
			local.old++;
		else if (r == x * 5 + 1)
			local.new++;
		else
			local.bad++;
	}
	*c = local;
	return NULL;
}

static void *parker(void *arg)
{
	(void)arg;
	parked_result = work_ptr(PARK_ARG);
	return NULL;
}

int main(void)
{
	pthread_t th[NTHREADS], pk;
	char line[64];
	setvbuf(stdout, NULL, _IOLBF, 0);
	pthread_create(&pk, NULL, parker, NULL);
	while (!atomic_load(&parked_inside))
		usleep(1000);
	for (int i = 0; i < NTHREADS; i++)
		pthread_create(&th[i], NULL, caller, &counts[i]);
	printf("ready %d\n", (int)getpid());
	while (fgets(line, sizeof line, stdin) && strncmp(line, "stop", 4) != 0)
		;
	atomic_store(&stop_all, 1);
	struct counts sum = { 0 };
	for (int i = 0; i < NTHREADS; i++) {
		pthread_join(th[i], NULL);
		sum.calls += counts[i].calls;
		sum.old += counts[i].old;
		sum.new += counts[i].new;
		sum.bad += counts[i].bad;
	}
	atomic_store(&release_parked, 1);
	pthread_join(pk, NULL);
	printf("calls %lu old %lu new %lu bad %lu parked %d\n", sum.calls, sum.old, sum.new, sum.bad,
	       parked_result);
	return 0;
}
