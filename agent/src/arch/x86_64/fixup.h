/* x86-64 fix-ups: none beyond the data fix-ups every architecture shares (PC32, ABS64,
 * written by the engine); the interface is listed in arch/arch.h. A type of another
 * architecture (aarch64's instruction fields) is refused: BAD_FIXUP. */
#ifndef PATCHBOX_ARCH_X86_64_FIXUP_H
#define PATCHBOX_ARCH_X86_64_FIXUP_H

#include <stdint.h>

static inline unsigned sandbox_arch_fixup_width(unsigned type)
{
	(void)type;
	return 0;
}

static inline const char *sandbox_arch_fixup_insn_check(unsigned type, const uint8_t *at)
{
	(void)type;
	(void)at;
	return "an instruction of this architecture";
}

static inline const char *sandbox_arch_fixup_write(unsigned type, uint8_t *at, uint64_t sa, uint64_t p)
{
	(void)type;
	(void)at;
	(void)sa;
	(void)p;
	return "not a fix-up type of this architecture";
}

#endif
