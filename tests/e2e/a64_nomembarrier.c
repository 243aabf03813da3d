/* Preloaded into a64_target under qemu-aarch64 by tests/e2e/test_aarch64.py: the libc
 * function syscall() as a kernel without membarrier(2) answers it (ENOSYS), every other
 * system call passed on. The agent then serialises no core after its stores and INFO
 * says sync_core "none": the fallback of docs/redirect.md, "aarch64". */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <sys/syscall.h>

long syscall(long number, ...)
{
	va_list ap;
	long a[6];
	va_start(ap, number);
	for (int i = 0; i < 6; i++)
		a[i] = va_arg(ap, long);
	va_end(ap);
	if (number == SYS_membarrier) {
		errno = ENOSYS;
		return -1;
	}
	register long x8 __asm__("x8") = number;
	register long x0 __asm__("x0") = a[0];
	register long x1 __asm__("x1") = a[1];
	register long x2 __asm__("x2") = a[2];
	register long x3 __asm__("x3") = a[3];
	register long x4 __asm__("x4") = a[4];
	register long x5 __asm__("x5") = a[5];
	__asm__ volatile("svc #0"
			 : "+r"(x0)
			 : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
			 : "memory");
	if (x0 < 0 && x0 > -4096) {
		errno = (int)-x0;
		return -1;
	}
	return x0;
}
