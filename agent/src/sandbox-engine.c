/* Part of libsandbox.o: the engine. Applying and removing a patch, all or nothing:
 * the checks of each function and fix-up, placement, fix-ups, then the redirect;
 * plus facts about the executable, the self-test and the error values.
 *
 * Mechanism only: the server (sandbox-listen.c) parses requests into a
 * struct sandbox_apply_spec and calls in here from the single agent thread, so
 * the engine state needs no lock against other threads; the engine lock below is
 * for fork alone (sandbox-listen.c, "Locks and fork"). Errors are values
 * (struct sandbox_error). How bytes are written is sandbox-redirect.c's,
 * where patch memory lies and when it is reused sandbox-transition.c's.
 *
 * Entry jump (PBX_KIND_ENTRY_JUMP, functions without the padding): the
 * instruction-level rules (P starts an instruction of >= 5 bytes, no branch into
 * (P, P+5)) are checked by extract-patch with a disassembler; the agent checks what
 * it can: the expected bytes, the alignment, the landing pad (endbr64, bti c) when
 * skip is 4, the range in the object's text (the landing pad and the geometry are the
 * architecture's: arch/arch.h). Under PBX_FLAG_HOLD (a shorter first instruction, or the 5
 * bytes across two words) it writes only once every other thread is held clear of
 * them (sandbox_threads_held, docs/reach.md).
 *
 * Objects: a patch targets the executable or, by its build-id, a loaded library
 * (sandbox-objects.c); addresses and base EXE fix-ups are relative to that object's
 * load bias, and its code goes to that object's sandbox region.
 *
 * Stacking: a function already redirected is redirected at the top of its chain,
 * the replacement entry of the last patch on it (site = that entry), which has its
 * own patchable entry. Removal must go top-down (NOT_TOP).
 *
 * Unloaded libraries (sandbox_engine_refresh): a patch whose library was unloaded
 * (dlclose), or loaded anew in its place, is PBX_STATE_UNLOADED: its addresses may
 * belong to something else now, so nothing of it is ever written again. Its sandbox
 * memory is retired at once (a thread may still be inside the replacement, entered
 * before the dlclose); it is no chain's member (no stacking on it, no NOT_TOP from it),
 * LIST shows it, REMOVE drops the record only, an APPLY of the same name replaces the
 * record once it succeeds. Its library's slot and sandbox region are unmapped once no
 * record names them and the quiescence check has freed their memory.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "arch/arch.h"
#include "sandbox-engine.h"

static int sandbox_ready;
static uintptr_t sandbox_selftest_addr;	/* entry of the self-test's target */

static struct sandbox_patch *sandbox_patches[PBX_MAX_PATCHES];
static size_t sandbox_npatches;
static uint32_t sandbox_next_id = 1;

static size_t sandbox_objects_collect(void);

/* ------------------------------------------------------------------ the engine lock */

/* Held by the agent thread from before the first change an apply, remove or
 * self-test makes (placement, the first mprotect) until after the last (the patch
 * table updated, the pages r-x again), and taken by the fork prepare handler: a
 * fork waits for the change to end, so a child never holds a half-published
 * redirect or a writable text page. Not held while imports are resolved (dlsym
 * takes the loader's lock, which a thread forking from a library constructor
 * holds). Recursive: the self-test holds it across its own apply and remove.
 * The rules: sandbox-listen.c, "Locks and fork". */
static pthread_mutex_t sandbox_engine_mutex = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;

static void sandbox_engine_lock(void)
{
	pthread_mutex_lock(&sandbox_engine_mutex);
}

static void sandbox_engine_unlock(void)
{
	pthread_mutex_unlock(&sandbox_engine_mutex);
}

int sandbox_engine_fork(enum sandbox_fork_phase phase, const struct timespec *deadline)
{
	static const pthread_mutex_t init = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
	switch (phase) {
	case SANDBOX_FORK_PREPARE:
		return pthread_mutex_clocklock(&sandbox_engine_mutex, CLOCK_MONOTONIC, deadline) == 0 ? 0 : -1;
	case SANDBOX_FORK_PARENT:
		return pthread_mutex_unlock(&sandbox_engine_mutex) == 0 ? 0 : -1;
	case SANDBOX_FORK_CHILD:
		/* Held by the forking thread, whose id the child's thread no longer has:
		 * a plain store of the initializer (async-signal-safe). */
		memcpy(&sandbox_engine_mutex, &init, sizeof(init));
		return 0;
	}
	return -1;
}

/* ------------------------------------------------------------------ errors */

static const char *const sandbox_error_texts[] = PBX_ERROR_TEXTS;
_Static_assert(sizeof(sandbox_error_texts) / sizeof(sandbox_error_texts[0]) == PBX_E_COUNT_,
	       "PBX_ERROR_TEXTS and enum pbx_error disagree");

const char *sandbox_error_text(int code)
{
	if (code < 0 || code >= PBX_E_COUNT_)
		return "unknown error";
	return sandbox_error_texts[code];
}

int sandbox_error_set(struct sandbox_error *err, enum pbx_error code, const char *fmt, ...)
{
	if (!err)
		return -1;
	err->code = code;
	int n = snprintf(err->msg, sizeof(err->msg), fmt ? "%s: " : "%s", sandbox_error_text(code));
	if (fmt && n > 0 && (size_t)n < sizeof(err->msg)) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(err->msg + n, sizeof(err->msg) - n, fmt, ap);
		va_end(ap);
	}
	return -1;
}

/* ------------------------------------------------------------------ init */

int sandbox_engine_init(struct sandbox_error *err)
{
	if (sandbox_ready)
		return 0;
	if (sandbox_objects_init(err) != 0)
		return -1;

	sandbox_core_sync_init();
	if (sandbox_areas_init(&sandbox_selftest_addr, err) != 0)
		return -1;
	sandbox_ready = 1;
	const struct sandbox_region *r = &sandbox_regions[0];
	sandbox_debug("sandbox text 0x%lx+%zu data 0x%lx+%zu sync=%s bias=0x%lx", (unsigned long)r->text.base,
		      r->text.size, (unsigned long)r->data.base, r->data.size, sandbox_core_sync_name(),
		      (unsigned long)sandbox_exe_get()->bias);
	return 0;
}

/* ------------------------------------------------------------------ patches */

size_t sandbox_patch_count(void)
{
	return sandbox_npatches;
}

const struct sandbox_patch *sandbox_patch_get(size_t i)
{
	return i < sandbox_npatches ? sandbox_patches[i] : NULL;
}

void sandbox_stats_get(struct sandbox_stats *ret)
{
	const struct sandbox_area *t = &sandbox_regions[0].text, *d = &sandbox_regions[0].data;
	const struct sandbox_hold_stats *h = sandbox_hold_stats_get();
	*ret = (struct sandbox_stats){
		.text_addr = t->base, .text_size = t->size, .text_used = t->used, .text_retired = t->retired,
		.data_addr = d->base, .data_size = d->size, .data_used = d->used, .data_retired = d->retired,
		.patches = sandbox_npatches, .patches_unloaded = 0, .sync_core = sandbox_core_sync_name(),
		.hold_checked = h->full, .hold_mappings = h->mappings, .hold_skipped = h->skipped,
		.hold_bytes = h->bytes, .hold_skipped_bytes = h->skipped_bytes, .hold_ns = h->ns,
	};
	for (size_t i = 0; i < sandbox_npatches; i++)
		ret->patches_unloaded += sandbox_patches[i]->state == PBX_STATE_UNLOADED;
}

/* The record of that name (applied or unloaded: one per name), -1 if none. */
static ssize_t sandbox_patch_find(const char *name, size_t len)
{
	for (size_t i = 0; i < sandbox_npatches; i++)
		if (strlen(sandbox_patches[i]->name) == len && memcmp(sandbox_patches[i]->name, name, len) == 0)
			return (ssize_t)i;
	return -1;
}

/* Takes record i out of the table and frees it (its memory is the caller's affair). */
static void sandbox_patch_drop(size_t i)
{
	struct sandbox_patch *p = sandbox_patches[i];
	memmove(&sandbox_patches[i], &sandbox_patches[i + 1], (sandbox_npatches - i - 1) * sizeof(sandbox_patches[0]));
	sandbox_npatches--;
	free(p->funcs);
	free(p);
}

static int sandbox_name_valid(const char *name, size_t len)
{
	if (len < 1 || len > PBX_MAX_NAME)
		return 0;
	for (size_t i = 0; i < len; i++) {
		char c = name[i];
		if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
		      c == '.' || c == '_' || c == '+' || c == '-'))
			return 0;
	}
	return 1;
}

/* Copies a wire string for messages: printable ASCII kept, the rest as '?'. */
static void sandbox_str_copy(char *dst, size_t cap, const char *src, size_t len)
{
	size_t n = len < cap - 1 ? len : cap - 1;
	for (size_t i = 0; i < n; i++)
		dst[i] = (src[i] >= 0x20 && src[i] < 0x7f) ? src[i] : '?';
	dst[n] = '\0';
}

/* The function of the last (top) / first (bottom) applied patch redirecting target
 * (an unloaded patch redirects nothing any more). */
static const struct sandbox_func *sandbox_func_find(uintptr_t target, int top, const struct sandbox_patch **pret)
{
	for (size_t k = 0; k < sandbox_npatches; k++) {
		size_t i = top ? sandbox_npatches - 1 - k : k;
		const struct sandbox_patch *p = sandbox_patches[i];
		if (p->state == PBX_STATE_UNLOADED)
			continue;
		for (size_t f = 0; f < p->nfuncs; f++) {
			if (p->funcs[f].target == target) {
				if (pret)
					*pret = p;
				return &p->funcs[f];
			}
		}
	}
	return NULL;
}

static int sandbox_in_text(const struct sandbox_object *o, uintptr_t lo, uintptr_t hi, int page_end)
{
	for (size_t i = 0; i < o->nx; i++) {
		uintptr_t xhi = page_end ? sandbox_round_up(o->xhi[i], SANDBOX_PAGE) : o->xhi[i];
		if (lo >= o->xlo[i] && hi <= xhi && lo <= hi)
			return 1;
	}
	return 0;
}

static void sandbox_hex(char *dst, size_t cap, const uint8_t *b, size_t n)
{
	size_t o = 0;
	for (size_t i = 0; i < n && o + 3 < cap; i++)
		o += (size_t)snprintf(dst + o, cap - o, i ? " %02x" : "%02x", b[i]);
	if (cap)
		dst[o < cap ? o : cap - 1] = '\0';
}

/* Checks one function of the patch to object obj (everything that does not need the
 * placement). Fills f: symbol, target, site, saved, hold. */
static int sandbox_func_check(const struct sandbox_apply_spec *spec, unsigned flags, const struct sandbox_object *obj,
			      size_t idx, struct sandbox_func *funcs, struct sandbox_error *err)
{
	const struct sandbox_func_spec *fs = &spec->funcs[idx];
	struct sandbox_func *f = &funcs[idx];
	if (fs->symbol_len > PBX_MAX_SYMBOL)
		return sandbox_error_set(err, PBX_E_MALFORMED, "symbol of function %zu longer than %d bytes",
					 idx, PBX_MAX_SYMBOL);
	sandbox_str_copy(f->symbol, sizeof(f->symbol), fs->symbol, fs->symbol_len);
	const char *sym = f->symbol;
	uintptr_t abs = (flags & SANDBOX_APPLY_INTERNAL) ? (uintptr_t)fs->target : obj->bias + (uintptr_t)fs->target;
	f->target = abs;
	if (fs->expected_len < PBX_MIN_EXPECTED || fs->expected_len > PBX_MAX_EXPECTED)
		return sandbox_error_set(err, PBX_E_MALFORMED, "%s: expected_len %u not in %d..%d", sym,
					 fs->expected_len, PBX_MIN_EXPECTED, PBX_MAX_EXPECTED);
	if (fs->kind > PBX_KIND_ENTRY_JUMP || !sandbox_arch_skip_valid(fs->kind, fs->skip))
		return sandbox_error_set(err, PBX_E_MALFORMED, "%s: kind %u skip %u", sym, fs->kind, fs->skip);
	/* Kind 0: the patchable entry [abs-PAD, abs+skip+NOPS) (x86-64: the 6+2 NOPs
	 * [abs-6, abs+2); aarch64: 4 NOPs, `bti c` when skip is 4, the NOP at the site),
	 * expected bytes from abs-PAD.
	 * Kind 1: P = abs+skip, the word [word, word+WORD) holding [P, P+JUMP_LEN) is
	 * stored; [lo, hi) covers the entry, the skipped landing pad and that word;
	 * expected from P. */
	int jump = fs->kind == PBX_KIND_ENTRY_JUMP;
	uintptr_t point = abs + fs->skip, word = sandbox_round_down(point, SANDBOX_ARCH_WORD);
	/* [P, P+JUMP_LEN) across two words (x86-64 only: aarch64's one instruction is its word) */
	int split = jump && point - word > SANDBOX_ARCH_WORD - SANDBOX_ARCH_JUMP_LEN;
	uintptr_t lo = jump ? (word < abs ? word : abs) : abs - SANDBOX_ARCH_ENTRY_PAD;
	uintptr_t hi = jump ? word + (split ? 2 : 1) * SANDBOX_ARCH_WORD : point + SANDBOX_ARCH_ENTRY_NOPS;
	uintptr_t exp_at = jump ? point : abs - SANDBOX_ARCH_ENTRY_PAD;
	if (!jump && fs->expected_len < hi - lo)
		return sandbox_error_set(err, PBX_E_MALFORMED, "%s: %u expected bytes do not cover its %lu-byte entry",
					 sym, fs->expected_len, (unsigned long)(hi - lo));
	if (point % SANDBOX_ARCH_INSN_ALIGN)
		return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY, "%s: 0x%lx is not an instruction "
					 "boundary (%d-byte aligned)", sym, (unsigned long)point, SANDBOX_ARCH_INSN_ALIGN);
	if (!(flags & SANDBOX_APPLY_INTERNAL)) {
		if (abs < SANDBOX_ARCH_ENTRY_PAD ||
		    !sandbox_in_text(obj, lo, jump ? point + SANDBOX_ARCH_JUMP_LEN : hi, 0) ||
		    !sandbox_in_text(obj, lo, hi, 1))
			return sandbox_error_set(err, PBX_E_TARGET_OUT_OF_TEXT,
						 "%s at 0x%lx (link-time 0x%llx, bias 0x%lx of %s)", sym,
						 (unsigned long)abs, (unsigned long long)fs->target,
						 (unsigned long)obj->bias, obj->path);
		/* The sandbox lies in the program's text (libsandbox.o): patch code is only
		 * ever changed through stacking, never as a target of its own. */
		const struct sandbox_area *t = &sandbox_regions[0].text;
		if (hi > t->base && lo < t->base + t->size)
			return sandbox_error_set(err, PBX_E_TARGET_OUT_OF_TEXT, "%s at 0x%lx is inside the sandbox",
						 sym, (unsigned long)abs);
		/* The expected bytes are read from memory: they must be mapped. */
		if (!sandbox_in_text(obj, exp_at, exp_at + fs->expected_len, 1))
			return sandbox_error_set(err, PBX_E_TARGET_OUT_OF_TEXT,
						 "%s: %u expected bytes run past the end of the text", sym,
						 fs->expected_len);
	}
	for (size_t j = 0; j < idx; j++) {
		uintptr_t o = funcs[j].target;
		if ((abs > o ? abs - o : o - abs) < SANDBOX_ENTRY_BYTES)
			return sandbox_error_set(err, PBX_E_OVERLAP, "%s (0x%lx) and %s (0x%lx)", funcs[j].symbol,
						 (unsigned long)o, sym, (unsigned long)abs);
	}
	/* Any offset: a replacement without its own 6+2 NOPs (new_offset < 6 or no NOPs)
	 * is valid; a later patch of the function cannot be stacked on it (see below). */
	if (fs->new_offset >= spec->text_len || fs->new_size > spec->text_len - fs->new_offset)
		return sandbox_error_set(err, PBX_E_MALFORMED,
					 "%s: replacement at offset %u size %u outside text of %u bytes",
					 sym, fs->new_offset, fs->new_size, spec->text_len);

	/* Logical original: the current memory, with the bytes the first patch on this
	 * function changed ([wlo, whi)) replaced by the ones it saved. */
	uint8_t orig[PBX_MAX_EXPECTED];
	const struct sandbox_patch *top_patch = NULL;
	const struct sandbox_func *bottom = sandbox_func_find(abs, 0, NULL);
	const struct sandbox_func *top = sandbox_func_find(abs, 1, &top_patch);
	memcpy(orig, (const void *)exp_at, fs->expected_len);
	for (uintptr_t a = bottom ? bottom->wlo : 0; bottom && a < bottom->whi; a++)
		if (a >= exp_at && a - exp_at < fs->expected_len)
			orig[a - exp_at] = bottom->saved[a - bottom->saved_at];
	if (!jump)
		sandbox_arch_entry_normalize(orig, fs->expected_len);
	for (size_t i = 0; i < fs->expected_len; i++) {
		if (orig[i] != fs->expected[i]) {
			long off = (long)(exp_at - abs) + (long)i;
			return sandbox_error_set(err, PBX_E_EXPECTED_MISMATCH, "%s%c0x%lx expected %02x found %02x",
						 sym, off < 0 ? '-' : '+', off < 0 ? -off : off,
						 fs->expected[i], orig[i]);
		}
	}
	char hex[128];
	if (fs->skip && memcmp((const void *)abs, sandbox_arch_landing, SANDBOX_ARCH_LANDING_LEN) != 0) {
		sandbox_hex(hex, sizeof(hex), (const uint8_t *)abs, SANDBOX_ARCH_LANDING_LEN);
		return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY,
					 "%s at 0x%lx: skip %u but the entry holds %s, not " SANDBOX_ARCH_LANDING_NAME,
					 sym, (unsigned long)abs, fs->skip, hex);
	}
	int hold = (spec->flags & PBX_FLAG_HOLD) != 0;
	const char *unsafe = jump && !top ? sandbox_arch_jump_unsafe(orig) : NULL;
	if (unsafe) {
		sandbox_hex(hex, sizeof(hex), orig, SANDBOX_ARCH_JUMP_LEN);
		return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY, "%s: entry jump at 0x%lx over %s refused: %s",
					 sym, (unsigned long)point, hex, unsafe);
	}
	if (jump && !top && split && (!hold || point - word == 7))
		return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY,
					 "%s: entry jump at 0x%lx refused (rule 4, alignment): byte %lu of its "
					 "%d-byte word, so %s", sym, (unsigned long)point, (unsigned long)(point - word),
					 SANDBOX_ARCH_WORD,
					 hold ? "its first two bytes, where remove parks threads, are not in one word"
					      : "the 5-byte jump cannot be written with one atomic store (without HOLD)");
	if (!jump && !sandbox_arch_entry_check(orig, fs->skip)) {
		sandbox_hex(hex, sizeof(hex), orig, hi - lo);
		return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY,
					 "%s at 0x%lx: entry-%d holds %s, not " SANDBOX_ARCH_ENTRY_DESC " (build with "
					 SANDBOX_ARCH_ENTRY_FLAGS ")", sym, (unsigned long)abs, SANDBOX_ARCH_ENTRY_PAD, hex);
	}
	/* Stacked: always the patchable-entry mechanism, at the replacement entry of the top
	 * patch (after its landing pad, if it has one). */
	uintptr_t entry = top ? top->new_entry : abs;
	unsigned skip = top ? sandbox_arch_entry_skip(top->new_entry) : fs->skip;
	f->mech = top ? PBX_KIND_PATCHABLE_ENTRY : fs->kind;
	f->site = top ? entry + skip : point;
	if (f->mech == PBX_KIND_ENTRY_JUMP) {
		f->saved_at = word;
		f->wlo = point;
		f->whi = point + SANDBOX_ARCH_JUMP_LEN;
		f->hold = (uint8_t)hold;
		f->saved_len = (uint8_t)((split ? 2 : 1) * SANDBOX_ARCH_WORD);
	} else {
		f->saved_at = entry - SANDBOX_ARCH_ENTRY_PAD;
		f->wlo = entry - SANDBOX_ARCH_ENTRY_PAD;
		f->whi = f->site + SANDBOX_ARCH_ENTRY_NOPS;
		f->saved_len = (uint8_t)(f->whi - f->wlo);
	}
	_Static_assert(SANDBOX_ENTRY_BYTES + SANDBOX_ARCH_LANDING_LEN <= sizeof(f->saved) &&
		       2 * SANDBOX_ARCH_WORD <= sizeof(f->saved), "sandbox_func.saved too small");
	if (f->mech == PBX_KIND_PATCHABLE_ENTRY && (f->site % SANDBOX_ARCH_SITE_ALIGN))
		return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY, "%s: entry 0x%lx is not %d-byte aligned",
					 sym, (unsigned long)f->site, SANDBOX_ARCH_SITE_ALIGN);
	memcpy(f->saved, (const void *)f->saved_at, f->saved_len);
	/* The replacement's own padding must lie inside its patch's text. */
	if (top && (top->new_entry - top_patch->text_addr < SANDBOX_ARCH_ENTRY_PAD ||
		    !sandbox_arch_entry_check(f->saved, skip))) {
		sandbox_hex(hex, sizeof(hex), f->saved, f->saved_len);
		if (bottom->mech == PBX_KIND_ENTRY_JUMP)
			return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY,
						 "cannot stack on %s (rule 6): %s is redirected by an entry jump "
						 "and the replacement at 0x%lx has no patchable entry of its own "
						 "(%s): remove %s first, or build its replacement with "
						 "`patchbox config --cflags`", top_patch->name, sym,
						 (unsigned long)top->new_entry, hex, top_patch->name);
		return sandbox_error_set(err, PBX_E_NO_PATCHABLE_ENTRY,
					 "cannot stack on %s: its replacement of %s at 0x%lx has %s, not "
					 SANDBOX_ARCH_ENTRY_DESC,
					 top_patch->name, sym, (unsigned long)top->new_entry, hex);
	}
	for (size_t j = 0; j < idx; j++)
		if (funcs[j].wlo < f->whi && f->wlo < funcs[j].whi)
			return sandbox_error_set(err, PBX_E_OVERLAP, "%s (0x%lx) and %s (0x%lx) change the same bytes",
						 funcs[j].symbol, (unsigned long)funcs[j].site, sym,
						 (unsigned long)f->site);
	/* Nor bytes an applied patch changed: its remove would restore them under our
	 * jump, ours would bring back its jump into freed sandbox. (Stacking on the same
	 * function is not an overlap: the site moved to the top replacement's entry. An
	 * unloaded patch writes nothing again: its bytes are whatever is there now.) */
	for (size_t p = 0; p < sandbox_npatches; p++)
		for (size_t k = 0; sandbox_patches[p]->state == PBX_STATE_APPLIED && k < sandbox_patches[p]->nfuncs; k++) {
			const struct sandbox_func *g = &sandbox_patches[p]->funcs[k];
			if (g->wlo < f->whi && f->wlo < g->whi)
				return sandbox_error_set(err, PBX_E_OVERLAP,
							 "%s (0x%lx) changes bytes that patch %s changed for %s (0x%lx)",
							 sym, (unsigned long)f->site, sandbox_patches[p]->name,
							 g->symbol, (unsigned long)g->site);
		}
	f->new_size = fs->new_size;
	return 0;
}

/* The fix-up types every architecture has: data words (an int32, a uint64). */
static int sandbox_fixup_is_data(unsigned type)
{
	return type == PBX_FIXUP_PC32 || type == PBX_FIXUP_ABS64;
}

/* Bytes fix-up `type` writes; 0 for a type that is not this architecture's (refused). */
static uint32_t sandbox_fixup_width(unsigned type)
{
	if (type == PBX_FIXUP_PC32)
		return PBX_FIXUP_PC32_WIDTH;
	if (type == PBX_FIXUP_ABS64)
		return PBX_FIXUP_ABS64_WIDTH;
	return sandbox_arch_fixup_width(type);
}

static int sandbox_fixups_check(const struct sandbox_apply_spec *spec, uint64_t data_block,
				uint64_t *import, struct sandbox_error *err)
{
	for (uint32_t i = 0; i < spec->nfixups; i++) {
		const struct sandbox_fixup_spec *x = &spec->fixups[i];
		uint32_t size = sandbox_fixup_width(x->type);
		if ((x->section != PBX_SECT_TEXT && x->section != PBX_SECT_DATA) || size == 0 ||
		    x->base < PBX_BASE_TEXT || x->base > PBX_BASE_ABS || x->reserved != 0)
			return sandbox_error_set(err, PBX_E_BAD_FIXUP,
						 "fix-up %u: section %u type %u%s base %u reserved %u", i,
						 x->section, x->type,
						 size ? "" : " (not a fix-up type of " SANDBOX_ARCH_NAME ")",
						 x->base, x->reserved);
		uint32_t seclen = x->section == PBX_SECT_TEXT ? spec->text_len : spec->data_len;
		if (x->offset > seclen || seclen - x->offset < size)
			return sandbox_error_set(err, PBX_E_FIXUP_RANGE, "fix-up %u: %u bytes at %s+0x%x, %s has %u bytes",
						 i, size, x->section ? "data" : "text", x->offset,
						 x->section ? "data" : "text", seclen);
		if (!sandbox_fixup_is_data(x->type)) {
			/* An instruction field: one word of the text, of the class its type writes. */
			const char *want = x->section != PBX_SECT_TEXT || x->offset % SANDBOX_ARCH_INSN_ALIGN
						   ? "an instruction word of the text"
						   : sandbox_arch_fixup_insn_check(x->type, spec->text + x->offset);
			if (want)
				return sandbox_error_set(err, PBX_E_BAD_FIXUP, "fix-up %u: type %u at %s+0x%x is not on %s",
							 i, x->type, x->section ? "data" : "text", x->offset, want);
		}
		if (x->base == PBX_BASE_DATA && data_block == 0)
			return sandbox_error_set(err, PBX_E_BAD_FIXUP, "fix-up %u: base DATA but the patch has no data", i);
		if (x->base == PBX_BASE_IMPORT) {
			char sym[PBX_MAX_SYMBOL + 1];
			if (x->symbol_len < 1 || x->symbol_len > PBX_MAX_SYMBOL)
				return sandbox_error_set(err, PBX_E_BAD_FIXUP, "fix-up %u: import symbol length %u", i,
							 x->symbol_len);
			memcpy(sym, x->symbol, x->symbol_len);
			sym[x->symbol_len] = '\0';
			dlerror();
			void *s = memchr(sym, '\0', x->symbol_len) ? NULL : dlsym(RTLD_DEFAULT, sym);
			if (!s) {
				sandbox_str_copy(sym, sizeof(sym), x->symbol, x->symbol_len);
				return sandbox_error_set(err, PBX_E_SYMBOL_NOT_FOUND, "%s", sym);
			}
			import[i] = (uintptr_t)s;
		}
	}
	return 0;
}

/* Writes the fix-ups into the local copies; P is the final address. */
int sandbox_fixups_apply(const struct sandbox_apply_spec *spec, const uint64_t *import, uintptr_t bias,
			 uint8_t *text, uintptr_t text_addr, uint8_t *data, uintptr_t data_addr,
			 struct sandbox_error *err)
{
	for (uint32_t i = 0; i < spec->nfixups; i++) {
		const struct sandbox_fixup_spec *x = &spec->fixups[i];
		uint64_t s = 0;
		switch (x->base) {
		case PBX_BASE_TEXT: s = text_addr; break;
		case PBX_BASE_DATA: s = data_addr; break;
		case PBX_BASE_EXE: s = bias; break;
		case PBX_BASE_IMPORT: s = import[i]; break;
		default: s = 0; break;
		}
		uint8_t *buf = x->section == PBX_SECT_TEXT ? text : data;
		uint64_t p = (x->section == PBX_SECT_TEXT ? text_addr : data_addr) + x->offset;
		if (x->type == PBX_FIXUP_PC32) {
			__int128 v = (__int128)s + x->addend - (__int128)p;
			if (v < INT32_MIN || v > INT32_MAX)
				return sandbox_error_set(err, PBX_E_FIXUP_OVERFLOW,
							 "fix-up %u at %s+0x%x: S 0x%llx + A %lld - P 0x%llx = %lld",
							 i, x->section ? "data" : "text", x->offset,
							 (unsigned long long)s, (long long)x->addend,
							 (unsigned long long)p, (long long)v);
			int32_t v32 = (int32_t)v;
			_Static_assert(sizeof(v32) == PBX_FIXUP_PC32_WIDTH, "PC32 writes an int32");
			memcpy(buf + x->offset, &v32, sizeof(v32));
		} else if (x->type == PBX_FIXUP_ABS64) {
			uint64_t v = s + (uint64_t)x->addend;
			_Static_assert(sizeof(v) == PBX_FIXUP_ABS64_WIDTH, "ABS64 writes a uint64");
			memcpy(buf + x->offset, &v, sizeof(v));
		} else {
			/* An instruction field of this architecture (checked: a word of the text). */
			uint64_t sa = s + (uint64_t)x->addend;
			const char *why = sandbox_arch_fixup_write(x->type, buf + x->offset, sa, p);
			if (why)
				return sandbox_error_set(err, PBX_E_FIXUP_OVERFLOW,
							 "fix-up %u (type %u) at text+0x%x: S + A 0x%llx at P 0x%llx: %s",
							 i, x->type, x->offset, (unsigned long long)sa,
							 (unsigned long long)p, why);
		}
	}
	return 0;
}

/* ------------------------------------------------------------------ hooks */

/* The hooks of one kind of a patch, run in order on the agent thread (engine lock
 * held: a fork waits). A pre hook's non-zero result stops the operation (HOOK_FAILED,
 * naming the hook); a post hook's is only logged (err NULL). docs/shadow.md. */
struct sandbox_hook_run {
	const struct sandbox_hook *hooks;
	size_t n;
	uint8_t when;
	const char *patch;
	int ran;		/* a hook of this kind was called */
};

static int sandbox_hooks_gate(void *arg, struct sandbox_error *err)
{
	struct sandbox_hook_run *run = arg;
	static const char *const names[] = { "?", "pre-apply", "post-apply", "pre-remove", "post-remove" };
	for (size_t i = 0; i < run->n; i++) {
		if (run->hooks[i].when != run->when)
			continue;
		int (*fn)(void) = (int (*)(void))run->hooks[i].addr;
		run->ran = 1;
		int r = fn();
		sandbox_debug("%s: %s hook at 0x%lx returned %d", run->patch, names[run->when],
			      (unsigned long)run->hooks[i].addr, r);
		if (r != 0 && err)
			return sandbox_error_set(err, PBX_E_HOOK_FAILED, "%s hook of %s (text 0x%lx) returned %d",
						 names[run->when], run->patch, (unsigned long)run->hooks[i].addr, r);
	}
	return 0;
}

int sandbox_patch_apply(const struct sandbox_apply_spec *spec, unsigned flags,
			const struct sandbox_patch **ret, struct sandbox_error *err)
{
	struct sandbox_func *funcs = NULL;
	struct sandbox_patch *patch = NULL;
	uint64_t *import = NULL;
	uint8_t *tbuf = NULL, *dbuf = NULL;
	uintptr_t text_addr = 0, data_addr = 0;
	uint32_t id = sandbox_next_id;
	int rc = -1, allocated = 0, revived = 0, locked = 0, hooks_ran = 0;
	uint32_t revived_from = 0;
	char name[PBX_MAX_NAME + 1];

	if (!sandbox_ready)
		return sandbox_error_set(err, PBX_E_INTERNAL, "sandbox not initialised");
	if (!sandbox_name_valid(spec->name, spec->name_len)) {
		sandbox_str_copy(name, sizeof(name), spec->name, spec->name_len);
		return sandbox_error_set(err, PBX_E_BAD_NAME, "'%s' (%u bytes): use 1..%d of [A-Za-z0-9._+-]",
					 name, spec->name_len, PBX_MAX_NAME);
	}
	memcpy(name, spec->name, spec->name_len);
	name[spec->name_len] = '\0';
	/* A record of this name left by an unloaded library is replaced once this succeeds. */
	ssize_t stale = sandbox_patch_find(spec->name, spec->name_len);
	if (stale >= 0 && sandbox_patches[stale]->state != PBX_STATE_UNLOADED)
		return sandbox_error_set(err, PBX_E_ALREADY_APPLIED, "%s", name);
	if (sandbox_npatches >= PBX_MAX_PATCHES)
		return sandbox_error_set(err, PBX_E_TOO_MANY, "%zu patches applied", sandbox_npatches);
	if (spec->nfuncs < 1 || spec->nfuncs > PBX_MAX_FUNCS)
		return sandbox_error_set(err, PBX_E_MALFORMED, "nfuncs %u", spec->nfuncs);
	if (spec->flags & ~(uint32_t)(PBX_FLAG_RETAIN | PBX_FLAG_HOLD))
		return sandbox_error_set(err, PBX_E_MALFORMED, "flags 0x%x (unknown bits)", spec->flags);
	if (spec->nhooks > PBX_MAX_HOOKS)
		return sandbox_error_set(err, PBX_E_MALFORMED, "%u hooks (max %d)", spec->nhooks, PBX_MAX_HOOKS);
	for (size_t i = 0; i < spec->nhooks; i++)
		if (spec->hooks[i].when < PBX_HOOK_PRE_APPLY || spec->hooks[i].when > PBX_HOOK_POST_REMOVE ||
		    spec->hooks[i].offset >= spec->text_len)
			return sandbox_error_set(err, PBX_E_MALFORMED, "hook %zu: kind %u at text+0x%x of %u bytes",
						 i, spec->hooks[i].when, spec->hooks[i].offset, spec->text_len);
	/* The executable, or the loaded library of the patch's build-id. */
	struct sandbox_object *obj = sandbox_exe_get();
	if (!(flags & SANDBOX_APPLY_INTERNAL) && sandbox_object_find(spec->build_id, spec->build_id_len, &obj, err) != 0) {
		/* The table is full: give back what unloaded libraries no longer need (it
		 * refills and unmaps sandbox memory: under the engine lock), retry. */
		if (err->code != PBX_E_TOO_MANY)
			return -1;
		sandbox_engine_lock();
		size_t freed = sandbox_objects_collect();
		sandbox_engine_unlock();
		if (!freed || sandbox_object_find(spec->build_id, spec->build_id_len, &obj, err) != 0)
			return -1;
	}
	struct sandbox_region *region = &sandbox_regions[obj->region];

	funcs = calloc(spec->nfuncs, sizeof(*funcs));
	patch = calloc(1, sizeof(*patch));
	import = calloc(spec->nfixups ? spec->nfixups : 1, sizeof(*import));
	if (!funcs || !patch || !import) {
		sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
		goto out;
	}
	for (size_t i = 0; i < spec->nfuncs; i++)
		if (sandbox_func_check(spec, flags, obj, i, funcs, err) != 0)
			goto out;
	uint64_t data_block = (uint64_t)spec->data_len + spec->bss_size;
	if (sandbox_fixups_check(spec, data_block, import, err) != 0)
		goto out;
	uintptr_t bias = (flags & SANDBOX_APPLY_INTERNAL) ? 0 : obj->bias;

	/* From here to out: the engine lock (a fork waits; see the lock above). */
	sandbox_engine_lock();
	locked = 1;

	/* Placement. */
	struct sandbox_area *tarea = &region->text, *darea = &region->data;
	if (data_block > darea->size) {
		sandbox_error_set(err, PBX_E_SANDBOX_FULL, "need %llu bytes of data, %zu free",
				  (unsigned long long)data_block, darea->size - darea->used - darea->retired);
		goto out;
	}
	tbuf = malloc(spec->text_len);
	dbuf = malloc(data_block ? data_block : 1);
	if (!tbuf || !dbuf) {
		sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
		goto out;
	}
	if (data_block == 0 && sandbox_text_revive(tarea, spec, import, bias, id, tbuf, &revived_from, &text_addr)) {
		revived = 1;
	} else if (sandbox_area_alloc_reclaim(tarea, spec->text_len, id, &text_addr) != 0) {
		sandbox_error_set(err, PBX_E_SANDBOX_FULL, "need %u bytes of text, %zu free (%zu retired)",
				  spec->text_len, tarea->size - tarea->used - tarea->retired, tarea->retired);
		goto out;
	}
	allocated = 1;
	if (data_block && sandbox_area_alloc_reclaim(darea, data_block, id, &data_addr) != 0) {
		sandbox_error_set(err, PBX_E_SANDBOX_FULL, "need %llu bytes of data, %zu free (%zu retired)",
				  (unsigned long long)data_block, darea->size - darea->used - darea->retired,
				  darea->retired);
		goto out;
	}

	/* Fixed-up copies, built away from the live memory. */
	memcpy(tbuf, spec->text, spec->text_len);
	if (spec->data_len)
		memcpy(dbuf, spec->data, spec->data_len);
	memset(dbuf + spec->data_len, 0, data_block - spec->data_len);
	if (sandbox_fixups_apply(spec, import, bias, tbuf, text_addr, dbuf, data_addr, err) != 0)
		goto out;
	for (size_t i = 0; i < spec->nfuncs; i++) {
		struct sandbox_func *f = &funcs[i];
		f->new_entry = text_addr + spec->funcs[i].new_offset;
		if (sandbox_arch_redirect_reach(f->mech, f->site, f->saved_at, f->new_entry,
						sandbox_core_sync_full()) != 0) {
			sandbox_error_set(err, PBX_E_FIXUP_OVERFLOW,
					  "redirect of %s from 0x%lx to 0x%lx: %lld bytes, out of reach (sync=%s)",
					  f->symbol, (unsigned long)f->site, (unsigned long)f->new_entry,
					  (long long)f->new_entry - (long long)f->site, sandbox_core_sync_name());
			goto out;
		}
	}
	uint64_t hold_ns = 0;	/* held entry jumps: how long the threads took to be held */
	/* The copies into the sandbox (a revived text is not written: its pages stay
	 * r-x), then the redirect: the last point of failure is before the first byte
	 * changes, after it nothing fails. */
	struct sandbox_copy text_copy = { text_addr, tbuf, revived ? 0 : spec->text_len };
	struct sandbox_copy data_copy = { data_addr, dbuf, data_block };
	struct sandbox_hook hooks[PBX_MAX_HOOKS];
	for (size_t i = 0; i < spec->nhooks; i++)
		hooks[i] = (struct sandbox_hook){ spec->hooks[i].when, text_addr + spec->hooks[i].offset };
	struct sandbox_hook_run pre = { hooks, spec->nhooks, PBX_HOOK_PRE_APPLY, name, 0 };
	for (size_t i = 0; i < spec->nfuncs; i++)
		if (funcs[i].hold)
			sandbox_hold_prepare();	/* allocates: before the hold */
	if (sandbox_redirect_write(&text_copy, &data_copy, funcs, spec->nfuncs,
				   spec->nhooks ? sandbox_hooks_gate : NULL, &pre, spec->hold_conn, &hold_ns,
				   err) != 0) {
		hooks_ran = pre.ran;
		goto out;
	}
	struct sandbox_hook_run post = { hooks, spec->nhooks, PBX_HOOK_POST_APPLY, name, 0 };
	sandbox_hooks_gate(&post, NULL);

	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	memcpy(patch->name, name, sizeof(name));
	patch->id = id;
	patch->applied_at = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
	patch->text_addr = text_addr;
	patch->text_size = spec->text_len;
	patch->data_addr = data_addr;
	patch->data_size = (uint32_t)data_block;
	patch->nfuncs = spec->nfuncs;
	patch->flags = spec->flags;
	patch->state = PBX_STATE_APPLIED;
	patch->object = obj;
	patch->hold_ns = hold_ns;
	patch->funcs = funcs;
	patch->nhooks = spec->nhooks;
	memcpy(patch->hooks, hooks, spec->nhooks * sizeof(hooks[0]));
	sandbox_patches[sandbox_npatches++] = patch;
	sandbox_next_id++;
	if (stale >= 0) {
		sandbox_debug("%s replaces the record of its unloaded predecessor", name);
		sandbox_patch_drop((size_t)stale);
	}
	funcs = NULL;
	if (ret)
		*ret = patch;
	sandbox_debug("applied %s id %u: text 0x%lx+%u data 0x%lx+%u, %u functions", patch->name, id,
		      (unsigned long)text_addr, patch->text_size, (unsigned long)data_addr, patch->data_size,
		      patch->nfuncs);
	patch = NULL;
	rc = 0;
out:
	/* Never executed (no redirect was published): free, no quiescence needed; a
	 * revived extent goes back to retired (old threads may still run it). */
	if (rc != 0 && allocated) {
		/* A pre-apply hook ran the new text on this thread only: refilled at once. */
		if (!hooks_ran || revived || sandbox_owner_free(id) != 0)
			sandbox_owner_unplace(id, revived ? text_addr : 0, revived_from);
	}
	if (locked)
		sandbox_engine_unlock();
	free(tbuf);
	free(dbuf);
	free(import);
	free(funcs);
	free(patch);
	return rc;
}

/* free_now: only for memory no other thread can have run (the self-test). */
static int sandbox_patch_remove_locked(const char *name, size_t name_len, int free_now, uint8_t *state_ret,
				       struct sandbox_error *err)
{
	char shown[PBX_MAX_NAME + 1];
	ssize_t idx = sandbox_patch_find(name, name_len);
	if (idx < 0) {
		sandbox_str_copy(shown, sizeof(shown), name, name_len);
		return sandbox_error_set(err, PBX_E_NOT_APPLIED, "%s", shown);
	}
	struct sandbox_patch *p = sandbox_patches[idx];
	*state_ret = p->state;
	if (p->state == PBX_STATE_UNLOADED) {
		/* Its library is gone: its addresses may be another object's now. No hook runs
		 * (they may use the library), nothing is written; the memory was retired when
		 * the unload was noticed. */
		sandbox_debug("removed %s id %u: its library was unloaded, record only", p->name, p->id);
		sandbox_patch_drop((size_t)idx);
		sandbox_objects_collect();
		return 0;
	}
	for (size_t f = 0; f < p->nfuncs; f++) {
		const struct sandbox_patch *above = NULL;
		sandbox_func_find(p->funcs[f].target, 1, &above);
		if (above && above != p)
			return sandbox_error_set(err, PBX_E_NOT_TOP, "%s is stacked on %s (function %s)",
						 above->name, p->name, p->funcs[f].symbol);
	}
	struct sandbox_hook_run pre = { p->hooks, p->nhooks, PBX_HOOK_PRE_REMOVE, p->name, 0 };
	if (p->nhooks && sandbox_hooks_gate(&pre, err) != 0)
		return -1;	/* the hook refused: the patch stays applied */
	/* The entries back to their saved bytes (steps 1-4); nothing changed if it fails. */
	if (sandbox_redirect_restore(p->funcs, p->nfuncs, err) != 0)
		return -1;
	struct sandbox_hook_run post = { p->hooks, p->nhooks, PBX_HOOK_POST_REMOVE, p->name, 0 };
	sandbox_hooks_gate(&post, NULL);

	/* A thread may still run the removed code: retired, not freed (transition). */
	if (!free_now || sandbox_owner_free(p->id) != 0)
		sandbox_owner_retire(p->id, (p->flags & PBX_FLAG_RETAIN) != 0);
	sandbox_debug("removed %s id %u", p->name, p->id);
	sandbox_patch_drop((size_t)idx);
	return 0;
}

static int sandbox_patch_remove_mode(const char *name, size_t name_len, int free_now, uint8_t *state_ret,
				     struct sandbox_error *err)
{
	sandbox_engine_lock();
	int rc = sandbox_patch_remove_locked(name, name_len, free_now, state_ret, err);
	sandbox_engine_unlock();
	return rc;
}

int sandbox_patch_remove(const char *name, size_t name_len, uint8_t *state_ret, struct sandbox_error *err)
{
	return sandbox_patch_remove_mode(name, name_len, 0, state_ret, err);
}

/* ------------------------------------------------------------------ unloaded libraries */

/* Whether p's library was loaded anew where it was: every byte p changed in it (not
 * the ones of functions stacked in the sandbox) is back to the original, as a fresh load
 * maps it. Bytes that are neither the original nor p's (a debugger's breakpoint) are not
 * a new load. Read with process_vm_readv: a page that is gone is an answer, not a fault. */
static int sandbox_patch_reloaded(const struct sandbox_patch *p)
{
	const struct sandbox_object *o = p->object;
	int seen = 0;
	for (size_t i = 0; i < p->nfuncs; i++) {
		const struct sandbox_func *f = &p->funcs[i];
		if (!sandbox_in_text(o, f->saved_at, f->saved_at + f->saved_len, 1))
			continue;	/* stacked: its site is in the sandbox, ours */
		uint8_t now[sizeof(f->saved)];
		struct iovec local = { now, f->saved_len }, remote = { (void *)f->saved_at, f->saved_len };
		if (process_vm_readv(getpid(), &local, 1, &remote, 1, 0) != (ssize_t)f->saved_len)
			return 0;
		size_t lo = f->wlo - f->saved_at, n = f->whi - f->wlo;
		if (memcmp(now + lo, f->saved + lo, n) != 0)
			return 0;
		seen = 1;
	}
	return seen;
}

/* Gives back the slot and sandbox region of every gone library that no record names
 * any more, once the quiescence check has freed its retired memory. The number freed. */
static size_t sandbox_objects_collect(void)
{
	int collect[PBX_MAX_OBJECTS] = { 0 }, any = 0;
	struct sandbox_object *o;
	/* A gone object still named by an unloaded patch's record keeps its slot (LIST
	 * shows its path). */
	for (size_t i = 1; i < PBX_MAX_OBJECTS && (o = sandbox_object_at(i)) != NULL; i++) {
		int named = 0;
		for (size_t k = 0; k < sandbox_npatches && !named; k++)
			named = sandbox_patches[k]->object == o;
		collect[i] = o->state == SANDBOX_OBJECT_GONE && !named;
		any |= collect[i];
	}
	if (!any)
		return 0;
	/* Their retired memory goes through the quiescence check, as any removed patch's. */
	sandbox_retired_collect();
	size_t freed = 0;
	for (size_t i = 1; i < PBX_MAX_OBJECTS && (o = sandbox_object_at(i)) != NULL; i++) {
		if (!collect[i] || sandbox_region_unmap(o->region) != 0)
			continue;
		o->state = SANDBOX_OBJECT_FREE;
		sandbox_debug("object %zu: %s unloaded, its sandbox unmapped", i, o->path);
		freed++;
	}
	return freed;
}

void sandbox_engine_refresh(void)
{
	if (!sandbox_ready || !sandbox_objects_unloaded())
		return;
	sandbox_engine_lock();
	sandbox_objects_check();
	/* Loaded where it was, but with its original bytes: loaded anew in the same place. */
	for (size_t i = 0; i < sandbox_npatches; i++) {
		struct sandbox_patch *p = sandbox_patches[i];
		struct sandbox_object *o = (struct sandbox_object *)p->object;
		if (p->state == PBX_STATE_APPLIED && o != sandbox_exe_get() && o->state == SANDBOX_OBJECT_LOADED &&
		    sandbox_patch_reloaded(p)) {
			o->state = SANDBOX_OBJECT_GONE;
			sandbox_debug("%s: %s was loaded anew in its place", p->name, o->path);
		}
	}
	for (size_t i = 0; i < sandbox_npatches; i++) {
		struct sandbox_patch *p = sandbox_patches[i];
		if (p->state != PBX_STATE_APPLIED || p->object->state != SANDBOX_OBJECT_GONE)
			continue;
		/* Never written again. A thread may still run its code (entered before the
		 * dlclose): retired, as after a remove. */
		p->state = PBX_STATE_UNLOADED;
		sandbox_owner_retire(p->id, (p->flags & PBX_FLAG_RETAIN) != 0);
		sandbox_debug("%s id %u: its library %s was unloaded", p->name, p->id, p->object->path);
	}
	/* Gone objects without patches (all removed before the dlclose) go now. */
	sandbox_objects_collect();
	sandbox_engine_unlock();
}

/* ------------------------------------------------------------------ self-test */

#define SANDBOX_SELFTEST_MAGIC 0x2a5eed11

/* Applies a real patch to the agent's own function through sandbox_patch_apply and
 * sandbox_patch_remove, the APPLY/REMOVE path, and checks every effect. */
static int sandbox_selftest_run_locked(char *detail, size_t detail_len)
{
	int (*volatile fn)(int) = (int (*)(int))sandbox_selftest_addr;
	uint8_t before[SANDBOX_ENTRY_BYTES + SANDBOX_ARCH_LANDING_LEN], after[sizeof(before)];
	struct sandbox_error err = { 0 };
	const struct sandbox_patch *p = NULL;
	const char *name = "patchbox-selftest";
	int r;

	if (!sandbox_ready || !sandbox_selftest_addr) {
		snprintf(detail, detail_len, "sandbox not initialised");
		return 0;
	}
	if ((r = fn(41)) != 42) {
		snprintf(detail, detail_len, "target returned %d before the patch, expected 42", r);
		return 0;
	}
	/* Its patchable entry, and the landing pad after it when the agent was built with
	 * one (aarch64 -mbranch-protection: `bti c`). */
	uint8_t skip = (uint8_t)sandbox_arch_entry_skip(sandbox_selftest_addr);
	size_t entry_len = SANDBOX_ENTRY_BYTES + skip;
	memcpy(before, (const void *)(sandbox_selftest_addr - SANDBOX_ARCH_ENTRY_PAD), entry_len);
	const struct sandbox_area *tarea = &sandbox_regions[0].text;
	size_t used_before = tarea->used;

	/* Replacement: a stackable patchable entry, then code returning MAGIC (arch/arch.h). */
	uint8_t text[32];
	uint32_t entry_at, entry_size;
	size_t text_len = sandbox_arch_selftest_replacement(text, SANDBOX_SELFTEST_MAGIC, &entry_at, &entry_size);
	struct sandbox_func_spec fs = {
		.symbol = "sandbox_selftest_target", .symbol_len = (uint16_t)strlen("sandbox_selftest_target"),
		.target = sandbox_selftest_addr, .new_offset = entry_at, .new_size = entry_size,
		.skip = skip, .expected_len = (uint16_t)(entry_len < PBX_MIN_EXPECTED ? PBX_MIN_EXPECTED : entry_len),
		.expected = before,
	};
	struct sandbox_apply_spec spec = {
		.name = name, .name_len = (uint16_t)strlen(name),
		.text = text, .text_len = (uint32_t)text_len, .nfuncs = 1, .funcs = &fs, .hold_conn = -1,
	};
	if (sandbox_patch_apply(&spec, SANDBOX_APPLY_INTERNAL, &p, &err) != 0) {
		snprintf(detail, detail_len, "apply failed: %s", err.msg);
		return 0;
	}
	uintptr_t text_addr = p->text_addr;
	int patched = fn(41);
	/* Only the agent thread ever ran this replacement: its memory is freed at once. */
	uint8_t state;
	if (sandbox_patch_remove_mode(name, strlen(name), 1, &state, &err) != 0) {
		snprintf(detail, detail_len, "remove failed: %s", err.msg);
		return 0;
	}
	if (patched != SANDBOX_SELFTEST_MAGIC) {
		snprintf(detail, detail_len, "patched target returned 0x%x, expected 0x%x", (unsigned)patched,
			 SANDBOX_SELFTEST_MAGIC);
		return 0;
	}
	if ((r = fn(41)) != 42) {
		snprintf(detail, detail_len, "target returned %d after remove, expected 42", r);
		return 0;
	}
	memcpy(after, (const void *)(sandbox_selftest_addr - SANDBOX_ARCH_ENTRY_PAD), entry_len);
	if (memcmp(before, after, entry_len) != 0) {
		char hb[64], ha[64];
		sandbox_hex(hb, sizeof(hb), before, entry_len);
		sandbox_hex(ha, sizeof(ha), after, entry_len);
		snprintf(detail, detail_len, "entry bytes not restored: before %s after %s", hb, ha);
		return 0;
	}
	if (!sandbox_arch_text_filled((const void *)text_addr, text_len)) {
		snprintf(detail, detail_len, "sandbox at 0x%lx not refilled with " SANDBOX_ARCH_FILL_NAME,
			 (unsigned long)text_addr);
		return 0;
	}
	if (tarea->used != used_before) {
		snprintf(detail, detail_len, "sandbox_used %zu after remove, was %zu", tarea->used,
			 used_before);
		return 0;
	}
	snprintf(detail, detail_len,
		 "target 0x%lx: 42 -> 0x%x (patched at 0x%lx, sync=%s) -> 42; entry bytes restored; "
		 "sandbox refilled and reusable", (unsigned long)sandbox_selftest_addr, (unsigned)patched,
		 (unsigned long)text_addr, sandbox_core_sync_name());
	return 1;
}

int sandbox_selftest_run(char *detail, size_t detail_len)
{
	/* A fork sees the self-test's patch either not yet applied or removed. */
	sandbox_engine_lock();
	int passed = sandbox_selftest_run_locked(detail, detail_len);
	sandbox_engine_unlock();
	return passed;
}
