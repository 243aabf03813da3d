/* Multi-file target of tests/e2e/test_build_live.py: reads "NAME ARG" lines on stdin,
 * prints the answer of the named function. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int a_value(int x);
int b_value(int x);
const char *b_name(int x);
int checked(int x);
int tick(int x);

int main(void)
{
	char name[64];
	int arg;

	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", (int)getpid());
	while (scanf("%63s %d", name, &arg) == 2) {
		if (!strcmp(name, "a"))
			printf("%d\n", a_value(arg));
		else if (!strcmp(name, "b"))
			printf("%d\n", b_value(arg));
		else if (!strcmp(name, "name"))
			printf("%s\n", b_name(arg));
		else if (!strcmp(name, "checked"))
			printf("%d\n", checked(arg));
		else if (!strcmp(name, "tick"))
			printf("%d\n", tick(arg));
		else
			printf("?\n");
	}
	return 0;
}
