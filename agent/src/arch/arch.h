/* The agent's one view of the processor (docs/redirect.md; issue 22).
 *
 * Everything that differs between architectures lives under arch/<arch>/ and is
 * reached through this header only; no other file of agent/src names an
 * architecture. The directory is chosen by the compiler's target:
 *
 *   __x86_64__   arch/x86_64/   -fpatchable-function-entry=8,6, `e9 rel32` + `eb f8`
 *   __aarch64__  arch/aarch64/  -fpatchable-function-entry=4,3, one `B` (4-byte store)
 *
 * What each arch/<arch>/insn.h provides (data and small pure functions; the engine,
 * the self-test, the sandbox and the hold use them):
 *
 *   SANDBOX_ARCH_NAME, SANDBOX_ARCH_MACHINE(_STR) its name and ELF e_machine (the patch's
 *                                               `machine` must equal it; the names of
 *                                               the others: sandbox_arch_machine_name)
 *   SANDBOX_ARCH_ENTRY_PAD, _ENTRY_NOPS         bytes of patchable NOPs before the symbol,
 *                                               and at the site the redirect replaces
 *   SANDBOX_ARCH_ENTRY_FLAGS, _PATCHABLE_ATTR   the compiler flag, and the attribute for
 *                                               the agent's own self-test target
 *   sandbox_arch_entry_check(bytes, skip)       whether bytes from entry-PAD are an
 *                                               unpatched patchable entry
 *   sandbox_arch_entry_skip(entry)              bytes of a landing pad (bti c) kept before
 *                                               the site of a patchable entry, else 0
 *   SANDBOX_ARCH_SITE_ALIGN                     alignment the publishing store needs
 *   SANDBOX_ARCH_LANDING_LEN, _LANDING_NAME,    the landing pad an entry jump may skip
 *   sandbox_arch_landing[]                      (endbr64, bti c)
 *   sandbox_arch_skip_valid(kind, skip)         skip values a function record may carry
 *   SANDBOX_ARCH_JUMP_LEN, SANDBOX_ARCH_WORD    an entry jump's bytes, and the word one
 *                                               atomic store writes
 *   sandbox_arch_redirect_reach(mech, site, to, sync_core)
 *                                               0 if a redirect at site reaches to
 *   sandbox_arch_flush_icache(addr, len)        after any store of code (x86-64: nothing)
 *   SANDBOX_ARCH_NEAR, SANDBOX_ARCH_FAR         how far a library's sandbox may be mapped
 *   SANDBOX_ARCH_FILL_ASM(bytes), sandbox_arch_text_fill/_filled
 *                                               what free sandbox text holds (`ret`)
 *   sandbox_arch_selftest_replacement(), sandbox_arch_selftest_target[]
 *                                               the self-test's code
 *   SANDBOX_ARCH_SF_WORDS, sandbox_arch_sigframe()
 *                                               the kernel's signal frame (the hold)
 *
 * arch/<arch>/fixup.h (the engine: fix-up types beyond the shared PC32 and ABS64, which
 * write one field of one instruction word; wire/constants.toml [fixup_type]):
 *
 *   sandbox_arch_fixup_width(type)              bytes a type of this architecture writes,
 *                                               0 for any other type (refused)
 *   sandbox_arch_fixup_insn_check(type, at)     NULL if the word at `at` is of the class
 *                                               the type writes into, else that class
 *   sandbox_arch_fixup_write(type, at, sa, p)   the value of S + A at P into the word;
 *                                               NULL, or why it does not fit (nothing written)
 *
 * and arch/<arch>/publish.h (sandbox-redirect.c only: how a redirect is written):
 *
 *   sandbox_arch_prepare / _unprepare           apply phase 1: dead bytes first
 *   sandbox_arch_publish                        apply phase 2: the one atomic store
 *   SANDBOX_ARCH_RESTORE_STEPS, sandbox_arch_restore_step
 *                                               remove, one core sync after each step
 */
#ifndef PATCHBOX_ARCH_H
#define PATCHBOX_ARCH_H

#include <elf.h> /* EM_*: the machines a patch may name */

#if defined(__x86_64__)
#include "arch/x86_64/insn.h"
#include "arch/x86_64/fixup.h"
#elif defined(__aarch64__)
#include "arch/aarch64/insn.h"
#include "arch/aarch64/fixup.h"
#else
#error "patchbox agent: unsupported architecture (x86-64 and aarch64 are)"
#endif

_Static_assert(SANDBOX_ARCH_MACHINE == EM_X86_64 || SANDBOX_ARCH_MACHINE == EM_AARCH64,
	       "the agent's machine is one of patchbox.arch.Machine");

/* The name of an ELF e_machine a patch may carry (patchbox.arch.Machine), for the
 * refusal of a patch built for another architecture than this agent's. */
static inline const char *sandbox_arch_machine_name(unsigned machine)
{
	switch (machine) {
	case EM_X86_64:
		return "x86_64";
	case EM_AARCH64:
		return "aarch64";
	default:
		return "an unknown architecture";
	}
}

/* Bytes from entry-PAD to the end of the entry NOPs, without a landing pad. */
#define SANDBOX_ENTRY_BYTES (SANDBOX_ARCH_ENTRY_PAD + SANDBOX_ARCH_ENTRY_NOPS)

#endif
