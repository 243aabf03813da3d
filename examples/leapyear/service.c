/* A tiny long-running service: once per tick it asks its handler whether a year is a
 * leap year and prints the answer. Nothing here knows about patchbox: the agent comes in
 * at link time (see Makefile). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

extern long requests_served;
int describe_year(int year, char *out, size_t n);

static const int years[] = { 1900, 2000, 2023, 2024 };

int main(int argc, char **argv)
{
	double interval = argc > 1 ? atof(argv[1]) : 1.0;
	struct timespec ts = { (time_t)interval, (long)((interval - (time_t)interval) * 1e9) };
	char line[128];

	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("leapyear service running as pid %d\n", (int)getpid());
	for (unsigned tick = 0;; tick++) {
		describe_year(years[tick % 4], line, sizeof line);
		printf("[%ld] %s\n", requests_served, line);
		nanosleep(&ts, NULL);
	}
}
