/* A tiny long-running service with a visible bug: it answers "is YEAR a leap year?"
 * once per tick and forgets the Gregorian century rule (1900 is reported as leap).
 * Nothing here knows about patchbox: the agent comes in at link time. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

long requests_served;                     /* global state the fix must keep using */
static const int years[] = { 1900, 2000, 2023, 2024 };

static int century(int year)              /* static helper the fix calls */
{
	return year % 100 == 0;
}

int describe_year(int year, char *out, size_t n)
{
	requests_served++;
	int leap = year % 4 == 0;             /* BUG: ignores the century rule */
	(void)century;
	return snprintf(out, n, "%d is %sa leap year", year, leap ? "" : "not ");
}

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
