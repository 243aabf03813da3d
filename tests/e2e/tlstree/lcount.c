/* The library's thread-local counters (built -fPIC): lib_g and lib_seen are reached with
 * general-dynamic, the static lib_s with local-dynamic. */
__thread long lib_g;
static __thread long lib_s;
__thread long lib_seen; /* only the fix touches it */

__attribute__((noipa)) void lib_step(void)
{
	lib_g += 1;
	lib_s += 1;
}

__attribute__((noipa)) void lib_snapshot(long out[3])
{
	out[0] = lib_g;
	out[1] = lib_s;
	out[2] = lib_seen;
}
