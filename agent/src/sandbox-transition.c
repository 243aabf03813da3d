/* Part of libsandbox.o: the sandbox memory and its transition. Where the sandbox
 * lies, placing a patch's text and data in it, retiring a removed patch's memory,
 * the quiescence check that reclaims it, and revival (docs/redirect.md, "Reuse of
 * sandbox memory after remove"). What is written into the memory, and how, is
 * sandbox-redirect.c's; when, sandbox-engine.c's; the hold of held entry jumps,
 * sandbox-hold.c's.
 *
 * Retired memory: a removed patch's text/data may still be executing on some
 * thread (preempted inside it, or below a call in it). It is *retired*, not
 * freed, per patch (never merged with other patches' extents), and reused only after
 * a quiescence check passes: every other thread in /proc/self/task must be blocked
 * (its /proc/self/task/TID/syscall is not `running`), its PC (last field) outside
 * the retired text, a conservative scan of its stack from SP (second-to-last field)
 * to the end of the mapping that holds SP must find no 8-byte word inside the
 * retired text or data, and it must not have run during its check (same syscall line
 * and context-switch count before and after the scan). If any thread fails, the
 * region stays retired and the check runs again at the next allocation that needs
 * space. A patch's retired data is reused only once that patch has no retired text
 * left (old code reaches its data pc-relative, invisible to the scan). Not seen
 * by the check: pointers to patch code or data kept in registers of a blocked
 * thread, in the heap, or on a stack the thread is not currently running on
 * (sigaltstack, coroutines).
 *
 * Revival: an apply without data may take over a retired text extent of the same
 * length that already holds exactly its fixed-up bytes, writing nothing there
 * (sandbox_text_revive): threads still in the old copy run identical bytes. This is
 * what keeps apply/remove cycles going when threads never block.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "arch/arch.h"
#include "sandbox-engine.h"

_Static_assert(SANDBOX_ALLOC >= 4096, "SANDBOX_ALLOC must be at least one page");
_Static_assert(SANDBOX_DATA_ALLOC >= SANDBOX_ALIGN, "SANDBOX_DATA_ALLOC too small");

struct sandbox_region sandbox_regions[PBX_MAX_OBJECTS];

/* ------------------------------------------------------------------ where the sandbox lies */

#ifndef SANDBOX_NEAR_MMAP
#define SANDBOX_STR2(x) #x
#define SANDBOX_STR(x) SANDBOX_STR2(x)
/* The seed's sandbox: SANDBOX_ALLOC bytes of `ret` in the program's own text, so
 * redirects and pc-relative fix-ups between it and the program reach (x86-64: rel32;
 * aarch64: a B within 128 MiB). */
__asm__(".pushsection .text.patchbox_sandbox,\"ax\",%progbits\n"
	"\t.p2align 12\n"
	"\t.globl sandbox_text_area\n"
	"\t.hidden sandbox_text_area\n"
	"\t.type sandbox_text_area,%object\n"
	"sandbox_text_area:\n"
	"\t" SANDBOX_ARCH_FILL_ASM(SANDBOX_STR(SANDBOX_ALLOC)) "\n"
	"\t.size sandbox_text_area," SANDBOX_STR(SANDBOX_ALLOC) "\n"
	"\t" SANDBOX_ARCH_ALIGN_ASM "\n"
	"\t.popsection\n");
extern unsigned char sandbox_text_area[] __attribute__((visibility("hidden")));
static unsigned char sandbox_data_area[SANDBOX_DATA_ALLOC] __attribute__((aligned(4096)));
#endif

/* A free address for total bytes with [lo, hi) and them within reach: hint addresses
 * below its lowest segment, then above it. The mapping (rw-), or NULL. */
static uint8_t *sandbox_map_within(uintptr_t lo, uintptr_t hi, size_t total, uintptr_t reach)
{
	const uintptr_t step = 2ul << 20;
	if (hi - lo + total > reach)
		return NULL;
	for (int above = 0; above < 2; above++) {
		for (uintptr_t off = 0; hi - lo + total + off <= reach; off += step) {
			uintptr_t hint;
			if (above)
				hint = hi + off;
			else if (lo > total + off + (1ul << 16))
				hint = lo - total - off;
			else
				break;
			void *p = mmap((void *)hint, total, PROT_READ | PROT_WRITE,
				       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
			if (p == MAP_FAILED)
				continue;
			if ((uintptr_t)p != hint) {	/* kernel without MAP_FIXED_NOREPLACE */
				munmap(p, total);
				continue;
			}
			return p;
		}
	}
	return NULL;
}

/* Maps one page + SANDBOX_ALLOC of text and SANDBOX_DATA_ALLOC of data within
 * SANDBOX_ARCH_NEAR of [lo, hi) (x86-64: 1.5 GiB, rel32; aarch64: 96 MiB, a B), else
 * within SANDBOX_ARCH_FAR (aarch64: 1.5 GiB, its redirects then through the veneer of
 * arch/aarch64/publish.h), so that redirects and pc-relative fix-ups reach. The text
 * is `ret`, r-x; returns the mapping. */
static uint8_t *sandbox_map_near(uintptr_t lo, uintptr_t hi, const char *what, struct sandbox_error *err)
{
	size_t tsz = sandbox_round_up(SANDBOX_ALLOC, SANDBOX_PAGE) + SANDBOX_PAGE;
	size_t dsz = sandbox_round_up(SANDBOX_DATA_ALLOC, SANDBOX_PAGE);
	size_t total = tsz + dsz;
	lo = sandbox_round_down(lo, SANDBOX_PAGE);
	hi = sandbox_round_up(hi, SANDBOX_PAGE);
	if (hi <= lo || hi - lo + total > SANDBOX_ARCH_FAR) {
		sandbox_error_set(err, PBX_E_INTERNAL, "%s: span too large for a near sandbox", what);
		return NULL;
	}
	uint8_t *m = sandbox_map_within(lo, hi, total, SANDBOX_ARCH_NEAR);
	if (!m && SANDBOX_ARCH_FAR > SANDBOX_ARCH_NEAR)
		m = sandbox_map_within(lo, hi, total, SANDBOX_ARCH_FAR);
	if (!m) {
		sandbox_error_set(err, PBX_E_INTERNAL, "no free address within %lu MiB of %s for the sandbox",
				  (unsigned long)(SANDBOX_ARCH_FAR >> 20), what);
		return NULL;
	}
	sandbox_arch_text_fill(m, tsz);
	memcpy(m, sandbox_arch_selftest_target, sizeof(sandbox_arch_selftest_target));
	/* Code written, to be run (the self-test's target) and copied into. */
	sandbox_arch_flush_icache((uintptr_t)m, tsz);
	if (mprotect(m, tsz, PROT_READ | PROT_EXEC) != 0) {
		int e = errno;
		munmap(m, total);
		sandbox_error_set(err, PBX_E_MPROTECT_FAILED, "sandbox r-x: %s", strerror(e));
		return NULL;
	}
	return m;
}

static void sandbox_region_init(struct sandbox_region *r, uintptr_t text, uintptr_t data)
{
	memset(r, 0, sizeof(*r));
	r->text.base = text;
	r->text.size = sandbox_round_down(SANDBOX_ALLOC, SANDBOX_ALIGN);
	r->text.is_text = 1;
	r->data.base = data;
	r->data.size = sandbox_round_down(SANDBOX_DATA_ALLOC, SANDBOX_ALIGN);
}

int sandbox_region_map(size_t idx, uintptr_t lo, uintptr_t hi, const char *what, struct sandbox_error *err)
{
	uint8_t *m = idx < PBX_MAX_OBJECTS ? sandbox_map_near(lo, hi, what, err) : NULL;
	if (!m)
		return -1;
	sandbox_region_init(&sandbox_regions[idx], (uintptr_t)m + SANDBOX_PAGE,
			    (uintptr_t)m + SANDBOX_PAGE + sandbox_round_up(SANDBOX_ALLOC, SANDBOX_PAGE));
	return 0;
}

int sandbox_region_unmap(size_t idx)
{
	struct sandbox_region *r = idx > 0 && idx < PBX_MAX_OBJECTS ? &sandbox_regions[idx] : NULL;
	if (!r || !r->text.size || r->text.n || r->data.n)
		return -1;
	/* As sandbox_map_near laid it out: a page, the text, the data. Nothing is placed in
	 * it and nothing retired is left (the quiescence check freed it): no thread can run
	 * or read there, as for memory handed to another patch. */
	size_t total = SANDBOX_PAGE + sandbox_round_up(SANDBOX_ALLOC, SANDBOX_PAGE) +
		       sandbox_round_up(SANDBOX_DATA_ALLOC, SANDBOX_PAGE);
	if (munmap((void *)(r->text.base - SANDBOX_PAGE), total) != 0)
		return -1;
	memset(r, 0, sizeof(*r));
	return 0;
}

#ifdef SANDBOX_NEAR_MMAP
/* The executable's region near it. The self-test's target goes in the page before
 * the sandbox text: the agent's own functions are too far from the sandbox for a
 * direct jump when it is a shared object (arch/arch.h, sandbox_arch_selftest_target). */
static int sandbox_areas_map(uintptr_t *selftest_ret, struct sandbox_error *err)
{
	const struct sandbox_object *exe = sandbox_exe_get();
	if (sandbox_region_map(0, exe->lo, exe->hi, "the executable", err) != 0)
		return -1;
	*selftest_ret = sandbox_regions[0].text.base - SANDBOX_PAGE + SANDBOX_ARCH_ENTRY_PAD;
	return 0;
}
#else
/* The self-test's target: built with the same patchable entry as patched programs,
 * in the program's text like the sandbox, so a direct jump reaches. */
__attribute__((noinline, noclone, used, SANDBOX_ARCH_PATCHABLE_ATTR))
static int sandbox_selftest_target(int x)
{
	return x + 1;
}

static int sandbox_areas_map(uintptr_t *selftest_ret, struct sandbox_error *err)
{
	(void)err;
	sandbox_region_init(&sandbox_regions[0], (uintptr_t)sandbox_text_area, (uintptr_t)sandbox_data_area);
	*selftest_ret = (uintptr_t)sandbox_selftest_target;
	return 0;
}
#endif

int sandbox_areas_init(uintptr_t *selftest_ret, struct sandbox_error *err)
{
	memset(sandbox_regions, 0, sizeof(sandbox_regions));
	return sandbox_areas_map(selftest_ret, err);
}

/* ------------------------------------------------------------------ extents */

/* First-fit, SANDBOX_ALIGN-aligned. Returns 0 and *ret, or -1 if no gap fits. */
static int sandbox_area_alloc(struct sandbox_area *a, size_t len, uint32_t owner, uintptr_t *ret)
{
	if (len == 0 || len > a->size || a->n >= SANDBOX_MAX_EXTENTS)
		return -1;
	size_t need = sandbox_round_up(len, SANDBOX_ALIGN);
	size_t pos = 0, i;
	for (i = 0; i <= a->n; i++) {
		size_t end = i < a->n ? a->ext[i].off : a->size;
		if (end >= pos && end - pos >= need)
			break;
		if (i < a->n)
			pos = a->ext[i].off + a->ext[i].len;
	}
	if (i > a->n)
		return -1;
	memmove(&a->ext[i + 1], &a->ext[i], (a->n - i) * sizeof(a->ext[0]));
	a->ext[i] = (struct sandbox_extent){ .off = pos, .len = need, .owner = owner };
	a->n++;
	a->used += need;
	*ret = a->base + pos;
	return 0;
}

static void sandbox_area_drop(struct sandbox_area *a, size_t i)
{
	if (a->ext[i].retired)
		a->retired -= a->ext[i].len;
	else
		a->used -= a->ext[i].len;
	memmove(&a->ext[i], &a->ext[i + 1], (a->n - i - 1) * sizeof(a->ext[0]));
	a->n--;
}

/* Marks owner's extents retired. They keep their owner and are never merged with
 * neighbours: a thread still inside a removed patch can reach all of that patch's text
 * and data (its code reaches them pc-relative) but nothing of another patch, so the
 * unit of reuse is one patch's allocation (see sandbox_retired_reclaim). The table
 * cannot grow without bound: a full table is treated like a full sandbox (reclaim,
 * else SANDBOX_FULL), and revival reuses retired extents in place. */
static void sandbox_area_retire(struct sandbox_area *a, uint32_t owner, int keep)
{
	for (size_t i = 0; i < a->n; i++) {
		if (a->ext[i].owner == owner && !a->ext[i].retired) {
			a->ext[i].retired = 1;
			a->ext[i].keep |= keep;
			a->used -= a->ext[i].len;
			a->retired += a->ext[i].len;
		}
	}
}

static ssize_t sandbox_area_find(const struct sandbox_area *a, uintptr_t addr)
{
	for (size_t i = 0; i < a->n; i++)
		if (a->base + a->ext[i].off == addr)
			return (ssize_t)i;
	return -1;
}

/* Area k of every region, text and data in turn (k < SANDBOX_NAREAS); NULL for a
 * region not mapped. A patch's owner id is unique across regions. */
#define SANDBOX_NAREAS (2 * PBX_MAX_OBJECTS)
static struct sandbox_area *sandbox_area_at(size_t k)
{
	struct sandbox_region *r = &sandbox_regions[k / 2];
	struct sandbox_area *a = k % 2 ? &r->data : &r->text;
	return a->size ? a : NULL;
}

/* The area that contains addr, NULL if none. */
static struct sandbox_area *sandbox_area_of(uintptr_t addr)
{
	for (size_t k = 0; k < SANDBOX_NAREAS; k++) {
		struct sandbox_area *a = sandbox_area_at(k);
		if (a && addr >= a->base && addr - a->base < a->size)
			return a;
	}
	return NULL;
}

/* Frees the (not yet retired) text and data of owner at once: only for memory no
 * other thread can have executed (the self-test). -1 if the text stays. */
int sandbox_owner_free(uint32_t owner)
{
	for (size_t k = 0; k < SANDBOX_NAREAS; k++) {
		struct sandbox_area *a = sandbox_area_at(k);
		for (size_t i = a ? a->n : 0; i-- > 0;) {
			if (a->ext[i].owner != owner || a->ext[i].retired)
				continue;
			if (a->is_text && sandbox_text_refill(a->base + a->ext[i].off, a->ext[i].len) != 0)
				return -1;
			sandbox_area_drop(a, i);
		}
	}
	return 0;
}

/* Retires the text and data of a removed patch; keep (RETAIN): never reclaimed. */
void sandbox_owner_retire(uint32_t owner, int keep)
{
	for (size_t k = 0; k < SANDBOX_NAREAS; k++)
		if (sandbox_area_at(k))
			sandbox_area_retire(sandbox_area_at(k), owner, keep);
}

/* Gives back what an apply that failed before publishing placed for owner: never
 * executed (no redirect was published), so freed at once, no quiescence needed; a
 * revived text extent (revived_addr, 0 if none) goes back to retired under its
 * previous owner revived_from (old threads may still run it). */
void sandbox_owner_unplace(uint32_t owner, uintptr_t revived_addr, uint32_t revived_from)
{
	struct sandbox_area *t = revived_addr ? sandbox_area_of(revived_addr) : NULL;
	if (t) {
		sandbox_area_retire(t, owner, 0);
		ssize_t i = sandbox_area_find(t, revived_addr);
		if (i >= 0)
			t->ext[i].owner = revived_from;
	}
	for (size_t k = 0; k < SANDBOX_NAREAS; k++) {
		struct sandbox_area *a = sandbox_area_at(k);
		for (size_t i = a ? a->n : 0; i-- > 0;)
			if (a->ext[i].owner == owner && (!a->is_text || !a->ext[i].retired))
				sandbox_area_drop(a, i);
	}
}

/* ------------------------------------------------------------------ quiescence */

struct sandbox_retired_range {
	uintptr_t lo, hi;
	int is_text;
	uint32_t owner;		/* the removed patch it belonged to */
	struct sandbox_area *area;
};

static char *sandbox_file_read(const char *path, size_t *len_ret)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	size_t cap = 4096, len = 0;
	char *buf = malloc(cap + 1);
	while (buf) {
		if (len == cap) {
			char *nb = cap > (64u << 20) ? NULL : realloc(buf, cap * 2 + 1);
			if (!nb) {
				free(buf);
				buf = NULL;
				break;
			}
			buf = nb;
			cap *= 2;
		}
		ssize_t r = read(fd, buf + len, cap - len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			free(buf);
			buf = NULL;
			break;
		}
		if (r == 0)
			break;
		len += (size_t)r;
	}
	close(fd);
	if (buf) {
		buf[len] = '\0';
		if (len_ret)
			*len_ret = len;
	}
	return buf;
}

/* End of the mapping in /proc/self/maps that contains addr, 0 if none. */
static uintptr_t sandbox_maps_end(const char *maps, uintptr_t addr)
{
	const char *p = maps;
	while (p && *p) {
		unsigned long lo, hi;
		if (sscanf(p, "%lx-%lx", &lo, &hi) == 2 && addr >= lo && addr < hi)
			return hi;
		p = strchr(p, '\n');
		if (p)
			p++;
	}
	return 0;
}

/* Marks busy[] for every range some word of [sp, end) points into. -1 if unreadable. */
static int sandbox_stack_scan(uintptr_t sp, uintptr_t end, const struct sandbox_retired_range *r,
			      size_t nr, int *busy)
{
	static uint64_t chunk[8192];	/* only the agent thread runs this */
	sp = sandbox_round_down(sp, 8);
	while (sp < end) {
		size_t len = end - sp < sizeof(chunk) ? end - sp : sizeof(chunk);
		struct iovec local = { chunk, len }, remote = { (void *)sp, len };
		/* process_vm_readv on ourselves: a vanished page is an error, not a fault. */
		ssize_t got = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
		if (got <= 0)
			return -1;
		for (size_t w = 0; w < (size_t)got / 8; w++)
			for (size_t k = 0; k < nr; k++)
				if (chunk[w] >= r[k].lo && chunk[w] < r[k].hi)
					busy[k] = 1;
		sp += (size_t)got;
	}
	return 0;
}

/* Voluntary + involuntary context switches of thread tid so far; -1 with errno. */
static int sandbox_task_switches(long tid, unsigned long long *n)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/task/%ld/status", tid);
	char *st = sandbox_file_read(path, NULL);
	if (!st)
		return -1;
	unsigned long long v = 0, nv = 0;
	char *a = strstr(st, "\nvoluntary_ctxt_switches:");
	char *b = strstr(st, "\nnonvoluntary_ctxt_switches:");
	int ok = a && b && sscanf(a, "\nvoluntary_ctxt_switches: %llu", &v) == 1 &&
		 sscanf(b, "\nnonvoluntary_ctxt_switches: %llu", &nv) == 1;
	free(st);
	if (!ok) {
		errno = EINVAL;
		return -1;
	}
	*n = v + nv;
	return 0;
}

/* Whether owner still has text (text 1) or data (0) in a sandbox (live or retired). */
static int sandbox_owner_has(uint32_t owner, int text)
{
	for (size_t k = text ? 0 : 1; k < SANDBOX_NAREAS; k += 2) {
		const struct sandbox_area *a = sandbox_area_at(k);
		for (size_t i = 0; a && i < a->n; i++)
			if (a->ext[i].owner == owner)
				return 1;
	}
	return 0;
}

/* See the comment at the top of this file. Frees retired memory that passes. */
static void sandbox_retired_reclaim(void)
{
	size_t cap = 0, nr = 0;
	for (size_t k = 0; k < SANDBOX_NAREAS; k++)
		cap += sandbox_area_at(k) ? sandbox_area_at(k)->n : 0;
	if (cap == 0)
		return;
	struct sandbox_retired_range *r = calloc(cap, sizeof(*r));
	int *busy = calloc(cap, sizeof(*busy));
	char *maps = NULL;
	DIR *dir = NULL;
	if (!r || !busy)
		goto out;
	for (size_t k = 0; k < SANDBOX_NAREAS; k++) {
		struct sandbox_area *a = sandbox_area_at(k);
		for (size_t i = 0; a && i < a->n; i++)
			if (a->ext[i].retired && !a->ext[i].keep)
				r[nr++] = (struct sandbox_retired_range){
					a->base + a->ext[i].off, a->base + a->ext[i].off + a->ext[i].len,
					a->is_text, a->ext[i].owner, a };
	}
	if (nr == 0)
		goto out;
	maps = sandbox_file_read("/proc/self/maps", NULL);
	dir = opendir("/proc/self/task");
	if (!maps || !dir)
		goto out;	/* cannot check: everything stays retired */
	pid_t self = gettid();
	int all_busy = 0;
	struct dirent *de;
	while (!all_busy && (de = readdir(dir)) != NULL) {
		char *endp;
		long tid = strtol(de->d_name, &endp, 10);
		if (de->d_name[0] == '.' || *endp || tid <= 0 || tid == self)
			continue;
		char path[64], *st, *st0;
		unsigned long long sw0, sw1;
		/* The thread must not run between reading its state and the end of its stack
		 * scan (else it could have returned into retired code and popped the return
		 * address the scan looks for): same context-switch count and same syscall
		 * line before and after; a thread that woke up meanwhile is either `running`
		 * now or has switched out again. */
		if (sandbox_task_switches(tid, &sw0) != 0) {
			if (errno != ENOENT)	/* a thread that exited runs nothing */
				all_busy = 1;
			continue;
		}
		snprintf(path, sizeof(path), "/proc/self/task/%ld/syscall", tid);
		st = sandbox_file_read(path, NULL);
		if (!st) {
			if (errno != ENOENT)
				all_busy = 1;
			continue;
		}
		st0 = strdup(st);
		/* "running", or "nr args... sp pc", or "-1 sp pc": last two fields. */
		unsigned long sp = 0, pc = 0;
		char *last = strrchr(st, ' ');
		if (strncmp(st, "running", 7) == 0 || !last || last == st) {
			all_busy = 1;
		} else {
			*last = '\0';
			char *prev = strrchr(st, ' ');
			if (!prev || sscanf(prev + 1, "%lx", &sp) != 1 || sscanf(last + 1, "%lx", &pc) != 1)
				all_busy = 1;
		}
		free(st);
		if (all_busy || !st0) {
			all_busy = 1;
			free(st0);
			break;
		}
		for (size_t k = 0; k < nr; k++)
			if (r[k].is_text && pc >= r[k].lo && pc < r[k].hi)
				busy[k] = 1;
		uintptr_t end = sandbox_maps_end(maps, sp);
		if (!end || sandbox_stack_scan(sp, end, r, nr, busy) != 0)
			all_busy = 1;
		st = all_busy ? NULL : sandbox_file_read(path, NULL);
		if (!all_busy && (!st || strcmp(st, st0) != 0 || sandbox_task_switches(tid, &sw1) != 0 ||
				  sw1 != sw0))
			all_busy = 1;	/* it ran meanwhile: check again at the next allocation */
		free(st);
		free(st0);
	}
	if (all_busy) {
		sandbox_debug("quiescence check failed: retired memory stays retired");
		goto out;
	}
	/* Text: per patch. Data: only once that patch has no retired text left, because
	 * code still running in retired text reaches its data pc-relative, not the stack. */
	for (size_t k = 0; k < nr; k++) {
		if (!r[k].is_text)
			continue;
		ssize_t i = sandbox_area_find(r[k].area, r[k].lo);
		if (busy[k] || i < 0 || sandbox_text_refill(r[k].lo, r[k].hi - r[k].lo) != 0)
			continue;
		sandbox_area_drop(r[k].area, (size_t)i);
		sandbox_debug("reclaimed retired text 0x%lx+%lu", (unsigned long)r[k].lo,
			      (unsigned long)(r[k].hi - r[k].lo));
	}
	for (size_t k = 0; k < nr; k++) {
		ssize_t i = r[k].is_text ? -1 : sandbox_area_find(r[k].area, r[k].lo);
		if (i < 0 || busy[k] || sandbox_owner_has(r[k].owner, 1))
			continue;
		sandbox_area_drop(r[k].area, (size_t)i);
		sandbox_debug("reclaimed retired data 0x%lx+%lu", (unsigned long)r[k].lo,
			      (unsigned long)(r[k].hi - r[k].lo));
	}
out:
	if (dir)
		closedir(dir);
	free(maps);
	free(busy);
	free(r);
}

void sandbox_retired_collect(void)
{
	size_t retired = 0;
	for (size_t k = 0; k < SANDBOX_NAREAS; k++)
		retired += sandbox_area_at(k) ? sandbox_area_at(k)->retired : 0;
	if (retired)
		sandbox_retired_reclaim();
}

/* Places len bytes for owner in a; when nothing fits and something is retired, runs
 * the quiescence check once and tries again. 0 and *ret, or -1. */
int sandbox_area_alloc_reclaim(struct sandbox_area *a, size_t len, uint32_t owner, uintptr_t *ret)
{
	if (sandbox_area_alloc(a, len, owner, ret) == 0)
		return 0;
	size_t retired = 0;
	for (size_t k = 0; k < SANDBOX_NAREAS; k++)
		retired += sandbox_area_at(k) ? sandbox_area_at(k)->retired : 0;
	if (retired == 0)
		return -1;
	sandbox_retired_reclaim();
	return sandbox_area_alloc(a, len, owner, ret);
}

/* ------------------------------------------------------------------ revival */

/* Revival (docs/redirect.md, "Revival"): a retired text extent of exactly the
 * needed length that already holds, byte for byte, the text this apply would write
 * there (fix-ups computed for that address) is handed to the new patch without
 * writing: a thread still running the old copy executes the very same bytes.
 * Only for patches without data or bss, and only from a removed patch that had none
 * (its code would reach its data pc-relative). 1 and *ret if found. tbuf: scratch
 * of spec->text_len bytes. */
int sandbox_text_revive(struct sandbox_area *a, const struct sandbox_apply_spec *spec, const uint64_t *import,
			uintptr_t bias, uint32_t owner, uint8_t *tbuf, uint32_t *prev_owner, uintptr_t *ret)
{
	size_t need = sandbox_round_up(spec->text_len, SANDBOX_ALIGN);
	for (size_t i = 0; i < a->n; i++) {
		struct sandbox_extent *x = &a->ext[i];
		if (!x->retired || x->len != need || sandbox_owner_has(x->owner, 0))
			continue;
		uintptr_t addr = a->base + x->off;
		memcpy(tbuf, spec->text, spec->text_len);
		if (sandbox_fixups_apply(spec, import, bias, tbuf, addr, NULL, 0, NULL) != 0 ||
		    memcmp(tbuf, (const void *)addr, spec->text_len) != 0)
			continue;
		x->retired = 0;
		*prev_owner = x->owner;
		x->owner = owner;
		a->retired -= x->len;
		a->used += x->len;
		*ret = addr;
		sandbox_debug("revived retired text 0x%lx+%zu unchanged", (unsigned long)addr, x->len);
		return 1;
	}
	return 0;
}
