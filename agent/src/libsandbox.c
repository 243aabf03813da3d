/* libsandbox.o: the sandbox memory and the apply / redirect / remove engine.
 *
 * Mechanism only: the server (sandbox-listen.c) parses requests into a
 * struct sandbox_apply_spec and calls in here from the single agent thread, so
 * the engine state needs no lock. Errors are values (struct sandbox_error).
 *
 * Redirect protocol (x86-64, functions built with -fpatchable-function-entry=8,6,
 * i.e. 6 NOPs at entry-6 and 2 NOPs at the entry, the entry 2-byte aligned):
 *
 *   apply   phase 1: write `e9 rel32` into the dead padding at site-6.
 *           sync_core (membarrier): every core now sees the jump and the new code.
 *           phase 2: one aligned 2-byte store of `eb f8` at site (jumps to site-6).
 *           sync_core.
 *   A thread already past the first entry NOP executes `f8` (clc) alone: harmless
 *   at a function entry, it then runs the old body.
 *
 *   remove  (1) 2-byte store of the saved entry bytes at site, sync_core: no new
 *               thread enters the padding.
 *           (2) 2-byte store of `eb 04` at site-6, sync_core: a thread parked at
 *               site-6 now jumps over the rest of the padding to site.
 *           (3) plain stores of the saved bytes at site-4..site-1 (dead: skipped
 *               by `eb 04`).
 *           (4) 2-byte store of the saved bytes at site-6, sync_core.
 *   Afterwards [site-6, site+2) is byte-identical to what it was before the apply.
 *
 * Entry jump (PBX_KIND_ENTRY_JUMP, functions without the padding; docs/redirect.md
 * "Functions without the padding"): one aligned 8-byte atomic store puts `e9 rel32`
 * at P = entry+skip (P % 8 <= 3, so [P, P+5) lies in one word; the other 3 bytes are
 * stored with their current values), between sync_cores. Remove stores the word again
 * with the saved bytes of [P, P+5) and the current others. The instruction-level
 * rules (P starts an instruction of >= 5 bytes, no branch into (P, P+5)) are checked
 * by extract-patch with a disassembler; the agent checks what it can: the expected
 * bytes, the alignment, the endbr64 when skip is 4, the range in the executable.
 *
 * Stacking: a function already redirected is redirected at the top of its chain,
 * the replacement entry of the last patch on it (site = that entry), which has its
 * own 6+2 NOPs. Removal must go top-down (NOT_TOP).
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
 * left (old code reaches its data rel32-relative, invisible to the scan). Not seen
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
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <link.h>
#include <linux/membarrier.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "arch/x86_64/insn.h"
#include "sandbox-internal.h"

_Static_assert(SANDBOX_ALLOC >= 4096, "SANDBOX_ALLOC must be at least one page");
_Static_assert(SANDBOX_DATA_ALLOC >= SANDBOX_ALIGN, "SANDBOX_DATA_ALLOC too small");

#define SANDBOX_PAGE 4096ul
#define SANDBOX_MAX_EXTENTS 1024

static uintptr_t sandbox_round_up(uintptr_t v, uintptr_t a) { return (v + a - 1) & ~(a - 1); }
static uintptr_t sandbox_round_down(uintptr_t v, uintptr_t a) { return v & ~(a - 1); }

/* ------------------------------------------------------------------ errors */

static const char *const sandbox_error_texts[] = PBX_ERROR_TEXTS;
_Static_assert(sizeof(sandbox_error_texts) / sizeof(sandbox_error_texts[0]) == PBX_E_COUNT_,
	       "PBX_ERROR_TEXTS and enum pbx_error disagree");

const char *sandbox_error_text(int code)
{
	if (code < 0 || code >= PBX_E_COUNT_)
		return "unknown error";
	return sandbox_error_texts[code];
}

int sandbox_error_set(struct sandbox_error *err, enum pbx_error code, const char *fmt, ...)
{
	if (!err)
		return -1;
	err->code = code;
	int n = snprintf(err->msg, sizeof(err->msg), fmt ? "%s: " : "%s", sandbox_error_text(code));
	if (fmt && n > 0 && (size_t)n < sizeof(err->msg)) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(err->msg + n, sizeof(err->msg) - n, fmt, ap);
		va_end(ap);
	}
	return -1;
}

/* ------------------------------------------------------------------ sandbox memory */

#ifndef SANDBOX_NEAR_MMAP
#define SANDBOX_STR2(x) #x
#define SANDBOX_STR(x) SANDBOX_STR2(x)
/* The seed's sandbox: SANDBOX_ALLOC bytes of `ret` in the program's own text, so
 * rel32 jumps and PC32 fix-ups between it and the program always reach. */
__asm__(".pushsection .text.patchbox_sandbox,\"ax\",@progbits\n"
	"\t.p2align 12\n"
	"\t.globl sandbox_text_area\n"
	"\t.hidden sandbox_text_area\n"
	"\t.type sandbox_text_area,@object\n"
	"sandbox_text_area:\n"
	"\t.fill " SANDBOX_STR(SANDBOX_ALLOC) ",1," SANDBOX_STR(SANDBOX_INSN_RET) "\n"
	"\t.size sandbox_text_area," SANDBOX_STR(SANDBOX_ALLOC) "\n"
	"\t.p2align 12," SANDBOX_STR(SANDBOX_INSN_RET) "\n"
	"\t.popsection\n");
extern unsigned char sandbox_text_area[] __attribute__((visibility("hidden")));
static unsigned char sandbox_data_area[SANDBOX_DATA_ALLOC] __attribute__((aligned(4096)));
#endif

struct sandbox_extent {
	size_t off, len;
	uint32_t owner;		/* patch id */
	int retired;
	int keep;		/* sticky: held a RETAIN patch, never reclaimed (docs/qemu.md) */
};

struct sandbox_area {
	uintptr_t base;
	size_t size, used, retired;
	int is_text;
	size_t n;		/* extents, sorted by off */
	struct sandbox_extent ext[SANDBOX_MAX_EXTENTS];
};

static struct sandbox_area sandbox_text, sandbox_data;
static struct sandbox_exe_info sandbox_exe;
static int sandbox_ready;
static long sandbox_sync_cmd;	/* membarrier command that serialises cores, 0 = none */
static const char *sandbox_sync_name = "none";
static uintptr_t sandbox_selftest_addr;	/* entry of the self-test's target */

static struct sandbox_patch *sandbox_patches[PBX_MAX_PATCHES];
static size_t sandbox_npatches;
static uint32_t sandbox_next_id = 1;

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
 * and data (its code reaches them rel32-relative) but nothing of another patch, so the
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

/* ------------------------------------------------------------------ code pages */

struct sandbox_pageset {
	uintptr_t *page;
	size_t n, cap, done;	/* done: pages made writable so far */
};

static int sandbox_pageset_add(struct sandbox_pageset *ps, uintptr_t addr, size_t len)
{
	if (len == 0)
		return 0;
	for (uintptr_t p = sandbox_round_down(addr, SANDBOX_PAGE); p < addr + len; p += SANDBOX_PAGE) {
		for (size_t i = 0; i < ps->n; i++)
			if (ps->page[i] == p)
				goto next;
		if (ps->n == ps->cap) {
			size_t cap = ps->cap ? ps->cap * 2 : 16;
			uintptr_t *np = realloc(ps->page, cap * sizeof(*np));
			if (!np)
				return -1;
			ps->page = np;
			ps->cap = cap;
		}
		ps->page[ps->n++] = p;
next:;
	}
	return 0;
}

/* Makes every page RWX; on failure restores the ones done and returns -1 with err. */
static int sandbox_pageset_open(struct sandbox_pageset *ps, struct sandbox_error *err)
{
	for (ps->done = 0; ps->done < ps->n; ps->done++) {
		if (mprotect((void *)ps->page[ps->done], SANDBOX_PAGE,
			     PROT_READ | PROT_WRITE | PROT_EXEC) != 0) {
			int e = errno;
			uintptr_t bad = ps->page[ps->done];
			while (ps->done > 0) {
				ps->done--;
				mprotect((void *)ps->page[ps->done], SANDBOX_PAGE, PROT_READ | PROT_EXEC);
			}
			return sandbox_error_set(err, PBX_E_MPROTECT_FAILED,
						 "mprotect(0x%lx, rwx): %s", (unsigned long)bad, strerror(e));
		}
	}
	return 0;
}

/* Text pages are writable only while being written: back to r-x. */
static void sandbox_pageset_close(struct sandbox_pageset *ps)
{
	for (size_t i = 0; i < ps->done; i++) {
		if (mprotect((void *)ps->page[i], SANDBOX_PAGE, PROT_READ | PROT_EXEC) != 0)
			sandbox_debug("mprotect(0x%lx, r-x) failed: %s", (unsigned long)ps->page[i],
				      strerror(errno));
	}
	ps->done = 0;
}

static void sandbox_pageset_deinit(struct sandbox_pageset *ps)
{
	free(ps->page);
	*ps = (struct sandbox_pageset){ 0 };
}

/* Serialises instruction fetch on every core running this process, so no core
 * executes stale bytes of what we just wrote. Pairs with each code store below. */
static void sandbox_core_sync(void)
{
	if (sandbox_sync_cmd && syscall(SYS_membarrier, sandbox_sync_cmd, 0, 0) != 0)
		sandbox_debug("membarrier failed: %s", strerror(errno));
}

/* Publishes one 2-byte instruction; x86 makes an aligned 2-byte store atomic for
 * instruction fetch on other cores: they see the old or the new pair, never half. */
static void sandbox_insn_store2(uintptr_t addr, uint16_t insn)
{
	__atomic_store_n((uint16_t *)addr, insn, __ATOMIC_RELEASE);
}

/* Publishes an entry jump: one aligned 8-byte store, single-copy atomic on x86-64
 * for instruction fetch too (the word never crosses a cache line). */
static void sandbox_insn_store8(uintptr_t addr, uint64_t word)
{
	__atomic_store_n((uint64_t *)addr, word, __ATOMIC_RELEASE);
}

/* The word at f->saved_at with [site, site+5) replaced by `bytes` and the other three
 * bytes as they are now (another patch may have changed them since f->saved). */
static uint64_t sandbox_jump_word(const struct sandbox_func *f, const uint8_t *bytes)
{
	uint64_t w = __atomic_load_n((const uint64_t *)f->saved_at, __ATOMIC_RELAXED);
	memcpy((uint8_t *)&w + (f->site - f->saved_at), bytes, PBX_JUMP_LEN);
	return w;
}

/* Fills text with `ret` again, so a stray jump into free sandbox returns. -1 if
 * the pages cannot be made writable (the caller keeps the memory retired). */
static int sandbox_text_refill(uintptr_t addr, size_t len)
{
	struct sandbox_pageset ps = { 0 };
	int rc = -1;
	if (sandbox_pageset_add(&ps, addr, len) == 0 && sandbox_pageset_open(&ps, NULL) == 0) {
		memset((void *)addr, SANDBOX_INSN_RET, len);
		sandbox_pageset_close(&ps);
		/* Pairs with the next apply's writes: no core keeps fetching old bytes here. */
		sandbox_core_sync();
		rc = 0;
	}
	sandbox_pageset_deinit(&ps);
	return rc;
}

/* Frees the (not yet retired) text and data of owner at once: only for memory no
 * other thread can have executed (the self-test). -1 if the text stays. */
static int sandbox_owner_free(uint32_t owner)
{
	struct sandbox_area *t = &sandbox_text, *d = &sandbox_data;
	for (size_t i = t->n; i-- > 0;) {
		if (t->ext[i].owner != owner || t->ext[i].retired)
			continue;
		if (sandbox_text_refill(t->base + t->ext[i].off, t->ext[i].len) != 0)
			return -1;
		sandbox_area_drop(t, i);
	}
	for (size_t i = d->n; i-- > 0;)
		if (d->ext[i].owner == owner && !d->ext[i].retired)
			sandbox_area_drop(d, i);
	return 0;
}

/* ------------------------------------------------------------------ quiescence */

struct sandbox_retired_range {
	uintptr_t lo, hi;
	int is_text;
	uint32_t owner;		/* the removed patch it belonged to */
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

/* Whether owner still has text in the sandbox (live or retired). */
static int sandbox_owner_has_text(uint32_t owner)
{
	for (size_t i = 0; i < sandbox_text.n; i++)
		if (sandbox_text.ext[i].owner == owner)
			return 1;
	return 0;
}

/* Whether owner still has data in the data area (live or retired). */
static int sandbox_owner_has_data(uint32_t owner)
{
	for (size_t i = 0; i < sandbox_data.n; i++)
		if (sandbox_data.ext[i].owner == owner)
			return 1;
	return 0;
}

/* See the comment at the top of this file. Frees retired memory that passes. */
static void sandbox_retired_reclaim(void)
{
	size_t cap = sandbox_text.n + sandbox_data.n, nr = 0;
	if (cap == 0)
		return;
	struct sandbox_retired_range *r = calloc(cap, sizeof(*r));
	int *busy = calloc(cap, sizeof(*busy));
	char *maps = NULL;
	DIR *dir = NULL;
	if (!r || !busy)
		goto out;
	struct sandbox_area *areas[2] = { &sandbox_text, &sandbox_data };
	for (int a = 0; a < 2; a++)
		for (size_t i = 0; i < areas[a]->n; i++)
			if (areas[a]->ext[i].retired && !areas[a]->ext[i].keep)
				r[nr++] = (struct sandbox_retired_range){
					areas[a]->base + areas[a]->ext[i].off,
					areas[a]->base + areas[a]->ext[i].off + areas[a]->ext[i].len,
					a == 0, areas[a]->ext[i].owner };
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
	 * code still running in retired text reaches its data through rel32, not the stack. */
	for (size_t k = 0; k < nr; k++) {
		if (!r[k].is_text)
			continue;
		ssize_t i = sandbox_area_find(&sandbox_text, r[k].lo);
		if (busy[k] || i < 0 || sandbox_text_refill(r[k].lo, r[k].hi - r[k].lo) != 0)
			continue;
		sandbox_area_drop(&sandbox_text, (size_t)i);
		sandbox_debug("reclaimed retired text 0x%lx+%lu", (unsigned long)r[k].lo,
			      (unsigned long)(r[k].hi - r[k].lo));
	}
	for (size_t k = 0; k < nr; k++) {
		ssize_t i = r[k].is_text ? -1 : sandbox_area_find(&sandbox_data, r[k].lo);
		if (i < 0 || busy[k] || sandbox_owner_has_text(r[k].owner))
			continue;
		sandbox_area_drop(&sandbox_data, (size_t)i);
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

static int sandbox_area_alloc_reclaim(struct sandbox_area *a, size_t len, uint32_t owner, uintptr_t *ret)
{
	if (sandbox_area_alloc(a, len, owner, ret) == 0)
		return 0;
	if (sandbox_text.retired == 0 && sandbox_data.retired == 0)
		return -1;
	sandbox_retired_reclaim();
	return sandbox_area_alloc(a, len, owner, ret);
}

/* ------------------------------------------------------------------ executable facts */

static void sandbox_note_scan(uintptr_t p, uintptr_t end, size_t align)
{
	while (end > p && end - p >= sizeof(Elf64_Nhdr)) {
		const Elf64_Nhdr *n = (const Elf64_Nhdr *)p;
		uintptr_t name = p + sizeof(*n);
		uintptr_t desc = name + sandbox_round_up(n->n_namesz, align);
		uintptr_t next = desc + sandbox_round_up(n->n_descsz, align);
		if (n->n_namesz > end - name || desc > end || n->n_descsz > end - desc || next <= p)
			return;
		if (n->n_type == NT_GNU_BUILD_ID && n->n_namesz == 4 &&
		    memcmp((const void *)name, "GNU", 4) == 0 &&
		    n->n_descsz > 0 && n->n_descsz <= PBX_MAX_BUILD_ID) {
			memcpy(sandbox_exe.build_id, (const void *)desc, n->n_descsz);
			sandbox_exe.build_id_len = n->n_descsz;
			return;
		}
		p = next;
	}
}

static int sandbox_exe_phdr_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
	(void)size;
	(void)arg;
	/* The first object dl_iterate_phdr reports is the main program. */
	struct sandbox_exe_info *e = &sandbox_exe;
	e->bias = info->dlpi_addr;
	e->lo = UINTPTR_MAX;
	for (size_t i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t lo = e->bias + ph->p_vaddr, hi = lo + ph->p_memsz;
		if (ph->p_type == PT_LOAD) {
			if (lo < e->lo)
				e->lo = lo;
			if (hi > e->hi)
				e->hi = hi;
			if ((ph->p_flags & PF_X) && e->nx < SANDBOX_MAX_XRANGES) {
				e->xlo[e->nx] = lo;
				e->xhi[e->nx] = hi;
				e->nx++;
			}
		} else if (ph->p_type == PT_NOTE && e->build_id_len == 0) {
			sandbox_note_scan(lo, hi, ph->p_align == 8 ? 8 : 4);
		}
	}
	if (e->lo == UINTPTR_MAX)
		e->lo = 0;
	return 1;
}

const struct sandbox_exe_info *sandbox_exe_get(void)
{
	return &sandbox_exe;
}

/* ------------------------------------------------------------------ init */

#ifdef SANDBOX_NEAR_MMAP
/* Maps text and data within 1.5 GiB of the executable so that rel32 redirects and
 * PC32 fix-ups reach: hint addresses below its lowest segment, then above it.
 * The self-test's target goes in the page before the sandbox text: the agent's own
 * functions are too far from the sandbox for a rel32 jump when it is a shared
 * object (arch/x86_64/insn.h, sandbox_insn_selftest_target). */
static int sandbox_areas_map(struct sandbox_error *err)
{
	const uintptr_t reach = 0x60000000ul, step = 2ul << 20;
	size_t tsz = sandbox_round_up(SANDBOX_ALLOC, SANDBOX_PAGE) + SANDBOX_PAGE;
	size_t dsz = sandbox_round_up(SANDBOX_DATA_ALLOC, SANDBOX_PAGE);
	size_t total = tsz + dsz;
	uintptr_t lo = sandbox_round_down(sandbox_exe.lo, SANDBOX_PAGE);
	uintptr_t hi = sandbox_round_up(sandbox_exe.hi, SANDBOX_PAGE);
	uint8_t *m = NULL;
	if (hi <= lo || hi - lo + total > reach)
		return sandbox_error_set(err, PBX_E_INTERNAL, "executable span too large for a near sandbox");
	for (int above = 0; above < 2 && !m; above++) {
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
			m = p;
			break;
		}
	}
	if (!m)
		return sandbox_error_set(err, PBX_E_INTERNAL,
					 "no free address within 1.5 GiB of the executable for the sandbox");
	memset(m, SANDBOX_INSN_RET, tsz);
	memcpy(m, sandbox_insn_selftest_target, sizeof(sandbox_insn_selftest_target));
	if (mprotect(m, tsz, PROT_READ | PROT_EXEC) != 0) {
		int e = errno;
		munmap(m, total);
		return sandbox_error_set(err, PBX_E_MPROTECT_FAILED, "sandbox r-x: %s", strerror(e));
	}
	sandbox_selftest_addr = (uintptr_t)m + PBX_ENTRY_PAD;
	sandbox_text.base = (uintptr_t)m + SANDBOX_PAGE;
	sandbox_data.base = (uintptr_t)m + tsz;
	return 0;
}
#else
/* The self-test's target: built with the same patchable entry as patched programs. */
__attribute__((noinline, noclone, used, patchable_function_entry(8, 6)))
static int sandbox_selftest_target(int x)
{
	return x + 1;
}

static int sandbox_areas_map(struct sandbox_error *err)
{
	(void)err;
	sandbox_text.base = (uintptr_t)sandbox_text_area;
	sandbox_data.base = (uintptr_t)sandbox_data_area;
	sandbox_selftest_addr = (uintptr_t)sandbox_selftest_target;
	return 0;
}
#endif

int sandbox_engine_init(struct sandbox_error *err)
{
	if (sandbox_ready)
		return 0;
	memset(&sandbox_exe, 0, sizeof(sandbox_exe));
	dl_iterate_phdr(sandbox_exe_phdr_cb, NULL);
	ssize_t n = readlink("/proc/self/exe", sandbox_exe.path, sizeof(sandbox_exe.path) - 1);
	sandbox_exe.path[n > 0 ? n : 0] = '\0';
	if (sandbox_exe.nx == 0)
		return sandbox_error_set(err, PBX_E_INTERNAL, "executable has no executable PT_LOAD");

	/* Registration makes the later MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE calls
	 * (sandbox_core_sync) legal; older kernels: plain expedited, else nothing. */
	if (syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0) == 0) {
		sandbox_sync_cmd = MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE;
		sandbox_sync_name = "sync_core";
	} else if (syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0) {
		sandbox_sync_cmd = MEMBARRIER_CMD_PRIVATE_EXPEDITED;
		sandbox_sync_name = "expedited";
	}

	memset(&sandbox_text, 0, sizeof(sandbox_text));
	memset(&sandbox_data, 0, sizeof(sandbox_data));
	if (sandbox_areas_map(err) != 0)
		return -1;
	sandbox_text.size = sandbox_round_down(SANDBOX_ALLOC, SANDBOX_ALIGN);
	sandbox_text.is_text = 1;
	sandbox_data.size = sandbox_round_down(SANDBOX_DATA_ALLOC, SANDBOX_ALIGN);
	sandbox_ready = 1;
	sandbox_debug("sandbox text 0x%lx+%zu data 0x%lx+%zu sync=%s bias=0x%lx",
		      (unsigned long)sandbox_text.base, sandbox_text.size,
		      (unsigned long)sandbox_data.base, sandbox_data.size, sandbox_sync_name,
		      (unsigned long)sandbox_exe.bias);
	return 0;
}

/* ------------------------------------------------------------------ patches */

size_t sandbox_patch_count(void)
{
	return sandbox_npatches;
}

const struct sandbox_patch *sandbox_patch_get(size_t i)
{
	return i < sandbox_npatches ? sandbox_patches[i] : NULL;
}

void sandbox_stats_get(struct sandbox_stats *ret)
{
	*ret = (struct sandbox_stats){
		.text_addr = sandbox_text.base, .text_size = sandbox_text.size,
		.text_used = sandbox_text.used, .text_retired = sandbox_text.retired,
		.data_addr = sandbox_data.base, .data_size = sandbox_data.size,
		.data_used = sandbox_data.used, .data_retired = sandbox_data.retired,
		.patches = sandbox_npatches, .sync_core = sandbox_sync_name,
	};
}

static ssize_t sandbox_patch_find(const char *name, size_t len)
{
	for (size_t i = 0; i < sandbox_npatches; i++)
		if (strlen(sandbox_patches[i]->name) == len && memcmp(sandbox_patches[i]->name, name, len) == 0)
			return (ssize_t)i;
	return -1;
}

static int sandbox_name_valid(const char *name, size_t len)
{
	if (len < 1 || len > PBX_MAX_NAME)
		return 0;
	for (size_t i = 0; i < len; i++) {
		char c = name[i];
		if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
		      c == '.' || c == '_' || c == '+' || c == '-'))
			return 0;
	}
	return 1;
}

/* Copies a wire string for messages: printable ASCII kept, the rest as '?'. */
static void sandbox_str_copy(char *dst, size_t cap, const char *src, size_t len)
{
	size_t n = len < cap - 1 ? len : cap - 1;
	for (size_t i = 0; i < n; i++)
		dst[i] = (src[i] >= 0x20 && src[i] < 0x7f) ? src[i] : '?';
	dst[n] = '\0';
}

/* The function of the last (top) / first (bottom) applied patch redirecting target. */
static const struct sandbox_func *sandbox_func_find(uintptr_t target, int top, const struct sandbox_patch **pret)
{
	for (size_t k = 0; k < sandbox_npatches; k++) {
		size_t i = top ? sandbox_npatches - 1 - k : k;
		const struct sandbox_patch *p = sandbox_patches[i];
		for (size_t f = 0; f < p->nfuncs; f++) {
			if (p->funcs[f].target == target) {
				if (pret)
					*pret = p;
				return &p->funcs[f];
			}
		}
	}
	return NULL;
}

static int sandbox_in_text(uintptr_t lo, uintptr_t hi, int page_end)
{
	for (size_t i = 0; i < sandbox_exe.nx; i++) {
		uintptr_t xhi = page_end ? sandbox_round_up(sandbox_exe.xhi[i], SANDBOX_PAGE) : sandbox_exe.xhi[i];
		if (lo >= sandbox_exe.xlo[i] && hi <= xhi && lo <= hi)
			return 1;
	}
	return 0;
}

static void sandbox_hex(char *dst, size_t cap, const uint8_t *b, size_t n)
{
	size_t o = 0;
	for (size_t i = 0; i < n && o + 3 < cap; i++)
		o += (size_t)snprintf(dst + o, cap - o, i ? " %02x" : "%02x", b[i]);
	if (cap)
		dst[o < cap ? o : cap - 1] = '\0';
}

/* Checks one function of the patch (everything that does not need the placement).
 * Fills f: symbol, target, site, saved. */
static int sandbox_func_check(const struct sandbox_apply_spec *spec, unsigned flags, size_t idx,
			      struct sandbox_func *funcs, struct sandbox_error *err)
{
	const struct sandbox_func_spec *fs = &spec->funcs[idx];
	struct sandbox_func *f = &funcs[idx];
	if (fs->symbol_len > PBX_MAX_SYMBOL)
		return sandbox_error_set(err, PBX_E_MALFORMED, "symbol of function %zu longer than %d bytes",
					 idx, PBX_MAX_SYMBOL);
	sandbox_str_copy(f->symbol, sizeof(f->symbol), fs->symbol, fs->symbol_len);
	const char *sym = f->symbol;
	uintptr_t abs = (flags & SANDBOX_APPLY_INTERNAL) ? (uintptr_t)fs->target
							   : sandbox_exe.bias + (uintptr_t)fs->target;
	f->target = abs;
	if (fs->expected_len < PBX_MIN_EXPECTED || fs->expected_len > PBX_MAX_EXPECTED)
		return sandbox_error_set(err, PBX_E_MALFORMED, "%s: expected_len %u not in %d..%d", sym,
					 fs->expected_len, PBX_MIN_EXPECTED, PBX_MAX_EXPECTED);
	if (fs->kind > PBX_KIND_ENTRY_JUMP ||
	    (fs->skip != 0 && (fs->kind != PBX_KIND_ENTRY_JUMP || fs->skip != PBX_ENDBR_SKIP)))
		return sandbox_error_set(err, PBX_E_MALFORMED, "%s: kind %u skip %u", sym, fs->kind, fs->skip);
	/* Kind 0: the 6+2 NOP entry [abs-6, abs+2), expected bytes from abs-6.
	 * Kind 1: P = abs+skip, the word [word, word+8) holding [P, P+5) is stored;
	 * [lo, hi) covers the entry, the skipped endbr64 and that word; expected from P. */
	int jump = fs->kind == PBX_KIND_ENTRY_JUMP;
	uintptr_t point = abs + fs->skip, word = sandbox_round_down(point, 8);
	uintptr_t lo = jump ? (word < abs ? word : abs) : abs - PBX_ENTRY_PAD;
	uintptr_t hi = jump ? word + 8 : abs + PBX_ENTRY_NOPS;
	uintptr_t exp_at = jump ? point : abs - PBX_ENTRY_PAD;
	if (!(flags & SANDBOX_APPLY_INTERNAL)) {
		if (abs < PBX_ENTRY_PAD || !sandbox_in_text(lo, jump ? point + PBX_JUMP_LEN : hi, 0) ||
		    !sandbox_in_text(lo, hi, 1))
			return sandbox_error_set(err, PBX_E_TARGET_OUT_OF_TEXT,
						 "%s at 0x%lx (link-time 0x%llx, bias 0x%lx)", sym,
						 (unsigned long)abs, (unsigned long long)fs->target,
						 (unsigned long)sandbox_exe.bias);
		/* The sandbox lies in the program's text (libsandbox.o): patch code is only
		 * ever changed through stacking, never as a target of its own. */
		if (hi > sandbox_text.base && lo < sandbox_text.base + sandbox_text.size)
			return sandbox_error_set(err, PBX_E_TARGET_OUT_OF_TEXT, "%s at 0x%lx is inside the sandbox",
						 sym, (unsigned long)abs);
		/* The expected bytes are read from memory: they must be mapped. */
		if (!sandbox_in_text(exp_at, exp_at + fs->expected_len, 1))
			return sandbox_error_set(err, PBX_E_TARGET_OUT_OF_TEXT,
						 "%s: %u expected bytes run past the end of the text", sym,
						 fs->expected_len);
	}
	for (size_t j = 0; j < idx; j++) {
		uintptr_t o = funcs[j].target;
		if ((abs > o ? abs - o : o - abs) < SANDBOX_ENTRY_BYTES)
			return sandbox_error_set(err, PBX_E_OVERLAP, "%s (0x%lx) and %s (0x%lx)", funcs[j].symbol,
						 (unsigned long)o, sym, (unsigned long)abs);
	}
	/* Any offset: a replacement without its own 6+2 NOPs (new_offset < 6 or no NOPs)
	 * is valid; a later patch of the function cannot be stacked on it (see below). */
	if (fs->new_offset >= spec->text_len || fs->new_size > spec->text_len - fs->new_offset)
		return sandbox_error_set(err, PBX_E_MALFORMED,
					 "%s: replacement at offset %u size %u outside text of %u bytes",
					 sym, fs->new_offset, fs->new_size, spec->text_len);

	/* Logical original: the current memory, with the bytes the first patch on this
	 * function changed ([wlo, whi)) replaced by the ones it saved. */
	uint8_t orig[PBX_MAX_EXPECTED];
	const struct sandbox_patch *top_patch = NULL;
	const struct sandbox_func *bottom = sandbox_func_find(abs, 0, NULL);
	const struct sandbox_func *top = sandbox_func_find(abs, 1, &top_patch);
	memcpy(orig, (const void *)exp_at, fs->expected_len);
	for (uintptr_t a = bottom ? bottom->wlo : 0; bottom && a < bottom->whi; a++)
		if (a >= exp_at && a - exp_at < fs->expected_len)
			orig[a - exp_at] = bottom->saved[a - bottom->saved_at];
	for (size_t i = 0; i < fs->expected_len; i++) {
		if (orig[i] != fs->expected[i]) {
			long off = (long)(exp_at - abs) + (long)i;
			return sandbox_error_set(err, PBX_E_EXPECTED_MISMATCH, "%s%c0x%lx expected %02x found %02x",
						 sym, off < 0 ? '-' : '+', off < 0 ? -off : off,
						 fs->expected[i], orig[i]);
		}
	}
	char hex[64];
	if (jump && fs->skip && memcmp((const void *)abs, sandbox_insn_endbr64, PBX_ENDBR_SKIP) != 0) {
		sandbox_hex(hex, sizeof(hex), (const uint8_t *)abs, PBX_ENDBR_SKIP);
		return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY,
					 "%s at 0x%lx: skip 4 but the entry holds %s, not endbr64", sym,
					 (unsigned long)abs, hex);
	}
	if (jump && !top && point - word > 8 - PBX_JUMP_LEN)
		return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY,
					 "%s: entry jump at 0x%lx refused (rule 4, alignment): byte %lu of its "
					 "8-byte word, so the 5-byte jump cannot be written with one atomic store",
					 sym, (unsigned long)point, (unsigned long)(point - word));
	if (!jump && memcmp(orig, sandbox_insn_entry_nops, SANDBOX_ENTRY_BYTES) != 0) {
		sandbox_hex(hex, sizeof(hex), orig, SANDBOX_ENTRY_BYTES);
		return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY,
					 "%s at 0x%lx: entry-6 holds %s, not 8 NOPs (build with "
					 "-fpatchable-function-entry=8,6)", sym, (unsigned long)abs, hex);
	}
	/* Stacked: always the 6+2 NOP mechanism, at the replacement entry of the top patch. */
	f->mech = top ? PBX_KIND_PATCHABLE_ENTRY : fs->kind;
	f->site = top ? top->new_entry : jump ? point : abs;
	if (f->mech == PBX_KIND_ENTRY_JUMP) {
		f->saved_at = word;
		f->wlo = point;
		f->whi = point + PBX_JUMP_LEN;
	} else {
		f->saved_at = f->site - PBX_ENTRY_PAD;
		f->wlo = f->site - PBX_ENTRY_PAD;
		f->whi = f->site + PBX_ENTRY_NOPS;
	}
	if (f->mech == PBX_KIND_PATCHABLE_ENTRY && (f->site & 1))
		return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY, "%s: entry 0x%lx is not 2-byte aligned",
					 sym, (unsigned long)f->site);
	memcpy(f->saved, (const void *)f->saved_at, SANDBOX_ENTRY_BYTES);
	/* The replacement's own padding must lie inside its patch's text. */
	if (top && (top->new_entry - top_patch->text_addr < PBX_ENTRY_PAD ||
		    memcmp(f->saved, sandbox_insn_entry_nops, SANDBOX_ENTRY_BYTES) != 0)) {
		sandbox_hex(hex, sizeof(hex), f->saved, SANDBOX_ENTRY_BYTES);
		if (bottom->mech == PBX_KIND_ENTRY_JUMP)
			return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY,
						 "cannot stack on %s (rule 6): %s is redirected by an entry jump "
						 "and the replacement at 0x%lx has no 6+2 NOP entry of its own "
						 "(%s): remove %s first, or build its replacement with "
						 "`patchbox config --cflags`", top_patch->name, sym,
						 (unsigned long)top->new_entry, hex, top_patch->name);
		return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY,
					 "cannot stack on %s: its replacement of %s at 0x%lx has %s, not 8 NOPs",
					 top_patch->name, sym, (unsigned long)top->new_entry, hex);
	}
	for (size_t j = 0; j < idx; j++)
		if (funcs[j].wlo < f->whi && f->wlo < funcs[j].whi)
			return sandbox_error_set(err, PBX_E_OVERLAP, "%s (0x%lx) and %s (0x%lx) change the same bytes",
						 funcs[j].symbol, (unsigned long)funcs[j].site, sym,
						 (unsigned long)f->site);
	/* Nor bytes an applied patch changed: its remove would restore them under our
	 * jump, ours would bring back its jump into freed sandbox. (Stacking on the same
	 * function is not an overlap: the site moved to the top replacement's entry.) */
	for (size_t p = 0; p < sandbox_npatches; p++)
		for (size_t k = 0; k < sandbox_patches[p]->nfuncs; k++) {
			const struct sandbox_func *g = &sandbox_patches[p]->funcs[k];
			if (g->wlo < f->whi && f->wlo < g->whi)
				return sandbox_error_set(err, PBX_E_OVERLAP,
							 "%s (0x%lx) changes bytes that patch %s changed for %s (0x%lx)",
							 sym, (unsigned long)f->site, sandbox_patches[p]->name,
							 g->symbol, (unsigned long)g->site);
		}
	f->new_size = fs->new_size;
	return 0;
}

static int sandbox_fixups_check(const struct sandbox_apply_spec *spec, uint64_t data_block,
				uint64_t *import, struct sandbox_error *err)
{
	for (uint32_t i = 0; i < spec->nfixups; i++) {
		const struct sandbox_fixup_spec *x = &spec->fixups[i];
		if ((x->section != PBX_SECT_TEXT && x->section != PBX_SECT_DATA) ||
		    (x->type != PBX_FIXUP_PC32 && x->type != PBX_FIXUP_ABS64) ||
		    x->base < PBX_BASE_TEXT || x->base > PBX_BASE_ABS || x->reserved != 0)
			return sandbox_error_set(err, PBX_E_BAD_FIXUP,
						 "fix-up %u: section %u type %u base %u reserved %u", i,
						 x->section, x->type, x->base, x->reserved);
		uint32_t size = x->type == PBX_FIXUP_PC32 ? 4 : 8;
		uint32_t seclen = x->section == PBX_SECT_TEXT ? spec->text_len : spec->data_len;
		if (x->offset > seclen || seclen - x->offset < size)
			return sandbox_error_set(err, PBX_E_FIXUP_RANGE, "fix-up %u: %u bytes at %s+0x%x, %s has %u bytes",
						 i, size, x->section ? "data" : "text", x->offset,
						 x->section ? "data" : "text", seclen);
		if (x->base == PBX_BASE_DATA && data_block == 0)
			return sandbox_error_set(err, PBX_E_BAD_FIXUP, "fix-up %u: base DATA but the patch has no data", i);
		if (x->base == PBX_BASE_IMPORT) {
			char sym[PBX_MAX_SYMBOL + 1];
			if (x->symbol_len < 1 || x->symbol_len > PBX_MAX_SYMBOL)
				return sandbox_error_set(err, PBX_E_BAD_FIXUP, "fix-up %u: import symbol length %u", i,
							 x->symbol_len);
			memcpy(sym, x->symbol, x->symbol_len);
			sym[x->symbol_len] = '\0';
			dlerror();
			void *s = memchr(sym, '\0', x->symbol_len) ? NULL : dlsym(RTLD_DEFAULT, sym);
			if (!s) {
				sandbox_str_copy(sym, sizeof(sym), x->symbol, x->symbol_len);
				return sandbox_error_set(err, PBX_E_SYMBOL_NOT_FOUND, "%s", sym);
			}
			import[i] = (uintptr_t)s;
		}
	}
	return 0;
}

/* Writes the fix-ups into the local copies; P is the final address. */
static int sandbox_fixups_apply(const struct sandbox_apply_spec *spec, const uint64_t *import,
				uint8_t *text, uintptr_t text_addr, uint8_t *data, uintptr_t data_addr,
				struct sandbox_error *err)
{
	for (uint32_t i = 0; i < spec->nfixups; i++) {
		const struct sandbox_fixup_spec *x = &spec->fixups[i];
		uint64_t s = 0;
		switch (x->base) {
		case PBX_BASE_TEXT: s = text_addr; break;
		case PBX_BASE_DATA: s = data_addr; break;
		case PBX_BASE_EXE: s = sandbox_exe.bias; break;
		case PBX_BASE_IMPORT: s = import[i]; break;
		default: s = 0; break;
		}
		uint8_t *buf = x->section == PBX_SECT_TEXT ? text : data;
		uint64_t p = (x->section == PBX_SECT_TEXT ? text_addr : data_addr) + x->offset;
		if (x->type == PBX_FIXUP_PC32) {
			__int128 v = (__int128)s + x->addend - (__int128)p;
			if (v < INT32_MIN || v > INT32_MAX)
				return sandbox_error_set(err, PBX_E_FIXUP_OVERFLOW,
							 "fix-up %u at %s+0x%x: S 0x%llx + A %lld - P 0x%llx = %lld",
							 i, x->section ? "data" : "text", x->offset,
							 (unsigned long long)s, (long long)x->addend,
							 (unsigned long long)p, (long long)v);
			int32_t v32 = (int32_t)v;
			memcpy(buf + x->offset, &v32, 4);
		} else {
			uint64_t v = s + (uint64_t)x->addend;
			memcpy(buf + x->offset, &v, 8);
		}
	}
	return 0;
}

/* Revival (docs/redirect.md, "Revival"): a retired text extent of exactly the
 * needed length that already holds, byte for byte, the text this apply would write
 * there (fix-ups computed for that address) is handed to the new patch without
 * writing: a thread still running the old copy executes the very same bytes.
 * Only for patches without data or bss, and only from a removed patch that had none
 * (its code would reach its data rel32-relative). 1 and *ret if found. tbuf: scratch
 * of spec->text_len bytes. */
static int sandbox_text_revive(const struct sandbox_apply_spec *spec, const uint64_t *import,
			       uint32_t owner, uint8_t *tbuf, uintptr_t *ret, uint32_t *prev_owner)
{
	struct sandbox_area *a = &sandbox_text;
	size_t need = sandbox_round_up(spec->text_len, SANDBOX_ALIGN);
	for (size_t i = 0; i < a->n; i++) {
		struct sandbox_extent *x = &a->ext[i];
		if (!x->retired || x->len != need || sandbox_owner_has_data(x->owner))
			continue;
		uintptr_t addr = a->base + x->off;
		memcpy(tbuf, spec->text, spec->text_len);
		if (sandbox_fixups_apply(spec, import, tbuf, addr, NULL, 0, NULL) != 0 ||
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

int sandbox_patch_apply(const struct sandbox_apply_spec *spec, unsigned flags,
			const struct sandbox_patch **ret, struct sandbox_error *err)
{
	struct sandbox_func *funcs = NULL;
	struct sandbox_patch *patch = NULL;
	uint64_t *import = NULL;
	uint8_t *tbuf = NULL, *dbuf = NULL;
	struct sandbox_pageset ps = { 0 };
	uintptr_t text_addr = 0, data_addr = 0;
	uint32_t id = sandbox_next_id;
	int rc = -1, allocated = 0, revived = 0;
	uint32_t revived_from = 0;
	char name[PBX_MAX_NAME + 1];

	if (!sandbox_ready)
		return sandbox_error_set(err, PBX_E_INTERNAL, "sandbox not initialised");
	if (!sandbox_name_valid(spec->name, spec->name_len)) {
		sandbox_str_copy(name, sizeof(name), spec->name, spec->name_len);
		return sandbox_error_set(err, PBX_E_BAD_NAME, "'%s' (%u bytes): use 1..%d of [A-Za-z0-9._+-]",
					 name, spec->name_len, PBX_MAX_NAME);
	}
	memcpy(name, spec->name, spec->name_len);
	name[spec->name_len] = '\0';
	if (sandbox_patch_find(spec->name, spec->name_len) >= 0)
		return sandbox_error_set(err, PBX_E_ALREADY_APPLIED, "%s", name);
	if (sandbox_npatches >= PBX_MAX_PATCHES)
		return sandbox_error_set(err, PBX_E_TOO_MANY, "%zu patches applied", sandbox_npatches);
	if (!(flags & SANDBOX_APPLY_INTERNAL) &&
	    (spec->build_id_len != sandbox_exe.build_id_len ||
	     memcmp(spec->build_id, sandbox_exe.build_id, spec->build_id_len) != 0)) {
		char want[2 * PBX_MAX_BUILD_ID + 1] = "", have[2 * PBX_MAX_BUILD_ID + 1] = "none";
		for (size_t i = 0; i < spec->build_id_len && i < PBX_MAX_BUILD_ID; i++)
			snprintf(want + 2 * i, 3, "%02x", spec->build_id[i]);
		for (size_t i = 0; i < sandbox_exe.build_id_len; i++)
			snprintf(have + 2 * i, 3, "%02x", sandbox_exe.build_id[i]);
		return sandbox_error_set(err, PBX_E_BUILD_ID_MISMATCH, "patch %s, running %s", want, have);
	}
	if (spec->nfuncs < 1 || spec->nfuncs > PBX_MAX_FUNCS)
		return sandbox_error_set(err, PBX_E_MALFORMED, "nfuncs %u", spec->nfuncs);
	if (spec->flags & ~(uint32_t)PBX_FLAG_RETAIN)
		return sandbox_error_set(err, PBX_E_MALFORMED, "flags 0x%x (unknown bits)", spec->flags);

	funcs = calloc(spec->nfuncs, sizeof(*funcs));
	patch = calloc(1, sizeof(*patch));
	import = calloc(spec->nfixups ? spec->nfixups : 1, sizeof(*import));
	if (!funcs || !patch || !import) {
		sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
		goto out;
	}
	for (size_t i = 0; i < spec->nfuncs; i++)
		if (sandbox_func_check(spec, flags, i, funcs, err) != 0)
			goto out;
	uint64_t data_block = (uint64_t)spec->data_len + spec->bss_size;
	if (sandbox_fixups_check(spec, data_block, import, err) != 0)
		goto out;

	/* Placement. */
	if (data_block > sandbox_data.size) {
		sandbox_error_set(err, PBX_E_SANDBOX_FULL, "need %llu bytes of data, %zu free",
				  (unsigned long long)data_block, sandbox_data.size - sandbox_data.used - sandbox_data.retired);
		goto out;
	}
	tbuf = malloc(spec->text_len);
	dbuf = malloc(data_block ? data_block : 1);
	if (!tbuf || !dbuf) {
		sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
		goto out;
	}
	if (data_block == 0 && sandbox_text_revive(spec, import, id, tbuf, &text_addr, &revived_from)) {
		revived = 1;
	} else if (sandbox_area_alloc_reclaim(&sandbox_text, spec->text_len, id, &text_addr) != 0) {
		sandbox_error_set(err, PBX_E_SANDBOX_FULL, "need %u bytes of text, %zu free (%zu retired)",
				  spec->text_len, sandbox_text.size - sandbox_text.used - sandbox_text.retired,
				  sandbox_text.retired);
		goto out;
	}
	allocated = 1;
	if (data_block && sandbox_area_alloc_reclaim(&sandbox_data, data_block, id, &data_addr) != 0) {
		sandbox_error_set(err, PBX_E_SANDBOX_FULL, "need %llu bytes of data, %zu free (%zu retired)",
				  (unsigned long long)data_block,
				  sandbox_data.size - sandbox_data.used - sandbox_data.retired, sandbox_data.retired);
		goto out;
	}

	/* Fixed-up copies, built away from the live memory. */
	memcpy(tbuf, spec->text, spec->text_len);
	if (spec->data_len)
		memcpy(dbuf, spec->data, spec->data_len);
	memset(dbuf + spec->data_len, 0, data_block - spec->data_len);
	if (sandbox_fixups_apply(spec, import, tbuf, text_addr, dbuf, data_addr, err) != 0)
		goto out;
	for (size_t i = 0; i < spec->nfuncs; i++) {
		struct sandbox_func *f = &funcs[i];
		f->new_entry = text_addr + spec->funcs[i].new_offset;
		uintptr_t from = f->mech == PBX_KIND_ENTRY_JUMP ? f->site : f->site - PBX_ENTRY_PAD;
		int64_t rel = sandbox_insn_jmp_rel(from, f->new_entry);
		if (rel < INT32_MIN || rel > INT32_MAX) {
			sandbox_error_set(err, PBX_E_FIXUP_OVERFLOW, "redirect of %s from 0x%lx to 0x%lx: %lld",
					  f->symbol, (unsigned long)f->site, (unsigned long)f->new_entry, (long long)rel);
			goto out;
		}
	}
	/* A revived text is not written: its pages stay r-x. */
	if (!revived && sandbox_pageset_add(&ps, text_addr, spec->text_len) != 0) {
		sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
		goto out;
	}
	for (size_t i = 0; i < spec->nfuncs; i++) {
		if (sandbox_pageset_add(&ps, funcs[i].saved_at, SANDBOX_ENTRY_BYTES) != 0) {
			sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
			goto out;
		}
	}
	/* Last point of failure before the first byte changes: after this, nothing fails. */
	if (sandbox_pageset_open(&ps, err) != 0)
		goto out;

	if (!revived)
		memcpy((void *)text_addr, tbuf, spec->text_len);
	if (data_block)
		memcpy((void *)data_addr, dbuf, data_block);
	/* Phase 1: `e9 rel32` into the dead padding; nothing executes there until the
	 * phase 2 store publishes it. */
	for (size_t i = 0; i < spec->nfuncs; i++) {
		struct sandbox_func *f = &funcs[i];
		if (f->mech == PBX_KIND_ENTRY_JUMP)
			continue;	/* written in phase 2 */
		uint8_t jmp[PBX_JUMP_LEN];
		sandbox_insn_jmp_encode(f->site - PBX_ENTRY_PAD, f->new_entry, jmp);
		memcpy((void *)(f->site - PBX_ENTRY_PAD), jmp, sizeof(jmp));
	}
	/* Pairs with phase 2: new code and jumps visible to every core's fetch first. */
	sandbox_core_sync();
	/* Phase 2: publish, one atomic 2-byte store per function, or one atomic 8-byte store
	 * of the word holding the entry jump (pairs with the sync above). */
	for (size_t i = 0; i < spec->nfuncs; i++) {
		struct sandbox_func *f = &funcs[i];
		if (f->mech == PBX_KIND_ENTRY_JUMP) {
			uint8_t jmp[PBX_JUMP_LEN];
			sandbox_insn_jmp_encode(f->site, f->new_entry, jmp);
			sandbox_insn_store8(f->saved_at, sandbox_jump_word(f, jmp));
		} else {
			sandbox_insn_store2(f->site, SANDBOX_INSN_JMP_BACK);
		}
	}
	/* Pairs with the phase 2 stores: all cores fetch the redirect from now on. */
	sandbox_core_sync();
	sandbox_pageset_close(&ps);

	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	memcpy(patch->name, name, sizeof(name));
	patch->id = id;
	patch->applied_at = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
	patch->text_addr = text_addr;
	patch->text_size = spec->text_len;
	patch->data_addr = data_addr;
	patch->data_size = (uint32_t)data_block;
	patch->nfuncs = spec->nfuncs;
	patch->flags = spec->flags;
	patch->funcs = funcs;
	sandbox_patches[sandbox_npatches++] = patch;
	sandbox_next_id++;
	funcs = NULL;
	if (ret)
		*ret = patch;
	sandbox_debug("applied %s id %u: text 0x%lx+%u data 0x%lx+%u, %u functions", patch->name, id,
		      (unsigned long)text_addr, patch->text_size, (unsigned long)data_addr, patch->data_size,
		      patch->nfuncs);
	patch = NULL;
	rc = 0;
out:
	if (rc != 0 && allocated) {
		/* Never executed (no redirect was published): free, no quiescence needed;
		 * a revived extent goes back to retired (old threads may still run it). */
		if (revived) {
			sandbox_area_retire(&sandbox_text, id, 0);
			ssize_t i = sandbox_area_find(&sandbox_text, text_addr);
			if (i >= 0)
				sandbox_text.ext[i].owner = revived_from;
		}
		for (size_t i = sandbox_text.n; i-- > 0;)
			if (sandbox_text.ext[i].owner == id && !sandbox_text.ext[i].retired)
				sandbox_area_drop(&sandbox_text, i);
		for (size_t i = sandbox_data.n; i-- > 0;)
			if (sandbox_data.ext[i].owner == id)
				sandbox_area_drop(&sandbox_data, i);
	}
	sandbox_pageset_deinit(&ps);
	free(tbuf);
	free(dbuf);
	free(import);
	free(funcs);
	free(patch);
	return rc;
}

/* free_now: only for memory no other thread can have run (the self-test). */
static int sandbox_patch_remove_mode(const char *name, size_t name_len, int free_now, struct sandbox_error *err)
{
	char shown[PBX_MAX_NAME + 1];
	ssize_t idx = sandbox_patch_find(name, name_len);
	if (idx < 0) {
		sandbox_str_copy(shown, sizeof(shown), name, name_len);
		return sandbox_error_set(err, PBX_E_NOT_APPLIED, "%s", shown);
	}
	struct sandbox_patch *p = sandbox_patches[idx];
	for (size_t f = 0; f < p->nfuncs; f++) {
		const struct sandbox_patch *above = NULL;
		sandbox_func_find(p->funcs[f].target, 1, &above);
		if (above && above != p)
			return sandbox_error_set(err, PBX_E_NOT_TOP, "%s is stacked on %s (function %s)",
						 above->name, p->name, p->funcs[f].symbol);
	}
	struct sandbox_pageset ps = { 0 };
	for (size_t f = 0; f < p->nfuncs; f++) {
		if (sandbox_pageset_add(&ps, p->funcs[f].saved_at, SANDBOX_ENTRY_BYTES) != 0) {
			sandbox_pageset_deinit(&ps);
			return sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
		}
	}
	if (sandbox_pageset_open(&ps, err) != 0) {
		sandbox_pageset_deinit(&ps);
		return -1;
	}
	uint16_t v;
	/* (1) Entry back to its saved bytes: no new thread takes the redirect. An entry
	 * jump is undone completely here: one 8-byte store of the word with the saved
	 * [site, site+5) (a thread that already jumped is in the replacement, kept). */
	for (size_t f = 0; f < p->nfuncs; f++) {
		const struct sandbox_func *fn = &p->funcs[f];
		if (fn->mech == PBX_KIND_ENTRY_JUMP) {
			sandbox_insn_store8(fn->saved_at, sandbox_jump_word(fn, fn->saved + (fn->site - fn->saved_at)));
			continue;
		}
		memcpy(&v, fn->saved + PBX_ENTRY_PAD, 2);
		sandbox_insn_store2(fn->site, v);
	}
	/* Pairs with (1): no core still fetches `eb f8` (or the entry jump) at the entry. */
	sandbox_core_sync();
	/* (2) A thread parked at site-6 now jumps to the entry instead of the patch. */
	for (size_t f = 0; f < p->nfuncs; f++)
		if (p->funcs[f].mech != PBX_KIND_ENTRY_JUMP)
			sandbox_insn_store2(p->funcs[f].site - PBX_ENTRY_PAD, SANDBOX_INSN_JMP_OVER);
	/* Pairs with (2): the rel32 bytes below are dead before they change. */
	sandbox_core_sync();
	for (size_t f = 0; f < p->nfuncs; f++) {
		if (p->funcs[f].mech == PBX_KIND_ENTRY_JUMP)
			continue;
		/* (3) Skipped by `eb 04`; ordered before (4) by x86 store ordering. */
		memcpy((void *)(p->funcs[f].site - 4), p->funcs[f].saved + 2, 4);
		/* (4) The first padding bytes last (pairs with (3)). */
		memcpy(&v, p->funcs[f].saved, 2);
		sandbox_insn_store2(p->funcs[f].site - PBX_ENTRY_PAD, v);
	}
	/* Pairs with (4): every core fetches the restored padding. */
	sandbox_core_sync();
	sandbox_pageset_close(&ps);
	sandbox_pageset_deinit(&ps);

	if (!free_now || sandbox_owner_free(p->id) != 0) {
		int keep = (p->flags & PBX_FLAG_RETAIN) != 0;
		sandbox_area_retire(&sandbox_text, p->id, keep);
		sandbox_area_retire(&sandbox_data, p->id, keep);
	}
	sandbox_debug("removed %s id %u", p->name, p->id);
	memmove(&sandbox_patches[idx], &sandbox_patches[idx + 1],
		(sandbox_npatches - (size_t)idx - 1) * sizeof(sandbox_patches[0]));
	sandbox_npatches--;
	free(p->funcs);
	free(p);
	return 0;
}

int sandbox_patch_remove(const char *name, size_t name_len, struct sandbox_error *err)
{
	return sandbox_patch_remove_mode(name, name_len, 0, err);
}

/* ------------------------------------------------------------------ self-test */

#define SANDBOX_SELFTEST_MAGIC 0x2a5eed11

/* Applies a real patch to the agent's own function through sandbox_patch_apply and
 * sandbox_patch_remove, the APPLY/REMOVE path, and checks every effect. */
int sandbox_selftest_run(char *detail, size_t detail_len)
{
	int (*volatile fn)(int) = (int (*)(int))sandbox_selftest_addr;
	uint8_t before[SANDBOX_ENTRY_BYTES], after[SANDBOX_ENTRY_BYTES];
	struct sandbox_error err = { 0 };
	const struct sandbox_patch *p = NULL;
	const char *name = "patchbox-selftest";
	int r;

	if (!sandbox_ready || !sandbox_selftest_addr) {
		snprintf(detail, detail_len, "sandbox not initialised");
		return 0;
	}
	if ((r = fn(41)) != 42) {
		snprintf(detail, detail_len, "target returned %d before the patch, expected 42", r);
		return 0;
	}
	memcpy(before, (const void *)(sandbox_selftest_addr - PBX_ENTRY_PAD), sizeof(before));
	size_t used_before = sandbox_text.used;

	/* Replacement: 6+2 NOPs (stackable entry at offset 6), mov eax, MAGIC; ret. */
	uint8_t text[sizeof(sandbox_insn_selftest_replacement)];
	uint32_t magic = SANDBOX_SELFTEST_MAGIC;
	memcpy(text, sandbox_insn_selftest_replacement, sizeof(text));
	memcpy(text + SANDBOX_INSN_SELFTEST_IMM, &magic, 4);
	struct sandbox_func_spec fs = {
		.symbol = "sandbox_selftest_target", .symbol_len = (uint16_t)strlen("sandbox_selftest_target"),
		.target = sandbox_selftest_addr, .new_offset = PBX_ENTRY_PAD, .new_size = 8,
		.expected_len = sizeof(before), .expected = before,
	};
	struct sandbox_apply_spec spec = {
		.name = name, .name_len = (uint16_t)strlen(name),
		.text = text, .text_len = sizeof(text), .nfuncs = 1, .funcs = &fs,
	};
	if (sandbox_patch_apply(&spec, SANDBOX_APPLY_INTERNAL, &p, &err) != 0) {
		snprintf(detail, detail_len, "apply failed: %s", err.msg);
		return 0;
	}
	uintptr_t text_addr = p->text_addr;
	int patched = fn(41);
	/* Only the agent thread ever ran this replacement: its memory is freed at once. */
	if (sandbox_patch_remove_mode(name, strlen(name), 1, &err) != 0) {
		snprintf(detail, detail_len, "remove failed: %s", err.msg);
		return 0;
	}
	if (patched != SANDBOX_SELFTEST_MAGIC) {
		snprintf(detail, detail_len, "patched target returned 0x%x, expected 0x%x", (unsigned)patched,
			 SANDBOX_SELFTEST_MAGIC);
		return 0;
	}
	if ((r = fn(41)) != 42) {
		snprintf(detail, detail_len, "target returned %d after remove, expected 42", r);
		return 0;
	}
	memcpy(after, (const void *)(sandbox_selftest_addr - PBX_ENTRY_PAD), sizeof(after));
	if (memcmp(before, after, sizeof(before)) != 0) {
		char hb[32], ha[32];
		sandbox_hex(hb, sizeof(hb), before, sizeof(before));
		sandbox_hex(ha, sizeof(ha), after, sizeof(after));
		snprintf(detail, detail_len, "entry bytes not restored: before %s after %s", hb, ha);
		return 0;
	}
	for (size_t i = 0; i < sizeof(text); i++) {
		if (((const uint8_t *)text_addr)[i] != SANDBOX_INSN_RET) {
			snprintf(detail, detail_len, "sandbox at 0x%lx not refilled with 0xc3",
				 (unsigned long)text_addr);
			return 0;
		}
	}
	if (sandbox_text.used != used_before) {
		snprintf(detail, detail_len, "sandbox_used %zu after remove, was %zu", sandbox_text.used,
			 used_before);
		return 0;
	}
	snprintf(detail, detail_len,
		 "target 0x%lx: 42 -> 0x%x (patched at 0x%lx, sync=%s) -> 42; entry bytes restored; "
		 "sandbox refilled and reusable", (unsigned long)sandbox_selftest_addr, (unsigned)patched,
		 (unsigned long)text_addr, sandbox_sync_name);
	return 1;
}
