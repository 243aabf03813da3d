/* How a redirect is written on x86-64 (docs/redirect.md): the stores of the protocol,
 * for sandbox-redirect.c, which makes the pages writable, calls these in order and runs
 * one core sync (membarrier SYNC_CORE) between the phases and after each remove step.
 *
 *   apply   prepare: `e9 rel32` into the dead padding at site-6 (kind 0).
 *           sync_core: every core now sees the jump and the new code.
 *           publish: one aligned 2-byte store of `eb f8` at site (jumps to site-6), or
 *           the entry jump's atomic 8-byte store(s) (kind 1).
 *           sync_core.
 *   A thread already past the first entry NOP executes `f8` (clc) alone: harmless
 *   at a function entry, it then runs the old body.
 *
 *   remove  step 0: 2-byte store of the saved entry bytes at site: no new thread
 *               enters the padding. sync_core.
 *           step 1: 2-byte store of `eb 04` at site-6: a thread parked at site-6 now
 *               jumps over the rest of the padding to site. sync_core.
 *           step 2: plain stores of the saved bytes at site-4..site-1 (dead: skipped by
 *               `eb 04`), then a 2-byte store of the saved bytes at site-6. sync_core.
 *   Afterwards [site-6, site+2) is byte-identical to what it was before the apply.
 *
 * Entry jump (kind 1, "Functions without the padding"): one aligned 8-byte atomic store
 * puts `e9 rel32` at P = entry+skip (P % 8 <= 3, so [P, P+5) lies in one word; the other
 * 3 bytes are stored with their current values). Remove stores the word again with the
 * saved bytes of [P, P+5) and the current others. Held across two words (docs/reach.md):
 * remove step 0 parks the threads that reach it on `jmp .` at P, step 1 the saved bytes
 * [P+2, P+5) (now dead), step 2 the saved [P, P+2), which releases them.
 *
 * The instruction cache of x86-64 is coherent with stores (SDM vol. 3 §8.1.3): only the
 * serialisation of the cores (the membarrier) is needed, no flush.
 */
#ifndef PATCHBOX_ARCH_X86_64_PUBLISH_H
#define PATCHBOX_ARCH_X86_64_PUBLISH_H

#include "arch/x86_64/insn.h"
#include "sandbox-internal.h"

#define SANDBOX_ARCH_RESTORE_STEPS 3

/* Publishes one 2-byte instruction; x86 makes an aligned 2-byte store atomic for
 * instruction fetch on other cores: they see the old or the new pair, never half. */
static inline void sandbox_insn_store2(uintptr_t addr, uint16_t insn)
{
	__atomic_store_n((uint16_t *)addr, insn, __ATOMIC_RELEASE);
}

/* Publishes an entry jump: one aligned 8-byte store, single-copy atomic on x86-64
 * for instruction fetch too (the word never crosses a cache line). */
static inline void sandbox_insn_store8(uintptr_t addr, uint64_t word)
{
	__atomic_store_n((uint64_t *)addr, word, __ATOMIC_RELEASE);
}

/* Stores n bytes at addr with one atomic 8-byte store per aligned word they touch, the
 * later word first; the other bytes of each word are stored as they are now (another
 * patch may have changed them since it was saved). */
static inline void sandbox_span_store(uintptr_t addr, const uint8_t *bytes, size_t n)
{
	uintptr_t first = addr & ~(uintptr_t)7;
	for (uintptr_t w = (addr + n - 1) & ~(uintptr_t)7;; w -= 8) {
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
static inline const uint8_t *sandbox_site_saved(const struct sandbox_func *f)
{
	return f->saved + (f->site - f->saved_at);
}

/* Whether an entry jump's [site, site+5) spans two words (remove parks threads). */
static inline int sandbox_jump_split(const struct sandbox_func *f)
{
	return f->mech == PBX_KIND_ENTRY_JUMP && f->site % 8 > 8 - SANDBOX_ARCH_JUMP_LEN;
}

/* Apply phase 1: `e9 rel32` into the dead padding; nothing executes there until the
 * phase 2 store publishes it (pairs with the sync after it). Entry jumps: nothing. */
static inline void sandbox_arch_prepare(const struct sandbox_func *f)
{
	if (f->mech == PBX_KIND_ENTRY_JUMP)
		return;
	uint8_t jmp[SANDBOX_ARCH_JUMP_LEN];
	sandbox_insn_jmp_encode(f->site - SANDBOX_ARCH_ENTRY_PAD, f->new_entry, jmp);
	memcpy((void *)(f->site - SANDBOX_ARCH_ENTRY_PAD), jmp, sizeof(jmp));
}

/* Undoes phase 1 (the hold was lost before phase 2): the dead padding back. */
static inline void sandbox_arch_unprepare(const struct sandbox_func *f)
{
	if (f->mech != PBX_KIND_ENTRY_JUMP)
		memcpy((void *)f->saved_at, f->saved, SANDBOX_ARCH_JUMP_LEN);
}

/* Apply phase 2: one atomic 2-byte store of `eb f8`, or the atomic 8-byte store(s) of
 * the word(s) holding the entry jump (pairs with the sync after phase 1). */
static inline void sandbox_arch_publish(const struct sandbox_func *f)
{
	if (f->mech == PBX_KIND_ENTRY_JUMP) {
		uint8_t jmp[SANDBOX_ARCH_JUMP_LEN];
		sandbox_insn_jmp_encode(f->site, f->new_entry, jmp);
		sandbox_span_store(f->site, jmp, SANDBOX_ARCH_JUMP_LEN);
	} else {
		sandbox_insn_store2(f->site, SANDBOX_INSN_JMP_BACK);
	}
}

/* Remove step `step` of f (the header comment); each pairs with the sync before it. */
static inline void sandbox_arch_restore_step(const struct sandbox_func *f, int step)
{
	uint16_t v;
	int split = sandbox_jump_split(f);
	switch (step) {
	case 0:
		/* Entry back to its saved bytes: no new thread takes the redirect. An entry
		 * jump in one word is undone completely here: one 8-byte store of the word with
		 * the saved [site, site+5) (a thread that already jumped is in the replacement,
		 * kept); one across two words gets `jmp .` at the site, parking new arrivals. */
		if (f->mech == PBX_KIND_ENTRY_JUMP) {
			if (split)
				sandbox_span_store(f->site, sandbox_insn_park, sizeof(sandbox_insn_park));
			else
				sandbox_span_store(f->site, sandbox_site_saved(f), SANDBOX_ARCH_JUMP_LEN);
			return;
		}
		memcpy(&v, f->saved + SANDBOX_ARCH_ENTRY_PAD, 2);
		sandbox_insn_store2(f->site, v);
		return;
	case 1:
		/* A thread parked at site-6 now jumps to the entry instead of the patch; the
		 * rel32 of a split entry jump goes back (dead: threads wait at its `jmp .`). */
		if (split)
			sandbox_span_store(f->site + 2, sandbox_site_saved(f) + 2, SANDBOX_ARCH_JUMP_LEN - 2);
		else if (f->mech != PBX_KIND_ENTRY_JUMP)
			sandbox_insn_store2(f->site - SANDBOX_ARCH_ENTRY_PAD, SANDBOX_INSN_JMP_OVER);
		return;
	default:
		/* A split entry jump: its first two bytes back, the parked threads run the
		 * original (pairs with the sync after step 1). */
		if (split)
			sandbox_span_store(f->site, sandbox_site_saved(f), 2);
		if (f->mech == PBX_KIND_ENTRY_JUMP)
			return;
		/* Skipped by `eb 04`; ordered before the next store by x86 store ordering. */
		memcpy((void *)(f->site - 4), f->saved + 2, 4);
		/* The first padding bytes last (pairs with the one above). */
		memcpy(&v, f->saved, 2);
		sandbox_insn_store2(f->site - SANDBOX_ARCH_ENTRY_PAD, v);
		return;
	}
}

#endif
