/* patchbox/shadow.h: shadow variables, for the source of a live patch.
 *
 * Code replacement cannot add a field to a struct the running program already holds
 * objects of (`patchbox build` refuses such a diff). A patch can instead attach the
 * new field to each object it needs it for, by the object's address, as kpatch's
 * shadow variables do:
 *
 *     #include <patchbox/shadow.h>
 *     #define SHADOW_ENDLEN 1                 (one id per new field)
 *     int *endlen = patchbox_shadow_get_or_alloc(pr, SHADOW_ENDLEN, sizeof(int));
 *     if (!endlen) ...                        (out of memory)
 *     *endlen = ...;
 *
 * The agent keeps the shadows (allocated with the program's malloc, zeroed) in a table
 * guarded by a mutex; any thread may use them. They outlive the patch: free them where
 * the object dies, or all at once in a remove hook (PATCHBOX_HOOK in patch.h):
 * patchbox_shadow_free_all(SHADOW_ENDLEN). docs/shadow.md has a worked example.
 */
#ifndef PATCHBOX_SHADOW_H
#define PATCHBOX_SHADOW_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PATCHBOX_SHADOW_API __attribute__((visibility("default")))

/* The shadow of (obj, id), or NULL if there is none. */
PATCHBOX_SHADOW_API void *patchbox_shadow_get(const void *obj, unsigned long id);
/* A new zeroed shadow of size bytes; NULL if (obj, id) has one already or no memory. */
PATCHBOX_SHADOW_API void *patchbox_shadow_alloc(const void *obj, unsigned long id, size_t size);
/* The shadow of (obj, id), allocated (zeroed) if there is none; NULL if no memory. */
PATCHBOX_SHADOW_API void *patchbox_shadow_get_or_alloc(const void *obj, unsigned long id, size_t size);
/* Frees the shadow of (obj, id), if any. */
PATCHBOX_SHADOW_API void patchbox_shadow_free(const void *obj, unsigned long id);
/* Frees every shadow with this id (a remove hook). */
PATCHBOX_SHADOW_API void patchbox_shadow_free_all(unsigned long id);

#ifdef __cplusplus
}
#endif

#endif
