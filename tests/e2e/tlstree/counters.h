/* What prog.c and counters.c share: one snapshot of a thread's counters. */
#define NCOUNTERS 5
extern __thread long ext_count; /* prog.c's: counters.c reaches it with initial-exec */
void step(void);
void snapshot(long out[NCOUNTERS]);
