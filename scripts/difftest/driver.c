/* The driver of a differential-test program (scripts/difftest): holds the process before
 * the Csmith program's first line and runs it on command, one command a line on stdin:
 *
 *   fork     run the program (csmith_main: Csmith's main, renamed by -Dmain=csmith_main)
 *            in a forked child: from the globals as they were at start, whatever earlier
 *            runs did; a child of a patched process runs the patched code
 *   iter X   run it here, on the globals earlier iterations left (the mid-run check);
 *            X (o or m) selects the version in the oracle build (-DPB_ORACLE)
 *   quit     exit
 *
 * After each run a line "=== <what> <status>" marks the end of its output. */
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int csmith_main(int argc, char *argv[]);
#ifdef PB_ORACLE
extern int pb_use_mutant;
#endif

/* argv[1] == "1": Csmith prints every global's name and checksum, not only the total. */
static char arg0[] = "prog", arg1[] = "1";
static char *args[] = {arg0, arg1, NULL};

int main(void)
{
	char line[64];

	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		if (strncmp(line, "fork", 4) == 0) {
			int status = -1;
			pid_t pid;

			fflush(stdout); /* nothing buffered is printed twice */
			pid = fork();
			if (pid == 0) {
				csmith_main(2, args);
				fflush(stdout);
				_exit(0);
			}
			if (pid > 0)
				waitpid(pid, &status, 0);
			printf("=== fork %d\n", status);
		} else if (strncmp(line, "iter", 4) == 0) {
#ifdef PB_ORACLE
			pb_use_mutant = line[5] == 'm';
#endif
			csmith_main(2, args);
			printf("=== iter 0\n");
		} else if (strncmp(line, "quit", 4) == 0) {
			break;
		}
		fflush(stdout);
	}
	return 0;
}
