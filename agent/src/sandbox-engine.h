/* Internal interface between the parts of libsandbox.o:
 *
 *   sandbox-engine.c      apply / remove orchestration, the function and fix-up
 *                         checks, the self-test, errors
 *   sandbox-objects.c     the loaded objects a patch targets: the executable, libraries
 *   sandbox-redirect.c    mechanism: code pages, core sync, atomic instruction stores,
 *                         writing a redirect, restoring the original bytes
 *   sandbox-transition.c  when a change is safe: the sandbox memory (where it lies,
 *                         placement, retire, quiescence check, revival)
 *   sandbox-hold.c        the check that every other thread is held clear of an entry
 *                         jump, and that no stack can return into it
 *   arch/arch.h           the architecture: instruction templates, entry layout (arch/<arch>/)
 *
 * Hidden, and local to libsandbox.o after its relocatable link (agent/Makefile): the
 * server sees only sandbox-internal.h. No lock: only the agent thread calls in here
 * (sandbox-listen.c, "Locks and fork").
 */
#ifndef PATCHBOX_SANDBOX_ENGINE_H
#define PATCHBOX_SANDBOX_ENGINE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "sandbox-internal.h"

#define SANDBOX_PAGE 4096ul

static inline uintptr_t sandbox_round_up(uintptr_t v, uintptr_t a) { return (v + a - 1) & ~(a - 1); }
static inline uintptr_t sandbox_round_down(uintptr_t v, uintptr_t a) { return v & ~(a - 1); }

/* ---- sandbox-engine.c */

/* Writes the fix-ups into the local copies text and data, as placed at text_addr and
 * data_addr (P is the final address). err may be NULL. */
int sandbox_fixups_apply(const struct sandbox_apply_spec *spec, const uint64_t *import, uintptr_t bias,
			 uint8_t *text, uintptr_t text_addr, uint8_t *data, uintptr_t data_addr,
			 struct sandbox_error *err);

/* ---- sandbox-objects.c */

/* Object 0, the executable (-1 with err if it has no executable segment). */
int sandbox_objects_init(struct sandbox_error *err);
/* The object whose GNU build-id is bid: the executable or a loaded library (its
 * sandbox region mapped on first use). -1 with err (BUILD_ID_MISMATCH, TOO_MANY...). */
int sandbox_object_find(const uint8_t *bid, size_t len, struct sandbox_object **ret,
			struct sandbox_error *err);
/* 1 if the loader unloaded an object since the last call (or cannot say), else 0. */
int sandbox_objects_unloaded(void);
/* Marks GONE every LOADED library not loaded where it was any more; the number marked. */
size_t sandbox_objects_check(void);
/* Entry i of the table (any state), NULL past its end. */
struct sandbox_object *sandbox_object_at(size_t i);

/* ---- sandbox-redirect.c: mechanism */

/* Registers for the membarrier that serialises cores: "sync_core", else
 * "expedited", else "none" (sandbox_core_sync_name). */
void sandbox_core_sync_init(void);
const char *sandbox_core_sync_name(void);
/* 1 when every core is serialised after code writes (membarrier SYNC_CORE registered). */
int sandbox_core_sync_full(void);

/* Fills sandbox text with `ret` again, so a stray jump into free sandbox returns. -1
 * if the pages cannot be made writable (the caller keeps the memory retired). */
int sandbox_text_refill(uintptr_t addr, size_t len);

/* Bytes to copy into the sandbox: len bytes from src to addr (len 0: none). */
struct sandbox_copy {
	uintptr_t addr;
	const void *src;
	size_t len;
};

/* Runs between the copies and the redirect (the patch's pre-apply hooks); non-zero
 * with err stops the apply before anything is published. */
typedef int (*sandbox_gate_fn)(void *arg, struct sandbox_error *err);

/* Apply: copies text (its pages made writable for it) and data into the sandbox,
 * calls gate (if any), waits for the client's hold when a function has `hold`, then
 * redirects each function to its new_entry (phase 1, sync, phase 2, sync). -1 with err
 * (NO_MEMORY, MPROTECT_FAILED, the gate's, NOT_HELD: the hold did not come, or went
 * before phase 2, or its client hung up: hold_conn) only before a reachable byte
 * changes. held_ns: the hold's wait. */
int sandbox_redirect_write(const struct sandbox_copy *text, const struct sandbox_copy *data,
			   const struct sandbox_func *funcs, size_t nfuncs, sandbox_gate_fn gate,
			   void *gate_arg, int hold_conn, uint64_t *held_ns, struct sandbox_error *err);
/* Remove: puts back the saved bytes of each function (steps 1-4). -1 with err
 * (NO_MEMORY, MPROTECT_FAILED) only before the first byte changes. */
int sandbox_redirect_restore(const struct sandbox_func *funcs, size_t nfuncs, struct sandbox_error *err);

/* ---- sandbox-transition.c: the sandbox memory */

#define SANDBOX_MAX_EXTENTS 1024

struct sandbox_extent {
	size_t off, len;
	uint32_t owner;		/* patch id */
	int retired;
	int keep;		/* sticky: held a RETAIN patch, never reclaimed (docs/qemu.md) */
};

struct sandbox_area {
	uintptr_t base;
	size_t size, used, retired;
	int is_text;
	size_t n;		/* extents, sorted by off */
	struct sandbox_extent ext[SANDBOX_MAX_EXTENTS];
};

/* One object's sandbox: patch text (in the program's text, or mapped near the object)
 * and patch data. Region i belongs to object i (sandbox-objects.c). */
struct sandbox_region {
	struct sandbox_area text, data;
};
extern struct sandbox_region sandbox_regions[PBX_MAX_OBJECTS];

/* Places region 0, the executable's; *selftest_ret: entry of a function built with the
 * patchable entry within direct-jump reach of the sandbox (the self-test's target). */
int sandbox_areas_init(uintptr_t *selftest_ret, struct sandbox_error *err);
/* Maps region idx within direct-jump reach of [lo, hi) (a library named what). */
int sandbox_region_map(size_t idx, uintptr_t lo, uintptr_t hi, const char *what, struct sandbox_error *err);
/* Unmaps region idx (> 0) if nothing is placed in it, live or retired: 0, else -1. */
int sandbox_region_unmap(size_t idx);
/* Runs the quiescence check now if anything is retired (frees what passes). */
void sandbox_retired_collect(void);
int sandbox_area_alloc_reclaim(struct sandbox_area *a, size_t len, uint32_t owner, uintptr_t *ret);
int sandbox_text_revive(struct sandbox_area *a, const struct sandbox_apply_spec *spec, const uint64_t *import,
			uintptr_t bias, uint32_t owner, uint8_t *tbuf, uint32_t *prev_owner, uintptr_t *ret);
void sandbox_owner_unplace(uint32_t owner, uintptr_t revived_addr, uint32_t revived_from);
void sandbox_owner_retire(uint32_t owner, int keep);
int sandbox_owner_free(uint32_t owner);

/* ---- sandbox-hold.c: the hold (PBX_FLAG_HOLD, docs/reach.md) */

/* What the last full check (sandbox_hold_confirm) scanned, for INFO and the log. */
struct sandbox_hold_stats {
	size_t mappings;	/* private writable mappings checked whole */
	size_t skipped;		/* larger than the cap: seen only from a held thread's SP */
	uint64_t skipped_bytes;
	uint64_t bytes;		/* read and checked, stacks from SP included */
	uint64_t ns;		/* the scans' time (steps 2 and 3) */
	int full;		/* 0: no full check yet */
};

/* Records the agent thread's own stack, left out of the memory check. Allocates: call it
 * before the hold (the engine does, for every apply with a held function). */
void sandbox_hold_prepare(void);
/* 1 if every other thread of the process is in a tracing stop ('t': held by the client
 * with ptrace) or a zombie, and none has its PC, or a word of its stack from SP (through
 * the signal frames on it), strictly inside (wlo, whi) of a function with `hold`; with
 * full, no word of any private writable mapping up to 64 MiB either. 0 if a thread is not
 * held (yet) or stopped inside: worth waiting; -1 if a word points inside while every
 * thread is held, or memory cannot be read: waiting changes nothing. The first reason in
 * why. No allocation: the other threads may hold malloc's locks. */
int sandbox_threads_held(const struct sandbox_func *funcs, size_t n, int full, char *why, size_t why_len);
/* 1 while the client holding the threads is there: its connection conn (-1: none to
 * check) not hung up; 0 with why. A client that dies has its sockets closed before the
 * kernel lets its tracees go (docs/reach.md): an open connection means held threads
 * are still held. */
int sandbox_holder_alive(int conn, char *why, size_t why_len);
/* Waits until sandbox_threads_held (without the memory check), PBX_HOLD_WAIT_MS at most
 * (then NOT_HELD; at once when it says -1, or when the holder of conn hangs up); 0 at
 * once when no function has `hold`.
 * *waited_ns: how long it took. The client starts its hold when it sees the agent thread
 * asleep in here (clock_nanosleep): nothing from here to the pages made r-x again
 * allocates or takes a lock a held thread could own. */
int sandbox_hold_wait(const struct sandbox_func *funcs, size_t n, int conn, uint64_t *waited_ns,
		      struct sandbox_error *err);
/* The full check right before the stores (memory too), within the wait's deadline, then
 * the holder's connection, the last system call before the stores: 0, or -1 with err
 * NOT_HELD. */
int sandbox_hold_confirm(const struct sandbox_func *funcs, size_t n, int conn, struct sandbox_error *err);
const struct sandbox_hold_stats *sandbox_hold_stats_get(void);

#endif
