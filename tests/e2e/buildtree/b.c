__attribute__((noinline)) static int helper(int x)
{
	__asm__ volatile("");
	return x * 2;
}

int b_value(int x)
{
	return helper(x) + 1;
}

__attribute__((noinline)) const char *b_name(int x)
{
	return x ? "bee" : "none";
}
