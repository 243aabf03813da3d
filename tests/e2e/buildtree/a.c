/* helper: a static function whose name b.c uses too. */
__attribute__((noinline)) static int helper(int x)
{
	__asm__ volatile("");
	return x + 1;
}

int a_value(int x)
{
	return helper(x) * 10;
}
