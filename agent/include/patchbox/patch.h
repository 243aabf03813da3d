/* patchbox/patch.h: for the source of a live patch (not needed by the program).
 *
 * PATCHBOX_ORIGINAL(fn) is the function fn *as the running program was built*, for a
 * replacement that wraps the function it replaces:
 *
 *     #include <patchbox/patch.h>          (cc -I<patchbox>/agent/include)
 *     int parse_header(struct req *r)
 *     {
 *             if (r->len > MAX)            (the fix)
 *                     return -EINVAL;
 *             return PATCHBOX_ORIGINAL(parse_header)(r);
 *     }
 *
 * It names the undefined symbol patchbox_original_<fn>, with fn's type; extract-patch
 * resolves it to the original's link-time address + 2 in the program: past the two
 * entry NOPs where the redirect is published, so the call runs the original body and
 * is never redirected. fn must be declared in the file (it is, when it is the function
 * being replaced) and built with the patchable entry. Limits (docs/redirect.md):
 * always the program's own fn, never the replacement of an earlier stacked patch.
 */
#ifndef PATCHBOX_PATCH_H
#define PATCHBOX_PATCH_H

#define PATCHBOX_ORIGINAL_PREFIX "patchbox_original_"

#define PATCHBOX_ORIGINAL(fn)                                                  \
	(__extension__({                                                       \
		extern __typeof__(fn) patchbox_original_##fn;                  \
		&patchbox_original_##fn;                                       \
	}))

/* PATCHBOX_HOOK(when, fn): the agent calls `int fn(void)` of the patch around the switch
 * (docs/shadow.md), on its own thread:
 *
 *   pre_apply    after the patch's code is in place, before any function is redirected;
 *                a non-zero result refuses the apply (HOOK_FAILED), nothing changed
 *   post_apply   right after the redirect (the result is logged)
 *   pre_remove   before switching back; non-zero refuses the remove, the patch stays
 *   post_remove  right after switching back (free the patch's shadow variables here)
 *
 *     static int drop_shadows(void) { patchbox_shadow_free_all(SHADOW_ENDLEN); return 0; }
 *     PATCHBOX_HOOK(post_remove, drop_shadows);
 *
 * extract-patch and `patchbox build` find the hooks by their section and carry them. */
#define PATCHBOX_HOOK(when, fn)                                                \
	static int (*const patchbox_hook_##when##_##fn)(void)                    \
		__attribute__((used, section(".patchbox_hooks." #when))) = fn

#endif
