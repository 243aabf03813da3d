/* The executable's thread-local counters. Every worker thread calls step() in a loop;
 * a fix changes it. Each access model of an executable is here: */
#include "counters.h"

__thread long le_count;                                            /* local-exec */
__thread long ie_count __attribute__((tls_model("initial-exec"))); /* initial-exec */
static __thread long st_count;                                     /* static: local-exec */
__thread long seen;                                                /* only the fix touches it */

__attribute__((noipa)) void step(void)
{
	le_count += 1;
	ie_count += 1;
	st_count += 1;
	ext_count += 1;
}

__attribute__((noipa)) void snapshot(long out[NCOUNTERS])
{
	out[0] = le_count;
	out[1] = ie_count;
	out[2] = st_count;
	out[3] = ext_count;
	out[4] = seen;
}
