/* aarch64 instruction templates of the agent, as data (docs/redirect.md, "aarch64");
 * the interface every arch/<arch>/insn.h provides is listed in arch/arch.h.
 *
 * The patchable entry is -fpatchable-function-entry=5,4: four NOPs (16 bytes) before
 * the symbol, one at the site. With -mbranch-protection=bti (or standard) GCC puts
 * `bti c` at the symbol and the entry NOP after it, so the site is entry+4 (the
 * function record's skip 4, as past endbr64 on x86-64):
 *
 *   f-16 f-12 f-8 f-4 | f            | f+4 ...
 *   nop  nop  nop nop | nop          | body
 *   nop  nop  nop nop | bti c | nop  | body            (BTI)
 *
 * A redirect is one aligned 4-byte store of `B new` at the site (NOP <-> B: both are in
 * the ARM ARM's list of instructions that may be modified while another PE executes
 * them, B2.2.5). A replacement beyond a B's +-128 MiB is reached through a veneer the
 * agent writes once into the dead padding: `ldr x16, f-8; br x16` and the 8-byte literal
 * at f-8 (arch/aarch64/publish.h). Every instruction is 4 bytes, little-endian.
 */
#ifndef PATCHBOX_ARCH_AARCH64_INSN_H
#define PATCHBOX_ARCH_AARCH64_INSN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ucontext.h>

#include "patchbox/wire.h"

#define SANDBOX_ARCH_NAME "aarch64"
#define SANDBOX_ARCH_MACHINE 183	/* EM_AARCH64 */
#define SANDBOX_ARCH_MACHINE_STR "183"

#define SANDBOX_ARCH_ENTRY_PAD 16
#define SANDBOX_ARCH_ENTRY_NOPS 4
#define SANDBOX_ARCH_ENTRY_DESC "4+1 NOPs"
#define SANDBOX_ARCH_ENTRY_FLAGS "-fpatchable-function-entry=5,4"
#define SANDBOX_ARCH_PATCHABLE_ATTR patchable_function_entry(5, 4)
#define SANDBOX_ARCH_SITE_ALIGN 4	/* the 4-byte publishing store */
#define SANDBOX_ARCH_INSN_ALIGN 4	/* every instruction */
#define SANDBOX_ARCH_JUMP_LEN 4		/* B of an entry jump ... */
#define SANDBOX_ARCH_WORD 4		/* ... one aligned 4-byte store */
#define SANDBOX_ARCH_LANDING_LEN 4	/* bti c, kept before the site */
#define SANDBOX_ARCH_LANDING_NAME "bti c"

#define SANDBOX_A64_NOP 0xd503201fu
#define SANDBOX_A64_BTI_C 0xd503245fu
#define SANDBOX_A64_RET 0xd65f03c0u
#define SANDBOX_A64_B 0x14000000u		/* B imm26 (word offset) */
#define SANDBOX_A64_LDR_X16_8 0x58000050u	/* ldr x16, .+8 (the veneer's literal) */
#define SANDBOX_A64_BR_X16 0xd61f0200u		/* br x16 (x16 = IP0: free at a call; bti c accepts it) */
#define SANDBOX_A64_B_REACH (1l << 27)		/* B: [-128 MiB, +128 MiB) */

static const uint8_t sandbox_arch_landing[SANDBOX_ARCH_LANDING_LEN] = { 0x5f, 0x24, 0x03, 0xd5 };

static inline uint32_t sandbox_a64_word(const uint8_t *p)
{
	uint32_t w;
	memcpy(&w, p, 4);
	return w;
}

/* Whether a B at `from` reaches `to`. */
static inline int sandbox_a64_b_reaches(uintptr_t from, uintptr_t to)
{
	int64_t d = (int64_t)to - (int64_t)from;
	return d % 4 == 0 && d >= -SANDBOX_A64_B_REACH && d < SANDBOX_A64_B_REACH;
}

/* B from `from` to `to` (the caller checked sandbox_a64_b_reaches). */
static inline uint32_t sandbox_a64_b(uintptr_t from, uintptr_t to)
{
	int64_t d = (int64_t)to - (int64_t)from;
	return SANDBOX_A64_B | ((uint32_t)(d >> 2) & 0x03ffffffu);
}

/* Whether bytes (16, from entry-16) hold the veneer a far redirect left there. */
static inline int sandbox_a64_veneer(const uint8_t *pad)
{
	return sandbox_a64_word(pad) == SANDBOX_A64_LDR_X16_8 && sandbox_a64_word(pad + 4) == SANDBOX_A64_BR_X16;
}

/* Whether bytes (from entry-16; skip: the record's) are the unpatched 4+1 NOP entry,
 * `bti c` between when skip is 4. A veneer left by a far redirect counts as the NOPs
 * (sandbox_arch_entry_normalize turned it back into them). */
static inline int sandbox_arch_entry_check(const uint8_t *bytes, unsigned skip)
{
	for (unsigned i = 0; i < SANDBOX_ARCH_ENTRY_PAD; i += 4)
		if (sandbox_a64_word(bytes + i) != SANDBOX_A64_NOP)
			return 0;
	if (skip && sandbox_a64_word(bytes + SANDBOX_ARCH_ENTRY_PAD) != SANDBOX_A64_BTI_C)
		return 0;
	return sandbox_a64_word(bytes + SANDBOX_ARCH_ENTRY_PAD + skip) == SANDBOX_A64_NOP;
}

/* The logical original of a patchable entry (bytes from entry-16, len of them): a veneer
 * left in the padding by an earlier far redirect (dead since its remove) reads as the
 * NOPs it replaced. */
static inline void sandbox_arch_entry_normalize(uint8_t *bytes, size_t len)
{
	if (len >= SANDBOX_ARCH_ENTRY_PAD && sandbox_a64_veneer(bytes))
		for (unsigned i = 0; i < SANDBOX_ARCH_ENTRY_PAD; i += 4)
			memcpy(bytes + i, &(uint32_t){ SANDBOX_A64_NOP }, 4);
}

/* Bytes of `bti c` at a patchable entry (kept, the site after it), else 0. */
static inline unsigned sandbox_arch_entry_skip(uintptr_t entry)
{
	return sandbox_a64_word((const uint8_t *)entry) == SANDBOX_A64_BTI_C ? SANDBOX_ARCH_LANDING_LEN : 0;
}

/* Whether a function record may carry skip: 0, or 4 past `bti c` (both kinds). */
#define SANDBOX_ARCH_SKIP_RULE "skip 0, or 4 past bti c"
static inline int sandbox_arch_skip_valid(unsigned kind, unsigned skip)
{
	(void)kind;
	return skip == 0 || skip == SANDBOX_ARCH_LANDING_LEN;
}

/* Why an entry jump over the first instruction `insn` (4 bytes at P) is refused, NULL if
 * it is not: the ARM ARM (B2.2.5) makes a store over an instruction another PE may be
 * executing safe only when the old and the new one are both B, BL, NOP, BRK, SVC, HVC,
 * SMC or ISB. The jump is a B, so the first instruction must be a NOP or a B, for the
 * apply and just as much for the remove that puts it back (which holds no thread). */
static inline const char *sandbox_arch_jump_unsafe(const uint8_t *insn)
{
	uint32_t w = sandbox_a64_word(insn);
	if (w == SANDBOX_A64_NOP || (w & 0xfc000000u) == SANDBOX_A64_B)
		return NULL;
	return "the first instruction is not a NOP or a B, and the ARM ARM allows an instruction "
	       "another core may be executing to be replaced only between B, BL, NOP, BRK, SVC, HVC, "
	       "SMC and ISB (build with -fpatchable-function-entry=5,4)";
}

/* 0 if the redirect of mech at site reaches `to`: a B from the site (+-128 MiB); else, for
 * a patchable entry (pad: entry-16), the veneer in the padding, whose literal at pad+8 must
 * be 8-aligned (one atomic store) and which needs every core serialised (sync_core) after
 * it is written. */
static inline int sandbox_arch_redirect_reach(unsigned mech, uintptr_t site, uintptr_t pad, uintptr_t to,
					      int sync_core)
{
	if (sandbox_a64_b_reaches(site, to))
		return 0;
	return mech == PBX_KIND_PATCHABLE_ENTRY && sync_core && (pad + 8) % 8 == 0 ? 0 : -1;
}

/* Cleans the data cache to the point of unification and invalidates the instruction
 * cache lines of [addr, addr+len) on every core of the inner shareable domain, then
 * DSB ISH and ISB on this one (libgcc's __aarch64_sync_cache_range). Pairs with the
 * core sync that follows every phase of a redirect. */
static inline void sandbox_arch_flush_icache(uintptr_t addr, size_t len)
{
	__builtin___clear_cache((char *)addr, (char *)(addr + len));
}

/* ---- free sandbox text: `ret` */

#define SANDBOX_ARCH_FILL_ASM(bytes) ".fill (" bytes ")/4,4,0xd65f03c0"
#define SANDBOX_ARCH_ALIGN_ASM ".p2align 12"
#define SANDBOX_ARCH_FILL_NAME "ret (d65f03c0)"

/* How far from an object a sandbox mapped for it may lie: a B reaches 128 MiB. */
#define SANDBOX_ARCH_NEAR 0x6000000ul
/* ... else within this (the redirects through the veneer, literal fix-ups reach anything;
 * ADRP reaches 4 GiB). */
#define SANDBOX_ARCH_FAR 0x60000000ul

static inline void sandbox_arch_text_fill(void *at, size_t len)
{
	for (size_t i = 0; i + 4 <= len; i += 4)
		memcpy((uint8_t *)at + i, &(uint32_t){ SANDBOX_A64_RET }, 4);
}

static inline int sandbox_arch_text_filled(const void *at, size_t len)
{
	for (size_t i = 0; i + 4 <= len; i += 4)
		if (sandbox_a64_word((const uint8_t *)at + i) != SANDBOX_A64_RET)
			return 0;
	return 1;
}

/* ---- the self-test */

/* Writes the self-test's replacement (returns magic) into buf: 4+1 NOPs (stackable), then
 * movz w0, #lo; movk w0, #hi, lsl 16; ret. Its length; *entry, *size as on x86-64. */
static inline size_t sandbox_arch_selftest_replacement(uint8_t buf[32], uint32_t magic, uint32_t *entry,
						       uint32_t *size)
{
	const uint32_t code[8] = {
		SANDBOX_A64_NOP, SANDBOX_A64_NOP, SANDBOX_A64_NOP, SANDBOX_A64_NOP,
		SANDBOX_A64_NOP,
		0x52800000u | ((magic & 0xffffu) << 5),		/* movz w0, #lo16 */
		0x72a00000u | ((magic >> 16) << 5),		/* movk w0, #hi16, lsl 16 */
		SANDBOX_A64_RET,
	};
	memcpy(buf, code, sizeof(code));
	*entry = SANDBOX_ARCH_ENTRY_PAD;
	*size = sizeof(code) - SANDBOX_ARCH_ENTRY_PAD;
	return sizeof(code);
}

/* The self-test's target when the sandbox is mapped near the executable
 * (SANDBOX_NEAR_MMAP): 4+1 NOPs, add w0, w0, #1; ret. */
static const uint32_t sandbox_arch_selftest_target[7] = {
	SANDBOX_A64_NOP, SANDBOX_A64_NOP, SANDBOX_A64_NOP, SANDBOX_A64_NOP,
	SANDBOX_A64_NOP, 0x11000400u /* add w0, w0, #1 */, SANDBOX_A64_RET,
};

/* ---- the kernel's signal frame (the hold follows alternate stacks through it) */

/* arm64's struct rt_sigframe is siginfo (128 bytes), then the ucontext: uc_flags, uc_link,
 * uc_stack {ss_sp, ss_flags, ss_size}, uc_sigmask (the kernel's 8 bytes padded to
 * glibc's 128), then uc_mcontext (16-aligned): fault_address, regs[31], sp, pc, pstate.
 * Matched at the ucontext, in words; glibc's ucontext_t has the kernel's layout. */
enum {
	SANDBOX_SF_FLAGS = 0, SANDBOX_SF_LINK = 1, SANDBOX_SF_SS_SP = 2, SANDBOX_SF_SS_SIZE = 4,
	SANDBOX_SF_SP = 54, SANDBOX_ARCH_SF_WORDS = 57,
};
_Static_assert(offsetof(ucontext_t, uc_stack.ss_sp) == 8 * SANDBOX_SF_SS_SP &&
	       offsetof(ucontext_t, uc_stack.ss_size) == 8 * SANDBOX_SF_SS_SIZE &&
	       offsetof(ucontext_t, uc_mcontext.sp) == 8 * SANDBOX_SF_SP &&
	       offsetof(ucontext_t, uc_mcontext.pstate) < 8 * SANDBOX_ARCH_SF_WORDS,
	       "aarch64 ucontext layout");

/* Whether words w (at addr) are the ucontext of a signal frame the kernel wrote on an
 * alternate stack (the x86-64 rules: uc_link 0, small uc_flags, uc_stack holding the
 * frame); *sp: the SP the signal interrupted. */
static inline int sandbox_arch_sigframe(const uint64_t *w, uintptr_t addr, uintptr_t *sp)
{
	uint64_t ss_sp = w[SANDBOX_SF_SS_SP], ss_size = w[SANDBOX_SF_SS_SIZE];
	if (addr % 16 != 0 || w[SANDBOX_SF_FLAGS] > 0xff || w[SANDBOX_SF_LINK] != 0 || ss_size < 2048 ||
	    ss_size > (1ull << 32) || addr < ss_sp || addr - ss_sp >= ss_size)
		return 0;
	*sp = w[SANDBOX_SF_SP];
	return 1;
}

#endif
