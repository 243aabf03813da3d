/* A program built without patchbox that checks, after every blocking system call of
 * its main thread, that every register it had before the call is still there: what a
 * thread borrowed by `patchbox attach` (docs/reach.md, "Attach") must find when it
 * comes back. The call is made by checked_syscall() below: it loads sentinels into
 * rbx, rbp, r8, r9, r12-r15, xmm0-xmm15, MXCSR (rounding up) and the x87 control word,
 * makes the call, and compares them all (and the argument registers, which the kernel
 * preserves) afterwards.
 *
 *   borrowed read    the main thread blocks in read(0) (a restartable call)
 *   borrowed epoll   ... in epoll_wait on stdin (fails with EINTR when interrupted)
 *   borrowed sleep   ... in clock_nanosleep, 50 ms at a time (restarted through
 *                    restart_syscall by the kernel); a second thread answers stdin
 *
 * Each line "N" on stdin is answered "N ok S" or "N bad MASK S": MASK has a bit per
 * register found changed (see BAD_*), S counts the calls made so far. Prints
 * "ready PID" first. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Bits of the mask checked_syscall stores. */
enum { BAD_GPR = 1, BAD_ARGS = 2, BAD_XMM = 4, BAD_MXCSR = 8, BAD_X87 = 16 };

long checked_syscall(long nr, long a1, long a2, long a3, long a4, unsigned long *bad);

__asm__(
	"	.section .rodata\n"
	"	.p2align 4\n"
	"sentinels:\n"
	"	.rept 16\n"
	"	.quad 0x5a5a00005a5a0000 + (. - sentinels), 0xa5a50000a5a50000 + (. - sentinels)\n"
	"	.endr\n"
	"	.text\n"
	"	.globl checked_syscall\n"
	"	.type checked_syscall, @function\n"
	"checked_syscall:\n"
	"	push %rbx\n"
	"	push %rbp\n"
	"	push %r12\n"
	"	push %r13\n"
	"	push %r14\n"
	"	push %r15\n"
	"	sub $56, %rsp\n"		/* 0: bad ptr, 8: old mxcsr, 16: old cw, 24: scratch */
	"	mov %r9, 0(%rsp)\n"
	"	stmxcsr 8(%rsp)\n"
	"	fnstcw 16(%rsp)\n"
	"	movl $0x5f80, 24(%rsp)\n"	/* MXCSR: rounding up, all exceptions masked */
	"	ldmxcsr 24(%rsp)\n"
	"	movw $0x0b7f, 24(%rsp)\n"	/* x87: rounding up */
	"	fldcw 24(%rsp)\n"
	"	lea sentinels(%rip), %rax\n"
	"	movdqa 0(%rax), %xmm0\n"
	"	movdqa 16(%rax), %xmm1\n"
	"	movdqa 32(%rax), %xmm2\n"
	"	movdqa 48(%rax), %xmm3\n"
	"	movdqa 64(%rax), %xmm4\n"
	"	movdqa 80(%rax), %xmm5\n"
	"	movdqa 96(%rax), %xmm6\n"
	"	movdqa 112(%rax), %xmm7\n"
	"	movdqa 128(%rax), %xmm8\n"
	"	movdqa 144(%rax), %xmm9\n"
	"	movdqa 160(%rax), %xmm10\n"
	"	movdqa 176(%rax), %xmm11\n"
	"	movdqa 192(%rax), %xmm12\n"
	"	movdqa 208(%rax), %xmm13\n"
	"	movdqa 224(%rax), %xmm14\n"
	"	movdqa 240(%rax), %xmm15\n"
	"	mov %rdi, %rax\n"		/* the call: rax = nr, rdi..r10 = a1..a4 */
	"	mov %rsi, %rdi\n"
	"	mov %rdx, %rsi\n"
	"	mov %rcx, %rdx\n"
	"	mov %r8, %r10\n"
	"	mov %rdi, 32(%rsp)\n"	/* the arguments, to compare after */
	"	mov %rsi, 40(%rsp)\n"
	"	mov %rdx, 48(%rsp)\n"
	"	mov %r10, 24(%rsp)\n"
	"	movabs $0x1111111111111111, %rbx\n"
	"	movabs $0x2222222222222222, %rbp\n"
	"	movabs $0x8888888888888888, %r8\n"
	"	movabs $0x9999999999999999, %r9\n"
	"	movabs $0xcccccccccccccccc, %r12\n"
	"	movabs $0xdddddddddddddddd, %r13\n"
	"	movabs $0xeeeeeeeeeeeeeeee, %r14\n"
	"	movabs $0xffffffffffffff0f, %r15\n"
	"	syscall\n"
	"	xor %ecx, %ecx\n"		/* rcx: the mask (the syscall clobbered it anyway) */
	"	movabs $0x1111111111111111, %r11\n"
	"	cmp %r11, %rbx\n"
	"	jne 1f\n"
	"	movabs $0x2222222222222222, %r11\n"
	"	cmp %r11, %rbp\n"
	"	jne 1f\n"
	"	movabs $0x8888888888888888, %r11\n"
	"	cmp %r11, %r8\n"
	"	jne 1f\n"
	"	movabs $0x9999999999999999, %r11\n"
	"	cmp %r11, %r9\n"
	"	jne 1f\n"
	"	movabs $0xcccccccccccccccc, %r11\n"
	"	cmp %r11, %r12\n"
	"	jne 1f\n"
	"	movabs $0xdddddddddddddddd, %r11\n"
	"	cmp %r11, %r13\n"
	"	jne 1f\n"
	"	movabs $0xeeeeeeeeeeeeeeee, %r11\n"
	"	cmp %r11, %r14\n"
	"	jne 1f\n"
	"	movabs $0xffffffffffffff0f, %r11\n"
	"	cmp %r11, %r15\n"
	"	je 2f\n"
	"1:	or $1, %ecx\n"
	"2:	cmp 32(%rsp), %rdi\n"
	"	jne 3f\n"
	"	cmp 40(%rsp), %rsi\n"
	"	jne 3f\n"
	"	cmp 48(%rsp), %rdx\n"
	"	jne 3f\n"
	"	cmp 24(%rsp), %r10\n"
	"	je 4f\n"
	"3:	or $2, %ecx\n"
	"4:	lea sentinels(%rip), %r11\n"
	"	pcmpeqb 0(%r11), %xmm0\n"
	"	pcmpeqb 16(%r11), %xmm1\n"
	"	pcmpeqb 32(%r11), %xmm2\n"
	"	pcmpeqb 48(%r11), %xmm3\n"
	"	pcmpeqb 64(%r11), %xmm4\n"
	"	pcmpeqb 80(%r11), %xmm5\n"
	"	pcmpeqb 96(%r11), %xmm6\n"
	"	pcmpeqb 112(%r11), %xmm7\n"
	"	pcmpeqb 128(%r11), %xmm8\n"
	"	pcmpeqb 144(%r11), %xmm9\n"
	"	pcmpeqb 160(%r11), %xmm10\n"
	"	pcmpeqb 176(%r11), %xmm11\n"
	"	pcmpeqb 192(%r11), %xmm12\n"
	"	pcmpeqb 208(%r11), %xmm13\n"
	"	pcmpeqb 224(%r11), %xmm14\n"
	"	pcmpeqb 240(%r11), %xmm15\n"
	"	pand %xmm1, %xmm0\n"
	"	pand %xmm2, %xmm0\n"
	"	pand %xmm3, %xmm0\n"
	"	pand %xmm4, %xmm0\n"
	"	pand %xmm5, %xmm0\n"
	"	pand %xmm6, %xmm0\n"
	"	pand %xmm7, %xmm0\n"
	"	pand %xmm8, %xmm0\n"
	"	pand %xmm9, %xmm0\n"
	"	pand %xmm10, %xmm0\n"
	"	pand %xmm11, %xmm0\n"
	"	pand %xmm12, %xmm0\n"
	"	pand %xmm13, %xmm0\n"
	"	pand %xmm14, %xmm0\n"
	"	pand %xmm15, %xmm0\n"
	"	pmovmskb %xmm0, %r11d\n"
	"	cmp $0xffff, %r11d\n"
	"	je 5f\n"
	"	or $4, %ecx\n"
	"5:	stmxcsr 24(%rsp)\n"
	"	mov 24(%rsp), %r11d\n"
	"	and $0xffc0, %r11d\n"		/* the sticky exception flags do not count */
	"	cmp $0x5f80, %r11d\n"
	"	je 6f\n"
	"	or $8, %ecx\n"
	"6:	fnstcw 24(%rsp)\n"
	"	movzwl 24(%rsp), %r11d\n"
	"	cmp $0x0b7f, %r11d\n"
	"	je 7f\n"
	"	or $16, %ecx\n"
	"7:	mov 0(%rsp), %r11\n"
	"	mov %rcx, (%r11)\n"
	"	ldmxcsr 8(%rsp)\n"
	"	fldcw 16(%rsp)\n"
	"	add $56, %rsp\n"
	"	pop %r15\n"
	"	pop %r14\n"
	"	pop %r13\n"
	"	pop %r12\n"
	"	pop %rbp\n"
	"	pop %rbx\n"
	"	ret\n"
	"	.size checked_syscall, . - checked_syscall\n");

static unsigned long bad_seen;	/* every mask found so far, or'ed */
static unsigned long calls;	/* checked calls made */
static unsigned long eintr;	/* of which failed with EINTR */

static long checked(long nr, long a1, long a2, long a3, long a4)
{
	unsigned long bad = 0;
	long rc = checked_syscall(nr, a1, a2, a3, a4, &bad);
	__atomic_fetch_or(&bad_seen, bad, __ATOMIC_RELAXED);
	__atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
	if (rc == -4)
		__atomic_fetch_add(&eintr, 1, __ATOMIC_RELAXED);
	return rc;
}

static void answer(const char *line)
{
	unsigned long bad = __atomic_load_n(&bad_seen, __ATOMIC_RELAXED);
	unsigned long n = __atomic_load_n(&calls, __ATOMIC_RELAXED);
	int len = (int)strcspn(line, "\n");
	if (bad)
		printf("%.*s bad %lx %lu\n", len, line, bad, n);
	else
		printf("%.*s ok %lu\n", len, line, n);
}

/* Lines from stdin, read with checked read(0) (in "read" mode) or plain read. */
static int next_line(char *buf, size_t cap, int use_checked)
{
	size_t n = 0;
	while (n + 1 < cap) {
		long rc = use_checked ? checked(SYS_read, 0, (long)(buf + n), 1, 0) : read(0, buf + n, 1);
		if (rc == -4 || (rc < 0 && !use_checked))
			continue;	/* EINTR */
		if (rc <= 0)
			return 0;
		if (buf[n++] == '\n')
			break;
	}
	buf[n] = '\0';
	return 1;
}

static void *stdin_thread(void *arg)
{
	(void)arg;
	char line[128];
	while (next_line(line, sizeof(line), 0))
		answer(line);
	exit(0);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "read";
	char line[128];
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", getpid());
	if (!strcmp(mode, "read")) {
		while (next_line(line, sizeof(line), 1))
			answer(line);
	} else if (!strcmp(mode, "epoll")) {
		int ep = epoll_create1(0);
		struct epoll_event ev = { .events = EPOLLIN, .data.fd = 0 }, got;
		epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
		for (;;) {
			long rc = checked(SYS_epoll_wait, ep, (long)&got, 1, -1);
			if (rc == 1 && next_line(line, sizeof(line), 0))
				answer(line);
			else if (rc == 1)
				break;
		}
	} else if (!strcmp(mode, "sleep")) {
		pthread_t t;
		pthread_create(&t, NULL, stdin_thread, NULL);
		struct timespec ts = { 0, 50 * 1000 * 1000 };
		for (;;)
			checked(SYS_clock_nanosleep, CLOCK_MONOTONIC, 0, (long)&ts, 0);
	}
	return 0;
}
