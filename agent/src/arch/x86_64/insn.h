/* x86-64 instruction templates of the agent, as data (docs/redirect.md).
 *
 * Every instruction encoding the agent writes or checks is spelled here and
 * nowhere else in the agent, as libpulp keeps its prologue in ulp_prologue[]
 * (lib/arch/x86_64/patch.c): the 6+2 NOP patchable entry, the jumps of the
 * redirect protocol, endbr64, the `ret` that fills free sandbox text, and the
 * self-test's code. Header only: constants, tables and two small builders.
 */
#ifndef PATCHBOX_ARCH_X86_64_INSN_H
#define PATCHBOX_ARCH_X86_64_INSN_H

#include <stdint.h>
#include <string.h>

#include "patchbox/wire.h"

_Static_assert(PBX_ENTRY_PAD == 6 && PBX_ENTRY_NOPS == 2, "redirect code assumes 8,6");
_Static_assert(PBX_JUMP_LEN == 5, "jmp rel32 is 5 bytes");

/* ret: fills free sandbox text, so a stray jump into it returns. Spelled bare (no
 * suffix): the sandbox's .fill directive uses it as assembler text. */
#define SANDBOX_INSN_RET 0xc3
#define SANDBOX_INSN_JMP_REL32 0xe9	/* opcode of jmp rel32 (PBX_JUMP_LEN bytes) */

/* The two 2-byte instructions of the redirect protocol, as the little-endian word
 * that one aligned atomic 2-byte store publishes. */
#define SANDBOX_INSN_JMP_BACK 0xf8ebu	/* eb f8 at the entry: jmp entry-6 (apply phase 2) */
#define SANDBOX_INSN_JMP_OVER 0x04ebu	/* eb 04 at entry-6: jmp entry (remove step 2) */

#define SANDBOX_ENTRY_BYTES (PBX_ENTRY_PAD + PBX_ENTRY_NOPS)

/* The entry of -fpatchable-function-entry=8,6: 6 NOPs before the symbol, 2 at it. */
static const uint8_t sandbox_insn_entry_nops[SANDBOX_ENTRY_BYTES] = {
	0x90, 0x90, 0x90, 0x90, 0x90, 0x90,	/* entry-6: dead padding */
	0x90, 0x90,				/* entry */
};

/* jmp . (to itself): parks the threads that reach an entry jump while remove writes
 * back original bytes across two words (sandbox_redirect_restore). */
static const uint8_t sandbox_insn_park[2] = { 0xeb, 0xfe };

/* endbr64: the first instruction of a CET entry, skipped by an entry jump (skip 4). */
static const uint8_t sandbox_insn_endbr64[PBX_ENDBR_SKIP] = { 0xf3, 0x0f, 0x1e, 0xfa };

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
static const uint8_t sandbox_insn_selftest_target[12] = {
	0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
	0x8d, 0x47, 0x01,			/* lea eax, [rdi+1] */
	0xc3,					/* ret */
};

/* The rel32 of a jmp rel32 at `from` to `to` (the caller checks it fits in 32 bits). */
static inline int64_t sandbox_insn_jmp_rel(uintptr_t from, uintptr_t to)
{
	return (int64_t)to - (int64_t)(from + PBX_JUMP_LEN);
}

/* Encodes `e9 rel32`, a jmp rel32 at `from` to `to`, into ret[0..PBX_JUMP_LEN). */
static inline void sandbox_insn_jmp_encode(uintptr_t from, uintptr_t to, uint8_t *ret)
{
	int32_t rel = (int32_t)sandbox_insn_jmp_rel(from, to);
	ret[0] = SANDBOX_INSN_JMP_REL32;
	memcpy(ret + 1, &rel, sizeof(rel));
}

#endif
