/* Part of libsandbox.o: the hold (PBX_FLAG_HOLD; docs/reach.md, "Entry jumps in stock
 * code"). An entry jump over a first instruction shorter than 5 bytes, or across two
 * 8-byte words, cannot be published by one atomic store that no thread can be inside.
 * The client stops every other thread with ptrace (a tracing stop, 't' in
 * /proc/self/task/TID/stat); before it writes, the agent checks that no thread can
 * resume at, or return to, a point strictly inside (P, P+5) (a thread at P itself runs
 * the jump or the old first instruction whole):
 *
 *   1. threads: every other thread held (or a zombie), its PC (last field of
 *      /proc/self/task/TID/syscall) not inside;
 *   2. its stack from SP (to the end of that mapping, SANDBOX_HOLD_CAP at most): no word
 *      inside (a return address, a signal frame's saved PC). A signal frame the kernel
 *      wrote on an alternate stack (sigaltstack) names the stack it interrupted, which
 *      is scanned from the saved SP too (the frame's layout: arch/arch.h);
 *   3. memory (the check right before the stores): every private writable mapping of
 *      at most SANDBOX_HOLD_CAP bytes, whole. The stacks no thread runs on now are
 *      there: a suspended coroutine's (makecontext, QEMU), an alternate signal stack, a
 *      thread's own stack while it runs on its sigaltstack. Only the pages the process
 *      wrote are read (anonymous pages, present or swapped out: /proc/self/pagemap); a
 *      page never written holds zeros or the file's bytes, no return address. Larger
 *      mappings (guest RAM, caches) are seen only where 2 reaches into them;
 *   4. threads again: still held after the scans (a scan may take milliseconds).
 *
 * A word found inside while every thread is held stays there until a thread runs: the
 * wait gives up at once (sandbox_hold_wait). What is refused, why the cap is 64 MiB and
 * what is not seen: docs/reach.md, "What the hold sees", and docs/decisions.md.
 *
 * Nothing here allocates or takes a lock: a held thread may own malloc's lock. Memory
 * is read with process_vm_readv on the process itself, so a page that is gone or cannot
 * be read is an error value, never a fault. Only the agent thread runs this, so the
 * scratch is static; it and the agent thread's own stack are left out of step 3 (they
 * hold copies of what was read and the PCs of earlier attempts).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "arch/arch.h"
#include "sandbox-engine.h"

/* Mappings scanned whole in step 3. 64 MiB holds every place a stack is put by glibc and
 * the programs we know (thread stacks: 8 MiB by RLIMIT_STACK; glibc's per-thread malloc
 * heaps: at most HEAP_MAX_SIZE = 64 MiB on 64-bit, where small malloc'd stacks live; a
 * chunk mmap'd by malloc: below its 32 MiB threshold; QEMU coroutine stacks: 1 MiB with a
 * guard page; sigaltstacks: tens of KiB), while guest RAM, caches and buffer pools are
 * larger; and it bounds what one mapping can add to the hold. */
#define SANDBOX_HOLD_CAP (64ul << 20)
#define SANDBOX_HOLD_FRAMES 4	/* signal frames followed from one stack */
#define SANDBOX_HOLD_DEPTH 2	/* stacks followed through signal frames, one from another */

/* The scratch of the checks (only the agent thread runs them), left out of step 3. */
static struct {
	uint64_t words[8192];		/* 64 KiB of the memory being checked */
	uint64_t pagemap[512];		/* /proc/self/pagemap entries of 2 MiB */
	char maps[65536];		/* /proc/self/maps, a piece at a time */
	char line[4096 + 256];		/* one line of it, kept across two pieces */
} sandbox_hold_scratch;

/* The agent thread's stack (sandbox_hold_prepare), left out of step 3. */
static long sandbox_hold_stack_tid;
static uintptr_t sandbox_hold_stack_lo, sandbox_hold_stack_hi;
static uint64_t sandbox_hold_deadline;	/* CLOCK_MONOTONIC ns: no store after it */
static struct sandbox_hold_stats sandbox_hold_last;

/* One check: what it looks for, and what it found. */
struct sandbox_hold {
	const struct sandbox_func *funcs;
	size_t n;
	uintptr_t lo, hi;		/* the lowest wlo and highest whi: a quick filter */
	pid_t pid;
	int pagemap;			/* /proc/self/pagemap, -1: every page is read */
	const struct sandbox_func *hit;	/* the function a word points into ... */
	uintptr_t hit_at;		/* ... and where that word is */
	int hit_depth;			/* 0 its own stack, 1.. one reached through signal frames */
	uintptr_t bad;			/* a read that failed (err) */
	int err;
	struct sandbox_hold_stats stats;
};

static uint64_t sandbox_hold_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void sandbox_hold_prepare(void)
{
	/* pthread_getattr_np allocates (the affinity mask; /proc/self/maps for the main
	 * thread): done here, before the hold, once per agent thread. */
	long tid = gettid();
	if (tid == sandbox_hold_stack_tid)
		return;
	pthread_attr_t attr;
	void *addr;
	size_t size;
	sandbox_hold_stack_lo = sandbox_hold_stack_hi = 0;
	if (pthread_getattr_np(pthread_self(), &attr) == 0) {
		if (pthread_attr_getstack(&attr, &addr, &size) == 0) {
			sandbox_hold_stack_lo = (uintptr_t)addr;
			sandbox_hold_stack_hi = (uintptr_t)addr + size;
		}
		pthread_attr_destroy(&attr);
	}
	sandbox_hold_stack_tid = tid;
}

const struct sandbox_hold_stats *sandbox_hold_stats_get(void)
{
	return &sandbox_hold_last;
}

/* The held function whose bytes w points strictly inside, NULL if none. */
static inline const struct sandbox_func *sandbox_hold_inside(const struct sandbox_hold *h, uint64_t w)
{
	if (w <= h->lo || w >= h->hi)
		return NULL;
	for (size_t k = 0; k < h->n; k++)
		if (h->funcs[k].hold && w > h->funcs[k].wlo && w < h->funcs[k].whi)
			return &h->funcs[k];
	return NULL;
}

/* Reads up to len bytes at addr into the scratch. Returns the bytes read (up to the first
 * page that cannot be read), 0 if addr's own page cannot be read (unmapped, beyond the
 * end of a mapped file, device memory), -1 with h->err otherwise (a seccomp filter that
 * refuses process_vm_readv: nothing can be seen). */
static ssize_t sandbox_hold_read(struct sandbox_hold *h, uintptr_t addr, size_t len)
{
	if (len > sizeof(sandbox_hold_scratch.words))
		len = sizeof(sandbox_hold_scratch.words);
	struct iovec local = { sandbox_hold_scratch.words, len }, remote = { (void *)addr, len };
	/* On ourselves: a page that cannot be read is an error, not a fault. */
	ssize_t got = process_vm_readv(h->pid, &local, 1, &remote, 1, 0);
	if (got < 0 && (errno == EFAULT || errno == EIO))
		return 0;
	if (got < 0) {
		h->err = errno;
		h->bad = addr;
	}
	return got;
}

/* Checks the words read into the scratch from addr; 1 on a hit (recorded in h). */
static int sandbox_hold_words(struct sandbox_hold *h, uintptr_t addr, size_t nwords)
{
	const uint64_t *w = sandbox_hold_scratch.words;
	for (size_t i = 0; i < nwords; i++) {
		const struct sandbox_func *f = sandbox_hold_inside(h, w[i]);
		if (f) {
			h->hit = f;
			h->hit_at = addr + 8 * i;
			return 1;
		}
	}
	return 0;
}

/* Checks every word of [lo, hi), skipping, a page at a time, what cannot be read (no
 * thread can run on it either). 1 on a hit, 0, -1 (h->err). */
static int sandbox_hold_range(struct sandbox_hold *h, uintptr_t lo, uintptr_t hi)
{
	for (lo = sandbox_round_down(lo, 8); lo < hi;) {
		ssize_t got = sandbox_hold_read(h, lo, hi - lo);
		if (got < 0)
			return -1;
		if (got == 0) {
			lo = sandbox_round_down(lo, SANDBOX_PAGE) + SANDBOX_PAGE;
			continue;
		}
		h->stats.bytes += (uint64_t)got;
		if (sandbox_hold_words(h, lo, (size_t)got / 8))
			return 1;
		lo += (size_t)got;
	}
	return 0;
}

/* Checks the pages of [lo, hi) the process wrote: anonymous ones, present or swapped out
 * (pagemap bits 63, 62; bit 61 marks a page that is still the file's or shared). A page
 * never written reads as zeros or as the file's bytes: no thread put a return address
 * there. Without pagemap, every page. 1 on a hit, 0, -1. */
static int sandbox_hold_written(struct sandbox_hold *h, uintptr_t lo, uintptr_t hi)
{
	if (h->pagemap < 0)
		return sandbox_hold_range(h, lo, hi);
	uint64_t *pm = sandbox_hold_scratch.pagemap;
	const size_t per = sizeof(sandbox_hold_scratch.pagemap) / sizeof(pm[0]);
	for (uintptr_t page = sandbox_round_down(lo, SANDBOX_PAGE); page < hi;) {
		size_t np = (sandbox_round_up(hi, SANDBOX_PAGE) - page) / SANDBOX_PAGE;
		if (np > per)
			np = per;
		ssize_t got = pread(h->pagemap, pm, np * sizeof(pm[0]), (off_t)(page / SANDBOX_PAGE * sizeof(pm[0])));
		int all = got != (ssize_t)(np * sizeof(pm[0]));	/* cannot tell: read them all */
		for (size_t i = 0; i < np;) {
			uint64_t e = pm[i];
			if (!all && !((e >> 63) && !((e >> 61) & 1)) && !((e >> 62) & 1)) {
				i++;
				continue;
			}
			size_t j = i + 1;
			while (j < np && (all || ((pm[j] >> 63) && !((pm[j] >> 61) & 1)) || ((pm[j] >> 62) & 1)))
				j++;
			uintptr_t a = page + i * SANDBOX_PAGE, b = page + j * SANDBOX_PAGE;
			int r = sandbox_hold_range(h, a > lo ? a : lo, b < hi ? b : hi);
			if (r)
				return r;
			i = j;
		}
		page += np * SANDBOX_PAGE;
	}
	return 0;
}

/* Checks a mapping of step 3 without the agent's own scratch and stack. 1, 0, -1. */
static int sandbox_hold_mapping(struct sandbox_hold *h, uintptr_t lo, uintptr_t hi)
{
	uintptr_t ex[2][2] = {
		{ (uintptr_t)&sandbox_hold_scratch, (uintptr_t)&sandbox_hold_scratch + sizeof(sandbox_hold_scratch) },
		{ sandbox_hold_stack_lo, sandbox_hold_stack_hi },
	};
	if (ex[1][0] < ex[0][0]) {
		uintptr_t t0 = ex[0][0], t1 = ex[0][1];
		ex[0][0] = ex[1][0], ex[0][1] = ex[1][1];
		ex[1][0] = t0, ex[1][1] = t1;
	}
	for (int k = 0; k < 2 && lo < hi; k++) {
		uintptr_t xlo = sandbox_round_down(ex[k][0], 8), xhi = sandbox_round_up(ex[k][1], 8);
		if (xhi <= lo || xlo >= hi)
			continue;
		if (xlo > lo) {
			int r = sandbox_hold_written(h, lo, xlo);
			if (r)
				return r;
		}
		lo = xhi;
	}
	return lo < hi ? sandbox_hold_written(h, lo, hi) : 0;
}

/* Parses a hex number at *p; moves *p past it. */
static uintptr_t sandbox_hold_hex(const char **p)
{
	uintptr_t v = 0;
	for (;; (*p)++) {
		char c = **p;
		if (c >= '0' && c <= '9')
			v = v * 16 + (uintptr_t)(c - '0');
		else if (c >= 'a' && c <= 'f')
			v = v * 16 + (uintptr_t)(c - 'a' + 10);
		else
			return v;
	}
}

/* One line of /proc/self/maps ("lo-hi perms offset dev inode [path]"): a private writable
 * mapping (rw?p) up to the cap is checked, a larger one counted. 1, 0, -1. */
static int sandbox_hold_maps_line(struct sandbox_hold *h, const char *line, uintptr_t *lo_ret,
				  uintptr_t *hi_ret)
{
	const char *p = line;
	uintptr_t lo = sandbox_hold_hex(&p);
	if (*p++ != '-')
		return 0;
	uintptr_t hi = sandbox_hold_hex(&p);
	if (*p++ != ' ' || strlen(p) < 4 || p[1] != 'w' || p[3] != 'p' || hi <= lo)
		return 0;
	if (hi - lo > SANDBOX_HOLD_CAP) {
		h->stats.skipped++;
		h->stats.skipped_bytes += hi - lo;
		return 0;
	}
	h->stats.mappings++;
	*lo_ret = lo;
	*hi_ret = hi;
	return sandbox_hold_mapping(h, lo, hi);
}

/* Step 3: every private writable mapping up to the cap. 1 (hit in [*lo, *hi), the line
 * in the scratch), 0, -1 (h->err). */
static int sandbox_hold_memory(struct sandbox_hold *h, uintptr_t *lo, uintptr_t *hi)
{
	int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		h->err = errno;
		return -1;
	}
	h->pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	char *buf = sandbox_hold_scratch.maps, *line = sandbox_hold_scratch.line;
	size_t have = 0;	/* bytes of an unfinished line kept in line[] */
	int rc = 0;
	while (rc == 0) {
		/* The map is read in pieces; it does not change meanwhile: every other thread
		 * is held, and this one maps nothing. */
		ssize_t got = read(fd, buf, sizeof(sandbox_hold_scratch.maps));
		if (got < 0) {
			h->err = errno;
			rc = -1;
			break;
		}
		if (got == 0)
			break;
		for (ssize_t i = 0; i < got && rc == 0; i++) {
			if (buf[i] != '\n') {
				if (have < sizeof(sandbox_hold_scratch.line) - 1)
					line[have++] = buf[i];
				continue;
			}
			line[have] = '\0';
			rc = sandbox_hold_maps_line(h, line, lo, hi);
			if (rc == 0)
				have = 0;
		}
	}
	if (h->pagemap >= 0)
		close(h->pagemap);
	h->pagemap = -1;
	close(fd);
	return rc;
}

/* Step 2 for one stack: from sp to the first page that cannot be read, the cap at most.
 * The stacks that signal frames on it interrupted are followed (depth levels). 1 on a
 * hit, 0, -1 (h->err: sp itself cannot be read, or nothing can). */
static int sandbox_hold_stack(struct sandbox_hold *h, uintptr_t sp, int depth)
{
	const size_t overlap = SANDBOX_ARCH_SF_WORDS * 8;	/* a frame across two reads is seen whole */
	uintptr_t from = sandbox_round_down(sp, 8), at = from, end = from + SANDBOX_HOLD_CAP;
	uintptr_t next[SANDBOX_HOLD_FRAMES];
	size_t nnext = 0;
	while (at < end) {
		size_t len = end - at < sizeof(sandbox_hold_scratch.words) ? end - at : sizeof(sandbox_hold_scratch.words);
		ssize_t got = sandbox_hold_read(h, at, len);
		if (got < 0)
			return -1;
		if (got == 0) {
			/* At sp itself: a stack is empty there only if the word below is mapped. */
			if (at == from && sandbox_hold_read(h, from - 8, 8) <= 0) {
				h->err = h->err ? h->err : EFAULT;
				h->bad = from;
				return -1;
			}
			end = at;
			break;
		}
		size_t nw = (size_t)got / 8;
		h->stats.bytes += (uint64_t)got;
		if (sandbox_hold_words(h, at, nw)) {
			h->hit_depth = SANDBOX_HOLD_DEPTH - depth;
			return 1;
		}
		for (size_t i = 0; depth > 0 && i + SANDBOX_ARCH_SF_WORDS <= nw; i++) {
			uintptr_t sp;
			if (!sandbox_arch_sigframe(&sandbox_hold_scratch.words[i], at + 8 * i, &sp))
				continue;
			int known = sp >= from && sp < at + (size_t)got;	/* this stack, read already */
			for (size_t k = 0; k < nnext && !known; k++)
				known = next[k] == sp;
			if (!known && nnext < SANDBOX_HOLD_FRAMES)
				next[nnext++] = sp;
		}
		at += (size_t)got == len && (size_t)got > overlap ? (size_t)got - overlap : (size_t)got;
		if ((size_t)got < len)
			end = at;	/* the end of the mapping: read no further */
	}
	for (size_t k = 0; k < nnext; k++) {
		if (next[k] >= from && next[k] < end)
			continue;	/* a frame of a signal that interrupted this very stack */
		int r = sandbox_hold_stack(h, next[k], depth - 1);
		if (r)
			return r;
	}
	return 0;
}

/* Reads path into buf, NUL-terminated; its length, or -1 with errno. */
static ssize_t sandbox_small_read(const char *path, char *buf, size_t cap)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, cap - 1);
	int e = errno;
	close(fd);
	errno = e;
	if (n >= 0)
		buf[n] = '\0';
	return n;
}

/* Thread tid: 1 held, its PC clear (and with scan its stack: step 2); 0 not held, or
 * its state cannot be read (why); -1 a word of its stack points inside, or its stack
 * cannot be read (why). */
static int sandbox_hold_thread(struct sandbox_hold *h, long tid, int scan, char *why, size_t why_len)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/self/task/%ld/stat", tid);
	if (sandbox_small_read(path, buf, sizeof(buf)) < 0) {
		if (errno == ENOENT)
			return 1;	/* exited */
		snprintf(why, why_len, "thread %ld: cannot read its state: %s", tid, strerror(errno));
		return 0;
	}
	const char *rp = strrchr(buf, ')');
	char state = rp && rp[1] == ' ' ? rp[2] : '?';
	if (state == 'Z' || state == 'X')
		return 1;
	if (state != 't') {
		snprintf(why, why_len, "thread %ld is not held (state %c, not t)", tid, state);
		return 0;
	}
	snprintf(path, sizeof(path), "/proc/self/task/%ld/syscall", tid);
	unsigned long sp = 0, pc = 0;
	char *last = sandbox_small_read(path, buf, sizeof(buf)) > 0 ? strrchr(buf, ' ') : NULL;
	if (last && last != buf) {
		*last = '\0';
		char *prev = strrchr(buf, ' ');
		if (!prev || sscanf(prev + 1, "%lx", &sp) != 1 || sscanf(last + 1, "%lx", &pc) != 1)
			last = NULL;
	}
	if (!last) {
		snprintf(why, why_len, "thread %ld: cannot read its registers", tid);
		return 0;
	}
	const struct sandbox_func *in = sandbox_hold_inside(h, pc);
	if (in) {
		snprintf(why, why_len, "thread %ld is stopped at 0x%lx, inside the first bytes of %s", tid, pc,
			 in->symbol);
		return 0;
	}
	if (!scan)
		return 1;
	int r = sandbox_hold_stack(h, sp, SANDBOX_HOLD_DEPTH);
	if (r > 0 && h->hit_depth == 0)
		snprintf(why, why_len, "thread %ld has a return address inside the first bytes of %s on its stack "
			 "(at 0x%lx)", tid, h->hit->symbol, (unsigned long)h->hit_at);
	else if (r > 0)
		snprintf(why, why_len, "thread %ld, in a signal handler on its alternate stack, interrupted a stack "
			 "with a word inside the first bytes of %s (at 0x%lx)", tid, h->hit->symbol,
			 (unsigned long)h->hit_at);
	else if (r < 0)
		snprintf(why, why_len, "thread %ld: its stack at 0x%lx cannot be read (%s): it cannot be seen",
			 tid, (unsigned long)h->bad, strerror(h->err));
	return r < 0 ? -1 : r > 0 ? -1 : 1;
}

/* Steps 1 (scan 0) or 2 (scan 1) for every other thread: 1, 0 or -1 as a thread's. */
static int sandbox_hold_threads(struct sandbox_hold *h, int scan, char *why, size_t why_len)
{
	int dfd = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0) {
		snprintf(why, why_len, "cannot list the threads: %s", strerror(errno));
		return 0;
	}
	static char ents[4096];
	long self = gettid(), got;
	int ok = 1;
	while (ok == 1 && (got = syscall(SYS_getdents64, dfd, ents, sizeof(ents))) > 0) {
		for (long pos = 0; ok == 1 && pos < got;) {
			const struct dirent64 *d = (const struct dirent64 *)(ents + pos);
			pos += d->d_reclen;
			char *endp;
			long tid = strtol(d->d_name, &endp, 10);
			if (d->d_name[0] != '.' && !*endp && tid > 0 && tid != self)
				ok = sandbox_hold_thread(h, tid, scan, why, why_len);
		}
	}
	close(dfd);
	return ok;
}

int sandbox_threads_held(const struct sandbox_func *funcs, size_t n, int full, char *why, size_t why_len)
{
	struct sandbox_hold h = { .funcs = funcs, .n = n, .lo = UINTPTR_MAX, .pid = getpid(), .pagemap = -1 };
	for (size_t k = 0; k < n; k++) {
		if (!funcs[k].hold)
			continue;
		h.lo = funcs[k].wlo < h.lo ? funcs[k].wlo : h.lo;
		h.hi = funcs[k].whi > h.hi ? funcs[k].whi : h.hi;
	}
	if (h.hi == 0)
		return 1;	/* nothing held */
	/* 1. Held, PCs clear: what changes while the client holds and retries. */
	int r = sandbox_hold_threads(&h, 0, why, why_len);
	if (r != 1)
		return r;
	/* 2. Their stacks, from SP. */
	uint64_t t0 = sandbox_hold_now();
	r = sandbox_hold_threads(&h, 1, why, why_len);
	/* 3. Memory: the stacks nobody runs on now. */
	if (r == 1 && full) {
		uintptr_t lo = 0, hi = 0;
		int m = sandbox_hold_memory(&h, &lo, &hi);
		if (m > 0) {
			snprintf(why, why_len, "a word at 0x%lx (mapping %lx-%lx) points inside the first bytes of %s: "
				 "a stack no thread runs on now (a suspended coroutine, a signal frame) may return "
				 "there", (unsigned long)h.hit_at, (unsigned long)lo, (unsigned long)hi, h.hit->symbol);
			r = -1;
		} else if (m < 0) {
			snprintf(why, why_len, "cannot read the process's memory%s%.0lx: %s: stacks cannot be seen",
				 h.bad ? " at 0x" : "", (unsigned long)h.bad, strerror(h.err));
			r = -1;
		}
		h.stats.full = 1;
	}
	h.stats.ns = sandbox_hold_now() - t0;
	/* 4. Still held after the scans; else the state they saw may be gone: wait again. */
	char again[256];
	if (sandbox_hold_threads(&h, 0, again, sizeof(again)) != 1) {
		snprintf(why, why_len, "%s", again);
		return 0;
	}
	if (h.stats.full)
		sandbox_hold_last = h.stats;
	return r;
}

int sandbox_holder_alive(int conn, char *why, size_t why_len)
{
	if (conn < 0)
		return 1;
	struct pollfd p = { .fd = conn, .events = POLLRDHUP };
	int rc;
	do
		rc = poll(&p, 1, 0);
	while (rc < 0 && errno == EINTR);
	if (rc > 0 && p.revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL)) {
		snprintf(why, why_len, "the client holding the threads hung up");
		return 0;
	}
	return 1;
}

int sandbox_hold_wait(const struct sandbox_func *funcs, size_t n, int conn, uint64_t *waited_ns,
		      struct sandbox_error *err)
{
	int need = 0;
	for (size_t i = 0; i < n; i++)
		need |= funcs[i].hold;
	if (!need)
		return 0;
	uint64_t start = sandbox_hold_now();
	sandbox_hold_deadline = start + (uint64_t)PBX_HOLD_WAIT_MS * 1000000ull;
	char why[256] = "";
	for (;;) {
		int r = sandbox_threads_held(funcs, n, 0, why, sizeof(why));
		if (r > 0) {
			*waited_ns = sandbox_hold_now() - start;
			return 0;
		}
		/* Every thread held and a word inside: it stays there while they are held. */
		if (r < 0)
			return sandbox_error_set(err, PBX_E_NOT_HELD, "%s", why);
		if (!sandbox_holder_alive(conn, why, sizeof(why)))
			return sandbox_error_set(err, PBX_E_NOT_HELD, "%s", why);
		if (sandbox_hold_now() > sandbox_hold_deadline)
			return sandbox_error_set(err, PBX_E_NOT_HELD, "after %d ms: %s (patchbox apply holds the "
						 "threads; retry)", PBX_HOLD_WAIT_MS, why);
		struct timespec ts = { 0, 200 * 1000 };
		nanosleep(&ts, NULL);
	}
}

int sandbox_hold_confirm(const struct sandbox_func *funcs, size_t n, int conn, struct sandbox_error *err)
{
	char why[256] = "";
	int need = 0;
	for (size_t i = 0; i < n; i++)
		need |= funcs[i].hold;
	if (!need)
		return 0;
	if (sandbox_threads_held(funcs, n, 1, why, sizeof(why)) != 1)
		return sandbox_error_set(err, PBX_E_NOT_HELD, "%s", why);
	/* The client lets the threads go HOLD_WAIT_MS + 2 s after its request at the
	 * latest: nothing is written after the agent's own deadline. */
	if (sandbox_hold_now() > sandbox_hold_deadline)
		return sandbox_error_set(err, PBX_E_NOT_HELD, "the memory check ended past the %d ms the hold may "
					 "last", PBX_HOLD_WAIT_MS);
	/* The last system call before the stores (sandbox-redirect.c phase 2). */
	if (!sandbox_holder_alive(conn, why, sizeof(why)))
		return sandbox_error_set(err, PBX_E_NOT_HELD, "%s", why);
	return 0;
}
