/* The request handler of the leapyear service, in its own file as in any real server.
 * This is the fixed copy: it applies the Gregorian century rule (1900 is not leap). */
#include <stdio.h>

long requests_served;                     /* global state the fix must keep using */

static int century(int year)              /* static helper the fix will call */
{
	return year % 100 == 0;
}

int describe_year(int year, char *out, size_t n)
{
	requests_served++;
	/* FIX: divisible by 4, except centuries not divisible by 400 */
	int leap = year % 4 == 0 && (!century(year) || year % 400 == 0);
	return snprintf(out, n, "%d is %sa leap year", year, leap ? "" : "not ");
}
