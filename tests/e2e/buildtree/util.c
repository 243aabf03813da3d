#include <assert.h>

__attribute__((noinline)) int checked(int x)
{
	assert(x >= 0);
	return x * 3;
}

__attribute__((noinline)) int tick(int x)
{
	static int count;

	count += 1;
	return count + x * 0;
}
