/* How a redirect is written on aarch64 (docs/redirect.md, "aarch64"): the stores of the
 * protocol, for sandbox-redirect.c, which makes the pages writable, calls these in order
 * and runs one core sync (membarrier SYNC_CORE) between the phases and after remove.
 *
 *   apply   (the replacement copied, cleaned to the point of unification and its
 *           I-cache lines invalidated on every core: __builtin___clear_cache)
 *           prepare: near (B reaches): nothing. Far: into the dead padding, unless an
 *               earlier far redirect left it there, the veneer
 *                 entry-16: ldr x16, entry-8;  entry-12: br x16;  entry-8: .quad new
 *               (no thread executes the padding: nothing jumps there until publish).
 *           sync_core: every core discards what it may have fetched of the padding.
 *           publish: one aligned 4-byte store of `B new` (near) or `B entry-16` (far)
 *               over the NOP at the site; a left veneer gets its new literal first, one
 *               aligned 8-byte data store (a thread still running the veneer for the
 *               removed patch loads the old target, intact, or the new one, in place).
 *           sync_core.
 *   remove  step 0: the site's NOP back, one 4-byte store; sync_core. A thread that
 *               took the B before runs the (retired, intact) replacement or the veneer.
 *           The veneer stays: its instructions are not in the list below, so they are
 *           never rewritten while a thread might execute them. It is dead (nothing
 *           reaches the padding) and the next far apply reuses it; the engine reads it
 *           as the NOPs (sandbox_arch_entry_normalize).
 *
 * Why one store is enough, with or without the membarrier: an aligned 4-byte store is
 * single-copy atomic, and NOP <-> B is a change the ARM ARM (B2.2.5, "Concurrent
 * modification and execution of instructions") allows while another PE executes the
 * instruction: both are in its list (B, BL, NOP, BRK, SVC, HVC, SMC, ISB), so every
 * other thread executes the old NOP or the new B, never a mix. The site's instruction
 * is the only one ever changed where a thread may be (an entry jump over any other
 * first instruction is written only while the threads are held: the engine). What
 * the membarrier adds is the context synchronisation of every other core, so none
 * keeps instructions it fetched before the new code was written (the replacement, the
 * veneer); clear_cache already broadcast the I-cache invalidation to the inner
 * shareable domain before the publishing store. Without SYNC_CORE (old kernels, a
 * seccomp filter, qemu-user without membarrier) the agent still publishes near
 * redirects: the switch itself stays atomic for the reason above, and the replacement
 * lies in sandbox memory no thread ran since it was filled or reclaimed, which a core
 * fetches only after taking the new B; the far veneer, written into padding a core
 * may have prefetched with the function before it, is refused (the engine).
 */
#ifndef PATCHBOX_ARCH_AARCH64_PUBLISH_H
#define PATCHBOX_ARCH_AARCH64_PUBLISH_H

#include "arch/aarch64/insn.h"
#include "sandbox-internal.h"

#define SANDBOX_ARCH_RESTORE_STEPS 1

/* One instruction, one aligned single-copy-atomic 4-byte store, then its cache lines. */
static inline void sandbox_a64_store4(uintptr_t at, uint32_t insn)
{
	__atomic_store_n((uint32_t *)at, insn, __ATOMIC_RELEASE);
	sandbox_arch_flush_icache(at, 4);
}

static inline int sandbox_a64_far(const struct sandbox_func *f)
{
	return f->mech == PBX_KIND_PATCHABLE_ENTRY && !sandbox_a64_b_reaches(f->site, f->new_entry);
}

/* Whether the padding held a veneer of an earlier far redirect when the apply began. */
static inline int sandbox_a64_veneer_left(const struct sandbox_func *f)
{
	return f->mech == PBX_KIND_PATCHABLE_ENTRY && sandbox_a64_veneer(f->saved);
}

/* Apply phase 1 (far only, dead padding): literal, then the two instructions. */
static inline void sandbox_arch_prepare(const struct sandbox_func *f)
{
	if (!sandbox_a64_far(f) || sandbox_a64_veneer_left(f))
		return;
	uint64_t target = f->new_entry;
	memcpy((void *)(f->saved_at + 8), &target, 8);
	memcpy((void *)f->saved_at, &(uint32_t){ SANDBOX_A64_LDR_X16_8 }, 4);
	memcpy((void *)(f->saved_at + 4), &(uint32_t){ SANDBOX_A64_BR_X16 }, 4);
	sandbox_arch_flush_icache(f->saved_at, SANDBOX_ARCH_ENTRY_PAD);
}

/* Undoes phase 1 (the hold was lost before phase 2): the dead padding back. */
static inline void sandbox_arch_unprepare(const struct sandbox_func *f)
{
	if (!sandbox_a64_far(f) || sandbox_a64_veneer_left(f))
		return;
	memcpy((void *)f->saved_at, f->saved, SANDBOX_ARCH_ENTRY_PAD);
	sandbox_arch_flush_icache(f->saved_at, SANDBOX_ARCH_ENTRY_PAD);
}

/* Apply phase 2: the B at the site (pairs with the sync after phase 1). */
static inline void sandbox_arch_publish(const struct sandbox_func *f)
{
	uintptr_t to = f->new_entry;
	if (sandbox_a64_far(f)) {
		if (sandbox_a64_veneer_left(f))
			__atomic_store_n((uint64_t *)(f->saved_at + 8), (uint64_t)f->new_entry, __ATOMIC_RELEASE);
		to = f->saved_at;
	}
	sandbox_a64_store4(f->site, sandbox_a64_b(f->site, to));
}

/* Remove: the site's original instruction back (a NOP, or an entry jump's first one). */
static inline void sandbox_arch_restore_step(const struct sandbox_func *f, int step)
{
	(void)step;
	sandbox_a64_store4(f->site, sandbox_a64_word(f->saved + (f->site - f->saved_at)));
}

#endif
