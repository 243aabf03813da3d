/* Part of libsandbox.o: the mechanism. Making code pages writable for a moment,
 * serialising the cores, the atomic instruction stores, writing a redirect and
 * restoring the original bytes (docs/redirect.md). It decides nothing: the engine
 * (sandbox-engine.c) has checked everything before calling in, and after
 * sandbox_redirect_write has opened its pages nothing fails.
 *
 * The protocol's stores are the architecture's (arch/<arch>/publish.h, through
 * arch/publish.h): phase 1 writes only bytes no thread can be executing (the dead
 * padding before the entry), a core sync, phase 2 publishes with one atomic store, a
 * core sync; remove runs SANDBOX_ARCH_RESTORE_STEPS steps with a core sync after each.
 *
 * Held entry jump (f->hold: a first instruction shorter than 5 bytes, or [P, P+5)
 * across two words; docs/reach.md): written only while every other thread is held
 * clear of (P, P+5) (sandbox_threads_held; sandbox_hold_confirm right before phase 2), the
 * later word first.
 *
 * Every code store names the sync_core it pairs with (here and in publish.h).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <linux/membarrier.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "arch/publish.h"
#include "sandbox-engine.h"

static long sandbox_sync_cmd;	/* membarrier command that serialises cores, 0 = none */
static const char *sandbox_sync_name = "none";

/* ------------------------------------------------------------------ core sync */

/* Registration makes the later MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE calls
 * (sandbox_core_sync) legal; older kernels: plain expedited, else nothing. */
void sandbox_core_sync_init(void)
{
	if (syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0) == 0) {
		sandbox_sync_cmd = MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE;
		sandbox_sync_name = "sync_core";
	} else if (syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0) {
		sandbox_sync_cmd = MEMBARRIER_CMD_PRIVATE_EXPEDITED;
		sandbox_sync_name = "expedited";
	}
}

const char *sandbox_core_sync_name(void)
{
	return sandbox_sync_name;
}

int sandbox_core_sync_full(void)
{
	return sandbox_sync_cmd == MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE;
}

/* Serialises instruction fetch on every core running this process, so no core
 * executes stale bytes of what we just wrote. Pairs with each code store below. */
static void sandbox_core_sync(void)
{
	if (sandbox_sync_cmd && syscall(SYS_membarrier, sandbox_sync_cmd, 0, 0) != 0)
		sandbox_debug("membarrier failed: %s", strerror(errno));
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

static void sandbox_pageset_deinit(struct sandbox_pageset *ps)
{
	free(ps->page);
	*ps = (struct sandbox_pageset){ 0 };
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

/* ------------------------------------------------------------------ sandbox text */

int sandbox_text_refill(uintptr_t addr, size_t len)
{
	struct sandbox_pageset ps = { 0 };
	int rc = -1;
	if (sandbox_pageset_add(&ps, addr, len) == 0 && sandbox_pageset_open(&ps, NULL) == 0) {
		sandbox_arch_text_fill((void *)addr, len);
		sandbox_arch_flush_icache(addr, len);
		sandbox_pageset_close(&ps);
		/* Pairs with the next apply's writes: no core keeps fetching old bytes here. */
		sandbox_core_sync();
		rc = 0;
	}
	sandbox_pageset_deinit(&ps);
	return rc;
}

/* ------------------------------------------------------------------ redirect */

int sandbox_redirect_write(const struct sandbox_copy *text, const struct sandbox_copy *data,
			   const struct sandbox_func *funcs, size_t nfuncs, sandbox_gate_fn gate,
			   void *gate_arg, int hold_conn, uint64_t *held_ns, struct sandbox_error *err)
{
	struct sandbox_pageset ps = { 0 };
	int rc = -1;
	/* A revived text (text->len 0) is not written: its pages stay r-x. */
	if (sandbox_pageset_add(&ps, text->addr, text->len) != 0) {
		sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
		goto out;
	}
	for (size_t i = 0; i < nfuncs; i++) {
		if (sandbox_pageset_add(&ps, funcs[i].saved_at, funcs[i].saved_len) != 0) {
			sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
			goto out;
		}
	}
	/* Nothing of the program changes before phase 1; a failure up to there (the
	 * gate's, the hold's) closes the pages again and leaves it as it was. */
	if (sandbox_pageset_open(&ps, err) != 0)
		goto out;

	/* Plain copies: nothing runs there before the phase 2 stores publish them, and
	 * the sync after phase 1 puts them in every core's fetch first (pairs with it). */
	if (text->len) {
		memcpy((void *)text->addr, text->src, text->len);
		sandbox_arch_flush_icache(text->addr, text->len);
	}
	if (data->len)
		memcpy((void *)data->addr, data->src, data->len);
	if (gate) {
		/* The gate runs the new code (pre-apply hooks) on this thread: the copies
		 * in this core's fetch first (pairs with the memcpy above). Nothing of the
		 * program has changed yet, so a refusal leaves it as it was. */
		sandbox_core_sync();
		if (gate(gate_arg, err) != 0) {
			sandbox_pageset_close(&ps);
			goto out;
		}
	}
	/* Held entry jumps: every allocation is done and the hooks have run (they may take
	 * locks a held thread owns); wait for the client's hold. */
	if (sandbox_hold_wait(funcs, nfuncs, hold_conn, held_ns, err) != 0) {
		sandbox_pageset_close(&ps);
		goto out;
	}
	/* Phase 1: the bytes no thread executes yet (x86-64: `e9 rel32` into the dead
	 * padding); nothing runs there until the phase 2 store publishes it. */
	for (size_t i = 0; i < nfuncs; i++)
		sandbox_arch_prepare(&funcs[i]);
	/* Pairs with phase 2: new code and jumps visible to every core's fetch first. */
	sandbox_core_sync();
	/* Held entry jumps: the hold checked once more, in full (every stack no thread runs
	 * on too), then the holder's connection, the last system call before the stores.
	 * Every thread was held when its turn in the check came; the client lets them go
	 * only after the reply (or well past the wait's deadline), or by dying, and a dying
	 * client's connection closes before the kernel releases its tracees: open here,
	 * every thread is still held here. If either went, or a stack may return inside,
	 * phase 1's dead padding is put back (pairs with the sync below) and nothing
	 * reachable changed. */
	if (sandbox_hold_confirm(funcs, nfuncs, hold_conn, err) != 0) {
		for (size_t k = 0; k < nfuncs; k++)
			sandbox_arch_unprepare(&funcs[k]);
		sandbox_core_sync();
		sandbox_pageset_close(&ps);
		goto out;
	}
	/* Phase 2: publish, one atomic store per function (x86-64: `eb f8`, 2 bytes, or
	 * the entry jump's 8-byte word(s); aarch64: a `B`, 4 bytes). Pairs with the sync
	 * above. */
	for (size_t i = 0; i < nfuncs; i++)
		sandbox_arch_publish(&funcs[i]);
	/* Pairs with the phase 2 stores: all cores fetch the redirect from now on. */
	sandbox_core_sync();
	sandbox_pageset_close(&ps);
	rc = 0;
out:
	sandbox_pageset_deinit(&ps);
	return rc;
}

int sandbox_redirect_restore(const struct sandbox_func *funcs, size_t nfuncs, struct sandbox_error *err)
{
	struct sandbox_pageset ps = { 0 };
	for (size_t f = 0; f < nfuncs; f++) {
		if (sandbox_pageset_add(&ps, funcs[f].saved_at, funcs[f].saved_len) != 0) {
			sandbox_pageset_deinit(&ps);
			return sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
		}
	}
	if (sandbox_pageset_open(&ps, err) != 0) {
		sandbox_pageset_deinit(&ps);
		return -1;
	}
	/* Step 0 takes the entry back (no new thread takes the redirect), the later steps
	 * what only a thread that took it can still reach; each pairs with the sync after
	 * it (arch/<arch>/publish.h). */
	for (int step = 0; step < SANDBOX_ARCH_RESTORE_STEPS; step++) {
		for (size_t f = 0; f < nfuncs; f++)
			sandbox_arch_restore_step(&funcs[f], step);
		sandbox_core_sync();
	}
	sandbox_pageset_close(&ps);
	sandbox_pageset_deinit(&ps);
	return 0;
}
