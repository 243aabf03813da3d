/* Part of libsandbox.o: the loaded objects a patch can target. Object 0 is the main
 * executable; a patch whose build-id is not the executable's names a shared library
 * of the process (docs/reach.md, "Shared libraries"), found with dl_iterate_phdr by
 * the GNU build-id note in its loaded segments. Each object used gets a sandbox region
 * of its own within direct-jump reach (sandbox-transition.c); its load bias is the S of base
 * EXE fix-ups and its executable segments bound the patch's targets.
 *
 * Only the agent thread calls in here (sandbox-listen.c, "Locks and fork").
 *
 * Unloading (docs/reach.md, "Shared libraries"). Before INFO, LIST, APPLY and REMOVE the
 * engine asks whether the loader unloaded anything since it last looked: glibc counts
 * unloads (dl_iterate_phdr's dlpi_subs), so when nothing was unloaded this is one
 * callback. When something was, every library in the table is looked for where it was
 * (same load bias, same PT_LOAD span, same build-id); one that is not there is GONE.
 * (One loaded again at the very same place is told by its bytes: the engine finds its
 * patches' bytes back to the original, as a fresh load maps them.) A GONE object is never written again; its slot
 * and sandbox region are given back (FREE) once no patch record names it and its retired
 * memory has passed the quiescence check (sandbox_objects_collect in the engine). A
 * library loaded again gets a new entry.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <elf.h>
#include <limits.h>
#include <link.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "sandbox-engine.h"

static struct sandbox_object sandbox_objects[PBX_MAX_OBJECTS];
static size_t sandbox_nobjects;
static unsigned long long sandbox_subs_seen;	/* the loader's unload count when last looked */

/* Reads the GNU build-id from the notes [p, end) into o. */
static void sandbox_note_scan(struct sandbox_object *o, uintptr_t p, uintptr_t end, size_t align)
{
	while (end > p && end - p >= sizeof(Elf64_Nhdr)) {
		const Elf64_Nhdr *n = (const Elf64_Nhdr *)p;
		uintptr_t name = p + sizeof(*n);
		uintptr_t desc = name + sandbox_round_up(n->n_namesz, align);
		uintptr_t next = desc + sandbox_round_up(n->n_descsz, align);
		if (n->n_namesz > end - name || desc > end || n->n_descsz > end - desc || next <= p)
			return;
		if (n->n_type == NT_GNU_BUILD_ID && n->n_namesz == 4 &&
		    memcmp((const void *)name, "GNU", 4) == 0 &&
		    n->n_descsz > 0 && n->n_descsz <= PBX_MAX_BUILD_ID) {
			memcpy(o->build_id, (const void *)desc, n->n_descsz);
			o->build_id_len = n->n_descsz;
			return;
		}
		p = next;
	}
}

/* Fills o from one dl_iterate_phdr entry: bias, PT_LOAD span, executable ranges, build-id. */
static void sandbox_object_fill(struct sandbox_object *o, const struct dl_phdr_info *info)
{
	memset(o, 0, sizeof(*o));
	o->bias = info->dlpi_addr;
	o->lo = UINTPTR_MAX;
	for (size_t i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t lo = o->bias + ph->p_vaddr, hi = lo + ph->p_memsz;
		if (ph->p_type == PT_LOAD) {
			if (lo < o->lo)
				o->lo = lo;
			if (hi > o->hi)
				o->hi = hi;
			if ((ph->p_flags & PF_X) && o->nx < SANDBOX_MAX_XRANGES) {
				o->xlo[o->nx] = lo;
				o->xhi[o->nx] = hi;
				o->nx++;
			}
		} else if (ph->p_type == PT_NOTE && o->build_id_len == 0) {
			sandbox_note_scan(o, lo, hi, ph->p_align == 8 ? 8 : 4);
		}
	}
	if (o->lo == UINTPTR_MAX)
		o->lo = 0;
	if (info->dlpi_name)
		snprintf(o->path, sizeof(o->path), "%s", info->dlpi_name);
}

static int sandbox_exe_phdr_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
	(void)size;
	(void)arg;
	/* The first object dl_iterate_phdr reports is the main program. */
	sandbox_object_fill(&sandbox_objects[0], info);
	return 1;
}

/* The loader's count of objects unloaded so far (glibc's dlpi_subs), ULLONG_MAX if it
 * does not say. */
static int sandbox_subs_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
	unsigned long long *subs = arg;
	*subs = size >= offsetof(struct dl_phdr_info, dlpi_subs) + sizeof(info->dlpi_subs) ? info->dlpi_subs
											  : ULLONG_MAX;
	return 1;
}

static unsigned long long sandbox_subs_now(void)
{
	unsigned long long subs = ULLONG_MAX;
	dl_iterate_phdr(sandbox_subs_cb, &subs);
	return subs;
}

int sandbox_objects_unloaded(void)
{
	unsigned long long subs = sandbox_subs_now();
	if (subs == sandbox_subs_seen && subs != ULLONG_MAX)
		return 0;
	sandbox_subs_seen = subs;
	return 1;
}

struct sandbox_lib_present {
	const struct sandbox_object *o;
	int seen_first, found;
};

static int sandbox_lib_present_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
	(void)size;
	struct sandbox_lib_present *s = arg;
	if (!s->seen_first++ || info->dlpi_addr != s->o->bias)
		return 0;
	struct sandbox_object o;
	sandbox_object_fill(&o, info);
	s->found = o.lo == s->o->lo && o.hi == s->o->hi && o.build_id_len == s->o->build_id_len &&
		   memcmp(o.build_id, s->o->build_id, o.build_id_len) == 0;
	return s->found;
}

size_t sandbox_objects_check(void)
{
	size_t gone = 0;
	for (size_t i = 1; i < sandbox_nobjects; i++) {
		struct sandbox_object *o = &sandbox_objects[i];
		if (o->state != SANDBOX_OBJECT_LOADED)
			continue;
		struct sandbox_lib_present s = { .o = o };
		dl_iterate_phdr(sandbox_lib_present_cb, &s);
		if (!s.found) {
			o->state = SANDBOX_OBJECT_GONE;
			sandbox_debug("object %zu: %s (bias 0x%lx) was unloaded", i, o->path, (unsigned long)o->bias);
			gone++;
		}
	}
	return gone;
}

struct sandbox_object *sandbox_object_at(size_t i)
{
	return i < sandbox_nobjects ? &sandbox_objects[i] : NULL;
}

int sandbox_objects_init(struct sandbox_error *err)
{
	memset(sandbox_objects, 0, sizeof(sandbox_objects));
	sandbox_subs_seen = sandbox_subs_now();
	dl_iterate_phdr(sandbox_exe_phdr_cb, NULL);
	struct sandbox_object *e = &sandbox_objects[0];
	ssize_t n = readlink("/proc/self/exe", e->path, sizeof(e->path) - 1);
	e->path[n > 0 ? n : 0] = '\0';
	sandbox_nobjects = 1;
	if (e->nx == 0)
		return sandbox_error_set(err, PBX_E_INTERNAL, "executable has no executable PT_LOAD");
	return 0;
}

struct sandbox_object *sandbox_exe_get(void)
{
	return &sandbox_objects[0];
}

size_t sandbox_object_count(void)
{
	size_t n = 0;
	for (size_t i = 0; i < sandbox_nobjects; i++)
		n += sandbox_objects[i].state != SANDBOX_OBJECT_FREE;
	return n;
}

const struct sandbox_object *sandbox_object_get(size_t i)
{
	return i < sandbox_nobjects ? &sandbox_objects[i] : NULL;
}

struct sandbox_lib_search {
	const uint8_t *bid;
	size_t len;
	int seen_first;
	struct sandbox_object found;
	int hit;
};

static int sandbox_lib_phdr_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
	(void)size;
	struct sandbox_lib_search *s = arg;
	if (!s->seen_first++)
		return 0;	/* the executable */
	struct sandbox_object o;
	sandbox_object_fill(&o, info);
	if (o.nx && o.build_id_len == s->len && memcmp(o.build_id, s->bid, s->len) == 0) {
		s->found = o;
		s->hit = 1;
		return 1;
	}
	return 0;
}

static void sandbox_bid_hex(char *dst, size_t cap, const uint8_t *b, size_t n)
{
	size_t o = 0;
	for (size_t i = 0; i < n && o + 2 < cap; i++)
		o += (size_t)snprintf(dst + o, cap - o, "%02x", b[i]);
	if (cap)
		dst[o < cap ? o : cap - 1] = '\0';
}

int sandbox_object_find(const uint8_t *bid, size_t len, struct sandbox_object **ret,
			struct sandbox_error *err)
{
	struct sandbox_object *e = &sandbox_objects[0];
	if (len == e->build_id_len && memcmp(bid, e->build_id, len) == 0) {
		*ret = e;
		return 0;
	}
	/* A loaded library of that build-id, looked up again at every apply: one unloaded
	 * and loaded elsewhere since has another bias. */
	struct sandbox_lib_search s = { .bid = bid, .len = len };
	dl_iterate_phdr(sandbox_lib_phdr_cb, &s);
	if (!s.hit) {
		char want[2 * PBX_MAX_BUILD_ID + 1], have[2 * PBX_MAX_BUILD_ID + 1] = "none";
		sandbox_bid_hex(want, sizeof(want), bid, len);
		sandbox_bid_hex(have, sizeof(have), e->build_id, e->build_id_len);
		return sandbox_error_set(err, PBX_E_BUILD_ID_MISMATCH,
					 "patch %s, running %s, and no loaded library has the patch's build-id",
					 want, have);
	}
	size_t idx = sandbox_nobjects;
	for (size_t i = 1; i < sandbox_nobjects; i++) {
		/* A gone entry is never matched: what is loaded there now is another load. */
		if (sandbox_objects[i].state == SANDBOX_OBJECT_LOADED && sandbox_objects[i].bias == s.found.bias &&
		    sandbox_objects[i].build_id_len == len && memcmp(sandbox_objects[i].build_id, bid, len) == 0) {
			*ret = &sandbox_objects[i];
			return 0;
		}
		if (sandbox_objects[i].state == SANDBOX_OBJECT_FREE && idx == sandbox_nobjects)
			idx = i;
	}
	if (idx >= PBX_MAX_OBJECTS)
		return sandbox_error_set(err, PBX_E_TOO_MANY, "%s: already %d objects patched", s.found.path,
					 PBX_MAX_OBJECTS);
	/* Its own sandbox within direct-jump reach of it, mapped on first use. */
	if (sandbox_region_map(idx, s.found.lo, s.found.hi, s.found.path, err) != 0)
		return -1;
	s.found.region = idx;
	s.found.state = SANDBOX_OBJECT_LOADED;
	sandbox_objects[idx] = s.found;
	if (idx == sandbox_nobjects)
		sandbox_nobjects++;
	sandbox_debug("object %zu: %s bias 0x%lx", idx, s.found.path, (unsigned long)s.found.bias);
	*ret = &sandbox_objects[idx];
	return 0;
}
