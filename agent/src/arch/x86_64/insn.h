/* x86-64 instruction templates of the agent, as data (docs/redirect.md); the
 * interface every arch/<arch>/insn.h provides is listed in arch/arch.h.
 *
 * Every instruction encoding the agent writes or checks is spelled here and
 * nowhere else in the agent, as libpulp keeps its prologue in ulp_prologue[]
 * (lib/arch/x86_64/patch.c): the 6+2 NOP patchable entry, the jumps of the
 * redirect protocol, endbr64, the `ret` that fills free sandbox text, the
 * self-test's code, and the kernel's signal frame. Header only: constants,
 * tables and small pure functions.
 */
#ifndef PATCHBOX_ARCH_X86_64_INSN_H
#define PATCHBOX_ARCH_X86_64_INSN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "patchbox/wire.h"

#define SANDBOX_ARCH_NAME "x86_64"
#define SANDBOX_ARCH_MACHINE 62		/* EM_X86_64 */
#define SANDBOX_ARCH_MACHINE_STR "62"

/* -fpatchable-function-entry=8,6: 6 one-byte NOPs before the symbol, 2 at it (the
 * client's half: src/patchbox/arch/x86_64.py, compared by tests/arch/test_arch.py). */
#define SANDBOX_ARCH_ENTRY_PAD 6
#define SANDBOX_ARCH_ENTRY_NOPS 2
#define SANDBOX_ARCH_ENTRY_FLAGS "-fpatchable-function-entry=8,6"
#define SANDBOX_ARCH_PATCHABLE_ATTR patchable_function_entry(8, 6)
#define SANDBOX_ARCH_ENTRY_DESC "8 NOPs"
#define SANDBOX_ARCH_SITE_ALIGN 2	/* the 2-byte publishing store */
#define SANDBOX_ARCH_INSN_ALIGN 1	/* instructions start anywhere */
#define SANDBOX_ARCH_JUMP_LEN 5		/* e9 rel32 of an entry jump */
#define SANDBOX_ARCH_WORD 8		/* ... published by one aligned 8-byte store */
#define SANDBOX_ARCH_LANDING_LEN 4	/* endbr64, kept before an entry jump */
#define SANDBOX_ARCH_LANDING_NAME "endbr64"

/* ret: fills free sandbox text, so a stray jump into it returns. Spelled bare (no
 * suffix): the sandbox's .fill directive uses it as assembler text. */
#define SANDBOX_INSN_RET 0xc3
#define SANDBOX_INSN_JMP_REL32 0xe9	/* opcode of jmp rel32 (SANDBOX_ARCH_JUMP_LEN bytes) */

/* The two 2-byte instructions of the redirect protocol, as the little-endian word
 * that one aligned atomic 2-byte store publishes. */
#define SANDBOX_INSN_JMP_BACK 0xf8ebu	/* eb f8 at the entry: jmp entry-6 (apply phase 2) */
#define SANDBOX_INSN_JMP_OVER 0x04ebu	/* eb 04 at entry-6: jmp entry (remove step 2) */

/* The entry of -fpatchable-function-entry=8,6: 6 NOPs before the symbol, 2 at it. */
static const uint8_t sandbox_insn_entry_nops[SANDBOX_ARCH_ENTRY_PAD + SANDBOX_ARCH_ENTRY_NOPS] = {
	0x90, 0x90, 0x90, 0x90, 0x90, 0x90,	/* entry-6: dead padding */
	0x90, 0x90,				/* entry */
};

/* jmp . (to itself): parks the threads that reach an entry jump while remove writes
 * back original bytes across two words (sandbox_redirect_restore). */
static const uint8_t sandbox_insn_park[2] = { 0xeb, 0xfe };

/* endbr64: the first instruction of a CET entry, skipped by an entry jump (skip 4). */
static const uint8_t sandbox_arch_landing[SANDBOX_ARCH_LANDING_LEN] = { 0xf3, 0x0f, 0x1e, 0xfa };

/* The self-test's replacement: 6+2 NOPs (a stackable entry at offset 6), then
 * mov eax, imm32; ret. The imm32 is at SANDBOX_INSN_SELFTEST_IMM. */
#define SANDBOX_INSN_SELFTEST_IMM 9
static const uint8_t sandbox_insn_selftest_replacement[14] = {
	0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
	0xb8, 0x00, 0x00, 0x00, 0x00,		/* mov eax, imm32 */
	0xc3,					/* ret */
};

/* The self-test's target when the sandbox is mapped near the executable
 * (SANDBOX_NEAR_MMAP): what sandbox_selftest_target compiles to with the patchable
 * entry, 6+2 NOPs, then lea eax, [rdi+1]; ret. */
static const uint8_t sandbox_arch_selftest_target[12] = {
	0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
	0x8d, 0x47, 0x01,			/* lea eax, [rdi+1] */
	0xc3,					/* ret */
};

/* The rel32 of a jmp rel32 at `from` to `to` (the caller checks it fits in 32 bits). */
static inline int64_t sandbox_insn_jmp_rel(uintptr_t from, uintptr_t to)
{
	return (int64_t)to - (int64_t)(from + SANDBOX_ARCH_JUMP_LEN);
}

/* Encodes `e9 rel32`, a jmp rel32 at `from` to `to`, into ret[0..SANDBOX_ARCH_JUMP_LEN). */
static inline void sandbox_insn_jmp_encode(uintptr_t from, uintptr_t to, uint8_t *ret)
{
	int32_t rel = (int32_t)sandbox_insn_jmp_rel(from, to);
	ret[0] = SANDBOX_INSN_JMP_REL32;
	memcpy(ret + 1, &rel, sizeof(rel));
}

/* Whether bytes (from entry-6; skip: the record's) are the unpatched 6+2 NOP entry.
 * A patchable entry never skips anything on x86-64 (skip 0). */
static inline int sandbox_arch_entry_check(const uint8_t *bytes, unsigned skip)
{
	return skip == 0 && memcmp(bytes, sandbox_insn_entry_nops, sizeof(sandbox_insn_entry_nops)) == 0;
}

/* Bytes between the symbol and the site of a patchable entry: none on x86-64 (GCC puts
 * endbr64 after the patch area's NOPs). */
static inline unsigned sandbox_arch_entry_skip(uintptr_t entry)
{
	(void)entry;
	return 0;
}

/* Whether a function record may carry skip: kind 0 only 0, kind 1 0 or past endbr64. */
#define SANDBOX_ARCH_SKIP_RULE "kind 0 needs skip 0, kind 1 skip 0 or 4"
static inline int sandbox_arch_skip_valid(unsigned kind, unsigned skip)
{
	return skip == 0 || (kind == PBX_KIND_ENTRY_JUMP && skip == SANDBOX_ARCH_LANDING_LEN);
}

/* The logical original of a patchable entry: what memory holds (nothing is left in the
 * padding after a remove on x86-64). */
static inline void sandbox_arch_entry_normalize(uint8_t *bytes, size_t len)
{
	(void)bytes;
	(void)len;
}

/* Why an entry jump over the first instruction at P is refused whatever the flags, NULL
 * if not: never on x86-64 (the hold and the alignment rules are the engine's). */
static inline const char *sandbox_arch_jump_unsafe(const uint8_t *insn)
{
	(void)insn;
	return NULL;
}

/* 0 if the redirect of mech at site reaches `to`: the rel32 of `e9` at entry-6 (kind 0)
 * or at the site (kind 1). pad and sync_core do not matter on x86-64. */
static inline int sandbox_arch_redirect_reach(unsigned mech, uintptr_t site, uintptr_t pad, uintptr_t to,
					      int sync_core)
{
	(void)pad;
	(void)sync_core;
	int64_t rel = sandbox_insn_jmp_rel(mech == PBX_KIND_ENTRY_JUMP ? site : site - SANDBOX_ARCH_ENTRY_PAD, to);
	return rel < INT32_MIN || rel > INT32_MAX ? -1 : 0;
}

/* Coherent instruction cache: nothing to do (the core sync after the stores pairs). */
static inline void sandbox_arch_flush_icache(uintptr_t addr, size_t len)
{
	(void)addr;
	(void)len;
}

/* ---- free sandbox text: `ret` */

/* The assembler text that fills `bytes` (a string) of the sandbox in the program's text. */
#define SANDBOX_ARCH_FILL_ASM(bytes) ".fill " bytes ",1,0xc3"
#define SANDBOX_ARCH_ALIGN_ASM ".p2align 12,0xc3"
#define SANDBOX_ARCH_FILL_NAME "0xc3"

/* How far from an object a sandbox mapped for it may lie (rel32 with room to spare). */
#define SANDBOX_ARCH_NEAR 0x60000000ul
#define SANDBOX_ARCH_FAR SANDBOX_ARCH_NEAR

static inline void sandbox_arch_text_fill(void *at, size_t len)
{
	memset(at, SANDBOX_INSN_RET, len);
}

static inline int sandbox_arch_text_filled(const void *at, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (((const uint8_t *)at)[i] != SANDBOX_INSN_RET)
			return 0;
	return 1;
}

/* ---- the self-test */

/* Writes the self-test's replacement (returns magic) into buf: its length; *entry: the
 * offset of its entry (stackable: its own 6+2 NOPs), *size: its bytes from there. */
static inline size_t sandbox_arch_selftest_replacement(uint8_t buf[32], uint32_t magic, uint32_t *entry,
						       uint32_t *size)
{
	memcpy(buf, sandbox_insn_selftest_replacement, sizeof(sandbox_insn_selftest_replacement));
	memcpy(buf + SANDBOX_INSN_SELFTEST_IMM, &magic, 4);
	*entry = SANDBOX_ARCH_ENTRY_PAD;
	*size = SANDBOX_ARCH_ENTRY_NOPS + 6;
	return sizeof(sandbox_insn_selftest_replacement);
}

/* ---- the kernel's signal frame (the hold follows alternate stacks through it) */

/* x86-64 signal frame as the kernel writes it (struct rt_sigframe, the ABI unwinders and
 * debuggers read), in words: pretcode, uc_flags, uc_link, uc_stack {ss_sp, ss_flags,
 * ss_size}, uc_mcontext {r8..r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip, ...}. */
enum {
	SANDBOX_SF_FLAGS = 1, SANDBOX_SF_LINK = 2, SANDBOX_SF_SS_SP = 3, SANDBOX_SF_SS_SIZE = 5,
	SANDBOX_SF_RSP = 21, SANDBOX_ARCH_SF_WORDS = 23,
};

/* Whether words w (at addr) start a signal frame the kernel wrote on an alternate stack:
 * uc_link 0, small uc_flags, and uc_stack describing a stack that holds the frame itself
 * (a frame on the thread's own stack names the alternate stack, or none). *sp: the SP
 * the signal interrupted. */
static inline int sandbox_arch_sigframe(const uint64_t *w, uintptr_t addr, uintptr_t *sp)
{
	uint64_t ss_sp = w[SANDBOX_SF_SS_SP], ss_size = w[SANDBOX_SF_SS_SIZE];
	if (addr % 16 != 8 || !w[0] || w[SANDBOX_SF_FLAGS] > 0xff || w[SANDBOX_SF_LINK] != 0 ||
	    ss_size < 2048 || ss_size > (1ull << 32) || addr < ss_sp || addr - ss_sp >= ss_size)
		return 0;
	*sp = w[SANDBOX_SF_RSP];
	return 1;
}

#endif
