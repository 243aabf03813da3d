/* The request handler of the leapyear service, in its own file as in any real server.
 * It has a visible bug: it forgets the Gregorian century rule (1900 is reported leap). */
#include <stdio.h>

long requests_served;                     /* global state the fix must keep using */

static int century(int year)              /* static helper the fix will call */
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
