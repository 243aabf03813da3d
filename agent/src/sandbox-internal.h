/* Internal interface between libsandbox.o (engine) and sandbox-listen.o (server).
 * Everything here has hidden visibility (-fvisibility=hidden); the functions and
 * variables declared here, with the public API, are the only symbols that stay
 * global in the two objects (sandbox-internal.syms). Each object's own internal
 * header: sandbox-engine.h, sandbox-server.h. */
#ifndef PATCHBOX_SANDBOX_INTERNAL_H
#define PATCHBOX_SANDBOX_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "patchbox/wire.h"

#ifndef SANDBOX_ALLOC
#define SANDBOX_ALLOC 524288
#endif
#ifndef SANDBOX_DATA_ALLOC
#define SANDBOX_DATA_ALLOC 65536
#endif

#define SANDBOX_ALIGN 64		/* placement granularity of text and data */
#define SANDBOX_ERRMSG 512

/* ---- errors are values: a code from wire.h and a message that starts with its text */

struct sandbox_error {
	enum pbx_error code;
	char msg[SANDBOX_ERRMSG];
};

const char *sandbox_error_text(int code);
/* Sets err to code; msg = "<text>" or "<text>: <fmt...>". Returns -1 for `return`. */
int sandbox_error_set(struct sandbox_error *err, enum pbx_error code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* ---- debug output (sandbox-listen.c) */

extern int sandbox_debug_enabled;
void sandbox_debug_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#define sandbox_debug(...) \
	do { if (__atomic_load_n(&sandbox_debug_enabled, __ATOMIC_RELAXED)) \
		sandbox_debug_printf(__VA_ARGS__); } while (0)

/* ---- facts about a loaded object: the main executable (object 0) or a library
 * (sandbox-objects.c) */

#define SANDBOX_MAX_XRANGES 8

struct sandbox_object {
	uintptr_t bias;
	uint8_t build_id[PBX_MAX_BUILD_ID];
	size_t build_id_len;
	uintptr_t xlo[SANDBOX_MAX_XRANGES], xhi[SANDBOX_MAX_XRANGES]; /* executable PT_LOADs */
	size_t nx;
	uintptr_t lo, hi;	/* span of all PT_LOADs */
	char path[4096];	/* readlink /proc/self/exe, or the library's as loaded; "" if unknown */
	size_t region;		/* its sandbox region (sandbox-transition.c) */
	int state;		/* SANDBOX_OBJECT_*: a library's, as last seen (sandbox-objects.c) */
};

enum {
	SANDBOX_OBJECT_LOADED,	/* where it was, with its build-id, the patches' bytes in place */
	SANDBOX_OBJECT_GONE,	/* unloaded (dlclose) or loaded anew: never written again */
	SANDBOX_OBJECT_FREE,	/* a gone object's slot given back: its region unmapped */
};

/* ---- a parsed apply body (pointers into the request payload) */

struct sandbox_func_spec {
	const char *symbol;
	uint16_t symbol_len;
	uint64_t target;	/* link-time address */
	uint32_t new_offset, new_size;
	uint8_t kind;		/* PBX_KIND_*: how the original is redirected */
	uint8_t skip;		/* 0, or 4 past a landing pad: endbr64 (kind 1), bti c (aarch64) */
	uint16_t expected_len;
	const uint8_t *expected; /* kind 0: from target-PAD (x86-64 6); kind 1: from target+skip */
};

struct sandbox_fixup_spec {
	uint8_t section, type, base, reserved;
	uint32_t offset;
	int64_t addend;
	const char *symbol;	/* base IMPORT only */
	uint16_t symbol_len;
};

struct sandbox_apply_spec {
	const char *name;
	uint16_t name_len;
	const uint8_t *build_id;
	uint8_t build_id_len;
	uint32_t flags;
	const uint8_t *text;
	uint32_t text_len;
	const uint8_t *data;
	uint32_t data_len;
	uint32_t bss_size;
	uint16_t nfuncs;
	struct sandbox_func_spec *funcs;
	uint32_t nfixups;
	struct sandbox_fixup_spec *fixups;
	uint16_t nhooks;
	struct sandbox_hook_spec {
		uint8_t when;		/* PBX_HOOK_* */
		uint32_t offset;	/* the hook function's entry in text */
	} hooks[PBX_MAX_HOOKS];
	uint16_t machine;	/* ELF e_machine the patch is for (absent: PBX_ABSENT_MACHINE) */
	int hold_conn;		/* held entry jumps: the connection of the client holding the
				 * threads, written only while it is open; -1 none */
};

/* ---- applied patches */

struct sandbox_func {
	char symbol[PBX_MAX_SYMBOL + 1];
	uintptr_t target;	/* absolute address of the original function */
	uintptr_t site;		/* where this patch redirected: target or the entry below */
	uintptr_t new_entry;
	uint32_t new_size;
	uint8_t mech;		/* PBX_KIND_*: how this patch redirected site (stacking: always 0) */
	uint8_t hold;		/* kind 1 under PBX_FLAG_HOLD: written while the other threads are held */
	uintptr_t saved_at;	/* kind 0: entry-PAD; kind 1: the aligned word holding site */
	uintptr_t wlo, whi;	/* the bytes this patch changes: [entry-PAD, site+NOPS) / [site,
				 * site+JUMP_LEN) (x86-64: [site-6, site+2) / [site, site+5)) */
	uint8_t saved_len;	/* whi-wlo (kind 0), or the word(s) of an entry jump */
	uint8_t saved[32];	/* bytes at [saved_at, saved_at+saved_len) before */
};

struct sandbox_patch {
	char name[PBX_MAX_NAME + 1];
	uint32_t id;
	uint64_t applied_at;	/* unix ns */
	uintptr_t text_addr, data_addr;
	uint32_t text_size, data_size;
	uint16_t nfuncs;
	uint32_t flags;		/* PBX_FLAG_* of the apply */
	uint8_t state;		/* PBX_STATE_APPLIED; PBX_STATE_UNLOADED: its library was unloaded,
				 * nothing of it is ever written again, its memory is retired */
	const struct sandbox_object *object;	/* what it patches: the executable or a library */
	uint64_t hold_ns;	/* PBX_FLAG_HOLD: how long the agent waited for the threads */
	struct sandbox_func *funcs;
	uint16_t nhooks;	/* the remove hooks, absolute */
	struct sandbox_hook {
		uint8_t when;
		uintptr_t addr;
	} hooks[PBX_MAX_HOOKS];
};

struct sandbox_stats {
	uintptr_t text_addr, data_addr;
	size_t text_size, text_used, text_retired;
	size_t data_size, data_used, data_retired;
	size_t patches, patches_unloaded;
	const char *sync_core;	/* "sync_core", "expedited" or "none" */
	/* The last full hold check (sandbox-hold.c): mappings scanned whole, bytes read, its
	 * time; mappings over the cap seen from a thread's SP only. hold_checked 0: none yet. */
	int hold_checked;
	size_t hold_mappings, hold_skipped;
	uint64_t hold_bytes, hold_skipped_bytes, hold_ns;
};

/* SANDBOX_APPLY_INTERNAL: the target is the agent's own (self-test): skip the
 * build-id and executable-range checks, which are about the main program. */
#define SANDBOX_APPLY_INTERNAL 1u

int sandbox_engine_init(struct sandbox_error *err);

/* The engine's part of a fork (sandbox-listen.c, "Locks and fork"). PREPARE takes
 * the engine lock, waiting for an apply, remove or self-test in progress to end,
 * until deadline (CLOCK_MONOTONIC): 0, or -1 if it could not; PARENT releases it
 * after a PREPARE that took it; CHILD resets it (async-signal-safe). */
enum sandbox_fork_phase { SANDBOX_FORK_PREPARE, SANDBOX_FORK_PARENT, SANDBOX_FORK_CHILD };
struct timespec;
int sandbox_engine_fork(enum sandbox_fork_phase phase, const struct timespec *deadline);
struct sandbox_object *sandbox_exe_get(void);
size_t sandbox_object_count(void);
const struct sandbox_object *sandbox_object_get(size_t i);
int sandbox_patch_apply(const struct sandbox_apply_spec *spec, unsigned flags,
			const struct sandbox_patch **ret, struct sandbox_error *err);
/* *state_ret: the state the patch was in: APPLIED (its bytes restored) or UNLOADED (its
 * record dropped, nothing written). */
int sandbox_patch_remove(const char *name, size_t name_len, uint8_t *state_ret, struct sandbox_error *err);
/* Notices libraries unloaded since the last call (cheap when none was: the loader's count
 * of unloads): their patches become PBX_STATE_UNLOADED. Called before INFO, LIST, APPLY
 * and REMOVE are served. */
void sandbox_engine_refresh(void);
size_t sandbox_patch_count(void);
const struct sandbox_patch *sandbox_patch_get(size_t i);
void sandbox_stats_get(struct sandbox_stats *ret);
/* Returns 1 passed / 0 failed, detail filled either way. */
int sandbox_selftest_run(char *detail, size_t detail_len);

#endif
