/* Part of libsandbox.o: the mechanism. Making code pages writable for a moment,
 * serialising the cores, the atomic instruction stores, writing a redirect and
 * restoring the original bytes (docs/redirect.md). It decides nothing: the engine
 * (sandbox-engine.c) has checked everything before calling in, and after
 * sandbox_redirect_write has opened its pages nothing fails.
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
 * with the saved bytes of [P, P+5) and the current others.
 *
 * Held entry jump (f->hold: a first instruction shorter than 5 bytes, or [P, P+5)
 * across two words; docs/reach.md): written only while every other thread is held
 * clear of (P, P+5) (sandbox_threads_held; sandbox_hold_confirm right before phase 2), the
 * later word first. Its remove cannot be one store when it spans two words, and needs
 * no hold: (1) `jmp .` at P parks the threads that reach it (no thread can be inside
 * the jump, one instruction), sync; (2) the saved bytes [P+2, P+5), now dead, sync;
 * (3) the saved [P, P+2), which releases the parked threads into the original, sync.
 *
 * The encodings come from arch/x86_64/insn.h. Every code store below names the
 * sync_core it pairs with.
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

#include "arch/x86_64/insn.h"
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

/* ------------------------------------------------------------------ atomic stores */

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

/* Stores n bytes at addr with one atomic 8-byte store per aligned word they touch, the
 * later word first; the other bytes of each word are stored as they are now (another
 * patch may have changed them since it was saved). */
static void sandbox_span_store(uintptr_t addr, const uint8_t *bytes, size_t n)
{
	uintptr_t first = sandbox_round_down(addr, 8);
	for (uintptr_t w = sandbox_round_down(addr + n - 1, 8);; w -= 8) {
		uint64_t v = __atomic_load_n((const uint64_t *)w, __ATOMIC_RELAXED);
		for (size_t i = 0; i < n; i++)
			if (addr + i >= w && addr + i < w + 8)
				((uint8_t *)&v)[addr + i - w] = bytes[i];
		sandbox_insn_store8(w, v);
		if (w == first)
			break;
	}
}

/* The original bytes from the entry jump's site. */
static const uint8_t *sandbox_site_saved(const struct sandbox_func *f)
{
	return f->saved + (f->site - f->saved_at);
}

/* Whether an entry jump's [site, site+5) spans two words (remove parks threads). */
static int sandbox_jump_split(const struct sandbox_func *f)
{
	return f->mech == PBX_KIND_ENTRY_JUMP && f->site % 8 > 8 - PBX_JUMP_LEN;
}

/* ------------------------------------------------------------------ sandbox text */

int sandbox_text_refill(uintptr_t addr, size_t len)
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
	if (text->len)
		memcpy((void *)text->addr, text->src, text->len);
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
	/* Phase 1: `e9 rel32` into the dead padding; nothing executes there until the
	 * phase 2 store publishes it. */
	for (size_t i = 0; i < nfuncs; i++) {
		const struct sandbox_func *f = &funcs[i];
		if (f->mech == PBX_KIND_ENTRY_JUMP)
			continue;	/* written in phase 2 */
		uint8_t jmp[PBX_JUMP_LEN];
		sandbox_insn_jmp_encode(f->site - PBX_ENTRY_PAD, f->new_entry, jmp);
		memcpy((void *)(f->site - PBX_ENTRY_PAD), jmp, sizeof(jmp));
	}
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
			if (funcs[k].mech != PBX_KIND_ENTRY_JUMP)
				memcpy((void *)funcs[k].saved_at, funcs[k].saved, PBX_JUMP_LEN);
		sandbox_core_sync();
		sandbox_pageset_close(&ps);
		goto out;
	}
	/* Phase 2: publish, one atomic 2-byte store per function, or the atomic 8-byte
	 * store(s) of the word(s) holding the entry jump (pairs with the sync above). */
	for (size_t i = 0; i < nfuncs; i++) {
		const struct sandbox_func *f = &funcs[i];
		if (f->mech == PBX_KIND_ENTRY_JUMP) {
			uint8_t jmp[PBX_JUMP_LEN];
			sandbox_insn_jmp_encode(f->site, f->new_entry, jmp);
			sandbox_span_store(f->site, jmp, PBX_JUMP_LEN);
		} else {
			sandbox_insn_store2(f->site, SANDBOX_INSN_JMP_BACK);
		}
	}
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
	uint16_t v;
	/* (1) Entry back to its saved bytes: no new thread takes the redirect. An entry
	 * jump in one word is undone completely here: one 8-byte store of the word with
	 * the saved [site, site+5) (a thread that already jumped is in the replacement,
	 * kept); one across two words gets `jmp .` at the site, parking new arrivals. */
	for (size_t f = 0; f < nfuncs; f++) {
		const struct sandbox_func *fn = &funcs[f];
		if (fn->mech == PBX_KIND_ENTRY_JUMP) {
			if (sandbox_jump_split(fn))
				sandbox_span_store(fn->site, sandbox_insn_park, sizeof(sandbox_insn_park));
			else
				sandbox_span_store(fn->site, sandbox_site_saved(fn), PBX_JUMP_LEN);
			continue;
		}
		memcpy(&v, fn->saved + PBX_ENTRY_PAD, 2);
		sandbox_insn_store2(fn->site, v);
	}
	/* Pairs with (1): no core still fetches `eb f8` (or the entry jump) at the entry. */
	sandbox_core_sync();
	/* (2) A thread parked at site-6 now jumps to the entry instead of the patch; the
	 * rel32 of a split entry jump goes back (dead: threads wait at its `jmp .`). */
	for (size_t f = 0; f < nfuncs; f++) {
		if (sandbox_jump_split(&funcs[f]))
			sandbox_span_store(funcs[f].site + 2, sandbox_site_saved(&funcs[f]) + 2, PBX_JUMP_LEN - 2);
		else if (funcs[f].mech != PBX_KIND_ENTRY_JUMP)
			sandbox_insn_store2(funcs[f].site - PBX_ENTRY_PAD, SANDBOX_INSN_JMP_OVER);
	}
	/* Pairs with (2): the rel32 bytes below are dead before they change. */
	sandbox_core_sync();
	for (size_t f = 0; f < nfuncs; f++) {
		/* (3) of a split entry jump: its first two bytes back, the parked threads run
		 * the original (pairs with the sync after (2)). */
		if (sandbox_jump_split(&funcs[f]))
			sandbox_span_store(funcs[f].site, sandbox_site_saved(&funcs[f]), 2);
		if (funcs[f].mech == PBX_KIND_ENTRY_JUMP)
			continue;
		/* (3) Skipped by `eb 04`; ordered before (4) by x86 store ordering. */
		memcpy((void *)(funcs[f].site - 4), funcs[f].saved + 2, 4);
		/* (4) The first padding bytes last (pairs with (3)). */
		memcpy(&v, funcs[f].saved, 2);
		sandbox_insn_store2(funcs[f].site - PBX_ENTRY_PAD, v);
	}
	/* Pairs with (4): every core fetches the restored padding. */
	sandbox_core_sync();
	sandbox_pageset_close(&ps);
	sandbox_pageset_deinit(&ps);
	return 0;
}
