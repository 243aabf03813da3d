/* sandbox-shadow.c: shadow variables (include/patchbox/shadow.h), for patches that
 * attach a new field to objects the running program already holds.
 *
 * A hash table of (object address, id) -> zeroed block from the program's malloc,
 * guarded by sandbox_shadow_lock: patch code calls these on any thread. The lock is
 * held only around the table itself (malloc and free happen outside it), and a fork
 * takes it first (pthread_atfork, registered on first use) so that a child never
 * starts with it held by a thread it does not have.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "patchbox/shadow.h"
#include "sandbox-internal.h"

#define SANDBOX_SHADOW_BUCKETS 1024	/* power of two */

struct sandbox_shadow {
	struct sandbox_shadow *next;
	const void *obj;
	unsigned long id;
	size_t size;
	_Alignas(16) unsigned char data[];
};

/* Guards sandbox_shadow_table and every entry's next pointer. */
static pthread_mutex_t sandbox_shadow_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sandbox_shadow *sandbox_shadow_table[SANDBOX_SHADOW_BUCKETS];
static pthread_once_t sandbox_shadow_once = PTHREAD_ONCE_INIT;

static void sandbox_shadow_prepare(void) { pthread_mutex_lock(&sandbox_shadow_lock); }
static void sandbox_shadow_release(void) { pthread_mutex_unlock(&sandbox_shadow_lock); }

static void sandbox_shadow_init(void)
{
	pthread_atfork(sandbox_shadow_prepare, sandbox_shadow_release, sandbox_shadow_release);
}

static size_t sandbox_shadow_bucket(const void *obj, unsigned long id)
{
	uint64_t h = (uint64_t)(uintptr_t)obj * 0x9e3779b97f4a7c15ull ^ (uint64_t)id * 0xc2b2ae3d27d4eb4full;
	return (size_t)(h >> 32) & (SANDBOX_SHADOW_BUCKETS - 1);
}

/* The entry of (obj, id) and the link pointing at it; under the lock. */
static struct sandbox_shadow **sandbox_shadow_find(const void *obj, unsigned long id)
{
	struct sandbox_shadow **link = &sandbox_shadow_table[sandbox_shadow_bucket(obj, id)];
	while (*link && ((*link)->obj != obj || (*link)->id != id))
		link = &(*link)->next;
	return link;
}

void *patchbox_shadow_get(const void *obj, unsigned long id)
{
	pthread_once(&sandbox_shadow_once, sandbox_shadow_init);
	pthread_mutex_lock(&sandbox_shadow_lock);
	struct sandbox_shadow *s = *sandbox_shadow_find(obj, id);
	pthread_mutex_unlock(&sandbox_shadow_lock);
	return s ? s->data : NULL;
}

/* exist_ok: return an existing shadow instead of NULL. */
static void *sandbox_shadow_alloc(const void *obj, unsigned long id, size_t size, int exist_ok)
{
	pthread_once(&sandbox_shadow_once, sandbox_shadow_init);
	if (size > SIZE_MAX - sizeof(struct sandbox_shadow))
		return NULL;
	struct sandbox_shadow *fresh = calloc(1, sizeof(*fresh) + size);
	if (!fresh)
		return NULL;
	fresh->obj = obj;
	fresh->id = id;
	fresh->size = size;
	pthread_mutex_lock(&sandbox_shadow_lock);
	struct sandbox_shadow **link = sandbox_shadow_find(obj, id);
	struct sandbox_shadow *have = *link;
	if (!have)
		*link = fresh;
	pthread_mutex_unlock(&sandbox_shadow_lock);
	if (have) {
		free(fresh);
		return exist_ok ? have->data : NULL;
	}
	return fresh->data;
}

void *patchbox_shadow_alloc(const void *obj, unsigned long id, size_t size)
{
	return sandbox_shadow_alloc(obj, id, size, 0);
}

void *patchbox_shadow_get_or_alloc(const void *obj, unsigned long id, size_t size)
{
	return sandbox_shadow_alloc(obj, id, size, 1);
}

void patchbox_shadow_free(const void *obj, unsigned long id)
{
	pthread_once(&sandbox_shadow_once, sandbox_shadow_init);
	pthread_mutex_lock(&sandbox_shadow_lock);
	struct sandbox_shadow **link = sandbox_shadow_find(obj, id), *gone = *link;
	if (gone)
		*link = gone->next;
	pthread_mutex_unlock(&sandbox_shadow_lock);
	free(gone);
}

void patchbox_shadow_free_all(unsigned long id)
{
	struct sandbox_shadow *gone = NULL;
	pthread_once(&sandbox_shadow_once, sandbox_shadow_init);
	pthread_mutex_lock(&sandbox_shadow_lock);
	for (size_t b = 0; b < SANDBOX_SHADOW_BUCKETS; b++) {
		for (struct sandbox_shadow **link = &sandbox_shadow_table[b]; *link;) {
			struct sandbox_shadow *s = *link;
			if (s->id != id) {
				link = &s->next;
				continue;
			}
			*link = s->next;
			s->next = gone;	/* freed after the lock */
			gone = s;
		}
	}
	pthread_mutex_unlock(&sandbox_shadow_lock);
	while (gone) {
		struct sandbox_shadow *next = gone->next;
		free(gone);
		gone = next;
	}
}
