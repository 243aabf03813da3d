/* Part of sandbox-listen.o: the messages. One request frame, its payload read:
 * parse it (docs/protocol.md), call the engine (sandbox-internal.h), build the
 * reply, write the log line, send. A refused request is an error value, never a
 * stop: the connection goes on unless the reply cannot be sent.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "arch/arch.h"
#include "patchbox/sandbox.h"
#include "sandbox-server.h"

/* ------------------------------------------------------------------ messages */

static const char *const sandbox_msg_names[] = {
	[PBX_MSG_INFO] = "INFO", [PBX_MSG_LIST] = "LIST", [PBX_MSG_APPLY] = "APPLY",
	[PBX_MSG_REMOVE] = "REMOVE", [PBX_MSG_TEST] = "TEST", [PBX_MSG_DEBUG] = "DEBUG",
};

const char *sandbox_msg_name(unsigned type)
{
	if (type < sizeof(sandbox_msg_names) / sizeof(sandbox_msg_names[0]) && sandbox_msg_names[type])
		return sandbox_msg_names[type];
	return NULL;
}

/* One request being answered: its payload, the reply being built, the log facts. */
struct sandbox_request {
	int fd;			/* the client's connection */
	struct sandbox_reader r;
	struct sandbox_writer w;	/* header + status 0 already in */
	char patch[PBX_MAX_NAME + 1];	/* for the log */
	char note[SANDBOX_ERRMSG];	/* log result when the status is OK but something failed */
};

static void sandbox_request_name(struct sandbox_request *q, const char *s, size_t n)
{
	size_t k = n < sizeof(q->patch) - 1 ? n : sizeof(q->patch) - 1;
	for (size_t i = 0; i < k; i++)
		q->patch[i] = (s[i] > 0x20 && s[i] < 0x7f) ? s[i] : '?';
	q->patch[k] = '\0';
}

static void sandbox_kv_put(struct sandbox_writer *w, const char *k, const char *v)
{
	sandbox_writer_str(w, k);
	sandbox_writer_str(w, v);
}

/* INFO, LIST, APPLY and REMOVE first notice the libraries unloaded since the last
 * request (sandbox_engine_refresh; cheap when none was): what they describe or change
 * must not be one of them. */

static int sandbox_msg_info(struct sandbox_request *q, struct sandbox_error *err)
{
	sandbox_engine_refresh();
	if (sandbox_reader_end(&q->r, "the (empty) INFO request") != 0)
		return sandbox_reader_error(&q->r, err);
	const struct sandbox_object *exe = sandbox_exe_get();
	struct sandbox_stats st;
	sandbox_stats_get(&st);
	char pid[16], bias[24], bid[2 * PBX_MAX_BUILD_ID + 1] = "unknown";
	char saddr[24], ssize[24], sused[24], sret[24], daddr[24], dsize[24], dused[24], npatch[24];
	char tid[16], nobj[16], nunloaded[24], proto[16];
	snprintf(pid, sizeof(pid), "%d", (int)getpid());
	snprintf(proto, sizeof(proto), "%d", PBX_VERSION);
	snprintf(tid, sizeof(tid), "%d", (int)gettid());	/* INFO is served by the agent thread */
	snprintf(nobj, sizeof(nobj), "%zu", sandbox_object_count());
	snprintf(bias, sizeof(bias), "0x%lx", (unsigned long)exe->bias);
	for (size_t i = 0; i < exe->build_id_len; i++)
		snprintf(bid + 2 * i, 3, "%02x", exe->build_id[i]);
	snprintf(saddr, sizeof(saddr), "0x%lx", (unsigned long)st.text_addr);
	snprintf(ssize, sizeof(ssize), "%zu", st.text_size);
	snprintf(sused, sizeof(sused), "%zu", st.text_used);
	snprintf(sret, sizeof(sret), "%zu", st.text_retired);
	snprintf(daddr, sizeof(daddr), "0x%lx", (unsigned long)st.data_addr);
	snprintf(dsize, sizeof(dsize), "%zu", st.data_size);
	snprintf(dused, sizeof(dused), "%zu", st.data_used);
	snprintf(npatch, sizeof(npatch), "%zu", st.patches);
	snprintf(nunloaded, sizeof(nunloaded), "%zu", st.patches_unloaded);

	char hold[160] = "none";
	if (st.hold_checked)
		snprintf(hold, sizeof(hold), "%zu mappings, %llu bytes in %llu us; %zu over 64 MiB (%llu bytes) "
			 "seen from SP only", st.hold_mappings, (unsigned long long)st.hold_bytes,
			 (unsigned long long)(st.hold_ns / 1000), st.hold_skipped,
			 (unsigned long long)st.hold_skipped_bytes);
	const char *app[4] = { "unknown", "unknown", "unknown", "unknown" };
	const struct patchbox_build_info *bi = &patchbox_build_info;	/* weak: may be NULL */
	if (bi && bi->magic == PATCHBOX_BUILD_INFO_MAGIC && bi->size >= sizeof(*bi)) {
		const char *f[4] = { bi->version, bi->git, bi->date, bi->cflags };
		for (int i = 0; i < 4; i++)
			if (f[i])
				app[i] = f[i];
	}
	const char *kv[][2] = {
		{ "pid", pid }, { "exe", exe->path[0] ? exe->path : "unknown" },
		{ "build_id", bid }, { "load_bias", bias },
		{ "agent_version", PBX_PACKAGE_VERSION }, { "protocol_version", proto },
		{ "app_version", app[0] }, { "app_git", app[1] }, { "app_build_date", app[2] },
		{ "app_cflags", app[3] },
		{ "sandbox_addr", saddr }, { "sandbox_size", ssize }, { "sandbox_used", sused },
		{ "sandbox_retired", sret },
		{ "data_addr", daddr }, { "data_size", dsize }, { "data_used", dused },
		{ "patches", npatch }, { "patches_unloaded", nunloaded },
		{ "debug", __atomic_load_n(&sandbox_debug_enabled, __ATOMIC_RELAXED) ? "1" : "0" },
		{ "log", sandbox_log_path[0] ? sandbox_log_path : "off" },
		{ "socket", sandbox_sock_path }, { "sync_core", st.sync_core },
		{ "agent_tid", tid }, { "objects", nobj }, { "hold_scan", hold },
		{ "arch", SANDBOX_ARCH_NAME }, { "machine", SANDBOX_ARCH_MACHINE_STR },
	};
	size_t n = sizeof(kv) / sizeof(kv[0]);
	sandbox_writer_uint(&q->w, n, 2);
	for (size_t i = 0; i < n; i++)
		sandbox_kv_put(&q->w, kv[i][0], kv[i][1]);
	return 0;
}

/* The replies' layouts are INFO_REPLY, LIST_REPLY, APPLY_REPLY, REMOVE_REPLY and
 * TEST_REPLY of wire/constants.toml; tests/wire/test_wire_constants.py reads the writer calls
 * of these handlers and checks their order and widths against them. */

static int sandbox_msg_list(struct sandbox_request *q, struct sandbox_error *err)
{
	sandbox_engine_refresh();
	if (sandbox_reader_end(&q->r, "the (empty) LIST request") != 0)
		return sandbox_reader_error(&q->r, err);
	size_t n = sandbox_patch_count();
	sandbox_writer_uint(&q->w, n, 4);
	for (size_t i = 0; i < n; i++) {
		const struct sandbox_patch *p = sandbox_patch_get(i);
		sandbox_writer_str(&q->w, p->name);
		sandbox_writer_uint(&q->w, p->id, 4);
		sandbox_writer_uint(&q->w, p->applied_at, 8);
		sandbox_writer_uint(&q->w, p->text_addr, 8);
		sandbox_writer_uint(&q->w, p->text_size, 4);
		sandbox_writer_uint(&q->w, p->data_addr, 8);
		sandbox_writer_uint(&q->w, p->data_size, 4);
		sandbox_writer_uint(&q->w, p->nfuncs, 2);
		for (size_t f = 0; f < p->nfuncs; f++) {
			sandbox_writer_str(&q->w, p->funcs[f].symbol);
			sandbox_writer_uint(&q->w, p->funcs[f].target, 8);
			sandbox_writer_uint(&q->w, p->funcs[f].new_entry, 8);
			sandbox_writer_uint(&q->w, p->funcs[f].new_size, 4);
		}
		/* What it patches: "" for the executable, else the library's path. */
		sandbox_writer_str(&q->w, p->object && p->object != sandbox_exe_get() ? p->object->path : "");
		sandbox_writer_uint(&q->w, p->hold_ns, 8);
		sandbox_writer_uint(&q->w, p->state, 1);
	}
	return 0;
}

/* Parses the apply body (docs/protocol.md APPLY). funcs/fixups are allocated. The
 * layout is APPLY_BODY of wire/constants.toml: tests/wire/test_wire_constants.py runs this
 * parser and checks that it reads every field at the declared offset and width. */
static int sandbox_apply_parse(struct sandbox_request *q, struct sandbox_apply_spec *s, struct sandbox_error *err)
{
	struct sandbox_reader *r = &q->r;
	const uint8_t *b;
	if (sandbox_reader_str(r, "name", &s->name, &s->name_len) != 0)
		return sandbox_reader_error(r, err);
	sandbox_request_name(q, s->name, s->name_len);
	if (SANDBOX_READ_UINT(r, "build_id_len", 1, s->build_id_len) != 0)
		return sandbox_reader_error(r, err);
	if (s->build_id_len < 1 || s->build_id_len > PBX_MAX_BUILD_ID)
		return sandbox_error_set(err, PBX_E_MALFORMED, "build_id_len %u not in 1..%d", s->build_id_len,
					 PBX_MAX_BUILD_ID);
	if (sandbox_reader_take(r, "build_id", s->build_id_len, &s->build_id) != 0 ||
	    SANDBOX_READ_UINT(r, "flags", 4, s->flags) != 0 ||
	    sandbox_reader_blob(r, "text", &s->text, &s->text_len) != 0 ||
	    sandbox_reader_blob(r, "data", &s->data, &s->data_len) != 0 ||
	    SANDBOX_READ_UINT(r, "bss_size", 4, s->bss_size) != 0 ||
	    SANDBOX_READ_UINT(r, "nfuncs", 2, s->nfuncs) != 0)
		return sandbox_reader_error(r, err);
	if (s->nfuncs < 1 || s->nfuncs > PBX_MAX_FUNCS)
		return sandbox_error_set(err, PBX_E_MALFORMED, "nfuncs %u not in 1..%d", s->nfuncs, PBX_MAX_FUNCS);
	s->funcs = calloc(s->nfuncs, sizeof(*s->funcs));
	if (!s->funcs)
		return sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
	for (size_t i = 0; i < s->nfuncs; i++) {
		struct sandbox_func_spec *f = &s->funcs[i];
		if (sandbox_reader_str(r, "function symbol", &f->symbol, &f->symbol_len) != 0 ||
		    SANDBOX_READ_UINT(r, "function target", 8, f->target) != 0 ||
		    SANDBOX_READ_UINT(r, "function new_offset", 4, f->new_offset) != 0 ||
		    SANDBOX_READ_UINT(r, "function new_size", 4, f->new_size) != 0 ||
		    SANDBOX_READ_UINT(r, "function kind", 1, f->kind) != 0 ||
		    SANDBOX_READ_UINT(r, "function skip", 1, f->skip) != 0 ||
		    SANDBOX_READ_UINT(r, "function expected_len", 2, f->expected_len) != 0 ||
		    sandbox_reader_take(r, "function expected", f->expected_len, &f->expected) != 0)
			return sandbox_reader_error(r, err);
		if (f->symbol_len < 1 || f->symbol_len > PBX_MAX_SYMBOL)
			return sandbox_error_set(err, PBX_E_MALFORMED, "function %zu: symbol length %u not in 1..%d",
						 i, f->symbol_len, PBX_MAX_SYMBOL);
		if (f->expected_len < PBX_MIN_EXPECTED || f->expected_len > PBX_MAX_EXPECTED)
			return sandbox_error_set(err, PBX_E_MALFORMED, "function %zu: expected_len %u not in %d..%d",
						 i, f->expected_len, PBX_MIN_EXPECTED, PBX_MAX_EXPECTED);
	}
	if (SANDBOX_READ_UINT(r, "nfixups", 4, s->nfixups) != 0)
		return sandbox_reader_error(r, err);
	/* A fix-up takes at least PBX_FIXUP_RECORD_MIN_SIZE bytes: a count the payload
	 * cannot hold is refused before allocating for it. */
	if (s->nfixups > PBX_MAX_FIXUPS || s->nfixups > (r->len - r->pos) / PBX_FIXUP_RECORD_MIN_SIZE)
		return sandbox_error_set(err, PBX_E_MALFORMED, "nfixups %u overruns the payload", s->nfixups);
	s->fixups = calloc(s->nfixups ? s->nfixups : 1, sizeof(*s->fixups));
	if (!s->fixups)
		return sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
	for (uint32_t i = 0; i < s->nfixups; i++) {
		struct sandbox_fixup_spec *x = &s->fixups[i];
		if (SANDBOX_READ_UINT(r, "fixup section", 1, x->section) != 0 ||
		    SANDBOX_READ_UINT(r, "fixup type", 1, x->type) != 0 ||
		    SANDBOX_READ_UINT(r, "fixup base", 1, x->base) != 0 ||
		    SANDBOX_READ_UINT(r, "fixup reserved", 1, x->reserved) != 0 ||
		    SANDBOX_READ_UINT(r, "fixup offset", 4, x->offset) != 0 ||
		    sandbox_reader_take(r, "fixup addend", 8, &b) != 0)
			return sandbox_reader_error(r, err);
		memcpy(&x->addend, b, 8);
		if (x->base == PBX_BASE_IMPORT &&
		    sandbox_reader_str(r, "fixup symbol", &x->symbol, &x->symbol_len) != 0)
			return sandbox_reader_error(r, err);
	}
	if (SANDBOX_READ_UINT(r, "nhooks", 2, s->nhooks) != 0)
		return sandbox_reader_error(r, err);
	if (s->nhooks > PBX_MAX_HOOKS)
		return sandbox_error_set(err, PBX_E_MALFORMED, "nhooks %u (max %d)", s->nhooks, PBX_MAX_HOOKS);
	for (uint16_t i = 0; i < s->nhooks; i++) {
		if (SANDBOX_READ_UINT(r, "hook when", 1, s->hooks[i].when) != 0 ||
		    SANDBOX_READ_UINT(r, "hook offset", 4, s->hooks[i].offset) != 0)
			return sandbox_reader_error(r, err);
	}
	/* The architecture: a body written before the field existed ends here. */
	s->machine = PBX_ABSENT_MACHINE;
	if (r->pos < r->len && SANDBOX_READ_UINT(r, "machine", 2, s->machine) != 0)
		return sandbox_reader_error(r, err);
	if (sandbox_reader_end(r, "the machine") != 0)
		return sandbox_reader_error(r, err);
	/* Before anything read for the architecture: another one's code, entries and skips
	 * mean nothing here. */
	if (s->machine != SANDBOX_ARCH_MACHINE)
		return sandbox_error_set(err, PBX_E_WRONG_MACHINE,
					 "patch %s is for %s (e_machine %u), this process is " SANDBOX_ARCH_NAME
					 " (e_machine %d)", q->patch, sandbox_arch_machine_name(s->machine), s->machine,
					 SANDBOX_ARCH_MACHINE);
	for (size_t i = 0; i < s->nfuncs; i++) {
		const struct sandbox_func_spec *f = &s->funcs[i];
		if (f->kind > PBX_KIND_ENTRY_JUMP || !sandbox_arch_skip_valid(f->kind, f->skip))
			return sandbox_error_set(err, PBX_E_MALFORMED,
						 "function %zu: kind %u skip %u (" SANDBOX_ARCH_SKIP_RULE ")",
						 i, f->kind, f->skip);
	}
	return 0;
}

/* Engine time of APPLY/REMOVE for the reply (benchmarks read it). */
static uint64_t sandbox_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int sandbox_msg_apply(struct sandbox_request *q, struct sandbox_error *err)
{
	struct sandbox_apply_spec spec = { 0 };
	const struct sandbox_patch *p = NULL;
	sandbox_engine_refresh();
	int rc = sandbox_apply_parse(q, &spec, err);
	spec.hold_conn = q->fd;	/* the client that sent it holds the threads (HOLD) */
	uint64_t start = sandbox_now_ns();
	if (rc == 0)
		rc = sandbox_patch_apply(&spec, 0, &p, err);
	if (rc == 0) {
		sandbox_writer_uint(&q->w, p->id, 4);
		sandbox_writer_uint(&q->w, p->text_addr, 8);
		sandbox_writer_uint(&q->w, p->data_addr, 8);
		sandbox_writer_uint(&q->w, sandbox_now_ns() - start, 8);
	}
	free(spec.funcs);
	free(spec.fixups);
	return rc;
}

int sandbox_body_apply(const uint8_t *body, size_t len, char *name, size_t name_cap,
		       struct sandbox_error *err)
{
	struct sandbox_request q = { .r = { .p = body, .len = len } };
	struct sandbox_apply_spec spec = { 0 };
	int rc = sandbox_apply_parse(&q, &spec, err);
	spec.hold_conn = -1;	/* from the store: no client holds anything */
	snprintf(name, name_cap, "%s", q.patch);
	if (rc == 0)
		rc = sandbox_patch_apply(&spec, 0, NULL, err);
	free(spec.funcs);
	free(spec.fixups);
	return rc;
}

static int sandbox_msg_remove(struct sandbox_request *q, struct sandbox_error *err)
{
	const char *name;
	uint16_t len;
	if (sandbox_reader_str(&q->r, "name", &name, &len) != 0 || sandbox_reader_end(&q->r, "name") != 0)
		return sandbox_reader_error(&q->r, err);
	sandbox_request_name(q, name, len);
	sandbox_engine_refresh();
	uint64_t start = sandbox_now_ns();
	uint8_t state = PBX_STATE_APPLIED;
	int rc = sandbox_patch_remove(name, len, &state, err);
	if (rc == 0) {
		sandbox_writer_uint(&q->w, sandbox_now_ns() - start, 8);
		sandbox_writer_uint(&q->w, state, 1);
		if (state == PBX_STATE_UNLOADED)
			snprintf(q->note, sizeof(q->note), "ok (its library was unloaded: record dropped, nothing written)");
	}
	return rc;
}

static int sandbox_msg_test(struct sandbox_request *q, struct sandbox_error *err)
{
	if (sandbox_reader_end(&q->r, "the (empty) TEST request") != 0)
		return sandbox_reader_error(&q->r, err);
	char detail[SANDBOX_ERRMSG];
	int passed = sandbox_selftest_run(detail, sizeof(detail));
	sandbox_writer_uint(&q->w, passed ? 1 : 0, 1);
	sandbox_writer_str(&q->w, detail);
	if (!passed) {
		/* The log keeps what fits of the detail, cut where snprintf would cut it. */
		const char *text = sandbox_error_text(PBX_E_SELFTEST_FAILED);
		int room = (int)(sizeof(q->note) - 1 - strlen(text) - 2);
		snprintf(q->note, sizeof(q->note), "%s: %.*s", text, room, detail);
	}
	return 0;
}

static int sandbox_msg_debug(struct sandbox_request *q, struct sandbox_error *err)
{
	uint8_t on;
	if (SANDBOX_READ_UINT(&q->r, "on", 1, on) != 0 || sandbox_reader_end(&q->r, "on") != 0)
		return sandbox_reader_error(&q->r, err);
	if (on > 1)
		return sandbox_error_set(err, PBX_E_MALFORMED, "on = %u, expected 0 or 1", on);
	__atomic_store_n(&sandbox_debug_enabled, on, __ATOMIC_RELAXED);
	snprintf(q->note, sizeof(q->note), "ok (debug %s)", on ? "on" : "off");
	return 0;
}

typedef int (*sandbox_handler)(struct sandbox_request *, struct sandbox_error *);
static const sandbox_handler sandbox_handlers[] = {
	[PBX_MSG_INFO] = sandbox_msg_info, [PBX_MSG_LIST] = sandbox_msg_list,
	[PBX_MSG_APPLY] = sandbox_msg_apply, [PBX_MSG_REMOVE] = sandbox_msg_remove,
	[PBX_MSG_TEST] = sandbox_msg_test, [PBX_MSG_DEBUG] = sandbox_msg_debug,
};

/* ------------------------------------------------------------------ serving */

/* Answers one request frame whose payload has been read; returns -1 if the reply
 * could not be sent (connection to drop). */
int sandbox_request_serve(int fd, const struct sandbox_peer *peer, unsigned type, uint32_t seq,
			  const uint8_t *payload, size_t len)
{
	struct sandbox_request q = { .fd = fd, .r = { .p = payload, .len = len } };
	struct sandbox_error err = { PBX_E_OK, "" };
	static const uint8_t zero[PBX_HEADER_SIZE + 4];
	sandbox_writer_put(&q.w, zero, sizeof(zero));	/* header + status OK */
	sandbox_debug("%s request seq %u, %zu bytes, from pid %d", sandbox_msg_name(type), seq, len,
		      (int)peer->pid);
	int rc = sandbox_handlers[type](&q, &err);
	if (rc == 0 && q.w.failed)
		rc = sandbox_error_set(&err, PBX_E_NO_MEMORY, "reply too large");
	int sent;
	if (rc != 0) {
		if (err.code == PBX_E_OK)
			sandbox_error_set(&err, PBX_E_INTERNAL, NULL);
		/* Log first: whatever a client has seen is already in the log. */
		char res[SANDBOX_ERRMSG + 8];
		snprintf(res, sizeof(res), "error: %s", err.msg);
		sandbox_log_write(peer, sandbox_msg_name(type), q.patch[0] ? q.patch : NULL, res);
		sandbox_debug("%s: %s", sandbox_msg_name(type), err.msg);
		sent = sandbox_send_error(fd, type, seq, &err);
	} else {
		sandbox_log_write(peer, sandbox_msg_name(type), q.patch[0] ? q.patch : NULL,
				  q.note[0] ? q.note : "ok");
		sent = sandbox_send_reply(fd, type, seq, &q.w);
	}
	free(q.w.buf);
	return sent;
}
