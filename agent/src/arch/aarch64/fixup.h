/* aarch64 fix-ups: the instruction fields the patch's fix-up types write
 * (wire/constants.toml [fixup_type]; docs/patch-format.md, "Fix-up types"). The interface
 * every arch/<arch>/fixup.h provides is listed in arch/arch.h.
 *
 * Each type writes one field of one instruction word in the patch's text (4-aligned):
 *
 *   BRANCH26      B/BL imm26 = (S + A - P) / 4     a multiple of 4, within +-128 MiB
 *   ADR_PAGE      ADRP immhi:immlo = (Page(S + A) - Page(P)) / 4096, within +-4 GiB
 *   ADD_LO12      ADD (immediate, lsl #0) imm12 = (S + A) & 0xfff
 *   LDSTn_LO12    LDR/STR (unsigned offset) of n bits: imm12 = ((S + A) & 0xfff) / (n/8),
 *                 which must divide it (the load's own access size must be n bits)
 *
 * The instruction's class is checked when the request is read (nothing allocated yet),
 * the value when the fixed-up copy is built, before any byte of live memory changes.
 */
#ifndef PATCHBOX_ARCH_AARCH64_FIXUP_H
#define PATCHBOX_ARCH_AARCH64_FIXUP_H

#include <stdint.h>
#include <string.h>

#include "patchbox/wire.h"

#define SANDBOX_A64_PAGE(x) ((x) & ~(uint64_t)0xfff)

/* Bytes fix-up `type` writes if it is one of this architecture's instruction fix-ups,
 * else 0 (a type of another architecture, or unknown: refused). */
static inline unsigned sandbox_arch_fixup_width(unsigned type)
{
	switch (type) {
	case PBX_FIXUP_BRANCH26: return PBX_FIXUP_BRANCH26_WIDTH;
	case PBX_FIXUP_ADR_PAGE: return PBX_FIXUP_ADR_PAGE_WIDTH;
	case PBX_FIXUP_ADD_LO12: return PBX_FIXUP_ADD_LO12_WIDTH;
	case PBX_FIXUP_LDST8_LO12: return PBX_FIXUP_LDST8_LO12_WIDTH;
	case PBX_FIXUP_LDST16_LO12: return PBX_FIXUP_LDST16_LO12_WIDTH;
	case PBX_FIXUP_LDST32_LO12: return PBX_FIXUP_LDST32_LO12_WIDTH;
	case PBX_FIXUP_LDST64_LO12: return PBX_FIXUP_LDST64_LO12_WIDTH;
	case PBX_FIXUP_LDST128_LO12: return PBX_FIXUP_LDST128_LO12_WIDTH;
	default: return 0;
	}
}

/* log2 of the access size of a load/store (unsigned offset) `w`: size bits, or 4 for a
 * 128-bit q register (V=1, size 00, opc 1x); -1 if `w` is no such instruction. */
static inline int sandbox_a64_ldst_scale(uint32_t w)
{
	if ((w & 0x3b000000u) != 0x39000000u)
		return -1;
	int size = (int)(w >> 30), simd = (w >> 26) & 1, opc = (w >> 22) & 3;
	return simd && size == 0 && (opc & 2) ? 4 : size;
}

/* NULL if the instruction word at `at` is of the class fix-up `type` writes into, else
 * what it should be (the fix-up is refused: BAD_FIXUP). */
static inline const char *sandbox_arch_fixup_insn_check(unsigned type, const uint8_t *at)
{
	uint32_t w;
	memcpy(&w, at, 4);
	switch (type) {
	case PBX_FIXUP_BRANCH26:
		return (w & 0x7c000000u) == 0x14000000u ? NULL : "a B or BL";
	case PBX_FIXUP_ADR_PAGE:
		return (w & 0x9f000000u) == 0x90000000u ? NULL : "an ADRP";
	case PBX_FIXUP_ADD_LO12:
		return (w & 0x7fc00000u) == 0x11000000u ? NULL : "an ADD (immediate, unshifted)";
	case PBX_FIXUP_LDST8_LO12: return sandbox_a64_ldst_scale(w) == 0 ? NULL : "a 1-byte LDR/STR (unsigned offset)";
	case PBX_FIXUP_LDST16_LO12: return sandbox_a64_ldst_scale(w) == 1 ? NULL : "a 2-byte LDR/STR (unsigned offset)";
	case PBX_FIXUP_LDST32_LO12: return sandbox_a64_ldst_scale(w) == 2 ? NULL : "a 4-byte LDR/STR (unsigned offset)";
	case PBX_FIXUP_LDST64_LO12: return sandbox_a64_ldst_scale(w) == 3 ? NULL : "an 8-byte LDR/STR (unsigned offset)";
	case PBX_FIXUP_LDST128_LO12: return sandbox_a64_ldst_scale(w) == 4 ? NULL : "a 16-byte LDR/STR (unsigned offset)";
	default: return "an instruction of this architecture";
	}
}

/* Writes the value of fix-up `type` for S + A = `sa` at place `p` into the word at `at`
 * (the local copy); NULL, or why it does not fit, with nothing written. */
static inline const char *sandbox_arch_fixup_write(unsigned type, uint8_t *at, uint64_t sa, uint64_t p)
{
	uint32_t w;
	memcpy(&w, at, 4);
	if (type == PBX_FIXUP_BRANCH26) {
		int64_t d = (int64_t)(sa - p);
		if (d % 4)
			return "not a multiple of 4";
		if (d < -(1ll << 27) || d >= (1ll << 27))
			return "beyond a B/BL's +-128 MiB";
		w = (w & 0xfc000000u) | ((uint32_t)(d >> 2) & 0x03ffffffu);
	} else if (type == PBX_FIXUP_ADR_PAGE) {
		int64_t d = (int64_t)(SANDBOX_A64_PAGE(sa) - SANDBOX_A64_PAGE(p));
		if (d < -(1ll << 32) || d >= (1ll << 32))
			return "beyond an ADRP's +-4 GiB";
		uint32_t imm = (uint32_t)(d >> 12) & 0x1fffffu;
		w = (w & ~((3u << 29) | (0x7ffffu << 5))) | ((imm & 3u) << 29) | ((imm >> 2) << 5);
	} else {
		uint32_t lo = (uint32_t)(sa & 0xfff);
		int scale = type == PBX_FIXUP_ADD_LO12 ? 0 : sandbox_a64_ldst_scale(w);
		if (scale < 0)
			return "not a load or store";
		if (lo & ((1u << scale) - 1))
			return "its low 12 bits are not a multiple of the access size";
		w = (w & ~(0xfffu << 10)) | ((lo >> scale) << 10);
	}
	memcpy(at, &w, 4);
	return NULL;
}

#endif
